"""Training loops for SAEs and transcoders.

The public pieces, from the smallest:

    make_optimizer, training_step, training_steps   the one step every caller shares (step.py;
                                        importable from here too)
    lr_at_step(step, total_steps, cfg)  the schedule
    train_sae / train_transcoder / train_sae_group              the loop on an activation store
    open_activation_store(model, cfgs)  the stream a group of dictionaries reads
    train_from_cfgs(cfgs)               model -> store -> dictionaries -> training (the scripts')

Tests and benchmarks step through `make_optimizer` and `training_step` (`training_steps` for a
group) too, so what they check or time is what training runs.

`train_sae`, `train_transcoder` and `train_sae_group` share one loop (`_train`): every step draws one
batch from the activation store and feeds it to every dictionary being trained, so several SAEs
(BatchTopK SAEs of different sparsity next to one Matryoshka SAE, as in
https://github.com/bartbussmann/matryoshka_sae) see exactly the same data. Each dictionary has its
own optimizer (`make_optimizer`), wandb run and checkpoint folder
``Path(cfg["checkpoint_dir"]) / cfg["name"]``; each step is one `training_steps` of all of them,
each at its ``lr_at_step(step)`` (the same result as a `training_step` of each in turn).

The loop adds no host synchronisation to the step: the scalars of the output dict stay on the device and are read back together every
``cfg["log_freq"]`` steps; that read is where non-finite inputs or losses are detected (a
`NonFiniteError`, raised at most log_freq steps after the fact). A checkpoint is written only after
every step before it was checked, so a good checkpoint is never replaced by NaN weights.

Resume and preemption: each checkpoint keeps the activation store's position (its `state_dict`), so
``resume_from`` continues on exactly the batches an uninterrupted run would have seen. SIGTERM or
SIGINT during training writes a checkpoint after the current step and raises
`preemption.TrainingInterrupted` (the scripts print the command that resumes the run).

Under torchrun (see distributed.py) every rank runs this loop on its rows of each global batch: the
step all-reduces the gradients after backward (`distributed.average_gradients`), rank 0 alone logs,
evaluates and writes checkpoints (with the global data position), and stop signals are agreed
every log_freq steps. With cfg["distribute_dictionaries"] each rank instead trains whole
dictionaries of a group (i on rank i % ranks) on the gathered batch and writes their checkpoints.

Results: the loops return the trained dictionaries. The final metrics (the last step's scalars and
the last CE evaluation) are in ``metrics.json`` of each run's checkpoint folder:
``checkpoint.load_metrics(checkpoint.checkpoint_folder(cfg))``.
"""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import wandb
from tqdm import tqdm

from matryoshka_sae import distributed
from matryoshka_sae.activation_store import dictionary_hooks
from matryoshka_sae.checkpoint import (
    checkpoint_folder,
    claim_run_folder,
    load_history,
    release_run_lock,
    restore_checkpoint,
    save_checkpoint,
    saved_steps,
)
from matryoshka_sae.config import cfg_to_json
from matryoshka_sae.evaluation import evaluate_ce_loss
from matryoshka_sae.preemption import StopSignals, TrainingInterrupted
from matryoshka_sae.step import (  # noqa: F401  (training.training_step: the user's name)
    make_optimizer,
    training_step,
    training_steps,
)


class NonFiniteError(RuntimeError):
    """Training met NaN/inf activations or produced a NaN/inf loss."""


# ---------------------------------------------------------------------------------------------
# Learning rate
# ---------------------------------------------------------------------------------------------


def lr_at_step(step: int, total_steps: int, cfg: dict) -> float:
    """Learning rate of step `step` (0-based) of `total_steps`:

        lr * min(1, (step + 1) / lr_warmup_steps) * min(1, (total_steps - step) / n_decay)

    with n_decay = lr_decay_frac * total_steps: linear warmup, then linear decay to ~0 over the
    final n_decay steps. Either factor is 1 when its setting is 0.
    """
    factor = 1.0
    if cfg["lr_warmup_steps"]:
        factor *= min(1.0, (step + 1) / cfg["lr_warmup_steps"])
    n_decay = int(cfg["lr_decay_frac"] * total_steps)
    if n_decay > 0:
        factor *= min(1.0, (total_steps - step) / n_decay)
    return cfg["lr"] * factor


