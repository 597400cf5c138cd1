import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import ONE_ACTIVATION_TYPES, step_on_batches, synthetic_cfg

from matryoshka_sae.config import compute_fvu
from matryoshka_sae.sae import (
    BatchTopKSAE,
    GlobalBatchTopKMatryoshkaSAE,
    JumpReLUSAE,
    MatryoshkaTranscoder,
    TopKSAE,
    _JumpReLU,
    _Step,
    create_sae,
)
from matryoshka_sae.training import make_optimizer, training_step

D, S, K, B = 32, 256, 8, 128  # helpers.synthetic_cfg: act_size, dict_size, top_k, batch_size
TOPK_FAMILY = ["topk", "batchtopk", "matryoshka", "matryoshka_transcoder"]


def batch(seed=0, n=B, d=D):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=generator) * 2 + torch.linspace(-3, 3, d)


def inputs(sae, x, y=None):
    """The dictionary's arguments for the batch x: (x,), or a transcoder's (x, y) with y by default
    a fixed function of x."""
    if isinstance(sae, MatryoshkaTranscoder):
        return x, (y if y is not None else 0.5 * x.roll(1, dims=1) + 1)
    return (x,)


def run(sae, x, y=None):
    return sae(*inputs(sae, x, y))


# ---------------------------------------------------------------------------------------------
# A plain dense computation of the TopK family's loss, the specification the fast path must meet
# ---------------------------------------------------------------------------------------------


def dense_reference_loss(sae, x, y=None):
    cfg = sae.cfg
    x_n, stats = sae.normalize_source(x)
    y_stats = sae.target_stats(stats)
    y_n = sae.to_units(x if y is None else y, y_stats)
    pre = sae.center(x_n) @ sae.W_enc + sae.b_enc
    acts = F.relu(pre)
    if isinstance(sae, BatchTopKSAE):
        t = acts.detach().flatten().topk(K * x.shape[0]).values[-1]
        mask = (acts >= t) & (acts > 0)
    else:
        idx = acts.detach().topk(K, dim=1).indices
        mask = torch.zeros_like(acts, dtype=torch.bool).scatter_(1, idx, True) & (acts > 0)
    z = acts * mask
    ends = sae.group_ends.tolist()
    prefixes = [z[:, :m] @ sae.W_dec[:m] + sae.b_dec for m in ends]
    l2 = torch.stack([(p - y_n).pow(2).mean() for p in prefixes]).mean()
    dead = sae.dead_latents()
    aux = torch.zeros(())
    if dead.any():
        dead_acts = F.relu(pre[:, dead])
        k_aux = min(cfg["top_k_aux"], int(dead.sum()))
        idx = dead_acts.detach().topk(k_aux, dim=1).indices
        z_aux = dead_acts * torch.zeros_like(dead_acts, dtype=torch.bool).scatter_(1, idx, True)
        e = (y_n - prefixes[-1]).detach()
        aux = cfg["aux_penalty"] * (z_aux @ sae.W_dec[dead] - e).pow(2).mean()
    return l2 + aux, l2, aux


@pytest.mark.parametrize("sae_type", TOPK_FAMILY)
@pytest.mark.parametrize("with_dead", [False, True])
def test_fast_path_matches_dense_reference(sae_type, with_dead):
    sae = create_sae(synthetic_cfg(sae_type, top_k_aux=16))
    with torch.no_grad():  # move away from the symmetric initialisation
        sae.b_dec.normal_(0, 0.1)
        sae.b_enc.normal_(0, 0.1)
        sae.W_dec.add_(0.1 * torch.randn_like(sae.W_dec))
    run(
        sae, batch(0)
    )  # a first batch sets BatchTopK's threshold, whose hint speeds the next selection
    sae.zero_grad()
    sae.tokens_since_fired.zero_()
    if with_dead:
        sae.tokens_since_fired[::3] = 10**9
    x = batch(1)
    y = 0.5 * x.roll(1, dims=1) + 1
    if isinstance(sae, MatryoshkaTranscoder):
        sae.initialize_b_dec(y)
    reference = copy.deepcopy(sae)
    out = run(sae, x, y)
    ref_loss, ref_l2, ref_aux = dense_reference_loss(
        reference, x, y if isinstance(sae, MatryoshkaTranscoder) else None
    )
    assert (out["aux_loss"] > 0) == with_dead
    torch.testing.assert_close(out["l2_loss"], ref_l2, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out["aux_loss"], ref_aux, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out["loss"], ref_loss, rtol=1e-5, atol=1e-7)
    out["loss"].backward()
    ref_loss.backward()
    for name, param in sae.named_parameters():
        ref_grad = dict(reference.named_parameters())[name].grad
        torch.testing.assert_close(param.grad, ref_grad, rtol=1e-4, atol=1e-6, msg=name)


