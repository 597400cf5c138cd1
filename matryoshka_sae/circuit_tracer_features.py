"""Feature files for circuit-tracer's graph viewer, made from the feature browser's statistics.

circuit-tracer's viewer (`circuit_tracer.frontend`) shows, for the feature node a user clicks, a
JSON file per feature: its top and quantile contexts, the tokens it promotes and suppresses, and a
histogram of its activations. `write_viewer_features(stats_by_layer, data_dir, name)` writes those
files for a transcoder set from its per-layer `FeatureStatistics` (`feature_statistics`):

    data_dir/features/<name>/<cantor(layer, i)>.json    one per feature i of each layer
    data_dir/features/<name>/viewer_features.json       what was written: scan, layers, sizes

and returns the scan to give circuit-tracer's `create_graph_files(graph, slug, data_dir,
scan=scan)`: ``./data/features/<name>``. The viewer then loads feature (layer, i) as
``{scan}/{cantor(layer, i)}.json`` (a scan starting with ``./``), and circuit-tracer's local
server (`circuit_tracer.frontend.local_server.serve(data_dir=data_dir)`) serves ``/data/X`` from
``data_dir/X``. cantor(layer, i) = (layer + i)(layer + i + 1) / 2 + i is the index circuit-tracer
gives a feature node.

The fields, as the viewer's scripts use them:
    examples_quantiles   sections of contexts, each a title and examples (tokens as text, the
                         feature's activation on each, the index of the context's own token):
                         "Top activations", then the random firings grouped by the quarter of the
                         feature's activations they fall in, highest first
    act_min, act_max     0 and the largest activation seen: the colour scale of the tokens and the
                         range of the histogram
    histogram            counts of the firing activations in HISTOGRAM_BINS equal bins over
                         [act_min, act_max] (the viewer marks a node's activation at bin
                         floor((a - act_min) / (act_max - act_min) x bins))
    quantile_values      the 1st, 2nd, ..., 100th percentile of the firing activations: the viewer
                         prints a node's activation as the first percentile it does not exceed
    activation_frequency the fraction of held-out tokens (BOS excluded) on which the feature fires
    top_logits, bottom_logits   the tokens whose logits its decoder row raises / lowers most
                         (direct path, `feature_statistics.logit_effects`)

The statistics keep each feature's firing activations as counts in log-spaced bins (10 per decade);
the equal-width histogram and the percentiles are derived from them assuming the activations are
spread log-uniformly inside each log bin (the top bin ending at the largest activation). Both are
exact up to that spread, which is within one log bin (a factor 10^0.1 = 1.26).

The activations are the transcoder's own (`sae.encode`); an export to circuit-tracer's format that
folds centring and scales into the weights (circuit_tracer_format.py) keeps them unchanged, so the
values of the graph's nodes and of these files are in the same units.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable

import torch

from matryoshka_sae.feature_statistics import HISTOGRAM_EDGES, N_HISTOGRAM_BINS, FeatureStatistics

FEATURES_FOLDER = "features"
VIEWER_MANIFEST = "viewer_features.json"
HISTOGRAM_BINS = 40
N_QUANTILE_VALUES = 100
RANDOM_SECTIONS = [
    (0.75, 1.0),
    (0.5, 0.75),
    (0.25, 0.5),
    (0.0, 0.25),
]  # quarters of the activations
LATENTS_PER_STEP = 1024  # features whose histograms are derived at once: [1024, 41, 80] floats


def cantor_pairing(layer: int, index: int) -> int:
    """circuit-tracer's id of feature `index` of layer `layer`: (l + i)(l + i + 1) / 2 + i."""
    return (layer + index) * (layer + index + 1) // 2 + index


def viewer_scan(name: str) -> str:
    """The scan under which the viewer finds the files of `write_viewer_features(..., name)`."""
    return f"./data/{FEATURES_FOLDER}/{name}"


