"""Time one full SAE training step of this project and of its peers on the same activations.

A step is everything done once per batch of activations: forward, loss, backward, the
decoder-gradient projection (where the implementation has one), gradient clipping (where it has
it), the Adam step, decoder normalisation and zero_grad. Each implementation runs in its own
subprocess with the same thread count and the same allocator setting, on identical synthetic
activations (regenerated from one seed in every subprocess; a checksum proves they match):
`--warmup` untimed steps, then the median of `--steps` timed steps, each on a fresh batch.
Results are tokens/s and the ratio to sparsify's TopK; absolute numbers depend on the machine
and its load, so compare ratios measured in one run.

Setup (once): bash benchmarks/setup_bench_env.sh   (creates .bench-venv with the peers)

Usage, from any folder (any python; subprocesses use .bench-venv/bin/python):
    python benchmarks/bench_step.py                        # 512x8192 and 768x12288, all impls
    python benchmarks/bench_step.py --quick                # tiny sizes: a smoke test (minutes,
                                                           # mostly the peers' imports)
    python benchmarks/bench_step.py --impls ours_batchtopk,sparsify_topk --sizes 512x8192 --steps 5
    python benchmarks/bench_step.py --json /tmp/step.json         # the result file elsewhere
    python benchmarks/bench_step.py --no-malloc-tunables   # glibc's default allocator settings
    python benchmarks/bench_step.py --rounds 3             # best of 3 interleaved runs (noisy machine)
    python benchmarks/bench_step.py --device cuda --dtype bfloat16 --sizes 2304x36864   # ours on a GPU

On a GPU (--device cuda) and in bfloat16 only our implementations run (the peers stay on the CPU).

Implementations (--impls): ours_batchtopk, ours_topk, ours_matryoshka, ours_transcoder (this
project's sae.py, stepped by training.py's own `make_optimizer` and `training_step`: forward,
backward, remove_parallel_decoder_grad, clip_grad_norm_ to max_grad_norm, Adam over the class's
parameter groups, zero_grad, normalize_decoder; the transcoder maps a synthetic source to a
synthetic target of the same width),
and the peers of peers.py: saelens_batchtopk, saelens_matryoshka, dictlearn_batchtopk,
dictlearn_matryoshka, sparsify_topk. All share k, lr, Adam, batch size, the dead-latent window and
Matryoshka groups of 1:2:4:9 sixteenths of the dictionary; see peers.py for how each peer's step
is assembled from its own trainer code.

Results go to benchmarks/results/step.json (step_<device>_<dtype>.json off the CPU's float32;
--json PATH elsewhere; --quick writes none unless --json is given): one row per size and
implementation with tokens/s, the ratio to sparsify's TopK, the median step time and the first and
last loss, stamped by harness.py (failed implementations are left out and reported on stderr).

Synthetic activations: x = mu + sum_j a_j d_j + noise, with 8 x d_in planted unit directions d_j,
about 24 active per token drawn with Zipf-like frequencies and exponential magnitudes a_j, a
shared offset mu, and Gaussian noise at 5% of the signal's scale. The transcoder's target is the
same code read through a second planted dictionary.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import harness
from harness import BENCH_PYTHON

MALLOC_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"

OURS = {  # impl -> (cfg sae_type, class name in sae.py)
    "ours_batchtopk": ("batchtopk", "BatchTopKSAE"),
    "ours_topk": ("topk", "TopKSAE"),
    "ours_matryoshka": ("matryoshka", "GlobalBatchTopKMatryoshkaSAE"),
    "ours_transcoder": ("matryoshka_transcoder", "MatryoshkaTranscoder"),
}
PEER_NAMES = (
    "saelens_batchtopk",
    "saelens_matryoshka",
    "dictlearn_batchtopk",
    "dictlearn_matryoshka",
    "sparsify_topk",
)
ALL_IMPLS = tuple(OURS) + PEER_NAMES
BASELINE = "sparsify_topk"
FULL_SIZES = ("512x8192", "768x12288")
QUICK_SIZES = ("64x1024", "96x1536")


def parse_size(size: str) -> tuple[int, int]:
    try:
        d_in, dict_size = (int(part) for part in size.lower().split("x"))
    except ValueError:
        raise ValueError(
            f"--sizes entries look like 512x8192 (d_in x dict_size), got {size!r}."
        ) from None
    if dict_size % 16:
        raise ValueError(f"dict_size {dict_size} must be a multiple of 16 (groups 1:2:4:9 / 16).")
    return d_in, dict_size


# ---------------------------------------------------------------------------------------------
# Data (runs inside each worker; torch imported lazily so the driver needs no torch)
# ---------------------------------------------------------------------------------------------


def synthetic_batches(d_in: int, batch_size: int, n_batches: int, seed: int, with_target: bool):
    """List of n_batches (x [batch, d_in], y [batch, d_in] or None) float32 batches.

    x = mu + codes @ D + noise; y = codes @ D_target + noise (see the module docstring).
    """
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(seed)
    target_noise = torch.Generator().manual_seed(seed + 1)  # x must not depend on with_target
    n_features, active = 8 * d_in, 24
    D = F.normalize(torch.randn(n_features, d_in, generator=gen), dim=1)
    D_target = F.normalize(torch.randn(n_features, d_in, generator=gen), dim=1)
    mu = torch.randn(d_in, generator=gen)
    frequency = (torch.arange(n_features) + 10.0).pow(-0.8)
    batches = []
    for _ in range(n_batches):
        idx = torch.multinomial(frequency, batch_size * active, replacement=True, generator=gen)
        mags = torch.empty(batch_size * active).exponential_(1.0, generator=gen)
        idx, mags = idx.view(batch_size, active), mags.view(batch_size, active)
        x = mu + F.embedding_bag(idx, D, per_sample_weights=mags, mode="sum")
        x = x + 0.05 * x.std() * torch.randn(x.shape, generator=gen)
        y = None
        if with_target:
            y = F.embedding_bag(idx, D_target, per_sample_weights=mags, mode="sum")
            y = y + 0.05 * y.std() * torch.randn(y.shape, generator=target_noise)
        batches.append((x.contiguous(), y))
    return batches


# ---------------------------------------------------------------------------------------------
# Our implementations
# ---------------------------------------------------------------------------------------------


def our_cfg(
    sae_type: str,
    d_in: int,
    dict_size: int,
    k: int,
    batch_size: int,
    device: str = "cpu",
    dtype: str = "float32",
) -> dict:
    from matryoshka_sae.config import get_default_cfg, post_init_cfg

    cfg = get_default_cfg()
    cfg.update(
        model_name="synthetic",
        act_size=d_in,
        dict_size=dict_size,
        group_sizes=None,
        top_k=k,
        batch_size=batch_size,
        sae_type=sae_type,
        device=device,
        dtype=dtype,
    )
    if sae_type == "matryoshka_transcoder":
        cfg.update(source_site="resid_mid", source_layer=0, target_site="mlp_out", target_layer=0)
    return post_init_cfg(cfg)


def our_step(
    impl: str,
    d_in: int,
    dict_size: int,
    k: int,
    batch_size: int,
    first_batch,
    device: str = "cpu",
    dtype: str = "float32",
):
    """step(x, y) for one of our classes: training.py's `training_step` with its `make_optimizer`,
    after the first-batch initialisation a training run does; the step's loss.item() waits for the
    device, so a step's time includes the GPU's work."""
    from matryoshka_sae import sae as sae_module
    from matryoshka_sae.training import make_optimizer, training_step

    sae_type, class_name = OURS[impl]
    cfg = our_cfg(sae_type, d_in, dict_size, k, batch_size, device, dtype)
    sae = getattr(sae_module, class_name)(cfg)
    sae.train()
    transcoder = sae_type == "matryoshka_transcoder"
    x0, y0 = first_batch
    sae.initialize_from_batch(*((x0, y0) if transcoder else (x0,)))
    optimizer = make_optimizer(sae, cfg)

    def step(x, y=None) -> float:
        inputs = (x, y) if transcoder else (x,)
        return training_step(sae, optimizer, inputs, cfg["lr"], cfg["max_grad_norm"])["loss"].item()

    return step, cfg


def make_spec(d_in: int, dict_size: int, k: int, batch_size: int):
    """The peers' shared settings, taken from our defaults for the Matryoshka SAE."""
    from peers import Spec

    cfg = our_cfg("matryoshka", d_in, dict_size, k, batch_size)
    return Spec(
        d_in=d_in,
        dict_size=dict_size,
        k=k,
        batch_size=batch_size,
        lr=cfg["lr"],
        betas=(cfg["beta1"], cfg["beta2"]),
        aux_coeff=cfg["aux_penalty"],
        dead_after_batches=cfg["n_batches_to_dead"],
        group_sizes=list(cfg["group_sizes"]),
    )


