"""What a transcoder set costs against one layer alone (SmolLM2-135M's sizes: 30 layers, d 576).

    python benchmarks/bench_transcoder_set.py            # results/transcoder_set_cost.json

Each case runs in its own process (harness.run_isolated), on synthetic activations of SmolLM2's
width, through the library's own step (training.make_optimizer, training.training_step):

    one layer     one transcoder's step
    the set       the steps of L transcoders on their own layers' batches, as the training loop
                  runs them after one model pass

and reports the time per step and the process's peak memory (max RSS). The set's SAE work must
cost no more than L separate steps would: ratio = set step / (L x one step), about 1. The model's
own pass (one pass to the last layer for the set, a pass to layer l for one layer) is measured by
benchmarks/transcoder_sets.py's training run and reported there.
"""

from __future__ import annotations

import argparse
import resource
import sys

import harness  # noqa: F401  (first: import paths)
from harness import emit, environment, run_isolated, save, step_times, worker_env


def worker(args) -> None:
    import torch

    from matryoshka_sae.config import post_init_cfg
    from matryoshka_sae.sae import create_sae
    from matryoshka_sae.training import lr_at_step, make_optimizer, training_step
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
    optimizers = [make_optimizer(t, cfg) for t, cfg in zip(transcoders, cfgs)]
    d = cfgs[0]["act_size"]
    batches = [
        (torch.randn(args.batch_size, d), torch.randn(args.batch_size, d)) for _ in transcoders
    ]
    for t, (source, target) in zip(transcoders, batches):
        t.initialize_from_batch(source, target)

    def step(i: int) -> None:
        for t, optimizer, cfg, inputs in zip(transcoders, optimizers, cfgs, batches):
            training_step(t, optimizer, inputs, lr_at_step(i, 1000, cfg), cfg["max_grad_norm"])

    times = step_times(step, args.steps, args.warmup)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    emit(
        {
            "layers": args.layers,
            "seconds_per_step": sorted(times)[len(times) // 2],
            "peak_rss_mb": round(peak_mb),
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--dict-size", type=int, default=4608)
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--kind", default="matryoshka")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    started = environment(args.threads)
    common = [
        "--dict-size",
        args.dict_size,
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
    ]
    one = run_isolated([__file__, "--worker", "--layers", 1, *common], env=worker_env(args.threads))
    whole = run_isolated(
        [__file__, "--worker", "--layers", args.layers, *common], env=worker_env(args.threads)
    )
    for result in (one, whole):
        if "error" in result:
            sys.exit(f"bench_transcoder_set.py: a case failed: {result['error']}")
    ratio = whole["seconds_per_step"] / (args.layers * one["seconds_per_step"])
    rows = [
        {"case": "one layer", **one},
        {"case": f"the set ({args.layers} layers)", **whole},
        {
            "case": "set / (layers x one)",
            "layers": args.layers,
            "seconds_per_step": round(ratio, 3),
            "peak_rss_mb": None,
        },
    ]
    print(rows)
    save(
        "transcoder_set_cost",
        "A transcoder set's SAE steps against one layer's (SmolLM2-135M sizes)",
        rows,
        {
            "d_model": 576,
            "dict_size": args.dict_size,
            "top_k": args.top_k,
            "batch_size": args.batch_size,
            "kind": args.kind,
            "threads": args.threads,
            "steps": args.steps,
        },
        environment_at_start=started,
        notes="Median step time over the steps, each case in its own process on synthetic activations; "
        "the last row is the set's step time over layers x one layer's (1.0: no overhead).",
    )


if __name__ == "__main__":
    main()
