"""Bad input fails at once with one clear line, and nothing a user has is destroyed.

Each row of CASES is one case: its setup and what it runs (a script's command line, run in this
process on the tiny models, or a call run as the scripts run their work), the exit status expected
(0: it works), words expected in its one error line (or, when it works, in what it prints), and the
folders whose files must not change (their checksums before and after). Rows marked `early` run
with a model loader that fails the test when called: they must fail before the model loads. Full
and read-only disks are an OSError (ENOSPC, EROFS) injected at the write; the previous checkpoint
must stay loadable.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import tomllib
import torch
from conftest import TINY_VOCAB, build_tiny_model
from datasets import Dataset, DatasetDict
from safetensors.torch import load_file, save_file

from matryoshka_sae import activation_store, checkpoint, config, model_loading
from matryoshka_sae.cli import cache_activations, demo, export_sae, inspect_sae, main
from matryoshka_sae.cli import options as cli_options

REPO = Path(__file__).resolve().parents[1]
USER_MODULES = {"config", "sae", "training", "activation_store", "transcoder_activation_store"}
N_STEPS = 10  # checkpoints at steps 5 and 10


# ---------------------------------------------------------------------------------------------
# The world a row runs in: a trained run (copied per row), its data, its checkpoint folder
# ---------------------------------------------------------------------------------------------


def base_args(data: Path, checkpoint_dir: Path, n_steps: int = N_STEPS) -> list[str]:
    """The command line of the trained run (main.py, one Matryoshka SAE on the tiny GPT-2)."""
    return [
        "--model",
        "tiny-gpt2",
        "--sae-type",
        "matryoshka",
        "--layer",
        "1",
        "--num-tokens",
        str(64 * n_steps),
        "--batch-size",
        "64",
        "--dict-size",
        "256",
        "--top-k",
        "8",
        "--dataset",
        str(data),
        "--seq-len",
        "32",
        "--model-batch-size",
        "4",
        "--num-batches-in-buffer",
        "2",
        "--n-eval-rows",
        "4",
        "--checkpoint-freq",
        "5",
        "--checkpoint-dir",
        str(checkpoint_dir),
        "--wandb-mode",
        "disabled",
        "--device",
        "cpu",
        "--seed",
        "5",
    ]


def use_tiny_models(patch: pytest.MonkeyPatch, model) -> None:
    patch.setitem(config.MODEL_TABLE, "tiny-gpt2", {"act_size": 64, "n_layers": 2})
    patch.setattr(model_loading, "load_model", lambda *args, **kwargs: model)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished run of `base_args` (saves at steps 5 and 10); its folder."""
    root = tmp_path_factory.mktemp("trained")
    rows = torch.randint(2, TINY_VOCAB, (64, 32), generator=torch.Generator().manual_seed(0))
    rows[:, 0] = 1
    DatasetDict({"train": Dataset.from_dict({"tokens": rows.tolist()})}).save_to_disk(
        str(root / "tokens")
    )
    with pytest.MonkeyPatch.context() as patch:
        use_tiny_models(patch, build_tiny_model("gpt2"))
        main.main(base_args(root / "tokens", root / "checkpoints"))
    (folder,) = (root / "checkpoints").iterdir()
    return folder


@dataclass
class World:
    tmp: Path
    data: Path  # the token dataset (a saved Dataset folder)
    checkpoints: Path  # checkpoint_dir, holding `run`
    run: Path  # a copy of the trained run

    def args(self, *extra: str, n_steps: int = N_STEPS) -> list[str]:
        return [*base_args(self.data, self.checkpoints, n_steps), *extra]


@pytest.fixture
def world(tmp_path, trained) -> World:
    data = trained.parents[1] / "tokens"  # the run's own data (its path is part of its settings)
    checkpoints = tmp_path / "checkpoints"
    run = checkpoints / trained.name
    shutil.copytree(trained, run)
    return World(tmp=tmp_path, data=data, checkpoints=checkpoints, run=run)


