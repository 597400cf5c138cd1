"""trace_circuit.py's own computations, and the tracing protocol's figures on a tiny model.

Without circuit-tracer: the walk that measures how many feature nodes a path of an attribution graph
passes, where the logits' direct inputs come from (`logit_input_shares`), the refusal of a
dictionary that lacks layers, the null dictionaries' files (`write_null_export`) and the report's
table. In circuit-tracer's environment (tests/circuit_tracer_trace_check.py, one process): the
script's main on a tiny ReLU model, whose MLPs a transcoder set can reproduce almost exactly, with
its two nulls; the silent null's figures against what circuit-tracer's attribution implies,
derived here independently; the refusal of a set that lacks a layer. (The export's own checks in
circuit-tracer: tests/circuit_tracer_check.py, tests/circuit_tracer_clt_check.py.)
"""

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import yaml
from circuit_tracer_helpers import (
    needs_circuit_tracer,
    run_check,
    save_model,
    tiny_relu_gpt2,
    write_neuron_set,
    write_random_clt,
)
from helpers import needs_smollm2
from safetensors.torch import load_file, save_file

from matryoshka_sae.cli.trace_circuit import (
    PROTOCOL,
    at_threshold,
    clean_ce_loss,
    comparison_table,
    missing_layers_error,
    prompt_tokens,
    reused_nulls,
    reused_nulls_model_error,
    verdict,
)
from matryoshka_sae.graph_measures import logit_input_shares, walk_lengths
from matryoshka_sae.model_loading import load_model, masked_prompt_error
from matryoshka_sae.null_dictionaries import null_fingerprint, write_null_export


def graph(edges: dict[tuple[int, int], float], n_nodes: int) -> torch.Tensor:
    """adjacency [target, source] with the given (target, source) -> weight."""
    adjacency = torch.zeros(n_nodes, n_nodes)
    for (target, source), weight in edges.items():
        adjacency[target, source] = weight
    return adjacency


def test_a_chain_of_features_is_one_path_through_each():
    # nodes: features 0, 1, 2; token 3; logit 4. logit <- f2 <- f1 <- f0 <- token
    adjacency = graph({(4, 2): 1.0, (2, 1): -3.0, (1, 0): 0.5, (0, 3): 2.0}, 5)
    start = torch.tensor([0, 0, 0, 0, 1.0])
    lengths = walk_lengths(adjacency, 3, start)
    assert lengths["feature_nodes_per_path"] == pytest.approx(3.0)
    assert lengths["multi_hop_share"] == pytest.approx(1.0)
    assert lengths["feature_nodes_per_feature_path"] == pytest.approx(3.0)


def test_paths_are_weighted_by_their_share_of_absolute_edge_weight():
    # logit 4 reads the token directly (weight 1), feature 0 (weight -1) and feature 1 (weight 2);
    # feature 1 reads feature 0 (3) and the error node 2 (1); feature 0 reads the token 3.
    adjacency = graph(
        {(4, 3): 1.0, (4, 0): -1.0, (4, 1): 2.0, (1, 0): 3.0, (1, 2): 1.0, (0, 3): 1.0}, 5
    )
    start = torch.tensor([0, 0, 0, 0, 1.0])
    lengths = walk_lengths(adjacency, 2, start)
    # walks: direct 1/4 (0 features); via f0 1/4 (1); via f1: 2/4 x (3/4 -> f0 -> token: 2, 1/4 -> error: 1)
    expected = 0.25 * 0 + 0.25 * 1 + 0.5 * (0.75 * 2 + 0.25 * 1)
    assert lengths["feature_nodes_per_path"] == pytest.approx(expected)
    assert lengths["multi_hop_share"] == pytest.approx(0.5 * 0.75)
    # among the walks through a feature (weight 3/4): the same lengths over 3/4
    assert lengths["feature_nodes_per_feature_path"] == pytest.approx(expected / 0.75)
    assert lengths["multi_hop_share_of_feature_paths"] == pytest.approx(0.5 * 0.75 / 0.75)


