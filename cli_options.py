"""Command-line options shared by the scripts (main.py, train_gemma_example.py, the tools).

`add_run_arguments(parser)` adds one option per run setting (`RUN_OPTIONS`); `apply_overrides(cfg,
args)` copies the options given on the command line into a cfg before `post_init_cfg`.
`print_final_metrics(cfg)` prints a finished run's folder and main metrics.
"""

from __future__ import annotations

import argparse

from checkpoint import checkpoint_folder, load_metrics
from config import HOOK_SITES

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


def print_final_metrics(cfg: dict) -> None:
    """Print the run's checkpoint folder and its main final metrics."""
    folder = checkpoint_folder(cfg)
    metrics = load_metrics(folder)
    keys = ["fvu", "l0_norm", "num_dead_features", "ce_degradation", "loss_recovered"]
    summary = ", ".join(f"{key} {metrics[key]:.4g}" for key in keys if key in metrics)
    print(f"{folder}: {summary}")
