"""Training loops for SAEs and transcoders.

`train_sae`, `train_transcoder` and `train_sae_group` share one loop (`_train`): every step draws one
batch from the activation store and feeds it to every dictionary being trained, so several SAEs
(the original repository's BatchTopK SAEs of different sparsity next to one Matryoshka SAE) see
exactly the same data. Each dictionary has its own Adam optimizer, wandb run and checkpoint folder
``Path(cfg["checkpoint_dir"]) / cfg["name"]``.

One training step (the loop adds no host synchronisation to it):

    loss.backward(); sae.remove_parallel_decoder_grad(); clip_grad_norm_(max_grad_norm)
    optimizer.step() at lr_at_step(step); sae.normalize_decoder()

The scalars of the output dict stay on the device and are read back together every
``cfg["log_freq"]`` steps; that read is where non-finite inputs or losses are detected (a
`NonFiniteError`, raised at most log_freq steps after the fact). A checkpoint is written only after
every step before it was checked, so a good checkpoint is never replaced by NaN weights.

Results: the loops return the trained dictionaries. The final metrics (the last step's scalars and
the last CE evaluation) are in ``metrics.json`` of each run's checkpoint folder:
``checkpoint.load_metrics(checkpoint.checkpoint_folder(cfg))``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import wandb
from tqdm import tqdm

from checkpoint import checkpoint_folder, load_history, restore_checkpoint, save_checkpoint
from config import cfg_to_json
from evaluation import evaluate_ce_loss


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


def format_postfix(metrics: dict[str, float]) -> str:
    """The progress bar's postfix, e.g. ``Loss: 0.0234, L0: 64.2, L2: 0.0180, FVU: 0.1823``."""
    return (f"Loss: {metrics['loss']:.4f}, L0: {metrics['l0_norm']:.1f}, "
            f"L2: {metrics['l2_loss']:.4f}, FVU: {metrics['fvu']:.4f}")


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


def _as_inputs(batch) -> tuple[torch.Tensor, ...]:
    """An SAE batch is one tensor; a transcoder batch is (source, target)."""
    return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


def _make_trainee(sae, cfg: dict) -> _Trainee:
    optimizer = torch.optim.Adam(sae.parameters(), lr=cfg["lr"], betas=(cfg["beta1"], cfg["beta2"]))
    return _Trainee(sae=sae, cfg=cfg, optimizer=optimizer, folder=checkpoint_folder(cfg))


def _training_step(trainee: _Trainee, inputs: tuple[torch.Tensor, ...], lr: float) -> None:
    sae, optimizer = trainee.sae, trainee.optimizer
    output = sae(*inputs)
    output["loss"].backward()
    sae.remove_parallel_decoder_grad()
    torch.nn.utils.clip_grad_norm_(sae.parameters(), trainee.cfg["max_grad_norm"])
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sae.normalize_decoder()
    if trainee.scalar_keys is None:
        trainee.scalar_keys = [k for k, v in output.items() if _is_logged(k, v)]
    trainee.pending.append(torch.cat([output[k].detach().float().reshape(-1) for k in trainee.scalar_keys]))
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
    parts = [nonfinite_inputs.float().reshape(1)] + [torch.stack(t.pending).flatten() for t in trainees]
    host = torch.cat(parts).cpu()
    nonfinite_inputs.zero_()
    last_good = [f"{t.folder} (step {t.saved_step})" for t in trainees if t.saved_step is not None]
    where_good = (f" The last good checkpoint: {', '.join(last_good)}." if last_good
                  else " No checkpoint was written yet.")
    if host[0] > 0:
        raise NonFiniteError(
            f"Non-finite activations (NaN/inf) in {int(host[0])} batch(es) among steps {first}.."
            f"{next_step - 1}; training stopped and the weights since are not to be trusted. Check the "
            f"model dtype (try model_dtype float32) and the data.{where_good}")
    offset = 1
    for t in trainees:
        names = _scalar_names(t)
        n_keys = len(names)
        rows = host[offset:offset + n_pending * n_keys].view(n_pending, n_keys).tolist()
        offset += n_pending * n_keys
        for i, (row, lr) in enumerate(zip(rows, t.pending_lrs)):
            values = dict(zip(names, row), lr=lr)
            if not math.isfinite(values["loss"]):
                raise NonFiniteError(
                    f"{t.cfg['name']}: the loss became {values['loss']} at step {first + i}. Lower "
                    f"cfg['lr'] or cfg['max_grad_norm'].{where_good}")
            t.run.log(values, step=first + i)
            t.history.append({"step": first + i, **values})
        t.metrics.update(values)
        t.pending.clear()
        t.pending_lrs.clear()


