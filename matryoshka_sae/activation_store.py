"""Activation store: text or token ids in, shuffled batches of model activations out.

The data flow, each step a function or method below:

    dataset  ->  documents of token ids  ->  rows of seq_len tokens  ->  model, stopped after the
    hooked block  ->  activations at the kept positions  ->  shuffled buffer on cfg["device"]  ->  batches

Documents and rows. A dataset gives documents either as token ids (a ``tokens`` or ``input_ids``
column) or as strings (a ``text`` column, tokenised with ``model.tokenizer`` without special tokens).
A pre-tokenised document of exactly seq_len tokens is taken to be a ready-made row and used as it is.
Every other document is packed: documents are concatenated and the stream is cut into rows of seq_len
tokens. When a BOS token is known (``cfg["bos_token_id"]``, else the tokenizer's BOS for a model that
prepends one, i.e. ``model.cfg.default_prepend_bos``) every document starts with BOS (added unless
already there) and so does every row (its first token is set to BOS). Without a BOS token documents are
followed by the tokenizer's EOS where there is one, else simply concatenated.

Held-out rows. The first ``cfg["n_eval_rows"]`` rows are set aside for evaluation
(`get_eval_tokens`); the documents they came from are skipped by the training stream in every epoch.
With ``cfg["eval_dataset_path"]`` (e.g. a test split) they are read from that dataset instead.

Lanes. The training documents are dealt to cfg["data_lanes"] lanes, each running the flow above on
its documents; the global batch is the lanes' batches side by side, whatever the number of ranks
that computes them (`ActivationsStore`). One lane (a single process, by default) is the plain flow.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import torch
from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict
from datasets.exceptions import DatasetGenerationError
from tqdm import tqdm

from matryoshka_sae import distributed

TOKEN_COLUMNS = ("tokens", "input_ids")
TEXT_COLUMN = "text"
BUILTIN_CORPUS = "python-docs"  # Python's own documentation, see builtin_corpus.py
LOCAL_FILE_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
DOCS_PER_READ = 64  # documents tokenised and packed together


# ---------------------------------------------------------------------------------------------
# Data: datasets, columns, packing
# ---------------------------------------------------------------------------------------------


def load_text_dataset(dataset_path: Any) -> Dataset | IterableDataset:
    """Resolve cfg["dataset_path"] to a dataset of documents (its "train" split).

    Accepted: a `datasets.Dataset`/`IterableDataset` (or a dict of splits) object; "python-docs"
    (the built-in corpus; "python-docs:train" and "python-docs:test" its splits); a local .txt file (one document per blank-line separated paragraph),
    .jsonl/.json or .parquet file; a folder written by `Dataset.save_to_disk` or holding data
    files; otherwise a Hugging Face hub name, streamed.
    """
    if isinstance(dataset_path, (DatasetDict, IterableDatasetDict)):
        return _train_split(dataset_path)
    if isinstance(dataset_path, (Dataset, IterableDataset)):
        return dataset_path
    if dataset_path == BUILTIN_CORPUS:
        from matryoshka_sae.builtin_corpus import python_docs_dataset

        return python_docs_dataset()
    if isinstance(dataset_path, str) and dataset_path.startswith(
        BUILTIN_CORPUS + ":"
    ):  # python-docs:train
        from matryoshka_sae.builtin_corpus import python_docs_dataset

        return python_docs_dataset(split=dataset_path.split(":", 1)[1])
    path = Path(dataset_path)
    if path.is_dir():
        if (path / "state.json").exists() or (path / "dataset_dict.json").exists():
            saved = datasets.load_from_disk(str(path))
            return saved if isinstance(saved, Dataset) else _train_split(saved)
        return datasets.load_dataset(str(path), split="train")
    builder = LOCAL_FILE_BUILDERS.get(path.suffix.lower())
    if builder is not None:
        if not path.is_file():
            raise FileNotFoundError(f"cfg['dataset_path'] = {str(dataset_path)!r}: no such file.")
        check_local_data_file(path, builder)
        options = {"sample_by": "paragraph"} if builder == "text" else {}
        try:
            return datasets.load_dataset(builder, data_files=str(path), split="train", **options)
        except DatasetGenerationError as error:
            raise ValueError(
                f"cfg['dataset_path'] = {str(path)!r} cannot be read as {builder} data: "
                f"{error.__cause__ or error}"
            ) from None
    return datasets.load_dataset(str(dataset_path), split="train", streaming=True)


def check_local_data_file(path: Path, builder: str) -> None:
    """Clear errors for a data file that is empty or, for text and JSON, not UTF-8 text."""
    if path.stat().st_size == 0:
        raise ValueError(
            f"cfg['dataset_path'] = {str(path)!r} is an empty file; give a file with documents."
        )
    if builder in ("text", "json"):
        with open(path, "rb") as f:
            head = f.read(1 << 16)
        try:
            head.decode("utf-8")
        except UnicodeDecodeError as error:
            if error.start < len(head) - 3:  # not a character cut at the end of the sample
                raise ValueError(
                    f"cfg['dataset_path'] = {str(path)!r} is not UTF-8 text (byte {error.start}); "
                    f"give documents as UTF-8 text (.txt, .jsonl) or a .parquet file."
                ) from None
        if b"\x00" in head:
            raise ValueError(
                f"cfg['dataset_path'] = {str(path)!r} is a binary file, not text; give "
                f"documents as UTF-8 text (.txt, .jsonl) or a .parquet file."
            )


def _train_split(splits: DatasetDict | IterableDatasetDict) -> Dataset | IterableDataset:
    if "train" not in splits:
        raise ValueError(
            f"The dataset has splits {list(splits)} but no 'train' split; pass the "
            f"split to use as cfg['dataset_path'], e.g. dataset_dict['{next(iter(splits))}']."
        )
    return splits["train"]


def _describe(dataset_path: Any) -> str:
    """A short name for cfg["dataset_path"] in messages (not the repr of a whole dataset)."""
    if isinstance(dataset_path, (str, Path)):
        return repr(str(dataset_path))
    return f"{type(dataset_path).__name__} object"


def find_data_column(dataset: Dataset | IterableDataset) -> str:
    """The column holding the documents: 'tokens' or 'input_ids' (token ids), else 'text'."""
    columns = dataset.column_names
    if columns is None:  # a streamed dataset whose features are not declared
        columns = list(next(iter(dataset)))
    for column in (*TOKEN_COLUMNS, TEXT_COLUMN):
        if column in columns:
            return column
    raise ValueError(
        f"The dataset has columns {list(columns)}, but an activation store reads token ids from a "
        f"'tokens' or 'input_ids' column, or strings from a 'text' column. Rename the column that "
        f"holds your documents, e.g. dataset.rename_column('{columns[0] if columns else 'x'}', 'text')."
    )


def pack_documents(
    docs: list[torch.Tensor], seq_len: int, bos: int | None, eos: int | None, carry: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate documents (1-D token ids) after `carry` and cut the stream into rows.

    With a `bos`, each document starts with it (added unless present) and each row's first token
    is set to it; otherwise each document is followed by `eos` when given. Returns the rows
    ``[n_rows, seq_len]`` and the tail of fewer than seq_len tokens to carry into the next call.
    """
    pieces = [carry]
    for doc in docs:
        if len(doc) == 0:
            continue
        if bos is not None and doc[0].item() != bos:
            pieces.append(torch.tensor([bos]))
        pieces.append(doc)
        if bos is None and eos is not None:
            pieces.append(torch.tensor([eos]))
    stream = torch.cat(pieces)
    n_rows = len(stream) // seq_len
    rows = stream[: n_rows * seq_len].view(n_rows, seq_len)
    if bos is not None:
        rows[:, 0] = bos
    return rows, stream[n_rows * seq_len :]