# ---------------------------------------------------------------------------------------------
# Progress bar
# ---------------------------------------------------------------------------------------------


def format_postfix(metrics: dict[str, float], target_l0: float | None = None) -> str:
    """The progress bar's postfix, e.g. ``Loss: 0.0234, L0: 64.2, L2: 0.0180, FVU: 0.1823``; with a
    target L0 (cfg["target_l0"]) the L0 reads against it, e.g. ``L0: 33.1/32``."""
    target = "" if target_l0 is None else f"/{target_l0:g}"
    layers = ""  # a cross-layer transcoder's FVU is the mean over its layers: their range too
    if "fvu_layer_max" in metrics:
        layers = f" (layers {metrics['fvu_layer_min']:.3f}..{metrics['fvu_layer_max']:.3f})"
    return (
        f"Loss: {metrics['loss']:.4f}, L0: {metrics['l0_norm']:.1f}{target}, "
        f"L2: {metrics['l2_loss']:.4f}, FVU: {metrics['fvu']:.4f}{layers}"
    )


def l0_target(cfg: dict) -> float | None:
    """The L0 the progress bar reads l0_norm against: cfg["target_l0"]; a jumprelu cross-layer
    transcoder's counts per source layer and its l0_norm sums the layers, so target_l0 x L."""
    if cfg["sae_type"] == "matryoshka_clt":
        return (
            cfg["target_l0"] * len(cfg["clt_layers"]) if cfg["clt_sparsity"] == "jumprelu" else None
        )
    return cfg.get("target_l0")


# ---------------------------------------------------------------------------------------------
# The shared loop
# ---------------------------------------------------------------------------------------------


@dataclass
class _Trainee:
    """One dictionary under training and its bookkeeping."""

    sae: torch.nn.Module
    cfg: dict
    optimizer: torch.optim.Optimizer
    folder: Path
    run: Any = None
    scalar_keys: list[str] | None = None  # the logged entries of the output dict
    pending: list[torch.Tensor] = field(default_factory=list)  # [n_keys] per step, on device
    pending_lrs: list[float] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)  # latest values read back
    history: list[dict[str, float]] = field(default_factory=list)  # every logged step, for plots
    saved_step: int | None = None  # last checkpoint written by this run


def _as_inputs(batch) -> tuple[torch.Tensor, ...] | dict[str, torch.Tensor]:
    """An SAE batch is one tensor; a transcoder batch is (source, target); a store serving several
    hooks (MultiHookActivationsStore) gives {hook name: batch}, which stays a dict."""
    if isinstance(batch, dict):
        return batch
    return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


def _inputs_for(cfg: dict, inputs) -> tuple[torch.Tensor, ...]:
    """What the dictionary of `cfg` trains on: its hook's batch(es) when the store serves several."""
    if isinstance(inputs, dict):
        return tuple(inputs[name] for name in dictionary_hooks(cfg))
    return inputs


def _tensors(inputs) -> list[torch.Tensor]:
    return list(inputs.values()) if isinstance(inputs, dict) else list(inputs)


def _make_trainee(sae, cfg: dict) -> _Trainee:
    return _Trainee(
        sae=sae, cfg=cfg, optimizer=make_optimizer(sae, cfg), folder=checkpoint_folder(cfg)
    )


def _training_steps(trainees: list[_Trainee], inputs, lrs: list[float]) -> None:
    """`training_steps` of every trainee on its batch of `inputs` at its lr; the logged scalars of
    each output wait on the device (trainee.pending) for the next `_flush`."""
    training_steps(
        [t.sae for t in trainees],
        [t.optimizer for t in trainees],
        [_inputs_for(t.cfg, inputs) for t in trainees],
        lrs,
        [t.cfg["max_grad_norm"] for t in trainees],
        lambda i, output: _keep_scalars(trainees[i], output, lrs[i]),
    )