# ---------------------------------------------------------------------------------------------
# Worker: one implementation, one size
# ---------------------------------------------------------------------------------------------


def run_worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    d_in, dict_size = parse_size(args.size)
    transcoder = args.worker == "ours_transcoder"
    batches = synthetic_batches(
        d_in, args.batch_size, args.warmup + args.steps, args.seed, with_target=transcoder
    )
    checksum = float(sum(x.double().sum() for x, _ in batches))
    if args.worker in OURS:
        batches = [
            (x.to(args.device), None if y is None else y.to(args.device)) for x, y in batches
        ]
        step, _ = our_step(
            args.worker,
            d_in,
            dict_size,
            args.k,
            args.batch_size,
            batches[0],
            args.device,
            args.dtype,
        )
    else:
        from peers import PEERS

        step = PEERS[args.worker](make_spec(d_in, dict_size, args.k, args.batch_size))
    losses = []

    def one_step(i: int) -> None:
        x, y = batches[i]
        losses.append(step(x, y) if transcoder else step(x))

    times = harness.step_times(one_step, args.steps, args.warmup, args.device)
    from peers import versions

    harness.emit(
        {
            "times": times,
            "losses": losses,
            "checksum": checksum,
            "versions": versions(),
            "threads": torch.get_num_threads(),
        }
    )


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def worker_env(malloc_tunables: bool, threads: int) -> dict[str, str]:
    env = harness.worker_env(threads)
    env.pop("GLIBC_TUNABLES", None)
    if malloc_tunables:
        env["GLIBC_TUNABLES"] = MALLOC_TUNABLES
    return env


