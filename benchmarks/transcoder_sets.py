"""Transcoder sets on SmolLM2-135M compared at equal width, k and tokens: Matryoshka vs plain
BatchTopK vs a skip connection, and the source they read (the MLP's normalised input
ln2.hook_normalized vs the residual stream hook_resid_mid, neither standardised per token, so that
every set exports to circuit-tracer).

    python benchmarks/transcoder_sets.py train --out runs/transcoder_sets     # results/transcoder_sets.json
    python benchmarks/transcoder_sets.py evaluate --out runs/transcoder_sets  # again, from the checkpoints
    python benchmarks/transcoder_sets.py trace --out runs/transcoder_sets     # results/transcoder_sets_tracing.json

`train` trains every variant's 30 transcoders together, 30 x variants dictionaries fed by one model
pass per chunk (training.train_sae_group on one multi-hook store: the variants see the same
batches), then evaluates each set with every MLP replaced at once (transcoder_set.evaluate_set:
CE loss recovered, KL, per-layer FVU on held-out text). `trace` exports each set to circuit-tracer's
format and runs trace_circuit.py in circuit-tracer's environment (.ct-venv) on the same prompts:
replacement and completeness scores, error share, and circuit-tracer's own spliced CE and KL.
`evaluate` does `train`'s evaluation from the sets' checkpoints, e.g. after the training run was
stopped (SIGTERM writes every dictionary's checkpoint after the same step): the rows say how many
steps the sets had.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import harness  # noqa: F401  (first: import paths)
from harness import ROOT, environment, save, trace_command, worker_env

VARIANTS = {  # name: (kind, skip, source site)
    "matryoshka": ("matryoshka", False, "ln2_normalized"),
    "batchtopk": ("batchtopk", False, "ln2_normalized"),
    "matryoshka-skip": ("matryoshka", True, "ln2_normalized"),
    "matryoshka-resid_mid": ("matryoshka", False, "resid_mid"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("phase", choices=["train", "evaluate", "trace"])
    parser.add_argument(
        "--out", default="runs/transcoder_sets", help="folder holding one set per variant"
    )
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--num-tokens", type=float, default=61440)
    parser.add_argument("--dict-size", type=int, default=1152)
    parser.add_argument("--top-k", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--n-eval-rows", type=int, default=16)
    parser.add_argument("--max-feature-nodes", type=int, default=256)
    parser.add_argument(
        "--prompts", type=int, default=3, help="trace: how many of trace_circuit.py's prompts"
    )
    return parser


def variant_cfgs(args, name: str) -> list[dict]:
    from matryoshka_sae.config import post_init_cfg
    from matryoshka_sae.transcoder_set import default_set_cfg, transcoder_set_cfgs

    kind, skip, site = VARIANTS[name]
    base = post_init_cfg(
        default_set_cfg(
            model_name="smollm2-135m",
            dataset_path="python-docs",
            device="cpu",
            model_dtype="float32",
            dict_size=args.dict_size,
            top_k=args.top_k,
            batch_size=args.batch_size,
            num_tokens=int(args.num_tokens),
            lr=args.lr,
            seq_len=128,
            model_batch_size=16,
            num_batches_in_buffer=8,
            n_eval_rows=args.n_eval_rows,
            wandb_mode="disabled",
            log_freq=5,
            checkpoint_freq=10_000,
            seed=0,
        )
    )
    return transcoder_set_cfgs(
        base, range(30), Path(args.out) / name, kind=kind, skip=skip, source_site=site
    )


def train(args) -> None:
    import torch

    from matryoshka_sae.model_loading import load_model
    from matryoshka_sae.sae import create_sae
    from matryoshka_sae.training import open_activation_store, train_sae_group
    from matryoshka_sae.transcoder_set import write_manifest

    started = environment()
    groups = {name: variant_cfgs(args, name) for name in args.variants}
    model = load_model("smollm2-135m", "cpu", torch.float32)
    for cfgs in groups.values():
        for cfg in cfgs:
            cfg["bos_token_id"] = model.tokenizer.bos_token_id
    for name, cfgs in groups.items():
        write_manifest(Path(args.out) / name, cfgs, VARIANTS[name][0])
    every = [cfg for cfgs in groups.values() for cfg in cfgs]
    store = open_activation_store(model, every)
    torch.manual_seed(0)
    trained = train_sae_group([create_sae(cfg) for cfg in every], store, None, every)
    sets, start = {}, 0
    for name, cfgs in groups.items():
        sets[name] = (trained[start : start + len(cfgs)], cfgs)
        start += len(cfgs)
    evaluate_and_save(args, model, sets, store.get_eval_tokens(args.n_eval_rows), started)


def evaluate(args) -> None:
    """`train`'s evaluation of the sets in --out, from their checkpoints."""
    import torch

    from matryoshka_sae.checkpoint import load_cfg
    from matryoshka_sae.model_loading import load_model
    from matryoshka_sae.transcoder_activation_store import TranscoderActivationsStore
    from matryoshka_sae.transcoder_set import layer_folders, load_transcoder_set

    started = environment()
    model = load_model("smollm2-135m", "cpu", torch.float32)
    sets = {}
    for name in args.variants:
        folders = layer_folders(Path(args.out) / name)
        transcoders = load_transcoder_set(Path(args.out) / name)
        sets[name] = (
            [transcoders[layer] for layer in folders],
            [load_cfg(folder) for folder in folders.values()],
        )
    # The held-out rows are the data's first rows; a store that reads layer 0 alone gives them cheaply.
    first = {**sets[args.variants[0]][1][0], "batch_size": 64, "num_batches_in_buffer": 1}
    tokens = TranscoderActivationsStore(model, first).get_eval_tokens(args.n_eval_rows)
    evaluate_and_save(args, model, sets, tokens, started)


