"""The documentation holds: its Python runs, its links resolve, and no file names an issue number;
and no test module imports from another (what they share is in tests/helpers.py and conftest.py).

Every ```python block of README.md and docs/*.md runs. The blocks of one file run in order in one
namespace, as the cells of a notebook do, so a later block may use what an earlier one built. What
cannot run here in seconds is swapped for a stand-in by the `small_world` fixture:

- every model name loads a tiny random model of its family (9 blocks, d_model 64) with a byte-level
  tokenizer, and the model table reports that width (no hub, no 25 s SmolLM2 load);
- the built-in corpus is its pydoc topics alone (no 6 s docstring scan), and a hub dataset reads it;
- `post_init_cfg` caps the run's sizes (tokens, batch, rows) so that a training run is a few steps;
- the working directory is a temporary folder (checkpoints, exports).

A block right after an HTML comment `<!-- no-run: the reason -->` is not run (use it sparingly:
for code that needs the hub, a GPU or an installed peer). The tests cover whatever Markdown files
exist, so guides added later are checked too.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import TINY_D_MODEL, tiny_gemma2_config, tiny_gpt2_config

REPO = Path(__file__).resolve().parents[1]
DOC_FILES = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md")])
README_LIMIT_BYTES = 8 * 1024

TINY_LAYERS = 9  # the documents use layers up to 8
# Caps on the run's sizes: a training run becomes 3 steps of 256 activations.
TINY_SIZES = {
    "batch_size": 256,
    "num_tokens": 3 * 256,
    "seq_len": 32,
    "model_batch_size": 8,
    "n_eval_rows": 4,
    "num_batches_in_buffer": 2,
}
TINY_DICT_SIZE = 1024  # unless the document sets group sizes, which must add up to dict_size

FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
NO_RUN = re.compile(r"<!--\s*no-run:\s*\S.*?-->\s*$", re.S)
ISSUE_NUMBER = re.compile(r"\bissues? #?\d+\b", re.I)


def relative(path: Path) -> str:
    return str(path.relative_to(REPO))


# ---------------------------------------------------------------------------------------------
# Python blocks
# ---------------------------------------------------------------------------------------------


def python_blocks(text: str) -> list[tuple[int, str, bool]]:
    """(line number, code, runs) of every ```python block, in order."""
    blocks = []
    for match in FENCE.finditer(text):
        if match.group(1) != "python":
            continue
        line = text.count("\n", 0, match.start()) + 2
        runs = NO_RUN.search(text[: match.start()].rstrip() + "\n") is None
        blocks.append((line, match.group(2), runs))
    return blocks


def byte_tokenizer(folder: Path):
    """A byte-level BPE tokenizer without merges (256 byte tokens, BOS and EOS), saved and reloaded
    so that TransformerLens can reload it by path, as it does for a hub tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({"<bos>": len(vocab), "<eos>": len(vocab) + 1})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>"
    ).save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def tokenizer():
    with tempfile.TemporaryDirectory() as folder:
        yield byte_tokenizer(Path(folder))


def project_modules() -> list:
    """The loaded modules of this repository (the package, the root's entry points, tests and benchmarks)."""
    folders = {
        REPO,
        REPO / "matryoshka_sae",
        REPO / "matryoshka_sae" / "cli",
        REPO / "tests",
        REPO / "benchmarks",
    }
    return [
        m
        for m in list(sys.modules.values())
        if getattr(m, "__file__", None) and Path(m.__file__).resolve().parent in folders
    ]


def replace_everywhere(monkeypatch, name: str, original, replacement) -> None:
    """Patch `name` in every project module that holds `original` (those that imported it by name)."""
    for module in project_modules():
        if vars(module).get(name) is original:
            monkeypatch.setattr(module, name, replacement)


@pytest.fixture
def small_world(monkeypatch, tmp_path, tokenizer):
    """Tiny stand-ins for the models, the corpus and the sizes; see the module docstring."""
    from transformer_lens import HookedTransformer

    from matryoshka_sae import (
        activation_cache,  # noqa: F401  (imported so that their names get patched too)
        activation_store,
        builtin_corpus,
        checkpoint,  # noqa: F401
        config,
        evaluation,  # noqa: F401
        feature_statistics,  # noqa: F401
        model_loading,
        training,  # noqa: F401
        transcoder_activation_store,  # noqa: F401
    )
    from matryoshka_sae.cli import demo  # noqa: F401

    names = set(config.MODEL_TABLE) | set(model_loading.HUB_MODEL_NAMES.values())
    for name in config.MODEL_TABLE:
        monkeypatch.setitem(
            config.MODEL_TABLE, name, {"act_size": TINY_D_MODEL, "n_layers": TINY_LAYERS}
        )

    def tiny_model(name, device="cpu", dtype=torch.float32, **kwargs):
        assert str(name) in names or config.canonical_model_name(str(name)), (
            f"unknown model {name!r}"
        )
        base = tiny_gemma2_config() if "gemma" in str(name) else tiny_gpt2_config()
        base.n_layers = TINY_LAYERS
        base.attn_types = ["global", "local"] * 5 if "gemma" in str(name) else None
        torch.manual_seed(0)
        return HookedTransformer(base, tokenizer).to(kwargs.get("dtype", dtype)).to(device).eval()

    replace_everywhere(monkeypatch, "load_model", model_loading.load_model, tiny_model)
    for loader in ("from_pretrained", "from_pretrained_no_processing"):
        monkeypatch.setattr(HookedTransformer, loader, staticmethod(tiny_model))

    corpus = builtin_corpus.python_docs_dataset
    replace_everywhere(
        monkeypatch,
        "python_docs_dataset",
        corpus,
        lambda *args, **kwargs: corpus(*args, **{**kwargs, "topics_only": True}),
    )
    load_text_dataset = activation_store.load_text_dataset

    def offline_dataset(dataset_path):
        """A hub dataset name reads the built-in corpus instead."""
        is_hub_name = (
            isinstance(dataset_path, str)
            and dataset_path != activation_store.BUILTIN_CORPUS
            and not Path(dataset_path).exists()
        )
        return load_text_dataset(activation_store.BUILTIN_CORPUS if is_hub_name else dataset_path)

    replace_everywhere(monkeypatch, "load_text_dataset", load_text_dataset, offline_dataset)

    post_init_cfg = config.post_init_cfg

    def small_post_init_cfg(cfg):
        for key, cap in TINY_SIZES.items():
            if isinstance(cfg.get(key), (int, float)) and cfg[key] > cap:
                cfg[key] = cap
        groups_derived = cfg.get("derived", {}).get("group_sizes", None) == cfg.get("group_sizes")
        if (
            groups_derived
            and isinstance(cfg.get("dict_size"), int)
            and cfg["dict_size"] > TINY_DICT_SIZE
        ):
            cfg["dict_size"] = TINY_DICT_SIZE
        cfg["wandb_mode"] = "disabled"
        return post_init_cfg(cfg)

    replace_everywhere(monkeypatch, "post_init_cfg", post_init_cfg, small_post_init_cfg)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("path", DOC_FILES, ids=relative)
def test_python_blocks_run(path, small_world):
    blocks = python_blocks(path.read_text())
    if not blocks:
        pytest.skip(f"{relative(path)} has no Python block")
    namespace = {"__name__": "__docs__"}
    for line, code, runs in blocks:
        if runs:
            exec(compile(code, f"{relative(path)}, block at line {line}", "exec"), namespace)


def test_python_blocks_are_found():
    """The extraction sees the blocks and the no-run marks (the README's quick start runs)."""
    text = "a\n<!-- no-run: needs the hub -->\n```python\nx = 1\n```\n\n```python\ny = 2\n```\n```bash\nls\n```\n"
    assert [(code, runs) for _, code, runs in python_blocks(text)] == [
        ("x = 1\n", False),
        ("y = 2\n", True),
    ]
    readme = python_blocks((REPO / "README.md").read_text())
    assert any(runs and "train_sae(" in code for _, code, runs in readme)


# ---------------------------------------------------------------------------------------------
# Links
# ---------------------------------------------------------------------------------------------

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_LINK = re.compile(r"""(?:href|src)\s*=\s*["']([^"']+)["']""")


def without_code(text: str) -> str:
    text = FENCE.sub("", text)
    return re.sub(r"`[^`\n]*`", "", text)


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors of the Markdown headings: lower case, punctuation dropped, spaces -> '-'."""
    anchors = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", FENCE.sub("", text), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").strip().lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


def relative_links(path: Path) -> list[str]:
    text = without_code(path.read_text())
    targets = LINK.findall(text) + HTML_LINK.findall(text)
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.I)]


@pytest.mark.parametrize("path", DOC_FILES, ids=relative)
def test_relative_links_resolve(path):
    broken = []
    for target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        destination = (path.parent / file_part).resolve() if file_part else path
        if not destination.exists():
            broken.append(f"{target} (no such file)")
        elif (
            anchor
            and destination.suffix == ".md"
            and anchor not in heading_anchors(destination.read_text())
        ):
            broken.append(f"{target} (no heading with that anchor)")
    assert not broken, f"{relative(path)}: broken links: {broken}"


def test_link_checker_sees_broken_links(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "# A title\n[ok](#a-title) [web](https://example.org) [bad](missing.md) ![img](x.png)\n"
        "```\n[in code](nowhere.md)\n```\n"
    )
    assert relative_links(page) == ["#a-title", "missing.md", "x.png"]
    assert heading_anchors(page.read_text()) == {"a-title"}


# ---------------------------------------------------------------------------------------------
# The README's size, and no issue numbers anywhere
# ---------------------------------------------------------------------------------------------


def test_readme_is_short():
    size = len((REPO / "README.md").read_bytes())
    assert size < README_LIMIT_BYTES, (
        f"README.md is {size} bytes; keep it under {README_LIMIT_BYTES} (move detail to docs/)"
    )


def repository_files() -> list[Path]:
    """The files git tracks (outside a git checkout: every file but hidden folders and environments)."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True
        ).stdout
        return [REPO / name for name in listed.decode().split("\0") if name]
    except (OSError, subprocess.CalledProcessError):
        return [
            p
            for p in REPO.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(REPO).parts)
        ]


