"""Trace attribution graphs with circuit-tracer through a transcoder set or a cross-layer
transcoder trained here, offline, under one fixed protocol, beside two null dictionaries.

Runs in circuit-tracer's own environment (``bash setup_circuit_tracer_env.sh`` makes .ct-venv):

    .ct-venv/bin/python trace_circuit.py EXPORTED_FOLDER --from SET_OR_CLT_FOLDER --out traces/run1

EXPORTED_FOLDER is what ``export_sae.py SET_FOLDER OUT --format circuit-tracer`` (a set) or
``train_clt.py export CHECKPOINT OUT`` (a CLT) wrote. The script

1. loads the model with this library's loader (SmolLM2 from its wheel, no hub) and the exported
   folder with circuit-tracer's own loader (circuit_tracer_format.load_in_circuit_tracer), and
   refuses a dictionary that lacks layers of the model, and a model that does not attend to
   every token of a prompt (`model_loading.masked_prompt_error`: a tokenizer padding on the left
   whose pad token is the BOS makes TransformerLens mask it);
2. checks, layer by layer, that circuit-tracer's transcoders compute what ours (--from: the set
   folder or the CLT's checkpoint) compute on the model's activations of the prompts (float32
   rounding: the relative error is printed and must stay below --tolerance; a set's tokens where a
   latent within rounding of its threshold fires in one and not the other are left out and
   counted, `at_threshold`);
3. builds circuit-tracer's replacement model from the same weights
   (``TransformerLensReplacementModel.from_config``) and checks its logits equal the model's;
4. runs ``circuit_tracer.attribute`` on each prompt under the protocol (`PROTOCOL`: BOS first, the
   last position's logits, fixed feature-node budget, logit settings and batch size), saves the
   graph (``graphs/<slug>.pt``, its figures in ``graphs/<slug>.json`` as soon as it is traced, so
   an interrupted run keeps them) and the viewer's files (``graph_files/``), and reports per graph:
   circuit-tracer's replacement and completeness scores (``compute_graph_scores``); where the
   logits' direct inputs come from (`graph_measures.logit_input_shares`: feature nodes, error nodes after
   position 0, tokens, error nodes at position 0); the share of the logits' influence that flows
   through error nodes; the mean path length of the pruned graph (`mean_path_length`); the seconds
   of each of circuit-tracer's phases;
5. reports the replacement model's CE loss and KL divergence against the original model, with
   every MLP output replaced by circuit-tracer's transcoders at once, on the prompts;
6. unless --no-nulls, does 4 and 5 again for two null dictionaries written beside the exported one
   (null_dictionaries.write_null_export, into ``<out>/nulls/``): one that never fires and one
   of random latents firing on 30% of the prompts' tokens, and prints the three side by side.
   A skip transcoder's nulls keep its trained skip connection (not a node: see
   null_dictionaries). The nulls depend only on the exported folder's layout (config and
   tensor shapes), the skip weights, the prompts, the protocol, the null seed and the model, so
   ``--nulls-from EARLIER/trace_results.json`` takes them from an earlier report that matches on
   all of these (another budget of the same plain run, say) instead of tracing them again; one
   that does not match is refused before the model loads (the model: as soon as it has loaded,
   by its CE loss on the prompts).

Everything printed is also in ``<out>/trace_results.json``: the traced dictionary's per-prompt rows
(``graphs``) and means (``mean_*``) at the top level and under ``dictionary``, the nulls' under
``null_silent`` and ``null_random``, the protocol, whether the transcoders have skip connections
(``skip``), the comparison's ``verdict`` and the process's peak resident memory. How to read the
figures: docs/transcoder_sets.md, "The tracing protocol". To browse the graphs:
``.ct-venv/bin/python -c "from circuit_tracer.frontend.local_server import serve; serve('<out>/graph_files')"``.
What a prompt costs grows with the decoder vectors of its active features (one per feature for a
set; L - j for a CLT feature of layer j): each backward batch contracts every one of them with the
gradient at its output layer (docs/cross_layer_transcoders.md, "Tracing").
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import resource
import sys
import time
from pathlib import Path

import torch

from matryoshka_sae.graph_measures import (
    decoder_vectors,
    error_influence_share,
    graph_logit_input_shares,
    mean_path_length,
)

DEFAULT_PROMPTS = [
    "The function returns a list of all the keys in the",
    "To open a file for reading, call open() with the mode",
    "A tuple is like a list, except that it cannot be",
]

# The tracing protocol (docs/transcoder_sets.md, "The tracing protocol"): every prompt starts with
# BOS; circuit-tracer attributes the logits of the last position; at most `max_feature_nodes` feature
# nodes, chosen by circuit-tracer's influence ranking, which re-ranks every 4 batches of
# `batch_size` (so the batch size is part of the selection); the logit nodes are the most probable
# tokens until their probabilities add up to `desired_logit_prob`, at most `max_n_logits`.
PROTOCOL = {
    "max_feature_nodes": 2048,
    "batch_size": 64,
    "max_n_logits": 10,
    "desired_logit_prob": 0.95,
}
NULL_SEED = 0

# The figures averaged over the prompts, for the dictionary and each null.
MEAN_FIGURES = (
    "replacement_score",
    "completeness_score",
    "logit_input_feature_share",
    "logit_input_error_share",
    "logit_input_token_share",
    "logit_input_error_share_position_0",
    "error_influence_share",
    "feature_nodes_per_path",
    "multi_hop_share",
    "feature_nodes_per_feature_path",
    "multi_hop_share_of_feature_paths",
    "n_active_features",
    "n_selected_features",
    "seconds",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("exported", help="folder written by export_sae.py --format circuit-tracer")
    parser.add_argument(
        "--from",
        "--set",
        dest="ours",
        metavar="FOLDER",
        help="the transcoder set folder or "
        "the CLT checkpoint it was exported from: checks that circuit-tracer computes what it computes",
    )
    parser.add_argument(
        "--out", required=True, help="folder for graphs, viewer files and trace_results.json"
    )
    parser.add_argument(
        "--prompt",
        action="append",
        dest="prompts",
        help="a prompt (repeatable); default: three Python-documentation completions",
    )
    protocol = parser.add_argument_group(
        "protocol", "the tracing protocol's settings; change them only to study the protocol itself"
    )
    protocol.add_argument(
        "--max-feature-nodes",
        type=int,
        default=PROTOCOL["max_feature_nodes"],
        help="feature nodes in each graph (circuit-tracer keeps the most influential)",
    )
    protocol.add_argument(
        "--batch-size",
        type=int,
        default=PROTOCOL["batch_size"],
        help="attribution batch size (circuit-tracer re-ranks the features every 4 batches)",
    )
    protocol.add_argument(
        "--max-n-logits", type=int, default=PROTOCOL["max_n_logits"], help="logit nodes, at most"
    )
    protocol.add_argument(
        "--desired-logit-prob",
        type=float,
        default=PROTOCOL["desired_logit_prob"],
        help="logit nodes until their probabilities add up to this",
    )
    parser.add_argument(
        "--nulls",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also trace the silent and the random null dictionary (default: on)",
    )
    parser.add_argument(
        "--null-seed", type=int, default=NULL_SEED, help="seed of the random null's weights"
    )
    parser.add_argument(
        "--nulls-from",
        metavar="TRACE_RESULTS_JSON",
        help="take the nulls' figures from an earlier trace_results.json traced under the same "
        "nulls (same layout, prompts, protocol and seed) instead of tracing them again",
    )
    parser.add_argument(
        "--scan",
        help="where the viewer finds feature pages: the scan that "
        "inspect_transcoder_set.py SET --viewer-features OUT/graph_files prints "
        "('./data/features/<name>'); default: the exported config's scan",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=1e-4,
        help="largest relative difference allowed between circuit-tracer's and our outputs; "
        "a token where a latent within this (relative) distance of its threshold fires in one and "
        "not the other is left out of the comparison",
    )
    parser.add_argument(
        "--node-threshold",
        type=float,
        default=0.8,
        help="pruning for the path length: keep the nodes holding this share of the influence",
    )
    parser.add_argument(
        "--edge-threshold", type=float, default=0.98, help="pruning: the same for edges"
    )
    parser.add_argument("--device", default="cpu")
    return parser


def prompt_tokens(model, prompt: str) -> torch.Tensor:
    """[1 + n] token ids: BOS, then the prompt (SmolLM2's tokenizer adds no BOS of its own)."""
    ids = model.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return torch.tensor([model.tokenizer.bos_token_id, *ids])


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).norm() / ours.norm().clamp(min=1e-12)).item()


