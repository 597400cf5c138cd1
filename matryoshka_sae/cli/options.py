"""Command-line options shared by the scripts (main.py, train_gemma_example.py, the tools).

`add_run_arguments(parser)` adds one option per run setting (`RUN_OPTIONS`, made from the settings
table of settings.py: flag, type, choices and help), `add_setting_arguments` a script's own setting
flags; `apply_overrides(cfg, args)` copies the options given on the command line into a cfg before
`post_init_cfg`.
`print_final_metrics(cfg)` prints a finished run's folder and main metrics. `ArgumentParser` is
argparse's with one-line usage errors.

Long runs: `add_resume_argument` adds ``--resume FOLDER ...``, ``--overwrite`` and ``--debug``;
`resumed_cfgs` reads the runs' own settings back from their checkpoints (options repeated from
the original command line must equal them). `check_before_loading(cfgs)` checks what can be
checked before the model loads: device, memory, model and data, the activation cache, the run
folders (claimed). `run_reporting_errors(work, resume_command)` runs a script's work so that a
user error ends in one line ``<script>: error: ...`` with exit status 2 instead of a traceback
(``--debug`` shows it), and a stop signal (preemption, Ctrl-C) ends in the command that resumes
the run, with exit status 128 + the signal number. docs/errors.md describes all of it for users.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import traceback
from pathlib import Path
from typing import Callable

import torch

from matryoshka_sae.checkpoint import (
    CheckpointWriteError,
    check_checkpoint_folder,
    checkpoint_folder,
    load_cfg,
    load_metrics,
)
from matryoshka_sae.preemption import TrainingInterrupted
from matryoshka_sae.settings import SETTINGS, Setting


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose usage errors are one line, ``<prog>: error: ... (see --help)``, exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see --help)\n")


MAX_COUNT = 10**15  # tokens: far beyond any run or dataset; larger is a typo (1e30)


def _count(text: str) -> int:
    """A count such as ``10000000`` or ``1e7``, at most `MAX_COUNT`."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (e.g. 1e7)") from None
    if not math.isfinite(value) or value != int(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    if value > MAX_COUNT:
        raise argparse.ArgumentTypeError(
            f"{text!r} is more than {MAX_COUNT:.0e} tokens, beyond any dataset"
        )
    return int(value)


def positive_int(text: str) -> int:
    """An integer >= 1 (argparse type)."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """An integer >= 0 (argparse type)."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least {least}")
    return value


# What a setting's type is on the command line (settings.TYPES); a setting's choices come on top.
DTYPES = ["float32", "bfloat16", "float16"]
OPTION_KINDS: dict[str, dict] = {
    "int": {"type": int},
    "count": {"type": _count},
    "number": {"type": float},
    "bool": {"action": argparse.BooleanOptionalAction},  # --flag, and --no-flag against a default
    "ints": {"type": int, "nargs": "+"},
    "dtype": {"choices": DTYPES},
}


def option_kwargs(setting: Setting) -> dict:
    """argparse's keywords for `setting`'s flag: its type, choices, metavar and help."""
    kwargs = {**OPTION_KINDS.get(setting.type, {}), "help": setting.help}
    if setting.choices is not None:
        kwargs["choices"] = list(setting.choices)
    if setting.metavar is not None:
        kwargs["metavar"] = setting.metavar
    return kwargs


# Command-line option -> (cfg key, argparse keywords): the run settings every training script
# offers, from the settings table (the settings with a shared flag).
RUN_OPTIONS: dict[str, tuple[str, dict]] = {
    s.flag: (name, option_kwargs(s)) for name, s in SETTINGS.items() if s.flag and s.shared
}
WANDB_MODES = list(SETTINGS["wandb_mode"].choices)


