"""Bad settings and inputs end the scripts with one line ``<script>: error: ...`` and exit status 2
(as argparse does), never a traceback; load_sae names what is wrong with a folder."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import run_args

from matryoshka_sae.checkpoint import load_sae, save_checkpoint
from matryoshka_sae.cli import main, train_gemma_example
from matryoshka_sae.config import get_default_cfg, post_init_cfg
from matryoshka_sae.sae import create_sae

REPO = Path(__file__).resolve().parents[1]


def one_line_error(capsys, script_main, argv) -> str:
    capsys.readouterr()  # what came before
    with pytest.raises(SystemExit) as exit_info:
        script_main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


@pytest.mark.parametrize(
    "options, message",
    [
        (["--model", "llama-7b"], "main.py: error: Unknown model_name 'llama-7b'"),
        (["--layer", "40"], "outside the model's layers 0..11"),
        (["--top-k", "0"], "top_k must be an integer in 1..dict_size"),
        (["--dict-size", "1000", "--group-sizes", "100", "200"], "group_sizes"),
        (["--lr", "-1"], "lr"),
    ],
)
def test_bad_settings_are_one_line_errors(options, message, capsys):
    assert message in one_line_error(capsys, main.main, options)


def test_bad_settings_exit_2_without_a_traceback_in_a_real_process():
    result = subprocess.run(
        [sys.executable, "main.py", "--top-k", "0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert (
        result.stderr.strip().startswith("main.py: error: top_k")
        and "Traceback" not in result.stderr
    )


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "is an empty file"),
        (bytes(range(256)) * 8, "is not UTF-8 text"),
        (b"text\x00\x01\x02 with NUL bytes", "is a binary file"),
    ],
)
def test_unreadable_dataset_files(content, message, tmp_path, token_rows, tiny_models, capsys):  # noqa: F811
    data = tmp_path / "docs.txt"
    data.write_bytes(content)
    argv = ["--model", "tiny-gpt2", *run_args(tmp_path, token_rows, tmp_path / "ckpt")]
    argv[argv.index("--dataset") + 1] = str(data)
    assert message in one_line_error(capsys, main.main, argv)


def test_missing_dataset_file(tmp_path, token_rows, tiny_models, capsys):  # noqa: F811
    argv = ["sae", "--model", "tiny-gemma2", *run_args(tmp_path, token_rows, tmp_path / "ckpt")]
    argv[argv.index("--dataset") + 1] = str(tmp_path / "missing.txt")
    assert "train_gemma_example.py: error: cfg['dataset_path']" in one_line_error(
        capsys, train_gemma_example.main, argv
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda(capsys):
    assert "no CUDA GPU" in one_line_error(
        capsys, main.main, ["--device", "cuda", "--model", "gpt2"]
    )


def test_resume_from_something_that_is_not_a_checkpoint(tmp_path, capsys):
    assert (
        "is not a checkpoint folder: it has no config.json and no sae.safetensors"
        in one_line_error(capsys, main.main, ["--resume", str(tmp_path)])
    )


def test_load_sae_names_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match="is not a checkpoint folder: no such folder"):
        load_sae(tmp_path / "nothing")
    with pytest.raises(ValueError, match="is not a checkpoint folder: it has no config.json"):
        load_sae(tmp_path)
    cfg = get_default_cfg()
    cfg.update(
        model_name="synthetic",
        act_size=64,
        dict_size=256,
        top_k=4,
        sae_type="batchtopk",
        device="cpu",
    )
    folder = save_checkpoint(tmp_path / "run", create_sae(post_init_cfg(cfg)), post_init_cfg(cfg))
    weights = folder / "sae.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="sae.safetensors cannot be read .*truncated or damaged"):
        load_sae(folder)
