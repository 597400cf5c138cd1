"""The SAELens format, both ways: `export_sae_lens` writes a dictionary of this library as a folder
that `sae_lens.SAE.load_from_disk` loads; `load_sae_lens` builds one of ours from such a folder.

A SAELens folder holds ``cfg.json`` (architecture, d_in, d_sae, dtype, apply_b_dec_to_input,
normalize_activations, metadata) and ``sae_weights.safetensors`` (W_enc [d_in, S], b_enc [S],
W_dec [S, d_out], b_dec [d_out], and per architecture threshold [S] or W_skip [d_out, d_in]).
SAELens computes, for every architecture used here,

    x_n   = layer_norm(x) if normalize_activations == "layer_norm" else x
    pre   = (x_n - b_dec [if apply_b_dec_to_input]) W_enc + b_enc
    z     = relu(pre) | topk(pre, k) then relu | relu(pre) * (pre > threshold)
    x_hat = (z W_dec + b_dec) * std + mean     (transcoders: no way back, + x W_skip^T if skip)

which is our eval-mode computation (sae.py) once each class is mapped as follows:

| ours                          | SAELens architecture                  | notes                               |
| VanillaSAE                    | standard                              |                                     |
| TopKSAE                       | topk                                  | k = top_k                           |
| JumpReLUSAE                   | jumprelu                              | threshold = exp(log_threshold)      |
| BatchTopKSAE                  | jumprelu                              | every latent: the learned threshold |
| GlobalBatchTopKMatryoshkaSAE  | jumprelu                              | as BatchTopK; group ends kept       |
| MatryoshkaTranscoder          | jumprelu_transcoder (skip: jumprelu_skip_transcoder) | decoder x target_scale |

BatchTopK and Matryoshka SAEs become JumpReLU SAEs with one threshold for every latent, which is
what SAELens saves its own BatchTopK and Matryoshka SAEs as; ``metadata.training_architecture`` and
``metadata.training_architecture_details`` (k, matryoshka_widths = the group ends) record what they
were trained as, in SAELens's own fields, so the nested prefixes survive. A BatchTopK threshold
`t` selects pre > max(t, 0), as SAELens's relu(pre) * (pre > t) does.

Units: our input_unit_norm is SAELens's normalize_activations="layer_norm" (the same definition, see
`BaseAutoencoder.normalize_source`); b_dec centring is apply_b_dec_to_input (SAEs: on; transcoders,
whose b_dec lives in the target space: off). A transcoder's target_scale (a power of two) is
folded into W_dec, b_dec and W_skip, and a skip transcoder's skip_scale into W_skip, which is
exact; the source centring is folded into the biases (rounded; the sidecar keeps them unfolded).

Two sidecar files that SAELens ignores, ``native_config.json`` (our cfg) and
``native_extras.safetensors`` (what SAELens has no field for: log_threshold, target_scale), make
export -> import give back our dictionary bit for bit. Weights stay float32 and are copied, never
recomputed; whatever cannot be represented exactly is refused with an error naming the field.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from matryoshka_sae.checkpoint import (
    CONFIG_FILE,
    MARKER_FILE,
    WEIGHTS_FILE,
    check_replaceable,
    load_sae,
)
from matryoshka_sae.config import (
    HOOK_SITES,
    canonical_model_name,
    cfg_from_json,
    cfg_to_json,
    get_default_cfg,
    post_init_cfg,
)
from matryoshka_sae.sae import (
    BaseAutoencoder,
    BatchTopKSAE,
    GlobalBatchTopKMatryoshkaSAE,
    JumpReLUSAE,
    MatryoshkaTranscoder,
    TopKSAE,
    VanillaSAE,
    create_sae,
)

SAE_LENS_CONFIG = "cfg.json"
SAE_LENS_WEIGHTS = "sae_weights.safetensors"
NATIVE_CONFIG = "native_config.json"
NATIVE_EXTRAS = "native_extras.safetensors"
EXPORT_TOOL = (
    "export_sae_lens"  # the marker of an exported folder: only such a folder is overwritten
)
SAE_LENS_TENSORS = ("W_enc", "b_enc", "W_dec", "b_dec", "W_skip", "threshold")
# The cfg.json layout written here is SAELens 6's; a config without a version is read by SAELens
# as a pre-6.0 one and rewritten.
SAE_LENS_FORMAT_VERSION = "6.0.0"

SUPPORTED_ARCHITECTURES = (
    "standard",
    "topk",
    "jumprelu",
    "batchtopk",
    "matryoshka_batchtopk",
    "transcoder",
    "jumprelu_transcoder",
    "skip_transcoder",
    "jumprelu_skip_transcoder",
)


# Our sae_type -> the SAELens architectures `export_sae_lens` writes it as.
EXPORTED_AS = {
    "vanilla": ("standard",),
    "topk": ("topk",),
    "jumprelu": ("jumprelu",),
    "batchtopk": ("jumprelu",),
    "matryoshka": ("jumprelu",),
    "matryoshka_transcoder": ("jumprelu_transcoder", "jumprelu_skip_transcoder"),
}


class NotRepresentable(ValueError):
    """A dictionary (or folder) that the other library cannot represent exactly."""


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


def export_sae_lens(
    checkpoint_or_sae: str | Path | BaseAutoencoder,
    out_dir: str | Path,
    metadata: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `checkpoint_or_sae` (a checkpoint folder or a live SAE) to `out_dir` in the SAELens
    format; returns out_dir. `metadata` overrides or adds cfg.json metadata fields (e.g.
    ``{"dataset_path": "...", "neuronpedia_id": "..."}``). The folder appears complete or not at all.
    `overwrite` replaces only a folder an earlier export wrote, never the checkpoint or a folder
    holding it or anything else (checkpoint.check_replaceable).
    """
    sae = (
        checkpoint_or_sae
        if isinstance(checkpoint_or_sae, BaseAutoencoder)
        else load_checkpoint(checkpoint_or_sae)
    )
    sae_lens_cfg, weights, extras = sae_lens_form(sae)
    sae_lens_cfg["metadata"].update(metadata or {})
    files = {
        SAE_LENS_CONFIG: lambda path: path.write_text(json.dumps(sae_lens_cfg, indent=2)),
        SAE_LENS_WEIGHTS: lambda path: save_file(weights, str(path)),
        NATIVE_CONFIG: lambda path: path.write_text(cfg_to_json(sae.cfg)),
        NATIVE_EXTRAS: lambda path: save_file(extras, str(path)),
    }
    inputs = [] if isinstance(checkpoint_or_sae, BaseAutoencoder) else [checkpoint_or_sae]
    return write_export_folder(Path(out_dir), files, overwrite, inputs)