def _keep_scalars(trainee: _Trainee, output: dict[str, torch.Tensor], lr: float) -> None:
    if trainee.scalar_keys is None:
        trainee.scalar_keys = [k for k, v in output.items() if _is_logged(k, v)]
    trainee.pending.append(
        torch.cat([output[k].detach().float().reshape(-1) for k in trainee.scalar_keys])
    )
    trainee.pending_lrs.append(lr)


def _is_logged(key: str, value) -> bool:
    """Scalars (0-dim tensors) and per-prefix metric vectors are logged; batch tensors are not."""
    return torch.is_tensor(value) and (value.dim() == 0 or key.endswith("_per_prefix"))


def _scalar_names(trainee: _Trainee) -> list[str]:
    """Names of the logged values: a per-prefix vector ``fvu_per_prefix`` becomes fvu_prefix_0, ..."""
    names = []
    for key in trainee.scalar_keys:
        if key.endswith("_per_prefix"):
            n_groups = len(trainee.cfg["group_sizes"])
            names += [f"{key.removesuffix('_per_prefix')}_prefix_{g}" for g in range(n_groups)]
        else:
            names.append(key)
    return names


def _flush(trainees: list[_Trainee], nonfinite_inputs: torch.Tensor, next_step: int) -> None:
    """Read the pending scalars back (one host sync), check them, log them to wandb.

    `next_step` is the index of the first step not yet taken.
    """
    n_pending = len(trainees[0].pending)
    if n_pending == 0:
        return
    first = next_step - n_pending
    parts = [nonfinite_inputs.float().reshape(1)] + [
        torch.stack(t.pending).flatten() for t in trainees
    ]
    host = _mean_over_ranks(torch.cat(parts), trainees[0].cfg).cpu()
    nonfinite_inputs.zero_()
    last_good = [f"{t.folder} (step {t.saved_step})" for t in trainees if t.saved_step is not None]
    where_good = (
        f" The last good checkpoint: {', '.join(last_good)}."
        if last_good
        else " No checkpoint was written yet."
    )
    if host[0] > 0:
        raise NonFiniteError(
            f"Non-finite activations (NaN/inf) in {int(host[0])} batch(es) among steps {first}.."
            f"{next_step - 1}; training stopped and the weights since are not to be trusted. Check the "
            f"model dtype (try model_dtype float32) and the data.{where_good}"
        )
    offset = 1
    for t in trainees:
        names = _scalar_names(t)
        n_keys = len(names)
        rows = host[offset : offset + n_pending * n_keys].view(n_pending, n_keys).tolist()
        offset += n_pending * n_keys
        for i, (row, lr) in enumerate(zip(rows, t.pending_lrs)):
            values = dict(zip(names, row), lr=lr)
            if not math.isfinite(values["loss"]):
                raise NonFiniteError(
                    f"{t.cfg['name']}: the loss became {values['loss']} at step {first + i}. Lower "
                    f"cfg['lr'] or cfg['max_grad_norm'].{where_good}"
                )
            t.run.log(values, step=first + i)
            t.history.append({"step": first + i, **values})
        t.metrics.update(values)
        t.pending.clear()
        t.pending_lrs.clear()


def _mean_over_ranks(scalars: torch.Tensor, cfg: dict) -> torch.Tensor:
    """Under torchrun, every rank logs and checks the same figures: the means over ranks of the
    local batches' scalars (the global batch's, for the means over rows), the non-finite count
    (first) summed. Unchanged on a single process, or where each rank trains its own dictionaries."""
    group = distributed.batch_group()
    if group is None or _dictionaries_spread(cfg):
        return scalars
    scalars = distributed.sum_over_ranks(scalars, group)
    scalars[1:] /= distributed.world_size(group)
    return scalars


