"""First-letter absorption (absorption.py) on the parent/child toy: a parent feature p (the letter)
and a child feature c (one word) that always comes with it. A dictionary whose child latent absorbs
the parent (its decoder is p + c, and the parent latent is silent on the child) is counted; a clean
one (parent latent fires on the child too, child decoder is c alone) is not."""

import math

import pytest
import torch

from matryoshka_sae.absorption import absorption_scores, f1_score, latent_projections, split_latents
from matryoshka_sae.config import get_default_cfg, post_init_cfg
from matryoshka_sae.sae import create_sae

D = 8
PARENT, CHILD = torch.eye(D)[0], torch.eye(D)[1]


def toy_sae(absorbing: bool):
    """Latent 0: the parent latent; latent 1: the child latent; the others read and write nothing."""
    cfg = get_default_cfg()
    cfg.update(
        model_name="synthetic",
        act_size=D,
        dict_size=D,
        group_sizes=None,
        top_k=4,
        sae_type="vanilla",
        input_unit_norm=False,
        device="cpu",
        seed=0,
    )
    sae = create_sae(post_init_cfg(cfg))
    with torch.no_grad():
        for p in (sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec):
            p.zero_()
        if absorbing:
            sae.W_enc[:, 0] = PARENT - CHILD  # silent on the child's tokens
            sae.W_enc[:, 1] = math.sqrt(2) * CHILD
            sae.W_dec[1] = (PARENT + CHILD) / math.sqrt(2)  # the child latent writes the parent too
        else:
            sae.W_enc[:, 0], sae.W_enc[:, 1] = PARENT, CHILD
            sae.W_dec[1] = CHILD
        sae.W_dec[0] = PARENT
    sae.eval()
    return sae


def scores(sae, x):
    with torch.no_grad():
        contributions, cos = latent_projections(sae, x, PARENT)
        return absorption_scores(sae.encode(x), contributions, cos, x @ PARENT, main=[0])


@pytest.mark.parametrize("absorbing", [True, False])
def test_planted_absorbing_latent_is_counted_and_clean_one_is_not(absorbing):
    sae = toy_sae(absorbing)
    child_tokens = (PARENT + CHILD).expand(5, D) * torch.linspace(0.5, 2, 5)[:, None]
    parent_tokens = PARENT.expand(3, D) * torch.linspace(0.5, 2, 3)[:, None]
    for x in (child_tokens, parent_tokens):  # both dictionaries reconstruct every token exactly
        torch.testing.assert_close(sae.reconstruct(x), x)
    fraction, full = scores(sae, child_tokens)
    if absorbing:
        assert torch.equal(fraction, torch.ones(5)) and full.all()
    else:
        assert torch.equal(fraction, torch.zeros(5)) and not full.any()
    fraction, full = scores(sae, parent_tokens)  # the parent alone: its own latent, no absorption
    assert torch.equal(fraction, torch.zeros(3)) and not full.any()


def test_partial_absorption_fraction():
    """The parent latent carries part of the probe projection, an absorber the rest."""
    contributions = torch.tensor(
        [[0.25, 0.75, 0.0]]
    )  # main latent 0; latent 1 absorbs; latent 2 silent
    codes = torch.tensor([[0.25, 1.0, 0.0]])
    cos = torch.tensor([1.0, 0.75, 0.0])
    fraction, full = absorption_scores(codes, contributions, cos, torch.tensor([1.0]), main=[0])
    assert fraction.item() == pytest.approx(0.75)  # min(0.75, 1 - 0.25) / (0.75 + 0.25)
    assert not full.item()  # the main latent fired
    weak = torch.tensor([0.3, 0.05, 0.0])  # absorber's decoder too far from the probe (cos < 0.1)
    fraction, _ = absorption_scores(codes, contributions, weak, torch.tensor([1.0]), main=[0])
    assert fraction.item() == 0.0


def test_feature_splitting_rule_and_f1():
    feats = [[3], [3, 7], [3, 7, 1], [3, 7, 1, 9]]
    assert split_latents([0.5, 0.7, 0.72, 0.9], feats) == [3, 7]  # +0.02 at k=3 stops the walk
    assert split_latents([0.5, 0.52, 0.9, 0.95], feats) == [3]
    predicted = torch.tensor([True, True, False, False])
    actual = torch.tensor([True, False, True, False])
    assert f1_score(predicted, actual) == pytest.approx(0.5)
