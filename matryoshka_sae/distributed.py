"""Data-parallel training under torchrun, with the exact global BatchTopK.

Launch. ``torchrun --nproc_per_node N main.py ...`` starts N processes (ranks) and sets RANK,
WORLD_SIZE, LOCAL_RANK and the rendezvous address in their environment. `init_from_env(cfg)` joins
them into one process group: NCCL with one GPU per rank (``cuda:LOCAL_RANK``) when cfg["device"] is
CUDA, gloo on CPUs, every collective bounded by cfg["distributed_timeout_s"]. Without torchrun (or
with WORLD_SIZE 1) it does nothing at all, and every function below acts as on a single process.

Data parallelism. Every rank holds the same dictionaries. The global batch of B = cfg["batch_size"]
activations is the concatenation, in rank order, of W local batches of B / W rows, each computed by
its rank from its own share of the documents. The global batches do not depend on W: the documents
are dealt to cfg["data_lanes"] lanes (activation_store.py) whose batches, concatenated, are the
global batch, and rank r serves rows [r B / W, (r + 1) B / W) of it (an activation cache likewise),
so a checkpoint resumes exactly on any number of ranks. The objectives are those of one process on
the global batch:

* Losses are means over rows, so the global loss is the mean of the W local losses and its gradient
  the mean of the local gradients: `average_gradients` all-reduces each parameter's gradient once
  per step, before the decoder-norm projection and the clipping, so that every rank applies the same
  update to the same weights (they stay bit-identical; `check_same_on_every_rank` asserts it).
* The BatchTopK selection, the eval threshold (a min over kept values) and the dead-latent counters
  (which latents fired) are functions of the whole batch: their inputs are reduced over ranks here.
  So are a batch mean that a loss uses non-linearly (`global_mean_value`, e.g. an L0 target) and
  the first batch that initialises b_dec (`gather_rows`, once).

Exact global BatchTopK (`n_largest_threshold`). Single-process BatchTopK keeps the n = k x B largest
pre-activations of the batch: those above t, the n-th largest value, and as many equal to t, first
in (row, latent) order, as make n (only positive values). Each rank has a set of candidate values
that provably holds every local value >= t (sparse_ops.select_batch_topk finds them). The n-th
largest value of the union is found without moving any value between ranks, by a radix selection
on the bits of the floats:

    key(v) = an integer with the order of the floats (sign-magnitude bits made two's complement)
    for each byte of the key, most significant first (4 rounds for float32):
        histogram [256] of that byte over the local candidates that share the bytes chosen so far
        all-reduce(SUM) the histogram
        choose the byte holding the n-th largest; count the candidates in higher bytes as "above";
        keep only the local candidates with that byte (after the first round, few are left)
    t = the float whose key has the chosen bytes; the candidates left are the ties at t

Every rank makes the same choices from the same reduced histograms, so all agree on t and on the
global number of values above t. One more all-reduce of the ranks' numbers of values equal to t (a
vector of W counts) tells each rank how many ties ranks before it hold, which gives the ties it
keeps: the single-process rule on the concatenated batch, ties included.

Communication per training step and dictionary (independent of batch and dictionary size):
4 all-reduces of 256 int64 counts (2 KiB each) and one of W int64 counts for the threshold; one of
one count to test the candidates (more, each one flag, only when the candidates must be widened);
the fired mask (S bytes, MAX) and the smallest kept value (4 bytes, MIN). The gradient all-reduce
is the bulk: 4 x (2 d S + S + d) bytes for an SAE of width d and S latents (33.6 MB at
512 -> 8192). Each rank also makes about one pass over its candidates (~k x B / W values): the
first round reads them all, the later ones what the previous left.
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta
from typing import Iterable, Iterator

import torch
import torch.distributed as dist

_LOCAL_BATCHES = False  # set by `local_batches()`: each rank's batch is a whole batch


# ---------------------------------------------------------------------------------------------
# Set-up and ranks
# ---------------------------------------------------------------------------------------------


def launched_by_torchrun() -> bool:
    """True in a process that torchrun started with more than one rank in all."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(cfg: dict) -> dict:
    """Join torchrun's process group and give this rank its device; returns cfg (updated in place).

    cfg["device"] "cuda..." becomes ``cuda:LOCAL_RANK`` with the NCCL backend; any other device
    uses gloo. Does nothing outside torchrun or when the group already exists. Checks that
    cfg["batch_size"] (the global batch) divides among the ranks.
    """
    if not launched_by_torchrun():
        return cfg
    world = int(os.environ["WORLD_SIZE"])
    if cfg["batch_size"] % world:
        raise ValueError(
            f"cfg['batch_size'] = {cfg['batch_size']} (the global batch) does not divide among "
            f"{world} ranks; set it (--batch-size) to a multiple of {world}."
        )
    device = str(cfg["device"])
    if device.startswith("cuda"):
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        cfg["device"] = f"cuda:{local_rank}"
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=cfg["distributed_timeout_s"]))
    return cfg


