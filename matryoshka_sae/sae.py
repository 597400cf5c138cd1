"""Sparse autoencoders and Matryoshka transcoders.

Notation: B tokens in a batch, S = dict_size latents, d_in / d_out the widths of the input and of
what is reconstructed (equal for an SAE; for a transcoder the source and the target activation).

Every model here computes
    pre   = x_c W_enc + b_enc                    x_c = x - b_dec (SAE) or x - source_mean (transcoder)
    z     = sparsify(pre)                        TopK, BatchTopK, ReLU or JumpReLU
    x_hat = z W_dec + b_dec                      (+ x_s W_skip for a skip transcoder)
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

from matryoshka_sae import distributed
from matryoshka_sae.config import compute_fvu
from matryoshka_sae.sparse_ops import (
    SparseCode,
    gather_preactivations,
    select_above_threshold,
    select_batch_topk,
    select_topk,
    sparse_decode,
    sparse_decode_cross_layer,
    sparse_decode_groups,
)

STD_EPS = 1e-5


class BaseAutoencoder(nn.Module):
    """Parameters, units, decoder-norm step, dead-latent counter and the loss dict.

    Subclasses define `_code_and_prefixes(x_c, y_n, x)`; everything else is shared.
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
        """Standardise each token (if input_unit_norm): returns (x_n, stats) or (x, None).

        The ecosystem's definition (OpenAI's TopK SAEs; SAELens's normalize_activations="layer_norm"),
        so that an exported dictionary computes exactly the same there:
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

    def target_stats(self, source_stats):
        """(shift, divisor, factor) of the units the target is reconstructed in (see
        `normalize_source`): an SAE's target is its input."""
        return source_stats

    @staticmethod
    def to_units(y: torch.Tensor, stats) -> torch.Tensor:
        return y.float() if stats is None else (y.float() - stats[0]) / stats[1]

    @staticmethod
    def restore_target(y_n: torch.Tensor, stats) -> torch.Tensor:
        """Back to original units; `y_n` may carry extra middle dims (prefixes)."""
        if stats is None:
            return y_n
        mean, _, factor = stats
        if y_n.dim() == 3 and mean.dim() == 2:  # per-token stats [B, 1] against prefixes [B, G, d]
            mean, factor = mean.unsqueeze(1), factor.unsqueeze(1)
        return y_n * factor + mean

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
        return self.restore_target(prefixes, stats).reshape(
            *x.shape[:-1], prefixes.shape[1], self.d_out
        )

    def _prefixes(self, x: torch.Tensor):
        """Prefix reconstructions [N, G, d_out] in normalised units and the target's stats."""
        x = x.reshape(-1, x.shape[-1])
        x_n, stats = self.normalize_source(x)
        prefixes, _ = self._code_and_prefixes(self.center(x_n), x=x)
        return prefixes, self.target_stats(stats)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.compute_outputs(x, x)

    # -- the loss ------------------------------------------------------------------------------

    def _feature_acts(self, x_c: torch.Tensor) -> torch.Tensor:
        """Dense feature activations [B, S] of centred, normalised inputs."""
        raise NotImplementedError

    def _code_and_prefixes(
        self, x_c: torch.Tensor, y_n: torch.Tensor | None = None, x: torch.Tensor | None = None
    ):
        """Prefix reconstructions [B, G, d_out] in normalised units and, when the target y_n is
        given, a dict of the code's losses and statistics (else None). x [B, d_in] is the input in
        its own units, which only a skip transcoder's skip path reads."""
        raise NotImplementedError

    def compute_outputs(
        self, source: torch.Tensor, target: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Loss and metrics of one batch [..., d] (leading dims are tokens); in train mode also
        updates the dead-latent counters. sae_out and feature_acts keep the leading dims."""
        leading = source.shape[:-1]
        source, target = source.reshape(-1, source.shape[-1]), target.reshape(-1, target.shape[-1])
        x_n, x_stats = self.normalize_source(source)
        y_stats = self.target_stats(x_stats)
        y_n = self.to_units(target, y_stats)
        prefixes, info = self._code_and_prefixes(self.center(x_n), y_n, source)
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
            fvus = self._prefix_fvus(prefixes.detach(), target, y_stats)
            out.update(
                fvu_min=fvus.min(),
                fvu_max=fvus.max(),
                fvu_mean=fvus.mean(),
                min_l2_loss=l2_per_prefix.min().detach(),
                max_l2_loss=l2_per_prefix.max().detach(),
                fvu_per_prefix=fvus,
            )
        return out

    @classmethod
    def _prefix_fvus(cls, prefixes: torch.Tensor, target: torch.Tensor, y_stats) -> torch.Tensor:
        """`compute_fvu` of every prefix [G], from the prefix reconstructions [B, G, d] in
        normalised units (restored first: the way back out has no eps, so errors do not simply scale)."""
        with torch.no_grad():
            errors = (
                (cls.restore_target(prefixes, y_stats) - target.unsqueeze(1)).pow(2).sum(dim=(0, 2))
            )
            total = (target - target.mean(dim=0)).pow(2).sum()
            return torch.where(total > 0, errors / total, torch.full_like(total, float("nan")))

    # -- training state and the decoder constraint -----------------------------------------------

    def param_groups(self) -> list[dict]:
        """The optimizer's parameter groups; a group's "lr_scale" multiplies the scheduled lr."""
        return [{"params": list(self.parameters()), "lr_scale": 1.0}]

    def dead_latents(self) -> torch.Tensor:
        """[S] bool: latents unfired for n_batches_to_dead x batch_size tokens."""
        return self.tokens_since_fired >= self.cfg["n_batches_to_dead"] * self.cfg["batch_size"]

    def batch_group(self):
        """In training under torchrun, the process group whose ranks' batches make up the batch
        (see distributed.py): batch statistics are reduced over it. None otherwise."""
        return distributed.batch_group() if self.training else None

    @torch.no_grad()
    def _update_dead_counters(self, fired: torch.Tensor, n_tokens: int) -> None:
        group = self.batch_group()
        if group is not None:  # a latent fired in the batch if it fired on some rank
            fired = distributed.any_over_ranks(fired, group)
            n_tokens *= distributed.world_size(group)
        self.tokens_since_fired.add_(n_tokens).masked_fill_(fired, 0)

    @torch.no_grad()
    def initialize_b_dec(self, target: torch.Tensor) -> None:
        """Set b_dec to the mean of a batch of targets (in normalised units). The training loop calls
        it on the first batch of a fresh run; subclasses set their other data-driven state here too
        (JumpReLU thresholds, ReLU encoder biases)."""
        x_n, _ = self.normalize_source(target.reshape(-1, self.d_out))
        self.b_dec.copy_(x_n.mean(dim=0))

    def initialize_from_batch(self, *inputs: torch.Tensor) -> None:
        """The data-dependent initialisation a training run does on its first batch (the SAE's
        input, or a transcoder's (source, target)): here b_dec from the last of them."""
        self.initialize_b_dec(inputs[-1])

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

    def _code_and_prefixes(
        self, x_c: torch.Tensor, y_n: torch.Tensor | None = None, x: torch.Tensor | None = None
    ):
        code, pre = self.sparse_code(x_c)
        prefixes = sparse_decode_groups(code, self.W_dec, self.group_ends).cumsum(
            dim=1
        ) + self.dense_term(x)
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

    def dense_term(self, x: torch.Tensor | None) -> torch.Tensor:
        """What every prefix reconstruction adds to its latents' sum: b_dec [d_out] (a skip
        transcoder adds its skip path on the input x [B, d_in] too, [B, 1, d_out])."""
        return self.b_dec

    def _update_threshold(self, values: torch.Tensor) -> None:
        pass

    def auxk_loss(
        self, x_c: torch.Tensor, pre: torch.Tensor, residual: torch.Tensor
    ) -> torch.Tensor:
        """aux_penalty * mean((e_hat - e)^2), e_hat from the top_k_aux dead latents (0 if none)."""
        dead = self.dead_latents().nonzero().squeeze(1)
        if dead.numel() == 0 or self.cfg["aux_penalty"] == 0:
            return torch.zeros((), device=x_c.device)
        local = select_topk(pre[:, dead], self.cfg["top_k_aux"])
        code = SparseCode.from_indices(
            local.rows, dead[local.latents], pre.shape[0], self.dict_size
        )
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
        self.register_buffer(
            "threshold", torch.tensor(-1.0, device=cfg["device"])
        )  # -1: not learned yet

    def select(self, pre: torch.Tensor) -> SparseCode:
        if self.training or self.threshold.item() < 0:
            return select_batch_topk(
                pre, self.cfg["top_k"], lower_bound=0.8 * self.threshold, group=self.batch_group()
            )
        return select_above_threshold(pre, self.threshold)

    @torch.no_grad()
    def _update_threshold(self, values: torch.Tensor) -> None:
        group = self.batch_group()
        if group is not None:  # the smallest kept value of the whole batch (inf where none is kept)
            local = values.min() if values.numel() else values.new_tensor(float("inf"))
            values = distributed.min_over_ranks(local, group).reshape(1)
            values = values[values.isfinite()]
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


def power_of_two_rms(x: torch.Tensor) -> torch.Tensor:
    """The RMS of x's entries rounded to the nearest power of two (log scale), a scalar: a scale
    that multiplies and divides float weights without rounding any."""
    rms = x.pow(2).mean().sqrt().clamp(min=STD_EPS)
    return torch.exp2(torch.round(torch.log2(rms)))


class MatryoshkaTranscoder(GlobalBatchTopKMatryoshkaSAE):
    """A Matryoshka BatchTopK model that reads one activation and predicts another.

    forward(x_source, x_target). The source is standardised per token (if input_unit_norm) and
    centred, x_c = x_n - source_mean; the target is divided by a fixed scale (a buffer set by
    `initialize_b_dec` from data, so that the loss does not depend on the target's units) and
    predictions are returned in its units.
    Loss: mean over groups of mean((y_hat_g - y / scale)^2) + aux_penalty * AuxK.

    With cfg["transcoder_skip"] it is a skip transcoder (Paulo et al. 2025): an affine path
    x_s W_skip, W_skip [d_in, d_out] starting at zero, joins every prefix reconstruction,
        y_hat_g = sum_{i < m_g} z_i W_dec[i] + b_dec + x_s W_skip,
        x_s     = (x - skip_shift) / skip_scale,
    so the latents are left the nonlinear part of the map. The skip path reads the raw source,
    centred by its mean and divided by a fixed power of two (buffers set from the first batch;
    the scale is 1 without input_unit_norm, where x_s = x_c): a linear map of x, as SAELens's
    skip transcoder's x W_skip^T is, so that an export folds skip_scale and target_scale into
    W_skip exactly (the per-token standardisation of x_c is not linear and could not be folded).
    W_skip is a plain parameter: saved, loaded and resumed with the rest, and free of the
    decoder's unit-norm constraint. `decode(z)` has no source to read and returns z W_dec + b_dec;
    `reconstruct(x)` includes the skip term.

    Initialisation, from the first training batch (`initialize_from_batch`):
    * The source is centred by its mean, a buffer. A residual stream has a few coordinates ~10x
      the others after standardisation (2 of 576 in SmolLM2's layer-8 resid_mid); left in, their
      mean m gives every latent an offset m . W_enc[:, i] that Adam moves by about lr x |m| a
      step, so a few latents win BatchTopK on every token and the rest stop firing. An SAE is centred by
      its b_dec; a transcoder's b_dec lives in the target's space, hence a mean of its own.
    * Encoder columns are independent random unit vectors, not W_dec^T: source and target are
      different spaces, and the tie only makes sense where a latent reads and writes one space.
    * Each decoder row points at the mean target (after b_dec) of the tokens its latent fires on
      (`initialize_decoder_from_batch`), so that a latent's first output reduces the error
      instead of adding a random direction that training would first suppress.
    * Every latent's pre-activation is lowered by one shift, fitted so that the first predictions
      have the target's size (`initialize_encoder_bias_from_batch`): aimed rows share the
      target's main directions, and k of them at full strength overshoot it several times.
    """

    ties_encoder_to_decoder = False

    def __init__(self, cfg: dict):
        super().__init__(cfg, d_in=cfg["source_act_size"], d_out=cfg["target_act_size"])
        self.register_buffer("target_scale", torch.tensor(1.0, device=cfg["device"]))
        self.register_buffer("source_mean", torch.zeros(self.d_in, device=cfg["device"]))
        if cfg["transcoder_skip"]:
            self.W_skip = nn.Parameter(torch.zeros(self.d_in, self.d_out, device=cfg["device"]))
            self.register_buffer("skip_shift", torch.zeros(self.d_in, device=cfg["device"]))
            self.register_buffer("skip_scale", torch.tensor(1.0, device=cfg["device"]))
        else:
            self.W_skip = None

    def dense_term(self, x: torch.Tensor | None) -> torch.Tensor:
        """b_dec [d_out], or b_dec + x_s W_skip [B, 1, d_out] for a skip transcoder (x [B, d_in] raw)."""
        if self.W_skip is None:
            return self.b_dec
        if x is None:
            raise ValueError("A skip transcoder's prediction reads the raw source x; pass it.")
        x_s = (x.float() - self.skip_shift) / self.skip_scale
        return torch.addmm(self.b_dec, x_s, self.W_skip).unsqueeze(1)

    def center(self, x_n: torch.Tensor) -> torch.Tensor:
        return x_n - self.source_mean  # (b_dec lives in the target's space)

    def select(self, pre: torch.Tensor) -> SparseCode:
        """BatchTopK (the default), or with cfg["transcoder_selection"] = "topk" the k largest
        latents of each token, in training and at inference alike (no threshold is learned)."""
        if self.cfg["transcoder_selection"] == "topk":
            return select_topk(pre, self.cfg["top_k"])
        return super().select(pre)

    def _update_threshold(self, values: torch.Tensor) -> None:
        if self.cfg["transcoder_selection"] != "topk":
            super()._update_threshold(values)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Files written before the source was centred (and SAELens's) have no source_mean: zero.
        state_dict.setdefault(prefix + "source_mean", torch.zeros_like(self.source_mean))
        if self.W_skip is not None and prefix + "skip_scale" not in state_dict:
            self._load_skip_path_of_older_file(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _load_skip_path_of_older_file(self, state_dict, prefix) -> None:
        """Skip transcoders saved before the skip path read the raw source read x_c instead: the
        same thing without input_unit_norm (skip_shift = source_mean, skip_scale = 1)."""
        if self.cfg["input_unit_norm"]:
            raise ValueError(
                "This skip transcoder was saved by a version whose skip path read the standardised "
                "source (input_unit_norm=True), which this version cannot compute; retrain it, "
                "or load it with the version that trained it."
            )
        state_dict[prefix + "skip_shift"] = state_dict[prefix + "source_mean"]
        state_dict[prefix + "skip_scale"] = torch.ones_like(self.skip_scale)

    def target_stats(self, source_stats):
        return (
            torch.zeros((), device=self.target_scale.device),
            self.target_scale,
            self.target_scale,
        )

    def forward(self, x_source: torch.Tensor, x_target: torch.Tensor) -> dict[str, torch.Tensor]:
        if x_source.shape[:-1] != x_target.shape[:-1]:
            raise ValueError(
                f"x_source has {tuple(x_source.shape[:-1])} rows but x_target has "
                f"{tuple(x_target.shape[:-1])}; pass the activations of the same tokens."
            )
        return self.compute_outputs(x_source, x_target)

    @torch.no_grad()
    def initialize_b_dec(self, target: torch.Tensor) -> None:
        """Set the target scale (if input_unit_norm: the RMS of the centred target, rounded to a
        power of two, so that an export can fold it into the decoder without rounding a single
        weight) and b_dec to the target's mean."""
        y = target.reshape(-1, self.d_out).float()
        if self.cfg["input_unit_norm"]:
            self.target_scale.copy_(power_of_two_rms(y - y.mean(dim=0)))
        self.b_dec.copy_(self.to_units(y, self.target_stats(None)).mean(dim=0))

    @torch.no_grad()
    def initialize_from_batch(self, source: torch.Tensor, target: torch.Tensor) -> None:
        """From a first batch: the target's scale and b_dec (`initialize_b_dec`), the source's
        mean (in normalised units), the skip path's shift and scale, the decoder
        (`initialize_decoder_from_batch`) and the encoder's bias
        (`initialize_encoder_bias_from_batch`)."""
        source = source.reshape(-1, self.d_in)
        self.initialize_b_dec(target)
        self.source_mean.copy_(self.normalize_source(source)[0].mean(dim=0))
        self.initialize_skip_path(source)
        self.initialize_decoder_from_batch(source, target)
        self.initialize_encoder_bias_from_batch(source, target)

    @torch.no_grad()
    def initialize_skip_path(self, source: torch.Tensor) -> None:
        """skip_shift = the mean of a batch of sources [B, d_in], skip_scale = the RMS of the centred
        batch rounded to a power of two (1 without input_unit_norm). Nothing without a skip path."""
        if self.W_skip is None:
            return
        source = source.reshape(-1, self.d_in).float()
        self.skip_shift.copy_(source.mean(dim=0))
        if self.cfg["input_unit_norm"]:
            self.skip_scale.copy_(power_of_two_rms(source - self.skip_shift))

    @torch.no_grad()
    def initialize_decoder_from_batch(self, source: torch.Tensor, target: torch.Tensor) -> None:
        """Point each latent's decoder row where the targets of the tokens it fires on lie:
            W_dec[i] = normalise(sum_{b: z_bi > 0} z_bi (y_b / scale - b_dec)),
        the direction of the first gradient step from a zero decoder (the published transcoder
        initialisation); latents that do not fire on the batch keep their random row. Call after
        `initialize_b_dec`."""
        code, values, y_n = self._first_code(source, target)
        pull = torch.zeros_like(self.W_dec).index_add_(
            0, code.latents, values[:, None] * y_n[code.rows]
        )
        norms = pull.norm(dim=1, keepdim=True)
        self.W_dec.copy_(torch.where(norms > 0, pull / norms.clamp(min=STD_EPS), self.W_dec))

    @torch.no_grad()
    def initialize_encoder_bias_from_batch(
        self, source: torch.Tensor, target: torch.Tensor
    ) -> None:
        """Lower every pre-activation by the one shift c that fits the batch's first predictions
        to its targets in the training loss (mean over the prefixes g):
            c = sum_g <P_g - y_n, Q_g> / sum_g |Q_g|^2,   b_enc <- b_enc - c,
        with P_g = sum z_bi W_dec[i] and Q_g = sum W_dec[i] over the latents i < m_g that BatchTopK
        keeps for token b, y_n the target after b_dec; c is clamped to [0, the smallest kept z] so
        that every kept latent stays non-negative. Call after `initialize_decoder_from_batch`.

        Why: aimed decoder rows share the target's main directions, so k unit rows at strengths
        ~2 add up to several times the target (FVU 3.8 at k = 32 and 12 at k = 64 on SmolLM2's
        layer 8), which training at lr 3e-4 takes hundreds of steps to undo. One shift for all
        latents keeps BatchTopK's selection (it ranks pre-activations) and the encoder's scale
        (a smaller encoder would make Adam's steps relatively larger and kill latents)."""
        code, values, y_n = self._first_code(source, target)
        if values.numel() == 0:
            return
        group = torch.bucketize(code.latents, self.group_ends, right=True)
        fit, size = torch.zeros_like(y_n), torch.zeros_like(y_n)  # P_g and Q_g, prefix by prefix
        numerator = denominator = values.new_zeros(())
        for g in range(len(self.group_ends)):
            in_group = group == g
            rows, rows_of_decoder = code.rows[in_group], self.W_dec[code.latents[in_group]]
            fit.index_add_(0, rows, values[in_group, None] * rows_of_decoder)
            size.index_add_(0, rows, rows_of_decoder)
            numerator = numerator + ((fit - y_n) * size).sum()
            denominator = denominator + size.pow(2).sum()
        shift = (numerator / denominator.clamp(min=STD_EPS)).clamp(min=0).minimum(values.min())
        self.b_enc.sub_(shift)

    def _first_code(self, source: torch.Tensor, target: torch.Tensor):
        """The batch's BatchTopK code (this batch alone, on every rank), its values z [N] and
        the targets after b_dec y_n [B, d_out], for the initialisation."""
        x_c = self.center(self.normalize_source(source.reshape(-1, self.d_in))[0])
        pre = self.preactivations(x_c)
        per_token = self.cfg["transcoder_selection"] == "topk"
        code = (select_topk if per_token else select_batch_topk)(pre, self.cfg["top_k"])
        y_n = self.to_units(target.reshape(-1, self.d_out), self.target_stats(None)) - self.b_dec
        return code, pre[code.rows, code.latents], y_n


# ---------------------------------------------------------------------------------------------
# Dense codes: ReLU and JumpReLU
# ---------------------------------------------------------------------------------------------


def firing_thresholds(pre: torch.Tensor, rate: float) -> torch.Tensor:
    """[S]: for each latent (column of pre [B, S]) a value that exactly k = rate x B of its B
    pre-activations exceed: the midpoint of its k-th and (k+1)-th largest."""
    k = min(pre.shape[0] - 1, max(1, round(rate * pre.shape[0])))
    kth, next_one = pre.topk(k + 1, dim=0).values[-2:]
    return (kth + next_one) / 2


class DenseCodeSAE(BaseAutoencoder):
    """Shared by the SAEs whose codes are formed densely (every latent may fire).

    A sparsity coefficient may be warmed up: multiplied by min(1, (t + 1) / warmup_steps) at
    training step t, so that the dictionary first learns to reconstruct. `steps_trained` counts the
    training forward passes (a buffer saved with the weights, so a resumed run continues the ramp);
    it exists only when a warm-up or an adaptive coefficient needs it, so a cfg without either (as
    `config.FORMAT_UPGRADES` gives files of format 0) has the weights such files hold.
    """

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        if self.counts_steps():
            self.register_buffer(
                "steps_trained", torch.zeros((), dtype=torch.long, device=cfg["device"])
            )

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sparsity_loss(self, pre: torch.Tensor, acts: torch.Tensor, x_c: torch.Tensor):
        """Return (l1_loss, sparsity_loss) for the batch (x_c: the centred inputs [B, d_in])."""
        raise NotImplementedError

    def warmup_steps(self) -> int:
        """Training steps over which the sparsity coefficient ramps up linearly (0: none)."""
        return 0

    def counts_steps(self) -> bool:
        return self.warmup_steps() > 0

    def initial_firing_rate(self) -> float:
        """The rate at which data-driven initialisation makes each latent fire on the first batch."""
        return (self.cfg["target_l0"] or self.cfg["top_k"]) / self.dict_size

    @torch.no_grad()
    def firing_quantiles(self, target: torch.Tensor) -> torch.Tensor:
        """[S]: for each latent, a pre-activation (bias included) that exactly k = rate x B of the
        batch `target` [B, d_in] exceed, rate = `initial_firing_rate()`: the midpoint of its k-th and
        (k+1)-th largest. Call after b_dec was set from the batch."""
        x_n, _ = self.normalize_source(target.reshape(-1, self.d_in))
        return firing_thresholds(self.preactivations(self.center(x_n)), self.initial_firing_rate())

    def warmup(self) -> torch.Tensor | float:
        """The sparsity coefficient's factor at this step, min(1, (t + 1) / warmup_steps)."""
        if self.warmup_steps() == 0:
            return 1.0
        return ((self.steps_trained + 1).float() / self.warmup_steps()).clamp(max=1.0)

    def _feature_acts(self, x_c: torch.Tensor) -> torch.Tensor:
        return self.activation(self.preactivations(x_c))

    def _code_and_prefixes(
        self, x_c: torch.Tensor, y_n: torch.Tensor | None = None, x: torch.Tensor | None = None
    ):
        pre = self.preactivations(x_c)
        acts = self.activation(pre)
        prefixes = self.decode(acts).unsqueeze(1)
        if y_n is None:
            return prefixes, None
        l1_norm = acts.sum(dim=-1).mean()
        l1_loss, sparsity_loss = self.sparsity_loss(pre, acts, x_c)
        active = acts > 0
        l0_norm = active.float().sum(dim=-1).mean()
        if (
            self.training
        ):  # under torchrun, the whole batch's L0: the mean of the ranks' (equal batches)
            self._after_training_batch(
                distributed.mean_over_ranks(l0_norm.detach(), self.batch_group())
            )
        return prefixes, {
            "l1_norm": l1_norm.detach(),
            "l1_loss": l1_loss,
            "sparsity_loss": sparsity_loss,
            "l0_norm": l0_norm,
            "aux_loss": torch.zeros((), device=x_c.device),
            "fired": active.any(dim=0),
            "feature_acts": acts.detach(),
        }

    @torch.no_grad()
    def _after_training_batch(self, l0_norm: torch.Tensor) -> None:
        if self.counts_steps():
            self.steps_trained.add_(1)


class VanillaSAE(DenseCodeSAE):
    """ReLU SAE. Loss: mean((x_hat - x)^2) + w_t * lambda * mean_b sum_i z_bi, decoder rows unit norm.

    lambda = cfg["l1_coeff"] x sigma, where sigma = sqrt(mean_b ||x_c||^2 / d) is the RMS per
    dimension of the batch's centred inputs x_c = x - b_dec (detached; sigma = 1 when
    cfg["l1_coeff_relative"] is off, as in files of format 0). The default l1_coeff = 4 / d comes
    from the units: the projection of x_c onto a unit direction unrelated to it is about
    N(0, sigma^2), so chance overlap has standard deviation sigma whatever d. For one latent
    explaining a coefficient c, the loss (z - c)^2 / d + lambda z is least at z = c - lambda d / 2:
    the L1 term acts as a bias of lambda d / 2 on the latent, and lambda = 4 sigma / d puts it at
    two standard deviations of chance overlap, so a latent fires only where it explains clearly
    more than chance. (Per-token standardised inputs have ||x||^2 = d, so sigma <= 1, and sigma is
    well below 1 when the inputs share a large mean, as residual streams do. On a planted
    dictionary with 4 active directions of 256 in 64 dimensions, 2 / d leaves L0 at 8 and 4 / d at
    4.6.) w_t is the warm-up over cfg["l1_warmup_steps"] steps (Anthropic's "Circuits Updates,
    April 2024" warms lambda up over the first 5% of training). b_enc starts from data (see
    `initialize_b_dec`).

    With cfg["target_l0"] set, lambda adapts instead (a buffer `adaptive_l1_coeff`, starting at
    l1_coeff): after every training batch lambda <- lambda * exp(r * clip(L0 / target - 1, -1, 1)),
    r = L1_ADAPT_RATE, an integral controller whose only fixed point is a mean L0 equal to the
    target (no warm-up then: the controller starts from the dense side on its own).
    """

    L1_ADAPT_RATE = 0.01  # per step: e^1 in 100 steps at the clip

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        if self.cfg["target_l0"] is not None:
            self.register_buffer(
                "adaptive_l1_coeff", torch.tensor(float(cfg["l1_coeff"]), device=cfg["device"])
            )

    def warmup_steps(self) -> int:
        return 0 if self.cfg["target_l0"] is not None else self.cfg["l1_warmup_steps"]

    @torch.no_grad()
    def initialize_b_dec(self, target: torch.Tensor) -> None:
        """b_dec from the batch's mean, then b_enc: cfg["relu_bias_init"], or with None each latent's
        `firing_quantiles` negated, so that training starts at the intended L0 rather than with
        half the dictionary firing (files of format 0: b_enc = 0)."""
        super().initialize_b_dec(target)
        bias = self.cfg["relu_bias_init"]
        if bias is None:
            self.b_enc.copy_(-self.firing_quantiles(target))
        else:
            self.b_enc.fill_(bias)

    def l1_coeff(self, x_c: torch.Tensor) -> torch.Tensor | float:
        """lambda for the batch of centred inputs x_c [B, d_in] (see the class docstring)."""
        if self.cfg["target_l0"] is not None:
            return self.adaptive_l1_coeff.clone()  # the buffer is updated before backward
        coeff = self.cfg["l1_coeff"] * self.warmup()
        if self.cfg["l1_coeff_relative"]:
            coeff = coeff * x_c.detach().pow(2).mean().sqrt()
        return coeff

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return F.relu(pre)

    def sparsity_loss(self, pre, acts, x_c):
        l1_loss = self.l1_coeff(x_c) * acts.sum(dim=-1).mean()
        return l1_loss, l1_loss

    @torch.no_grad()
    def _after_training_batch(self, l0_norm: torch.Tensor) -> None:
        super()._after_training_batch(l0_norm)
        target = self.cfg["target_l0"]
        if target is not None:
            error = (l0_norm / target - 1).clamp(-1.0, 1.0)
            self.adaptive_l1_coeff.mul_(torch.exp(self.L1_ADAPT_RATE * error))


# JumpReLU's pieces, shared by JumpReLUSAE and the cross-layer transcoder's "jumprelu" sparsity: one
# threshold theta_i = exp(log_threshold_i) a latent, learned through straight-through estimators
# (_JumpReLU, _Step) over the window `jumprelu_bandwidth`, in a parameter group of its own.


def initial_log_thresholds(cfg: dict, size: int) -> torch.Tensor:
    """log theta [size] before any data: cfg["jumprelu_threshold_init"], or 1 until the first batch."""
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


class JumpReLUSAE(DenseCodeSAE):
    """JumpReLU SAE: z = pre * H(pre - theta), one threshold theta_i = exp(log_threshold_i) a latent.

    With L0 = mean_b sum_i H(pre_bi - theta_i), the loss is mean((x_hat - x)^2) plus the sparsity
    objective cfg["jumprelu_objective"] (lambda = cfg["l0_coeff"], w_t the warm-up over
    cfg["l0_warmup_steps"] steps):

      "step"       lambda w_t L0
                   (Rajamanoharan et al. 2024, "Jumping Ahead: Improving Reconstruction Fidelity
                   with JumpReLU Sparse Autoencoders", arXiv:2407.14435; DeepMind's Gemma Scope)
      "tanh"       lambda w_t mean_b sum_i tanh(c z_bi ||W_dec,i||)
                     + mu mean_b sum_i relu(theta_i - pre_bi) ||W_dec,i||
                   (Anthropic, "Circuits Updates, January 2025": a smooth L0, and a small
                   pre-activation loss on every latent below its threshold, so that none dies;
                   c = cfg["jumprelu_tanh_scale"], mu = cfg["pre_act_coeff"]; ||W_dec,i|| = 1 here)
      "quadratic"  lambda (L0 / T - 1)^2,  T = cfg["target_l0"]
                   (after McDougall et al. 2025, "Gemma Scope 2" technical paper, and SAELens's
                   port of it: a penalty quadratic in the distance of L0 from a target, rather than
                   linear towards 0; our normalisation by T). Its gradient in L0 changes sign at T, so
                   thresholds rise while the mean L0 is above the target and fall while it is below.
                   At equilibrium the reconstruction's pull for one more latent, about theta^2 / d
                   per latent, balances 2 lambda (L0 / T - 1) / T: the mean L0 settles within
                   T theta^2 / (2 lambda d) of T, a few percent with lambda = 1 in standardised
                   units, where T theta^2 / d is below the share of variance of T latents.

    Gradients: theta learns only through straight-through estimators (`_JumpReLU`, `_Step`) with a
    rectangle kernel of width eps_i = cfg["bandwidth"] if set, else
    cfg["jumprelu_relative_bandwidth"] x theta_i, a window that scales with the threshold and so
    with the pre-activations whatever the units. Each objective is written so that the threshold's
    estimate is the derivative of the objective with H smoothed over that window; the tanh penalty
    as tanh(c pre) H(pre - theta), equal to tanh(c z) because tanh(0) = 0. Autograd carries the
    gradient from theta to log_threshold (the factor theta of the chain rule).

    Thresholds from data: unless cfg["jumprelu_threshold_init"] sets them, `initialize_b_dec` (the
    training loop calls it on the first batch) sets each theta_i to the quantile of latent i's
    pre-activations on that batch above which it fires at the rate (target_l0 or top_k) / dict_size,
    so that training starts at the intended L0. Adam moves log theta by about its lr a step, so a
    threshold travels at most a factor exp(lr x steps) in a run, and the encoder reshapes the
    pre-activations faster than that at the common lr (3e-4): on a planted dictionary the L0 then
    falls to half the target and stays there. log_threshold therefore learns at
    cfg["jumprelu_threshold_lr_scale"] (10) x lr, its own parameter group (`param_groups`).
    """

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        self.log_threshold = nn.Parameter(
            initial_log_thresholds(cfg, self.dict_size).to(cfg["device"])
        )

    @property
    def objective(self) -> str:
        return self.cfg["jumprelu_objective"]

    @property
    def threshold(self) -> torch.Tensor:
        """theta [S], the thresholds in the units of the pre-activations."""
        return self.log_threshold.exp()

    def warmup_steps(self) -> int:
        return 0 if self.objective == "quadratic" else self.cfg["l0_warmup_steps"]

    def param_groups(self) -> list[dict]:
        """log_threshold learns at jumprelu_threshold_lr_scale x lr (a scale of 1: one group)."""
        return log_threshold_param_groups(self, self.cfg["jumprelu_threshold_lr_scale"])

    def bandwidth(self, theta: torch.Tensor) -> torch.Tensor | float:
        """The straight-through window eps: cfg["bandwidth"], or a fraction of each threshold."""
        return jumprelu_bandwidth(self.cfg, theta)

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        theta = self.threshold
        if not (torch.is_grad_enabled() and theta.requires_grad):
            return pre * (pre > theta)
        return _JumpReLU.apply(pre, theta, self.bandwidth(theta))

    def sparsity_loss(self, pre, acts, x_c):
        theta = self.threshold
        return torch.zeros((), device=pre.device), self.sparsity_objective(
            pre, theta, self.bandwidth(theta)
        )

    def sparsity_objective(self, pre: torch.Tensor, theta: torch.Tensor, eps) -> torch.Tensor:
        """The objective of the class docstring for pre-activations pre [B, S] and thresholds theta [S]."""
        cfg = self.cfg
        fires = _Step.apply(pre, theta, eps)  # H(pre - theta) [B, S], gradient to theta only
        if self.objective == "quadratic":  # under torchrun, of the whole batch's L0
            return quadratic_l0_objective(
                cfg, fires.sum(dim=-1).mean(), cfg["target_l0"], self.batch_group()
            )
        if self.objective == "step":
            return cfg["l0_coeff"] * self.warmup() * fires.sum(dim=-1).mean()
        smooth_l0 = (torch.tanh(cfg["jumprelu_tanh_scale"] * pre) * fires).sum(dim=-1).mean()
        pre_act = F.relu(theta - pre).sum(dim=-1).mean()
        return cfg["l0_coeff"] * self.warmup() * smooth_l0 + cfg["pre_act_coeff"] * pre_act

    @torch.no_grad()
    def initialize_b_dec(self, target: torch.Tensor) -> None:
        """b_dec from the batch's mean, then (unless jumprelu_threshold_init is set) each latent's
        threshold at its `firing_quantiles` on the batch."""
        super().initialize_b_dec(target)
        if self.cfg["jumprelu_threshold_init"] is not None:
            return
        self.log_threshold.copy_(log_of_thresholds(self.firing_quantiles(target)))


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


# ---------------------------------------------------------------------------------------------
# Cross-layer transcoders
# ---------------------------------------------------------------------------------------------


class MatryoshkaCrossLayerTranscoder(BaseAutoencoder):
    """A cross-layer transcoder (CLT): latents that read one layer's source and write every later target.

    For the layers j = 0..L-1 of cfg["clt_layers"] (S = cfg["dict_size"] latents each), with x_j the
    source at layer j (e.g. the MLP's normalised input) and y_m the target (its MLP output):
        a_j     = sparsify(x_c,j W_enc^j + b_enc^j)                x_c,j = x_j - source_mean_j
        y_hat_m = sum_{j <= m} a_j W_dec^{j->m} + b_dec^m
    Layout: latent i of layer j is latent g = j S + i of one dictionary of L S latents, so that
    W_enc [d_in, L S], b_enc [L S], the dead-latent counter and `feature_acts` [B, L S] are an SAE's;
    the decoder of layer j is W_dec[j] [S, L - j, d_out] (circuit-tracer's layout), and each latent's
    whole decoder (all its output layers, flattened) has unit norm.

    Units and loss: each target layer m is divided by a fixed scale (the RMS of the centred target on
    the first batch, rounded to a power of two, so that an export folds it exactly) and its squared
    error is divided by its variance v_m in those units (also from the first batch), so that no
    layer dominates because its MLP output is large:
        L_rec = mean_g sum_m mean_{b, d}((y_hat_{g,m} - y_m)^2) / v_m
    over the Matryoshka prefixes g (the first m_g latents of every source layer, cfg["group_sizes"]
    splitting S; one group: a plain CLT), plus aux_penalty x AuxK (the dead latents' top_k_aux
    pre-activations of each token decode the detached residual of every layer, weighted alike).

    Sparsity (cfg["clt_sparsity"]), with k = cfg["top_k"] the mean active latents per token and
    source layer (so k L per token in all):
        "global"     BatchTopK over all L S latents of the batch: k L B entries, wherever they lie;
        "per_layer"  BatchTopK within each source layer: k B entries per layer.
    At inference a threshold replaces the selection (BatchTopK's EMA of the smallest kept value):
    one for all layers (global), one per layer (per_layer), in the buffer `threshold` [1 or L].
        "jumprelu"   one learned threshold a latent, theta = exp(log_threshold) [L S] (a parameter;
                     no `threshold` buffer), z = pre * H(pre - theta), in training and at inference
                     alike; trained as JumpReLUSAE's quadratic objective (the module's shared JumpReLU
                     pieces), l0_coeff x (L0 / (T L) - 1)^2 with L0 the active latents a token summed
                     over the layers and T = cfg["target_l0"] per source layer, as k is; theta learns
                     through the straight-through estimators over the window eps (cfg["bandwidth"] or
                     jumprelu_relative_bandwidth x theta), at jumprelu_threshold_lr_scale x lr.
    `inference_thresholds()` gives every latent's threshold [L, S] in all three modes.

    JumpReLU stays sparse: the code holds the entries with pre > theta - eps / 2, not only those
    above theta. The entries just below theta (value 0, adding nothing to the decode) are those whose
    straight-through gradient to theta is not 0: the decode's backward gives each entry's value its
    gradient, _JumpReLU turns the zero-valued entries' into theta's, and _Step over the same entries
    gives the L0 term's. Every entry the dense JumpReLUSAE would differentiate is in the code, and
    none else (a test checks loss and gradients against a dense reference). At inference the code is
    pre > theta alone. Thresholds start from the first batch: each latent's firing quantile, so that
    it fires at the rate target_l0 / S (`firing_thresholds`), then the shift and factor of the
    initialisation applied to theta as to the pre-activations (theta <- alpha (theta - c), the shift
    bounded by half the smallest theta), so that they keep the first batch's code.

    Memory: the decode never forms [B, S, L, d]: each source layer's active latents are summed
    with sparse_ops' sparse decode against W_dec[j] viewed as [S, (L - j) d], one row per latent,
    into the [B, G, L, d] prefix partial sums (cost N (L - j) d for N active entries).

    forward(*activations): the L sources, then the L targets, each [..., d] (the training loop's
    order, `activation_store.dictionary_hooks`); `compute_outputs(sources, targets)` takes them
    stacked [..., L, d]. Outputs: the contract's keys with sae_out [..., L, d_out] and
    feature_acts [..., L S]; fvu is the mean over layers of each layer's FVU, each also as
    fvu_layer_{layer}, with fvu_layer_min / fvu_layer_max; l0_layer_{layer} the mean active
    latents of each source layer; with several groups fvu_min / fvu_max / fvu_mean /
    fvu_per_prefix over the prefixes (each prefix's mean over layers).
    """

    ties_encoder_to_decoder = False

    def __init__(self, cfg: dict):
        layers, size = list(cfg["clt_layers"]), cfg["dict_size"]
        if cfg["input_unit_norm"]:
            raise ValueError(
                "A cross-layer transcoder reads its sources without per-token standardisation; set "
                "cfg['input_unit_norm'] = False (its targets are scaled per layer instead)."
            )
        super().__init__(
            {**cfg, "dict_size": len(layers) * size},
            d_in=cfg["source_act_size"],
            d_out=cfg["target_act_size"],
        )
        self.cfg = cfg
        self.layers, self.n_layers, self.layer_size = layers, len(layers), size
        n, device = self.n_layers, cfg["device"]
        del self.W_dec, self.b_dec
        generator = torch.Generator().manual_seed(cfg["seed"] + 1)
        decoders = [torch.randn(size, n - j, self.d_out, generator=generator) for j in range(n)]
        self.W_dec = nn.ParameterList(
            [nn.Parameter(w / w.flatten(1).norm(dim=1)[:, None, None]) for w in decoders]
        )
        self.b_dec = nn.Parameter(torch.zeros(n, self.d_out))
        self.register_buffer("source_mean", torch.zeros(n, self.d_in))
        self.register_buffer("target_scale", torch.ones(n))
        self.register_buffer("target_variance", torch.ones(n))
        if self.jumprelu:  # theta, one a latent (a checkpoint of the BatchTopK modes has none)
            self.log_threshold = nn.Parameter(initial_log_thresholds(cfg, self.dict_size))
        else:
            n_thresholds = n if cfg["clt_sparsity"] == "per_layer" else 1
            self.register_buffer(
                "threshold", torch.full((n_thresholds,), -1.0)
            )  # -1: not learned yet
        self.register_buffer(
            "group_ends", torch.tensor(cfg["group_sizes"]).cumsum(0), persistent=False
        )
        self.to(device)

    @property
    def jumprelu(self) -> bool:
        """Learned per-latent thresholds (clt_sparsity "jumprelu") rather than BatchTopK."""
        return self.cfg["clt_sparsity"] == "jumprelu"

    # -- units and the encoder ----------------------------------------------------------------

    def center(self, x_n: torch.Tensor) -> torch.Tensor:
        return x_n - self.source_mean

    def _stack(self, activations, what: str) -> torch.Tensor:
        if len(activations) != self.n_layers:
            raise ValueError(
                f"This cross-layer transcoder reads layers {self.layers}: pass {self.n_layers} {what}, "
                f"got {len(activations)}."
            )
        return torch.stack([x.float() for x in activations], dim=-2)

    def _check_stacked(self, x: torch.Tensor, width: int, what: str) -> torch.Tensor:
        """x [..., L, width] -> [N, L, width] float32."""
        if x.dim() < 2 or tuple(x.shape[-2:]) != (self.n_layers, width):
            raise ValueError(
                f"{what} must be [..., {self.n_layers}, {width}] (layers {self.layers}); got "
                f"{tuple(x.shape)}."
            )
        return x.reshape(-1, self.n_layers, width).float()

    def preactivations(self, x_c: torch.Tensor) -> torch.Tensor:
        """pre [B, L S], block j = x_c[:, j] W_enc[:, block j] + b_enc[block j], from x_c [B, L, d_in]
        (the matmuls in cfg["dtype"], the result float32)."""
        S, dtype = self.layer_size, self.cfg["dtype"]
        pre = x_c.new_empty(x_c.shape[0], self.dict_size, dtype=torch.float32)
        with torch.autocast(x_c.device.type, enabled=False):
            for j in range(self.n_layers):
                block = slice(j * S, (j + 1) * S)
                x, W, b = x_c[:, j], self.W_enc[:, block], self.b_enc[block]
                if dtype == torch.float32:
                    pre[:, block] = torch.addmm(b, x, W)
                else:
                    pre[:, block] = torch.addmm(b.to(dtype), x.to(dtype), W.to(dtype)).float()
        return pre

    def select(self, pre: torch.Tensor) -> SparseCode:
        """The active (token, latent) entries of pre [B, L S]: see the class docstring."""
        return self._select(pre, self.training, self.batch_group())

    def _select(self, pre: torch.Tensor, of_batch: bool, group) -> SparseCode:
        """BatchTopK (over the ranks of `group`) if `of_batch` or no threshold is learned yet, else
        the thresholds; jumprelu: pre > theta."""
        if self.jumprelu:
            return select_above_threshold(pre, self.log_threshold.detach().exp())
        k = self.cfg["top_k"]
        if self.cfg["clt_sparsity"] == "global":
            return self._select_block(pre, k * self.n_layers, self.threshold[0], of_batch, group)
        S, codes = self.layer_size, []
        for j in range(self.n_layers):
            codes.append(
                self._select_block(
                    pre[:, j * S : (j + 1) * S], k, self.threshold[j], of_batch, group
                )
            )
        rows = torch.cat([code.rows for code in codes])
        latents = torch.cat([code.latents + j * S for j, code in enumerate(codes)])
        order = torch.argsort(rows * self.dict_size + latents)
        return SparseCode.from_indices(rows[order], latents[order], pre.shape[0], self.dict_size)

    @staticmethod
    def _select_block(
        pre: torch.Tensor, k: int, threshold: torch.Tensor, of_batch: bool, group
    ) -> SparseCode:
        if of_batch or threshold.item() < 0:
            return select_batch_topk(pre, k, lower_bound=0.8 * threshold, group=group)
        return select_above_threshold(pre, threshold)

    def sparse_code(self, x_c: torch.Tensor) -> tuple[SparseCode, torch.Tensor]:
        """The active latents of x_c [B, L, d_in] with values differentiable in x_c, W_enc and b_enc
        (gathered: O(N d) backward), and the dense pre-activations [B, L S] (no gradient).
        jumprelu, while the thresholds learn (gradients on): also the entries within eps / 2 below
        theta, at value 0, and the values differentiable in log_threshold too (class docstring)."""
        with torch.no_grad():
            pre = self.preactivations(x_c)
        learning = self._thresholds_learn()
        code = self._jumprelu_window(pre) if learning else self.select(pre)
        # Each entry reads its own layer's source: row b L + j of x_c viewed as [B L, d_in].
        reading = SparseCode.from_indices(
            code.rows * self.n_layers + code.latents // self.layer_size,
            code.latents,
            x_c.shape[0] * self.n_layers,
            self.dict_size,
        )
        values = gather_preactivations(
            x_c.reshape(-1, self.d_in),
            self.W_enc,
            self.b_enc,
            pre[code.rows, code.latents],
            reading,
        )
        if (
            learning
        ):  # entry-wise [1, N] against thresholds [N]: _JumpReLU's backward sums over dim 0
            theta, eps = self._entry_thresholds(code)
            values = _JumpReLU.apply(values[None], theta, eps)[0]
        return code.with_values(values), pre

    def _thresholds_learn(self) -> bool:
        return self.jumprelu and torch.is_grad_enabled() and self.log_threshold.requires_grad

    def _jumprelu_window(self, pre: torch.Tensor) -> SparseCode:
        """The entries of pre [B, L S] above theta - eps / 2: those above theta and those whose
        straight-through gradient to theta is not 0."""
        theta = self.log_threshold.detach().exp()
        rows, latents = (pre > theta - jumprelu_bandwidth(self.cfg, theta) / 2).nonzero(
            as_tuple=True
        )
        return SparseCode.from_indices(rows, latents, pre.shape[0], self.dict_size)

    def _entry_thresholds(self, code: SparseCode):
        """theta of each entry's latent [N] (differentiable in log_threshold) and the window eps (a
        number, or [N])."""
        theta = self.log_threshold.exp()
        eps = jumprelu_bandwidth(self.cfg, theta)
        return theta[code.latents], (eps[code.latents] if torch.is_tensor(eps) else eps)

    @torch.no_grad()
    def inference_thresholds(self) -> torch.Tensor:
        """[L, S]: at inference latent i of layer j fires where its pre-activation exceeds row j's
        entry i (and 0): theta (jumprelu), or BatchTopK's threshold of every layer (global) or of
        each (per_layer), negative while none is learned yet."""
        if self.jumprelu:
            return self.log_threshold.exp().view(self.n_layers, self.layer_size)
        return self.threshold.view(-1, 1).expand(self.n_layers, self.layer_size)

    # -- the decoder ----------------------------------------------------------------------------

    def decode_groups(
        self, code: SparseCode, group_ends: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Per-group partial decodes [B, G, L, d_out] of a code over the L S latents (values set), in
        the scaled target units, without b_dec: entry (b, g, m) sums a_{b,j,i} W_dec[j][i, m - j] over
        the source layers j <= m and the latents i of group g (`group_ends`, default the cfg's)."""
        group_ends = self.group_ends if group_ends is None else group_ends
        S = self.layer_size
        layer_of_entry = code.latents // S
        codes = []
        for j in range(self.n_layers):
            entries = (layer_of_entry == j).nonzero().squeeze(1)  # still sorted by (row, latent)
            layer_code = SparseCode.from_indices(
                code.rows[entries], code.latents[entries] - j * S, code.batch_size, S
            )
            codes.append((layer_code.with_values(code.values[entries]), j))
        return sparse_decode_cross_layer(codes, list(self.W_dec), group_ends, self.n_layers)

    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        """Predictions [B, L, d_out] in the scaled target units from dense feature_acts [B, L S]
        (`reconstruct` gives them in the target's own units)."""
        z = feature_acts.reshape(-1, self.dict_size).float()
        rows, latents = z.nonzero(as_tuple=True)
        code = SparseCode.from_indices(rows, latents, z.shape[0], self.dict_size).with_values(
            z[rows, latents]
        )
        return self.decode_groups(code, self.group_ends[-1:]).squeeze(1) + self.b_dec

    def encode(self, sources: torch.Tensor) -> torch.Tensor:
        """Feature activations [..., L S] of sources [..., L, d_in] (no gradient)."""
        x = self._check_stacked(sources, self.d_in, "sources")
        with torch.no_grad():
            code, _ = self.sparse_code(self.center(self.normalize_source(x)[0]))
            return code.to_dense().reshape(*sources.shape[:-2], self.dict_size)

    def _prefixes(self, sources: torch.Tensor):
        x = self._check_stacked(sources, self.d_in, "sources")
        code, _ = self.sparse_code(self.center(self.normalize_source(x)[0]))
        return self.decode_groups(code).cumsum(dim=1) + self.b_dec, None

    @torch.no_grad()
    def layer_contributions(self, j: int, x: torch.Tensor) -> torch.Tensor:
        """What the latents of source layer j write to the outputs j..L-1, in the targets' units,
        [N, L - j, d_out], for sources x [..., d_in] of that layer alone, at inference (thresholds):
        the replacement of a forward pass, where later sources depend on earlier predictions.
        `reconstruct` is sum_{j <= m} of these plus b_dec_m x target_scale_m."""
        S, block = self.layer_size, slice(j * self.layer_size, (j + 1) * self.layer_size)
        threshold = self.inference_thresholds()[j]
        if (threshold < 0).any():
            raise ValueError(
                "This cross-layer transcoder has no inference threshold yet (it was not trained); "
                "train it first."
            )
        x_c = self.normalize_source(x.reshape(-1, self.d_in))[0] - self.source_mean[j]
        pre = torch.addmm(self.b_enc[block], x_c, self.W_enc[:, block])
        code = select_above_threshold(pre, threshold)
        code = code.with_values(pre[code.rows, code.latents])
        out = sparse_decode(code, self.W_dec[j].view(S, -1)).view(-1, self.n_layers - j, self.d_out)
        return out * self.target_scale[j:, None]

    def reconstruct(self, sources: torch.Tensor) -> torch.Tensor:
        """Predictions of every target layer [..., L, d_out] in the targets' units."""
        prefixes, _ = self._prefixes(sources)
        return (prefixes[:, -1] * self.target_scale[:, None]).reshape(
            *sources.shape[:-2], self.n_layers, self.d_out
        )

    def reconstruct_prefixes(self, sources: torch.Tensor) -> torch.Tensor:
        """Predictions from each nested prefix [..., G, L, d_out] in the targets' units."""
        prefixes, _ = self._prefixes(sources)
        out = prefixes * self.target_scale[:, None]
        return out.reshape(*sources.shape[:-2], *out.shape[1:])

    # -- the loss ---------------------------------------------------------------------------------

    def forward(self, *activations: torch.Tensor) -> dict[str, torch.Tensor]:
        n = self.n_layers
        return self.compute_outputs(
            self._stack(activations[:n], "sources"), self._stack(activations[n:], "targets")
        )

    def _weighted_error(self, squared_error: torch.Tensor) -> torch.Tensor:
        """sum_m mean_{b,d}(e^2) / v_m for each leading group: [..., B, L, d] -> [...] (B at dim -3)."""
        return (squared_error.mean(dim=(-3, -1)) / self.target_variance).sum(dim=-1)

    def compute_outputs(
        self, sources: torch.Tensor, targets: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Loss and metrics of one batch: sources and targets [..., L, d] (leading dims are tokens)."""
        leading = sources.shape[:-2]
        x = self._check_stacked(sources, self.d_in, "sources")
        y = self._check_stacked(targets, self.d_out, "targets")
        if x.shape[0] != y.shape[0]:
            raise ValueError(
                f"sources have {x.shape[0]} tokens but targets {y.shape[0]}; pass the activations of "
                f"the same tokens."
            )
        x_c = self.center(self.normalize_source(x)[0])
        scale = self.target_scale[:, None]
        y_n = y / scale
        code, pre = self.sparse_code(x_c)
        prefixes = self.decode_groups(code).cumsum(dim=1) + self.b_dec  # [B, G, L, d]
        squared_error = (prefixes - y_n.unsqueeze(1)).pow(2)
        l2_per_prefix = self._weighted_error(squared_error.transpose(0, 1))  # [G]
        l2_loss = l2_per_prefix.mean()
        residual = (y_n - prefixes[:, -1]).detach()
        aux_loss = self.auxk_loss(x_c, pre, residual)
        active = code.latents[code.values.detach() > 0]  # (jumprelu's window entries have value 0)
        sparsity_loss = self.sparsity_loss(code, pre) if self.jumprelu else None
        if self.training:
            if not self.jumprelu:
                self._update_threshold(code)
            fired = torch.zeros(self.dict_size, dtype=torch.bool, device=x.device).index_fill_(
                0, active, True
            )
            self._update_dead_counters(fired, x.shape[0])
        with torch.no_grad():  # FVU of every (prefix, layer), in the targets' units
            errors = squared_error.detach().sum(dim=(0, 3)) * scale.squeeze(1).pow(2)  # [G, L]
            total = (y - y.mean(dim=0)).pow(2).sum(dim=(0, 2))
            fvus = torch.where(total > 0, errors / total, torch.full_like(errors, float("nan")))
        l0_per_layer = (
            torch.bincount(active // self.layer_size, minlength=self.n_layers).float() / x.shape[0]
        )
        out = {
            "loss": l2_loss + aux_loss + (0 if sparsity_loss is None else sparsity_loss),
            "l2_loss": l2_loss,
            "l1_loss": torch.zeros((), device=x.device),
            "l1_norm": (code.values.detach().sum() / x.shape[0]),
            "l0_norm": torch.tensor(active.numel() / x.shape[0], device=x.device),
            "aux_loss": aux_loss,
            "fvu": fvus[-1].mean(),
            "fvu_layer_min": fvus[-1].min(),
            "fvu_layer_max": fvus[-1].max(),
            "fvu_layer_mean": fvus[-1].mean(),
            "num_dead_features": self.dead_latents().sum(),
            "sae_out": (prefixes[:, -1].detach() * scale).reshape(
                *leading, self.n_layers, self.d_out
            ),
            "feature_acts": code.to_dense(out=pre).reshape(*leading, self.dict_size),
        }
        if sparsity_loss is not None:
            out["sparsity_loss"] = sparsity_loss
        for j, layer in enumerate(self.layers):
            out[f"fvu_layer_{layer}"] = fvus[-1, j]
            out[f"l0_layer_{layer}"] = l0_per_layer[j]
        if fvus.shape[0] > 1:
            per_prefix = fvus.mean(dim=1)
            out.update(
                fvu_min=per_prefix.min(),
                fvu_max=per_prefix.max(),
                fvu_mean=per_prefix.mean(),
                min_l2_loss=l2_per_prefix.min().detach(),
                max_l2_loss=l2_per_prefix.max().detach(),
                fvu_per_prefix=per_prefix,
            )
        return out

    def sparsity_loss(self, code: SparseCode, pre: torch.Tensor) -> torch.Tensor:
        """jumprelu: JumpReLUSAE's quadratic objective l0_coeff x (L0 / (T L) - 1)^2, L0 the mean
        active latents a token over all layers (under torchrun, of the whole batch), counted by _Step
        on the code's entries (pre [B, L S] read before feature_acts reuses it) so that theta gets
        its straight-through gradient; T = target_l0 per source layer."""
        theta, eps = self._entry_thresholds(code)
        fires = _Step.apply(pre[code.rows, code.latents][None], theta, eps)  # [1, N]
        l0 = fires.sum() / code.batch_size
        return quadratic_l0_objective(
            self.cfg, l0, self.cfg["target_l0"] * self.n_layers, self.batch_group()
        )

    def auxk_loss(
        self, x_c: torch.Tensor, pre: torch.Tensor, residual: torch.Tensor
    ) -> torch.Tensor:
        """aux_penalty x sum_m mean((e_hat_m - e_m)^2) / v_m: e_hat from each token's top_k_aux dead
        latents (of any layer), decoded without b_dec; e the detached residual [B, L, d]. 0 if none."""
        dead = self.dead_latents().nonzero().squeeze(1)
        if dead.numel() == 0 or self.cfg["aux_penalty"] == 0:
            return torch.zeros((), device=x_c.device)
        local = select_topk(pre[:, dead], self.cfg["top_k_aux"])
        code = SparseCode.from_indices(
            local.rows, dead[local.latents], pre.shape[0], self.dict_size
        )
        reading = SparseCode.from_indices(
            code.rows * self.n_layers + code.latents // self.layer_size,
            code.latents,
            x_c.shape[0] * self.n_layers,
            self.dict_size,
        )
        values = gather_preactivations(
            x_c.reshape(-1, self.d_in),
            self.W_enc,
            self.b_enc,
            pre[code.rows, code.latents],
            reading,
        )
        e_hat = self.decode_groups(code.with_values(values), self.group_ends[-1:]).squeeze(1)
        return self.cfg["aux_penalty"] * self._weighted_error((e_hat - residual).pow(2))

    @torch.no_grad()
    def _update_threshold(self, code: SparseCode) -> None:
        """EMA of the smallest kept value: of all layers (global) or of each layer (per_layer)."""
        n = self.threshold.numel()
        block = code.latents // self.layer_size if n > 1 else torch.zeros_like(code.latents)
        smallest = torch.full((n,), float("inf"), device=code.values.device)
        smallest.scatter_reduce_(0, block, code.values.detach(), reduce="amin")
        group = self.batch_group()
        if group is not None:
            smallest = distributed.min_over_ranks(smallest, group)
        rate = self.cfg["threshold_ema_rate"]
        ema = torch.where(
            self.threshold < 0, smallest, (1 - rate) * self.threshold + rate * smallest
        )
        self.threshold.copy_(torch.where(smallest.isfinite(), ema, self.threshold))

    # -- training state and the decoder constraint -------------------------------------------------

    def param_groups(self) -> list[dict]:
        """One group; jumprelu: log_threshold in its own at jumprelu_threshold_lr_scale x lr, as JumpReLUSAE."""
        if self.jumprelu:
            return log_threshold_param_groups(self, self.cfg["jumprelu_threshold_lr_scale"])
        return super().param_groups()

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Per latent, project out of its whole decoder's gradient the component along its decoder."""
        for W in self.W_dec:
            if W.grad is None:
                continue
            w, g = W.view(W.shape[0], -1), W.grad.view(W.shape[0], -1)
            g.sub_((g * w).sum(dim=1, keepdim=True) * w)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Each latent's whole decoder (every output layer, flattened) back to unit norm."""
        for W in self.W_dec:
            W.div_(W.flatten(1).norm(dim=1)[:, None, None])

    @torch.no_grad()
    def initialize_from_batch(self, *activations: torch.Tensor) -> None:
        """From a first batch (sources, then targets, as forward): per layer the source mean, the
        target scale (power-of-two RMS of the centred target), b_dec (the target mean) and the
        target variance in scaled units; then the decoder aimed at the targets of the tokens each
        latent fires on and one shift of every pre-activation fitted to the targets' size, as for
        `MatryoshkaTranscoder` (see its docstring for why), and one factor on the encoder. jumprelu:
        first the thresholds at each latent's firing quantile (unless jumprelu_threshold_init sets
        them), last the shift and factor applied to them too, so that the first batch's code is kept."""
        n = self.n_layers
        x = self._stack(activations[:n], "sources")
        y = self._stack(activations[n:], "targets").reshape(-1, n, self.d_out)
        x = self.normalize_source(x.reshape(-1, n, self.d_in))[0]
        self.source_mean.copy_(x.mean(dim=0))
        centred = y - y.mean(dim=0)
        for j in range(n):
            self.target_scale[j] = power_of_two_rms(centred[:, j])
        y_n = y / self.target_scale[:, None]
        self.b_dec.copy_(y_n.mean(dim=0))
        self.target_variance.copy_((y_n - self.b_dec).pow(2).mean(dim=(0, 2)).clamp(min=STD_EPS))
        if self.jumprelu and self.cfg["jumprelu_threshold_init"] is None:
            rate = self.cfg["target_l0"] / self.layer_size
            self.log_threshold.copy_(
                log_of_thresholds(firing_thresholds(self.preactivations(self.center(x)), rate))
            )
        code = self._first_code(x)
        self._aim_decoder(code, y_n - self.b_dec)
        shift = self._shift_encoder_bias(code, y_n - self.b_dec)
        alpha = self._scale_encoder(code.with_values(code.values - shift), y_n - self.b_dec)
        if self.jumprelu:  # pre -> alpha (pre - c): the same on theta keeps which entries exceed it
            self.log_threshold.copy_(log_of_thresholds(alpha * (self.log_threshold.exp() - shift)))

    def _first_code(self, x_n: torch.Tensor) -> SparseCode:
        """This batch's selection (this batch alone, on every rank) with its values."""
        x_c = self.center(x_n)
        pre = self.preactivations(x_c)
        code = self._select(pre, of_batch=True, group=None)
        return code.with_values(pre[code.rows, code.latents])

    def _aim_decoder(self, code: SparseCode, targets: torch.Tensor) -> None:
        """W_dec[j][i] = normalise(sum over the tokens b latent (j, i) fires on of z (y_b[j:] - b_dec[j:]))
        for latents that fire; the others keep their random decoder. targets [B, L, d] after b_dec."""
        S, n = self.layer_size, self.n_layers
        layer_of_entry = code.latents // S
        for j in range(n):
            entries = (layer_of_entry == j).nonzero().squeeze(1)
            if entries.numel() == 0:
                continue
            layer_code = SparseCode.from_indices(
                code.rows[entries], code.latents[entries] - j * S, code.batch_size, S
            )
            order = layer_code.by_latent
            table = targets[:, j:].reshape(code.batch_size, -1)
            pull = F.embedding_bag(
                layer_code.rows[order],
                table,
                layer_code.latent_offsets,
                mode="sum",
                per_sample_weights=code.values[entries][order],
            )
            norms = pull.norm(dim=1, keepdim=True)
            W = self.W_dec[j].view(S, -1)
            W.copy_(torch.where(norms > 0, pull / norms.clamp(min=STD_EPS), W))

    def _shift_encoder_bias(self, code: SparseCode, targets: torch.Tensor) -> torch.Tensor | float:
        """b_enc -= c, the one shift of every kept value that best fits the first predictions to the
        targets in the training loss: with P the prefix predictions and Q those of the same entries
        at value 1, c = sum <P - y, Q>_w / sum |Q|^2_w (w = 1 / v_m), clamped to [0, smallest value];
        jumprelu: to [0, half the smallest theta], as theta moves by c too (`initialize_from_batch`),
        and a theta at 0 would have no straight-through window left to learn in (the latent with the
        smallest kept value would keep a floored threshold, firing like a ReLU latent). Returns c."""
        if code.values.numel() == 0:
            return 0.0
        P = self.decode_groups(code).cumsum(dim=1)
        Q = self.decode_groups(code.with_values(torch.ones_like(code.values))).cumsum(dim=1)
        weights = 1 / self.target_variance[:, None]
        numerator = ((P - targets.unsqueeze(1)) * Q * weights).sum()
        denominator = (Q.pow(2) * weights).sum().clamp(min=STD_EPS)
        at_most = self.log_threshold.exp().min() / 2 if self.jumprelu else code.values.min()
        shift = (numerator / denominator).clamp(min=0).minimum(at_most)
        self.b_enc.sub_(shift)
        return shift

    def _scale_encoder(self, code: SparseCode, targets: torch.Tensor) -> torch.Tensor | float:
        """W_enc and b_enc *= alpha = sum <P, y>_w / sum |P|^2_w, clamped to [0.05, 1]: what the shift
        (bounded by the smallest kept value) leaves of the overshoot. A CLT's later targets receive
        the latents of every earlier layer, all aimed at the same main directions: on a planted map
        of 3 layers the shifted first predictions were still ~6x the targets (FVU 8 at the start,
        1.1 with the factor; alpha 0.17). A uniform factor keeps every BatchTopK selection.
        Returns alpha (1 without entries)."""
        if code.values.numel() == 0:
            return 1.0
        P = self.decode_groups(code).cumsum(dim=1)
        weights = 1 / self.target_variance[:, None]
        alpha = (P * targets.unsqueeze(1) * weights).sum() / (P.pow(2) * weights).sum().clamp(
            min=STD_EPS
        )
        alpha = alpha.clamp(0.05, 1.0)
        self.W_enc.mul_(alpha)
        self.b_enc.mul_(alpha)
        return alpha


SAE_CLASSES["matryoshka_clt"] = MatryoshkaCrossLayerTranscoder
