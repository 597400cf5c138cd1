"""The activation cache: what it writes (the live store's activations, token ids, a manifest), how
the cached store reads it (every activation once per epoch, pairs kept together, exact resume),
what it refuses (another model or hook, an incomplete or truncated cache), and the scripts."""

import json
import warnings

import pytest
import torch
from datasets import Dataset
from helpers import direct_activations, make_cfg, run_args, without_bos

from matryoshka_sae import activation_cache
from matryoshka_sae.activation_cache import (
    CachedActivationsStore,
    read_manifest,
    write_activation_cache,
)
from matryoshka_sae.checkpoint import checkpoint_folder, load_sae
from matryoshka_sae.cli import cache_activations, main, train_gemma_example
from matryoshka_sae.sae import create_sae
from matryoshka_sae.training import train_sae, train_transcoder
from matryoshka_sae.transcoder_activation_store import create_transcoder_config


@pytest.fixture(autouse=True)
def quiet_epochs():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*exhausted; starting epoch")
        yield


def sae_cfg(token_rows, cache=None, **overrides):
    """Rows 4.. of token_rows (64 x 32, distinct activations) train; 60 x 32 = 1920 positions."""
    data = Dataset.from_dict({"tokens": without_bos(token_rows).tolist()})
    settings = dict(
        layer=1,
        site="resid_pre",
        activation_cache=cache and str(cache),
        dict_size=256,
        top_k=8,
        num_tokens=64 * 40,
        checkpoint_freq=10,
        wandb_mode="disabled",
    )
    return make_cfg(data, **{**settings, **overrides})


def pair_cfg(token_rows, cache=None, **overrides):
    return create_transcoder_config(
        sae_cfg(token_rows, cache, **overrides), 0, 0, "resid_mid", "mlp_out"
    )


def read_all(folder, name):
    from safetensors.torch import load_file

    manifest = read_manifest(folder)
    return torch.cat([load_file(folder / shard["file"])[name] for shard in manifest["shards"]])


def test_cache_holds_the_training_activations_tokens_and_manifest(tiny_gpt2, token_rows, tmp_path):
    cfg = sae_cfg(token_rows)
    manifest = write_activation_cache(
        tiny_gpt2, cfg, tmp_path / "cache", num_tokens=1900, shard_mb=0.1
    )
    assert manifest["num_tokens"] == 1900 and len(manifest["shards"]) > 2  # ~400 positions a shard
    assert manifest["hooks"] == {"blocks.1.hook_resid_pre": 64} and manifest["dtype"] == "float32"
    assert (manifest["model_name"], manifest["seq_len"], manifest["exclude_bos"]) == (
        "synthetic",
        32,
        False,
    )
    training_rows = without_bos(token_rows)[4:]
    direct = direct_activations(tiny_gpt2, training_rows, "blocks.1.hook_resid_pre", layer=1)
    torch.testing.assert_close(
        read_all(tmp_path / "cache", "blocks.1.hook_resid_pre"), direct[:1900]
    )
    assert torch.equal(read_all(tmp_path / "cache", "tokens"), training_rows.flatten()[:1900].int())
    store = CachedActivationsStore(cfg, tmp_path / "cache")
    assert torch.equal(store.get_eval_tokens(), without_bos(token_rows)[:4])


def test_model_dtype_is_kept(token_rows, tmp_path):
    from conftest import build_tiny_model

    model = build_tiny_model("gpt2").to(torch.bfloat16)
    write_activation_cache(model, sae_cfg(token_rows), tmp_path / "cache", num_tokens=256)
    assert read_all(tmp_path / "cache", "blocks.1.hook_resid_pre").dtype == torch.bfloat16
    batch = CachedActivationsStore(sae_cfg(token_rows, tmp_path / "cache")).next_batch()
    assert batch.dtype == torch.float32 and batch.shape == (64, 64)


def test_every_activation_once_per_epoch_in_a_new_order(tiny_gpt2, token_rows, tmp_path):
    write_activation_cache(
        tiny_gpt2, sae_cfg(token_rows), tmp_path / "cache", num_tokens=1920, shard_mb=0.1
    )
    cached = read_all(tmp_path / "cache", "blocks.1.hook_resid_pre")
    store = CachedActivationsStore(
        sae_cfg(token_rows, tmp_path / "cache")
    )  # blocks of 256, 7.5 an epoch
    batches = torch.cat([store.next_batch() for _ in range(60)])  # two epochs = 15 blocks
    index = torch.cdist(batches, cached).argmin(dim=1)
    assert torch.equal(batches, cached[index])
    assert torch.bincount(index, minlength=len(cached)).eq(2).all()  # each exactly twice
    first_blocks = index[: 7 * 256]
    assert len(first_blocks.unique()) == len(first_blocks)  # no repeats within an epoch
    assert not torch.equal(index[:1920].sort().indices, index[1920:].sort().indices)  # reordered
    assert not torch.equal(first_blocks, first_blocks.sort().values)  # shuffled


def test_transcoder_pairs_stay_together(tiny_gemma2, token_rows, tmp_path):
    cfg = pair_cfg(token_rows)
    manifest = write_activation_cache(
        tiny_gemma2, cfg, tmp_path / "cache", num_tokens=1000, shard_mb=0.1
    )
    assert list(manifest["hooks"]) == ["blocks.0.hook_resid_mid", "blocks.0.hook_mlp_out"]
    sources = read_all(tmp_path / "cache", "blocks.0.hook_resid_mid")
    targets = read_all(tmp_path / "cache", "blocks.0.hook_mlp_out")
    source, target = CachedActivationsStore(pair_cfg(token_rows, tmp_path / "cache")).next_batch()
    index = torch.cdist(source, sources).argmin(dim=1)
    assert torch.equal(source, sources[index]) and torch.equal(target, targets[index])


