"""A transcoder set: one transcoder per layer, every layer's MLP replaced, trained in one model pass.

Circuit tracing (circuit-tracer's replacement model) needs a transcoder at every layer 0..L-1, each
reading its layer's MLP input (the source site) and predicting that layer's MLP output (mlp_out).
A set is trained as a group of ordinary transcoders (`sae.MatryoshkaTranscoder`) through the one
training loop (`training.train_sae_group`), fed by one multi-hook store
(`activation_store.MultiHookActivationsStore`): every chunk of text runs the model once, and each
layer's transcoder gets the (source, target) batch of its layer, row i of every batch from the same
token. Resume, SIGTERM and torchrun are those of the loop.

Kinds (`TRANSCODER_KINDS`), all with an optional skip connection (``skip=True``):
    matryoshka   BatchTopK over the whole dictionary, nested-prefix losses (the default)
    batchtopk    BatchTopK, one group (the whole dictionary is the only prefix)
    topk         the k largest latents of each token, one group

The folder of a set:

    <set>/transcoder_set.json   the manifest: layers, sites, kind, model (`SET_MANIFEST`)
    <set>/layer_{i}/            layer i's checkpoint folder (checkpoint.py), loadable on its own
    <set>/metrics.json          the set's final evaluation (every MLP replaced at once)

Defaults that make a set exportable to circuit-tracer (circuit_tracer_format.py): no per-token
standardisation of the source (input_unit_norm False: circuit-tracer encodes W_enc x + b_enc
with nothing before it), BOS positions excluded from training (circuit-tracer zeroes the features
at position 0).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from matryoshka_sae.checkpoint import atomic_write, check_checkpoint_folder, load_sae
from matryoshka_sae.config import get_default_cfg, post_init_cfg

SET_MANIFEST = "transcoder_set.json"
SET_FORMAT = 1

# kind -> (cfg["transcoder_selection"], whether the whole dictionary is the only prefix)
TRANSCODER_KINDS: dict[str, tuple[str, bool]] = {
    "matryoshka": ("batchtopk", False),
    "batchtopk": ("batchtopk", True),
    "topk": ("topk", True),
}

# The source a set reads by default: the MLP's normalised input. Without per-token standardisation
# (which circuit-tracer cannot compute) hook_resid_mid sets did far worse at equal budget: see
# docs/transcoder_sets.md and benchmarks/transcoder_sets.py.
DEFAULT_SOURCE_SITE = "ln2_normalized"


def layer_folder_name(layer: int) -> str:
    return f"layer_{layer}"


def parse_layers(text: str, n_layers: int) -> list[int]:
    """``all``, ``0,3,5`` or ``0-11`` (ranges and lists may mix) -> sorted distinct layers."""
    if text.strip() == "all":
        return list(range(n_layers))
    layers: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        try:
            first, _, last = part.partition("-")
            span = range(int(first), int(last or first) + 1)
        except ValueError:
            raise ValueError(
                f"--layers {text!r}: write 'all', a list such as 0,3,5 or a range such as 0-11."
            ) from None
        layers.update(span)
    outside = sorted(layer for layer in layers if not 0 <= layer < n_layers)
    if not layers or outside:
        raise ValueError(
            f"--layers {text!r}: the model has layers 0..{n_layers - 1}; "
            f"{outside or 'none given'} cannot be trained."
        )
    return sorted(layers)


def transcoder_set_cfgs(
    cfg: dict,
    layers: Sequence[int],
    set_folder: str | Path,
    kind: str = "matryoshka",
    skip: bool = False,
    source_site: str = DEFAULT_SOURCE_SITE,
    target_site: str = "mlp_out",
) -> list[dict]:
    """One transcoder cfg per layer, from the run settings in `cfg` (sizes, k, lr, data, ...).

    Layer i's transcoder reads (source_site, i) and predicts (target_site, i); its checkpoint
    folder is ``set_folder / layer_{i}``. Every cfg shares the data and step settings, so that one
    store feeds them all.
    """
    from matryoshka_sae.transcoder_activation_store import (
        create_transcoder_config,
    )  # (loads the data stack)

    if kind not in TRANSCODER_KINDS:
        raise ValueError(
            f"Unknown transcoder kind {kind!r}; choose one of {', '.join(TRANSCODER_KINDS)}."
        )
    selection, one_group = TRANSCODER_KINDS[kind]
    base = {
        **cfg,
        "transcoder_selection": selection,
        "transcoder_skip": skip,
        "checkpoint_dir": str(set_folder),
    }
    cfgs = []
    for layer in layers:
        layer_cfg = create_transcoder_config(
            dict(base, name=layer_folder_name(layer)),
            source_layer=layer,
            target_layer=layer,
            source_site=source_site,
            target_site=target_site,
        )
        if one_group:  # the whole dictionary is the only prefix
            layer_cfg = post_init_cfg({**layer_cfg, "group_sizes": [layer_cfg["dict_size"]]})
        cfgs.append(layer_cfg)
    return cfgs


# A set's transcoders override these defaults of the settings table: exportable to circuit-tracer
# (no per-token standardisation, BOS left out as circuit-tracer zeroes position 0), and each
# layer's target scaled to its own size, so that one learning rate suits layers whose MLP outputs
# differ in size by two orders of magnitude (docs/transcoder_sets.md, "Levers": it helped at every
# budget measured; folded into the decoder at export).
SET_DEFAULTS = {"input_unit_norm": False, "exclude_bos": True, "transcoder_target_norm": True}


def default_set_cfg(**settings) -> dict:
    """The defaults of a set's transcoders: `get_default_cfg` with `SET_DEFAULTS`, then `settings`."""
    cfg = get_default_cfg()
    cfg.update(SET_DEFAULTS)
    cfg.update(settings)
    return cfg


