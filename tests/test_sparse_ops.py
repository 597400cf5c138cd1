"""sparse_ops: the selections (TopK, BatchTopK, above a threshold) against dense references, and
the sparse products' values and gradients against dense autograd."""

import pytest
import torch

from matryoshka_sae import sparse_ops
from matryoshka_sae.sparse_ops import (
    SparseCode,
    bag_offsets,
    gather_preactivations,
    select_above_threshold,
    select_batch_topk,
    select_topk,
    sparse_decode,
    sparse_decode_groups,
)


def random_pre(batch=16, dict_size=40, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, dict_size, generator=generator)


def dense_mask(code: SparseCode) -> torch.Tensor:
    mask = torch.zeros(code.batch_size, code.dict_size, dtype=torch.bool)
    mask[code.rows, code.latents] = True
    return mask


def test_bag_offsets_are_where_each_bag_starts():
    assert bag_offsets(torch.tensor([0, 0, 2, 2, 2, 3]), 5).tolist() == [0, 2, 2, 5, 6]


def test_a_code_is_sorted_by_row_then_latent_and_indexed_by_latent():
    pre = random_pre()
    code = select_batch_topk(pre, 3)
    code = code.with_values(pre[code.rows, code.latents])
    order = code.rows * code.dict_size + code.latents
    assert torch.equal(order, order.sort().values)
    by_latent = code.latents[code.by_latent]
    assert torch.equal(by_latent, by_latent.sort().values)
    assert torch.equal(code.latent_offsets, bag_offsets(by_latent, code.dict_size))
    dense = code.to_dense()
    assert torch.equal(dense != 0, dense_mask(code)) and torch.equal(
        dense[dense != 0], pre[dense != 0]
    )
    assert code.l0().item() == pytest.approx(len(code.rows) / code.batch_size)
    assert torch.equal(code.fired(), dense_mask(code).any(dim=0))


@pytest.mark.parametrize("k", [1, 5, 40, 60])
def test_topk_keeps_the_k_largest_positive_values_of_each_row(k):
    pre = random_pre()
    code = select_topk(pre, k)
    kept = torch.zeros_like(pre, dtype=torch.bool).scatter_(
        1, pre.topk(min(k, 40), dim=1).indices, True
    )
    assert torch.equal(dense_mask(code), kept & (pre > 0))


def test_above_threshold_keeps_what_exceeds_the_threshold_and_zero():
    pre = random_pre()
    assert torch.equal(dense_mask(select_above_threshold(pre, torch.tensor(0.7))), pre > 0.7)
    assert torch.equal(dense_mask(select_above_threshold(pre, torch.tensor(-1.0))), pre > 0)


@pytest.mark.parametrize("hint", [None, 0.01, 1.0, 2.0, 100.0])
def test_batch_topk_selection_is_exact_with_ties_and_heavy_rows(hint):
    torch.manual_seed(0)
    pre = torch.randn(64, 200)
    pre[3] += 10  # one row holds far more than 4k of the batch's largest values
    pre[10, :50] = 2.5  # ties
    pre[11, 50:90] = 2.5
    cut_offs = []
    for k in (1, 4, 5, 16, 100):
        code = select_batch_topk(pre, k, None if hint is None else torch.tensor(hint))
        n_keep = k * 64
        t = pre.flatten().topk(n_keep).values[-1]
        # Reference: everything above t, then ties at t in row-major order up to k x batch.
        ties = (pre == t).flatten()
        ties &= ties.cumsum(0) <= n_keep - int((pre > t).sum())
        mask = ((pre > t).flatten() | ties).view_as(pre) & (pre > 0)
        assert torch.equal(torch.stack([code.rows, code.latents], 1), mask.nonzero())
        assert len(code.rows) == min(n_keep, int((pre > 0).sum()))
        cut_offs.append(t.item())
    assert 2.5 in cut_offs  # some k cuts through the tied values


def test_sampled_row_dots_fallback_gives_the_same_result(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 5, generator=generator), torch.randn(9, 5, generator=generator)
    offsets = torch.tensor([0, 2, 2, 5, 6, 8])  # row 1 has no entries
    index = torch.tensor([0, 3, 1, 2, 8, 4, 0, 7, 5, 6])
    expected = (a[torch.tensor([0, 0, 2, 2, 2, 3, 4, 4, 5, 5])] * b[index]).sum(-1)
    torch.testing.assert_close(sparse_ops.sampled_row_dots(a, b, offsets, index), expected)

    def unsupported(*args, **kwargs):
        raise NotImplementedError("not on this device")

    monkeypatch.setattr(torch.sparse, "sampled_addmm", unsupported)
    monkeypatch.setattr(sparse_ops, "_SAMPLED_ADDMM_WORKS", True)
    with pytest.warns(UserWarning, match="gathered rows"):
        torch.testing.assert_close(sparse_ops.sampled_row_dots(a, b, offsets, index), expected)
    assert sparse_ops._SAMPLED_ADDMM_WORKS is False