def at_threshold(
    pre: torch.Tensor, threshold: torch.Tensor, differ: torch.Tensor, tolerance: float
) -> torch.Tensor | None:
    """[N] bool: the tokens where the two computations fire different latents, provided every such
    latent's pre-activation (ours, pre [N, S]) lies within rounding of the inference threshold,
    |pre - t| <= tolerance x max(1, |t|); None if some latent differs farther from it.

    A latent whose pre-activation is within float32 rounding of its threshold may fall on either
    side of it in two computations of the same sum (circuit-tracer's encoder has our centring
    folded into its bias); its jump makes that token's outputs differ by about t x its decoder row,
    which says nothing about the export. `differ` [N, S]: where the two fire differently."""
    near = (pre - threshold).abs() <= tolerance * threshold.abs().clamp(min=1.0)
    if not bool(near[differ].all()):
        return None
    return differ.any(dim=1)


@torch.no_grad()
def compare_layers(
    model, transcoders, set_folder, tokens: list[torch.Tensor], tolerance: float
) -> tuple[dict[str, float], dict[str, int]]:
    """Per layer: the relative error between circuit-tracer's and our predictions of the MLP output
    from the same activations (the prompts' tokens after the first), infinite where other latents
    fire; and the tokens left out of it because a latent at its threshold fired in one and not in
    the other (`at_threshold`)."""
    from matryoshka_sae.transcoder_set import load_transcoder_set

    ours = load_transcoder_set(set_folder, device=model.cfg.device)
    hook_in = transcoders.feature_input_hook
    caches = _prompt_caches(model, hook_in, list(ours), tokens)
    errors, left_out = {}, {}
    for layer, transcoder in ours.items():
        x = torch.cat([cache[f"blocks.{layer}.{hook_in}"][0, 1:] for cache in caches])
        theirs = transcoders[layer]
        differ = (transcoder.encode(x) > 0) != (theirs.encode(x) > 0)
        if differ.any():
            threshold = getattr(transcoder, "threshold", None)  # per-token TopK: none
            borderline = None
            if threshold is not None:
                pre = transcoder.preactivations(
                    transcoder.center(transcoder.normalize_source(x)[0])
                )
                borderline = at_threshold(pre, threshold.clamp(min=0), differ, tolerance)
            if borderline is None:
                errors[str(layer)] = float("inf")
                continue
            x = x[~borderline]
            left_out[str(layer)] = int(borderline.sum())
        errors[str(layer)] = relative_error(transcoder.reconstruct(x), theirs(x))
    return errors, left_out


