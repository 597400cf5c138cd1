"""Run the model once and write its activations to an activation cache (see activation_cache.py),
then train any number of dictionaries from it with ``--activations DIR``.

    python cache_activations.py --model smollm2-135m --layer 4 --dataset python-docs --num-tokens 1e6 --out cache/l4
    python main.py --model smollm2-135m --layer 4 --dataset python-docs --activations cache/l4 --top-k 16
    python cache_activations.py --model gemma-2-2b --layers 8 --sites resid_mid mlp_out --out cache/tc8  # a transcoder's pair
    python train_gemma_example.py transcoder --activations cache/tc8

The data settings (--dataset, --seq-len, --model-batch-size, --n-eval-rows...) are those of the
training scripts; the cache holds one hook per (site, layer) of --sites x --layers.
"""

from __future__ import annotations

import argparse
import time

from cli_options import add_run_arguments, apply_overrides, check_device, run_reporting_errors
from config import get_default_cfg, get_hook_name, post_init_cfg


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to write the cache to (new, empty, or a cache)")
    parser.add_argument("--sites", nargs="+", help="hook sites to cache (default: --site)")
    parser.add_argument("--layers", type=int, nargs="+", help="layers to cache (default: --layer)")
    parser.add_argument("--shard-mb", type=float, default=256, help="size of each shard file (default 256)")
    add_run_arguments(parser)
    return parser


def cache(args: argparse.Namespace) -> None:
    from activation_cache import write_activation_cache
    from model_loading import load_model

    cfg = post_init_cfg(apply_overrides(get_default_cfg(), args))
    hooks = [get_hook_name(site, layer, cfg["model_name"])
             for layer in (args.layers or [cfg["layer"]]) for site in (args.sites or [cfg["site"]])]
    check_device(cfg)
    model = load_model(cfg["model_name"], cfg["device"], cfg["model_dtype"])
    start = time.perf_counter()
    manifest = write_activation_cache(model, cfg, args.out, hooks, shard_mb=args.shard_mb)
    seconds = time.perf_counter() - start
    print(f"{args.out}: {manifest['num_tokens']} activations of {', '.join(hooks)} ({manifest['dtype']}) in "
          f"{len(manifest['shards'])} shard(s), {seconds:.1f} s ({manifest['num_tokens'] / seconds:,.0f} tokens/s)")


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    run_reporting_errors(lambda: cache(args), resume_command="python cache_activations.py")


if __name__ == "__main__":
    main()
