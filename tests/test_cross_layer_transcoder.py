"""Cross-layer transcoders (sae.MatryoshkaCrossLayerTranscoder): the loss and gradients of a dense
reference, a decode that never forms the dense product, training, exact resume on the real
multi-hook store, torchrun, and the export that circuit-tracer's own loader reads.

Run as a script under torchrun, this file is the worker of the two-rank test:
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/test_cross_layer_transcoder.py OUT
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest  # noqa: E402
import torch  # noqa: E402

from matryoshka_sae import distributed  # noqa: E402
from matryoshka_sae.config import get_default_cfg, post_init_cfg  # noqa: E402
from matryoshka_sae.sae import MatryoshkaCrossLayerTranscoder, create_sae  # noqa: E402

LAYERS = [0, 1, 2]
D = 8
N_STEPS = 8
BATCH = 32
# What each sparsity mode needs besides its name: jumprelu steers to a target L0 per source layer.
SPARSITY = {"global": {}, "per_layer": {}, "jumprelu": {"target_l0": 2}}


def clt_cfg(tmp_path=None, **overrides) -> dict:
    """A 3-layer CLT on synthetic activations of width 8: 12 latents a layer in groups 3, 3, 6, k = 2."""
    cfg = get_default_cfg()
    cfg.update(
        model_name="synthetic",
        act_size=D,
        sae_type="matryoshka_clt",
        clt_layers=LAYERS,
        dict_size=12,
        group_sizes=[3, 3, 6],
        top_k=2,
        input_unit_norm=False,
        device="cpu",
        batch_size=BATCH,
        num_tokens=BATCH * N_STEPS,
        log_freq=2,
        checkpoint_freq=4,
        seed=5,
        n_batches_to_dead=1,
        top_k_aux=4,
        wandb_mode="disabled",
        checkpoint_dir=str(tmp_path or "unused"),
    )
    cfg.update(overrides)
    return post_init_cfg(cfg)


class PlantedCLTStore:
    """Batches (sources of every layer, then targets) of a planted cross-layer map: 16 sparse features
    per layer read from the source and written, through fixed random directions, to that layer's
    target and every later one; each layer's source and target on its own scale. Seeded: the same
    global batches every time."""

    def __init__(self, seed: int = 0, batch_size: int = BATCH, n_layers: int = len(LAYERS)):
        self.generator = torch.Generator().manual_seed(seed)
        g = torch.Generator().manual_seed(123)
        self.batch_size, self.n = batch_size, n_layers
        self.read = [torch.randn(16, D, generator=g) for _ in range(n_layers)]
        self.write = [
            [torch.randn(16, D, generator=g) * (1 + m) for m in range(n_layers)]
            for _ in range(n_layers)
        ]

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        codes = [
            torch.rand(self.batch_size, 16, generator=self.generator)
            * (torch.rand(self.batch_size, 16, generator=self.generator) < 0.15)
            for _ in range(self.n)
        ]
        sources = [
            (c @ r) * (1 + j) + 0.01 * torch.randn(self.batch_size, D, generator=self.generator)
            for j, (c, r) in enumerate(zip(codes, self.read))
        ]
        targets = [
            sum(codes[j] @ self.write[j][m] for j in range(m + 1)) + 0.5 for m in range(self.n)
        ]
        return (*sources, *targets)


def trained_clt(cfg: dict, steps: int = 3) -> MatryoshkaCrossLayerTranscoder:
    """A CLT after a few training steps (scales, thresholds and dead counters set)."""
    from matryoshka_sae.training import make_optimizer, training_step

    torch.manual_seed(0)
    clt, store = create_sae(cfg), PlantedCLTStore()
    clt.initialize_from_batch(*store.next_batch())
    optimizer = make_optimizer(clt, cfg)
    for _ in range(steps):
        training_step(clt, optimizer, store.next_batch(), cfg["lr"], cfg["max_grad_norm"])
    return clt


# ---------------------------------------------------------------------------------------------
# The dense reference
# ---------------------------------------------------------------------------------------------


def dense_reference(
    params: dict, clt: MatryoshkaCrossLayerTranscoder, batch, dead: torch.Tensor
) -> dict:
    """Loss of the class docstring computed densely from `params` (copies of the CLT's parameters):
    BatchTopK by sorting, or JumpReLU as JumpReLUSAE computes it on the dense [B, L S] pre-activations
    (with its straight-through functions and quadratic objective), every (prefix, layer) prediction
    as a matmul of the masked code."""
    cfg, n, S = clt.cfg, clt.n_layers, clt.latents_per_layer
    x = torch.stack(batch[:n], dim=1) - clt.source_mean
    y_n = torch.stack(batch[n:], dim=1) / clt.target_scale[:, None]
    pre = torch.cat(
        [
            x[:, j] @ params["W_enc"][:, j * S : (j + 1) * S] + params["b_enc"][j * S : (j + 1) * S]
            for j in range(n)
        ],
        dim=1,
    )
    B = pre.shape[0]
    mask = torch.zeros_like(pre, dtype=torch.bool)
    sparsity_loss = torch.zeros(())
    if cfg["clt_sparsity"] == "jumprelu":
        from matryoshka_sae.sae import _JumpReLU, _Step

        theta = params["log_threshold"].exp()
        eps = (
            cfg["bandwidth"]
            if cfg["bandwidth"] is not None
            else cfg["jumprelu_relative_bandwidth"] * theta.detach()
        )
        z = _JumpReLU.apply(pre, theta, eps)
        l0 = _Step.apply(pre, theta, eps).sum(dim=1).mean()
        sparsity_loss = cfg["l0_coeff"] * (l0 / (cfg["target_l0"] * n) - 1) ** 2
    elif cfg["clt_sparsity"] == "global":
        mask.view(-1)[pre.detach().flatten().topk(cfg["top_k"] * n * B).indices] = True
    else:
        for j in range(n):
            chosen = pre[:, j * S : (j + 1) * S].detach().flatten().topk(cfg["top_k"] * B).indices
            flat = torch.zeros(B * S, dtype=torch.bool)
            flat[chosen] = True
            mask[:, j * S : (j + 1) * S] = flat.view(B, S)
    if cfg["clt_sparsity"] != "jumprelu":
        z = pre * (mask & (pre > 0))

    def decode(code, end):  # [B, n, d] from latents [0, end) of every layer, without b_dec
        return torch.stack(
            [
                sum(
                    code[:, j * S : j * S + end] @ params[f"W_dec.{j}"][:end, m - j]
                    for j in range(m + 1)
                )
                for m in range(n)
            ],
            dim=1,
        )

    weights = 1 / clt.target_variance
    ends = torch.tensor(cfg["group_sizes"]).cumsum(0).tolist()
    prefixes = [decode(z, end) + params["b_dec"] for end in ends]
    l2 = torch.stack([((p - y_n).pow(2).mean(dim=(0, 2)) * weights).sum() for p in prefixes]).mean()
    residual = (y_n - prefixes[-1]).detach()
    aux = torch.zeros(())
    if dead.any():
        dead_pre = torch.where(dead, pre, torch.full_like(pre, -float("inf")))
        top = dead_pre.detach().topk(cfg["top_k_aux"], dim=1).indices
        aux_mask = torch.zeros_like(mask).scatter_(1, top, True) & (pre > 0) & dead
        e_hat = decode(pre * aux_mask, S)
        aux = cfg["aux_penalty"] * ((e_hat - residual).pow(2).mean(dim=(0, 2)) * weights).sum()
    return {
        "loss": l2 + aux + sparsity_loss,
        "l2_loss": l2,
        "aux_loss": aux,
        "sparsity_loss": sparsity_loss,
        "prefixes": prefixes,
    }


@pytest.mark.parametrize(
    "sparsity,settings",
    [
        pytest.param("global", {}, id="global"),
        pytest.param("per_layer", {}, id="per_layer"),
        pytest.param("jumprelu", {}, id="jumprelu"),
        pytest.param(
            "jumprelu", {"bandwidth": 0.5}, id="jumprelu-fixed-bandwidth"
        ),  # windows reaching below 0
    ],
)
def test_loss_and_gradients_equal_the_dense_reference(sparsity, settings):
    cfg = clt_cfg(clt_sparsity=sparsity, **SPARSITY[sparsity], **settings)
    clt = trained_clt(cfg)
    clt.tokens_since_fired[::3] = 10**6  # every third latent dead: AuxK is in the loss
    batch = PlantedCLTStore(seed=9).next_batch()
    dead = clt.dead_latents().clone()
    params = {name: p.detach().clone().requires_grad_(True) for name, p in clt.named_parameters()}
    expected = dense_reference(params, clt, batch, dead)
    expected["loss"].backward()
    out = clt(*batch)
    out["loss"].backward()
    assert out["aux_loss"] > 0 and out["l0_norm"] > 0
    keys = ("loss", "l2_loss", "aux_loss")
    if (
        sparsity == "jumprelu"
    ):  # some entries lie in the window below theta, and theta learns from them
        keys += ("sparsity_loss",)
        with torch.no_grad():
            x = torch.stack(batch[: len(LAYERS)], dim=1) - clt.source_mean
            pre = clt.preactivations(x)
            theta = clt.log_threshold.exp()
            eps = cfg["bandwidth"] or cfg["jumprelu_relative_bandwidth"] * theta
        below = (pre > theta - eps / 2) & (pre <= theta)
        assert below.sum() > 0 and out["sparsity_loss"] > 0
        assert out["l0_norm"].item() == pytest.approx((pre > theta).sum().item() / len(pre))
        assert clt.log_threshold.grad.abs().sum() > 0
    for key in keys:
        torch.testing.assert_close(out[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
    for name, p in clt.named_parameters():
        torch.testing.assert_close(p.grad, params[name].grad, rtol=1e-4, atol=1e-6, msg=name)
    # every prefix and every output layer, in the targets' units
    scale = clt.target_scale[:, None]
    targets = torch.stack(batch[len(LAYERS) :], dim=1)
    torch.testing.assert_close(
        out["sae_out"], expected["prefixes"][-1].detach() * scale, rtol=1e-5, atol=1e-5
    )
    from matryoshka_sae.config import compute_fvu

    for j, layer in enumerate(LAYERS):
        fvu = compute_fvu(targets[:, j], expected["prefixes"][-1][:, j].detach() * scale[j])
        torch.testing.assert_close(out[f"fvu_layer_{layer}"], fvu, rtol=1e-4, atol=1e-6)
    for g, prefix in enumerate(expected["prefixes"]):
        fvus = [
            compute_fvu(targets[:, j], prefix[:, j].detach() * scale[j]) for j in range(len(LAYERS))
        ]
        torch.testing.assert_close(
            out["fvu_per_prefix"][g], torch.stack(fvus).mean(), rtol=1e-4, atol=1e-6
        )


def test_per_layer_sparsity_keeps_k_per_layer_and_global_k_times_layers():
    batch = PlantedCLTStore(seed=3).next_batch()
    for sparsity in ("global", "per_layer"):
        clt = trained_clt(clt_cfg(clt_sparsity=sparsity), steps=0).train()
        out = clt(*batch)
        assert out["l0_norm"].item() == pytest.approx(2 * len(LAYERS))
        per_layer = [out[f"l0_layer_{layer}"].item() for layer in LAYERS]
        if sparsity == "per_layer":
            assert per_layer == pytest.approx([2.0] * len(LAYERS))
        assert sum(per_layer) == pytest.approx(2 * len(LAYERS))


def allocations(run) -> list[int]:
    """Sizes (elements) of the tensors that ops allocate while `run()` runs: a view or an in-place
    result (whose storage is one of the op's inputs') is not counted, nor a sparse tensor (its
    logical size is not memory; its index and value tensors are counted where they are made)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    sizes = []

    class Allocations(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            inputs = {
                t.untyped_storage().data_ptr()
                for t in tree_leaves((args, kwargs))
                if isinstance(t, torch.Tensor) and t.layout == torch.strided
            }
            for t in tree_leaves(result):
                if (
                    isinstance(t, torch.Tensor)
                    and t.layout == torch.strided
                    and t.untyped_storage().data_ptr() not in inputs
                ):
                    sizes.append(t.numel())
            return result

    with Allocations():
        run()
    return sizes


def test_the_sparse_decode_never_forms_the_dense_decoder_product():
    """No tensor of forward or backward is as large as [B, S, d] of one layer's dense product, let
    alone [B, S, L, d]: the largest are the pre-activations [B, L S] and the predictions [B, G, L, d]."""
    B, S, n, d = 256, 64, 4, 16
    cfg = clt_cfg(
        clt_layers=list(range(n)), dict_size=S, group_sizes=[16, 48], act_size=d, batch_size=B
    )
    clt = create_sae(cfg)
    batch = [torch.randn(B, d) for _ in range(2 * n)]
    clt.initialize_from_batch(*batch)
    sizes = allocations(lambda: clt(*batch)["loss"].backward())
    inherent = max(B * n * S, B * 2 * n * d, S * n * d, d * n * S)
    assert max(sizes) <= inherent < B * S * d


def test_the_cross_layer_decode_forms_no_partial_per_source_layer():
    """The decode's forward and backward allocate the output [B, G, L, d] and nothing else as large as
    [B, G, L - 1, d], source layer 1's partial decode of its later layers: no partial per source layer
    (together (L + 1) / 2 = 2.5 times the output here) and no per-layer copy of the output's gradient."""
    B, S, n, d = 512, 32, 4, 16
    cfg = clt_cfg(
        clt_layers=list(range(n)), dict_size=S, group_sizes=[8, 24], act_size=d, batch_size=B
    )
    clt = create_sae(cfg)
    clt.initialize_from_batch(*[torch.randn(B, d) for _ in range(2 * n)])
    from matryoshka_sae.sparse_ops import select_batch_topk

    pre = torch.randn(B, n * S)
    code = select_batch_topk(pre, 2 * n)  # 2 latents a layer and row on average
    values = pre[code.rows, code.latents].requires_grad_(True)
    upstream = torch.randn(B, 2, n, d)
    out = []
    sizes = allocations(lambda: out.append(clt.decode_groups(code.with_values(values))))
    sizes += allocations(lambda: out[0].backward(upstream))
    assert out[0].shape == (B, 2, n, d) and values.grad.abs().sum() > 0
    partial = B * 2 * (n - 1) * d
    assert [size for size in sizes if size >= partial] == [B * 2 * n * d]
    assert (
        max(size for size in sizes if size < partial) <= partial // 2
    )  # everything else: well below


def test_the_decode_reads_the_packed_decoders_in_place_and_they_stay_packed(tmp_path):
    """The decoders lie end to end in one storage, so the decode's forward copies no weights (the
    table of every layer's rows would be the largest allocation here); they stay so through a
    dtype change, training steps, a checkpoint round trip, and the decode equals the one over a
    concatenated copy exactly."""
    import copy

    from matryoshka_sae.checkpoint import load_sae, save_checkpoint
    from matryoshka_sae.sparse_ops import end_to_end, select_batch_topk

    B, S, n, d = 8, 256, 4, 16
    cfg = clt_cfg(tmp_path, clt_layers=list(range(n)), dict_size=S, group_sizes=[64, 192])
    cfg = post_init_cfg({**cfg, "act_size": d, "batch_size": B})
    clt = create_sae(cfg)
    assert end_to_end(list(clt.W_dec))
    pre = torch.randn(B, n * S)
    code = select_batch_topk(pre, 2 * n)
    code = code.with_values(pre[code.rows, code.latents])
    out = []
    sizes = allocations(lambda: out.append(clt.decode_groups(code)))
    table = S * (n + n - 1 + n - 2 + n - 3) * d
    assert max(sizes) < table // 4, (max(sizes), table)
    unpacked = copy.deepcopy(clt)
    for w in unpacked.W_dec:
        w.data = w.data.clone()
    assert not end_to_end(list(unpacked.W_dec))  # the concatenating path
    assert torch.equal(unpacked.decode_groups(code), out[0])
    assert end_to_end(list(clt.double().float().W_dec))
    trained_cfg = clt_cfg(tmp_path)  # the planted store's 3 layers
    trained = trained_clt(trained_cfg)
    assert end_to_end(list(trained.W_dec))
    save_checkpoint(tmp_path / "saved", trained, trained_cfg)
    loaded = load_sae(tmp_path / "saved")
    assert end_to_end(list(loaded.W_dec))
    assert all(torch.equal(a, b) for a, b in zip(loaded.W_dec, trained.W_dec))


# ---------------------------------------------------------------------------------------------
# Training, config, resume
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", ["global", "per_layer", "jumprelu"])
def test_training_learns_the_planted_cross_layer_map(tmp_path, sparsity):
    from matryoshka_sae.training import train_sae

    cfg = clt_cfg(
        tmp_path,
        clt_sparsity=sparsity,
        dict_size=32,
        group_sizes=[8, 24],
        top_k=4,
        num_tokens=BATCH * 400,
        batch_size=BATCH,
        lr=3e-3,
        checkpoint_freq=10**6,
        log_freq=50,
        target_l0=4 if sparsity == "jumprelu" else None,
    )
    torch.manual_seed(0)
    clt = train_sae(create_sae(cfg), PlantedCLTStore(), None, cfg)
    clt.eval()
    out = clt(*PlantedCLTStore(seed=77, batch_size=256).next_batch())
    fvus = {k: round(v.item(), 3) for k, v in out.items() if k.startswith("fvu_layer")}
    assert out["fvu_layer_max"] < 0.6, fvus  # predicting each layer's mean: 1
    if sparsity == "jumprelu":  # steered to 4 active latents a token per source layer, 12 in all
        l0s = {k: round(v.item(), 2) for k, v in out.items() if k.startswith("l0")}
        assert out["l0_norm"].item() == pytest.approx(4 * len(LAYERS), rel=0.2), l0s


def test_config_derives_every_layer_and_refuses_bad_settings():
    cfg = get_default_cfg()
    cfg.update(
        model_name="smollm2-135m",
        sae_type="clt",
        dict_size=None,
        group_sizes=None,
        input_unit_norm=False,
    )
    cfg = post_init_cfg(cfg)
    assert cfg["clt_layers"] == list(range(30)) and cfg["source_site"] == "ln2_normalized"
    from matryoshka_sae.activation_store import dictionary_hooks

    hooks = dictionary_hooks(cfg)
    assert (
        hooks[0] == "blocks.0.ln2.hook_normalized"
        and hooks[30] == "blocks.0.hook_mlp_out"
        and len(hooks) == 60
    )
    cfg["model_name"] = "gpt2"
    assert post_init_cfg(cfg)["clt_layers"] == list(range(12))  # derived again for the new model
    for bad, match in (
        ({"clt_layers": [2, 1]}, "ascending"),
        ({"clt_layers": [0, 40]}, "outside"),
        ({"clt_sparsity": "local"}, "per_layer"),
        ({"transcoder_skip": True}, "skip"),
        ({"clt_sparsity": "jumprelu"}, "target_l0.*--target-l0"),
        ({"clt_sparsity": "jumprelu", "target_l0": 4, "jumprelu_objective": "tanh"}, "'quadratic'"),
    ):
        with pytest.raises(ValueError, match=match):
            post_init_cfg({**get_default_cfg(), "sae_type": "matryoshka_clt", **bad})
    with pytest.raises(ValueError, match="input_unit_norm"):
        create_sae(clt_cfg(input_unit_norm=True))


def test_jumprelu_thresholds_are_a_parameter_the_batchtopk_modes_lack():
    """A jumprelu CLT's theta [L S] learns in its own optimizer group; checkpoints of the BatchTopK
    modes keep exactly their tensors (threshold, no log_threshold), so older ones load as before."""
    jumprelu = create_sae(
        clt_cfg(clt_sparsity="jumprelu", target_l0=2, jumprelu_threshold_lr_scale=7.0)
    )
    assert jumprelu.log_threshold.shape == (3 * 12,) and "threshold" not in jumprelu.state_dict()
    groups = jumprelu.param_groups()
    assert [g["lr_scale"] for g in groups] == [1.0, 7.0] and groups[1]["params"] == [
        jumprelu.log_threshold
    ]
    assert sum(len(g["params"]) for g in groups) == len(list(jumprelu.parameters()))
    assert jumprelu.cfg["jumprelu_objective"] == "quadratic" and "jumprelu" in jumprelu.cfg["name"]
    for sparsity in ("global", "per_layer"):
        clt = create_sae(clt_cfg(clt_sparsity=sparsity))
        assert "log_threshold" not in clt.state_dict() and "threshold" in clt.state_dict()
        assert [g["lr_scale"] for g in clt.param_groups()] == [1.0]


@pytest.mark.parametrize("sparsity", list(SPARSITY))
def test_sizes_name_what_they_count_and_saved_names_stay(sparsity):
    """n_layers L, latents_per_layer S = cfg["dict_size"], n_latents = L S, and no dict_size that
    could disagree with the cfg's. The state dict's names and the parameters' order (by which a
    saved optimizer state refers to them) are those of the checkpoints written so far."""
    from matryoshka_sae import sae
    from matryoshka_sae.dictionary import Dictionary

    clt = create_sae(clt_cfg(clt_sparsity=sparsity, **SPARSITY[sparsity]))
    assert type(clt) is sae.SAE_CLASSES["matryoshka_clt"] is sae.MatryoshkaCrossLayerTranscoder
    assert isinstance(clt, Dictionary) and not isinstance(clt, sae.BaseAutoencoder)
    assert (clt.n_layers, clt.latents_per_layer, clt.n_latents) == (3, 12, 36)
    assert not hasattr(clt, "dict_size") and clt.tokens_since_fired.shape == (36,)
    x = torch.randn(5, len(LAYERS), D)
    assert clt.encode(x).shape == (5, clt.n_latents)
    jumprelu = ["log_threshold"] if sparsity == "jumprelu" else []
    parameters = ["W_enc", "b_enc", "b_dec", *jumprelu, "W_dec.0", "W_dec.1", "W_dec.2"]
    assert [name for name, _ in clt.named_parameters()] == parameters
    buffers = ["tokens_since_fired", "source_mean", "target_scale", "target_variance"]
    thresholds = [] if jumprelu else ["threshold"]
    assert set(clt.state_dict()) == {*parameters, *buffers, *thresholds}
    assert [tuple(clt.W_dec[j].shape) for j in range(3)] == [(12, 3 - j, D) for j in range(3)]


def test_jumprelu_initialisation_fires_each_latent_at_the_target_rate_and_keeps_that_code():
    """On the first batch each latent's threshold is its firing quantile at target_l0 / S, then moved
    with the encoder's shift and factor: the code on that batch stays each latent's 60 largest
    pre-activations of 240 tokens under the initial encoder, and no threshold reaches 0."""
    import copy

    cfg = clt_cfg(clt_sparsity="jumprelu", target_l0=3, batch_size=240)
    clt, batch = create_sae(cfg), PlantedCLTStore(batch_size=240).next_batch()
    x = torch.stack(batch[: len(LAYERS)], dim=1)
    with torch.no_grad():
        pre = copy.deepcopy(clt).preactivations(x - x.mean(dim=0))
    expected = torch.zeros_like(pre, dtype=torch.bool).scatter_(
        0, pre.topk(60, dim=0).indices, True
    )
    clt.initialize_from_batch(*batch)
    with torch.no_grad():
        fires = clt.encode(x).view(240, -1) > 0
        out = clt.eval()(*batch)
    assert torch.equal(fires, expected)
    assert [out[f"l0_layer_{layer}"].item() for layer in LAYERS] == pytest.approx(
        [3.0] * 3, abs=0.02
    )
    theta = clt.log_threshold.exp()
    assert theta.min() > theta.median() / 10 and out["fvu"] < 2


def documents_cfg(tmp_path, name, **overrides) -> dict:
    """The resume test's settings (helpers.run_cfg) for a CLT over both layers of a tiny model."""
    from helpers import run_cfg

    base = run_cfg(tmp_path, name)
    cfg = {
        **base,
        "sae_type": "matryoshka_clt",
        "clt_layers": [0, 1],
        "dict_size": 64,
        "group_sizes": [16, 48],
        "top_k": 4,
        "input_unit_norm": False,
        "name": None,
        **overrides,
    }
    cfg["derived"] = {
        k: v for k, v in base["derived"].items() if k not in ("name", "group_sizes", "dict_size")
    }
    return post_init_cfg(cfg)


@pytest.mark.parametrize("sparsity", ["global", "jumprelu"])
def test_crash_and_resume_on_the_multi_hook_store_is_exact(tiny_gemma2, tmp_path, sparsity):
    from helpers import assert_same_weights, crash, failing_at

    from matryoshka_sae.checkpoint import checkpoint_folder
    from matryoshka_sae.training import open_activation_store, train_sae

    def train(cfg, store=None, resume_from=None):
        torch.manual_seed(0)
        store = store or open_activation_store(tiny_gemma2, [cfg])
        return train_sae(create_sae(cfg), store, None, cfg, resume_from=resume_from)

    reference = train(
        documents_cfg(tmp_path, "reference", clt_sparsity=sparsity, **SPARSITY[sparsity])
    )
    cfg = documents_cfg(tmp_path, "interrupted", clt_sparsity=sparsity, **SPARSITY[sparsity])
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(
            cfg, failing_at(open_activation_store(tiny_gemma2, [cfg]), 26, crash)
        )  # after step 20's save
    resumed = train(cfg, resume_from=checkpoint_folder(cfg))
    assert_same_weights(reference, resumed)
    assert (reference.inference_thresholds() > 0).all()  # trained, with its inference thresholds


# ---------------------------------------------------------------------------------------------
# torchrun: 2 gloo ranks equal one process on the same global batches
# ---------------------------------------------------------------------------------------------


def distributed_cfg(out: Path, sparsity: str) -> dict:
    return clt_cfg(
        out / sparsity,
        clt_sparsity=sparsity,
        num_tokens=BATCH * 10,
        checkpoint_freq=5,
        **SPARSITY[sparsity],
    )


def train_on_this_process(out: Path, sparsity: str):
    from distributed_worker import ShardStore

    from matryoshka_sae.training import train_sae

    cfg = distributed_cfg(out, sparsity)
    distributed.init_from_env(cfg)
    torch.manual_seed(0)
    store = ShardStore(PlantedCLTStore(), distributed.rank(), distributed.world_size())
    return train_sae(create_sae(cfg), store, None, cfg)


def test_two_ranks_equal_one_process(tmp_path):
    from state_checks import assert_state_close

    from matryoshka_sae.training import train_sae

    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        __file__,
        str(tmp_path),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    for sparsity in SPARSITY:
        cfg = distributed_cfg(tmp_path / "single", sparsity)
        torch.manual_seed(0)
        single = train_sae(create_sae(cfg), PlantedCLTStore(), None, cfg)
        for rank in range(2):
            state = torch.load(tmp_path / f"{sparsity}.rank{rank}.pt")
            assert_state_close(
                state, single.state_dict(), rtol=1e-4, what=f"{sparsity} rank {rank}"
            )


def _worker_main(out: Path) -> None:
    torch.set_num_threads(1)
    distributed.init_from_env({"batch_size": BATCH, "device": "cpu", "distributed_timeout_s": 60})
    for sparsity in SPARSITY:
        clt = train_on_this_process(out, sparsity)
        torch.save(clt.state_dict(), out / f"{sparsity}.rank{distributed.rank()}.pt")
    distributed.shut_down()


if __name__ == "__main__":
    _worker_main(Path(sys.argv[1]))


# ---------------------------------------------------------------------------------------------
# Export: circuit-tracer's own CLT loader computes what ours computes
# ---------------------------------------------------------------------------------------------

CT_PYTHON = Path(__file__).resolve().parents[1] / ".ct-venv" / "bin" / "python"


def needs_circuit_tracer():
    if not CT_PYTHON.exists():
        if os.environ.get("REQUIRE_CIRCUIT_TRACER") == "1":
            pytest.fail(f"{CT_PYTHON} is missing; run: bash setup_circuit_tracer_env.sh")
        pytest.skip(
            "circuit-tracer's environment .ct-venv is missing (bash setup_circuit_tracer_env.sh)"
        )


def save_tiny_model(model, path: Path) -> Path:
    """The tiny model's config, weights and 4 token rows led by BOS, for circuit-tracer's environment."""
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(2, 1000, (4, 24), generator=generator)
    tokens[:, 0] = 1
    keys = (
        "n_layers",
        "d_model",
        "n_ctx",
        "d_head",
        "n_heads",
        "d_mlp",
        "d_vocab",
        "act_fn",
        "normalization_type",
        "positional_embedding_type",
        "use_normalization_before_and_after",
        "n_key_value_heads",
        "original_architecture",
        "gated_mlp",
        "final_rms",
        "rotary_dim",
        "window_size",
        "attn_types",
        "attn_scores_soft_cap",
        "output_logits_soft_cap",
        "seed",
    )
    config = {key: value for key, value in model.cfg.to_dict().items() if key in keys}
    torch.save({"config": config, "weights": model.state_dict(), "tokens": tokens}, path)
    return path


@pytest.mark.parametrize("sparsity", ["global", "per_layer", "jumprelu"])
def test_circuit_tracer_computes_what_we_export(tiny_gemma2, tmp_path, sparsity):
    import json

    from matryoshka_sae.checkpoint import checkpoint_folder
    from matryoshka_sae.circuit_tracer_format import export_circuit_tracer_clt
    from matryoshka_sae.training import open_activation_store, train_sae

    needs_circuit_tracer()
    cfg = documents_cfg(
        tmp_path, "clt", clt_sparsity=sparsity, target_l0=4 if sparsity == "jumprelu" else None
    )
    torch.manual_seed(0)
    clt = train_sae(create_sae(cfg), open_activation_store(tiny_gemma2, [cfg]), None, cfg)
    exported = export_circuit_tracer_clt(checkpoint_folder(cfg), tmp_path / "exported")
    if sparsity == "jumprelu":  # threshold_{i}: theta of each latent of layer i
        from safetensors.torch import load_file

        theta = clt.log_threshold.detach().exp().view(2, -1)
        for i in range(2):
            torch.testing.assert_close(
                load_file(exported / f"W_enc_{i}.safetensors")[f"threshold_{i}"],
                theta[i],
                rtol=0,
                atol=0,
            )
        assert theta.std() > 0
    assert sorted(p.name for p in exported.iterdir() if not p.name.startswith(".")) == [
        "W_dec_0.safetensors",
        "W_dec_1.safetensors",
        "W_enc_0.safetensors",
        "W_enc_1.safetensors",
        "config.yaml",
    ]
    command = [
        str(CT_PYTHON),
        str(Path(__file__).parent / "circuit_tracer_clt_check.py"),
        str(exported),
        str(checkpoint_folder(cfg)),
        str(save_tiny_model(tiny_gemma2, tmp_path / "model.pt")),
        *(["--attribute"] if sparsity == "global" else []),
    ]
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["input_hook"] == "ln2.hook_normalized" and result["output_hook"] == "hook_mlp_out"
    assert result["n_layers"] == 2 and result["same_latents"] and result["active_latents"] > 0
    assert max(result["relative_error"]) < 1e-5, result
    if sparsity == "global":  # trace_circuit.py's steps on the exported CLT
        from matryoshka_sae.checkpoint import load_sae
        from matryoshka_sae.evaluation import evaluate_clt

        assert max(result["layer_relative_errors"].values()) < 1e-5
        assert result["logits_difference"] < 1e-4 and result["n_active_features"] > 0
        assert 0 < result["replacement_score"] <= 1 and 0 < result["completeness_score"] <= 1
        # circuit-tracer's CLT spliced into every MLP at once gives our evaluation's CE (BOS kept in both)
        tokens = torch.load(tmp_path / "model.pt", weights_only=False)["tokens"]
        ours = evaluate_clt(load_sae(checkpoint_folder(cfg)), tiny_gemma2, tokens)
        assert result["ce_loss_replaced"] == pytest.approx(ours["ce_loss_spliced"], rel=1e-4)
        assert result["ce_loss_clean"] == pytest.approx(ours["ce_loss_clean"], rel=1e-5)
        assert result["kl_divergence"] == pytest.approx(ours["kl_divergence"], rel=1e-3)
        assert (
            abs(result["ce_loss_replaced"] - result["ce_loss_clean"]) > 1e-3
            and result["kl_divergence"] > 1e-4
        )
        assert result["decoder_vectors"] == sum(
            2 - layer for layer in result["active_feature_layers"]
        )
        assert {"precomputation", "forward_pass", "feature_attributions", "attribution"} <= set(
            result["phase_seconds"]
        )
        assert 0 <= result["multi_hop_share"] <= 1 and result["feature_nodes_per_path"] >= 0


def test_export_refuses_what_circuit_tracer_cannot_represent(tmp_path):
    from matryoshka_sae.circuit_tracer_format import circuit_tracer_clt_tensors
    from matryoshka_sae.sae_lens_format import NotRepresentable

    with pytest.raises(NotRepresentable, match="no inference threshold"):
        circuit_tracer_clt_tensors(create_sae(clt_cfg()))
    with pytest.raises(NotRepresentable, match=r"every layer 0..11 .*\[1, 2, 3\]"):
        circuit_tracer_clt_tensors(
            create_sae(
                clt_cfg(clt_layers=[1, 2, 3], n_layers=None, model_name="gpt2", act_size=None)
            )
        )


# ---------------------------------------------------------------------------------------------
# The script: train, evaluate with every MLP replaced, export
# ---------------------------------------------------------------------------------------------


def test_train_clt_script_trains_evaluates_and_exports(
    tmp_path, token_rows, tiny_models, monkeypatch, capsys
):
    import json

    from datasets import Dataset, DatasetDict

    from matryoshka_sae.checkpoint import load_sae
    from matryoshka_sae.cli import train_clt

    monkeypatch.setitem(
        train_clt.CLT_DEFAULTS, "bos_token_id", 1
    )  # the tiny model has no tokenizer
    data = tmp_path / "tokens"
    DatasetDict({"train": Dataset.from_dict({"tokens": token_rows.tolist()})}).save_to_disk(
        str(data)
    )
    train_clt.main(
        [
            "train",
            "--model",
            "tiny-gemma2",
            "--dict-size",
            "64",
            "--top-k",
            "4",
            "--num-tokens",
            "512",
            "--batch-size",
            "128",
            "--dataset",
            str(data),
            "--seq-len",
            "32",
            "--model-batch-size",
            "8",
            "--num-batches-in-buffer",
            "4",
            "--n-eval-rows",
            "4",
            "--checkpoint-dir",
            str(tmp_path / "runs"),
            "--wandb-mode",
            "disabled",
            "--device",
            "cpu",
            "--sparsity",
            "per_layer",
        ]
    )
    (folder,) = (tmp_path / "runs").iterdir()
    assert "every MLP replaced" in capsys.readouterr().out
    metrics = json.loads((folder / train_clt.METRICS_FILE).read_text())
    clt = load_sae(folder)
    assert clt.cfg["clt_layers"] == [0, 1] and clt.cfg["clt_sparsity"] == "per_layer"
    assert (
        metrics["ce_loss_clean"] < metrics["ce_loss_zero_ablation"] and metrics["kl_divergence"] > 0
    )
    assert set(metrics["fvu_per_layer"]) == {"0", "1"} and metrics["l0_total"] > 0
    train_clt.main(["export", str(folder), str(tmp_path / "exported")])
    assert (tmp_path / "exported" / "W_dec_1.safetensors").is_file()


def test_train_clt_script_takes_jumprelu_with_a_target_l0_per_layer():
    from matryoshka_sae.cli import train_clt

    def cfg_of(*options):
        return train_clt.clt_cfg(
            train_clt.build_parser().parse_args(["train", "--layers", "0-3", *options])
        )

    cfg = cfg_of("--sparsity", "jumprelu", "--target-l0", "3")
    assert (cfg["clt_sparsity"], cfg["target_l0"], cfg["jumprelu_objective"]) == (
        "jumprelu",
        3.0,
        "quadratic",
    )
    assert "-jumprelu_" in cfg["name"] and "_L0-3_" in cfg["name"]
    from matryoshka_sae.training import format_postfix, l0_target

    metrics = {"loss": 1.0, "l0_norm": 11.5, "l2_loss": 1.0, "fvu": 0.5}
    assert "L0: 11.5/12," in format_postfix(metrics, l0_target(cfg))  # l0_norm sums the 4 layers
    with pytest.raises(ValueError, match="--target-l0"):
        cfg_of("--sparsity", "jumprelu")


@pytest.mark.parametrize("sparsity", ["per_layer", "jumprelu"])
def test_layer_contributions_add_up_to_the_reconstruction(sparsity):
    clt = trained_clt(clt_cfg(clt_sparsity=sparsity, **SPARSITY[sparsity]), steps=3).eval()
    sources = torch.stack(PlantedCLTStore(seed=4).next_batch()[: len(LAYERS)], dim=1)
    with torch.no_grad():
        total = sum(
            torch.nn.functional.pad(clt.layer_contributions(j, sources[:, j]), (0, 0, j, 0))
            for j in range(len(LAYERS))
        )
        torch.testing.assert_close(
            total + clt.b_dec * clt.target_scale[:, None], clt.reconstruct(sources)
        )


def test_evaluation_splices_every_layer_as_the_full_reconstruction_would(
    tiny_gemma2, tmp_path, token_rows
):
    """matryoshka_sae.evaluation.evaluate_clt replaces layer m's MLP output by what `reconstruct` predicts from the
    sources of the replaced pass (layer m's prediction reads only sources j <= m, so the later
    sources of a stack filled in as the pass goes do not matter): an independent reference."""
    import torch.nn.functional as F

    from matryoshka_sae.config import clt_hooks
    from matryoshka_sae.evaluation import evaluate_clt
    from matryoshka_sae.training import open_activation_store, train_sae

    cfg = documents_cfg(tmp_path, "evaluated", num_tokens=512, exclude_bos=False)
    torch.manual_seed(0)
    clt = train_sae(create_sae(cfg), open_activation_store(tiny_gemma2, [cfg]), None, cfg).eval()
    tokens = token_rows[:4]
    sources, targets = clt_hooks(cfg)
    seen = torch.zeros(len(tokens), tokens.shape[1], clt.n_layers, clt.d_in)

    def read(act, hook, j):
        seen[:, :, j] = act

    def write(act, hook, m):
        with torch.no_grad():
            return clt.reconstruct(seen)[:, :, m].to(act.dtype)

    hooks = [(name, lambda a, hook, j=j: read(a, hook, j)) for j, name in enumerate(sources)]
    hooks += [(name, lambda a, hook, m=m: write(a, hook, m)) for m, name in enumerate(targets)]
    with torch.no_grad():
        logits = tiny_gemma2.run_with_hooks(tokens, fwd_hooks=hooks)
        clean = tiny_gemma2(tokens)
    expected_ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).item()
    metrics = evaluate_clt(clt, tiny_gemma2, tokens)
    assert metrics["ce_loss_spliced"] == pytest.approx(expected_ce, rel=1e-5)
    assert metrics["ce_loss_clean"] == pytest.approx(
        F.cross_entropy(clean[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).item(), rel=1e-5
    )
    assert metrics["ce_loss_spliced"] != pytest.approx(
        metrics["ce_loss_clean"]
    )  # the splice did something
    assert (
        set(metrics["fvu_per_layer"]) == {"0", "1"}
        and 0 < metrics["fvu_mean"] <= metrics["fvu_max"]
    )
    assert metrics["l0_total"] == pytest.approx(sum(metrics["l0_per_layer"].values()))
