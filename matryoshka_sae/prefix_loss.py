"""The Matryoshka reconstruction loss: the squared error of every nested prefix, in one pass.

A Matryoshka dictionary splits its latents into G groups and reconstructs the target y from each
prefix of groups. With D_h the decode of group h's active latents (no bias) and c what every
prefix adds (b_dec; a skip transcoder's skip path too),

    x_hat_g = c + sum_{h <= g} D_h,     e_g = x_hat_g - y = e_{g-1} + D_g   (e_{-1} = c - y)
    SSE_g   = sum over tokens and dimensions of e_g^2

and training weighs the SSE_g (a plain dictionary is G = 1). For any weights w_g on them,

    d/dD_h sum_g w_g SSE_g = 2 sum_{g >= h} w_g e_g,      d/dc = the same sum from h = 0:

a cumulative sum from the last group back. Autograd on ``(c + D.cumsum(1) - y).pow(2)`` keeps the
prefixes, their errors and squares as separate [B, G, ..., d] tensors and computes the backward
cumulative sum with two flips; `prefix_squared_errors` forms the errors once, keeps only them for
the backward, reduces them with one dot product per row, and sums the gradient back in place.
Equal to the autograd formulation up to float rounding (the order of the additions differs).
"""

from __future__ import annotations

import torch


class _PrefixErrors(torch.autograd.Function):
    """(partials [B, G, *rest, d], start [B, *rest, d]) -> (SSE [G, *rest], e_{G-1} [B, *rest, d]).

    start = c - y; e_g = start + partials[:, 0] + ... + partials[:, g]."""

    @staticmethod
    def forward(ctx, partials: torch.Tensor, start: torch.Tensor):
        errors = torch.empty_like(partials)
        torch.add(start, partials[:, 0], out=errors[:, 0])
        for g in range(1, partials.shape[1]):
            torch.add(errors[:, g - 1], partials[:, g], out=errors[:, g])
        ctx.save_for_backward(errors)
        ctx.set_materialize_grads(False)
        return torch.linalg.vecdot(errors, errors).sum(dim=0), errors[:, -1].clone()

    @staticmethod
    def backward(ctx, grad_sse: torch.Tensor | None, grad_last: torch.Tensor | None):
        (errors,) = ctx.saved_tensors
        if grad_sse is None:
            grad = torch.zeros_like(errors)
        else:
            grad = errors * (2 * grad_sse).unsqueeze(0).unsqueeze(-1)
        if grad_last is not None:
            grad[:, -1] += grad_last
        for g in range(errors.shape[1] - 2, -1, -1):  # grad of D_h: sum over g >= h
            grad[:, g] += grad[:, g + 1]
        return grad, grad[:, 0].clone()


def prefix_squared_errors(
    partials: torch.Tensor, start: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every prefix's squared error and the whole dictionary's error, differentiable in both.

    partials [B, G, *rest, d]: group g's decode D_g (no bias); start [B, *rest, d]: c - y, what the
    error is before any latent (*rest: a cross-layer transcoder's output layers). Returns
    (SSE [G, *rest]: sum over the B tokens and d dimensions of e_g^2, e_{G-1} [B, *rest, d]: the
    last prefix's error, x_hat - y)."""
    if partials.shape[:1] + partials.shape[2:] != start.shape:
        raise ValueError(
            f"prefix_squared_errors: partials {tuple(partials.shape)} [B, G, ..., d] do not match "
            f"start {tuple(start.shape)} [B, ..., d]."
        )
    return _PrefixErrors.apply(partials, start)
