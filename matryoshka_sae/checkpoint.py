"""Saving and loading SAEs and their training state.

A checkpoint is a folder:

    config.json         the cfg (`config.cfg_to_json`)
    sae.safetensors     every parameter and buffer of the SAE (its `state_dict`)
    training_state.pt   optimizer state, completed step count, RNG states, extra (optional): the
                        training loop keeps the activation store's position in extra
    sae.previous.safetensors, training_state.previous.pt   the save before (training saves only)
    metrics.json        the run's latest metrics (optional)
    history.jsonl       every logged training step's metrics, one JSON object a line (optional)
    .written-by         the marker of a folder our tools wrote (see below)
    run.lock            while a training run writes the folder: its process id and host

Every file is written to a temporary name and renamed over the old one, so a crash while saving
leaves each file either complete and old or complete and new, never partial. The weights file is
renamed last and records the step. A training save keeps the files it replaces as *.previous.*,
so the folder always holds one complete save, and usually two (`saved_steps`): after a crash
between the renames, resuming takes the newest step whose weights and training state are both
there, never a mix of two saves. Dictionaries trained together resume from their newest common step.
Each temporary file is flushed to disk (fsync) before its rename and the folder after it; a write
that fails (a full or read-only disk) leaves the file it would have replaced as it was and ends in
a `CheckpointWriteError` naming the file.

Nothing a user has is destroyed. A folder is replaced (``--overwrite``) only when the tool replacing
it wrote it: it holds the marker file ``.written-by`` naming that tool and nothing but that tool's
files, and it neither is nor contains the input (`check_replaceable`). A training run claims its
folder before any model is loaded (`claim_run_folder`): a new run never writes into a folder that
holds a run (an automatic name gets the next free ``-2``, ``-3``... suffix; a chosen name is an
error unless resuming or overwriting), the folder is created and a probe file written there, the
free disk space is checked against the checkpoint's size, and a lock file makes a second run into
the same folder fail at once.
"""

from __future__ import annotations

import atexit
import copy
import errno
import json
import os
import random
import shutil
import socket
from pathlib import Path
from typing import Any, Callable, Collection, Sequence

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from matryoshka_sae.config import cfg_from_json, cfg_to_json, post_init_cfg

WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "config.json"
TRAINING_STATE_FILE = "training_state.pt"
# The files of the save before, kept so that an interrupted save (or one of a group) can be undone.
PREVIOUS = {
    TRAINING_STATE_FILE: "training_state.previous.pt",
    WEIGHTS_FILE: "sae.previous.safetensors",
}
METRICS_FILE = "metrics.json"
HISTORY_FILE = "history.jsonl"
MARKER_FILE = ".written-by"
LOCK_FILE = "run.lock"
PROBE_FILE = ".write-probe"
TRAINING_TOOL = "training"
# Everything training (and the demo's report, and inspect_sae.py by default) writes into a run folder.
RUN_FILES = frozenset(
    {
        CONFIG_FILE,
        WEIGHTS_FILE,
        TRAINING_STATE_FILE,
        METRICS_FILE,
        HISTORY_FILE,
        LOCK_FILE,
        *PREVIOUS.values(),
        "prefix_fvu.png",
        "firing_density.png",
        "feature_browser",
    }
)
# Errors of the disk rather than of the program: full, read-only, not permitted, over quota.
DISK_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT}


