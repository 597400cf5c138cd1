"""The Gemma-2 examples of the FVU and Gemma-2 guide as one script.

    python train_gemma_example.py compare      # models, activation sizes, 16x dictionaries, groups
    python train_gemma_example.py sae          # Gemma-2-2B Matryoshka SAE, layer 8 resid_pre
    python train_gemma_example.py transcoder   # Gemma-2-2B Matryoshka transcoder, layer 8 resid_mid -> mlp_out
    python train_gemma_example.py transcoder --skip   # the same with a skip connection (x W_skip)
    python train_gemma_example.py transcoder --layers all   # a transcoder set: every layer, one model pass

`compare` needs no download. `sae` and `transcoder` load the model from the Hugging Face hub (bf16,
4 token rows per forward pass) and accept the run-setting options of main.py, e.g.
``python train_gemma_example.py sae --num-tokens 5e7 --wandb-mode offline``; a stopped run continues
with ``python train_gemma_example.py sae --resume CHECKPOINT_FOLDER`` (printed on SIGTERM); on several GPUs
``torchrun --nproc_per_node 8 train_gemma_example.py sae`` (the batch is global, split over the GPUs).
"""

from __future__ import annotations

import argparse

import torch

from matryoshka_sae import distributed
from matryoshka_sae.cli.options import (
    ArgumentParser,
    add_resume_argument,
    add_run_arguments,
    add_setting_arguments,
    apply_overrides,
    check_before_loading,
    invocation,
    print_final_metrics,
    resumed_cfgs,
    run_reporting_errors,
)
from matryoshka_sae.config import (
    DICT_EXPANSION,
    MODEL_TABLE,
    get_default_cfg,
    get_model_config,
    post_init_cfg,
    split_into_groups,
)
from matryoshka_sae.transcoder_set import (
    DEFAULT_SOURCE_SITE,
    TRANSCODER_KINDS,
    default_set_cfg,
    free_set_folder,
    is_transcoder_set,
    layer_folders,
    parse_layers,
    print_set_metrics,
    read_manifest,
    train_transcoder_set,
    transcoder_set_cfgs,
)

COMPARED_MODELS = [
    "gpt2",
    "gpt2-medium",
    "gpt2-large",
    "gpt2-xl",
    "gemma-2-2b",
    "gemma-2-9b",
    "gemma-2-27b",
]

# The guide's Gemma-2-2B settings.
GEMMA_SAE = {
    "model_name": "gemma-2-2b",
    "sae_type": "matryoshka",
    "layer": 8,
    "site": "resid_pre",
    "dict_size": 36864,
    "group_sizes": [2304, 4608, 9216, 20736],
    "top_k": 96,
    "model_batch_size": 4,
    "model_dtype": torch.bfloat16,
}
GEMMA_TRANSCODER = {
    "model_name": "gemma-2-2b",
    "layer": 8,
    "dict_size": 18432,
    "group_sizes": [2304, 4608, 6912, 4608],
    "top_k": 64,
    "model_batch_size": 4,
    "model_dtype": torch.bfloat16,
}


def model_table() -> str:
    """The guide's model table: activation size, layers, 16x dictionary and its 1:2:4:9 groups."""
    header = (
        f"{'Model':<12} {'Act size':>8} {'Layers':>6} {'Dict (16x)':>10}  Group sizes (1:2:4:9)"
    )
    lines = [header, "-" * len(header)]
    for name in COMPARED_MODELS:
        facts = MODEL_TABLE[name]
        dict_size = DICT_EXPANSION * facts["act_size"]
        lines.append(
            f"{name:<12} {facts['act_size']:>8} {facts['n_layers']:>6} {dict_size:>10}  "
            f"{split_into_groups(dict_size)}"
        )
    return "\n".join(lines)


def sae_cfg(args: argparse.Namespace | None = None) -> dict:
    """The guide's Gemma-2-2B Matryoshka SAE cfg, with command-line overrides."""
    cfg = get_default_cfg()
    cfg.update(GEMMA_SAE)
    return post_init_cfg(apply_overrides(cfg, args))


def transcoder_cfg(args: argparse.Namespace | None = None) -> dict:
    """The guide's Example 2: a Gemma-2-2B transcoder from resid_mid to mlp_out of layer 8."""
    from matryoshka_sae.transcoder_activation_store import create_transcoder_config

    cfg = get_default_cfg()
    cfg.update(GEMMA_TRANSCODER)
    cfg = apply_overrides(cfg, args)
    cfg["transcoder_skip"] = getattr(args, "transcoder_skip", False)
    cfg["transcoder_target_norm"] = bool(getattr(args, "transcoder_target_norm", None))
    return create_transcoder_config(
        cfg,
        source_layer=cfg["layer"],
        target_layer=cfg["layer"],
        source_site=getattr(args, "source_site", None) or "resid_mid",
        target_site=getattr(args, "target_site", "mlp_out"),
    )


def train(cfg: dict, resume_from: str | None = None, overwrite: bool = False) -> None:
    """Load the model, open the activation stream and train the dictionary that cfg describes
    (continuing the checkpoint in `resume_from` when given)."""
    # Imported here so that `compare` and --help load no model stack.
    from matryoshka_sae.training import train_from_cfgs

    try:
        distributed.init_from_env(cfg)  # under torchrun: join the other ranks, one device each
        check_before_loading([cfg], None if resume_from is None else [resume_from], overwrite)
        if distributed.is_main_process():
            print(f"Training {cfg['name']} on {cfg['device']} ({distributed.world_size()} rank(s))")
        train_from_cfgs([cfg], resume_from=None if resume_from is None else [resume_from])
        if distributed.is_main_process():
            print_final_metrics(cfg)
    finally:
        distributed.shut_down()


