"""A transcoder set's feature statistics in one pass, its browser, and circuit-tracer's viewer files.

The viewer files are validated by circuit-tracer's own pydantic models and Cantor pairing, in its
environment (.ct-venv, made by setup_circuit_tracer_env.sh); without it those tests are skipped,
unless REQUIRE_CIRCUIT_TRACER=1 (then they fail).
"""

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import (
    assert_rendered_without_errors,
    needs_chromium,
    rendered_dom,
    tiny_cfg,
    token_dataset,
)

from matryoshka_sae.activation_store import MultiHookActivationsStore
from matryoshka_sae.checkpoint import save_checkpoint
from matryoshka_sae.circuit_tracer_features import (
    HISTOGRAM_BINS,
    N_QUANTILE_VALUES,
    VIEWER_MANIFEST,
    cantor_pairing,
    viewer_scan,
    write_viewer_features,
)
from matryoshka_sae.feature_browser import write_set_browser
from matryoshka_sae.feature_statistics import (
    HISTOGRAM_BINS_PER_DECADE,
    HISTOGRAM_LOW_DECADE,
    collect_feature_statistics,
    collect_set_statistics,
)
from matryoshka_sae.sae import create_sae
from matryoshka_sae.transcoder_activation_store import TranscoderActivationsStore
from matryoshka_sae.transcoder_set import transcoder_set_cfgs, write_manifest

ROOT = Path(__file__).resolve().parents[1]
CT_PYTHON = ROOT / ".ct-venv" / "bin" / "python"
REQUIRED = os.environ.get("REQUIRE_CIRCUIT_TRACER") == "1"
needs_circuit_tracer = pytest.mark.skipif(
    not CT_PYTHON.exists() and not REQUIRED,
    reason="circuit-tracer's environment .ct-venv is absent (bash setup_circuit_tracer_env.sh makes it)",
)
LAYERS = [0, 1]
TOP_N, CONTEXT = 5, 3


def set_cfgs(folder):
    return transcoder_set_cfgs(tiny_cfg(dict_size=64, layer=0), LAYERS, folder)


def with_data(cfg):
    """A saved cfg with its in-memory dataset back (config.json records it as "<Dataset>")."""
    return {**cfg, "dataset_path": token_dataset()}


@pytest.fixture(scope="module")
def transcoder_set(tiny_gpt2, tmp_path_factory):
    """A 2-layer set of random transcoders (thresholds from one batch) saved in transcoder_set.py's layout."""
    folder = tmp_path_factory.mktemp("sets") / "tiny_set"
    cfgs = set_cfgs(folder)
    store = MultiHookActivationsStore(tiny_gpt2, cfgs)
    batch = store.next_batch()
    for cfg in cfgs:
        transcoder = create_sae(cfg)
        transcoder(batch[cfg["source_hook_point"]], batch[cfg["target_hook_point"]])
        save_checkpoint(folder / cfg["name"], transcoder, cfg)
    write_manifest(folder, cfgs, "matryoshka")
    return folder


@pytest.fixture(scope="module")
def set_statistics(transcoder_set, tiny_gpt2):
    return collect_set_statistics(
        transcoder_set, with_data, model=tiny_gpt2, top_n=TOP_N, context=CONTEXT
    )


def counting_forward_passes(model, monkeypatch) -> list:
    calls = []
    original = model.run_with_cache

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "run_with_cache", counted)
    return calls


# ---------------------------------------------------------------------------------------------
# One pass for every layer
# ---------------------------------------------------------------------------------------------


