"""One training step of each peer library, built from the peer's own training code.

Each builder takes a `Spec` and returns ``step(x) -> loss`` where x is a [batch, d_in] float32
batch; a call runs everything the peer's trainer does once per batch (forward, loss, backward,
its decoder-gradient projection and gradient clipping if it has them, Adam step, its
decoder-norm handling, zero_grad, its LR scheduler and dead-latent bookkeeping).

Settings shared by every implementation (taken from our cfg defaults by bench_step.py): k, lr,
Adam (betas where the peer lets us set them), no LR warm-up, the AuxK coefficient where the peer
has one to set (SAELens, sparsify; dictionary_learning's default is the same 1/32), a latent is
dead after `dead_after_batches` batches without firing, and Matryoshka groups of 1:2:4:9
sixteenths of the dictionary. Everything else is the peer's default.

Peers (installed in .bench-venv by setup_bench_env.sh):

* SAELens: `SAETrainer.step` (+ the step counter `fit` advances) on `BatchTopKTrainingSAE` or
  `MatryoshkaBatchTopKTrainingSAE`. Its TopK family keeps the decoder unnormalised and rescales
  pre-activations by the decoder row norms instead (`rescale_acts_by_decoder_norm`, default on),
  so there is no projection or renormalisation step; it clips gradients to norm 1.
* dictionary_learning: `BatchTopKTrainer.update` / `MatryoshkaBatchTopKTrainer.update`
  (projection, clipping to 1, Adam, scheduler, renormalisation). The first call, a warm-up,
  sets b_dec to the geometric median; timed calls pass steps past `threshold_start_step`, so the
  inference-threshold update is included as in the bulk of a real run.
* sparsify: `SparseCoder` and the body of `Trainer.fit` for one batch with `optimizer="adam"`
  (renormalise, forward with dead mask and total variance, fvu + auxk_alpha x AuxK, backward,
  projection, Adam, zero_grad, linear schedule, dead counters). sparsify's default auxk_alpha is 0,
  which switches AuxK off; it is set to the shared AuxK coefficient so that all do AuxK.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from itertools import accumulate
from typing import Callable

import torch

StepFn = Callable[[torch.Tensor], float]
NEVER = 10**12  # a run length no benchmark reaches: schedules stay at their start


@dataclass
class Spec:
    """Shapes and training settings of one benchmark case."""

    d_in: int
    dict_size: int
    k: int
    batch_size: int
    lr: float
    betas: tuple[float, float]
    aux_coeff: float
    dead_after_batches: int
    group_sizes: list[int]

    @property
    def group_fractions(self) -> list[float]:
        return [g / self.dict_size for g in self.group_sizes]


def versions() -> dict[str, str]:
    """Installed versions of the peers and of torch."""
    names = ("torch", "sae-lens", "dictionary-learning", "eai-sparsify")
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


# ---------------------------------------------------------------------------------------------
# SAELens
# ---------------------------------------------------------------------------------------------


def saelens_step(spec: Spec, matryoshka: bool) -> StepFn:
    from sae_lens import SAETrainer
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.matryoshka_batchtopk_sae import (
        MatryoshkaBatchTopKTrainingSAE,
        MatryoshkaBatchTopKTrainingSAEConfig,
    )

    common = dict(
        d_in=spec.d_in,
        d_sae=spec.dict_size,
        k=spec.k,
        dtype="float32",
        device="cpu",
        aux_loss_coefficient=spec.aux_coeff,
    )
    if matryoshka:
        widths = list(accumulate(spec.group_sizes))
        sae = MatryoshkaBatchTopKTrainingSAE(
            MatryoshkaBatchTopKTrainingSAEConfig(matryoshka_widths=widths, **common)
        )
    else:
        sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(**common))
    trainer_cfg = SAETrainerConfig(
        total_training_samples=NEVER,
        train_batch_size_samples=spec.batch_size,
        lr=spec.lr,
        lr_end=spec.lr,
        adam_beta1=spec.betas[0],
        adam_beta2=spec.betas[1],
        device="cpu",
        dead_feature_window=spec.dead_after_batches,
    )
    trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=iter(()))

    def step(x: torch.Tensor) -> float:
        trainer.maybe_reset_sparsity()
        out = trainer.step(x)
        trainer.n_training_steps += 1
        return out.loss.item()

    return step


# ---------------------------------------------------------------------------------------------
# dictionary_learning
# ---------------------------------------------------------------------------------------------


def dictlearn_step(spec: Spec, matryoshka: bool) -> StepFn:
    from dictionary_learning.trainers.batch_top_k import BatchTopKTrainer
    from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKTrainer

    common = dict(
        steps=NEVER,
        activation_dim=spec.d_in,
        dict_size=spec.dict_size,
        k=spec.k,
        layer=0,
        lm_name="synthetic",
        lr=spec.lr,
        warmup_steps=0,
        seed=0,
        device="cpu",
    )
    if matryoshka:
        trainer = MatryoshkaBatchTopKTrainer(group_fractions=spec.group_fractions, **common)
        assert trainer.group_sizes == spec.group_sizes, (trainer.group_sizes, spec.group_sizes)
    else:
        trainer = BatchTopKTrainer(**common)
    trainer.dead_feature_threshold = spec.dead_after_batches * spec.batch_size
    calls = 0

    def step(x: torch.Tensor) -> float:
        nonlocal calls
        index = 0 if calls == 0 else trainer.threshold_start_step + calls
        calls += 1
        return trainer.update(index, x)

    return step


# ---------------------------------------------------------------------------------------------
# sparsify
# ---------------------------------------------------------------------------------------------


def sparsify_step(spec: Spec) -> StepFn:
    from sparsify import SparseCoder, SparseCoderConfig
    from transformers import get_linear_schedule_with_warmup

    torch.manual_seed(0)
    sae = SparseCoder(
        spec.d_in,
        SparseCoderConfig(num_latents=spec.dict_size, k=spec.k),
        device="cpu",
        dtype=torch.float32,
    )
    # sparsify's "adam" optimizer is torch.optim.Adam with default betas when bitsandbytes is absent.
    optimizer = torch.optim.Adam([dict(params=sae.parameters(), lr=spec.lr)])
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, NEVER)
    tokens_since_fired = torch.zeros(spec.dict_size, dtype=torch.long)
    dead_threshold = spec.dead_after_batches * spec.batch_size
    first = True

    def step(x: torch.Tensor) -> float:
        nonlocal first
        if first:
            sae.b_dec.data = x.mean(0)
            first = False
        sae.set_decoder_norm_to_unit_norm()
        dead_mask = tokens_since_fired > dead_threshold
        total_variance = (x - x.mean(0)).pow(2).sum()
        out = sae(x=x, y=x, dead_mask=dead_mask, total_variance=total_variance)
        did_fire = torch.zeros(spec.dict_size, dtype=torch.bool)
        did_fire[out.latent_indices.flatten()] = True
        loss = out.fvu + spec.aux_coeff * out.auxk_loss + out.multi_topk_fvu / 8
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        with torch.no_grad():
            tokens_since_fired.add_(x.shape[0])
            tokens_since_fired[did_fire] = 0
        return loss.item()

    return step


PEERS: dict[str, Callable[[Spec], StepFn]] = {
    "saelens_batchtopk": lambda spec: saelens_step(spec, matryoshka=False),
    "saelens_matryoshka": lambda spec: saelens_step(spec, matryoshka=True),
    "dictlearn_batchtopk": lambda spec: dictlearn_step(spec, matryoshka=False),
    "dictlearn_matryoshka": lambda spec: dictlearn_step(spec, matryoshka=True),
    "sparsify_topk": sparsify_step,
}
