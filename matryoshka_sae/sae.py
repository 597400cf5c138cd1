"""Sparse autoencoders and Matryoshka transcoders: the dictionaries that read one activation.

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

What every dictionary shares (units, dead latents, the decoder's norm, BatchTopK's threshold,
JumpReLU's pieces) is in dictionary.py; the cross-layer transcoder, which reads one activation a
layer, in cross_layer_transcoder.py. `SAE_CLASSES` and `create_sae`, at the end, name them all.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from matryoshka_sae import distributed
from matryoshka_sae.config import compute_fvu
from matryoshka_sae.cross_layer_transcoder import MatryoshkaCrossLayerTranscoder
from matryoshka_sae.dictionary import (
    STD_EPS,
    Dictionary,
    _JumpReLU,
    _Step,
    affine,
    firing_thresholds,
    initial_log_thresholds,
    jumprelu_bandwidth,
    log_of_thresholds,
    log_threshold_param_groups,
    power_of_two_rms,
    quadratic_l0_objective,
    update_inference_threshold,
)
from matryoshka_sae.prefix_loss import prefix_squared_errors
from matryoshka_sae.sparse_ops import (
    SparseCode,
    gather_preactivations,
    select_above_threshold,
    select_batch_topk,
    select_topk,
    sparse_decode,
    sparse_decode_groups,
)


class BaseAutoencoder(Dictionary):
    """One input and one target: parameters, units and the loss dict.

    W_enc [d_in, S], b_enc [S], W_dec [S, d_out] (rows of unit norm), b_dec [d_out];
    dict_size = n_latents = S. Subclasses define `_code_and_partials(x_c, x)` (the code and each
    group's decode) and `_code_info(code, x_c, residual)` (the code's losses and statistics);
    everything else is shared.
    """

    # An SAE reads and writes one space, so its encoder starts as the transpose of its decoder.
    ties_encoder_to_decoder = True

    def __init__(self, cfg: dict, d_in: int | None = None, d_out: int | None = None):
        super().__init__(
            cfg, d_in or cfg["act_size"], d_out or cfg["act_size"], n_latents=cfg["dict_size"]
        )
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
        self.to(cfg["device"])

    def decoder_weights(self) -> list[torch.Tensor]:
        return [self.W_dec]

    # -- units -------------------------------------------------------------------------------

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
        """x_c W_enc + b_enc [B, S] in float32, the matmul in cfg["dtype"] (`affine`)."""
        return affine(x_c, self.W_enc, self.b_enc, self.cfg["dtype"])

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
        partials, dense, _ = self._code_and_partials(self.center(x_n), x)
        return partials.cumsum(dim=1) + dense, self.target_stats(stats)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.compute_outputs(x, x)

    # -- the loss ------------------------------------------------------------------------------

    def _feature_acts(self, x_c: torch.Tensor) -> torch.Tensor:
        """Dense feature activations [B, S] of centred, normalised inputs."""
        raise NotImplementedError

    def _code_and_partials(self, x_c: torch.Tensor, x: torch.Tensor | None = None):
        """(partials [B, G, d_out]: each group's decode of the code of x_c, no bias, in normalised
        units; the dense term every prefix adds, b_dec [d_out] (a skip transcoder: [B, 1, d_out]);
        the code, as `_code_info` reads it). x [B, d_in] is the input in its own units, which only
        a skip transcoder's skip path reads."""
        raise NotImplementedError

    def _code_info(self, code, x_c: torch.Tensor, residual: torch.Tensor) -> dict:
        """The code's losses and statistics for the loss dict (sparsity_loss, l1_loss, l1_norm,
        l0_norm, aux_loss, fired, feature_acts), given residual = y_n - x_hat [B, d_out] (detached);
        in train mode also updates what the code keeps (thresholds)."""
        raise NotImplementedError

    def squared_error_scale(self, y_stats) -> torch.Tensor | float | None:
        """c such that a squared error in the original units is c x the one in normalised units,
        or None when no such constant exists (per-token standardisation: the way back out has no
        eps, so errors do not simply scale)."""
        return 1.0 if y_stats is None else None

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
        x_c = self.center(x_n)
        partials, dense, code = self._code_and_partials(x_c, source)
        # Every prefix's squared error [G] and the whole dictionary's error [B, d_out] (normalised
        # units), in one pass: prefix_loss.py.
        sse, error = prefix_squared_errors(partials, dense.reshape(-1, self.d_out) - y_n)
        info = self._code_info(code, x_c, -error.detach())
        target = target.float()
        l2_per_prefix = sse / y_n.numel()
        l2_loss = l2_per_prefix.mean()
        sae_out = self.restore_target(y_n + error, y_stats)
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
        if partials.shape[1] > 1:
            fvus = self._prefix_fvus(
                sse.detach(), partials.detach(), dense.detach(), target, y_stats
            )
            out.update(
                fvu_min=fvus.min(),
                fvu_max=fvus.max(),
                fvu_mean=fvus.mean(),
                min_l2_loss=l2_per_prefix.min().detach(),
                max_l2_loss=l2_per_prefix.max().detach(),
                fvu_per_prefix=fvus,
            )
        return out

    @torch.no_grad()
    def _prefix_fvus(self, sse, partials, dense, target: torch.Tensor, y_stats) -> torch.Tensor:
        """`compute_fvu` of every prefix [G], from its squared error sse [G] in normalised units
        (`squared_error_scale`), or, where errors do not simply scale, from the prefixes rebuilt
        from partials [B, G, d] and the dense term, restored to the target's units."""
        scale = self.squared_error_scale(y_stats)
        if scale is not None:
            errors = sse * scale
        else:
            prefixes = self.restore_target(partials.cumsum(dim=1) + dense, y_stats)
            errors = (prefixes - target.unsqueeze(1)).pow(2).sum(dim=(0, 2))
        total = (target - target.mean(dim=0)).pow(2).sum()
        return torch.where(total > 0, errors / total, torch.full_like(errors, float("nan")))

    # -- the data-dependent start --------------------------------------------------------------

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

    def _code_and_partials(self, x_c: torch.Tensor, x: torch.Tensor | None = None):
        code, pre = self.sparse_code(x_c)
        partials = sparse_decode_groups(code, self.W_dec, self.group_ends)
        return partials, self.dense_term(x), (code, pre)

    def _code_info(self, code, x_c: torch.Tensor, residual: torch.Tensor) -> dict:
        code, pre = code
        if self.training:
            self._update_threshold(code.values.detach())
        l1_norm = code.values.sum() / code.batch_size
        l1_loss = self.cfg["l1_coeff"] * l1_norm  # an optional extra: 0 by default
        return {
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
        """The threshold's EMA step (`update_inference_threshold`) from the kept values [N]."""
        smallest = values.min() if values.numel() else values.new_tensor(float("inf"))
        rate = self.cfg["threshold_ema_rate"]
        update_inference_threshold(self.threshold, smallest, rate, self.batch_group())


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
    * The source is centred by its mean, a buffer. Left in, a source mean m gives every latent an
      offset m . W_enc[:, i] that Adam moves by about lr x |m| a step; where a few coordinates of
      m are large (as in residual streams), a few latents then win BatchTopK on every token and
      the rest stop firing. An SAE is centred by its b_dec; a transcoder's b_dec lives in the
      target's space, hence a mean of its own.
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

    def squared_error_scale(self, y_stats) -> torch.Tensor:
        """The target is y / target_scale (no shift, no eps): errors scale by target_scale^2."""
        return self.target_scale.pow(2)

    def forward(self, x_source: torch.Tensor, x_target: torch.Tensor) -> dict[str, torch.Tensor]:
        if x_source.shape[:-1] != x_target.shape[:-1]:
            raise ValueError(
                f"x_source has {tuple(x_source.shape[:-1])} rows but x_target has "
                f"{tuple(x_target.shape[:-1])}; pass the activations of the same tokens."
            )
        return self.compute_outputs(x_source, x_target)

    @torch.no_grad()
    def initialize_b_dec(self, target: torch.Tensor) -> None:
        """Set the target scale (if input_unit_norm or transcoder_target_norm: the RMS of the
        centred target, rounded to a power of two, so that an export can fold it into the decoder
        without rounding a single weight) and b_dec to the target's mean."""
        y = target.reshape(-1, self.d_out).float()
        if self.cfg["input_unit_norm"] or self.cfg["transcoder_target_norm"]:
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

        Why: aimed decoder rows share the target's main directions, so the k kept rows, each at
        the strength of its pre-activation, add up along them to a multiple of the target that
        grows with k, an overshoot training would first have to undo. One shift for all latents
        keeps BatchTopK's selection (it ranks pre-activations) and the encoder's scale (a smaller
        encoder would make Adam's steps relatively larger and kill latents)."""
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

    def _code_and_partials(self, x_c: torch.Tensor, x: torch.Tensor | None = None):
        pre = self.preactivations(x_c)
        acts = self.activation(pre)
        return (acts.float() @ self.W_dec).unsqueeze(1), self.b_dec, (pre, acts)

    def _code_info(self, code, x_c: torch.Tensor, residual: torch.Tensor) -> dict:
        pre, acts = code
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
        return {
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
    well below 1 when the inputs share a large mean, as residual streams do.) w_t is the warm-up
    over cfg["l1_warmup_steps"] steps (Anthropic's "Circuits Updates, April 2024" warms lambda up
    over the first 5% of training). b_enc starts from data (see `initialize_b_dec`).

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
    threshold travels at most a factor exp(lr x steps) in a run, while the encoder reshapes the
    pre-activations faster than that at a common lr, and the L0 then drifts from the target.
    log_threshold therefore learns at cfg["jumprelu_threshold_lr_scale"] x lr, its own parameter
    group (`param_groups`).
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


# ---------------------------------------------------------------------------------------------
# Every class, by its cfg["sae_type"]
# ---------------------------------------------------------------------------------------------

SAE_CLASSES: dict[str, type[Dictionary]] = {
    "batchtopk": BatchTopKSAE,
    "topk": TopKSAE,
    "vanilla": VanillaSAE,
    "jumprelu": JumpReLUSAE,
    "matryoshka": GlobalBatchTopKMatryoshkaSAE,
    "matryoshka_transcoder": MatryoshkaTranscoder,
    "matryoshka_clt": MatryoshkaCrossLayerTranscoder,
}


def create_sae(cfg: dict) -> Dictionary:
    """The dictionary class that cfg["sae_type"] names, built from cfg."""
    return SAE_CLASSES[cfg["sae_type"]](cfg)
