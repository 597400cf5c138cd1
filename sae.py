"""Sparse autoencoders and Matryoshka transcoders.

Notation: B tokens in a batch, S = dict_size latents, d_in / d_out the widths of the input and of
what is reconstructed (equal for an SAE; for a transcoder the source and the target activation).

Every model here computes
    pre   = x_c W_enc + b_enc                    x_c = x - b_dec (SAE) or x (transcoder)
    z     = sparsify(pre)                        TopK, BatchTopK, ReLU or JumpReLU
    x_hat = z W_dec + b_dec
with x standardised per token when cfg["input_unit_norm"] is on (outputs are returned in the
original units). Decoder rows are kept at unit norm. The TopK family (TopK, BatchTopK,
Matryoshka, transcoder) never forms z densely in training: see sparse_ops.py.

A Matryoshka model splits the dictionary into groups with ends m_1 < ... < m_G = S and
reconstructs the target from every nested prefix of latents [0, m_g), each with b_dec:
    x_hat_g = sum_{i < m_g} z_i W_dec[i] + b_dec,      L_rec = mean_g mean((x_hat_g - y)^2)
so the first latents must explain as much as they can on their own. A plain SAE is the case G = 1,
and one code path serves both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from config import compute_fvu
from sparse_ops import (
    SparseCode, gather_preactivations, select_above_threshold, select_batch_topk, select_topk,
    sparse_decode, sparse_decode_groups,
)

STD_EPS = 1e-5


class BaseAutoencoder(nn.Module):
    """Parameters, units, decoder-norm step, dead-latent counter and the loss dict.

    Subclasses define `_code_and_prefixes(x_c, y)`; everything else is shared.
    """

    # An SAE reads and writes one space, so its encoder starts as the transpose of its decoder.
    ties_encoder_to_decoder = True

    def __init__(self, cfg: dict, d_in: int | None = None, d_out: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.d_in = d_in or cfg["act_size"]
        self.d_out = d_out or cfg["act_size"]
        self.dict_size = cfg["dict_size"]
        generator = torch.Generator().manual_seed(cfg["seed"])
        W_dec = torch.randn(self.dict_size, self.d_out, generator=generator)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        if self.ties_encoder_to_decoder and self.d_in == self.d_out:
            W_enc = W_dec.t().clone()  # encoder starts as the transpose of the decoder
        else:
            W_enc = torch.randn(self.d_in, self.dict_size, generator=generator)
            W_enc /= W_enc.norm(dim=0, keepdim=True)
        self.W_enc = nn.Parameter(W_enc)
        self.b_enc = nn.Parameter(torch.zeros(self.dict_size))
        self.W_dec = nn.Parameter(W_dec)
        self.b_dec = nn.Parameter(torch.zeros(self.d_out))
        # Tokens seen since each latent last fired; dead after n_batches_to_dead batches' worth.
        self.register_buffer("tokens_since_fired", torch.zeros(self.dict_size, dtype=torch.long))
        self.to(cfg["device"])

    # -- units -------------------------------------------------------------------------------

    def normalize_source(self, x: torch.Tensor):
        """Standardise each token (if input_unit_norm): returns (x_n, (mean, std)) or (x, None)."""
        x = x.float()
        if not self.cfg["input_unit_norm"]:
            return x, None
        mean = x.mean(dim=-1, keepdim=True)
        std = x.std(dim=-1, keepdim=True, correction=0) + STD_EPS
        return (x - mean) / std, (mean, std)

    def target_stats(self, source_stats):
        """(mean, std) of the units the target is reconstructed in: an SAE's target is its input."""
        return source_stats

    @staticmethod
    def to_units(y: torch.Tensor, stats) -> torch.Tensor:
        return y.float() if stats is None else (y.float() - stats[0]) / stats[1]

    @staticmethod
    def restore_target(y_n: torch.Tensor, stats) -> torch.Tensor:
        """Back to original units; `y_n` may carry extra middle dims (prefixes)."""
        if stats is None:
            return y_n
        mean, std = stats
        if y_n.dim() == 3 and mean.dim() == 2:  # per-token stats [B, 1] against prefixes [B, G, d]
            mean, std = mean.unsqueeze(1), std.unsqueeze(1)
        return y_n * std + mean

    def center(self, x_n: torch.Tensor) -> torch.Tensor:
        return x_n - self.b_dec

    def preactivations(self, x_c: torch.Tensor) -> torch.Tensor:
        """x_c W_enc + b_enc [B, S] in float32, the matmul in cfg["dtype"] (parameters stay
        float32). cfg["dtype"] decides, not an enclosing torch.autocast."""
        dtype = self.cfg["dtype"]
        with torch.autocast(x_c.device.type, enabled=False):
            if dtype == torch.float32:
                return torch.addmm(self.b_enc, x_c.float(), self.W_enc)
            return torch.addmm(self.b_enc.to(dtype), x_c.to(dtype), self.W_enc.to(dtype)).float()

    # -- public API ----------------------------------------------------------------------------

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations [..., S] of input x [..., d_in] (stateless). For analysis: the TopK
        family returns them without gradient (training goes through `forward`)."""
        x_n, _ = self.normalize_source(x.reshape(-1, x.shape[-1]))
        return self._feature_acts(self.center(x_n)).reshape(*x.shape[:-1], self.dict_size)

    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        """z W_dec + b_dec [B, d_out], in the normalised units the model works in; with
        input_unit_norm on, `reconstruct(x)` is what gives x's reconstruction in its own units."""
        return feature_acts.float() @ self.W_dec + self.b_dec

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction of x (transcoder: prediction of the target) in original units, [..., d_out]."""
        prefixes, stats = self._prefixes(x)
        return self.restore_target(prefixes[:, -1], stats).reshape(*x.shape[:-1], self.d_out)

    def reconstruct_prefixes(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction from each nested prefix of the dictionary, [..., G, d_out] in original
        units (G = 1 for a non-Matryoshka SAE; the last prefix is the whole dictionary)."""
        prefixes, stats = self._prefixes(x)
        return self.restore_target(prefixes, stats).reshape(*x.shape[:-1], prefixes.shape[1], self.d_out)

    def _prefixes(self, x: torch.Tensor):
        """Prefix reconstructions [N, G, d_out] in normalised units and the target's stats."""
        x_n, stats = self.normalize_source(x.reshape(-1, x.shape[-1]))
        prefixes, _ = self._code_and_prefixes(self.center(x_n))
        return prefixes, self.target_stats(stats)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.compute_outputs(x, x)

    # -- the loss ------------------------------------------------------------------------------

    def _feature_acts(self, x_c: torch.Tensor) -> torch.Tensor:
        """Dense feature activations [B, S] of centred, normalised inputs."""
        raise NotImplementedError

    def _code_and_prefixes(self, x_c: torch.Tensor, y_n: torch.Tensor | None = None):
        """Prefix reconstructions [B, G, d_out] in normalised units and, when the target y_n is
        given, a dict of the code's losses and statistics (else None)."""
        raise NotImplementedError

    def compute_outputs(self, source: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Loss and metrics of one batch [..., d] (leading dims are tokens); in train mode also
        updates the dead-latent counters. sae_out and feature_acts keep the leading dims."""
        leading = source.shape[:-1]
        source, target = source.reshape(-1, source.shape[-1]), target.reshape(-1, target.shape[-1])
        x_n, x_stats = self.normalize_source(source)
        y_stats = self.target_stats(x_stats)
        y_n = self.to_units(target, y_stats)
        prefixes, info = self._code_and_prefixes(self.center(x_n), y_n)
        target = target.float()
        squared_error = (prefixes - y_n.unsqueeze(1)).pow(2)  # [B, G, d_out], normalised units
        l2_per_prefix = squared_error.mean(dim=(0, 2))
        l2_loss = l2_per_prefix.mean()
        sae_out = self.restore_target(prefixes[:, -1], y_stats)
        if self.training:
            self._update_dead_counters(info["fired"], source.shape[0])
        out = {
            "loss": l2_loss + info["sparsity_loss"] + info["aux_loss"],
            "l2_loss": l2_loss,
            "l1_loss": info["l1_loss"],
            "l1_norm": info["l1_norm"],
            "l0_norm": info["l0_norm"],
            "aux_loss": info["aux_loss"],
            "fvu": compute_fvu(target, sae_out),
            "num_dead_features": self.dead_latents().sum(),
            "sae_out": sae_out.reshape(*leading, self.d_out),
            "feature_acts": info["feature_acts"].reshape(*leading, self.dict_size),
        }
        if prefixes.shape[1] > 1:
            fvus = self._prefix_fvus(squared_error.detach(), target, y_stats)
            out.update(fvu_min=fvus.min(), fvu_max=fvus.max(), fvu_mean=fvus.mean(),
                       min_l2_loss=l2_per_prefix.min().detach(), max_l2_loss=l2_per_prefix.max().detach(),
                       fvu_per_prefix=fvus)
        return out

    @staticmethod
    def _prefix_fvus(squared_error: torch.Tensor, target: torch.Tensor, y_stats) -> torch.Tensor:
        """`compute_fvu` of every prefix [G], from the squared errors [B, G, d] in normalised units:
        an error in normalised units times the token's std is the error in original units."""
        per_token = squared_error.sum(dim=2)
        if y_stats is not None:
            per_token = per_token * y_stats[1].reshape(-1, 1).pow(2)
        total = (target - target.mean(dim=0)).pow(2).sum()
        return torch.where(total > 0, per_token.sum(dim=0) / total, torch.full_like(total, float("nan")))

    # -- training state and the decoder constraint -----------------------------------------------

    def dead_latents(self) -> torch.Tensor:
        """[S] bool: latents unfired for n_batches_to_dead x batch_size tokens."""
        return self.tokens_since_fired >= self.cfg["n_batches_to_dead"] * self.cfg["batch_size"]

    @torch.no_grad()
    def _update_dead_counters(self, fired: torch.Tensor, n_tokens: int) -> None:
        self.tokens_since_fired.add_(n_tokens).masked_fill_(fired, 0)

    @torch.no_grad()
    def initialize_b_dec(self, target: torch.Tensor) -> None:
        """Set b_dec to the mean of a batch of targets (in normalised units)."""
        x_n, _ = self.normalize_source(target.reshape(-1, self.d_out))
        self.b_dec.copy_(x_n.mean(dim=0))

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Project out of each decoder row's gradient its component along the row.

        Call after backward, before the optimizer step: a unit-norm row can then only rotate.
        """
        if self.W_dec.grad is None:
            return
        parallel = (self.W_dec.grad * self.W_dec).sum(dim=1, keepdim=True)
        self.W_dec.grad.sub_(parallel * self.W_dec)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale decoder rows to unit norm; call after the optimizer step."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True))


# ---------------------------------------------------------------------------------------------
# The TopK family: sparse codes
# ---------------------------------------------------------------------------------------------


class TopKSAE(BaseAutoencoder):
    """ReLU then the k largest latents of each token.

    Loss: mean((x_hat - x)^2) + aux_penalty * AuxK (+ l1_coeff * mean_b sum_i z_bi if set), where
    AuxK = mean((e_hat - e)^2) reconstructs the detached residual e = x - x_hat from the top_k_aux
    pre-activations of the dead latents, decoded without b_dec.
    """

    def __init__(self, cfg: dict, d_in: int | None = None, d_out: int | None = None):
        super().__init__(cfg, d_in, d_out)
        self.register_buffer("group_ends", self._group_ends(), persistent=False)

    def _group_ends(self) -> torch.Tensor:
        return torch.tensor([self.dict_size], device=self.cfg["device"])

    def select(self, pre: torch.Tensor) -> SparseCode:
        return select_topk(pre, self.cfg["top_k"])

    def sparse_code(self, x_c: torch.Tensor) -> tuple[SparseCode, torch.Tensor]:
        """The active latents of x_c with differentiable values, and the dense pre-activations."""
        with torch.no_grad():
            pre = self.preactivations(x_c)
        code = self.select(pre)
        return code.with_values(gather_preactivations(x_c, self.W_enc, self.b_enc, pre, code)), pre

    def _feature_acts(self, x_c: torch.Tensor) -> torch.Tensor:
        return self.sparse_code(x_c)[0].to_dense()

    def _code_and_prefixes(self, x_c: torch.Tensor, y_n: torch.Tensor | None = None):
        code, pre = self.sparse_code(x_c)
        prefixes = sparse_decode_groups(code, self.W_dec, self.group_ends).cumsum(dim=1) + self.dense_term(x_c)
        if y_n is None:
            return prefixes, None
        if self.training:
            self._update_threshold(code.values.detach())
        l1_norm = code.values.sum() / code.batch_size
        l1_loss = self.cfg["l1_coeff"] * l1_norm  # an optional extra: 0 by default
        residual = (y_n - prefixes[:, -1]).detach()
        return prefixes, {
            "l1_norm": l1_norm.detach(),
            "l1_loss": l1_loss,
            "sparsity_loss": l1_loss,
            "l0_norm": code.l0(),
            "aux_loss": self.auxk_loss(x_c, pre, residual),
            "fired": code.fired(),
            "feature_acts": code.to_dense(out=pre),  # pre is no longer needed: reuse its memory
        }

    def dense_term(self, x_c: torch.Tensor) -> torch.Tensor:
        """What every prefix reconstruction adds to its latents' sum: b_dec [d_out] (a skip
        transcoder adds x W_skip too, [B, 1, d_out])."""
        return self.b_dec

    def _update_threshold(self, values: torch.Tensor) -> None:
        pass

    def auxk_loss(self, x_c: torch.Tensor, pre: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """aux_penalty * mean((e_hat - e)^2), e_hat from the top_k_aux dead latents (0 if none)."""
        dead = self.dead_latents().nonzero().squeeze(1)
        if dead.numel() == 0 or self.cfg["aux_penalty"] == 0:
            return torch.zeros((), device=x_c.device)
        local = select_topk(pre[:, dead], self.cfg["top_k_aux"])
        code = SparseCode.from_indices(local.rows, dead[local.latents], pre.shape[0], self.dict_size)
        code = code.with_values(gather_preactivations(x_c, self.W_enc, self.b_enc, pre, code))
        return self.cfg["aux_penalty"] * (sparse_decode(code, self.W_dec) - residual).pow(2).mean()


class BatchTopKSAE(TopKSAE):
    """BatchTopK: the k x B largest activations of the whole batch, so tokens share a budget.

    Loss as TopKSAE. At inference (`eval()`) a token cannot depend on its batch, so a threshold
    replaces the selection: an EMA of the smallest kept activation over training batches, a buffer
    saved with the weights.
    """

    def __init__(self, cfg: dict, d_in: int | None = None, d_out: int | None = None):
        super().__init__(cfg, d_in, d_out)
        self.register_buffer("threshold", torch.tensor(-1.0, device=cfg["device"]))  # -1: not learned yet

    def select(self, pre: torch.Tensor) -> SparseCode:
        if self.training or self.threshold.item() < 0:
            return select_batch_topk(pre, self.cfg["top_k"], lower_bound=0.8 * self.threshold)
        return select_above_threshold(pre, self.threshold)

    @torch.no_grad()
    def _update_threshold(self, values: torch.Tensor) -> None:
        if values.numel() == 0:
            return
        smallest, rate = values.min(), self.cfg["threshold_ema_rate"]
        ema = (1 - rate) * self.threshold + rate * smallest
        self.threshold.copy_(torch.where(self.threshold < 0, smallest, ema))


class GlobalBatchTopKMatryoshkaSAE(BatchTopKSAE):
    """BatchTopK over the whole dictionary, reconstructed from every nested prefix of groups.

    Loss: mean over groups g of mean((x_hat_g - x)^2) + aux_penalty * AuxK, with x_hat_g the
    reconstruction from latents [0, m_g) plus b_dec (see the module docstring). Outputs add the
    FVU of each prefix: fvu_min, fvu_max, fvu_mean and fvu_per_prefix [G];
    `reconstruct_prefixes(x)` gives the prefix reconstructions themselves.
    """

    def _group_ends(self) -> torch.Tensor:
        return torch.tensor(self.cfg["group_sizes"], device=self.cfg["device"]).cumsum(0)


class MatryoshkaTranscoder(GlobalBatchTopKMatryoshkaSAE):
    """A Matryoshka BatchTopK model that reads one activation and predicts another.

    forward(x_source, x_target). The source is standardised per token (if input_unit_norm);
    the target is divided by a fixed scale (a buffer set by `initialize_b_dec` from data, so that
    the loss does not depend on the target's units) and predictions are returned in its units.
    Loss: mean over groups of mean((y_hat_g - y / scale)^2) + aux_penalty * AuxK.

    With cfg["transcoder_skip"] it is a skip transcoder (Paulo et al. 2025): an affine path
    x W_skip, W_skip [d_in, d_out] starting at zero, joins every prefix reconstruction,
        y_hat_g = sum_{i < m_g} z_i W_dec[i] + b_dec + x W_skip,
    in the units the model works in (x standardised, y / scale), so the latents are left the
    nonlinear part of the map. W_skip is a plain parameter: saved, loaded and resumed with the
    rest, and free of the decoder's unit-norm constraint. `decode(z)` has no source to read and
    returns z W_dec + b_dec; `reconstruct(x)` includes the skip term.

    Initialisation: the encoder is NOT the transpose of the decoder. Source and target are
    different spaces, so W_dec^T is a random direction of the source that the decoder's
    gradient does not pull towards anything the latent predicts; latents tied that way start
    with correlated pre-activations and half of them die in the first hundred steps (issue 14).
    Encoder columns are drawn independently (random unit vectors).
    """

    ties_encoder_to_decoder = False

    def __init__(self, cfg: dict):
        super().__init__(cfg, d_in=cfg.get("source_act_size") or cfg["act_size"],
                         d_out=cfg.get("target_act_size") or cfg["act_size"])
        self.register_buffer("target_scale", torch.tensor(1.0, device=cfg["device"]))
        if cfg.get("transcoder_skip", False):  # .get: checkpoints from before the setting load too
            self.W_skip = nn.Parameter(torch.zeros(self.d_in, self.d_out, device=cfg["device"]))
        else:
            self.W_skip = None

    def dense_term(self, x_c: torch.Tensor) -> torch.Tensor:
        """b_dec [d_out], or b_dec + x W_skip [B, 1, d_out] for a skip transcoder."""
        if self.W_skip is None:
            return self.b_dec
        return torch.addmm(self.b_dec, x_c.float(), self.W_skip).unsqueeze(1)

    def center(self, x_n: torch.Tensor) -> torch.Tensor:
        return x_n  # b_dec lives in the target's space

    def target_stats(self, source_stats):
        return (torch.zeros((), device=self.target_scale.device), self.target_scale)

    def forward(self, x_source: torch.Tensor, x_target: torch.Tensor) -> dict[str, torch.Tensor]:
        if x_source.shape[:-1] != x_target.shape[:-1]:
            raise ValueError(f"x_source has {tuple(x_source.shape[:-1])} rows but x_target has "
                             f"{tuple(x_target.shape[:-1])}; pass the activations of the same tokens.")
        return self.compute_outputs(x_source, x_target)

    @torch.no_grad()
    def initialize_b_dec(self, target: torch.Tensor) -> None:
        """Set the target scale (RMS of the centred target, if input_unit_norm) and b_dec to its mean."""
        y = target.reshape(-1, self.d_out).float()
        if self.cfg["input_unit_norm"]:
            self.target_scale.copy_((y - y.mean(dim=0)).pow(2).mean().sqrt().clamp(min=STD_EPS))
        self.b_dec.copy_(self.to_units(y, self.target_stats(None)).mean(dim=0))


# ---------------------------------------------------------------------------------------------
# Dense codes: ReLU and JumpReLU
# ---------------------------------------------------------------------------------------------


class DenseCodeSAE(BaseAutoencoder):
    """Shared by the SAEs whose codes are formed densely (every latent may fire)."""

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sparsity_loss(self, pre: torch.Tensor, acts: torch.Tensor):
        """Return (l1_loss, sparsity_loss) for the batch."""
        raise NotImplementedError

    def _feature_acts(self, x_c: torch.Tensor) -> torch.Tensor:
        return self.activation(self.preactivations(x_c))

    def _code_and_prefixes(self, x_c: torch.Tensor, y_n: torch.Tensor | None = None):
        pre = self.preactivations(x_c)
        acts = self.activation(pre)
        prefixes = self.decode(acts).unsqueeze(1)
        if y_n is None:
            return prefixes, None
        l1_norm = acts.sum(dim=-1).mean()
        l1_loss, sparsity_loss = self.sparsity_loss(pre, acts)
        active = acts > 0
        return prefixes, {
            "l1_norm": l1_norm.detach(),
            "l1_loss": l1_loss,
            "sparsity_loss": sparsity_loss,
            "l0_norm": active.float().sum(dim=-1).mean(),
            "aux_loss": torch.zeros((), device=x_c.device),
            "fired": active.any(dim=0),
            "feature_acts": acts.detach(),
        }


class VanillaSAE(DenseCodeSAE):
    """ReLU SAE. Loss: mean((x_hat - x)^2) + l1_coeff * mean_b sum_i z_bi (decoder rows have unit norm)."""

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return F.relu(pre)

    def sparsity_loss(self, pre, acts):
        l1_loss = self.cfg["l1_coeff"] * acts.sum(dim=-1).mean()
        return l1_loss, l1_loss


class _JumpReLU(torch.autograd.Function):
    """z = pre * H(pre - theta). d z / d theta uses the straight-through estimate
    -(theta / eps) K((pre - theta) / eps) with the rectangle kernel K(u) = 1{|u| < 1/2}."""

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


class JumpReLUSAE(DenseCodeSAE):
    """JumpReLU SAE (Rajamanoharan et al. 2024): z = pre * H(pre - theta), theta = exp(log_threshold).

    Loss: mean((x_hat - x)^2) + l0_coeff * mean_b sum_i H(pre_bi - theta_i). The step acts on
    pre-activations; theta learns through straight-through estimators of bandwidth eps. Autograd
    carries the gradient from theta to log_threshold (the factor theta of the chain rule).
    """

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        init = torch.full((self.dict_size,), float(cfg["jumprelu_threshold_init"]))
        self.log_threshold = nn.Parameter(init.log().to(cfg["device"]))

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return _JumpReLU.apply(pre, self.log_threshold.exp(), self.cfg["bandwidth"])

    def sparsity_loss(self, pre, acts):
        l0 = _Step.apply(pre, self.log_threshold.exp(), self.cfg["bandwidth"]).sum(dim=-1).mean()
        return torch.zeros((), device=pre.device), self.cfg["l0_coeff"] * l0


SAE_CLASSES: dict[str, type[BaseAutoencoder]] = {
    "batchtopk": BatchTopKSAE,
    "topk": TopKSAE,
    "vanilla": VanillaSAE,
    "jumprelu": JumpReLUSAE,
    "matryoshka": GlobalBatchTopKMatryoshkaSAE,
    "matryoshka_transcoder": MatryoshkaTranscoder,
}


def create_sae(cfg: dict) -> BaseAutoencoder:
    """The SAE class that cfg["sae_type"] names, built from cfg."""
    return SAE_CLASSES[cfg["sae_type"]](cfg)