@pytest.mark.parametrize("transcoder", [False, True], ids=["sae", "transcoder"])
def test_resume_from_the_cache_is_exact(transcoder, tiny_gemma2, token_rows, tmp_path):
    make = pair_cfg if transcoder else sae_cfg
    write_activation_cache(
        tiny_gemma2, make(token_rows), tmp_path / "cache", num_tokens=700, shard_mb=0.05
    )
    train = train_transcoder if transcoder else train_sae

    def run(name, crash_at=None, resume=False):
        cfg = make(token_rows, tmp_path / "cache", checkpoint_dir=str(tmp_path / name))
        store = CachedActivationsStore(cfg)
        if crash_at:
            next_batch, served = store.next_batch, [0]

            def failing():
                served[0] += 1
                if served[0] == crash_at:
                    raise RuntimeError("simulated crash")
                return next_batch()

            store.next_batch = failing
        torch.manual_seed(0)
        return train(
            create_sae(cfg),
            store,
            None,
            cfg,
            resume_from=checkpoint_folder(cfg) if resume else None,
        )

    reference = run("reference")  # 40 steps: 64 x 40 = 2560 activations, over 3 epochs of 700
    with pytest.raises(RuntimeError, match="simulated crash"):
        run("stopped", crash_at=27)
    resumed = run("stopped", resume=True)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name


def test_a_cache_of_another_model_or_hook_is_refused(tiny_gpt2, token_rows, tmp_path):
    write_activation_cache(tiny_gpt2, sae_cfg(token_rows), tmp_path / "cache", num_tokens=256)
    with pytest.raises(ValueError, match="holds model 'synthetic', not 'gpt2'"):
        CachedActivationsStore({**sae_cfg(token_rows, tmp_path / "cache"), "model_name": "gpt2"})
    with pytest.raises(
        ValueError, match=r"holds hooks \['blocks.1.hook_resid_pre'\], not \['blocks.0"
    ):
        CachedActivationsStore(sae_cfg(token_rows, tmp_path / "cache", layer=0))
    with pytest.raises(ValueError, match="seq_len 32, not 16"):
        CachedActivationsStore(sae_cfg(token_rows, tmp_path / "cache", seq_len=16))


def test_incomplete_and_damaged_caches_are_refused(tiny_gpt2, token_rows, tmp_path, monkeypatch):
    save_file, calls = activation_cache.save_file, [0]

    def disk_fills_on_the_third_shard(tensors, path, **kwargs):
        calls[0] += 1
        if calls[0] == 3:
            raise OSError(28, "No space left on device")
        save_file(tensors, path, **kwargs)

    monkeypatch.setattr(activation_cache, "save_file", disk_fills_on_the_third_shard)
    with pytest.raises(OSError, match="No space left"):
        write_activation_cache(
            tiny_gpt2, sae_cfg(token_rows), tmp_path / "partial", num_tokens=1900, shard_mb=0.05
        )
    assert len(list((tmp_path / "partial").glob("shard_*"))) == 2
    with pytest.raises(ValueError, match="incomplete activation cache"):
        CachedActivationsStore(sae_cfg(token_rows, tmp_path / "partial"))
    monkeypatch.undo()

    write_activation_cache(
        tiny_gpt2, sae_cfg(token_rows), tmp_path / "cache", num_tokens=1900, shard_mb=0.05
    )
    shard = tmp_path / "cache" / "shard_00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ValueError, match="shard_00001.safetensors cannot be read .*truncated"):
        CachedActivationsStore(sae_cfg(token_rows, tmp_path / "cache"))
    with pytest.raises(ValueError, match="is not an activation cache"):
        CachedActivationsStore(sae_cfg(token_rows, tmp_path))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and holds no activation cache"):
        write_activation_cache(tiny_gpt2, sae_cfg(token_rows), tmp_path / "other", num_tokens=256)


def test_cache_then_train_from_the_command_line(tmp_path, token_rows, tiny_models, capsys):  # noqa: F811
    options = run_args(tmp_path, token_rows, tmp_path / "checkpoints")
    cache_activations.main(
        [
            "--model",
            "tiny-gemma2",
            "--layers",
            "1",
            "--sites",
            "resid_mid",
            "mlp_out",
            "--out",
            str(tmp_path / "cache"),
            *options,
        ]
    )
    out = capsys.readouterr().out
    assert "1536 activations of blocks.1.hook_resid_mid, blocks.1.hook_mlp_out (float32)" in out
    train_gemma_example.main(
        ["transcoder", "--model", "tiny-gemma2", "--activations", str(tmp_path / "cache"), *options]
    )
    main.main(
        [
            "--model",
            "tiny-gemma2",
            "--site",
            "mlp_out",
            "--batchtopk-k",
            "4",
            "--activations",
            str(tmp_path / "cache"),
            *options,
        ]
    )
    folders = sorted((tmp_path / "checkpoints").iterdir())
    assert len(folders) == 3
    for folder in folders:
        assert (
            json.loads((folder / "metrics.json").read_text())["step"] == 24
            and load_sae(folder) is not None
        )
