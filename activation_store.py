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
    (the built-in corpus); a local .txt file (one document per blank-line separated paragraph),
    .jsonl/.json or .parquet file; a folder written by `Dataset.save_to_disk` or holding data
    files; otherwise a Hugging Face hub name, streamed.
    """
    if isinstance(dataset_path, (DatasetDict, IterableDatasetDict)):
        return _train_split(dataset_path)
    if isinstance(dataset_path, (Dataset, IterableDataset)):
        return dataset_path
    if dataset_path == BUILTIN_CORPUS:
        from builtin_corpus import python_docs_dataset

        return python_docs_dataset()
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
        options = {"sample_by": "paragraph"} if builder == "text" else {}
        return datasets.load_dataset(builder, data_files=str(path), split="train", **options)
    return datasets.load_dataset(str(dataset_path), split="train", streaming=True)


def _train_split(splits: DatasetDict | IterableDatasetDict) -> Dataset | IterableDataset:
    if "train" not in splits:
        raise ValueError(f"The dataset has splits {list(splits)} but no 'train' split; pass the "
                         f"split to use as cfg['dataset_path'], e.g. dataset_dict['{next(iter(splits))}'].")
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
        raise ValueError("cfg['exclude_bos'] is True but no BOS token is known: set "
                         "cfg['bos_token_id'] to the BOS id, or cfg['exclude_bos'] = False.")
    return bos


def block_index(hook_name: str) -> int | None:
    """The block a hook belongs to (``blocks.8.hook_resid_pre`` -> 8), None outside the blocks."""
    match = re.match(r"blocks\.(\d+)\.", hook_name)
    return int(match.group(1)) if match else None


# ---------------------------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------------------------


class ActivationsStore:
    """Shuffled batches of the activations at cfg["hook_point"], on cfg["device"] in float32.

    A buffer of ``num_batches_in_buffer * batch_size`` activations is filled by running the model
    on ``model_batch_size`` rows at a time, stopped after the hooked block. Once more than half of
    it has been served, the unused part is kept, fresh activations are added and the whole buffer is
    shuffled (seeded by cfg["seed"]), so consecutive batches mix many documents. With
    cfg["exclude_bos"] the activations at BOS positions are dropped. When the data runs out a
    warning is issued and a new epoch starts.
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
            raise ValueError(f"cfg['seq_len'] = {self.seq_len} exceeds the model's context of "
                             f"{model.cfg.n_ctx} tokens; lower cfg['seq_len'].")

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

        self.epochs_completed = 0
        eval_dataset = self.dataset
        if cfg.get("eval_dataset_path") is not None:
            eval_dataset = load_text_dataset(cfg["eval_dataset_path"])
            if find_data_column(eval_dataset) != self.column:
                raise ValueError(f"cfg['eval_dataset_path'] holds a '{find_data_column(eval_dataset)}' "
                                 f"column but the training data a '{self.column}' column; give both "
                                 f"the same kind of data.")
        eval_tokens, n_eval_docs = self._hold_out_rows(eval_dataset, cfg["n_eval_rows"])
        self._eval_tokens = eval_tokens
        self._n_eval_docs = n_eval_docs if eval_dataset is self.dataset else 0
        self._rows = self._training_rows()
        self._pending_rows = torch.empty(0, self.seq_len, dtype=torch.long)
        self._rows_read = 0  # training rows taken from the stream so far

        self.buffer_size = cfg["num_batches_in_buffer"] * cfg["batch_size"]
        self._generator = torch.Generator(device=self.device).manual_seed(cfg["seed"])
        self._buffers = [torch.empty(0, cfg[size_key], device=self.device) for _, size_key in self.hooks]
        self._pointer = 0
        self._refill()

    # -- public -------------------------------------------------------------------------------

    def next_batch(self) -> torch.Tensor:
        """The next ``[batch_size, act_size]`` float32 batch of activations."""
        return self._next_batches()[0]

    def skip_tokens(self, n_tokens: int) -> None:
        """Move the stream past the token rows that gave `n_tokens` activations (resuming a run).

        The buffer is emptied and refilled from the row where a fresh store would be after serving
        n_tokens activations (estimated from the activations each row gives); no row is repeated.
        """
        per_row = self.seq_len - (1 if self.exclude_bos else 0)
        target_rows = -(-n_tokens // per_row)
        if target_rows > self._rows_read:
            self._next_tokens(target_rows - self._rows_read)
        self._buffers = [buffer[:0] for buffer in self._buffers]
        self._pointer = 0
        self._refill()

    def get_eval_tokens(self, n_rows: int | None = None) -> torch.Tensor:
        """The first `n_rows` held-out rows (default: all), ``[n_rows, seq_len]`` long, on cfg["device"].

        They never appear in the training stream and are the same on every call.
        """
        held_out = len(self._eval_tokens)
        n_rows = held_out if n_rows is None else n_rows
        if not 0 < n_rows <= held_out:
            raise ValueError(f"get_eval_tokens({n_rows}): {held_out} rows are held out; ask for "
                             f"1..{held_out} or raise cfg['n_eval_rows'].")
        return self._eval_tokens[:n_rows]

    # -- hooks --------------------------------------------------------------------------------

    def _hooks(self) -> list[tuple[str, str]]:
        """(hook name, cfg key of its width) for every hook the store reads."""
        return [(self.cfg["hook_point"], "act_size")]

    def _check_hooks(self) -> int | None:
        """Check the hooks exist (enabling hook_mlp_in); return the layer to stop the model at."""
        for name in self.hook_names:
            if name not in self.model.hook_dict:
                raise ValueError(f"The model has no hook {name!r}; check cfg['site'] and cfg['layer'] "
                                 f"(the model has {self.model.cfg.n_layers} layers).")
            if name.endswith("hook_mlp_in"):
                self.model.set_use_hook_mlp_in(True)
        blocks = [block_index(name) for name in self.hook_names]
        return None if None in blocks else max(blocks) + 1

    # -- token rows ---------------------------------------------------------------------------

    def _read_documents(self, dataset, skip_docs: int, docs_per_read: int) -> Iterator[list[torch.Tensor]]:
        """One pass over `dataset` after `skip_docs` documents: lists of 1-D token id tensors."""
        dataset = dataset.skip(skip_docs) if skip_docs else dataset
        for batch in dataset.iter(batch_size=docs_per_read):
            docs = [doc for doc in batch[self.column] if doc is not None]
            if self.column == TEXT_COLUMN and docs:
                docs = self.model.tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]
            yield [torch.as_tensor(doc, dtype=torch.long) for doc in docs]

    def _rows_of(self, docs: list[torch.Tensor], carry: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
            for docs in self._read_documents(dataset, skip_docs=0, docs_per_read=1):
                n_docs += 1
                new_rows, carry = self._rows_of(docs, carry)
                rows.append(new_rows)
                n_have += len(new_rows)
                if n_have >= n_rows:
                    break
            else:
                raise ValueError(f"The dataset has fewer than cfg['n_eval_rows'] = {n_rows} rows of "
                                 f"{self.seq_len} tokens; lower cfg['n_eval_rows'] or use more data.")
        held_out = torch.cat(rows)[:n_rows] if rows else torch.empty(0, self.seq_len, dtype=torch.long)
        return held_out.to(self.device), n_docs

    def _training_rows(self) -> Iterator[torch.Tensor]:
        """Token rows ``[n, seq_len]`` (CPU), endlessly: epoch after epoch over the training documents."""
        carry = torch.empty(0, dtype=torch.long)
        while True:
            n_tokens = 0
            for docs in self._read_documents(self.dataset, self._n_eval_docs, DOCS_PER_READ):
                n_tokens += sum(len(doc) for doc in docs)
                rows, carry = self._rows_of(docs, carry)
                if len(rows):
                    yield rows
            if n_tokens == 0:
                raise ValueError(f"No training data: the dataset holds no tokens beyond the "
                                 f"{self._n_eval_docs} documents held out for evaluation; lower "
                                 f"cfg['n_eval_rows'] or use more data.")
            self.epochs_completed += 1
            warnings.warn(f"The dataset {_describe(self.cfg['dataset_path'])} is exhausted; starting "
                          f"epoch {self.epochs_completed + 1} over the same documents.", stacklevel=2)

    def _next_tokens(self, n_rows: int) -> torch.Tensor:
        """The next `n_rows` training rows ``[n_rows, seq_len]``."""
        parts, n_have = [self._pending_rows], len(self._pending_rows)
        while n_have < n_rows:
            rows = next(self._rows)
            parts.append(rows)
            n_have += len(rows)
        tokens = torch.cat(parts)
        self._pending_rows = tokens[n_rows:]
        self._rows_read += n_rows
        return tokens[:n_rows]

    # -- activations and the buffer -------------------------------------------------------------

    def activations_of(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """For token rows ``[rows, seq_len]``: per hook, float32 ``[kept positions, width]`` activations."""
        tokens = tokens.to(self.model.cfg.device)
        with torch.no_grad():
            _, cache = self.model.run_with_cache(
                tokens, names_filter=self.hook_names, stop_at_layer=self.stop_at_layer,
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
                raise ValueError(f"Activations at hook {name} contain NaN or inf; check the model's "
                                 f"weights and cfg['model_dtype'] (float16 can overflow).")
            out.append(acts.to(self.device, torch.float32))
        return out

    def _refill(self) -> None:
        """Keep the unused activations, add fresh ones up to buffer_size, shuffle all together."""
        columns = [[buffer[self._pointer :]] for buffer in self._buffers]
        n_have = len(columns[0][0])
        while n_have < self.buffer_size:
            fresh = self.activations_of(self._next_tokens(self.cfg["model_batch_size"]))
            for column, acts in zip(columns, fresh):
                column.append(acts)
            n_have += len(fresh[0])
        order = torch.randperm(n_have, generator=self._generator, device=self.device)
        self._buffers = [torch.cat(column)[order] for column in columns]
        self._pointer = 0

    def _next_batches(self) -> list[torch.Tensor]:
        """The next batch from each hook's buffer, rows paired across hooks."""
        batch_size = self.cfg["batch_size"]
        remaining = len(self._buffers[0]) - self._pointer
        if remaining < batch_size or remaining <= self.buffer_size // 2:
            self._refill()
        batches = [buffer[self._pointer : self._pointer + batch_size] for buffer in self._buffers]
        self._pointer += batch_size
        return batches