def test_no_file_mentions_an_issue_number():
    found = []
    for path in repository_files():
        if path.suffix == ".json" or not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            continue  # binary
        for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
            if ISSUE_NUMBER.search(line):
                found.append(f"{relative(path)}:{number}: {line.strip()[:100]}")
    assert not found, "state what is and why, without issue numbers:\n" + "\n".join(found)


def test_issue_pattern():
    number = "12"  # kept apart from the words, so that this file does not match itself
    assert ISSUE_NUMBER.search("as in Issue #" + number) and ISSUE_NUMBER.search(
        "issues " + number + " and 4"
    )
    assert not ISSUE_NUMBER.search("reissue " + number) and not ISSUE_NUMBER.search(
        "the issue is " + number
    )


# ---------------------------------------------------------------------------------------------
# Test modules share through helpers.py and conftest.py, never through each other
# ---------------------------------------------------------------------------------------------


def imported_test_modules(source: str) -> list[tuple[int, str]]:
    """(line, module) of every import of a tests/test_*.py module in `source`, at any depth:
    `import test_x`, `from test_x import ...`, `from tests.test_x import ...`, `from tests import test_x`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
            if node.module == "tests":
                names += [f"tests.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            module = name.removeprefix("tests.").split(".")[0]
            if module.startswith("test_"):
                found.append((node.lineno, module))
    return found


def test_no_test_module_imports_another():
    found = []
    for path in sorted((REPO / "tests").glob("*.py")):
        for line, module in imported_test_modules(path.read_text()):
            found.append(f"{relative(path)}:{line}: imports {module}")
    assert not found, (
        "move what test modules share into tests/helpers.py (fixtures: conftest.py):\n"
        + "\n".join(found)
    )


def test_imported_test_modules_finds_every_form():
    source = (
        "import os\nimport test_a\nfrom test_b import x\nfrom tests.test_c import y\nfrom tests import test_d, helpers\n"
        "from helpers import test_e\nimport tests.test_f as f\ndef g():\n    from test_h import z\n"
    )
    assert [module for _, module in imported_test_modules(source)] == [
        "test_a",
        "test_b",
        "test_c",
        "test_d",
        "test_f",
        "test_h",
    ]


def test_the_layout_table_names_every_module():
    """docs/design.md's layout table covers every module of the root and the package."""
    layout = (REPO / "docs" / "design.md").read_text().split("## Layout", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`(?:matryoshka_sae/(?:cli/)?)?([a-z_]+)\.py`", layout))
    tracked = subprocess.run(
        ["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True
    ).stdout
    modules = {
        Path(path).stem
        for path in tracked.split()
        if "/" not in path
        or (path.startswith("matryoshka_sae/") and not path.startswith("matryoshka_sae/cli/"))
    }
    assert modules - {"__init__"} <= named, sorted(modules - {"__init__"} - named)
