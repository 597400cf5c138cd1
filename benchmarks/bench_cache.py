"""What the activation cache costs and saves, on SmolLM2-135M (layer 4, resid_pre, Python docs).

    python benchmarks/bench_cache.py                    # 65,536 tokens, a 576 -> 9216 Matryoshka SAE
    python benchmarks/bench_cache.py --tokens 16384 --steps 12 --rounds 1 --sae-type batchtopk

1. Writing: the cache (cache_activations.py's work: data, model passes, copies, safetensors shards)
   against the model's own forward passes (``run_with_cache(..., stop_at_layer=5)``) over the same
   token rows, tokenised beforehand. Target: <= 1.1 x.
2. Training from the cache: one full training step (bench_step.py's `our_step`: forward, backward,
   decoder projection, clipping, Adam, decoder normalisation) fed by ``CachedActivationsStore``
   against the same step on batches already in memory. Target: >= 0.9 x the bare step's tokens/s.
Each measurement is repeated `--rounds` times, alternating, and the fastest round counts (the
machines here are shared and noisy). Offline, CPU.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import harness
import torch  # noqa: E402
from bench_step import our_step  # noqa: E402

from matryoshka_sae.activation_cache import CachedActivationsStore, write_activation_cache  # noqa: E402
from matryoshka_sae.activation_store import ActivationsStore  # noqa: E402
from matryoshka_sae.config import get_default_cfg, post_init_cfg  # noqa: E402
from matryoshka_sae.model_loading import load_model  # noqa: E402

IMPLS = {"matryoshka": "ours_matryoshka", "batchtopk": "ours_batchtopk"}


def run_cfg(args, cache: str | None = None) -> dict:
    cfg = get_default_cfg()
    cfg.update(
        model_name="smollm2-135m",
        layer=4,
        site="resid_pre",
        dataset_path="python-docs",
        seq_len=128,
        model_batch_size=16,
        batch_size=args.batch_size,
        num_batches_in_buffer=10,
        device="cpu",
        num_tokens=args.tokens,
        n_eval_rows=8,
        sae_type=args.sae_type,
        activation_cache=cache,
    )
    return post_init_cfg(cfg)


def time_forward(model, cfg, n_tokens: int) -> float:
    """Seconds for the bare model passes over the first rows of the training stream."""
    rows = _training_rows(model, cfg, n_tokens)
    start = time.perf_counter()
    with torch.no_grad():
        for chunk in rows.split(cfg["model_batch_size"]):
            model.run_with_cache(
                chunk,
                names_filter=[cfg["hook_point"]],
                stop_at_layer=cfg["layer"] + 1,
                return_cache_object=False,
            )
    return time.perf_counter() - start


def _training_rows(model, cfg, n_tokens: int) -> torch.Tensor:
    """The token rows the store (and the cache) would run the model on first."""
    store = ActivationsStore(
        model, {**cfg, "num_batches_in_buffer": 1, "batch_size": cfg["seq_len"]}
    )
    return store._new_row_stream().take(-(-n_tokens // cfg["seq_len"]))


def time_steps(step, batches) -> float:
    """Tokens/s of `step` over `batches` (an iterator of tensors)."""
    n_tokens, start = 0, time.perf_counter()
    for x in batches:
        step(x)
        n_tokens += len(x)
    return n_tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--sae-type", choices=list(IMPLS), default="matryoshka")
    parser.add_argument(
        "--steps", type=int, default=16, help="training steps timed (epochs over the cache)"
    )
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    at_start = harness.environment()
    torch.manual_seed(0)
    model = load_model("smollm2-135m")
    cfg = run_cfg(args)
    print(f"SmolLM2-135M layer 4, {args.tokens} tokens, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        forward, write = [], []
        for round_ in range(
            args.rounds
        ):  # a folder each: the writer never replaces a complete cache
            forward.append(time_forward(model, cfg, args.tokens))
            start = time.perf_counter()
            write_activation_cache(model, cfg, f"{tmp}/cache{round_}")
            write.append(time.perf_counter() - start)
        print(
            f"model forward {min(forward):.1f} s ({args.tokens / min(forward):,.0f} tokens/s); cache write "
            f"{min(write):.1f} s ({args.tokens / min(write):,.0f} tokens/s): {min(write) / min(forward):.2f} x"
        )

        cached_cfg = run_cfg(args, f"{tmp}/cache{args.rounds - 1}")
        n_steps = args.steps
        in_memory = [CachedActivationsStore(cached_cfg).next_batch().clone()] * n_steps
        step, _ = our_step(
            IMPLS[args.sae_type], 576, 16 * 576, 32, args.batch_size, (in_memory[0], None)
        )
        for _ in range(2):  # warm up
            step(in_memory[0])
        bare, cached = [], []
        for _ in range(args.rounds):
            bare.append(time_steps(step, iter(in_memory)))
            store = CachedActivationsStore(cached_cfg)
            cached.append(time_steps(step, (store.next_batch() for _ in range(n_steps))))
        print(
            f"{args.sae_type} 576 -> 9216, k 32, batch {args.batch_size}: bare step {max(bare):,.0f} tokens/s, "
            f"from the cache {max(cached):,.0f} tokens/s: {max(cached) / max(bare):.2f} x"
        )
    rows = [
        {"phase": "model forward (bare)", "tokens_per_s": round(args.tokens / min(forward))},
        {
            "phase": "cache write (model included)",
            "tokens_per_s": round(args.tokens / min(write)),
            "ratio": round(min(forward) / min(write), 2),
        },
        {"phase": f"{args.sae_type} step, batches in memory", "tokens_per_s": round(max(bare))},
        {
            "phase": f"{args.sae_type} step, batches from the cache",
            "tokens_per_s": round(max(cached)),
            "ratio": round(max(cached) / max(bare), 2),
        },
    ]
    settings = {
        "model": "smollm2-135m",
        "layer": 4,
        "tokens": args.tokens,
        "batch_size": args.batch_size,
        "dictionary": "576 -> 9216, k 32",
        "rounds": args.rounds,
        "timed_steps": args.steps,
    }
    harness.save(
        "cache",
        "The activation cache: writing it, and training from it",
        rows,
        settings,
        columns=["phase", "tokens_per_s", "ratio"],
        environment_at_start=at_start,
        notes="ratio: against the row above it (the bare model pass; the step on batches in memory).",
    )


if __name__ == "__main__":
    main()
