"""Null dictionaries: what a traced dictionary's figures are measured against.

circuit-tracer's graph scores are not monotone in a dictionary's quality (docs/transcoder_sets.md,
"The tracing protocol"): a dictionary that never fires scores near the top. So every traced set or
cross-layer transcoder is reported beside two nulls of the same layout, traced under the same
protocol and prompts (trace_circuit.py). `write_null_export(exported, kind, out)` writes one beside
a folder that circuit_tracer_format.py exported; `null_fingerprint` says what its figures depend
on, so that a later trace can take them from an earlier report.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from matryoshka_sae.circuit_tracer_format import CONFIG_YAML, clt_file_names
from matryoshka_sae.sae_lens_format import NotRepresentable, write_export_folder

# A null has the exported dictionary's config.yaml and the same files, tensor names, shapes and
# dtypes, so circuit-tracer loads and traces it exactly as it does the dictionary:
#
#   silent   nothing ever fires: W_enc = 0, b_enc = 0, threshold = 1 (pre = 0 is never above it),
#            W_dec = 0, b_dec = 0. Its prediction of every MLP output is 0 (plus the skip
#            connection's, below), so each error node carries the MLP's whole output. circuit-tracer
#            0.5.0 cannot attribute a CLT without any active feature
#            (CrossLayerTranscoder.select_decoder_vectors concatenates an empty list), so a CLT's silent null keeps latent 0 of layer 0 firing at every
#            position (b_enc = 1, threshold 0) with its decoder 0: that node writes nothing and
#            reads nothing (its encoder is 0), and every figure is that of a null that never fires.
#   random   W_enc = randn / sqrt(d_model) (rows of norm about 1), threshold = 0 and b_enc = minus
#            a cut between each latent's values W_enc x over `sources` (`firing_cut`), so that every
#            latent fires on a fire_rate share of those tokens (with a positive activation); W_dec =
#            0.01 randn (every output layer of a CLT latent); b_dec = 0. Seeded.
#
# A skip transcoder's nulls keep its trained W_skip. The skip connection is not a node:
# circuit-tracer lets the gradient through it as through the frozen model, so it moves the logits' direct inputs
# from the error nodes to the tokens and earlier nodes whatever the features do. Its nulls have the
# same linear path, and the features are credited only with what they add to it.
#
# `sources` are activations at the feature input hook ({layer: [N, d_model]}); trace_circuit.py
# passes those of the prompts it traces (positions after BOS), so the random latents fire on
# fire_rate of the traced tokens.

NULL_KINDS = ("silent", "random")
NULL_INFO = "null.json"
RANDOM_FIRE_RATE = 0.3
RANDOM_DECODER_SCALE = 0.01


def tensor_files(folder: str | Path) -> dict[str, int]:
    """{file name: layer} of an exported folder: a set's files as config.yaml lists them (layer i
    is the i-th), a CLT's W_enc_{i} and W_dec_{i} files."""
    folder = Path(folder)
    config = yaml.safe_load((folder / CONFIG_YAML).read_text())
    if config["model_kind"] == "transcoder_set":
        names = config["transcoders"]
        if any(Path(name).is_absolute() or "://" in str(name) for name in names):
            raise NotRepresentable(
                f"{folder}/{CONFIG_YAML} names files outside the folder; a null is written beside "
                f"a folder that export_sae.py --format circuit-tracer wrote."
            )
        return {name: layer for layer, name in enumerate(names)}
    n_layers = len(list(folder.glob("W_enc_*.safetensors")))
    return {name: i for i in range(n_layers) for name in clt_file_names(i)}


def tensor_role(name: str) -> str:
    """'W_enc_3' -> 'W_enc', 'activation_function.threshold' -> 'threshold'."""
    return re.sub(r"_\d+$", "", name.rsplit(".", 1)[-1])


def firing_cut(pre: torch.Tensor, fire_rate: float) -> torch.Tensor:
    """[S]: for pre [N, S], the midpoint between each column's k-th and (k+1)-th largest value,
    k = round(fire_rate N): exactly k of the N rows are above it (unless values tie there)."""
    n = pre.shape[0]
    if n < 2:
        raise ValueError(f"a random null's firing rate is set on 2 tokens or more, not {n}.")
    k = min(max(round(fire_rate * n), 1), n - 1)
    top = pre.float().topk(k + 1, dim=0).values  # [k + 1, S], largest first
    return (top[k - 1] + top[k]) / 2