def _weights_are_finite(sae) -> bool:
    tensors = [t for t in sae.state_dict().values() if t.is_floating_point()]
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def _save(trainee: _Trainee, steps_done: int) -> None:
    if not _weights_are_finite(trainee.sae):
        raise NonFiniteError(f"{trainee.cfg['name']}: weights are NaN/inf after step {steps_done - 1}; "
                             f"the checkpoint in {trainee.folder} was left as it was.")
    save_checkpoint(trainee.folder, trainee.sae, trainee.cfg, trainee.optimizer, step=steps_done,
                    metrics={**trainee.metrics, "step": steps_done}, history=trainee.history)
    trainee.saved_step = steps_done


# Settings that describe the activation stream, which dictionaries trained together share.
SHARED_STREAM_KEYS = ("batch_size", "num_tokens", "model_name", "hook_point", "source_hook_point",
                      "target_hook_point", "act_size", "seq_len", "exclude_bos")


def _check_group(cfgs: Sequence[dict]) -> int:
    """Check that the runs can share one activation stream; returns the number of steps."""
    for key in SHARED_STREAM_KEYS:
        if len({str(cfg.get(key)) for cfg in cfgs}) > 1:
            raise ValueError(f"Dictionaries trained together share one activation stream, so cfg[{key!r}] "
                             f"must be equal in every cfg; got {[cfg[key] for cfg in cfgs]}.")
    folders = [checkpoint_folder(cfg) for cfg in cfgs]
    if len(set(folders)) < len(folders):
        raise ValueError(f"Two runs share a checkpoint folder ({folders}); give each cfg its own 'name'.")
    total_steps = int(cfgs[0]["num_tokens"]) // cfgs[0]["batch_size"]
    if total_steps < 1:
        raise ValueError(f"num_tokens ({cfgs[0]['num_tokens']}) is less than one batch "
                         f"(batch_size {cfgs[0]['batch_size']}); raise num_tokens.")
    return total_steps


def _resume_or_start(trainees: list[_Trainee], activation_store, resume_from) -> tuple[int, Iterator]:
    """Restore the checkpoints (resume) or set b_dec from the first batch (fresh start).

    Returns the number of steps already done and the stream of batches to train on.
    """
    if resume_from is not None:
        steps = [restore_checkpoint(folder, t.sae, t.optimizer)["step"] for folder, t in zip(resume_from, trainees)]
        for folder, t in zip(resume_from, trainees):
            t.history = [row for row in load_history(folder) if row["step"] < steps[0]]
        if len(set(steps)) > 1:
            raise ValueError(f"The checkpoints to resume from stopped at different steps {steps}; they "
                             f"were not trained together.")
        if hasattr(activation_store, "skip_tokens"):  # continue the data where the run stopped
            activation_store.skip_tokens(steps[0] * trainees[0].cfg["batch_size"])
        return steps[0], _batches(activation_store)
    first = _as_inputs(activation_store.next_batch())
    for t in trainees:
        t.sae.initialize_b_dec(first[-1])  # the SAE's input, or the transcoder's target
    return 0, _batches(activation_store, first)


def _batches(activation_store, first: tuple[torch.Tensor, ...] | None = None) -> Iterator:
    if first is not None:
        yield first
    while True:
        yield _as_inputs(activation_store.next_batch())