def _weights_are_finite(sae) -> bool:
    tensors = [t for t in sae.state_dict().values() if t.is_floating_point()]
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def _data_position(activation_store) -> dict:
    """The store's position (kept in the checkpoint for an exact resume), if the store can give it.
    The real stores' positions are global (the same for any number of ranks; under torchrun every
    rank calls state_dict, which gathers the ranks' parts)."""
    if not hasattr(activation_store, "state_dict"):
        return {}
    return {"activation_store": activation_store.state_dict()}


def _save(trainee: _Trainee, steps_done: int, data_position: dict) -> None:
    if not _weights_are_finite(trainee.sae):
        raise NonFiniteError(
            f"{trainee.cfg['name']}: weights are NaN/inf after step {steps_done - 1}; "
            f"the checkpoint in {trainee.folder} was left as it was."
        )
    if _writes_here(trainee.cfg):  # the weights are the same on every rank: rank 0 writes them
        save_checkpoint(
            trainee.folder,
            trainee.sae,
            trainee.cfg,
            trainee.optimizer,
            step=steps_done,
            extra=data_position,
            metrics={**trainee.metrics, "step": steps_done},
            history=trainee.history,
        )
    trainee.saved_step = steps_done


# Settings that describe the activation stream, which dictionaries trained together share (all but
# the hooks when the store serves several hooks from one pass).
SHARED_STREAM_KEYS = (
    "batch_size",
    "num_tokens",
    "model_name",
    "act_size",
    "seq_len",
    "exclude_bos",
)
HOOK_KEYS = ("hook_point", "source_hook_point", "target_hook_point")


def _check_group(cfgs: Sequence[dict], several_hooks: bool = False) -> int:
    """Check that the runs can share one activation stream; returns the number of steps."""
    for key in SHARED_STREAM_KEYS + (() if several_hooks else HOOK_KEYS):
        if len({str(cfg.get(key)) for cfg in cfgs}) > 1:
            raise ValueError(
                f"Dictionaries trained together share one activation stream, so cfg[{key!r}] "
                f"must be equal in every cfg; got {[cfg[key] for cfg in cfgs]}."
            )
    folders = [checkpoint_folder(cfg) for cfg in cfgs]
    if len(set(folders)) < len(folders):
        raise ValueError(
            f"Two runs share a checkpoint folder ({folders}); give each cfg its own 'name'."
        )
    if distributed.launched_by_torchrun() and not distributed.is_active():
        raise RuntimeError(
            "torchrun started this process as one of several ranks, but they form no process "
            "group: call distributed.init_from_env(cfg) first, before creating the model "
            "and the activation store."
        )
    distributed.local_batch_size(cfgs[0]["batch_size"])  # the global batch divides among the ranks
    total_steps = int(cfgs[0]["num_tokens"]) // cfgs[0]["batch_size"]
    if total_steps < 1:
        raise ValueError(
            f"num_tokens ({cfgs[0]['num_tokens']}) is less than one batch "
            f"(batch_size {cfgs[0]['batch_size']}); raise num_tokens."
        )
    return total_steps


def _resume_or_start(
    trainees: list[_Trainee], activation_store, resume_from
) -> tuple[int, Iterator]:
    """Restore the checkpoints (resume) or set b_dec from the first batch (fresh start).

    Returns the number of steps already done and the stream of batches to train on.
    """
    if resume_from is not None:
        step = _common_step(resume_from)
        restored = [
            restore_checkpoint(folder, t.sae, t.optimizer, step)
            for folder, t in zip(resume_from, trainees)
        ]
        steps = [state["step"] for state in restored]
        for folder, t in zip(resume_from, trainees):
            t.history = [row for row in load_history(folder) if row["step"] < steps[0]]
        _continue_data(
            activation_store, restored[0]["extra"], steps[0] * trainees[0].cfg["batch_size"]
        )
        return steps[0], _batches(activation_store)
    first = _as_inputs(activation_store.next_batch())
    whole_first = _gather_inputs(
        first, distributed.batch_group()
    )  # under torchrun, every rank's rows
    for t in trainees:  # b_dec etc. from the whole batch (a transcoder reads (source, target))
        t.sae.initialize_from_batch(*_inputs_for(t.cfg, whole_first))
    return 0, _batches(activation_store, first)


