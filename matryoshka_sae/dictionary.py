"""What every dictionary shares: units, dead latents, the decoder's unit norm, BatchTopK's inference
threshold and JumpReLU's thresholds.

A dictionary encodes a token's input x [d_in] into n_latents latent activations z and decodes z
into a prediction of its target [d_out]. Its classes differ in what they read and write (sae.py:
one input and one target; cross_layer_transcoder.py: one of each a layer) and share these pieces:

* Units. With cfg["input_unit_norm"] each token is standardised, x_n = (x - mean) / (std + eps)
  (`Dictionary.normalize_source`); fixed scales are powers of two (`power_of_two_rms`), so that an
  export folds them into the weights without rounding; the encoder's matmul runs in cfg["dtype"]
  on float32 parameters (`affine`).
* Dead latents. `tokens_since_fired` [n_latents] counts the tokens since each latent last fired; a
  latent is dead once it reaches n_batches_to_dead x batch_size.
* The decoder's norm. Each latent's decoder, a row of every tensor `decoder_weights()` lists
  (flattened over its trailing dims), has unit norm: before the optimizer step its gradient loses
  the component along the row, after it the row is rescaled to norm 1.
* BatchTopK's inference threshold, an EMA of the smallest kept activation over training batches
  (`update_inference_threshold`).
* JumpReLU: z = pre H(pre - theta) with one threshold theta_i = exp(log_threshold_i) a latent,
  learned through straight-through estimators (`_JumpReLU`, `_Step`) over a window eps
  (`jumprelu_bandwidth`), in a parameter group of its own (`log_threshold_param_groups`).
"""

from __future__ import annotations

import torch
from torch import nn

from matryoshka_sae import distributed

STD_EPS = 1e-5


# ---------------------------------------------------------------------------------------------
# Units and the encoder's matmul
# ---------------------------------------------------------------------------------------------


def power_of_two_rms(x: torch.Tensor) -> torch.Tensor:
    """The RMS of x's entries rounded to the nearest power of two (log scale), a scalar: a scale
    that multiplies and divides float weights without rounding any."""
    rms = x.pow(2).mean().sqrt().clamp(min=STD_EPS)
    return torch.exp2(torch.round(torch.log2(rms)))