def add_run_arguments(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    """Add the run-setting options (`RUN_OPTIONS` less `exclude`); unset options keep the script's values."""
    group = parser.add_argument_group("run settings (unset: the script's value)")
    for option, (key, kwargs) in RUN_OPTIONS.items():
        if option not in exclude:
            group.add_argument(option, dest=key, default=None, **kwargs)


def add_setting_arguments(
    parser: argparse.ArgumentParser, names: tuple[str, ...], defaults: dict | None = None
) -> None:
    """Add the flags of the settings `names`, which a script offers beyond the run options (e.g.
    train_clt.py's --sparsity), with the table's defaults overridden by the script's `defaults`."""
    for name in names:
        setting = SETTINGS[name]
        default = (defaults or {}).get(name, setting.default)
        parser.add_argument(setting.flag, dest=name, default=default, **option_kwargs(setting))


def apply_overrides(cfg: dict, args: argparse.Namespace | None) -> dict:
    """Copy every run setting given on the command line into cfg (before `post_init_cfg`).

    Sizes follow the model: a new --model without --dict-size lets dict_size be derived again,
    and a new dict size without --group-sizes lets the groups be derived again.
    """
    if args is None:
        return cfg
    given = {
        key: getattr(args, key)
        for key, _ in RUN_OPTIONS.values()
        if getattr(args, key, None) is not None
    }
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
    """--resume FOLDER..., --overwrite and --debug: the options of a script that trains."""
    parser.add_argument(
        "--resume",
        nargs="+",
        metavar="FOLDER",
        help="continue the run(s) checkpointed in FOLDER (checkpoint_dir/name; one per "
        "dictionary trained together) with their own settings; after a stop "
        "signal the script prints this command",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing run folder of the same name (only one that training "
        "wrote, holding nothing else); without it a new run never writes into one",
    )
    add_debug_argument(parser)


def add_debug_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--debug", action="store_true", help="on an error, show the whole traceback"
    )


def _same_setting(given, saved) -> bool:
    """A command-line value equals a saved setting (dtypes as strings, numbers as numbers)."""
    if isinstance(saved, torch.dtype):
        saved = str(saved).removeprefix("torch.")
    if (
        isinstance(given, (int, float))
        and isinstance(saved, (int, float))
        and not isinstance(saved, bool)
    ):
        return float(given) == float(saved)
    if isinstance(given, list) and isinstance(saved, list):
        return len(given) == len(saved) and all(map(_same_setting, given, saved))
    return given == saved or str(given) == str(saved)


def check_repeated_options(args: argparse.Namespace, saved_cfgs: list[dict]) -> None:
    """The original command line may be repeated with --resume: every run option given must equal
    the saved setting (for a setting the dictionaries of a group differ in, such as top_k, one of
    theirs); a ValueError names each that differs. Only --device and --wandb-* may change."""
    differing = []
    for option, (key, _) in RUN_OPTIONS.items():
        given = getattr(args, key, None)
        if given is None or key in RESUME_OVERRIDES or key in ("checkpoint_dir",):
            continue
        values = [cfg.get(key) for cfg in saved_cfgs]
        if (
            key == "dataset_path"
        ):  # a run on the built-in corpus records its split: python-docs:train
            values += [str(value).split(":")[0] for value in values]
        if not any(_same_setting(given, value) for value in values):
            saved = (
                values[0]
                if len({str(v) for v in values[: len(saved_cfgs)]}) == 1
                else values[: len(saved_cfgs)]
            )
            differing.append(f"{option} {given} (saved: {saved})")
    if differing:
        raise ValueError(
            f"--resume continues a run with its own settings (its config.json), but "
            f"{'; '.join(differing)}; drop {'it' if len(differing) == 1 else 'them'} or give the "
            f"saved value (only --device and --wandb-* may change)."
        )


def resumed_cfgs(folders: list[str], args: argparse.Namespace) -> list[dict]:
    """The cfgs of the checkpointed runs in `folders`, which keep writing to those folders.

    Only --device and the wandb options may change; other run options given must repeat the
    saved settings (`check_repeated_options`).
    """
    cfgs = []
    for folder in map(Path, folders):
        check_checkpoint_folder(folder)
        cfg = load_cfg(folder)
        cfg.update(checkpoint_dir=str(folder.parent), name=folder.name)
        cfgs.append(cfg)
    check_repeated_options(args, cfgs)
    for folder, cfg in zip(map(Path, folders), cfgs):
        if str(cfg.get("dataset_path", "")).startswith("<"):
            raise ValueError(
                f"{folder} was trained on a {cfg['dataset_path']} object, not a dataset path; "
                f"resume it from Python: train_sae(..., resume_from={str(folder)!r})."
            )
        cfg.update(
            {
                key: getattr(args, key)
                for key in RESUME_OVERRIDES
                if getattr(args, key, None) is not None
            }
        )
    return cfgs


def check_device(cfg: dict) -> None:
    """A clear error for a cfg["device"] this machine does not have (before any model is loaded)."""
    try:
        device = torch.device(cfg["device"])
    except (RuntimeError, TypeError):
        raise ValueError(
            f"device {cfg['device']!r} is not a device torch knows; use --device cpu, cuda, "
            f"cuda:N or mps."
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {cfg['device']!r}: this machine has no CUDA GPU that torch can use "
                f"(torch.cuda.is_available() is False); use --device cpu."
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {cfg['device']!r}: this machine has {torch.cuda.device_count()} "
                f"CUDA GPU(s), cuda:0..cuda:{torch.cuda.device_count() - 1}."
            )
    elif device.type != "cpu":
        try:
            torch.empty(1, device=device)
        except Exception:  # noqa: BLE001 (each backend fails in its own way)
            raise ValueError(
                f"device {cfg['device']!r}: this machine or this torch build has no such device; "
                f"use --device cpu (or cuda)."
            ) from None


def available_memory(device: torch.device) -> int | None:
    """Bytes free on `device` (CUDA: its free memory; CPU: MemAvailable), None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def training_memory(cfgs: list[dict]) -> dict[str, int]:
    """Bytes a group of dictionaries needs while training: "dictionaries" (float32 weights, their
    gradients and Adam's two moments: 16 bytes a parameter) and "buffer" (the activation buffer of
    every hook the group reads, num_batches_in_buffer + 1 batches of float32 rows: a transcoder set
    or a cross-layer transcoder over L layers reads 2 L hooks). The model itself is not counted."""
    from matryoshka_sae.activation_store import dictionary_hooks
    from matryoshka_sae.checkpoint import dictionary_parameters

    base = cfgs[0]
    hooks = {hook for cfg in cfgs for hook in dictionary_hooks(cfg)}
    rows = base["batch_size"] * (base["num_batches_in_buffer"] + 1)
    return {
        "dictionaries": sum(4 * 4 * dictionary_parameters(cfg) for cfg in cfgs),
        "buffer": 4 * len(hooks) * base["act_size"] * rows,
    }


def check_memory(cfgs: list[dict]) -> None:
    """`training_memory(cfgs)` must fit in the device's free memory; a ValueError gives both figures."""
    device = torch.device(cfgs[0]["device"])
    free = available_memory(device)
    if free is None:
        return
    base = cfgs[0]
    needed = sum(training_memory(cfgs).values())
    if needed > free:
        raise ValueError(
            f"--dict-size {base['dict_size']}: {len(cfgs)} dictionar{'y' if len(cfgs) == 1 else 'ies'} "
            f"with gradients and optimizer state, and the activation buffer, need "
            f"{needed / 2**30:,.1f} GiB, but {device} has {free / 2**30:,.1f} GiB available; lower "
            f"--dict-size, --batch-size or --num-batches-in-buffer, or train fewer dictionaries."
        )


def check_before_loading(
    cfgs: list[dict], resume_from: list[str] | None = None, overwrite: bool = False
) -> None:
    """Everything that can be checked before the model loads: the device, memory, the model and the
    data available (offline too), the activation cache, and each run's folder (claimed: created,
    written to, enough free space, locked; see checkpoint.claim_run_folder)."""
    from matryoshka_sae import distributed
    from matryoshka_sae.checkpoint import claim_run_folder
    from matryoshka_sae.model_loading import check_model_available

    base = cfgs[0]
    check_device(base)
    check_memory(cfgs)
    check_model_available(base["model_name"])
    if base.get("activation_cache"):
        from matryoshka_sae.activation_cache import check_cache_matches, read_manifest

        check_cache_matches(
            read_manifest(base["activation_cache"]), base, Path(base["activation_cache"])
        )
    else:
        for key in ("dataset_path", "eval_dataset_path"):
            if base.get(key) is not None:
                check_dataset_available(base[key], key)
    if distributed.launched_by_torchrun():
        return  # the ranks that write claim their folders when training starts
    for i, cfg in enumerate(cfgs):
        claim_run_folder(
            cfg, resume_from=None if resume_from is None else resume_from[i], overwrite=overwrite
        )


def check_dataset_available(dataset_path, key: str = "dataset_path") -> None:
    """A clear error now, not after the model loaded, for data that cannot be read: a local file
    missing, empty or not text; a hub dataset absent from the local cache while offline."""
    from matryoshka_sae.activation_store import (
        BUILTIN_CORPUS,
        LOCAL_FILE_BUILDERS,
        check_local_data_file,
    )

    if (
        not isinstance(dataset_path, (str, Path))
        or str(dataset_path).split(":")[0] == BUILTIN_CORPUS
    ):
        return
    path = Path(dataset_path)
    builder = LOCAL_FILE_BUILDERS.get(path.suffix.lower())
    if path.is_dir():
        return
    if builder is not None or path.is_absolute() or str(dataset_path).startswith("."):
        if not path.is_file():
            raise FileNotFoundError(f"cfg[{key!r}] = {str(dataset_path)!r}: no such file.")
        if builder is not None:
            check_local_data_file(path, builder)
        return
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        import datasets

        try:
            datasets.load_dataset_builder(str(dataset_path))
        except Exception as error:  # noqa: BLE001 (datasets raises many kinds for "not available")
            raise ValueError(
                f"cfg[{key!r}] = {str(dataset_path)!r} is not in the local Hugging Face cache and "
                f"the hub is offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE); give a local file or "
                f"folder, python-docs, or download it first ({type(error).__name__})."
            ) from None


# Errors that come from the user's input or machine, not from a bug: reported in one line.
USER_ERRORS = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    ImportError,
    CheckpointWriteError,
    torch.cuda.OutOfMemoryError,
)