def load_checkpoint(folder: str | Path) -> BaseAutoencoder:
    """`checkpoint.load_sae`, on CPU, after checking that the folder holds one complete save."""
    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file():
        raise FileNotFoundError(
            f"{folder} is not a checkpoint: it has no {CONFIG_FILE}. Pass the folder "
            f"a training run saved into (checkpoint_dir/name)."
        )
    in_progress = sorted(p.name for p in folder.glob(".*.tmp-*"))
    if in_progress:
        raise ValueError(
            f"{folder} is being saved (found {', '.join(in_progress)}): export it once the save "
            f"has finished; if no run is writing to it, the save was interrupted: delete those files."
        )
    if not (folder / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(
            f"{folder} has no {WEIGHTS_FILE} yet: the first save has not finished."
        )
    # Each file is renamed into place whole (checkpoint._atomic_write), so the weights on disk are
    # one complete save whatever the training state beside them; a damaged copy is still caught.
    try:
        with safe_open(folder / WEIGHTS_FILE, framework="pt"):
            pass
    except (SafetensorError, OSError) as error:
        raise ValueError(
            f"{folder / WEIGHTS_FILE} is not a complete safetensors file ({error})."
        ) from error
    return load_sae(folder, device="cpu")


def sae_lens_form(
    sae: BaseAutoencoder,
) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(cfg.json dict, SAELens weights, native extras) of `sae`; NotRepresentable if it has none."""
    cfg = sae.cfg
    state = {
        name: t.detach().to("cpu", copy=True).contiguous() for name, t in sae.state_dict().items()
    }
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        if state[name].dtype != torch.float32:
            raise NotRepresentable(f"{name} is {state[name].dtype}; export float32 weights.")
    weights = {name: state[name] for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    fields = {
        "d_in": sae.d_in,
        "d_sae": sae.dict_size,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": not isinstance(sae, MatryoshkaTranscoder),
        "normalize_activations": "layer_norm" if cfg["input_unit_norm"] else "none",
        "reshape_activations": "none",
    }
    details: dict = {}
    if isinstance(sae, MatryoshkaTranscoder):
        architecture = _transcoder_form(sae, state, weights)
        fields["d_out"] = sae.d_out
    elif isinstance(sae, BatchTopKSAE):
        architecture = "jumprelu"
        weights["threshold"] = _learned_threshold(sae).expand(sae.dict_size).clone()
    elif isinstance(sae, TopKSAE):
        architecture = "topk"
        fields.update(k=cfg["top_k"], rescale_acts_by_decoder_norm=False)
    elif isinstance(sae, JumpReLUSAE):
        architecture = "jumprelu"
        weights["threshold"] = state["log_threshold"].exp()  # what our forward pass computes
    elif isinstance(sae, VanillaSAE):
        architecture = "standard"
    else:
        raise NotRepresentable(f"{type(sae).__name__} has no SAELens form.")
    if isinstance(sae, BatchTopKSAE):  # the transcoder included
        details = {
            "k": cfg["top_k"],
            "rescale_acts_by_decoder_norm": False,
            "topk_threshold_lr": cfg["threshold_ema_rate"],
        }
        if isinstance(sae, GlobalBatchTopKMatryoshkaSAE):
            details["matryoshka_widths"] = sae.group_ends.tolist()
    # Everything SAELens has no field for (log_threshold, target_scale, training counters).
    extras = {name: t for name, t in state.items() if name not in SAE_LENS_TENSORS}
    return (
        {"architecture": architecture, **fields, "metadata": _metadata(sae, details)},
        weights,
        extras,
    )


def _learned_threshold(sae: BatchTopKSAE) -> torch.Tensor:
    threshold = sae.threshold.detach().cpu().float()
    if threshold.item() < 0:
        raise NotRepresentable(
            "threshold: this BatchTopK dictionary has not learned its inference threshold "
            "yet (it is -1 until the first training step), so it has no eval-mode form."
        )
    return threshold


def _transcoder_form(sae: MatryoshkaTranscoder, state, weights) -> str:
    """Fold our units into SAELens's. Our prediction is
        (z W_dec + b_dec + (x - skip_shift) / skip_scale W_skip) * target_scale,
    SAELens's z W_dec' + b_dec' + x W_skip'^T: W_dec' = W_dec s_t, W_skip' = (W_skip s_t / s_s)^T
    (powers of two: exact) and b_dec' = (b_dec - skip_shift / s_s W_skip) s_t (rounded)."""
    if sae.cfg["transcoder_selection"] == "topk":
        raise NotRepresentable(
            "transcoder_selection: a per-token TopK transcoder has no JumpReLU form (its "
            "latents depend on the other latents of the token); train it with "
            "transcoder_selection 'batchtopk' to export it."
        )
    weights["threshold"] = _learned_threshold(sae).expand(sae.dict_size).clone()
    # Ours encodes the centred source x_n - source_mean, SAELens's reads x_n: the mean is folded
    # into b_enc (and the skip path's shift into b_dec); the extras keep the unfolded biases for
    # an exact import.
    state["unfolded_b_enc"] = state["b_enc"]
    weights["b_enc"] = state["b_enc"] - state["source_mean"] @ state["W_enc"]
    scale = state["target_scale"].float()
    folded = {"W_dec": (state["W_dec"], scale), "b_dec": (state["b_dec"], scale)}
    skip = state.get("W_skip")
    if skip is not None:
        skip_scale = state["skip_scale"].float()
        state["unfolded_b_dec"] = state["b_dec"]
        folded["b_dec"] = (state["b_dec"] - (state["skip_shift"] / skip_scale) @ skip, scale)
        folded["W_skip"] = (skip.t(), scale / skip_scale)  # SAELens keeps W_skip as [d_out, d_in]
    rounded = []
    for name, (value, factor) in folded.items():
        weights[name] = (value * factor).contiguous()
        if not torch.equal(weights[name] / factor, value):
            rounded.append(name)
    if rounded:
        scales = [
            f"{name}={state[name].item()!r}"
            for name in ("target_scale", "skip_scale")
            if name in state and not _power_of_two(state[name].item())
        ]
        warnings.warn(
            f"{' and '.join(scales)} is not a power of two, so folding it into {', '.join(rounded)} "
            f"rounds the weights (by at most half a float32 ulp); dictionaries trained now have "
            f"power-of-two scales and export exactly.",
            stacklevel=2,
        )
    return "jumprelu_skip_transcoder" if skip is not None else "jumprelu_transcoder"


def _power_of_two(value: float) -> bool:
    return value > 0 and math.frexp(value)[0] == 0.5


def _metadata(sae: BaseAutoencoder, details: dict) -> dict:
    """The metadata SAELens, SAEBench and Neuronpedia read, from our cfg."""
    cfg = sae.cfg
    transcoder = isinstance(sae, MatryoshkaTranscoder)
    bos = cfg.get("bos_token_id")
    metadata = {
        "sae_lens_version": SAE_LENS_FORMAT_VERSION,
        "sae_lens_training_version": None,
        "model_name": cfg["model_name"],
        "hook_name": cfg["source_hook_point"] if transcoder else cfg["hook_point"],
        "hook_head_index": None,
        "context_size": cfg["seq_len"],
        "prepend_bos": _prepend_bos(cfg),
        "dataset_path": _dataset_path(cfg),
        # SAELens: a list of token ids left out of training (True: every special token).
        "exclude_special_tokens": ([bos] if bos is not None else True)
        if cfg.get("exclude_bos")
        else False,
        "model_from_pretrained_kwargs": {},
        "neuronpedia_id": None,
        "training_architecture": _training_architecture(sae),
        "training_architecture_details": details,
    }
    if transcoder:
        metadata["hook_name_out"] = cfg["target_hook_point"]
        metadata["hook_head_index_out"] = None
    return metadata


def _training_architecture(sae: BaseAutoencoder) -> str:
    if isinstance(sae, GlobalBatchTopKMatryoshkaSAE):
        return "matryoshka_batchtopk"
    if isinstance(sae, BatchTopKSAE):
        return "batchtopk"
    return {TopKSAE: "topk", JumpReLUSAE: "jumprelu", VanillaSAE: "standard"}[type(sae)]


def _prepend_bos(cfg: dict) -> bool:
    """Whether every context starts with BOS: always when cfg names a BOS token (our stores set
    it); otherwise as TransformerLens does, except for SmolLM2, which model_loading builds without."""
    if cfg.get("bos_token_id") is not None:
        return True
    return canonical_model_name(cfg["model_name"]) != "smollm2-135m"


def _dataset_path(cfg: dict) -> str | None:
    path = cfg.get("dataset_path")
    return (
        path if isinstance(path, str) and not path.startswith("<") else None
    )  # "<Dataset>": an object


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_export_folder(out_dir: Path, files: dict, overwrite: bool, inputs=()) -> Path:
    """Write an export: every file of `files` ({name: write(path)}) and the marker of EXPORT_TOOL
    into a temporary sibling folder, then rename it to out_dir, so that it appears complete or not
    at all. `overwrite` replaces only a folder an export wrote, which neither is nor holds one of
    `inputs` (checkpoint.check_replaceable); without it an existing out_dir is refused."""
    files = {**files, MARKER_FILE: lambda path: path.write_text(EXPORT_TOOL + "\n")}
    if overwrite:
        check_replaceable(out_dir, EXPORT_TOOL, files, inputs=inputs)
    return _write_folder_atomically(out_dir, files, overwrite)


def _write_folder_atomically(out_dir: Path, files: dict, overwrite: bool) -> Path:
    """Write every file into a temporary sibling folder, then rename it to out_dir."""
    if out_dir.exists() and not overwrite:
        raise FileExistsError(
            f"{out_dir} already exists; choose a new folder or pass overwrite=True (--overwrite)."
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        file_mode = (
            0o666 & ~_umask()
        )  # safetensors writes private (0600) files; these are for sharing
        for name, write in files.items():
            write(tmp / name)
            os.chmod(tmp / name, file_mode)
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and out_dir.exists():
            shutil.rmtree(old)  # the new folder is in place
        elif old.exists():
            os.replace(old, out_dir)  # the rename failed: the old folder comes back
    return out_dir


# ---------------------------------------------------------------------------------------------
# Import
# ---------------------------------------------------------------------------------------------


def load_sae_lens(
    folder: str | Path, device: str = "cpu", round_thresholds: bool = False
) -> BaseAutoencoder:
    """Build the dictionary of this library that computes what the SAELens folder's SAE computes
    (in eval mode: call `.eval()` before use; BatchTopK models then use their threshold).

    Supported: standard, topk, jumprelu (also BatchTopK and Matryoshka SAEs saved by SAELens as
    jumprelu), batchtopk and matryoshka_batchtopk as SAELens saves them for training, and the
    transcoders with one threshold. Our own exports come back exactly as they were (sidecars).
    Float32 weights are copied bit for bit (bfloat16/float16 weights are widened, which is exact).

    `round_thresholds`: a JumpReLU threshold t is stored here as log_threshold, and for some float32
    t no float32 log gives exp(log) == t exactly; by default that is an error, with
    round_thresholds=True the nearest is taken (the latent's step moves by a few ulps) and a
    warning says for how many latents.
    """
    folder = Path(folder)
    sl_cfg = _read_sae_lens_cfg(folder)
    weights = _read_weights(folder / SAE_LENS_WEIGHTS)
    native_path = folder / NATIVE_CONFIG
    extras = load_file(folder / NATIVE_EXTRAS) if (folder / NATIVE_EXTRAS).is_file() else {}
    if native_path.is_file():
        cfg = cfg_from_json(native_path.read_text())
        cfg["device"] = "cpu"
        cfg = post_init_cfg(cfg)
        if sl_cfg["architecture"] not in EXPORTED_AS[cfg["sae_type"]]:
            raise NotRepresentable(
                f"{NATIVE_CONFIG} describes a {cfg['sae_type']} dictionary, which is not exported "
                f"as {sl_cfg['architecture']!r}; delete the native_* sidecar files."
            )
    else:
        cfg = _native_cfg(sl_cfg, weights)
    state = _native_state(cfg, sl_cfg, weights, extras, round_thresholds)
    cfg["device"] = str(device)
    sae = create_sae(cfg)
    parameters = dict(sae.named_parameters())
    for name, fresh in sae.state_dict().items():
        if name in state:
            continue
        if name in extras:
            state[name] = extras[name]
        elif name in parameters:
            raise NotRepresentable(
                f"{folder}: nothing gives {type(sae).__name__}'s parameter {name}."
            )
        else:
            state[name] = (
                fresh  # training state (counters) that the folder does not carry starts afresh
            )
    sae.load_state_dict(state)
    return sae


def _read_sae_lens_cfg(folder: Path) -> dict:
    path = folder / SAE_LENS_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a SAELens folder: it has no {SAE_LENS_CONFIG}.")
    cfg = json.loads(path.read_text())
    if "metadata" not in cfg:  # SAELens < 6 kept the metadata at the top level
        cfg["metadata"] = {
            "model_name": cfg.get("model_name"),
            "hook_name": cfg.get("hook_name", cfg.get("hook_point")),
            "context_size": cfg.get("context_size"),
            "dataset_path": cfg.get("dataset_path"),
        }
        cfg.setdefault("architecture", "standard")
    architecture = cfg.get("architecture")
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise NotRepresentable(
            f"architecture {architecture!r} in {path} has no counterpart here; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}."
        )
    norm = cfg.get("normalize_activations", "none")
    if norm not in ("none", "layer_norm"):
        raise NotRepresentable(
            f"normalize_activations={norm!r}: only 'none' and 'layer_norm' (our "
            f"input_unit_norm) have a counterpart here; fold it into the weights in SAELens first."
        )
    if cfg.get("reshape_activations", "none") != "none":
        raise NotRepresentable(
            f"reshape_activations={cfg['reshape_activations']!r}: our dictionaries read "
            f"[..., d_in] activations; flatten the heads and set it to 'none'."
        )
    transcoder = "transcoder" in architecture
    if cfg.get("apply_b_dec_to_input", not transcoder) != (not transcoder):
        raise NotRepresentable(
            f"apply_b_dec_to_input={cfg['apply_b_dec_to_input']}: our "
            f"{'transcoders never' if transcoder else 'SAEs always'} subtract b_dec from the input."
        )
    if cfg.get("rescale_acts_by_decoder_norm"):
        raise NotRepresentable(
            "rescale_acts_by_decoder_norm=True: our dictionaries do not rescale by the decoder "
            "norms; in SAELens call sae.fold_W_dec_norm() and save it (or save_inference_model())."
        )
    return cfg


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path.parent} has no {path.name}.")
    try:
        weights = load_file(path)
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path} is not a complete safetensors file ({error}).") from error
    widened = {}
    for name, tensor in weights.items():
        if tensor.is_floating_point() and tensor.dtype not in (
            torch.float32,
            torch.float16,
            torch.bfloat16,
        ):
            if name != "topk_threshold":  # SAELens keeps this one in float64
                raise NotRepresentable(
                    f"{name} is {tensor.dtype}: our weights are float32 and narrowing would round."
                )
        widened[name] = tensor if name == "topk_threshold" else tensor.float()
    return widened


