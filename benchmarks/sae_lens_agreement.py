"""Does SAELens compute what we compute, on real activations? Export a checkpoint, load it with
`sae_lens.SAE.load_from_disk`, and compare the two on the held-out rows of the checkpoint's own
data (the real store and model: activations of the model the dictionary was trained on).

    python benchmarks/sae_lens_agreement.py CHECKPOINT [--rows 32]

Prints, for ours and for SAELens: the FVU of the (whole-dictionary) reconstruction or, for a
transcoder, of the target's prediction; the mean L0; the number of tokens on which the active
latents differ; and the largest relative difference of the outputs. Needs sae_lens
(requirements-dev.txt). The model loads through model_loading.py (SmolLM2 offline).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import harness
import torch  # noqa: E402
from sae_lens import SAE  # noqa: E402

from matryoshka_sae.activation_cache import activation_store_for  # noqa: E402
from matryoshka_sae.checkpoint import load_sae  # noqa: E402
from matryoshka_sae.config import compute_fvu  # noqa: E402
from matryoshka_sae.model_loading import load_model  # noqa: E402
from matryoshka_sae.sae import MatryoshkaTranscoder  # noqa: E402
from matryoshka_sae.sae_lens_format import export_sae_lens  # noqa: E402


def held_out_activations(sae, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, target) [N, d] on the first `rows` held-out rows of the checkpoint's data, from the
    model itself (also for a dictionary trained from an activation cache)."""
    cfg = {**sae.cfg, "activation_cache": None}
    model = load_model(cfg["model_name"], "cpu", cfg["model_dtype"])
    store = activation_store_for(model, cfg)
    acts = store.activations_of(store.get_eval_tokens(rows))
    return acts[0], acts[-1]


def compare(checkpoint: str, rows: int) -> None:
    at_start = harness.environment()
    ours = load_sae(checkpoint, device="cpu").eval()
    x, y = held_out_activations(ours, rows)
    if not isinstance(ours, MatryoshkaTranscoder):
        y = x
    with tempfile.TemporaryDirectory() as folder:
        theirs = SAE.load_from_disk(
            export_sae_lens(ours, Path(folder) / "exported"), device="cpu"
        ).eval()
        with torch.no_grad():
            ours_z, theirs_z = ours.encode(x), theirs.encode(x)
            ours_y, theirs_y = ours.reconstruct(x), theirs(x)
    print(
        f"{checkpoint}: {type(ours).__name__} -> SAELens {type(theirs).__name__}, {len(x):,} held-out tokens"
    )
    for name, z, y_hat in (("ours", ours_z, ours_y), ("SAELens", theirs_z, theirs_y)):
        print(
            f"  {name:8s} FVU {compute_fvu(y, y_hat).item():.6f}   L0 {(z > 0).float().sum(dim=1).mean().item():.2f}"
        )
    differing = ((ours_z > 0) != (theirs_z > 0)).any(dim=1).sum().item()
    relative = ((ours_y - theirs_y).norm(dim=1) / y.norm(dim=1).clamp(min=1e-12)).max().item()
    print(
        f"  tokens whose active latents differ: {differing}; largest relative output difference {relative:.2e}"
    )
    row = {
        "checkpoint": Path(checkpoint).name,
        "class": type(ours).__name__,
        "sae_lens_class": type(theirs).__name__,
        "tokens": len(x),
        "fvu_ours": compute_fvu(y, ours_y).item(),
        "fvu_sae_lens": compute_fvu(y, theirs_y).item(),
        "tokens_with_different_latents": differing,
        "largest_relative_output_difference": relative,
    }
    harness.save(
        f"sae_lens_agreement_{type(ours).__name__}",
        "Our checkpoints against their SAELens export",
        [row],
        {"held_out_rows": rows},
        environment_at_start=at_start,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", help="a checkpoint folder (checkpoint_dir/name)")
    parser.add_argument("--rows", type=int, default=32, help="held-out rows of seq_len tokens")
    args = parser.parse_args()
    compare(args.checkpoint, args.rows)


if __name__ == "__main__":
    main()
