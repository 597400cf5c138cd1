"""Checkpoints: save -> load round trips, atomic writes, resuming a run exactly where it stopped."""

import json
import random
import socket

import numpy as np
import pytest
import torch
from helpers import (
    ONE_ACTIVATION_TYPES,
    RESUME_SETTINGS,
    CrashingStore,
    PlantedStore,
    planted_cfg,
    train_briefly,
)

from matryoshka_sae import checkpoint
from matryoshka_sae.checkpoint import (
    checkpoint_folder,
    load_metrics,
    load_sae,
    restore_checkpoint,
    rng_states,
    save_checkpoint,
    set_rng_states,
)
from matryoshka_sae.sae import create_sae
from matryoshka_sae.training import make_optimizer, train_sae, train_sae_group


def eval_outputs(sae, seed=1):
    store = PlantedStore(seed=seed, paired=sae.cfg["sae_type"] == "matryoshka_transcoder")
    batch = store.next_batch()
    sae.eval()
    with torch.no_grad():
        out = sae(*batch) if isinstance(batch, tuple) else sae(batch)
    return {k: v for k, v in out.items() if torch.is_tensor(v)}


@pytest.mark.parametrize("sae_type", ONE_ACTIVATION_TYPES)
def test_save_then_load_gives_identical_sae(sae_type, tmp_path):
    sae, cfg = train_briefly(sae_type, tmp_path)
    folder = save_checkpoint(tmp_path / "saved", sae, cfg)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "sae.safetensors"]
    modes = {(folder / name).stat().st_mode & 0o777 for name in ("config.json", "sae.safetensors")}
    assert len(modes) == 1  # the weights are not written private
    loaded = load_sae(folder, device="cpu")
    assert type(loaded) is type(sae) and loaded.cfg["dtype"] == cfg["dtype"]
    assert loaded.state_dict().keys() == sae.state_dict().keys()
    for name, tensor in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    expected, got = eval_outputs(sae), eval_outputs(loaded)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    # The training run's own checkpoint holds the same final state.
    from_run = load_sae(checkpoint_folder(cfg))
    for name, tensor in sae.state_dict().items():
        assert torch.equal(from_run.state_dict()[name], tensor), name


def test_rng_states_round_trip():
    state = rng_states()
    first = (torch.rand(3), random.random(), np.random.rand(3))
    set_rng_states(state)
    second = (torch.rand(3), random.random(), np.random.rand(3))
    assert torch.equal(first[0], second[0]) and first[1] == second[1]
    assert np.array_equal(first[2], second[2])


def test_resume_continues_exactly(tmp_path, wandb_runs):
    cfg = planted_cfg("matryoshka", tmp_path / "uninterrupted", **RESUME_SETTINGS)
    reference = train_sae(create_sae(cfg), PlantedStore(), None, cfg)

    cfg = planted_cfg("matryoshka", tmp_path / "interrupted", **RESUME_SETTINGS)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_sae(create_sae(cfg), CrashingStore(crash_at=25), None, cfg)
    folder = checkpoint_folder(cfg)
    assert load_metrics(folder)["step"] == 20
    resumed = train_sae(create_sae(cfg), PlantedStore(start=20), None, cfg, resume_from=folder)

    for name, tensor in reference.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name
    logged_steps = [step for step, data in wandb_runs[-1].logged]
    assert logged_steps == list(range(20, 30))
    assert load_metrics(folder)["step"] == 30


