"""Training loops: learning on a planted dictionary, several SAEs on one stream, logging, NaN
handling, the learning-rate schedule and the CE-loss evaluation."""

import json
import math
import re

import pytest
import torch
from datasets import Dataset, DatasetDict
from helpers import BATCH, PlantedStore, ReconstructStub, eval_cfg, planted_cfg

from matryoshka_sae.activation_store import ActivationsStore
from matryoshka_sae.checkpoint import checkpoint_folder, load_history, load_metrics, load_sae
from matryoshka_sae.evaluation import evaluate_ce_loss
from matryoshka_sae.sae import create_sae
from matryoshka_sae.training import (
    NonFiniteError,
    format_postfix,
    lr_at_step,
    train_sae,
    train_sae_group,
    train_transcoder,
)


def mean_of(run, key, steps):
    values = dict(run.history(key))
    return sum(values[s] for s in steps) / len(steps)


# ---------------------------------------------------------------------------------------------
# Learning
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sae_type", ["topk", "batchtopk", "matryoshka", "matryoshka_transcoder", "vanilla", "jumprelu"]
)
def test_loss_falls_on_planted_dictionary(sae_type, tmp_path, wandb_runs):
    # The default L1 coefficient (4 sigma / act_size, VanillaSAE) buys sparsity with shrinkage,
    # FVU ~0.5 at act_size 32: its sparsity is tested in test_sparsity_control.py; here a lighter one.
    cfg = planted_cfg(sae_type, tmp_path, **({"l1_coeff": 1e-2} if sae_type == "vanilla" else {}))
    train = train_transcoder if sae_type == "matryoshka_transcoder" else train_sae
    sae = train(
        create_sae(cfg), PlantedStore(paired=sae_type == "matryoshka_transcoder"), None, cfg
    )
    (run,) = wandb_runs
    assert [step for step, _ in run.history("loss")] == list(range(200))
    for key, factor in (("loss", 0.8), ("fvu", 0.6)):
        first, last = mean_of(run, key, range(20)), mean_of(run, key, range(180, 200))
        assert last < factor * first, (key, first, last)
    final = load_metrics(checkpoint_folder(cfg))
    assert final["step"] == 200 and final["fvu"] < (
        0.8 if sae_type == "matryoshka_transcoder" else 0.2
    )
    assert sae.training  # left in training mode


def test_group_equals_separate_runs(tmp_path, wandb_runs):
    """Each SAE of a group sees the same batches it would see alone, so the weights agree."""
    cfgs = [planted_cfg("batchtopk", tmp_path, n_steps=40, top_k=k) for k in (2, 4)]
    cfgs.append(planted_cfg("matryoshka", tmp_path, n_steps=40))
    group = train_sae_group([create_sae(cfg) for cfg in cfgs], PlantedStore(), None, cfgs)
    alone = [
        train_sae(
            create_sae(cfg),
            PlantedStore(),
            None,
            {**cfg, "checkpoint_dir": str(tmp_path / "alone")},
        )
        for cfg in cfgs
    ]
    assert len(group) == 3 and len({run.init_kwargs["name"] for run in wandb_runs}) == 3
    for trained_together, trained_alone in zip(group, alone):
        for name, tensor in trained_together.state_dict().items():
            torch.testing.assert_close(tensor, trained_alone.state_dict()[name], rtol=0, atol=0)
    for cfg in cfgs:
        assert load_metrics(checkpoint_folder(cfg))["step"] == 40


def test_group_settings_are_checked(tmp_path):
    a = planted_cfg("batchtopk", tmp_path, n_steps=10)
    b = planted_cfg("matryoshka", tmp_path, n_steps=20)
    with pytest.raises(ValueError, match="num_tokens"):
        train_sae_group([create_sae(a), create_sae(b)], PlantedStore(), None, [a, b])
    with pytest.raises(ValueError, match="checkpoint folder"):
        train_sae_group([create_sae(a), create_sae(a)], PlantedStore(), None, [a, a])
    c = planted_cfg("matryoshka", tmp_path, n_steps=10, layer=3)
    with pytest.raises(ValueError, match="hook_point"):
        train_sae_group([create_sae(a), create_sae(c)], PlantedStore(), None, [a, c])


# ---------------------------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------------------------


def test_postfix_format():
    metrics = {"loss": 0.023412, "l0_norm": 64.234, "l2_loss": 0.018, "fvu": 0.18231}
    assert format_postfix(metrics) == "Loss: 0.0234, L0: 64.2, L2: 0.0180, FVU: 0.1823"


