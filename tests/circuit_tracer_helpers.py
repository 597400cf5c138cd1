"""What the tests that run circuit-tracer share: its environment (.ct-venv), the tiny models saved
for it, and the checks run there in a subprocess.

circuit-tracer 0.5.0 pins its own transformers, so it lives in .ct-venv (setup_circuit_tracer_env.sh)
and the tests run their checks there as scripts (tests/circuit_tracer_*check.py) that print one
JSON line. Without .ct-venv such a test is skipped, unless REQUIRE_CIRCUIT_TRACER=1 (as CI sets),
when it fails.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from transformer_lens import HookedTransformer, HookedTransformerConfig

ROOT = Path(__file__).resolve().parents[1]
CT_PYTHON = ROOT / ".ct-venv" / "bin" / "python"

# The config fields that rebuild a tiny model in the other environment.
MODEL_FIELDS = (
    "n_layers",
    "d_model",
    "n_ctx",
    "d_head",
    "n_heads",
    "d_mlp",
    "d_vocab",
    "act_fn",
    "normalization_type",
    "positional_embedding_type",
    "use_normalization_before_and_after",
    "n_key_value_heads",
    "original_architecture",
    "gated_mlp",
    "final_rms",
    "rotary_dim",
    "window_size",
    "attn_types",
    "attn_scores_soft_cap",
    "output_logits_soft_cap",
    "seed",
)


def circuit_tracer_missing() -> str | None:
    """Why circuit-tracer's checks cannot run here (None: they can). Raises where
    REQUIRE_CIRCUIT_TRACER=1, so that CI never skips them."""
    if CT_PYTHON.exists():
        return None
    if os.environ.get("REQUIRE_CIRCUIT_TRACER") == "1":
        raise RuntimeError(f"{CT_PYTHON} is missing; run: bash setup_circuit_tracer_env.sh")
    return "circuit-tracer's environment .ct-venv is missing (bash setup_circuit_tracer_env.sh)"


def needs_circuit_tracer() -> None:
    """Skip the calling test without .ct-venv (fail it where REQUIRE_CIRCUIT_TRACER=1)."""
    reason = circuit_tracer_missing()
    if reason:
        pytest.skip(reason)


def save_model(model, tmp_path, rows: int = 4, seed: int = 1) -> Path:
    """The tiny model's config and weights, and `rows` rows of 24 token ids led by BOS (id 1), for
    the other environment."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(2, 1000, (rows, 24), generator=generator)
    tokens[:, 0] = 1
    path = tmp_path / "model.pt"
    config = {key: value for key, value in model.cfg.to_dict().items() if key in MODEL_FIELDS}
    torch.save({"config": config, "weights": model.state_dict(), "tokens": tokens}, path)
    return path


def run_check(script: str, *args, timeout: int = 900) -> dict:
    """Run tests/<script> in .ct-venv with `args`; its last line of output, as JSON."""
    command = [str(CT_PYTHON), str(ROOT / "tests" / script), *map(str, args)]
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# A transcoder set that reproduces the MLPs of a ReLU model
# ---------------------------------------------------------------------------------------------


def tiny_relu_gpt2() -> HookedTransformer:
    """A tiny GPT-2 (conftest's, with ReLU MLPs of 64 neurons; seeded): each MLP is exactly a
    transcoder whose latents are its neurons (`neuron_transcoder`)."""
    torch.manual_seed(0)
    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=64,
        n_ctx=128,
        d_head=16,
        n_heads=4,
        d_mlp=64,
        d_vocab=1000,
        act_fn="relu",
        normalization_type="LN",
        seed=0,
    )
    return HookedTransformer(cfg).eval()


@torch.no_grad()
def neuron_transcoder(block, noise: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """One layer's circuit-tracer tensors whose latents are the MLP's neurons, read from
    ln2.hook_normalized x: the MLP computes relu((x * w + b) W_in + b_in) W_out + b_out, which is
    relu(x W_enc^T + b_enc) W_dec + b_dec with W_enc = (w * W_in)^T, b_enc = b W_in + b_in,
    W_dec = W_out, b_dec = b_out and threshold 0 (JumpReLU with threshold 0 is ReLU). `noise`
    perturbs W_dec by that fraction of its scale, so the prediction is near, not exactly, right."""
    w, b = block.ln2.w, block.ln2.b
    W_in, b_in, W_out, b_out = block.mlp.W_in, block.mlp.b_in, block.mlp.W_out, block.mlp.b_out
    W_dec = W_out + noise * W_out.std() * torch.randn(W_out.shape, generator=generator)
    return {
        "W_enc": (w[:, None] * W_in).T.contiguous(),
        "b_enc": (b @ W_in + b_in).contiguous(),
        "W_dec": W_dec.contiguous(),
        "b_dec": b_out.clone(),
        "activation_function.threshold": torch.zeros(W_in.shape[1]),
    }


def write_neuron_set(model, folder: Path, noise: float = 0.1, layers=None) -> Path:
    """A transcoder set in circuit-tracer's format (as export_sae.py writes it) whose latents are
    `model`'s MLP neurons (`neuron_transcoder`), for `layers` (default: all)."""
    layers = range(model.cfg.n_layers) if layers is None else layers
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(3)
    for layer in layers:
        tensors = neuron_transcoder(model.blocks[layer], noise, generator)
        save_file(tensors, str(folder / f"layer_{layer}.safetensors"))
    config = {
        "model_kind": "transcoder_set",
        "model_name": "tiny-relu-gpt2",
        "feature_input_hook": "ln2.hook_normalized",
        "feature_output_hook": "hook_mlp_out",
        "scan": "tiny-relu-gpt2-neurons",
        "transcoders": [f"layer_{layer}.safetensors" for layer in layers],
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return folder


def write_random_clt(folder: Path, n_layers: int, d_model: int, width: int, seed: int = 4) -> Path:
    """A cross-layer transcoder in circuit-tracer's format (as train_clt.py export writes it) with
    random weights: enough for circuit-tracer to load it and for its nulls to be written."""
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    for i in range(n_layers):
        save_file(
            {
                f"W_enc_{i}": torch.randn(width, d_model, generator=generator) / d_model**0.5,
                f"b_enc_{i}": torch.zeros(width),
                f"b_dec_{i}": torch.zeros(d_model),
                f"threshold_{i}": torch.full((width,), 0.5),
            },
            str(folder / f"W_enc_{i}.safetensors"),
        )
        save_file(
            {f"W_dec_{i}": 0.1 * torch.randn(width, n_layers - i, d_model, generator=generator)},
            str(folder / f"W_dec_{i}.safetensors"),
        )
    config = {
        "model_kind": "cross_layer_transcoder",
        "model_name": "tiny-relu-gpt2",
        "feature_input_hook": "ln2.hook_normalized",
        "feature_output_hook": "hook_mlp_out",
        "scan": "tiny-relu-gpt2-clt",
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return folder
