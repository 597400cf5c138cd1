"""The budget curve: a Matryoshka transcoder set and a Matryoshka CLT on SmolLM2-135M (all 30 layers)
at equal latents and L0, measured at token budgets that grow by 4x.

    python benchmarks/budget_curve.py train --what set --out runs/budget_curve   # 20k, 82k, 328k, 1.3M tokens
    python benchmarks/budget_curve.py train --what clt --out runs/budget_curve --budgets 20480 81920 327680

One run per dictionary, trained through the library's one loop. The learning rate is constant (no warmup,
no decay), so the run that reaches budget N is the same run, step for step, as one planned for N tokens:
the curve continues one run by resuming it (`train_sae_group(..., resume_from=...)`, bit-identical) with a
larger `num_tokens` at each budget, and evaluates it there. At each budget the weights are copied to
``<out>/<what>/tokens_<N>/`` and the held-out evaluation (every MLP replaced at once, on rows of the
built-in corpus's held-out split "python-docs:test", which training never reads) goes into
``<out>/<what>/curve.json`` with the wall time so far.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import harness  # noqa: F401  (first: import paths)
from harness import environment

BUDGETS = (20480, 81920, 327680, 1310720)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("phase", choices=["train"])
    parser.add_argument("--what", choices=["set", "clt"], required=True)
    parser.add_argument("--out", default="runs/budget_curve")
    parser.add_argument("--budgets", type=int, nargs="+", default=list(BUDGETS))
    parser.add_argument("--dict-size", type=int, default=1152, help="latents a layer")
    parser.add_argument("--top-k", type=int, default=16, help="active latents a layer and token")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-eval-rows", type=int, default=32, help="held-out rows of 128 tokens")
    return parser


def run_settings(args, num_tokens: int) -> dict:
    return dict(
        model_name="smollm2-135m",
        dataset_path="python-docs:train",
        device="cpu",
        model_dtype="float32",
        dict_size=args.dict_size,
        top_k=args.top_k,
        batch_size=args.batch_size,
        num_tokens=num_tokens,
        lr=args.lr,
        seed=args.seed,
        seq_len=128,
        model_batch_size=16,
        num_batches_in_buffer=8,
        n_eval_rows=16,
        wandb_mode="disabled",
        log_freq=10,
        checkpoint_freq=10**6,
        perf_log_freq=10**9,
    )


def set_cfgs(args, num_tokens: int, folder: Path, bos: int) -> list[dict]:
    from matryoshka_sae.config import post_init_cfg
    from matryoshka_sae.transcoder_set import default_set_cfg, transcoder_set_cfgs

    base = post_init_cfg(default_set_cfg(**run_settings(args, num_tokens), bos_token_id=bos))
    return transcoder_set_cfgs(base, range(30), folder, kind="matryoshka")


def clt_cfgs(args, num_tokens: int, folder: Path, bos: int) -> list[dict]:
    from matryoshka_sae.cli.train_clt import CLT_DEFAULTS
    from matryoshka_sae.config import get_default_cfg, post_init_cfg

    cfg = get_default_cfg()
    cfg.update(CLT_DEFAULTS)
    cfg.update(
        run_settings(args, num_tokens),
        group_sizes=None,
        bos_token_id=bos,
        checkpoint_dir=str(folder),
        name="clt",
    )
    return [post_init_cfg(cfg)]


def held_out_tokens(model, n_rows: int):
    """The first `n_rows` rows of the held-out split, as the stores cut rows (BOS first, 128 tokens)."""
    from matryoshka_sae.activation_store import ActivationsStore
    from matryoshka_sae.config import get_default_cfg, post_init_cfg

    cfg = get_default_cfg()
    cfg.update(
        model_name="smollm2-135m",
        dataset_path="python-docs:test",
        device="cpu",
        layer=0,
        site="resid_pre",
        seq_len=128,
        model_batch_size=4,
        batch_size=64,
        num_batches_in_buffer=1,
        n_eval_rows=n_rows,
        exclude_bos=True,
        bos_token_id=model.tokenizer.bos_token_id,
    )
    return ActivationsStore(model, post_init_cfg(cfg)).get_eval_tokens(n_rows)


def evaluate(what: str, trained: list, cfgs: list[dict], model, tokens) -> dict:
    from matryoshka_sae.evaluation import evaluate_clt
    from matryoshka_sae.transcoder_set import evaluate_set

    if what == "clt":
        return evaluate_clt(trained[0], model, tokens)
    return evaluate_set(trained, cfgs, model, tokens)


def snapshot(run_folder: Path, into: Path) -> None:
    """The weights and settings of every dictionary (no optimizer state), as loadable folders."""
    keep = shutil.ignore_patterns("training_state*", "*.previous.*", "*.lock", "*.tmp*")
    shutil.copytree(run_folder, into, ignore=keep)


def train(args) -> None:
    import torch

    from matryoshka_sae.model_loading import load_model
    from matryoshka_sae.sae import create_sae
    from matryoshka_sae.training import open_activation_store, train_sae_group
    from matryoshka_sae.transcoder_set import write_manifest

    started = environment()
    out = Path(args.out) / args.what
    run_folder = out / "run"
    curve_file = out / "curve.json"
    curve = json.loads(curve_file.read_text()) if curve_file.exists() else {"rows": []}
    done = {row["tokens"] for row in curve["rows"]}
    model = load_model("smollm2-135m", "cpu", torch.float32)
    bos = model.tokenizer.bos_token_id
    tokens = held_out_tokens(model, args.n_eval_rows)
    make_cfgs = set_cfgs if args.what == "set" else clt_cfgs
    seconds_before = curve["rows"][-1]["train_seconds"] if curve["rows"] else 0.0
    for budget in sorted(args.budgets):
        if budget in done:
            continue
        cfgs = make_cfgs(args, budget, run_folder, bos)
        resume = (
            [str(Path(cfg["checkpoint_dir"]) / cfg["name"]) for cfg in cfgs]
            if run_folder.exists()
            else None
        )
        if resume is None and args.what == "set":
            write_manifest(run_folder, cfgs, "matryoshka")
        start = time.perf_counter()
        store = open_activation_store(model, cfgs)
        torch.manual_seed(args.seed)
        trained = train_sae_group(
            [create_sae(cfg) for cfg in cfgs], store, None, cfgs, resume_from=resume
        )
        seconds_before += time.perf_counter() - start
        evaluate_start = time.perf_counter()
        metrics = evaluate(args.what, trained, cfgs, model, tokens)
        snapshot(run_folder, out / f"tokens_{budget}")
        row = {
            "tokens": budget,
            "train_seconds": round(seconds_before, 1),
            "evaluate_seconds": round(time.perf_counter() - evaluate_start, 1),
            "dead_latents": sum(int(t.dead_latents().sum()) for t in trained),
            "epochs_completed": getattr(store, "epochs_completed", None),
            **{
                key: metrics[key]
                for key in (
                    "loss_recovered",
                    "kl_divergence",
                    "ce_loss_clean",
                    "ce_loss_spliced",
                    "fvu_mean",
                    "fvu_max",
                    "fvu_per_layer",
                    "l0_total",
                    "l0_per_layer",
                )
            },
        }
        curve["rows"].append(row)
        curve["settings"] = {
            **run_settings(args, budget),
            "what": args.what,
            "layers": 30,
            "held_out": f"python-docs:test, first {args.n_eval_rows} rows of 128 tokens",
            "eval_tokens": int(tokens.numel()),
        }
        curve["environment_at_start"] = started
        curve_file.write_text(json.dumps(curve, indent=2) + "\n")
        print(json.dumps({k: v for k, v in row.items() if not k.endswith("per_layer")}), flush=True)


def main() -> None:
    args = build_parser().parse_args()
    {"train": train}[args.phase](args)


if __name__ == "__main__":
    main()
