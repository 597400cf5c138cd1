"""Transcoder sets (transcoder_set.py): one pass trains every layer as separate runs would, resume
is exact, the set's evaluation replaces every MLP at once, and the circuit-tracer export folds
our units exactly or refuses with one line."""

import json
import signal

import pytest
import torch
from helpers import assert_same_weights, set_cfgs, train_set
from safetensors.torch import load_file

from matryoshka_sae.activation_store import MultiHookActivationsStore
from matryoshka_sae.circuit_tracer_format import (
    THRESHOLD,
    circuit_tracer_layer,
    export_circuit_tracer,
    read_config,
)
from matryoshka_sae.cli import train_gemma_example
from matryoshka_sae.preemption import TrainingInterrupted
from matryoshka_sae.sae import create_sae
from matryoshka_sae.sae_lens_format import NotRepresentable
from matryoshka_sae.training import train_transcoder
from matryoshka_sae.transcoder_activation_store import TranscoderActivationsStore
from matryoshka_sae.transcoder_set import (
    SET_MANIFEST,
    layer_folders,
    load_transcoder_set,
    parse_layers,
    read_manifest,
)


def test_set_trains_each_layer_as_a_run_of_its_own(tiny_gemma2, tmp_path):
    cfgs = set_cfgs(tmp_path, "set")
    trained = train_set(tiny_gemma2, cfgs, evaluate=False)
    assert read_manifest(tmp_path / "set")["layers"] == [0, 1]
    for cfg, together in zip(cfgs, trained):
        alone_cfg = {**cfg, "checkpoint_dir": str(tmp_path / "alone")}
        torch.manual_seed(0)
        alone = train_transcoder(
            create_sae(alone_cfg),
            TranscoderActivationsStore(tiny_gemma2, alone_cfg),
            None,
            alone_cfg,
        )
        assert_same_weights(alone, together)


@pytest.mark.parametrize("kind, groups", [("matryoshka", 4), ("batchtopk", 1), ("topk", 1)])
def test_kinds_set_the_selection_and_the_groups(tmp_path, kind, groups):
    cfgs = set_cfgs(tmp_path, kind, kind=kind)
    assert all(len(cfg["group_sizes"]) == groups and sum(cfg["group_sizes"]) == 128 for cfg in cfgs)
    assert {cfg["transcoder_selection"] for cfg in cfgs} == {
        "topk" if kind == "topk" else "batchtopk"
    }
    assert [cfg["source_hook_point"] for cfg in cfgs] == [
        "blocks.0.ln2.hook_normalized",
        "blocks.1.ln2.hook_normalized",
    ]
    assert [cfg["target_hook_point"] for cfg in cfgs] == [
        "blocks.0.hook_mlp_out",
        "blocks.1.hook_mlp_out",
    ]
    assert not any(cfg["input_unit_norm"] for cfg in cfgs)  # exportable by default


def test_topk_transcoder_keeps_k_latents_per_token(tiny_gemma2, tmp_path):
    transcoder = train_set(
        tiny_gemma2, set_cfgs(tmp_path, "topk", layers=(0,), kind="topk"), evaluate=False
    )[0]
    transcoder.eval()
    codes = transcoder.encode(torch.randn(20, 64))
    assert ((codes > 0).sum(-1) <= 6).all() and ((codes > 0).sum(-1) >= 5).float().mean() > 0.5


def test_set_resumes_exactly_after_sigterm(tiny_gpt2, tmp_path, monkeypatch):
    reference = train_set(tiny_gpt2, set_cfgs(tmp_path, "reference"), evaluate=False)
    cfgs = set_cfgs(tmp_path, "stopped")
    served = {"n": 0}
    next_batch = MultiHookActivationsStore.next_batch

    def counted(store):
        served["n"] += 1
        if served["n"] == 7:
            signal.raise_signal(signal.SIGTERM)
        return next_batch(store)

    monkeypatch.setattr(MultiHookActivationsStore, "next_batch", counted)
    with pytest.raises(TrainingInterrupted, match="SIGTERM after step 7"):
        train_set(tiny_gpt2, cfgs, evaluate=False)
    monkeypatch.setattr(MultiHookActivationsStore, "next_batch", next_batch)
    resumed = train_set(tiny_gpt2, cfgs, resume=True, evaluate=False)
    for a, b in zip(reference, resumed):
        assert_same_weights(a, b)


