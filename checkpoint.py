"""Saving and loading SAEs and their training state.

A checkpoint is a folder:

    config.json         the cfg (`config.cfg_to_json`)
    sae.safetensors     every parameter and buffer of the SAE (its `state_dict`)
    training_state.pt   optimizer state, completed step count, RNG states, extra (optional): the
                        training loop keeps the activation store's position in extra
    sae.previous.safetensors, training_state.previous.pt   the save before (training saves only)
    metrics.json        the run's latest metrics (optional)
    history.jsonl       every logged training step's metrics, one JSON object a line (optional)

Every file is written to a temporary name and renamed over the old one, so a crash while saving
leaves each file either complete and old or complete and new, never partial. The weights file is
renamed last and records the step. A training save keeps the files it replaces as *.previous.*,
so the folder always holds one complete save, and usually two (`saved_steps`): after a crash
between the renames, resuming takes the newest step whose weights and training state are both
there, never a mix of two saves. Dictionaries trained together resume from their newest common step.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from config import cfg_from_json, cfg_to_json

WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "config.json"
TRAINING_STATE_FILE = "training_state.pt"
# The files of the save before, kept so that an interrupted save (or one of a group) can be undone.
PREVIOUS = {TRAINING_STATE_FILE: "training_state.previous.pt", WEIGHTS_FILE: "sae.previous.safetensors"}
METRICS_FILE = "metrics.json"
HISTORY_FILE = "history.jsonl"


def checkpoint_folder(cfg: dict) -> Path:
    """Where training keeps the checkpoint of the run `cfg`: ``checkpoint_dir / name``."""
    return Path(cfg["checkpoint_dir"]) / cfg["name"]


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()


def atomic_write(path: Path, write: Callable[[Path], None], previous: Path | None = None) -> None:
    """Write `path` through `write(tmp_path)`, then rename; the old file survives any crash.

    With `previous`, the old file stays there (a hard link, else renamed) until the next write.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)  # some writers create private (0600) files
        if previous is not None and path.exists():
            previous.unlink(missing_ok=True)
            try:
                os.link(path, previous)
            except OSError:  # no hard links here
                os.replace(path, previous)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_text(text: str) -> Callable[[Path], None]:
    return lambda path: path.write_text(text)


