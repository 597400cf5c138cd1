"""Steering the dense-code SAEs (JumpReLU, ReLU + L1) to a sparsity with their default settings.

The training runs use a planted dictionary: 64-d inputs built from 256 true unit directions,
exactly 4 active per input, dictionaries of 512 latents, batches of 1,024 tokens, 1,000 steps
through the real training loop (`train_sae`: param groups, data-driven initialisation, warm-up).
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import planted_cfg

from matryoshka_sae.checkpoint import checkpoint_folder, load_metrics
from matryoshka_sae.config import post_init_cfg
from matryoshka_sae.sae import JumpReLUSAE, VanillaSAE, create_sae
from matryoshka_sae.training import format_postfix, train_sae

D_IN, N_TRUE, K_TRUE, DICT, BATCH, STEPS = 64, 256, 4, 512, 1024, 1000


class PlantedDictionary:
    """x = sum of K_TRUE of N_TRUE unit directions with coefficients in [1, 4]; batch i depends
    only on i (and the directions on the seed)."""

    def __init__(self, seed=0, batch_size=BATCH):
        generator = torch.Generator().manual_seed(seed)
        self.directions = F.normalize(torch.randn(N_TRUE, D_IN, generator=generator), dim=1)
        self.seed, self.index, self.batch_size = seed, 0, batch_size

    def batch(self, index, n=None):
        n = n or self.batch_size
        generator = torch.Generator().manual_seed(10_000 * self.seed + index)
        chosen = torch.rand(n, N_TRUE, generator=generator).topk(K_TRUE, dim=1).indices
        coefficients = torch.rand(n, K_TRUE, generator=generator) * 3 + 1
        return torch.einsum("nk,nkd->nd", coefficients, self.directions[chosen])

    def next_batch(self):
        self.index += 1
        return self.batch(self.index)


def sparsity_cfg(sae_type, tmp_path, n_steps=STEPS, **settings):
    """helpers.planted_cfg at this module's sizes, with the default lr and top_k."""
    defaults = dict(
        act_size=D_IN,
        dict_size=DICT,
        batch_size=BATCH,
        top_k=32,
        lr=3e-4,
        log_freq=250,
        checkpoint_freq=10**9,
    )
    return planted_cfg(sae_type, tmp_path, n_steps, **{**defaults, **settings})


def train_on_planted(cfg):
    """Train with the library's loop (2 threads: these matmuls are large enough to gain from them);
    returns (eval L0 on held-out tokens, mean over true directions of the best decoder cosine)."""
    store = PlantedDictionary()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        sae = train_sae(create_sae(cfg), store, None, cfg)
    finally:
        torch.set_num_threads(threads)
    sae.eval()
    with torch.no_grad():
        l0 = (sae.encode(store.batch(-1, n=4096)) > 0).float().sum(dim=-1).mean().item()
    cosines = F.normalize(sae.W_dec.detach(), dim=1) @ store.directions.T  # [DICT, N_TRUE]
    return l0, cosines.max(dim=0).values.mean().item()


# ---------------------------------------------------------------------------------------------
# Reaching the sparsity asked for, with the default settings
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", [4, 8])
def test_jumprelu_reaches_its_target_l0(target, tmp_path):
    cfg = sparsity_cfg("jumprelu", tmp_path, target_l0=target)
    assert cfg["jumprelu_objective"] == "quadratic"
    l0, cosine = train_on_planted(cfg)
    assert abs(l0 - target) <= 0.2 * target, l0
    assert cosine > 0.9, cosine
    assert abs(load_metrics(checkpoint_folder(cfg))["l0_norm"] - target) <= 0.2 * target


def test_relu_l1_default_coefficient_gives_a_sparse_dictionary(tmp_path):
    cfg = sparsity_cfg("vanilla", tmp_path)
    assert cfg["l1_coeff"] == pytest.approx(4 / D_IN)
    l0, cosine = train_on_planted(cfg)
    assert K_TRUE / 2 <= l0 <= 2 * K_TRUE, l0
    assert cosine > 0.85, cosine


# ---------------------------------------------------------------------------------------------
# The pieces
# ---------------------------------------------------------------------------------------------


def ramp(u, eps):
    """H smoothed over the rectangle kernel of width eps: the integral of K((.) / eps) / eps."""
    return (u / eps + 0.5).clamp(0, 1)


def smoothed_objective(objective, cfg, pre, theta, eps):
    """Each objective written out with H(pre - theta) replaced by its smoothed ramp."""
    fires = ramp(pre - theta, eps)
    if objective == "step":
        return cfg["l0_coeff"] * fires.sum(dim=-1).mean()
    if objective == "quadratic":
        return cfg["l0_coeff"] * (fires.sum(dim=-1).mean() / cfg["target_l0"] - 1) ** 2
    smooth_l0 = (torch.tanh(cfg["jumprelu_tanh_scale"] * pre) * fires).sum(dim=-1).mean()
    return (
        cfg["l0_coeff"] * smooth_l0 + cfg["pre_act_coeff"] * F.relu(theta - pre).sum(dim=-1).mean()
    )