def test_gather_preactivations_has_the_dense_gradients():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(8, 6, generator=generator, requires_grad=True)
    W = torch.randn(6, 20, generator=generator, requires_grad=True)
    b = torch.randn(20, generator=generator, requires_grad=True)
    with torch.no_grad():
        pre = x @ W + b
    code = select_batch_topk(pre, 3)
    weights = torch.randn(len(code.rows), generator=generator)
    (gather_preactivations(x, W, b, pre, code) * weights).sum().backward()
    sparse_grads = [t.grad.clone() for t in (x, W, b)]
    for t in (x, W, b):
        t.grad = None
    ((x @ W + b)[code.rows, code.latents] * weights).sum().backward()
    for sparse_grad, t in zip(sparse_grads, (x, W, b)):
        torch.testing.assert_close(sparse_grad, t.grad)


def test_sparse_decodes_have_the_dense_values_and_gradients():
    generator = torch.Generator().manual_seed(2)
    pre = torch.randn(8, 20, generator=generator)
    code = select_batch_topk(pre, 4)
    values = pre[code.rows, code.latents].clone().requires_grad_(True)
    W_dec = torch.randn(20, 6, generator=generator, requires_grad=True)
    group_ends = torch.tensor([2, 8, 20])
    out = sparse_decode(code.with_values(values), W_dec)
    parts = sparse_decode_groups(code.with_values(values), W_dec, group_ends)
    torch.testing.assert_close(parts.sum(dim=1), out)
    upstream = torch.randn(out.shape, generator=generator)
    (out * upstream).sum().backward()
    sparse_grads = values.grad.clone(), W_dec.grad.clone()
    values.grad = W_dec.grad = None
    dense = torch.zeros(8, 20).index_put((code.rows, code.latents), values)
    dense_out = dense @ W_dec
    torch.testing.assert_close(out, dense_out)
    for g, start, end in zip(range(3), [0, 2, 8], group_ends.tolist()):
        torch.testing.assert_close(parts[:, g], dense[:, start:end] @ W_dec[start:end])
    (dense_out * upstream).sum().backward()
    torch.testing.assert_close(sparse_grads[0], values.grad)
    torch.testing.assert_close(sparse_grads[1], W_dec.grad)


def dense_cross_layer_decode(codes, values, weights, group_ends, n_out):
    """Reference of sparse_decode_cross_layer: each layer's dense code, masked to each group, times all
    its decoder rows, into output layers j..n_out - 1."""
    code = codes[0][0]
    in_group = torch.nn.functional.one_hot(
        torch.bucketize(torch.arange(code.dict_size), group_ends, right=True)
    )
    out = 0
    for (code, j), v, W in zip(codes, values, weights):
        dense = torch.zeros(code.batch_size, code.dict_size, dtype=v.dtype).index_put(
            (code.rows, code.latents), v
        )
        out = out + torch.nn.functional.pad(
            torch.einsum("bs,sg,smd->bgmd", dense, in_group.to(v.dtype), W), (0, 0, j, 0)
        )
    return out


def test_cross_layer_decode_has_the_dense_values_and_gradients():
    """3 source layers of 5 latents (groups [0, 2), [2, 5)), 4 rows: layer 1 has no active entries
    and row 2 none in any layer."""
    generator = torch.Generator().manual_seed(3)
    B, S, L, d = 4, 5, 3, 3
    group_ends = torch.tensor([2, 5])
    codes, values = [], []
    for j in range(L):
        pre = torch.randn(B, S, generator=generator, dtype=torch.float64)
        pre[2] = -1.0
        if j == 1:
            pre[:] = -1.0
        code = select_topk(pre, 3)
        codes.append((code, j))
        values.append(pre[code.rows, code.latents].requires_grad_(True))
    assert [len(v) for v in values] == [8, 0, 8]
    weights = [
        torch.randn(S, L - j, d, generator=generator, dtype=torch.float64, requires_grad=True)
        for j in range(L)
    ]

    def decode(*tensors):
        with_values = [(code.with_values(v), j) for (code, j), v in zip(codes, tensors[:L])]
        return sparse_ops.sparse_decode_cross_layer(with_values, list(tensors[L:]), group_ends, L)

    out = decode(*values, *weights)
    expected = dense_cross_layer_decode(codes, values, weights, group_ends, L)
    assert out.shape == (B, 2, L, d) and out[2].abs().max() == 0
    torch.testing.assert_close(out, expected)
    upstream = torch.randn(out.shape, generator=generator, dtype=torch.float64)
    sparse_grads = torch.autograd.grad((out * upstream).sum(), [*values, *weights])
    dense_grads = torch.autograd.grad((expected * upstream).sum(), [*values, *weights])
    for sparse_grad, dense_grad in zip(sparse_grads, dense_grads):
        torch.testing.assert_close(sparse_grad, dense_grad)
    assert torch.autograd.gradcheck(decode, (*values, *weights))