def _common_step(folders: Sequence[str | Path]) -> int | None:
    """The newest step saved completely in every folder (runs trained together stop together; a
    crash while they were being saved one after the other leaves some a save ahead)."""
    if len(folders) == 1:
        return None  # restore_checkpoint takes the newest, or explains what is missing
    saves = [set(saved_steps(folder)) for folder in folders]
    common = set.intersection(*saves)
    if not common:
        raise ValueError(
            f"The checkpoints to resume from have no step in common (saved steps "
            f"{[sorted(steps) for steps in saves]}); they were not trained together."
        )
    return max(common)


def _continue_data(activation_store, extra: dict, n_tokens_served: int) -> None:
    """Put the store where the checkpointed run was: exactly from the saved position, with any number
    of ranks (the position is global: see ActivationsStore and CachedActivationsStore), else (an
    older checkpoint) approximately with ``skip_tokens``; any other store must come positioned.

    Checkpoints of the first torchrun version hold one position per rank
    ("activation_store_per_rank"): rank r's stream was lane r's of as many lanes."""
    saved = extra.get("activation_store", extra.get("activation_store_per_rank"))
    if saved is not None and hasattr(activation_store, "load_state_dict"):
        activation_store.load_state_dict(saved)
    elif hasattr(activation_store, "skip_tokens"):
        warnings.warn(
            "The checkpoint holds no data position (an older checkpoint): the data continues "
            "approximately where the run stopped.",
            stacklevel=4,
        )
        activation_store.skip_tokens(n_tokens_served)


def _batches(activation_store, first: tuple[torch.Tensor, ...] | None = None) -> Iterator:
    if first is not None:
        yield _check_local_batch(first, activation_store)
    while True:
        yield _check_local_batch(_as_inputs(activation_store.next_batch()), activation_store)


def _check_local_batch(
    inputs: tuple[torch.Tensor, ...], activation_store
) -> tuple[torch.Tensor, ...]:
    """Under torchrun each rank's store must serve its B / W rows of the global batch of B."""
    batch_size = getattr(activation_store, "cfg", {}).get("batch_size")
    if distributed.is_active() and batch_size is not None:
        expected = distributed.local_batch_size(batch_size)
        served = _tensors(inputs)[0].shape[0]
        if served != expected:
            raise ValueError(
                f"Rank {distributed.rank()}'s activation store served {served} rows; "
                f"under torchrun each of the {distributed.world_size()} ranks serves "
                f"cfg['batch_size'] / {distributed.world_size()} = {expected} rows of the "
                f"global batch."
            )
    return inputs


