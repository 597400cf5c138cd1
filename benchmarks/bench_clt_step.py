"""What a cross-layer transcoder's training step costs against the per-layer transcoder set's
(SmolLM2-135M's sizes: 30 layers, d 576; the sizes of benchmarks/clt_comparison.py).

    python benchmarks/bench_clt_step.py            # results/clt_step_cost.json

Each case runs in its own process (harness.run_isolated), on synthetic activations of SmolLM2's
width (sources x_j ~ N(0, 1); targets y_m = relu(x_m) M_m, a fixed random map per layer), through
the library's own step (training.make_optimizer, training.training_step), at equal latents a layer
and equal L0 summed over layers:

    set                 30 Matryoshka transcoders, one step each on its layer's batch
    matryoshka CLT      global BatchTopK, Matryoshka groups
    batchtopk CLT       global BatchTopK, one group
    matryoshka CLT, 30% dead
                        a third of the latents (those of the first layers) made dead and unable to
                        fire, so that AuxK decodes each token's top_k_aux dead latents to every
                        later layer: the cost of the auxiliary loss once latents die

and reports the median time per step and the process's peak memory (max RSS). The model's own
pass is the same for all (one pass through every layer) and is not included.
"""

from __future__ import annotations

import argparse
import resource
import sys

import harness  # noqa: F401  (first: import paths)
from harness import emit, environment, run_isolated, save, step_times, worker_env

CASES = ("set", "matryoshka CLT", "batchtopk CLT", "matryoshka CLT, 30% dead")


def synthetic_batch(layers: int, batch: int, d: int, maps: list):
    """(sources, targets) lists of [batch, d] tensors, one of each per layer."""
    import torch

    sources = [torch.randn(batch, d) for _ in range(layers)]
    return sources, [torch.relu(x) @ m for x, m in zip(sources, maps)]


def worker(args) -> None:
    import torch

    from matryoshka_sae.config import get_default_cfg, post_init_cfg
    from matryoshka_sae.sae import create_sae
    from matryoshka_sae.training import lr_at_step, make_optimizer, training_step
    from matryoshka_sae.transcoder_set import default_set_cfg, transcoder_set_cfgs

    torch.manual_seed(0)
    groups = args.group_sizes if args.case != "batchtopk CLT" else [args.dict_size]
    settings = dict(
        model_name="smollm2-135m",
        device="cpu",
        dict_size=args.dict_size,
        group_sizes=groups,
        top_k=args.top_k,
        batch_size=args.batch_size,
        wandb_mode="disabled",
        input_unit_norm=False,
    )
    d = 576
    maps = [torch.randn(d, d) / d**0.5 for _ in range(args.layers)]
    if args.case == "set":
        cfgs = transcoder_set_cfgs(
            post_init_cfg(default_set_cfg(**settings)), range(args.layers), "/tmp/unused-set"
        )
        dictionaries = [create_sae(cfg) for cfg in cfgs]
        sources, targets = synthetic_batch(args.layers, args.batch_size, d, maps)
        inputs = [(x, y) for x, y in zip(sources, targets)]
        for t, batch in zip(dictionaries, inputs):
            t.initialize_from_batch(*batch)
    else:
        cfg = get_default_cfg()
        cfg.update(settings, sae_type="matryoshka_clt", clt_layers=list(range(args.layers)))
        cfgs = [post_init_cfg(cfg)]
        clt = create_sae(cfgs[0])
        sources, targets = synthetic_batch(args.layers, args.batch_size, d, maps)
        clt.initialize_from_batch(*sources, *targets)
        if args.case.endswith("dead"):
            with torch.no_grad():
                n_dead = int(0.3 * clt.n_latents)
                clt.b_enc[:n_dead] -= 100.0
                clt.tokens_since_fired[:n_dead] = 10**9
        dictionaries, inputs = [clt], [(*sources, *targets)]
    optimizers = [make_optimizer(t, cfg) for t, cfg in zip(dictionaries, cfgs)]

    def step(i: int) -> None:
        for t, optimizer, cfg, batch in zip(dictionaries, optimizers, cfgs, inputs):
            training_step(t, optimizer, batch, lr_at_step(i, 1000, cfg), cfg["max_grad_norm"])

    times = step_times(step, args.steps, args.warmup)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    parameters = sum(p.numel() for t in dictionaries for p in t.parameters())
    emit(
        {
            "parameters": parameters,
            "seconds_per_step": round(sorted(times)[len(times) // 2], 3),
            "peak_rss_mb": round(peak_mb),
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--case", choices=CASES)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--dict-size", type=int, default=256, help="latents a layer")
    parser.add_argument("--group-sizes", type=int, nargs="+", default=[16, 32, 64, 144])
    parser.add_argument("--top-k", type=int, default=8, help="active latents a layer and token")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    started = environment(args.threads)
    common = [
        "--layers",
        args.layers,
        "--dict-size",
        args.dict_size,
        "--group-sizes",
        *args.group_sizes,
        "--top-k",
        args.top_k,
        "--batch-size",
        args.batch_size,
        "--steps",
        args.steps,
        "--warmup",
        args.warmup,
    ]
    rows = []
    for case in CASES:
        result = run_isolated(
            [__file__, "--worker", "--case", case, *common], env=worker_env(args.threads)
        )
        if "error" in result:
            sys.exit(f"bench_clt_step.py: {case} failed: {result['error']}")
        rows.append({"case": case, **result})
        print(rows[-1], flush=True)
    set_step = rows[0]["seconds_per_step"]
    for row in rows:
        row["step_vs_set"] = round(row["seconds_per_step"] / set_step, 2)
    save(
        "clt_step_cost",
        "A cross-layer transcoder's training step against the transcoder set's (SmolLM2 sizes)",
        rows,
        {
            "d_model": 576,
            "layers": args.layers,
            "dict_size_per_layer": args.dict_size,
            "group_sizes": args.group_sizes,
            "top_k_per_layer": args.top_k,
            "batch_size": args.batch_size,
            "threads": args.threads,
            "steps": args.steps,
        },
        environment_at_start=started,
        notes="Median step time, each case in its own process on synthetic activations; parameters of the "
        "dictionaries (the set's 30 together). step_vs_set: the case's step over the set's.",
    )


if __name__ == "__main__":
    main()
