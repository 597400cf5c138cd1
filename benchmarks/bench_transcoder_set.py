"""What a transcoder set costs against one layer alone (SmolLM2-135M's sizes: 30 layers, d 576).

    python benchmarks/bench_transcoder_set.py            # results/transcoder_set_cost.json
    python benchmarks/bench_transcoder_set.py --dict-sizes 1152 4608 --before HEAD~1 --after HEAD

Each case runs in its own process (harness.run_isolated), on synthetic activations of SmolLM2's
width, through the library's own step (training.make_optimizer; training.training_steps, the
step the training loop takes for a group, or with a library that predates it training.training_step
of each dictionary in turn, as its loop did):

    one layer     one transcoder's step
    the set       the step of L transcoders on their own layers' batches, as the training loop
                  runs it after one model pass

and reports the time per step and the process's peak memory (max RSS), for each dictionary size.
The set's SAE work must cost no more than L separate steps would: ratio = set step / (L x one
step), about 1. The model's own pass (one pass to the last layer for the set, a pass to layer l for
one layer) is measured by benchmarks/transcoder_sets.py's training run and reported there.

Before and after a change (--before REV, and --after REV or the working tree): the set's step of
the library at each commit (its matryoshka_sae/ from ``git archive``, run by this file's worker),
measured in alternating processes, before, after, before, after, ... (--rounds pairs), so that a
machine whose load drifts slows both alike; the ratio after / before is taken pair by pair and its
median reported, beside the median seconds of each side.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import harness  # noqa: F401  (first: import paths)
from harness import (
    commit_of,
    emit,
    environment,
    library_at,
    run_isolated,
    save,
    step_times,
    worker_env,
)


def worker(args) -> None:
    import torch

    from matryoshka_sae import training
    from matryoshka_sae.config import post_init_cfg
    from matryoshka_sae.sae import create_sae
    from matryoshka_sae.transcoder_set import default_set_cfg, transcoder_set_cfgs

    torch.manual_seed(0)
    base = post_init_cfg(
        default_set_cfg(
            model_name="smollm2-135m",
            device="cpu",
            dict_size=args.dict_size,
            top_k=args.top_k,
            batch_size=args.batch_size,
            wandb_mode="disabled",
        )
    )
    cfgs = transcoder_set_cfgs(base, range(args.layers), "/tmp/unused-set", kind=args.kind)
    transcoders = [create_sae(cfg) for cfg in cfgs]
    optimizers = [training.make_optimizer(t, cfg) for t, cfg in zip(transcoders, cfgs)]
    d = cfgs[0]["act_size"]
    batches = [
        (torch.randn(args.batch_size, d), torch.randn(args.batch_size, d)) for _ in transcoders
    ]
    for t, (source, target) in zip(transcoders, batches):
        t.initialize_from_batch(source, target)
    max_grad_norms = [cfg["max_grad_norm"] for cfg in cfgs]
    group_step = getattr(training, "training_steps", None)  # absent before the batched update

    def step(i: int) -> None:
        lrs = [training.lr_at_step(i, 1000, cfg) for cfg in cfgs]
        if group_step is not None:
            group_step(transcoders, optimizers, batches, lrs, max_grad_norms)
            return
        for t, optimizer, inputs, lr, max_norm in zip(
            transcoders, optimizers, batches, lrs, max_grad_norms
        ):
            training.training_step(t, optimizer, inputs, lr, max_norm)

    cpu_seconds = []  # the process's CPU time: what other work on a shared machine disturbs least

    def timed_step(i: int) -> None:
        start = time.process_time()
        step(i)
        cpu_seconds.append(time.process_time() - start)

    times = step_times(timed_step, args.steps, args.warmup)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    emit(
        {
            "layers": args.layers,
            "seconds_per_step": statistics.median(times),
            "peak_rss_mb": round(peak_mb),
            "fastest_step": min(times),
            "cpu_seconds_per_step": statistics.median(cpu_seconds[args.warmup :]),
        }
    )


def measure(script, layers: int, dict_size: int, args) -> dict:
    """One case in its own process: the step of `layers` transcoders of `dict_size` latents."""
    result = run_isolated(
        [
            script,
            "--worker",
            "--layers",
            layers,
            "--dict-size",
            dict_size,
            "--top-k",
            args.top_k,
            "--batch-size",
            args.batch_size,
            "--kind",
            args.kind,
            "--steps",
            args.steps,
            "--warmup",
            args.warmup,
        ],
        env=worker_env(args.threads),
    )
    if "error" in result:
        sys.exit(f"bench_transcoder_set.py: a case failed: {result['error']}")
    return result


def cost_rows(dict_size: int, one: dict, whole: dict, layers: int) -> list[dict]:
    """The set against one layer (the rows this benchmark has always written)."""
    ratio = whole["seconds_per_step"] / (layers * one["seconds_per_step"])
    return [
        {"case": "one layer", "dict_size": dict_size, **one},
        {"case": f"the set ({layers} layers)", "dict_size": dict_size, **whole},
        {
            "case": "set / (layers x one)",
            "dict_size": dict_size,
            "layers": layers,
            "seconds_per_step": round(ratio, 3),
            "peak_rss_mb": None,
        },
    ]


def before_after_rows(dict_size: int, pairs: list[tuple[dict, dict]], labels, layers) -> list:
    """Median seconds of each side over the rounds, and the median of the pairs' after / before;
    the same for the process's CPU seconds per step (other work on a shared machine slows the
    wall clock far more than it adds CPU time), and the ratio of the fastest steps."""
    rows = []
    for side, label in enumerate(labels):
        runs = [pair[side] for pair in pairs]
        rows.append(
            {
                "case": f"the set, {label}",
                "dict_size": dict_size,
                "layers": layers,
                "seconds_per_step": statistics.median(r["seconds_per_step"] for r in runs),
                "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
                "fastest_step": min(r["fastest_step"] for r in runs),
                "cpu_seconds_per_step": statistics.median(r["cpu_seconds_per_step"] for r in runs),
            }
        )
    ratios = [after["seconds_per_step"] / before["seconds_per_step"] for before, after in pairs]
    cpu_ratios = [a["cpu_seconds_per_step"] / b["cpu_seconds_per_step"] for b, a in pairs]
    rows.append(
        {
            "case": "after / before (median of the pairs)",
            "dict_size": dict_size,
            "layers": layers,
            "seconds_per_step": round(statistics.median(ratios), 3),
            "peak_rss_mb": None,
            "pair_ratios": [round(r, 3) for r in ratios],
            "fastest_step_ratio": round(rows[1]["fastest_step"] / rows[0]["fastest_step"], 3),
            "cpu_seconds_ratio": round(statistics.median(cpu_ratios), 3),
            "pair_cpu_ratios": [round(r, 3) for r in cpu_ratios],
        }
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--dict-size", type=int, default=4608, help="(the worker's)")
    parser.add_argument("--dict-sizes", type=int, nargs="+", default=None)
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--kind", default="matryoshka")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--before", help="a commit: compare its set step with --after's")
    parser.add_argument("--after", help="a commit (default: the working tree)")
    parser.add_argument("--rounds", type=int, default=3, help="before/after pairs per size")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    dict_sizes = args.dict_sizes or [args.dict_size]
    started = environment(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        after = (
            __file__
            if args.after is None
            else library_at(args.after, Path(scratch) / "after", __file__)
        )
        before = (
            None
            if args.before is None
            else library_at(args.before, Path(scratch) / "before", __file__)
        )
        labels = (
            f"before ({commit_of(args.before) if args.before else ''})",
            f"after ({commit_of(args.after) if args.after else 'working tree'})",
        )
        rows = []
        for dict_size in dict_sizes:
            one = measure(after, 1, dict_size, args)
            if before is None:
                whole = measure(after, args.layers, dict_size, args)
                rows += cost_rows(dict_size, one, whole, args.layers)
                continue
            pairs = [
                (
                    measure(before, args.layers, dict_size, args),
                    measure(after, args.layers, dict_size, args),
                )
                for _ in range(args.rounds)
            ]
            compared = before_after_rows(dict_size, pairs, labels, args.layers)
            whole = {key: compared[1][key] for key in one}  # the after side's set
            rows += cost_rows(dict_size, one, whole, args.layers) + compared
    print(rows)
    save(
        "transcoder_set_cost",
        "A transcoder set's SAE steps against one layer's (SmolLM2-135M sizes)",
        rows,
        {
            "d_model": 576,
            "dict_sizes": dict_sizes,
            "top_k": args.top_k,
            "batch_size": args.batch_size,
            "kind": args.kind,
            "threads": args.threads,
            "steps": args.steps,
            "before": args.before and commit_of(args.before),
            "after": commit_of(args.after) if args.after else "working tree",
            "rounds": args.rounds if args.before else None,
        },
        columns=["case", "dict_size", "layers", "seconds_per_step", "peak_rss_mb"],
        environment_at_start=started,
        notes="Median step time over the steps, each case in its own process on synthetic "
        "activations; 'set / (layers x one)' is the set's step time over layers x one layer's "
        "(1.0: no overhead). With a before commit: the set's step of the library before and "
        "after, in alternating processes (before, after, ...), the median of each side and the "
        "median of the pairs' ratios after / before (below 1: faster), each pair's in "
        "pair_ratios; cpu_seconds_ratio, the median of the pairs' ratios of the process's CPU "
        "seconds per step (which other work on a shared machine disturbs far less than the wall "
        "clock), and fastest_step_ratio, that of the fastest steps; the set row is then the "
        "after side's.",
    )


if __name__ == "__main__":
    main()
