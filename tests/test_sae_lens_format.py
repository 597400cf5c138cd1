"""The SAELens format both ways, checked against the real sae_lens (a test-only dependency,
requirements-dev.txt): every class exports to a folder `sae_lens.SAE.load_from_disk` loads and
that computes what ours computes in eval mode; SAELens-built SAEs import and compute what SAELens
computes; export -> import is bit-exact; bad folders and checkpoints are refused cleanly."""

import json
import math
import os

import pytest
import torch
from datasets import Dataset
from helpers import ONE_ACTIVATION_TYPES, PlantedStore, train_briefly
from sae_lens import SAE
from sae_lens.saes import (
    BatchTopKTrainingSAE,
    BatchTopKTrainingSAEConfig,
    JumpReLUSAEConfig,
    MatryoshkaBatchTopKTrainingSAE,
    MatryoshkaBatchTopKTrainingSAEConfig,
    StandardSAE,
    StandardSAEConfig,
    TopKSAEConfig,
    TrainingSAE,
)
from sae_lens.saes import (
    JumpReLUSAE as SAELensJumpReLU,
)
from sae_lens.saes import (
    TopKSAE as SAELensTopK,
)
from sae_lens.saes.sae import TrainStepInput
from safetensors.torch import load_file, save_file

from matryoshka_sae import sae_lens_format
from matryoshka_sae.activation_store import ActivationsStore
from matryoshka_sae.checkpoint import WEIGHTS_FILE, save_checkpoint
from matryoshka_sae.cli import export_sae
from matryoshka_sae.config import compute_fvu, get_default_cfg, post_init_cfg
from matryoshka_sae.evaluation import evaluate_ce_loss, reconstruction_report
from matryoshka_sae.sae import (
    BatchTopKSAE,
    GlobalBatchTopKMatryoshkaSAE,
    JumpReLUSAE,
    MatryoshkaTranscoder,
    create_sae,
)
from matryoshka_sae.sae_lens_format import NotRepresentable, export_sae_lens, load_sae_lens
from matryoshka_sae.training import train_sae

SAE_LENS_CLASS = {
    "vanilla": "StandardSAE",
    "topk": "TopKSAE",
    "jumprelu": "JumpReLUSAE",
    "batchtopk": "JumpReLUSAE",
    "matryoshka": "JumpReLUSAE",
    "matryoshka_transcoder": "JumpReLUTranscoder",
}


def held_out(sae, seed=7):
    """A batch the SAE never trained on: x, or (source, target) for a transcoder."""
    return PlantedStore(seed=seed, paired=isinstance(sae, MatryoshkaTranscoder)).next_batch()


