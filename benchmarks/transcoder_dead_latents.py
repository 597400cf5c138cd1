"""Dead latents of a transcoder on SmolLM2-135M, against a skip transcoder and an SAE.

The setting: layer 8, resid_mid -> mlp_out, the built-in python-docs corpus, dictionary
4608 (8 x 576, Matryoshka groups 1:2:4:9), BatchTopK k=32, batch 1024, lr 2e-3, 100k tokens, CPU,
float32. The cfgs come from train_gemma_example.py's own parser (the `transcoder` and `sae`
subcommands), the activations from the real stores, the training from training.py's one loop.

Rows (every transcoder variant trains on one activation stream with `train_sae_group`):
    transcoder          the transcoder as it is now
    skip transcoder     with cfg["transcoder_skip"] (y_hat = z W_dec + b_dec + x_s W_skip)
    SAE on mlp_out      a Matryoshka SAE on the target site, same settings (its own stream)
With --ablations, transcoder variants that isolate one choice each are added: the plain SAE-style
initialisation (tied encoder, uncentred source, random decoder), each part of the new one alone,
the learning rate, AuxK and the dead window (CE is measured for the main rows only).

Printed per row: dead latents as the training counter sees them at the end (unfired for
n_batches_to_dead x batch_size tokens), dead latents on held-out tokens (never fired on the next
--heldout-batches batches of the stream, which the run did not train on), FVU and L0 on those
tokens, and the fraction of CE loss recovered on the store's held-out rows (`evaluate_ce_loss`).

Run from the repository root (each transcoder variant adds ~100 training steps; on a quiet 2-core
machine the three rows take about 10 minutes, on a busy one much longer):
    python benchmarks/transcoder_dead_latents.py
    python benchmarks/transcoder_dead_latents.py --ablations --only transcoder "old init" "centring only"
    python benchmarks/transcoder_dead_latents.py --ablations --no-sae --no-ce
    python benchmarks/transcoder_dead_latents.py --top-k 64 --lr 3e-4   # the Gemma example's k and lr
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time

import harness
import torch  # noqa: E402

from matryoshka_sae.activation_store import ActivationsStore  # noqa: E402
from matryoshka_sae.checkpoint import checkpoint_folder, load_metrics  # noqa: E402
from matryoshka_sae.cli import train_gemma_example  # noqa: E402
from matryoshka_sae.config import post_init_cfg  # noqa: E402
from matryoshka_sae.evaluation import evaluate_ce_loss, reconstruction_report  # noqa: E402
from matryoshka_sae.model_loading import load_model  # noqa: E402
from matryoshka_sae.sae import GlobalBatchTopKMatryoshkaSAE, MatryoshkaTranscoder  # noqa: E402
from matryoshka_sae.training import train_sae, train_sae_group  # noqa: E402
from matryoshka_sae.transcoder_activation_store import TranscoderActivationsStore  # noqa: E402

SMOLLM2_SETTINGS = [
    "--model",
    "smollm2-135m",
    "--dataset",
    "python-docs",
    "--layer",
    "8",
    "--dict-size",
    "4608",
    "--batch-size",
    "1024",
    "--device",
    "cpu",
    "--model-dtype",
    "float32",
    "--model-batch-size",
    "16",
    "--wandb-mode",
    "disabled",
    "--perf-log-freq",
    "1000000000",
    "--checkpoint-freq",
    "1000000000",
]


def old_initialisation(sae) -> None:
    """The plain SAE-style initialisation: W_enc = W_dec^T, the source not centred, a random
    decoder (the first batch sets only the target's scale and b_dec, and a skip path's units)."""
    with torch.no_grad():
        sae.W_enc.copy_(sae.W_dec.t())
    random_encoder_only(sae)


def random_encoder_only(sae) -> None:
    """Independent encoder columns, but the source not centred and a random decoder."""

    def initialize(source, target):
        sae.initialize_b_dec(target)
        sae.initialize_skip_path(source)

    sae.initialize_from_batch = initialize


def centring_only(sae) -> None:
    """Centred source, random decoder (no `initialize_decoder_from_batch`)."""

    def initialize(source, target):
        sae.initialize_b_dec(target)
        sae.source_mean.copy_(sae.normalize_source(source)[0].mean(dim=0))
        sae.initialize_skip_path(source)

    sae.initialize_from_batch = initialize


def no_encoder_shift(sae) -> None:
    """The initialisation without the fitted encoder shift (b_enc stays 0)."""
    sae.initialize_encoder_bias_from_batch = lambda source, target: None


# label -> (cfg changes, change to the freshly built transcoder or None)
MAIN_VARIANTS = {
    "transcoder": ({}, None),
    "skip transcoder": ({"transcoder_skip": True}, None),
}
ABLATIONS = {
    "old init": ({}, old_initialisation),
    "random encoder only": ({}, random_encoder_only),
    "centring only": ({}, centring_only),
    "old init, skip": ({"transcoder_skip": True}, old_initialisation),
    "no encoder shift": ({}, no_encoder_shift),
    "no encoder shift, skip": ({"transcoder_skip": True}, no_encoder_shift),
    "lr 3e-4": ({"lr": 3e-4}, None),
    "no AuxK": ({"aux_penalty": 0.0}, None),
    "AuxK x8": ({"aux_penalty": 8 / 32}, None),
    "dead window 20": ({"n_batches_to_dead": 20}, None),
}


def base_cfgs(args: argparse.Namespace, checkpoint_dir: str) -> tuple[dict, dict]:
    """(transcoder cfg, SAE-on-target cfg) from train_gemma_example.py's parser."""
    parser = train_gemma_example.build_parser()
    common = SMOLLM2_SETTINGS + [
        "--num-tokens",
        str(args.num_tokens),
        "--checkpoint-dir",
        checkpoint_dir,
        "--seed",
        str(args.seed),
        "--top-k",
        str(args.top_k),
        "--lr",
        str(args.lr),
    ]
    transcoder = train_gemma_example.transcoder_cfg(parser.parse_args(["transcoder", *common]))
    sae = train_gemma_example.sae_cfg(parser.parse_args(["sae", *common, "--site", "mlp_out"]))
    for cfg in (transcoder, sae):
        cfg["exclude_bos"] = args.exclude_bos
    return transcoder, sae