# ---------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    # Setup, then what to run: (a script's main, argv), or a callable run like a script's work.
    run: Callable[[World], tuple[Callable, list[str]] | Callable[[], None]]
    code: int
    words: tuple[str, ...] = ()
    watch: Callable[[World], list[Path]] = lambda w: [w.run, w.data]
    early: bool = False  # fails before the model loads
    check: Callable[[World], None] | None = None  # more to assert afterwards
    traceback: bool = False  # --debug: the traceback is shown


def script(script_main, *argv) -> Callable[[World], tuple]:
    return lambda w: (script_main, [str(a) for a in argv])


def with_args(script_main, *extra, n_steps=N_STEPS) -> Callable[[World], tuple]:
    return lambda w: (script_main, w.args(*[str(e) for e in extra], n_steps=n_steps))


def binary_file(w: World) -> Path:
    path = w.tmp / "weights.bin"
    path.write_bytes(bytes(range(256)) * 4)
    return path


def exported(w: World, extra: str | None = None) -> Path:
    out = w.tmp / "exported"
    export_sae.main([str(w.run), str(out)])
    if extra:
        (out / extra).write_text("mine")
    return out


def folder_with_notes(w: World) -> Path:
    mine = w.tmp / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    return mine


def edited_config(edit: Callable[[Path], None]) -> Callable[[World], tuple]:
    def setup(w: World):
        edit(w.run / checkpoint.CONFIG_FILE)
        return main.main, ["--resume", str(w.run)]

    return setup


def with_setting(key, value) -> Callable[[Path], None]:
    def edit(path: Path):
        cfg = json.loads(path.read_text())
        cfg[key] = value
        path.write_text(json.dumps(cfg))

    return edit


def wrong_shape(w: World) -> tuple:
    path = w.run / checkpoint.WEIGHTS_FILE
    tensors = load_file(path)
    tensors["W_enc"] = torch.zeros(64, 300)
    save_file(tensors, str(path), metadata={"step": str(N_STEPS)})
    return inspect_sae.main, [str(w.run)]


def set_lacking_a_layer(w: World) -> Path:
    """A transcoder set of layers 0 and 1 trained with cfgs that record a model of 3 layers, as
    --layers 0,1 on a deeper model leaves it."""
    from helpers import set_cfgs, train_set

    cfgs = set_cfgs(w.tmp, "partial-set", layers=(0, 1), n_layers=3, layer=0)
    train_set(build_tiny_model("gemma2"), cfgs, evaluate=False)
    return w.tmp / "partial-set"


def locked_by(pid: int) -> Callable[[World], tuple]:
    def setup(w: World):
        (w.run / checkpoint.LOCK_FILE).write_text(
            json.dumps({"pid": pid, "host": os.uname().nodename})
        )
        return main.main, w.args("--resume", w.run)

    return setup


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def cache_of(w: World, *extra: str) -> Path:
    out = w.tmp / "cache"
    cache_activations.main(["--out", str(out), *w.args(), *extra])
    return out


def edited_cache_width(w: World) -> tuple:
    cache = cache_of(w)
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["hooks"] = {name: 65 for name in manifest["hooks"]}
    (cache / "manifest.json").write_text(json.dumps(manifest))
    return main.main, w.args("--activations", cache)


def disk_fails(err: int) -> Callable[[World], tuple]:
    """A fresh run whose second save of the weights meets `err` (ENOSPC, EROFS)."""

    def setup(w: World):
        real, calls = checkpoint.save_file, [0]

        def failing(tensors, path, **kwargs):
            calls[0] += 1
            if calls[0] == 2:
                raise OSError(err, os.strerror(err))
            real(tensors, path, **kwargs)

        w.failing_save = failing
        shutil.rmtree(w.run)
        return main.main, w.args()

    return setup


def previous_save_loads(w: World) -> None:
    (folder,) = w.checkpoints.iterdir()
    assert max(checkpoint.saved_steps(folder)) == 5
    sae = checkpoint.load_sae(folder)
    state = checkpoint.restore_checkpoint(folder, sae.train(), step=5)
    assert state["step"] == 5