def test_a_graph_without_feature_nodes_has_paths_of_none():
    adjacency = graph({(2, 0): 1.0, (2, 1): 1.0}, 3)  # logit 2 reads an error node and a token
    lengths = walk_lengths(adjacency, 0, torch.tensor([0, 0, 1.0]))
    assert lengths["feature_nodes_per_path"] == 0.0 and lengths["multi_hop_share"] == 0.0
    assert lengths["feature_nodes_per_feature_path"] == 0.0


# ---------------------------------------------------------------------------------------------
# Where the logits' direct inputs come from
# ---------------------------------------------------------------------------------------------

# A graph in circuit-tracer's node order: 2 features (0, 1); errors of 2 layers x 3 positions,
# layer-major (layer l, position p at 2 + 3 l + p: 2..7); tokens (8, 9, 10); logits (11, 12).
N_FEATURES, N_LAYERS, N_POS = 2, 2, 3


def error_node(layer: int, position: int) -> int:
    return N_FEATURES + layer * N_POS + position


def test_the_shares_of_the_logits_inputs_follow_circuit_tracers_node_order():
    adjacency = graph(
        {
            (11, 0): 2.0,  # logit 11 <- feature 0
            (11, error_node(1, 0)): 1.0,  # <- the error of layer 1 at position 0
            (11, error_node(1, 2)): -1.0,  # <- the error of layer 1 at position 2
            (11, 10): 4.0,  # <- the last token
            (12, 1): -3.0,  # logit 12 <- feature 1
            (12, 8): 1.0,  # <- the first token
            (1, 0): 100.0,  # an edge into a feature: not an input of a logit
        },
        13,
    )
    shares = logit_input_shares(adjacency, N_FEATURES, N_LAYERS, N_POS, torch.tensor([0.3, 0.1]))
    # logit 11 (weight 0.3 / 0.4): features 2/8, errors 1/8 + 1/8 at position 0, tokens 4/8;
    # logit 12 (weight 0.1 / 0.4): features 3/4, tokens 1/4.
    assert shares["feature_share"] == pytest.approx(0.75 * 2 / 8 + 0.25 * 3 / 4)
    assert shares["error_share"] == pytest.approx(0.75 * 1 / 8)
    assert shares["error_share_position_0"] == pytest.approx(0.75 * 1 / 8)
    assert shares["token_share"] == pytest.approx(0.75 * 4 / 8 + 0.25 * 1 / 4)
    assert sum(shares.values()) == pytest.approx(1.0)


def test_a_graph_without_features_gives_them_nothing_and_wrong_sizes_are_refused():
    adjacency = graph({(11, error_node(0, 1)): 3.0, (11, 9): 1.0}, 12)
    shares = logit_input_shares(adjacency, 2, N_LAYERS, N_POS, torch.tensor([0.5]))
    assert shares["feature_share"] == 0.0 and shares["error_share"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="leave 1 logits, not 2"):
        logit_input_shares(adjacency, 2, N_LAYERS, N_POS, torch.tensor([0.5, 0.5]))


def test_only_a_latent_at_its_threshold_may_fire_in_one_computation_and_not_the_other():
    """A latent 6e-7 below its threshold (met tracing a SmolLM2 set: circuit-tracer's folded
    encoder put it 1e-7 above) leaves its token out of the layer check; one far from it refuses."""
    pre = torch.tensor([[0.7121278, 0.1, 2.0], [0.3, 0.5, 0.0], [0.9, 0.7121290, 0.2]])
    threshold = torch.tensor(0.7121284)
    differ = torch.zeros(3, 3, dtype=torch.bool)
    differ[0, 0] = differ[2, 1] = True
    assert at_threshold(pre, threshold, differ, 1e-4).tolist() == [True, False, True]
    differ[1, 1] = True  # 0.5 is not near 0.712: a real difference
    assert at_threshold(pre, threshold, differ, 1e-4) is None
    assert at_threshold(pre, threshold, torch.zeros(3, 3, dtype=torch.bool), 1e-4).sum() == 0


def test_a_dictionary_that_lacks_layers_of_the_model_is_refused_with_the_fix():
    line = missing_layers_error(30, 2, "transcoder_set")
    assert "layers 0..29" in line and "lacks layers [2, 3," in line and "29]" in line
    assert "--layers all" in line and "\n" not in line
    assert "cross-layer transcoder lacks layers [1]" in missing_layers_error(
        2, 1, "cross_layer_transcoder"
    )
    assert "only 2" in missing_layers_error(2, 3, "transcoder_set")
    assert missing_layers_error(2, 2, "transcoder_set") is None


