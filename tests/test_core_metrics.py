"""SAEBench's core metrics (core_metrics.py, evaluation.evaluate_ce_loss with kl) against direct
computations on small tensors and the tiny model."""

import pytest
import torch
from helpers import ReconstructStub, eval_cfg

from matryoshka_sae.config import get_default_cfg, post_init_cfg
from matryoshka_sae.core_metrics import (
    density_statistics,
    explained_variance,
    explained_variance_legacy,
    sparsity_and_variance,
)
from matryoshka_sae.evaluation import evaluate_ce_loss
from matryoshka_sae.sae import create_sae


def data_with_large_mean(seed=0, n=256, d=8):
    """x with a per-dimension mean of ~1000 and token spreads that differ, and a noisy x̂."""
    g = torch.Generator().manual_seed(seed)
    mean = 1000 + 50 * torch.randn(d, generator=g)
    scale = torch.rand(n, 1, generator=g) * 3 + 0.1  # some tokens far from the mean, some near
    x = mean + scale * torch.randn(n, d, generator=g)
    x_hat = x + 0.3 * torch.randn(n, d, generator=g)
    return x.double(), x_hat.double()


def test_explained_variance_definitions_on_data_with_a_large_mean():
    x, x_hat = data_with_large_mean()
    sse = ((x - x_hat) ** 2).sum()
    centred = x - x.mean(0)  # mean subtracted per dimension
    direct = 1 - sse / (centred**2).sum()
    direct_legacy = (1 - ((x - x_hat) ** 2).sum(1) / (centred**2).sum(1)).mean()
    assert explained_variance(x, x_hat) == pytest.approx(direct.item(), abs=1e-5)
    assert explained_variance_legacy(x, x_hat) == pytest.approx(direct_legacy.item(), abs=1e-5)
    # the two definitions differ here (tokens near the mean weigh heavily in the per-token ratio)...
    assert abs(explained_variance(x, x_hat) - explained_variance_legacy(x, x_hat)) > 0.05
    # ...and neither is the uncentred ratio, which a large mean would push to ~1
    uncentred = 1 - sse / (x**2).sum()
    assert uncentred > 0.999999 and explained_variance(x, x_hat) < 0.99
    # shifting data and reconstruction together changes neither
    assert explained_variance(x + 500, x_hat + 500) == pytest.approx(
        explained_variance(x, x_hat), abs=1e-5
    )
    assert explained_variance_legacy(x - 500, x_hat - 500) == pytest.approx(
        explained_variance_legacy(x, x_hat), abs=1e-5
    )


def test_density_statistics_count_latents_by_firing_fraction():
    density = torch.tensor([0.0, 0.0, 0.005, 0.01, 0.02, 0.1, 0.5, 0.0, 0.3, 0.001])
    stats = density_statistics(density)
    assert stats == pytest.approx(
        {"frac_alive": 7 / 10, "frac_over_1_percent": 4 / 10, "frac_over_10_percent": 2 / 10}
    )


@pytest.mark.parametrize("sae_type", ["matryoshka", "jumprelu"])
def test_sparsity_and_variance_match_direct_computation(sae_type):
    cfg = get_default_cfg()
    cfg.update(
        model_name="synthetic",
        act_size=16,
        dict_size=64,
        group_sizes=None,
        top_k=4,
        sae_type=sae_type,
        device="cpu",
        seed=0,
        batch_size=64,
    )
    sae = create_sae(post_init_cfg(cfg))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 16, generator=g) * 3 + 40
    sae.initialize_from_batch(x)  # data-aware start (b_dec), as training does
    if hasattr(sae, "threshold"):
        sae.threshold.fill_(
            0.5
        )  # the eval-mode threshold a trained BatchTopK SAE has: per-token codes
    metrics = sparsity_and_variance(sae, x, chunk_size=128)
    sae.eval()
    with torch.no_grad():
        z, x_hat = sae.encode(x), sae.reconstruct(x)
    assert (z != 0).any()
    assert metrics["l0"] == pytest.approx((z != 0).sum(1).float().mean().item(), rel=1e-6)
    assert metrics["l1"] == pytest.approx(z.sum(1).mean().item(), rel=1e-5)
    assert metrics["explained_variance"] == pytest.approx(explained_variance(x, x_hat), abs=1e-6)
    assert metrics["explained_variance_legacy"] == pytest.approx(
        explained_variance_legacy(x, x_hat), abs=1e-6
    )
    assert metrics["frac_alive"] == pytest.approx(((z > 0).sum(0) > 0).float().mean().item())
    assert metrics["frac_over_1_percent"] == pytest.approx(
        ((z > 0).float().mean(0) > 0.01).float().mean().item()
    )


def direct_kl(clean_logits, other_logits):
    p = clean_logits[:, :-1].double().log_softmax(-1)
    q = other_logits[:, :-1].double().log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


def test_kl_scores_match_direct_computation(tiny_gpt2, token_rows):
    half = ReconstructStub(lambda x: 0.5 * x)
    cfg = eval_cfg()
    with_kl = evaluate_ce_loss(half, tiny_gpt2, token_rows, cfg, kl=True)
    without = evaluate_ce_loss(half, tiny_gpt2, token_rows, cfg)
    for key, value in without.items():  # the CE figures do not change with kl
        assert with_kl[key] == pytest.approx(value, rel=1e-5, abs=1e-5), key

    hook = cfg["hook_point"]
    with torch.no_grad():
        clean = tiny_gpt2(token_rows)
        halved = tiny_gpt2.run_with_hooks(token_rows, fwd_hooks=[(hook, lambda a, hook: 0.5 * a)])
        zeroed = tiny_gpt2.run_with_hooks(
            token_rows, fwd_hooks=[(hook, lambda a, hook: torch.zeros_like(a))]
        )
    kl_sae, kl_zero = direct_kl(clean, halved), direct_kl(clean, zeroed)
    assert with_kl["kl_div_spliced"] == pytest.approx(kl_sae, rel=1e-3)
    assert with_kl["kl_div_zero_ablation"] == pytest.approx(kl_zero, rel=1e-3)
    assert with_kl["kl_div_score"] == pytest.approx((kl_zero - kl_sae) / kl_zero, rel=1e-3)
    assert 0 < with_kl["kl_div_score"] < 1

    exact = evaluate_ce_loss(ReconstructStub(lambda x: x), tiny_gpt2, token_rows, cfg, kl=True)
    assert exact["kl_div_spliced"] == pytest.approx(0.0, abs=1e-6)
    assert exact["kl_div_score"] == pytest.approx(1.0, abs=1e-6)