def run_one(args, impl: str, size: str) -> dict:
    """Run one worker subprocess; returns its RESULT dict or {"error": ...}."""
    return harness.run_isolated(
        [
            Path(__file__).resolve(),
            "--worker",
            impl,
            "--size",
            size,
            "--batch-size",
            args.batch_size,
            "--k",
            args.k,
            "--steps",
            args.steps,
            "--warmup",
            args.warmup,
            "--threads",
            args.threads,
            "--seed",
            args.seed,
            "--device",
            args.device,
            "--dtype",
            args.dtype,
        ],
        python=args.python,
        env=worker_env(args.malloc_tunables, args.threads),
        timeout=args.timeout,
    )


def print_table(sizes, impls, rates, results) -> None:
    header = f"{'impl':22s}" + "".join(f"{s + ' tok/s':>20s}{'vs sparsify':>13s}" for s in sizes)
    print(header + "   loss first -> last")
    for impl in impls:
        row = f"{impl:22s}"
        losses = []
        for size in sizes:
            rate, base = rates[size].get(impl), rates[size].get(BASELINE)
            row += f"{rate:20.0f}" if rate else f"{'failed':>20s}"
            row += f"{rate / base:13.2f}" if rate and base else f"{'-':>13s}"
            result = results[size][impl]
            if "losses" in result:
                losses.append(f"{result['losses'][0]:.4g} -> {result['losses'][-1]:.4g}")
        print(row + "   " + "; ".join(losses))


def measure_size(args, size: str, impls) -> tuple[dict[str, float], dict[str, dict]]:
    """tokens/s and worker results of each implementation at one size.

    With --rounds R every implementation runs R times, the rounds interleaved so that a change of
    load hits all alike; its fastest round counts.
    """
    rates: dict[str, float] = {}
    results: dict[str, dict] = {}
    checksums = set()
    for _ in range(args.rounds):
        for impl in impls:
            result = run_one(args, impl, size)
            if "error" in result:
                print(f"  {size} {impl}: FAILED {result['error']}", file=sys.stderr, flush=True)
                results.setdefault(impl, result)
                continue
            checksums.add(round(result["checksum"], 3))
            median = statistics.median(result["times"])
            rate = args.batch_size / median
            print(
                f"  {size} {impl:22s} {rate:9.0f} tok/s  (median {median * 1e3:.0f} ms)", flush=True
            )
            if rate > rates.get(impl, 0.0):
                rates[impl], results[impl] = rate, result
    if len(checksums) > 1:
        print(
            f"WARNING: {size}: the workers saw different data (checksums {checksums})",
            file=sys.stderr,
        )
    return rates, results


