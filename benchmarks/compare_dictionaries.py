"""Matryoshka vs BatchTopK vs TopK vs JumpReLU on SmolLM2 at the demo's hook, scored by evaluate_sae.py.

    python benchmarks/compare_dictionaries.py                     # cache, train the four, evaluate
    python benchmarks/compare_dictionaries.py --num-tokens 1e5    # smaller
    python benchmarks/compare_dictionaries.py --skip-training     # evaluate the trained four again

The demo's settings (SmolLM2-135M, resid_pre of block 6, width 4608, k 32, batch 2048, lr 2e-3, the
built-in corpus with its held-out documents, BOS positions left out): one model pass writes the
activation cache (activation_cache.py), and the four dictionaries train together on the same
batches from it, equal width and tokens (without the model: the evaluation measures the CE losses);
the TopK family at k = 32, JumpReLU steered to a mean L0 of 32 (``target_l0``). Then
evaluate_sae.py scores each (core metrics, sparse probing, absorption; its options through
--evaluate-args), writing evaluation.json into each checkpoint folder, and the side-by-side table
goes to ``benchmarks/results/evaluation_<tokens>k.json`` (harness.py's format, rendered into
docs/results.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import harness  # noqa: F401  (puts the repository root on sys.path)

from matryoshka_sae.cli.options import RUN_OPTIONS  # noqa: E402

ROOT = harness.ROOT

SAE_TYPES = ("matryoshka", "batchtopk", "topk", "jumprelu")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--num-tokens",
        type=RUN_OPTIONS["--num-tokens"][1]["type"],
        default=364_544,
        help="training tokens of each dictionary (default: the demo's 364,544)",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=ROOT / "checkpoints" / "compare_dictionaries",
        help="the activation cache and the checkpoints go here",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "benchmarks" / "results",
        help="folder of the result file evaluation_<tokens>k.json",
    )
    parser.add_argument(
        "--skip-training",
        action="store_true",
        help="evaluate the checkpoints already in --work-dir",
    )
    parser.add_argument(
        "--evaluate-args",
        default="",
        help="extra options for evaluate_sae.py, e.g. '--no-absorption'",
    )
    return parser


def comparison_cfgs(num_tokens: int, work_dir: Path) -> list[dict]:
    """The four dictionaries' cfgs: the demo's settings, read from the cache in work_dir."""
    from matryoshka_sae.builtin_corpus import python_docs_dataset
    from matryoshka_sae.cli.demo import demo_cfg
    from matryoshka_sae.config import post_init_cfg

    base = demo_cfg()
    base.update(
        num_tokens=num_tokens,
        dataset_path=python_docs_dataset(split="train"),
        eval_dataset_path=python_docs_dataset(split="test"),
        checkpoint_dir=str(work_dir),
        activation_cache=str(work_dir / "cache"),
        wandb_mode="disabled",
    )
    variants = [{"sae_type": sae_type, "group_sizes": None} for sae_type in SAE_TYPES]
    variants[-1]["target_l0"] = float(base["top_k"])
    return [post_init_cfg({**base, **variant}) for variant in variants]


def train(cfgs: list[dict]) -> None:
    """Write the cache (one model pass) unless it is there, then train the four on it together.
    Training runs without the model: evaluate_sae.py measures the CE losses afterwards."""
    from matryoshka_sae.activation_cache import (
        MANIFEST_FILE,
        CachedActivationsStore,
        read_manifest,
        write_activation_cache,
    )
    from matryoshka_sae.sae import create_sae
    from matryoshka_sae.training import train_sae_group

    cache = Path(cfgs[0]["activation_cache"])
    if not (cache / MANIFEST_FILE).is_file():
        from matryoshka_sae.model_loading import load_model

        model = load_model(cfgs[0]["model_name"], cfgs[0]["device"], cfgs[0]["model_dtype"])
        live = {**cfgs[0], "activation_cache": None, "bos_token_id": model.tokenizer.bos_token_id}
        manifest = write_activation_cache(model, live, cache)
        print(f"Activation cache: {manifest['num_tokens']:,} activations in {cache}")
    for cfg in cfgs:  # SmolLM2 rows start with BOS, which the demo's settings leave out
        cfg["bos_token_id"] = read_manifest(cache)["bos_token_id"]
    train_sae_group([create_sae(cfg) for cfg in cfgs], CachedActivationsStore(cfgs[0]), None, cfgs)


def main(argv: list[str] | None = None) -> None:
    import shlex

    import harness

    from matryoshka_sae.checkpoint import checkpoint_folder
    from matryoshka_sae.cli import evaluate_sae

    args = build_parser().parse_args(argv)
    cfgs = comparison_cfgs(args.num_tokens, args.work_dir)
    if not args.skip_training:
        train(cfgs)
    folders = [str(checkpoint_folder(cfg)) for cfg in cfgs]
    start = harness.environment()
    evaluate_args = shlex.split(args.evaluate_args)
    results = evaluate_sae.main(
        [*folders, *evaluate_args]
    )  # evaluation.json in each checkpoint folder
    columns, rows = evaluate_sae.summary_rows(results)
    settings = {
        "model": "smollm2-135m",
        "hook": cfgs[0]["hook_point"],
        "dict_size": cfgs[0]["dict_size"],
        "k": cfgs[0]["top_k"],
        "jumprelu_target_l0": cfgs[-1]["target_l0"],
        "tokens": args.num_tokens,
        "batch_size": cfgs[0]["batch_size"],
        "lr": cfgs[0]["lr"],
        "evaluate_sae": " ".join(evaluate_args),
    }
    notes = (
        "Each dictionary's full figures: evaluation.json in its checkpoint folder. Absorption: "
        + results[0].get("absorption", {}).get("caveat", "not run.")
    )
    harness.save(
        f"evaluation_{round(args.num_tokens / 1000)}k",
        f"Matryoshka vs BatchTopK vs TopK vs JumpReLU on SmolLM2, {args.num_tokens:,} tokens each",
        rows,
        settings,
        argv,
        columns,
        notes,
        environment_at_start=start,
        path=args.out / (f"evaluation_{round(args.num_tokens / 1000)}k.json"),
    )


if __name__ == "__main__":
    main()
