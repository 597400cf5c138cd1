"""Train a Matryoshka cross-layer transcoder (CLT), evaluate it with every MLP replaced, export it to
circuit-tracer. Offline with SmolLM2 and the built-in corpus:

    python train_clt.py train --model smollm2-135m --dataset python-docs:train --dict-size 1152 --top-k 16 --num-tokens 2e6
    python train_clt.py train ... --plain                 # one group: a plain BatchTopK CLT
    python train_clt.py train ... --sparsity per_layer    # BatchTopK within each source layer
    python train_clt.py train ... --sparsity jumprelu --target-l0 16   # a learned threshold per latent
    python train_clt.py train --resume checkpoints/<run>  # continue a run (after SIGTERM, a crash...)
    python train_clt.py evaluate checkpoints/<run>        # every MLP replaced at once: CE, KL, per-layer FVU
                                                          # (into <run>/clt_metrics.json)
    python train_clt.py export checkpoints/<run> exported/<name>   # circuit-tracer's CLT folder
    .ct-venv/bin/python trace_circuit.py exported/<name> --from checkpoints/<run> --out traces/<name>

A CLT's latents at layer j read that layer's source (--source-site, default the MLP's normalised
input ln2_normalized) and write the target (mlp_out) of layer j and of every later layer; see
sae.MatryoshkaCrossLayerTranscoder and docs/cross_layer_transcoders.md. --dict-size and --top-k count
per source layer (a CLT over L layers has L x dict-size latents and keeps L x top-k per token), and so
does --target-l0, the mean L0 a jumprelu CLT is steered to (L x target-l0 per token in all). One
model pass per chunk of text feeds every layer (the multi-hook store); training is the library's
loop (tqdm with the per-layer FVU range, wandb, checkpoints, exact resume, SIGTERM, torchrun). The
final evaluation goes to <run>/clt_metrics.json. The export is read by circuit-tracer's own loader
(`circuit_tracer_format.load_clt_in_circuit_tracer`, in its environment .ct-venv); trace_circuit.py
traces attribution graphs through it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from matryoshka_sae import distributed
from matryoshka_sae.cli.options import (
    add_debug_argument,
    add_resume_argument,
    add_run_arguments,
    add_setting_arguments,
    apply_overrides,
    check_before_loading,
    invocation,
    resumed_cfgs,
    run_reporting_errors,
)
from matryoshka_sae.config import CLT_DEFAULT_SITES, get_default_cfg, post_init_cfg

METRICS_FILE = "clt_metrics.json"

# The script's defaults: SmolLM2 offline, exportable to circuit-tracer (no per-token standardisation,
# BOS left out as circuit-tracer zeroes position 0), 2 x d_model latents per layer.
CLT_DEFAULTS = dict(
    sae_type="matryoshka_clt",
    model_name="smollm2-135m",
    dataset_path="python-docs:train",
    layer=0,
    input_unit_norm=False,
    exclude_bos=True,
    top_k=16,
    batch_size=1024,
    lr=3e-4,
    num_tokens=int(2e6),
    seq_len=128,
    model_batch_size=8,
    num_batches_in_buffer=8,
    checkpoint_freq=500,
    perf_log_freq=10**9,
)


def clt_cfg(args: argparse.Namespace | None = None) -> dict:
    """The script's CLT settings, then the command line's (--layers, --plain, --sparsity, sites)."""
    cfg = get_default_cfg()
    cfg.update(CLT_DEFAULTS, dict_size=None, group_sizes=None)
    if args is not None:
        cfg = apply_overrides(cfg, args)
        cfg.update(
            clt_sparsity=args.clt_sparsity,
            source_site=args.source_site,
            target_site=args.target_site,
        )
    model = post_init_cfg(
        {**cfg, "dict_size": 64, "group_sizes": None}
    )  # the model's width and depth
    if cfg["dict_size"] is None:
        cfg.update(dict_size=2 * model["act_size"], group_sizes=None)
    if args is not None and args.layers != "all":
        from matryoshka_sae.transcoder_set import parse_layers

        cfg["clt_layers"] = parse_layers(args.layers, model["n_layers"])
    if args is not None and args.plain:
        cfg["group_sizes"] = [cfg["dict_size"]]
    return post_init_cfg(cfg)


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------


def train(args: argparse.Namespace) -> None:
    from matryoshka_sae.model_loading import load_model
    from matryoshka_sae.sae import create_sae
    from matryoshka_sae.training import open_activation_store, train_sae_group

    if args.resume:
        if len(args.resume) != 1:
            raise ValueError(f"--resume takes one checkpoint folder; got {len(args.resume)}.")
        cfg, resume_from = resumed_cfgs(args.resume, args)[0], [args.resume[0]]
    else:
        cfg, resume_from = clt_cfg(args), None
    distributed.init_from_env(cfg)
    check_before_loading([cfg], resume_from, overwrite=args.overwrite)
    if distributed.is_main_process():
        n = len(cfg["clt_layers"])
        sparsity = (
            f"target L0 {cfg['target_l0']:g}"
            if cfg["clt_sparsity"] == "jumprelu"
            else f"k {cfg['top_k']}"
        )
        print(
            f"Training a cross-layer transcoder over {n} layers ({cfg['source_site']} -> {cfg['target_site']}), "
            f"{cfg['dict_size']} latents a layer in groups {cfg['group_sizes']}, {sparsity} per layer "
            f"({cfg['clt_sparsity']}), on {cfg['device']} ({distributed.world_size()} rank(s))"
        )
    model = load_model(cfg["model_name"], cfg["device"], cfg["model_dtype"])
    if cfg["bos_token_id"] is None and model.tokenizer is not None:
        cfg["bos_token_id"] = model.tokenizer.bos_token_id
    store = open_activation_store(model, [cfg])
    clt = train_sae_group([create_sae(cfg)], store, None, [cfg], resume_from=resume_from)[0]
    if distributed.is_main_process():
        from matryoshka_sae.checkpoint import atomic_write, checkpoint_folder
        from matryoshka_sae.evaluation import evaluate_clt

        metrics = evaluate_clt(clt, model, store.get_eval_tokens(cfg["n_eval_rows"]))
        folder = checkpoint_folder(cfg)
        text = json.dumps(metrics, indent=2) + "\n"
        atomic_write(folder / METRICS_FILE, lambda tmp: tmp.write_text(text))
        print_metrics(folder, metrics)


def print_metrics(folder, metrics: dict) -> None:
    print(
        f"{folder}: every MLP replaced: loss recovered {metrics['loss_recovered']:.4g}, KL "
        f"{metrics['kl_divergence']:.4g}, CE {metrics['ce_loss_clean']:.4g} -> {metrics['ce_loss_spliced']:.4g}; "
        f"per-layer FVU mean {metrics['fvu_mean']:.4g}, max {metrics['fvu_max']:.4g}; L0 {metrics['l0_total']:.1f}"
    )


def evaluate(args: argparse.Namespace) -> None:
    from matryoshka_sae.activation_store import ActivationsStore
    from matryoshka_sae.checkpoint import atomic_write, load_sae
    from matryoshka_sae.evaluation import evaluate_clt
    from matryoshka_sae.model_loading import load_model

    clt = load_sae(args.checkpoint, device=args.device)
    cfg = clt.cfg
    model = load_model(cfg["model_name"], cfg["device"], cfg["model_dtype"])
    if cfg["bos_token_id"] is None and model.tokenizer is not None:
        cfg["bos_token_id"] = model.tokenizer.bos_token_id
    tokens = ActivationsStore(
        model,
        {**cfg, "sae_type": "matryoshka", "hook_point": "blocks.0.hook_resid_pre", "layer": 0},
    ).get_eval_tokens(cfg["n_eval_rows"])
    metrics = evaluate_clt(clt, model, tokens)
    text = json.dumps(metrics, indent=2) + "\n"
    atomic_write(Path(args.checkpoint) / METRICS_FILE, lambda tmp: tmp.write_text(text))
    print(text, end="")
    print_metrics(args.checkpoint, metrics)


def export(args: argparse.Namespace) -> None:
    from matryoshka_sae.circuit_tracer_format import export_circuit_tracer_clt

    out = export_circuit_tracer_clt(
        args.checkpoint, args.out_dir, scan=args.scan, overwrite=args.overwrite
    )
    print(
        f"Wrote {out}: circuit-tracer cross_layer_transcoder. Trace with it in circuit-tracer's environment "
        f"(bash setup_circuit_tracer_env.sh): .ct-venv/bin/python trace_circuit.py {out} --from {args.checkpoint} "
        f"--out traces/{Path(out).name}"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    train_parser = commands.add_parser("train", help="train a cross-layer transcoder")
    add_run_arguments(train_parser, exclude=("--site", "--layer", "--hook-point", "--sae-type"))
    add_resume_argument(train_parser)
    add_setting_arguments(train_parser, ("clt_sparsity",))  # --sparsity
    train_parser.add_argument(
        "--plain", action="store_true", help="one group: a plain CLT, no Matryoshka prefixes"
    )
    train_parser.add_argument(
        "--layers",
        default="all",
        help="the layers it reads and writes: 'all' (default; "
        "what circuit-tracer needs), a range 0-9 or a list 0,1,2",
    )
    # --source-site and --target-site, by default ln2_normalized -> mlp_out
    add_setting_arguments(train_parser, ("source_site", "target_site"), CLT_DEFAULT_SITES)
    evaluate_parser = commands.add_parser(
        "evaluate", help="every MLP replaced at once: CE, KL, per-layer FVU"
    )
    evaluate_parser.add_argument("checkpoint")
    evaluate_parser.add_argument("--device", default=None)
    add_debug_argument(evaluate_parser)
    export_parser = commands.add_parser(
        "export", help="write circuit-tracer's cross_layer_transcoder folder"
    )
    export_parser.add_argument("checkpoint")
    export_parser.add_argument("out_dir")
    export_parser.add_argument("--scan", help="the viewer's feature location (default <model>-clt)")
    export_parser.add_argument(
        "--overwrite", action="store_true", help="replace OUT_DIR if it exists"
    )
    add_debug_argument(export_parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    work = {"train": train, "evaluate": evaluate, "export": export}[args.command]
    run_reporting_errors(
        lambda: work(args), resume_command=f"{invocation('train_clt.py')} train", debug=args.debug
    )


if __name__ == "__main__":
    main()
