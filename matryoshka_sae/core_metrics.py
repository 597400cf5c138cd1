"""SAEBench's core metrics of a dictionary, by their definitions, on held-out activations.

On N held-out tokens with inputs x_t (transcoder: sources, and targets y_t; an SAE's target is its
input, y_t = x_t), latents z_t = encode(x_t) [S] and reconstructions (predictions) ŷ_t [d]:

    l0                       mean_t #{i : z_ti != 0}
    l1                       mean_t sum_i z_ti           (latents are non-negative here)
    explained_variance       1 - sum_t ||y_t - ŷ_t||² / sum_t ||y_t - ȳ||²      ȳ = mean_t y_t, per dimension
                             (= 1 - FVU, config.compute_fvu's definition; computed in float64)
    explained_variance_legacy  mean_t [1 - ||y_t - ŷ_t||² / ||y_t - ȳ||²]       SAEBench's "legacy" one:
                             a ratio per token, then averaged; published tables use it
    feature density          p_i = fraction of tokens with z_ti > 0;
                             frac_alive = mean_i [p_i > 0], frac_over_1_percent = mean_i [p_i > 0.01],
                             frac_over_10_percent = mean_i [p_i > 0.1]

and, from the model with the dictionary spliced in at its hook (evaluation.evaluate_ce_loss, the
target activation replaced by ŷ; zero ablation replaces it by 0):

    ce_loss_score  = (CE_zero_ablation - CE_with_sae) / (CE_zero_ablation - CE_clean)
    kl_div_score   = (KL_zero_ablation - KL_with_sae) / KL_zero_ablation,
                     KL_* = mean over predicted positions of KL(p_clean || p_*)

The means run over the whole held-out set (SAEBench takes ȳ over each batch of prompts; over a
large set the two agree).
"""

from __future__ import annotations

import torch

DENSITY_THRESHOLDS = {"frac_over_1_percent": 0.01, "frac_over_10_percent": 0.1}


def explained_variance(y: torch.Tensor, y_hat: torch.Tensor) -> float:
    """1 - sum ||y - ŷ||² / sum ||y - mean(y)||², the mean taken per dimension over the N rows of y [N, d]."""
    y, y_hat = y.double(), y_hat.double()  # float64: a large mean cancels digits
    return (1.0 - (y - y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum()).item()


def explained_variance_legacy(y: torch.Tensor, y_hat: torch.Tensor) -> float:
    """mean_t [1 - ||y_t - ŷ_t||² / ||y_t - mean(y)||²] over the N rows of y [N, d]: SAEBench's legacy one."""
    y, y_hat = y.double(), y_hat.double()
    residual = (y - y_hat).pow(2).sum(-1)
    spread = (y - y.mean(0)).pow(2).sum(-1)
    return (1.0 - residual / spread).mean().item()


def density_statistics(density: torch.Tensor) -> dict[str, float]:
    """Fractions of latents alive (p > 0) and firing on more than 1% / 10% of tokens, from p [S]."""
    stats = {"frac_alive": (density > 0).float().mean().item()}
    for name, threshold in DENSITY_THRESHOLDS.items():
        stats[name] = (density > threshold).float().mean().item()
    return stats


@torch.no_grad()
def sparsity_and_variance(
    sae, x: torch.Tensor, target: torch.Tensor | None = None, chunk_size: int = 4096
) -> dict[str, float]:
    """l0, l1, both explained variances and the density statistics of `sae` (eval mode) on held-out
    inputs x [N, d_in] (transcoder: and targets [N, d_out]); in chunks of `chunk_size` rows."""
    was_training = sae.training
    sae.eval()
    try:
        fired = torch.zeros(sae.dict_size, device=x.device)
        l0 = l1 = 0.0
        reconstructions = []
        for chunk in x.split(chunk_size):
            z = sae.encode(chunk)
            fired += (z > 0).sum(0)
            l0 += (z != 0).sum().item()
            l1 += z.sum().item()
            reconstructions.append(sae.reconstruct(chunk))
    finally:
        sae.train(was_training)
    y, y_hat = (x if target is None else target).float(), torch.cat(reconstructions)
    return {
        "l0": l0 / len(x),
        "l1": l1 / len(x),
        "explained_variance": explained_variance(y, y_hat),
        "explained_variance_legacy": explained_variance_legacy(y, y_hat),
        **density_statistics(fired / len(x)),
    }


def downstream_scores(ce: dict[str, float]) -> dict[str, float]:
    """SAEBench's names for what `evaluation.evaluate_ce_loss(..., kl=True)` measured."""
    return {
        "ce_loss_score": ce["loss_recovered"],
        "ce_loss_with_sae": ce["ce_loss_spliced"],
        "ce_loss_without_sae": ce["ce_loss_clean"],
        "ce_loss_with_ablation": ce["ce_loss_zero_ablation"],
        "kl_div_score": ce["kl_div_score"],
        "kl_div_with_sae": ce["kl_div_spliced"],
        "kl_div_with_ablation": ce["kl_div_zero_ablation"],
    }


def core_metrics(
    sae, model, cfg: dict, x: torch.Tensor, tokens: torch.Tensor, target: torch.Tensor | None = None
) -> dict[str, float]:
    """All of the above: the activation metrics on x (and target) and the spliced-model scores on
    token rows `tokens` [rows, seq] (BOS positions kept as they are when cfg["exclude_bos"])."""
    from matryoshka_sae.evaluation import evaluate_ce_loss

    metrics = sparsity_and_variance(sae, x, target)
    metrics.update(downstream_scores(evaluate_ce_loss(sae, model, tokens, cfg, kl=True)))
    return metrics