def document_markers(model, cfg: dict) -> tuple[int | None, int | None]:
    """(BOS, EOS) token ids used to mark documents; see the module docstring."""
    tokenizer = model.tokenizer
    bos = cfg.get("bos_token_id")
    if bos is None and tokenizer is not None and model.cfg.default_prepend_bos:
        bos = tokenizer.bos_token_id
    eos = tokenizer.eos_token_id if tokenizer is not None else None
    return bos, eos


def excluded_bos_token(model, cfg: dict) -> int | None:
    """The BOS id whose positions are left out (cfg["exclude_bos"]), or None when none are."""
    if not cfg.get("exclude_bos"):
        return None
    bos, _ = document_markers(model, cfg)
    if bos is None:
        raise ValueError(
            "cfg['exclude_bos'] is True but no BOS token is known: set "
            "cfg['bos_token_id'] to the BOS id, or cfg['exclude_bos'] = False."
        )
    return bos


def dictionary_hooks(cfg: dict) -> list[str]:
    """The hooks a dictionary of `cfg` reads, in the order of its forward's arguments: a transcoder's
    source and target; a cross-layer transcoder's sources (one a layer), then its targets; else hook_point."""
    if cfg.get("sae_type") == "matryoshka_clt":
        from matryoshka_sae.config import clt_hooks

        sources, targets = clt_hooks(cfg)
        return sources + targets
    if cfg.get("sae_type") == "matryoshka_transcoder":
        return [cfg["source_hook_point"], cfg["target_hook_point"]]
    return [cfg["hook_point"]]