def demo_stopped_then_resumed(w: World) -> tuple:
    """The demo (on the tiny model) stopped by SIGTERM after step 3; the resume command it printed."""
    stops = {"at": 3, "served": 0}
    next_batch = activation_store.ActivationsStore.next_batch

    def counted(store):
        stops["served"] += 1
        if stops["served"] == stops["at"] + 2:  # the first batch initialises; then step 3 is done
            signal.raise_signal(signal.SIGTERM)
        return next_batch(store)

    w.patch.setattr(activation_store.ActivationsStore, "next_batch", counted)
    w.patch.setitem(
        demo.DEMO_SETTINGS, "bos_token_id", 1
    )  # the tiny model has no tokenizer to give it
    demo_args = [
        "--demo",
        "--model",
        "tiny-gpt2",
        "--layer",
        "1",
        "--dict-size",
        "256",
        "--num-tokens",
        "640",
        "--batch-size",
        "64",
        "--dataset",
        str(w.data),
        "--seq-len",
        "32",
        "--n-eval-rows",
        "4",
        "--checkpoint-dir",
        str(w.checkpoints),
        "--model-batch-size",
        "4",
        "--num-batches-in-buffer",
        "2",
    ]
    w.patch.setattr(
        "matryoshka_sae.cli.demo.build_demo_browser",
        lambda sae, store, cfg, folder: (folder / "page.html", _NoStats()),
    )
    with pytest.raises(SystemExit) as stopped:
        main.main(demo_args)
    assert stopped.value.code == 128 + signal.SIGTERM
    w.patch.setattr(activation_store.ActivationsStore, "next_batch", next_batch)
    command = w.capsys.readouterr().err.strip().splitlines()[-1]
    assert command.startswith("Resume with: python main.py --demo ")
    return main.main, shlex.split(command.removeprefix("Resume with: python main.py "))


class _NoStats:
    data = {"timing": {}}

    def describe_timing(self) -> str:
        return ""


def resumed_to_the_end(w: World) -> None:
    (folder,) = [f for f in w.checkpoints.iterdir() if "matryoshka" in f.name and f != w.run]
    assert checkpoint.load_metrics(folder)["step"] == 10
    assert json.loads((folder / checkpoint.CONFIG_FILE).read_text())["dataset_path"] == str(w.data)


def demo_records_the_corpus(w: World) -> None:
    cfg = config.post_init_cfg(demo.demo_cfg())
    assert (cfg["dataset_path"], cfg["eval_dataset_path"]) == (
        "python-docs:train",
        "python-docs:test",
    )
    folder = checkpoint.save_checkpoint(w.tmp / "demo-run", checkpoint.load_sae(w.run), cfg, step=0)
    args = main.build_parser().parse_args(["--demo", "--resume", str(folder)])
    assert cli_options.resumed_cfgs(args.resume, args)[0]["dataset_path"] == "python-docs:train"


def call(function: Callable[[World], None]) -> Callable[[World], Callable[[], None]]:
    return lambda w: lambda: function(w)


def claim_chosen_name(w: World) -> None:
    cfg = checkpoint.load_cfg(w.run)
    cfg["derived"].pop("name", None)  # a name the user chose
    cfg["checkpoint_dir"] = str(w.checkpoints)
    checkpoint.claim_run_folder(cfg)


def load_sae_is_in_eval_mode(w: World) -> None:
    sae = checkpoint.load_sae(w.run)
    assert not sae.training
    sae.train()
    assert sae.training


def text_latents_leave_bos_out(w: World) -> None:
    from matryoshka_sae.sae import create_sae
    from matryoshka_sae.text_latents import text_latents

    model = build_tiny_model("gpt2")
    cfg = config.get_default_cfg()
    cfg.update(
        model_name="tiny-gpt2",
        layer=1,
        dict_size=256,
        top_k=8,
        exclude_bos=True,
        bos_token_id=1,
        device="cpu",
        sae_type="topk",
    )
    sae = create_sae(config.post_init_cfg(cfg))
    tokens = torch.tensor([1, 17, 42, 1, 99])
    result = text_latents(model, sae, tokens)
    assert result.kept.tolist() == [False, True, True, False, True]
    assert not result.latents[~result.kept].any()
    _, cache = model.run_with_cache(tokens[None], names_filter=[cfg["hook_point"]])
    expected = sae.encode(cache[cfg["hook_point"]][0][result.kept])
    torch.testing.assert_close(result.latents[result.kept], expected)
    assert (result.latents[result.kept] > 0).sum(-1).max() <= 8 and sae.training


