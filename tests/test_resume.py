"""Exact resume with the real activation stores: a run stopped part way (a crash after a checkpoint,
or SIGTERM between steps) and resumed ends with the weights of a run that was never stopped."""

import signal
import warnings

import pytest
import torch
from helpers import RUN_CFG_STEPS, assert_same_weights, crash, failing_at, run_cfg

from matryoshka_sae.activation_store import ActivationsStore
from matryoshka_sae.checkpoint import checkpoint_folder
from matryoshka_sae.config import post_init_cfg
from matryoshka_sae.preemption import TrainingInterrupted
from matryoshka_sae.sae import create_sae
from matryoshka_sae.training import train_sae, train_sae_group, train_transcoder
from matryoshka_sae.transcoder_activation_store import TranscoderActivationsStore


@pytest.fixture(autouse=True)
def quiet_epochs():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is exhausted; starting epoch")
        yield


def make_store(model, cfg):
    kind = (
        TranscoderActivationsStore
        if cfg["sae_type"] == "matryoshka_transcoder"
        else ActivationsStore
    )
    return kind(model, cfg)


def train(model, cfg, store=None, resume_from=None):
    train_fn = train_transcoder if cfg["sae_type"] == "matryoshka_transcoder" else train_sae
    torch.manual_seed(0)
    return train_fn(
        create_sae(cfg), store or make_store(model, cfg), None, cfg, resume_from=resume_from
    )


@pytest.mark.parametrize("transcoder", [False, True], ids=["sae", "transcoder"])
def test_crash_and_resume_gives_the_uninterrupted_weights(tiny_gemma2, tmp_path, transcoder):
    reference = train(tiny_gemma2, run_cfg(tmp_path, "reference", transcoder))
    cfg = run_cfg(tmp_path, "interrupted", transcoder)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(
            tiny_gemma2, cfg, failing_at(make_store(tiny_gemma2, cfg), 26, crash)
        )  # after step 20's save
    resumed = train(tiny_gemma2, cfg, resume_from=checkpoint_folder(cfg))
    assert_same_weights(reference, resumed)


def test_sigterm_checkpoints_mid_block_and_resumes_exactly(tiny_gpt2, tmp_path):
    reference = train(tiny_gpt2, run_cfg(tmp_path, "reference"))
    cfg = run_cfg(tmp_path, "stopped")
    store = failing_at(make_store(tiny_gpt2, cfg), 23, lambda: signal.raise_signal(signal.SIGTERM))
    with pytest.raises(TrainingInterrupted, match="SIGTERM after step 23") as stopped:
        train(tiny_gpt2, cfg, store)
    assert stopped.value.folders == [checkpoint_folder(cfg)] and stopped.value.exit_status == 143
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler is gone after training
    resumed = train(tiny_gpt2, cfg, resume_from=checkpoint_folder(cfg))
    assert_same_weights(reference, resumed)


def test_group_resume_is_exact(tiny_gpt2, tmp_path):
    def group(name):
        base = run_cfg(tmp_path, name)
        return [
            post_init_cfg({**base, "sae_type": sae_type, "name": sae_type})
            for sae_type in ("batchtopk", "matryoshka")
        ]

    def train_group(cfgs, store=None, resume_from=None):
        torch.manual_seed(0)
        return train_sae_group(
            [create_sae(cfg) for cfg in cfgs],
            store or ActivationsStore(tiny_gpt2, cfgs[0]),
            None,
            cfgs,
            resume_from=resume_from,
        )

    reference = train_group(group("reference"))
    cfgs = group("interrupted")
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_group(cfgs, failing_at(ActivationsStore(tiny_gpt2, cfgs[0]), 35, crash))
    resumed = train_group(cfgs, resume_from=[checkpoint_folder(cfg) for cfg in cfgs])
    for a, b in zip(reference, resumed):
        assert_same_weights(a, b)


def test_store_state_round_trip_continues_the_stream(tiny_gpt2, tmp_path):
    cfg = run_cfg(tmp_path, "x")
    store = ActivationsStore(tiny_gpt2, cfg)
    for _ in range(7):  # into the second block
        store.next_batch()
    state = store.state_dict()
    expected = [store.next_batch() for _ in range(33)]  # across block and epoch boundaries
    restored = ActivationsStore(tiny_gpt2, cfg)
    restored.load_state_dict(state)
    for batch in expected:
        assert torch.equal(restored.next_batch(), batch)
    assert restored.epochs_completed == store.epochs_completed >= 1


def test_resuming_with_changed_settings_is_refused(tiny_gpt2, tmp_path):
    state = ActivationsStore(tiny_gpt2, run_cfg(tmp_path, "a")).state_dict()
    other = ActivationsStore(
        tiny_gpt2, run_cfg(tmp_path, "a", batch_size=32, num_tokens=32 * RUN_CFG_STEPS)
    )
    with pytest.raises(ValueError, match="batch_size 48 -> 32.*own settings"):
        other.load_state_dict(state)