def rng_states() -> dict[str, Any]:
    """The torch (CPU and CUDA), Python and NumPy RNG states, storable with weights_only torch.save."""
    numpy_state = np.random.get_state(legacy=False)
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy_key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
        "numpy_rest": [numpy_state["state"]["pos"], numpy_state["has_gauss"], numpy_state["gauss"]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_states(state: dict[str, Any]) -> None:
    """Inverse of `rng_states`."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    pos, has_gauss, gauss = state["numpy_rest"]
    np.random.set_state({
        "bit_generator": "MT19937",
        "state": {"key": state["numpy_key"].numpy().astype(np.uint32), "pos": pos},
        "has_gauss": has_gauss,
        "gauss": gauss,
    })
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    folder: str | Path,
    sae: torch.nn.Module,
    cfg: dict,
    optimizer: torch.optim.Optimizer | None = None,
    step: int | None = None,
    extra: dict | None = None,
    metrics: dict[str, float] | None = None,
    history: list[dict[str, float]] | None = None,
) -> Path:
    """Save `sae` (parameters and buffers) and `cfg` to `folder`; returns the folder.

    With `optimizer` or `step`, ``training_state.pt`` holds what resuming needs: the optimizer
    state, `step` (the number of completed training steps), the RNG states and `extra`.
    `metrics` (JSON-safe scalars) go to ``metrics.json``, `history` (one such dict per logged
    step) to ``history.jsonl``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / CONFIG_FILE, _write_text(cfg_to_json(cfg)))
    if metrics is not None:
        atomic_write(folder / METRICS_FILE, _write_text(json.dumps(metrics, indent=2, sort_keys=True)))
    if history is not None:
        lines = "".join(json.dumps(row) + "\n" for row in history)
        atomic_write(folder / HISTORY_FILE, _write_text(lines))
    if optimizer is not None or step is not None:
        state = {
            "step": step,
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "rng": rng_states(),
            "extra": extra or {},
        }
        atomic_write(folder / TRAINING_STATE_FILE, lambda path: torch.save(state, path),
                      previous=folder / PREVIOUS[TRAINING_STATE_FILE])
    tensors = {name: t.detach().cpu().contiguous() for name, t in sae.state_dict().items()}
    metadata = {"step": str(step)}
    atomic_write(folder / WEIGHTS_FILE, lambda path: save_file(tensors, str(path), metadata=metadata),
                  previous=folder / PREVIOUS[WEIGHTS_FILE] if step is not None else None)
    return folder


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def check_checkpoint_folder(folder: str | Path) -> None:
    """A clear error when `folder` is not a checkpoint folder (config.json and sae.safetensors)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{str(folder)!r} is not a checkpoint folder: no such folder.")
    missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if not (folder / name).is_file()]
    if missing:
        raise ValueError(f"{str(folder)!r} is not a checkpoint folder: it has no {' and no '.join(missing)}. "
                         f"Give a folder written by training or save_checkpoint (checkpoint_dir/name).")


def _damaged_weights(folder: Path, error: Exception) -> ValueError:
    return ValueError(f"{folder / WEIGHTS_FILE} cannot be read ({error}): the file is truncated or damaged. "
                      f"Use an intact copy of the checkpoint.")


def _read_weights(folder: Path, device: str) -> dict[str, torch.Tensor]:
    """The tensors of ``folder/sae.safetensors``; a damaged file is a clear error."""
    try:
        return load_file(folder / WEIGHTS_FILE, device=device)
    except SafetensorError as error:
        raise _damaged_weights(folder, error) from None


def load_cfg(folder: str | Path) -> dict:
    """The cfg stored in a checkpoint folder."""
    return cfg_from_json((Path(folder) / CONFIG_FILE).read_text())


def load_history(folder: str | Path) -> list[dict[str, float]]:
    """The logged training history of a checkpoint folder ([] if it has none)."""
    path = Path(folder) / HISTORY_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def load_metrics(folder: str | Path) -> dict[str, float]:
    """The metrics stored in a checkpoint folder (the final metrics of a finished run)."""
    return json.loads((Path(folder) / METRICS_FILE).read_text())


def load_sae(folder: str | Path, device: str | torch.device | None = None) -> torch.nn.Module:
    """Build the SAE described by ``folder/config.json`` and load its weights and buffers.

    `device` overrides the cfg's device (e.g. load a GPU-trained SAE on "cpu"); without it, an
    SAE saved on CUDA loads on the CPU of a machine that has no GPU.
    """
    from sae import create_sae  # imported here: sae.py imports nothing from this module

    folder = Path(folder)
    check_checkpoint_folder(folder)
    cfg = load_cfg(folder)
    if device is not None:
        cfg["device"] = str(device)
    elif str(cfg["device"]).startswith("cuda") and not torch.cuda.is_available():
        cfg["device"] = "cpu"
    sae = create_sae(cfg)
    sae.load_state_dict(_read_weights(folder, str(cfg["device"])))
    return sae


def _weights_file_step(path: Path) -> int | None:
    try:
        with safe_open(path, framework="pt") as f:
            step = (f.metadata() or {}).get("step")
    except SafetensorError as error:
        raise _damaged_weights(path.parent, error) from None
    return int(step) if step not in (None, "None") else None


def saved_steps(folder: str | Path) -> dict[int, tuple[Path, Path]]:
    """The complete training saves in `folder`: step -> (weights file, training state file)."""
    folder = Path(folder)
    weights = {_weights_file_step(folder / name): folder / name
               for name in (WEIGHTS_FILE, PREVIOUS[WEIGHTS_FILE]) if (folder / name).exists()}
    states = {torch.load(folder / name, map_location="cpu", weights_only=True, mmap=True)["step"]: folder / name
              for name in (TRAINING_STATE_FILE, PREVIOUS[TRAINING_STATE_FILE]) if (folder / name).exists()}
    return {step: (weights[step], states[step]) for step in weights.keys() & states.keys() if step is not None}


def restore_checkpoint(
    folder: str | Path, sae: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
    step: int | None = None,
) -> dict[str, Any]:
    """Load a checkpoint's weights, buffers, optimizer state and RNG states into a live run.

    `step`: which of the folder's complete saves (`saved_steps`); default the newest. The folder's
    current files become that save's. Returns ``{"step", "extra"}``; `step` is the number of
    training steps already done.
    """
    folder = Path(folder)
    check_checkpoint_folder(folder)
    if not any((folder / name).exists() for name in (TRAINING_STATE_FILE, PREVIOUS[TRAINING_STATE_FILE])):
        raise ValueError(f"{folder} has no {TRAINING_STATE_FILE}: it holds weights only and cannot be "
                         f"resumed from. Load it with load_sae(folder) instead.")
    saved_cfg = load_cfg(folder)
    for key in ("sae_type", "act_size", "dict_size", "group_sizes"):
        if key in saved_cfg and saved_cfg[key] != sae.cfg.get(key):
            raise ValueError(f"Cannot resume from {folder}: it was trained with {key}={saved_cfg[key]!r}, "
                             f"this SAE has {key}={sae.cfg.get(key)!r}. Use the checkpoint's config.json.")
    saves = saved_steps(folder)
    step = max(saves, default=None) if step is None else step
    if step not in saves:
        raise ValueError(f"{folder} is inconsistent: no step has both its weights and its training state "
                         f"(complete saves: {sorted(saves)}; wanted {step}). Resume from an older copy or "
                         f"start afresh.")
    weights_path, state_path = saves[step]
    for path, name in ((weights_path, WEIGHTS_FILE), (state_path, TRAINING_STATE_FILE)):
        if path.name != name:  # an interrupted save: its older files become current again
            os.replace(path, folder / name)
    device = next(iter(sae.state_dict().values())).device
    state = torch.load(folder / TRAINING_STATE_FILE, map_location="cpu", weights_only=True)
    sae.load_state_dict(_read_weights(folder, str(device)))
    if optimizer is not None:
        if state["optimizer"] is None:
            raise ValueError(f"{folder} was saved without optimizer state; it cannot be resumed from.")
        optimizer.load_state_dict(state["optimizer"])
    set_rng_states(state["rng"])
    return {"step": state["step"], "extra": state["extra"]}
