"""Transcoders: the encoder's initialisation, dead latents on a planted transcoder task,
and the skip connection (its gradient and Matryoshka prefixes against a dense reference, the CLI
option, save/load and resume)."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import RESUME_SETTINGS, CrashingStore, PlantedStore, planted_cfg, synthetic_cfg

from matryoshka_sae.checkpoint import checkpoint_folder, load_metrics, load_sae, save_checkpoint
from matryoshka_sae.cli import train_gemma_example
from matryoshka_sae.config import get_default_cfg, post_init_cfg
from matryoshka_sae.sae import MatryoshkaTranscoder, create_sae
from matryoshka_sae.training import train_transcoder

D, S, K, B = 32, 256, 8, 128  # helpers.synthetic_cfg: act_size, dict_size, top_k, batch_size


def transcoder_cfg(**overrides):
    return synthetic_cfg("matryoshka_transcoder", **overrides)


def pair(seed=0, n=B):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=generator) * 2 + torch.linspace(-3, 3, D)
    mix = torch.randn(D, D, generator=generator) / D**0.5
    return x, torch.relu(x @ mix) * 3 + 1


# ---------------------------------------------------------------------------------------------
# Initialisation
# ---------------------------------------------------------------------------------------------


def test_transcoder_encoder_is_not_the_decoders_transpose():
    transcoder = MatryoshkaTranscoder(
        transcoder_cfg()
    )  # d_in == d_out: the SAE rule would tie them
    W_enc, W_dec = transcoder.W_enc.detach(), transcoder.W_dec.detach()
    torch.testing.assert_close(W_enc.norm(dim=0), torch.ones(S))
    cosines = (W_enc * W_dec.t()).sum(dim=0)  # latent i: encoder column . decoder row
    assert cosines.abs().max() < 0.8 and cosines.abs().mean() < 3 / D**0.5  # independent draws
    sae_cfg = post_init_cfg({**transcoder_cfg(), "sae_type": "matryoshka"})
    sae = create_sae(sae_cfg)
    assert torch.equal(sae.W_enc, sae.W_dec.t())  # an SAE keeps the tied start


class PlantedPairs:
    """A planted transcoder task: sparse codes (K_TRUE of N_TRUE features per token, values in
    [0.5, 1.5]) read through two different dictionaries, source = z D_s + m, target = z D_t + m / 4,
    where m is large on two coordinates, like the massive activations of a language model's
    residual stream. Batch i depends only on (seed, i)."""

    N_TRUE, D_PLANTED, K_TRUE = 128, 64, 4

    def __init__(self, seed=0, start=0, batch_size=128):
        generator = torch.Generator().manual_seed(1234)
        self.source_dict = F.normalize(
            torch.randn(self.N_TRUE, self.D_PLANTED, generator=generator), dim=1
        )
        self.target_dict = F.normalize(
            torch.randn(self.N_TRUE, self.D_PLANTED, generator=generator), dim=1
        )
        self.massive = torch.zeros(self.D_PLANTED)
        self.massive[:2] = 10.0
        self.seed, self.index, self.batch_size = seed, start, batch_size

    def next_batch(self):
        generator = torch.Generator().manual_seed(1000 * self.seed + self.index)
        self.index += 1
        chosen = (
            torch.rand(self.batch_size, self.N_TRUE, generator=generator)
            .topk(self.K_TRUE, dim=1)
            .indices
        )
        values = torch.rand(self.batch_size, self.K_TRUE, generator=generator) + 0.5
        codes = torch.zeros(self.batch_size, self.N_TRUE).scatter_(1, chosen, values)
        return codes @ self.source_dict + self.massive, codes @ self.target_dict + self.massive / 4


def planted_dead_fraction(tmp_path, old_initialisation: bool) -> float:
    """Train on PlantedPairs for 300 steps (the real loop); the fraction of latents that never fire
    on 4096 unseen tokens."""
    cfg = planted_cfg(
        "matryoshka_transcoder",
        tmp_path,
        n_steps=300,
        act_size=PlantedPairs.D_PLANTED,
        dict_size=PlantedPairs.N_TRUE,
        top_k=PlantedPairs.K_TRUE,
    )
    transcoder = MatryoshkaTranscoder(cfg)
    if (
        old_initialisation
    ):  # the plain SAE-style one: tied encoder, uncentred source, random decoder
        with torch.no_grad():
            transcoder.W_enc.copy_(transcoder.W_dec.t())
        transcoder.initialize_from_batch = lambda source, target: transcoder.initialize_b_dec(
            target
        )
    train_transcoder(transcoder, PlantedPairs(), None, transcoder.cfg)
    source, _ = PlantedPairs(start=10**6, batch_size=4096).next_batch()
    transcoder.eval()
    fired = (transcoder.encode(source) > 0).any(dim=0)
    return 1 - fired.float().mean().item()


def test_planted_transcoder_keeps_its_latents_alive_where_the_old_initialisation_did_not(tmp_path):
    # As many latents as planted features: a transcoder that finds them all has none dead.
    assert planted_dead_fraction(tmp_path / "new", old_initialisation=False) < 0.35
    assert planted_dead_fraction(tmp_path / "old", old_initialisation=True) > 0.5


def test_initialize_from_batch_centres_the_source_and_aims_the_decoder():
    transcoder = MatryoshkaTranscoder(transcoder_cfg(act_size=PlantedPairs.D_PLANTED, dict_size=S))
    source, target = PlantedPairs(batch_size=512).next_batch()
    transcoder.initialize_from_batch(source, target)
    x_c = transcoder.center(transcoder.normalize_source(source)[0])
    torch.testing.assert_close(
        x_c.mean(dim=0), torch.zeros(PlantedPairs.D_PLANTED), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(transcoder.W_dec.norm(dim=1), torch.ones(S))
    # Each latent that fires writes, on average, towards the targets of the tokens it fires on.
    acts = transcoder.encode(source)
    y_n = target / transcoder.target_scale - transcoder.b_dec
    fired = acts.sum(dim=0) > 0
    alignment = ((acts.t() @ y_n) * transcoder.W_dec).sum(dim=1)
    assert fired.sum() > S // 2 and (alignment[fired] > 0).all()
    # Files without the source mean (older checkpoints, SAELens imports) load with a zero mean.
    state = {k: v for k, v in transcoder.state_dict().items() if k != "source_mean"}
    reloaded = MatryoshkaTranscoder(transcoder.cfg)
    reloaded.load_state_dict(state)
    assert torch.equal(reloaded.source_mean, torch.zeros(PlantedPairs.D_PLANTED))


def test_the_encoder_bias_brings_the_first_predictions_to_the_targets_size():
    """Aimed decoder rows at k = 16 of 256 overshoot the target (FVU > 2 on `pair`, whose targets
    share a direction); the one shift of every pre-activation that minimises the training loss
    (mean over prefixes) keeps the selection, keeps every kept latent non-negative and brings the
    FVU under 1."""
    source, target = pair(0, 512)
    cfg = transcoder_cfg(top_k=16)
    torch.manual_seed(0)
    shifted = MatryoshkaTranscoder(cfg)
    torch.manual_seed(0)
    unshifted = MatryoshkaTranscoder(cfg)
    unshifted.initialize_encoder_bias_from_batch = lambda source, target: None
    for transcoder in (shifted, unshifted):
        transcoder.initialize_from_batch(source, target)
    shift = -shifted.b_enc[0].item()
    assert shift > 0 and torch.equal(shifted.b_enc, torch.full((S,), -shift))
    assert torch.equal(shifted.W_dec, unshifted.W_dec) and not unshifted.b_enc.any()

    def outputs(transcoder, shift_by=0.0):
        with torch.no_grad():
            trial = copy.deepcopy(transcoder)
            trial.b_enc -= shift_by
            return trial(source, target)

    before, after = outputs(unshifted), outputs(shifted)
    assert before["fvu"] > 2 and after["fvu"] < 0.8
    assert torch.equal(before["feature_acts"] > 0, after["feature_acts"] > 0)  # the same selection
    # The least-squares shift: moving it either way raises the loss (the mean over prefixes).
    for step in (-0.05 * shift, 0.05 * shift):
        assert outputs(shifted, step)["l2_loss"] > after["l2_loss"]


# ---------------------------------------------------------------------------------------------
# The skip connection
# ---------------------------------------------------------------------------------------------


def dense_transcoder_loss(transcoder, x, y):
    """The loss and the prefix predictions [B, G, d_out] (target units) computed densely."""
    cfg = transcoder.cfg
    x_n, _ = transcoder.normalize_source(x)
    y_n = y / transcoder.target_scale
    pre = x_n @ transcoder.W_enc + transcoder.b_enc
    acts = F.relu(pre)
    cut = acts.detach().flatten().topk(K * x.shape[0]).values[-1]
    z = acts * ((acts >= cut) & (acts > 0))
    skip = (
        (x - transcoder.skip_shift) / transcoder.skip_scale
    ) @ transcoder.W_skip  # the raw source
    prefixes = torch.stack(
        [
            z[:, :m] @ transcoder.W_dec[:m] + transcoder.b_dec + skip
            for m in transcoder.group_ends.tolist()
        ],
        dim=1,
    )
    l2 = (prefixes - y_n[:, None]).pow(2).mean(dim=(0, 2)).mean()
    dead = transcoder.dead_latents()
    dead_acts = F.relu(pre[:, dead])
    keep = dead_acts.detach().topk(cfg["top_k_aux"], dim=1).indices
    z_aux = dead_acts * torch.zeros_like(dead_acts, dtype=torch.bool).scatter_(1, keep, True)
    residual = (y_n - prefixes[:, -1]).detach()
    aux = cfg["aux_penalty"] * (z_aux @ transcoder.W_dec[dead] - residual).pow(2).mean()
    return l2 + aux, prefixes * transcoder.target_scale


def test_skip_gradient_and_prefixes_match_dense_reference():
    transcoder = MatryoshkaTranscoder(transcoder_cfg(transcoder_skip=True, top_k_aux=16))
    x, y = pair(1)
    transcoder.initialize_b_dec(y)
    with torch.no_grad():  # a trained-looking skip path and biases
        transcoder.W_skip.normal_(0, 0.2)
        transcoder.skip_shift.normal_(0, 0.5)
        transcoder.skip_scale.fill_(4.0)
        transcoder.b_enc.normal_(0, 0.1)
        transcoder.tokens_since_fired[::3] = 10**9  # some dead latents, so AuxK is on
    reference = copy.deepcopy(transcoder)
    out = transcoder(x, y)
    ref_loss, ref_prefixes = dense_transcoder_loss(reference, x, y)
    assert out["aux_loss"] > 0
    torch.testing.assert_close(out["loss"], ref_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out["sae_out"], ref_prefixes[:, -1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        transcoder.reconstruct_prefixes(x), ref_prefixes.detach(), rtol=1e-5, atol=1e-5
    )
    out["loss"].backward()
    transcoder.remove_parallel_decoder_grad()  # touches W_dec only
    ref_loss.backward()
    reference.remove_parallel_decoder_grad()
    assert transcoder.W_skip.grad.abs().sum() > 0
    for name, param in transcoder.named_parameters():
        torch.testing.assert_close(
            param.grad,
            dict(reference.named_parameters())[name].grad,
            rtol=1e-4,
            atol=1e-6,
            msg=name,
        )


def test_skip_path_reads_the_raw_source_centred_and_scaled_by_a_power_of_two():
    x, y = pair(4)
    x = x * 40 + 7  # far from unit scale
    for input_unit_norm in (True, False):
        transcoder = MatryoshkaTranscoder(
            transcoder_cfg(transcoder_skip=True, input_unit_norm=input_unit_norm)
        )
        transcoder.initialize_from_batch(x, y)
        torch.testing.assert_close(transcoder.skip_shift, x.mean(dim=0))
        x_s = (x - transcoder.skip_shift) / transcoder.skip_scale
        scale = transcoder.skip_scale.item()
        if input_unit_norm:  # unit RMS to within a factor sqrt(2), and a power of two
            assert 2**-0.5 <= x_s.pow(2).mean().sqrt() <= 2**0.5 and math.log2(scale) == round(
                math.log2(scale)
            )
        else:  # the skip path reads x_c, what the encoder reads
            assert scale == 1.0
            torch.testing.assert_close(x_s, transcoder.center(transcoder.normalize_source(x)[0]))


def test_target_norm_trains_in_the_targets_own_units_and_folds_into_the_export():
    """transcoder_target_norm without input_unit_norm (a set for circuit-tracer): the target is
    divided by a power of two near its RMS, outputs stay in the target's units, and circuit-tracer's
    tensors compute the same prediction with the scale folded into the decoder."""
    from matryoshka_sae.circuit_tracer_format import THRESHOLD, circuit_tracer_layer

    x, y = pair(5)
    y = y * 40  # far from unit scale
    plain = MatryoshkaTranscoder(transcoder_cfg(input_unit_norm=False))
    plain.initialize_from_batch(x, y)
    normed = MatryoshkaTranscoder(
        transcoder_cfg(input_unit_norm=False, transcoder_target_norm=True)
    )
    normed.initialize_from_batch(x, y)
    scale = normed.target_scale.item()
    centred = y - y.mean(dim=0)
    assert plain.target_scale.item() == 1.0 and math.log2(scale) == round(math.log2(scale))
    assert 2**-0.5 <= (centred / scale).pow(2).mean().sqrt() <= 2**0.5
    with torch.no_grad():
        normed.threshold.fill_(0.1)  # the eval-time cut of BatchTopK, as after training
        normed.eval()
        tensors = circuit_tracer_layer(normed)
        pre = x @ tensors["W_enc"].T + tensors["b_enc"]
        assert (pre > tensors[THRESHOLD]).sum(dim=1).float().mean() > 1  # latents fire
        theirs = (pre * (pre > tensors[THRESHOLD])) @ tensors["W_dec"] + tensors["b_dec"]
        torch.testing.assert_close(theirs, normed.reconstruct(x), rtol=1e-5, atol=1e-4)
        assert normed.reconstruct(x).pow(2).mean().sqrt() > 10  # in the target's units


def test_skip_transcoder_files_from_before_the_raw_skip_path():
    """Saved without skip_shift/skip_scale, the skip read x_c: the same computation without
    input_unit_norm; with it the file cannot be computed here and says so."""
    x, y = pair(5)
    for input_unit_norm in (False, True):
        transcoder = MatryoshkaTranscoder(
            transcoder_cfg(transcoder_skip=True, input_unit_norm=input_unit_norm)
        )
        transcoder.initialize_from_batch(x, y)
        with torch.no_grad():
            transcoder.W_skip.normal_(0, 0.2)
        old_file = {k: v for k, v in transcoder.state_dict().items() if not k.startswith("skip_")}
        reloaded = MatryoshkaTranscoder(transcoder.cfg)
        if input_unit_norm:
            with pytest.raises(ValueError, match="skip path read the standardised source"):
                reloaded.load_state_dict(old_file)
            continue
        reloaded.load_state_dict(old_file)
        assert torch.equal(reloaded.reconstruct(x), transcoder.reconstruct(x))


def test_skip_starts_as_the_plain_transcoder_and_stays_off_the_decoder_constraint():
    x, y = pair(2)
    plain, skip = (
        MatryoshkaTranscoder(transcoder_cfg(transcoder_skip=flag)) for flag in (False, True)
    )
    assert plain.W_skip is None and torch.equal(skip.W_skip, torch.zeros(D, D))
    for transcoder in (plain, skip):
        transcoder.initialize_b_dec(y)
    torch.testing.assert_close(skip(x, y)["loss"], plain(x, y)["loss"])
    with torch.no_grad():
        skip.W_skip.fill_(0.5)
    skip.normalize_decoder()
    assert torch.equal(skip.W_skip, torch.full((D, D), 0.5))


def test_skip_setting_belongs_to_transcoders_and_the_cli():
    with pytest.raises(ValueError, match="transcoder_skip"):
        post_init_cfg({**get_default_cfg(), "transcoder_skip": True})
    parser = train_gemma_example.build_parser()
    assert train_gemma_example.transcoder_cfg(parser.parse_args(["transcoder", "--skip"]))[
        "transcoder_skip"
    ]
    cfg = train_gemma_example.transcoder_cfg(parser.parse_args(["transcoder"]))
    assert not cfg["transcoder_skip"] and not cfg["name"].endswith("skip")


def test_target_norm_flag_reaches_one_transcoder_and_every_layer_of_a_set(tmp_path):
    parser = train_gemma_example.build_parser()
    assert not train_gemma_example.transcoder_cfg(parser.parse_args(["transcoder"]))[
        "transcoder_target_norm"
    ]
    argv = ["transcoder", "--target-norm"]
    assert train_gemma_example.transcoder_cfg(parser.parse_args(argv))["transcoder_target_norm"]
    argv += ["--layers", "0,1", "--model", "smollm2-135m", "--checkpoint-dir", str(tmp_path)]
    cfgs = train_gemma_example.set_cfgs(parser.parse_args(argv))
    assert [cfg["transcoder_target_norm"] for cfg in cfgs] == [True, True]
    argv.remove("--target-norm")  # a set's default, and not one transcoder's
    assert [
        cfg["transcoder_target_norm"]
        for cfg in train_gemma_example.set_cfgs(parser.parse_args(argv))
    ] == [True, True]
    argv.append("--no-target-norm")
    assert [
        cfg["transcoder_target_norm"]
        for cfg in train_gemma_example.set_cfgs(parser.parse_args(argv))
    ] == [False, False]
    with pytest.raises(SystemExit):  # a flag, not an option with a value
        parser.parse_args(["transcoder", "--target-norm", "yes"])


def test_skip_transcoder_saves_loads_and_resumes_W_skip(tmp_path, wandb_runs):
    def cfg_in(folder):
        return planted_cfg(
            "matryoshka_transcoder", tmp_path / folder, transcoder_skip=True, **RESUME_SETTINGS
        )

    cfg = cfg_in("uninterrupted")
    reference = train_transcoder(create_sae(cfg), PlantedStore(paired=True), None, cfg)
    assert reference.W_skip.abs().sum() > 0  # it learned
    loaded = load_sae(save_checkpoint(tmp_path / "saved", reference, cfg), device="cpu")
    assert torch.equal(loaded.W_skip, reference.W_skip)

    cfg = cfg_in("interrupted")
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_transcoder(create_sae(cfg), CrashingStore(crash_at=25, paired=True), None, cfg)
    folder = checkpoint_folder(cfg)
    assert load_metrics(folder)["step"] == 20
    resumed = train_transcoder(
        create_sae(cfg), PlantedStore(start=20, paired=True), None, cfg, resume_from=folder
    )
    for name, tensor in reference.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name
