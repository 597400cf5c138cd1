"""The step of several dictionaries at once (step.training_steps): their gradients clipped and
their Adam updates made together (all of them, in batches, or each after its backward, as
step.CPU_UPDATE_TOGETHER_ENTRIES / UPDATE_TOGETHER_ENTRIES say), each dictionary keeping its own
optimizer and state.

Exactness: bit-identical. Dictionaries share no parameter, and per entry the update is torch's own
(clip_grad_norm_'s factor, the functional Adam that Adam.step calls, with the implementation Adam.step
picks), so every weight, buffer and optimizer state equals, bit for bit, what the step of each
dictionary in turn gives (clip_grad_norm_ then optimizer.step(), as training.py stepped before).
"""

import io

import pytest
import torch
from helpers import RESUME_SETTINGS, CrashingStore, PlantedStore, planted_cfg, set_cfgs

from matryoshka_sae import step as the_step
from matryoshka_sae.checkpoint import checkpoint_folder, load_metrics
from matryoshka_sae.sae import create_sae
from matryoshka_sae.training import (
    lr_at_step,
    make_optimizer,
    train_sae_group,
    training_step,
    training_steps,
)

N_STEPS = 5
# A bound far above the gradients' norms (as a set's default) and one that clips every step.
MAX_GRAD_NORMS = (1e5, 1e-3, 1e5)


@pytest.fixture(params=["all together", "two then one", "each after its backward"])
def updates(request, monkeypatch):
    """How training_steps batches the updates of three dictionaries on the CPU (the default there:
    each after its backward; on an accelerator, together up to UPDATE_TOGETHER_ENTRIES)."""

    def bound(cfgs: list[dict]) -> int:
        entries = sum(p.numel() for p in create_sae(cfgs[0]).parameters())
        return {"all together": 2**62, "two then one": 2 * entries, "each after its backward": 0}[
            request.param
        ]

    def apply(cfgs: list[dict]) -> list[list[int]]:
        """Set the bound; returns the list that will hold the sizes of each step's updates."""
        monkeypatch.setattr(the_step, "CPU_UPDATE_TOGETHER_ENTRIES", bound(cfgs))
        sizes, update = [], the_step.update

        def counted(saes, *args):
            sizes.append(len(saes))
            update(saes, *args)

        monkeypatch.setattr(the_step, "update", counted)
        return sizes

    return apply


UPDATE_SIZES = {"all together": [3], "two then one": [2, 1], "each after its backward": [1, 1, 1]}


def set_dictionaries(tmp_path, kind: str) -> list[dict]:
    """Three layers of a transcoder set of `kind` (the tiny models' width 64, dict_size 128)."""
    return set_cfgs(tmp_path, kind, layers=(0, 1, 2), kind=kind)


def jumprelu_dictionaries(tmp_path) -> list[dict]:
    """Three JumpReLU SAEs whose log_threshold learns at 10 x lr: two parameter groups each."""
    return [
        planted_cfg(
            "jumprelu", tmp_path, name=f"jumprelu_{i}", seed=i, jumprelu_threshold_lr_scale=10.0
        )
        for i in range(3)
    ]


def cfgs_of(kind: str, tmp_path) -> list[dict]:
    if kind == "jumprelu":
        return jumprelu_dictionaries(tmp_path)
    return set_dictionaries(tmp_path, kind)


def batches_for(cfg: dict, step: int, i: int) -> tuple[torch.Tensor, ...]:
    """Dictionary i's batch of step `step`: (source, target) of a transcoder, (x,) of an SAE."""
    generator = torch.Generator().manual_seed(100 * step + i)
    n = 2 if cfg["sae_type"] == "matryoshka_transcoder" else 1
    return tuple(
        torch.randn(cfg["batch_size"], cfg["act_size"], generator=generator) * 2 + 0.5
        for _ in range(n)
    )


def fresh(cfgs: list[dict]) -> tuple[list, list]:
    """The dictionaries of `cfgs`, initialised from their first batches, and their optimizers."""
    saes = [create_sae(cfg) for cfg in cfgs]
    for i, (sae, cfg) in enumerate(zip(saes, cfgs)):
        sae.train()
        sae.initialize_from_batch(*batches_for(cfg, 0, i))
    return saes, [make_optimizer(sae, cfg) for sae, cfg in zip(saes, cfgs)]