@torch.no_grad()
def compare_clt(
    model, clt, checkpoint, tokens: list[torch.Tensor], tolerance: float
) -> tuple[dict[str, float], dict[str, int]]:
    """Per output layer: the relative error between circuit-tracer's CLT and ours (the checkpoint)
    predicting every MLP output from the same activations (the prompts' tokens after the first);
    infinite for every layer where other latents fire (no token is left out: {})."""
    from matryoshka_sae.checkpoint import load_sae

    ours = load_sae(checkpoint, device=model.cfg.device)
    layers = range(clt.n_layers)
    caches = _prompt_caches(model, clt.feature_input_hook, layers, tokens)
    x = torch.cat(
        [
            torch.stack([cache[f"blocks.{j}.{clt.feature_input_hook}"][0, 1:] for j in layers])
            for cache in caches
        ],
        dim=1,
    )  # [L, N, d]
    same_latents = torch.equal(
        ours.encode(x.transpose(0, 1)).view(x.shape[1], clt.n_layers, -1) > 0,
        clt.encode(x).transpose(0, 1) > 0,
    )
    ours_out, theirs_out = ours.reconstruct(x.transpose(0, 1)).transpose(0, 1), clt(x)
    errors = {
        str(m): relative_error(ours_out[m], theirs_out[m]) if same_latents else float("inf")
        for m in layers
    }
    return errors, {}


def is_cross_layer(transcoders) -> bool:
    from circuit_tracer.transcoder.cross_layer_transcoder import CrossLayerTranscoder

    return isinstance(transcoders, CrossLayerTranscoder)