def first_held_out_rows(eval_tokens: torch.Tensor, n_rows: int | None, fix: str) -> torch.Tensor:
    """The first `n_rows` of the held-out rows ``[held_out, seq_len]`` (all when None); `fix` says how
    to hold out more in the error for a count outside 1..held_out."""
    held_out = len(eval_tokens)
    n_rows = held_out if n_rows is None else n_rows
    if not 0 < n_rows <= held_out:
        raise ValueError(
            f"get_eval_tokens({n_rows}): {held_out} rows are held out; ask for "
            f"1..{held_out} or {fix}."
        )
    return eval_tokens[:n_rows]


def block_index(hook_name: str) -> int | None:
    """The block a hook belongs to (``blocks.8.hook_resid_pre`` -> 8), None outside the blocks."""
    match = re.match(r"blocks\.(\d+)\.", hook_name)
    return int(match.group(1)) if match else None


# ---------------------------------------------------------------------------------------------
# The training rows, as a stream whose position can be saved
# ---------------------------------------------------------------------------------------------


class RowStream:
    """Training rows ``[n, seq_len]`` (CPU), endlessly: epoch after epoch over the training documents.

    `read_documents(skip_docs)` gives one pass over the dataset from document `skip_docs` as
    (documents read, token ids) pairs; `rows_of(docs, carry)` packs documents into rows. Each epoch
    starts after the first `first_doc` documents (those held out for evaluation). The position
    (`state_dict`) is small: the epoch, the documents read in it, the tokens carried into the next
    row and the rows cut but not yet taken; `load_state_dict` reopens the dataset there.
    """

    def __init__(self, read_documents, rows_of, first_doc: int, seq_len: int, dataset_name: str):
        self._read_documents = read_documents
        self._rows_of = rows_of
        self._first_doc = first_doc
        self._dataset_name = dataset_name
        self.epoch = 0  # epochs completed
        self.rows_taken = 0
        self._docs_read = 0  # documents of the current epoch read so far
        self._tokens_in_epoch = 0
        self._carry = torch.empty(0, dtype=torch.long)
        self._pending = torch.empty(0, seq_len, dtype=torch.long)
        self._documents: Iterator | None = None  # opened on first use

    def take(self, n_rows: int) -> torch.Tensor:
        """The next `n_rows` rows ``[n_rows, seq_len]``."""
        parts, n_have = [self._pending], len(self._pending)
        while n_have < n_rows:
            rows = self._next_rows()
            parts.append(rows)
            n_have += len(rows)
        tokens = torch.cat(parts)
        self._pending = tokens[n_rows:]
        self.rows_taken += n_rows
        return tokens[:n_rows]

    def _next_rows(self) -> torch.Tensor:
        """The rows cut from the next read of documents (possibly none)."""
        if self._documents is None:
            self._documents = self._read_documents(self._first_doc + self._docs_read)
        read = next(self._documents, None)
        if read is None:
            self._end_epoch()
            return self._pending[:0]
        n_read, docs = read
        self._docs_read += n_read
        self._tokens_in_epoch += sum(len(doc) for doc in docs)
        rows, self._carry = self._rows_of(docs, self._carry)
        return rows

    def _end_epoch(self) -> None:
        if self._tokens_in_epoch == 0:
            raise ValueError(
                f"No training data: the dataset holds no tokens beyond the {self._first_doc} "
                f"documents held out for evaluation; lower cfg['n_eval_rows'] or use more data."
            )
        self.epoch += 1
        self._docs_read = self._tokens_in_epoch = 0
        self._documents = None
        warnings.warn(
            f"The dataset {self._dataset_name} is exhausted; starting epoch {self.epoch + 1} "
            f"over the same documents.",
            stacklevel=4,
        )

    def state_dict(self) -> dict[str, Any]:
        """The stream's position (copies; storable with ``torch.save(..., weights_only=True)``)."""
        return {
            "epoch": self.epoch,
            "docs_read": self._docs_read,
            "tokens_in_epoch": self._tokens_in_epoch,
            "rows_taken": self.rows_taken,
            "carry": self._carry.clone(),
            "pending": self._pending.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a position given by `state_dict`."""
        self.epoch, self._docs_read = state["epoch"], state["docs_read"]
        self._tokens_in_epoch, self.rows_taken = state["tokens_in_epoch"], state["rows_taken"]
        self._carry, self._pending = state["carry"].clone(), state["pending"].clone()
        self._documents = None


# ---------------------------------------------------------------------------------------------
# Lanes: shuffled blocks of activations from one share of the documents
# ---------------------------------------------------------------------------------------------


def lane_seed(seed: int, lane: int) -> int:
    """The seed of lane `lane`'s shuffling generator: cfg["seed"] itself for lane 0."""
    return seed if lane == 0 else (seed * 1_000_003 + lane) % 2**63


class Lane:
    """Rows -> activations -> shuffled blocks -> batches, for one lane of the training stream.

    The model runs on `chunk_rows` rows at a time ("chunks"); the activations of the chunks, in
    order, form one stream, cut into blocks of ``block_size = n_batches * batch_size`` consecutive
    activations; each block is shuffled by `generator` and served as n_batches batches.

    Exact resume. A block depends only on where it starts in the row stream and on the generator, so
    the lane's position (`state_dict`) is: the row stream's position before the chunk holding the
    block's first activation ("rows"), how many activations of that chunk precede the block ("skip"),
    the generator's state before the block's shuffle and the batches served from it ("served").
    `load_state_dict` recomputes that one block (the same chunks, so bit-identical activations).
    """

    def __init__(
        self,
        rows: RowStream,
        activations_of,
        chunk_rows: int,
        batch_size: int,
        n_batches: int,
        generator: torch.Generator,
        widths: list[int],
        device: torch.device,
    ):
        self.rows = rows
        self._activations_of = activations_of  # token rows -> per hook [kept positions, width]
        self._chunk_rows = chunk_rows
        self.batch_size = batch_size
        self.block_size = n_batches * batch_size
        self._generator = generator
        self._device = device
        empty = [torch.empty(0, width, device=device) for width in widths]
        self._buffers = empty  # the current block, shuffled, per hook
        self._pointer = 0  # activations of the block served
        self._spill = empty  # activations computed past the block: the tail of the last chunk
        self._last_chunk: tuple[dict, int] = (rows.state_dict(), 0)  # (rows before it, its length)
        self._block_start: dict[str, Any] = {}

    def next_batches(self) -> list[torch.Tensor]:
        """The next batch of every hook ``[batch_size, width]``, rows paired across hooks."""
        if self._pointer + self.batch_size > self.block_size:
            self.fill_block()
        batches = [
            buffer[self._pointer : self._pointer + self.batch_size] for buffer in self._buffers
        ]
        self._pointer += self.batch_size
        return batches

    def fill_block(self, progress: bool = False) -> None:
        """Make the next block of block_size activations current, shuffled; remember where it began.
        `progress`: show a bar of activations collected of block_size (the first fill is the long one).

        The block's shuffle `order` is drawn first, so each chunk is copied once, straight to its
        places: activation i of the block goes to row slot[i] of the buffer, where slot is the
        inverse of order, so that buffer[j] = block[order[j]] (what indexing the concatenated
        block by order gives, without the concatenated block or its copy)."""
        rows_before, chunk_length = self._last_chunk
        if len(self._spill[0]):  # the block starts inside the last chunk read
            self._block_start = {"rows": rows_before, "skip": chunk_length - len(self._spill[0])}
        else:
            self._block_start = {"rows": self.rows.state_dict(), "skip": 0}
        self._block_start["generator"] = self._generator.get_state()
        order = torch.randperm(self.block_size, generator=self._generator, device=self._device)
        slot = torch.empty_like(order)
        slot[order] = torch.arange(self.block_size, device=self._device)
        self._buffers = []  # the served block's memory is released before the next one is made
        buffers: list[torch.Tensor] = []
        bar = tqdm(
            total=self.block_size,
            desc="Filling the activation buffer",
            unit="tok",
            unit_scale=True,
            leave=False,
            disable=not progress or not distributed.is_main_process(),
        )
        n_have, pieces = 0, self._spill
        while True:
            take = min(len(pieces[0]), self.block_size - n_have)
            if take and not buffers:
                buffers = [
                    torch.empty(
                        self.block_size, piece.shape[1], dtype=piece.dtype, device=self._device
                    )
                    for piece in pieces
                ]
            places = slot[n_have : n_have + take]
            for buffer, piece in zip(buffers, pieces):
                buffer.index_copy_(0, places, piece[:take])
            n_have += take
            bar.update(take)
            if n_have == self.block_size:
                break
            rows_before = self.rows.state_dict()
            pieces = self._activations_of(self.rows.take(self._chunk_rows))
            self._last_chunk = (rows_before, len(pieces[0]))
        bar.close()
        self._spill = [piece[take:].clone() for piece in pieces]  # frees the chunk
        self._buffers = buffers
        self._pointer = 0

    def skip_rows(self, n_rows: int) -> None:
        """Continue after the first `n_rows` rows of the lane (a new block from there)."""
        if n_rows > self.rows.rows_taken:
            self.rows.take(n_rows - self.rows.rows_taken)
        self._spill = [buffer[:0] for buffer in self._buffers]
        self.fill_block()

    def state_dict(self) -> dict[str, Any]:
        return {**self._block_start, "served": self._pointer}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows.load_state_dict(state["rows"])
        rows_before = self.rows.state_dict()
        chunk = self._activations_of(self.rows.take(self._chunk_rows))
        self._spill = [acts[state["skip"] :] for acts in chunk]
        self._last_chunk = (rows_before, len(chunk[0]))
        self._generator.set_state(state["generator"])
        self.fill_block()
        self._pointer = state["served"]


def lanes_position(state: dict[str, Any] | list[dict[str, Any]]) -> dict[str, Any]:
    """A saved store position as ``{"lanes": [one per lane], "settings": ...}``. Earlier versions saved
    one lane's position flat (a single process), or a list of one per rank (torchrun; rank r's
    stream was lane r's)."""
    if isinstance(state, list):
        return {"lanes": state, "settings": {**state[0]["settings"], "data_lanes": len(state)}}
    if "lanes" in state:
        return state
    lane = {key: value for key, value in state.items() if key != "settings"}
    return {"lanes": [lane], "settings": {**state["settings"], "data_lanes": 1}}


# ---------------------------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------------------------


class ActivationsStore:
    """Shuffled batches of the activations at cfg["hook_point"], on cfg["device"] in float32.

    The model runs on ``model_batch_size`` rows at a time, stopped after the hooked block; with
    cfg["exclude_bos"] the activations at BOS positions are dropped. The activation stream is cut
    into blocks of ``num_batches_in_buffer`` batches; each block is shuffled with a generator seeded
    by cfg["seed"] and served batch by batch, so every batch is a uniform sample of a block that
    spans many documents (as in the original repository); see `Lane`. When the data runs out a
    warning is issued and a new epoch starts.

    Lanes: one global stream for any number of ranks. The training documents are dealt to L =
    cfg["data_lanes"] lanes (default: the number of ranks the run starts with, so 1 on a single
    process): document i after the held-out ones goes to lane i % L. Each lane packs its own
    documents into rows, runs the model on them and shuffles its own blocks (generator seeded by
    `lane_seed`(seed, lane)), serving batches of B / L rows, B = cfg["batch_size"]; the global
    batch is the lanes' batches concatenated in lane order. It depends on L, not on the number of
    ranks W: under torchrun rank r serves rows [r B / W, (r + 1) B / W) of every global batch and
    runs the model on the lanes holding them. When W divides L that is L / W lanes per rank and no
    work is repeated; otherwise ranks sharing a lane each compute all of it (exact, but the model's
    work is then not divided; a warning says so).

    Exact resume. The position (`state_dict`) is every lane's (`Lane`) and so global: a checkpoint
    written by any number of ranks continues on any other on exactly the global batches that the
    run would have seen. `load_state_dict` recomputes each lane's current block.
    """

    def __init__(self, model, cfg: dict):
        self.model = model
        self.cfg = cfg
        self.device = torch.device(cfg["device"])
        self.seq_len = cfg["seq_len"]
        self.hooks = self._hooks()
        self.hook_names = [name for name, _ in self.hooks]
        self.stop_at_layer = self._check_hooks()
        if self.seq_len > model.cfg.n_ctx:
            raise ValueError(
                f"cfg['seq_len'] = {self.seq_len} exceeds the model's context of "
                f"{model.cfg.n_ctx} tokens; lower cfg['seq_len']."
            )

        self.dataset = load_text_dataset(cfg["dataset_path"])
        self.column = find_data_column(self.dataset)
        if self.column == TEXT_COLUMN and model.tokenizer is None:
            raise ValueError(
                "The dataset has a 'text' column but the model has no tokenizer. Load the model with "
                "its tokenizer (or call model.set_tokenizer(...)), or give a dataset of token ids in "
                "a 'tokens' column."
            )
        self.bos, self.eos = document_markers(model, cfg)
        self.exclude_bos = excluded_bos_token(model, cfg) is not None

        eval_dataset = self.dataset
        if cfg.get("eval_dataset_path") is not None:
            eval_dataset = load_text_dataset(cfg["eval_dataset_path"])
            if find_data_column(eval_dataset) != self.column:
                raise ValueError(
                    f"cfg['eval_dataset_path'] holds a '{find_data_column(eval_dataset)}' "
                    f"column but the training data a '{self.column}' column; give both "
                    f"the same kind of data."
                )
        eval_tokens, n_eval_docs = self._hold_out_rows(eval_dataset, cfg["n_eval_rows"])
        self._eval_tokens = eval_tokens
        self._n_eval_docs = n_eval_docs if eval_dataset is self.dataset else 0

        self.batch_size = distributed.local_batch_size(
            cfg["batch_size"]
        )  # this rank's rows of a batch
        self.n_lanes = 0
        self._lanes: dict[
            int, tuple[Lane, slice]
        ] = {}  # this rank's lanes: lane, its rows of a lane batch
        self._set_lanes(cfg.get("data_lanes") or distributed.world_size())
        for lane, _ in self._lanes.values():
            lane.fill_block(progress=True)  # early, so that bad settings or data fail here

    # -- public -------------------------------------------------------------------------------

    def next_batch(self) -> torch.Tensor:
        """The next ``[batch_size, act_size]`` float32 batch of activations (under torchrun this
        rank's ``batch_size / ranks`` rows of the global batch)."""
        return self._next_batches()[0]

    def skip_tokens(self, n_tokens: int) -> None:
        """Move the stream past the token rows that gave the first `n_tokens` activations of the
        global stream (resuming a run).

        Each lane's buffer is emptied and refilled from the row where a fresh lane would be after
        serving n_tokens / lanes activations (estimated from the activations each row gives); no row
        is repeated. An approximation kept for checkpoints written without the store's state;
        `load_state_dict` is exact.
        """
        per_row = self.seq_len - (1 if self.exclude_bos else 0)
        target_rows = -(-n_tokens // (per_row * self.n_lanes))
        for lane, _ in self._lanes.values():
            lane.skip_rows(target_rows)

    @property
    def epochs_completed(self) -> int:
        return min(lane.rows.epoch for lane, _ in self._lanes.values())

    # -- lanes ----------------------------------------------------------------------------------

    def _set_lanes(self, n_lanes: int) -> None:
        """Deal the data to `n_lanes` lanes and make this rank's: those holding its rows of the global
        batch (each with the slice of its lane batch that this rank serves)."""
        global_batch = self.cfg["batch_size"]
        if global_batch % n_lanes:
            raise ValueError(
                f"cfg['batch_size'] = {global_batch} does not divide among {n_lanes} data lanes "
                f"(cfg['data_lanes']); set --data-lanes to a divisor of the batch size."
            )
        lane_batch, first = global_batch // n_lanes, distributed.rank() * self.batch_size
        widths = [self.cfg[size_key] for _, size_key in self.hooks]
        self.n_lanes, self._lanes = n_lanes, {}
        for index in range(first // lane_batch, (first + self.batch_size - 1) // lane_batch + 1):
            start = max(first, index * lane_batch) - index * lane_batch
            stop = min(first + self.batch_size, (index + 1) * lane_batch) - index * lane_batch
            generator = torch.Generator(device=self.device).manual_seed(
                lane_seed(self.cfg["seed"], index)
            )
            lane = Lane(
                self._new_row_stream(index, n_lanes),
                self.activations_of,
                self.cfg["model_batch_size"],
                lane_batch,
                self.cfg["num_batches_in_buffer"],
                generator,
                widths,
                self.device,
            )
            self._lanes[index] = (lane, slice(start, stop))
        if n_lanes % distributed.world_size() and distributed.is_main_process():
            warnings.warn(
                f"The data stream has {n_lanes} lane(s) (cfg['data_lanes']) for {distributed.world_size()} "
                f"ranks: ranks that serve rows of one lane each run the model on all of it. The batches "
                f"are exact but the model's work is not divided; start runs with --data-lanes a "
                f"multiple of every number of ranks they may run on.",
                stacklevel=3,
            )

    def _next_batches(self) -> list[torch.Tensor]:
        """This rank's rows of the next global batch, per hook (rows paired across hooks): its slices
        of its lanes' batches, in lane order."""
        parts = [
            [batch[rows] for batch in lane.next_batches()] for lane, rows in self._lanes.values()
        ]
        return parts[0] if len(parts) == 1 else [torch.cat(column) for column in zip(*parts)]

    # -- position: exact resume ------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The global position after the batches served so far (see the class docstring).

        Small (no activations): every lane's position, and the settings that shape the stream, which
        `load_state_dict` checks. Under torchrun a collective (every rank calls it; each gives the
        positions of its lanes and receives all).
        """
        lanes = {index: lane.state_dict() for index, (lane, _) in self._lanes.items()}
        if distributed.is_active():
            lanes = {
                index: state
                for part in distributed.gather_objects(lanes)
                for index, state in part.items()
            }
        return {
            "lanes": [lanes[index] for index in range(self.n_lanes)],
            "settings": self._stream_settings(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where the store that gave `state` (its `state_dict`, from any number of
        ranks) was: with its number of lanes (unless cfg["data_lanes"] says otherwise, an error)."""
        state = lanes_position(state)
        saved, current = state["settings"], self._stream_settings()
        if self.cfg.get("data_lanes") is None:  # the run's own lanes, whatever the number of ranks
            current["data_lanes"] = saved["data_lanes"]
        changed = [key for key in current if saved.get(key) != current[key]]
        if changed:
            raise ValueError(
                "The saved data position was made with other settings: "
                + ", ".join(f"{key} {saved.get(key)!r} -> {current[key]!r}" for key in changed)
                + ". Resume with the run's own settings (its config.json), or start afresh."
            )
        if saved["data_lanes"] != self.n_lanes:
            self._set_lanes(saved["data_lanes"])
        for index, (lane, _) in self._lanes.items():
            lane.load_state_dict(state["lanes"][index])

    def _stream_settings(self) -> dict[str, Any]:
        """What the stream of batches depends on besides the data position."""
        keys = (
            "batch_size",
            "num_batches_in_buffer",
            "model_batch_size",
            "seq_len",
            "seed",
            "exclude_bos",
        )
        return {
            "hooks": list(self.hook_names),
            "dataset": _describe(self.cfg["dataset_path"]),
            **{key: self.cfg.get(key) for key in keys},
            "data_lanes": self.n_lanes,
        }

    def get_eval_tokens(self, n_rows: int | None = None) -> torch.Tensor:
        """The first `n_rows` held-out rows (default: all), ``[n_rows, seq_len]`` long, on cfg["device"].

        They never appear in the training stream and are the same on every call.
        """
        return first_held_out_rows(self._eval_tokens, n_rows, "raise cfg['n_eval_rows']")

    # -- hooks --------------------------------------------------------------------------------

    def _hooks(self) -> list[tuple[str, str]]:
        """(hook name, cfg key of its width) for every hook the store reads."""
        return [(self.cfg["hook_point"], "act_size")]

    def _check_hooks(self) -> int | None:
        """Check the hooks exist (enabling hook_mlp_in); return the layer to stop the model at."""
        for name in self.hook_names:
            if name not in self.model.hook_dict:
                raise ValueError(
                    f"The model has no hook {name!r}; check cfg['site'] and cfg['layer'] "
                    f"(the model has {self.model.cfg.n_layers} layers)."
                )
            if name.endswith("hook_mlp_in"):
                self.model.set_use_hook_mlp_in(True)
        blocks = [block_index(name) for name in self.hook_names]
        return None if None in blocks else max(blocks) + 1

    # -- token rows ---------------------------------------------------------------------------

    def _new_row_stream(self, lane: int = 0, n_lanes: int = 1) -> RowStream:
        """Lane `lane` of `n_lanes`'s training rows from the start (by default the whole stream): every
        epoch skips the documents held out for evaluation."""
        share = (lane, n_lanes)
        return RowStream(
            lambda skip_docs: self._read_documents(self.dataset, skip_docs, DOCS_PER_READ, share),
            self._rows_of,
            self._n_eval_docs,
            self.seq_len,
            _describe(self.cfg["dataset_path"]),
        )

    def _read_documents(
        self, dataset, skip_docs: int, docs_per_read: int, share: tuple[int, int] = (0, 1)
    ) -> Iterator[tuple[int, list[torch.Tensor]]]:
        """One pass over `dataset` after `skip_docs` documents: (documents read, their 1-D token ids).

        share = (lane, lanes): each read takes docs_per_read x lanes documents and keeps those at
        positions lane, lane + lanes, ... (the lanes read disjoint documents: reads start at
        multiples of docs_per_read x lanes after the held-out documents)."""
        if isinstance(dataset, Dataset) and skip_docs >= len(dataset):
            return  # all read (Dataset.skip refuses to skip everything)
        dataset = dataset.skip(skip_docs) if skip_docs else dataset
        lane, lanes = share
        for batch in dataset.iter(batch_size=docs_per_read * lanes):
            n_read = len(batch[self.column])
            docs = [doc for doc in batch[self.column][lane::lanes] if doc is not None]
            if self.column == TEXT_COLUMN and docs:
                docs = self.model.tokenizer(docs, add_special_tokens=False, verbose=False)[
                    "input_ids"
                ]
            yield n_read, [torch.as_tensor(doc, dtype=torch.long) for doc in docs]

    def _rows_of(
        self, docs: list[torch.Tensor], carry: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows from documents: pre-tokenised rows of exactly seq_len as they are, the rest packed."""
        ready = []
        if self.column != TEXT_COLUMN:
            ready = [doc for doc in docs if len(doc) == self.seq_len]
            docs = [doc for doc in docs if len(doc) != self.seq_len]
        rows, carry = pack_documents(docs, self.seq_len, self.bos, self.eos, carry)
        return (torch.cat([torch.stack(ready), rows]) if ready else rows), carry

    def _hold_out_rows(self, dataset, n_rows: int) -> tuple[torch.Tensor, int]:
        """The first `n_rows` rows of `dataset` and the number of documents they used."""
        rows, n_docs, n_have = [], 0, 0
        carry = torch.empty(0, dtype=torch.long)
        if n_rows > 0:
            for n_read, docs in self._read_documents(dataset, skip_docs=0, docs_per_read=1):
                n_docs += n_read
                new_rows, carry = self._rows_of(docs, carry)
                rows.append(new_rows)
                n_have += len(new_rows)
                if n_have >= n_rows:
                    break
            else:
                raise ValueError(
                    f"The dataset has fewer than cfg['n_eval_rows'] = {n_rows} rows of "
                    f"{self.seq_len} tokens; lower cfg['n_eval_rows'] or use more data."
                )
        held_out = (
            torch.cat(rows)[:n_rows] if rows else torch.empty(0, self.seq_len, dtype=torch.long)
        )
        return held_out.to(self.device), n_docs

    # -- activations and the buffer -------------------------------------------------------------

    def activations_of(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """For token rows ``[rows, seq_len]``: per hook, float32 ``[kept positions, width]`` activations."""
        return [acts.to(self.device, torch.float32) for acts in self.model_activations(tokens)[1]]

    def model_activations(self, tokens: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """For token rows ``[rows, seq_len]``: the token ids at the kept positions ``[n]`` and, per
        hook, the activations there ``[n, width]`` as the model gives them (its dtype and device)."""
        tokens = tokens.to(self.model.cfg.device)
        with torch.no_grad():
            _, cache = self.model.run_with_cache(
                tokens,
                names_filter=self.hook_names,
                stop_at_layer=self.stop_at_layer,
                return_cache_object=False,
            )
        keep = tokens != self.bos if self.exclude_bos else None
        out = []
        for name, size_key in self.hooks:
            acts = cache[name]
            if acts.shape[-1] != self.cfg[size_key]:
                raise ValueError(
                    f"act_size mismatch: hook {name} gives activations of width {acts.shape[-1]} but "
                    f"cfg['{size_key}'] = {self.cfg[size_key]}. Set cfg['model_name'] to the model you "
                    f"loaded (or cfg['{size_key}'] = {acts.shape[-1]}) and run post_init_cfg(cfg) again."
                )
            acts = acts[keep] if keep is not None else acts.flatten(0, 1)
            if not torch.isfinite(acts).all():
                raise ValueError(
                    f"Activations at hook {name} contain NaN or inf; check the model's "
                    f"weights and cfg['model_dtype'] (float16 can overflow)."
                )
            out.append(acts)
        return (tokens[keep] if keep is not None else tokens.flatten()), out

    def unshuffled_activations(self) -> Iterator[tuple[torch.Tensor, list[torch.Tensor]]]:
        """The training stream from its start, in order, one chunk of model_batch_size rows at a time:
        `model_activations` of each chunk (what an activation cache stores). Endless (epochs)."""
        rows = self._new_row_stream()
        while True:
            yield self.model_activations(rows.take(self.cfg["model_batch_size"]))


class MultiHookActivationsStore(ActivationsStore):
    """Batches for dictionaries at several hooks (layers, sites) from one forward pass per chunk.

    `next_batch()` is ``{hook name: [batch_size, act_size]}`` over the hooks of `cfgs` (each cfg's
    `dictionary_hooks`); row i of every batch comes from the same token, and the model stops after
    the last hook's block. Data, shuffling and resume are those of `ActivationsStore` (cfgs[0]'s
    data settings).
    """

    serves_several_hooks = True  # the training loop gives each dictionary its hook's batch

    def __init__(self, model, cfgs: list[dict]):
        self._names = list(dict.fromkeys(name for cfg in cfgs for name in dictionary_hooks(cfg)))
        super().__init__(model, cfgs[0])

    def _hooks(self) -> list[tuple[str, str]]:
        return [(name, "act_size") for name in self._names]

    def next_batch(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.hook_names, self._next_batches()))
