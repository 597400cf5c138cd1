"""k-sparse probing through the real sae-probes: a dictionary with a latent planted to equal a
dataset's label reaches accuracy 1.0 at k = 1; random latents stay near chance. The model's
activations are written where sae-probes reads them (what `prepare_activations` does with a model);
the dictionary goes through our SAELens export and sae_lens.SAE.load_from_disk."""

import pytest
import torch

from matryoshka_sae.config import get_default_cfg, post_init_cfg
from matryoshka_sae.sae import create_sae

sae_probes = pytest.importorskip("sae_probes")  # requirements-eval.txt

from matryoshka_sae import sparse_probing  # noqa: E402

DATASET = "154_athlete_sport_football"  # 1,772 prompts: 1,024 train, 747 test
HOOK = "blocks.0.hook_resid_post"
MODEL = "planted-model"
D = 16


def write_model_activations(cache_dir, planted: bool):
    """sae-probes' activation file for DATASET: random activations whose first dimension is the
    label (planted) or noise."""
    from sae_probes.utils_data import get_yvals

    labels = torch.tensor(get_yvals(DATASET)).float()
    x = torch.randn(len(labels), D, generator=torch.Generator().manual_seed(0))
    if planted:
        x[:, 0] = labels
    folder = cache_dir / f"model_activations_{MODEL}"
    folder.mkdir(parents=True)
    torch.save(x, folder / f"{DATASET}_{HOOK}.pt")


def reading_sae():
    """A ReLU dictionary whose latent i reads input dimension i (i < D) and whose other latents read
    random directions: latent 0 equals the first dimension where it is positive."""
    cfg = get_default_cfg()
    cfg.update(
        model_name="synthetic",
        act_size=D,
        dict_size=4 * D,
        group_sizes=None,
        sae_type="vanilla",
        input_unit_norm=False,
        device="cpu",
        seed=0,
        layer=0,
        site="resid_post",
    )
    sae = create_sae(post_init_cfg(cfg))
    with torch.no_grad():
        sae.W_enc[:, :D] = torch.eye(D)
        sae.W_dec[:D] = torch.eye(D)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


@pytest.mark.parametrize("planted", [True, False])
def test_k1_probe_finds_the_planted_latent_and_random_latents_stay_at_chance(tmp_path, planted):
    write_model_activations(tmp_path, planted)
    result = sparse_probing.probe_dictionary(
        reading_sae(), MODEL, HOOK, [DATASET], tmp_path, ks=(1,)
    )
    accuracy = result["datasets"][DATASET]["1"]["test_acc"]
    assert result["mean_test_acc"]["1"] == accuracy
    if planted:
        assert accuracy == 1.0
        baseline = sparse_probing.probe_baseline(
            MODEL, HOOK, [DATASET], tmp_path
        )  # probes on the activations
        assert baseline["mean_test_acc"] > 0.99
    else:
        assert abs(accuracy - 0.5) < 0.08


def test_unknown_dataset_is_a_one_line_error():
    with pytest.raises(ValueError, match="no dataset 9_nope"):
        sparse_probing.check_datasets(["9_nope", DATASET])
    assert sparse_probing.check_datasets(list(sparse_probing.DEFAULT_DATASETS)) == list(
        sparse_probing.DEFAULT_DATASETS
    )