def check_viewer_name(name: str) -> None:
    """The name is a path segment of the viewer's URLs: letters, digits, '.', '_', '-'."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ValueError(
            f"Viewer feature set name {name!r}: use letters, digits, '.', '_' and '-' only "
            f"(it becomes part of the viewer's URLs)."
        )


# ---------------------------------------------------------------------------------------------
# Histogram and percentiles from the log-binned counts
# ---------------------------------------------------------------------------------------------


def _log_bins(
    stats: FeatureStatistics, latents: list[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """counts [n, B] of the latents' firing activations per log bin, and each bin's ends (low,
    high) [n, B], cut at the latent's largest activation (so the top bin ends there)."""
    counts = torch.zeros(len(latents), N_HISTOGRAM_BINS, dtype=torch.float64)
    maxima = torch.tensor([stats.latent(i)["max_activation"] for i in latents], dtype=torch.float64)
    for row, i in enumerate(latents):
        histogram = stats.latent(i)["histogram"]
        first, values = histogram["first_bin"], histogram["counts"]
        counts[row, first : first + len(values)] = torch.tensor(values, dtype=torch.float64)
    edges = torch.tensor(HISTOGRAM_EDGES, dtype=torch.float64)
    low = torch.minimum(edges[:-1], maxima[:, None])
    high = torch.minimum(edges[1:], maxima[:, None])
    return counts, low, high