def test_progress_bar_shows_metrics(tmp_path, capsys):
    cfg = planted_cfg("matryoshka", tmp_path, n_steps=20, log_freq=5)
    train_sae(create_sae(cfg), PlantedStore(), None, cfg)
    err = capsys.readouterr().err
    assert "Training: 100%" in err and "20/20" in err
    assert re.search(r"Loss: \d+\.\d{4}, L0: \d+\.\d, L2: \d+\.\d{4}, FVU: \d+\.\d{4}\]", err)


def test_wandb_gets_every_scalar_each_step(tmp_path, wandb_runs):
    cfg = planted_cfg("matryoshka", tmp_path, n_steps=23, log_freq=10, lr_warmup_steps=5)
    train_sae(create_sae(cfg), PlantedStore(), None, cfg)
    (run,) = wandb_runs
    kwargs = run.init_kwargs
    assert kwargs["mode"] == "disabled" and kwargs["project"] == cfg["wandb_project"]
    assert kwargs["name"] == cfg["name"] and json.dumps(kwargs["config"])  # JSON-safe
    expected = {
        "loss",
        "l2_loss",
        "l1_loss",
        "l1_norm",
        "l0_norm",
        "aux_loss",
        "fvu",
        "num_dead_features",
        "fvu_min",
        "fvu_max",
        "fvu_mean",
        "min_l2_loss",
        "max_l2_loss",
        "lr",
        "fvu_prefix_0",
        "fvu_prefix_1",
        "fvu_prefix_2",
        "fvu_prefix_3",
    }
    assert [step for step, _ in run.logged] == list(range(23))  # flushed at 10, 20 and the end
    for step, data in run.logged:
        assert set(data) == expected
        assert all(isinstance(v, float) and math.isfinite(v) for v in data.values())
        assert data["fvu_min"] <= data["fvu_mean"] <= data["fvu_max"]
        prefix_fvus = [data[f"fvu_prefix_{g}"] for g in range(4)]
        assert min(prefix_fvus) == pytest.approx(data["fvu_min"]) and prefix_fvus[
            -1
        ] == pytest.approx(data["fvu"])
        assert data["lr"] == pytest.approx(lr_at_step(step, 23, cfg))
    history = load_history(checkpoint_folder(cfg))
    assert [row["step"] for row in history] == list(range(23))
    assert history[-1]["fvu"] == pytest.approx(run.logged[-1][1]["fvu"])


def test_lr_schedule():
    cfg = {"lr": 1.0, "lr_warmup_steps": 4, "lr_decay_frac": 0.2}
    lrs = [lr_at_step(step, 20, cfg) for step in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4:16] == [1.0] * 12
    assert lrs[16:] == [1.0, 0.75, 0.5, 0.25]
    assert lr_at_step(7, 20, {"lr": 3e-4, "lr_warmup_steps": 0, "lr_decay_frac": 0.0}) == 3e-4


# ---------------------------------------------------------------------------------------------
# Non-finite values
# ---------------------------------------------------------------------------------------------


def test_nan_input_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = planted_cfg("batchtopk", tmp_path, n_steps=40, log_freq=5, checkpoint_freq=10)
    with pytest.raises(NonFiniteError, match=r"Non-finite activations.*steps 20\.\.24.*step 20"):
        train_sae(create_sae(cfg), PlantedStore(nan_at=23), None, cfg)
    folder = checkpoint_folder(cfg)
    assert load_metrics(folder)["step"] == 20
    assert all(torch.isfinite(t.float()).all() for t in load_sae(folder).state_dict().values())


def test_nan_loss_stops_with_clear_error(tmp_path):
    cfg = planted_cfg("batchtopk", tmp_path, n_steps=40, log_freq=5, checkpoint_freq=10)
    sae = create_sae(cfg)
    calls = []

    def poisoned_forward(x, forward=sae.forward):
        out = forward(x)
        calls.append(None)
        if len(calls) == 14:  # step 13
            out["loss"] = out["loss"] * float("nan")
        return out

    sae.forward = poisoned_forward
    with pytest.raises(NonFiniteError, match=r"loss became nan at step 13.*step 10"):
        train_sae(sae, PlantedStore(), None, cfg)
    assert load_metrics(checkpoint_folder(cfg))["step"] == 10


