"""The user guide's code (shared/seeds/000_*.txt), run as written on tiny models.

What cannot run offline is swapped for a stand-in: `from_pretrained_no_processing` returns a tiny
random model of the same family with 9 blocks (so layer 8 exists) and d_model 64, and the model
table reports that width. Lines marked `# test:` are additions that keep the run short (token
count, batch size, data); every other line is the guide's.
"""

import pytest
import torch
from conftest import TINY_D_MODEL, tiny_gemma2_config, tiny_gpt2_config
from datasets import Dataset
from transformer_lens import HookedTransformer

from matryoshka_sae import config

TINY_LAYERS = 9


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """Stand-ins for the hub: tiny 9-block models, and the table's sizes to match them."""
    for name in ("gpt2", "gemma-2-2b"):
        monkeypatch.setitem(
            config.MODEL_TABLE, name, {"act_size": TINY_D_MODEL, "n_layers": TINY_LAYERS}
        )

    def from_pretrained_no_processing(name, **kwargs):
        base = tiny_gemma2_config() if "gemma" in name else tiny_gpt2_config()
        base.n_layers = TINY_LAYERS
        if "gemma" in name:
            base.attn_types = ["global", "local"] * 5
        torch.manual_seed(0)
        return HookedTransformer(base)

    monkeypatch.setattr(
        HookedTransformer,
        "from_pretrained_no_processing",
        staticmethod(from_pretrained_no_processing),
    )
    monkeypatch.chdir(tmp_path)  # checkpoints and wandb files
    tokens = torch.randint(2, 1000, (300, 64), generator=torch.Generator().manual_seed(0))
    tokens[:, 0] = 1
    return {
        "dataset_path": Dataset.from_dict({"tokens": tokens.tolist()}),
        "seq_len": 64,
        "bos_token_id": 1,
        "n_eval_rows": 4,
        "num_batches_in_buffer": 2,
        "perf_log_freq": 2,
    }


def test_quick_example_gemma_2_2b(hub):
    from matryoshka_sae.activation_store import ActivationsStore
    from matryoshka_sae.config import get_default_cfg, post_init_cfg
    from matryoshka_sae.sae import GlobalBatchTopKMatryoshkaSAE
    from matryoshka_sae.training import train_sae

    # Configure for Gemma-2-2B
    cfg = get_default_cfg()
    cfg["model_name"] = "gemma-2-2b"
    cfg["layer"] = 8
    cfg["site"] = "resid_pre"
    cfg["dict_size"] = 36864  # 16x expansion
    cfg["group_sizes"] = [2304, 4608, 9216, 20736]  # 1x, 2x, 4x, 9x
    cfg["top_k"] = 96
    cfg["model_batch_size"] = 4  # Smaller for larger model
    cfg["model_dtype"] = torch.bfloat16
    cfg.update(hub, batch_size=256, num_tokens=3 * 256)  # test: a short run on local tokens

    # Auto-detect activation size and set hooks
    cfg = post_init_cfg(cfg)

    # Load model
    model = (
        HookedTransformer.from_pretrained_no_processing("gemma-2-2b")
        .to(cfg["model_dtype"])
        .to(cfg["device"])
    )

    # Train
    activation_store = ActivationsStore(model, cfg)
    sae = GlobalBatchTopKMatryoshkaSAE(cfg)
    train_sae(sae, activation_store, model, cfg)

    assert cfg["hook_point"] == "blocks.8.hook_resid_pre" and cfg["exclude_bos"]
    from matryoshka_sae.checkpoint import checkpoint_folder, load_metrics

    metrics = load_metrics(checkpoint_folder(cfg))
    assert {"fvu", "fvu_min", "fvu_max", "fvu_mean", "loss_recovered"} <= set(metrics)


