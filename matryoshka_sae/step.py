"""The one training step every caller shares: the loop, the tests and the benchmarks.

    make_optimizer(sae, cfg)            Adam over sae.param_groups() (JumpReLU's thresholds: own lr scale)
    training_step(sae, optimizer, inputs, lr, max_grad_norm)    one step of one dictionary
    training_steps(saes, optimizers, inputs, lrs, max_grad_norms)   one step of several
                                        dictionaries, their updates together on an accelerator
    update(saes, optimizers, lrs, max_grad_norms)   clip, Adam, re-normalise: dictionaries whose
                                        gradients are ready
    clip_gradients / adam_step          the two halves of `update`, each over many dictionaries

A step is: forward, backward, (under torchrun) the gradients averaged over ranks, the decoder
gradient's component along each unit-norm row removed, the gradient clipped, Adam, the decoder rows
put back on the unit sphere. Nothing here reads a value back to the host from an accelerator.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch.optim.adam import adam as functional_adam

from matryoshka_sae import distributed

# Devices where torch's fused Adam kernel runs. On the CPU it updates a tensor in one vectorised
# pass, where Adam's default CPU path makes six or more element-wise passes with temporaries (in
# benchmarks/profile_step.py's set step at 4,608 latents it is 3.5% of the step). Its results
# differ from the default path's by float rounding only; a checkpoint keeps the implementation it
# was saved with (Adam.load_state_dict restores the group's "fused"), so a resume stays
# bit-identical.
FUSED_ADAM_DEVICES = ("cpu", "cuda", "mps", "xpu")


def make_optimizer(sae, cfg: dict) -> torch.optim.Adam:
    """Adam (betas cfg["beta1"], cfg["beta2"]) over ``sae.param_groups()``, fused where torch has
    the kernel (`FUSED_ADAM_DEVICES`, floating-point parameters).

    Each group carries an "lr_scale": `training_step` sets the group's lr to lr_scale x the
    scheduled lr. Every class has one group of scale 1 except JumpReLU, whose log_threshold learns
    at cfg["jumprelu_threshold_lr_scale"] x lr (see JumpReLUSAE), so an optimizer built from
    ``sae.parameters()`` would not train it as the library does.
    """
    fused = all(
        p.device.type in FUSED_ADAM_DEVICES and p.is_floating_point() for p in sae.parameters()
    )
    return torch.optim.Adam(
        sae.param_groups(), lr=cfg["lr"], betas=(cfg["beta1"], cfg["beta2"]), fused=fused or None
    )


def training_step(
    sae,
    optimizer: torch.optim.Optimizer,
    inputs: Sequence[torch.Tensor],
    lr: float,
    max_grad_norm: float,
) -> dict[str, torch.Tensor]:
    """One optimisation step of `sae` on one batch; returns the forward's output dict.

    `inputs`: the dictionary's arguments, (x [B, d_in],) for an SAE, (source, target) for a
    transcoder. `training_steps` for a group of one dictionary (the order of the step is there).
    """
    outputs = []
    training_steps(
        [sae],
        [optimizer],
        [inputs],
        [lr],
        [max_grad_norm],
        lambda i, output: outputs.append(output),
    )
    return outputs[0]


def training_steps(
    saes: Sequence,
    optimizers: Sequence[torch.optim.Optimizer],
    inputs: Sequence[Sequence[torch.Tensor]],
    lrs: Sequence[float],
    max_grad_norms: Sequence[float],
    on_output: Callable[[int, dict[str, torch.Tensor]], None] | None = None,
) -> None:
    """One optimisation step of each of several dictionaries, dictionary i on its batch inputs[i]
    (a transcoder set: layer i's (source, target)). In order:

        for each dictionary:
            output = sae(*inputs); output["loss"].backward(); on_output(i, output)
            under torchrun: average the gradients over the ranks (the global batch's gradient)
            sae.remove_parallel_decoder_grad()      # unit-norm decoder rows can only rotate
            once the dictionaries not yet updated hold `update_together_entries` parameter
            entries, or this is the last dictionary, update them together (`update`)

    Dictionaries share no parameter, so this is bit-identical to stepping them one after the
    other, each with clip_grad_norm_ and optimizer.step(); every dictionary keeps its own optimizer
    and optimizer state. An update together holds its dictionaries' gradients until then.

    `on_output(i, output)` receives dictionary i's output dict after its backward; it is not kept
    here, so one dictionary's batch tensors live at a time. Nothing here reads a value back to the
    host from an accelerator: the outputs' scalars stay on the device.
    """
    waiting: list[int] = []  # backward done, update not yet
    for i, (sae, sae_inputs) in enumerate(zip(saes, inputs)):
        output = sae(*sae_inputs)
        output["loss"].backward()
        if on_output is not None:
            on_output(i, output)
        del output
        distributed.average_gradients(sae.parameters())
        sae.remove_parallel_decoder_grad()
        waiting.append(i)
        entries = sum(p.numel() for j in waiting for p in saes[j].parameters())
        if i == len(saes) - 1 or entries >= update_together_entries(sae):
            update(
                [saes[j] for j in waiting],
                [optimizers[j] for j in waiting],
                [lrs[j] for j in waiting],
                [max_grad_norms[j] for j in waiting],
            )
            waiting = []


# How many parameter entries of dictionaries `training_steps` updates together, on an accelerator:
# one foreach Adam over many dictionaries launches its kernels once instead of once per dictionary,
# and its temporaries (and the gradients held) stay within this many entries.
UPDATE_TOGETHER_ENTRIES = 2**27

# The same on the CPU: 0, each dictionary right after its own backward. There the update is bound
# by memory traffic, not by launches or Python (foreach and fused kernels loop over the tensors
# there), and a dictionary's gradients are still in cache after its backward:
# updating a SmolLM2 set's 30 dictionaries together was no faster on a 2-core CPU and held every
# gradient (+0.56 GB peak at 4,608 latents; benchmarks/bench_transcoder_set.py).
CPU_UPDATE_TOGETHER_ENTRIES = 0


def update_together_entries(sae) -> int:
    """UPDATE_TOGETHER_ENTRIES, or CPU_UPDATE_TOGETHER_ENTRIES for a dictionary on the CPU."""
    on_cpu = next(sae.parameters()).device.type == "cpu"
    return CPU_UPDATE_TOGETHER_ENTRIES if on_cpu else UPDATE_TOGETHER_ENTRIES


def update(
    saes: Sequence,
    optimizers: Sequence[torch.optim.Optimizer],
    lrs: Sequence[float],
    max_grad_norms: Sequence[float],
) -> None:
    """The update of dictionaries whose gradients are ready, all together. In order:

        clip each dictionary's gradient to its max_grad_norm             (`clip_gradients`)
        every group's lr = lrs[i] x its "lr_scale"; one Adam update of all  (`adam_step`)
        zero_grad; sae.normalize_decoder()          # back onto the unit sphere

    For one dictionary this is clip_grad_norm_, optimizer.step(), zero_grad, bit for bit.
    """
    clip_gradients([_gradients(sae) for sae in saes], max_grad_norms)
    adam_step(optimizers, lrs)
    for sae, optimizer in zip(saes, optimizers):
        optimizer.zero_grad(set_to_none=True)
        sae.normalize_decoder()


def _gradients(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad for p in module.parameters() if p.grad is not None]


@torch.no_grad()
def clip_gradients(grads: Sequence[list[torch.Tensor]], max_norms: Sequence[float]) -> None:
    """Clip each dictionary's gradient g_i (a list of tensors) as clip_grad_norm_ does, in place:

        g_i <- g_i x min(1, max_norm_i / (|g_i| + 1e-6)),   |g_i| the 2-norm of all of g_i's entries

    The norms of every tensor of every dictionary come from one foreach call. Bit-identical to
    ``clip_grad_norm_(parameters_i, max_norm_i)`` per dictionary. On the CPU a factor of exactly 1
    (the gradient is within its bound) is read and skipped: multiplying by 1 changes no bit, and
    the read costs no synchronisation there; on an accelerator the multiply stays (no host sync).
    """
    every = [g for dictionary in grads for g in dictionary]
    norms = torch._foreach_norm(every, 2.0) if every else []
    start = 0
    for dictionary, max_norm in zip(grads, max_norms):
        if not dictionary:
            continue
        own = norms[start : start + len(dictionary)]
        start += len(dictionary)
        total = torch.linalg.vector_norm(torch.stack([n.to(own[0].device) for n in own]), 2.0)
        factor = torch.clamp(float(max_norm) / (total + 1e-6), max=1.0)
        if factor.device.type != "cpu" or factor != 1.0:
            torch._foreach_mul_(dictionary, factor)


# The settings of an Adam parameter group that decide its update (all but the parameters).
_ADAM_SETTINGS = (
    "lr",
    "betas",
    "eps",
    "weight_decay",
    "amsgrad",
    "maximize",
    "foreach",
    "capturable",
    "differentiable",
    "fused",
    "decoupled_weight_decay",
)


@torch.no_grad()
def adam_step(optimizers: Sequence[torch.optim.Optimizer], lrs: Sequence[float]) -> None:
    """``optimizer.step()`` of every optimizer at once, each group's lr set to lrs[i] x the group's
    "lr_scale" first (a state restored from a checkpoint saved without scales: 1).

    The groups of all optimizers with equal settings (lr, betas, eps, ...; a transcoder set's 30
    dictionaries: one such bucket, a second for JumpReLU's thresholds) are updated by one call of
    torch's functional Adam (``torch.optim.adam.adam``), the function Adam.step calls, with the same
    choice of implementation (fused where `make_optimizer` chose it; else foreach on CUDA, one
    tensor at a time on the CPU). Each optimizer keeps its own state, created on first use by
    Adam's own `_init_group` (step, exp_avg, exp_avg_sq per parameter), so its `state_dict`, the
    checkpoint's, is what optimizer.step() would have made. Per entry the arithmetic is Adam.step's
    own: the result is bit-identical.
    An optimizer that is not a torch.optim.Adam takes its own step().
    """
    buckets: dict[tuple, list[tuple[torch.optim.Adam, dict]]] = {}
    for optimizer, lr in zip(optimizers, lrs):
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        if type(optimizer) is not torch.optim.Adam:
            optimizer.step()
            continue
        for group in optimizer.param_groups:
            key = tuple(group.get(name) for name in _ADAM_SETTINGS)
            buckets.setdefault(key, []).append((optimizer, group))
    for groups in buckets.values():
        _functional_adam(groups)


def _functional_adam(groups: list[tuple[torch.optim.Adam, dict]]) -> None:
    """One call of torch's functional Adam over the parameters (with a gradient) of `groups`, whose
    settings are equal; the states are the optimizers' own (created as Adam.step creates them)."""
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = [], [], [], [], [], []
    has_complex = False
    for optimizer, group in groups:
        has_complex |= optimizer._init_group(
            group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps
        )
    if not params:
        return
    group = groups[0][1]
    beta1, beta2 = group["betas"]
    functional_adam(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        max_exp_avg_sqs,
        steps,
        amsgrad=group["amsgrad"],
        has_complex=has_complex,
        beta1=beta1,
        beta2=beta2,
        lr=group["lr"],
        weight_decay=group["weight_decay"],
        eps=group["eps"],
        maximize=group["maximize"],
        foreach=group["foreach"],
        capturable=group["capturable"],
        differentiable=group["differentiable"],
        fused=group["fused"],
        decoupled_weight_decay=group.get("decoupled_weight_decay", False),
    )
