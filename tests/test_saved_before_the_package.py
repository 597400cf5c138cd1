"""Nothing saved before the package move is lost: folders written by the pre-package code (commit
0e64fb8, flat modules) load in `matryoshka_sae` and give what the old code gave.

The folders are committed under tests/fixtures/pre_package/ (written by
tests/fixtures/make_pre_package_fixtures.py against the old code, see its docstring and
provenance.json); expected.safetensors holds what the old code computed from them. Every test
works on a copy in tmp_path: nothing is ever written into tests/fixtures. What a saved dictionary
computes (loading, encode, reconstruct_prefixes, the exports, the cache's batches) is compared bit
for bit (torch.equal): the same computation on the same machine and torch gives the same bits, and
a refactoring that changes them has changed what an old checkpoint computes.

One change of arithmetic is deliberate: the training loss of every prefix is computed in one pass
(prefix_loss.py), its additions in another order than the old code's. So forward()'s loss dict
and the weights a resumed run trains equal the old code's within float rounding (`ROUNDING`).
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from datasets import Dataset
from safetensors.torch import load_file

from matryoshka_sae.activation_cache import CachedActivationsStore
from matryoshka_sae.activation_store import ActivationsStore
from matryoshka_sae.checkpoint import WEIGHTS_FILE, load_cfg, load_sae, saved_steps
from matryoshka_sae.circuit_tracer_format import export_circuit_tracer
from matryoshka_sae.config import cfg_from_json
from matryoshka_sae.sae import create_sae
from matryoshka_sae.sae_lens_format import export_sae_lens, load_sae_lens
from matryoshka_sae.training import train_sae
from matryoshka_sae.transcoder_set import load_transcoder_set, read_manifest

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "pre_package"
# The outputs every dictionary's forward must still give (other keys are compared where present).
CORE_OUTPUTS = ("loss", "l2_loss", "fvu", "sae_out", "feature_acts")


@pytest.fixture(autouse=True)
def quiet_epochs():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*exhausted; starting epoch")
        yield


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Tensor]:
    return load_file(FIXTURES / "expected.safetensors")


def copy(name: str, tmp_path: Path) -> Path:
    """tests/fixtures/pre_package/`name`, copied into tmp_path (the tests never write the fixtures)."""
    return Path(shutil.copytree(FIXTURES / name, tmp_path / name))


# The training loss's float rounding (prefix_loss.py): observed, up to 4.5e-8 on weights of size 0.5
# after 20 resumed steps, and on the loss dict's values.
ROUNDING = dict(rtol=1e-5, atol=1e-6)


def assert_close_tensors(ours: dict, old: dict, what: str) -> None:
    assert ours.keys() == old.keys(), f"{what}: tensors {sorted(ours)} != old {sorted(old)}"
    for name, tensor in old.items():
        torch.testing.assert_close(ours[name], tensor, **ROUNDING, msg=f"{what}: {name}")


def assert_same_tensors(ours: dict, old: dict, what: str) -> None:
    assert ours.keys() == old.keys(), f"{what}: tensors {sorted(ours)} != old {sorted(old)}"
    for name, tensor in old.items():
        assert ours[name].dtype == tensor.dtype, (
            f"{what}: {name} is {ours[name].dtype}, was {tensor.dtype}"
        )
        assert torch.equal(ours[name], tensor), f"{what}: {name} differs from the old code's"


@torch.no_grad()
def assert_computes_the_old_outputs(dictionary, prefix: str, expected: dict, clt: bool = False):
    """Eval-mode encode, reconstruct_prefixes and forward on the saved inputs equal the old code's
    (make_pre_package_fixtures.dictionary_outputs)."""
    dictionary.eval()
    inputs = [
        expected[f"{prefix}.input.{i}"]
        for i in range(sum(k.startswith(f"{prefix}.input.") for k in expected))
    ]
    source = torch.stack(inputs[: len(inputs) // 2], dim=-2) if clt else inputs[0]
    assert torch.equal(dictionary.encode(source), expected[f"{prefix}.encode"]), f"{prefix}: encode"
    assert torch.equal(
        dictionary.reconstruct_prefixes(source), expected[f"{prefix}.reconstruct_prefixes"]
    ), f"{prefix}: reconstruct_prefixes"
    outputs = dictionary(*inputs)
    old_keys = [
        k.removeprefix(f"{prefix}.forward.") for k in expected if k.startswith(f"{prefix}.forward.")
    ]
    missing = [key for key in CORE_OUTPUTS if key not in outputs]
    assert not missing, f"{prefix}: forward no longer returns {missing}"
    for key in old_keys:
        if key in outputs:  # the loss dict: float rounding (see the module's docstring)
            torch.testing.assert_close(
                outputs[key],
                expected[f"{prefix}.forward.{key}"],
                **ROUNDING,
                msg=f"{prefix}: forward()[{key!r}]",
            )


def test_the_tiny_model_is_the_one_the_fixtures_were_written_with(tiny_gpt2, expected):
    """(Else every comparison below would fail for a reason that is not the package's.) Within
    float rounding: a CPU with other vector units (AVX-512 or not) rounds the matmuls otherwise."""
    with torch.no_grad():
        _, cache = tiny_gpt2.run_with_cache(
            torch.arange(1, 33)[None], names_filter=["blocks.1.hook_resid_pre"]
        )
    torch.testing.assert_close(
        cache["blocks.1.hook_resid_pre"][0], expected["model.blocks.1.hook_resid_pre"], **ROUNDING
    )


def test_interrupted_sae_run_resumes_to_the_old_uninterrupted_weights(tiny_gpt2, tmp_path):
    folder = copy("sae_interrupted", tmp_path)
    assert list(saved_steps(folder)) == [20]
    interrupted = load_sae(folder)
    assert_same_tensors(
        interrupted.state_dict(), load_file(folder / WEIGHTS_FILE), "load_sae(sae_interrupted)"
    )
    cfg = load_cfg(
        folder
    )  # as main.py --resume does; the data was a Dataset object, given again here
    assert cfg["sae_type"] == "matryoshka" and cfg["dict_size"] == 128
    documents = json.loads((FIXTURES / "documents.json").read_text())
    cfg.update(
        dataset_path=Dataset.from_dict({"tokens": documents}),
        checkpoint_dir=str(tmp_path),
        name=folder.name,
    )
    torch.manual_seed(0)  # as the old run did (the checkpoint's RNG states replace it)
    resumed = train_sae(
        create_sae(cfg), ActivationsStore(tiny_gpt2, cfg), None, cfg, resume_from=folder
    )
    old = load_file(FIXTURES / "sae_uninterrupted_weights.safetensors")
    assert_close_tensors(resumed.state_dict(), old, "resumed run vs the old uninterrupted run")
    assert_close_tensors(
        load_file(folder / WEIGHTS_FILE), old, "the resumed run's final checkpoint"
    )


def test_final_sae_checkpoint_loads_and_computes_what_it_did(tmp_path, expected):
    sae = load_sae(copy("sae_final", tmp_path))
    assert type(sae).__name__ == "GlobalBatchTopKMatryoshkaSAE"
    assert_same_tensors(
        sae.state_dict(),
        load_file(FIXTURES / "sae_uninterrupted_weights.safetensors"),
        "load_sae(sae_final)",
    )
    assert_computes_the_old_outputs(sae, "sae_final", expected)


def test_sae_lens_export_of_the_old_checkpoint_equals_the_old_export(tmp_path, expected):
    old_export = FIXTURES / "sae_lens_export"
    new_export = export_sae_lens(copy("sae_final", tmp_path), tmp_path / "new_sae_lens_export")
    assert sorted(p.name for p in new_export.iterdir()) == sorted(
        p.name for p in old_export.iterdir()
    )
    for name in ("sae_weights.safetensors", "native_extras.safetensors"):
        assert_same_tensors(
            load_file(new_export / name), load_file(old_export / name), f"SAELens {name}"
        )
    assert json.loads((new_export / "cfg.json").read_text()) == json.loads(
        (old_export / "cfg.json").read_text()
    )
    # The sidecar is our cfg: the old one, read by this version, is the new one.
    new_native, old_native = (
        (folder / "native_config.json").read_text() for folder in (new_export, old_export)
    )
    assert cfg_from_json(new_native) == cfg_from_json(old_native)
    # The old export imports back to the old checkpoint's dictionary, computing the same.
    imported = load_sae_lens(copy("sae_lens_export", tmp_path))
    checkpoint = load_sae(tmp_path / "sae_final")
    for name, parameter in checkpoint.named_parameters():
        assert torch.equal(dict(imported.named_parameters())[name], parameter), name
    assert_computes_the_old_outputs(imported.eval(), "sae_final", expected)


def test_transcoder_set_loads_with_its_manifest_and_computes_what_it_did(tmp_path, expected):
    folder = copy("transcoder_set", tmp_path)
    manifest = read_manifest(folder)
    assert manifest["layers"] == [0, 1] and manifest["kind"] == "matryoshka"
    transcoders = load_transcoder_set(folder)
    assert sorted(transcoders) == [0, 1]
    for layer, transcoder in transcoders.items():
        assert type(transcoder).__name__ == "MatryoshkaTranscoder"
        assert transcoder.cfg["source_hook_point"] == f"blocks.{layer}.ln2.hook_normalized"
        assert_same_tensors(
            transcoder.state_dict(),
            load_file(folder / f"layer_{layer}" / WEIGHTS_FILE),
            f"layer {layer}",
        )
        assert_computes_the_old_outputs(transcoder, f"transcoder_set.layer_{layer}", expected)


def test_circuit_tracer_export_of_the_old_set_equals_the_old_export(tmp_path):
    old_export = FIXTURES / "circuit_tracer_export"
    new_export = export_circuit_tracer(
        copy("transcoder_set", tmp_path), tmp_path / "new_circuit_tracer_export"
    )
    assert sorted(p.name for p in new_export.iterdir()) == sorted(
        p.name for p in old_export.iterdir()
    )
    for layer in (0, 1):
        name = f"layer_{layer}.safetensors"
        assert_same_tensors(
            load_file(new_export / name), load_file(old_export / name), f"circuit-tracer {name}"
        )
    new_config, old_config = (
        (folder / "config.yaml").read_text() for folder in (new_export, old_export)
    )
    assert yaml.safe_load(new_config) == yaml.safe_load(old_config)
    assert new_config == old_config


@pytest.mark.parametrize("sparsity", ["global", "jumprelu"])
def test_cross_layer_transcoder_computes_what_it_did(sparsity, tmp_path, expected):
    clt = load_sae(copy(f"clt_{sparsity}", tmp_path))
    assert (
        type(clt).__name__ == "MatryoshkaCrossLayerTranscoder"
        and clt.cfg["clt_sparsity"] == sparsity
    )
    assert_same_tensors(
        clt.state_dict(), load_file(FIXTURES / f"clt_{sparsity}" / WEIGHTS_FILE), "load_sae"
    )
    assert_computes_the_old_outputs(clt, f"clt_{sparsity}", expected, clt=True)
    assert torch.equal(clt.inference_thresholds(), expected[f"clt_{sparsity}.inference_thresholds"])


def test_old_activation_cache_serves_the_same_batches(tmp_path, expected):
    cfg = cfg_from_json((FIXTURES / "cache_cfg.json").read_text())
    cfg["activation_cache"] = str(copy("activation_cache", tmp_path))
    store = CachedActivationsStore(cfg)
    assert torch.equal(store.get_eval_tokens(), expected["cache.eval_tokens"])
    n_batches = sum(key.startswith("cache.batch_") for key in expected)
    for i in range(n_batches):  # 5 batches an epoch: into the second epoch
        assert torch.equal(store.next_batch(), expected[f"cache.batch_{i}"]), f"batch {i}"
    resumed = CachedActivationsStore(cfg)  # from the position the old store saved after 3 batches
    resumed.load_state_dict(json.loads((FIXTURES / "cache_state.json").read_text()))
    for i in range(3, n_batches):
        assert torch.equal(resumed.next_batch(), expected[f"cache.batch_{i}"]), (
            f"batch {i} after the resume"
        )