def test_set_evaluation_replaces_every_mlp(tiny_gemma2, tmp_path):
    cfgs = set_cfgs(tmp_path, "set")
    train_set(tiny_gemma2, cfgs)
    metrics = json.loads((tmp_path / "set" / "metrics.json").read_text())
    assert set(metrics["fvu_per_layer"]) == {"0", "1"} and metrics["kl_divergence"] > 0
    assert metrics["fvu_mean"] == pytest.approx(sum(metrics["fvu_per_layer"].values()) / 2)
    # The spliced loss differs from the clean one: both layers' outputs were replaced.
    assert metrics["ce_loss_spliced"] != metrics["ce_loss_clean"]
    assert set(layer_folders(tmp_path / "set")) == {0, 1}


@pytest.mark.parametrize("kind, skip", [("matryoshka", False), ("batchtopk", True)])
def test_export_computes_what_the_set_computes(tiny_gemma2, tmp_path, kind, skip):
    """circuit-tracer's forward pass (F.linear, JumpReLU, + x W_skip^T) on the exported tensors,
    written out here, equals ours; the real circuit_tracer package checks the same in
    test_circuit_tracer_format.py."""
    train_set(tiny_gemma2, set_cfgs(tmp_path, "set", kind=kind, skip=skip), evaluate=False)
    out = export_circuit_tracer(tmp_path / "set", tmp_path / "exported")
    config = read_config(out)
    assert (
        config["model_kind"] == "transcoder_set"
        and config["feature_input_hook"] == "ln2.hook_normalized"
    )
    assert config["feature_output_hook"] == "hook_mlp_out" and len(config["transcoders"]) == 2
    x = torch.randn(300, 64) * 2 + 0.5
    for layer, ours in load_transcoder_set(tmp_path / "set").items():
        t = load_file(out / f"layer_{layer}.safetensors")
        assert t["W_enc"].shape == (128, 64) and t[THRESHOLD].shape == (128,)
        pre = torch.nn.functional.linear(x, t["W_enc"], t["b_enc"])
        z = pre * (pre > t[THRESHOLD])
        y = z @ t["W_dec"] + t["b_dec"] + (x @ t["W_skip"].T if skip else 0)
        assert ("W_skip" in t) == skip
        assert torch.equal(ours.encode(x) > 0, z > 0)
        torch.testing.assert_close(y, ours.reconstruct(x), rtol=1e-5, atol=1e-4)


def test_export_refuses_what_circuit_tracer_cannot_compute(tiny_gemma2, tmp_path):
    train_set(tiny_gemma2, set_cfgs(tmp_path, "partial", layers=(1,)), evaluate=False)
    with pytest.raises(NotRepresentable, match=r"lacks layers \[0\].*--layers all"):
        export_circuit_tracer(tmp_path / "partial", tmp_path / "out")
    normed = train_set(
        tiny_gemma2, set_cfgs(tmp_path, "normed", layers=(0,), input_unit_norm=True), evaluate=False
    )[0]
    with pytest.raises(NotRepresentable, match="input_unit_norm False"):
        circuit_tracer_layer(normed)
    topk = train_set(
        tiny_gemma2, set_cfgs(tmp_path, "topk", layers=(0,), kind="topk"), evaluate=False
    )[0]
    with pytest.raises(NotRepresentable, match="transcoder_selection 'batchtopk'"):
        circuit_tracer_layer(topk)
    assert not (tmp_path / "out").exists()  # nothing written on refusal


def test_parse_layers():
    assert parse_layers("all", 4) == [0, 1, 2, 3]
    assert parse_layers("0,2-3", 4) == [0, 2, 3]
    with pytest.raises(ValueError, match=r"layers 0\.\.3.*\[7\]"):
        parse_layers("0,7", 4)
    with pytest.raises(ValueError, match="'all', a list"):
        parse_layers("first", 4)


def test_cli_refuses_bad_layers_before_loading_a_model(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_gemma_example.main(["transcoder", "--layers", "0,99", "--model", "smollm2-135m"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "layers 0..29" in err[0]


def test_manifest_names_every_layer_folder(tmp_path):
    cfgs = set_cfgs(tmp_path, "set", layers=(0, 1))
    from matryoshka_sae.transcoder_set import write_manifest

    write_manifest(tmp_path / "set", cfgs, "matryoshka")
    data = json.loads((tmp_path / "set" / SET_MANIFEST).read_text())
    assert (
        data["folders"] == {"0": "layer_0", "1": "layer_1"}
        and data["source_site"] == "ln2_normalized"
    )
