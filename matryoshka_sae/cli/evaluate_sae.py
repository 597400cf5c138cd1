"""Score trained dictionaries on the field's benchmarks, offline, and print them side by side.

    python evaluate_sae.py checkpoints/<run>                         # -> checkpoints/<run>/evaluation.json
    python evaluate_sae.py checkpoints/a checkpoints/b --out results/  # -> results/<class>.json, table.md
    python evaluate_sae.py checkpoints/<run> --all-datasets          # every sae-probes dataset (hours on a CPU)
    python evaluate_sae.py checkpoints/<run> --no-probing --no-absorption   # core metrics only, seconds

Per dictionary (docs/evaluation.md has every formula):
- SAEBench's core metrics (core_metrics.py) on the run's held-out rows: L0, L1, explained variance
  (mean subtracted per dimension, and SAEBench's legacy per-token one), feature density statistics,
  CE loss score and KL divergence score with zero ablation.
- k-sparse probing through the real sae-probes (sparse_probing.py) on its bundled datasets, k in
  --ks, with its baseline probe on the model's activations; a default subset of eight datasets.
- First-letter absorption by SAEBench's definition (absorption.py), with its model-size caveat.
Transcoders: core metrics on the target, probing on the latents (read from the source hook);
absorption does not apply (the decoder writes to another space than the probe's).

One model load and, per hook, one pass for the probing datasets and one for the absorption words,
shared by every dictionary given. The model's activations on the probing datasets are kept in
--probe-cache (default .cache/sae_probes) for the next run.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from matryoshka_sae.cli.options import RUN_OPTIONS

TABLE_ROWS = [  # (label, key path in the result, format)
    ("L0", ("core", "l0"), "{:.1f}"),
    ("L1", ("core", "l1"), "{:.1f}"),
    ("explained variance", ("core", "explained_variance"), "{:.3f}"),
    ("explained variance (legacy)", ("core", "explained_variance_legacy"), "{:.3f}"),
    ("CE loss score", ("core", "ce_loss_score"), "{:.3f}"),
    ("KL divergence score", ("core", "kl_div_score"), "{:.3f}"),
    ("CE loss with dictionary", ("core", "ce_loss_with_sae"), "{:.3f}"),
    ("fraction alive", ("core", "frac_alive"), "{:.3f}"),
    ("fraction firing > 1%", ("core", "frac_over_1_percent"), "{:.3f}"),
    ("fraction firing > 10%", ("core", "frac_over_10_percent"), "{:.4f}"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "checkpoints",
        nargs="+",
        type=Path,
        help="checkpoint folders (config.json, sae.safetensors)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="folder for <name>.json per dictionary and table.md "
        "(default: evaluation.json in each checkpoint folder)",
    )
    parser.add_argument("--prefix", default="", help="prefix of the file names in --out")
    parser.add_argument(
        "--num-tokens",
        dest="inspect_tokens",
        metavar="N",
        type=RUN_OPTIONS["--num-tokens"][1]["type"],
        help="held-out tokens for the core metrics (default: the run's n_eval_rows x seq_len)",
    )
    parser.add_argument(
        "--ks", type=int, nargs="+", default=[1, 2, 5, 16], help="k of the k-sparse probes"
    )
    parser.add_argument(
        "--probe-datasets",
        nargs="+",
        metavar="NAME",
        help="sae-probes datasets (default: eight, see sparse_probing.DEFAULT_DATASETS)",
    )
    parser.add_argument(
        "--all-datasets", action="store_true", help="every sae-probes dataset (113)"
    )
    parser.add_argument(
        "--probe-cache",
        type=Path,
        default=Path(".cache") / "sae_probes",
        help="the model's activations on the probing datasets and the baseline's results",
    )
    parser.add_argument(
        "--absorption-words", type=int, default=1500, help="vocabulary words for absorption"
    )
    parser.add_argument("--no-probing", action="store_true", help="skip sparse probing")
    parser.add_argument("--no-absorption", action="store_true", help="skip absorption")
    parser.add_argument("--device", help="cpu, cuda, ... (default: the run's, cpu without a GPU)")
    parser.add_argument(
        "--dataset",
        dest="dataset_path",
        help="text for the core metrics (default: the run's held-out rows)",
    )
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[dict]:
    """Everything that can be wrong, before the model loads: one line each. Returns the cfgs."""
    from matryoshka_sae.checkpoint import load_cfg
    from matryoshka_sae.config import canonical_model_name

    for folder in args.checkpoints:
        if not (folder / "config.json").is_file():
            parser.error(
                f"{folder} is not a checkpoint folder (it has no config.json); give the folder training "
                f"wrote, e.g. checkpoints/<run name>."
            )
    cfgs = [load_cfg(folder) for folder in args.checkpoints]
    models = {canonical_model_name(cfg["model_name"]) or cfg["model_name"] for cfg in cfgs}
    if len(models) > 1:
        parser.error(
            f"the checkpoints are of different models ({', '.join(sorted(models))}); evaluate each "
            f"model's dictionaries in their own run."
        )
    if any(k < 1 for k in args.ks):
        parser.error(f"--ks must be positive, got {args.ks}.")
    if args.probe_datasets and args.all_datasets:
        parser.error("give --probe-datasets or --all-datasets, not both.")
    if args.absorption_words < 50:
        parser.error(
            f"--absorption-words {args.absorption_words} is too few for 26 letter probes; give 500 or more."
        )
    if not args.no_probing:
        try:
            import sae_probes  # noqa: F401
        except ImportError:
            parser.error(
                "sparse probing needs sae-probes: pip install -r requirements-eval.txt && pip install "
                "--no-deps sae-probes==0.4.2 (or pass --no-probing)."
            )
        try:
            args.datasets = _datasets(args)
        except ValueError as error:
            parser.error(str(error))
    return cfgs


def _datasets(args) -> list[str]:
    from matryoshka_sae import sparse_probing

    if args.all_datasets:
        return sparse_probing.all_datasets()
    return sparse_probing.check_datasets(
        args.probe_datasets or list(sparse_probing.DEFAULT_DATASETS)
    )


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def is_transcoder(cfg: dict) -> bool:
    return cfg["sae_type"] == "matryoshka_transcoder"


def probe_hook(cfg: dict) -> str:
    """Where the latents read from: a transcoder's source hook, else the dictionary's hook."""
    return cfg["source_hook_point"] if is_transcoder(cfg) else cfg["hook_point"]


def held_out_core_metrics(sae, model, cfg: dict) -> dict:
    """core_metrics.core_metrics on the cfg's held-out rows (activations read in model_batch_size chunks)."""
    import torch

    from matryoshka_sae.activation_store import ActivationsStore
    from matryoshka_sae.core_metrics import core_metrics
    from matryoshka_sae.transcoder_activation_store import TranscoderActivationsStore

    store = (TranscoderActivationsStore if is_transcoder(cfg) else ActivationsStore)(model, cfg)
    tokens = store.get_eval_tokens()
    parts = [store.activations_of(chunk) for chunk in tokens.split(cfg["model_batch_size"])]
    acts = [torch.cat(hook) for hook in zip(*parts)]
    metrics = core_metrics(
        sae, model, cfg, acts[0], tokens, acts[1] if is_transcoder(cfg) else None
    )
    return {**metrics, "tokens": len(acts[0])}


