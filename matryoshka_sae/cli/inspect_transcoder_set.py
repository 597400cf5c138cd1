"""Feature browser of a transcoder set, and the feature files of circuit-tracer's graph viewer.

    python inspect_transcoder_set.py checkpoints/<set>
    python inspect_transcoder_set.py checkpoints/<set> --viewer-features graphs/ --num-tokens 100000

One pass of the model over held-out text serves every layer of the set
(`feature_statistics.collect_set_statistics`: each chunk runs the model once and every layer's
transcoder encodes its own source). Then

    OUT/index.html                              the set's layers, with links
    OUT/layer_{i}/feature_browser.html          layer i's feature browser (a layer selector on top)
    OUT/layer_{i}/feature_statistics.json       its statistics, for notebooks

OUT defaults to ``<set>/feature_browser``. With ``--viewer-features DATA_DIR``, also one JSON file
per feature for circuit-tracer's viewer under ``DATA_DIR/features/<name>/`` (name: --viewer-name,
default the set folder's name; see circuit_tracer_features.py); the scan it prints is what
circuit-tracer's ``create_graph_files(graph, slug, DATA_DIR, scan=...)`` takes, and
``circuit_tracer.frontend.local_server.serve(data_dir=DATA_DIR)`` shows the graphs with them.

Text and the other options are inspect_sae.py's (the set's held-out rows by default).
"""

from __future__ import annotations

import argparse
import contextlib
import io
from pathlib import Path

from matryoshka_sae.cli import inspect_sae
from matryoshka_sae.cli.options import invocation


def build_parser() -> argparse.ArgumentParser:
    parser = inspect_sae.build_parser()
    parser.description = __doc__
    for action in parser._actions:
        if action.dest == "checkpoint":
            action.help = "a transcoder set's folder (transcoder_set.json and one folder per layer)"
        if action.dest == "out":
            action.help = "output folder (default: SET/feature_browser)"
    parser.add_argument(
        "--viewer-features",
        type=Path,
        metavar="DATA_DIR",
        help="also write circuit-tracer's per-feature files under DATA_DIR/features/NAME",
    )
    parser.add_argument(
        "--viewer-name",
        metavar="NAME",
        help="the name of the features under DATA_DIR/features (default: the set folder's name)",
    )
    return parser


def check_set_output_folder(out: Path) -> None:
    """The pages go into `out`: a new folder or one holding only an earlier set browser."""
    from matryoshka_sae.feature_browser import SET_INDEX_FILE

    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder for the pages.")
    if out.is_dir():
        foreign = sorted(
            entry.name
            for entry in out.iterdir()
            if entry.name != SET_INDEX_FILE
            and not (entry.is_dir() and entry.name.startswith("layer_"))
        )
        if foreign:
            raise ValueError(
                f"--out {out} holds other files ({', '.join(foreign[:5])}); give a new folder or one "
                f"holding only an earlier set browser."
            )
    out.mkdir(parents=True, exist_ok=True)


def layer_cfg_of(args: argparse.Namespace):
    """inspect_sae.inspection_cfg for every layer's cfg, its notes printed once (they are the same)."""
    printed = []

    def cfg_of(cfg: dict) -> dict:
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            cfg = inspect_sae.inspection_cfg(cfg, args)
        if not printed:
            print(buffer.getvalue(), end="")
            printed.append(True)
        return cfg

    return cfg_of


def main(argv: list[str] | None = None) -> Path:
    from matryoshka_sae.cli.options import run_reporting_errors

    args = build_parser().parse_args(argv)
    pages = []
    run_reporting_errors(
        lambda: pages.append(inspect_set(args)),
        resume_command=invocation("inspect_transcoder_set.py"),
        debug=args.debug,
    )
    return pages[0]


def inspect_set(args: argparse.Namespace) -> Path:
    """Check everything, then collect every layer's statistics in one pass and write the pages
    (and the viewer's files); returns the index page's path."""
    from matryoshka_sae.checkpoint import load_cfg
    from matryoshka_sae.circuit_tracer_features import check_viewer_name, write_viewer_features
    from matryoshka_sae.cli.options import check_dataset_available, check_device
    from matryoshka_sae.feature_browser import write_set_browser
    from matryoshka_sae.feature_statistics import collect_set_statistics
    from matryoshka_sae.model_loading import check_model_available
    from matryoshka_sae.transcoder_set import layer_folders

    folders = layer_folders(args.checkpoint)
    name = args.viewer_name or args.checkpoint.resolve().name
    if args.viewer_features is not None:
        check_viewer_name(name)
    out = args.out or args.checkpoint / "feature_browser"
    check_set_output_folder(out)
    cfg_of = layer_cfg_of(args)
    cfg = cfg_of(load_cfg(next(iter(folders.values()))))
    check_device(cfg)
    check_model_available(cfg["model_name"])
    for key in ("dataset_path", "eval_dataset_path"):
        if cfg.get(key) is not None:
            check_dataset_available(cfg[key], key)

    print(f"Transcoder set {args.checkpoint}: layers {', '.join(map(str, folders))}")
    stats_by_layer = collect_set_statistics(
        args.checkpoint,
        cfg_of,
        top_n=args.top_n,
        context=args.context,
        hierarchy=not args.no_hierarchy,
    )
    first = next(iter(stats_by_layer.values())).data
    statistics = sum(
        stats.data["timing"]["statistics_seconds"] for stats in stats_by_layer.values()
    )
    print(
        f"Feature statistics of {len(folders)} layers over {first['n_tokens']:,} tokens: one model pass "
        f"{first['timing']['forward_seconds']:.1f} s, statistics {statistics:.1f} s."
    )
    index = write_set_browser(stats_by_layer, out)
    print(f"Feature browser: {index}")
    if args.viewer_features is not None:
        scan = write_viewer_features(stats_by_layer, args.viewer_features, name)
        print(
            f"Viewer features: {args.viewer_features / 'features' / name} (scan {scan!r}: "
            f"create_graph_files(graph, slug, {str(args.viewer_features)!r}, scan={scan!r}))"
        )
    return index


if __name__ == "__main__":
    main()
