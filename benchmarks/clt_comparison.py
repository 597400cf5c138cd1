"""Cross-layer transcoders against the per-layer transcoder set on SmolLM2-135M: a Matryoshka CLT, a
plain BatchTopK CLT and a Matryoshka transcoder set over all 30 layers, at equal latents (S a layer),
equal L0 summed over layers (k a layer: global BatchTopK over k L a token for the CLTs, k in each
transcoder of the set), the same tokens, batches, learning rate and seed; and two more Matryoshka
CLTs that reach that L0 differently: BatchTopK within each source layer (k a layer) and JumpReLU
thresholds steered to a mean L0 of k L by the quadratic target-L0 objective.

    python benchmarks/clt_comparison.py train --out runs/clt_comparison      # one process per dictionary
    python benchmarks/clt_comparison.py evaluate --out runs/clt_comparison   # -> results/clt_comparison.json
    python benchmarks/clt_comparison.py trace --out runs/clt_comparison      # -> results/clt_comparison_tracing.json

`train` trains each case with the library's own commands (train_clt.py train [--plain | --sparsity
per_layer | --sparsity jumprelu --target-l0 k], train_gemma_example.py transcoder --layers all), one
process at a time, and records each
process's wall time and peak resident memory (os.wait4 of that process) in <out>/runs.json.
`evaluate` loads the three from their checkpoints and replaces every MLP output at once on the same
held-out rows (evaluation.evaluate_replacement through evaluation.evaluate_clt and
transcoder_set.evaluate_set): CE loss, loss recovered, KL, per-layer FVU, dead latents.
`trace` exports each to circuit-tracer's format and runs trace_circuit.py in circuit-tracer's
environment (.ct-venv) on the same prompts, one process per dictionary (its peak memory measured
the same way): replacement and completeness scores, the mean path length of the pruned graphs,
seconds per prompt and where they go (circuit-tracer's phases), circuit-tracer's own spliced CE/KL.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import harness  # noqa: F401  (first: import paths)
from harness import ROOT, environment, save, trace_command, worker_env

CASES = (
    "matryoshka-clt",
    "batchtopk-clt",
    "matryoshka-set",
    "matryoshka-clt-per-layer",
    "matryoshka-clt-jumprelu",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("phase", choices=["train", "evaluate", "trace"])
    parser.add_argument(
        "--out", default="runs/clt_comparison", help="folder holding one run per case"
    )
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--num-tokens", type=float, default=81920)
    parser.add_argument("--dict-size", type=int, default=256, help="latents a layer")
    parser.add_argument("--group-sizes", type=int, nargs="+", default=[16, 32, 64, 144])
    parser.add_argument("--top-k", type=int, default=8, help="active latents a layer and token")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=49)
    parser.add_argument("--n-eval-rows", type=int, default=16)
    parser.add_argument("--max-feature-nodes", type=int, default=256)
    parser.add_argument(
        "--prompts", type=int, default=3, help="trace: how many of trace_circuit.py's prompts"
    )
    return parser


def train_command(case: str, args, folder: Path) -> list[str]:
    """The library's own command that trains `case` into `folder`."""
    shared = [
        "--dict-size",
        str(args.dict_size),
        "--top-k",
        str(args.top_k),
        "--batch-size",
        str(args.batch_size),
        "--num-tokens",
        str(int(args.num_tokens)),
        "--lr",
        str(args.lr),
        "--seed",
        str(args.seed),
        "--n-eval-rows",
        str(args.n_eval_rows),
        "--seq-len",
        "128",
        "--model-batch-size",
        "8",
        "--num-batches-in-buffer",
        "8",
        "--model-dtype",
        "float32",
        "--checkpoint-dir",
        str(folder),
        "--checkpoint-freq",
        "1000000",
        "--wandb-mode",
        "disabled",
    ]
    groups = ["--group-sizes", *map(str, args.group_sizes)]
    if case == "matryoshka-clt":
        return [sys.executable, "train_clt.py", "train", "--layers", "all", *shared, *groups]
    if case == "batchtopk-clt":
        return [sys.executable, "train_clt.py", "train", "--layers", "all", "--plain", *shared]
    if case == "matryoshka-clt-per-layer":
        return [
            sys.executable,
            "train_clt.py",
            "train",
            "--layers",
            "all",
            "--sparsity",
            "per_layer",
            *shared,
            *groups,
        ]
    if (
        case == "matryoshka-clt-jumprelu"
    ):  # target L0 k a layer, summed over layers (the quadratic objective)
        return [
            sys.executable,
            "train_clt.py",
            "train",
            "--layers",
            "all",
            "--sparsity",
            "jumprelu",
            "--target-l0",
            str(args.top_k),
            *shared,
            *groups,
        ]
    return [
        sys.executable,
        "train_gemma_example.py",
        "transcoder",
        "--layers",
        "all",
        "--kind",
        "matryoshka",
        "--model",
        "smollm2-135m",
        "--dataset",
        "python-docs:train",
        *shared,
        *groups,
    ]