class CheckpointWriteError(OSError):
    """A file could not be written (full or read-only disk...); the file it replaces is intact."""


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
    """Write `path` through `write(tmp_path)`, fsync, rename; the old file survives any crash.

    With `previous`, the old file stays there (a hard link, else renamed) until the next write. A
    disk error (full, read-only...) is a `CheckpointWriteError` naming `path`; `path` is unchanged.
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
        _fsync_folder(path.parent)
    except OSError as error:
        if error.errno in DISK_ERRNOS and not isinstance(error, CheckpointWriteError):
            raise CheckpointWriteError(
                error.errno,
                f"cannot write {path}: {os.strerror(error.errno)}; "
                f"the file it replaces is intact. Free space or choose a writable "
                f"folder, then resume",
            ) from error
        raise
    finally:
        tmp.unlink(missing_ok=True)


def _fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (where the platform allows opening folders)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": state["numpy_key"].numpy().astype(np.uint32), "pos": pos},
            "has_gauss": has_gauss,
            "gauss": gauss,
        }
    )
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
        atomic_write(
            folder / METRICS_FILE, _write_text(json.dumps(metrics, indent=2, sort_keys=True))
        )
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
        atomic_write(
            folder / TRAINING_STATE_FILE,
            lambda path: torch.save(state, path),
            previous=folder / PREVIOUS[TRAINING_STATE_FILE],
        )
    tensors = {name: t.detach().cpu().contiguous() for name, t in sae.state_dict().items()}
    metadata = {"step": str(step)}
    atomic_write(
        folder / WEIGHTS_FILE,
        lambda path: save_file(tensors, str(path), metadata=metadata),
        previous=folder / PREVIOUS[WEIGHTS_FILE] if step is not None else None,
    )
    return folder


# ---------------------------------------------------------------------------------------------
# Folders: what may be replaced, claiming a run's folder, the lock
# ---------------------------------------------------------------------------------------------


def mark_folder(folder: Path, tool: str) -> None:
    """Record that `tool` wrote `folder` (the marker `check_replaceable` looks for)."""
    marker = Path(folder) / MARKER_FILE
    if not marker.exists() or marker.read_text().strip() != tool:
        atomic_write(marker, _write_text(tool + "\n"))


def _is_temporary(name: str) -> bool:
    return name.startswith(".") and (".tmp-" in name or name == PROBE_FILE)


def check_replaceable(
    folder: str | Path, tool: str, own_entries: Collection[str], inputs: Sequence[str | Path] = ()
) -> None:
    """Refuse (ValueError) to replace `folder` unless `tool` wrote it and nothing else is in it.

    Refused: `folder` is one of `inputs` or contains one of them (or the current folder); it is a
    file; it is not empty and has no marker of `tool`; it holds entries other than `own_entries`.
    A folder that does not exist, or is empty, may be written.
    """
    folder = Path(folder)
    where = folder.resolve()
    for given in [*inputs, Path.cwd()]:
        inside = Path(given).resolve()
        if inside == where or where in inside.parents:
            what = (
                "the current folder"
                if given == Path.cwd() and given not in inputs
                else f"the input {given}"
            )
            relation = "is" if inside == where else "contains"
            raise ValueError(
                f"refusing to replace {folder}: it {relation} {what}; choose a new output folder."
            )
    if not folder.exists():
        return
    if not folder.is_dir():
        raise ValueError(
            f"refusing to replace {folder}: it is a file, not a folder; choose a new output folder."
        )
    entries = sorted(entry.name for entry in folder.iterdir() if not _is_temporary(entry.name))
    if not entries:
        return
    marker = folder / MARKER_FILE
    writer = marker.read_text(errors="replace").strip() if marker.is_file() else None
    if writer != tool:
        by = "no marker file " + MARKER_FILE if writer is None else f"its marker says {writer!r}"
        raise ValueError(
            f"refusing to replace {folder}: {tool} did not write it ({by}); choose a new folder "
            f"or move it away yourself."
        )
    foreign = [name for name in entries if name not in own_entries and name != MARKER_FILE]
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise ValueError(
            f"refusing to replace {folder}: it holds {len(foreign)} entr{'y' if len(foreign) == 1 else 'ies'} "
            f"{tool} did not write ({shown}); choose a new folder or move them away yourself."
        )


def _has_entries(folder: Path) -> bool:
    return any(not _is_temporary(entry.name) for entry in folder.iterdir())


def claim_run_folder(
    cfg: dict, resume_from: str | Path | None = None, overwrite: bool = False
) -> Path:
    """Make ``checkpoint_dir / name`` this process's run folder, before any expensive work.

    New run (`resume_from` is not this folder): a folder that holds anything is never written into. A derived name
    (cfg["derived"]["name"]) moves on to the next free ``name-2``, ``name-3``... (cfg["name"] is
    updated); a chosen name is a ValueError, unless `overwrite` and the folder is a run folder that
    training wrote (`check_replaceable`): its files are removed. Resuming (`resume_from` is the
    folder): it must hold a checkpoint. Then: a probe file is written and removed, the free space is checked against
    `estimated_checkpoint_bytes(cfg)`, and the run's lock is taken (`acquire_run_lock`). Returns
    the folder; claiming it again in the same process does nothing more.
    """
    folder = checkpoint_folder(cfg)
    if _lock_path(folder) in _HELD_LOCKS:
        return folder
    if resume_from is not None and Path(resume_from).resolve() == folder.resolve():
        check_checkpoint_folder(folder)
    else:
        folder = _new_run_folder(cfg, overwrite)
    probe_folder(folder)
    check_free_space(folder, estimated_checkpoint_bytes(cfg))
    acquire_run_lock(folder)
    mark_folder(folder, TRAINING_TOOL)
    return folder


def _new_run_folder(cfg: dict, overwrite: bool) -> Path:
    parent = Path(cfg["checkpoint_dir"])
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(
            f"checkpoint_dir {str(parent)!r} cannot be created ({error.strerror or error}); "
            f"choose a writable --checkpoint-dir."
        ) from None
    if not parent.is_dir():
        raise ValueError(
            f"checkpoint_dir {str(parent)!r} is a file, not a folder; choose another --checkpoint-dir."
        )
    derived_name = cfg.get("derived", {}).get("name") == cfg["name"]
    base, counter = cfg["name"], 1
    while True:
        folder = parent / cfg["name"]
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            pass
        except OSError as error:
            raise ValueError(
                f"cannot create the run folder {folder} ({error.strerror or error}); choose a "
                f"writable --checkpoint-dir."
            ) from None
        if not folder.is_dir():
            raise ValueError(f"{folder} is a file; choose another run name or --checkpoint-dir.")
        if _lock_holder(folder) is None and not _has_entries(
            folder
        ):  # (a dead process's lock is removed)
            return folder
        if overwrite or not derived_name:
            _check_not_locked(folder)
        if overwrite:
            check_replaceable(folder, TRAINING_TOOL, RUN_FILES)
            _remove_run_files(folder)
            return folder
        if not derived_name:
            raise ValueError(
                f"{folder} already holds a run; continue it with --resume {folder}, replace it "
                f"with --overwrite, or give the new run another name or --checkpoint-dir."
            )
        counter += 1
        cfg["name"] = f"{base}-{counter}"


def _remove_run_files(folder: Path) -> None:
    """Remove a replaced run's files (check_replaceable has seen that nothing else is there)."""
    for name in RUN_FILES - {LOCK_FILE}:
        path = folder / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def probe_folder(folder: Path, option: str = "--checkpoint-dir") -> None:
    """Write, fsync and remove a small file in `folder`: a clear error now rather than at the first
    save (naming `option`, the setting that chose the folder)."""
    probe = folder / PROBE_FILE
    try:
        with open(probe, "wb") as f:
            f.write(b"probe")
            f.flush()
            os.fsync(f.fileno())
    except OSError as error:
        raise ValueError(
            f"cannot write to {folder} ({error.strerror or error}); choose a writable {option}."
        ) from None
    finally:
        probe.unlink(missing_ok=True)