def every_command_is_installed(w: World) -> None:
    """Every console script names a callable of the package; the root holds only the user's module
    names and the scripts' thin entry points (tests/test_packaging.py builds the wheel)."""
    import importlib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    for target in scripts.values():
        module, function = target.split(":")
        assert module.startswith("matryoshka_sae.cli.")
        assert callable(getattr(importlib.import_module(module), function))
    tracked = subprocess.run(
        ["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True
    ).stdout.split()
    at_root = {Path(path).stem for path in tracked if "/" not in path}
    scripts_at_root = {target.split(":")[0].rsplit(".", 1)[1] for target in scripts.values()}
    assert at_root == USER_MODULES | scripts_at_root | {"train_gemma_example", "main"}


def evaluation_stops_on_a_signal(w: World) -> None:
    from matryoshka_sae.evaluation import evaluate_ce_loss
    from matryoshka_sae.preemption import StopSignals

    sae = checkpoint.load_sae(w.run)
    tokens = torch.randint(2, TINY_VOCAB, (8, 32), generator=torch.Generator().manual_seed(1))
    with StopSignals() as stop:
        stop.signal_name = "SIGTERM"
        assert evaluate_ce_loss(sae, build_tiny_model("gpt2"), tokens, sae.cfg) == {}


def second_run_is_beside_the_first(w: World) -> None:
    assert (w.checkpoints / f"{w.run.name}-2" / checkpoint.WEIGHTS_FILE).is_file()


def replaced_in_place(w: World) -> None:
    assert [f.name for f in w.checkpoints.iterdir()] == [w.run.name]
    assert checkpoint.load_metrics(w.run)["step"] == N_STEPS and sorted(
        checkpoint.saved_steps(w.run)
    ) == [5, 10]


def cache_records_what_was_given(w: World) -> None:
    manifest = json.loads((w.tmp / "cache" / "manifest.json").read_text())
    assert manifest["dataset"] == str(w.data) and manifest["n_eval_rows"] == 3


def hub_model_is_cached() -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache("gpt2", "config.json"), str)