def test_a_model_that_masks_the_bos_of_a_prompt_is_refused_with_the_fix():
    model = tiny_relu_gpt2()
    model.cfg.default_prepend_bos = False  # as SmolLM2's: prompts bring their own BOS
    model.tokenizer = SimpleNamespace(padding_side="right", pad_token_id=1, bos_token_id=1)
    prompt = torch.tensor([1, 5, 7, 9, 11])
    assert masked_prompt_error(model, prompt) is None
    model.tokenizer.padding_side = "left"  # TransformerLens now masks the leading pad token: BOS
    line = masked_prompt_error(model, prompt)
    assert "pads on the left with pad token 1" in line and "padding_side = 'right'" in line
    assert "\n" not in line


@needs_smollm2
def test_circuit_tracers_environment_runs_the_library_environments_smollm2(tmp_path):
    """transformers 4 (circuit-tracer's pin) reads SmolLM2's GGUF tokenizer with left padding and
    eos <|im_start|>, which TransformerLens would turn into a mask over every prompt's BOS; the
    loader sets the published tokenizer, so both environments trace the same model."""
    needs_circuit_tracer()
    prompt = "def add(a, b):\n    return a + b"
    reported = run_check("smollm2_check.py", prompt, tmp_path / "theirs.pt")
    theirs = torch.load(tmp_path / "theirs.pt")
    model = load_model("smollm2-135m", "cpu", torch.float32)
    tokens = prompt_tokens(model, prompt)
    with torch.no_grad():
        logits = model(tokens[None])
    assert reported == {
        "padding_side": "right",
        "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>",
        "masked_prompt_error": None,
    }
    assert torch.equal(theirs["tokens"], tokens) and tokens[0] == model.tokenizer.bos_token_id
    assert (theirs["logits"] - logits).abs().max() < 1e-4


def test_the_report_sets_the_dictionary_beside_the_nulls():
    figures = {
        "mean_replacement_score": 0.5,
        "mean_completeness_score": 0.8,
        "mean_logit_input_error_share": 0.3,
        "mean_logit_input_token_share": 0.1,
        "mean_logit_input_error_share_position_0": 0.0,
        "mean_n_active_features": 100,
        "mean_n_selected_features": 50,
        "ce_loss_replaced": 3.0,
        "kl_divergence": 0.1,
    }
    blocks = {
        "dictionary": {**figures, "mean_logit_input_feature_share": 0.6},
        "null_silent": {**figures, "mean_logit_input_feature_share": 0.0},
        "null_random": {**figures, "mean_logit_input_feature_share": 0.7},
    }
    assert verdict(blocks) == {
        "feature_share_above_error_share": True,
        "feature_share_above_the_nulls": False,
    }
    table = comparison_table(blocks, "a title").splitlines()
    assert table[0] == "a title" and table[1].split() == list(blocks)
    assert table[4].split()[-3:] == ["0.600", "0.000", "0.700"]  # the feature shares


# ---------------------------------------------------------------------------------------------
# The null dictionaries' files
# ---------------------------------------------------------------------------------------------