def evaluate_and_save(args, model, sets: dict, tokens, started: dict) -> None:
    """Every set with all of its MLPs replaced at once (transcoder_set.evaluate_set) on `tokens`;
    one row per set into results/transcoder_sets.json."""
    from matryoshka_sae.checkpoint import load_metrics
    from matryoshka_sae.transcoder_set import evaluate_set

    rows = []
    for name, (transcoders, cfgs) in sets.items():
        metrics = evaluate_set(transcoders, cfgs, model, tokens)
        metrics["dead_latents_mean"] = sum(int(t.dead_latents().sum()) for t in transcoders) / len(
            transcoders
        )
        (Path(args.out) / name / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        kind, skip, site = VARIANTS[name]
        steps = load_metrics(Path(args.out) / name / cfgs[0]["name"]).get("step")
        rows.append(
            {
                "set": name,
                "kind": kind,
                "skip": skip,
                "source": site,
                "steps": steps,
                "fvu_mean": metrics["fvu_mean"],
                "fvu_max": metrics["fvu_max"],
                "loss_recovered": metrics["loss_recovered"],
                "kl_divergence": metrics["kl_divergence"],
                "ce_loss_clean": metrics["ce_loss_clean"],
                "ce_loss_spliced": metrics["ce_loss_spliced"],
                "dead_latents_mean": metrics["dead_latents_mean"],
            }
        )
        print(json.dumps(rows[-1]))
    cfg = next(iter(sets.values()))[1][0]
    settings = {
        "model": "smollm2-135m",
        "layers": len(next(iter(sets.values()))[1]),
        "dict_size": cfg["dict_size"],
        "top_k": cfg["top_k"],
        "batch_size": cfg["batch_size"],
        "planned_tokens": cfg["num_tokens"],
        "lr": cfg["lr"],
        "data": "python-docs (built-in corpus)",
        "eval_tokens": int(tokens.numel()),
        "dictionaries_trained_together": sum(len(c) for _, c in sets.values()),
    }
    save(
        "transcoder_sets",
        "Transcoder sets on SmolLM2-135M, every MLP replaced at once",
        rows,
        settings,
        environment_at_start=started,
        notes="Every set trained in the same run on the same batches (steps: the steps each set had, of "
        "planned_tokens / batch_size); evaluation on held-out rows of the built-in corpus with all "
        "MLP outputs replaced by the set's predictions at once.",
    )


def trace(args) -> None:
    """Export every set, then trace them with trace_circuit.py in circuit-tracer's environment, one
    process per set at a time (one torch thread each), and collect their trace_results.json."""
    from matryoshka_sae.circuit_tracer_format import export_circuit_tracer
    from matryoshka_sae.cli.trace_circuit import DEFAULT_PROMPTS

    started = environment()
    prompts = DEFAULT_PROMPTS[: args.prompts]
    running = {}
    for name in args.variants:
        set_folder, exported = Path(args.out) / name, Path(args.out) / f"{name}-circuit-tracer"
        if not exported.exists():
            export_circuit_tracer(set_folder, exported)
        traces = Path(args.out) / f"{name}-traces"
        command = trace_command(exported, set_folder, traces, args.max_feature_nodes, prompts)
        log = open(Path(args.out) / f"{name}-trace.log", "w")
        running[name] = subprocess.Popen(
            command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=worker_env(threads=1)
        )
    rows = []
    for name, process in running.items():
        if process.wait() != 0:
            raise SystemExit(
                f"transcoder_sets.py: tracing {name} failed; see {Path(args.out) / f'{name}-trace.log'}"
            )
        result = json.loads((Path(args.out) / f"{name}-traces" / "trace_results.json").read_text())
        rows.append(
            {
                "set": name,
                "replacement_score": result["mean_replacement_score"],
                "completeness_score": result["mean_completeness_score"],
                "error_influence_share": result["mean_error_influence_share"],
                "ce_loss_clean": result["ce_loss_clean"],
                "ce_loss_replaced": result["ce_loss_replaced"],
                "kl_divergence": result["kl_divergence"],
                "largest_layer_relative_error": max(result["layer_relative_errors"].values()),
                "seconds_per_graph": sum(g["seconds"] for g in result["graphs"])
                / len(result["graphs"]),
            }
        )
        print(json.dumps(rows[-1]))
    save(
        "transcoder_sets_tracing",
        "Transcoder sets traced with circuit-tracer 0.5.0 (SmolLM2-135M)",
        rows,
        {
            "prompts": prompts,
            "max_feature_nodes": args.max_feature_nodes,
            "circuit_tracer": "0.5.0 in .ct-venv",
        },
        environment_at_start=started,
        notes="Scores are circuit-tracer's compute_graph_scores on each prompt's graph, averaged over the "
        "prompts; CE and KL with every MLP replaced by circuit-tracer's own transcoders (the exported "
        "files) on the prompts' tokens; the largest relative error between its transcoders' outputs and "
        "ours, layer by layer, on the prompts' activations.",
    )


def main() -> None:
    args = build_parser().parse_args()
    {"train": train, "evaluate": evaluate, "trace": trace}[args.phase](args)


if __name__ == "__main__":
    main()