def test_batch_topk_keeps_k_times_batch_in_training_and_threshold_in_eval():
    sae = BatchTopKSAE(synthetic_cfg("batchtopk"))
    x = batch(2)
    out = sae(x)
    assert int((out["feature_acts"] > 0).sum()) == K * B
    assert out["l0_norm"].item() == K
    assert sae.threshold.item() > 0
    sae.eval()
    with torch.no_grad():
        sae.threshold.fill_(0.7)
        x_n, _ = sae.normalize_source(x)
        pre = sae.center(x_n) @ sae.W_enc + sae.b_enc
        expected = pre * (pre > 0.7)
        torch.testing.assert_close(sae.encode(x), expected)
        torch.testing.assert_close(sae(x)["feature_acts"], expected)
    assert sae.threshold.item() == pytest.approx(0.7)  # eval changes no state


def test_threshold_is_an_ema_of_the_smallest_kept_activation():
    sae = BatchTopKSAE(synthetic_cfg("batchtopk", threshold_ema_rate=0.5))
    mins = []
    for seed in range(3):
        out = sae(batch(seed))
        acts = out["feature_acts"]
        mins.append(acts[acts > 0].min().item())
    expected = mins[0]
    for m in mins[1:]:
        expected = 0.5 * expected + 0.5 * m
    assert sae.threshold.item() == pytest.approx(expected, rel=1e-5)


def test_topk_keeps_k_per_row():
    sae = TopKSAE(synthetic_cfg("topk"))
    acts = sae(batch(3))["feature_acts"]
    assert torch.equal((acts > 0).sum(dim=1), torch.full((B,), K))
    sae.eval()
    assert torch.equal((sae.encode(batch(3)) > 0).sum(dim=1), torch.full((B,), K))


@pytest.mark.parametrize("sae_type", ["matryoshka", "matryoshka_transcoder"])
def test_every_matryoshka_prefix_contributes_gradient(sae_type):
    sae = create_sae(synthetic_cfg(sae_type))
    x = batch(4)
    x_n, stats = sae.normalize_source(x)
    y_n = sae.to_units(
        0.5 * x + 1 if sae_type.endswith("transcoder") else x, sae.target_stats(stats)
    )
    ends = sae.group_ends.tolist()
    starts = [0] + ends[:-1]
    for g, end in enumerate(ends):
        sae.zero_grad()
        partials, dense, _ = sae._code_and_partials(sae.center(x_n), x)
        prefixes = partials.cumsum(dim=1) + dense
        (prefixes[:, g] - y_n).pow(2).mean().backward()
        row_grad = sae.W_dec.grad.norm(dim=1)
        assert row_grad[:end].sum() > 0 and row_grad[end:].sum() == 0
        assert row_grad[starts[g] : end].sum() > 0  # the group's own latents learn from its prefix
    out = run(sae, x)
    assert {"fvu_min", "fvu_max", "fvu_mean"} <= set(out)
    assert out["fvu_min"] <= out["fvu_mean"] <= out["fvu_max"]
    # The training loss averages the reconstruction loss of every prefix.
    assert out["min_l2_loss"] < out["l2_loss"] < out["max_l2_loss"]