# Each script at the repository root and the console script pyproject.toml installs for it.
CONSOLE_SCRIPTS = {
    "main.py": "sae-train",
    "train_gemma_example.py": "sae-train-gemma",
    "train_clt.py": "sae-train-clt",
    "cache_activations.py": "sae-cache-activations",
    "export_sae.py": "sae-export",
    "inspect_sae.py": "sae-inspect",
    "inspect_transcoder_set.py": "sae-inspect-set",
    "evaluate_sae.py": "sae-evaluate",
    "trace_circuit.py": "sae-trace",
}


def invocation(script: str) -> str:
    """The command that runs `script` (a root file name, e.g. "main.py") the way this process was
    started, so that a printed follow-up command (resume, export, trace) can be pasted as it is:
    ``sae-train`` after ``sae-train``, ``python main.py`` after ``python main.py``, ``python -m
    matryoshka_sae.cli.main`` after ``python -m ...``. `script` may be another script than the running
    one (the demo prints the export command): it keeps the running one's style."""
    started = Path(sys.argv[0] if sys.argv and sys.argv[0] else script)
    if started.name in CONSOLE_SCRIPTS.values():
        return CONSOLE_SCRIPTS[script]
    package_cli = Path(__file__).resolve().parent
    if started.suffix == ".py" and started.resolve().parent == package_cli:
        return f"python -m matryoshka_sae.cli.{Path(script).stem}"
    if started.name == script:
        return f"python {started}"
    if started.name in CONSOLE_SCRIPTS:  # another root script, started by its path
        return (
            f"python {started.parent / script}"
            if str(started.parent) != "."
            else f"python {script}"
        )
    return f"python {script}"  # from Python (a notebook, a test): as a user at the root types it


