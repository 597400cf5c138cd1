"""Run in circuit-tracer's environment (.ct-venv) by test_circuit_tracer_format.py.

    python tests/circuit_tracer_check.py MODEL_FILE [--attribute] EXPORTED SET [EXPORTED SET ...]

Loads each EXPORTED folder with circuit-tracer's own loader and checks, layer by layer, that its
transcoders compute what ours (SET, loaded with this library) compute on activations of the tiny
model saved in MODEL_FILE (its config, weights and token rows); with --attribute, builds
circuit-tracer's replacement model from that model and the first EXPORTED folder and runs
`attribute` and `compute_graph_scores` on one row of tokens (a word-level tokenizer over the tiny
vocabulary stands in for a real one: circuit-tracer asks the tokenizer for its special ids). Prints
one JSON line: {"sets": [per folder], "attribution": {...}}.
"""

import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformer_lens import HookedTransformer, HookedTransformerConfig  # noqa: E402

from matryoshka_sae.circuit_tracer_format import load_in_circuit_tracer  # noqa: E402
from matryoshka_sae.transcoder_set import load_transcoder_set  # noqa: E402


def load_model(model_file: str):
    saved = torch.load(model_file, weights_only=False)
    model = HookedTransformer(HookedTransformerConfig(**saved["config"]))
    # Buffers (attention masks) are built by each TransformerLens version its own way; parameters must all load.
    parameters = {name for name, _ in model.named_parameters()}
    missing, _ = model.load_state_dict(
        {k: v for k, v in saved["weights"].items() if k in parameters}, strict=False
    )
    assert not [name for name in missing if name in parameters], missing
    model.eval()
    return model, saved["tokens"]


@torch.no_grad()
def compare(model, tokens, exported, set_folder) -> dict:
    theirs = load_in_circuit_tracer(exported)
    ours = load_transcoder_set(set_folder)
    hook_in, hook_out = theirs.feature_input_hook, theirs.feature_output_hook
    result = {
        "layers": {},
        "input_hook": hook_in,
        "output_hook": hook_out,
        "skip": theirs.skip_connection,
    }
    _, cache = model.run_with_cache(tokens)
    for layer, transcoder in ours.items():
        x = cache[f"blocks.{layer}.{hook_in}"][:, 1:].reshape(-1, model.cfg.d_model)
        ours_out, theirs_out = transcoder.reconstruct(x), theirs[layer](x)
        result["layers"][layer] = {
            "relative_error": ((ours_out - theirs_out).norm() / ours_out.norm()).item(),
            "same_latents": torch.equal(transcoder.encode(x) > 0, theirs[layer].encode(x) > 0),
            "active_latents": int((theirs[layer].encode(x) > 0).sum()),
        }
    return result


def word_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # Id 1 is BOS, named so that no word contains it (a special token splits every word it is in).
    vocab = {("<bos>" if i == 1 else f"t{i}"): i for i in range(vocab_size)}
    inner = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    inner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    folder = tempfile.mkdtemp()  # TransformerLens reloads a tokenizer by its name_or_path
    PreTrainedTokenizerFast(
        tokenizer_object=inner, bos_token="<bos>", unk_token="t0"
    ).save_pretrained(folder)
    return PreTrainedTokenizerFast.from_pretrained(folder)


def attribution(model, tokens, exported) -> dict:
    from circuit_tracer import attribute
    from circuit_tracer.graph import compute_graph_scores

    from matryoshka_sae.cli.trace_circuit import replacement_model

    model.set_tokenizer(word_tokenizer(model.cfg.d_vocab))
    replacement = replacement_model(model, load_in_circuit_tracer(exported))
    with torch.no_grad():
        gap = (replacement(tokens[:1]) - model(tokens[:1])).abs().max().item()
    graph = attribute(tokens[0], replacement, max_feature_nodes=64, batch_size=32)
    replacement_score, completeness_score = compute_graph_scores(graph)
    return {
        "logits_difference": gap,
        "replacement_score": replacement_score,
        "completeness_score": completeness_score,
        "n_active_features": len(graph.active_features),
    }


def main() -> None:
    args = sys.argv[1:]
    model, tokens = load_model(args.pop(0))
    attribute = "--attribute" in args
    folders = [arg for arg in args if arg != "--attribute"]
    pairs = list(zip(folders[::2], folders[1::2]))
    result = {
        "sets": [compare(model, tokens, exported, set_folder) for exported, set_folder in pairs]
    }
    if attribute:
        result["attribution"] = attribution(model, tokens, pairs[0][0])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
