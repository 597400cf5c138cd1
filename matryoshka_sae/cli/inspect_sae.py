"""Build the feature browser of a trained dictionary (SAE or transcoder) from its checkpoint folder.

    python inspect_sae.py checkpoints/<run>                       # the run's held-out rows
    python inspect_sae.py checkpoints/<run> --num-tokens 50000 --dataset my_texts.txt --out browser/

One pass of the model over held-out text (`feature_statistics.collect_feature_statistics`), then
the page (`feature_browser.write_feature_browser`): ``OUT/feature_browser.html``, opened from disk,
and ``OUT/feature_statistics.json`` for notebooks. OUT defaults to ``<checkpoint>/feature_browser``.

Text: by default the rows the run held out from training (its `eval_dataset_path`, else the first
rows of its `dataset_path`); `--dataset python-docs` and a checkpoint trained on an in-memory
dataset (the demo) use the built-in corpus's held-out documents; any other --dataset is read from
its start. --num-tokens beyond the run's own held-out rows reads text that training may have seen.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from matryoshka_sae.cli.options import (
    RUN_OPTIONS,
    ArgumentParser,
    add_debug_argument,
    add_run_arguments,
    apply_overrides,
    check_dataset_available,
    check_device,
    invocation,
    non_negative_int,
    positive_int,
    run_reporting_errors,
)

INSPECT_RUN_OPTIONS = ("--dataset", "--device", "--model-dtype", "--model-batch-size")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "checkpoint", type=Path, help="a checkpoint folder (config.json, sae.safetensors)"
    )
    parser.add_argument(
        "--num-tokens",
        dest="inspect_tokens",
        metavar="N",
        type=RUN_OPTIONS["--num-tokens"][1]["type"],
        help="held-out tokens to read (default: the run's n_eval_rows x seq_len)",
    )
    parser.add_argument(
        "--out", type=Path, help="output folder (default: CHECKPOINT/feature_browser)"
    )
    parser.add_argument("--top-n", type=positive_int, default=20, help="top contexts per latent")
    parser.add_argument(
        "--context",
        type=non_negative_int,
        default=8,
        help="tokens shown on each side of a context's token",
    )
    parser.add_argument(
        "--no-hierarchy",
        action="store_true",
        help="skip the co-firing counts (they need n_parents x dict_size int32 counters)",
    )
    add_run_arguments(
        parser, exclude=tuple(option for option in RUN_OPTIONS if option not in INSPECT_RUN_OPTIONS)
    )
    add_debug_argument(parser)
    return parser


def _is_named(path) -> bool:
    """A dataset given by name or path (not the "<Dataset>" placeholder of an in-memory object)."""
    return isinstance(path, str) and not path.startswith("<")


def inspection_cfg(cfg: dict, args: argparse.Namespace) -> dict:
    """The checkpoint's cfg set up for reading held-out rows: which data, how many rows."""
    import torch

    from matryoshka_sae.activation_store import BUILTIN_CORPUS
    from matryoshka_sae.builtin_corpus import python_docs_dataset

    given = getattr(args, "dataset_path", None)
    cfg = apply_overrides(dict(cfg), args)
    if (
        given is None
        and not _is_named(cfg.get("eval_dataset_path"))
        and not _is_named(cfg["dataset_path"])
    ):
        print(
            "The checkpoint was trained on an in-memory dataset: reading the built-in corpus's held-out "
            "documents (as the demo does); pass --dataset to choose other text."
        )
        given = BUILTIN_CORPUS
    if given == BUILTIN_CORPUS:
        cfg["dataset_path"] = python_docs_dataset(split="train")
        cfg["eval_dataset_path"] = python_docs_dataset(
            split="test"
        )  # the documents the demo holds out
    elif given is not None:
        cfg["dataset_path"] = cfg["eval_dataset_path"] = given  # held-out rows from its start
    elif not _is_named(cfg.get("eval_dataset_path")):
        cfg["eval_dataset_path"] = None
    if args.inspect_tokens is not None:
        n_rows = math.ceil(args.inspect_tokens / cfg["seq_len"])
        if n_rows > cfg["n_eval_rows"] and given is None and cfg["eval_dataset_path"] is None:
            print(
                f"Note: the run held out {cfg['n_eval_rows']} rows; the other {n_rows - cfg['n_eval_rows']} "
                f"may have been trained on."
            )
        cfg["n_eval_rows"] = n_rows
    if str(cfg["device"]).startswith("cuda") and not torch.cuda.is_available():
        cfg["device"] = "cpu"  # a GPU-trained run inspected on a machine without one
    cfg["num_batches_in_buffer"] = 1  # the store's training buffer is not used here: keep it small
    return cfg