def assert_same_code(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Same active latents, and the same values (relative 1e-5)."""
    assert torch.equal(ours > 0, theirs > 0)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-6)


def assert_close_rel(ours: torch.Tensor, theirs: torch.Tensor, rel=1e-5) -> None:
    assert ((theirs - ours).norm() / ours.norm()).item() < rel


def assert_same_sae(a, b) -> None:
    assert type(a) is type(b)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name]), name


# ---------------------------------------------------------------------------------------------
# Export: every class computes the same in SAELens
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("input_unit_norm", [True, False])
@pytest.mark.parametrize("sae_type", ONE_ACTIVATION_TYPES)
def test_export_computes_what_ours_computes_in_sae_lens(sae_type, input_unit_norm, tmp_path):
    sae, _ = train_briefly(sae_type, tmp_path, n_steps=20, input_unit_norm=input_unit_norm)
    sae.eval()
    sl = SAE.load_from_disk(export_sae_lens(sae, tmp_path / "exported"))
    assert type(sl).__name__ == SAE_LENS_CLASS[sae_type]
    assert sl.cfg.normalize_activations == ("layer_norm" if input_unit_norm else "none")
    batch = held_out(sae)
    x = batch[0] if isinstance(batch, tuple) else batch
    with torch.no_grad():
        z = sae.encode(x)
        assert (z > 0).any(dim=1).float().mean() > 0.9  # a real code to compare
        assert_same_code(z, sl.encode(x))
        reconstruction = sae.reconstruct(x)
        assert_close_rel(reconstruction, sl(x))
        assert_close_rel(
            reconstruction, sl.decode(sl.encode(x))
        )  # decode restores the encoded tokens' units
        if not input_unit_norm and not isinstance(sae, MatryoshkaTranscoder):
            assert_close_rel(sae.decode(z), sl.decode(z))
    if isinstance(sae, MatryoshkaTranscoder):  # the prediction of the target, judged by its FVU
        assert compute_fvu(batch[1], sl(x)).item() == pytest.approx(
            compute_fvu(batch[1], reconstruction).item(), rel=1e-5
        )


@pytest.mark.parametrize("sae_type", ONE_ACTIVATION_TYPES)
def test_export_then_import_is_bit_exact(sae_type, tmp_path):
    sae, cfg = train_briefly(sae_type, tmp_path, n_steps=20)
    back = load_sae_lens(export_sae_lens(sae, tmp_path / "exported"))
    assert_same_sae(sae, back)
    assert {k: v for k, v in back.cfg.items() if k != "derived"} == {
        k: v for k, v in cfg.items() if k != "derived"
    }
    sae.eval(), back.eval()
    batch = held_out(sae)
    with torch.no_grad():
        ours = sae(*batch) if isinstance(batch, tuple) else sae(batch)
        theirs = back(*batch) if isinstance(batch, tuple) else back(batch)
    for key in ("sae_out", "feature_acts", "fvu"):
        assert torch.equal(ours[key], theirs[key])


def test_metadata_and_matryoshka_group_ends(tmp_path):
    sae, cfg = train_briefly("matryoshka", tmp_path, n_steps=20)
    folder = export_sae_lens(sae, tmp_path / "exported", metadata={"dataset_path": "my/texts"})
    saved = json.loads((folder / "cfg.json").read_text())
    assert saved["architecture"] == "jumprelu" and saved["apply_b_dec_to_input"] is True
    metadata = SAE.load_from_disk(folder).cfg.metadata
    assert metadata.training_architecture == "matryoshka_batchtopk"
    assert metadata.training_architecture_details["matryoshka_widths"] == sae.group_ends.tolist()
    assert metadata.training_architecture_details["k"] == cfg["top_k"]
    assert metadata.hook_name == cfg["hook_point"] and metadata.context_size == cfg["seq_len"]
    assert metadata.model_name == cfg["model_name"] and metadata.dataset_path == "my/texts"
    assert metadata.hook_head_index is None and metadata.exclude_special_tokens is False
    threshold = load_file(folder / "sae_weights.safetensors")["threshold"]
    assert torch.equal(threshold, sae.threshold.expand(cfg["dict_size"]))


@pytest.mark.parametrize("input_unit_norm", [False, True])
def test_skip_transcoder_exports_as_sae_lens_skip_transcoder(tmp_path, input_unit_norm):
    sae, _ = train_briefly(
        "matryoshka_transcoder",
        tmp_path,
        n_steps=20,
        transcoder_skip=True,
        input_unit_norm=input_unit_norm,
    )
    assert sae.W_skip.abs().sum() > 0
    scale = sae.skip_scale.item()  # the skip path's raw-source scale folds into W_skip exactly
    assert scale == 2.0 ** round(math.log2(scale)) and (scale != 1.0) == input_unit_norm
    folder = export_sae_lens(sae, tmp_path / "exported")
    sl = SAE.load_from_disk(folder)
    assert type(sl).__name__ == "JumpReLUSkipTranscoder"
    source, _ = held_out(sae)
    sae.eval()
    with torch.no_grad():
        assert_same_code(sae.encode(source), sl.encode(source))
        assert_close_rel(sae.reconstruct(source), sl(source))
    assert_same_sae(sae, load_sae_lens(folder))


def test_transcoder_target_scale_is_a_power_of_two_folded_exactly(tmp_path):
    sae, _ = train_briefly("matryoshka_transcoder", tmp_path, n_steps=5)
    scale = sae.target_scale.item()
    assert scale != 1.0 and torch.log2(sae.target_scale).item().is_integer()
    weights = load_file(export_sae_lens(sae, tmp_path / "exported") / "sae_weights.safetensors")
    assert torch.equal(weights["W_dec"], sae.W_dec.detach() * scale)
    assert torch.equal(weights["W_dec"] / scale, sae.W_dec.detach())


def test_transcoder_with_an_older_scale_exports_with_a_warning(tmp_path):
    sae, _ = train_briefly("matryoshka_transcoder", tmp_path, n_steps=5)
    sae.target_scale.fill_(3.0)  # saved before scales were powers of two
    with pytest.warns(UserWarning, match="target_scale=3.0 is not a power of two"):
        sl = SAE.load_from_disk(export_sae_lens(sae, tmp_path / "exported"))
    source, _ = held_out(sae)
    sae.eval()
    with torch.no_grad():
        assert_close_rel(sae.reconstruct(source), sl(source))


def test_normalisation_is_sae_lens_layer_norm_exactly():
    cfg = post_init_cfg(
        {
            **get_default_cfg(),
            "model_name": "x",
            "act_size": 48,
            "dict_size": 96,
            "device": "cpu",
            "input_unit_norm": True,
            "sae_type": "topk",
            "top_k": 4,
        }
    )
    ours = create_sae(cfg)
    theirs = StandardSAE(StandardSAEConfig(d_in=48, d_sae=96, normalize_activations="layer_norm"))
    x = torch.randn(256, 48, generator=torch.Generator().manual_seed(0)) * 30 + 5
    x_n, stats = ours.normalize_source(x)
    assert torch.equal(x_n, theirs.run_time_activation_norm_fn_in(x))
    y_n = torch.randn(256, 48)
    assert torch.equal(ours.restore_target(y_n, stats), theirs.run_time_activation_norm_fn_out(y_n))


def test_bos_excluded_metadata_and_equal_outputs_on_model_activations(
    tiny_gpt2, token_rows, tmp_path
):
    """Trained through the real store on a tiny model with BOS positions left out."""
    cfg = get_default_cfg()
    cfg.update(
        model_name="tiny-gpt2",
        act_size=64,
        dict_size=256,
        layer=1,
        site="resid_pre",
        top_k=8,
        dataset_path=Dataset.from_dict({"tokens": token_rows.tolist()}),
        seq_len=32,
        batch_size=128,
        num_batches_in_buffer=4,
        model_batch_size=8,
        device="cpu",
        n_eval_rows=8,
        bos_token_id=1,
        exclude_bos=True,
        num_tokens=128 * 10,
        checkpoint_dir=str(tmp_path),
        sae_type="matryoshka",
        wandb_mode="disabled",
        perf_log_freq=10**6,
        checkpoint_freq=10**6,
    )
    cfg = post_init_cfg(cfg)
    store = ActivationsStore(tiny_gpt2, cfg)
    sae = train_sae(create_sae(cfg), store, tiny_gpt2, cfg)
    folder = export_sae_lens(tmp_path / cfg["name"], tmp_path / "exported")  # from the checkpoint
    sl = SAE.load_from_disk(folder)
    metadata = sl.cfg.metadata
    assert metadata.exclude_special_tokens == [1] and metadata.prepend_bos is True
    assert metadata.hook_name == "blocks.1.hook_resid_pre" and metadata.context_size == 32
    tokens = store.get_eval_tokens()
    x = store.activations_of(tokens)[0]
    assert len(x) == tokens.numel() - len(tokens)  # one BOS a row, left out
    sae.eval()
    with torch.no_grad():
        assert_same_code(sae.encode(x), sl.encode(x))
        ours_fvu = reconstruction_report(sae, x)["fvu"]
        assert compute_fvu(x, sl(x)).item() == pytest.approx(ours_fvu, rel=1e-5)
    for sidecar in ("native_config.json", "native_extras.safetensors"):  # as if trained elsewhere
        (folder / sidecar).unlink()
    imported = load_sae_lens(folder)
    assert (
        isinstance(imported, GlobalBatchTopKMatryoshkaSAE)
        and imported.cfg["group_sizes"] == cfg["group_sizes"]
    )
    assert imported.cfg["exclude_bos"] and imported.cfg["bos_token_id"] == 1
    assert imported.cfg["hook_point"] == cfg["hook_point"] and imported.cfg["seq_len"] == 32
    assert evaluate_ce_loss(imported, tiny_gpt2, tokens, imported.cfg) == evaluate_ce_loss(
        sae, tiny_gpt2, tokens, cfg
    )


def test_cli_exports_a_checkpoint(tmp_path, capsys):
    sae, cfg = train_briefly("batchtopk", tmp_path, n_steps=10)
    checkpoint = save_checkpoint(tmp_path / "ckpt", sae, cfg, step=10)
    export_sae.main([str(checkpoint), str(tmp_path / "out")])
    assert "SAE.load_from_disk" in capsys.readouterr().out
    assert type(SAE.load_from_disk(tmp_path / "out")).__name__ == "JumpReLUSAE"
    with pytest.raises(SystemExit) as refused:
        export_sae.main([str(checkpoint), str(tmp_path / "out")])
    assert refused.value.code == 2 and "already exists" in capsys.readouterr().err
    export_sae.main([str(checkpoint), str(tmp_path / "out"), "--overwrite"])


# ---------------------------------------------------------------------------------------------
# Import: SAELens-built SAEs compute here what they compute there
# ---------------------------------------------------------------------------------------------


D_IN, D_SAE = 32, 128


def sae_lens_train(sl: TrainingSAE, steps=30) -> TrainingSAE:
    """A few of SAELens's own training steps on planted activations (learns BatchTopK's threshold)."""
    optimizer = torch.optim.Adam(sl.parameters(), lr=3e-3)
    store = PlantedStore(seed=2)
    for step in range(steps):
        x = store.next_batch()
        output = sl.training_forward_pass(
            TrainStepInput(
                sae_in=x,
                coefficients={},
                dead_neuron_mask=None,
                n_training_steps=step,
                is_logging_step=False,
            )
        )
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
    return sl


def compare_with_sae_lens(ours, folder) -> None:
    sl = SAE.load_from_disk(folder)
    x = PlantedStore(seed=9).next_batch()
    ours.eval()
    with torch.no_grad():
        z = ours.encode(x)
        assert (z > 0).sum() > 0
        assert_same_code(z, sl.encode(x))
        assert_close_rel(ours.reconstruct(x), sl(x))
        report = reconstruction_report(ours, x)  # our evaluation runs on it
        assert report["fvu"] == pytest.approx(compute_fvu(x, sl(x)).item(), rel=1e-5)


@pytest.mark.parametrize("normalize", ["none", "layer_norm"])
def test_sae_lens_batchtopk_imports_as_our_batchtopk(normalize, tmp_path):
    torch.manual_seed(0)
    sl = sae_lens_train(
        BatchTopKTrainingSAE(
            BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4, normalize_activations=normalize)
        )
    )
    sl.save_inference_model(
        tmp_path / "inference"
    )  # SAELens's own form: JumpReLU, folded decoder norms
    ours = load_sae_lens(tmp_path / "inference")
    assert isinstance(ours, BatchTopKSAE) and not isinstance(ours, GlobalBatchTopKMatryoshkaSAE)
    assert ours.cfg["top_k"] == 4 and ours.cfg["input_unit_norm"] == (normalize == "layer_norm")
    assert ours.threshold.item() == pytest.approx(sl.topk_threshold.item(), rel=1e-6)
    compare_with_sae_lens(ours, tmp_path / "inference")


def test_sae_lens_matryoshka_imports_with_its_groups(tmp_path):
    torch.manual_seed(0)
    sl = sae_lens_train(
        MatryoshkaBatchTopKTrainingSAE(
            MatryoshkaBatchTopKTrainingSAEConfig(
                d_in=D_IN, d_sae=D_SAE, k=4, matryoshka_widths=[16, 48, D_SAE]
            )
        )
    )
    sl.save_inference_model(tmp_path / "inference")
    ours = load_sae_lens(tmp_path / "inference")
    assert isinstance(ours, GlobalBatchTopKMatryoshkaSAE) and ours.group_ends.tolist() == [
        16,
        48,
        D_SAE,
    ]
    compare_with_sae_lens(ours, tmp_path / "inference")
    x = PlantedStore(seed=9).next_batch()
    assert len(reconstruction_report(ours, x)["fvu_per_prefix"]) == 3


def test_sae_lens_training_form_batchtopk_imports(tmp_path):
    """save_model (the training form: architecture 'batchtopk', a float64 topk_threshold)."""
    torch.manual_seed(0)
    sl = sae_lens_train(
        BatchTopKTrainingSAE(
            BatchTopKTrainingSAEConfig(
                d_in=D_IN, d_sae=D_SAE, k=4, rescale_acts_by_decoder_norm=False
            )
        )
    )
    sl.save_model(tmp_path / "training")
    sl.save_inference_model(tmp_path / "inference")
    ours = load_sae_lens(tmp_path / "training")
    assert isinstance(ours, BatchTopKSAE)
    compare_with_sae_lens(ours, tmp_path / "inference")  # what SAELens itself runs at inference


def test_sae_lens_training_form_with_decoder_norm_rescaling_is_refused(tmp_path):
    sl = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4))
    sl.save_model(tmp_path / "training")
    with pytest.raises(NotRepresentable, match="rescale_acts_by_decoder_norm"):
        load_sae_lens(tmp_path / "training")


@pytest.mark.parametrize("architecture", ["standard", "topk"])
def test_sae_lens_standard_and_topk_import(architecture, tmp_path):
    torch.manual_seed(0)
    config = (
        StandardSAEConfig(d_in=D_IN, d_sae=D_SAE)
        if architecture == "standard"
        else TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=6)
    )
    sl = (StandardSAE if architecture == "standard" else SAELensTopK)(config)
    with torch.no_grad():
        sl.b_enc.normal_(0, 0.1), sl.b_dec.normal_()
    sl.save_model(tmp_path / "saved")
    ours = load_sae_lens(tmp_path / "saved")
    assert ours.cfg["sae_type"] == ("vanilla" if architecture == "standard" else "topk")
    compare_with_sae_lens(ours, tmp_path / "saved")


def sae_lens_jumprelu(threshold: torch.Tensor, folder):
    torch.manual_seed(0)
    sl = SAELensJumpReLU(JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE))
    with torch.no_grad():
        sl.threshold.copy_(threshold)
        sl.b_enc.normal_(0, 0.1)
    sl.save_model(folder)


def test_sae_lens_jumprelu_imports_exactly_when_thresholds_are_representable(tmp_path):
    threshold = (torch.rand(D_SAE, generator=torch.Generator().manual_seed(0)) * 0.5).log().exp()
    sae_lens_jumprelu(threshold, tmp_path / "saved")
    ours = load_sae_lens(tmp_path / "saved")
    assert isinstance(ours, JumpReLUSAE) and torch.equal(
        ours.log_threshold.detach().exp(), threshold
    )
    compare_with_sae_lens(ours, tmp_path / "saved")


def test_sae_lens_jumprelu_thresholds_without_exact_log_need_consent(tmp_path):
    threshold = torch.rand(D_SAE, generator=torch.Generator().manual_seed(1)) * 0.05
    sae_lens_jumprelu(threshold, tmp_path / "saved")
    with pytest.raises(NotRepresentable, match="round_thresholds=True"):
        load_sae_lens(tmp_path / "saved")
    with pytest.warns(UserWarning, match="thresholds are not exp"):
        ours = load_sae_lens(tmp_path / "saved", round_thresholds=True)
    compare_with_sae_lens(ours, tmp_path / "saved")


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error, nothing written
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def exported(tmp_path):
    sae, _ = train_briefly("topk", tmp_path, n_steps=5)
    return export_sae_lens(sae, tmp_path / "exported")


def test_folder_without_cfg_json(exported):
    (exported / "cfg.json").unlink()
    with pytest.raises(FileNotFoundError, match="no cfg.json"):
        load_sae_lens(exported)


def test_unknown_architecture(exported):
    cfg = json.loads((exported / "cfg.json").read_text())
    (exported / "cfg.json").write_text(json.dumps({**cfg, "architecture": "gated"}))
    with pytest.raises(NotRepresentable, match="architecture 'gated'"):
        load_sae_lens(exported)


def test_mismatched_shapes(exported):
    weights = load_file(exported / "sae_weights.safetensors")
    weights["W_enc"] = weights["W_enc"][:, :-1].contiguous()
    save_file(weights, str(exported / "sae_weights.safetensors"))
    with pytest.raises(NotRepresentable, match=r"W_enc has shape \(32, 127\).*\(32, 128\)"):
        load_sae_lens(exported)


def test_unsupported_normalisation(exported):
    cfg = json.loads((exported / "cfg.json").read_text())
    (exported / "cfg.json").write_text(
        json.dumps({**cfg, "normalize_activations": "constant_norm_rescale"})
    )
    with pytest.raises(NotRepresentable, match="normalize_activations='constant_norm_rescale'"):
        load_sae_lens(exported)


def assert_refused_without_output(checkpoint, out_dir, error, match):
    with pytest.raises(error, match=match):
        export_sae_lens(checkpoint, out_dir)
    assert not out_dir.exists()
    assert not [p for p in out_dir.parent.iterdir() if p.name.startswith(f".{out_dir.name}")]


@pytest.fixture
def checkpoint(tmp_path):
    sae, cfg = train_briefly("batchtopk", tmp_path, n_steps=5)
    return save_checkpoint(tmp_path / "ckpt", sae, cfg, step=5)


def test_checkpoint_mid_write_is_refused(checkpoint, tmp_path):
    (checkpoint / f".{WEIGHTS_FILE}.tmp-12345").write_bytes(b"partial")
    assert_refused_without_output(checkpoint, tmp_path / "out", ValueError, "is being saved")


def test_checkpoint_without_weights_yet(checkpoint, tmp_path):
    (checkpoint / WEIGHTS_FILE).unlink()
    assert_refused_without_output(
        checkpoint, tmp_path / "out", FileNotFoundError, "first save has not finished"
    )


def test_checkpoint_with_truncated_weights(checkpoint, tmp_path):
    data = (checkpoint / WEIGHTS_FILE).read_bytes()
    (checkpoint / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    assert_refused_without_output(
        checkpoint, tmp_path / "out", ValueError, "not a complete safetensors"
    )


def test_not_a_checkpoint(tmp_path):
    assert_refused_without_output(
        tmp_path / "nothing", tmp_path / "out", FileNotFoundError, "no config.json"
    )


def test_unlearned_threshold_is_refused(tmp_path):
    cfg = train_briefly("batchtopk", tmp_path, n_steps=1)[1]
    assert_refused_without_output(create_sae(cfg), tmp_path / "out", NotRepresentable, "threshold")


def test_failure_while_writing_leaves_nothing_and_keeps_the_old_folder(
    exported, monkeypatch, tmp_path
):
    sae, _ = train_briefly("vanilla", tmp_path / "other", n_steps=5)

    def failing_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(sae_lens_format, "save_file", failing_save)
    before = sorted(os.listdir(exported))
    with pytest.raises(OSError, match="disk full"):
        export_sae_lens(sae, exported, overwrite=True)
    assert sorted(os.listdir(exported)) == before
    assert json.loads((exported / "cfg.json").read_text())["architecture"] == "topk"
    assert not [p for p in exported.parent.iterdir() if p.name.startswith(".exported")]


@pytest.mark.parametrize("normalize", ["none", "layer_norm"])
def test_sae_lens_skip_transcoder_imports_and_computes_the_same(normalize, tmp_path):
    """A JumpReLUSkipTranscoder built in SAELens (one threshold, as our transcoders have)."""
    from sae_lens import JumpReLUSkipTranscoder, JumpReLUSkipTranscoderConfig

    torch.manual_seed(0)
    sl = JumpReLUSkipTranscoder(
        JumpReLUSkipTranscoderConfig(
            d_in=D_IN,
            d_sae=D_SAE,
            d_out=D_IN + 8,
            normalize_activations=normalize,
            apply_b_dec_to_input=False,
        )
    )
    with torch.no_grad():
        sl.b_enc.normal_(0, 0.1), sl.b_dec.normal_(), sl.W_skip.normal_(0, 0.2)
        sl.threshold.fill_(0.25)
    sl.save_model(tmp_path / "sl")
    sl_cfg = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    sl_cfg["metadata"].update(
        hook_name="blocks.3.hook_resid_mid", hook_name_out="blocks.3.hook_mlp_out"
    )
    (tmp_path / "sl" / "cfg.json").write_text(json.dumps(sl_cfg))
    ours = load_sae_lens(tmp_path / "sl").eval()
    assert isinstance(ours, MatryoshkaTranscoder) and ours.W_skip.shape == (D_IN, D_IN + 8)
    assert ours.skip_scale.item() == 1.0 and not ours.skip_shift.any()
    x = PlantedStore(seed=3).next_batch() * 3 + 1
    with torch.no_grad():
        assert_same_code(ours.encode(x), sl.encode(x))
        assert_close_rel(ours.reconstruct(x), sl(x))