def shut_down() -> None:
    """Leave the process group (if any), so that the other ranks' pending collectives fail fast."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_active() -> bool:
    """True when this process is one of several ranks of a process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_active() else 0


def world_size(group=None) -> int:
    """Ranks in `group` (default: all), 1 on a single process."""
    return dist.get_world_size(group) if is_active() else 1


def is_main_process() -> bool:
    """Rank 0, the one that logs, shows progress and writes checkpoints (True on a single process)."""
    return rank() == 0


def local_batch_size(batch_size: int) -> int:
    """This rank's share B / W of the global batch of `batch_size` rows."""
    world = world_size()
    if batch_size % world:
        raise ValueError(
            f"cfg['batch_size'] = {batch_size} (the global batch) does not divide among "
            f"{world} ranks; set it to a multiple of {world}."
        )
    return batch_size // world


def batch_group():
    """The process group whose local batches form the training batch, or None (a single process,
    or inside `local_batches()`): the SAEs reduce their batch statistics over this group."""
    return dist.group.WORLD if is_active() and not _LOCAL_BATCHES else None


@contextlib.contextmanager
def local_batches() -> Iterator[None]:
    """Within this block each rank's batch is a whole batch (no reductions over ranks)."""
    global _LOCAL_BATCHES
    previous, _LOCAL_BATCHES = _LOCAL_BATCHES, True
    try:
        yield
    finally:
        _LOCAL_BATCHES = previous


# ---------------------------------------------------------------------------------------------
# Reductions over the ranks of a group
# ---------------------------------------------------------------------------------------------


def barrier() -> None:
    """Wait for every rank (a no-op on a single process)."""
    if is_active():
        dist.barrier()


def sum_over_ranks(tensor: torch.Tensor, group) -> torch.Tensor:
    """Element-wise sum over ranks (a new tensor)."""
    total = tensor.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return total


def mean_over_ranks(tensor: torch.Tensor, group) -> torch.Tensor:
    """Element-wise mean over the ranks of `group` (the tensor itself without a group)."""
    if group is None:
        return tensor
    return sum_over_ranks(tensor, group) / dist.get_world_size(group)


def global_mean_value(local_mean: torch.Tensor, group) -> torch.Tensor:
    """A batch mean that a loss uses non-linearly, e.g. (L0 / T - 1)^2: the value is the mean over
    ranks (the global batch's), the gradient that of this rank's term, so that averaging the ranks'
    gradients gives the global loss's gradient exactly. `local_mean` itself without a group."""
    if group is None:
        return local_mean
    local = local_mean.detach()
    return local_mean + (mean_over_ranks(local, group) - local)


def min_over_ranks(tensor: torch.Tensor, group) -> torch.Tensor:
    smallest = tensor.clone()
    dist.all_reduce(smallest, op=dist.ReduceOp.MIN, group=group)
    return smallest


def any_over_ranks(mask: torch.Tensor, group) -> torch.Tensor:
    """Element-wise OR over ranks of a bool tensor."""
    fired = mask.to(torch.uint8)
    dist.all_reduce(fired, op=dist.ReduceOp.MAX, group=group)
    return fired.bool()


def any_rank(flag: bool, device) -> bool:
    """True on every rank when `flag` is True on some rank (one all-reduce of one byte)."""
    return bool(any_over_ranks(torch.tensor(flag, device=device), dist.group.WORLD))


def gather_rows(x: torch.Tensor, group) -> torch.Tensor:
    """The whole batch [W x B_local, ...]: every rank's rows, concatenated in rank order (x itself
    without a group)."""
    if group is None:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts)


def world_group():
    """All ranks (None on a single process)."""
    return dist.group.WORLD if is_active() else None


def broadcast_state(module: torch.nn.Module, source: int) -> None:
    """Overwrite `module`'s parameters and buffers with rank `source`'s (in place)."""
    for tensor in module.state_dict().values():
        dist.broadcast(tensor, src=source)


def gather_objects(obj) -> list:
    """Every rank's picklable `obj`, in rank order, on every rank (e.g. data positions)."""
    objects = [None] * world_size()
    dist.all_gather_object(objects, obj)
    return objects


