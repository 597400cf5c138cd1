"""circuit-tracer's transcoder-set format: `export_circuit_tracer` writes a transcoder set of this
library (transcoder_set.py) as a folder that circuit-tracer 0.5.0 loads as a replacement model.

The folder:

    config.yaml              model_kind: transcoder_set, model_name, feature_input_hook,
                             feature_output_hook, scan, transcoders: [layer_0.safetensors, ...]
    layer_{i}.safetensors    W_enc [S, d_model], b_enc [S], W_dec [S, d_model], b_dec [d_model],
                             activation_function.threshold [S], and W_skip [d_model, d_model]
                             for a skip transcoder

circuit-tracer computes, for the activation x at ``blocks.{i}.<feature_input_hook>`` of a token,

    pre = F.linear(x, W_enc, b_enc) = x W_enc^T + b_enc
    z   = pre * (pre > threshold)                      (its JumpReLU)
    y   = z W_dec + b_dec + x W_skip^T                 (written at ``blocks.{i}.<feature_output_hook>``)

and zeroes z at position 0 (the BOS token, which our training leaves out too). Ours computes
pre = (x - source_mean) W_enc + b_enc, keeps pre > threshold (BatchTopK's inference threshold,
which is >= 0), and returns (z W_dec + b_dec + (x - skip_shift) / skip_scale W_skip) * target_scale.
The folding is the SAELens export's (sae_lens_format.sae_lens_form): the centring goes into the
biases (float32 rounding), the power-of-two scales into W_dec, b_dec and W_skip (exact); W_enc is
transposed for F.linear. What cannot be folded is refused with one line naming the setting that
makes a set exportable: per-token standardisation of the source (input_unit_norm, not linear),
a per-token TopK selection (no threshold form in circuit-tracer 0.5.0), a set that misses a layer
of its model (circuit-tracer replaces every MLP; the model's depth is the cfg's n_layers or the
model table's), or source and target widths that differ from the model's.

The null dictionaries written beside an exported folder, against which its traced figures are
read, are null_dictionaries.py's.

`load_in_circuit_tracer(folder)` (in circuit-tracer's environment only, see
setup_circuit_tracer_env.sh) reads such a folder with circuit-tracer's own loader, resolving the
file names relative to the folder.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from matryoshka_sae.config import (
    MODEL_ALIASES,
    canonical_model_name,
    get_hook_name,
    get_model_config,
)
from matryoshka_sae.sae import MatryoshkaTranscoder
from matryoshka_sae.sae_lens_format import NotRepresentable, sae_lens_form, write_export_folder
from matryoshka_sae.transcoder_set import load_transcoder_set, read_manifest

CONFIG_YAML = "config.yaml"
THRESHOLD = "activation_function.threshold"


def layer_file_name(layer: int) -> str:
    return f"layer_{layer}.safetensors"


def block_relative_hook(hook_name: str, layer: int) -> str:
    """``blocks.3.ln2.hook_normalized`` -> ``ln2.hook_normalized`` (circuit-tracer's hook names are
    relative to each block)."""
    prefix = f"blocks.{layer}."
    if not hook_name.startswith(prefix):
        raise NotRepresentable(
            f"hook {hook_name!r} is not inside block {layer}; circuit-tracer reads and "
            f"writes a hook of each transcoder's own block."
        )
    return hook_name[len(prefix) :]


def hub_model_name(model_name: str) -> str:
    """The name circuit-tracer (TransformerLens) loads the model by: the hub id where one is known."""
    canonical = canonical_model_name(model_name) or model_name
    hub_ids = [alias for alias, name in MODEL_ALIASES.items() if name == canonical and "/" in alias]
    return hub_ids[0] if hub_ids else model_name


def circuit_tracer_layer(transcoder: MatryoshkaTranscoder) -> dict[str, torch.Tensor]:
    """One layer's tensors in circuit-tracer's names and layout (see the module docstring)."""
    cfg = transcoder.cfg
    if cfg["input_unit_norm"]:
        raise NotRepresentable(
            f"{cfg['name']}: input_unit_norm standardises each token, which circuit-tracer "
            f"cannot compute (it is not linear); train the set with input_unit_norm False "
            f"(the set's default)."
        )
    if transcoder.d_in != transcoder.d_out:
        raise NotRepresentable(
            f"{cfg['name']}: source width {transcoder.d_in} != target width {transcoder.d_out}; "
            f"circuit-tracer's transcoders read and write the model's width."
        )
    _, weights, _ = sae_lens_form(transcoder)
    tensors = {
        "W_enc": weights["W_enc"].t().contiguous(),  # F.linear's [out, in]
        "b_enc": weights["b_enc"],
        "W_dec": weights["W_dec"],
        "b_dec": weights["b_dec"],
        # Ours keeps pre > max(threshold, 0); circuit-tracer's JumpReLU has no ReLU of its own.
        THRESHOLD: weights["threshold"].clamp(min=0).contiguous(),
    }
    if "W_skip" in weights:
        tensors["W_skip"] = weights["W_skip"]  # [d_out, d_in], applied as x W_skip^T as in SAELens
    return tensors


def model_layer_count(cfg: dict) -> int | None:
    """The number of layers of the model a dictionary was trained on: cfg['n_layers'] where the run
    recorded it, else the model table's; None for a model neither knows."""
    if cfg.get("n_layers"):
        return int(cfg["n_layers"])
    if canonical_model_name(cfg["model_name"]) is not None:
        return get_model_config(cfg["model_name"])["n_layers"]
    return None


