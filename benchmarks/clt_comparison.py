"""Matryoshka cross-layer transcoder vs plain BatchTopK CLT on SmolLM2: same layers, width, k, tokens, seed.

    python benchmarks/clt_comparison.py --layers 0-9 --dict-size 256 --top-k 8 --batch-size 512 --num-tokens 76800 --lr 1e-3
    python benchmarks/clt_comparison.py --collect matryoshka RUN_FOLDER SECONDS PEAK_MB --collect plain ...

Without --collect, trains each kind with train_clt.py (one process at a time; wall time and the
process's peak resident memory measured here) and writes benchmarks/results/clt_matryoshka_vs_plain.json
from each run's final evaluation (<run>/clt_metrics.json: every MLP of the layers replaced at once,
CE loss, loss recovered, KL; per-layer FVU and L0 on held-out tokens) and its last training metrics
(dead latents). --collect takes runs trained with train_clt.py already, with their measured seconds
and peak memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness

KINDS = {"matryoshka": [], "plain": ["--plain"]}


def train_case(kind: str, args: argparse.Namespace, out: Path) -> tuple[Path, float, float]:
    """Train one kind in its own process; returns (run folder, seconds, peak resident MB)."""
    folder = out / kind
    command = [sys.executable, str(harness.ROOT / "train_clt.py"), "train", "--layers", args.layers,
               "--dict-size", str(args.dict_size), "--top-k", str(args.top_k), "--batch-size", str(args.batch_size),
               "--num-tokens", str(args.num_tokens), "--lr", str(args.lr), "--n-eval-rows", str(args.n_eval_rows),
               "--sparsity", args.sparsity, "--checkpoint-dir", str(folder), "--wandb-mode", "disabled",
               "--checkpoint-freq", "1000000", *KINDS[kind]]
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=harness.ROOT)
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest child so far
    (run,) = [p for p in folder.iterdir() if p.is_dir()]
    return run, seconds, peak_mb


def row(kind: str, run: Path, seconds: float, peak_mb: float) -> dict:
    evaluation = json.loads((run / "clt_metrics.json").read_text())
    training = json.loads((run / "metrics.json").read_text())
    config = json.loads((run / "config.json").read_text())
    return {
        "kind": kind, "layers": f"{config['clt_layers'][0]}-{config['clt_layers'][-1]}",
        "latents": config["dict_size"] * len(config["clt_layers"]), "groups": config["group_sizes"],
        "loss_recovered": round(evaluation["loss_recovered"], 4), "kl": round(evaluation["kl_divergence"], 4),
        "ce_clean": round(evaluation["ce_loss_clean"], 4), "ce_spliced": round(evaluation["ce_loss_spliced"], 4),
        "fvu_mean": round(evaluation["fvu_mean"], 4), "fvu_max": round(evaluation["fvu_max"], 4),
        "l0_total": round(evaluation["l0_total"], 1), "dead_latents": int(training["num_dead_features"]),
        "train_fvu_last_batch": round(training["fvu"], 4), "seconds": round(seconds), "peak_rss_mb": round(peak_mb),
        "fvu_per_layer": {k: round(v, 4) for k, v in evaluation["fvu_per_layer"].items()},
        "l0_per_layer": {k: round(v, 2) for k, v in evaluation["l0_per_layer"].items()},
        "run": str(run),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="0-9")
    parser.add_argument("--dict-size", type=int, default=256)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--num-tokens", type=int, default=76800)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--n-eval-rows", type=int, default=16)
    parser.add_argument("--sparsity", default="global", choices=["global", "per_layer"])
    parser.add_argument("--collect", nargs=4, action="append", metavar=("KIND", "RUN", "SECONDS", "PEAK_MB"))
    parser.add_argument("--note", default="", help="added to the result's notes (how collected runs were made)")
    args = parser.parse_args()
    start = harness.environment()
    if args.collect:
        rows = [row(kind, Path(run), float(seconds), float(peak)) for kind, run, seconds, peak in args.collect]
    else:
        out = Path(tempfile.mkdtemp(prefix="clt_comparison_"))
        rows = [row(kind, *train_case(kind, args, out)) for kind in KINDS]
    settings = {key: getattr(args, key) for key in ("layers", "dict_size", "top_k", "batch_size", "num_tokens", "lr",
                                                    "n_eval_rows", "sparsity")}
    settings.update(model="smollm2-135m", source="ln2_normalized", target="mlp_out", data="python-docs:train",
                    seed=49)
    harness.save("clt_matryoshka_vs_plain", "Matryoshka CLT vs plain BatchTopK CLT, SmolLM2", rows, settings,
                 columns=["kind", "layers", "latents", "loss_recovered", "kl", "ce_spliced", "fvu_mean", "fvu_max",
                          "l0_total", "dead_latents", "seconds", "peak_rss_mb"],
                 notes="Every MLP of the CLT's layers replaced at once on held-out python-docs rows (BOS kept). "
                       "One run each, same seed, tokens and batches. " + args.note, environment_at_start=start)


if __name__ == "__main__":
    main()
