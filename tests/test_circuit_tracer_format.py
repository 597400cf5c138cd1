"""The circuit-tracer export on the real path: circuit-tracer 0.5.0's own loader, in its own
environment (.ct-venv, made by setup_circuit_tracer_env.sh), reads our exported sets and computes
what ours compute, for every transcoder class, with and without skip; its replacement model built
from the same weights runs `attribute` and scores the graph.

The check runs in a subprocess (tests/circuit_tracer_check.py). Without .ct-venv the tests are
skipped, unless REQUIRE_CIRCUIT_TRACER=1 (as CI sets), when they fail.
"""

import copy

import pytest
import torch
from circuit_tracer_helpers import circuit_tracer_missing, run_check, save_model
from helpers import set_cfgs, train_set

from matryoshka_sae.circuit_tracer_format import export_circuit_tracer

if circuit_tracer_missing():
    pytest.skip(circuit_tracer_missing(), allow_module_level=True)


def check_in_circuit_tracer(model_file, pairs, attribute=False) -> dict:
    """Run tests/circuit_tracer_check.py in .ct-venv on (exported, set) folder pairs."""
    flags = ["--attribute"] if attribute else []
    return run_check(
        "circuit_tracer_check.py",
        model_file,
        *flags,
        *(folder for pair in pairs for folder in pair),
    )


# (kind, skip, source site, target_norm): the last divides each target by a power of two near its
# RMS in training, which the export folds into W_dec, b_dec and W_skip.
CASES = [
    ("matryoshka", False, "ln2_normalized", False),
    ("matryoshka", True, "resid_mid", False),
    ("batchtopk", False, "resid_mid", False),
    ("batchtopk", True, "ln2_normalized", False),
    ("matryoshka", True, "ln2_normalized", True),
]


@pytest.fixture(scope="module")
def checked(tiny_gemma2, tmp_path_factory):
    """Every case trained and exported here, then checked in one circuit-tracer process (its start
    costs seconds); the first case also goes through attribution."""
    tmp_path = tmp_path_factory.mktemp("circuit_tracer")
    model = copy.deepcopy(tiny_gemma2)
    with (
        torch.no_grad()
    ):  # MLP outputs of RMS about 8, so that a target's power-of-two scale is not 1
        for block in model.blocks:
            block.ln2_post.w.mul_(8)
    pairs = []
    for kind, skip, site, target_norm in CASES:
        name = f"{kind}-{skip}-{site}-{target_norm}"
        cfgs = set_cfgs(
            tmp_path,
            name,
            kind=kind,
            skip=skip,
            source_site=site,
            transcoder_target_norm=target_norm,
        )
        trained = train_set(model, cfgs, evaluate=False)
        if target_norm:  # a scale the export has to fold, not 1
            assert all(t.target_scale.item() != 1.0 for t in trained)
        pairs.append(
            (export_circuit_tracer(tmp_path / name, tmp_path / f"{name}-exported"), tmp_path / name)
        )
    return check_in_circuit_tracer(save_model(model, tmp_path), pairs, attribute=True)


@pytest.mark.parametrize(
    "case", range(len(CASES)), ids=["-".join(map(str, case)) for case in CASES]
)
def test_circuit_tracer_loads_what_we_export(checked, case):
    kind, skip, site, _ = CASES[case]
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
