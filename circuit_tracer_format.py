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
(circuit-tracer replaces every MLP), or source and target widths that differ from the model's.

`load_in_circuit_tracer(folder)` (in circuit-tracer's environment only, see
setup_circuit_tracer_env.sh) reads such a folder with circuit-tracer's own loader, resolving the
file names relative to the folder.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from config import MODEL_ALIASES, canonical_model_name
from sae import MatryoshkaTranscoder
from sae_lens_format import NotRepresentable, _write_folder_atomically, sae_lens_form
from transcoder_set import load_transcoder_set, read_manifest

CONFIG_YAML = "config.yaml"
THRESHOLD = "activation_function.threshold"


def layer_file_name(layer: int) -> str:
    return f"layer_{layer}.safetensors"


def block_relative_hook(hook_name: str, layer: int) -> str:
    """``blocks.3.ln2.hook_normalized`` -> ``ln2.hook_normalized`` (circuit-tracer's hook names are
    relative to each block)."""
    prefix = f"blocks.{layer}."
    if not hook_name.startswith(prefix):
        raise NotRepresentable(f"hook {hook_name!r} is not inside block {layer}; circuit-tracer reads and "
                               f"writes a hook of each transcoder's own block.")
    return hook_name[len(prefix):]


def hub_model_name(model_name: str) -> str:
    """The name circuit-tracer (TransformerLens) loads the model by: the hub id where one is known."""
    canonical = canonical_model_name(model_name) or model_name
    hub_ids = [alias for alias, name in MODEL_ALIASES.items() if name == canonical and "/" in alias]
    return hub_ids[0] if hub_ids else model_name


def circuit_tracer_layer(transcoder: MatryoshkaTranscoder) -> dict[str, torch.Tensor]:
    """One layer's tensors in circuit-tracer's names and layout (see the module docstring)."""
    cfg = transcoder.cfg
    if cfg["input_unit_norm"]:
        raise NotRepresentable(f"{cfg['name']}: input_unit_norm standardises each token, which circuit-tracer "
                               f"cannot compute (it is not linear); train the set with input_unit_norm False "
                               f"(the set's default).")
    if transcoder.d_in != transcoder.d_out:
        raise NotRepresentable(f"{cfg['name']}: source width {transcoder.d_in} != target width {transcoder.d_out}; "
                               f"circuit-tracer's transcoders read and write the model's width.")
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


def circuit_tracer_config(transcoders: dict[int, MatryoshkaTranscoder], scan: str | None = None) -> dict:
    """config.yaml's fields for a set {layer: transcoder} covering layers 0..L-1."""
    layers = sorted(transcoders)
    if layers != list(range(len(layers))):
        missing = sorted(set(range(max(layers) + 1)) - set(layers))
        raise NotRepresentable(f"circuit-tracer replaces the MLP of every layer 0..L-1, but the set lacks layers "
                               f"{missing or list(range(min(layers)))}; train it with --layers all.")
    first = transcoders[0].cfg
    input_hooks = {block_relative_hook(t.cfg["source_hook_point"], layer) for layer, t in transcoders.items()}
    output_hooks = {block_relative_hook(t.cfg["target_hook_point"], layer) for layer, t in transcoders.items()}
    if len(input_hooks) > 1 or len(output_hooks) > 1:
        raise NotRepresentable(f"circuit-tracer reads one hook and writes one hook in every block; the set's "
                               f"transcoders read {sorted(input_hooks)} and write {sorted(output_hooks)}.")
    widths = {t.dict_size for t in transcoders.values()}
    if len(widths) > 1:
        raise NotRepresentable(f"circuit-tracer needs one width for every layer; the set has {sorted(widths)}.")
    return {
        "model_kind": "transcoder_set",
        "model_name": hub_model_name(first["model_name"]),
        "feature_input_hook": input_hooks.pop(),
        "feature_output_hook": output_hooks.pop(),
        "scan": scan or f"{first['model_name']}-transcoder-set",
        "transcoders": [layer_file_name(layer) for layer in layers],
    }


def export_circuit_tracer(set_folder: str | Path, out_dir: str | Path, scan: str | None = None,
                          overwrite: bool = False) -> Path:
    """Write the transcoder set in `set_folder` to `out_dir` in circuit-tracer's format; returns
    out_dir. Everything is checked before anything is written, and the folder appears complete or
    not at all (sae_lens_format's folder writer, with its --overwrite guard)."""
    read_manifest(set_folder)
    transcoders = load_transcoder_set(set_folder, device="cpu")
    config = circuit_tracer_config(transcoders, scan)
    tensors = {layer: circuit_tracer_layer(t) for layer, t in transcoders.items()}
    files = {CONFIG_YAML: lambda path: path.write_text(yaml.safe_dump(config, sort_keys=False))}
    for layer, layer_tensors in tensors.items():
        files[layer_file_name(layer)] = lambda path, t=layer_tensors: save_file(t, str(path))
    return _write_folder_atomically(Path(out_dir), files, overwrite)


def read_config(folder: str | Path) -> dict:
    """config.yaml of an exported folder, with the transcoder files as absolute paths."""
    folder = Path(folder)
    path = folder / CONFIG_YAML
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {CONFIG_YAML}; export a set there with export_sae.py "
                                f"--format circuit-tracer.")
    config = yaml.safe_load(path.read_text())
    config["transcoders"] = [str((folder / name).resolve()) for name in config["transcoders"]]
    return config


def load_in_circuit_tracer(folder: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """circuit-tracer's own TranscoderSet for an exported folder (needs the circuit_tracer package)."""
    from circuit_tracer.utils.hf_utils import load_transcoders

    return load_transcoders(read_config(folder), device=torch.device(device), dtype=dtype,
                            lazy_encoder=False, lazy_decoder=False)
