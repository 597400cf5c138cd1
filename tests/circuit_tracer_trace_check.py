"""Run in circuit-tracer's environment (.ct-venv) by test_trace_circuit.py.

    python tests/circuit_tracer_trace_check.py MODEL_FILE SET CLT WORK

Runs trace_circuit.py's main, with the tiny model saved in MODEL_FILE standing in for the model it
loads (a word-level tokenizer over the tiny vocabulary: id i is the word t<i>, BOS is <bos>), on the first
12 tokens of the first row (BOS first) as the prompt, under the default protocol with the nulls:

- on the exported transcoder set SET (``WORK/set``) and cross-layer transcoder CLT (``WORK/clt``);
  reports their trace_results.json;
- derives, independently of circuit-tracer's code, the silent null's shares of the logits' direct
  inputs (`silent_null_shares`) and reports them beside those of its saved graph;
- runs main on SET again with --nulls-from the first run's report: reports whether the nulls'
  figures are the first run's and whether any null was traced again;
- runs main on SET with its config.yaml cut to layer 0 only, and reports the error it exits with.

Prints one JSON line.
"""

import contextlib
import io
import json
import shutil
import sys
from pathlib import Path

import torch
import yaml
from circuit_tracer_check import load_model, word_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from matryoshka_sae import model_loading  # noqa: E402
from matryoshka_sae.cli import trace_circuit  # noqa: E402

PROMPT_LENGTH = 12  # BOS and the first 11 tokens of the first row


def run_main(*argv: str) -> tuple[dict, str]:
    """trace_circuit.main(argv): its trace_results.json and what it printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        trace_circuit.main(list(argv))
    out = Path(argv[argv.index("--out") + 1])
    return json.loads((out / "trace_results.json").read_text()), printed.getvalue()


def direct_effects(model, tokens: torch.Tensor, logit_ids: list[int]):
    """The direct effects on each logit target k, in the model frozen as circuit-tracer freezes it
    for attribution: attention patterns and every norm's scale held at their values, every MLP
    output held as a constant (so nothing flows back through an MLP). The model is then linear in
    the token embeddings and the MLP outputs, and the logit target's direct input from a source is
    the source's value times the gradient there of u_k . ln_final(resid)[last position], with
    u_k = W_U[:, k] - mean over the vocabulary of W_U (circuit-tracer's demeaned unembedding).
    Returns (mlp [K, n_layers, n_pos]: from the MLP output of each layer and position,
    embed [K, n_pos]: from the token embedding W_E[t_p] of each position)."""
    leaves = {}

    def hold(value, hook):  # a constant the gradient is read at
        leaves[hook.name] = value.detach().requires_grad_(True)
        return leaves[hook.name]

    def freeze(value, hook):
        return value.detach()

    n_layers = model.cfg.n_layers
    mlp_names = [f"blocks.{layer}.hook_mlp_out" for layer in range(n_layers)]
    hooks = [(name, hold) for name in ["hook_embed", *mlp_names]]
    hooks += [
        (name, freeze) for name in model.hook_dict if name.endswith(("hook_pattern", "hook_scale"))
    ]
    with model.hooks(fwd_hooks=hooks):
        final = model.ln_final(model(tokens[None], stop_at_layer=n_layers))[0, -1]
    W_U = model.W_U.detach()
    mlp, embed = [], []
    for k in logit_ids:
        u = W_U[:, k] - W_U.mean(dim=1)
        sources = [leaves["hook_embed"], *(leaves[name] for name in mlp_names)]
        grads = torch.autograd.grad(final @ u, sources, retain_graph=True)
        embed.append((grads[0] * sources[0]).sum(-1)[0])
        mlp.append(torch.stack([(g * s).sum(-1)[0] for g, s in zip(grads[1:], sources[1:])]))
    return torch.stack(mlp), torch.stack(embed)


def silent_null_shares(model, graph) -> dict[str, float]:
    """The silent null's shares of the logits' direct inputs, derived without circuit-tracer's code.

    The silent null predicts 0 for every MLP output (no latent fires; W_dec, b_dec and W_skip are
    0), so circuit-tracer's error node of layer l at position p carries the MLP's whole output there
    (error = output - prediction), except at position 0, where circuit-tracer zeroes the error
    vectors; there are no feature nodes; the token nodes carry W_E[t_p]. circuit-tracer's logit row
    k holds the direct effects of those vectors (`direct_effects`), so, with w_k the logit
    probabilities over their sum,

        error share = sum_k w_k E_k / (E_k + T_k),  E_k = sum_{l, p >= 1} |mlp[k, l, p]|,
                                                    T_k = sum_p |embed[k, p]|,

    the token share is the rest, and the feature share and the error share at position 0 are 0."""
    logit_ids = [target.vocab_idx for target in graph.logit_targets]
    mlp, embed = direct_effects(model, graph.input_tokens, logit_ids)
    errors = mlp[:, :, 1:].abs().sum(dim=(1, 2))
    tokens = embed.abs().sum(dim=1)
    weights = graph.logit_probabilities / graph.logit_probabilities.sum()
    error_share = (weights * errors / (errors + tokens)).sum().item()
    return {
        "feature_share": 0.0,
        "error_share": error_share,
        "token_share": 1 - error_share,
        "error_share_position_0": 0.0,
    }


def refusal(set_folder: str, work: Path, prompt: str) -> str:
    """The error trace_circuit.main exits with on the set cut to its layer 0."""
    partial = work / "partial"
    shutil.copytree(set_folder, partial)
    config = yaml.safe_load((partial / "config.yaml").read_text())
    config["transcoders"] = config["transcoders"][:1]
    (partial / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    try:
        run_main(str(partial), "--out", str(work / "partial-traces"), "--prompt", prompt)
    except SystemExit as exit:
        return str(exit.code)
    return "no error"


def main() -> None:
    model_file, set_folder, clt_folder, work = sys.argv[1:5]
    work = Path(work)
    model, tokens = load_model(model_file)
    model.set_tokenizer(word_tokenizer(model.cfg.d_vocab))
    model_loading.load_model = lambda *args, **kwargs: model
    prompt = " ".join(f"t{i}" for i in tokens[0, 1:PROMPT_LENGTH].tolist())  # main puts BOS first

    result = {}
    for name, folder in (("set", set_folder), ("clt", clt_folder)):
        report, printed = run_main(folder, "--out", str(work / name), "--prompt", prompt)
        result[name] = {"report": report, "printed": printed}

    again, _ = run_main(
        set_folder,
        "--out",
        str(work / "set-again"),
        "--prompt",
        prompt,
        "--nulls-from",
        str(work / "set" / "trace_results.json"),
    )
    result["nulls_reused"] = {
        "same_nulls": all(
            again[k] == result["set"]["report"][k] for k in ("null_silent", "null_random")
        ),
        "nulls_from": again.get("nulls_from"),
        "nulls_folder_written": (work / "set-again" / "nulls").exists(),
    }

    from circuit_tracer.graph import Graph

    graph = Graph.from_pt(str(work / "set" / "graphs" / "null_silent-prompt-0.pt"))
    result["silent_null"] = {
        "measured": trace_circuit.logit_input_shares(
            graph.adjacency_matrix,
            len(graph.selected_features),
            graph.cfg.n_layers,
            len(graph.input_tokens),
            graph.logit_probabilities,
        ),
        "derived": silent_null_shares(model, graph),
        "tokens_are_the_prompt": graph.input_tokens.tolist() == tokens[0, :PROMPT_LENGTH].tolist(),
    }
    result["refusal"] = refusal(set_folder, work, prompt)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