def circuit_tracer_config(
    transcoders: dict[int, MatryoshkaTranscoder], scan: str | None = None
) -> dict:
    """config.yaml's fields for a set {layer: transcoder} covering every layer 0..L-1 of its model
    (L: `model_layer_count`, or the set's largest layer + 1 for a model of unknown depth)."""
    layers = sorted(transcoders)
    first = transcoders[layers[0]].cfg
    n_model_layers = model_layer_count(first) or max(layers) + 1
    missing = sorted(set(range(n_model_layers)) - set(layers))
    if missing:
        raise NotRepresentable(
            f"circuit-tracer replaces the MLP of every layer 0..{n_model_layers - 1} of "
            f"{first['model_name']}, but the set lacks layers {missing}; train it with --layers all."
        )
    input_hooks = {
        block_relative_hook(t.cfg["source_hook_point"], layer) for layer, t in transcoders.items()
    }
    output_hooks = {
        block_relative_hook(t.cfg["target_hook_point"], layer) for layer, t in transcoders.items()
    }
    if len(input_hooks) > 1 or len(output_hooks) > 1:
        raise NotRepresentable(
            f"circuit-tracer reads one hook and writes one hook in every block; the set's "
            f"transcoders read {sorted(input_hooks)} and write {sorted(output_hooks)}."
        )
    widths = {t.dict_size for t in transcoders.values()}
    if len(widths) > 1:
        raise NotRepresentable(
            f"circuit-tracer needs one width for every layer; the set has {sorted(widths)}."
        )
    return {
        "model_kind": "transcoder_set",
        "model_name": hub_model_name(first["model_name"]),
        "feature_input_hook": input_hooks.pop(),
        "feature_output_hook": output_hooks.pop(),
        "scan": scan or f"{first['model_name']}-transcoder-set",
        "transcoders": [layer_file_name(layer) for layer in layers],
    }


def viewer_scan(set_folder: str | Path) -> str:
    """The scan under which circuit-tracer's local viewer finds the set's feature pages, as
    ``inspect_transcoder_set.py SET --viewer-features DATA_DIR`` writes them by default
    (DATA_DIR/features/<set folder's name>, served as ./data/...)."""
    return f"./data/features/{Path(set_folder).resolve().name}"


def export_circuit_tracer(
    set_folder: str | Path, out_dir: str | Path, scan: str | None = None, overwrite: bool = False
) -> Path:
    """Write the transcoder set in `set_folder` to `out_dir` in circuit-tracer's format; returns
    out_dir. Everything is checked before anything is written, and the folder appears complete or
    not at all; `overwrite` replaces only a folder an export wrote (sae_lens_format.write_export_folder)."""
    read_manifest(set_folder)
    transcoders = load_transcoder_set(set_folder, device="cpu")
    config = circuit_tracer_config(transcoders, scan or viewer_scan(set_folder))
    tensors = {layer: circuit_tracer_layer(t) for layer, t in transcoders.items()}
    files = {CONFIG_YAML: lambda path: path.write_text(yaml.safe_dump(config, sort_keys=False))}
    for layer, layer_tensors in tensors.items():
        files[layer_file_name(layer)] = lambda path, t=layer_tensors: save_file(t, str(path))
    return write_export_folder(Path(out_dir), files, overwrite, inputs=[set_folder])


