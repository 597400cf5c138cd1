"""ActivationsStore: data resolution, packing, held-out rows, buffer, BOS exclusion and errors.

The store shuffles its buffer, so activations are compared with a direct ``run_with_cache`` as
sets of rows: `match_rows` pairs every store row with the direct row it equals.
"""

import sys
import types
import warnings

import pytest
import torch
from conftest import build_tiny_model
from datasets import Dataset, DatasetDict
from helpers import BOS, direct_activations, distances, make_cfg, match_rows, without_bos
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from matryoshka_sae import activation_store
from matryoshka_sae.activation_store import (
    ActivationsStore,
    document_markers,
    find_data_column,
    load_text_dataset,
    pack_documents,
)


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer: <unk> 0, <bos> 1, <eos> 2, printable ASCII and newline after."""
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {"<unk>": 0, "<bos>": 1, "<eos>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )


# ---------------------------------------------------------------------------------------------
# Dataset resolution
# ---------------------------------------------------------------------------------------------


def test_load_text_dataset_local_formats(tmp_path):
    txt = tmp_path / "docs.txt"
    txt.write_text("first paragraph\nstill first\n\nsecond paragraph\n\nthird\n")
    paragraphs = load_text_dataset(str(txt))
    assert paragraphs["text"] == ["first paragraph\nstill first", "second paragraph", "third\n"]

    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text('{"text": "a"}\n{"text": "b"}\n')
    assert load_text_dataset(jsonl)["text"] == ["a", "b"]

    parquet = tmp_path / "docs.parquet"
    Dataset.from_dict({"tokens": [[1, 2, 3]]}).to_parquet(str(parquet))
    assert load_text_dataset(str(parquet))["tokens"] == [[1, 2, 3]]

    saved = tmp_path / "saved"
    DatasetDict({"train": Dataset.from_dict({"input_ids": [[4, 5]]})}).save_to_disk(str(saved))
    assert load_text_dataset(str(saved))["input_ids"] == [[4, 5]]
    saved_plain = tmp_path / "saved_plain"
    Dataset.from_dict({"tokens": [[6, 7]]}).save_to_disk(str(saved_plain))
    assert load_text_dataset(str(saved_plain))["tokens"] == [[6, 7]]

    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "part.jsonl").write_text('{"text": "c"}\n')
    assert load_text_dataset(str(folder))["text"] == ["c"]

    in_memory = Dataset.from_dict({"text": ["x"]})
    assert load_text_dataset(in_memory) is in_memory

    with pytest.raises(FileNotFoundError, match="no such file"):
        load_text_dataset(str(tmp_path / "missing.jsonl"))


def test_hub_names_are_streamed(monkeypatch):
    calls = []
    monkeypatch.setattr(
        activation_store.datasets, "load_dataset", lambda *a, **k: calls.append((a, k))
    )
    load_text_dataset("HuggingFaceFW/fineweb-edu")
    assert calls == [(("HuggingFaceFW/fineweb-edu",), {"split": "train", "streaming": True})]


def test_python_docs_comes_from_builtin_corpus(monkeypatch):
    corpus = Dataset.from_dict({"text": ["The Python Tutorial"]})
    fake = types.ModuleType("matryoshka_sae.builtin_corpus")
    fake.python_docs_dataset = lambda: corpus
    monkeypatch.setitem(sys.modules, "matryoshka_sae.builtin_corpus", fake)
    assert load_text_dataset("python-docs") is corpus


def test_data_column_detection():
    assert find_data_column(Dataset.from_dict({"text": ["a"], "tokens": [[1]]})) == "tokens"
    assert find_data_column(Dataset.from_dict({"input_ids": [[1]], "text": ["a"]})) == "input_ids"
    assert (
        find_data_column(Dataset.from_dict({"text": ["a"], "meta": [0]}).to_iterable_dataset())
        == "text"
    )
    with pytest.raises(ValueError, match=r"columns \['content', 'url'\]"):
        find_data_column(Dataset.from_dict({"content": ["a"], "url": ["u"]}))


# ---------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------


def test_pack_documents_with_bos():
    docs = [
        torch.tensor([5, 6, 7]),
        torch.tensor([BOS, 8, 9]),
        torch.tensor([], dtype=torch.long),
        torch.tensor([10, 11, 12, 13]),
    ]
    rows, carry = pack_documents(docs, 4, bos=BOS, eos=None, carry=torch.tensor([3]))
    # stream: 3 | BOS 5 6 7 | BOS 8 9 (BOS kept, not doubled) | BOS 10 11 12 13; each row starts with BOS
    assert rows.tolist() == [[BOS, BOS, 5, 6], [BOS, BOS, 8, 9], [BOS, 10, 11, 12]]
    assert carry.tolist() == [13]


def test_pack_documents_without_bos():
    docs = [torch.tensor([5, 6, 7]), torch.tensor([8, 9])]
    rows, carry = pack_documents(docs, 3, bos=None, eos=2, carry=torch.empty(0, dtype=torch.long))
    assert rows.tolist() == [[5, 6, 7], [2, 8, 9]] and carry.tolist() == [2]
    rows, carry = pack_documents(
        docs, 2, bos=None, eos=None, carry=torch.empty(0, dtype=torch.long)
    )
    assert rows.tolist() == [[5, 6], [7, 8]] and carry.tolist() == [9]


@pytest.mark.filterwarnings("ignore:The dataset .* is exhausted")
def test_pretokenized_rows_of_seq_len_are_kept_and_others_packed(tiny_gpt2):
    docs = [[BOS, *range(10, 41)], list(range(50, 70)), list(range(100, 120))]  # 32, 20, 20 tokens
    training_docs = [list(range(200, 232))] * 4
    cfg = make_cfg(
        Dataset.from_dict({"tokens": docs + training_docs}),
        n_eval_rows=2,
        batch_size=16,
        num_batches_in_buffer=1,
    )
    store = ActivationsStore(tiny_gpt2, cfg)
    ready, packed = store.get_eval_tokens().tolist()
    assert ready == docs[0]
    assert packed == [BOS, *range(50, 70), BOS, *range(100, 110)]


def test_text_is_tokenized_and_packed(tmp_path, tiny_gpt2, monkeypatch):
    tokenizer = char_tokenizer()
    monkeypatch.setattr(tiny_gpt2, "tokenizer", tokenizer)
    paragraphs = [
        "The quick brown fox jumps over the lazy dog.",
        "Pack my box with five dozen jugs.",
    ]
    training = ["Sphinx of black quartz, judge my vow."] * 4
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(paragraphs + training))
    cfg = make_cfg(
        str(path),
        seq_len=16,
        n_eval_rows=4,
        bos_token_id=None,
        batch_size=8,
        num_batches_in_buffer=1,
        model_batch_size=1,
    )
    store = ActivationsStore(tiny_gpt2, cfg)  # BOS comes from the tokenizer
    ids = [tokenizer.encode(p, add_special_tokens=False) for p in paragraphs]
    stream = torch.tensor([BOS, *ids[0], BOS, *ids[1]])
    expected = stream[:64].view(4, 16)
    expected[:, 0] = BOS
    assert torch.equal(store.get_eval_tokens(), expected)


def test_document_markers(tiny_gpt2, monkeypatch):
    assert document_markers(tiny_gpt2, {"bos_token_id": 7}) == (7, None)
    assert document_markers(tiny_gpt2, {}) == (None, None)
    monkeypatch.setattr(tiny_gpt2, "tokenizer", char_tokenizer())
    assert document_markers(tiny_gpt2, {}) == (BOS, 2)
    monkeypatch.setattr(tiny_gpt2.cfg, "default_prepend_bos", False)  # a model trained without BOS
    assert document_markers(tiny_gpt2, {}) == (None, 2)


def test_text_without_tokenizer_is_an_error(tiny_gpt2):
    with pytest.raises(ValueError, match="no tokenizer"):
        ActivationsStore(tiny_gpt2, make_cfg(Dataset.from_dict({"text": ["hello"] * 8})))


# ---------------------------------------------------------------------------------------------
# Activations and the buffer
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gpt2", "gemma2"])
def test_batches_shape_dtype_device(kind, tiny_gpt2, tiny_gemma2, token_rows):
    model = tiny_gpt2 if kind == "gpt2" else tiny_gemma2
    store = ActivationsStore(model, make_cfg(Dataset.from_dict({"tokens": token_rows.tolist()})))
    for _ in range(6):  # past a refill
        batch = store.next_batch()
        assert batch.shape == (64, 64) and batch.dtype == torch.float32
        assert batch.device == torch.device("cpu") and torch.isfinite(batch).all()


def test_store_activations_equal_direct_run_with_cache(tiny_gpt2, token_rows):
    token_rows = without_bos(token_rows)  # rows of seq_len tokens are used as they are
    # 60 training rows of 32 tokens = 1920 activations: one batch that holds the whole buffer.
    cfg = make_cfg(
        Dataset.from_dict({"tokens": token_rows.tolist()}),
        layer=1,
        site="resid_mid",
        batch_size=1920,
        num_batches_in_buffer=1,
        model_batch_size=6,
    )
    store = ActivationsStore(tiny_gpt2, cfg)
    assert torch.equal(store.get_eval_tokens(), token_rows[:4])
    batch = store.next_batch()
    direct = direct_activations(tiny_gpt2, token_rows[4:], "blocks.1.hook_resid_mid", layer=1)
    origin = match_rows(batch, direct)  # a permutation: same set of activations, no eval rows
    assert not torch.equal(origin, torch.arange(len(direct))), "buffer was not shuffled"


def test_consecutive_batches_mix_documents(tiny_gpt2, token_rows):
    token_rows = without_bos(token_rows)
    cfg = make_cfg(
        Dataset.from_dict({"tokens": token_rows.tolist()}),
        batch_size=60,
        num_batches_in_buffer=32,
        model_batch_size=60,
    )
    store = ActivationsStore(tiny_gpt2, cfg)
    direct = direct_activations(tiny_gpt2, token_rows[4:], "blocks.0.hook_resid_post", layer=0)
    source_rows = match_rows(store.next_batch(), direct) // 32
    assert len(set(source_rows.tolist())) > 30  # 60 activations from over 30 of the 60 rows


def test_run_with_cache_stops_after_the_hooked_block(tiny_gpt2, token_rows, monkeypatch):
    calls = []
    run_with_cache = tiny_gpt2.run_with_cache

    def recording_run_with_cache(*args, **kwargs):
        calls.append(kwargs)
        return run_with_cache(*args, **kwargs)

    monkeypatch.setattr(tiny_gpt2, "run_with_cache", recording_run_with_cache)
    ActivationsStore(
        tiny_gpt2, make_cfg(Dataset.from_dict({"tokens": token_rows.tolist()}), layer=0)
    )
    assert calls and all(
        c["stop_at_layer"] == 1 and c["names_filter"] == ["blocks.0.hook_resid_post"] for c in calls
    )


def test_exclude_bos_drops_every_bos_position(tiny_gemma2, token_rows):
    tokens = token_rows.clone()
    tokens[::2, 10] = BOS  # a second document starts mid-row in every other row
    n_bos = int((tokens[4:] == BOS).sum())
    assert n_bos == 60 + 30
    cfg = make_cfg(
        Dataset.from_dict({"tokens": tokens.tolist()}),
        exclude_bos=True,
        batch_size=60 * 32 - n_bos,
        num_batches_in_buffer=1,
        model_batch_size=60,
    )
    batch = ActivationsStore(tiny_gemma2, cfg).next_batch()
    direct = direct_activations(tiny_gemma2, tokens[4:], "blocks.0.hook_resid_post", layer=0)
    is_bos = (tokens[4:] == BOS).flatten()
    match_rows(batch, direct[~is_bos])  # exactly the non-BOS activations
    assert distances(batch, direct[is_bos]).min() > 1e-3


def test_exclude_bos_needs_a_bos_token(tiny_gpt2, token_rows):
    cfg = make_cfg(
        Dataset.from_dict({"tokens": token_rows.tolist()}), exclude_bos=True, bos_token_id=None
    )
    with pytest.raises(ValueError, match="bos_token_id"):
        ActivationsStore(tiny_gpt2, cfg)


def test_new_epoch_warns_and_keeps_eval_rows_out(tiny_gpt2, token_rows):
    token_rows = without_bos(token_rows)
    cfg = make_cfg(
        Dataset.from_dict({"tokens": token_rows.tolist()}),
        batch_size=256,
        num_batches_in_buffer=4,
        model_batch_size=20,
    )
    store = ActivationsStore(tiny_gpt2, cfg)  # 1024 of the 1920 training activations
    with pytest.warns(UserWarning, match="exhausted; starting epoch 2"):
        batches = [store.next_batch() for _ in range(12)]
    assert store.epochs_completed >= 1
    training = direct_activations(tiny_gpt2, token_rows[4:], "blocks.0.hook_resid_post", layer=0)
    held_out = direct_activations(tiny_gpt2, token_rows[:4], "blocks.0.hook_resid_post", layer=0)
    seen = torch.cat(batches)
    assert distances(seen, training).min(dim=1).values.max() < 1e-5
    assert distances(seen, held_out).min() > 1e-3


def test_eval_tokens_do_not_disturb_training_stream(tiny_gpt2, token_rows):
    dataset = Dataset.from_dict({"tokens": token_rows.tolist()})
    plain, evaluated = (ActivationsStore(tiny_gpt2, make_cfg(dataset)) for _ in range(2))
    for step in range(6):
        if step == 2:
            assert evaluated.get_eval_tokens(3).shape == (3, 32)
        assert torch.equal(plain.next_batch(), evaluated.next_batch())
    with pytest.raises(ValueError, match="n_eval_rows"):
        evaluated.get_eval_tokens(5)


def test_streaming_dataset_wraps_around(tiny_gpt2, token_rows):
    dataset = Dataset.from_dict({"tokens": token_rows.tolist()}).to_iterable_dataset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        store = ActivationsStore(tiny_gpt2, make_cfg(dataset, batch_size=512))
        for _ in range(8):
            assert store.next_batch().shape == (512, 64)
    assert store.epochs_completed >= 1
    assert torch.equal(store.get_eval_tokens(), token_rows[:4])


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_act_size_mismatch(tiny_gpt2, token_rows):
    cfg = make_cfg(Dataset.from_dict({"tokens": token_rows.tolist()}), act_size=32)
    with pytest.raises(ValueError, match=r"act_size mismatch.*width 64.*cfg\['act_size'\] = 32"):
        ActivationsStore(tiny_gpt2, cfg)


def test_bad_columns_error(tiny_gpt2):
    with pytest.raises(ValueError, match="columns"):
        ActivationsStore(tiny_gpt2, make_cfg(Dataset.from_dict({"content": ["a", "b"]})))


def test_nan_activations_name_the_hook(token_rows):
    model = build_tiny_model("gpt2")
    with torch.no_grad():
        model.W_E[5] = float("nan")
    with pytest.raises(ValueError, match=r"blocks\.0\.hook_resid_post contain NaN"):
        ActivationsStore(
            model, make_cfg(Dataset.from_dict({"tokens": token_rows.clamp(max=5).tolist()}))
        )


def test_unknown_hook_and_long_rows_are_errors(tiny_gpt2, token_rows):
    dataset = Dataset.from_dict({"tokens": token_rows.tolist()})
    with pytest.raises(ValueError, match="no hook 'blocks.5.hook_resid_post'"):
        ActivationsStore(tiny_gpt2, make_cfg(dataset, layer=5))
    with pytest.raises(ValueError, match="exceeds the model's context"):
        ActivationsStore(tiny_gpt2, make_cfg(dataset, seq_len=256))
    with pytest.raises(ValueError, match="fewer than cfg\\['n_eval_rows'\\] = 100"):
        ActivationsStore(tiny_gpt2, make_cfg(dataset, n_eval_rows=100))


def test_eval_rows_from_a_separate_dataset(tiny_gpt2, token_rows):
    token_rows = without_bos(token_rows)
    train, test = token_rows[:40], token_rows[40:]
    cfg = make_cfg(
        Dataset.from_dict({"tokens": train.tolist()}),
        layer=1,
        site="resid_mid",
        eval_dataset_path=Dataset.from_dict({"tokens": test.tolist()}),
        batch_size=40 * 32,
        num_batches_in_buffer=1,
        model_batch_size=8,
    )
    store = ActivationsStore(tiny_gpt2, cfg)
    assert torch.equal(store.get_eval_tokens(), test[:4])
    direct = direct_activations(tiny_gpt2, train, "blocks.1.hook_resid_mid", layer=1)
    match_rows(store.next_batch(), direct)  # every training row is used: none held out from it
    with pytest.raises(ValueError, match="same kind of data"):
        ActivationsStore(
            tiny_gpt2,
            make_cfg(
                Dataset.from_dict({"tokens": train.tolist()}),
                eval_dataset_path=Dataset.from_dict({"text": ["a b"]}),
            ),
        )


def test_skip_tokens_continues_after_the_rows_already_served(tiny_gpt2, token_rows):
    token_rows = without_bos(token_rows)
    cfg = make_cfg(
        Dataset.from_dict({"tokens": token_rows.tolist()}),
        batch_size=64,
        num_batches_in_buffer=2,
        model_batch_size=4,
    )
    store = ActivationsStore(tiny_gpt2, cfg)
    store.skip_tokens(20 * 32)  # 20 rows' worth of activations were served before the "crash"
    direct = direct_activations(tiny_gpt2, token_rows[4:], "blocks.0.hook_resid_post", layer=0)
    source_rows = match_rows(torch.cat([store.next_batch() for _ in range(4)]), direct) // 32
    assert source_rows.min() >= 20  # nothing from the rows served before


class _CountingRows:
    """A row stream of consecutive integers [n, 1], with the position a Lane saves."""

    def __init__(self):
        self.rows_taken = 0

    def take(self, n_rows: int) -> torch.Tensor:
        rows = torch.arange(self.rows_taken, self.rows_taken + n_rows).reshape(-1, 1)
        self.rows_taken += n_rows
        return rows

    def state_dict(self) -> dict:
        return {"rows_taken": self.rows_taken}

    def load_state_dict(self, state: dict) -> None:
        self.rows_taken = state["rows_taken"]


def _two_hooks_without_sevens(rows: torch.Tensor) -> list[torch.Tensor]:
    """Two hooks' activations of the rows, dropping multiples of 7 (as BOS positions are dropped,
    so chunks differ in length)."""
    kept = rows[rows % 7 != 0].float()
    return [torch.stack([kept, kept + 0.5], 1), -kept.reshape(-1, 1)]


@pytest.mark.parametrize("chunk_rows", [5, 30])  # chunks shorter than a block, and longer
def test_a_lane_serves_each_block_of_the_stream_shuffled_by_its_generator(chunk_rows):
    """Blocks are consecutive runs of the activation stream, each permuted by the next randperm of
    the lane's generator, rows paired across hooks; spills across chunks and blocks included."""
    from matryoshka_sae.activation_store import Lane

    batch, n_batches, n_blocks = 4, 3, 5
    lane = Lane(
        _CountingRows(),
        _two_hooks_without_sevens,
        chunk_rows=chunk_rows,
        batch_size=batch,
        n_batches=n_batches,
        generator=torch.Generator().manual_seed(3),
        widths=[2, 1],
        device=torch.device("cpu"),
    )
    lane.fill_block()  # as the store does when it opens
    served = [lane.next_batches() for _ in range(n_blocks * n_batches)]
    stream = _two_hooks_without_sevens(torch.arange(400).reshape(-1, 1))
    replay = torch.Generator().manual_seed(3)
    block_size = batch * n_batches
    for b in range(n_blocks):
        order = torch.randperm(block_size, generator=replay)
        for hook in range(2):
            expected = stream[hook][b * block_size : (b + 1) * block_size][order]
            got = torch.cat([served[b * n_batches + i][hook] for i in range(n_batches)])
            assert torch.equal(got, expected)
