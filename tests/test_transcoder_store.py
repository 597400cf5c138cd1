"""TranscoderActivationsStore and create_transcoder_config: paired, shuffled source/target batches.

Pairing is checked two ways: against a direct ``run_with_cache`` (the source row finds its token,
the target row must be that token's target), and from the block's own arithmetic (target computed
from source with the block's modules), which needs no cache at all.
"""

import pytest
import torch
from datasets import Dataset
from helpers import BOS, make_cfg, match_rows, without_bos

from matryoshka_sae.config import get_default_cfg, post_init_cfg
from matryoshka_sae.transcoder_activation_store import (
    TranscoderActivationsStore,
    create_transcoder_config,
)


def transcoder_cfg(token_rows, source_site, source_layer, target_site, target_layer, **overrides):
    cfg = make_cfg(Dataset.from_dict({"tokens": token_rows.tolist()}), **overrides)
    return create_transcoder_config(
        cfg,
        source_layer=source_layer,
        target_layer=target_layer,
        source_site=source_site,
        target_site=target_site,
    )


def test_create_transcoder_config(token_rows):
    base = make_cfg(Dataset.from_dict({"tokens": token_rows.tolist()}))
    cfg = create_transcoder_config(
        base, source_layer=0, target_layer=1, source_site="mlp_in", target_site="mlp_out"
    )
    assert cfg["sae_type"] == "matryoshka_transcoder"
    assert cfg["source_hook_point"] == "blocks.0.hook_mlp_in"
    assert cfg["target_hook_point"] == "blocks.1.hook_mlp_out"
    assert cfg["source_act_size"] == cfg["target_act_size"] == 64
    assert (
        base["sae_type"] == "matryoshka" and base.get("source_site") is None
    )  # base cfg untouched
    again = create_transcoder_config(cfg, 1, 1, "resid_mid", "resid_post")  # re-derives the hooks
    assert (again["source_hook_point"], again["target_hook_point"]) == (
        "blocks.1.hook_resid_mid",
        "blocks.1.hook_resid_post",
    )
    with pytest.raises(ValueError, match="precedes"):
        create_transcoder_config(
            base, source_layer=1, target_layer=0, source_site="resid_mid", target_site="mlp_out"
        )


PAIRS = [  # model, source site, source layer, target site, target layer, exclude BOS
    ("gpt2", "resid_pre", 0, "resid_post", 1, False),
    ("gpt2", "resid_mid", 1, "mlp_out", 1, False),
    ("gemma2", "mlp_in", 0, "mlp_out", 0, True),
    ("gpt2", "ln2_normalized", 0, "mlp_out", 0, False),
    ("gemma2", "ln2_normalized", 1, "mlp_out", 1, False),
]


@pytest.mark.parametrize(
    "kind, source_site, source_layer, target_site, target_layer, exclude_bos", PAIRS
)
def test_pairs_match_direct_run_with_cache(
    kind,
    source_site,
    source_layer,
    target_site,
    target_layer,
    exclude_bos,
    tiny_gpt2,
    tiny_gemma2,
    token_rows,
    monkeypatch,
):
    model = tiny_gpt2 if kind == "gpt2" else tiny_gemma2
    monkeypatch.setattr(
        model.cfg, "use_hook_mlp_in", model.cfg.use_hook_mlp_in
    )  # restored afterwards
    tokens = token_rows if exclude_bos else without_bos(token_rows)
    n_kept = 60 * 31 if exclude_bos else 60 * 32
    cfg = transcoder_cfg(
        tokens,
        source_site,
        source_layer,
        target_site,
        target_layer,
        exclude_bos=exclude_bos,
        batch_size=n_kept,
        num_batches_in_buffer=1,
        model_batch_size=15,
    )
    store = TranscoderActivationsStore(model, cfg)
    assert store.stop_at_layer == target_layer + 1
    source, target = store.next_batch()
    assert source.shape == target.shape == (n_kept, 64)
    assert source.dtype == target.dtype == torch.float32

    hooks = [cfg["source_hook_point"], cfg["target_hook_point"]]
    with torch.no_grad():
        _, cache = model.run_with_cache(
            tokens[4:], names_filter=hooks, stop_at_layer=target_layer + 1
        )
    keep = (tokens[4:] != BOS).flatten() if exclude_bos else slice(None)
    direct_source, direct_target = (cache[hook].flatten(0, 1)[keep] for hook in hooks)
    # Every (source, target) pair is some token's pair, each token once; a source row alone may
    # repeat (resid_pre of block 0 depends only on token and position).
    match_rows(torch.cat([source, target], dim=1), torch.cat([direct_source, direct_target], dim=1))


