"""Sparse codes and the two sparse products the TopK family of SAEs is made of.

A batch's active latents are stored in coordinate form (`SparseCode`): N (row, latent, value)
entries sorted by row, then latent. With N = k x batch out of batch x dict_size entries (0.4% for
k=32, dict 8192) everything after the encoder matmul is done on the N entries only:

* `gather_preactivations` reads the N selected pre-activations from the dense encoder output and,
  in the backward pass, builds the encoder's gradients from the N entries (no dense matmuls);
* `sparse_decode` sums `value x decoder row` into bags (rows, or (row, Matryoshka group) pairs)
  and has a backward pass of the same sparse cost.

Both backward passes use `F.embedding_bag`, which sums weighted rows of a table without forming
the N x d products.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from matryoshka_sae import distributed


def bag_offsets(sorted_bag_ids: torch.Tensor, n_bags: int) -> torch.Tensor:
    """Start of each bag in a list of entries sorted by bag id: [n_bags] long."""
    counts = torch.bincount(sorted_bag_ids, minlength=n_bags)
    return torch.cumsum(counts, 0) - counts


@dataclass
class SparseCode:
    """Active latents of a batch: entry n is (rows[n], latents[n]) with value values[n] > 0.

    Entries are sorted by row, then by latent. `row_offsets` [batch] is where each row's entries
    start; `by_latent` [N] is a permutation sorting the entries by latent and `latent_offsets`
    [dict_size] where each latent's entries start in that order.
    """

    rows: torch.Tensor
    latents: torch.Tensor
    values: torch.Tensor | None  # None until `with_values`
    batch_size: int
    dict_size: int
    row_offsets: torch.Tensor
    by_latent: torch.Tensor
    latent_offsets: torch.Tensor

    @classmethod
    def from_indices(cls, rows, latents, batch_size, dict_size) -> "SparseCode":
        """Build the index structure from (row, latent) pairs already sorted by row then latent."""
        by_latent = torch.argsort(latents, stable=True)
        return cls(
            rows=rows,
            latents=latents,
            values=None,
            batch_size=batch_size,
            dict_size=dict_size,
            row_offsets=bag_offsets(rows, batch_size),
            by_latent=by_latent,
            latent_offsets=bag_offsets(latents[by_latent], dict_size),
        )

    def with_values(self, values: torch.Tensor) -> "SparseCode":
        return SparseCode(
            self.rows,
            self.latents,
            values,
            self.batch_size,
            self.dict_size,
            self.row_offsets,
            self.by_latent,
            self.latent_offsets,
        )

    def to_dense(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """[batch, dict_size] tensor with the code's values (no gradient), written into `out` if given."""
        dense = (
            self.values.new_zeros(self.batch_size, self.dict_size) if out is None else out.zero_()
        )
        return dense.index_put_((self.rows, self.latents), self.values.detach().to(dense.dtype))

    def l0(self) -> torch.Tensor:
        """Mean number of active latents per row (0-dim float tensor)."""
        return torch.tensor(float(self.rows.numel()) / self.batch_size, device=self.rows.device)

    def fired(self) -> torch.Tensor:
        """[dict_size] bool: which latents are active in some row."""
        fired = torch.zeros(self.dict_size, dtype=torch.bool, device=self.latents.device)
        return fired.index_fill_(0, self.latents, True)