def variant_cfg(base: dict, label: str, changes: dict) -> dict:
    cfg = copy.deepcopy(base)
    cfg.update(changes)
    cfg["name"] = label.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
    return post_init_cfg(cfg)


def held_out_batches(store, n_batches: int) -> list[torch.Tensor]:
    """The next n batches of the stream, concatenated per hook: tokens no run trained on."""
    batches = [store.next_batch() for _ in range(n_batches)]
    if torch.is_tensor(batches[0]):
        return [torch.cat(batches)]
    return [torch.cat(column) for column in zip(*batches)]


def measure(sae, cfg: dict, model, store, held_out: list[torch.Tensor], with_ce: bool) -> dict:
    report = reconstruction_report(sae, held_out[0], held_out[-1] if len(held_out) > 1 else None)
    row = {
        "train_dead": load_metrics(checkpoint_folder(cfg))["num_dead_features"],
        "heldout_dead": report["dead_fraction"] * sae.dict_size,
        "fvu": report["fvu"],
        "l0": report["l0_norm"],
        "ce_recovered": float("nan"),
    }
    if with_ce:
        row["ce_recovered"] = evaluate_ce_loss(
            sae, model, store.get_eval_tokens(cfg["n_eval_rows"]), cfg
        )["loss_recovered"]
    return row


def run_transcoders(model, base: dict, variants: dict, args) -> dict[str, dict]:
    cfgs, saes = [], []
    for label, (changes, adjust) in variants.items():
        cfg = variant_cfg(base, label, changes)
        sae = MatryoshkaTranscoder(cfg)
        if adjust is not None:
            adjust(sae)
        cfgs.append(cfg)
        saes.append(sae)
    store = TranscoderActivationsStore(model, base)
    train_sae_group(saes, store, None, cfgs)
    held_out = held_out_batches(store, args.heldout_batches)
    return {
        label: measure(sae, cfg, model, store, held_out, not args.no_ce and label in MAIN_VARIANTS)
        for label, sae, cfg in zip(variants, saes, cfgs)
    }


