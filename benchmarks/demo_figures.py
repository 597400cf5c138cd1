"""The demo's figures as a result file: `make demo`'s run, its report, and its SAELens export scored
by the real sae_lens on the same held-out activations.

    python benchmarks/demo_figures.py            # results/demo.json (about 5 minutes on 2 cores)

Runs demo.run_demo (main.py --demo) into runs/demo, then exports the checkpoint with
sae_lens_format.export_sae_lens, loads it with sae_lens.SAE.load_from_disk and computes the FVU of
SAELens's reconstruction of the held-out activations, beside ours.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import harness  # noqa: F401  (first: import paths)
from harness import ROOT, environment, save

OUT = ROOT / "runs" / "demo"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", default=str(OUT), help="checkpoint folder of the demo run (made afresh)"
    )
    args = parser.parse_args()
    import torch
    from sae_lens import SAE

    from matryoshka_sae.activation_store import ActivationsStore
    from matryoshka_sae.checkpoint import load_cfg, load_sae
    from matryoshka_sae.cli import main as main_script
    from matryoshka_sae.cli.demo import run_demo
    from matryoshka_sae.config import compute_fvu
    from matryoshka_sae.model_loading import load_model
    from matryoshka_sae.sae_lens_format import export_sae_lens

    started = environment()
    shutil.rmtree(args.out, ignore_errors=True)  # runs/demo is this script's own folder
    report = run_demo(
        main_script.build_parser().parse_args(["--demo", "--checkpoint-dir", args.out])
    )
    folder = Path(report["folder"])
    exported = export_sae_lens(folder, Path(args.out) / "sae-lens")
    cfg = load_cfg(folder)
    model = load_model(cfg["model_name"], "cpu", torch.float32)
    store = ActivationsStore(model, {**cfg, "device": "cpu"})
    x = store.activations_of(store.get_eval_tokens())[0]  # the held-out activations of the report
    ours = load_sae(folder, "cpu")
    theirs = SAE.load_from_disk(str(exported), device="cpu")
    with torch.no_grad():
        fvu_ours = compute_fvu(x, ours.reconstruct(x)).item()
        fvu_sae_lens = compute_fvu(x, theirs(x)).item()
    rows = [
        {"measure": "held-out FVU, whole dictionary", "value": report["fvu"]},
        {
            "measure": f"held-out FVU, first prefix ({cfg['group_sizes'][0]} latents)",
            "value": report["fvu_per_prefix"][0],
        },
        {"measure": "held-out L0", "value": report["l0_norm"]},
        {"measure": "CE loss recovered (held-out text)", "value": report.get("loss_recovered")},
        {"measure": "dead latents (fraction)", "value": report["dead_fraction"]},
        {"measure": "FVU of the SAELens export, computed by sae_lens", "value": fvu_sae_lens},
        {
            "measure": "FVU of the checkpoint, computed by us on the same activations",
            "value": fvu_ours,
        },
        {
            "measure": "training tokens/s, model included",
            "value": cfg["num_tokens"] / report["training_seconds"],
        },
    ]
    save(
        "demo",
        "The demo (main.py --demo): SmolLM2-135M, layer 6 resid_pre, Matryoshka SAE",
        rows,
        {
            "model": cfg["model_name"],
            "hook": cfg["hook_point"],
            "dict_size": cfg["dict_size"],
            "group_sizes": cfg["group_sizes"],
            "top_k": cfg["top_k"],
            "num_tokens": cfg["num_tokens"],
            "held_out_tokens": len(x),
        },
        environment_at_start=started,
        notes="The demo's own report, and its SAELens export scored by the real sae_lens on the held-out "
        "activations the report used.",
    )


if __name__ == "__main__":
    main()