def _native_cfg(sl_cfg: dict, weights: dict[str, torch.Tensor]) -> dict:
    """Our cfg for a dictionary trained elsewhere, from cfg.json."""
    architecture, metadata = sl_cfg["architecture"], sl_cfg["metadata"]
    details = metadata.get("training_architecture_details") or {}
    trained_as = metadata.get("training_architecture") or architecture
    d_in, d_sae = int(sl_cfg["d_in"]), int(sl_cfg["d_sae"])
    cfg = get_default_cfg()
    cfg.update(
        act_size=d_in,
        dict_size=d_sae,
        device="cpu",
        input_unit_norm=sl_cfg.get("normalize_activations") == "layer_norm",
        group_sizes=[d_sae],
        model_name=metadata.get("model_name") or "unknown",
        wandb_mode="disabled",
    )
    widths = details.get("matryoshka_widths") or sl_cfg.get("matryoshka_widths")
    if "transcoder" in architecture:
        cfg["sae_type"] = "matryoshka_transcoder"
        cfg.update(
            source_act_size=d_in,
            target_act_size=int(sl_cfg.get("d_out", d_in)),
            transcoder_skip="W_skip" in weights,
            **_hook_settings(metadata, transcoder=True),
        )
    elif architecture == "standard":
        cfg["sae_type"] = "vanilla"
    elif architecture == "topk":
        cfg["sae_type"] = "topk"
    elif trained_as in ("batchtopk", "matryoshka_batchtopk") and _uniform(_threshold_of(weights)):
        cfg["sae_type"] = "matryoshka" if widths else "batchtopk"
    else:
        cfg["sae_type"] = "jumprelu"
    if widths:
        widths = [int(w) for w in widths]
        cfg["group_sizes"] = [end - start for start, end in zip([0] + widths[:-1], widths)]
    k = sl_cfg.get("k", details.get("k"))
    if k is not None and float(k) == int(k):
        cfg["top_k"] = int(k)
    cfg["top_k"] = min(cfg["top_k"], d_sae)
    if "transcoder" not in architecture:
        cfg.update(_hook_settings(metadata, transcoder=False))
    cfg["seq_len"] = metadata.get("context_size") or cfg["seq_len"]
    if isinstance(metadata.get("dataset_path"), str):
        cfg["dataset_path"] = metadata["dataset_path"]
    excluded = metadata.get("exclude_special_tokens")
    cfg["exclude_bos"] = bool(excluded)
    if isinstance(excluded, list) and len(excluded) == 1:
        cfg["bos_token_id"] = int(excluded[0])
    try:
        return post_init_cfg(cfg)
    except ValueError as error:
        raise NotRepresentable(f"cfg.json does not make a valid cfg here: {error}") from error


