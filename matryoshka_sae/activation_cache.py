"""Activation cache: run the language model once, then train many dictionaries from disk.

The model's forward pass, not the SAE step, is the cost of training; a sweep (dictionary sizes, k,
seeds) over the same activations pays for it once. `write_activation_cache` runs the model over the
training stream of `ActivationsStore` (the same rows, documents held out for evaluation left out,
BOS positions dropped when cfg["exclude_bos"]) and writes a folder:

    shard_00000.safetensors ...  per hook name a ``[n, width]`` tensor in the model's dtype, and
                                 "tokens" ``[n]`` int32: the token id at each activation's position
    eval_tokens.safetensors      "tokens" ``[n_eval_rows, seq_len]``: the held-out rows (CE evaluation)
    manifest.json                written last: model, hooks and widths, dtype, dataset, seq_len, BOS
                                 handling, the count and every shard's; a folder without it is an
                                 incomplete cache (interrupted, or a full disk) and is never read

`CachedActivationsStore(cfg)` reads it (cfg["activation_cache"] = the folder) with the interface of
the live stores: `next_batch` (an SAE's batch, or a transcoder's (source, target) pair),
`get_eval_tokens`, `state_dict`/`load_state_dict`. The shards are memory-mapped and only the rows
served are read. Shuffling keeps memory bounded: each epoch orders the cache's chunks (runs of
``chunk`` consecutive activations) by a seeded permutation, the resulting stream is cut into blocks
of ``num_batches_in_buffer * batch_size`` activations, and each block (about 16 chunks from all over
the cache) is shuffled by a generator seeded with the block's index. A batch is thus a pure function
of its index: the store's position is the number of batches served, and resuming is exact. Epochs
repeat the cache in a new order.

Under torchrun each rank reads and serves its rows of every global batch (rank r of W: rows
[r B / W, (r + 1) B / W)), so the global batches, and the position, are those of one process: a run
resumes exactly on any number of ranks. The cache itself is written by one process
(cache_activations.py without torchrun).
"""

from __future__ import annotations

import functools
import json
import uuid
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from matryoshka_sae import distributed
from matryoshka_sae.activation_store import ActivationsStore, dictionary_hooks, first_held_out_rows
from matryoshka_sae.checkpoint import MARKER_FILE, atomic_write, mark_folder, probe_folder
from matryoshka_sae.config import canonical_model_name

CACHE_FORMAT = "matryoshka-sae activation cache 1"
MANIFEST_FILE = "manifest.json"
EVAL_TOKENS_FILE = "eval_tokens.safetensors"
TOKENS = "tokens"
CACHE_TOOL = "cache_activations"  # the cache folder's marker (checkpoint.mark_folder)
SHARD_MB = 256  # default shard size on disk
MAX_CHUNK = 4096  # consecutive activations kept together by the epoch order
OPEN_SHARDS = 64  # shard files kept memory-mapped at once
SAFETENSORS_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
}


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


class _CacheSource(ActivationsStore):
    """The live store's data and model passes at any hooks, without its shuffled buffer."""

    def __init__(self, model, cfg: dict, hook_names: list[str]):
        self._cache_hooks = hook_names
        super().__init__(model, cfg)

    def _hooks(self) -> list[tuple[str, str]]:
        return [(name, "act_size") for name in self._cache_hooks]

    def _set_lanes(self, n_lanes: int) -> None:
        """No lanes or buffers: the cache reads `unshuffled_activations`."""


