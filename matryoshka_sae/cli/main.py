"""The original repository's run: BatchTopK SAEs of several sparsities and one Matryoshka SAE,
trained together on one activation stream of GPT-2 small (layer 8, resid_pre).

    python main.py --demo                            # offline demo: SmolLM2 + Python docs, on a CPU
    python main.py                                   # the defaults of config.get_default_cfg()
    python main.py --num-tokens 2e7 --batchtopk-k 16 32 --wandb-mode offline
    python main.py --model gemma-2-2b --model-dtype bfloat16 --model-batch-size 4
    python main.py --resume checkpoints/a checkpoints/b ...   # continue a stopped run (printed on SIGTERM)
    python main.py --demo --resume checkpoints/<demo run>     # continue a stopped demo
    python main.py --sae-type matryoshka --layers 4 6 8       # a dictionary per layer, one model pass
    python main.py --sae-type jumprelu --target-l0 32   # one JumpReLU SAE steered to a mean L0 of 32
    python main.py --demo --sae-type jumprelu --target-l0 32   # the demo with a JumpReLU SAE
    torchrun --nproc_per_node 4 main.py --batch-size 16384   # 4 GPUs, 4096 activations each

Every dictionary gets its own wandb run and checkpoint folder (``checkpoint_dir / name``); the
final metrics of each are printed at the end. Everything that can be checked is checked before the
model loads (settings, device, memory, model and data, the run folders: see
cli_options.check_before_loading); a new run never writes into an existing run's folder (an
automatic name takes the next free -2, -3... suffix; --overwrite replaces a run folder training
wrote). Errors end in one line and exit status 2 (--debug shows the traceback). The command-line options that change the run
settings live in cli_options.py, shared with train_gemma_example.py.
"""

from __future__ import annotations

import argparse
import copy

from matryoshka_sae import distributed
from matryoshka_sae.cli.options import (
    ArgumentParser,
    add_resume_argument,
    add_run_arguments,
    apply_overrides,
    check_before_loading,
    check_device,
    invocation,
    print_final_metrics,
    resumed_cfgs,
    run_reporting_errors,
)
from matryoshka_sae.config import get_default_cfg, post_init_cfg

BATCHTOPK_KS = [16, 32, 64]


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--demo",
        action="store_true",
        help="train one Matryoshka SAE on SmolLM2-135M and Python's documentation, "
        "offline on a CPU, and print a report (see demo.py)",
    )
    parser.add_argument(
        "--batchtopk-k",
        type=int,
        nargs="+",
        default=BATCHTOPK_KS,
        help=f"top_k of each BatchTopK SAE (default {BATCHTOPK_KS}); --top-k sets the "
        f"Matryoshka SAE's",
    )
    parser.add_argument(
        "--layers",
        type=int,
        nargs="+",
        help="train the dictionaries at each of these layers, all from one model pass",
    )
    parser.add_argument(
        "--sites", nargs="+", help="... and at each of these sites (default: --site)"
    )
    add_run_arguments(parser)
    add_resume_argument(parser)
    return parser


def build_cfgs(args: argparse.Namespace | None = None) -> list[dict]:
    """One cfg per dictionary: a BatchTopK SAE per --batchtopk-k value, then the Matryoshka SAE;
    with --sae-type, the one dictionary of that class; with --resume, the checkpointed runs'.
    With --layers/--sites, these dictionaries at every (layer, site)."""
    if args is not None and args.resume:
        cfgs = resumed_cfgs(args.resume, args)
        _check_repeated_hooks(args, cfgs)
        return cfgs
    layers, sites = getattr(args, "layers", None), getattr(args, "sites", None)
    base = apply_overrides(get_default_cfg(), args)
    if layers:  # the first hook's settings must be valid for the model too
        base["layer"] = layers[0]
    if sites:
        base["site"] = sites[0]
    base = post_init_cfg(base)
    if args is not None and args.sae_type is not None:
        variants = [{}]
    else:
        ks = BATCHTOPK_KS if args is None else args.batchtopk_k
        variants = [{"sae_type": "batchtopk", "top_k": k} for k in ks] + [
            {"sae_type": "matryoshka"}
        ]
    hooks = [
        {"layer": layer, "site": site}
        for layer in (layers or [base["layer"]])
        for site in (sites or [base["site"]])
    ]
    return [
        post_init_cfg({**copy.deepcopy(base), **hook, **variant})
        for hook in hooks
        for variant in variants
    ]


def _check_repeated_hooks(args: argparse.Namespace, cfgs: list[dict]) -> None:
    """With --resume, --layers/--sites/--batchtopk-k may repeat the original command's values."""
    saved = {
        "--layers": {cfg["layer"] for cfg in cfgs},
        "--sites": {cfg["site"] for cfg in cfgs},
        "--batchtopk-k": {cfg["top_k"] for cfg in cfgs if cfg["sae_type"] == "batchtopk"},
    }
    given = {
        "--layers": args.layers,
        "--sites": args.sites,
        "--batchtopk-k": None if args.batchtopk_k == BATCHTOPK_KS else args.batchtopk_k,
    }
    differing = [
        f"{option} {' '.join(map(str, given[option]))} (saved: {' '.join(map(str, sorted(saved[option])))})"
        for option in saved
        if given[option] and set(given[option]) != saved[option]
    ]
    if differing:
        raise ValueError(
            f"--resume continues the runs with their own settings, but {'; '.join(differing)}; drop "
            f"those options or give the saved values."
        )


def train_group(cfgs: list[dict], resume_from: list[str] | None = None) -> list:
    """Load cfgs[0]'s model, open its activation stream and train one dictionary per cfg on it
    (continuing the checkpoints in `resume_from`, one per cfg, when given): training.train_from_cfgs."""
    # Imported here so that --help (and train_gemma_example.py compare) load no model stack.
    from matryoshka_sae.training import train_from_cfgs

    check_device(cfgs[0])
    return train_from_cfgs(cfgs, resume_from=resume_from)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    run_reporting_errors(
        lambda: run(args),
        resume_command=invocation("main.py") + (" --demo" if args.demo else ""),
        debug=args.debug,
    )


def run(args: argparse.Namespace) -> None:
    """The demo (or its continuation, with --resume), or the group of dictionaries that `args` describes."""
    if args.demo:
        from matryoshka_sae.cli.demo import run_demo

        run_demo(args)
        return
    cfgs = build_cfgs(args)
    check_before_loading(cfgs, resume_from=args.resume, overwrite=args.overwrite)
    try:
        for cfg in cfgs:  # under torchrun: join the other ranks, one device each (else nothing)
            distributed.init_from_env(cfg)
        if distributed.is_main_process():
            for cfg in cfgs:
                print(
                    f"{cfg['sae_type']:>12}  top_k {cfg['top_k']:<4} dict {cfg['dict_size']:<6} -> {cfg['name']}"
                )
        train_group(cfgs, resume_from=args.resume)
        if distributed.is_main_process():
            for cfg in cfgs:
                print_final_metrics(cfg)
    finally:
        distributed.shut_down()


if __name__ == "__main__":
    main()