def lrs_at(step: int, cfgs: list[dict]) -> list[float]:
    """Each dictionary's lr at `step` of N_STEPS, with a warm-up (lrs that change every step),
    the i-th dictionary's scaled by 1 + i (different lrs in one update)."""
    return [
        (1 + i) * lr_at_step(step, N_STEPS, {**cfg, "lr_warmup_steps": 3})
        for i, cfg in enumerate(cfgs)
    ]


def step_one_by_one(saes, optimizers, cfgs, step: int) -> None:
    """The reference: each dictionary's step in turn, with torch's clip_grad_norm_ and Adam.step."""
    for i, (sae, optimizer, cfg, lr) in enumerate(zip(saes, optimizers, cfgs, lrs_at(step, cfgs))):
        sae(*batches_for(cfg, step, i))["loss"].backward()
        sae.remove_parallel_decoder_grad()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), MAX_GRAD_NORMS[i])
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sae.normalize_decoder()


def step_together(saes, optimizers, cfgs, step: int) -> None:
    batches = [batches_for(cfg, step, i) for i, cfg in enumerate(cfgs)]
    training_steps(saes, optimizers, batches, lrs_at(step, cfgs), MAX_GRAD_NORMS)


def load_saved_states(sources, targets) -> None:
    """Each target (dictionary or optimizer) loads its source's state_dict through torch.save, as
    from a checkpoint."""
    for source, target in zip(sources, targets):
        saved = io.BytesIO()
        torch.save(source.state_dict(), saved)
        saved.seek(0)
        target.load_state_dict(torch.load(saved))


def assert_same_training_state(saes_a, optimizers_a, saes_b, optimizers_b) -> None:
    """Weights, buffers and optimizer state dicts (the checkpoint's content) equal bit for bit."""
    for a, b in zip(saes_a, saes_b):
        for name, tensor in a.state_dict().items():
            assert torch.equal(b.state_dict()[name], tensor), name
    for a, b in zip(optimizers_a, optimizers_b):
        state_a, state_b = a.state_dict(), b.state_dict()
        assert state_a["param_groups"] == state_b["param_groups"]
        assert state_a["state"].keys() == state_b["state"].keys()
        for index, entries in state_a["state"].items():
            assert entries.keys() == state_b["state"][index].keys()
            for key, tensor in entries.items():
                other = state_b["state"][index][key]
                assert tensor.dtype == other.dtype and tensor.device == other.device, key
                assert torch.equal(tensor, other), (index, key)


@pytest.mark.parametrize("kind", ["matryoshka", "batchtopk", "jumprelu"])
def test_group_step_equals_steps_one_by_one(tmp_path, kind, updates, request):
    cfgs = cfgs_of(kind, tmp_path)
    sizes = updates(cfgs)
    if kind == "jumprelu":
        assert len(make_optimizer(create_sae(cfgs[0]), cfgs[0]).param_groups) == 2
    alone, alone_optimizers = fresh(cfgs)
    together, together_optimizers = fresh(cfgs)
    for step in range(N_STEPS):
        step_one_by_one(alone, alone_optimizers, cfgs, step)
        step_together(together, together_optimizers, cfgs, step)
        assert_same_training_state(alone, alone_optimizers, together, together_optimizers)
    assert not torch.equal(alone[0].W_dec, fresh(cfgs)[0][0].W_dec)  # the steps moved the weights
    assert sizes == UPDATE_SIZES[request.node.callspec.params["updates"]] * N_STEPS


def test_dictionaries_of_every_kind_in_one_step(tmp_path, monkeypatch):
    """Transcoders of both kinds and JumpReLU SAEs (its thresholds a group of their own) in one
    update: settings that differ (lr, lr scale) go to separate calls, every result unchanged."""
    cfgs = (
        set_dictionaries(tmp_path, "matryoshka")[:1] + set_dictionaries(tmp_path, "batchtopk")[1:2]
    )
    cfgs.append(jumprelu_dictionaries(tmp_path)[2])
    monkeypatch.setattr(the_step, "CPU_UPDATE_TOGETHER_ENTRIES", 2**62)  # all in one update
    alone, alone_optimizers = fresh(cfgs)
    together, together_optimizers = fresh(cfgs)
    for step in range(N_STEPS):
        step_one_by_one(alone, alone_optimizers, cfgs, step)
        step_together(together, together_optimizers, cfgs, step)
    assert_same_training_state(alone, alone_optimizers, together, together_optimizers)