def set_cfgs(args: argparse.Namespace) -> list[dict]:
    """The cfgs of the transcoder set that `args` asks for (--layers, --kind, --skip, run settings):
    the guide's transcoder settings with the set's exportable defaults, one cfg per layer, in a
    new folder ``checkpoint_dir / <model>_transcoder-set_<kind>_<source>_<width>_k<k>`` (``-2``,
    ``-3``... when taken; created when the run claims its layer folders)."""
    cfg = default_set_cfg(**GEMMA_TRANSCODER)
    if args.transcoder_target_norm is not None:  # unset: the set's default (SET_DEFAULTS)
        cfg["transcoder_target_norm"] = args.transcoder_target_norm
    cfg = post_init_cfg(apply_overrides(cfg, args))
    layers = parse_layers(
        args.layers, cfg["n_layers"] or get_model_config(cfg["model_name"])["n_layers"]
    )
    source_site = args.source_site or DEFAULT_SOURCE_SITE
    name = (
        f"{cfg['model_name'].replace('/', '_')}_transcoder-set_{args.kind}{'-skip' if args.transcoder_skip else ''}_"
        f"{source_site}_{cfg['dict_size']}_k{cfg['top_k']}"
    )
    folder = free_set_folder(cfg["checkpoint_dir"], name)
    return transcoder_set_cfgs(
        cfg,
        layers,
        folder,
        kind=args.kind,
        skip=args.transcoder_skip,
        source_site=source_site,
        target_site=args.target_site,
    )


def train_set(args: argparse.Namespace) -> None:
    """Train (or, with --resume SET_FOLDER, continue) a transcoder set, then print where it is."""
    from matryoshka_sae.model_loading import load_model

    resume_from = None
    if args.resume:
        if len(args.resume) != 1:
            raise ValueError(
                f"--resume takes the one folder of a transcoder set; got {len(args.resume)}."
            )
        resume_from = [str(folder) for folder in layer_folders(args.resume[0]).values()]
        cfgs = resumed_cfgs(resume_from, args)
        kind = read_manifest(args.resume[0])["kind"]
    else:
        cfgs = set_cfgs(args)
        kind = args.kind
    try:
        distributed.init_from_env(cfgs[0])
        check_before_loading(cfgs, resume_from, args.overwrite)
        set_folder = cfgs[0]["checkpoint_dir"]
        if distributed.is_main_process():
            print(
                f"Training a {kind} transcoder set of {len(cfgs)} layer(s) into {set_folder} on "
                f"{cfgs[0]['device']} ({distributed.world_size()} rank(s))"
            )
        model = load_model(cfgs[0]["model_name"], cfgs[0]["device"], cfgs[0]["model_dtype"])
        for (
            cfg
        ) in cfgs:  # rows start with BOS (circuit-tracer zeroes position 0), left out of training
            if cfg["bos_token_id"] is None and model.tokenizer is not None:
                cfg["bos_token_id"] = model.tokenizer.bos_token_id
        train_transcoder_set(model, cfgs, kind=kind, resume=bool(args.resume))
        if distributed.is_main_process():
            print_set_metrics(set_folder)
    finally:
        distributed.shut_down()


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("compare", help="print the model table (no download)")
    sae = commands.add_parser("sae", help="train the Gemma-2-2B Matryoshka SAE")
    add_run_arguments(sae, exclude=("--sae-type",))  # the guide's Matryoshka SAE
    add_resume_argument(sae)
    transcoder = commands.add_parser(
        "transcoder", help="train the Gemma-2-2B Matryoshka transcoder"
    )
    add_run_arguments(transcoder, exclude=("--site", "--sae-type"))
    add_resume_argument(transcoder)
    transcoder.add_argument(
        "--layers",
        metavar="LAYERS",
        help="train a transcoder set, one transcoder per layer from one model pass: 'all' "
        "(what circuit-tracer needs), a list 0,3,5 or a range 0-11; see "
        "docs/transcoder_sets.md",
    )
    transcoder.add_argument(
        "--kind",
        choices=list(TRANSCODER_KINDS),
        default="matryoshka",
        help="with --layers: Matryoshka BatchTopK (default), plain BatchTopK or per-token TopK",
    )
    # --source-site (unset: resid_mid, with --layers DEFAULT_SOURCE_SITE), --target-site, --skip,
    # --target-norm
    add_setting_arguments(
        transcoder,
        ("source_site", "target_site", "transcoder_skip", "transcoder_target_norm"),
        {"target_site": "mlp_out", "transcoder_target_norm": None},
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "compare":
        print(model_table())
        return
    run_reporting_errors(
        lambda: run(args),
        resume_command=f"{invocation('train_gemma_example.py')} {args.command}",
        debug=args.debug,
    )


def run(args: argparse.Namespace) -> None:
    """Train the `sae` or `transcoder` of `args`, or continue it (--resume FOLDER)."""
    if args.command == "transcoder" and (
        args.layers or (args.resume and is_transcoder_set(args.resume[0]))
    ):
        train_set(args)
        return
    if args.resume:
        if len(args.resume) != 1:
            raise ValueError(f"--resume takes one checkpoint folder here; got {len(args.resume)}.")
        train(resumed_cfgs(args.resume, args)[0], resume_from=args.resume[0])
    else:
        train(
            sae_cfg(args) if args.command == "sae" else transcoder_cfg(args),
            overwrite=args.overwrite,
        )


if __name__ == "__main__":
    main()