def test_set_statistics_take_one_pass_and_equal_each_layer_collected_alone(
    transcoder_set, tiny_gpt2, monkeypatch
):
    from matryoshka_sae.checkpoint import load_sae

    calls = counting_forward_passes(tiny_gpt2, monkeypatch)
    together = collect_set_statistics(
        transcoder_set, with_data, model=tiny_gpt2, top_n=TOP_N, context=CONTEXT
    )
    cfgs = set_cfgs(transcoder_set)
    n_chunks = math.ceil(cfgs[0]["n_eval_rows"] / cfgs[0]["model_batch_size"])
    buffer_chunks = len(calls) - n_chunks  # the store's first training block
    assert sorted(together) == LAYERS and 0 < buffer_chunks
    for layer, cfg in zip(LAYERS, cfgs):
        calls.clear()
        alone = collect_feature_statistics(
            load_sae(transcoder_set / f"layer_{layer}"),
            TranscoderActivationsStore(tiny_gpt2, {**cfg, "num_batches_in_buffer": 1}),
            top_n=TOP_N,
            context=CONTEXT,
        )
        assert len(calls) == n_chunks + buffer_chunks  # the set's pass costs what one layer's does
        assert together[layer].data["latents"] == alone.data["latents"]
        assert together[layer].data["n_tokens"] == alone.data["n_tokens"] > 0
        assert together[layer].data["source"]["source_hook_point"] == cfg["source_hook_point"]
    fired = [
        sum(latent["fire_count"] > 0 for latent in together[layer].data["latents"])
        for layer in LAYERS
    ]
    assert min(fired) > 10
    assert together[0].data["latents"] != together[1].data["latents"]


# ---------------------------------------------------------------------------------------------
# The viewer's files
# ---------------------------------------------------------------------------------------------


def brute_force_firings(transcoder_set, tiny_gpt2, layer):
    """Every firing activation of layer `layer`'s latents on the held-out rows: {latent: sorted values}."""
    from matryoshka_sae.checkpoint import load_sae

    cfg = {**set_cfgs(transcoder_set)[layer], "num_batches_in_buffer": 1}
    store = TranscoderActivationsStore(tiny_gpt2, cfg)
    with torch.no_grad():
        code = load_sae(transcoder_set / f"layer_{layer}").encode(
            store.activations_of(store.get_eval_tokens())[0]
        )
    return {i: code[:, i][code[:, i] > 0].sort().values.double() for i in range(code.shape[1])}


def test_viewer_fields_follow_the_statistics(set_statistics, transcoder_set, tiny_gpt2, tmp_path):
    scan = write_viewer_features(set_statistics, tmp_path, "tiny")
    folder = tmp_path / "features" / "tiny"
    assert scan == viewer_scan("tiny") == "./data/features/tiny"
    stats = set_statistics[1]
    firings = brute_force_firings(transcoder_set, tiny_gpt2, 1)
    checked = 0
    for i, latent in enumerate(stats.data["latents"]):
        feature = json.loads((folder / f"{cantor_pairing(1, i)}.json").read_text())
        assert feature["index"] == i and feature["activation_frequency"] == latent["density"]
        assert feature["act_max"] == latent["max_activation"] and feature["act_min"] == 0
        assert feature["top_logits"] == [stats.token_text(t) for t, _ in latent["logits_up"]]
        values = firings[i]
        if len(values) == 0:
            assert (
                feature["histogram"] == []
                and feature["quantile_values"] == []
                and feature["examples_quantiles"] == []
            )
            continue
        # percentiles and the equal-width histogram: exact up to the spread inside one log bin
        quantiles = torch.tensor(feature["quantile_values"], dtype=torch.float64)
        assert len(quantiles) == N_QUANTILE_VALUES and (quantiles.diff() >= 0).all()
        assert quantiles[-1] == pytest.approx(values[-1].item(), rel=1e-3)
        for p in (10, 50, 90):
            true = values[math.ceil(p / 100 * len(values)) - 1].item()
            assert (
                abs(math.log10(quantiles[p - 1].item() / true)) <= 1.01 / HISTOGRAM_BINS_PER_DECADE
            )
        histogram = torch.tensor(feature["histogram"], dtype=torch.float64)
        assert len(histogram) == HISTOGRAM_BINS and histogram.sum().item() == pytest.approx(
            len(values), rel=1e-3
        )
        edges = torch.linspace(0, values[-1].item(), HISTOGRAM_BINS + 1, dtype=torch.float64)[1:-1]
        log_bin = ((values.log10() - HISTOGRAM_LOW_DECADE) * HISTOGRAM_BINS_PER_DECADE).floor()
        for edge, below in zip(edges, histogram.cumsum(0)[:-1]):
            edge_bin = math.floor(
                (math.log10(edge) - HISTOGRAM_LOW_DECADE) * HISTOGRAM_BINS_PER_DECADE
            )
            spread = int(
                (log_bin == edge_bin).sum()
            )  # firings whose place inside the bin is unknown
            assert abs(below.item() - int((values < edge).sum())) <= spread + 1e-3 * len(values)
        # the examples: top contexts first, the marked token being the one with the activation
        top = feature["examples_quantiles"][0]
        assert top["quantile_name"] == "Top activations" and len(top["examples"]) == len(
            latent["top_contexts"]
        )
        for example, context in zip(top["examples"], latent["top_contexts"]):
            assert example["tokens"] == [stats.token_text(t) for t in context["tokens"]]
            assert example["tokens_acts_list"][example["train_token_ind"]] == context["activation"]
        randoms = [e for section in feature["examples_quantiles"][1:] for e in section["examples"]]
        assert len(randoms) == len(latent["random_contexts"])
        checked += 1
    assert checked > 10
    manifest = json.loads((folder / VIEWER_MANIFEST).read_text())
    assert manifest["scan"] == scan and sorted(manifest["layers"]) == ["0", "1"]


