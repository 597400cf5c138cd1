"""Command-line options shared by the scripts (main.py, train_gemma_example.py, the tools).

`add_run_arguments(parser)` adds one option per run setting (`RUN_OPTIONS`); `apply_overrides(cfg,
args)` copies the options given on the command line into a cfg before `post_init_cfg`.
`print_final_metrics(cfg)` prints a finished run's folder and main metrics.

Long runs: `add_resume_argument` adds ``--resume FOLDER ...`` and `resumed_cfgs` reads the runs'
own settings back from their checkpoints. `run_reporting_errors(work, resume_command)` runs a
script's work so that bad settings end in one line ``<script>: error: ...`` with exit status 2
(as argparse does) instead of a traceback, and a stop signal (preemption, Ctrl-C) ends in the
command that resumes the run, with exit status 128 + the signal number.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Callable

import torch

from checkpoint import check_checkpoint_folder, checkpoint_folder, load_cfg, load_metrics
from preemption import TrainingInterrupted
from config import HOOK_SITES, SAE_TYPES

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
    "--sae-type": ("sae_type", {"choices": list(SAE_TYPES),
                                "help": "main.py: train one dictionary of this class"}),
    "--target-l0": ("target_l0", {"type": float, "help": "mean L0 for jumprelu (quadratic penalty) "
                                                          "or vanilla (adaptive L1 coefficient)"}),
    "--jumprelu-objective": ("jumprelu_objective", {"choices": ["step", "tanh", "quadratic"]}),
    "--l1-coeff": ("l1_coeff", {"type": float, "help": "vanilla: L1 coefficient (default 4 / act_size)"}),
    "--l0-coeff": ("l0_coeff", {"type": float, "help": "jumprelu: the objective's coefficient"}),
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
    "--activations": ("activation_cache", {"metavar": "DIR", "help": "train from this activation cache "
                                           "(cache_activations.py) instead of running the model"}),
    "--distribute-dictionaries": ("distribute_dictionaries", {
        "action": "store_true", "help": "under torchrun: each rank trains whole dictionaries of the group "
                                        "on every rank's activations (instead of every rank all of them)"}),
    "--data-lanes": ("data_lanes", {
        "type": int, "help": "deal the documents to this many lanes (default: the number of ranks); the batches "
                             "are the same on any number of ranks dividing it"}),
    "--distributed-debug": ("distributed_debug", {
        "action": "store_true", "help": "under torchrun: check every log_freq steps that the ranks' weights are equal"}),
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


# ---------------------------------------------------------------------------------------------
# Resuming, devices, errors
# ---------------------------------------------------------------------------------------------

# Run settings that may differ when a run is resumed (e.g. on another machine).
RESUME_OVERRIDES = ("device", "wandb_mode", "wandb_project")


def add_resume_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resume", nargs="+", metavar="FOLDER",
                        help="continue the run(s) checkpointed in FOLDER (checkpoint_dir/name; one per "
                             "dictionary trained together) with their own settings; after a stop "
                             "signal the script prints this command")


def resumed_cfgs(folders: list[str], args: argparse.Namespace) -> list[dict]:
    """The cfgs of the checkpointed runs in `folders`, which keep writing to those folders.

    Only --device and the wandb options may change; other run settings come from the checkpoint.
    """
    given = [option for option, (key, _) in RUN_OPTIONS.items()
             if getattr(args, key, None) is not None and key not in RESUME_OVERRIDES]
    if given:
        raise ValueError(f"--resume continues a run with its own settings (its config.json); drop "
                         f"{', '.join(given)} (only --device and --wandb-* may change).")
    cfgs = []
    for folder in map(Path, folders):
        check_checkpoint_folder(folder)
        cfg = load_cfg(folder)
        if str(cfg.get("dataset_path", "")).startswith("<"):
            raise ValueError(f"{folder} was trained on a {cfg['dataset_path']} object, not a dataset path; "
                             f"resume it from Python: train_sae(..., resume_from={str(folder)!r}).")
        cfg.update(checkpoint_dir=str(folder.parent), name=folder.name)
        cfg.update({key: getattr(args, key) for key in RESUME_OVERRIDES if getattr(args, key, None) is not None})
        cfgs.append(cfg)
    return cfgs


def check_device(cfg: dict) -> None:
    """A clear error for a cfg["device"] this machine does not have (before any model is loaded)."""
    device = torch.device(cfg["device"])
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {cfg['device']!r}: this machine has no CUDA GPU that torch can use "
                             f"(torch.cuda.is_available() is False); use --device cpu.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {cfg['device']!r}: this machine has {torch.cuda.device_count()} "
                             f"CUDA GPU(s), cuda:0..cuda:{torch.cuda.device_count() - 1}.")


def run_reporting_errors(work: Callable[[], None], resume_command: str) -> None:
    """Run `work`; a bad setting or input (ValueError, a missing file, a missing package) exits with
    ``error: ...`` and status 2, a stop signal with the resume command and 128 + its number."""
    script = resume_command.split()[1]  # "python main.py ..." -> main.py
    try:
        work()
    except TrainingInterrupted as stop:
        folders = " ".join(shlex.quote(str(folder)) for folder in stop.folders)
        print(f"{script}: {stop}.\nResume with: {resume_command} --resume {folders}", file=sys.stderr)
        raise SystemExit(stop.exit_status) from None
    except (ValueError, FileNotFoundError, ImportError) as error:
        print(f"{script}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
