"""evaluate_sae.py through its command line: two dictionaries trained by main.py on the tiny model
are scored (core metrics) into one JSON each and a side-by-side table; bad arguments end in one
line before any model loads. Probing and absorption run on SmolLM2 (docs/evaluation.md); their
computations are tested in test_sparse_probing.py and test_absorption.py."""

import json

import pytest
from helpers import small_run_args

from matryoshka_sae.checkpoint import checkpoint_folder, load_metrics
from matryoshka_sae.cli import evaluate_sae, main


def test_two_dictionaries_side_by_side(tmp_path, token_rows, tiny_models, capsys):
    args = ["--model", "tiny-gpt2", "--batchtopk-k", "4", *small_run_args(tmp_path, token_rows)]
    main.main(args)
    folders = [
        str(checkpoint_folder(cfg)) for cfg in main.build_cfgs(main.build_parser().parse_args(args))
    ]
    out = tmp_path / "evaluation"
    evaluate_sae.main(
        [*folders, "--out", str(out), "--prefix", "evaluation_", "--no-probing", "--no-absorption"]
    )

    printed = capsys.readouterr().out
    assert "| metric | batchtopk | matryoshka |" in printed
    for folder, sae_type in zip(folders, ["batchtopk", "matryoshka"]):
        result = json.loads((out / f"evaluation_{sae_type}.json").read_text())
        core = result["core"]
        # the training run's own CE evaluation used the same held-out rows
        assert core["ce_loss_score"] == pytest.approx(
            load_metrics(folder)["loss_recovered"], abs=1e-4
        )
        assert 0 < core["l0"] <= result["top_k"] * 4 and core["l1"] > 0
        assert core["kl_div_with_sae"] < core["kl_div_with_ablation"]
        assert (
            0
            <= core["frac_over_10_percent"]
            <= core["frac_over_1_percent"]
            <= core["frac_alive"]
            <= 1
        )
        assert result["environment"]["commit"] and result["environment"]["packages"]["sae-probes"]
    assert (out / "evaluation_table.md").read_text().startswith("| metric |")


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        evaluate_sae.main([str(tmp_path), "--no-probing"])
    assert stop.value.code == 2
    assert "is not a checkpoint folder" in capsys.readouterr().err


def test_table_marks_missing_values_and_the_absorption_caveat():
    results = [
        {
            "sae_type": "topk",
            "name": "a",
            "core": {"l0": 32.0, "explained_variance": 0.81},
            "absorption": {
                "mean_absorption_fraction_score": 0.12,
                "mean_full_absorption_score": float("nan"),
                "letters_scored": 20,
                "caveat": "x",
            },
        },
        {
            "sae_type": "matryoshka_transcoder",
            "name": "b",
            "core": {"l0": 30.5, "explained_variance": 0.7},
            "absorption": {"skipped": "..."},
        },
    ]
    table = evaluate_sae.format_table(results)
    assert "| L0 | 32.0 | 30.5 |" in table
    assert "| absorption fraction* | 0.120 | - |" in table
    assert "| full absorption rate* | - | - |" in table
    assert "1B-parameter" in table
    columns, rows = evaluate_sae.summary_rows(results)  # the same figures, for result files
    assert columns[:2] == ["dictionary", "L0"] and [row["dictionary"] for row in rows] == [
        "topk",
        "matryoshka_transcoder",
    ]
    assert rows[0]["absorption fraction*"] == 0.12 and rows[1]["absorption fraction*"] is None
    assert rows[0]["full absorption rate*"] is None
