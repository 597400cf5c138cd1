"""Tokens/s of training a Matryoshka transcoder set and a Matryoshka CLT on SmolLM2-135M (all 30
layers), against the model's forward pass alone, and before/after a change of the library.

    python benchmarks/set_throughput.py                          # results/set_throughput.json
    python benchmarks/set_throughput.py --before c594557338 --rounds 2 --tokens 16384

Each case runs in its own process (harness.run_isolated), through the library's own loop on the real
store: the model, the built-in corpus's training split, BOS first, every layer's ln2.hook_normalized
and hook_mlp_out from one model pass per chunk (open_activation_store), the model stopped after its
last block:

    forward   the store alone: --tokens tokens of batches drawn (the model's passes, the buffer)
    set       train_sae_group on that store: 30 Matryoshka transcoders, --dict-size latents a
              layer, k --top-k (budget_curve.py's settings)
    recipe    the same for the CPU recipe's set (docs/transcoder_sets.md, `RECIPE`): the skip
              connection, each layer's target scaled, k 32
    clt       the same for one Matryoshka CLT at equal latents a layer and L0 a layer

tokens/s = tokens after the first buffer block / seconds from the request of the second block's
first batch (before its fill) to the end of the last step (where the loop asks for the store's
position to write its final checkpoints, `SecondBlockClock.state_dict`): the one-off costs before
(loading the model, tokenising the corpus, the first block's fill) and after (the checkpoints) are
left out; every later block is filled and used inside the window. --tokens is a whole number of blocks
(num_batches_in_buffer batches each), at least two. `of_forward` = a case's tokens/s over the
forward case's of the same library and round. With --before, the library
at that commit (its matryoshka_sae/, `harness.library_at`) and the working tree's (or --after's) run
in alternating processes, round by round, so a drifting machine load slows both alike.
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
from harness import commit_of, emit, environment, library_at, run_isolated, save, worker_env

CASES = ("forward", "set", "recipe", "clt")

# What the CPU recipe's set changes from the set case (besides its skip connection).
RECIPE = dict(top_k=32, transcoder_target_norm=True)


def settings(args) -> dict:
    return dict(
        model_name="smollm2-135m",
        dataset_path="python-docs:train",
        device="cpu",
        model_dtype="float32",
        dict_size=args.dict_size,
        top_k=args.top_k,
        batch_size=args.batch_size,
        num_tokens=args.tokens,
        lr=2e-3,
        seed=0,
        seq_len=128,
        model_batch_size=16,
        num_batches_in_buffer=8,
        n_eval_rows=16,
        wandb_mode="disabled",
        log_freq=10,
        checkpoint_freq=10**6,
        perf_log_freq=10**9,
        transcoder_target_norm=False,  # the budget curve's plain set
    )


def case_cfgs(case: str, args, folder: Path, bos: int) -> list[dict]:
    from matryoshka_sae.config import get_default_cfg, post_init_cfg

    if case == "clt":
        from matryoshka_sae.cli.train_clt import CLT_DEFAULTS

        cfg = get_default_cfg()
        cfg.update(CLT_DEFAULTS)
        cfg.update(
            settings(args),
            group_sizes=None,
            bos_token_id=bos,
            checkpoint_dir=str(folder),
            name="clt",
        )
        return [post_init_cfg(cfg)]
    from matryoshka_sae.transcoder_set import default_set_cfg, transcoder_set_cfgs

    recipe = case == "recipe"
    run = {**settings(args), **(RECIPE if recipe else {})}
    base = post_init_cfg(default_set_cfg(**run, bos_token_id=bos))
    return transcoder_set_cfgs(base, range(30), folder, kind="matryoshka", skip=recipe)


class SecondBlockClock:
    """The store, noting when the first batch of its second block is asked for: timing starts
    there, before that block's fill, so that every timed token was both made by the model and
    (but in the forward case) trained on inside the window. A clock started at the first batch
    would count the first block's tokens, made before it started, and overstate the forward case
    about twofold (the tokens of two blocks against the time of one fill)."""

    def __init__(self, store, batches_per_block: int):
        self._store = store
        self._batches_per_block = batches_per_block
        self._served = 0
        self.started_at: float | None = None
        self.ended_at: float | None = None

    def next_batch(self):
        if self._served == self._batches_per_block:
            self.started_at = time.perf_counter()
            self.cpu_at_start = time.process_time()
        self._served += 1
        return self._store.next_batch()

    def stop(self) -> None:
        """End the window (the first call counts)."""
        if self.ended_at is None:
            self.ended_at, self.cpu_at_end = time.perf_counter(), time.process_time()

    def state_dict(self):
        """The loop asks for the store's position to write its final checkpoints, after the last
        step: the clock stops there (writing 30 dictionaries with their Adam state, a one-off of
        seconds, would otherwise weigh on a window of a few steps)."""
        self.stop()
        return self._store.state_dict()

    def __getattr__(self, name: str):
        return getattr(self._store, name)


def worker(args) -> None:
    import torch

    from matryoshka_sae.model_loading import load_model
    from matryoshka_sae.sae import create_sae
    from matryoshka_sae.training import open_activation_store, train_sae_group

    model = load_model("smollm2-135m", "cpu", torch.float32)
    with tempfile.TemporaryDirectory() as folder:
        # The forward case reads the set's hooks: the same passes as the set's training.
        cfgs = case_cfgs("set" if args.case == "forward" else args.case, args, Path(folder), 1)
        dictionaries = [create_sae(cfg) for cfg in cfgs] if args.case != "forward" else []
        torch.manual_seed(0)
        batches_per_block = cfgs[0]["num_batches_in_buffer"]
        store = SecondBlockClock(open_activation_store(model, cfgs), batches_per_block)
        if args.case == "forward":
            for _ in range(args.tokens // args.batch_size):
                store.next_batch()
        else:
            train_sae_group(dictionaries, store, None, cfgs)
        store.stop()  # the forward case writes no checkpoint
        seconds = store.ended_at - store.started_at
        cpu_seconds = store.cpu_at_end - store.cpu_at_start
    timed_tokens = args.tokens - batches_per_block * args.batch_size
    emit(
        {
            "case": args.case,
            "tokens": timed_tokens,
            "seconds": round(seconds, 2),
            "tokens_per_second": round(timed_tokens / seconds, 1),
            "cpu_seconds": round(cpu_seconds, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        }
    )


def measure(script, case: str, args) -> dict:
    result = run_isolated(
        [
            script,
            "--worker",
            "--case",
            case,
            "--tokens",
            args.tokens,
            "--dict-size",
            args.dict_size,
            "--top-k",
            args.top_k,
            "--batch-size",
            args.batch_size,
        ],
        env=worker_env(args.threads),
        timeout=3600,
    )
    if "error" in result:
        sys.exit(f"set_throughput.py: the {case} case failed: {result['error']}")
    print(result, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--case", choices=CASES, help="(the worker's)")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--dict-size", type=int, default=1152, help="latents a layer")
    parser.add_argument("--top-k", type=int, default=16, help="active latents a layer and token")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--before", help="a commit: its library against --after's")
    parser.add_argument("--after", help="a commit (default: the working tree)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument(
        "--name",
        default="set_throughput",
        help="the result file, results/<name>.json (another name keeps an earlier comparison)",
    )
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    block = settings(args)["num_batches_in_buffer"] * args.batch_size
    if args.tokens < 2 * block or args.tokens % block:
        parser.error(
            f"--tokens {args.tokens} is not a whole number of at least two buffer blocks of "
            f"{block} tokens (the first is not timed); e.g. --tokens {2 * block}"
        )
    started = environment(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        libraries = {
            f"after ({commit_of(args.after) if args.after else 'working tree'})": (
                __file__
                if args.after is None
                else library_at(args.after, Path(scratch) / "a", __file__)
            )
        }
        if args.before:
            libraries = {
                f"before ({commit_of(args.before)})": library_at(
                    args.before, Path(scratch) / "b", __file__
                ),
                **libraries,
            }
        rows = []
        for round_ in range(args.rounds):
            for library, script in libraries.items():
                results = {case: measure(script, case, args) for case in args.cases}
                forward = results.get("forward", {}).get("tokens_per_second")
                for result in results.values():
                    rows.append(
                        {
                            "library": library,
                            "round": round_,
                            **result,
                            "of_forward": round(result["tokens_per_second"] / forward, 3)
                            if forward
                            else None,
                        }
                    )
    summary = [
        {
            "library": library,
            "case": case,
            "median_tokens_per_second": statistics.median(
                r["tokens_per_second"]
                for r in rows
                if r["library"] == library and r["case"] == case
            ),
        }
        for library in libraries
        for case in args.cases
    ]
    save(
        args.name,
        "Tokens/s of a Matryoshka set and CLT on SmolLM2-135M (30 layers) against the forward alone",
        rows,
        {
            **{k: v for k, v in settings(args).items() if k != "num_tokens"},
            "tokens": args.tokens,
            "layers": 30,
            "threads": args.threads,
            "rounds": args.rounds,
            "summary": summary,
        },
        columns=["library", "round", "case", "tokens_per_second", "of_forward", "peak_rss_mb"],
        environment_at_start=started,
        notes="Each case in its own process, on the real store (SmolLM2-135M, python-docs:train, "
        "BOS first, both hooks of every layer from one pass); tokens/s of the buffer blocks after "
        "the first, each filled and used inside the timed window (the first block, the corpus's "
        "tokenisation and the model's loading left out). of_forward: the case's tokens/s over the "
        "forward-alone case's of the same library and round (1.0: training costs nothing beyond "
        "the model's passes). Libraries alternate round by round.",
    )


if __name__ == "__main__":
    main()