def run_measured(command: list[str], log: Path, env: dict | None = None) -> tuple[float, float]:
    """Run `command` from the repository root, output to `log`; (seconds, peak resident MB of that process)."""
    with open(log, "w") as out:
        start = time.perf_counter()
        process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"clt_comparison.py: {' '.join(command[1:3])} failed; see {log}")
    return seconds, usage.ru_maxrss / 1024


def run_folder(case: str, out: Path) -> Path:
    """The checkpoint (CLT) or set folder that `train` wrote for `case`."""
    (folder,) = [p for p in (out / case).iterdir() if p.is_dir()]
    return folder


def train(args) -> None:
    out = Path(args.out)
    runs_file = out / "runs.json"
    runs = json.loads(runs_file.read_text()) if runs_file.exists() else {}
    for case in args.cases:
        (out / case).mkdir(parents=True, exist_ok=False)
        print(f"training {case} ...", flush=True)
        seconds, peak_mb = run_measured(
            train_command(case, args, out / case), out / f"{case}-train.log", env=worker_env()
        )
        runs[case] = {
            "folder": str(run_folder(case, out)),
            "train_seconds": round(seconds, 1),
            "train_peak_rss_mb": round(peak_mb),
            "settings": {k: v for k, v in vars(args).items() if k not in ("phase", "cases")},
        }
        runs_file.write_text(json.dumps(runs, indent=2) + "\n")
        print(f"{case}: {seconds:.0f} s, peak {peak_mb:.0f} MB", flush=True)


def load_case(case: str, folder: Path):
    """(dictionaries, cfgs) of a case: the CLT alone, or the set's transcoders in layer order."""
    from matryoshka_sae.checkpoint import load_cfg, load_sae
    from matryoshka_sae.transcoder_set import layer_folders

    if "-clt" in case:
        clt = load_sae(folder)
        return [clt], [clt.cfg]
    folders = layer_folders(folder)
    return [load_sae(f) for f in folders.values()], [load_cfg(f) for f in folders.values()]


def evaluate(args) -> None:
    """Every case with all 30 MLP outputs replaced at once, on the same held-out rows."""
    import torch

    from matryoshka_sae.activation_store import ActivationsStore
    from matryoshka_sae.evaluation import evaluate_clt
    from matryoshka_sae.model_loading import load_model
    from matryoshka_sae.transcoder_set import evaluate_set

    started = environment()
    out = Path(args.out)
    runs = json.loads((out / "runs.json").read_text())
    model = load_model("smollm2-135m", "cpu", torch.float32)
    rows = []
    for case in args.cases:
        saes, cfgs = load_case(case, Path(runs[case]["folder"]))
        if (
            not rows
        ):  # the held-out rows: the data's first n_eval_rows rows, as every store serves them
            first = {
                **cfgs[0],
                "sae_type": "matryoshka",
                "hook_point": "blocks.0.hook_resid_pre",
                "layer": 0,
                "batch_size": 64,
                "num_batches_in_buffer": 1,
            }
            tokens = ActivationsStore(model, first).get_eval_tokens(cfgs[0]["n_eval_rows"])
        if "-clt" in case:
            metrics = evaluate_clt(saes[0], model, tokens)
        else:
            metrics = evaluate_set(saes, cfgs, model, tokens)
        dead = sum(int(sae.dead_latents().sum()) for sae in saes)
        latents = sum(sae.n_latents for sae in saes)
        (out / f"{case}-metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        rows.append(
            {
                "case": case,
                "latents": latents,
                "groups": cfgs[0]["group_sizes"],
                "l0_total": round(metrics["l0_total"], 1),
                "loss_recovered": round(metrics["loss_recovered"], 4),
                "kl": round(metrics["kl_divergence"], 4),
                "ce_clean": round(metrics["ce_loss_clean"], 4),
                "ce_spliced": round(metrics["ce_loss_spliced"], 4),
                "fvu_mean": round(metrics["fvu_mean"], 4),
                "fvu_max": round(metrics["fvu_max"], 4),
                "dead_latents": dead,
                "train_seconds": round(runs[case]["train_seconds"]),
                "train_peak_rss_mb": runs[case]["train_peak_rss_mb"],
                "fvu_per_layer": {k: round(v, 4) for k, v in metrics["fvu_per_layer"].items()},
                "l0_per_layer": {k: round(v, 2) for k, v in metrics["l0_per_layer"].items()},
            }
        )
        print(
            json.dumps({k: v for k, v in rows[-1].items() if not isinstance(v, dict)}), flush=True
        )
    settings = dict(
        runs[args.cases[0]]["settings"],
        model="smollm2-135m",
        layers="0-29",
        source="ln2_normalized",
        target="mlp_out",
        data="python-docs:train",
        eval_tokens=int(tokens.numel()),
    )
    save(
        "clt_comparison",
        "Cross-layer transcoders vs the per-layer transcoder set, SmolLM2-135M, all 30 layers",
        rows,
        settings,
        environment_at_start=started,
        columns=[
            "case",
            "latents",
            "l0_total",
            "loss_recovered",
            "kl",
            "ce_spliced",
            "fvu_mean",
            "fvu_max",
            "dead_latents",
            "train_seconds",
            "train_peak_rss_mb",
        ],
        notes="One run each, same seed, tokens and batches; every MLP output replaced at once on held-out rows "
        "of the built-in corpus (BOS kept); l0_total: active latents a token summed over layers, "
        "measured there; train_seconds and train_peak_rss_mb: the training process (model passes, "
        "training, final evaluation) on this machine's CPU.",
    )