def affine(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x W + b [B, n] in float32, for x [B, d], W [d, n], b [n], the matmul in `dtype`
    (cfg["dtype"]; parameters stay float32). `dtype` decides, not an enclosing torch.autocast."""
    with torch.autocast(x.device.type, enabled=False):
        if dtype == torch.float32:
            return torch.addmm(b, x.float(), W)
        return torch.addmm(b.to(dtype), x.to(dtype), W.to(dtype)).float()


# ---------------------------------------------------------------------------------------------
# The shared base
# ---------------------------------------------------------------------------------------------


class Dictionary(nn.Module):
    """Units, the dead-latent counter, the decoder-norm steps and the optimizer's groups.

    n_latents is the width of the code (feature_acts [..., n_latents]); d_in and d_out those of a
    token's input and of its prediction. A subclass registers its parameters and buffers, lists its
    decoders in `decoder_weights`, and defines forward, encode, decode, reconstruct,
    reconstruct_prefixes and `initialize_from_batch`.
    """

    def __init__(self, cfg: dict, d_in: int, d_out: int, n_latents: int):
        super().__init__()
        self.cfg = cfg
        self.d_in, self.d_out, self.n_latents = d_in, d_out, n_latents
        # Tokens seen since each latent last fired; dead after n_batches_to_dead batches' worth.
        self.register_buffer("tokens_since_fired", torch.zeros(n_latents, dtype=torch.long))

    def normalize_source(self, x: torch.Tensor):
        """Standardise each token (if input_unit_norm): returns (x_n, stats) or (x, None).

        The ecosystem's definition (OpenAI's TopK SAEs; SAELens's
        normalize_activations="layer_norm"), so that an exported dictionary computes exactly the
        same there:
            x_n = (x - mean) / (std + eps),   std with Bessel's correction (n - 1),
        and outputs return as y_n * std + mean, without eps. stats = (mean, std + eps, std): the
        shift, the divisor into normalised units and the factor back out of them.
        """
        x = x.float()
        if not self.cfg["input_unit_norm"]:
            return x, None
        mean = x.mean(dim=-1, keepdim=True)
        x = x - mean
        std = x.std(dim=-1, keepdim=True)
        divisor = std + STD_EPS
        return x / divisor, (mean, divisor, std)

    def initialize_from_batch(self, *inputs: torch.Tensor) -> None:
        """The data-dependent initialisation a training run does on its first batch (the
        arguments of forward)."""
        raise NotImplementedError

    # -- dead latents --------------------------------------------------------------------------

    def dead_latents(self) -> torch.Tensor:
        """[n_latents] bool: latents unfired for n_batches_to_dead x batch_size tokens."""
        return self.tokens_since_fired >= self.cfg["n_batches_to_dead"] * self.cfg["batch_size"]

    def batch_group(self):
        """In training under torchrun, the process group whose ranks' batches make up the batch
        (see distributed.py): batch statistics are reduced over it. None otherwise."""
        return distributed.batch_group() if self.training else None

    @torch.no_grad()
    def _update_dead_counters(self, fired: torch.Tensor, n_tokens: int) -> None:
        """Count n_tokens more for every latent, then restart those that `fired` [n_latents]."""
        group = self.batch_group()
        if group is not None:  # a latent fired in the batch if it fired on some rank
            fired = distributed.any_over_ranks(fired, group)
            n_tokens *= distributed.world_size(group)
        self.tokens_since_fired.add_(n_tokens).masked_fill_(fired, 0)

    # -- the optimizer and the decoder constraint ----------------------------------------------

    def param_groups(self) -> list[dict]:
        """The optimizer's parameter groups; a group's "lr_scale" multiplies the scheduled lr."""
        return [{"params": list(self.parameters()), "lr_scale": 1.0}]

    def decoder_weights(self) -> list[torch.Tensor]:
        """The decoder tensors [n, ...]; row i of each, flattened, is one latent's unit-norm
        decoder."""
        raise NotImplementedError

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Project out of each decoder row's gradient g its component along the row w:
            g <- g - <g, w> w.
        Call after backward, before the optimizer step: a unit-norm row can then only rotate."""
        for W in self.decoder_weights():
            if W.grad is not None:
                parallel = (W.grad * W).flatten(1).sum(dim=1)
                W.grad.sub_(_per_row(parallel, W) * W)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale decoder rows to unit norm; call after the optimizer step."""
        for W in self.decoder_weights():
            W.div_(_per_row(W.flatten(1).norm(dim=1), W))


def _per_row(values: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """values [n] shaped to broadcast over the rows of W [n, ...]."""
    return values.view(-1, *[1] * (W.dim() - 1))


# ---------------------------------------------------------------------------------------------
# BatchTopK's inference threshold
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def update_inference_threshold(
    threshold: torch.Tensor, smallest: torch.Tensor, rate: float, group
) -> None:
    """One training batch's update of BatchTopK's thresholds theta [n] (-1 while unlearned), from
    the smallest kept activation m [n] of each (inf where none was kept; under torchrun, `group`,
    the minimum over the ranks):
        theta <- m                          the first time,
        theta <- (1 - rate) theta + rate m  after;
    a threshold whose m is inf keeps its value."""
    if group is not None:
        smallest = distributed.min_over_ranks(smallest, group)
    ema = torch.where(threshold < 0, smallest, (1 - rate) * threshold + rate * smallest)
    threshold.copy_(torch.where(smallest.isfinite(), ema, threshold))


# ---------------------------------------------------------------------------------------------
# JumpReLU's thresholds
# ---------------------------------------------------------------------------------------------


def firing_thresholds(pre: torch.Tensor, rate: float) -> torch.Tensor:
    """[S]: for each latent (column of pre [B, S]) a value that exactly k = rate x B of its B
    pre-activations exceed: the midpoint of its k-th and (k+1)-th largest."""
    k = min(pre.shape[0] - 1, max(1, round(rate * pre.shape[0])))
    kth, next_one = pre.topk(k + 1, dim=0).values[-2:]
    return (kth + next_one) / 2


def initial_log_thresholds(cfg: dict, size: int) -> torch.Tensor:
    """log theta [size] before any data: cfg["jumprelu_threshold_init"], or 1 until the first
    batch."""
    init = cfg["jumprelu_threshold_init"]
    return torch.full((size,), 1.0 if init is None else float(init)).log()


def log_of_thresholds(theta: torch.Tensor) -> torch.Tensor:
    """log theta for thresholds found from data, each floored at 1e-3 x their mean size (log theta
    needs theta > 0; a firing quantile may be <= 0)."""
    floor = 1e-3 * theta.abs().mean().clamp(min=STD_EPS)
    return theta.clamp(min=floor).log()


def jumprelu_bandwidth(cfg: dict, theta: torch.Tensor) -> torch.Tensor | float:
    """The straight-through window eps: cfg["bandwidth"], or cfg["jumprelu_relative_bandwidth"] x
    each threshold (detached)."""
    if cfg["bandwidth"] is not None:
        return cfg["bandwidth"]
    return cfg["jumprelu_relative_bandwidth"] * theta.detach()


def quadratic_l0_objective(cfg: dict, l0: torch.Tensor, target: float, group) -> torch.Tensor:
    """l0_coeff x (L0 / target - 1)^2 for this rank's mean L0 a token `l0` (differentiable, through
    _Step, in the thresholds). Under torchrun (`group`) the value is the whole batch's L0 and the
    ranks' averaged gradients are the whole batch's (distributed.global_mean_value)."""
    l0 = distributed.global_mean_value(l0, group)
    return cfg["l0_coeff"] * (l0 / target - 1).pow(2)


def log_threshold_param_groups(module: nn.Module, lr_scale: float) -> list[dict]:
    """The optimizer's groups of a module with a `log_threshold` parameter: log_threshold at
    lr_scale x lr, the rest at lr (one group when lr_scale is 1)."""
    if lr_scale == 1.0:
        return [{"params": list(module.parameters()), "lr_scale": 1.0}]
    rest = [p for name, p in module.named_parameters() if name != "log_threshold"]
    return [
        {"params": rest, "lr_scale": 1.0},
        {"params": [module.log_threshold], "lr_scale": lr_scale},
    ]


class _JumpReLU(torch.autograd.Function):
    """z = pre * H(pre - theta). d z / d theta uses the straight-through estimate
    -(theta / eps) K((pre - theta) / eps) with the rectangle kernel K(u) = 1{|u| < 1/2}.
    eps is a number or a tensor that broadcasts against theta (one width per latent)."""

    @staticmethod
    def forward(ctx, pre, theta, bandwidth):
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, grad):
        pre, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        in_window = ((pre - theta).abs() < eps / 2).to(grad.dtype)
        grad_theta = (grad * in_window).sum(dim=0) * (-theta / eps)
        return grad * (pre > theta), grad_theta, None


class _Step(torch.autograd.Function):
    """H(pre - theta), with d/d theta = -(1/eps) K((pre - theta) / eps) and no gradient to pre."""

    @staticmethod
    def forward(ctx, pre, theta, bandwidth):
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        in_window = ((pre - theta).abs() < eps / 2).to(grad.dtype)
        return None, (grad * in_window).sum(dim=0) * (-1.0 / eps), None
