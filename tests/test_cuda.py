"""The dictionaries on a CUDA GPU train as they do on the CPU (skipped without a GPU).

The steps are training.py's (`helpers.step_on_batches`). Without conftest, so that a GPU machine
runs it with the project's packages alone:
    python -m pytest --noconftest tests/test_cuda.py
as benchmarks/device_check.sh does. TEST_DEVICE=cpu runs it with the CPU in the GPU's place,
which checks the test itself.
"""

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers import ONE_ACTIVATION_TYPES, step_on_batches, synthetic_cfg  # noqa: E402
from state_checks import assert_state_close  # noqa: E402

from matryoshka_sae.sae import create_sae  # noqa: E402
from matryoshka_sae.sparse_ops import select_batch_topk  # noqa: E402

DEVICE = os.environ.get("TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
pytestmark = pytest.mark.skipif(
    DEVICE is None, reason="needs a CUDA GPU (or TEST_DEVICE=cpu to check the test)"
)

D, S, K, B, STEPS, N_PLANTED = 64, 1024, 8, 512, 8, 256


def cfg_for(sae_type: str, device: str, **overrides) -> dict:
    return synthetic_cfg(
        sae_type,
        act_size=D,
        dict_size=S,
        top_k=K,
        batch_size=B,
        lr=1e-3,
        device=device,
        **overrides,
    )


def planted_batches(paired: bool) -> list[tuple[torch.Tensor, ...]]:
    """STEPS batches x = z D_s + offset (and y = z D_t when paired), 4 planted features a token."""
    generator = torch.Generator().manual_seed(0)
    source_dict = F.normalize(torch.randn(N_PLANTED, D, generator=generator), dim=1)
    target_dict = F.normalize(torch.randn(N_PLANTED, D, generator=generator), dim=1)
    offset = torch.randn(D, generator=generator)
    batches = []
    for _ in range(STEPS):
        chosen = torch.rand(B, N_PLANTED, generator=generator).topk(4, dim=1).indices
        codes = torch.zeros(B, N_PLANTED).scatter_(
            1, chosen, torch.rand(B, 4, generator=generator) + 0.5
        )
        source = codes @ source_dict + offset
        batches.append((source, codes @ target_dict) if paired else (source,))
    return batches


def train(sae_type: str, device: str, **overrides) -> tuple[dict, list[torch.Tensor], list[float]]:
    """STEPS steps of training.py's step on `device` from the CPU's initial weights: the final
    state (on the CPU), each step's active latents [B, S] and losses."""
    torch.manual_seed(0)
    initial = create_sae(cfg_for(sae_type, "cpu", **overrides)).state_dict()
    cfg = cfg_for(sae_type, device, **overrides)
    sae = create_sae(cfg)
    sae.load_state_dict(initial)
    batches = [
        tuple(t.to(device) for t in batch)
        for batch in planted_batches(sae_type == "matryoshka_transcoder")
    ]
    outputs = step_on_batches(sae, cfg, batches)
    active = [(output["feature_acts"] > 0).cpu() for output in outputs]
    losses = [output["loss"].item() for output in outputs]
    return {name: tensor.cpu() for name, tensor in sae.state_dict().items()}, active, losses


@pytest.mark.parametrize("sae_type", ONE_ACTIVATION_TYPES)
def test_training_steps_on_the_device_match_the_cpu(sae_type):
    """8 steps on the device and on the CPU from the same weights: every parameter and buffer
    within 1e-3 (relative), the active latents the same but for float-rounding ties (< 0.1%)."""
    on_cpu, cpu_active, _ = train(sae_type, "cpu")
    on_device, device_active, _ = train(sae_type, DEVICE)
    assert_state_close(on_device, on_cpu, 1e-3, sae_type)
    for step, (expected, found) in enumerate(zip(cpu_active, device_active)):
        assert (expected != found).float().mean() < 1e-3, (
            f"{sae_type}: active latents of step {step}"
        )


def test_batch_topk_selects_on_the_device_what_it_selects_on_the_cpu():
    """Exactly the same (row, latent) pairs, also with many ties (values rounded to bf16) and rows
    far heavier than the rest."""
    generator = torch.Generator().manual_seed(1)
    pre = torch.randn(2048, 4096, generator=generator).to(torch.bfloat16).float()
    pre[:8] *= 20  # heavy rows
    for k, lower_bound in ((32, None), (32, 1.5), (64, None)):
        on_cpu = select_batch_topk(pre, k, lower_bound)
        on_device = select_batch_topk(pre.to(DEVICE), k, lower_bound)
        pairs = [
            sorted(zip(code.rows.tolist(), code.latents.tolist())) for code in (on_cpu, on_device)
        ]
        assert pairs[0] == pairs[1], f"k {k}, lower bound {lower_bound}"


@pytest.mark.parametrize("sae_type", ["matryoshka", "matryoshka_transcoder", "jumprelu"])
def test_bf16_matmuls_on_the_device_train_as_float32_does(sae_type):
    """cfg["dtype"] = bfloat16 (the encoder's matmul): parameters stay float32 and the losses follow
    the float32 run's within 5%."""
    state, _, bf16_losses = train(sae_type, DEVICE, dtype="bfloat16")
    _, _, fp32_losses = train(sae_type, DEVICE)
    assert all(tensor.dtype != torch.bfloat16 for tensor in state.values())
    assert all(abs(a - b) <= 0.05 * abs(b) for a, b in zip(bf16_losses, fp32_losses)), (
        bf16_losses,
        fp32_losses,
    )
