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
- runs main on SET with a least-squares skip connection added to every layer (`write_skip_set`),
  and derives its silent null's shares, which keep that skip connection, as above;
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
from matryoshka_sae.graph_measures import logit_input_shares  # noqa: E402

PROMPT_LENGTH = 12  # BOS and the first 11 tokens of the first row


def run_main(*argv: str) -> tuple[dict, str]:
    """trace_circuit.main(argv): its trace_results.json and what it printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        trace_circuit.main(list(argv))
    out = Path(argv[argv.index("--out") + 1])
    return json.loads((out / "trace_results.json").read_text()), printed.getvalue()


def direct_effects(model, tokens: torch.Tensor, logit_ids: list[int], skips=None):
    """The direct effects on each logit target k, in the model frozen as circuit-tracer freezes it
    for attribution: attention patterns and every norm's scale held at their values, every MLP
    output held as a constant (so nothing flows back through an MLP) less, with `skips` ({layer:
    W_skip [d, d]}), its skip connection x W_skip^T, which stays a linear function of the MLP's
    input x (ln2.hook_normalized). The model is then linear in the token embeddings and the held
    MLP outputs, and the logit target's direct input from a source is the source's value times the
    gradient there of u_k . ln_final(resid)[last position], with u_k = W_U[:, k] - mean over the
    vocabulary of W_U (circuit-tracer's demeaned unembedding).
    Returns (mlp [K, n_layers, n_pos]: from the held MLP output of each layer and position,
    embed [K, n_pos]: from the token embedding W_E[t_p] of each position)."""
    leaves, inputs, skips = {}, {}, skips or {}

    def hold(value, hook):  # a constant the gradient is read at
        leaves[hook.name] = value.detach().requires_grad_(True)
        return leaves[hook.name]

    def remember(value, hook):  # the MLP's input, for its skip connection
        inputs[int(hook.name.split(".")[1])] = value
        return value

    def hold_less_skip(value, hook):
        layer = int(hook.name.split(".")[1])
        skip = inputs[layer] @ skips[layer].T if layer in skips else torch.zeros_like(value)
        leaves[hook.name] = (value - skip).detach().requires_grad_(True)
        return skip + leaves[hook.name]

    def freeze(value, hook):
        return value.detach()

    n_layers = model.cfg.n_layers
    mlp_names = [f"blocks.{layer}.hook_mlp_out" for layer in range(n_layers)]
    hooks = [("hook_embed", hold)]
    hooks += [(f"blocks.{layer}.ln2.hook_normalized", remember) for layer in range(n_layers)]
    hooks += [(name, hold_less_skip) for name in mlp_names]
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


def silent_null_shares(model, graph, skips=None) -> dict[str, float]:
    """The silent null's shares of the logits' direct inputs, derived without circuit-tracer's code.

    The silent null predicts 0 for every MLP output (no latent fires; W_dec and b_dec are 0), or,
    with `skips` ({layer: W_skip}, which a skip set's null keeps), x W_skip^T. So circuit-tracer's
    error node of layer l at position p carries the MLP's output there less that prediction
    (error = output - prediction), except at position 0, where circuit-tracer zeroes the error
    vectors; there are no feature nodes; the token nodes carry W_E[t_p], whose effects now also
    pass through the skip connections. circuit-tracer's logit row k holds the direct effects of
    those vectors (`direct_effects`), so, with w_k the logit probabilities over their sum,

        error share = sum_k w_k E_k / (E_k + T_k),  E_k = sum_{l, p >= 1} |mlp[k, l, p]|,
                                                    T_k = sum_p |embed[k, p]|,

    the token share is the rest, and the feature share and the error share at position 0 are 0."""
    logit_ids = [target.vocab_idx for target in graph.logit_targets]
    mlp, embed = direct_effects(model, graph.input_tokens, logit_ids, skips)
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


@torch.no_grad()
def write_skip_set(model, set_folder: str, tokens: torch.Tensor, out: Path) -> dict:
    """SET with a skip connection added to every layer: W_skip [d, d], the least-squares linear
    map from the MLP's input (ln2.hook_normalized) to its output on `tokens`. Returns {layer:
    W_skip}."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(set_folder, out)
    hooks = ("ln2.hook_normalized", "hook_mlp_out")
    names = [f"blocks.{i}.{h}" for i in range(model.cfg.n_layers) for h in hooks]
    _, cache = model.run_with_cache(tokens, names_filter=names)
    skips = {}
    for layer in range(model.cfg.n_layers):
        x = cache[f"blocks.{layer}.ln2.hook_normalized"][:, 1:].flatten(0, 1)
        y = cache[f"blocks.{layer}.hook_mlp_out"][:, 1:].flatten(0, 1)
        skips[layer] = torch.linalg.lstsq(x, y).solution.T.contiguous()  # y ~ x W_skip^T
        path = out / f"layer_{layer}.safetensors"
        save_file({**load_file(str(path)), "W_skip": skips[layer]}, str(path))
    return skips


def measured_and_derived(model, graph_file: Path, skips=None) -> dict:
    """A silent null's graph: its shares of the logits' direct inputs as trace_circuit reads them
    from circuit-tracer's adjacency matrix, and as `silent_null_shares` derives them."""
    from circuit_tracer.graph import Graph

    graph = Graph.from_pt(str(graph_file))
    return {
        "measured": logit_input_shares(
            graph.adjacency_matrix,
            len(graph.selected_features),
            graph.cfg.n_layers,
            len(graph.input_tokens),
            graph.logit_probabilities,
        ),
        "derived": silent_null_shares(model, graph, skips),
        "input_tokens": graph.input_tokens.tolist(),
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

    result["silent_null"] = measured_and_derived(
        model, work / "set" / "graphs" / "null_silent-prompt-0.pt"
    )
    result["silent_null"]["tokens_are_the_prompt"] = (
        result["silent_null"].pop("input_tokens") == tokens[0, :PROMPT_LENGTH].tolist()
    )
    skips = write_skip_set(model, set_folder, tokens, work / "skip-set")
    report, _ = run_main(str(work / "skip-set"), "--out", str(work / "skip"), "--prompt", prompt)
    result["skip_set"] = {"report": report}
    result["skip_silent_null"] = measured_and_derived(
        model, work / "skip" / "graphs" / "null_silent-prompt-0.pt", skips
    )
    result["refusal"] = refusal(set_folder, work, prompt)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
