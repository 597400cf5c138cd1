"""The builtin corpus: real English, deterministic, disjoint train/test splits, robust collection."""

import pytest

from matryoshka_sae import builtin_corpus
from matryoshka_sae.builtin_corpus import is_held_out, python_docs_dataset, stdlib_docstrings

COMMON_WORDS = (" the ", " of ", " and ", " is ", " to ")


def texts_of(**kwargs) -> list[str]:
    return list(python_docs_dataset(**kwargs)["text"])


def test_topics_are_english_documents():
    texts = texts_of(topics_only=True)
    assert len(texts) > 50
    assert all(len(t) >= 200 for t in texts)
    assert len(set(texts)) == len(texts)
    english = [t for t in texts if sum(w in t for w in COMMON_WORDS) >= 3]
    assert len(english) > 0.85 * len(texts)
    assert any("for_stmt" in t and "iterable" in t for t in texts)  # the "for" statement topic


def test_topics_are_deterministic():
    first = texts_of(topics_only=True)
    builtin_corpus._corpus.cache_clear()
    assert texts_of(topics_only=True) == first


def test_min_chars_filters():
    long_only = texts_of(min_chars=5000, topics_only=True)
    assert long_only and all(len(t) >= 5000 for t in long_only)
    assert len(long_only) < len(python_docs_dataset(topics_only=True))


def test_train_and_test_split_the_corpus():
    everything = texts_of(topics_only=True)
    train = texts_of(split="train", test_fraction=0.2, topics_only=True)
    test = texts_of(split="test", test_fraction=0.2, topics_only=True)
    assert train and test
    assert not set(train) & set(test)
    assert sorted(train + test) == sorted(everything)
    assert train == [t for t in everything if t in set(train)]  # order is kept
    # Held-out membership is a property of the text alone.
    assert all(is_held_out(t, 0.2) for t in test)
    assert python_docs_dataset(split="test", test_fraction=0.0, topics_only=True).num_rows == 0


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="split"):
        python_docs_dataset(split="validation", topics_only=True)
    with pytest.raises(ValueError, match="test_fraction"):
        python_docs_dataset(test_fraction=1.5, topics_only=True)


def test_docstring_collection_skips_tests_and_broken_files(tmp_path):
    doc = "A function that does something useful for the reader of this documentation."
    (tmp_path / "good.py").write_text(
        f'"""The module docstring of good."""\n\nclass A:\n    """{doc} (class)"""\n\n'
        f'    async def f(self):\n        """{doc} (method)"""\n\ndef g():\n    pass\n'
    )
    (tmp_path / "broken.py").write_text('"""Never read."""\ndef (:\n')
    (tmp_path / "latin.py").write_bytes(b'"""Caf\xe9 without an encoding line."""\n')
    (tmp_path / "test_good.py").write_text('"""A test module."""\n')
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "helpers.py").write_text('"""A test helper."""\n')
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text('"""The package pkg."""\n')

    assert stdlib_docstrings(str(tmp_path)) == (
        "The module docstring of good.",
        f"{doc} (class)",
        f"{doc} (method)",
        "The package pkg.",
    )


def test_full_corpus_adds_stdlib_docstrings():
    topics = texts_of(topics_only=True)
    texts = texts_of()
    assert texts[: len(topics)] == topics
    assert len(texts) > 1000
    assert len(set(texts)) == len(texts)
    assert any(t.startswith("JSON (JavaScript Object Notation)") for t in texts)  # json module
