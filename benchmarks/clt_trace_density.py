"""Why an untrained cross-layer transcoder is slow to trace: the active features and decoder vectors
that circuit-tracer's attribution carries, for an exported CLT as trained and with its thresholds
set to 0 (what a CLT whose thresholds do not select yet does). Runs in circuit-tracer's environment:

    .ct-venv/bin/python benchmarks/clt_trace_density.py EXPORTED_CLT    # results/clt_trace_density.json

For each of trace_circuit.py's prompts (BOS prepended, position 0 left out as circuit-tracer does):
circuit-tracer's own `encode_sparse` on the model's activations gives the active features; each
feature of layer j carries L - j decoder vectors through every backward pass of `attribute`.
"""

from __future__ import annotations

import argparse

import harness  # noqa: F401  (first: import paths)
from harness import environment, save


def counts(clt, sources) -> tuple[int, int]:
    """(active features, decoder vectors) of sources [L, pos, d] through circuit-tracer's CLT."""
    features, _ = clt.encode_sparse(sources)
    layers = features.indices()[0]
    return features._nnz(), int((clt.n_layers - layers).sum())


def main() -> None:
    import torch

    from matryoshka_sae.circuit_tracer_format import load_in_circuit_tracer, read_config
    from matryoshka_sae.cli.trace_circuit import DEFAULT_PROMPTS, prompt_tokens
    from matryoshka_sae.model_loading import load_model

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("exported", help="a CLT folder written by train_clt.py export")
    args = parser.parse_args()
    started = environment()
    model = load_model(read_config(args.exported)["model_name"], "cpu", torch.float32)
    clt = load_in_circuit_tracer(args.exported)
    names = [f"blocks.{j}.{clt.feature_input_hook}" for j in range(clt.n_layers)]
    rows = []
    with torch.no_grad():
        for prompt in DEFAULT_PROMPTS:
            tokens = prompt_tokens(model, prompt)
            _, cache = model.run_with_cache(tokens[None], names_filter=names)
            sources = torch.stack([cache[name][0] for name in names])
            trained = counts(clt, sources)
            thresholds = clt.activation_function.threshold.detach().clone()
            clt.activation_function.threshold.data.zero_()
            at_zero = counts(clt, sources)
            clt.activation_function.threshold.data.copy_(thresholds)
            positions = len(tokens) - 1
            rows.append(
                {
                    "prompt": prompt,
                    "positions": positions,
                    "latents_per_position": clt.n_layers * clt.d_transcoder,
                    "active_trained": trained[0],
                    "decoder_vectors_trained": trained[1],
                    "active_thresholds_0": at_zero[0],
                    "decoder_vectors_thresholds_0": at_zero[1],
                    "share_active_thresholds_0": round(
                        at_zero[0] / (positions * clt.n_layers * clt.d_transcoder), 3
                    ),
                    "decoder_vectors_ratio": round(at_zero[1] / trained[1], 1),
                }
            )
            print(rows[-1], flush=True)
    save(
        "clt_trace_density",
        "What circuit-tracer carries for a CLT: trained thresholds against thresholds at 0",
        rows,
        {
            "exported": str(args.exported),
            "layers": clt.n_layers,
            "latents_per_layer": clt.d_transcoder,
        },
        environment_at_start=started,
        notes="Counts from circuit-tracer's own encode_sparse on the prompts' activations (position 0 left out). "
        "Each backward pass of attribute contracts the gradient with every decoder vector, so a prompt's "
        "attribution cost grows with decoder_vectors.",
    )


if __name__ == "__main__":
    main()
