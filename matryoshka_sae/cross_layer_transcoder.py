"""The Matryoshka cross-layer transcoder (CLT): latents read one layer and write every later one.

Notation: L source layers j = 0..L-1 (cfg["clt_layers"]), S = cfg["dict_size"] latents a layer
(`latents_per_layer`), L S latents in all (`n_latents`), B tokens; x_j [B, d_in] the source at
layer j (e.g. the MLP's normalised input), y_m [B, d_out] the target at layer m (its MLP output).

    a_j     = sparsify(x_c,j W_enc^j + b_enc^j)               x_c,j = x_j - source_mean_j
    y_hat_m = sum_{j <= m} a_j W_dec^{j->m} + b_dec^m

Layout. Latent i of layer j is latent j S + i of one code of L S latents: W_enc [d_in, L S],
b_enc [L S], `tokens_since_fired` and `feature_acts` [B, L S]. The decoder of layer j is
W_dec[j] [S, L - j, d_out] (circuit-tracer's layout); each latent's whole decoder (all its output
layers, flattened) has unit norm. b_dec [L, d_out].

Units and loss. Target layer m is divided by a fixed scale s_m (the RMS of the centred target on
the first batch, rounded to a power of two, so that an export folds it exactly), and its squared
error by its variance v_m in those units (also from the first batch), so that no layer dominates
because its MLP output is large:
    L_rec = mean_g sum_m mean_{b, d}((y_hat_{g,m} - y_m / s_m)^2) / v_m
over the Matryoshka prefixes g (the first m_g latents of every source layer, cfg["group_sizes"]
splitting S; one group: a plain CLT), plus aux_penalty x AuxK (each token's top_k_aux dead
latents decode the detached residual of every layer, weighted alike).

Sparsity (cfg["clt_sparsity"]), k = cfg["top_k"] active latents a token and source layer:
    "global"     BatchTopK over all L S latents of the batch: k L B entries, wherever they lie;
    "per_layer"  BatchTopK within each source layer: k B entries a layer;
    "jumprelu"   z = pre H(pre - theta), theta = exp(log_threshold) [L S] a parameter, in training
                 and at inference alike; the loss adds JumpReLUSAE's quadratic objective
                 l0_coeff (L0 / (T L) - 1)^2, L0 the active latents a token over all layers,
                 T = cfg["target_l0"] a source layer.
At inference BatchTopK's selection becomes a threshold (the EMA of the smallest kept value), one
for all layers (global) or one a layer (per_layer): the buffer `threshold` [1 or L].
`inference_thresholds()` gives every latent's threshold [L, S] in all three modes.

JumpReLU stays sparse: in training the code holds the entries with pre > theta - eps / 2. Those
below theta have value 0 and add nothing to the decode; they are exactly the entries whose
straight-through gradient to theta is not 0 (the decode's backward gives each entry's value its
gradient, _JumpReLU turns the zero-valued entries' into theta's, _Step gives the L0 term's). At
inference the code is pre > theta alone.

Memory: the decode never forms [B, S, L, d]: each source layer's active latents are summed by
sparse_ops' cross-layer decode into the [B, G, L, d] prefix partial sums, cost N (L - j) d for N
active entries of layer j.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

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
    end_to_end,
    gather_preactivations,
    select_above_threshold,
    select_batch_topk,
    select_topk,
    sparse_decode,
    sparse_decode_cross_layer,
)


class MatryoshkaCrossLayerTranscoder(Dictionary):
    """A Matryoshka CLT over the layers cfg["clt_layers"] (see the module docstring).

    Sizes: `layers` (the model's layers, in order), `n_layers` = L, `latents_per_layer` = S =
    cfg["dict_size"], `n_latents` = L S.

    forward(*activations): the L sources, then the L targets, each [..., d] (the training loop's
    order, `activation_store.dictionary_hooks`); `compute_outputs(sources, targets)` takes them
    stacked [..., L, d]. Outputs: the contract's keys with sae_out [..., L, d_out] and
    feature_acts [..., L S]; fvu is the mean over layers of each layer's FVU, each also as
    fvu_layer_{layer}, with fvu_layer_min / fvu_layer_max / fvu_layer_mean; l0_layer_{layer} the
    mean active latents of each source layer; with several groups fvu_min / fvu_max / fvu_mean /
    fvu_per_prefix over the prefixes (each prefix's mean over layers).
    """

    def __init__(self, cfg: dict):
        if cfg["input_unit_norm"]:
            raise ValueError(
                "A cross-layer transcoder reads its sources without per-token standardisation; set "
                "cfg['input_unit_norm'] = False (its targets are scaled per layer instead)."
            )
        layers, S = list(cfg["clt_layers"]), cfg["dict_size"]
        n = len(layers)
        super().__init__(cfg, cfg["source_act_size"], cfg["target_act_size"], n_latents=n * S)
        self.layers, self.n_layers, self.latents_per_layer = layers, n, S
        # parameters() yields W_enc, b_enc, b_dec, (log_threshold,) then W_dec.0..L-1 (a
        # submodule's come last): the order a saved optimizer state refers to them by.
        self.W_enc = nn.Parameter(self._initial_encoder())
        self.b_enc = nn.Parameter(torch.zeros(self.n_latents))
        self.b_dec = nn.Parameter(torch.zeros(n, self.d_out))
        if self.jumprelu:  # theta, one a latent (a checkpoint of the BatchTopK modes has none)
            self.log_threshold = nn.Parameter(initial_log_thresholds(cfg, self.n_latents))
        self.W_dec = nn.ParameterList(self._initial_decoders())
        self._pack_decoders()
        self.register_buffer("source_mean", torch.zeros(n, self.d_in))
        self.register_buffer("target_scale", torch.ones(n))
        self.register_buffer("target_variance", torch.ones(n))
        if not self.jumprelu:  # -1: not learned yet
            n_thresholds = n if cfg["clt_sparsity"] == "per_layer" else 1
            self.register_buffer("threshold", torch.full((n_thresholds,), -1.0))
        group_ends = torch.tensor(cfg["group_sizes"]).cumsum(0)
        self.register_buffer("group_ends", group_ends, persistent=False)
        self.to(cfg["device"])

    def _initial_encoder(self) -> torch.Tensor:
        """W_enc [d_in, L S]: independent random unit columns (seed cfg["seed"]); sources and
        targets are different spaces, so nothing ties the encoder to the decoder."""
        generator = torch.Generator().manual_seed(self.cfg["seed"])
        W_enc = torch.randn(self.d_in, self.n_latents, generator=generator)
        return W_enc / W_enc.norm(dim=0, keepdim=True)

    def _initial_decoders(self) -> list[nn.Parameter]:
        """W_dec[j] [S, L - j, d_out] for j < L: random, each latent's whole decoder of unit norm
        (seed cfg["seed"] + 1)."""
        S, n = self.latents_per_layer, self.n_layers
        generator = torch.Generator().manual_seed(self.cfg["seed"] + 1)
        decoders = [torch.randn(S, n - j, self.d_out, generator=generator) for j in range(n)]
        return [nn.Parameter(w / w.flatten(1).norm(dim=1)[:, None, None]) for w in decoders]

    def _pack_decoders(self) -> None:
        """Lay the decoders end to end in one tensor, each W_dec[j] a view of it: the decode reads
        them as one [sum_j S (L - j), d_out] table (sparse_decode_cross_layer), which otherwise
        would be copied out of L tensors at every step (1.2 GB for SmolLM2's 30 layers at 1,152
        latents a layer). The parameters stay the same objects; only their storage moves."""
        decoders = list(self.W_dec)
        if end_to_end(decoders):
            return
        packed = torch.cat([w.detach().reshape(-1, self.d_out) for w in decoders])
        start = 0
        for w in decoders:
            rows = w.shape[0] * w.shape[1]
            w.data = packed[start : start + rows].view_as(w)
            start += rows

    def _apply(self, fn, recurse=True):
        """Module.to / .float / .cuda give each parameter its own new tensor: pack them again."""
        result = super()._apply(fn, recurse)
        self._pack_decoders()
        return result

    @property
    def jumprelu(self) -> bool:
        """Learned per-latent thresholds (clt_sparsity "jumprelu") rather than BatchTopK."""
        return self.cfg["clt_sparsity"] == "jumprelu"

    def decoder_weights(self) -> list[torch.Tensor]:
        return list(self.W_dec)

    def param_groups(self) -> list[dict]:
        """One group; jumprelu: log_threshold in its own at jumprelu_threshold_lr_scale x lr."""
        if self.jumprelu:
            return log_threshold_param_groups(self, self.cfg["jumprelu_threshold_lr_scale"])
        return super().param_groups()

    # -- inputs, units and the encoder -----------------------------------------------------------

    def center(self, x_n: torch.Tensor) -> torch.Tensor:
        """x_c [B, L, d_in] = x_n - source_mean."""
        return x_n - self.source_mean

    def _stack(self, activations, what: str) -> torch.Tensor:
        """L activations [..., d] -> [..., L, d] float32."""
        if len(activations) != self.n_layers:
            raise ValueError(
                f"This cross-layer transcoder reads layers {self.layers}: pass "
                f"{self.n_layers} {what}, got {len(activations)}."
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

    def _centred_sources(self, sources: torch.Tensor) -> torch.Tensor:
        """Sources [..., L, d_in] -> x_c [N, L, d_in]."""
        x = self._check_stacked(sources, self.d_in, "sources")
        return self.center(self.normalize_source(x)[0])

    def _block(self, j: int) -> slice:
        """The latents of source layer j in the code of L S latents."""
        S = self.latents_per_layer
        return slice(j * S, (j + 1) * S)

    def preactivations(self, x_c: torch.Tensor) -> torch.Tensor:
        """pre [B, L S] from x_c [B, L, d_in], block by block:
            pre[:, block j] = x_c[:, j] W_enc[:, block j] + b_enc[block j]
        (the matmuls in cfg["dtype"], the result float32: `affine`)."""
        pre = x_c.new_empty(x_c.shape[0], self.n_latents, dtype=torch.float32)
        for j in range(self.n_layers):
            block = self._block(j)
            pre[:, block] = affine(
                x_c[:, j], self.W_enc[:, block], self.b_enc[block], self.cfg["dtype"]
            )
        return pre

    def _reading(self, code: SparseCode, n_tokens: int) -> SparseCode:
        """The code's entries as rows of x_c viewed [B L, d_in]: entry (b, latent of layer j) reads
        row b L + j, its own layer's source."""
        return SparseCode.from_indices(
            code.rows * self.n_layers + code.latents // self.latents_per_layer,
            code.latents,
            n_tokens * self.n_layers,
            self.n_latents,
        )

    def _gathered_values(self, x_c: torch.Tensor, pre: torch.Tensor, code: SparseCode):
        """The pre-activations of the code's entries [N], differentiable in x_c, W_enc and b_enc
        (gathered: O(N d) backward)."""
        return gather_preactivations(
            x_c.reshape(-1, self.d_in),
            self.W_enc,
            self.b_enc,
            pre[code.rows, code.latents],
            self._reading(code, x_c.shape[0]),
        )

    # -- selection ---------------------------------------------------------------------------

    def select(self, pre: torch.Tensor) -> SparseCode:
        """The active (token, latent) entries of pre [B, L S]: see the module docstring."""
        return self._select(pre, self.training, self.batch_group())

    def _select(self, pre: torch.Tensor, of_batch: bool, group) -> SparseCode:
        """BatchTopK (over the ranks of `group`) if `of_batch` or no threshold is learned yet, else
        the thresholds; jumprelu: pre > theta."""
        if self.jumprelu:
            return select_above_threshold(pre, self.log_threshold.detach().exp())
        k = self.cfg["top_k"]
        if self.cfg["clt_sparsity"] == "global":
            return self._select_block(pre, k * self.n_layers, self.threshold[0], of_batch, group)
        S, codes = self.latents_per_layer, []
        for j in range(self.n_layers):
            block = pre[:, self._block(j)]
            codes.append(self._select_block(block, k, self.threshold[j], of_batch, group))
        rows = torch.cat([code.rows for code in codes])
        latents = torch.cat([code.latents + j * S for j, code in enumerate(codes)])
        order = torch.argsort(rows * self.n_latents + latents)
        return SparseCode.from_indices(rows[order], latents[order], pre.shape[0], self.n_latents)

    @staticmethod
    def _select_block(
        pre: torch.Tensor, k: int, threshold: torch.Tensor, of_batch: bool, group
    ) -> SparseCode:
        if of_batch or threshold.item() < 0:
            return select_batch_topk(pre, k, lower_bound=0.8 * threshold, group=group)
        return select_above_threshold(pre, threshold)

    def sparse_code(self, x_c: torch.Tensor) -> tuple[SparseCode, torch.Tensor]:
        """The active latents of x_c [B, L, d_in], with values differentiable in x_c, W_enc and
        b_enc, and the dense pre-activations [B, L S] (no gradient). jumprelu, while the thresholds
        learn (gradients on): also the entries within eps / 2 below theta, at value 0, and the
        values differentiable in log_threshold too (module docstring)."""
        with torch.no_grad():
            pre = self.preactivations(x_c)
        learning = self._thresholds_learn()
        code = self._jumprelu_window(pre) if learning else self.select(pre)
        values = self._gathered_values(x_c, pre, code)
        if learning:
            # entry-wise, [1, N] against thresholds [N]: _JumpReLU's backward sums over dim 0
            theta, eps = self._entry_thresholds(code)
            values = _JumpReLU.apply(values[None], theta, eps)[0]
        return code.with_values(values), pre

    def _thresholds_learn(self) -> bool:
        return self.jumprelu and torch.is_grad_enabled() and self.log_threshold.requires_grad

    def _jumprelu_window(self, pre: torch.Tensor) -> SparseCode:
        """The entries of pre [B, L S] above theta - eps / 2: those above theta and those whose
        straight-through gradient to theta is not 0."""
        theta = self.log_threshold.detach().exp()
        window = pre > theta - jumprelu_bandwidth(self.cfg, theta) / 2
        rows, latents = window.nonzero(as_tuple=True)
        return SparseCode.from_indices(rows, latents, pre.shape[0], self.n_latents)

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
        shape = (self.n_layers, self.latents_per_layer)
        if self.jumprelu:
            return self.log_threshold.exp().view(shape)
        return self.threshold.view(-1, 1).expand(shape)

    # -- the decoder -------------------------------------------------------------------------

    def decode_groups(
        self, code: SparseCode, group_ends: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Per-group partial decodes [B, G, L, d_out] of a code over the L S latents (values set),
        in the scaled target units, without b_dec: entry (b, g, m) sums
            a_{b,j,i} W_dec[j][i, m - j]
        over the source layers j <= m and the latents i of group g (`group_ends`, default the
        cfg's)."""
        group_ends = self.group_ends if group_ends is None else group_ends
        S = self.latents_per_layer
        layer_of_entry = code.latents // S
        codes = []
        for j in range(self.n_layers):
            entries = (layer_of_entry == j).nonzero().squeeze(1)  # still sorted by (row, latent)
            layer_code = SparseCode.from_indices(
                code.rows[entries], code.latents[entries] - j * S, code.batch_size, S
            )
            codes.append((layer_code.with_values(code.values[entries]), j))
        return sparse_decode_cross_layer(codes, list(self.W_dec), group_ends, self.n_layers)

    def _decode_all(self, code: SparseCode) -> torch.Tensor:
        """The whole dictionary's decode [B, L, d_out] of a code, without b_dec."""
        return self.decode_groups(code, self.group_ends[-1:]).squeeze(1)

    # -- public API --------------------------------------------------------------------------

    def encode(self, sources: torch.Tensor) -> torch.Tensor:
        """Feature activations [..., L S] of sources [..., L, d_in] (no gradient)."""
        with torch.no_grad():
            code, _ = self.sparse_code(self._centred_sources(sources))
            return code.to_dense().reshape(*sources.shape[:-2], self.n_latents)

    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        """Predictions [B, L, d_out] in the scaled target units from dense feature_acts [B, L S]
        (`reconstruct` gives them in the target's own units)."""
        z = feature_acts.reshape(-1, self.n_latents).float()
        rows, latents = z.nonzero(as_tuple=True)
        code = SparseCode.from_indices(rows, latents, z.shape[0], self.n_latents)
        return self._decode_all(code.with_values(z[rows, latents])) + self.b_dec

    def _prefixes(self, sources: torch.Tensor) -> torch.Tensor:
        """Prefix predictions [N, G, L, d_out] in the scaled target units."""
        code, _ = self.sparse_code(self._centred_sources(sources))
        return self.decode_groups(code).cumsum(dim=1) + self.b_dec

    def reconstruct(self, sources: torch.Tensor) -> torch.Tensor:
        """Predictions of every target layer [..., L, d_out] in the targets' units."""
        out = self._prefixes(sources)[:, -1] * self.target_scale[:, None]
        return out.reshape(*sources.shape[:-2], self.n_layers, self.d_out)

    def reconstruct_prefixes(self, sources: torch.Tensor) -> torch.Tensor:
        """Predictions from each nested prefix [..., G, L, d_out] in the targets' units."""
        out = self._prefixes(sources) * self.target_scale[:, None]
        return out.reshape(*sources.shape[:-2], *out.shape[1:])

    @torch.no_grad()
    def layer_contributions(self, j: int, x: torch.Tensor) -> torch.Tensor:
        """What the latents of source layer j write to the outputs j..L-1, in the targets' units,
        [N, L - j, d_out], for sources x [..., d_in] of that layer alone, at inference (thresholds):
        the replacement of a forward pass, where later sources depend on earlier predictions.
        `reconstruct` is sum_{j <= m} of these plus b_dec_m x target_scale_m."""
        S, block = self.latents_per_layer, self._block(j)
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

    # -- the loss ----------------------------------------------------------------------------

    def forward(self, *activations: torch.Tensor) -> dict[str, torch.Tensor]:
        n = self.n_layers
        return self.compute_outputs(
            self._stack(activations[:n], "sources"), self._stack(activations[n:], "targets")
        )

    def _weighted_error(self, squared_error: torch.Tensor) -> torch.Tensor:
        """sum_m mean_{b,d}(e^2) / v_m for each leading group: [..., B, L, d] -> [...]."""
        return (squared_error.mean(dim=(-3, -1)) / self.target_variance).sum(dim=-1)

    def compute_outputs(
        self, sources: torch.Tensor, targets: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Loss and metrics of one batch: sources and targets [..., L, d] (leading dims are tokens);
        in train mode also updates the thresholds (BatchTopK) and the dead-latent counters."""
        leading = sources.shape[:-2]
        x = self._check_stacked(sources, self.d_in, "sources")
        y = self._check_stacked(targets, self.d_out, "targets")
        if x.shape[0] != y.shape[0]:
            raise ValueError(
                f"sources have {x.shape[0]} tokens but targets {y.shape[0]}; pass the "
                f"activations of the same tokens."
            )
        x_c = self.center(self.normalize_source(x)[0])
        scale = self.target_scale[:, None]
        y_n = y / scale
        code, pre = self.sparse_code(x_c)
        # Every (prefix, output layer)'s squared error [G, L] and the whole CLT's error [B, L, d],
        # in one pass (prefix_loss.py); the prefixes add b_dec [L, d].
        sse, error = prefix_squared_errors(self.decode_groups(code), self.b_dec - y_n)
        l2_per_prefix = (sse / (x.shape[0] * self.d_out) / self.target_variance).sum(dim=-1)
        residual = -error.detach()
        aux_loss = self.auxk_loss(x_c, pre, residual)
        active = code.latents[code.values.detach() > 0]  # (jumprelu's window entries have value 0)
        sparsity_loss = self.sparsity_loss(code, pre) if self.jumprelu else None
        if self.training:
            self._after_training_batch(code, active, x.shape[0])
        fvus = self._fvus(sse.detach(), y)  # [G, L]
        l2_loss = l2_per_prefix.mean()
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
            "sae_out": ((y_n + error.detach()) * scale).reshape(
                *leading, self.n_layers, self.d_out
            ),
            "feature_acts": code.to_dense(out=pre).reshape(*leading, self.n_latents),
        }
        if sparsity_loss is not None:
            out["sparsity_loss"] = sparsity_loss
        out.update(self._per_layer_metrics(fvus[-1], active, x.shape[0]))
        if fvus.shape[0] > 1:
            out.update(self._prefix_metrics(fvus, l2_per_prefix))
        return out

    @torch.no_grad()
    def _after_training_batch(self, code: SparseCode, active: torch.Tensor, n_tokens: int) -> None:
        """BatchTopK's thresholds (not jumprelu's) and the dead-latent counters, from the batch's
        code and its active latents [N_active]."""
        if not self.jumprelu:
            self._update_threshold(code)
        fired = torch.zeros(self.n_latents, dtype=torch.bool, device=active.device)
        self._update_dead_counters(fired.index_fill_(0, active, True), n_tokens)

    @torch.no_grad()
    def _fvus(self, sse: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """FVU [G, L] of every (prefix, layer) in the targets' units (`compute_fvu` per layer), from
        the squared errors summed over tokens and dimensions [G, L] in scaled units and the
        targets y [B, L, d]."""
        errors = sse * self.target_scale.pow(2)
        total = (y - y.mean(dim=0)).pow(2).sum(dim=(0, 2))
        return torch.where(total > 0, errors / total, torch.full_like(errors, float("nan")))

    def _per_layer_metrics(self, fvus: torch.Tensor, active: torch.Tensor, n_tokens: int) -> dict:
        """fvu_layer_{layer} and l0_layer_{layer} of each layer, from the whole dictionary's FVU
        per layer [L] and the latents of the active entries [N_active]."""
        entries = torch.bincount(active // self.latents_per_layer, minlength=self.n_layers)
        l0 = entries.float() / n_tokens
        out = {}
        for j, layer in enumerate(self.layers):
            out[f"fvu_layer_{layer}"] = fvus[j]
            out[f"l0_layer_{layer}"] = l0[j]
        return out

    @staticmethod
    def _prefix_metrics(fvus: torch.Tensor, l2_per_prefix: torch.Tensor) -> dict:
        """The Matryoshka prefixes' FVU (each the mean over layers of fvus [G, L]) and their loss
        range."""
        per_prefix = fvus.mean(dim=1)
        return {
            "fvu_min": per_prefix.min(),
            "fvu_max": per_prefix.max(),
            "fvu_mean": per_prefix.mean(),
            "min_l2_loss": l2_per_prefix.min().detach(),
            "max_l2_loss": l2_per_prefix.max().detach(),
            "fvu_per_prefix": per_prefix,
        }

    def sparsity_loss(self, code: SparseCode, pre: torch.Tensor) -> torch.Tensor:
        """jumprelu: JumpReLUSAE's quadratic objective l0_coeff x (L0 / (T L) - 1)^2, L0 the mean
        active latents a token over all layers (under torchrun, of the whole batch), counted by
        _Step on the code's entries (pre [B, L S] read before feature_acts reuses it) so that theta
        gets its straight-through gradient; T = target_l0 per source layer."""
        theta, eps = self._entry_thresholds(code)
        fires = _Step.apply(pre[code.rows, code.latents][None], theta, eps)  # [1, N]
        l0 = fires.sum() / code.batch_size
        target = self.cfg["target_l0"] * self.n_layers
        return quadratic_l0_objective(self.cfg, l0, target, self.batch_group())

    def auxk_loss(
        self, x_c: torch.Tensor, pre: torch.Tensor, residual: torch.Tensor
    ) -> torch.Tensor:
        """aux_penalty x sum_m mean((e_hat_m - e_m)^2) / v_m: e_hat from each token's top_k_aux
        dead latents (of any layer), decoded without b_dec; e the detached residual [B, L, d]. 0 if
        no latent is dead."""
        dead = self.dead_latents().nonzero().squeeze(1)
        if dead.numel() == 0 or self.cfg["aux_penalty"] == 0:
            return torch.zeros((), device=x_c.device)
        local = select_topk(pre[:, dead], self.cfg["top_k_aux"])
        code = SparseCode.from_indices(
            local.rows, dead[local.latents], pre.shape[0], self.n_latents
        )
        e_hat = self._decode_all(code.with_values(self._gathered_values(x_c, pre, code)))
        return self.cfg["aux_penalty"] * self._weighted_error((e_hat - residual).pow(2))

    @torch.no_grad()
    def _update_threshold(self, code: SparseCode) -> None:
        """BatchTopK's EMA of the smallest kept value (`update_inference_threshold`): of all layers
        (global) or of each layer (per_layer)."""
        n = self.threshold.numel()
        block = code.latents // self.latents_per_layer if n > 1 else torch.zeros_like(code.latents)
        smallest = torch.full((n,), float("inf"), device=code.values.device)
        smallest.scatter_reduce_(0, block, code.values.detach(), reduce="amin")
        rate = self.cfg["threshold_ema_rate"]
        update_inference_threshold(self.threshold, smallest, rate, self.batch_group())

    # -- the data-dependent start ------------------------------------------------------------

    @torch.no_grad()
    def initialize_from_batch(self, *activations: torch.Tensor) -> None:
        """From a first batch (sources, then targets, as forward): per layer the source mean, the
        target scale (power-of-two RMS of the centred target), b_dec (the target mean) and the
        target variance in scaled units; then the decoder aimed at the targets of the tokens each
        latent fires on and one shift of every pre-activation fitted to the targets' size, as for
        `sae.MatryoshkaTranscoder` (see its docstring for why), and one factor on the encoder.
        jumprelu: first the thresholds at each latent's firing quantile (unless
        jumprelu_threshold_init sets them), last the shift and factor applied to them too,
        theta <- alpha (theta - c), so that the first batch's code is kept."""
        n = self.n_layers
        x = self._stack(activations[:n], "sources")
        y = self._stack(activations[n:], "targets").reshape(-1, n, self.d_out)
        x = self.normalize_source(x.reshape(-1, n, self.d_in))[0]
        y_n = self._initialize_units(x, y)
        if self.jumprelu and self.cfg["jumprelu_threshold_init"] is None:
            rate = self.cfg["target_l0"] / self.latents_per_layer
            pre = self.preactivations(self.center(x))
            self.log_threshold.copy_(log_of_thresholds(firing_thresholds(pre, rate)))
        code = self._first_code(x)
        self._aim_decoder(code, y_n - self.b_dec)
        shift = self._shift_encoder_bias(code, y_n - self.b_dec)
        alpha = self._scale_encoder(code.with_values(code.values - shift), y_n - self.b_dec)
        if self.jumprelu:  # pre -> alpha (pre - c): the same on theta keeps which entries exceed it
            self.log_threshold.copy_(log_of_thresholds(alpha * (self.log_threshold.exp() - shift)))

    def _initialize_units(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """source_mean, target_scale, b_dec and target_variance from sources x [B, L, d_in] and
        targets y [B, L, d_out]; returns the targets in scaled units y / s [B, L, d_out]."""
        self.source_mean.copy_(x.mean(dim=0))
        centred = y - y.mean(dim=0)
        for j in range(self.n_layers):
            self.target_scale[j] = power_of_two_rms(centred[:, j])
        y_n = y / self.target_scale[:, None]
        self.b_dec.copy_(y_n.mean(dim=0))
        self.target_variance.copy_((y_n - self.b_dec).pow(2).mean(dim=(0, 2)).clamp(min=STD_EPS))
        return y_n

    def _first_code(self, x_n: torch.Tensor) -> SparseCode:
        """This batch's selection (this batch alone, on every rank) with its values."""
        pre = self.preactivations(self.center(x_n))
        code = self._select(pre, of_batch=True, group=None)
        return code.with_values(pre[code.rows, code.latents])

    def _aim_decoder(self, code: SparseCode, targets: torch.Tensor) -> None:
        """For each latent (j, i) that fires on the batch,
            W_dec[j][i] = normalise(sum_{b: z_b > 0} z_b (y_b[j:] - b_dec[j:])),
        the targets [B, L, d] after b_dec; the others keep their random decoder."""
        S = self.latents_per_layer
        layer_of_entry = code.latents // S
        for j in range(self.n_layers):
            entries = (layer_of_entry == j).nonzero().squeeze(1)
            if entries.numel() == 0:
                continue
            layer_code = SparseCode.from_indices(
                code.rows[entries], code.latents[entries] - j * S, code.batch_size, S
            )
            order = layer_code.by_latent
            pull = F.embedding_bag(
                layer_code.rows[order],
                targets[:, j:].reshape(code.batch_size, -1),
                layer_code.latent_offsets,
                mode="sum",
                per_sample_weights=code.values[entries][order],
            )
            norms = pull.norm(dim=1, keepdim=True)
            W = self.W_dec[j].view(S, -1)
            W.copy_(torch.where(norms > 0, pull / norms.clamp(min=STD_EPS), W))

    def _shift_encoder_bias(self, code: SparseCode, targets: torch.Tensor) -> torch.Tensor | float:
        """b_enc -= c, the one shift of every kept value that best fits the first predictions to
        the targets in the training loss: with P the prefix predictions and Q those of the same
        entries at value 1,
            c = sum <P - y, Q>_w / sum |Q|^2_w,   w = 1 / v_m,
        clamped to [0, the smallest kept value]; jumprelu: to [0, half the smallest theta], as
        theta moves by c too (`initialize_from_batch`), and a theta at 0 would have no
        straight-through window left to learn in (the latent with the smallest kept value would
        keep a floored threshold, firing like a ReLU latent). Returns c."""
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
        """W_enc and b_enc *= alpha = sum <P, y>_w / sum |P|^2_w, clamped to [0.05, 1]: what the
        shift (bounded by the smallest kept value) leaves of the overshoot. A CLT's later targets
        receive the latents of every earlier layer, all aimed at the same main directions, so the
        shifted first predictions can still be several times the targets. A uniform factor keeps
        every BatchTopK selection. Returns alpha (1 without entries)."""
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