class SharedData:
    """What every dictionary at a hook shares: the probing activations, baseline and absorption words."""

    def __init__(self, model, model_key: str, args: argparse.Namespace):
        self.model, self.model_key, self.args = model, model_key, args
        self.baselines: dict[str, dict] = {}
        self.letters: dict = {}

    def baseline(self, hook: str) -> dict:
        from matryoshka_sae import sparse_probing

        if hook not in self.baselines:
            print(
                f"sparse probing: the model's activations at {hook} on {len(self.args.datasets)} datasets"
            )
            sparse_probing.prepare_activations(
                self.model, self.model_key, hook, self.args.datasets, self.args.probe_cache
            )
            self.baselines[hook] = sparse_probing.probe_baseline(
                self.model_key,
                hook,
                self.args.datasets,
                self.args.probe_cache,
                device=_device(self.model),
            )
        return self.baselines[hook]

    def letter_data(self, hook: str):
        from matryoshka_sae.absorption import collect_letter_data

        if hook not in self.letters:
            self.letters[hook] = collect_letter_data(self.model, hook, self.args.absorption_words)
        return self.letters[hook]


def _device(model) -> str:
    return str(model.cfg.device)


def evaluate_one(folder: Path, cfg: dict, shared: SharedData) -> dict:
    """Every benchmark the arguments ask for, on one checkpoint."""
    from matryoshka_sae import sparse_probing
    from matryoshka_sae.absorption import first_letter_absorption
    from matryoshka_sae.checkpoint import load_sae

    args = shared.args
    sae = load_sae(folder, device=cfg["device"])
    result = {
        "checkpoint": str(folder),
        "name": cfg["name"],
        "sae_type": cfg["sae_type"],
        "dict_size": cfg["dict_size"],
        "top_k": cfg["top_k"],
        "target_l0": cfg.get("target_l0"),
        "hook": probe_hook(cfg),
        "num_tokens_trained": cfg["num_tokens"],
        "seconds": {},
    }
    started = time.perf_counter()
    print(f"{folder}: core metrics")
    result["core"] = held_out_core_metrics(sae, shared.model, cfg)
    result["seconds"]["core"] = time.perf_counter() - started
    if not args.no_probing:
        started = time.perf_counter()
        hook = probe_hook(cfg)
        baseline = shared.baseline(hook)
        print(f"{folder}: sparse probing")
        result["sparse_probing"] = {
            **sparse_probing.probe_dictionary(
                sae,
                shared.model_key,
                hook,
                args.datasets,
                args.probe_cache,
                tuple(args.ks),
                device=cfg["device"],
            ),
            "baseline": baseline,
            "package": "sae-probes " + _version("sae-probes"),
        }
        result["seconds"]["sparse_probing"] = time.perf_counter() - started
    if not args.no_absorption:
        started = time.perf_counter()
        if is_transcoder(cfg):
            result["absorption"] = {
                "skipped": "a transcoder's decoder writes to the target hook, not the space "
                "of the source activations the probe reads"
            }
        else:
            print(f"{folder}: absorption")
            result["absorption"] = first_letter_absorption(
                sae, shared.letter_data(cfg["hook_point"])
            )
        result["seconds"]["absorption"] = time.perf_counter() - started
    return result


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def environment_stamp() -> dict:
    """When, where and with what the figures were measured: benchmarks/harness.py's stamp (commit,
    versions, CPU, cores, threads, GPU, load) with the evaluation packages' versions added."""
    import sys

    benchmarks = str(Path(__file__).resolve().parents[2] / "benchmarks")  # in a checkout
    if benchmarks not in sys.path:
        sys.path.insert(0, benchmarks)
    try:
        import harness
    except ImportError:  # an installed package has no benchmarks/: versions only
        import platform

        names = ("torch", "transformer-lens", "sae-probes", "scikit-learn", "numpy")
        return {
            "python": platform.python_version(),
            "packages": {name: _version(name) for name in names},
        }
    stamp = harness.environment()
    stamp["packages"].update(harness.package_versions(("sae-probes", "scikit-learn", "numpy")))
    return stamp


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def labels_of(results: list[dict]) -> list[str]:
    """Column names: the classes when they differ, else the run names."""
    types = [r["sae_type"] for r in results]
    return types if len(set(types)) == len(types) else [r["name"] for r in results]