def _fraction_below(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """[n, J, B]: the share of each log bin [low, high] below x [n, J], log-uniform inside the bin
    (a bin of zero width, at the largest activation, is all below x >= high)."""
    x, low, high = x[:, :, None], low[:, None, :], high[:, None, :]
    width = (high.log() - low.log()).clamp(min=1e-12)
    inside = ((x.clamp(min=1e-30).log() - low.log()) / width).clamp(0, 1)
    return torch.where(high > low, inside, (x >= high).double())


def viewer_histograms(
    stats: FeatureStatistics, latents: list[int], bins: int = HISTOGRAM_BINS
) -> tuple[torch.Tensor, torch.Tensor]:
    """For the given latents: counts [n, bins] of their firing activations in equal bins over
    [0, max activation], and their 1st..100th percentiles [n, 100] (module docstring). Rows of
    latents that never fired are zero."""
    counts, low, high = _log_bins(stats, latents)
    maxima = high[:, -1]
    fired = counts.sum(1) > 0
    edges = maxima[:, None] * torch.linspace(0, 1, bins + 1, dtype=torch.float64)  # [n, bins + 1]
    below = (_fraction_below(edges, low, high) * counts[:, None, :]).sum(2)  # [n, bins + 1]
    histogram = below.diff(dim=1).clamp(min=0)

    total = counts.sum(1, keepdim=True)
    targets = (
        total * torch.arange(1, N_QUANTILE_VALUES + 1, dtype=torch.float64) / N_QUANTILE_VALUES
    )
    cumulative = counts.cumsum(1)
    bin_ = torch.searchsorted(cumulative, targets - 1e-9 * total).clamp(max=N_HISTOGRAM_BINS - 1)
    before = cumulative.gather(1, bin_) - counts.gather(1, bin_)
    share = ((targets - before) / counts.gather(1, bin_).clamp(min=1e-12)).clamp(0, 1)
    low_b, high_b = low.gather(1, bin_), high.gather(1, bin_)
    values = torch.where(high_b > low_b, low_b * (high_b / low_b.clamp(min=1e-30)) ** share, high_b)
    values = torch.minimum(values.cummax(1).values, maxima[:, None])
    return histogram * fired[:, None], values * fired[:, None]


# ---------------------------------------------------------------------------------------------
# One feature's file
# ---------------------------------------------------------------------------------------------


def _examples(stats: FeatureStatistics, contexts: list[dict], seen: set) -> list[dict]:
    """Contexts as the viewer's examples; one whose tokens were already shown is marked repeated."""
    examples = []
    for context in contexts:
        key = tuple(context["tokens"])
        examples.append(
            {
                "tokens_acts_list": [float(a) for a in context["activations"]],
                "train_token_ind": context["center"],
                "is_repeated_datapoint": key in seen,
                "tokens": [stats.token_text(t) for t in context["tokens"]],
            }
        )
        seen.add(key)
    return examples


def example_sections(stats: FeatureStatistics, i: int) -> list[dict]:
    """The viewer's examples_quantiles of latent i: its top contexts, then its random firings
    grouped by the quarter of its activations they fall in (`RANDOM_SECTIONS`), empty ones left out."""
    latent, seen = stats.latent(i), set()
    sections = [
        {
            "quantile_name": "Top activations",
            "examples": _examples(stats, latent["top_contexts"], seen),
        }
    ]
    for low, high in RANDOM_SECTIONS:
        contexts = [
            c
            for c in latent["random_contexts"]
            if low <= c["quantile"] < high or (high == 1.0 and c["quantile"] == 1.0)
        ]
        if contexts:
            sections.append(
                {
                    "quantile_name": f"Random firings, percentile {round(100 * low)}-{round(100 * high)}",
                    "examples": _examples(stats, contexts, seen),
                }
            )
    return sections if latent["top_contexts"] else []


def _rounded(values: torch.Tensor) -> list[float]:
    """4 significant digits: short JSON."""
    return [float(f"{v:.4g}") for v in values.tolist()]


def viewer_feature(
    stats: FeatureStatistics,
    i: int,
    transcoder_id: str,
    histogram: torch.Tensor,
    quantile_values: torch.Tensor,
) -> dict:
    """Latent i's file (circuit-tracer's `frontend.feature_models.Model`); `histogram` [bins] and
    `quantile_values` [100] from `viewer_histograms`."""
    latent = stats.latent(i)
    fired = latent["fire_count"] > 0
    return {
        "transcoder_id": transcoder_id,
        "index": i,
        "examples_quantiles": example_sections(stats, i),
        "top_logits": [stats.token_text(t) for t, _ in latent.get("logits_up", [])],
        "bottom_logits": [stats.token_text(t) for t, _ in latent.get("logits_down", [])],
        "act_min": 0.0,
        "act_max": float(latent["max_activation"]),
        "quantile_values": _rounded(quantile_values) if fired else [],
        "histogram": _rounded(histogram) if fired else [],
        "activation_frequency": float(latent["density"]),
    }


# ---------------------------------------------------------------------------------------------
# A set's files
# ---------------------------------------------------------------------------------------------


def write_viewer_features(
    stats_by_layer: dict[int, FeatureStatistics],
    data_dir: str | Path,
    name: str,
    features: Iterable[tuple[int, int]] | None = None,
) -> str:
    """Write the viewer's file of every feature of every layer (or only the (layer, index) pairs of
    `features`) under ``data_dir/features/<name>/`` and return the scan (module docstring).

    Files of this name already there are replaced, others are left alone. One line of progress
    per layer.
    """
    check_viewer_name(name)
    folder = Path(data_dir) / FEATURES_FOLDER / name
    folder.mkdir(parents=True, exist_ok=True)
    wanted = None if features is None else {(int(layer), int(i)) for layer, i in features}
    written = {}
    for layer, stats in sorted(stats_by_layer.items()):
        n_latents = len(stats.data["latents"])
        latents = [i for i in range(n_latents) if wanted is None or (layer, i) in wanted]
        transcoder_id = f"{name}/layer_{layer}"
        for start in range(0, len(latents), LATENTS_PER_STEP):
            step = latents[start : start + LATENTS_PER_STEP]
            histograms, quantiles = viewer_histograms(stats, step)
            for i, histogram, values in zip(step, histograms, quantiles):
                feature = viewer_feature(stats, i, transcoder_id, histogram, values)
                text = json.dumps(feature, separators=(",", ":"), ensure_ascii=False)
                (folder / f"{cantor_pairing(layer, i)}.json").write_text(text, encoding="utf-8")
        written[str(layer)] = {
            "n_latents": n_latents,
            "n_written": len(latents),
            "source": stats.data.get("source", {}),
        }
        print(f"Viewer features: layer {layer}, {len(latents)} files")
    scan = viewer_scan(name)
    manifest = {
        "scan": scan,
        "file_name": "cantor(layer, index).json, cantor(l, i) = (l + i)(l + i + 1)/2 + i",
        "layers": written,
    }
    (folder / VIEWER_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return scan