@pytest.mark.parametrize("objective", ["step", "tanh", "quadratic"])
def test_threshold_gradient_matches_the_smoothed_objective(objective, tmp_path):
    """The straight-through gradient of each objective is the derivative of that objective with the
    step smoothed over the kernel (central finite differences), for thresholds in the data's range."""
    cfg = sparsity_cfg(
        "jumprelu",
        tmp_path,
        jumprelu_objective=objective,
        l0_warmup_steps=0,
        target_l0=2.0 if objective == "quadratic" else None,
        pre_act_coeff=0.05,
    )  # large enough for the pre-activation term to show
    sae = JumpReLUSAE(cfg)
    eps = 0.02
    generator = torch.Generator().manual_seed(0)
    pre = torch.randn(20000, 3, generator=generator).double()
    theta = torch.tensor([0.3, 0.8, 1.5], dtype=torch.float64)
    theta_var = theta.clone().requires_grad_()
    sae.sparsity_objective(pre, theta_var, eps).backward()
    for i in range(3):
        h = torch.zeros(3, dtype=torch.float64)
        h[i] = 1e-4
        fd = (
            smoothed_objective(objective, cfg, pre, theta + h, eps)
            - smoothed_objective(objective, cfg, pre, theta - h, eps)
        ) / 2e-4
        assert theta_var.grad[i].item() == pytest.approx(fd.item(), rel=0.02), (objective, i)


@pytest.mark.parametrize("sae_type,target", [("jumprelu", 4), ("jumprelu", None), ("vanilla", 4)])
def test_first_batch_fires_at_the_intended_rate(sae_type, target, tmp_path):
    """Data-driven initialisation: on the batch it was set from, each latent fires rate x B times
    (rate = (target_l0 or top_k) / dict_size), so the batch's L0 is that number."""
    cfg = sparsity_cfg(sae_type, tmp_path, target_l0=target, top_k=16)
    sae = create_sae(cfg)
    x = PlantedDictionary().batch(0)
    sae.initialize_b_dec(x)
    acts = sae.encode(x)
    expected = target or 16
    assert (acts > 0).sum(dim=0).float().mean().item() == pytest.approx(
        expected * BATCH / DICT, rel=0.05
    )
    assert (acts > 0).float().sum(dim=-1).mean().item() == pytest.approx(expected, rel=0.05)


def test_threshold_learns_at_its_own_rate(tmp_path):
    cfg = sparsity_cfg("jumprelu", tmp_path, target_l0=4)
    groups = create_sae(cfg).param_groups()
    assert [g["lr_scale"] for g in groups] == [1.0, cfg["jumprelu_threshold_lr_scale"]]
    assert len(groups[1]["params"]) == 1 and groups[1]["params"][0].shape == (DICT,)
    assert sum(len(g["params"]) for g in groups) == len(list(create_sae(cfg).parameters()))


def test_bandwidth_is_relative_to_the_threshold_unless_set(tmp_path):
    sae = JumpReLUSAE(sparsity_cfg("jumprelu", tmp_path, target_l0=4))
    theta = torch.tensor([0.5, 2.0])
    assert torch.equal(sae.bandwidth(theta), sae.cfg["jumprelu_relative_bandwidth"] * theta)
    assert JumpReLUSAE(sparsity_cfg("jumprelu", tmp_path, bandwidth=0.05)).bandwidth(theta) == 0.05


def test_quadratic_objective_pulls_towards_the_target_from_both_sides(tmp_path):
    sae = JumpReLUSAE(sparsity_cfg("jumprelu", tmp_path, target_l0=2.0))
    pre = torch.randn(4000, 8, generator=torch.Generator().manual_seed(1))
    grads = []
    for value in (0.2, 2.0):  # L0 about 3.4 of 8 (above the target), then about 0.2 (below)
        theta = torch.full((8,), value, requires_grad=True)
        sae.sparsity_objective(pre, theta, 0.1).backward()
        grads.append(theta.grad)
    assert (grads[0] < 0).all()  # descent raises the thresholds: fewer latents fire
    assert (grads[1] > 0).all()  # descent lowers them: more fire


