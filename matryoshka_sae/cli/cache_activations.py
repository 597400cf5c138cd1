"""Run the model once and write its activations to an activation cache (see activation_cache.py),
then train any number of dictionaries from it with ``--activations DIR``.

    python cache_activations.py --model smollm2-135m --layer 4 --dataset python-docs --num-tokens 1e6 --out cache/l4
    python main.py --model smollm2-135m --layer 4 --dataset python-docs --activations cache/l4 --top-k 16
    python cache_activations.py --model gemma-2-2b --layers 8 --sites resid_mid mlp_out --out cache/tc8  # a transcoder's pair
    python train_gemma_example.py transcoder --activations cache/tc8

The data settings (--dataset, --seq-len, --model-batch-size, --n-eval-rows...) are those of the
training scripts; the cache holds one hook per (site, layer) of --sites x --layers, and the
held-out rows a training run from it evaluates on (train with the same --n-eval-rows or fewer).
Everything is checked before the model loads; --out must be new, empty or an incomplete cache
(a complete cache is replaced only with --overwrite; a folder holding other files never).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from matryoshka_sae.cli.options import (
    ArgumentParser,
    add_debug_argument,
    add_run_arguments,
    apply_overrides,
    check_dataset_available,
    check_device,
    invocation,
    run_reporting_errors,
)
from matryoshka_sae.config import get_default_cfg, get_hook_name, post_init_cfg


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", required=True, help="folder to write the cache to (new, empty, or a cache)"
    )
    parser.add_argument("--sites", nargs="+", help="hook sites to cache (default: --site)")
    parser.add_argument("--layers", type=int, nargs="+", help="layers to cache (default: --layer)")
    parser.add_argument(
        "--shard-mb", type=float, default=256, help="size of each shard file (default 256)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a complete cache in --out"
    )
    add_run_arguments(parser)
    add_debug_argument(parser)
    return parser


def cache(args: argparse.Namespace) -> None:
    from matryoshka_sae.activation_cache import prepare_cache_folder, write_activation_cache
    from matryoshka_sae.model_loading import check_model_available, load_model

    cfg = post_init_cfg(apply_overrides(get_default_cfg(), args))
    hooks = [
        get_hook_name(site, layer, cfg["model_name"])
        for layer in (args.layers or [cfg["layer"]])
        for site in (args.sites or [cfg["site"]])
    ]
    if not 0 < args.shard_mb < float("inf"):
        raise ValueError(f"--shard-mb {args.shard_mb}: give a positive size in MB, e.g. 256.")
    check_device(cfg)
    check_model_available(cfg["model_name"])
    check_dataset_available(cfg["dataset_path"])
    prepare_cache_folder(
        Path(args.out), args.overwrite
    )  # checked and probed before the model loads
    model = load_model(cfg["model_name"], cfg["device"], cfg["model_dtype"])
    start = time.perf_counter()
    manifest = write_activation_cache(
        model, cfg, args.out, hooks, shard_mb=args.shard_mb, overwrite=True
    )
    seconds = time.perf_counter() - start
    print(
        f"{args.out}: {manifest['num_tokens']} activations of {', '.join(hooks)} ({manifest['dtype']}) in "
        f"{len(manifest['shards'])} shard(s), {seconds:.1f} s ({manifest['num_tokens'] / seconds:,.0f} tokens/s)"
    )


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    run_reporting_errors(
        lambda: cache(args), resume_command=invocation("cache_activations.py"), debug=args.debug
    )


if __name__ == "__main__":
    main()
