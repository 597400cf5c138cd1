"""Shared fixtures: offline settings and tiny, seeded TransformerLens models.

The tiny models stand in for GPT-2 and Gemma-2 (same block structure, random weights); they have
no tokenizer, so data for them is token ids.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest  # noqa: E402
import torch  # noqa: E402
from transformer_lens import HookedTransformer, HookedTransformerConfig  # noqa: E402

# Test tensors are tiny: one thread is faster than two and never oversubscribes a busy machine.
torch.set_num_threads(1)

TINY_VOCAB = 1000
TINY_D_MODEL = 64


def tiny_gpt2_config() -> HookedTransformerConfig:
    """A GPT-2-like block stack: LayerNorm, learned positions, GELU MLP."""
    return HookedTransformerConfig(
        n_layers=2,
        d_model=TINY_D_MODEL,
        n_ctx=128,
        d_head=16,
        n_heads=4,
        d_mlp=256,
        d_vocab=TINY_VOCAB,
        act_fn="gelu",
        normalization_type="LN",
        seed=0,
    )


def tiny_gemma2_config() -> HookedTransformerConfig:
    """A Gemma-2-like block stack: RMS norms before and after, rotary, gated MLP, soft caps."""
    return HookedTransformerConfig(
        n_layers=2,
        d_model=TINY_D_MODEL,
        n_ctx=128,
        d_head=16,
        n_heads=4,
        d_mlp=256,
        d_vocab=TINY_VOCAB,
        act_fn="gelu_pytorch_tanh",
        normalization_type="RMS",
        positional_embedding_type="rotary",
        use_normalization_before_and_after=True,
        n_key_value_heads=2,
        original_architecture="Gemma2ForCausalLM",
        gated_mlp=True,
        final_rms=True,
        rotary_dim=16,
        window_size=64,
        attn_types=["global", "local"],
        attn_scores_soft_cap=50.0,
        output_logits_soft_cap=30.0,
        seed=0,
    )


def build_tiny_model(kind: str) -> HookedTransformer:
    torch.manual_seed(0)
    cfg = tiny_gpt2_config() if kind == "gpt2" else tiny_gemma2_config()
    model = HookedTransformer(cfg)
    model.eval()
    return model


@pytest.fixture(scope="session")
def tiny_gpt2() -> HookedTransformer:
    return build_tiny_model("gpt2")


@pytest.fixture(scope="session")
def tiny_gemma2() -> HookedTransformer:
    return build_tiny_model("gemma2")


@pytest.fixture
def token_rows() -> torch.Tensor:
    """64 rows of 32 random token ids (seeded), the first of each row being BOS-like id 1."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(2, TINY_VOCAB, (64, 32), generator=generator)
    tokens[:, 0] = 1
    return tokens


@pytest.fixture
def tiny_models(monkeypatch, tiny_gpt2, tiny_gemma2):
    """Model names 'tiny-gpt2' and 'tiny-gemma2' that the scripts load as the tiny models."""
    from matryoshka_sae import config, model_loading

    models = {"tiny-gpt2": tiny_gpt2, "tiny-gemma2": tiny_gemma2}
    for name in models:
        monkeypatch.setitem(config.MODEL_TABLE, name, {"act_size": TINY_D_MODEL, "n_layers": 2})
    monkeypatch.setattr(model_loading, "load_model", lambda name, device, dtype: models[name])


@pytest.fixture
def wandb_runs(monkeypatch):
    """Every wandb run started during the test, recorded (helpers.RecordingRun)."""
    import wandb
    from helpers import RecordingRun

    runs, real_init = [], wandb.init

    def init(**kwargs):
        runs.append(RecordingRun(real_init(**kwargs), kwargs))
        return runs[-1]

    monkeypatch.setattr(wandb, "init", init)
    return runs