def test_viewer_files_of_chosen_features_only(set_statistics, tmp_path):
    write_viewer_features(set_statistics, tmp_path, "some", features=[(0, 3), (1, 5)])
    names = {path.name for path in (tmp_path / "features" / "some").iterdir()}
    assert names == {
        f"{cantor_pairing(0, 3)}.json",
        f"{cantor_pairing(1, 5)}.json",
        VIEWER_MANIFEST,
    }
    with pytest.raises(ValueError, match="letters, digits"):
        write_viewer_features(set_statistics, tmp_path, "../elsewhere")


CT_CHECK = r"""
import json, sys
from pathlib import Path
from circuit_tracer.frontend.feature_models import Model
from circuit_tracer.frontend.graph_models import Node, _cantor_pairing

folder = Path(sys.argv[1])
manifest = json.loads((folder / "viewer_features.json").read_text())
expected = {}
for layer, info in manifest["layers"].items():
    for i in range(info["n_latents"]):
        node = Node.feature_node(int(layer), 3, i)  # circuit-tracer's own feature node
        assert node.feature == _cantor_pairing(int(layer), i)
        expected[f"{node.feature}.json"] = (int(layer), i)
files = sorted(p.name for p in folder.iterdir() if p.name != "viewer_features.json")
assert sorted(expected) == files, (len(expected), len(files))
for name in files:
    feature = Model.model_validate_json((folder / name).read_text())
    layer, i = expected[name]
    assert feature.index == i and feature.transcoder_id.endswith(f"layer_{layer}"), name
print("validated", len(files))
"""