CASES = [
    # -- never destroy: --overwrite ---------------------------------------------------------------
    Case(
        "export onto its own checkpoint",
        lambda w: (export_sae.main, [str(w.run), str(w.run), "--overwrite"]),
        2,
        ("refusing to replace", "is the input"),
        lambda w: [w.checkpoints],
        early=True,
    ),
    Case(
        "export onto the folder holding the checkpoint",
        lambda w: (export_sae.main, [str(w.run), str(w.checkpoints), "--overwrite"]),
        2,
        ("refusing to replace", "contains the input"),
        lambda w: [w.checkpoints],
        early=True,
    ),
    Case(
        "export over a folder of someone else's files",
        lambda w: (export_sae.main, [str(w.run), str(folder_with_notes(w)), "--overwrite"]),
        2,
        ("export_sae_lens did not write it",),
        lambda w: [w.checkpoints, w.tmp / "mine"],
        early=True,
    ),
    Case(
        "export over an earlier export with a file added",
        lambda w: (export_sae.main, [str(w.run), str(exported(w, "notes.txt")), "--overwrite"]),
        2,
        ("holds 1 entry export_sae_lens did not write (notes.txt)",),
        lambda w: [w.checkpoints, w.tmp / "exported"],
        early=True,
    ),
    Case(
        "export onto an existing folder without --overwrite",
        lambda w: (export_sae.main, [str(w.run), str(exported(w))]),
        2,
        ("already exists",),
        lambda w: [w.checkpoints, w.tmp / "exported"],
        early=True,
    ),
    Case(
        "export over an earlier export",
        lambda w: (export_sae.main, [str(w.run), str(exported(w)), "--overwrite"]),
        0,
        ("Wrote",),
        lambda w: [w.checkpoints],
        early=True,
    ),
    Case(
        "export a transcoder set that lacks a layer of its model to circuit-tracer",
        lambda w: (
            export_sae.main,
            [str(set_lacking_a_layer(w)), str(w.tmp / "ct"), "--format", "circuit-tracer"],
        ),
        2,
        ("layer 0..2", "lacks layers [2]", "--layers all"),
        lambda w: [w.tmp / "partial-set"],
        early=True,
        check=lambda w: not (w.tmp / "ct").exists() or pytest.fail("an export was written"),
    ),
    # -- never destroy: training runs ---------------------------------------------------------------
    Case(
        "a second run with the same options",
        with_args(main.main),
        0,
        ("-2", "Filling the activation buffer"),
        check=second_run_is_beside_the_first,
    ),
    Case(
        "--overwrite replaces a run folder training wrote",
        lambda w: (
            (w.run / checkpoint.METRICS_FILE).write_text('{"step": 999}'),
            (main.main, w.args("--overwrite")),
        )[1],
        0,
        watch=lambda w: [w.data],
        check=replaced_in_place,
    ),
    Case(
        "--overwrite of a run folder holding other files",
        lambda w: ((w.run / "notes.txt").write_text("mine"), (main.main, w.args("--overwrite")))[1],
        2,
        ("did not write (notes.txt)",),
        early=True,
    ),
    Case(
        "--overwrite of a folder no tool marked",
        lambda w: ((w.run / checkpoint.MARKER_FILE).unlink(), (main.main, w.args("--overwrite")))[
            1
        ],
        2,
        ("training did not write it", "no marker file"),
        early=True,
    ),
    Case(
        "a chosen run name that holds a run",
        call(claim_chosen_name),
        2,
        ("already holds a run", "--resume", "--overwrite"),
        early=True,
    ),
    Case(
        "a run folder in use by a live process",
        locked_by(os.getpid()),
        2,
        ("in use by another run",),
        early=True,
    ),
    Case(
        "a lock left by a killed process",
        lambda w: locked_by(dead_pid())(w),
        0,
        ("fvu",),
        lambda w: [w.data],
    ),
    Case(
        "--resume with the original command line repeated",
        with_args(main.main, "--resume", "{run}"),
        0,
        ("fvu",),
    ),
    Case(
        "--resume with an option changed",
        with_args(main.main, "--lr", "0.1", "--resume", "{run}"),
        2,
        ("--lr 0.1 (saved: 0.0003)", "only --device and --wandb-* may change"),
        early=True,
    ),
    Case(
        "--demo --resume continues the demo from its printed command",
        demo_stopped_then_resumed,
        0,
        ("CE",),
        watch=lambda w: [w.data, w.run],
        check=resumed_to_the_end,
    ),
    Case(
        "the demo records the built-in corpus by name",
        call(lambda w: demo_records_the_corpus(w)),
        0,
    ),
    Case(
        "a full disk while saving",
        disk_fails(errno.ENOSPC),
        2,
        ("No space left on device", "sae.safetensors", "the file it replaces is intact"),
        watch=lambda w: [w.data],
        check=previous_save_loads,
    ),
    Case(
        "a read-only disk while saving",
        disk_fails(errno.EROFS),
        2,
        ("Read-only file system", "the file it replaces is intact"),
        watch=lambda w: [w.data],
        check=previous_save_loads,
    ),
    # -- validated before the model loads -----------------------------------------------------------
    Case(
        "--checkpoint-dir inside a file",
        lambda w: (main.main, w.args("--checkpoint-dir", binary_file(w) / "runs")),
        2,
        ("cannot be created", "--checkpoint-dir"),
        early=True,
    ),
    Case(
        "--dict-size beyond the memory",
        with_args(main.main, "--dict-size", "1000000000"),
        2,
        ("GiB available", "--dict-size 1000000000"),
        early=True,
    ),
    Case(
        "--num-tokens 1e30",
        with_args(main.main, "--num-tokens", "1e30"),
        2,
        ("beyond any dataset",),
        early=True,
    ),
    Case(
        "--device tpu7",
        with_args(main.main, "--device", "tpu7"),
        2,
        ("'tpu7' is not a device",),
        early=True,
    ),
    Case(
        "--layer disagrees with --hook-point",
        with_args(main.main, "--hook-point", "blocks.0.hook_resid_pre"),
        2,
        ("is in block 0 but cfg['layer'] is 1",),
        early=True,
    ),
    Case(
        "a hub model missing offline",
        with_args(main.main, "--model", "gpt2", "--dict-size", "12288"),
        2,
        ("not in the local Hugging Face cache", "HF_HUB_OFFLINE"),
        early=True,
    ),
    Case(
        "a hub dataset missing offline",
        with_args(main.main, "--dataset", "nobody/no-such-dataset"),
        2,
        ("not in the local Hugging Face cache",),
        early=True,
    ),
    Case(
        "a data file that is not there",
        lambda w: (main.main, w.args("--dataset", w.tmp / "missing.txt")),
        2,
        ("missing.txt'", "no such file"),
        early=True,
    ),
    Case(
        "inspect_sae.py --top-n 0",
        lambda w: (inspect_sae.main, [str(w.run), "--top-n", "0"]),
        2,
        ("--top-n", "must be at least 1"),
        early=True,
    ),
    Case(
        "inspect_sae.py --context -1",
        lambda w: (inspect_sae.main, [str(w.run), "--context", "-1"]),
        2,
        ("--context", "must be at least 0"),
        early=True,
    ),
    Case(
        "inspect_sae.py --out holding other files",
        lambda w: (inspect_sae.main, [str(w.run), "--out", str(folder_with_notes(w))]),
        2,
        ("holds other files (notes.txt)",),
        lambda w: [w.run, w.tmp / "mine"],
        early=True,
    ),
    # -- what is read is checked ---------------------------------------------------------------------
    Case(
        "a binary file given as the checkpoint",
        lambda w: (inspect_sae.main, [str(binary_file(w))]),
        2,
        ("is a file, not a checkpoint folder",),
        early=True,
    ),
    Case(
        "a folder without a checkpoint",
        lambda w: (main.main, ["--resume", str(w.checkpoints)]),
        2,
        ("is not a checkpoint folder: it has no config.json and no sae.safetensors",),
        early=True,
    ),
    Case(
        "config.json that is not JSON",
        edited_config(lambda path: path.write_text("{oops")),
        2,
        ("config.json is not valid JSON", "line 1"),
        early=True,
    ),
    Case(
        "config.json that is not text",
        edited_config(lambda path: path.write_bytes(b"\xff\xfe\x00binary")),
        2,
        ("config.json is not UTF-8 text",),
        early=True,
    ),
    Case(
        "config.json with a bad value",
        edited_config(with_setting("dict_size", "big")),
        2,
        ("config.json: cfg['dict_size'] must be an integer",),
        early=True,
    ),
    Case(
        "weights of the wrong shape",
        wrong_shape,
        2,
        ("tensor 'W_enc' has shape (64, 300)", "needs (64, 256)"),
        early=True,
    ),
    Case(
        "weights of the wrong shape, resumed",
        lambda w: (wrong_shape(w), (main.main, ["--resume", str(w.run)]))[1],
        2,
        ("tensor 'W_enc' has shape (64, 300)",),
    ),
    Case(
        "an activation cache whose width was edited",
        edited_cache_width,
        2,
        ("width [65], not act_size 64",),
        watch=lambda w: [w.run, w.tmp / "cache"],
        early=True,
    ),
    Case(
        "cache_activations.py --n-eval-rows, --dataset recorded as given",
        lambda w: (
            cache_activations.main,
            ["--out", str(w.tmp / "cache"), *w.args(), "--n-eval-rows", "3"],
        ),
        0,
        ("activations of blocks.1.hook_resid_pre", "Caching activations"),
        check=cache_records_what_was_given,
    ),
    Case(
        "training from a cache with fewer held-out rows",
        lambda w: (main.main, w.args("--activations", cache_of(w, "--n-eval-rows", "2"))),
        2,
        ("2 held-out rows, not n_eval_rows 4",),
        watch=lambda w: [w.run, w.tmp / "cache"],
        early=True,
    ),
    Case(
        "cache --out over a folder of other files",
        lambda w: (cache_activations.main, ["--out", str(folder_with_notes(w)), *w.args()]),
        2,
        ("not empty and holds no activation cache",),
        lambda w: [w.tmp / "mine"],
        early=True,
    ),
    Case(
        "cache --out over a complete cache",
        lambda w: (cache_activations.main, ["--out", str(cache_of(w)), *w.args()]),
        2,
        ("holds a complete activation cache", "--overwrite"),
        lambda w: [w.tmp / "cache"],
        early=True,
    ),
    # -- errors, the library ---------------------------------------------------------------------------
    Case(
        "--debug shows the traceback",
        with_args(main.main, "--device", "tpu7", "--debug"),
        2,
        ("tpu7",),
        early=True,
        traceback=True,
    ),
    Case("load_sae gives eval mode", call(load_sae_is_in_eval_mode), 0),
    Case(
        "text_latents marks and leaves out BOS as training did", call(text_latents_leave_bos_out), 0
    ),
    Case(
        "pyproject.toml installs every command; the root holds only entry points",
        call(every_command_is_installed),
        0,
    ),
    Case("the CE evaluation ends on a stop signal", call(evaluation_stops_on_a_signal), 0),
]