def _get(result: dict, path: tuple[str, ...]):
    for key in path:
        if not isinstance(result, dict) or key not in result:
            return None
        result = result[key]
    return result


def table_rows(results: list[dict]) -> list[tuple[str, list[str]]]:
    """(metric, one formatted cell per dictionary) for every metric some dictionary has."""
    return [
        (label, [_cell(v, fmt) for v in values])
        for label, values, fmt in _rows(results)
        if any(v is not None for v in values)
    ]


def _row_values(results: list[dict]) -> list[tuple[str, list]]:
    return [
        (label, values) for label, values, _ in _rows(results) if any(v is not None for v in values)
    ]


def _rows(results: list[dict]) -> list[tuple[str, list, str]]:
    rows = [(label, [_get(r, path) for r in results], fmt) for label, path, fmt in TABLE_ROWS]
    ks = next((r["sparse_probing"]["ks"] for r in results if "sparse_probing" in r), [])
    for k in ks:
        rows.append(
            (
                f"sparse probing accuracy, k={k}",
                [_get(r, ("sparse_probing", "mean_test_acc", str(k))) for r in results],
                "{:.3f}",
            )
        )
    if ks:
        rows.append(
            (
                "probe on the activations (baseline)",
                [_get(r, ("sparse_probing", "baseline", "mean_test_acc")) for r in results],
                "{:.3f}",
            )
        )
    for label, key, fmt in (
        ("absorption fraction*", "mean_absorption_fraction_score", "{:.3f}"),
        ("full absorption rate*", "mean_full_absorption_score", "{:.3f}"),
        ("letters scored*", "letters_scored", "{}"),
    ):
        rows.append((label, [_get(r, ("absorption", key)) for r in results], fmt))
    return rows