def manifest(cfgs: Sequence[dict], kind: str) -> dict:
    """What `SET_MANIFEST` records: enough to rebuild the cfgs' roles without reading them."""
    first = cfgs[0]
    return {
        "format": SET_FORMAT,
        "kind": kind,
        "skip": bool(first.get("transcoder_skip")),
        "model_name": first["model_name"],
        "source_site": first["source_site"],
        "target_site": first["target_site"],
        "layers": [cfg["source_layer"] for cfg in cfgs],
        "folders": {str(cfg["source_layer"]): cfg["name"] for cfg in cfgs},
    }


def write_manifest(set_folder: str | Path, cfgs: Sequence[dict], kind: str) -> Path:
    folder = Path(set_folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / SET_MANIFEST
    text = json.dumps(manifest(cfgs, kind), indent=2) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text))
    return path


def is_transcoder_set(folder: str | Path) -> bool:
    return (Path(folder) / SET_MANIFEST).is_file()


def free_set_folder(parent: str | Path, name: str) -> Path:
    """``parent / name``, or ``name-2``, ``name-3``... where that exists: a new set never writes
    into a folder that exists (its layer folders are created when the run claims them)."""
    for counter in range(1, 10_000):
        folder = Path(parent) / (name if counter == 1 else f"{name}-{counter}")
        if not folder.exists():
            return folder
    raise ValueError(f"{parent} holds 9999 sets named {name}; choose another --checkpoint-dir.")


def print_set_metrics(set_folder: str | Path) -> None:
    """One line: where the set is and its main figures with every MLP replaced."""
    path = Path(set_folder) / "metrics.json"
    if not path.is_file():
        print(f"{set_folder}: trained (no evaluation)")
        return
    m = json.loads(path.read_text())
    print(
        f"{set_folder}: every MLP replaced: loss recovered {m['loss_recovered']:.4g}, KL {m['kl_divergence']:.4g}, "
        f"CE {m['ce_loss_clean']:.4g} -> {m['ce_loss_spliced']:.4g}; per-layer FVU mean {m['fvu_mean']:.4g}, "
        f"max {m['fvu_max']:.4g}"
    )


def read_manifest(set_folder: str | Path) -> dict:
    """The set's manifest; a clear error when `set_folder` is not a transcoder set."""
    path = Path(set_folder) / SET_MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{set_folder} is not a transcoder set: it has no {SET_MANIFEST} "
            f"(train one with train_gemma_example.py transcoder --layers ...)."
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); restore it from the run.") from None
    missing = [
        key for key in ("layers", "folders", "source_site", "target_site") if key not in data
    ]
    if missing:
        raise ValueError(
            f"{path} lacks {', '.join(missing)}; it was not written by transcoder_set.py."
        )
    return data