def _train(
    saes: Sequence,
    activation_store,
    model,
    cfgs: Sequence[dict],
    resume_from: Sequence[str | Path] | None,
) -> list:
    if len(saes) != len(cfgs):
        raise ValueError(
            f"Got {len(saes)} dictionaries but {len(cfgs)} cfgs; pass one cfg per dictionary."
        )
    total_steps = _check_group(
        cfgs, several_hooks=getattr(activation_store, "serves_several_hooks", False)
    )
    if model is not None and any(cfg["sae_type"] == "matryoshka_clt" for cfg in cfgs):
        raise ValueError(
            "The loop's CE evaluation splices one hook, but a cross-layer transcoder replaces every "
            "layer's MLP: train it with model=None (python train_clt.py train evaluates it at the end)."
        )
    everyone = [_make_trainee(sae, cfg) for sae, cfg in zip(saes, cfgs)]
    trainees = _share_of(everyone, cfgs[0])
    if resume_from is not None:
        resume_from = _share_of(list(resume_from), cfgs[0])
    for i, t in enumerate(trainees):
        t.sae.train()
        if _writes_here(t.cfg):  # a folder of its own, locked (see checkpoint.claim_run_folder)
            t.folder = claim_run_folder(
                t.cfg, resume_from=None if resume_from is None else resume_from[i]
            )
    try:
        start, batches = _resume_or_start(trainees, activation_store, resume_from)
    except BaseException:  # e.g. a checkpoint that cannot be resumed: its folder is free again
        for t in trainees:
            release_run_lock(t.folder)
        raise
    eval_tokens = None
    if model is not None:
        if not hasattr(activation_store, "get_eval_tokens"):
            raise ValueError(
                "The CE-loss evaluation needs held-out tokens from "
                "activation_store.get_eval_tokens(n_rows); give the store that method, or "
                "pass model=None to train without the evaluation."
            )
        eval_tokens = activation_store.get_eval_tokens(cfgs[0]["n_eval_rows"])

    for t in trainees:
        mode = t.cfg["wandb_mode"] if _writes_here(t.cfg) else "disabled"  # rank 0 logs
        t.run = wandb.init(
            project=t.cfg["wandb_project"],
            name=t.cfg["name"],
            mode=mode,
            config=json.loads(cfg_to_json(t.cfg)),
            reinit="create_new",
            settings=wandb.Settings(quiet=True),
        )
    nonfinite_inputs = torch.zeros((), dtype=torch.long, device=cfgs[0]["device"])
    progress = tqdm(
        range(start, total_steps),
        desc="Training",
        initial=start,
        total=total_steps,
        disable=not distributed.is_main_process(),
    )
    try:
        with StopSignals() as stop:
            for step, inputs in zip(progress, batches):
                for x in _tensors(inputs):
                    nonfinite_inputs += ~torch.isfinite(x).all()  # read back at the next log
                with _whole_batches_here(cfgs[0]):
                    inputs = _whole_batch(cfgs[0], inputs)
                    lrs = [lr_at_step(step, total_steps, t.cfg) for t in trainees]
                    _training_steps(trainees, inputs, lrs)
                signal_name = _stop_signal(stop, step + 1, cfgs[0])
                stopping = signal_name is not None and step + 1 < total_steps
                _after_step(
                    step + 1,
                    total_steps,
                    trainees,
                    nonfinite_inputs,
                    progress,
                    model,
                    eval_tokens,
                    activation_store,
                    stopping,
                )
                if stopping:
                    raise TrainingInterrupted(signal_name, step + 1, [t.folder for t in trainees])
    finally:
        progress.close()
        for t in trainees:
            t.run.finish()
            release_run_lock(t.folder)
    if _dictionaries_spread(cfgs[0]):  # every rank returns every trained dictionary
        for i, t in enumerate(everyone):
            distributed.broadcast_state(t.sae, source=i % distributed.world_size())
    return [t.sae for t in everyone]


# ---------------------------------------------------------------------------------------------
# Under torchrun with cfg["distribute_dictionaries"]: whole dictionaries on different ranks
# ---------------------------------------------------------------------------------------------


def _dictionaries_spread(cfg: dict) -> bool:
    """Under torchrun with cfg["distribute_dictionaries"], dictionary i of a group is trained by rank
    i % ranks alone, on the whole batch (every rank's rows, gathered), instead of by every rank on
    its rows with averaged gradients: no gradient all-reduce, B x d floats gathered per step."""
    return distributed.is_active() and bool(cfg.get("distribute_dictionaries"))


def _share_of(items: list, cfg: dict) -> list:
    """This rank's items of the group's dictionaries (all of them unless spread over ranks)."""
    if not _dictionaries_spread(cfg):
        return items
    if len(items) < distributed.world_size():
        raise ValueError(
            f"distribute_dictionaries places whole dictionaries on ranks, but the group has "
            f"{len(items)} dictionaries for {distributed.world_size()} ranks; use at most "
            f"{len(items)} ranks or set cfg['distribute_dictionaries'] = False."
        )
    return items[distributed.rank() :: distributed.world_size()]


