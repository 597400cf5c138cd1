"""The original repository's run: BatchTopK SAEs of several sparsities and one Matryoshka SAE,
trained together on one activation stream of GPT-2 small (layer 8, resid_pre).

    python main.py --demo                            # offline demo: SmolLM2 + Python docs, on a CPU
    python main.py                                   # the defaults of config.get_default_cfg()
    python main.py --num-tokens 2e7 --batchtopk-k 16 32 --wandb-mode offline
    python main.py --model gemma-2-2b --model-dtype bfloat16 --model-batch-size 4

Every dictionary gets its own wandb run and checkpoint folder (``checkpoint_dir / name``); the
final metrics of each are printed at the end. The command-line options that change the run
settings live in cli_options.py, shared with train_gemma_example.py.
"""

from __future__ import annotations

import argparse
import copy

from cli_options import add_run_arguments, apply_overrides, print_final_metrics
from config import get_default_cfg, post_init_cfg

BATCHTOPK_KS = [16, 32, 64]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", action="store_true",
                        help="train one Matryoshka SAE on SmolLM2-135M and Python's documentation, "
                             "offline on a CPU, and print a report (see demo.py)")
    parser.add_argument("--batchtopk-k", type=int, nargs="+", default=BATCHTOPK_KS,
                        help=f"top_k of each BatchTopK SAE (default {BATCHTOPK_KS}); --top-k sets the "
                             f"Matryoshka SAE's")
    add_run_arguments(parser)
    return parser


def build_cfgs(args: argparse.Namespace | None = None) -> list[dict]:
    """One cfg per dictionary: a BatchTopK SAE per --batchtopk-k value, then the Matryoshka SAE."""
    base = post_init_cfg(apply_overrides(get_default_cfg(), args))
    ks = BATCHTOPK_KS if args is None else args.batchtopk_k
    variants = [{"sae_type": "batchtopk", "top_k": k} for k in ks] + [{"sae_type": "matryoshka"}]
    return [post_init_cfg({**copy.deepcopy(base), **variant}) for variant in variants]


def train_group(cfgs: list[dict]) -> list:
    """Load cfgs[0]'s model, open its activation stream and train one dictionary per cfg on it."""
    # Imported here so that --help (and train_gemma_example.py compare) load no model stack.
    from activation_store import ActivationsStore
    from model_loading import load_model
    from sae import create_sae
    from training import train_sae_group

    base = cfgs[0]
    model = load_model(base["model_name"], base["device"], base["model_dtype"])
    store = ActivationsStore(model, base)
    return train_sae_group([create_sae(cfg) for cfg in cfgs], store, model, cfgs)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.demo:
        from demo import run_demo

        run_demo(args)
        return
    cfgs = build_cfgs(args)
    for cfg in cfgs:
        print(f"{cfg['sae_type']:>12}  top_k {cfg['top_k']:<4} dict {cfg['dict_size']:<6} -> {cfg['name']}")
    train_group(cfgs)
    for cfg in cfgs:
        print_final_metrics(cfg)


if __name__ == "__main__":
    main()