def test_matryoshka_last_prefix_fvu_is_the_output_fvu():
    sae = GlobalBatchTopKMatryoshkaSAE(synthetic_cfg("matryoshka"))
    x = batch(5)
    out = sae(x)
    assert out["fvu_per_prefix"][-1].item() == pytest.approx(out["fvu"].item(), rel=1e-5)
    assert out["fvu"].item() == pytest.approx(compute_fvu(x, out["sae_out"]).item(), rel=1e-6)


@pytest.mark.parametrize("sae_type", ONE_ACTIVATION_TYPES)
def test_the_decoder_gradient_has_no_component_along_its_rows(sae_type):
    sae = create_sae(synthetic_cfg(sae_type))
    run(sae, batch(0))["loss"].backward()
    sae.remove_parallel_decoder_grad()
    assert (sae.W_dec.grad * sae.W_dec).sum(dim=1).abs().max() < 1e-5


@pytest.mark.parametrize("sae_type", ONE_ACTIVATION_TYPES)
def test_decoder_rows_stay_unit_norm_after_a_step(sae_type):
    cfg = synthetic_cfg(sae_type, lr=1e-2)
    sae = create_sae(cfg)
    optimizer = make_optimizer(sae, cfg)
    for seed in range(3):
        training_step(sae, optimizer, inputs(sae, batch(seed)), cfg["lr"], cfg["max_grad_norm"])
        torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(S))