def _whole_batches_here(cfg: dict):
    """Within it, a rank's batch is the whole batch when dictionaries are spread over ranks."""
    return distributed.local_batches() if _dictionaries_spread(cfg) else contextlib.nullcontext()


def _whole_batch(cfg: dict, inputs):
    """Every rank's rows of the batch, in rank order, when dictionaries are spread over ranks."""
    return (
        _gather_inputs(inputs, distributed.world_group()) if _dictionaries_spread(cfg) else inputs
    )


def _gather_inputs(inputs, group):
    """Every rank of `group`'s rows of a batch (a tuple, or {hook: batch}), in rank order."""
    if isinstance(inputs, dict):
        return {name: distributed.gather_rows(x, group) for name, x in inputs.items()}
    return tuple(distributed.gather_rows(x, group) for x in inputs)


def _writes_here(cfg: dict) -> bool:
    """Whether this rank logs, evaluates and writes its dictionaries: rank 0, or (dictionaries
    spread over ranks) every rank its own."""
    return distributed.is_main_process() or _dictionaries_spread(cfg)


def _stop_signal(stop: StopSignals, done: int, cfg: dict) -> str | None:
    """The stop signal to act on after `done` steps, if any. Under torchrun the ranks must write the
    checkpoint after the same step: every log_freq steps they agree to stop if any rank got one."""
    if not distributed.is_active():
        return stop.signal_name
    if done % cfg["log_freq"] or not distributed.any_rank(
        stop.signal_name is not None, cfg["device"]
    ):
        return None
    return stop.signal_name or "SIGTERM"


def _after_step(
    done: int,
    total_steps: int,
    trainees: list[_Trainee],
    nonfinite_inputs: torch.Tensor,
    progress: tqdm,
    model,
    eval_tokens,
    activation_store,
    stopping: bool,
) -> None:
    """Logging, CE evaluation and checkpoints due after `done` completed steps (`stopping`: a stop
    signal arrived, so a checkpoint is due now)."""
    cfg = trainees[0].cfg
    last = done == total_steps
    checkpoint_due = last or stopping or done % cfg["checkpoint_freq"] == 0
    ce_due = model is not None and (last or done % cfg["perf_log_freq"] == 0)
    # wandb's steps must increase: the pending per-step scalars go out before the CE figures.
    if checkpoint_due or ce_due or done % cfg["log_freq"] == 0:
        _flush(trainees, nonfinite_inputs, next_step=done)
        labels = [f"#{i} " if len(trainees) > 1 else "" for i in range(len(trainees))]
        progress.set_postfix_str(
            " | ".join(
                label + format_postfix(t.metrics, l0_target(t.cfg))
                for label, t in zip(labels, trainees)
            )
        )
        if cfg["distributed_debug"] and not _dictionaries_spread(cfg):
            for t in trainees:
                distributed.check_same_on_every_rank(
                    t.sae, f"{t.cfg['name']} after step {done - 1}"
                )
    if ce_due and _writes_here(cfg):  # on rank 0's copy of the held-out rows
        for t in trainees:
            ce = evaluate_ce_loss(t.sae, model, eval_tokens, t.cfg)
            t.metrics.update(ce)
            t.run.log(ce, step=done - 1)
    if checkpoint_due:
        data_position = _data_position(activation_store)
        for t in trainees:
            _save(t, done, data_position)
        distributed.barrier()  # under torchrun: no rank goes on before rank 0's checkpoint is complete


# ---------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------