# ---------------------------------------------------------------------------------------------
# CE-loss evaluation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("exclude_bos", [False, True])
def test_identity_splice_recovers_all_loss(tiny_gpt2, token_rows, exclude_bos):
    cfg = eval_cfg(exclude_bos=exclude_bos, bos_token_id=1)
    result = evaluate_ce_loss(ReconstructStub(lambda x: x), tiny_gpt2, token_rows, cfg)
    assert result["ce_degradation"] == pytest.approx(0.0, abs=1e-6)
    assert result["loss_recovered"] == pytest.approx(1.0, abs=1e-6)
    # A random model: zero ablation need not hurt, but it must change the loss.
    assert abs(result["ce_loss_zero_ablation"] - result["ce_loss_clean"]) > 0.01
    assert result["ce_loss_mean_ablation"] != result["ce_loss_clean"]


def test_zero_splice_equals_zero_ablation_and_bos_is_kept(tiny_gpt2, token_rows):
    zero = ReconstructStub(torch.zeros_like)
    result = evaluate_ce_loss(zero, tiny_gpt2, token_rows, eval_cfg())
    assert result["loss_recovered"] == pytest.approx(0.0, abs=1e-6)
    kept = evaluate_ce_loss(zero, tiny_gpt2, token_rows, eval_cfg(exclude_bos=True, bos_token_id=1))
    assert kept["ce_loss_zero_ablation"] == pytest.approx(kept["ce_loss_spliced"], abs=1e-6)
    assert kept["ce_loss_zero_ablation"] != pytest.approx(result["ce_loss_zero_ablation"], abs=1e-4)
    with pytest.raises(ValueError, match="bos_token_id"):
        evaluate_ce_loss(zero, tiny_gpt2, token_rows, eval_cfg(exclude_bos=True))


def test_exact_transcoder_recovers_all_loss(tiny_gpt2, token_rows):
    """A "transcoder" that computes the MLP exactly: splicing it into mlp_out changes nothing."""
    block = tiny_gpt2.blocks[0]
    exact = ReconstructStub(lambda x: block.mlp(block.ln2(x[None]))[0])
    cfg = eval_cfg(
        sae_type="matryoshka_transcoder",
        source_hook_point="blocks.0.hook_resid_mid",
        target_hook_point="blocks.0.hook_mlp_out",
    )
    result = evaluate_ce_loss(exact, tiny_gpt2, token_rows, cfg)
    assert result["ce_degradation"] == pytest.approx(0.0, abs=1e-5)
    assert result["loss_recovered"] == pytest.approx(1.0, abs=1e-4)


def test_evaluation_leaves_training_state_alone(tiny_gpt2, token_rows, tmp_path):
    cfg = planted_cfg("batchtopk", tmp_path, act_size=64, n_steps=5, layer=1)
    sae = create_sae(cfg)
    sae(torch.randn(BATCH, 64))  # a training-mode forward sets the threshold and dead counters
    before = {name: t.clone() for name, t in sae.state_dict().items()}
    result = evaluate_ce_loss(sae, tiny_gpt2, token_rows, {**cfg, "model_batch_size": 32})
    assert sae.training and all(math.isfinite(v) for v in result.values())
    for name, tensor in sae.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_training_on_a_model_logs_ce_loss(tiny_gpt2, token_rows, tmp_path, wandb_runs):
    """The real activation store and a tiny model: CE evaluation every perf_log_freq steps."""
    data = tmp_path / "tokens"
    DatasetDict({"train": Dataset.from_dict({"tokens": token_rows.tolist()})}).save_to_disk(
        str(data)
    )
    cfg = planted_cfg(
        "matryoshka",
        tmp_path,
        n_steps=20,
        act_size=64,
        dict_size=256,
        batch_size=128,
        layer=1,
        site="resid_pre",
        dataset_path=str(data),
        seq_len=32,
        model_batch_size=8,
        num_batches_in_buffer=4,
        perf_log_freq=10,
        exclude_bos=True,
        bos_token_id=1,
        n_eval_rows=8,
    )
    store = ActivationsStore(tiny_gpt2, cfg)
    train_sae(create_sae(cfg), store, tiny_gpt2, cfg)
    (run,) = wandb_runs
    assert [step for step, _ in run.history("loss_recovered")] == [9, 19]
    final = load_metrics(checkpoint_folder(cfg))
    assert final["ce_loss_spliced"] > 0 and math.isfinite(final["loss_recovered"])
