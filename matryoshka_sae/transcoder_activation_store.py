"""Paired activations for transcoders: a source site in, a target site out, row for row.

A transcoder learns target = f(source) for two activations of the same token, e.g. the MLP's input
(resid_mid) and its output (mlp_out). `TranscoderActivationsStore` reads both hooks in one forward
pass and keeps them in two buffers shuffled with the same permutation, so that row i of a source
batch and row i of the target batch always belong to the same token. Data, packing, BOS handling,
held-out rows and epochs are those of `ActivationsStore`.
"""

from __future__ import annotations

import torch

from matryoshka_sae.activation_store import ActivationsStore
from matryoshka_sae.config import post_init_cfg


def create_transcoder_config(
    cfg: dict,
    source_layer: int,
    target_layer: int,
    source_site: str = "resid_mid",
    target_site: str = "mlp_out",
) -> dict:
    """A copy of `cfg` set up for a Matryoshka transcoder from (source_site, source_layer) to
    (target_site, target_layer), passed through `post_init_cfg` (which derives the hook points and
    act sizes and checks that the target does not precede the source)."""
    cfg = dict(cfg)
    cfg.update(
        source_layer=source_layer,
        target_layer=target_layer,
        source_site=source_site,
        target_site=target_site,
        sae_type="matryoshka_transcoder",
    )
    return post_init_cfg(cfg)


class TranscoderActivationsStore(ActivationsStore):
    """Shuffled pairs of batches ``(source [batch, source_act_size], target [batch, target_act_size])``.

    One ``run_with_cache`` reads both hooks and stops after the target's block; a site ``mlp_in``
    switches on ``model.set_use_hook_mlp_in(True)``.
    """

    def _hooks(self) -> list[tuple[str, str]]:
        if self.cfg.get("source_hook_point") is None or self.cfg.get("target_hook_point") is None:
            raise ValueError(
                "cfg has no source/target hook points; build it with create_transcoder_config("
                "cfg, source_layer, target_layer, source_site, target_site)."
            )
        return [
            (self.cfg["source_hook_point"], "source_act_size"),
            (self.cfg["target_hook_point"], "target_act_size"),
        ]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next ``(source, target)`` float32 batches; row i of each comes from the same token."""
        source, target = self._next_batches()
        return source, target
