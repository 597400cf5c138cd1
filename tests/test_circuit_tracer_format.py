"""The circuit-tracer export on the real path: circuit-tracer 0.5.0's own loader, in its own
environment (.ct-venv, made by setup_circuit_tracer_env.sh), reads our exported sets and computes
what ours compute, for every transcoder class, with and without skip; its replacement model built
from the same weights runs `attribute` and scores the graph.

The check runs in a subprocess (tests/circuit_tracer_check.py). Without .ct-venv the tests are
skipped, unless REQUIRE_CIRCUIT_TRACER=1 (as CI sets), when they fail.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import set_cfgs, train_set

from matryoshka_sae.circuit_tracer_format import export_circuit_tracer

ROOT = Path(__file__).resolve().parents[1]
CT_PYTHON = ROOT / ".ct-venv" / "bin" / "python"

if not CT_PYTHON.exists():
    if os.environ.get("REQUIRE_CIRCUIT_TRACER") == "1":
        raise RuntimeError(f"{CT_PYTHON} is missing; run: bash setup_circuit_tracer_env.sh")
    pytest.skip(
        "circuit-tracer's environment .ct-venv is missing (bash setup_circuit_tracer_env.sh)",
        allow_module_level=True,
    )


def save_model(model, tmp_path) -> Path:
    """The tiny model's config and weights, and token rows led by BOS, for the other environment."""
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(2, 1000, (4, 24), generator=generator)
    tokens[:, 0] = 1
    path = tmp_path / "model.pt"
    config = {
        key: value
        for key, value in model.cfg.to_dict().items()
        if key
        in (
            "n_layers",
            "d_model",
            "n_ctx",
            "d_head",
            "n_heads",
            "d_mlp",
            "d_vocab",
            "act_fn",
            "normalization_type",
            "positional_embedding_type",
            "use_normalization_before_and_after",
            "n_key_value_heads",
            "original_architecture",
            "gated_mlp",
            "final_rms",
            "rotary_dim",
            "window_size",
            "attn_types",
            "attn_scores_soft_cap",
            "output_logits_soft_cap",
            "seed",
        )
    }
    torch.save({"config": config, "weights": model.state_dict(), "tokens": tokens}, path)
    return path


def check_in_circuit_tracer(model_file, pairs, attribute=False) -> dict:
    """Run tests/circuit_tracer_check.py in .ct-venv on (exported, set) folder pairs."""
    command = [
        str(CT_PYTHON),
        str(ROOT / "tests" / "circuit_tracer_check.py"),
        str(model_file),
        *(["--attribute"] if attribute else []),
        *(str(folder) for pair in pairs for folder in pair),
    ]
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


CASES = [
    ("matryoshka", False, "ln2_normalized"),
    ("matryoshka", True, "resid_mid"),
    ("batchtopk", False, "resid_mid"),
    ("batchtopk", True, "ln2_normalized"),
]


@pytest.fixture(scope="module")
def checked(tiny_gemma2, tmp_path_factory):
    """Every case trained and exported here, then checked in one circuit-tracer process (its start
    costs seconds); the first case also goes through attribution."""
    tmp_path = tmp_path_factory.mktemp("circuit_tracer")
    pairs = []
    for kind, skip, site in CASES:
        name = f"{kind}-{skip}-{site}"
        train_set(
            tiny_gemma2,
            set_cfgs(tmp_path, name, kind=kind, skip=skip, source_site=site),
            evaluate=False,
        )
        pairs.append(
            (export_circuit_tracer(tmp_path / name, tmp_path / f"{name}-exported"), tmp_path / name)
        )
    return check_in_circuit_tracer(save_model(tiny_gemma2, tmp_path), pairs, attribute=True)


@pytest.mark.parametrize(
    "case", range(len(CASES)), ids=["-".join(map(str, case)) for case in CASES]
)
def test_circuit_tracer_loads_what_we_export(checked, case):
    kind, skip, site = CASES[case]
    result = checked["sets"][case]
    expected_hook = "ln2.hook_normalized" if site == "ln2_normalized" else "hook_resid_mid"
    assert result["input_hook"] == expected_hook and result["output_hook"] == "hook_mlp_out"
    assert result["skip"] == skip
    for layer, row in result["layers"].items():
        assert row["same_latents"] and row["active_latents"] > 0, (layer, row)
        assert row["relative_error"] < 1e-5, (layer, row)


def test_circuit_tracer_attributes_through_our_set(checked):
    result = checked["attribution"]
    assert result["logits_difference"] < 1e-4  # the replacement model has the model's weights
    assert result["n_active_features"] > 0
    assert 0 < result["replacement_score"] <= 1 and 0 < result["completeness_score"] <= 1