def read_config(folder: str | Path) -> dict:
    """config.yaml of an exported folder, with the transcoder files as absolute paths."""
    folder = Path(folder)
    path = folder / CONFIG_YAML
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder} has no {CONFIG_YAML}; export a set there with export_sae.py "
            f"--format circuit-tracer."
        )
    config = yaml.safe_load(path.read_text())
    if (
        "transcoders" in config
    ):  # a transcoder set; a cross-layer transcoder's files have fixed names
        config["transcoders"] = [str((folder / name).resolve()) for name in config["transcoders"]]
    return config


def load_in_circuit_tracer(
    folder: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32
):
    """circuit-tracer's own TranscoderSet, or CrossLayerTranscoder, for an exported folder (needs the
    circuit_tracer package)."""
    from circuit_tracer.utils.hf_utils import load_transcoders

    config = read_config(folder)
    if config["model_kind"] == "cross_layer_transcoder":
        return load_clt_in_circuit_tracer(folder, device, dtype)
    return load_transcoders(
        config, device=torch.device(device), dtype=dtype, lazy_encoder=False, lazy_decoder=False
    )


# ---------------------------------------------------------------------------------------------
# Cross-layer transcoders (model_kind: cross_layer_transcoder)
# ---------------------------------------------------------------------------------------------
#
# circuit-tracer 0.5.0's CrossLayerTranscoder (circuit_tracer/transcoder/cross_layer_transcoder.py,
# read by its load_clt) reads a folder of
#
#     W_enc_{i}.safetensors   W_enc_{i} [S, d_model], b_enc_{i} [S], b_dec_{i} [d_model] (the bias of
#                             output layer i), threshold_{i} [S] (present: JumpReLU, absent: ReLU)
#     W_dec_{i}.safetensors   W_dec_{i} [S, L - i, d_model]: latent f of layer i writes W_dec_{i}[f, m - i]
#                             to output layer m >= i
#
# for i = 0..L-1 (L = the number of W_enc_* files; every layer of the model), and computes
# pre_i = F.linear(x_i, W_enc_i, b_enc_i), z_i = pre_i * (pre_i > threshold_i) and
# y_m = sum_{i <= m} z_i W_dec_i[:, m - i] + b_dec_m, with features zeroed at position 0. It stores no
# skip connection. Ours (sae.MatryoshkaCrossLayerTranscoder) computes pre_i = (x_i - source_mean_i)
# W_enc^i + b_enc^i, keeps pre_i > max(threshold, 0) and returns (sum ... + b_dec_m) * target_scale_m:
# the centring folds into b_enc (float32 rounding), the power-of-two scales into W_dec and b_dec (exact).
# The thresholds are in the pre-activations' units, which the export leaves as they are: threshold_{i}
# is row i of `inference_thresholds()` (BatchTopK's learned threshold repeated, or a jumprelu CLT's
# theta of each latent), floored at 0.
# config.yaml holds model_kind, model_name, feature_input_hook, feature_output_hook and scan.


def clt_file_names(layer: int) -> tuple[str, str]:
    return f"W_enc_{layer}.safetensors", f"W_dec_{layer}.safetensors"