@needs_circuit_tracer
def test_viewer_files_validate_against_circuit_tracer_models_and_cantor_index(
    set_statistics, tmp_path
):
    assert CT_PYTHON.exists(), (
        "REQUIRE_CIRCUIT_TRACER=1 but .ct-venv is absent: bash setup_circuit_tracer_env.sh"
    )
    write_viewer_features(set_statistics, tmp_path, "tiny")
    result = subprocess.run(
        [str(CT_PYTHON), "-c", CT_CHECK, str(tmp_path / "features" / "tiny")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    n_latents = sum(len(stats.data["latents"]) for stats in set_statistics.values())
    assert result.stdout.split() == ["validated", str(n_latents)]


# ---------------------------------------------------------------------------------------------
# The set's browser and the script
# ---------------------------------------------------------------------------------------------


@needs_chromium
def test_set_browser_index_and_layer_pages_render(set_statistics, tmp_path):
    index = write_set_browser(set_statistics, tmp_path / "browser")
    dom = rendered_dom(index, "", tmp_path)
    assert_rendered_without_errors(dom)
    for layer in LAYERS:
        assert (
            f'<tr data-layer="{layer}">' in dom
            and f'href="layer_{layer}/feature_browser.html"' in dom
        )
    page = tmp_path / "browser" / "layer_1" / "feature_browser.html"
    dom = rendered_dom(page, "latent-0", tmp_path)
    assert_rendered_without_errors(dom)
    assert '<select id="layer-select">' in dom and 'href="../index.html"' in dom
    assert '<option value="../layer_0/feature_browser.html">layer 0</option>' in dom
    assert '<option value="../layer_1/feature_browser.html" selected="">layer 1</option>' in dom
    summary = dom[dom.index('<div id="summary">') :]
    assert summary.startswith(
        '<div id="summary">synthetic \u00b7 blocks.1.ln2.hook_normalized \u2192 blocks.1.hook_mlp_out'
    )


def test_single_dictionary_page_has_no_layer_selector(set_statistics, tmp_path):
    from matryoshka_sae.feature_browser import write_feature_browser

    page = write_feature_browser(set_statistics[0], tmp_path / "one").read_text()
    assert '<script type="application/json" id="set-navigation">null</script>' in page


def test_script_writes_the_set_browser_and_the_viewer_files(
    transcoder_set, tiny_gpt2, tmp_path, monkeypatch, capsys
):
    from matryoshka_sae.cli import inspect_transcoder_set

    monkeypatch.setattr(
        "matryoshka_sae.model_loading.load_model", lambda *args, **kwargs: tiny_gpt2
    )
    monkeypatch.setattr(
        "matryoshka_sae.model_loading.check_model_available", lambda name: None
    )  # "synthetic" stands in
    data = tmp_path / "held_out.jsonl"
    data.write_text(
        "".join(json.dumps({"tokens": row}) + "\n" for row in token_dataset(50, seed=5)["tokens"])
    )
    calls = counting_forward_passes(tiny_gpt2, monkeypatch)
    index = inspect_transcoder_set.main(
        [
            str(transcoder_set),
            "--out",
            str(tmp_path / "browser"),
            "--top-n",
            "3",
            "--dataset",
            str(data),
            "--num-tokens",
            "320",
            "--viewer-features",
            str(tmp_path / "data"),
            "--viewer-name",
            "tiny-set",
        ]
    )
    assert index == tmp_path / "browser" / "index.html" and index.exists()
    assert all(
        (tmp_path / "browser" / f"layer_{layer}" / "feature_statistics.json").exists()
        for layer in LAYERS
    )
    out = capsys.readouterr().out
    assert "scan './data/features/tiny-set'" in out
    n_files = len(list((tmp_path / "data" / "features" / "tiny-set").glob("*.json")))
    assert n_files == 2 * 64 + 1
    stats = json.loads((tmp_path / "browser" / "layer_0" / "feature_statistics.json").read_text())
    assert stats["n_rows"] == 10
    assert (
        len(calls) <= 2 + 8
    )  # 10 rows in chunks of 8, and the store's first block: not one pass per layer


def test_script_refuses_bad_input_before_any_work(transcoder_set, tmp_path, monkeypatch, capsys):
    from matryoshka_sae.cli import inspect_transcoder_set

    monkeypatch.setattr(
        "matryoshka_sae.model_loading.check_model_available", lambda name: None
    )  # "synthetic" stands in
    monkeypatch.setattr(
        "matryoshka_sae.model_loading.load_model",
        lambda *args, **kwargs: pytest.fail("loaded the model"),
    )
    for argv, message in [
        ([str(tmp_path)], "is not a transcoder set"),
        (
            [str(transcoder_set), "--viewer-features", str(tmp_path), "--viewer-name", "a b"],
            "letters, digits",
        ),
        ([str(transcoder_set), "--out", str(transcoder_set)], "holds other files"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            inspect_transcoder_set.main(argv)
        assert exit_.value.code == 2
        error = capsys.readouterr().err
        assert message in error and error.count("\n") == 1


def test_inspect_sae_points_a_set_folder_to_the_set_script(transcoder_set, capsys):
    from matryoshka_sae.cli import inspect_sae

    with pytest.raises(SystemExit) as exit_:
        inspect_sae.main([str(transcoder_set)])
    assert exit_.value.code == 2
    assert f"python inspect_transcoder_set.py {transcoder_set}" in capsys.readouterr().err
