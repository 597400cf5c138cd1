"""Where a training step's time goes: torch.profiler over the step of a Matryoshka transcoder set
(30 layers) and of a Matryoshka CLT, at SmolLM2-135M's sizes (d 576), by operator.

    python benchmarks/profile_step.py                     # results/profile_step.json
    python benchmarks/profile_step.py --cases set --dict-sizes 1152 4608

Each case runs in its own process (harness.run_isolated), on synthetic activations (sources
x ~ N(0, 1), targets y = relu(x) M, a fixed random map per layer), through the library's own step
(`training_steps` of the set's dictionaries, `training_step` of the CLT), warmed up, then profiled
over --steps steps. Reported per case: the seconds per step and, for the operators with the most
self CPU time, their share of it (aten::addmm: the dense encoder; embedding_bag: sparse decodes;
nonzero / kthvalue / sort: BatchTopK's selection; lerp_ / addcdiv_ / sqrt: Adam). A CLT of 4,608
latents a layer over 30 layers holds 1.2 billion decoder weights (about 20 GB with Adam's state):
run it with fewer --layers.
"""

from __future__ import annotations

import argparse
import sys
import time

import harness  # noqa: F401  (first: import paths)
from harness import emit, environment, run_isolated, save, worker_env

CASES = ("set", "clt")


def cfgs_of(case: str, args) -> list[dict]:
    from matryoshka_sae.config import get_default_cfg, post_init_cfg

    shared = dict(
        model_name="smollm2-135m",
        device="cpu",
        dict_size=args.dict_size,
        top_k=args.top_k,
        batch_size=args.batch_size,
        wandb_mode="disabled",
    )
    if case == "clt":
        from matryoshka_sae.cli.train_clt import CLT_DEFAULTS

        cfg = get_default_cfg()
        cfg.update(CLT_DEFAULTS)
        cfg.update(shared, group_sizes=None, clt_layers=list(range(args.layers)))
        return [post_init_cfg(cfg)]
    from matryoshka_sae.transcoder_set import default_set_cfg, transcoder_set_cfgs

    base = post_init_cfg(default_set_cfg(**shared))
    return transcoder_set_cfgs(base, range(args.layers), "/tmp/unused-set", kind="matryoshka")


def worker(args) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from matryoshka_sae.sae import create_sae
    from matryoshka_sae.step import make_optimizer, training_steps

    torch.manual_seed(0)
    cfgs = cfgs_of(args.case, args)
    dictionaries = [create_sae(cfg) for cfg in cfgs]
    optimizers = [make_optimizer(d, cfg) for d, cfg in zip(dictionaries, cfgs)]
    width = cfgs[0]["act_size"]
    sources = torch.randn(args.layers, args.batch_size, width)
    maps = torch.randn(args.layers, width, width) / width**0.5
    targets = torch.relu(sources) @ maps
    if args.case == "clt":
        batches = [(*sources, *targets)]  # a CLT's batch: every layer's source, then every target
    else:
        batches = list(zip(sources, targets))
    for dictionary, batch in zip(dictionaries, batches):
        dictionary.initialize_from_batch(*batch)
    lrs = [cfg["lr"] for cfg in cfgs]
    norms = [cfg["max_grad_norm"] for cfg in cfgs]

    def step() -> None:
        training_steps(dictionaries, optimizers, batches, lrs, norms)

    for _ in range(args.warmup):
        step()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for _ in range(args.steps):
            step()
    seconds = (time.perf_counter() - start) / args.steps
    events = profiler.key_averages()
    total = sum(event.self_cpu_time_total for event in events)
    top = sorted(events, key=lambda event: event.self_cpu_time_total, reverse=True)[: args.top]
    emit(
        {
            "case": args.case,
            "dict_size": args.dict_size,
            "layers": args.layers,
            "seconds_per_step": round(seconds, 4),
            "operators": {event.key: round(event.self_cpu_time_total / total, 4) for event in top},
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--case", choices=CASES, help="(the worker's)")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--dict-size", type=int, default=1152, help="(the worker's)")
    parser.add_argument("--dict-sizes", type=int, nargs="+", default=[1152, 4608])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--clt-layers", type=int, default=None, help="the CLT's (default --layers)")
    parser.add_argument("--top-k", type=int, default=16, help="active latents a layer and token")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--top", type=int, default=12, help="operators reported a case")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    started = environment(args.threads)
    rows = []
    for dict_size in args.dict_sizes:
        for case in args.cases:
            layers = args.clt_layers or args.layers if case == "clt" else args.layers
            result = run_isolated(
                [
                    __file__,
                    "--worker",
                    "--case",
                    case,
                    "--dict-size",
                    dict_size,
                    "--layers",
                    layers,
                    "--top-k",
                    args.top_k,
                    "--batch-size",
                    args.batch_size,
                    "--steps",
                    args.steps,
                    "--warmup",
                    args.warmup,
                    "--top",
                    args.top,
                ],
                env=worker_env(args.threads),
                timeout=3600,
            )
            if "error" in result:
                sys.exit(f"profile_step.py: {case} at {dict_size} failed: {result['error']}")
            print(result, flush=True)
            rows.append(result)
    save(
        "profile_step",
        "Where a set's and a CLT's training step spend their time (torch.profiler, self CPU)",
        rows,
        {
            "d_model": 576,
            "top_k": args.top_k,
            "batch_size": args.batch_size,
            "threads": args.threads,
            "steps": args.steps,
            "kind": "matryoshka",
        },
        columns=["case", "dict_size", "layers", "seconds_per_step", "operators"],
        environment_at_start=started,
        notes="Synthetic activations; the library's own step; each case in its own process; "
        "operators: the largest shares of the profiled steps' self CPU time (the profiler's own "
        "overhead included in seconds_per_step).",
    )


if __name__ == "__main__":
    main()