def _hook_settings(metadata: dict, transcoder: bool) -> dict:
    """site/layer and the hook point(s) from SAELens's hook names (hook points kept verbatim)."""
    settings = {}
    names = (
        [
            ("source", metadata.get("hook_name")),
            ("target", metadata.get("hook_name_out") or metadata.get("hook_name")),
        ]
        if transcoder
        else [("", metadata.get("hook_name"))]
    )
    for end, hook in names:
        prefix = f"{end}_" if end else ""
        if not hook:
            continue
        settings[f"{prefix}hook_point"] = hook
        for site, pattern in HOOK_SITES.items():
            head, tail = pattern.split("{layer}")
            middle = (
                hook[len(head) : len(hook) - len(tail)]
                if hook.startswith(head) and hook.endswith(tail)
                else ""
            )
            if middle.isdigit():
                settings[f"{prefix}site"], settings[f"{prefix}layer"] = site, int(middle)
    if transcoder and "source_layer" not in settings:
        raise NotRepresentable(
            f"hook_name {metadata.get('hook_name')!r}: a transcoder here needs source and "
            f"target hooks of the form blocks.L.<site> ({', '.join(HOOK_SITES)})."
        )
    if transcoder:
        settings.setdefault("target_site", settings["source_site"])
        settings.setdefault("target_layer", settings["source_layer"])
        settings["layer"] = settings["source_layer"]
    return settings