def estimated_checkpoint_bytes(cfg: dict) -> int:
    """Disk a training checkpoint of `cfg` takes at most: weights and Adam's two moments, float32, each
    kept twice (the current save and the one before)."""
    return 2 * 3 * 4 * dictionary_parameters(cfg)


def dictionary_parameters(cfg: dict) -> int:
    """Parameters of the dictionary `cfg` describes: encoder, decoder, biases (and a transcoder's
    skip matrix); enough for memory and disk estimates."""
    source = cfg.get("source_act_size") or cfg["act_size"]
    target = cfg.get("target_act_size") or cfg["act_size"]
    if (
        cfg.get("sae_type") == "matryoshka_clt"
    ):  # L encoders; decoders S x (L - j) x target for j < L
        n = len(cfg["clt_layers"])
        return (
            n * cfg["dict_size"] * (source + 1)
            + cfg["dict_size"] * target * n * (n + 1) // 2
            + n * (source + target)
        )
    count = cfg["dict_size"] * (source + target + 1) + source + target
    if cfg.get("transcoder_skip"):
        count += source * target
    return count


def check_free_space(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise ValueError(
            f"the checkpoint folder {folder} has {free / 2**20:,.0f} MiB free, but the run's checkpoints "
            f"need about {needed / 2**20:,.0f} MiB; free space or choose another --checkpoint-dir."
        )


_HELD_LOCKS: set[Path] = set()


def _lock_path(folder: Path) -> Path:
    return (Path(folder) / LOCK_FILE).resolve()


def _lock_holder(folder: Path) -> dict | None:
    """Who holds `folder`'s lock ({"pid", "host"}), or None if nobody does (a dead process's lock is
    removed)."""
    path = Path(folder) / LOCK_FILE
    try:
        holder = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (ValueError, OSError):
        return {"pid": "?", "host": "?"}  # being written, or damaged: treat as held
    if holder.get("host") == socket.gethostname() and not _process_alive(holder.get("pid")):
        path.unlink(missing_ok=True)  # left by a process that was killed
        return None
    return holder


def _process_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError):
        return True
    return True