def test_group_resume_continues_exactly(tmp_path):
    def group_cfgs(folder):
        return [
            planted_cfg("batchtopk", folder, **RESUME_SETTINGS),
            planted_cfg("matryoshka", folder, **RESUME_SETTINGS),
        ]

    cfgs = group_cfgs(tmp_path / "uninterrupted")
    reference = train_sae_group([create_sae(c) for c in cfgs], PlantedStore(), None, cfgs)
    cfgs = group_cfgs(tmp_path / "interrupted")
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_sae_group([create_sae(c) for c in cfgs], CrashingStore(crash_at=12), None, cfgs)
    folders = [checkpoint_folder(c) for c in cfgs]
    resumed = train_sae_group(
        [create_sae(c) for c in cfgs], PlantedStore(start=10), None, cfgs, resume_from=folders
    )
    for ref, res in zip(reference, resumed):
        for name, tensor in ref.state_dict().items():
            assert torch.equal(res.state_dict()[name], tensor), name


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    sae, cfg = train_briefly("batchtopk", tmp_path)
    folder = checkpoint_folder(cfg)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    optimizer = make_optimizer(sae, cfg)

    def crash_mid_write(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    with torch.no_grad():
        sae.W_dec.mul_(2)
    monkeypatch.setattr(checkpoint, "save_file", crash_mid_write)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(folder, sae, cfg, optimizer, step=99)

    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted(
        [*before, "training_state.previous.pt"]
    )  # no temporary files left behind
    assert (folder / "sae.safetensors").read_bytes() == before["sae.safetensors"]
    assert not torch.equal(load_sae(folder).W_dec, sae.W_dec)  # the old weights
    # The training state was already replaced: resuming takes the previous one, which matches the weights.
    assert restore_checkpoint(folder, create_sae(cfg), make_optimizer(sae, cfg))["step"] == 8
    assert (folder / "training_state.pt").read_bytes() == before["training_state.pt"]
    # With neither state matching the weights, resuming refuses the mix.
    (folder / "training_state.pt").unlink()
    monkeypatch.undo()
    save_checkpoint(folder / "other", sae, cfg, optimizer, step=99)
    (folder / "other" / "training_state.pt").rename(folder / "training_state.pt")
    with pytest.raises(ValueError, match="inconsistent"):
        restore_checkpoint(folder, create_sae(cfg), make_optimizer(sae, cfg))


def test_resume_refuses_unusable_checkpoints(tmp_path):
    sae, cfg = train_briefly("batchtopk", tmp_path)
    weights_only = save_checkpoint(tmp_path / "weights_only", sae, cfg)
    with pytest.raises(ValueError, match="load_sae"):
        restore_checkpoint(weights_only, sae)
    other = planted_cfg("batchtopk", tmp_path, dict_size=64)
    with pytest.raises(ValueError, match="dict_size"):
        restore_checkpoint(checkpoint_folder(cfg), create_sae(other))


def test_new_runs_take_the_next_free_folder_and_a_chosen_name_is_refused(tmp_path):
    """A derived name moves on to -2, -3... (cfg["name"] follows); a chosen name that holds a run is an
    error; the lock is this process's until released, and a dead process's lock is taken over."""
    cfg = planted_cfg("batchtopk", tmp_path)
    base = cfg["name"]
    (tmp_path / base).mkdir(parents=True)
    (tmp_path / base / "config.json").write_text("{}")
    (tmp_path / f"{base}-2").mkdir()
    checkpoint.acquire_run_lock(tmp_path / f"{base}-2")  # in use: skipped as well
    try:
        assert (
            checkpoint.claim_run_folder(cfg) == tmp_path / f"{base}-3"
            and cfg["name"] == f"{base}-3"
        )
        assert (
            checkpoint.claim_run_folder(cfg) == tmp_path / f"{base}-3"
        )  # claimed already: nothing more
        assert (tmp_path / f"{base}-3" / checkpoint.LOCK_FILE).is_file()
    finally:
        checkpoint.release_run_lock(tmp_path / f"{base}-3")
        checkpoint.release_run_lock(tmp_path / f"{base}-2")
    assert not (tmp_path / f"{base}-3" / checkpoint.LOCK_FILE).exists()
    chosen = {**planted_cfg("batchtopk", tmp_path), "name": base, "derived": {}}
    with pytest.raises(ValueError, match="already holds a run; continue it with --resume"):
        checkpoint.claim_run_folder(chosen)
    dead = json.dumps({"pid": 999_999_999, "host": socket.gethostname()})
    (tmp_path / base / checkpoint.LOCK_FILE).write_text(dead)
    checkpoint.acquire_run_lock(tmp_path / base)  # a lock left by a process that no longer exists
    checkpoint.release_run_lock(tmp_path / base)
    assert not (tmp_path / base / checkpoint.LOCK_FILE).exists()


def test_atomic_write_on_a_full_disk_keeps_the_old_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("old")

    def fill_the_disk(tmp):
        tmp.write_text("partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(
        checkpoint.CheckpointWriteError, match="cannot write .*config.json: No space left"
    ):
        checkpoint.atomic_write(path, fill_the_disk)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_check_replaceable(tmp_path, monkeypatch):
    out = tmp_path / "out"
    checkpoint.check_replaceable(out, "tool", {"a.json"})  # does not exist: may be written
    out.mkdir()
    (out / "a.json").write_text("{}")
    with pytest.raises(ValueError, match="tool did not write it .no marker file"):
        checkpoint.check_replaceable(out, "tool", {"a.json"})
    checkpoint.mark_folder(out, "other")
    with pytest.raises(ValueError, match="its marker says 'other'"):
        checkpoint.check_replaceable(out, "tool", {"a.json"})
    checkpoint.mark_folder(out, "tool")
    checkpoint.check_replaceable(out, "tool", {"a.json"})
    monkeypatch.chdir(out)
    with pytest.raises(ValueError, match="it is the current folder"):
        checkpoint.check_replaceable(out, "tool", {"a.json"})
