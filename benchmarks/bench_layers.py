"""Three layers from one model pass against one layer, SmolLM2-135M on Python docs, model included.

    python benchmarks/bench_layers.py                       # layers 4 6 8 vs 8; 32,768 tokens each
    python benchmarks/bench_layers.py --tokens 65536 --sae-type batchtopk

Both runs are the real training loop (`train_sae_group`, no CE evaluation) on the live store: one
Matryoshka SAE (576 -> 9216, k 32, batch 4096) at layer 8 with `ActivationsStore`, then one at each
of layers 4, 6 and 8 with `MultiHookActivationsStore`, whose model passes stop after block 8 as the
single layer's do. Target: the three-layer run takes <= 1.3 x the single layer's time. Offline, CPU.
"""

from __future__ import annotations

import argparse
import tempfile

import harness
import torch  # noqa: E402

from matryoshka_sae.activation_store import ActivationsStore, MultiHookActivationsStore  # noqa: E402
from matryoshka_sae.config import get_default_cfg, post_init_cfg  # noqa: E402
from matryoshka_sae.model_loading import load_model  # noqa: E402
from matryoshka_sae.sae import create_sae  # noqa: E402
from matryoshka_sae.training import train_sae_group  # noqa: E402


def layer_cfg(args, layer: int, checkpoint_dir: str) -> dict:
    cfg = get_default_cfg()
    cfg.update(
        model_name="smollm2-135m",
        layer=layer,
        site="resid_pre",
        dataset_path="python-docs",
        seq_len=128,
        model_batch_size=16,
        batch_size=4096,
        num_batches_in_buffer=4,
        device="cpu",
        num_tokens=args.tokens,
        n_eval_rows=8,
        sae_type=args.sae_type,
        wandb_mode="disabled",
        checkpoint_dir=checkpoint_dir,
        checkpoint_freq=10**6,
        log_freq=10**6,
    )
    return post_init_cfg(cfg)


def timed_run(model, cfgs) -> float:
    """Seconds for the whole run: the store (its first model passes) and the training loop."""
    torch.manual_seed(0)

    def run() -> None:
        store = (
            MultiHookActivationsStore(model, cfgs)
            if len(cfgs) > 1
            else ActivationsStore(model, cfgs[0])
        )
        train_sae_group([create_sae(cfg) for cfg in cfgs], store, None, cfgs)

    return harness.timed(run, cfgs[0]["device"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--sae-type", default="matryoshka")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    at_start = harness.environment()
    model = load_model("smollm2-135m")
    one, three = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            one.append(timed_run(model, [layer_cfg(args, 8, f"{tmp}/one")]))
            three.append(
                timed_run(model, [layer_cfg(args, layer, f"{tmp}/three") for layer in (4, 6, 8)])
            )
    print(
        f"{args.sae_type}, {args.tokens} tokens, {torch.get_num_threads()} threads: layer 8 alone {min(one):.1f} s "
        f"({args.tokens / min(one):,.0f} tokens/s); layers 4, 6, 8 from one pass {min(three):.1f} s: "
        f"{min(three) / min(one):.2f} x"
    )
    rows = [
        {
            "run": "layer 8 alone",
            "seconds": round(min(one), 1),
            "tokens_per_s": round(args.tokens / min(one)),
        },
        {
            "run": "layers 4, 6, 8 from one pass",
            "seconds": round(min(three), 1),
            "tokens_per_s": round(args.tokens / min(three)),
            "time_vs_one_layer": round(min(three) / min(one), 2),
        },
    ]
    settings = {
        "model": "smollm2-135m",
        "sae_type": args.sae_type,
        "tokens": args.tokens,
        "batch_size": 4096,
        "rounds": args.rounds,
    }
    harness.save(
        "layers",
        "Several layers from one model pass (model included)",
        rows,
        settings,
        columns=["run", "seconds", "tokens_per_s", "time_vs_one_layer"],
        environment_at_start=at_start,
    )


if __name__ == "__main__":
    main()