def write_set_export(folder, n_layers=2, width=8, d=4, skip=True):
    """An exported transcoder set's folder with random tensors (the names and shapes export_sae.py
    writes)."""
    folder.mkdir()
    generator = torch.Generator().manual_seed(0)
    for layer in range(n_layers):
        tensors = {
            "W_enc": torch.randn(width, d, generator=generator),
            "b_enc": torch.randn(width, generator=generator),
            "W_dec": torch.randn(width, d, generator=generator),
            "b_dec": torch.randn(d, generator=generator),
            "activation_function.threshold": torch.rand(width, generator=generator),
        }
        if skip:
            tensors["W_skip"] = torch.randn(d, d, generator=generator)
        save_file(tensors, str(folder / f"layer_{layer}.safetensors"))
    config = {
        "model_kind": "transcoder_set",
        "model_name": "tiny",
        "feature_input_hook": "ln2.hook_normalized",
        "feature_output_hook": "hook_mlp_out",
        "scan": "tiny-set",
        "transcoders": [f"layer_{layer}.safetensors" for layer in range(n_layers)],
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return folder


def tensors_of(folder):
    return {path.name: load_file(str(path)) for path in sorted(folder.glob("*.safetensors"))}


def same_layout(null, exported) -> bool:
    return (null / "config.yaml").read_bytes() == (exported / "config.yaml").read_bytes() and all(
        ours.keys() == theirs.keys()
        and all(ours[k].shape == theirs[k].shape and ours[k].dtype == theirs[k].dtype for k in ours)
        for ours, theirs in zip(tensors_of(null).values(), tensors_of(exported).values())
    )


def test_the_silent_null_of_a_set_never_fires_and_writes_nothing(tmp_path):
    exported = write_set_export(tmp_path / "set")
    null = write_null_export(exported, "silent", tmp_path / "silent")
    assert same_layout(null, exported)
    assert json.loads((null / "null.json").read_text())["kind"] == "silent"
    x = 100 * torch.randn(50, 4)
    for tensors, trained in zip(tensors_of(null).values(), tensors_of(exported).values()):
        pre = F.linear(x, tensors["W_enc"], tensors["b_enc"])
        assert not (pre > tensors["activation_function.threshold"]).any()
        assert not any(tensors[k].any() for k in ("W_dec", "b_dec"))
        # The skip connection is not a feature: the null keeps the trained one.
        assert torch.equal(tensors["W_skip"], trained["W_skip"])


def test_the_random_null_fires_on_30_percent_of_the_sources_and_is_seeded(tmp_path):
    exported = write_set_export(tmp_path / "set")
    sources = [torch.randn(20, 4), 5 + 3 * torch.randn(20, 4)]  # [layer] of [N, d]
    null = write_null_export(exported, "random", tmp_path / "random", seed=1, sources=sources)
    assert same_layout(null, exported)
    trained = list(tensors_of(exported).values())
    for layer, tensors in enumerate(tensors_of(null).values()):
        pre = F.linear(sources[layer], tensors["W_enc"], tensors["b_enc"])
        fired = pre > tensors["activation_function.threshold"]
        assert (fired.sum(dim=0) == 6).all()  # round(0.3 x 20) tokens, every latent
        assert 0.005 < tensors["W_dec"].std() < 0.02 and not tensors["b_dec"].any()
        assert torch.equal(tensors["W_skip"], trained[layer]["W_skip"])
    again = write_null_export(exported, "random", tmp_path / "again", seed=1, sources=sources)
    other = write_null_export(exported, "random", tmp_path / "other", seed=2, sources=sources)
    assert all(
        torch.equal(a["W_dec"], b["W_dec"])
        for a, b in zip(tensors_of(null).values(), tensors_of(again).values())
    )
    assert not torch.equal(
        tensors_of(null)["layer_0.safetensors"]["W_dec"],
        tensors_of(other)["layer_0.safetensors"]["W_dec"],
    )
    with pytest.raises(ValueError, match="needs sources"):
        write_null_export(exported, "random", tmp_path / "none")
    with pytest.raises(FileExistsError):
        write_null_export(exported, "random", tmp_path / "random", seed=1, sources=sources)


def test_the_nulls_of_a_clt_keep_its_files(tmp_path):
    exported = write_random_clt(tmp_path / "clt", n_layers=3, d_model=4, width=8)
    silent = write_null_export(exported, "silent", tmp_path / "silent")
    assert same_layout(silent, exported)
    x = torch.randn(30, 4)
    for i in range(3):
        encoder = load_file(str(silent / f"W_enc_{i}.safetensors"))
        fired = (
            F.linear(x, encoder[f"W_enc_{i}"], encoder[f"b_enc_{i}"]) > encoder[f"threshold_{i}"]
        )
        # circuit-tracer cannot attribute a CLT with no active feature: latent 0 of layer 0 fires
        # everywhere, reading nothing and writing nothing.
        assert fired.sum() == (30 if i == 0 else 0) and fired[:, 0].all() == (i == 0)
        assert not load_file(str(silent / f"W_dec_{i}.safetensors"))[f"W_dec_{i}"].any()
    sources = [torch.randn(10, 4) for _ in range(3)]
    random = write_null_export(exported, "random", tmp_path / "random", sources=sources)
    assert same_layout(random, exported)
    encoder = load_file(str(random / "W_enc_2.safetensors"))
    fired = F.linear(sources[2], encoder["W_enc_2"], encoder["b_enc_2"]) > encoder["threshold_2"]
    assert (fired.sum(dim=0) == 3).all()


# ---------------------------------------------------------------------------------------------
# In circuit-tracer's environment: main on a tiny ReLU model, with the nulls
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def neuron_set_fvu(model, folder, tokens) -> float:
    """The FVU of the set in `folder` on `model`'s activations of `tokens` (positions after BOS)."""
    names = [f"blocks.{i}.{h}" for i in range(2) for h in ("ln2.hook_normalized", "hook_mlp_out")]
    _, cache = model.run_with_cache(tokens, names_filter=names)
    residual, total = 0.0, 0.0
    for layer in range(model.cfg.n_layers):
        t = load_file(str(folder / f"layer_{layer}.safetensors"))
        x = cache[f"blocks.{layer}.ln2.hook_normalized"][:, 1:]
        y = cache[f"blocks.{layer}.hook_mlp_out"][:, 1:]
        pre = F.linear(x, t["W_enc"], t["b_enc"])
        predicted = (pre * (pre > t["activation_function.threshold"])) @ t["W_dec"] + t["b_dec"]
        residual += (y - predicted).pow(2).sum().item()
        total += (y - y.mean(dim=(0, 1))).pow(2).sum().item()
    return residual / total


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    """tests/circuit_tracer_trace_check.py's results on the tiny ReLU model: a set whose latents
    are the MLPs' neurons (decoders perturbed by 10%), a random CLT; and the set's FVU."""
    needs_circuit_tracer()
    tmp = tmp_path_factory.mktemp("trace")
    model = tiny_relu_gpt2()
    model_file = save_model(model, tmp)
    neurons = write_neuron_set(model, tmp / "set", noise=0.1)
    clt = write_random_clt(tmp / "clt", n_layers=2, d_model=64, width=32)
    result = run_check("circuit_tracer_trace_check.py", model_file, neurons, clt, tmp / "work")
    result["fvu"] = neuron_set_fvu(model, neurons, torch.load(model_file)["tokens"])
    result["work"] = tmp / "work"
    return result


def test_the_silent_null_scores_what_circuit_tracers_attribution_implies(traced):
    silent = traced["silent_null"]
    assert silent["tokens_are_the_prompt"]  # BOS first, then the prompt's words
    measured, derived = silent["measured"], silent["derived"]
    assert measured["feature_share"] == 0.0 and measured["error_share_position_0"] == 0.0
    assert measured["error_share"] == pytest.approx(derived["error_share"], rel=1e-5)
    assert measured["token_share"] == pytest.approx(derived["token_share"], rel=1e-5)
    # With no feature node, influence takes one step from the logits to the (source) error and
    # token nodes: circuit-tracer's replacement score is the token share, and its completeness
    # score counts the sources' empty rows as complete: (1 + token share) / 2.
    (row,) = traced["set"]["report"]["null_silent"]["graphs"]
    assert row["replacement_score"] == pytest.approx(measured["token_share"], rel=1e-5)
    assert row["completeness_score"] == pytest.approx((1 + measured["token_share"]) / 2, rel=1e-5)


def test_a_skip_sets_silent_null_keeps_the_skip_and_scores_what_that_implies(traced):
    report = traced["skip_set"]["report"]
    assert report["skip"] is True and "kept_weights_sha256" in report["null_fingerprint"]
    measured, derived = (traced["skip_silent_null"][k] for k in ("measured", "derived"))
    assert measured["feature_share"] == 0.0
    assert measured["error_share"] == pytest.approx(derived["error_share"], rel=1e-4)
    assert measured["token_share"] == pytest.approx(derived["token_share"], rel=1e-4)
    # The skip connection, fitted to the MLPs, takes over part of what the plain set's silent null
    # leaves to its error nodes.
    plain = traced["silent_null"]["measured"]["error_share"]
    assert measured["error_share"] < plain
    assert report["null_silent"]["mean_logit_input_error_share"] == pytest.approx(
        measured["error_share"], rel=1e-6
    )


def test_a_set_that_reproduces_the_mlps_beats_the_errors_and_both_nulls(traced):
    assert traced["fvu"] < 0.05
    report = traced["set"]["report"]
    assert report["protocol"]["is_default"] and report["skip"] is False
    assert {k: report["protocol"][k] for k in PROTOCOL} == PROTOCOL
    shares = {
        label: {
            key: report[label][f"mean_logit_input_{key}"]
            for key in ("feature_share", "error_share", "token_share")
        }
        for label in ("dictionary", "null_silent", "null_random")
    }
    assert shares["dictionary"]["feature_share"] > 0.8 > 0.05 > shares["dictionary"]["error_share"]
    assert shares["null_silent"]["feature_share"] == 0.0
    assert shares["dictionary"]["feature_share"] > shares["null_random"]["feature_share"] > 0
    assert report["verdict"] == {
        "feature_share_above_error_share": True,
        "feature_share_above_the_nulls": True,
    }
    # The random null's 64 latents a layer fire on round(0.3 x 11) of the prompt's 11 tokens.
    assert report["null_random"]["mean_n_active_features"] == 64 * 2 * 3
    assert report["graphs"] == report["dictionary"]["graphs"]  # also where earlier readers look
    # each graph's figures are saved beside it as soon as it is traced (kept if a run stops)
    (row,) = report["graphs"]
    saved = json.loads((traced["work"] / "set" / "graphs" / f"{row['slug']}.json").read_text())
    assert saved == row
    assert (
        "null_silent" in traced["set"]["printed"]
        and "above both nulls'" in traced["set"]["printed"]
    )


def test_a_clt_and_its_nulls_are_traced_alike(traced):
    report = traced["clt"]["report"]
    assert report["model_kind"] == "cross_layer_transcoder" and report["skip"] is False
    silent = report["null_silent"]
    assert silent["mean_logit_input_feature_share"] == 0.0
    # A null that writes nothing is the same replacement whatever it replaces: the set's and the
    # CLT's silent nulls have the same figures.
    assert silent["mean_logit_input_error_share"] == pytest.approx(
        traced["set"]["report"]["null_silent"]["mean_logit_input_error_share"], rel=1e-5
    )
    assert report["null_random"]["mean_logit_input_feature_share"] > 0


def test_trace_refuses_a_set_that_lacks_a_layer_of_the_model(traced):
    assert traced["refusal"].startswith("trace_circuit.py: error: the model has layers 0..1")
    assert "lacks layers [1]" in traced["refusal"] and "--layers all" in traced["refusal"]


# ---------------------------------------------------------------------------------------------
# Nulls taken from an earlier report (--nulls-from)
# ---------------------------------------------------------------------------------------------


def earlier_report(path, fingerprint: dict) -> dict:
    """A trace_results.json as main writes it, its nulls' blocks marked to be told apart."""
    report = {
        "null_fingerprint": fingerprint,
        "null_silent": {"mean_logit_input_feature_share": 0.0, "mark": "silent"},
        "null_random": {"mean_logit_input_feature_share": 0.02, "mark": "random"},
    }
    path.write_text(json.dumps(report))
    return report


def test_nulls_are_reused_only_from_a_report_traced_under_the_same_nulls(tmp_path):
    exported = write_random_clt(tmp_path / "clt", n_layers=3, d_model=4, width=8)
    prompts, seed = ["a b c", "d e"], 0
    fingerprint = null_fingerprint(exported, prompts, PROTOCOL, seed)
    report = earlier_report(tmp_path / "earlier.json", fingerprint)
    assert reused_nulls(tmp_path / "earlier.json", fingerprint) == {
        "null_silent": report["null_silent"],
        "null_random": report["null_random"],
    }
    # The trained weights and the viewer's scan do not enter: another budget of the same run.
    config = yaml.safe_load((exported / "config.yaml").read_text())
    (exported / "config.yaml").write_text(yaml.safe_dump({**config, "scan": "elsewhere"}))
    retrained = {"W_enc_0": torch.randn(8, 4), "b_enc_0": torch.randn(8)}
    save_file(
        {**load_file(str(exported / "W_enc_0.safetensors")), **retrained},
        str(exported / "W_enc_0.safetensors"),
    )
    assert null_fingerprint(exported, prompts, PROTOCOL, seed) == fingerprint
    wider = write_random_clt(tmp_path / "wider", n_layers=3, d_model=4, width=16)
    changes = {
        "prompts": null_fingerprint(exported, prompts[:1], PROTOCOL, seed),
        "protocol": null_fingerprint(
            exported, prompts, {**PROTOCOL, "max_feature_nodes": 256}, seed
        ),
        "null_seed": null_fingerprint(exported, prompts, PROTOCOL, 1),
        "tensors": null_fingerprint(wider, prompts, PROTOCOL, seed),
    }
    for differing, other in changes.items():
        with pytest.raises(SystemExit) as refused:
            reused_nulls(tmp_path / "earlier.json", other)
        message = str(refused.value.code)
        assert message.startswith("trace_circuit.py: error: --nulls-from ") and "\n" not in message
        assert f"another {differing};" in message and "leave --nulls-from out" in message
    del report["null_fingerprint"]
    (tmp_path / "old.json").write_text(json.dumps(report))
    for missing in ("old.json", "absent.json"):
        with pytest.raises(SystemExit, match="trace the nulls again"):
            reused_nulls(tmp_path / missing, fingerprint)


def test_a_skip_sets_nulls_are_reused_only_with_the_same_skip_weights(tmp_path):
    prompts = ["a b c"]
    plain = null_fingerprint(write_set_export(tmp_path / "plain", skip=False), prompts, PROTOCOL, 0)
    assert "kept_weights_sha256" not in plain  # as in the reports of earlier plain traces
    exported = write_set_export(tmp_path / "skip")
    fingerprint = null_fingerprint(exported, prompts, PROTOCOL, 0)
    earlier_report(tmp_path / "earlier.json", fingerprint)
    layer_0 = load_file(str(exported / "layer_0.safetensors"))
    save_file({**layer_0, "W_enc": torch.randn(8, 4)}, str(exported / "layer_0.safetensors"))
    assert null_fingerprint(exported, prompts, PROTOCOL, 0) == fingerprint  # a feature's weights
    save_file({**layer_0, "W_skip": torch.randn(4, 4)}, str(exported / "layer_0.safetensors"))
    retrained = null_fingerprint(exported, prompts, PROTOCOL, 0)
    with pytest.raises(SystemExit, match="another kept_weights_sha256; trace the nulls again"):
        reused_nulls(tmp_path / "earlier.json", retrained)


def test_nulls_traced_on_another_model_are_refused():
    model = tiny_relu_gpt2()
    tokens = [torch.tensor([0, 5, 9, 2, 7]), torch.tensor([0, 3, 3])]
    clean = clean_ce_loss(model, tokens)
    log_probs = model(tokens[1][None])[0, :-1].log_softmax(-1)
    # 4 + 2 predicted positions; the second prompt's two by hand
    by_hand = -log_probs.gather(-1, tokens[1][1:, None]).sum().item()
    assert clean * 6 == pytest.approx(clean_ce_loss(model, tokens[:1]) * 4 + by_hand, rel=1e-5)
    nulls = {"null_silent": {"ce_loss_clean": clean}}
    assert reused_nulls_model_error("e.json", nulls, model, tokens) is None
    nulls["null_silent"]["ce_loss_clean"] = clean + 0.01
    message = reused_nulls_model_error("e.json", nulls, model, tokens)
    assert message.startswith("--nulls-from e.json: its nulls were traced on another model")
    assert message.endswith("leave --nulls-from out)") and "\n" not in message


def test_a_second_trace_takes_the_nulls_from_the_first(traced):
    reused = traced["nulls_reused"]
    assert reused["same_nulls"] and reused["nulls_from"].endswith("trace_results.json")
    assert not reused["nulls_folder_written"]  # nothing traced again