def _prompt_caches(model, hook_in: str, layers, tokens: list[torch.Tensor]) -> list:
    names = [f"blocks.{layer}.{hook_in}" for layer in layers]
    if hook_in.endswith("hook_mlp_in"):
        model.set_use_hook_mlp_in(True)
    return [model.run_with_cache(t[None], names_filter=names)[1] for t in tokens]


def replacement_model(model, transcoders):
    """circuit-tracer's replacement model with `model`'s weights. It wraps each MLP and the
    unembedding (``blocks.i.mlp.old_mlp.*``, ``unembed.old_unembed.*``); every other parameter
    keeps the model's name. Every weight of the model must find its place."""
    from circuit_tracer.replacement_model.replacement_model_transformerlens import (
        TransformerLensReplacementModel,
    )

    replacement = TransformerLensReplacementModel.from_config(
        model.cfg, transcoders, tokenizer=model.tokenizer
    )
    places = {
        name.replace(".old_mlp.", ".").replace("unembed.old_unembed.", "unembed."): name
        for name in replacement.state_dict()
    }
    weights = {name: value for name, value in model.state_dict().items() if name in places}
    unplaced = [name for name, _ in model.named_parameters() if name not in places]
    if unplaced:
        raise ValueError(f"circuit-tracer's replacement model has no place for {unplaced[:3]}")
    replacement.load_state_dict(
        {places[name]: value for name, value in weights.items()}, strict=False
    )
    return replacement


@torch.no_grad()
def spliced_ce_and_kl(model, transcoders, tokens: list[torch.Tensor]) -> dict[str, float]:
    """CE loss of the original model and of the model with every MLP output replaced by
    circuit-tracer's transcoders (or cross-layer transcoder) at once, each reading the activations
    of the replaced pass (position 0 left as it is, as circuit-tracer does), and the mean
    KL(original || replaced) over the predicted positions."""
    hook_in, hook_out = transcoders.feature_input_hook, transcoders.feature_output_hook
    written: dict[
        int, torch.Tensor
    ] = {}  # source layer -> its prediction of each output layer it writes
    if is_cross_layer(transcoders):

        def remember(act, hook, layer):  # [batch, pos, S] x [S, L - j, d] -> [batch, pos, L - j, d]
            features = transcoders.encode_layer(act, layer)
            written[layer] = torch.einsum("bpf,fmd->bpmd", features, transcoders.W_dec[layer])

        def predict(act, layer):
            return (
                sum(written[j][:, :, layer - j] for j in range(layer + 1))
                + transcoders.b_dec[layer]
            )

        n_layers = transcoders.n_layers
    else:

        def remember(act, hook, layer):
            written[layer] = act

        def predict(act, layer):
            return transcoders[layer](written[layer])

        n_layers = len(transcoders)

    def replace(act, hook, layer):
        new = predict(act, layer).to(act.dtype)
        new[:, 0] = act[:, 0]
        return new

    hooks = []
    for layer in range(n_layers):
        hooks.append(
            (f"blocks.{layer}.{hook_in}", lambda a, hook, layer=layer: remember(a, hook, layer))
        )
        hooks.append(
            (f"blocks.{layer}.{hook_out}", lambda a, hook, layer=layer: replace(a, hook, layer))
        )
    totals = {"ce_loss_clean": 0.0, "ce_loss_replaced": 0.0, "kl_divergence": 0.0}
    n = 0
    for t in tokens:
        t = t[None].to(model.cfg.device)
        clean = model(t)[0, :-1].float().log_softmax(-1)
        replaced = model.run_with_hooks(t, fwd_hooks=hooks)[0, :-1].float().log_softmax(-1)
        targets = t[0, 1:]
        totals["ce_loss_clean"] -= clean.gather(-1, targets[:, None]).sum().item()
        totals["ce_loss_replaced"] -= replaced.gather(-1, targets[:, None]).sum().item()
        totals["kl_divergence"] += (clean.exp() * (clean - replaced)).sum().item()
        n += len(targets)
    return {key: value / n for key, value in totals.items()}


PHASE_LINE = re.compile(
    r"^(Precomputation|Forward pass|Logit attributions|Feature attributions|Attribution) "
    r"completed in ([0-9.]+)s"
)


