"""The original repository's run: BatchTopK SAEs of several sparsities and one Matryoshka SAE,
trained together on one activation stream of GPT-2 small (layer 8, resid_pre).

    python main.py --demo                            # offline demo: SmolLM2 + Python docs, on a CPU
    python main.py                                   # the defaults of config.get_default_cfg()
    python main.py --num-tokens 2e7 --batchtopk-k 16 32 --wandb-mode offline
    python main.py --model gemma-2-2b --model-dtype bfloat16 --model-batch-size 4

Every dictionary gets its own wandb run and checkpoint folder (``checkpoint_dir / name``); the
final metrics of each are printed at the end. The command-line options that change the run
settings (`add_run_arguments`) are shared with train_gemma_example.py.
"""

from __future__ import annotations

import argparse
import copy

from checkpoint import checkpoint_folder, load_metrics
from config import HOOK_SITES, get_default_cfg, post_init_cfg

BATCHTOPK_KS = [16, 32, 64]
DTYPES = ["float32", "bfloat16", "float16"]
WANDB_MODES = ["online", "offline", "disabled"]


def _count(text: str) -> int:
    """A count such as ``10000000`` or ``1e7``."""
    value = float(text)
    if value != int(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return int(value)


# Command-line option -> cfg key, for the options that map one to one onto a setting.
RUN_OPTIONS: dict[str, tuple[str, dict]] = {
    "--model": ("model_name", {"help": "model name, e.g. gpt2, gemma-2-2b, smollm2-135m"}),
    "--layer": ("layer", {"type": int}),
    "--site": ("site", {"choices": list(HOOK_SITES)}),
    "--num-tokens": ("num_tokens", {"type": _count, "help": "training tokens, e.g. 1e8"}),
    "--dict-size": ("dict_size", {"type": int}),
    "--group-sizes": ("group_sizes", {"type": int, "nargs": "+", "help": "Matryoshka groups (sum = dict size)"}),
    "--top-k": ("top_k", {"type": int}),
    "--batch-size": ("batch_size", {"type": int, "help": "activations per training step"}),
    "--lr": ("lr", {"type": float}),
    "--lr-warmup-steps": ("lr_warmup_steps", {"type": int}),
    "--lr-decay-frac": ("lr_decay_frac", {"type": float}),
    "--device": ("device", {"help": "cuda, cuda:1, cpu, ..."}),
    "--dtype": ("dtype", {"choices": DTYPES, "help": "SAE encoder matmul dtype (weights stay float32)"}),
    "--model-dtype": ("model_dtype", {"choices": DTYPES}),
    "--dataset": ("dataset_path", {"help": "hub dataset, local file, or python-docs (no download)"}),
    "--seq-len": ("seq_len", {"type": int}),
    "--model-batch-size": ("model_batch_size", {"type": int, "help": "token rows per model forward pass"}),
    "--num-batches-in-buffer": ("num_batches_in_buffer", {"type": int}),
    "--seed": ("seed", {"type": int}),
    "--wandb-mode": ("wandb_mode", {"choices": WANDB_MODES}),
    "--wandb-project": ("wandb_project", {}),
    "--log-freq": ("log_freq", {"type": int}),
    "--perf-log-freq": ("perf_log_freq", {"type": int, "help": "steps between CE-loss evaluations"}),
    "--checkpoint-freq": ("checkpoint_freq", {"type": int}),
    "--checkpoint-dir": ("checkpoint_dir", {}),
}


def add_run_arguments(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    """Add the run-setting options (`RUN_OPTIONS` less `exclude`); unset options keep the script's values."""
    group = parser.add_argument_group("run settings (unset: the script's value)")
    for option, (key, kwargs) in RUN_OPTIONS.items():
        if option not in exclude:
            group.add_argument(option, dest=key, default=None, **kwargs)


def apply_overrides(cfg: dict, args: argparse.Namespace | None) -> dict:
    """Copy every run setting given on the command line into cfg (before `post_init_cfg`).

    Sizes follow the model: a new --model without --dict-size lets dict_size be derived again,
    and a new dict size without --group-sizes lets the groups be derived again.
    """
    if args is None:
        return cfg
    given = {key: getattr(args, key) for key, _ in RUN_OPTIONS.values() if getattr(args, key, None) is not None}
    if given.get("model_name", cfg["model_name"]) != cfg["model_name"] and "dict_size" not in given:
        cfg["dict_size"] = None
    if ("dict_size" in given or cfg["dict_size"] is None) and "group_sizes" not in given:
        cfg["group_sizes"] = None
    cfg.update(given)
    return cfg


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


def print_final_metrics(cfg: dict) -> None:
    """Print the run's checkpoint folder and its main final metrics."""
    folder = checkpoint_folder(cfg)
    metrics = load_metrics(folder)
    keys = ["fvu", "l0_norm", "num_dead_features", "ce_degradation", "loss_recovered"]
    summary = ", ".join(f"{key} {metrics[key]:.4g}" for key in keys if key in metrics)
    print(f"{folder}: {summary}")


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