def test_example_1_gpt2_with_fvu_monitoring(hub, capsys):
    from matryoshka_sae.activation_store import ActivationsStore
    from matryoshka_sae.config import get_default_cfg, post_init_cfg
    from matryoshka_sae.sae import GlobalBatchTopKMatryoshkaSAE

    num_batches = 3  # test: the guide leaves it to the reader
    cfg = get_default_cfg()
    cfg["model_name"] = "gpt2-small"
    cfg.update(hub, batch_size=256)  # test: local tokens
    cfg = post_init_cfg(cfg)

    model = HookedTransformer.from_pretrained_no_processing(
        "gpt2-small"
    )  # test: .to("cuda") needs a GPU
    activation_store = ActivationsStore(model, cfg)
    sae = GlobalBatchTopKMatryoshkaSAE(cfg)

    # Train and monitor FVU
    for i in range(num_batches):
        batch = activation_store.next_batch()
        output = sae(batch)

        print(
            f"Step {i}: FVU={output['fvu']:.4f}, "
            f"FVU_min={output['fvu_min']:.4f}, "
            f"FVU_max={output['fvu_max']:.4f}"
        )

    assert capsys.readouterr().out.count("FVU_min=") == num_batches


def test_example_2_gemma_transcoder(hub):
    from matryoshka_sae.config import get_default_cfg
    from matryoshka_sae.sae import MatryoshkaTranscoder
    from matryoshka_sae.training import train_transcoder
    from matryoshka_sae.transcoder_activation_store import (
        TranscoderActivationsStore,
        create_transcoder_config,
    )

    cfg = get_default_cfg()
    cfg["model_name"] = "gemma-2-2b"
    cfg["dict_size"] = 18432
    cfg["group_sizes"] = [2304, 4608, 6912, 4608]
    cfg["top_k"] = 64
    cfg.update(hub, batch_size=256, num_tokens=2 * 256)  # test: a short run on local tokens

    # Configure for MLP transformation
    cfg = create_transcoder_config(
        cfg, source_layer=8, target_layer=8, source_site="resid_mid", target_site="mlp_out"
    )

    model = HookedTransformer.from_pretrained_no_processing(
        "gemma-2-2b"
    )  # test: .to("cuda") needs a GPU
    activation_store = TranscoderActivationsStore(model, cfg)
    transcoder = MatryoshkaTranscoder(cfg)

    train_transcoder(transcoder, activation_store, model, cfg)
    assert cfg["source_hook_point"] == "blocks.8.hook_resid_mid"
    assert cfg["target_hook_point"] == "blocks.8.hook_mlp_out"


def test_example_3_and_the_api_reference(capsys):
    from matryoshka_sae.config import get_hook_name, get_model_config

    for model_name in ["gpt2-small", "gemma-2-2b"]:
        config_ = get_model_config(model_name)
        print(f"{model_name}:")
        print(f"  act_size: {config_['act_size']}")
        print(f"  dict_size (16x): {config_['act_size'] * 16}")
    assert "dict_size (16x): 36864" in capsys.readouterr().out

    assert get_model_config("gemma-2-2b") == {"act_size": 2304, "n_layers": 26}
    assert get_hook_name("resid_pre", 8, "gemma-2-2b") == "blocks.8.hook_resid_pre"


def test_fvu_snippets_and_migration(capsys):
    from matryoshka_sae.config import compute_fvu, get_default_cfg, post_init_cfg
    from matryoshka_sae.sae import GlobalBatchTopKMatryoshkaSAE

    x_original = torch.randn(64, 768)
    x_reconstruct = x_original + 0.3 * torch.randn(64, 768)
    fvu = compute_fvu(x_original, x_reconstruct)
    print(f"FVU: {fvu:.4f}")  # e.g., "FVU: 0.1823"

    cfg = get_default_cfg()
    cfg["model_name"] = "gemma-2-2b"  # ← Only change
    cfg["dict_size"] = 36864  # Scale up dictionary
    cfg["group_sizes"] = [2304, 4608, 9216, 20736]  # Scale up groups
    cfg = post_init_cfg(cfg)
    assert cfg["act_size"] == 2304

    cfg = get_default_cfg()
    cfg["model_name"] = "gpt2-small"
    cfg = post_init_cfg(cfg)
    cfg.update(dict_size=1536, group_sizes=None, batch_size=64)  # test: a small dictionary
    sae = GlobalBatchTopKMatryoshkaSAE(post_init_cfg(cfg))
    batch = torch.randn(64, 768)
    sae_output = sae(batch)
    print(f"FVU: {sae_output['fvu']:.4f}")  # ← NEW metric
    assert capsys.readouterr().out.count("FVU: ") == 2