def attribute_timed(tokens: torch.Tensor, replacement, **settings):
    """circuit_tracer.attribute, with the seconds of each of its phases read from its log (which it
    writes to stderr through a handler it creates; captured here): (graph, {phase: seconds})."""
    from circuit_tracer import attribute

    captured = io.StringIO()
    with contextlib.redirect_stderr(captured):
        graph = attribute(tokens, replacement, verbose=True, **settings)
    phases = {
        match[1].lower().replace(" ", "_"): float(match[2])
        for match in map(PHASE_LINE.match, captured.getvalue().splitlines())
        if match
    }
    return graph, phases


def missing_layers_error(
    n_model_layers: int, n_dictionary_layers: int, model_kind: str
) -> str | None:
    """The one line that refuses a dictionary that does not cover layers 0..L-1 of the model
    (circuit-tracer would trace a model whose other MLPs no node represents), or None."""
    if n_dictionary_layers == n_model_layers:
        return None
    what = "cross-layer transcoder" if model_kind == "cross_layer_transcoder" else "transcoder set"
    if n_dictionary_layers > n_model_layers:
        return (
            f"the exported {what} has {n_dictionary_layers} layers but the model only "
            f"{n_model_layers}; export the dictionary trained on this model."
        )
    missing = list(range(n_dictionary_layers, n_model_layers))
    return (
        f"the model has layers 0..{n_model_layers - 1} but the exported {what} lacks layers "
        f"{missing}, and circuit-tracer replaces every MLP; train it with --layers all and export "
        f"it again."
    )


# ---------------------------------------------------------------------------------------------
# Tracing a dictionary (the traced one or a null) under the protocol
# ---------------------------------------------------------------------------------------------


def trace_prompt(replacement, tokens: torch.Tensor, settings: dict, cross_layer: bool, pruning):
    """One prompt's graph and its figures (see the module docstring, step 4)."""
    from circuit_tracer.graph import compute_graph_scores

    started = time.perf_counter()
    graph, phases = attribute_timed(tokens, replacement, **settings)
    seconds = time.perf_counter() - started
    replacement_score, completeness_score = compute_graph_scores(graph)
    row = {
        "seconds": seconds,
        "n_active_features": len(graph.active_features),
        "n_selected_features": len(graph.selected_features),
        "n_logits": len(graph.logit_targets),
        "replacement_score": replacement_score,
        "completeness_score": completeness_score,
        **graph_logit_input_shares(graph),
        "error_influence_share": error_influence_share(graph),
        "decoder_vectors": decoder_vectors(graph, graph.cfg.n_layers, cross_layer),
        "phase_seconds": phases,
        **mean_path_length(graph, *pruning),
    }
    return graph, row


def trace_dictionary(
    model,
    replacement,
    transcoders,
    prompts: list[str],
    tokens: list[torch.Tensor],
    settings: dict,
    out: Path,
    label: str,
    pruning=(0.8, 0.98),
    scan: str | None = None,
    viewer_files: bool = False,
) -> dict:
    """Trace every prompt through `replacement` (built on `transcoders`), save each graph as
    ``out/graphs/<slug>.pt`` with its figures in ``out/graphs/<slug>.json`` (the dictionary's
    slugs are ``prompt-<i>``, a null's ``<label>-prompt-<i>``) and, with `viewer_files`, the
    viewer's files; returns {"graphs": one row
    a prompt, "mean_<figure>": the mean of each of MEAN_FIGURES, and the CE loss and KL divergence
    of the model with every MLP replaced}."""
    from circuit_tracer.utils.create_graph_files import create_graph_files

    cross_layer = is_cross_layer(transcoders)
    rows = []
    for i, (prompt, t) in enumerate(zip(prompts, tokens)):
        slug = f"prompt-{i}" if label == "dictionary" else f"{label}-prompt-{i}"
        graph, figures = trace_prompt(replacement, t, settings, cross_layer, pruning)
        graph.scan = scan
        # The viewer decodes tokens with the tokenizer named in the graph, which circuit-tracer
        # reads from the hub; ours (from the model's own files) is saved in out/tokenizer.
        graph.cfg.tokenizer_name = str((out / "tokenizer").resolve())
        graph.to_pt(str(out / "graphs" / f"{slug}.pt"))
        if viewer_files:
            create_graph_files(graph, slug=slug, output_path=str(out / "graph_files"), scan=scan)
        rows.append({"prompt": prompt, "slug": slug, **figures})
        # Each graph's figures beside it, so that an interrupted run keeps those it finished.
        (out / "graphs" / f"{slug}.json").write_text(json.dumps(rows[-1], indent=2) + "\n")
        print_graph_row(label, rows[-1])
    summary = {"graphs": rows}
    for key in MEAN_FIGURES:
        summary[f"mean_{key}"] = sum(row[key] for row in rows) / len(rows)
    summary.update(spliced_ce_and_kl(model, transcoders, tokens))
    return summary