def check_output_folder(out: Path) -> None:
    """The page goes into `out`: a new folder, or one holding only an earlier page; probed now."""
    from matryoshka_sae.checkpoint import probe_folder
    from matryoshka_sae.feature_browser import PAGE_FILE, STATISTICS_FILE

    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder for the page.")
    if out.is_dir():
        foreign = sorted(
            entry.name for entry in out.iterdir() if entry.name not in (PAGE_FILE, STATISTICS_FILE)
        )
        if foreign:
            raise ValueError(
                f"--out {out} holds other files ({', '.join(foreign[:5])}); the page would be written "
                f"among them. Give a new folder or one holding only an earlier page."
            )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(
            f"--out {out} cannot be created ({error.strerror or error}); give a writable folder."
        ) from None
    probe_folder(out, "--out")


def main(argv: list[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    pages = []
    run_reporting_errors(
        lambda: pages.append(inspect(args)),
        resume_command=invocation("inspect_sae.py"),
        debug=args.debug,
    )
    return pages[0]


def inspect(args: argparse.Namespace) -> Path:
    """Check everything, then load the dictionary and the model and write the page; returns its path."""
    from matryoshka_sae.activation_store import ActivationsStore
    from matryoshka_sae.checkpoint import check_checkpoint_folder, load_cfg, load_sae
    from matryoshka_sae.feature_browser import write_feature_browser
    from matryoshka_sae.feature_statistics import collect_feature_statistics, describe_source
    from matryoshka_sae.model_loading import check_model_available, load_model
    from matryoshka_sae.transcoder_activation_store import TranscoderActivationsStore
    from matryoshka_sae.transcoder_set import is_transcoder_set

    if is_transcoder_set(args.checkpoint):
        raise ValueError(
            f"{args.checkpoint} is a transcoder set; build its pages (and circuit-tracer's feature "
            f"files) with python inspect_transcoder_set.py {args.checkpoint}"
        )
    check_checkpoint_folder(args.checkpoint)
    cfg = inspection_cfg(load_cfg(args.checkpoint), args)
    check_device(cfg)
    check_model_available(cfg["model_name"])
    for key in ("dataset_path", "eval_dataset_path"):
        if cfg.get(key) is not None:
            check_dataset_available(cfg[key], key)
    sae = load_sae(args.checkpoint, device=cfg["device"])
    out = args.out or args.checkpoint / "feature_browser"
    check_output_folder(out)
    model = load_model(cfg["model_name"], cfg["device"], cfg["model_dtype"])
    store_class = (
        TranscoderActivationsStore
        if cfg["sae_type"] == "matryoshka_transcoder"
        else ActivationsStore
    )
    store = store_class(model, cfg)
    stats = collect_feature_statistics(
        sae,
        store,
        top_n=args.top_n,
        context=args.context,
        hierarchy=not args.no_hierarchy,
        source={**describe_source(cfg), "checkpoint": str(args.checkpoint)},
    )
    print(stats.describe_timing())
    page = write_feature_browser(stats, out)
    print(f"Feature browser: {page}")
    return page


if __name__ == "__main__":
    main()
