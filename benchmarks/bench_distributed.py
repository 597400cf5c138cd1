"""The distributed training step: what the ranks send each other, and how long it takes.

Run under torchrun (CPU gloo here; NCCL when --device cuda and one GPU per rank):

    torchrun --standalone --nproc_per_node 2 benchmarks/bench_distributed.py
    torchrun --standalone --nproc_per_node 2 benchmarks/bench_distributed.py --sizes 512x8192 --steps 5
    torchrun --standalone --nproc_per_node 8 benchmarks/bench_distributed.py --device cuda --batch 32768

For each size d_in x dict_size, a BatchTopK SAE of this project takes training steps
(training.py's `training_step`, with its `make_optimizer`) on synthetic activations, each rank on its batch / ranks rows of the global batch, and rank 0 prints:

* the bytes each rank sends into collectives per step and their number, split into the global
  BatchTopK agreement (select_batch_topk with the process group: the radix selection's histograms,
  the candidate count, the tie counts), the other batch statistics (fired mask, smallest kept
  value) and the gradient all-reduce, counted by wrapping torch.distributed's all_reduce;
* the median time of the threshold agreement (distributed.n_largest_threshold on the candidates
  select_batch_topk finds, next to a local kthvalue on them, the single-process counterpart), of
  the gradient all-reduce and of the whole step;
* the scaling efficiency: the step time of one rank alone on the whole global batch (the others
  waiting), over ranks x the distributed step time (1.0 = linear).

Timings are medians of --steps steps after --warmup untimed ones, with torch.set_num_threads(1) in
every rank by default (on a CPU machine each rank then has one core, as the baseline does). Rank 0
writes benchmarks/results/distributed.json (--json PATH elsewhere).
"""

from __future__ import annotations

import argparse
import statistics

import harness  # noqa: F401  (first: the repository's modules on sys.path)
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from matryoshka_sae import distributed  # noqa: E402
from matryoshka_sae.config import get_default_cfg, post_init_cfg  # noqa: E402
from matryoshka_sae.sae import BatchTopKSAE  # noqa: E402
from matryoshka_sae.training import make_optimizer, training_step  # noqa: E402


class CollectiveCounter:
    """Counts the bytes and calls of all_reduce / all_gather while `category` is set."""

    def __init__(self):
        self.category = None
        self.bytes: dict[str, int] = {}
        self.calls: dict[str, int] = {}
        self._all_reduce = dist.all_reduce

        def counting_all_reduce(tensor, *args, **kwargs):
            if self.category is not None:
                self.bytes[self.category] = (
                    self.bytes.get(self.category, 0) + tensor.numel() * tensor.element_size()
                )
                self.calls[self.category] = self.calls.get(self.category, 0) + 1
            return self._all_reduce(tensor, *args, **kwargs)

        dist.all_reduce = counting_all_reduce
        average_gradients = distributed.average_gradients

        def counted_average_gradients(
            parameters,
        ):  # the step's gradient all-reduce, by its own name
            outer, self.category = self.category, "gradients" if self.category is not None else None
            try:
                return average_gradients(parameters)
            finally:
                self.category = outer

        distributed.average_gradients = counted_average_gradients

    def reset(self):
        self.bytes.clear()
        self.calls.clear()


def make_sae(d_in: int, dict_size: int, batch: int, k: int, device: str) -> BatchTopKSAE:
    cfg = get_default_cfg()
    cfg.update(
        model_name="synthetic",
        act_size=d_in,
        dict_size=dict_size,
        top_k=k,
        batch_size=batch,
        sae_type="batchtopk",
        device=device,
        wandb_mode="disabled",
        seed=0,
    )
    return BatchTopKSAE(post_init_cfg(cfg))