def summary_rows(results: list[dict]) -> tuple[list[str], list[dict]]:
    """The table as (columns, one row per dictionary), values as measured (for result files)."""
    rows = [{"dictionary": label} for label in labels_of(results)]
    columns = ["dictionary"]
    for label, values in _row_values(results):
        columns.append(label)
        for row, value in zip(rows, values):
            row[label] = (
                None if value is None or (isinstance(value, float) and math.isnan(value)) else value
            )
    return columns, rows


def _cell(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return fmt.format(value)


def format_table(results: list[dict]) -> str:
    """A Markdown table: one row per metric, one column per dictionary."""
    header = ["metric", *labels_of(results)]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * len(results)) + "|",
    ]
    lines += ["| " + " | ".join([label, *cells]) + " |" for label, cells in table_rows(results)]
    if any("absorption" in r and "caveat" in r["absorption"] for r in results):
        from matryoshka_sae.absorption import CAVEAT

        lines.append(f"\n*Absorption: {CAVEAT}")
    return "\n".join(lines)


def write_results(results: list[dict], args: argparse.Namespace) -> list[Path]:
    stamp = environment_stamp()
    paths = []
    for result, label in zip(results, labels_of(results)):
        path = (
            (args.out / f"{args.prefix}{label}.json")
            if args.out
            else Path(result["checkpoint"]) / "evaluation.json"
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**result, "environment": stamp}, indent=1))
        paths.append(path)
    if args.out:
        table = args.out / f"{args.prefix}table.md"
        table.write_text(format_table(results) + "\n")
        paths.append(table)
    return paths


def main(argv: list[str] | None = None) -> list[dict]:
    from matryoshka_sae.cli.inspect_sae import inspection_cfg
    from matryoshka_sae.config import canonical_model_name
    from matryoshka_sae.model_loading import load_model

    parser = build_parser()
    args = parser.parse_args(argv)
    saved = check_args(parser, args)
    overrides = argparse.Namespace(
        dataset_path=args.dataset_path, inspect_tokens=args.inspect_tokens, device=args.device
    )
    cfgs = [inspection_cfg(cfg, overrides) for cfg in saved]
    model = load_model(cfgs[0]["model_name"], cfgs[0]["device"], cfgs[0]["model_dtype"])
    model_key = (canonical_model_name(cfgs[0]["model_name"]) or cfgs[0]["model_name"]).replace(
        "/", "_"
    )
    shared = SharedData(model, model_key, args)  # model_key names sae-probes' activation files
    results = [evaluate_one(folder, cfg, shared) for folder, cfg in zip(args.checkpoints, cfgs)]
    print()
    print(format_table(results))
    for path in write_results(results, args):
        print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