def test_optimizer_state_of_steps_one_by_one_continues_exactly(tmp_path, updates):
    """A checkpoint's optimizer state written by the steps one by one (training.py before the
    update was done together) loads into the new step and continues as they would have."""
    cfgs = set_dictionaries(tmp_path, "matryoshka")
    updates(cfgs)
    alone, alone_optimizers = fresh(cfgs)
    for step in range(2):
        step_one_by_one(alone, alone_optimizers, cfgs, step)
    resumed, resumed_optimizers = fresh(cfgs)
    load_saved_states(alone + alone_optimizers, resumed + resumed_optimizers)
    for step in range(2, N_STEPS):
        step_one_by_one(alone, alone_optimizers, cfgs, step)
        step_together(resumed, resumed_optimizers, cfgs, step)
    assert_same_training_state(alone, alone_optimizers, resumed, resumed_optimizers)


def test_training_step_is_the_group_step_of_one(tmp_path):
    cfgs = cfgs_of("jumprelu", tmp_path)[:1]
    alone, alone_optimizers = fresh(cfgs)
    single, single_optimizers = fresh(cfgs)
    for step in range(N_STEPS):
        step_one_by_one(alone, alone_optimizers, cfgs, step)
        output = training_step(
            single[0],
            single_optimizers[0],
            batches_for(cfgs[0], step, 0),
            lrs_at(step, cfgs)[0],
            MAX_GRAD_NORMS[0],
        )
        assert output["loss"].dim() == 0 and output["loss"].grad_fn is not None
    assert_same_training_state(alone, alone_optimizers, single, single_optimizers)


def test_group_resumes_exactly_in_the_middle(tmp_path, monkeypatch):
    """A group (BatchTopK, Matryoshka, JumpReLU with its own threshold lr) trained by the loop, its
    updates together, crashes after step 20's checkpoint; resumed, it ends with the weights of the
    run that never stopped."""
    monkeypatch.setattr(the_step, "CPU_UPDATE_TOGETHER_ENTRIES", 2**62)  # all in one update

    def group_cfgs(folder):
        return [
            planted_cfg("batchtopk", folder, **RESUME_SETTINGS),
            planted_cfg("matryoshka", folder, **RESUME_SETTINGS),
            planted_cfg("jumprelu", folder, jumprelu_threshold_lr_scale=10.0, **RESUME_SETTINGS),
        ]

    cfgs = group_cfgs(tmp_path / "uninterrupted")
    reference = train_sae_group([create_sae(c) for c in cfgs], PlantedStore(), None, cfgs)

    cfgs = group_cfgs(tmp_path / "interrupted")
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_sae_group([create_sae(c) for c in cfgs], CrashingStore(crash_at=25), None, cfgs)
    folders = [checkpoint_folder(c) for c in cfgs]
    assert {load_metrics(folder)["step"] for folder in folders} == {20}
    resumed = train_sae_group(
        [create_sae(c) for c in cfgs], PlantedStore(start=20), None, cfgs, resume_from=folders
    )
    for a, b in zip(reference, resumed):
        for name, tensor in a.state_dict().items():
            assert torch.equal(b.state_dict()[name], tensor), name


def test_cpu_adam_is_fused_and_a_state_saved_unfused_continues_unfused(tmp_path):
    """make_optimizer picks torch's fused Adam on the CPU (float rounding away from the default
    path, not bit for bit); a checkpoint written by the default path loads its "fused": None back,
    so a run started before continues bit for bit as the default path would have."""
    cfgs = set_dictionaries(tmp_path, "matryoshka")
    fused_saes, fused_optimizers = fresh(cfgs)
    assert all(o.param_groups[0]["fused"] is True for o in fused_optimizers)
    default_saes, default_optimizers = fresh(cfgs)
    default_optimizers = [
        torch.optim.Adam(sae.param_groups(), lr=cfg["lr"], betas=(cfg["beta1"], cfg["beta2"]))
        for sae, cfg in zip(default_saes, cfgs)
    ]
    for step in range(2):
        step_together(fused_saes, fused_optimizers, cfgs, step)
        step_together(default_saes, default_optimizers, cfgs, step)
    pairs = [(a.W_dec, b.W_dec) for a, b in zip(fused_saes, default_saes)]
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in pairs)
    assert not all(torch.equal(a, b) for a, b in pairs)  # two implementations, not one
    resumed, resumed_optimizers = fresh(cfgs)
    load_saved_states(default_saes + default_optimizers, resumed + resumed_optimizers)
    assert all(o.param_groups[0]["fused"] is None for o in resumed_optimizers)
    for step in range(2, N_STEPS):
        step_together(default_saes, default_optimizers, cfgs, step)
        step_together(resumed, resumed_optimizers, cfgs, step)
    assert_same_training_state(default_saes, default_optimizers, resumed, resumed_optimizers)