def run_sae(model, base: dict, args) -> dict:
    cfg = variant_cfg(base, "SAE on mlp_out", {})
    store = ActivationsStore(model, cfg)
    sae = train_sae(GlobalBatchTopKMatryoshkaSAE(cfg), store, None, cfg)
    return measure(
        sae, cfg, model, store, held_out_batches(store, args.heldout_batches), not args.no_ce
    )


def print_table(rows: dict[str, dict], dict_size: int, heldout_tokens: int) -> None:
    print(
        f"\n{'':<20} {'dead (train)':>13} {'dead (held-out)':>16} {'FVU':>6} {'L0':>6} {'CE rec.':>8}"
    )
    for label, r in rows.items():
        print(
            f"{label:<20} {r['train_dead']:>6.0f} {r['train_dead'] / dict_size:>5.1%} "
            f"{r['heldout_dead']:>8.0f} {r['heldout_dead'] / dict_size:>6.1%} {r['fvu']:>6.3f} "
            f"{r['l0']:>6.1f} {r['ce_recovered']:>8.1%}"
        )
    print(f"(dictionary {dict_size}; held-out dead: never fired on {heldout_tokens} unseen tokens)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-tokens", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=49)
    parser.add_argument(
        "--top-k", type=int, default=32, help="BatchTopK k (the Gemma example's: 64)"
    )
    parser.add_argument(
        "--lr", type=float, default=2e-3, help="learning rate (the Gemma example's: 3e-4)"
    )
    parser.add_argument("--heldout-batches", type=int, default=16)
    parser.add_argument(
        "--exclude-bos", action="store_true", help="leave BOS positions out (the demo does)"
    )
    parser.add_argument(
        "--ablations", action="store_true", help="add the one-choice transcoder variants"
    )
    parser.add_argument("--only", nargs="+", help="train only these transcoder variants (labels)")
    parser.add_argument("--no-sae", action="store_true", help="skip the SAE on mlp_out")
    parser.add_argument("--no-ce", action="store_true", help="skip the CE-loss evaluation")
    args = parser.parse_args()
    at_start = harness.environment()

    with tempfile.TemporaryDirectory() as checkpoint_dir:
        transcoder_base, sae_base = base_cfgs(args, checkpoint_dir)
        variants = dict(MAIN_VARIANTS, **(ABLATIONS if args.ablations else {}))
        if args.only:
            variants = {label: variants[label] for label in args.only}
        started = time.perf_counter()
        model = load_model("smollm2-135m", "cpu", torch.float32)
        rows = run_transcoders(model, transcoder_base, variants, args)
        if not args.no_sae:
            rows["SAE on mlp_out"] = run_sae(model, sae_base, args)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {time.perf_counter() - started:.0f} s; "
        f"{args.num_tokens} tokens, batch 1024, k {args.top_k}, lr {args.lr:g}, seed {args.seed}, "
        f"exclude_bos {args.exclude_bos}"
    )
    print_table(
        rows, transcoder_base["dict_size"], args.heldout_batches * transcoder_base["batch_size"]
    )
    dict_size = transcoder_base["dict_size"]
    table = [
        {
            "variant": label,
            "dead_train_share": round(r["train_dead"] / dict_size, 4),
            "dead_held_out_share": round(r["heldout_dead"] / dict_size, 4),
            "fvu": round(r["fvu"], 4),
            "l0": round(r["l0"], 1),
            "ce_recovered": r["ce_recovered"],
        }
        for label, r in rows.items()
    ]
    settings = {
        "model": "smollm2-135m",
        "layer": 8,
        "num_tokens": args.num_tokens,
        "batch_size": 1024,
        "top_k": args.top_k,
        "lr": args.lr,
        "seed": args.seed,
        "exclude_bos": args.exclude_bos,
        "dict_size": dict_size,
        "held_out_tokens": args.heldout_batches * transcoder_base["batch_size"],
    }
    harness.save(
        "transcoder_dead_latents",
        "Transcoder initialisations: dead latents, FVU, CE recovered",
        table,
        settings,
        environment_at_start=at_start,
    )


if __name__ == "__main__":
    main()