def _check_not_locked(folder: Path) -> None:
    holder = _lock_holder(folder)
    if holder is not None and _lock_path(folder) not in _HELD_LOCKS:
        raise ValueError(
            f"{folder} is in use by another run (process {holder['pid']} on {holder['host']}); wait "
            f"for it to end or choose another folder. If no run uses it, delete {folder / LOCK_FILE}."
        )


def acquire_run_lock(folder: str | Path) -> None:
    """Take `folder`'s lock file for this process (released at exit or by `release_run_lock`); a
    ValueError at once if another live process holds it."""
    folder = Path(folder)
    path = _lock_path(folder)
    if path in _HELD_LOCKS:
        return
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, _FILE_MODE)
        except FileExistsError:
            _check_not_locked(folder)  # raises unless the holder was dead (its lock is gone now)
            continue
        except OSError as error:
            raise ValueError(
                f"cannot write to the checkpoint folder {folder} ({error.strerror or error}); choose "
                f"a writable --checkpoint-dir."
            ) from None
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": os.getpid(), "host": socket.gethostname()}, f)
        _HELD_LOCKS.add(path)
        return
    _check_not_locked(folder)


def release_run_lock(folder: str | Path) -> None:
    path = _lock_path(Path(folder))
    if path in _HELD_LOCKS:
        _HELD_LOCKS.discard(path)
        path.unlink(missing_ok=True)


@atexit.register
def _release_all_locks() -> None:
    for path in list(_HELD_LOCKS):
        release_run_lock(path.parent)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def check_checkpoint_folder(folder: str | Path) -> None:
    """A clear error when `folder` is not a checkpoint folder (config.json and sae.safetensors)."""
    folder = Path(folder)
    if folder.is_file():
        raise ValueError(
            f"{str(folder)!r} is a file, not a checkpoint folder; give the folder training wrote "
            f"(checkpoint_dir/name, holding {CONFIG_FILE} and {WEIGHTS_FILE})."
        )
    if not folder.is_dir():
        raise ValueError(f"{str(folder)!r} is not a checkpoint folder: no such folder.")
    missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if not (folder / name).is_file()]
    if missing:
        raise ValueError(
            f"{str(folder)!r} is not a checkpoint folder: it has no {' and no '.join(missing)}. "
            f"Give a folder written by training or save_checkpoint (checkpoint_dir/name)."
        )


def _damaged_weights(folder: Path, error: Exception) -> ValueError:
    return ValueError(
        f"{folder / WEIGHTS_FILE} cannot be read ({error}): the file is truncated or damaged. "
        f"Use an intact copy of the checkpoint."
    )


def _read_weights(folder: Path, device: str) -> dict[str, torch.Tensor]:
    """The tensors of ``folder/sae.safetensors``; a damaged file is a clear error."""
    try:
        return load_file(folder / WEIGHTS_FILE, device=device)
    except SafetensorError as error:
        raise _damaged_weights(folder, error) from None


def load_cfg(folder: str | Path) -> dict:
    """The cfg stored in a checkpoint folder, checked: a ValueError names the file and what is wrong
    (not text, not JSON, not an object, a setting `config.post_init_cfg` rejects)."""
    path = Path(folder) / CONFIG_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(
            f"{path} is not UTF-8 text (a damaged or binary file); use an intact copy of the "
            f"checkpoint."
        ) from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path} is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}); "
            f"fix the edit or use an intact copy."
        ) from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} holds a JSON {type(raw).__name__}, not an object of settings.")
    cfg = cfg_from_json(text)
    try:
        post_init_cfg({**copy.deepcopy(cfg), "derived": {}})  # every saved value checked as given
    except (ValueError, TypeError, KeyError) as error:
        raise ValueError(f"{path}: {error}") from None
    return cfg


