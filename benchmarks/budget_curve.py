"""The budget curve: a Matryoshka transcoder set and a Matryoshka CLT on SmolLM2-135M (all 30 layers)
at equal latents and L0, measured at token budgets that grow by 4x.

    python benchmarks/budget_curve.py train --what set --out runs/budget_curve   # 20k, 82k, 328k, 1.3M tokens
    python benchmarks/budget_curve.py train --what clt --out runs/budget_curve --budgets 20480 81920 327680
    python benchmarks/budget_curve.py trace --what set --out runs/budget_curve    # every budget, with the nulls
    python benchmarks/budget_curve.py report --out runs/budget_curve   # results/budget_curve.json, docs/budget_curve.png

One run per dictionary, trained through the library's one loop. The learning rate is constant (no warmup,
no decay), so the run that reaches budget N is the same run, step for step, as one planned for N tokens:
the curve continues one run by resuming it (`train_sae_group(..., resume_from=...)`, bit-identical) with a
larger `num_tokens` at each budget, and evaluates it there. At each budget the weights are copied to
``<out>/<what>/tokens_<N>/`` and the held-out evaluation (every MLP replaced at once, on rows of the
built-in corpus's held-out split "python-docs:test", which training never reads) goes into
``<out>/<what>/curve.json`` with the wall time so far.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import harness  # noqa: F401  (first: import paths)
from harness import environment

BUDGETS = (20480, 81920, 327680, 1310720)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("phase", choices=["train", "trace", "confirm", "report", "levers"])
    parser.add_argument("--what", choices=["set", "clt"], default="set")
    parser.add_argument("--out", default="runs/budget_curve")
    parser.add_argument("--budgets", type=int, nargs="+", default=list(BUDGETS))
    parser.add_argument("--dict-size", type=int, default=1152, help="latents a layer")
    parser.add_argument("--top-k", type=int, default=16, help="active latents a layer and token")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="train: one more run setting (a lever), e.g. aux_penalty=0 or lr_decay_frac=0.2; "
        "VALUE is read as JSON, else as text. Use another --out for each variant",
    )
    parser.add_argument("--n-eval-rows", type=int, default=32, help="held-out rows of 128 tokens")
    parser.add_argument("--prompts", type=int, default=5, help="trace: held-out prompts")
    parser.add_argument(
        "--nulls",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="trace, confirm: trace the two null dictionaries beside each budget",
    )
    parser.add_argument(
        "--max-feature-nodes",
        type=int,
        default=256,
        help="trace: feature nodes a graph keeps (trace_circuit.py's protocol keeps 2048; on 2 CPU "
        "cores that is about 15 minutes a graph, so the curve's 15 graphs a budget keep fewer)",
    )
    return parser


def extra_settings(pairs: list[str]) -> dict:
    """--setting KEY=VALUE pairs as a dict; a pair without "=" or an unknown key is refused."""
    from matryoshka_sae.config import known_keys

    settings = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or key not in known_keys():
            raise SystemExit(
                f"budget_curve.py: --setting {pair!r} is not KEY=VALUE with a known setting "
                "(matryoshka_sae/settings.py lists them); e.g. --setting aux_penalty=0"
            )
        try:
            settings[key] = json.loads(text)
        except json.JSONDecodeError:
            settings[key] = text
    return settings


def run_settings(args, num_tokens: int) -> dict:
    """The curve's run settings, then --setting's (which may replace any of them)."""
    base = dict(
        model_name="smollm2-135m",
        dataset_path="python-docs:train",
        device="cpu",
        model_dtype="float32",
        dict_size=args.dict_size,
        top_k=args.top_k,
        batch_size=args.batch_size,
        num_tokens=num_tokens,
        lr=args.lr,
        seed=args.seed,
        seq_len=128,
        model_batch_size=16,
        num_batches_in_buffer=8,
        n_eval_rows=16,
        wandb_mode="disabled",
        log_freq=10,
        checkpoint_freq=10**6,
        perf_log_freq=10**9,
        transcoder_target_norm=False,  # the curve's set is plain: targets in the model's units
    )
    return {**base, **extra_settings(args.setting)}


def set_cfgs(args, num_tokens: int, folder: Path, bos: int) -> list[dict]:
    from matryoshka_sae.config import post_init_cfg
    from matryoshka_sae.transcoder_set import default_set_cfg, transcoder_set_cfgs

    settings = run_settings(args, num_tokens)
    skip = settings.pop("transcoder_skip", False)  # a transcoder's setting: the set's cfgs get it
    base = post_init_cfg(default_set_cfg(**settings, bos_token_id=bos))
    return transcoder_set_cfgs(base, range(30), folder, kind="matryoshka", skip=skip)


def clt_cfgs(args, num_tokens: int, folder: Path, bos: int) -> list[dict]:
    from matryoshka_sae.cli.train_clt import CLT_DEFAULTS
    from matryoshka_sae.config import get_default_cfg, post_init_cfg

    cfg = get_default_cfg()
    cfg.update(CLT_DEFAULTS)
    cfg.update(
        run_settings(args, num_tokens),
        group_sizes=None,
        bos_token_id=bos,
        checkpoint_dir=str(folder),
        name="clt",
    )
    return [post_init_cfg(cfg)]


def held_out_tokens(model, n_rows: int, skip_rows: int = 0):
    """Rows skip_rows .. skip_rows + n_rows - 1 of the held-out split, as the stores cut rows (BOS
    first, 128 tokens): [n_rows, 128]."""
    from matryoshka_sae.activation_store import ActivationsStore
    from matryoshka_sae.config import get_default_cfg, post_init_cfg

    cfg = get_default_cfg()
    cfg.update(
        model_name="smollm2-135m",
        dataset_path="python-docs:test",
        device="cpu",
        layer=0,
        site="resid_pre",
        seq_len=128,
        model_batch_size=4,
        batch_size=64,
        num_batches_in_buffer=1,
        n_eval_rows=skip_rows + n_rows,
        exclude_bos=True,
        bos_token_id=model.tokenizer.bos_token_id,
    )
    rows = ActivationsStore(model, post_init_cfg(cfg)).get_eval_tokens(skip_rows + n_rows)
    return rows[skip_rows:]


def evaluate(what: str, trained: list, cfgs: list[dict], model, tokens) -> dict:
    from matryoshka_sae.evaluation import evaluate_clt
    from matryoshka_sae.transcoder_set import evaluate_set

    if what == "clt":
        return evaluate_clt(trained[0], model, tokens)
    return evaluate_set(trained, cfgs, model, tokens)


def snapshot(run_folder: Path, into: Path) -> None:
    """The weights and settings of every dictionary (no optimizer state), as loadable folders."""
    keep = shutil.ignore_patterns("training_state*", "*.previous.*", "*.lock", "*.tmp*")
    shutil.copytree(run_folder, into, ignore=keep)


def train(args) -> None:
    import torch

    from matryoshka_sae.model_loading import load_model
    from matryoshka_sae.sae import create_sae
    from matryoshka_sae.training import open_activation_store, train_sae_group
    from matryoshka_sae.transcoder_set import write_manifest

    started = environment()
    out = Path(args.out) / args.what
    run_folder = out / "run"
    curve_file = out / "curve.json"
    curve = json.loads(curve_file.read_text()) if curve_file.exists() else {"rows": []}
    done = {row["tokens"] for row in curve["rows"]}
    model = load_model("smollm2-135m", "cpu", torch.float32)
    bos = model.tokenizer.bos_token_id
    tokens = held_out_tokens(model, args.n_eval_rows)
    make_cfgs = set_cfgs if args.what == "set" else clt_cfgs
    seconds_before = curve["rows"][-1]["train_seconds"] if curve["rows"] else 0.0
    for budget in sorted(args.budgets):
        if budget in done:
            continue
        cfgs = make_cfgs(args, budget, run_folder, bos)
        resume = (
            [str(Path(cfg["checkpoint_dir"]) / cfg["name"]) for cfg in cfgs]
            if run_folder.exists()
            else None
        )
        if resume is None and args.what == "set":
            write_manifest(run_folder, cfgs, "matryoshka")
        start = time.perf_counter()
        store = open_activation_store(model, cfgs)
        torch.manual_seed(args.seed)
        trained = train_sae_group(
            [create_sae(cfg) for cfg in cfgs], store, None, cfgs, resume_from=resume
        )
        seconds_before += time.perf_counter() - start
        evaluate_start = time.perf_counter()
        metrics = evaluate(args.what, trained, cfgs, model, tokens)
        snapshot(run_folder, out / f"tokens_{budget}")
        row = {
            "tokens": budget,
            "train_seconds": round(seconds_before, 1),
            "evaluate_seconds": round(time.perf_counter() - evaluate_start, 1),
            "dead_latents": sum(int(t.dead_latents().sum()) for t in trained),
            "epochs_completed": getattr(store, "epochs_completed", None),
            **{
                key: metrics[key]
                for key in (
                    "loss_recovered",
                    "kl_divergence",
                    "ce_loss_clean",
                    "ce_loss_spliced",
                    "fvu_mean",
                    "fvu_max",
                    "fvu_per_layer",
                    "l0_total",
                    "l0_per_layer",
                )
            },
        }
        curve["rows"].append(row)
        curve["settings"] = {
            **run_settings(args, budget),
            "what": args.what,
            "layers": 30,
            "held_out": f"python-docs:test, first {args.n_eval_rows} rows of 128 tokens",
            "eval_tokens": int(tokens.numel()),
        }
        curve["environment_at_start"] = started
        curve_file.write_text(json.dumps(curve, indent=2) + "\n")
        print(json.dumps({k: v for k, v in row.items() if not k.endswith("per_layer")}), flush=True)


def held_out_prompts(n: int, words: int = 24, last: bool = False) -> list[str]:
    """The first `words` words of the first `n` documents of the held-out split (never trained on),
    or of its last `n` documents (`confirm`'s prompts, never used to choose a setting)."""
    from matryoshka_sae.builtin_corpus import python_docs_dataset

    documents = python_docs_dataset(split="test")["text"]
    chosen = documents[-n:] if last else documents[:n]
    return [" ".join(text.split()[:words]) for text in chosen]


def trace(args) -> None:
    """Every budget of `--what` exported to circuit-tracer's format and traced by trace_circuit.py
    (circuit-tracer's environment, .ct-venv) under its protocol, beside the two nulls, on
    `--prompts` held-out prompts: <out>/<what>/traces_<N>/trace_results.json. A plain set's or
    CLT's nulls do not depend on the trained weights: the first budget traced traces them, the
    others take them from its report (trace_circuit.py --nulls-from). A skip set's nulls keep its
    trained skip connection, so every budget traces its own."""
    out = Path(args.out) / args.what
    curve = json.loads((out / "curve.json").read_text())
    prompts = held_out_prompts(args.prompts)
    traced_nulls = None  # a budget's report whose nulls the later budgets take (--nulls-from)
    for row in curve["rows"]:
        traces = out / f"traces_{row['tokens']}"
        if (traces / "trace_results.json").is_file():
            if reusable_nulls(traces / "trace_results.json"):
                traced_nulls = traces / "trace_results.json"
            continue
        if row["tokens"] not in args.budgets:  # trace only the budgets named (default: all)
            continue
        exported, source = exported_budget(out, args.what, row["tokens"])
        print(f"tracing {args.what} at {row['tokens']:,} tokens ...", flush=True)
        run_trace(args, exported, source, traces, prompts, traced_nulls)
        if traced_nulls is None and reusable_nulls(traces / "trace_results.json"):
            traced_nulls = traces / "trace_results.json"


def exported_budget(out: Path, what: str, tokens: int) -> tuple[Path, Path]:
    """(the circuit-tracer export of a budget's snapshot, written on first use; the snapshot
    folder trace_circuit.py checks it against)."""
    from matryoshka_sae.circuit_tracer_format import (
        export_circuit_tracer,
        export_circuit_tracer_clt,
    )

    snapshot_folder = out / f"tokens_{tokens}"
    source = snapshot_folder if what == "set" else snapshot_folder / "clt"
    exported = out / f"exported_{tokens}"
    if not exported.exists():
        export = export_circuit_tracer if what == "set" else export_circuit_tracer_clt
        export(source, exported)
    return exported, source


def run_trace(args, exported: Path, source: Path, traces: Path, prompts, nulls_from) -> None:
    """trace_circuit.py in circuit-tracer's environment on `prompts`, into `traces` (its log
    beside it, `traces`.log); the nulls per --nulls, taken from `nulls_from` when given."""
    import subprocess

    command = harness.trace_command(exported, source, traces, args.max_feature_nodes, prompts)
    if not args.nulls:
        command.append("--no-nulls")
    elif nulls_from is not None:  # the same nulls at every budget: trace them once
        command += ["--nulls-from", str(nulls_from)]
    with open(traces.parent / f"{traces.name}.log", "w") as log:
        subprocess.run(command, cwd=harness.ROOT, stdout=log, stderr=subprocess.STDOUT, check=True)


def confirm(args) -> None:
    """The named budgets (--budgets) measured again on held-out text and prompts that no setting
    was chosen on: rows n_eval_rows .. 2 n_eval_rows - 1 of the held-out split (the curve and
    the levers are measured on the first n_eval_rows) and the split's last --prompts documents
    (`trace` takes its first). Into <out>/<what>/confirm_<N>/: confirm.json (every MLP replaced at
    once) and trace_results.json (trace_circuit.py's protocol, --max-feature-nodes, the nulls
    per --nulls)."""
    import torch

    from matryoshka_sae.model_loading import load_model

    out = Path(args.out) / args.what
    curve = json.loads((out / "curve.json").read_text())
    measured = {row["tokens"] for row in curve["rows"]}
    missing = sorted(set(args.budgets) - measured)
    if missing:
        raise SystemExit(
            f"budget_curve.py confirm: --budgets {missing} not trained under {out}; "
            f"trained: {sorted(measured)}"
        )
    started = environment()
    model = load_model("smollm2-135m", "cpu", torch.float32)
    tokens = held_out_tokens(model, args.n_eval_rows, skip_rows=args.n_eval_rows)
    prompts = held_out_prompts(args.prompts, last=True)
    for budget in sorted(args.budgets):
        folder = out / f"confirm_{budget}"
        folder.mkdir(exist_ok=True)
        result_file = folder / "confirm.json"
        if not result_file.is_file():
            trained, cfgs = load_budget(out, args.what, budget)
            metrics = evaluate(args.what, trained, cfgs, model, tokens)
            result = {
                "tokens": budget,
                "held_out": f"python-docs:test, rows {args.n_eval_rows} to "
                f"{2 * args.n_eval_rows - 1} of 128 tokens",
                "prompts": prompts,
                "max_feature_nodes": args.max_feature_nodes,
                **{k: v for k, v in metrics.items() if isinstance(v, (int, float, list, dict))},
                "environment": started,
            }
            result_file.write_text(json.dumps(result, indent=2) + "\n")
            print(json.dumps({k: v for k, v in result.items() if not isinstance(v, (list, dict))}))
        if not (folder / "trace_results.json").is_file():
            exported, source = exported_budget(out, args.what, budget)
            print(f"tracing {args.what} at {budget:,} tokens on the confirming prompts ...")
            run_trace(args, exported, source, folder, prompts, None)


def load_budget(out: Path, what: str, tokens: int) -> tuple[list, list[dict]]:
    """The dictionaries of a budget's snapshot (a set's 30 transcoders, or the CLT) and their cfgs."""
    from matryoshka_sae.checkpoint import load_sae
    from matryoshka_sae.transcoder_set import load_transcoder_set

    snapshot_folder = out / f"tokens_{tokens}"
    if what == "set":
        by_layer = load_transcoder_set(snapshot_folder)
        trained = [by_layer[layer] for layer in sorted(by_layer)]
    else:
        trained = [load_sae(snapshot_folder / "clt")]
    return trained, [dictionary.cfg for dictionary in trained]


def reusable_nulls(report: Path) -> bool:
    """Whether the nulls of the trace_results.json at `report` hold for the run's other budgets:
    traced, and without trained weights kept (a skip set's W_skip changes with the budget)."""
    fingerprint = json.loads(report.read_text()).get("null_fingerprint")
    return fingerprint is not None and "kept_weights_sha256" not in fingerprint


# The graph measures a report keeps: our name -> the per-graph key of trace_results.json (its mean
# over the prompts is "mean_" + that key).
GRAPH_MEASURES = {
    "replacement_score": "replacement_score",
    "completeness_score": "completeness_score",
    "feature_share": "logit_input_feature_share",
    "error_share": "logit_input_error_share",
    "token_share": "logit_input_token_share",
}


def summarise_trace(result: dict) -> dict:
    """The graph measures of one trace_results.json: the dictionary's and the two nulls' means."""
    summary = {}
    for block, prefix in (
        ("dictionary", ""),
        ("null_silent", "null_silent_"),
        ("null_random", "null_random_"),
    ):
        if block in result:
            means = result[block]
            summary.update(
                {prefix + name: means[f"mean_{key}"] for name, key in GRAPH_MEASURES.items()}
            )
    summary["prompts"] = len(result["dictionary"]["graphs"])
    return summary


# The targets of a set worth tracing, as (measure, gap from the ideal, target gap): the gap shrinks
# with the budget, and a power law g(t) = a t^b fitted to the last budgets says when it would cross.
TARGETS = {
    "fvu_mean": (lambda row: row["fvu_mean"], 0.3),
    "loss_recovered": (lambda row: 1.0 - row["loss_recovered"], 0.1),
    "kl_divergence": (lambda row: row["kl_divergence"], 1.0),
}


def least_squares_line(points: list[tuple[float, float]]) -> tuple[float, float, float]:
    """(mean x, mean y, slope) of the least-squares line through (x, y) points (at least two)."""
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum(
        (x - mean_x) ** 2 for x, _ in points
    )
    return mean_x, mean_y, slope


def crossing_budget(tokens: list[int], gaps: list[float], target: float) -> float | None:
    """The budget where a power law through the last (up to) three (tokens, gap) points reaches
    `target`: log g = a + b log t, least squares; None when the gap does not shrink (b >= 0)."""
    import math

    points = [(math.log(t), math.log(g)) for t, g in zip(tokens, gaps) if g > 0][-3:]
    if not points:
        return float(tokens[0])
    if len(points) < 2:
        return None
    mean_x, mean_y, slope = least_squares_line(points)
    if slope >= 0:
        return None
    return round(math.exp(mean_x + (math.log(target) - mean_y) / slope))


def on_prompts(result: dict, prompts: set[str]) -> dict:
    """A trace_results.json's dictionary restricted to the graphs of `prompts` (their means)."""
    return with_means(
        [graph for graph in result["dictionary"]["graphs"] if graph["prompt"] in prompts]
    )


def wider_graphs(out: Path, what: str) -> list[dict]:
    """Graphs kept with more feature nodes than the curve's, traced by hand with trace_circuit.py
    (--max-feature-nodes N --no-nulls, the curve's prompts) into <out>/<what>/traces_<S>_nodes<N>/:
    S is a budget (its exported set) or a null's name (the null's exported folder, written by an
    earlier trace into nulls/, traced as a dictionary). One row each, its node budget from the
    report's protocol; where a null was traced on fewer prompts than a budget, that budget's row
    again on the null's prompts alone, so that the two compare on the same prompts."""
    rows, budgets, nulls = [], [], []
    for path in sorted((out / what).glob("traces_*_nodes*/trace_results.json")):
        result = json.loads(path.read_text())
        subject = path.parent.name[len("traces_") :].rpartition("_nodes")[0]
        nodes = result["protocol"]["max_feature_nodes"]
        row = {"feature_nodes": nodes, **summarise_trace(result)}
        if subject.isdigit():
            row.update(dictionary=f"{what}, {nodes} feature nodes", tokens=int(subject))
            budgets.append((row, result))
        else:
            row.update(dictionary=f"{subject.replace('_', ' ')}, {nodes} feature nodes")
            nulls.append((row, result))
        rows.append(row)
    for null_row, null_result in nulls:
        prompts = {graph["prompt"] for graph in null_result["dictionary"]["graphs"]}
        for row, result in budgets:
            traced = {graph["prompt"] for graph in result["dictionary"]["graphs"]}
            if row["feature_nodes"] == null_row["feature_nodes"] and prompts < traced:
                restricted = summarise_trace(on_prompts(result, prompts))
                name = f"{row['dictionary']}, the {null_row['dictionary'].split(',')[0]}'s prompts"
                rows.append({**row, **restricted, "dictionary": name})
    return rows


# The held-out measures a `confirm` row keeps.
CONFIRMED_KEYS = ("tokens", "fvu_mean", "fvu_max", "loss_recovered", "kl_divergence", "l0_total")


def confirmed(out: Path, what: str) -> list[dict]:
    """One row for each budget `confirm` measured (<out>/<what>/confirm_<N>/): its held-out
    evaluation and, where traced, its graph measures and feature-node budget; where the trace
    stopped before its report, the means of the graphs it finished (trace_complete false). Then
    one row for each trace of the confirming prompts with another node budget, traced by hand
    with trace_circuit.py into <out>/<what>/confirm_<N>_nodes<M>/ (with the nulls, say, which
    2048 nodes make too slow): its graph measures and the nulls'."""
    rows = []
    for path in sorted((out / what).glob("confirm_*/confirm.json")):
        result = json.loads(path.read_text())
        row = {"held_out": "confirming"}
        row.update({key: result[key] for key in CONFIRMED_KEYS})
        traced = path.parent / "trace_results.json"
        graphs = [
            json.loads(g.read_text()) for g in sorted(path.parent.glob("graphs/prompt-*.json"))
        ]
        if traced.is_file():
            trace_result = json.loads(traced.read_text())
            row["feature_nodes"] = trace_result["protocol"]["max_feature_nodes"]
            row.update(summarise_trace(trace_result))
        elif graphs:  # a trace stopped before its report: the graphs it finished
            row["feature_nodes"] = result["max_feature_nodes"]
            row.update(summarise_trace(with_means(graphs)), trace_complete=False)
        rows.append(row)
    for path in sorted((out / what).glob("confirm_*_nodes*/trace_results.json")):
        result = json.loads(path.read_text())
        budget = path.parent.name[len("confirm_") :].rpartition("_nodes")[0]
        nodes = result["protocol"]["max_feature_nodes"]
        row = {"held_out": "confirming", "tokens": int(budget), "feature_nodes": nodes}
        rows.append({**row, **summarise_trace(result)})
    return rows


def with_means(graphs: list[dict]) -> dict:
    """Per-graph rows as a trace_results.json's dictionary block: the rows and their means."""
    means = {
        f"mean_{key}": sum(graph[key] for graph in graphs) / len(graphs)
        for key in GRAPH_MEASURES.values()
    }
    return {"dictionary": {**means, "graphs": graphs}}


def share_crossing(tokens: list[int], margins: list[float]) -> float | None:
    """The budget where margin = error share - feature share reaches 0 (features ahead), by a line
    in log tokens through the last (up to) three traced budgets; the first traced budget with
    margin <= 0 if one exists; None when the margin does not shrink."""
    import math

    for t, margin in zip(tokens, margins):
        if margin <= 0:
            return float(t)
    points = [(math.log(t), m) for t, m in zip(tokens, margins)][-3:]
    if len(points) < 2:
        return None
    mean_x, mean_y, slope = least_squares_line(points)
    if slope >= 0:
        return None
    return round(math.exp(mean_x - mean_y / slope))


def graph_measures(out: Path, what: str, tokens: int) -> dict:
    """The traced measures of one budget (trace_results.json of the `trace` phase), if traced."""
    path = out / what / f"traces_{tokens}" / "trace_results.json"
    if not path.is_file():
        return {}
    return summarise_trace(json.loads(path.read_text()))


def curve_rows(out: Path, what: str) -> tuple[list[dict], dict, dict] | None:
    """One dictionary's measured budgets under `out` (its curve.json and traces): (its rows, its run
    settings, the extrapolated budgets at which each measure reaches its target); None if the
    dictionary was not trained there."""
    path = out / what / "curve.json"
    if not path.is_file():
        return None
    curve = json.loads(path.read_text())
    rows = [
        {
            "dictionary": what,
            **{key: row[key] for key in CURVE_KEYS},
            **graph_measures(out, what, row["tokens"]),
        }
        for row in curve["rows"]
    ]
    tokens = [row["tokens"] for row in curve["rows"]]
    crossings = {
        name: crossing_budget(tokens, [gap(row) for row in curve["rows"]], target)
        for name, (gap, target) in TARGETS.items()
    }
    traced = [row for row in rows if "feature_share" in row]
    crossings["feature_share_above_error_share"] = share_crossing(
        [row["tokens"] for row in traced],
        [row["error_share"] - row["feature_share"] for row in traced],
    )
    return rows + wider_graphs(out, what), curve["settings"], crossings


def kept_rows(what: str) -> tuple[list[dict], dict, dict, dict] | None:
    """`what`'s rows, run settings, extrapolated budgets and environment in the committed result file
    (results/budget_curve.json): what `report` keeps for a dictionary not trained under --out, so
    that measuring one dictionary again on a fresh machine keeps the other's figures."""
    path = harness.result_path("budget_curve")
    if not path.is_file():
        return None
    earlier = json.loads(path.read_text())
    settings = earlier["settings"]
    if what not in settings["runs"]:
        return None
    rows = [
        row
        for row in earlier["rows"]
        if row["dictionary"] == what or row["dictionary"].startswith(f"{what},")
    ]
    kept = settings.get("kept_from_the_earlier_result", {}).get(what, earlier["environment"])
    return rows, settings["runs"][what], settings["extrapolated_tokens_to_target"][what], kept


# The held-out measures of a curve.json row that the report keeps.
CURVE_KEYS = (
    "tokens",
    "train_seconds",
    "fvu_mean",
    "fvu_max",
    "loss_recovered",
    "kl_divergence",
    "l0_total",
    "dead_latents",
)


def report(args) -> None:
    """Every budget's row (held-out evaluation and, where traced, the graph measures beside the two
    nulls) into results/budget_curve.json, the extrapolated budgets at which each measure reaches
    its target, and the plot docs/budget_curve.png. A dictionary not trained under --out keeps
    its rows from the result file as it was (`kept_rows`), and the notes say which."""
    out = Path(args.out)
    rows, crossings, settings, kept = [], {}, {}, {}
    for what in ("set", "clt"):
        measured = curve_rows(out, what)
        if measured is None:
            earlier = kept_rows(what)
            if earlier is None:
                continue
            *measured, kept[what] = earlier
        what_rows, settings[what], crossings[what] = measured
        rows += what_rows
    if not rows:
        raise SystemExit(
            f"budget_curve.py report: nothing trained under {out} and no earlier result: "
            "run `budget_curve.py train` first"
        )
    harness.save(
        "budget_curve",
        "Budget curve: Matryoshka set and CLT on SmolLM2-135M, 30 layers",
        rows,
        {
            "runs": settings,
            "extrapolated_tokens_to_target": crossings,
            "targets": {
                "fvu_mean": "<= 0.3",
                "loss_recovered": ">= 0.9",
                "kl_divergence": "<= 1",
                "feature_share_above_error_share": "feature share > error share after position 0",
            },
            "kept_from_the_earlier_result": kept,
        },
        notes="Held-out text: python-docs:test (never trained on); every MLP replaced at once. Each "
        "budget continues one run with a constant learning rate (the same run as one planned "
        "for that budget). extrapolated_tokens_to_target: a power law through the last three "
        "budgets' gaps (FVU; 1 - loss recovered; KL), null where the gap does not shrink; "
        "feature_share_above_error_share: a line in log tokens through the last three traced "
        "budgets' error share - feature share (a lower bound on the budget: 256 feature nodes). "
        "Graph measures: trace_circuit.py's protocol on held-out prompts, beside the two nulls, "
        "with 256 feature nodes; rows named '..., N feature nodes' keep N (the set of one budget "
        "and a null traced alone, as a dictionary, on the same prompts). "
        "kept_from_the_earlier_result: the dictionaries not trained under --out this time, whose "
        "rows and settings come from the result file as it was, each with the environment it "
        "was measured in.",
    )
    plot(rows, Path(harness.ROOT) / "docs" / "budget_curve.png")


def levers(args) -> None:
    """The set's levers side by side: every <out>/<variant>/set/curve.json (one `train` each, with
    its --setting, the same budget) into results/budget_levers.json, the baseline first; where a
    variant's budget was traced (`trace --out <out>/<variant>`), its graph measures beside its
    nulls, and its graphs kept with more feature nodes (`wider_graphs`) as rows of their own."""
    out = Path(args.out)
    rows, settings, started = [], {}, None
    for curve_file in sorted(out.glob("*/set/curve.json")):
        curve = json.loads(curve_file.read_text())
        started = started or curve.get("environment_at_start")
        variant = curve_file.parent.parent.name
        base = run_settings(build_parser().parse_args(["train"]), curve["settings"]["num_tokens"])
        recorded = {"what", "layers", "held_out", "eval_tokens", "num_tokens"}  # not settings
        changed = {
            k: v
            for k, v in curve["settings"].items()
            if k not in recorded and (k not in base or base[k] != v)
        }
        settings[variant] = changed
        named = {
            "variant": variant,
            "changed": ", ".join(f"{k}={v}" for k, v in changed.items()) or "none",
        }
        for row in curve["rows"]:
            rows.append(
                {
                    **named,
                    **{key: row[key] for key in CURVE_KEYS},
                    **graph_measures(curve_file.parent.parent, "set", row["tokens"]),
                }
            )
        rows += [{**named, **row} for row in wider_graphs(curve_file.parent.parent, "set")]
        rows += [{**named, **row} for row in confirmed(curve_file.parent.parent, "set")]
    if not rows:
        raise SystemExit(f"budget_curve.py levers: no */set/curve.json under {out}; train first")
    kept = kept_variants(rows, settings)
    rows.sort(key=lambda row: (row["changed"] != "none", row["variant"]))
    harness.save(
        "budget_levers",
        "The set's levers at one budget: SmolLM2-135M, 30 layers, held-out text",
        rows,
        {
            "variants": settings,
            "curve_settings": run_settings(args, rows[0]["tokens"]),
            "kept_from_the_earlier_result": kept,
        },
        columns=[
            "variant",
            "changed",
            "held_out",
            "tokens",
            "train_seconds",
            "fvu_mean",
            "fvu_max",
            "loss_recovered",
            "kl_divergence",
            "dead_latents",
            "feature_nodes",
            "feature_share",
            "error_share",
            "null_silent_error_share",
            "null_random_feature_share",
        ],
        environment_at_start=started,
        notes="Each variant is one budget_curve.py train run with one --setting changed from the "
        "curve's settings, one after the other on the same quiet machine; train_seconds is its "
        "wall-clock (the same steps and model passes unless batch_size changes). Held-out text: "
        "python-docs:test, every MLP replaced at once. Graph measures (where traced): "
        "trace_circuit.py's protocol on the budget curve's held-out prompts, 256 feature nodes "
        "unless feature_nodes says otherwise; a skip set's nulls keep its skip connection, so its "
        "shares compare with its own nulls, not with a plain set's. held_out 'confirming': the "
        "`confirm` phase's text and prompts, on which no setting was chosen (the other rows: the "
        "curve's). kept_from_the_earlier_result: the variants not trained under --out this time, "
        "whose rows come from the result file as it was, each with the environment it was "
        "measured in.",
    )


def kept_variants(rows: list[dict], settings: dict) -> dict:
    """Add to `rows` and `settings` the variants of the committed results/budget_levers.json that
    were not trained under --out this time (a fresh machine training one variant again keeps the
    others' figures); return {variant: the environment it was measured in}."""
    path = harness.result_path("budget_levers")
    if not path.is_file():
        return {}
    earlier = json.loads(path.read_text())
    earlier_kept = earlier["settings"].get("kept_from_the_earlier_result", {})
    kept = {}
    for row in earlier["rows"]:
        variant = row["variant"]
        if variant in settings:
            continue  # trained again under --out: its new rows stand
        rows.append(row)
        kept[variant] = earlier_kept.get(variant, earlier["environment"])
    for variant in kept:
        settings[variant] = earlier["settings"]["variants"][variant]
    return kept


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("fvu_mean", "mean per-layer FVU", 0.3),
        ("loss_recovered", "CE loss recovered", 0.9),
        ("kl_divergence", "KL (nats)", 1.0),
        ("feature_share", "logits' direct inputs", None),
    ]
    figure, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    for axis, (key, label, target) in zip(axes, panels):
        for what, colour in (("set", "tab:blue"), ("clt", "tab:orange")):
            mine = [row for row in rows if row["dictionary"] == what]
            if key == "feature_share":
                traced = [row for row in mine if "feature_share" in row]
                if traced:
                    x = [row["tokens"] for row in traced]
                    axis.plot(
                        x,
                        [row["feature_share"] for row in traced],
                        "o-",
                        color=colour,
                        label=f"{what}: features",
                    )
                    axis.plot(
                        x,
                        [row["error_share"] for row in traced],
                        "s--",
                        color=colour,
                        label=f"{what}: errors past position 0",
                    )
                    with_null = [row for row in traced if "null_random_feature_share" in row]
                    if with_null:  # a budget traced --no-nulls has none (the CLT's)
                        axis.plot(
                            [row["tokens"] for row in with_null],
                            [row["null_random_feature_share"] for row in with_null],
                            "x:",
                            color="grey",
                            label=f"random null: features ({what})",
                        )
                continue
            if mine:
                axis.plot(
                    [row["tokens"] for row in mine],
                    [row[key] for row in mine],
                    "o-",
                    color=colour,
                    label=what,
                )
        if target is not None:
            axis.axhline(target, color="red", linestyle=":", label=f"target {target:g}")
        axis.set_xscale("log")
        axis.set_xlabel("training tokens")
        axis.set_title(label)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    print(f"wrote {path}")


def check_settings(args) -> None:
    """Refuse, before the model loads, a --setting the run's cfgs reject, and one that changes none
    of them (the run already trains with that value, or the set's transcoders fix it themselves:
    a variant that would retrain the baseline under another name)."""
    make_cfgs = set_cfgs if args.what == "set" else clt_cfgs

    def cfgs_with(pairs: list[str]) -> list[dict]:
        varied = argparse.Namespace(**{**vars(args), "setting": pairs})
        return make_cfgs(varied, min(args.budgets), Path("unused"), None)

    try:
        cfgs = cfgs_with(args.setting)
    except (ValueError, TypeError) as error:
        raise SystemExit(f"budget_curve.py: {error}") from None
    for pair in args.setting:
        if cfgs_with([other for other in args.setting if other != pair]) == cfgs:
            raise SystemExit(
                f"budget_curve.py: --setting {pair} changes none of the {args.what}'s cfgs (it "
                "trains with that value already, or sets it itself); drop it or choose another"
            )


def main() -> None:
    args = build_parser().parse_args()
    if args.phase == "train":
        check_settings(args)
    {"train": train, "trace": trace, "confirm": confirm, "report": report, "levers": levers}[
        args.phase
    ](args)


if __name__ == "__main__":
    main()