def _threshold_of(weights: dict[str, torch.Tensor]) -> torch.Tensor | None:
    if "threshold" in weights:
        return weights["threshold"]
    if "topk_threshold" in weights:
        return weights["topk_threshold"]
    return None


def _uniform(threshold: torch.Tensor | None) -> bool:
    return threshold is not None and bool((threshold == threshold.flatten()[0]).all())


def _native_state(
    cfg: dict,
    sl_cfg: dict,
    weights: dict[str, torch.Tensor],
    extras: dict[str, torch.Tensor],
    round_thresholds: bool,
) -> dict[str, torch.Tensor]:
    """Our state dict from SAELens weights (shapes checked, nothing recomputed but the
    threshold's log and the unfolding of a transcoder's power-of-two target scale)."""
    architecture = sl_cfg["architecture"]
    transcoder = cfg["sae_type"] == "matryoshka_transcoder"
    d_in, d_sae = int(sl_cfg["d_in"]), int(sl_cfg["d_sae"])
    d_out = int(sl_cfg.get("d_out", d_in)) if transcoder else d_in
    expected = {
        "W_enc": (d_in, d_sae),
        "b_enc": (d_sae,),
        "W_dec": (d_sae, d_out),
        "b_dec": (d_out,),
    }
    if "jumprelu" in architecture:
        expected["threshold"] = (d_sae,)
    if architecture in ("batchtopk", "matryoshka_batchtopk"):
        expected["topk_threshold"] = ()
    if "skip" in architecture:
        expected["W_skip"] = (d_out, d_in)
    for name, shape in expected.items():
        if name not in weights:
            raise NotRepresentable(
                f"{SAE_LENS_WEIGHTS} has no {name}, which architecture {architecture!r} needs."
            )
        if tuple(weights[name].shape) != shape:
            raise NotRepresentable(
                f"{name} has shape {tuple(weights[name].shape)} but cfg.json (d_in={d_in}, "
                f"d_sae={d_sae}{f', d_out={d_out}' if transcoder else ''}) makes it {shape}."
            )
    unknown = set(weights) - set(expected)
    if unknown:
        raise NotRepresentable(
            f"{SAE_LENS_WEIGHTS} has tensors {sorted(unknown)} that architecture "
            f"{architecture!r} does not use; they would be dropped."
        )
    if (cfg["act_size"] if not transcoder else cfg["source_act_size"]) != d_in or cfg[
        "dict_size"
    ] != d_sae:
        raise NotRepresentable(
            f"{NATIVE_CONFIG} (act_size {cfg['act_size']}, dict_size {cfg['dict_size']}) does not "
            f"match cfg.json (d_in {d_in}, d_sae {d_sae}); delete the sidecar or fix the folder."
        )
    state = {name: weights[name] for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    threshold = _threshold_of(weights)
    if architecture in ("transcoder", "skip_transcoder"):
        threshold = torch.zeros(d_sae)  # ReLU: pre > 0
    if cfg["sae_type"] in ("batchtopk", "matryoshka", "matryoshka_transcoder"):
        if not _uniform(threshold):
            raise NotRepresentable(
                f"threshold: {cfg['sae_type']} dictionaries here have one threshold for every "
                f"latent, the folder's differ from latent to latent."
            )
        # relu(pre) * (pre > t) keeps pre > max(t, 0), as our threshold does (t < 0 acts as 0).
        state["threshold"] = threshold.flatten()[0].float().clamp(min=0)
    elif cfg["sae_type"] == "jumprelu":
        state["log_threshold"] = _log_threshold(
            threshold, extras.get("log_threshold"), round_thresholds
        )
    if transcoder:
        _unfold_target_scale(state, weights, extras)
        if "source_mean" in extras:  # our own export folded the source mean into the biases
            state.update(source_mean=extras["source_mean"], b_enc=extras["unfolded_b_enc"])
            if "unfolded_b_dec" in extras:
                state["b_dec"] = extras["unfolded_b_dec"]
    return state


def _log_threshold(
    threshold: torch.Tensor, native: torch.Tensor | None, round_thresholds: bool
) -> torch.Tensor:
    """float32 log_threshold with exp(log_threshold) == max(threshold, 0) in float32, latent by latent."""
    threshold = threshold.clamp(min=0)  # relu(pre) * (pre > t) with t < 0 is relu: t = 0
    if native is not None and torch.equal(native.exp(), threshold):
        return native
    guess = threshold.double().log().float()
    best, exact = guess.clone(), guess.exp() == threshold
    for direction in (float("inf"), float("-inf")):
        candidate = guess
        for _ in range(8):  # the float32 logs within 8 ulps of log(t)
            candidate = torch.nextafter(candidate, torch.full_like(candidate, direction))
            hit = ~exact & (candidate.exp() == threshold)
            best, exact = torch.where(hit, candidate, best), exact | hit
    if not exact.all():
        gap = ((best.exp() - threshold).abs() / threshold.clamp(min=1e-30))[~exact].max().item()
        message = (
            f"threshold: {int((~exact).sum())} of {threshold.numel()} thresholds are not exp() of any float32 "
            f"log_threshold (nearest off by {gap:.1e} relative)"
        )
        if not round_thresholds:
            raise NotRepresentable(message + "; pass round_thresholds=True to accept the nearest.")
        warnings.warn(message + ": the nearest is used.", stacklevel=2)
    return best


def _unfold_target_scale(state: dict, weights: dict, extras: dict) -> None:
    """The inverse of `_transcoder_form`'s scaling: W_dec = W_dec' / s_t, W_skip = W_skip'^T s_s / s_t
    (s_t = target_scale, s_s = skip_scale; 1 for a folder SAELens wrote)."""
    one = torch.tensor(1.0)
    scale = extras.get("target_scale", one).float()
    state["target_scale"] = scale
    factors = {
        "W_dec": scale,
        "b_dec": scale,
        "W_skip": scale / extras.get("skip_scale", one).float(),
    }
    for name, factor in factors.items():
        if name not in weights:
            continue
        sl_value = weights[name]
        value = sl_value / factor
        if not torch.equal(value * factor, sl_value):
            raise NotRepresentable(
                f"{name}: {NATIVE_EXTRAS}'s target_scale {scale.item()} does not divide it "
                f"exactly; delete the sidecar files to import the folder as SAELens sees it."
            )
        state[name] = value.t().contiguous() if name == "W_skip" else value
