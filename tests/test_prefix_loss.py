"""The Matryoshka loss in one pass (prefix_loss.prefix_squared_errors) against autograd on the
direct formulation (c + cumsum(D) - y)^2: values and gradients equal up to float rounding, for a
dictionary's [B, G, d] and a cross-layer transcoder's [B, G, L, d], with gradients from either
output or both; and the dictionaries' loss dicts against their prefix reconstructions."""

import pytest
import torch
from helpers import planted_cfg  # noqa: I001

from matryoshka_sae.prefix_loss import prefix_squared_errors
from matryoshka_sae.sae import create_sae


def reference(partials: torch.Tensor, start: torch.Tensor):
    """The direct formulation: every prefix's error e_g = start + sum_{h <= g} partials_h."""
    errors = start.unsqueeze(1) + partials.cumsum(dim=1)
    dims = [0] + list(range(2, errors.dim()))
    return errors.pow(2).sum(dim=dims[:1] + dims[-1:]), errors[:, -1]


def leaves(shape, seed):
    generator = torch.Generator().manual_seed(seed)
    partials = torch.randn(shape, generator=generator, dtype=torch.float64)
    start = torch.randn(shape[:1] + shape[2:], generator=generator, dtype=torch.float64)
    return partials.requires_grad_(), start.requires_grad_()


@pytest.mark.parametrize("shape", [(7, 4, 5), (7, 1, 5), (6, 3, 4, 5)], ids=["G4", "G1", "CLT"])
@pytest.mark.parametrize("use", ["sse", "last", "both"])
def test_values_and_gradients_equal_the_direct_formulation(shape, use):
    generator = torch.Generator().manual_seed(1)
    sse_weights = torch.randn(shape[1:-1], generator=generator, dtype=torch.float64)
    last_weights = torch.randn(shape[:1] + shape[2:], generator=generator, dtype=torch.float64)
    grads = []
    for compute in (prefix_squared_errors, reference):
        partials, start = leaves(shape, seed=0)
        sse, last = compute(partials, start)
        objective = {
            "sse": (sse * sse_weights).sum(),
            "last": (last * last_weights).sum(),
            "both": (sse * sse_weights).sum() + (last * last_weights).sum(),
        }[use]
        objective.backward()
        grads.append((sse.detach(), last.detach(), partials.grad, start.grad))
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match=r"partials \(4, 2, 3\) \[B, G, \.\.\., d\]"):
        prefix_squared_errors(torch.zeros(4, 2, 3), torch.zeros(4, 4))


@pytest.mark.parametrize("kind", ["matryoshka", "matryoshka_transcoder", "batchtopk"])
def test_the_loss_dict_is_the_mean_squared_error_of_every_prefix(kind, tmp_path):
    cfg = planted_cfg(kind, tmp_path)
    sae = create_sae(cfg)
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(64, cfg["act_size"], generator=generator)
    inputs = (x, 0.5 * x + 1) if kind.endswith("transcoder") else (x,)
    out = sae(*inputs)
    with torch.no_grad():
        prefixes = sae.reconstruct_prefixes(x)  # [B, G, d] in the target's units
        target = inputs[-1]
        x_n, stats = sae.normalize_source(x)
        y_stats = sae.target_stats(stats)
        shift, _, factor = y_stats if y_stats is not None else (0.0, 1.0, 1.0)
        per_token = torch.is_tensor(shift) and shift.dim() == 2  # [B, 1] against [B, G, d]
        if per_token:
            shift, factor = shift.unsqueeze(1), factor.unsqueeze(1)
        prefixes_n = (prefixes - shift) / factor  # the inverse of restore_target
        per_prefix = (
            (prefixes_n - sae.to_units(target, y_stats).unsqueeze(1)).pow(2).mean(dim=(0, 2))
        )
        fvus = (prefixes - target.unsqueeze(1)).pow(2).sum(dim=(0, 2)) / (
            (target - target.mean(dim=0)).pow(2).sum()
        )
    torch.testing.assert_close(out["l2_loss"].detach(), per_prefix.mean(), rtol=1e-5, atol=0)
    torch.testing.assert_close(out["sae_out"].detach(), prefixes[:, -1], rtol=1e-5, atol=1e-6)
    if prefixes.shape[1] > 1:
        torch.testing.assert_close(out["fvu_per_prefix"], fvus, rtol=1e-4, atol=0)
        assert out["min_l2_loss"] == pytest.approx(per_prefix.min().item(), rel=1e-5)