def trace(args) -> None:
    """Export every case, then trace each with trace_circuit.py in circuit-tracer's environment, one
    process at a time (its wall time and peak memory its own), and collect their trace_results.json."""
    from matryoshka_sae.circuit_tracer_format import (
        export_circuit_tracer,
        export_circuit_tracer_clt,
    )
    from matryoshka_sae.cli.trace_circuit import DEFAULT_PROMPTS

    started = environment()
    out = Path(args.out)
    runs = json.loads((out / "runs.json").read_text())
    prompts = DEFAULT_PROMPTS[: args.prompts]
    rows = []
    for case in args.cases:
        folder, exported, traces = (
            Path(runs[case]["folder"]),
            out / f"{case}-circuit-tracer",
            out / f"{case}-traces",
        )
        if not exported.exists():
            (export_circuit_tracer_clt if "-clt" in case else export_circuit_tracer)(
                folder, exported
            )
        command = trace_command(exported, folder, traces, args.max_feature_nodes, prompts)
        print(f"tracing {case} ...", flush=True)
        seconds, peak_mb = run_measured(command, out / f"{case}-trace.log", env=worker_env())
        result = json.loads((traces / "trace_results.json").read_text())
        graphs = result["graphs"]
        phases = {
            phase: round(sum(g["phase_seconds"].get(phase, 0.0) for g in graphs) / len(graphs), 1)
            for phase in (
                "precomputation",
                "forward_pass",
                "logit_attributions",
                "feature_attributions",
            )
        }
        rows.append(
            {
                "case": case,
                "replacement_score": round(result["mean_replacement_score"], 4),
                "completeness_score": round(result["mean_completeness_score"], 4),
                "error_influence_share": round(result["mean_error_influence_share"], 4),
                "feature_nodes_per_path": round(result["mean_feature_nodes_per_path"], 3),
                "multi_hop_share": round(result["mean_multi_hop_share"], 3),
                "feature_nodes_per_feature_path": round(
                    result["mean_feature_nodes_per_feature_path"], 3
                ),
                "multi_hop_share_of_feature_paths": round(
                    result["mean_multi_hop_share_of_feature_paths"], 3
                ),
                "pruned_feature_nodes": round(
                    sum(g["pruned_feature_nodes"] for g in graphs) / len(graphs), 1
                ),
                "active_features": round(sum(g["n_active_features"] for g in graphs) / len(graphs)),
                "decoder_vectors": round(sum(g["decoder_vectors"] for g in graphs) / len(graphs)),
                "seconds_per_prompt": round(result["mean_seconds"], 1),
                **{f"{k}_s": v for k, v in phases.items()},
                "peak_rss_mb": round(peak_mb),
                "process_seconds": round(seconds),
                "ce_clean": round(result["ce_loss_clean"], 4),
                "ce_replaced": round(result["ce_loss_replaced"], 4),
                "kl": round(result["kl_divergence"], 4),
                "largest_relative_error": max(result["layer_relative_errors"].values()),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    save(
        "clt_comparison_tracing",
        "CLTs vs the transcoder set traced with circuit-tracer 0.5.0 (SmolLM2-135M)",
        rows,
        {
            "prompts": prompts,
            "max_feature_nodes": args.max_feature_nodes,
            "attribution_batch_size": 64,
            "pruning": "node 0.8, edge 0.98 (circuit-tracer's defaults)",
            "circuit_tracer": "0.5.0 in .ct-venv",
            "threads": "all (2 cores)",
        },
        environment_at_start=started,
        columns=[
            "case",
            "replacement_score",
            "completeness_score",
            "error_influence_share",
            "feature_nodes_per_feature_path",
            "multi_hop_share_of_feature_paths",
            "active_features",
            "decoder_vectors",
            "seconds_per_prompt",
            "feature_attributions_s",
            "peak_rss_mb",
            "ce_replaced",
            "kl",
        ],
        notes="Means over the prompts. Scores: circuit-tracer's compute_graph_scores. feature_nodes_per_path: "
        "the expected number of feature nodes on a path of the pruned graph from the logits back to a "
        "token or error node, paths weighted by their normalised absolute edge weights "
        "(graph_measures.mean_path_length); multi_hop_share: the weight of paths through two or more; "
        "*_of_feature_paths / *_per_feature_path: the same among the paths through at least one feature. "
        "decoder_vectors: one per active feature for the set, L - j for a CLT feature of layer j. "
        "Seconds by phase from circuit-tracer's own log; peak_rss_mb: the tracing process. CE and KL with "
        "every MLP replaced by circuit-tracer's own loaded transcoders, on the prompts' tokens.",
    )


def main() -> None:
    args = build_parser().parse_args()
    {"train": train, "evaluate": evaluate, "trace": trace}[args.phase](args)


if __name__ == "__main__":
    main()