def check_weights_match(sae: torch.nn.Module, shapes: dict[str, Any], path: Path) -> None:
    """`shapes` ({tensor name: shape} of a weights file) has every tensor of the SAE, of its shape,
    and no other: else a ValueError naming the tensor."""
    expected = sae.state_dict()
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    if missing or unexpected:
        parts = ([f"lacks {', '.join(missing)}"] if missing else []) + (
            [f"has unexpected {', '.join(unexpected)}"] if unexpected else []
        )
        raise ValueError(
            f"{path} does not match its config.json ({sae.cfg['sae_type']}): it {' and '.join(parts)}."
        )
    for name, tensor in expected.items():
        if tuple(shapes[name]) != tuple(tensor.shape):
            raise ValueError(
                f"{path}: tensor {name!r} has shape {tuple(shapes[name])}, but its config.json "
                f"(act_size, dict_size) needs {tuple(tensor.shape)}."
            )


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
    """Build the SAE described by ``folder/config.json`` and load its weights and buffers; in eval
    mode (call ``.train()`` to train it further).

    `device` overrides the cfg's device (e.g. load a GPU-trained SAE on "cpu"); without it, an
    SAE saved on CUDA loads on the CPU of a machine that has no GPU.
    """
    from matryoshka_sae.sae import (
        create_sae,
    )  # imported here: sae.py imports nothing from this module

    folder = Path(folder)
    check_checkpoint_folder(folder)
    cfg = load_cfg(folder)
    if device is not None:
        cfg["device"] = str(device)
    elif str(cfg["device"]).startswith("cuda") and not torch.cuda.is_available():
        cfg["device"] = "cpu"
    sae = create_sae(cfg)
    weights = _read_weights(folder, str(cfg["device"]))
    check_weights_match(sae, {name: t.shape for name, t in weights.items()}, folder / WEIGHTS_FILE)
    sae.load_state_dict(weights)
    return (
        sae.eval()
    )  # eval mode: a forward pass changes no running statistic (JumpReLU's threshold)


def _weights_shapes(path: Path) -> dict[str, list[int]]:
    """{tensor name: shape} of a safetensors file, from its header alone."""
    try:
        with safe_open(path, framework="pt") as f:
            return {name: f.get_slice(name).get_shape() for name in f.keys()}
    except SafetensorError as error:
        raise _damaged_weights(path.parent, error) from None


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
    weights = {
        _weights_file_step(folder / name): folder / name
        for name in (WEIGHTS_FILE, PREVIOUS[WEIGHTS_FILE])
        if (folder / name).exists()
    }
    states = {
        torch.load(folder / name, map_location="cpu", weights_only=True, mmap=True)["step"]: folder
        / name
        for name in (TRAINING_STATE_FILE, PREVIOUS[TRAINING_STATE_FILE])
        if (folder / name).exists()
    }
    return {
        step: (weights[step], states[step])
        for step in weights.keys() & states.keys()
        if step is not None
    }


def restore_checkpoint(
    folder: str | Path,
    sae: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    step: int | None = None,
) -> dict[str, Any]:
    """Load a checkpoint's weights, buffers, optimizer state and RNG states into a live run.

    `step`: which of the folder's complete saves (`saved_steps`); default the newest. The folder's
    current files become that save's. Returns ``{"step", "extra"}``; `step` is the number of
    training steps already done.
    """
    folder = Path(folder)
    check_checkpoint_folder(folder)
    if not any(
        (folder / name).exists() for name in (TRAINING_STATE_FILE, PREVIOUS[TRAINING_STATE_FILE])
    ):
        raise ValueError(
            f"{folder} has no {TRAINING_STATE_FILE}: it holds weights only and cannot be "
            f"resumed from. Load it with load_sae(folder) instead."
        )
    saved_cfg = load_cfg(folder)
    for key in ("sae_type", "act_size", "dict_size", "group_sizes"):
        if key in saved_cfg and saved_cfg[key] != sae.cfg.get(key):
            raise ValueError(
                f"Cannot resume from {folder}: it was trained with {key}={saved_cfg[key]!r}, "
                f"this SAE has {key}={sae.cfg.get(key)!r}. Use the checkpoint's config.json."
            )
    check_weights_match(sae, _weights_shapes(folder / WEIGHTS_FILE), folder / WEIGHTS_FILE)
    saves = saved_steps(folder)
    step = max(saves, default=None) if step is None else step
    if step not in saves:
        raise ValueError(
            f"{folder} is inconsistent: no step has both its weights and its training state "
            f"(complete saves: {sorted(saves)}; wanted {step}). Resume from an older copy or "
            f"start afresh."
        )
    weights_path, state_path = saves[step]
    for path, name in ((weights_path, WEIGHTS_FILE), (state_path, TRAINING_STATE_FILE)):
        if path.name != name:  # an interrupted save: its older files become current again
            os.replace(path, folder / name)
    device = next(iter(sae.state_dict().values())).device
    state = torch.load(folder / TRAINING_STATE_FILE, map_location="cpu", weights_only=True)
    sae.load_state_dict(_read_weights(folder, str(device)))
    if optimizer is not None:
        if state["optimizer"] is None:
            raise ValueError(
                f"{folder} was saved without optimizer state; it cannot be resumed from."
            )
        optimizer.load_state_dict(state["optimizer"])
    set_rng_states(state["rng"])
    return {"step": state["step"], "extra": state["extra"]}
