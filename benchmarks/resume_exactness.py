"""Is resume exact on the real path? SmolLM2-135M, layer 4, Python docs, a Matryoshka SAE, 40 steps of
512 tokens, a checkpoint every 10 steps.

    python benchmarks/resume_exactness.py            # prints the largest weight difference (0 when exact)

Three runs: an uninterrupted reference; a run in a child process that kills itself with SIGKILL
while fetching the batch of step 23 (after the checkpoint of step 20); that run resumed with
``train_sae(..., resume_from=folder)``. Offline, on CPU, about a minute on 2 cores.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile

import harness
import torch  # noqa: E402

from matryoshka_sae.activation_store import ActivationsStore  # noqa: E402
from matryoshka_sae.checkpoint import checkpoint_folder, load_sae  # noqa: E402
from matryoshka_sae.config import get_default_cfg, post_init_cfg  # noqa: E402
from matryoshka_sae.model_loading import load_model  # noqa: E402
from matryoshka_sae.sae import create_sae  # noqa: E402
from matryoshka_sae.training import train_sae  # noqa: E402


def run_cfg(checkpoint_dir: str) -> dict:
    cfg = get_default_cfg()
    cfg.update(
        model_name="smollm2-135m",
        layer=4,
        site="resid_pre",
        dataset_path="python-docs",
        sae_type="matryoshka",
        batch_size=512,
        num_tokens=512 * 40,
        checkpoint_freq=10,
        seq_len=128,
        model_batch_size=8,
        num_batches_in_buffer=8,
        device="cpu",
        checkpoint_dir=checkpoint_dir,
        wandb_mode="disabled",
        perf_log_freq=10**6,
        n_eval_rows=8,
    )
    return post_init_cfg(cfg)


def train(model, cfg, resume_from=None, kill_at_batch=None):
    store = ActivationsStore(model, cfg)
    if kill_at_batch is not None:
        served, next_batch = [0], store.next_batch

        def next_batch_or_die():
            served[0] += 1
            if served[0] == kill_at_batch:
                os.kill(os.getpid(), signal.SIGKILL)
            return next_batch()

        store.next_batch = next_batch_or_die
    torch.manual_seed(0)
    return train_sae(create_sae(cfg), store, model, cfg, resume_from=resume_from)


def main() -> None:
    model = load_model("smollm2-135m")
    if len(sys.argv) == 3 and sys.argv[1] == "--killed-run":
        train(model, run_cfg(sys.argv[2]), kill_at_batch=24)
        return
    at_start = harness.environment()
    with tempfile.TemporaryDirectory() as tmp:
        reference = train(model, run_cfg(f"{tmp}/reference"))
        child = subprocess.run([sys.executable, __file__, "--killed-run", f"{tmp}/killed"])
        cfg = run_cfg(f"{tmp}/killed")
        folder = checkpoint_folder(cfg)
        step = load_sae(folder) and json.loads((folder / "metrics.json").read_text())["step"]
        print(
            f"child exit status {child.returncode} (SIGKILL: {-signal.SIGKILL}); checkpoint at step {step}"
        )
        resumed = train(model, cfg, resume_from=folder)
        worst = max(
            (a - b).abs().max().item()
            for a, b in zip(reference.state_dict().values(), resumed.state_dict().values())
        )
        same = all(
            torch.equal(a, b)
            for a, b in zip(reference.state_dict().values(), resumed.state_dict().values())
        )
        print(f"resumed vs uninterrupted: bit-identical {same}, largest difference {worst:.3g}")
    rows = [
        {
            "killed_at_step": 23,
            "resumed_from_step": step,
            "bit_identical": same,
            "largest_difference": worst,
        }
    ]
    harness.save(
        "resume_exactness",
        "Resume after SIGKILL on the real path (SmolLM2-135M)",
        rows,
        {
            "model": "smollm2-135m",
            "layer": 4,
            "sae_type": "matryoshka",
            "steps": 40,
            "batch_size": 512,
            "checkpoint_freq": 10,
        },
        argv=[],
        environment_at_start=at_start,
    )


if __name__ == "__main__":
    main()