def circuit_tracer_clt_tensors(clt) -> dict[str, dict[str, torch.Tensor]]:
    """{file name: {tensor name: tensor}} of a cross-layer transcoder in circuit-tracer's layout."""
    cfg = clt.cfg
    layers = list(cfg["clt_layers"])
    n_model_layers = cfg.get("n_layers") or len(layers)
    if layers != list(range(n_model_layers)):
        raise NotRepresentable(
            f"{cfg['name']}: circuit-tracer's CLT reads and writes every layer 0..{n_model_layers - 1} "
            f"of the model, but this one covers {layers}; train it with clt_layers None (all)."
        )
    if getattr(clt, "W_skip", None) is not None or cfg.get("transcoder_skip"):
        raise NotRepresentable(
            f"{cfg['name']}: circuit-tracer's CLT format stores no skip connection; train the CLT "
            f"without one."
        )
    if cfg["input_unit_norm"]:
        raise NotRepresentable(
            f"{cfg['name']}: input_unit_norm standardises each token, which circuit-tracer cannot "
            f"compute; train with input_unit_norm False."
        )
    if clt.d_in != clt.d_out:
        raise NotRepresentable(
            f"{cfg['name']}: source width {clt.d_in} != target width {clt.d_out}; circuit-tracer's "
            f"CLT reads and writes the model's width."
        )
    thresholds = clt.inference_thresholds()  # [L, S]
    if (thresholds < 0).any():
        raise NotRepresentable(
            f"{cfg['name']}: no inference threshold has been learned yet (threshold < 0); train the "
            f"CLT before exporting it."
        )
    S, files = clt.latents_per_layer, {}
    with torch.no_grad():
        for i in range(clt.n_layers):
            block = slice(i * S, (i + 1) * S)
            W_enc = clt.W_enc[:, block].float()
            enc_name, dec_name = clt_file_names(i)
            files[enc_name] = {
                f"W_enc_{i}": W_enc.t().contiguous(),  # F.linear's [out, in]
                f"b_enc_{i}": (clt.b_enc[block] - clt.source_mean[i] @ W_enc).contiguous(),
                f"b_dec_{i}": (clt.b_dec[i] * clt.target_scale[i]).contiguous(),
                f"threshold_{i}": thresholds[i].clamp(min=0).contiguous(),
            }
            files[dec_name] = {
                f"W_dec_{i}": (clt.W_dec[i] * clt.target_scale[i:, None]).contiguous()
            }
    return files


def circuit_tracer_clt_config(clt, scan: str | None = None) -> dict:
    """config.yaml's fields for a cross-layer transcoder."""
    cfg = clt.cfg
    return {
        "model_kind": "cross_layer_transcoder",
        "model_name": hub_model_name(cfg["model_name"]),
        "feature_input_hook": block_relative_hook(get_hook_name(cfg["source_site"], 0), 0),
        "feature_output_hook": block_relative_hook(get_hook_name(cfg["target_site"], 0), 0),
        "scan": scan or f"{cfg['model_name']}-clt",
    }


def export_circuit_tracer_clt(
    checkpoint: str | Path, out_dir: str | Path, scan: str | None = None, overwrite: bool = False
) -> Path:
    """Write the cross-layer transcoder saved in `checkpoint` to `out_dir` in circuit-tracer's CLT
    format; returns out_dir. Checked before anything is written; the folder appears complete or not
    at all."""
    from matryoshka_sae.checkpoint import load_sae

    clt = load_sae(checkpoint, device="cpu")
    if clt.cfg["sae_type"] != "matryoshka_clt":
        raise NotRepresentable(
            f"{checkpoint} holds a {clt.cfg['sae_type']!r} dictionary, not a cross-layer "
            f"transcoder; export a transcoder set with export_circuit_tracer."
        )
    config = circuit_tracer_clt_config(clt, scan)
    tensors = circuit_tracer_clt_tensors(clt)
    files = {CONFIG_YAML: lambda path: path.write_text(yaml.safe_dump(config, sort_keys=False))}
    for name, file_tensors in tensors.items():
        files[name] = lambda path, t=file_tensors: save_file(t, str(path))
    return write_export_folder(Path(out_dir), files, overwrite, inputs=[checkpoint])


def load_clt_in_circuit_tracer(
    folder: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32
):
    """circuit-tracer's own CrossLayerTranscoder for an exported folder (needs the circuit_tracer package)."""
    from circuit_tracer.transcoder.cross_layer_transcoder import load_clt

    folder = Path(folder)
    config = yaml.safe_load((folder / CONFIG_YAML).read_text())
    return load_clt(
        str(folder),
        feature_input_hook=config["feature_input_hook"],
        feature_output_hook=config["feature_output_hook"],
        scan=config["scan"],
        device=torch.device(device),
        dtype=dtype,
        lazy_decoder=False,
        lazy_encoder=False,
    )