# ---------------------------------------------------------------------------------------------
# The runner
# ---------------------------------------------------------------------------------------------


def checksums(folders: list[Path]) -> dict[str, str]:
    """sha256 of every file under `folders` (a folder that does not exist: none)."""
    sums = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")) if folder.is_dir() else []:
            if path.is_file():
                sums[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return sums


def run_target(target, w: World, capsys) -> tuple[int, str, str]:
    """Run what a row's setup gave; (exit status, stdout, stderr)."""
    if callable(target):  # a call: run as the scripts run their work
        work = target
        target = (
            lambda argv: cli_options.run_reporting_errors(work, resume_command="python call.py"),
            [],
        )
    script_main, argv = target
    argv = [str(a).replace("{run}", str(w.run)) for a in argv]
    if getattr(w, "failing_save", None) is not None:
        w.patch.setattr(checkpoint, "save_file", w.failing_save)
    capsys.readouterr()
    try:
        script_main(argv)
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input(case: Case, world: World, capsys, monkeypatch, tiny_gpt2):
    if case.name == "a hub model missing offline" and hub_model_is_cached():
        pytest.skip("gpt2 is in this machine's Hugging Face cache")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    use_tiny_models(monkeypatch, tiny_gpt2)
    world.patch, world.capsys = monkeypatch, capsys
    target = case.run(world)  # the setup first: the checksums are of what the command finds
    watched = case.watch(world)
    before = checksums(watched)
    if case.early:

        def no_model(*args, **kwargs):
            raise AssertionError(f"{case.name}: the model was loaded before the error")

        monkeypatch.setattr(model_loading, "load_model", no_model)

    code, out, err = run_target(target, world, capsys)

    assert code == case.code, (out, err)
    lines = [line for line in err.splitlines() if "error:" in line]
    if code == 2:
        assert len(lines) == 1, err
        assert all(word in lines[0] for word in case.words), lines[0]
        assert ("Traceback" in err) == case.traceback, err
        if case.early and not case.traceback:
            assert err.strip() == lines[0], f"more than the one line: {err}"
    else:
        assert not lines and "Traceback" not in err, err
        assert all(word in out + err for word in case.words), out
    assert checksums(watched) == before, "a file that existed before was changed or removed"
    if case.check is not None:
        case.check(world)


def test_a_bug_shows_its_traceback():
    """Only user errors become one line: anything else is a bug and propagates with its traceback."""
    with pytest.raises(ZeroDivisionError):
        cli_options.run_reporting_errors(lambda: 1 / 0, resume_command="python call.py")


def test_one_line_in_a_real_process():
    """The real CLI: exit status 2 and one line on stderr, nothing else."""
    result = subprocess.run(
        [sys.executable, "main.py", "--device", "tpu7", "--model", "gpt2"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "WANDB_MODE": "disabled"},
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "main.py: error: device 'tpu7' is not a device torch knows; use --device cpu, cuda, cuda:N or mps."
    ]
