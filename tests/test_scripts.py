"""The scripts: help texts, the model table, the cfgs they build, and end-to-end runs on tiny models."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import small_run_args

from matryoshka_sae.checkpoint import checkpoint_folder, load_metrics, load_sae
from matryoshka_sae.cli import main, train_gemma_example

REPO = Path(__file__).resolve().parents[1]


def run_script(*args):
    result = subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_main_help():
    out = run_script("main.py", "--help")
    for option in (
        "--batchtopk-k",
        "--model",
        "--layer",
        "--site",
        "--num-tokens",
        "--dict-size",
        "--top-k",
        "--device",
        "--dtype",
        "--model-dtype",
        "--wandb-mode",
        "--dataset",
        "--batch-size",
        "--lr",
        "--checkpoint-dir",
    ):
        assert option in out


def test_gemma_example_help_and_compare():
    assert all(
        command in run_script("train_gemma_example.py", "--help")
        for command in ("compare", "sae", "transcoder")
    )
    table = run_script("train_gemma_example.py", "compare")
    rows = {line.split()[0]: line for line in table.splitlines()[2:]}
    assert list(rows) == train_gemma_example.COMPARED_MODELS
    assert rows["gemma-2-2b"].split()[1:4] == ["2304", "26", "36864"]
    assert "[2304, 4608, 9216, 20736]" in rows["gemma-2-2b"]
    assert rows["gpt2"].split()[1:4] == ["768", "12", "12288"]
    assert rows["gemma-2-27b"].split()[1:4] == ["4608", "46", "73728"]


# ---------------------------------------------------------------------------------------------
# The cfgs the scripts build
# ---------------------------------------------------------------------------------------------


def test_gemma_sae_cfg_is_the_documents():
    cfg = train_gemma_example.sae_cfg()
    assert (cfg["model_name"], cfg["sae_type"], cfg["act_size"]) == (
        "gemma-2-2b",
        "matryoshka",
        2304,
    )
    assert cfg["hook_point"] == "blocks.8.hook_resid_pre"
    assert cfg["dict_size"] == 36864 and cfg["group_sizes"] == [2304, 4608, 9216, 20736]
    assert (
        cfg["top_k"] == 96 and cfg["model_batch_size"] == 4 and cfg["model_dtype"] == torch.bfloat16
    )


def test_gemma_transcoder_cfg_is_the_documents():
    cfg = train_gemma_example.transcoder_cfg()
    assert cfg["sae_type"] == "matryoshka_transcoder"
    assert cfg["source_hook_point"] == "blocks.8.hook_resid_mid"
    assert cfg["target_hook_point"] == "blocks.8.hook_mlp_out"
    assert (
        cfg["dict_size"] == 18432
        and cfg["group_sizes"] == [2304, 4608, 6912, 4608]
        and cfg["top_k"] == 64
    )


def test_command_line_overrides():
    parser = train_gemma_example.build_parser()
    args = parser.parse_args(
        [
            "sae",
            "--num-tokens",
            "1e6",
            "--lr",
            "1e-4",
            "--model-dtype",
            "float32",
            "--wandb-mode",
            "disabled",
            "--layer",
            "3",
        ]
    )
    cfg = train_gemma_example.sae_cfg(args)
    assert cfg["num_tokens"] == 10**6 and cfg["lr"] == 1e-4 and cfg["model_dtype"] == torch.float32
    assert cfg["wandb_mode"] == "disabled" and cfg["hook_point"] == "blocks.3.hook_resid_pre"
    assert cfg["dict_size"] == 36864  # the script's value is kept
    # Another model: the sizes follow it.
    cfg = train_gemma_example.sae_cfg(parser.parse_args(["sae", "--model", "gpt2"]))
    assert (
        cfg["act_size"] == 768
        and cfg["dict_size"] == 12288
        and cfg["group_sizes"] == [768, 1536, 3072, 6912]
    )
    cfg = train_gemma_example.transcoder_cfg(
        parser.parse_args(["transcoder", "--source-site", "ln2_normalized"])
    )
    assert cfg["source_hook_point"] == "blocks.8.ln2.hook_normalized"
    with pytest.raises(SystemExit):
        parser.parse_args(
            ["transcoder", "--site", "resid_pre"]
        )  # transcoders take --source/target-site
    with pytest.raises(SystemExit):
        parser.parse_args(["sae", "--num-tokens", "1.5"])


def test_main_cfgs_share_one_stream():
    cfgs = main.build_cfgs(main.build_parser().parse_args([]))
    assert [(c["sae_type"], c["top_k"]) for c in cfgs] == [
        ("batchtopk", 16),
        ("batchtopk", 32),
        ("batchtopk", 64),
        ("matryoshka", 32),
    ]
    assert {c["hook_point"] for c in cfgs} == {"blocks.8.hook_resid_pre"}
    assert len({c["name"] for c in cfgs}) == 4
    assert len({(c["batch_size"], c["num_tokens"], c["model_name"]) for c in cfgs}) == 1
    args = main.build_parser().parse_args(
        ["--batchtopk-k", "8", "--top-k", "24", "--dict-size", "1536"]
    )
    cfgs = main.build_cfgs(args)
    assert [(c["sae_type"], c["top_k"], c["dict_size"]) for c in cfgs] == [
        ("batchtopk", 8, 1536),
        ("matryoshka", 24, 1536),
    ]
    assert sum(cfgs[1]["group_sizes"]) == 1536


# ---------------------------------------------------------------------------------------------
# End to end, with tiny models standing in for the hub's
# ---------------------------------------------------------------------------------------------


def test_main_trains_the_group(tmp_path, token_rows, tiny_models, capsys):
    args = [
        "--model",
        "tiny-gpt2",
        "--batchtopk-k",
        "4",
        "8",
        *small_run_args(tmp_path, token_rows),
    ]
    main.main(args)
    cfgs = main.build_cfgs(main.build_parser().parse_args(args))
    out = capsys.readouterr().out
    for cfg in cfgs:
        metrics = load_metrics(checkpoint_folder(cfg))
        assert metrics["step"] == 4 and "loss_recovered" in metrics
        assert str(checkpoint_folder(cfg)) in out
        assert type(load_sae(checkpoint_folder(cfg))).__name__ in (
            "BatchTopKSAE",
            "GlobalBatchTopKMatryoshkaSAE",
        )


@pytest.mark.parametrize("command", ["sae", "transcoder"])
def test_gemma_example_trains(command, tmp_path, token_rows, tiny_models):
    args = [command, "--model", "tiny-gemma2", *small_run_args(tmp_path, token_rows)]
    train_gemma_example.main(args)
    parsed = train_gemma_example.build_parser().parse_args(args)
    cfg = (train_gemma_example.sae_cfg if command == "sae" else train_gemma_example.transcoder_cfg)(
        parsed
    )
    metrics = load_metrics(checkpoint_folder(cfg))
    assert metrics["step"] == 4 and "fvu_mean" in metrics and "loss_recovered" in metrics