def print_graph_row(label: str, row: dict) -> None:
    print(
        f"{label} {row['slug']} ({row['seconds']:.0f} s, {row['n_active_features']} active features, "
        f"{row['decoder_vectors']} decoder vectors, {row['n_selected_features']} feature nodes): "
        f"replacement {row['replacement_score']:.3f}, completeness {row['completeness_score']:.3f}; "
        f"the logits' direct inputs: features {row['logit_input_feature_share']:.3f}, errors "
        f"{row['logit_input_error_share']:.3f}, tokens {row['logit_input_token_share']:.3f}  "
        f"| {row['prompt']!r}"
    )
    print(
        "  seconds by phase: "
        + ", ".join(f"{name} {value:.1f}" for name, value in row["phase_seconds"].items())
    )


@torch.no_grad()
def source_activations(model, hook_in: str, n_layers: int, tokens: list[torch.Tensor]) -> list:
    """[n_layers] of [N, d_model]: each layer's activations at the feature input hook on the
    prompts' tokens after BOS (the random null's latents are set to fire on 30% of them)."""
    caches = _prompt_caches(model, hook_in, range(n_layers), tokens)
    return [
        torch.cat([cache[f"blocks.{layer}.{hook_in}"][0, 1:] for cache in caches]).float().cpu()
        for layer in range(n_layers)
    ]


def trace_nulls(model, transcoders, exported, prompts, tokens, settings, out, args, scan) -> dict:
    """{"null_silent": summary, "null_random": summary} (`trace_dictionary`'s summaries) of the two
    nulls of `exported`, written into ``out/nulls/<kind>`` and traced alike."""
    from matryoshka_sae.circuit_tracer_format import load_in_circuit_tracer
    from matryoshka_sae.null_dictionaries import NULL_KINDS, write_null_export

    sources = source_activations(
        model, transcoders.feature_input_hook, transcoders.n_layers, tokens
    )
    summaries = {}
    for kind in NULL_KINDS:
        folder = write_null_export(
            exported, kind, out / "nulls" / kind, args.null_seed, sources, overwrite=True
        )
        null = load_in_circuit_tracer(folder, device=args.device)
        replacement = replacement_model(model, null)
        summaries[f"null_{kind}"] = trace_dictionary(
            model,
            replacement,
            null,
            prompts,
            tokens,
            settings,
            out,
            f"null_{kind}",
            (args.node_threshold, args.edge_threshold),
            scan,
        )
        del null, replacement
    return summaries


def reused_nulls(path: str | Path, fingerprint: dict) -> dict:
    """The nulls' blocks ({"null_silent": ..., "null_random": ...}) of the earlier report at `path`,
    which must have been traced under `fingerprint`; otherwise exits with a one-line error."""
    path = Path(path)
    fix = "trace the nulls again (leave --nulls-from out)"
    if not path.is_file():
        raise SystemExit(f"trace_circuit.py: error: --nulls-from {path}: no such file; {fix}")
    earlier = json.loads(path.read_text())
    if "null_fingerprint" not in earlier or "null_random" not in earlier:
        raise SystemExit(
            f"trace_circuit.py: error: --nulls-from {path}: that report has no nulls with a "
            f"fingerprint (traced with --no-nulls, or by an older trace_circuit.py); {fix}"
        )
    differs = [
        key for key in fingerprint if earlier["null_fingerprint"].get(key) != fingerprint[key]
    ]
    if differs:
        raise SystemExit(
            f"trace_circuit.py: error: --nulls-from {path}: its nulls were traced under another "
            f"{', '.join(differs)}; {fix}"
        )
    return {label: earlier[label] for label in ("null_silent", "null_random")}


@torch.no_grad()
def clean_ce_loss(model, tokens: list[torch.Tensor]) -> float:
    """The model's mean next-token CE loss over the prompts' predicted positions."""
    total, n = 0.0, 0
    for t in tokens:
        t = t[None].to(model.cfg.device)
        log_probs = model(t)[0, :-1].float().log_softmax(-1)
        total -= log_probs.gather(-1, t[0, 1:, None]).sum().item()
        n += t.shape[1] - 1
    return total / n