def _sum_by_latent(
    code: SparseCode, table: torch.Tensor, table_index: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """[dict_size, d]: row s is sum over entries n with latent s of weights[n] * table[table_index[n]]."""
    order = code.by_latent
    return F.embedding_bag(
        table_index[order],
        table,
        code.latent_offsets,
        mode="sum",
        per_sample_weights=weights[order],
    )


class _GatherPreactivations(torch.autograd.Function):
    """values[n] = x[rows[n]] . W_enc[:, latents[n]] + b_enc[latents[n]], read from `pre`."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, pre, code):
        ctx.code = code
        ctx.save_for_backward(x, W_enc)
        return pre.clone() if pre.dim() == 1 else pre[code.rows, code.latents]

    @staticmethod
    def backward(ctx, grad_values):
        x, W_enc = ctx.saved_tensors
        code = ctx.code
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:  # grad_x[b] = sum_{n in row b} g_n W_enc[:, latent_n]
            W_enc_rows = W_enc.t().contiguous()
            grad_x = F.embedding_bag(
                code.latents,
                W_enc_rows,
                code.row_offsets,
                mode="sum",
                per_sample_weights=grad_values,
            )
        if ctx.needs_input_grad[1]:  # grad_W[:, s] = sum_{n with latent s} g_n x[row_n]
            grad_W = _sum_by_latent(code, x, code.rows, grad_values).t()
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros_like(W_enc[0]).index_add_(0, code.latents, grad_values)
        return grad_x, grad_W, grad_b, None, None


def gather_preactivations(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, pre: torch.Tensor, code: SparseCode
) -> torch.Tensor:
    """The code's pre-activations [N], differentiable in x [B, d], W_enc [d, S] and b_enc [S].

    `pre` [B, S] must equal x @ W_enc + b_enc (computed without gradient); only its N selected
    entries are read. The backward pass costs O(N d), not the O(B S d) of a dense matmul.
    `pre` may also be those N values [N] already read (a caller whose pre-activations are not laid
    out as x's rows by W_enc's columns, such as a cross-layer transcoder's).
    """
    return _GatherPreactivations.apply(x, W_enc, b_enc, pre, code)


_SAMPLED_ADDMM_WORKS = True


def sampled_row_dots(
    a: torch.Tensor, b: torch.Tensor, a_offsets: torch.Tensor, b_index: torch.Tensor
) -> torch.Tensor:
    """dots[n] = a[i] . b[b_index[n]] for the entries n of row i, i.e. a @ b.T sampled at N places.

    a [R, d], b [S, d]; entries sorted by row i with `a_offsets` [R] where each row starts. A
    sampled dense-dense matmul, which never forms the N x d gathered rows; where a build of torch
    lacks it for these tensors, the gathered rows are formed after all (same result, more memory).
    """
    global _SAMPLED_ADDMM_WORKS
    crow = torch.cat([a_offsets, a_offsets.new_tensor([b_index.numel()])])  # row starts and the end
    if _SAMPLED_ADDMM_WORKS:
        try:
            with warnings.catch_warnings():  # "CSR support is in beta": we use only sampled_addmm
                warnings.simplefilter("ignore")
                pattern = torch.sparse_csr_tensor(
                    crow,
                    b_index,
                    a.new_zeros(b_index.numel()),
                    size=(a.shape[0], b.shape[0]),
                    check_invariants=False,
                )
                return torch.sparse.sampled_addmm(pattern, a, b.t(), beta=0.0).values()
        except (RuntimeError, NotImplementedError) as error:
            _SAMPLED_ADDMM_WORKS = False
            warnings.warn(
                f"torch.sparse.sampled_addmm failed ({error}); using gathered rows instead.",
                stacklevel=2,
            )
    rows = torch.repeat_interleave(crow.diff())
    return (a[rows] * b[b_index]).sum(dim=-1)


class _SparseDecode(torch.autograd.Function):
    """out[bag] = sum over entries n in that bag of values[n] * W_dec[latents[n]]."""

    @staticmethod
    def forward(ctx, values, W_dec, code, bags, offsets):
        ctx.code, ctx.bags, ctx.offsets = code, bags, offsets
        ctx.save_for_backward(values, W_dec)
        return F.embedding_bag(code.latents, W_dec, offsets, mode="sum", per_sample_weights=values)

    @staticmethod
    def backward(ctx, grad_out):
        values, W_dec = ctx.saved_tensors
        code, bags = ctx.code, ctx.bags
        grad_values = grad_W = None
        if ctx.needs_input_grad[0]:  # d out[bag_n] / d values[n] = W_dec[latent_n]
            grad_values = sampled_row_dots(grad_out.contiguous(), W_dec, ctx.offsets, code.latents)
        if ctx.needs_input_grad[1]:  # grad_W[s] = sum_{n with latent s} values[n] grad_out[bag_n]
            grad_W = _sum_by_latent(code, grad_out.contiguous(), bags, values)
        return grad_values, grad_W, None, None, None


def sparse_decode(code: SparseCode, W_dec: torch.Tensor) -> torch.Tensor:
    """Sum of active decoder rows per batch row, without bias: [batch, d_out]."""
    return _SparseDecode.apply(code.values, W_dec, code, code.rows, code.row_offsets)


def sparse_decode_groups(
    code: SparseCode, W_dec: torch.Tensor, group_ends: torch.Tensor
) -> torch.Tensor:
    """Per-group partial decodes [batch, n_groups, d_out]: group g sums the active latents in
    [group_ends[g-1], group_ends[g]). Their cumulative sum over groups gives the nested-prefix
    reconstructions of a Matryoshka SAE at the cost of one decode."""
    n_groups = group_ends.numel()
    groups = torch.bucketize(code.latents, group_ends, right=True)
    bags = code.rows * n_groups + groups  # sorted, since latents are sorted within each row
    offsets = bag_offsets(bags, code.batch_size * n_groups)
    partial = _SparseDecode.apply(code.values, W_dec, code, bags, offsets)
    return partial.view(code.batch_size, n_groups, -1)


def _segments(counts: torch.Tensor):
    """For consecutive segments of `counts` [n] items: (segment of each item, its position in the
    segment, where each segment starts), the items being listed segment by segment."""
    starts = torch.cumsum(counts, 0) - counts
    segment = torch.repeat_interleave(counts)
    return segment, torch.arange(segment.numel(), device=counts.device) - starts[segment], starts


def end_to_end(weights: list[torch.Tensor]) -> bool:
    """Whether the tensors are contiguous and lie end to end, in list order, in one storage."""
    first = weights[0]
    end = first.storage_offset()
    for W in weights:
        same_storage = W.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
        if not (same_storage and W.is_contiguous() and W.storage_offset() == end):
            return False
        end += W.numel()
    return True


def _one_table(weights: list[torch.Tensor], d: int) -> torch.Tensor:
    """The weights' rows as one [sum_j rows_j, d] table: a view where they lie `end_to_end` (a
    CrossLayerTranscoder packs its decoders so), else their concatenation."""
    if not end_to_end(weights):
        return torch.cat([W.reshape(-1, d) for W in weights])
    rows = sum(W.numel() for W in weights) // d
    return weights[0].as_strided((rows, d), (d, 1), weights[0].storage_offset())


class _CrossLayerDecode(torch.autograd.Function):
    """out[b, g, m] = sum over source layers j <= m and their entries n in bag (b, g) of
    values_j[n] W_j[latent_n, m - j]: a cross-layer transcoder's decode (see sparse_decode_cross_layer).

    Each entry n of layer j stands for L - j pairs (n, m), m >= j: table row (latent_n, m - j) of W_j
    viewed [S (L - j), d], summed into row (b G + g) L + m of the output viewed [B G L, d]."""

    @staticmethod
    def forward(ctx, layout, out_shape, *tensors):
        n = len(layout)
        values, weights = tensors[:n], tensors[n:]
        B, G, L, d = out_shape
        # Every layer's entries sorted by (bag b G + g, layer j): output row (b G + g) L + m sums the
        # first ones of their bag, those of the layers j <= m.
        key = torch.cat([bags * L + j for _, bags, j in layout])
        order = torch.argsort(key, stable=True)
        per_layer = torch.bincount(key, minlength=B * G * L).view(B * G, L)
        bag_starts = torch.cumsum(per_layer.sum(1), 0) - per_layer.sum(1)
        out_row, position, offsets = _segments(per_layer.cumsum(1).flatten())
        entry = order[bag_starts[out_row // L] + position]
        # One table of every layer's rows, in which pair (n, m) reads row first_row[n] + m.
        table_starts = (
            torch.tensor([0] + [W.shape[0] * W.shape[1] for W in weights]).cumsum(0).tolist()
        )
        first_row = torch.cat(
            [
                start + code.latents * (L - j) - j
                for (code, _, j), start in zip(layout, table_starts)
            ]
        )
        table = _one_table(weights, d)
        out = F.embedding_bag(
            first_row[entry] + out_row % L,
            table,
            offsets,
            mode="sum",
            per_sample_weights=torch.cat(values)[entry],
        )
        ctx.layout = layout
        ctx.save_for_backward(*values, *weights)
        return out.view(out_shape)

    @staticmethod
    def backward(ctx, grad_out):
        layout, n = ctx.layout, len(ctx.layout)
        values, weights = ctx.saved_tensors[:n], ctx.saved_tensors[n:]
        L, d = grad_out.shape[2], grad_out.shape[3]
        grad_rows = grad_out.contiguous().view(-1, d)  # [B G L, d], row (b G + g) L + m
        grad_values, grad_weights = [], []
        for i, ((code, bags, j), v, W) in enumerate(zip(layout, values, weights)):
            # Layer j's pairs by table row (latent, m - j): each latent's entries, in by_latent order (by
            # row, so out_row rises within a table row), once for every m.
            table_row, position, row_starts = _segments(
                torch.diff(
                    code.latent_offsets, append=code.latent_offsets.new_tensor([v.numel()])
                ).repeat_interleave(L - j)
            )
            entry = code.by_latent[code.latent_offsets[table_row // (L - j)] + position]
            out_row = bags[entry] * L + j + table_row % (L - j)
            grad_v = grad_W = None
            if ctx.needs_input_grad[2 + i]:  # sum over the entry's pairs of grad_out[row] . W_j row
                dots = sampled_row_dots(W.view(-1, d), grad_rows, row_starts, out_row)
                grad_v = torch.zeros_like(v).index_add_(0, entry, dots)
            if ctx.needs_input_grad[
                2 + n + i
            ]:  # sum over the table row's pairs of value x grad_out[row]
                grad_W = F.embedding_bag(
                    out_row, grad_rows, row_starts, mode="sum", per_sample_weights=v[entry]
                ).view_as(W)
            grad_values.append(grad_v)
            grad_weights.append(grad_W)
        return (None, None, *grad_values, *grad_weights)


def sparse_decode_cross_layer(
    codes: list[tuple[SparseCode, int]],
    weights: list[torch.Tensor],
    group_ends: torch.Tensor,
    n_out: int,
) -> torch.Tensor:
    """A cross-layer decode [batch, n_groups, n_out, d]: entry (b, g, m) sums, over the source layers
    j <= m and the active latents of group g ([group_ends[g-1], group_ends[g])) of row b in code_j,
    value x weights_j[latent, m - j]. `codes`: (code with values, j) per source layer; weights_j
    [S, n_out - j, d].

    Each active entry of layer j is expanded into its n_out - j (entry, output layer) pairs, listed
    in output-row order (the N entries are sorted, the pairs are not), and one `F.embedding_bag`
    over the layers' weights, concatenated as one [sum_j S (n_out - j), d] table, writes the output
    directly. The backward pass lists each layer's pairs by weight row and reads the output's
    gradient in place: `sampled_row_dots` and a sum per entry for the values, `F.embedding_bag` for
    the weights. Cost: N_j (n_out - j) d per layer, forward and backward, the pairs' integer indices
    and the copy of the weights into one table. No [batch, S, n_out, d] product, no [pairs, d]
    gather and no per-layer [batch, n_groups, n_out - j, d] partial or gradient slice is formed:
    the largest tensors are the output, its gradient, the table and the weights' gradients."""
    n_groups = group_ends.numel()
    batch, d = codes[0][0].batch_size, weights[0].shape[-1]
    # bag b G + g of each entry: sorted, since latents are sorted within each row
    layout = [
        (code, code.rows * n_groups + torch.bucketize(code.latents, group_ends, right=True), j)
        for code, j in codes
    ]
    return _CrossLayerDecode.apply(
        layout, (batch, n_groups, n_out, d), *[c.values for c, _ in codes], *weights
    )


# ---------------------------------------------------------------------------------------------
# Selection: which (row, latent) entries are active
# ---------------------------------------------------------------------------------------------


def _sort_row_candidates(values: torch.Tensor, indices: torch.Tensor):
    """Per-row candidates [B, m] reordered by latent index."""
    indices, order = indices.sort(dim=1)
    return values.gather(1, order), indices


def _code_from_row_candidates(
    indices: torch.Tensor, keep: torch.Tensor, dict_size: int
) -> SparseCode:
    """Code of the kept candidates; `indices` and `keep` are [B, m], sorted by latent per row."""
    rows, cols = keep.nonzero(as_tuple=True)
    return SparseCode.from_indices(rows, indices[rows, cols], indices.shape[0], dict_size)


def select_topk(pre: torch.Tensor, k: int) -> SparseCode:
    """The k largest pre-activations of each row, kept where positive (ReLU then TopK)."""
    values, indices = _sort_row_candidates(*pre.topk(min(k, pre.shape[1]), dim=1, sorted=False))
    return _code_from_row_candidates(indices, values > 0, pre.shape[1])


def _n_largest_threshold(
    values: torch.Tensor, n_keep: int, group
) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, ties_to_keep): t is the n_keep-th largest of `values` [N] and the first ties_to_keep
    values equal to t complete the n_keep largest. With a process `group` the values of all its
    ranks count, in rank order (distributed.n_largest_threshold: no values leave the rank)."""
    if group is not None:
        return distributed.n_largest_threshold(values, n_keep, group)
    t = values.kthvalue(values.numel() - n_keep + 1).values
    return t, n_keep - (values > t).sum()


def _n_largest_positive(
    values: torch.Tensor, t: torch.Tensor, ties_to_keep: torch.Tensor
) -> torch.Tensor:
    """Mask of the values above t and the first `ties_to_keep` equal to t, positive ones only.

    Ties at t are broken by position in `values`, so exactly n_keep entries are kept even when
    values tie (as low-precision pre-activations often do)."""
    ties = values == t
    ties &= ties.cumsum(dim=-1) <= ties_to_keep
    return ((values > t) | ties) & (values > 0)


def select_batch_topk(
    pre: torch.Tensor, k: int, lower_bound: torch.Tensor | None = None, group=None
) -> SparseCode:
    """The k x batch largest positive pre-activations of the whole batch (BatchTopK).

    Selected: the entries above t, the (k x batch)-th largest value, and as many entries equal to
    t, first in (row, latent) order, as make exactly k x batch; only positive values (fewer entries
    when fewer are positive). No top-k over all batch x dict_size values is needed: t is found among
    candidates that provably contain the top k x batch.

    `lower_bound` is a guess of a value below t (training passes 0.8 x the running threshold):
    if at least k x batch entries reach it, those entries are the candidates (one comparison
    pass). Otherwise each row offers its m largest values, which is exact as long as no row has
    all m candidates >= t; m doubles until that holds.

    `group` (a torch.distributed process group, see distributed.py): `pre` is this rank's share of
    a batch spread over the group's ranks, in rank order; the selection is that of one process on
    the whole batch (k x the global batch entries in all), and this rank's part of it is returned.
    """
    batch, dict_size = pre.shape
    global_batch = batch * (1 if group is None else distributed.world_size(group))
    n_keep = min(k * global_batch, global_batch * dict_size)
    if lower_bound is not None and lower_bound > 0:
        rows, latents = (pre >= lower_bound).nonzero(as_tuple=True)
        if _count(rows.numel(), group, pre.device) >= n_keep:
            values = pre[rows, latents]
            keep = _n_largest_positive(values, *_n_largest_threshold(values, n_keep, group))
            return SparseCode.from_indices(rows[keep], latents[keep], batch, dict_size)
    return _batch_topk_from_row_candidates(pre, n_keep, 4 * k, group)


def _count(n: int, group, device: torch.device) -> int:
    """n summed over the ranks of `group` (n itself without a group)."""
    if group is None:
        return n
    return int(distributed.sum_over_ranks(torch.tensor(n, dtype=torch.int64, device=device), group))


def _batch_topk_from_row_candidates(
    pre: torch.Tensor, n_keep: int, m: int, group=None
) -> SparseCode:
    batch, dict_size = pre.shape
    m = min(dict_size, m)
    while True:
        values, indices = pre.topk(m, dim=1, sorted=False)
        t, ties_to_keep = _n_largest_threshold(values.flatten(), n_keep, group)
        smallest = values.amin(dim=1)  # a row may hold more values >= t (and > 0) than it offered
        row_has_more = int(((smallest >= t) & (smallest > 0)).any())
        row_may_have_more = m < dict_size and _count(row_has_more, group, pre.device) > 0
        if not row_may_have_more:
            break
        m = min(dict_size, 2 * m)
    values, indices = _sort_row_candidates(values, indices)
    keep = _n_largest_positive(values.flatten(), t, ties_to_keep).view_as(values)
    return _code_from_row_candidates(indices, keep, dict_size)


def select_above_threshold(pre: torch.Tensor, threshold: torch.Tensor) -> SparseCode:
    """Entries whose pre-activation exceeds `threshold` (and 0): BatchTopK at inference."""
    rows, latents = (pre > threshold.clamp(min=0)).nonzero(as_tuple=True)
    return SparseCode.from_indices(rows, latents, pre.shape[0], pre.shape[1])
