"""Run in circuit-tracer's environment (.ct-venv) by test_cross_layer_transcoder.py.

    python tests/circuit_tracer_clt_check.py EXPORTED CHECKPOINT MODEL_FILE [--attribute]

Loads EXPORTED with circuit-tracer's own CLT loader (load_clt) and checks that its cross-layer
transcoder computes what ours (CHECKPOINT, loaded with this library) computes on the activations of
the tiny model saved in MODEL_FILE (config, weights, token rows); with --attribute, runs what
trace_circuit.py runs on a CLT: its layer check (compare_clt), the model with every MLP replaced
by circuit-tracer's CLT (spliced_ce_and_kl), the replacement model, `attribute` with its phase
times, `compute_graph_scores` and the pruned graph's path length, on one row. Prints one JSON line
of results.
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformer_lens import HookedTransformer, HookedTransformerConfig  # noqa: E402

from matryoshka_sae.checkpoint import load_sae  # noqa: E402
from matryoshka_sae.circuit_tracer_format import load_clt_in_circuit_tracer  # noqa: E402


class TokenIds:
    """What circuit-tracer asks of a tokenizer, for a model of bare token ids (id 1 is BOS)."""

    all_special_ids, bos_token_id, pad_token_id, eos_token_id, vocab_size = [1], 1, None, None, 1000
    padding_side = "right"

    @staticmethod
    def decode(ids) -> str:
        return " ".join(map(str, ids if isinstance(ids, list) else [ids]))


def load_model(model_file: str):
    saved = torch.load(model_file, weights_only=False)
    model = HookedTransformer(HookedTransformerConfig(**saved["config"]))
    parameters = {name for name, _ in model.named_parameters()}  # buffers are each version's own
    model.load_state_dict(
        {k: v for k, v in saved["weights"].items() if k in parameters}, strict=False
    )
    return model.eval(), saved["tokens"]


def main() -> None:
    exported, checkpoint, model_file = sys.argv[1:4]
    model, tokens = load_model(model_file)
    theirs = load_clt_in_circuit_tracer(exported)
    ours = load_sae(checkpoint)
    hook_in, hook_out = theirs.feature_input_hook, theirs.feature_output_hook
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
        sources = torch.stack(
            [
                cache[f"blocks.{i}.{hook_in}"][:, 1:].reshape(-1, model.cfg.d_model)
                for i in range(model.cfg.n_layers)
            ]
        )  # [L, N, d], BOS left out
        ours_out = ours.reconstruct(sources.transpose(0, 1)).transpose(0, 1)  # [L, N, d]
        theirs_out = theirs(sources)
        ours_active = (
            ours.encode(sources.transpose(0, 1)).view(-1, theirs.n_layers, theirs.d_transcoder) > 0
        )
        theirs_active = theirs.encode(sources).transpose(0, 1) > 0
    result = {
        "input_hook": hook_in,
        "output_hook": hook_out,
        "n_layers": theirs.n_layers,
        "relative_error": [
            ((o - t).norm() / o.norm()).item() for o, t in zip(ours_out, theirs_out)
        ],
        "same_latents": torch.equal(ours_active, theirs_active),
        "active_latents": int(theirs_active.sum()),
    }
    if "--attribute" in sys.argv:
        from circuit_tracer.graph import compute_graph_scores

        from matryoshka_sae.cli.trace_circuit import (
            attribute_timed,
            compare_clt,
            replacement_model,
            spliced_ce_and_kl,
        )
        from matryoshka_sae.graph_measures import decoder_vectors, mean_path_length

        rows = list(tokens)
        result["layer_relative_errors"] = compare_clt(model, theirs, checkpoint, rows, 1e-4)[0]
        result.update(spliced_ce_and_kl(model, theirs, rows))
        replacement = replacement_model(model, theirs)
        replacement.tokenizer = TokenIds()
        with torch.no_grad():
            result["logits_difference"] = (
                (replacement(tokens[:1]) - model(tokens[:1])).abs().max().item()
            )
        graph, result["phase_seconds"] = attribute_timed(
            tokens[0], replacement, max_feature_nodes=64, batch_size=32
        )
        result["replacement_score"], result["completeness_score"] = compute_graph_scores(graph)
        result["n_active_features"] = len(graph.active_features)
        result["decoder_vectors"] = decoder_vectors(graph, theirs.n_layers, cross_layer=True)
        result["active_feature_layers"] = graph.active_features[:, 0].tolist()
        result.update(mean_path_length(graph))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