def test_sparsity_warmup_ramps_and_resumes(tmp_path):
    """The coefficient is scaled by (t + 1) / warmup_steps; the step count is saved with the weights."""
    cfg = sparsity_cfg("vanilla", tmp_path, l1_warmup_steps=10, l1_coeff_relative=False)
    sae = create_sae(cfg)
    x = PlantedDictionary().batch(0)
    out = sae(x)
    assert out["l1_loss"].item() == pytest.approx(
        cfg["l1_coeff"] * out["l1_norm"].item() / 10, rel=1e-5
    )
    for _ in range(11):
        sae(x)
    out = sae(x)
    assert out["l1_loss"].item() == pytest.approx(cfg["l1_coeff"] * out["l1_norm"].item(), rel=1e-5)
    clone = create_sae(cfg)
    clone.load_state_dict(sae.state_dict())
    assert clone.steps_trained.item() == 13
    sae.eval()
    sae(x)
    assert sae.steps_trained.item() == 13  # evaluation does not advance the warm-up


def test_l1_coefficient_is_relative_to_the_centred_inputs_scale(tmp_path):
    """lambda = l1_coeff x RMS of x_n - b_dec: inputs sharing a large mean get a smaller lambda."""
    store = PlantedDictionary()
    for offset in (0.0, 20.0):
        x = store.batch(0) + offset * store.directions[0]
        sae = create_sae(sparsity_cfg("vanilla", tmp_path, l1_warmup_steps=0))
        sae.initialize_b_dec(x)
        out = sae(x)
        x_n, _ = sae.normalize_source(x)
        sigma = (x_n - sae.b_dec).pow(2).mean().sqrt().item()
        assert out["l1_loss"].item() == pytest.approx(
            4 / D_IN * sigma * out["l1_norm"].item(), rel=1e-4
        )
        assert sigma < (1.01 if offset == 0 else 0.5)


def test_adaptive_l1_moves_towards_the_target(tmp_path):
    """With target_l0 the ReLU SAE's coefficient rises while L0 is above the target, falls below it."""
    x = PlantedDictionary().batch(0)
    for target, direction in ((1.0, 1), (500.0, -1)):  # about half the 512 latents fire at first
        sae = VanillaSAE(sparsity_cfg("vanilla", tmp_path, target_l0=target, relu_bias_init=0.0))
        before = sae.adaptive_l1_coeff.clone()
        out = sae(x)
        assert out["l1_loss"].item() == pytest.approx(
            before.item() * out["l1_norm"].item(), rel=1e-5
        )
        ratio = (sae.adaptive_l1_coeff / before).item()
        error = min(1.0, max(-1.0, out["l0_norm"].item() / target - 1))
        assert error * direction > 0
        assert ratio == pytest.approx(
            torch.exp(torch.tensor(VanillaSAE.L1_ADAPT_RATE * error)).item()
        )


# ---------------------------------------------------------------------------------------------
# Settings, old cfgs, scripts
# ---------------------------------------------------------------------------------------------


def test_settings_are_derived_and_checked(tmp_path):
    cfg = sparsity_cfg("jumprelu", tmp_path)
    assert (
        cfg["jumprelu_objective"] == "step"
        and cfg["l0_coeff"] == 1e-3
        and cfg["l0_warmup_steps"] == 0
    )
    cfg["target_l0"] = 32
    cfg = post_init_cfg(cfg)  # the derived objective and coefficient follow the new target
    assert cfg["jumprelu_objective"] == "quadratic" and cfg["l0_coeff"] == 1.0
    assert sparsity_cfg("vanilla", tmp_path, n_steps=400)["l1_warmup_steps"] == 20  # 5% of the run
    assert (
        sparsity_cfg("vanilla", tmp_path, l1_warmup_steps=0)["l1_warmup_steps"] == 0
    )  # switched off
    with pytest.raises(ValueError, match="target_l0"):
        sparsity_cfg("jumprelu", tmp_path, jumprelu_objective="quadratic")
    with pytest.raises(ValueError, match="target_l0"):
        sparsity_cfg("jumprelu", tmp_path, target_l0=DICT + 1)
    with pytest.raises(ValueError, match="jumprelu_objective"):
        sparsity_cfg("jumprelu", tmp_path, jumprelu_objective="l1")


def test_progress_bar_shows_l0_against_the_target():
    metrics = {"loss": 0.0234, "l0_norm": 33.14, "l2_loss": 0.018, "fvu": 0.1823}
    assert format_postfix(metrics, 32.0) == "Loss: 0.0234, L0: 33.1/32, L2: 0.0180, FVU: 0.1823"
    assert format_postfix(metrics) == "Loss: 0.0234, L0: 33.1, L2: 0.0180, FVU: 0.1823"


def test_main_trains_one_dictionary_of_the_chosen_class():
    from matryoshka_sae.cli import main

    args = main.build_parser().parse_args(["--sae-type", "jumprelu", "--target-l0", "32"])
    (cfg,) = main.build_cfgs(args)
    assert (cfg["sae_type"], cfg["target_l0"], cfg["jumprelu_objective"]) == (
        "jumprelu",
        32,
        "quadratic",
    )
    assert "jumprelu_L0-32" in cfg["name"]
    assert len(main.build_cfgs(main.build_parser().parse_args([]))) == 4  # the default group
