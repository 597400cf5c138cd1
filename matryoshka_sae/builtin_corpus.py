"""Real English text that ships with Python: its documentation and the standard library's docstrings.

Useful where no dataset can be downloaded. Two sources, in this order:

1. ``pydoc_data.topics.topics``: the language reference and library topics that ``help()`` shows,
   one document per topic (79 topics, about 465k characters in Python 3.11);
2. the docstrings of the standard library's modules, classes and functions, read from the source
   files with `ast` (no module is imported), skipping test suites, GUI code and vendored packages.

Documents shorter than `min_chars` are dropped and exact duplicates are kept once, so the corpus is
the same list, in the same order, on every call with the same Python. A document belongs to the
held-out split when a hash of its text falls below `test_fraction`, so it never depends on which
other documents are present, and held-out text is never in the training split.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import sysconfig
import warnings
from pathlib import Path

import datasets

# Directories of the standard library whose text is not library documentation: test suites,
# GUI and demo code, the removed 2to3 tool, bundled wheels, and installed third-party packages.
SKIPPED_DIRS = frozenset(
    {
        "test",
        "tests",
        "idle_test",
        "idlelib",
        "tkinter",
        "turtledemo",
        "lib2to3",
        "ensurepip",
        "site-packages",
        "dist-packages",
        "pydoc_data",
        "__pycache__",
    }
)
SPLITS = ("all", "train", "test")


def python_docs_dataset(
    min_chars: int = 200,
    split: str = "all",
    test_fraction: float = 0.05,
    topics_only: bool = False,
) -> datasets.Dataset:
    """Python's documentation as a `datasets.Dataset` with one column, ``text``.

    Args:
        min_chars: documents with fewer characters are dropped.
        split: "all", "train" (documents not held out) or "test" (held out).
        test_fraction: expected fraction of documents held out for "test".
        topics_only: only the pydoc topics (instant); otherwise the standard library's docstrings
            follow them (about 9 s to collect the first time in a process, cached after).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must lie in [0, 1], got {test_fraction!r}.")
    documents = _corpus(min_chars, topics_only)
    if split != "all":
        documents = [d for d in documents if is_held_out(d, test_fraction) == (split == "test")]
    return datasets.Dataset.from_dict({"text": documents})


def is_held_out(text: str, test_fraction: float) -> bool:
    """Whether `text` is in the held-out split: its SHA-256, read as a number in [0, 1), is below
    `test_fraction`."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < test_fraction


@functools.lru_cache(maxsize=None)
def _corpus(min_chars: int, topics_only: bool) -> list[str]:
    sources = [pydoc_topics()] if topics_only else [pydoc_topics(), stdlib_docstrings()]
    documents = {}  # an insertion-ordered set
    for source in sources:
        for text in source:
            if len(text) >= min_chars:
                documents.setdefault(text, None)
    return list(documents)


def pydoc_topics() -> tuple[str, ...]:
    """The text of every ``help()`` topic, sorted by topic name."""
    from pydoc_data.topics import topics

    return tuple(topics[name].strip() for name in sorted(topics))


@functools.lru_cache(maxsize=None)
def stdlib_docstrings(root: str | None = None) -> tuple[str, ...]:
    """Docstrings of modules, classes and functions in the ``.py`` files under `root`.

    `root` defaults to the standard library's directory. Files are read in sorted path order and
    each file's docstrings in `ast.walk` order; a file that cannot be read or parsed is skipped.
    """
    root_path = Path(root or sysconfig.get_paths()["stdlib"])
    docstrings = []
    for path in sorted(root_path.rglob("*.py")):
        relative = path.relative_to(root_path)
        if SKIPPED_DIRS.intersection(relative.parts[:-1]) or path.name.startswith("test_"):
            continue
        docstrings.extend(_file_docstrings(path))
    return tuple(docstrings)


def _file_docstrings(path: Path) -> list[str]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SyntaxWarning)  # invalid escapes in old docstrings
            tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, UnicodeDecodeError, OSError):
        return []
    documented = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docstrings = (ast.get_docstring(n) for n in ast.walk(tree) if isinstance(n, documented))
    return [d for d in docstrings if d]