def null_tensors(
    tensors: dict[str, torch.Tensor],
    kind: str,
    generator: torch.Generator,
    source: torch.Tensor | None = None,
    fire_rate: float = RANDOM_FIRE_RATE,
    one_firing: bool = False,
) -> dict[str, torch.Tensor]:
    """One file's tensors of the `kind` null (see above): the same names, shapes and dtypes.
    `source` [N, d_model]: the activations the random latents' firing rate is set on;
    `one_firing`: the silent null's latent 0 fires everywhere (a CLT's layer 0)."""
    null = {name: torch.zeros_like(t) for name, t in tensors.items()}
    for name in sorted(tensors):  # a fixed order of draws from the generator
        t, role = tensors[name], tensor_role(name)
        if role == "W_skip":
            null[name] = t.clone()  # not a feature: kept (see above)
        elif role == "threshold" and kind == "silent":
            null[name] = torch.ones_like(t)
            null[name][0] = 0 if one_firing else 1
        elif role == "b_enc" and kind == "silent" and one_firing:
            null[name][0] = 1
        elif role == "W_enc" and kind == "random":
            W_enc = torch.randn(t.shape, generator=generator) / t.shape[-1] ** 0.5  # [S, d]
            null[name] = W_enc.to(t.dtype)
            null[name.replace("W_enc", "b_enc")] = -firing_cut(source @ W_enc.T, fire_rate)
        elif role == "W_dec" and kind == "random":
            null[name] = (RANDOM_DECODER_SCALE * torch.randn(t.shape, generator=generator)).to(
                t.dtype
            )
    return null


def write_null_export(
    exported: str | Path,
    kind: str,
    out: str | Path,
    seed: int = 0,
    sources=None,
    fire_rate: float = RANDOM_FIRE_RATE,
    overwrite: bool = False,
) -> Path:
    """Write the `kind` null ('silent' or 'random', see above) of the exported set or CLT in
    `exported` to `out`: its config.yaml as it is, every tensor file with the null's weights, and
    null.json (kind, seed, fire_rate, the folder it was made from). `sources[layer]` [N, d_model]
    (activations at the feature input hook) is needed for 'random'. Returns out."""
    from safetensors.torch import load_file

    if kind not in NULL_KINDS:
        raise ValueError(f"Unknown null {kind!r}; choose one of {', '.join(NULL_KINDS)}.")
    if kind == "random" and sources is None:
        raise ValueError(
            "a random null needs sources: activations at the feature input hook of every layer, on "
            "which each latent's firing rate is set."
        )
    exported = Path(exported)
    generator = torch.Generator().manual_seed(seed)
    info = {"kind": kind, "seed": seed, "fire_rate": fire_rate, "null_of": str(exported.resolve())}
    config_text = (exported / CONFIG_YAML).read_text()
    files = {
        CONFIG_YAML: lambda path: path.write_text(config_text),
        NULL_INFO: lambda path: path.write_text(json.dumps(info, indent=2) + "\n"),
    }
    is_clt = yaml.safe_load(config_text)["model_kind"] == "cross_layer_transcoder"
    for name, layer in tensor_files(exported).items():
        source = None if sources is None else sources[layer]
        tensors = load_file(str(exported / name))
        one_firing = is_clt and layer == 0
        tensors = null_tensors(tensors, kind, generator, source, fire_rate, one_firing)
        files[name] = lambda path, t=tensors: save_file(t, str(path))
    return write_export_folder(Path(out), files, overwrite, inputs=[exported])


def null_fingerprint(exported, prompts: list[str], settings: dict, null_seed: int) -> dict:
    """What the nulls of `exported` traced on `prompts` depend on: the exported config (less the
    viewer's `scan`), every tensor's shape and dtype, a digest of the weights the nulls keep (a
    skip transcoder's W_skip), the prompts, the protocol's settings, the null seed and the random
    null's firing rate. Two traces with equal fingerprints trace the same nulls (on the same model:
    trace_circuit.py checks that by the model's outputs); no other trained weight enters."""
    from safetensors import safe_open

    exported = Path(exported)
    config = yaml.safe_load((exported / CONFIG_YAML).read_text())
    config.pop("scan", None)
    tensors, kept, skip_files = {}, hashlib.sha256(), False
    for name in sorted(tensor_files(exported)):
        with safe_open(str(exported / name), framework="pt") as handle:
            tensors[name] = {
                key: [list(handle.get_slice(key).get_shape()), handle.get_slice(key).get_dtype()]
                for key in sorted(handle.keys())
            }
            for key in sorted(k for k in handle.keys() if tensor_role(k) == "W_skip"):
                skip_files = True
                kept.update(handle.get_tensor(key).contiguous().view(torch.uint8).numpy().tobytes())
    fingerprint = {
        "config": config,
        "tensors": tensors,
        "prompts": list(prompts),
        "protocol": dict(settings),
        "null_seed": null_seed,
        "fire_rate": RANDOM_FIRE_RATE,
    }
    if skip_files:  # only then: the fingerprints of plain dictionaries' earlier reports still match
        fingerprint["kept_weights_sha256"] = kept.hexdigest()
    return fingerprint