def write_activation_cache(
    model,
    cfg: dict,
    folder: str | Path,
    hook_names: list[str] | None = None,
    num_tokens: int | None = None,
    shard_mb: float = SHARD_MB,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run `model` once over cfg's training data and write the activations at `hook_names`
    (default: those of the dictionary `cfg` describes) for `num_tokens` positions (default
    cfg["num_tokens"]) to `folder`, in shards of about `shard_mb` MB. Returns the manifest.

    The folder must be new, empty, an incomplete cache, or (with `overwrite`) a complete cache,
    which is replaced; a folder holding other files is refused. The provenance recorded is the
    data as given (cfg["dataset_path"]).
    """
    if distributed.launched_by_torchrun():
        raise ValueError(
            "An activation cache is written by one process: run cache_activations.py without "
            "torchrun, then train from the cache (--activations DIR) under torchrun."
        )
    folder = prepare_cache_folder(Path(folder), overwrite)
    hook_names = hook_names or dictionary_hooks(cfg)
    num_tokens = int(num_tokens or cfg["num_tokens"])
    source = _CacheSource(model, cfg, hook_names)
    dtype = next(model.parameters()).dtype
    bytes_per_position = len(hook_names) * cfg["act_size"] * dtype.itemsize + 4
    shard_size = max(1, int(shard_mb * 2**20) // bytes_per_position)

    shards: list[dict[str, Any]] = []
    pending: list[tuple[torch.Tensor, list[torch.Tensor]]] = []
    n_pending = n_written = 0
    progress = tqdm(total=num_tokens, unit="tok", unit_scale=True, desc="Caching activations")
    for token_ids, acts in source.unshuffled_activations():
        take = min(len(token_ids), num_tokens - n_written - n_pending)
        pending.append((token_ids[:take].to("cpu", torch.int32), [a[:take].cpu() for a in acts]))
        n_pending += take
        progress.update(take)
        done = n_written + n_pending == num_tokens
        while n_pending >= shard_size or (done and n_pending):
            count = min(shard_size, n_pending)
            pending, n_pending = (
                _write_shard(folder, len(shards), hook_names, pending, count),
                n_pending - count,
            )
            shards.append({"file": _shard_name(len(shards)), "count": count})
            n_written += count
        if done:
            break
    progress.close()
    eval_tokens = (
        source.get_eval_tokens().cpu() if cfg["n_eval_rows"] else torch.empty(0, cfg["seq_len"])
    )
    atomic_write(
        folder / EVAL_TOKENS_FILE, lambda path: save_file({TOKENS: eval_tokens.long()}, str(path))
    )
    manifest = {
        "format": CACHE_FORMAT,
        "id": uuid.uuid4().hex,
        "model_name": cfg["model_name"],
        "hooks": {name: cfg["act_size"] for name in hook_names},
        "dtype": str(dtype).removeprefix("torch."),
        "dataset": str(cfg["dataset_path"]),
        "seq_len": cfg["seq_len"],
        "exclude_bos": bool(source.exclude_bos),
        "bos_token_id": source.bos,
        "n_eval_rows": len(eval_tokens),
        "num_tokens": n_written,
        "shards": shards,
    }
    atomic_write(
        folder / MANIFEST_FILE, lambda path: path.write_text(json.dumps(manifest, indent=1))
    )
    return manifest


def prepare_cache_folder(folder: Path, overwrite: bool) -> Path:
    """A new or empty folder, an incomplete cache, or (with `overwrite`) a complete one, emptied of
    the cache's files; a folder holding anything else is refused."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is a file; write the cache to a new or empty folder.")
    if folder.exists() and any(folder.iterdir()):
        names = [entry.name for entry in folder.iterdir()]
        foreign = sorted(name for name in names if not _cache_file(name))
        if foreign or not (
            {MANIFEST_FILE, MARKER_FILE} & set(names) or list(folder.glob("shard_*.safetensors"))
        ):
            raise ValueError(
                f"{folder} is not empty and holds no activation cache (it holds "
                f"{', '.join(foreign[:5])}); write the cache to a new or empty folder."
            )
        if MANIFEST_FILE in names and not overwrite:
            raise ValueError(
                f"{folder} holds a complete activation cache; replace it with --overwrite "
                f"(overwrite=True) or write to another folder."
            )
        (folder / MANIFEST_FILE).unlink(missing_ok=True)  # from here on the old cache is incomplete
        for old in [*folder.glob("shard_*.safetensors"), folder / EVAL_TOKENS_FILE]:
            old.unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    probe_folder(folder, "--out")
    mark_folder(folder, CACHE_TOOL)
    return folder


def _cache_file(name: str) -> bool:
    """A name the cache writes (or its temporary files)."""
    return (
        name in (MANIFEST_FILE, EVAL_TOKENS_FILE, MARKER_FILE)
        or (name.startswith("shard_") and name.endswith(".safetensors"))
        or (name.startswith(".") and ".tmp-" in name)
    )


def _shard_name(index: int) -> str:
    return f"shard_{index:05d}.safetensors"


def _write_shard(
    folder: Path,
    index: int,
    hook_names: list[str],
    pending: list[tuple[torch.Tensor, list[torch.Tensor]]],
    count: int,
) -> list:
    """Write the first `count` pending positions as shard `index`; returns what is left pending."""
    tokens = torch.cat([t for t, _ in pending])
    acts = [torch.cat([a[i] for _, a in pending]) for i in range(len(hook_names))]
    tensors = {
        TOKENS: tokens[:count].contiguous(),
        **{name: a[:count].contiguous() for name, a in zip(hook_names, acts)},
    }
    atomic_write(folder / _shard_name(index), lambda path: save_file(tensors, str(path)))
    return [(tokens[count:], [a[count:] for a in acts])] if count < len(tokens) else []


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of a complete cache; a clear error for anything else."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"cfg['activation_cache'] = {str(folder)!r}: no such folder.")
    path = folder / MANIFEST_FILE
    if not path.exists():
        if list(folder.glob("shard_*.safetensors")):
            raise ValueError(
                f"{folder} is an incomplete activation cache (no {MANIFEST_FILE}: writing it was "
                f"interrupted or is still running); write it again."
            )
        raise ValueError(
            f"{folder} is not an activation cache (no {MANIFEST_FILE}); write one with "
            f"cache_activations.py."
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); write the cache again.") from None
    if not isinstance(manifest, dict) or manifest.get("format") != CACHE_FORMAT:
        raise ValueError(
            f"{path}: not a manifest of this version's caches (format "
            f"{manifest.get('format') if isinstance(manifest, dict) else None!r}); write it again."
        )
    return manifest


def check_cache_matches(manifest: dict[str, Any], cfg: dict, folder: Path) -> None:
    """The cache must hold the activations the cfg's dictionary reads, as the cfg's model gives them."""
    problems = []
    if canonical_model_name(manifest["model_name"]) != canonical_model_name(cfg["model_name"]) or (
        canonical_model_name(cfg["model_name"]) is None
        and manifest["model_name"] != cfg["model_name"]
    ):
        problems.append(f"model {manifest['model_name']!r}, not {cfg['model_name']!r}")
    missing = [name for name in dictionary_hooks(cfg) if name not in manifest["hooks"]]
    if missing:
        problems.append(f"hooks {list(manifest['hooks'])}, not {missing}")
    for key in ("seq_len", "exclude_bos"):
        if cfg.get(key) is not None and manifest[key] != cfg[key]:
            problems.append(f"{key} {manifest[key]!r}, not {cfg[key]!r}")
    widths = {
        name: manifest["hooks"][name] for name in dictionary_hooks(cfg) if name in manifest["hooks"]
    }
    wanted = cfg.get("act_size")
    if wanted is not None and any(width != wanted for width in widths.values()):
        problems.append(
            f"activations of width {sorted(set(widths.values()))}, not act_size {wanted}"
        )
    if cfg.get("n_eval_rows") and manifest["n_eval_rows"] < cfg["n_eval_rows"]:
        problems.append(
            f"{manifest['n_eval_rows']} held-out rows, not n_eval_rows {cfg['n_eval_rows']} "
            f"(train with --n-eval-rows {manifest['n_eval_rows']} or fewer)"
        )
    if problems:
        raise ValueError(
            f"The activation cache {folder} holds {'; '.join(problems)}. Train with the cache's "
            f"settings (--model, --layer/--site, --seq-len as when it was written) or write a "
            f"cache for these."
        )


class CachedActivationsStore:
    """Shuffled batches from an activation cache, on cfg["device"] in float32 (see the module doc).

    `next_batch()` is ``[batch_size, act_size]`` for an SAE, ``(source, target)`` for a transcoder.
    Under torchrun rank r of W serves rows [r B / W, (r + 1) B / W) of every global batch of B =
    cfg["batch_size"] and reads only those rows from the cache: the ranks' rows are disjoint, the
    global batches those of one process, and the position (batches served) is global.
    """

    def __init__(self, cfg: dict, folder: str | Path | None = None):
        self.cfg = cfg
        self.folder = Path(folder or cfg["activation_cache"])
        self.manifest = read_manifest(self.folder)
        check_cache_matches(self.manifest, cfg, self.folder)
        self.hook_names = dictionary_hooks(cfg)
        self.device = torch.device(cfg["device"])
        self._layouts = [self._open_shard(shard) for shard in self.manifest["shards"]]
        self._mapped_rows = functools.lru_cache(maxsize=OPEN_SHARDS)(self._map_rows)
        counts = torch.tensor([shard["count"] for shard in self.manifest["shards"]])
        self._shard_ends = counts.cumsum(0)
        self.n_activations = int(self._shard_ends[-1]) if len(counts) else 0
        if self.n_activations == 0:
            raise ValueError(f"The activation cache {self.folder} holds no activations.")
        self.global_batch = cfg["batch_size"]
        self.batch_size = distributed.local_batch_size(
            self.global_batch
        )  # this rank's rows of a batch
        self.buffer_size = cfg["num_batches_in_buffer"] * self.global_batch
        self.chunk = max(1, min(MAX_CHUNK, self.buffer_size // 16))
        self._batches_served = 0
        self._block_index: int | None = None
        self._block: list[torch.Tensor] = []
        self._epoch_orders: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._eval_tokens = load_file(self.folder / EVAL_TOKENS_FILE)[TOKENS].to(self.device)

    def _open_shard(self, shard: dict[str, Any]) -> dict[str, tuple[int, torch.dtype, int]]:
        """Check a shard; where each hook's rows lie in its file: {name: (byte offset, dtype, width)}."""
        path = self.folder / shard["file"]
        try:
            with safe_open(path, framework="pt") as handle:
                shapes = {
                    name: handle.get_slice(name).get_shape() for name in (*self.hook_names, TOKENS)
                }
        except (SafetensorError, OSError) as error:
            raise ValueError(
                f"The activation cache shard {path} cannot be read ({error}): it is missing, "
                f"truncated or damaged; write the cache again."
            ) from None
        if any(shape[0] != shard["count"] for shape in shapes.values()):
            raise ValueError(
                f"The activation cache shard {path} holds {shapes} positions, the manifest says "
                f"{shard['count']}; write the cache again."
            )
        for name in self.hook_names:
            if len(shapes[name]) != 2 or shapes[name][1] != self.manifest["hooks"][name]:
                raise ValueError(
                    f"The activation cache shard {path}: tensor {name!r} has shape {shapes[name]}, "
                    f"but {MANIFEST_FILE} gives width {self.manifest['hooks'][name]}; write the cache again."
                )
        return _tensor_layout(path, self.hook_names)

    # -- public ---------------------------------------------------------------------------------

    def next_batch(self) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        block, batch = divmod(self._batches_served, self.cfg["num_batches_in_buffer"])
        if block != self._block_index:
            self._load_block(block)
        rows = slice(batch * self.batch_size, (batch + 1) * self.batch_size)
        batches = [acts[rows] for acts in self._block]
        self._batches_served += 1
        return batches[0] if len(batches) == 1 else tuple(batches)

    def get_eval_tokens(self, n_rows: int | None = None) -> torch.Tensor:
        """The first `n_rows` held-out rows of the cached data, ``[n_rows, seq_len]`` long."""
        return first_held_out_rows(
            self._eval_tokens, n_rows, "write the cache with more n_eval_rows"
        )

    @property
    def epochs_completed(self) -> int:
        return self._batches_served * self.global_batch // self.n_activations

    def state_dict(self) -> dict[str, Any]:
        """The position: global batches served (a batch is a function of its index, the same for any
        number of ranks), and what fixes the order."""
        return {"batches_served": self._batches_served, "settings": self._stream_settings()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved, current = state.get("settings", {}), self._stream_settings()
        changed = [key for key in current if saved.get(key) != current[key]]
        if changed:
            raise ValueError(
                "The saved data position was made with other settings: "
                + ", ".join(f"{key} {saved.get(key)!r} -> {current[key]!r}" for key in changed)
                + ". Resume with the run's own settings and cache, or start afresh."
            )
        self._batches_served = state["batches_served"]
        self._block_index = None

    def _stream_settings(self) -> dict[str, Any]:
        return {
            "cache": self.manifest["id"],
            "hooks": self.hook_names,
            "batch_size": self.global_batch,
            "num_batches_in_buffer": self.cfg["num_batches_in_buffer"],
            "seed": self.cfg["seed"],
        }

    # -- the shuffled stream ----------------------------------------------------------------------

    def _epoch_order(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The epoch's chunk order and the cumulative ends of the chunks in that order."""
        if epoch not in self._epoch_orders:
            n_chunks = -(-self.n_activations // self.chunk)
            generator = torch.Generator().manual_seed(_seed(self.cfg["seed"], "epoch", epoch))
            order = torch.randperm(n_chunks, generator=generator)
            lengths = torch.clamp(self.n_activations - order * self.chunk, max=self.chunk)
            self._epoch_orders = {epoch: (order, lengths.cumsum(0))}  # keep one epoch's
            if epoch > 0 and distributed.is_main_process():
                warnings.warn(
                    f"The activation cache {self.folder} is exhausted; starting epoch {epoch + 1} "
                    f"in a new order.",
                    stacklevel=4,
                )
        return self._epoch_orders[epoch]

    def _pieces(self, start: int, length: int) -> Iterator[tuple[int, int]]:
        """Cache index ranges [a, b) of stream positions start..start + length (epochs in a row)."""
        while length > 0:
            epoch, offset = divmod(start, self.n_activations)
            order, ends = self._epoch_order(epoch)
            i = int(torch.searchsorted(ends, offset, right=True))
            chunk_first = int(order[i]) * self.chunk
            chunk_length = min(self.chunk, self.n_activations - chunk_first)
            remaining = int(ends[i]) - offset  # positions of this chunk from `offset` on
            first = chunk_first + chunk_length - remaining
            take = min(remaining, length)
            yield first, first + take
            start, length = start + take, length - take

    def _map_rows(self, shard: int, name: str) -> np.memmap:
        """Shard `shard`'s activations at hook `name` as bytes ``[count, width x itemsize]``, mapped
        from the file (the OPEN_SHARDS most recently used stay mapped)."""
        offset, dtype, width = self._layouts[shard][name]
        return np.memmap(
            self.folder / self.manifest["shards"][shard]["file"],
            dtype=np.uint8,
            mode="r",
            offset=offset,
            shape=(self.manifest["shards"][shard]["count"], width * dtype.itemsize),
        )

    def _read(self, index: torch.Tensor) -> list[torch.Tensor]:
        """Per hook, the cached activations at the sorted cache indices `index` [n] (model dtype,
        CPU): only those rows are read from the files."""
        shards = torch.searchsorted(self._shard_ends, index, right=True)
        parts: list[list[torch.Tensor]] = [[] for _ in self.hook_names]
        for shard, rows in zip(
            *(part.tolist() for part in torch.unique_consecutive(shards, return_counts=True))
        ):
            local = index[:rows] - (int(self._shard_ends[shard - 1]) if shard else 0)
            index = index[rows:]
            for part, name in zip(parts, self.hook_names):
                dtype = self._layouts[shard][name][1]
                part.append(
                    torch.from_numpy(self._mapped_rows(shard, name)[local.numpy()]).view(dtype)
                )
        return [torch.cat(part) if len(part) > 1 else part[0] for part in parts]

    def _load_block(self, block: int) -> None:
        """This rank's rows of the block's batches, in the order served. The block is buffer_size
        consecutive positions of the epoch-ordered stream, shuffled by the block's generator; batch j
        is shuffled positions [j B, (j + 1) B), of which rank r serves [r b, (r + 1) b), b = B / W."""
        index = torch.cat(
            [
                torch.arange(a, b)
                for a, b in self._pieces(block * self.buffer_size, self.buffer_size)
            ]
        )
        generator = torch.Generator(device=self.device).manual_seed(
            _seed(self.cfg["seed"], "block", block)
        )
        order = torch.randperm(self.buffer_size, generator=generator, device=self.device).cpu()
        first = distributed.rank() * self.batch_size
        mine = index[
            order.view(-1, self.global_batch)[:, first : first + self.batch_size].flatten()
        ]
        sorted_index, served_at = mine.sort()  # read the files in order, then put the rows in place
        served_at = served_at.to(self.device)
        self._block = []
        for rows in self._read(sorted_index):
            rows = rows.to(self.device)
            in_place = torch.empty_like(rows)
            in_place[served_at] = rows
            self._block.append(in_place.float())
        self._block_index = block


def _tensor_layout(path: Path, names: list[str]) -> dict[str, tuple[int, torch.dtype, int]]:
    """Where the 2-D tensors `names` of a safetensors file lie: {name: (byte offset, dtype, width)}
    (the format: an 8-byte header length, a JSON header with each tensor's dtype, shape and byte
    range after the header, then the data)."""
    with open(path, "rb") as f:
        header_length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_length))
    layout = {}
    for name in names:
        dtype = SAFETENSORS_DTYPES.get(header[name]["dtype"])
        if dtype is None:
            raise ValueError(
                f"The activation cache shard {path} stores {name} as {header[name]['dtype']}; "
                f"write the cache again from a float16, bfloat16 or float32 model."
            )
        layout[name] = (
            8 + header_length + header[name]["data_offsets"][0],
            dtype,
            header[name]["shape"][1],
        )
    return layout


def _seed(seed: int, kind: str, index: int) -> int:
    """A seed for the `index`-th epoch order or block shuffle, distinct for each (seed, kind, index)."""
    return (seed * 1_000_003 + index * 2 + (kind == "block")) % (2**63)


def activation_store_for(model, cfg: dict):
    """The store a training run reads: the cache of cfg["activation_cache"] when set, else the live
    store for the cfg's dictionary (paired source/target batches for a transcoder)."""
    if cfg.get("activation_cache"):
        return CachedActivationsStore(cfg)
    if cfg["sae_type"] == "matryoshka_transcoder":
        from matryoshka_sae.transcoder_activation_store import TranscoderActivationsStore

        return TranscoderActivationsStore(model, cfg)
    return ActivationsStore(model, cfg)