def reused_nulls_model_error(path, nulls: dict, model, tokens: list[torch.Tensor]) -> str | None:
    """Why the nulls taken from `path` were not traced on this model (their clean CE loss on the
    prompts differs from this model's beyond float rounding), or None. The fingerprint cannot tell
    two models of the same name and layout apart; their outputs can."""
    theirs, ours = nulls["null_silent"]["ce_loss_clean"], clean_ce_loss(model, tokens)
    if abs(theirs - ours) <= 1e-4 * max(1.0, abs(ours)):
        return None
    return (
        f"--nulls-from {path}: its nulls were traced on another model (clean CE loss on these "
        f"prompts {theirs:.5f}, this model's {ours:.5f}); trace the nulls again (leave --nulls-from out)"
    )


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------

TABLE_ROWS = (
    ("replacement score (circuit-tracer)", "mean_replacement_score", ".3f"),
    ("completeness score (circuit-tracer)", "mean_completeness_score", ".3f"),
    ("logits' direct inputs: features", "mean_logit_input_feature_share", ".3f"),
    ("logits' direct inputs: errors after position 0", "mean_logit_input_error_share", ".3f"),
    ("logits' direct inputs: tokens", "mean_logit_input_token_share", ".3f"),
    (
        "logits' direct inputs: errors at position 0",
        "mean_logit_input_error_share_position_0",
        ".3f",
    ),
    ("active features", "mean_n_active_features", ".0f"),
    ("feature nodes", "mean_n_selected_features", ".0f"),
    ("CE loss, every MLP replaced", "ce_loss_replaced", ".4f"),
    ("KL divergence from the model", "kl_divergence", ".4f"),
)


def comparison_table(blocks: dict[str, dict], title: str) -> str:
    """The figures of the traced dictionary and the nulls side by side, one column each."""
    labels = list(blocks)
    width = max(len(name) for name, _, _ in TABLE_ROWS)
    lines = [title, " " * width + "".join(f"{label:>14}" for label in labels)]
    for name, key, form in TABLE_ROWS:
        cells = "".join(f"{format(blocks[label][key], form):>14}" for label in labels)
        lines.append(f"{name:<{width}}{cells}")
    return "\n".join(lines)


def verdict(blocks: dict[str, dict]) -> dict[str, bool]:
    """Whether the dictionary's feature share of the logits' direct inputs is above its error share
    and above the feature share of every null in `blocks`."""
    feature = blocks["dictionary"]["mean_logit_input_feature_share"]
    nulls = [label for label in blocks if label != "dictionary"]
    return {
        "feature_share_above_error_share": feature
        > blocks["dictionary"]["mean_logit_input_error_share"],
        "feature_share_above_the_nulls": all(
            feature > blocks[label]["mean_logit_input_feature_share"] for label in nulls
        ),
    }