def run_driver(args) -> None:
    sizes = QUICK_SIZES if args.quick and not args.sizes else tuple(args.sizes or FULL_SIZES)
    for size in sizes:
        parse_size(size)
    peers_can_run = args.device == "cpu" and args.dtype == "float32"
    impls = args.impls or (ALL_IMPLS if peers_can_run else tuple(OURS))
    unknown = [impl for impl in impls if impl not in ALL_IMPLS]
    if unknown:
        raise SystemExit(f"Unknown --impls {unknown}; choose from {', '.join(ALL_IMPLS)}.")
    peers = [impl for impl in impls if impl not in OURS]
    if peers and not peers_can_run:
        raise SystemExit(
            f"--impls {peers}: the peers run on the CPU in float32 only; leave them out "
            f"with --device {args.device} / --dtype {args.dtype}."
        )
    start = time.perf_counter()
    at_start = harness.environment(threads=args.threads)
    print(
        f"python {args.python}; batch {args.batch_size} tokens, k={args.k}, {args.device}, {args.dtype}, "
        f"{args.threads} threads, {args.warmup} warm-up + median of {args.steps} steps, "
        f"best of {args.rounds} round(s); "
        f"GLIBC_TUNABLES={MALLOC_TUNABLES if args.malloc_tunables else '(unset)'}",
        flush=True,
    )
    rates: dict[str, dict[str, float]] = {}
    results: dict[str, dict[str, dict]] = {}
    for size in sizes:
        rates[size], results[size] = measure_size(args, size, impls)
    found = [
        r["versions"] for by_impl in results.values() for r in by_impl.values() if "versions" in r
    ]
    if found:
        print("\nversions: " + ", ".join(f"{name} {v}" for name, v in found[0].items()))
    print()
    print_table(sizes, impls, rates, results)
    print(f"\ntotal wall time {time.perf_counter() - start:.0f} s")
    if args.json or not args.quick:
        save_results(args, sizes, impls, rates, results, found[0] if found else {}, at_start)


def result_name(args) -> str:
    on_cpu = args.device == "cpu" and args.dtype == "float32"
    return "step" if on_cpu else f"step_{args.device.split(':')[0]}_{args.dtype}"


def save_results(args, sizes, impls, rates, results, versions: dict, at_start: dict) -> None:
    rows = []
    for size in sizes:
        for impl in impls:
            rate, base, result = (
                rates[size].get(impl),
                rates[size].get(BASELINE),
                results[size].get(impl, {}),
            )
            if not rate:
                continue
            rows.append(
                {
                    "size": size,
                    "implementation": impl,
                    "tokens_per_s": round(rate),
                    "vs_sparsify_topk": round(rate / base, 2) if base else None,
                    "median_step_ms": round(statistics.median(result["times"]) * 1e3, 1),
                    "loss_first": round(result["losses"][0], 4),
                    "loss_last": round(result["losses"][-1], 4),
                }
            )
    settings = {
        "batch_size": args.batch_size,
        "k": args.k,
        "device": args.device,
        "dtype": args.dtype,
        "torch_threads": args.threads,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "rounds": args.rounds,
        "GLIBC_TUNABLES": MALLOC_TUNABLES if args.malloc_tunables else None,
        "worker_packages": versions,
    }
    harness.save(
        result_name(args),
        "One training step on synthetic activations (tokens/s)",
        rows,
        settings,
        notes="Median of the timed steps of each implementation, each in its own process on the "
        "same activations; the best of the rounds counts. Ratios within one run compare "
        "implementations under the same load.",
        environment_at_start=at_start,
        path=args.json,
    )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--impls",
        type=lambda s: [i for i in s.split(",") if i],
        help=f"comma-separated subset of: {', '.join(ALL_IMPLS)}",
    )
    parser.add_argument(
        "--sizes",
        type=lambda s: [i for i in s.split(",") if i],
        help="comma-separated d_in x dict_size, default 512x8192,768x12288",
    )
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every implementation this many times, interleaved; the fastest counts",
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (>= 2)")
    parser.add_argument("--batch-size", type=int, default=4096, help="tokens per step")
    parser.add_argument("--k", type=int, default=32, help="active latents per token")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--device", default="cpu", help="our implementations' device, e.g. cuda (peers: cpu only)"
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="our encoder matmul's dtype (cfg['dtype']; parameters stay float32)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke test: sizes {','.join(QUICK_SIZES)}, batch 512, 2 steps",
    )
    parser.add_argument("--json", help="the result file (default benchmarks/results/step.json)")
    parser.add_argument(
        "--no-malloc-tunables",
        dest="malloc_tunables",
        action="store_false",
        help="run the workers without GLIBC_TUNABLES",
    )
    parser.add_argument(
        "--python",
        default=str(BENCH_PYTHON if BENCH_PYTHON.exists() else sys.executable),
        help="interpreter for the workers (default .bench-venv/bin/python)",
    )
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per worker")
    parser.add_argument("--worker", choices=ALL_IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.warmup < 2 and not args.worker:
        parser.error("--warmup must be at least 2: first steps include one-off initialisation.")
    if args.quick and not args.worker:
        args.batch_size = 512 if args.batch_size == 4096 else args.batch_size
        args.steps = 2 if args.steps == 5 else args.steps
    return args


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.worker:
        run_worker(arguments)
    else:
        run_driver(arguments)