def test_resid_mid_plus_mlp_out_is_resid_post(tiny_gpt2, token_rows):
    """Pairs (resid_mid, resid_post) of block 1 obey resid_post = resid_mid + MLP(ln2(resid_mid))."""
    cfg = transcoder_cfg(token_rows, "resid_mid", 1, "resid_post", 1, batch_size=256)
    store = TranscoderActivationsStore(tiny_gpt2, cfg)
    block = tiny_gpt2.blocks[1]
    for _ in range(3):
        source, target = store.next_batch()
        with torch.no_grad():
            mlp_out = block.apply_mlp(block.ln2(source[None]))[0]
        torch.testing.assert_close(target, source + mlp_out, rtol=1e-4, atol=1e-4)


def test_gemma_mlp_in_to_mlp_out_pairs(tiny_gemma2, token_rows, monkeypatch):
    """Gemma-2's mlp_out is the post-MLP norm of MLP(ln2(mlp_in)); mlp_in is switched on by the store."""
    monkeypatch.setattr(tiny_gemma2.cfg, "use_hook_mlp_in", False)
    cfg = transcoder_cfg(token_rows, "mlp_in", 0, "mlp_out", 0, batch_size=256, exclude_bos=True)
    store = TranscoderActivationsStore(tiny_gemma2, cfg)
    assert tiny_gemma2.cfg.use_hook_mlp_in
    block = tiny_gemma2.blocks[0]
    source, target = store.next_batch()
    with torch.no_grad():
        expected = block.apply_mlp(block.ln2(source[None]))[0]
    torch.testing.assert_close(target, expected, rtol=1e-4, atol=1e-4)


def test_transcoder_act_size_mismatch(tiny_gpt2, token_rows):
    cfg = transcoder_cfg(token_rows, "resid_mid", 0, "mlp_out", 0)
    cfg["target_act_size"] = 128
    with pytest.raises(
        ValueError, match=r"act_size mismatch.*hook_mlp_out.*cfg\['target_act_size'\] = 128"
    ):
        TranscoderActivationsStore(tiny_gpt2, cfg)


def test_sae_cfg_is_refused(tiny_gpt2, token_rows):
    with pytest.raises(ValueError, match="create_transcoder_config"):
        TranscoderActivationsStore(
            tiny_gpt2, make_cfg(Dataset.from_dict({"tokens": token_rows.tolist()}))
        )


def test_user_document_example_2(tiny_gemma2, token_rows):
    """The document's Gemma-2 transcoder example up to the store, with the tiny Gemma-like model."""
    cfg = get_default_cfg()
    cfg["model_name"] = (
        "synthetic"  # the tiny model's activations are 64 wide, not gemma-2-2b's 2304
    )
    cfg["act_size"] = 64
    cfg["dict_size"] = 512
    cfg["group_sizes"] = [64, 128, 192, 128]
    cfg["top_k"] = 64
    cfg.update(
        dataset_path=Dataset.from_dict({"tokens": token_rows.tolist()}),
        seq_len=32,
        batch_size=128,
        num_batches_in_buffer=4,
        model_batch_size=4,
        device="cpu",
    )
    cfg = post_init_cfg(cfg)

    cfg = create_transcoder_config(
        cfg, source_layer=1, target_layer=1, source_site="resid_mid", target_site="mlp_out"
    )

    activation_store = TranscoderActivationsStore(tiny_gemma2, cfg)
    source, target = activation_store.next_batch()
    assert source.shape == target.shape == (128, 64)
    assert activation_store.get_eval_tokens().shape == (32, 32)