@pytest.mark.parametrize("sae_type", ONE_ACTIVATION_TYPES)
def test_outputs_are_in_original_units(sae_type):
    """With per-token standardisation, scaling an input scales its reconstruction."""
    sae = create_sae(synthetic_cfg(sae_type))
    sae.eval()
    x = batch(6)
    if sae_type == "matryoshka_transcoder":
        return  # the transcoder's output units are the target's, fixed by target_scale
    with torch.no_grad():
        torch.testing.assert_close(
            sae.reconstruct(7 * x), 7 * sae.reconstruct(x), rtol=1e-4, atol=1e-4
        )
        torch.testing.assert_close(sae(x)["sae_out"], sae.reconstruct(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sae_type", ONE_ACTIVATION_TYPES)
def test_required_output_keys_and_encode_is_stateless(sae_type):
    sae = create_sae(synthetic_cfg(sae_type))
    x = batch(7)
    out = run(sae, x)
    for key in (
        "loss",
        "l2_loss",
        "l1_loss",
        "l1_norm",
        "l0_norm",
        "aux_loss",
        "fvu",
        "num_dead_features",
    ):
        assert out[key].dim() == 0, key
    assert out["sae_out"].shape == (B, D) and out["feature_acts"].shape == (B, S)
    state = {k: v.clone() for k, v in sae.state_dict().items()}
    first = sae.encode(x)
    assert torch.equal(first, sae.encode(x))
    assert sae.encode(x.reshape(4, B // 4, D)).shape == (4, B // 4, S)
    for key, value in sae.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_dead_latents_are_counted_by_tokens():
    sae = TopKSAE(synthetic_cfg("topk", n_batches_to_dead=2))
    x = batch(8)
    sae(x)
    fired = sae(x)["feature_acts"].gt(0).any(0)
    assert torch.equal(
        sae.tokens_since_fired[fired], torch.zeros(int(fired.sum()), dtype=torch.long)
    )
    assert torch.all(sae.tokens_since_fired[~fired] == 2 * B)
    assert sae(x)["num_dead_features"].item() == int((~fired).sum())
    sae.eval()
    sae(x)
    assert torch.all(sae.tokens_since_fired[~fired] == 3 * B)  # eval leaves the counters alone


def test_state_dict_round_trip_gives_identical_outputs():
    for sae_type in ONE_ACTIVATION_TYPES:
        sae = create_sae(synthetic_cfg(sae_type))
        run(sae, batch(9))  # learn a threshold, move counters
        clone = create_sae(synthetic_cfg(sae_type, seed=1))
        clone.load_state_dict(sae.state_dict())
        sae.eval(), clone.eval()
        assert torch.equal(sae.reconstruct(batch(10)), clone.reconstruct(batch(10)))


def test_jumprelu_threshold_gradient_matches_smoothed_finite_difference():
    """The STE gradient equals the derivative of the loss with the step smoothed over the kernel."""
    eps = 0.01
    torch.manual_seed(0)
    pre = torch.rand(4000, 3) * 0.4
    theta = torch.tensor([0.1, 0.2, 0.3])

    def smooth_step(z):  # integral of the rectangle kernel: a ramp over [-eps/2, eps/2]
        return (z / eps + 0.5).clamp(0, 1)

    def check(function, smoothed_loss, rel):
        theta_var = theta.clone().requires_grad_()
        function.apply(pre, theta_var, eps).sum().backward()
        for i in range(3):
            h = torch.zeros(3)
            h[i] = 1e-4
            fd = (smoothed_loss(theta + h) - smoothed_loss(theta - h)) / 2e-4
            assert theta_var.grad[i].item() == pytest.approx(fd.item(), rel=rel)

    check(_Step, lambda t: smooth_step(pre - t).sum(), rel=0.05)
    # The jump's estimate -(theta/eps) K matches the smoothed pre * ramp up to O(eps / theta).
    check(_JumpReLU, lambda t: (pre * smooth_step(pre - t)).sum(), rel=0.1)


def test_jumprelu_log_threshold_gets_the_chain_rule():
    sae = JumpReLUSAE(synthetic_cfg("jumprelu", bandwidth=0.05, jumprelu_threshold_init=0.5))
    x = batch(11)
    loss = sae(x)["loss"]
    loss.backward()
    grad_log = sae.log_threshold.grad.clone()
    # Same loss as a function of theta directly: d/dlog(theta) = theta * d/dtheta.
    theta = sae.log_threshold.detach().exp().requires_grad_()
    x_n, _ = sae.normalize_source(x)
    pre = sae.center(x_n) @ sae.W_enc + sae.b_enc
    acts = _JumpReLU.apply(pre, theta, 0.05)
    l2 = (sae.decode(acts) - x_n).pow(2).mean()
    l0 = _Step.apply(pre, theta, 0.05).sum(-1).mean()
    (l2 + sae.cfg["l0_coeff"] * l0).backward()
    torch.testing.assert_close(grad_log, theta.grad * theta.detach(), rtol=1e-4, atol=1e-7)
    assert grad_log.abs().sum() > 0


def planted_data(n, d=D, n_features=64, k_true=4, seed=0):
    """Sparse combinations of a hidden dictionary: a task an SAE can learn."""
    generator = torch.Generator().manual_seed(seed)
    features = F.normalize(torch.randn(n_features, d, generator=generator), dim=1)
    idx = torch.rand(n, n_features, generator=generator).argsort(dim=1)[:, :k_true]
    coeff = torch.rand(n, k_true, generator=generator) * 3 + 1
    return torch.einsum("nk,nkd->nd", coeff, features[idx]), features


@pytest.mark.parametrize("sae_type", ONE_ACTIVATION_TYPES)
def test_loss_falls_on_a_planted_sparse_dictionary(sae_type):
    cfg = synthetic_cfg(
        sae_type,
        lr=3e-3,
        l1_coeff=3e-4 if sae_type == "vanilla" else None,
        l0_coeff=3e-4,
        bandwidth=0.05,
        jumprelu_threshold_init=0.05,
    )
    sae = create_sae(cfg)
    data, _ = planted_data(200 * B)
    mix = torch.randn(D, D) / D**0.5  # the transcoder learns a fixed linear map of the source
    batches = [inputs(sae, x, x @ mix) for x in data.split(B)]
    fvus = [out["fvu"].item() for out in step_on_batches(sae, cfg, batches)]
    assert sum(fvus[-10:]) / 10 < 0.5 * sum(fvus[:10]) / 10
    assert sum(fvus[-10:]) / 10 < 0.3


def test_bf16_encoder_keeps_float32_parameters():
    sae = create_sae(synthetic_cfg("matryoshka", dtype="bfloat16"))
    out = sae(batch(12))
    out["loss"].backward()
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in sae.parameters())
    assert out["sae_out"].dtype == torch.float32


def test_transcoder_shapes_and_mismatched_rows():
    cfg = synthetic_cfg("matryoshka_transcoder", source_act_size=D, target_act_size=48)
    transcoder = MatryoshkaTranscoder(cfg)
    out = transcoder(batch(13), torch.randn(B, 48))
    assert out["sae_out"].shape == (B, 48)
    with pytest.raises(ValueError, match="rows"):
        transcoder(batch(13), torch.randn(B - 1, 48))


@pytest.mark.parametrize("sae_type", ["matryoshka", "matryoshka_transcoder"])
def test_reconstruct_prefixes_agree_with_the_outputs(sae_type):
    sae = create_sae(synthetic_cfg(sae_type))
    x = batch(14)
    y = 0.5 * x.roll(1, dims=1) + 1
    if sae_type.endswith("transcoder"):
        sae.initialize_b_dec(y)
    run(sae, x, y)
    sae.eval()
    with torch.no_grad():
        out = run(sae, x, y)
        prefixes = sae.reconstruct_prefixes(x)
        assert prefixes.shape == (B, 4, D)
        torch.testing.assert_close(prefixes[:, -1], sae.reconstruct(x))
        target = y if sae_type.endswith("transcoder") else x
        for g in range(4):
            assert out["fvu_per_prefix"][g].item() == pytest.approx(
                compute_fvu(target, prefixes[:, g]).item(), rel=1e-4
            )
        # Prefix 0 decodes only the first group's latents.
        z = sae.encode(x)
        m = sae.cfg["group_sizes"][0]
        x_n, stats = sae.normalize_source(x)
        first = sae.restore_target(z[:, :m] @ sae.W_dec[:m] + sae.b_dec, sae.target_stats(stats))
        torch.testing.assert_close(prefixes[:, 0], first, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sae_type", ONE_ACTIVATION_TYPES)
def test_forward_accepts_batch_and_position_dims_and_ignores_autocast(sae_type):
    sae = create_sae(synthetic_cfg(sae_type))
    sae.eval()
    x = batch(15).reshape(8, B // 8, D)
    with torch.no_grad():
        flat = run(sae, x.reshape(B, D))
        out = run(sae, x)
        assert out["sae_out"].shape == (8, B // 8, D) and out["feature_acts"].shape == (
            8,
            B // 8,
            S,
        )
        torch.testing.assert_close(out["sae_out"].reshape(B, D), flat["sae_out"])
    with torch.autocast(
        "cpu", dtype=torch.bfloat16
    ):  # cfg["dtype"], not autocast, sets the encoder's
        run(sae, x)["loss"]


def test_one_registry_names_every_class_and_the_dictionary_modules_import_one_way():
    """SAE_CLASSES names a class for every sae_type the cfg accepts, each reachable as sae.<name>.
    The shared base (dictionary.py) and the cross-layer transcoder's module import only modules
    below them, never sae.py, which imports both: no two of them import each other."""
    import ast
    from pathlib import Path

    from matryoshka_sae import config, sae

    assert set(sae.SAE_CLASSES) == set(config.SAE_TYPES)
    for cls in sae.SAE_CLASSES.values():
        assert getattr(sae, cls.__name__) is cls

    def package_imports(module: str) -> set[str]:
        source = (Path(sae.__file__).parent / f"{module}.py").read_text()
        found = set()
        for node in ast.walk(ast.parse(source)):  # at any depth: a lazy import counts too
            if isinstance(node, ast.ImportFrom) and node.module == "matryoshka_sae":
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "matryoshka_sae."
            ):
                found.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                found |= {
                    a.name.split(".")[1] for a in node.names if a.name.startswith("matryoshka_sae.")
                }
        return found

    assert package_imports("dictionary") <= {"distributed"}
    assert package_imports("prefix_loss") == set()
    assert package_imports("cross_layer_transcoder") <= {
        "dictionary",
        "prefix_loss",
        "sparse_ops",
        "config",
        "distributed",
    }
    assert {"dictionary", "cross_layer_transcoder"} <= package_imports("sae")