def _train(saes: Sequence, activation_store, model, cfgs: Sequence[dict],
           resume_from: Sequence[str | Path] | None) -> list:
    if len(saes) != len(cfgs):
        raise ValueError(f"Got {len(saes)} dictionaries but {len(cfgs)} cfgs; pass one cfg per dictionary.")
    total_steps = _check_group(cfgs)
    trainees = [_make_trainee(sae, cfg) for sae, cfg in zip(saes, cfgs)]
    for t in trainees:
        t.sae.train()
    start, batches = _resume_or_start(trainees, activation_store, resume_from)
    eval_tokens = None
    if model is not None:
        if not hasattr(activation_store, "get_eval_tokens"):
            raise ValueError("The CE-loss evaluation needs held-out tokens from "
                             "activation_store.get_eval_tokens(n_rows); give the store that method, or "
                             "pass model=None to train without the evaluation.")
        eval_tokens = activation_store.get_eval_tokens(cfgs[0]["n_eval_rows"])

    for t in trainees:
        t.run = wandb.init(project=t.cfg["wandb_project"], name=t.cfg["name"], mode=t.cfg["wandb_mode"],
                           config=json.loads(cfg_to_json(t.cfg)), reinit="create_new",
                           settings=wandb.Settings(quiet=True))
    nonfinite_inputs = torch.zeros((), dtype=torch.long, device=cfgs[0]["device"])
    progress = tqdm(range(start, total_steps), desc="Training", initial=start, total=total_steps)
    try:
        for step, inputs in zip(progress, batches):
            for x in inputs:
                nonfinite_inputs += ~torch.isfinite(x).all()  # read back at the next log
            for t in trainees:
                _training_step(t, inputs, lr_at_step(step, total_steps, t.cfg))
            _after_step(step + 1, total_steps, trainees, nonfinite_inputs, progress, model, eval_tokens)
    finally:
        progress.close()
        for t in trainees:
            t.run.finish()
    return [t.sae for t in trainees]


def _after_step(done: int, total_steps: int, trainees: list[_Trainee], nonfinite_inputs: torch.Tensor,
                progress: tqdm, model, eval_tokens) -> None:
    """Logging, CE evaluation and checkpoints due after `done` completed steps."""
    cfg = trainees[0].cfg
    last = done == total_steps
    checkpoint_due = last or done % cfg["checkpoint_freq"] == 0
    ce_due = model is not None and (last or done % cfg["perf_log_freq"] == 0)
    # wandb's steps must increase: the pending per-step scalars go out before the CE figures.
    if checkpoint_due or ce_due or done % cfg["log_freq"] == 0:
        _flush(trainees, nonfinite_inputs, next_step=done)
        labels = [f"#{i} " if len(trainees) > 1 else "" for i in range(len(trainees))]
        progress.set_postfix_str(" | ".join(label + format_postfix(t.metrics)
                                            for label, t in zip(labels, trainees)))
    if ce_due:
        for t in trainees:
            ce = evaluate_ce_loss(t.sae, model, eval_tokens, t.cfg)
            t.metrics.update(ce)
            t.run.log(ce, step=done - 1)
    if checkpoint_due:
        for t in trainees:
            _save(t, done)


# ---------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------


def train_sae(sae, activation_store, model, cfg: dict, resume_from: str | Path | None = None):
    """Train `sae` for num_tokens // batch_size steps on ``activation_store.next_batch()``.

    `model` (a HookedTransformer, or None) is used only for the CE-loss evaluation every
    perf_log_freq steps. `resume_from`: a checkpoint folder; its weights, buffers, optimizer state
    and step are restored and training continues at the next step, on data the run had not reached
    (``activation_store.skip_tokens(step x batch_size)`` when the store has it, as ActivationsStore
    does; any other store must come positioned where the data should continue). Returns the trained SAE;
    its final metrics are in ``checkpoint_folder(cfg) / "metrics.json"``.
    """
    return _train([sae], activation_store, model, [cfg],
                  None if resume_from is None else [resume_from])[0]


def train_transcoder(transcoder, activation_store, model, cfg: dict, resume_from: str | Path | None = None):
    """`train_sae` for a transcoder: the store yields (source, target) pairs and the CE evaluation
    splices the predicted target into cfg["target_hook_point"]."""
    return train_sae(transcoder, activation_store, model, cfg, resume_from)


def train_sae_group(saes: Sequence, activation_store, model, cfgs: Sequence[dict],
                    resume_from: Sequence[str | Path] | None = None) -> list:
    """Train several dictionaries on one activation stream: each batch goes to every one of them.

    The cfgs must agree on batch_size and num_tokens and have distinct names (checkpoint folders);
    log_freq, perf_log_freq and checkpoint_freq are those of cfgs[0]. `resume_from`: one checkpoint
    folder per dictionary, all from the same step. Returns the list of trained dictionaries.
    """
    return _train(list(saes), activation_store, model, list(cfgs),
                  None if resume_from is None else list(resume_from))