def average_gradients(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Replace each gradient by its mean over the ranks (a no-op on a single process).

    The losses are means over the local batch of B / W rows, so this mean is the gradient of the
    loss on the global batch. Parameters without a gradient are skipped (alike on every rank).
    """
    group = batch_group()
    if group is None:
        return
    world = dist.get_world_size(group)
    grads = [p.grad for p in parameters if p.grad is not None]
    handles = [dist.all_reduce(g, op=dist.ReduceOp.SUM, group=group, async_op=True) for g in grads]
    for grad, handle in zip(grads, handles):
        handle.wait()
        grad.div_(world)


def check_same_on_every_rank(module: torch.nn.Module, what: str) -> None:
    """Raise unless every floating tensor of `module`'s state is bit-identical on every rank.

    A checksum of the bits per tensor (sum of the int32 words, exact in int64) is compared by
    all-reducing its min and max: two small all-reduces, for a debug mode.
    """
    group = batch_group()
    if group is None:
        return
    names, sums = [], []
    for name, tensor in module.state_dict().items():
        if tensor.is_floating_point():
            words = tensor.detach().float().contiguous().view(torch.int32)
            names.append(name)
            sums.append(words.sum(dtype=torch.int64))
    checksums = torch.stack(sums)
    low, high = min_over_ranks(checksums, group), -min_over_ranks(-checksums, group)
    differ = [name for name, lo, hi in zip(names, low.tolist(), high.tolist()) if lo != hi]
    if differ:
        raise RuntimeError(
            f"{what}: {', '.join(differ)} differ between ranks (rank {rank()}); "
            f"the ranks no longer train the same weights."
        )


# ---------------------------------------------------------------------------------------------
# The exact global BatchTopK threshold
# ---------------------------------------------------------------------------------------------

_DIGIT_BITS = 8


def _order_keys(values: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Integer keys ordered as the float values (for non-NaN values), and their bit width: int32
    for float32 (half and bfloat16 widen to it exactly), int64 for float64.

    IEEE floats are sign-magnitude: flipping the magnitude bits of negative numbers makes the bit
    patterns, read as two's complement integers, increase with the value.
    """
    if values.dtype == torch.float64:
        bits = values.view(torch.int64)
        return bits ^ ((bits >> 63) & 0x7FFF_FFFF_FFFF_FFFF), 64
    bits = values.float().view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFF_FFFF), 32


def _value_of_key(key: torch.Tensor, n_bits: int, dtype: torch.dtype) -> torch.Tensor:
    """The float (0-dim, `dtype`) whose order key is `key` (0-dim int64, sign-extended)."""
    bits = key.reshape(1)
    if n_bits == 64:
        return (bits ^ ((bits >> 63) & 0x7FFF_FFFF_FFFF_FFFF)).view(torch.float64)[0]
    bits = (bits ^ ((bits >> 31) & 0x7FFF_FFFF)).to(torch.int32)
    return bits.view(torch.float32)[0].to(dtype)


def n_largest_threshold(values: torch.Tensor, n: int, group) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, ties_to_keep) for selecting the n largest values of the union of every rank's `values`.

    `values` [N_r] are this rank's candidates, in the order in which ties are broken, the ranks'
    candidates coming in rank order; 1 <= n <= sum of N_r. Returns t, the n-th largest value of the
    union (0-dim, values.dtype), and how many of the local values equal to t are kept, first ones
    first (0-dim int64, possibly 0 or more than are local: compare a running count with it).
    Selected = values > t, and the first ties_to_keep values == t. Same on every rank: 5
    all-reduces (see the module docstring).
    """
    keys, n_bits = _order_keys(values)
    device = keys.device
    remaining = torch.tensor(n, dtype=torch.int64, device=device)  # rank of t among the unchosen
    above = torch.zeros((), dtype=torch.int64, device=device)  # values known to be > t
    prefix = torch.zeros((), dtype=torch.int64, device=device)  # bytes of t's key chosen so far
    for shift in range(n_bits - _DIGIT_BITS, -1, -_DIGIT_BITS):
        top = shift == n_bits - _DIGIT_BITS
        digits = ((keys >> shift) & 0xFF) ^ (0x80 if top else 0)  # the top byte is signed
        counts = torch.bincount(digits, minlength=256)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
        at_or_above = counts.flip(0).cumsum(0).flip(0)  # [d]: candidates with a byte >= d
        digit = (at_or_above >= remaining).sum() - 1  # the byte that holds the n-th largest
        higher = at_or_above[digit] - counts[digit]
        above += higher
        remaining -= higher
        prefix = digit - 0x80 if top else (prefix << _DIGIT_BITS) | digit
        keys = keys[digits == digit]  # the local candidates that share t's bytes so far
    t = _value_of_key(prefix, n_bits, values.dtype)
    ties = torch.zeros(dist.get_world_size(group), dtype=torch.int64, device=device)
    ties[dist.get_rank(group)] = keys.numel()  # what is left has t's key
    dist.all_reduce(ties, op=dist.ReduceOp.SUM, group=group)
    ties_before = ties[: dist.get_rank(group)].sum()
    return t, n - above - ties_before