def train_sae(sae, activation_store, model, cfg: dict, resume_from: str | Path | None = None):
    """Train `sae` for num_tokens // batch_size steps on ``activation_store.next_batch()``.

    `model` (a HookedTransformer, or None) is used only for the CE-loss evaluation every
    perf_log_freq steps. `resume_from`: a checkpoint folder; its weights, buffers, optimizer state
    and step are restored and training continues at the next step, on the batches the run would
    have seen next (``activation_store.load_state_dict`` with the position saved in the checkpoint,
    as ActivationsStore has; any other store must come positioned where the data should continue).
    SIGTERM/SIGINT: a checkpoint after the current step, then `preemption.TrainingInterrupted`.
    Returns the trained SAE; its final metrics are in ``checkpoint_folder(cfg) / "metrics.json"``.
    """
    return _train(
        [sae], activation_store, model, [cfg], None if resume_from is None else [resume_from]
    )[0]


def train_transcoder(
    transcoder, activation_store, model, cfg: dict, resume_from: str | Path | None = None
):
    """`train_sae` for a transcoder: the store yields (source, target) pairs and the CE evaluation
    splices the predicted target into cfg["target_hook_point"]."""
    return train_sae(transcoder, activation_store, model, cfg, resume_from)


def open_activation_store(model, cfgs: Sequence[dict]):
    """The activation stream a group of dictionaries trains on: when their cfgs read several hooks
    (layers or sites, or a cross-layer transcoder's every layer), one `MultiHookActivationsStore`
    serving every hook from one model pass;
    otherwise ``activation_cache.activation_store_for(model, cfgs[0])``, the live model's store (a
    transcoder's paired one) or, with cfg["activation_cache"], the cache's."""
    from matryoshka_sae.activation_cache import activation_store_for
    from matryoshka_sae.activation_store import MultiHookActivationsStore

    cross_layer = any(
        cfg["sae_type"] == "matryoshka_clt" for cfg in cfgs
    )  # reads a source and target per layer
    if len({tuple(dictionary_hooks(cfg)) for cfg in cfgs}) > 1 or cross_layer:
        if cfgs[0].get("activation_cache"):
            raise ValueError(
                "cfg['activation_cache'] (--activations) holds one hook's activations, but these "
                "dictionaries read several hooks; train each layer from its cache in its own run "
                "(--layer L --activations DIR)."
            )
        return MultiHookActivationsStore(model, list(cfgs))
    return activation_store_for(model, cfgs[0])


def train_from_cfgs(
    cfgs: Sequence[dict], resume_from: Sequence[str | Path] | None = None, model=None
) -> list:
    """The whole assembly, model -> store -> dictionaries -> training, for one cfg per dictionary:

        model = model_loading.load_model(cfgs[0]["model_name"], device, model_dtype)  # unless given
        store = open_activation_store(model, cfgs)
        saes = [create_sae(cfg) for cfg in cfgs]
        train_sae_group(saes, store, model, cfgs, resume_from)

    main.py and train_gemma_example.py train through it. Under torchrun, call
    ``distributed.init_from_env(cfg)`` for every cfg first. `resume_from`: one checkpoint folder per
    cfg. Returns the trained dictionaries (their metrics are in each run's checkpoint folder).
    """
    from matryoshka_sae import model_loading
    from matryoshka_sae.sae import create_sae

    base = cfgs[0]
    if model is None:
        model = model_loading.load_model(base["model_name"], base["device"], base["model_dtype"])
    store = open_activation_store(model, cfgs)
    return train_sae_group(
        [create_sae(cfg) for cfg in cfgs], store, model, cfgs, resume_from=resume_from
    )


def train_sae_group(
    saes: Sequence,
    activation_store,
    model,
    cfgs: Sequence[dict],
    resume_from: Sequence[str | Path] | None = None,
) -> list:
    """Train several dictionaries on one activation stream: each batch goes to every one of them.

    The cfgs must agree on batch_size and num_tokens and have distinct names (checkpoint folders);
    log_freq, perf_log_freq and checkpoint_freq are those of cfgs[0]. `resume_from`: one checkpoint
    folder per dictionary, all from the same step. Returns the list of trained dictionaries.
    """
    return _train(
        list(saes),
        activation_store,
        model,
        list(cfgs),
        None if resume_from is None else list(resume_from),
    )
