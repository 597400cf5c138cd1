"""Saving and loading SAEs and their training state.

A checkpoint is a folder:

    config.json         the cfg (`config.cfg_to_json`)
    sae.safetensors     every parameter and buffer of the SAE (its `state_dict`)
    training_state.pt   optimizer state, completed step count, RNG states, extra (optional)
    metrics.json        the run's latest metrics (optional)
    history.jsonl       every logged training step's metrics, one JSON object a line (optional)

Every file is written to a temporary name and renamed over the old one, so a crash while saving
leaves each file either complete and old or complete and new, never partial. The weights file is
renamed last and records the step, so a checkpoint whose files come from two different saves
(a crash between the renames) is detected on resume instead of silently mixing states.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from config import cfg_from_json, cfg_to_json

WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "config.json"
TRAINING_STATE_FILE = "training_state.pt"
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


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write `path` through `write(tmp_path)`, then rename; the old file survives any crash."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)  # some writers create private (0600) files
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
    _atomic_write(folder / CONFIG_FILE, _write_text(cfg_to_json(cfg)))
    if metrics is not None:
        _atomic_write(folder / METRICS_FILE, _write_text(json.dumps(metrics, indent=2, sort_keys=True)))
    if history is not None:
        lines = "".join(json.dumps(row) + "\n" for row in history)
        _atomic_write(folder / HISTORY_FILE, _write_text(lines))
    if optimizer is not None or step is not None:
        state = {
            "step": step,
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "rng": rng_states(),
            "extra": extra or {},
        }
        _atomic_write(folder / TRAINING_STATE_FILE, lambda path: torch.save(state, path))
    tensors = {name: t.detach().cpu().contiguous() for name, t in sae.state_dict().items()}
    metadata = {"step": str(step)}
    _atomic_write(folder / WEIGHTS_FILE, lambda path: save_file(tensors, str(path), metadata=metadata))
    return folder


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


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
    cfg = load_cfg(folder)
    if device is not None:
        cfg["device"] = str(device)
    elif str(cfg["device"]).startswith("cuda") and not torch.cuda.is_available():
        cfg["device"] = "cpu"
    sae = create_sae(cfg)
    sae.load_state_dict(load_file(folder / WEIGHTS_FILE, device=str(cfg["device"])))
    return sae


def _weights_step(folder: Path) -> str | None:
    with safe_open(folder / WEIGHTS_FILE, framework="pt") as f:
        return (f.metadata() or {}).get("step")


def restore_checkpoint(
    folder: str | Path, sae: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> dict[str, Any]:
    """Load a checkpoint's weights, buffers, optimizer state and RNG states into a live run.

    Returns ``{"step", "extra"}``; `step` is the number of training steps already done.
    """
    folder = Path(folder)
    state_path = folder / TRAINING_STATE_FILE
    if not state_path.exists():
        raise ValueError(f"{folder} has no {TRAINING_STATE_FILE}: it holds weights only and cannot be "
                         f"resumed from. Load it with load_sae(folder) instead.")
    saved_cfg = load_cfg(folder)
    for key in ("sae_type", "act_size", "dict_size", "group_sizes"):
        if key in saved_cfg and saved_cfg[key] != sae.cfg.get(key):
            raise ValueError(f"Cannot resume from {folder}: it was trained with {key}={saved_cfg[key]!r}, "
                             f"this SAE has {key}={sae.cfg.get(key)!r}. Use the checkpoint's config.json.")
    device = next(iter(sae.state_dict().values())).device
    state = torch.load(state_path, map_location="cpu", weights_only=True)
    if _weights_step(folder) != str(state["step"]):
        raise ValueError(f"{folder} is inconsistent: weights from step {_weights_step(folder)}, training "
                         f"state from step {state['step']} (a save was interrupted). Resume from an "
                         f"older copy or start afresh.")
    sae.load_state_dict(load_file(folder / WEIGHTS_FILE, device=str(device)))
    if optimizer is not None:
        if state["optimizer"] is None:
            raise ValueError(f"{folder} was saved without optimizer state; it cannot be resumed from.")
        optimizer.load_state_dict(state["optimizer"])
    set_rng_states(state["rng"])
    return {"step": state["step"], "extra": state["extra"]}
