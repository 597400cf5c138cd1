"""Export a trained dictionary to the SAELens format (see sae_lens_format.py), or a transcoder set
to circuit-tracer's (see circuit_tracer_format.py).

    python export_sae.py CHECKPOINT OUT_DIR [--overwrite] [--dataset-path NAME] [--neuronpedia-id ID]
    python export_sae.py SET_FOLDER OUT_DIR --format circuit-tracer [--scan NAME]

CHECKPOINT is a folder a training run saved (checkpoint_dir/name). OUT_DIR gets cfg.json and
sae_weights.safetensors, which SAELens, SAEBench and sae-dashboard read. --overwrite replaces only
a folder an earlier export wrote (it holds the marker file .written-by and nothing else), never the
checkpoint or a folder that contains it:

    from sae_lens import SAE
    sae = SAE.load_from_disk("OUT_DIR")
"""

from __future__ import annotations

import argparse
import json

from matryoshka_sae.cli.options import (
    ArgumentParser,
    add_debug_argument,
    invocation,
    run_reporting_errors,
)
from matryoshka_sae.sae_lens_format import SAE_LENS_CONFIG, export_sae_lens


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "checkpoint", help="checkpoint folder (with config.json and sae.safetensors)"
    )
    parser.add_argument("out_dir", help="folder to create for the SAELens files")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUT_DIR if an earlier export wrote it (never the checkpoint or a folder "
        "holding other files)",
    )
    parser.add_argument(
        "--format",
        choices=["sae-lens", "circuit-tracer"],
        default="sae-lens",
        help="circuit-tracer: a transcoder set (train_gemma_example.py transcoder --layers all) "
        "as config.yaml and layer_{i}.safetensors",
    )
    parser.add_argument(
        "--scan", help="circuit-tracer: the set's scan name (where its viewer finds feature files)"
    )
    parser.add_argument(
        "--dataset-path", help="metadata.dataset_path (e.g. the hub name of the training data)"
    )
    parser.add_argument("--neuronpedia-id", help="metadata.neuronpedia_id")
    add_debug_argument(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    run_reporting_errors(
        lambda: export(args), resume_command=invocation("export_sae.py"), debug=args.debug
    )


def export(args: argparse.Namespace) -> None:
    if args.format == "circuit-tracer":
        export_transcoder_set(args)
        return
    metadata = {
        key: value
        for key, value in (
            ("dataset_path", args.dataset_path),
            ("neuronpedia_id", args.neuronpedia_id),
        )
        if value
    }
    out = export_sae_lens(
        args.checkpoint, args.out_dir, metadata=metadata, overwrite=args.overwrite
    )
    cfg = json.loads((out / SAE_LENS_CONFIG).read_text())
    print(
        f"Wrote {out}: SAELens architecture {cfg['architecture']!r}, d_in {cfg['d_in']}, d_sae {cfg['d_sae']}, "
        f"normalize_activations {cfg['normalize_activations']!r}, hook {cfg['metadata']['hook_name']}."
    )
    print(f'Load it with: from sae_lens import SAE; sae = SAE.load_from_disk("{out}")')


def export_transcoder_set(args: argparse.Namespace) -> None:
    from matryoshka_sae.circuit_tracer_format import CONFIG_YAML, export_circuit_tracer, read_config

    out = export_circuit_tracer(
        args.checkpoint, args.out_dir, scan=args.scan, overwrite=args.overwrite
    )
    config = read_config(out)
    print(
        f"Wrote {out}/{CONFIG_YAML} and {len(config['transcoders'])} layer files: circuit-tracer transcoder_set, "
        f"{config['feature_input_hook']} -> {config['feature_output_hook']}, model {config['model_name']}."
    )
    print(
        f"Trace with it (circuit-tracer's environment): .ct-venv/bin/python trace_circuit.py {out} "
        f"--from {args.checkpoint} --out traces"
    )


if __name__ == "__main__":
    main()