def layer_folders(set_folder: str | Path) -> dict[int, Path]:
    """{layer: its checkpoint folder} of a set, each checked to hold a checkpoint."""
    data = read_manifest(set_folder)
    folders = {int(layer): Path(set_folder) / name for layer, name in data["folders"].items()}
    for folder in folders.values():
        check_checkpoint_folder(folder)
    return dict(sorted(folders.items()))


def load_transcoder_set(
    set_folder: str | Path, device: str | torch.device | None = None
) -> dict[int, torch.nn.Module]:
    """{layer: transcoder} of a set, each in eval mode (`checkpoint.load_sae`)."""
    return {layer: load_sae(folder, device) for layer, folder in layer_folders(set_folder).items()}


def train_transcoder_set(
    model,
    cfgs: Sequence[dict],
    kind: str = "matryoshka",
    resume: bool = False,
    evaluate: bool = True,
) -> list:
    """Train one transcoder per cfg (`transcoder_set_cfgs`) in one pass of `model` per chunk.

    The store is `training.open_activation_store`'s: a `MultiHookActivationsStore` over every
    layer's source and target hook (one layer: its paired store); the loop is `train_sae_group`. The per-layer CE evaluation of the loop is off (model=None:
    thirty dictionaries would mean thirty spliced runs each time); instead, with `evaluate`, the
    set is evaluated once at the end with every MLP replaced at once (`evaluate_set`), into
    ``<set>/metrics.json``. `resume`: continue the set from its layer folders' checkpoints.
    Returns the trained transcoders in the order of `cfgs`.
    """
    from matryoshka_sae import distributed
    from matryoshka_sae.sae import create_sae
    from matryoshka_sae.training import open_activation_store, train_sae_group

    set_folder = Path(cfgs[0]["checkpoint_dir"])
    store = open_activation_store(model, list(cfgs))
    transcoders = [create_sae(cfg) for cfg in cfgs]
    folders = [set_folder / cfg["name"] for cfg in cfgs] if resume else None
    if not resume and distributed.is_main_process():
        write_manifest(set_folder, cfgs, kind)
    trained = train_sae_group(transcoders, store, None, list(cfgs), resume_from=folders)
    if evaluate and distributed.is_main_process():
        metrics = evaluate_set(trained, cfgs, model, store.get_eval_tokens(cfgs[0]["n_eval_rows"]))
        text = json.dumps(metrics, indent=2) + "\n"
        atomic_write(set_folder / "metrics.json", lambda tmp: tmp.write_text(text))
    return trained


@torch.no_grad()
def evaluate_set(transcoders: Sequence, cfgs: Sequence[dict], model, tokens: torch.Tensor) -> dict:
    """The set's replacement quality on held-out `tokens` ([rows, seq]): every layer's target
    replaced at once by its transcoder's prediction (`evaluation.evaluate_replacement`), plus the
    per-layer FVUs and L0s measured on the same tokens with the clean model's activations (the keys
    of `evaluation.evaluate_clt`: fvu_per_layer, fvu_mean, fvu_max, l0_per_layer, l0_total)."""
    from matryoshka_sae.evaluation import evaluate_replacement, layer_statistics

    metrics = evaluate_replacement(transcoders, cfgs, model, tokens)
    statistics = layer_statistics(transcoders, cfgs, model, tokens)
    layers = [str(cfg["source_layer"]) for cfg in cfgs]
    fvus = [layer["fvu"] for layer in statistics]
    metrics["fvu_per_layer"] = dict(zip(layers, fvus))
    metrics["fvu_mean"] = sum(fvus) / len(fvus)
    metrics["fvu_max"] = max(fvus)
    metrics["l0_per_layer"] = {layer: entry["l0"] for layer, entry in zip(layers, statistics)}
    metrics["l0_total"] = sum(metrics["l0_per_layer"].values())
    return metrics
