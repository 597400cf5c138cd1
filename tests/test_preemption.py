"""Preemption and resume from the command line, with real training processes on the tiny models
(tests/tiny_script.py): SIGKILL between or during checkpoint writes, then ``--resume``, ends with the
weights of an uninterrupted run; SIGTERM writes a checkpoint and exits with the resume command."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import run_args

from matryoshka_sae.checkpoint import checkpoint_folder, load_metrics, load_sae
from matryoshka_sae.cli import main, train_gemma_example

REPO = Path(__file__).resolve().parents[1]
TINY_SCRIPT = REPO / "tests" / "tiny_script.py"


def run_tiny(*args, env=None, timeout=120):
    return subprocess.run(
        [sys.executable, str(TINY_SCRIPT), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def assert_same_weights(folder_a, folder_b):
    a, b = load_sae(folder_a).state_dict(), load_sae(folder_b).state_dict()
    for name, tensor in a.items():
        assert b[name].equal(tensor), name


@pytest.mark.parametrize(
    "script, options, kill",
    [
        # Killed while saving the second dictionary's step-10 checkpoint: the first is a save ahead.
        (["main.py"], ["--model", "tiny-gpt2", "--batchtopk-k", "4"], {"TINY_KILL_IN_SAVE": "4"}),
        (
            ["train_gemma_example.py", "transcoder"],
            ["--model", "tiny-gemma2"],
            {"TINY_KILL_AT_BATCH": "13"},
        ),
    ],
    ids=["main-killed-while-saving", "transcoder-killed-between-saves"],
)
def test_sigkill_then_resume_from_the_command_line_is_exact(
    script, options, kill, tmp_path, token_rows, tiny_models
):  # noqa: F811
    module = main if script[0] == "main.py" else train_gemma_example
    module.main(
        [*script[1:], *options, *run_args(tmp_path, token_rows, tmp_path / "reference")]
    )  # uninterrupted

    killed = run_tiny(
        *script, *options, *run_args(tmp_path, token_rows, tmp_path / "killed"), env=kill
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    folders = sorted(p for p in (tmp_path / "killed").iterdir())
    assert folders and all((folder / "sae.safetensors").exists() for folder in folders)

    resumed = run_tiny(*script, "--resume", *map(str, folders))
    assert resumed.returncode == 0, resumed.stderr
    for folder in folders:
        assert load_metrics(folder)["step"] == 24
        assert_same_weights(tmp_path / "reference" / folder.name, folder)


def test_sigterm_writes_a_checkpoint_and_prints_the_resume_command(tmp_path, token_rows):
    args = [
        "main.py",
        "--model",
        "tiny-gpt2",
        "--batchtopk-k",
        "4",
        *run_args(tmp_path, token_rows, tmp_path / "run", n_steps=10**6),
    ]
    child = subprocess.Popen(
        [sys.executable, str(TINY_SCRIPT), *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not list((tmp_path / "run").glob("*/sae.safetensors")):  # training is under way
            assert child.poll() is None and time.monotonic() < deadline, child.communicate()
            time.sleep(0.1)
        child.send_signal(signal.SIGTERM)
        _, stderr = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == 128 + signal.SIGTERM, stderr
    last = stderr.strip().splitlines()[-2:]
    stopped = re.search(
        r"training stopped by SIGTERM after step (\d+); checkpoint written to", last[0]
    )
    assert stopped, stderr
    folders = sorted((tmp_path / "run").iterdir())
    assert last[1] == "Resume with: python main.py --resume " + " ".join(map(str, folders))
    for folder in folders:  # the checkpoint is of the step where it stopped, complete and loadable
        assert load_metrics(folder)["step"] == int(stopped.group(1))
        assert (folder / "training_state.pt").exists() and load_sae(folder) is not None
        assert (
            checkpoint_folder({"checkpoint_dir": str(folder.parent), "name": folder.name}) == folder
        )