def dictionary_title(model_kind: str, skip: bool) -> str:
    what = "cross-layer transcoder" if model_kind == "cross_layer_transcoder" else "transcoder set"
    return f"{what}{' with skip connections' if skip else ''}, means over the prompts"


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        import circuit_tracer  # noqa: F401
    except ImportError:
        print(
            "trace_circuit.py: error: circuit_tracer is not installed here; run it with circuit-tracer's "
            "environment: bash setup_circuit_tracer_env.sh, then .ct-venv/bin/python trace_circuit.py ...",
            file=sys.stderr,
        )
        raise SystemExit(2) from None

    from matryoshka_sae.circuit_tracer_format import load_in_circuit_tracer, read_config
    from matryoshka_sae.model_loading import load_model, masked_prompt_error
    from matryoshka_sae.null_dictionaries import null_fingerprint

    out = Path(args.out)
    config = read_config(args.exported)
    prompts = args.prompts or DEFAULT_PROMPTS
    settings = {
        "max_feature_nodes": args.max_feature_nodes,
        "batch_size": args.batch_size,
        "max_n_logits": args.max_n_logits,
        "desired_logit_prob": args.desired_logit_prob,
    }
    if args.nulls_from and not args.nulls:
        raise SystemExit(
            "trace_circuit.py: error: --nulls-from and --no-nulls contradict each other; drop one"
        )
    fingerprint = null_fingerprint(args.exported, prompts, settings, args.null_seed)
    earlier_nulls = reused_nulls(args.nulls_from, fingerprint) if args.nulls_from else None
    model = load_model(config["model_name"], args.device, torch.float32)
    transcoders = load_in_circuit_tracer(args.exported, device=args.device)
    refusal = missing_layers_error(model.cfg.n_layers, transcoders.n_layers, config["model_kind"])
    if refusal:
        raise SystemExit(f"trace_circuit.py: error: {refusal}")
    tokens = [prompt_tokens(model, p) for p in prompts]
    refusal = masked_prompt_error(model, tokens[0])
    if earlier_nulls is not None and not refusal:
        refusal = reused_nulls_model_error(args.nulls_from, earlier_nulls, model, tokens)
    if refusal:
        raise SystemExit(f"trace_circuit.py: error: {refusal}")
    (out / "graphs").mkdir(parents=True, exist_ok=True)
    skip = bool(transcoders.skip_connection)
    results: dict = {
        "exported": str(args.exported),
        "prompts": prompts,
        "model_kind": config["model_kind"],
        "skip": skip,
        "protocol": {
            **settings,
            "is_default": settings == PROTOCOL,
            "bos_first": True,
            "scored": "the logits of each prompt's last position",
            "logit_weighting": "probability",
            "nulls": args.nulls,
            "null_seed": args.null_seed,
        },
    }
    if args.ours:
        compare = compare_clt if is_cross_layer(transcoders) else compare_layers
        errors, left_out = compare(model, transcoders, args.ours, tokens, args.tolerance)
        worst = max(errors.values())
        results["layer_relative_errors"] = errors
        results["layer_tokens_at_a_threshold"] = left_out
        print(
            f"circuit-tracer's transcoders vs ours, {len(errors)} layers: largest relative error {worst:.2e}"
        )
        if left_out:
            print(
                f"left out of that comparison, tokens where a latent within rounding of its "
                f"threshold fired in one and not the other (layer: tokens): {left_out}"
            )
        if not worst <= args.tolerance:
            bad = [layer for layer, e in errors.items() if not e <= args.tolerance]
            raise SystemExit(
                f"trace_circuit.py: error: layers {bad} differ from ours by more than "
                f"{args.tolerance:g} (or fire other latents)"
            )

    replacement = replacement_model(model, transcoders)
    logits_gap = (replacement(tokens[0][None]) - model(tokens[0][None])).abs().max().item()
    results["replacement_logits_max_difference"] = logits_gap
    print(f"replacement model vs model, logits: largest difference {logits_gap:.2e}")
    model.tokenizer.save_pretrained(str(out / "tokenizer"))
    pruning = (args.node_threshold, args.edge_threshold)
    scan = args.scan or config.get("scan")
    dictionary = trace_dictionary(
        model,
        replacement,
        transcoders,
        prompts,
        tokens,
        settings,
        out,
        "dictionary",
        pruning,
        scan,
        viewer_files=True,
    )
    del replacement
    # The traced dictionary's rows and means also stay at the top level, where readers of earlier
    # reports (benchmarks/transcoder_sets.py, benchmarks/clt_comparison.py) find them.
    results.update(dictionary)
    blocks = {"dictionary": dictionary}
    if args.nulls:
        if earlier_nulls is not None:
            blocks.update(earlier_nulls)
            results["nulls_from"] = str(args.nulls_from)
        else:
            blocks.update(
                trace_nulls(
                    model, transcoders, args.exported, prompts, tokens, settings, out, args, scan
                )
            )
        results["null_fingerprint"] = fingerprint
        results["verdict"] = verdict(blocks)
    results.update(blocks)
    results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (out / "trace_results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(comparison_table(blocks, dictionary_title(config["model_kind"], skip)))
    if args.nulls:
        print(
            "the features' share of the logits' direct inputs is "
            + ("above" if results["verdict"]["feature_share_above_error_share"] else "NOT above")
            + " the errors' and "
            + ("above" if results["verdict"]["feature_share_above_the_nulls"] else "NOT above")
            + " both nulls'"
        )
    print(
        f"{dictionary['mean_seconds']:.0f} s a prompt, peak memory {results['peak_rss_mb']:.0f} MB; "
        f"written to {out}"
    )


if __name__ == "__main__":
    main()
