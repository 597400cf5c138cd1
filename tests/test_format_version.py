"""Saved formats: config.json carries a format_version, and a file of an older version loads (and
resumes) with the behaviour of the version that wrote it (config.FORMAT_UPGRADES)."""

import json
import warnings

import pytest
import torch
from helpers import CrashingStore, PlantedStore, planted_cfg, synthetic_cfg, train_planted

from matryoshka_sae.checkpoint import checkpoint_folder, load_cfg, load_sae, save_checkpoint
from matryoshka_sae.config import (
    FORMAT_UPGRADES,
    FORMAT_VERSION,
    cfg_from_json,
    cfg_to_json,
    default_settings,
    post_init_cfg,
)
from matryoshka_sae.sae import create_sae


def as_format_0(cfg_json: str) -> str:
    """A config.json as format 0 wrote it: no format_version, none of the settings added since."""
    saved = json.loads(cfg_json)
    del saved["format_version"]
    for key in FORMAT_UPGRADES[0]:
        saved.pop(key, None)
    return json.dumps(saved)


def rewrite_as_format_0(folder) -> None:
    path = folder / "config.json"
    path.write_text(as_format_0(path.read_text()))


def format_0_behaviour(cfg: dict) -> dict:
    """`cfg` with the settings of format 0, the cfg a run of that version trained with."""
    table = {
        key: value(cfg) if callable(value) else value for key, value in FORMAT_UPGRADES[0].items()
    }
    return post_init_cfg(
        {**cfg, **{key: value for key, value in table.items() if key in default_settings()}}
    )


def test_config_json_records_the_format_version_and_round_trips():
    cfg = synthetic_cfg("jumprelu", target_l0=4)
    text = cfg_to_json(cfg)
    assert json.loads(text)["format_version"] == FORMAT_VERSION
    loaded = cfg_from_json(text)
    assert "format_version" not in loaded
    assert json.loads(cfg_to_json(loaded)) == json.loads(text)
    post_init_cfg(loaded)  # valid as it stands


@pytest.mark.parametrize("sae_type", ["jumprelu", "vanilla", "matryoshka_transcoder"])
def test_a_format_0_file_loads_with_that_versions_settings(sae_type):
    cfg = synthetic_cfg(sae_type, dict_size=64, top_k=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing in it is unknown to this version
        loaded = cfg_from_json(as_format_0(cfg_to_json(cfg)))
    for key, value in FORMAT_UPGRADES[0].items():
        expected = value(cfg) if callable(value) else value
        if expected is not None:
            assert loaded[key] == expected, key
    assert loaded == post_init_cfg(loaded)  # nothing left to derive or fix


def test_settings_present_in_a_format_0_file_are_kept():
    """Files of format 0 written after a setting existed hold it: the file's value wins."""
    cfg = synthetic_cfg("jumprelu", jumprelu_threshold_lr_scale=10.0, jumprelu_objective="tanh")
    saved = json.loads(cfg_to_json(cfg))
    del saved["format_version"]
    loaded = cfg_from_json(json.dumps(saved))
    assert (loaded["jumprelu_threshold_lr_scale"], loaded["jumprelu_objective"]) == (10.0, "tanh")


@pytest.mark.parametrize("version", [FORMAT_VERSION + 1, -1, "1"])
def test_an_unknown_format_version_is_a_clear_error(version):
    saved = json.loads(cfg_to_json(synthetic_cfg()))
    saved["format_version"] = version
    with pytest.raises(ValueError, match="format_version .* reads formats 0.."):
        cfg_from_json(json.dumps(saved))


@pytest.mark.parametrize("sae_type", ["jumprelu", "vanilla"])
def test_a_format_0_checkpoint_builds_that_versions_model(sae_type, tmp_path):
    """Format 0's JumpReLU: one parameter group (thresholds at the common lr), the step objective
    l0_coeff x L0 without warm-up; its ReLU SAE: b_enc 0 after the first batch, lambda = l1_coeff
    in absolute units."""
    cfg = format_0_behaviour(
        synthetic_cfg(
            sae_type,
            act_size=64,
            dict_size=512,
            bandwidth=0.001,
            jumprelu_threshold_init=0.001,
            l1_coeff=1e-3,
            l0_coeff=1e-3,
        )
    )
    save_checkpoint(tmp_path, create_sae(cfg), cfg)
    rewrite_as_format_0(tmp_path)
    sae = load_sae(tmp_path)
    assert set(sae.state_dict()) == {"W_enc", "b_enc", "W_dec", "b_dec", "tokens_since_fired"} | (
        {"log_threshold"} if sae_type == "jumprelu" else set()
    )
    assert len(sae.param_groups()) == 1
    x = torch.randn(256, 64) * 2 + 1
    sae.train()
    sae.initialize_b_dec(x)
    out = sae(x)
    acts = out["feature_acts"]
    if sae_type == "jumprelu":
        assert torch.count_nonzero(sae.b_enc) == 0
        expected = 1e-3 * (acts > 0).float().sum(dim=-1).mean()  # l0_coeff x L0, no warm-up
    else:
        assert torch.count_nonzero(sae.b_enc) == 0
        expected = 1e-3 * acts.sum(dim=-1).mean()  # l1_coeff x L1, absolute units, no warm-up
    assert (out["loss"] - out["l2_loss"]).item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("sae_type", ["jumprelu", "vanilla"])
def test_a_format_0_checkpoint_resumes_as_its_version_trains(sae_type, tmp_path):
    """A run of format 0 stopped after 10 of 20 steps, its config.json rewritten as format 0 wrote
    it, resumes from that file and ends where an uninterrupted format-0 run ends, exactly."""
    settings = dict(n_steps=20, checkpoint_freq=10, log_freq=5)
    reference_cfg = format_0_behaviour(planted_cfg(sae_type, tmp_path / "whole", **settings))
    reference = train_planted(reference_cfg)

    cfg = format_0_behaviour(planted_cfg(sae_type, tmp_path / "stopped", **settings))
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_planted(cfg, store=CrashingStore(crash_at=15))
    folder = checkpoint_folder(cfg)
    rewrite_as_format_0(folder)

    resumed_cfg = load_cfg(folder)
    assert resumed_cfg == cfg  # the file of format 0 gives back the settings the run trained with
    resumed = train_planted(
        post_init_cfg(resumed_cfg), store=PlantedStore(start=10), resume_from=folder
    )
    for name, tensor in reference.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name
    assert json.loads((folder / "config.json").read_text())["format_version"] == FORMAT_VERSION