def synthetic_batch(step: int, rows: int, d_in: int, device: str) -> torch.Tensor:
    """Rank-dependent activations with a few strong directions (so the selection is not uniform)."""
    generator = torch.Generator().manual_seed(1000 * step + distributed.rank())
    codes = torch.rand(rows, 8 * d_in // 64, generator=generator).pow(8)
    directions = torch.randn(codes.shape[1], d_in, generator=torch.Generator().manual_seed(7))
    return (codes @ directions + 0.05 * torch.randn(rows, d_in, generator=generator)).to(device)


def timed(fn, device: str) -> float:
    """harness.timed, the ranks starting together (so that no rank's wait for another counts)."""
    harness.synchronize(device)
    if distributed.batch_group() is not None:
        dist.barrier()
    return harness.timed(fn, device)


def counted_step(sae, optimizer, x, counter: CollectiveCounter | None) -> None:
    """training.py's step on x; with a counter, its collectives counted (batch statistics, gradients)."""
    if counter is not None:
        counter.category = "batch statistics"
    training_step(sae, optimizer, (x,), sae.cfg["lr"], sae.cfg["max_grad_norm"])
    if counter is not None:
        counter.category = None


def candidates(pre: torch.Tensor, lower_bound: torch.Tensor, k: int) -> tuple[torch.Tensor, int]:
    """This rank's candidate values for the global BatchTopK (as select_batch_topk finds them: the
    entries above the lower bound when there are enough over all ranks, else each row's 4k largest)
    and the number to keep, k x the global batch."""
    n_keep = k * pre.shape[0] * distributed.world_size()
    if lower_bound > 0:
        values = pre[pre >= lower_bound]
        enough = distributed.sum_over_ranks(
            torch.tensor(values.numel(), device=pre.device), distributed.batch_group()
        )
        if enough >= n_keep:
            return values, n_keep
    return pre.topk(4 * k, dim=1, sorted=False).values.flatten(), n_keep


def measure(d_in: int, dict_size: int, args, counter: CollectiveCounter) -> dict:
    ranks, device = distributed.world_size(), args.device
    local_rows = distributed.local_batch_size(args.batch)
    sae = make_sae(d_in, dict_size, args.batch, args.k, device)
    optimizer = make_optimizer(sae, sae.cfg)
    sae.train()
    step_times, grad_times, agree_times, kth_times = [], [], [], []
    for step in range(args.warmup + args.steps):
        x = synthetic_batch(step, local_rows, d_in, device)
        counter.reset()
        step_time = timed(lambda: counted_step(sae, optimizer, x, counter), device)
        per_step = (dict(counter.bytes), dict(counter.calls))
        # The threshold agreement alone, on the candidates select_batch_topk would use.
        with torch.no_grad():
            pre = sae.preactivations(x - sae.b_dec)
        values, n_keep = candidates(pre, 0.8 * sae.threshold, args.k)
        counter.reset()
        counter.category = "threshold agreement"
        agree = timed(
            lambda: distributed.n_largest_threshold(values, n_keep, distributed.batch_group()),
            device,
        )
        counter.category = None
        agreement = (dict(counter.bytes), dict(counter.calls))
        kth = timed(lambda: values.kthvalue(max(1, values.numel() - n_keep // ranks + 1)), device)
        for p in sae.parameters():
            p.grad = torch.zeros_like(p)
        grads = timed(lambda: distributed.average_gradients(sae.parameters()), device)
        optimizer.zero_grad(set_to_none=True)
        if step >= args.warmup:
            step_times.append(step_time)
            agree_times.append(agree)
            kth_times.append(kth)
            grad_times.append(grads)
    result = {
        "step_s": statistics.median(step_times),
        "agreement_s": statistics.median(agree_times),
        "local_kthvalue_s": statistics.median(kth_times),
        "n_candidates": values.numel(),
        "gradients_s": statistics.median(grad_times),
        "bytes": per_step[0],
        "calls": per_step[1],
        "agreement_bytes": agreement[0].get("threshold agreement", 0),
        "agreement_calls": agreement[1].get("threshold agreement", 0),
    }
    result["baseline_step_s"] = (
        single_rank_baseline(d_in, dict_size, args) if ranks > 1 else result["step_s"]
    )
    return result


def single_rank_baseline(d_in: int, dict_size: int, args) -> float | None:
    """Rank 0 alone steps on the whole global batch (no reductions); the others wait."""
    median = None
    if distributed.is_main_process():
        with distributed.local_batches():
            sae = make_sae(d_in, dict_size, args.batch, args.k, args.device)
            optimizer = make_optimizer(sae, sae.cfg)
            times = []
            for step in range(args.warmup + args.steps):
                x = synthetic_batch(step, args.batch, d_in, args.device)
                elapsed = timed(lambda: counted_step(sae, optimizer, x, None), args.device)
                if step >= args.warmup:
                    times.append(elapsed)
            median = statistics.median(times)
    dist.barrier()
    return median


def report(size: str, result: dict, args) -> str:
    ranks = distributed.world_size()
    total = sum(result["bytes"].values())
    calls = sum(result["calls"].values())
    efficiency = result["baseline_step_s"] / (ranks * result["step_s"])
    tokens_per_s = args.batch / result["step_s"]
    lines = [
        f"{size}, global batch {args.batch} ({args.batch // ranks} a rank), k {args.k}, {ranks} ranks, "
        f"{args.device}:",
        f"  sent per rank and step: {total / 1e6:.2f} MB in {calls} all-reduces: "
        + ", ".join(
            f"{name} {b / 1e3:.1f} kB ({result['calls'][name]})"
            for name, b in result["bytes"].items()
        ),
        f"  threshold agreement: {result['agreement_bytes']} bytes in {result['agreement_calls']} all-reduces, "
        f"{result['agreement_s'] * 1e3:.2f} ms on {result['n_candidates']:,} candidates (a local kthvalue on them: "
        f"{result['local_kthvalue_s'] * 1e3:.2f} ms)",
        f"  gradient all-reduce: {result['bytes'].get('gradients', 0) / 1e6:.2f} MB, "
        f"{result['gradients_s'] * 1e3:.1f} ms",
        f"  step: {result['step_s'] * 1e3:.1f} ms ({tokens_per_s:,.0f} tokens/s); one rank on the whole batch "
        f"{result['baseline_step_s'] * 1e3:.1f} ms; scaling efficiency {efficiency:.2f}",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", nargs="+", default=["512x8192", "768x12288"])
    parser.add_argument("--batch", type=int, default=4096, help="global batch (activations a step)")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument(
        "--json", help="the result file (default benchmarks/results/distributed.json)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = {"batch_size": args.batch, "device": args.device, "distributed_timeout_s": 600}
    distributed.init_from_env(cfg)
    args.device = cfg["device"]
    counter = CollectiveCounter()
    at_start, rows = harness.environment(threads=args.threads), []
    try:
        for size in args.sizes:
            d_in, dict_size = (int(n) for n in size.split("x"))
            result = measure(d_in, dict_size, args, counter)
            if distributed.is_main_process():
                print(report(size, result, args), flush=True)
                rows.append(result_row(size, result, args))
        if distributed.is_main_process():
            settings = {
                "global_batch": args.batch,
                "k": args.k,
                "ranks": distributed.world_size(),
                "device": args.device,
                "torch_threads_per_rank": args.threads,
                "warmup_steps": args.warmup,
                "timed_steps": args.steps,
            }
            harness.save(
                "distributed",
                "The distributed BatchTopK step under torchrun",
                rows,
                settings,
                notes="Scaling efficiency: one rank alone on the whole global batch over ranks x the "
                "distributed step time (1.0 is linear).",
                environment_at_start=at_start,
                path=args.json,
            )
    finally:
        distributed.shut_down()


def result_row(size: str, result: dict, args) -> dict:
    ranks = distributed.world_size()
    return {
        "size": size,
        "ranks": ranks,
        "step_ms": round(result["step_s"] * 1e3, 1),
        "tokens_per_s": round(args.batch / result["step_s"]),
        "one_rank_step_ms": round(result["baseline_step_s"] * 1e3, 1),
        "scaling_efficiency": round(result["baseline_step_s"] / (ranks * result["step_s"]), 2),
        "sent_MB_per_rank_step": round(sum(result["bytes"].values()) / 1e6, 3),
        "all_reduces": sum(result["calls"].values()),
        "gradient_allreduce_ms": round(result["gradients_s"] * 1e3, 1),
        "threshold_agreement_ms": round(result["agreement_s"] * 1e3, 2),
    }


if __name__ == "__main__":
    main()