def run_reporting_errors(
    work: Callable[[], None], resume_command: str, debug: bool = False
) -> None:
    """Run `work`; a bad setting or input (ValueError, a missing file or package, a disk that is full
    or read-only) exits with one line ``<script>: error: ...`` and status 2, a stop signal with the
    resume command and 128 + its number. `debug` (--debug, or SAE_DEBUG=1 in the environment) adds
    the traceback; any other exception is a bug and shows its traceback."""
    words = [word for word in resume_command.split() if word not in ("python", "-m")]
    script = Path(words[0]).name  # "python main.py ..." -> main.py; "sae-train ..." -> sae-train
    debug = debug or os.environ.get("SAE_DEBUG") == "1"
    try:
        work()
    except TrainingInterrupted as stop:
        folders = " ".join(shlex.quote(str(folder)) for folder in stop.folders)
        print(
            f"{script}: {stop}.\nResume with: {resume_command} --resume {folders}", file=sys.stderr
        )
        raise SystemExit(stop.exit_status) from None
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print(
            f"{script}: interrupted (Ctrl-C); checkpoints written before are intact.",
            file=sys.stderr,
        )
        raise SystemExit(130) from None
    except USER_ERRORS as error:
        if debug:
            traceback.print_exc()
        message = " ".join(str(error).split())  # one line, whatever the message held
        print(f"{script}: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
