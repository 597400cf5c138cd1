"""Text in, latents per token out: what a trained dictionary reads in a piece of text.

    from matryoshka_sae.checkpoint import load_sae
    from matryoshka_sae.model_loading import load_model
    from matryoshka_sae.text_latents import text_latents

    sae = load_sae("checkpoints/<run>")
    model = load_model(sae.cfg["model_name"], "cpu")
    result = text_latents(model, sae, "The quick brown fox jumps over the lazy dog.")
    result.latents          # [seq, dict_size] float32
    result.top(3)           # the 3 strongest latents at every token: [(token, [(latent, value), ...]), ...]

The text is one document, marked as training marked documents (`activation_store.pack_documents`):
when the run had a BOS token (cfg["bos_token_id"], else the tokenizer's when the model prepends
one), the tokens start with it. Positions training left out (`excluded_bos_token`: BOS, when
cfg["exclude_bos"]) get all-zero latents and ``kept`` False; they are left untouched by the CE
splice too (`evaluation.bos_mask`). Positions past cfg["seq_len"] lie beyond the contexts the
dictionary was trained on. A transcoder's latents are those of its source hook.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from matryoshka_sae.activation_store import block_index, document_markers, excluded_bos_token


@dataclass
class TextLatents:
    """The latents of one text.

    tokens  [seq] int64 token ids (BOS first when the run had one)
    strings [seq] the tokens as text
    latents [seq, dict_size] float32: `sae.encode` of each position's activation; 0 where not kept
    kept    [seq] bool: the positions training used (False at BOS when cfg["exclude_bos"])
    """

    tokens: torch.Tensor
    strings: list[str]
    latents: torch.Tensor
    kept: torch.Tensor

    def top(self, k: int = 5) -> list[tuple[str, list[tuple[int, float]]]]:
        """Every token with its `k` largest (latent index, value) pairs, zeros left out."""
        values, indices = self.latents.topk(min(k, self.latents.shape[-1]), dim=-1)
        return [
            (string, [(int(i), float(v)) for i, v in zip(row_i, row_v) if v > 0])
            for string, row_i, row_v in zip(self.strings, indices, values)
        ]


def tokenize_like_training(model, cfg: dict, text: str) -> torch.Tensor:
    """[seq] token ids of `text` as one training document: the run's BOS first, when it has one."""
    if model.tokenizer is None:
        raise ValueError(
            "The model has no tokenizer; give text_latents the token ids ([seq] tensor) instead "
            "of a string."
        )
    ids = model.to_tokens(text, prepend_bos=False)[0].cpu()
    bos, _ = document_markers(model, cfg)
    if bos is not None and (len(ids) == 0 or ids[0].item() != bos):
        ids = torch.cat([torch.tensor([bos]), ids])
    return ids


@torch.no_grad()
def text_latents(model, sae, text: str | torch.Tensor) -> TextLatents:
    """The latents of `sae` at every token of `text` (a string, or [seq] token ids used as given).

    One forward pass of `model` up to the dictionary's hook (a transcoder's source hook), then
    ``sae.encode`` of the kept positions (see the module docstring for BOS).
    """
    cfg = sae.cfg
    if cfg["sae_type"] == "matryoshka_clt":
        raise ValueError(
            "text_latents reads one hook; a cross-layer transcoder reads one a layer: call "
            "sae.encode on the activations of its source hooks instead."
        )
    hook = (
        cfg["source_hook_point"]
        if cfg["sae_type"] == "matryoshka_transcoder"
        else cfg["hook_point"]
    )
    tokens = (
        tokenize_like_training(model, cfg, text)
        if isinstance(text, str)
        else torch.as_tensor(text).long()
    )
    if tokens.dim() != 1 or len(tokens) == 0:
        raise ValueError(
            f"text_latents takes one text: a string or [seq] token ids, got shape {tuple(tokens.shape)}."
        )
    if len(tokens) > model.cfg.n_ctx:
        raise ValueError(
            f"the text has {len(tokens)} tokens, more than the model's context of {model.cfg.n_ctx}; "
            f"split it."
        )
    block = block_index(hook)
    _, cache = model.run_with_cache(
        tokens[None].to(model.cfg.device),
        names_filter=[hook],
        stop_at_layer=None if block is None else block + 1,
        return_cache_object=False,
    )
    acts = cache[hook][0].float()
    excluded = excluded_bos_token(model, cfg)
    kept = tokens != excluded if excluded is not None else torch.ones(len(tokens), dtype=torch.bool)
    was_training = sae.training
    sae.eval()
    try:
        device = next(sae.parameters()).device
        encoded = sae.encode(acts[kept.to(acts.device)].to(device)).float().cpu()
    finally:
        sae.train(was_training)
    latents = torch.zeros(len(tokens), encoded.shape[-1])
    latents[kept] = encoded
    strings = (
        [model.tokenizer.decode([int(t)]) for t in tokens]
        if model.tokenizer is not None
        else [str(int(t)) for t in tokens]
    )
    return TextLatents(tokens=tokens, strings=strings, latents=latents, kept=kept)
