"""k-sparse probing of a dictionary's latents through the real `sae-probes` package (0.4.2), offline.

sae-probes (Kantamneni et al., "Are Sparse Autoencoders Useful? A Case Study in Sparse Probing")
ships its binary classification datasets inside the wheel. For each dataset it takes the model's
activation at the hook on each prompt's last token, encodes it with a SAELens `SAE`, ranks the
latents by the difference of their (mean-normalised) class means on the training split, and fits
an L1 logistic regression on the top k latents (C chosen on a validation split); the score is the
test accuracy. Its baseline fits a logistic regression on the raw activations of the same splits.

What we pass in: our model (sae-probes otherwise loads one from the hub by name) through its own
`ensure_dataset_activations(model=...)`, which writes the activation files that its `run_sae_evals`
and `run_baseline_evals` then read; and our dictionary exported to the SAELens format
(sae_lens_format.export_sae_lens) and loaded with `sae_lens.SAE.load_from_disk`. Nothing in the
package is patched. A transcoder is probed on its latents, read from its source hook.

DEFAULT_DATASETS, eight of its 113 datasets with short prompts and different kinds of label, run in
minutes on a CPU; `all_datasets()` lists every one.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import warnings
from pathlib import Path

KS = (1, 2, 5, 16)
REG_TYPE = "l1"
DEFAULT_DATASETS = (  # about 155k tokens of prompts in all (SmolLM2's tokenizer: ~4 characters a token)
    "5_hist_fig_ismale",  # people: gender
    "117_us_state_FL",  # places: US state
    "125_world_country_Italy",  # places: country
    "114_nyc_borough_Manhattan",  # places: borough
    "154_athlete_sport_football",  # people: sport
    "22_headline_isobama",  # news headline: topic
    "150_twt_emotion_sadness",  # tweet: emotion
    "41_truthqa_tf",  # statement: true or false
)


def all_datasets() -> list[str]:
    from sae_probes import DATASETS

    return list(DATASETS)


def check_datasets(names: list[str]) -> list[str]:
    """The names, if sae-probes has them all; else a one-line error naming the unknown ones."""
    known = set(all_datasets())
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(
            f"--probe-datasets: sae-probes has no dataset {', '.join(unknown)}; its names look like "
            f"{DEFAULT_DATASETS[0]!r} (sparse_probing.all_datasets() lists all {len(known)})."
        )
    return list(names)


@contextlib.contextmanager
def _tokenizer_sides(tokenizer):
    """sae-probes sets the tokenizer's padding and truncation sides; give the model's back afterwards."""
    saved = (tokenizer.padding_side, tokenizer.truncation_side)
    try:
        yield
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = saved


def prepare_activations(
    model,
    model_name: str,
    hook_name: str,
    datasets: list[str],
    cache_dir: str | Path,
    batch_size: int = 32,
    max_seq_len: int = 1024,
) -> None:
    """Write the model's activations on the datasets' prompts where sae-probes reads them (once
    per model, hook and dataset: existing files are kept)."""
    from sae_probes.generate_model_activations import ensure_dataset_activations

    with _tokenizer_sides(model.tokenizer):
        ensure_dataset_activations(
            model_name=model_name,
            dataset_short_names=datasets,
            hook_names=[hook_name],
            model_cache_path=cache_dir,
            device=str(model.cfg.device),
            batch_size=batch_size,
            max_seq_len=max_seq_len,
            model=model,
        )


def as_sae_lens(sae, folder: str | Path):
    """Our dictionary as a `sae_lens.SAE`, through the SAELens export."""
    from sae_lens import SAE

    from matryoshka_sae.sae_lens_format import export_sae_lens

    return SAE.load_from_disk(str(export_sae_lens(sae, folder)), device=str(sae.W_dec.device))


def probe_dictionary(
    sae,
    model_name: str,
    hook_name: str,
    datasets: list[str],
    cache_dir: str | Path,
    ks: tuple[int, ...] = KS,
    device: str = "cpu",
    seed: int = 42,
) -> dict:
    """sae-probes' k-sparse probes on the latents of `sae` (ours) for each dataset, from the model
    activations in cache_dir (`prepare_activations`): accuracy and AUC per k and their means."""
    from sae_probes import run_sae_evals

    with tempfile.TemporaryDirectory(prefix="sparse_probing_") as work:
        sae_lens_sae = as_sae_lens(sae, Path(work) / "sae")
        with _quiet_sklearn():
            run_sae_evals(
                sae=sae_lens_sae,
                model_name=model_name,
                hook_name=hook_name,
                reg_type=REG_TYPE,
                setting="normal",
                ks=list(ks),
                results_path=Path(work) / "results",
                model_cache_path=cache_dir,
                datasets=datasets,
                device=device,
                seed=seed,
            )
        folder = Path(work) / "results" / f"sae_probes_{model_name}" / "normal_setting"
        rows = {d: _read(folder / f"{d}_{hook_name}_{REG_TYPE}.json") for d in datasets}
    per_dataset = {
        d: {
            str(r["k"]): {"test_acc": r["test_acc"], "test_auc": r["test_auc"]}
            for r in dataset_rows
        }
        for d, dataset_rows in rows.items()
    }
    return {
        "ks": list(ks),
        "datasets": per_dataset,
        "mean_test_acc": _mean_by_k(per_dataset, ks, "test_acc"),
        "mean_test_auc": _mean_by_k(per_dataset, ks, "test_auc"),
    }


def probe_baseline(
    model_name: str,
    hook_name: str,
    datasets: list[str],
    cache_dir: str | Path,
    device: str = "cpu",
    seed: int = 42,
) -> dict:
    """sae-probes' baseline: a logistic regression on the raw activations, same splits. Its results
    are kept in cache_dir (they depend on the model and hook only) and reused."""
    from sae_probes import run_baseline_evals

    results = Path(cache_dir) / "baseline_results"
    with _quiet_sklearn():
        run_baseline_evals(
            model_name=model_name,
            hook_name=hook_name,
            setting="normal",
            method="logreg",
            results_path=results,
            model_cache_path=cache_dir,
            datasets=datasets,
            device=device,
            seed=seed,
        )
    folder = results / f"baseline_results_{model_name}" / "normal_setting"
    per_dataset = {
        d: {
            key: _read(folder / f"{d}_{hook_name}_logreg.json")[0][key]
            for key in ("test_acc", "test_auc")
        }
        for d in datasets
    }
    mean = {
        key: sum(r[key] for r in per_dataset.values()) / len(per_dataset)
        for key in ("test_acc", "test_auc")
    }
    return {
        "datasets": per_dataset,
        "mean_test_acc": mean["test_acc"],
        "mean_test_auc": mean["test_auc"],
    }


@contextlib.contextmanager
def _quiet_sklearn():
    """scikit-learn >= 1.8 warns on every probe that sae-probes sets `penalty` (still honoured)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module="sklearn")
        warnings.filterwarnings(
            "ignore", message="Inconsistent values: penalty", category=UserWarning
        )
        yield


def _read(path: Path) -> list[dict]:
    return json.loads(path.read_text())


def _mean_by_k(per_dataset: dict, ks, key: str) -> dict[str, float]:
    return {
        str(k): sum(r[str(k)][key] for r in per_dataset.values()) / len(per_dataset) for k in ks
    }
