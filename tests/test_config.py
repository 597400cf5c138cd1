import pytest
import torch

from matryoshka_sae.config import (
    FORMAT_UPGRADES,
    FORMAT_VERSION,
    HOOK_SITES,
    MODEL_TABLE,
    cfg_from_json,
    cfg_to_json,
    compute_fvu,
    get_default_cfg,
    get_hook_name,
    get_model_config,
    known_keys,
    post_init_cfg,
)
from matryoshka_sae.settings import (
    DERIVED_KEYS,
    OTHER_NAMES,
    SAE_TYPES,
    SETTINGS,
    TYPES,
    check_types,
    default_settings,
    names_of_type,
)

DOCUMENT_TABLE = {
    "gpt2": (768, 12),
    "gpt2-medium": (1024, 24),
    "gpt2-large": (1280, 36),
    "gpt2-xl": (1600, 48),
    "gemma-2-2b": (2304, 26),
    "gemma-2-9b": (3584, 42),
    "gemma-2-27b": (4608, 46),
}


@pytest.mark.parametrize("name,expected", DOCUMENT_TABLE.items())
def test_model_table_matches_document(name, expected):
    assert get_model_config(name) == {"act_size": expected[0], "n_layers": expected[1]}


def test_aliases_and_unknown_model():
    assert get_model_config("gpt2-small") == get_model_config("gpt2")
    assert get_model_config("google/gemma-2-2b")["act_size"] == 2304
    with pytest.raises(ValueError, match="Unknown model_name 'llama-7b'.*act_size"):
        get_model_config("llama-7b")
    assert set(MODEL_TABLE) >= set(DOCUMENT_TABLE)


def test_hook_names_for_every_site():
    expected = {
        "resid_pre": "blocks.8.hook_resid_pre",
        "resid_mid": "blocks.8.hook_resid_mid",
        "attn_out": "blocks.8.hook_attn_out",
        "mlp_out": "blocks.8.hook_mlp_out",
        "resid_post": "blocks.8.hook_resid_post",
        "mlp_in": "blocks.8.hook_mlp_in",
        "ln2_normalized": "blocks.8.ln2.hook_normalized",
    }
    assert set(expected) == set(HOOK_SITES)
    for site, hook in expected.items():
        assert get_hook_name(site, 8, "gemma-2-2b") == hook
    with pytest.raises(ValueError, match="Unknown site"):
        get_hook_name("resid", 8, "gpt2")
    with pytest.raises(ValueError, match="layers 0..11"):
        get_hook_name("resid_pre", 12, "gpt2")


def test_document_gemma_snippet_derives_sizes_and_hook():
    cfg = get_default_cfg()
    cfg["model_name"] = "gemma-2-2b"
    cfg = post_init_cfg(cfg)
    assert cfg["act_size"] == 2304
    assert cfg["hook_point"] == "blocks.8.hook_resid_pre"
    assert cfg["dict_size"] == 36864
    assert cfg["group_sizes"] == [2304, 4608, 9216, 20736]
    assert cfg["exclude_bos"] is True


def test_default_cfg_is_gpt2_small_with_document_groups():
    cfg = get_default_cfg()
    assert (cfg["act_size"], cfg["dict_size"]) == (768, 12288)
    assert cfg["group_sizes"] == [768, 1536, 3072, 6912]
    assert cfg["device"] in ("cpu", "cuda")
    assert "12288" in cfg["name"] and "blocks.8.hook_resid_pre" in cfg["name"]


def test_user_settings_survive_rederivation():
    cfg = get_default_cfg()
    cfg.update(
        model_name="gemma-2-2b", dict_size=18432, group_sizes=[2304, 4608, 6912, 4608], top_k=64
    )
    cfg = post_init_cfg(cfg)
    assert cfg["dict_size"] == 18432 and cfg["group_sizes"] == [2304, 4608, 6912, 4608]
    cfg["layer"] = 3
    cfg = post_init_cfg(cfg)
    assert cfg["hook_point"] == "blocks.3.hook_resid_pre"


def test_synthetic_source_with_explicit_act_size():
    cfg = get_default_cfg()
    cfg.update(model_name="synthetic", act_size=768)  # the same width as the default model's
    assert post_init_cfg(cfg)["act_size"] == 768
    cfg = get_default_cfg()
    cfg.update(model_name="synthetic", act_size=48, dict_size=None, group_sizes=None)
    cfg = post_init_cfg(cfg)
    assert cfg["dict_size"] == 768 and sum(cfg["group_sizes"]) == 768
    assert cfg["top_k_aux"] == 24


def test_dtype_strings_accepted():
    cfg = get_default_cfg()
    cfg.update(dtype="bfloat16", model_dtype="torch.float16")
    cfg = post_init_cfg(cfg)
    assert cfg["dtype"] is torch.bfloat16 and cfg["model_dtype"] is torch.float16
    assert cfg_from_json(cfg_to_json(cfg))["dtype"] is torch.bfloat16


@pytest.mark.parametrize(
    "change,message",
    [
        ({"act_size": 100}, "act_size mismatch.*Remove cfg\\['act_size'\\]"),
        ({"group_sizes": [768, 768]}, "sum to 1536, not dict_size 12288"),
        ({"top_k": 0}, "top_k must be an integer in 1..dict_size"),
        ({"top_k": 20000}, "top_k must be an integer in 1..dict_size"),
        ({"layer": 12}, "outside the model's layers 0..11"),
        ({"site": "resid"}, "Unknown site 'resid'"),
        ({"sae_type": "gated"}, "Unknown sae_type 'gated'"),
        ({"lr": 0}, "cfg\\['lr'\\] must be positive"),
        ({"batch_size": -5}, "cfg\\['batch_size'\\] must be positive"),
        ({"dict_size": -1}, "cfg\\['dict_size'\\] must be positive"),
        ({"model_name": "llama-7b", "act_size": None}, "Unknown model_name 'llama-7b'"),
        ({"dtype": "float99"}, "is not a dtype"),
        ({"wandb_mode": "sometimes"}, "wandb_mode must be"),
        ({"sae_type": "matryoshka_transcoder"}, "A transcoder needs cfg\\['source_site'\\]"),
        (
            {
                "source_site": "resid_mid",
                "source_layer": 5,
                "target_site": "mlp_out",
                "target_layer": 4,
            },
            "target_layer 4 precedes source_layer 5",
        ),
    ],
)
def test_validation_errors_name_the_setting(change, message):
    cfg = get_default_cfg()
    cfg.update(change)
    with pytest.raises(ValueError, match=message):
        post_init_cfg(cfg)


def test_fvu_of_mean_is_one_and_of_perfect_reconstruction_zero():
    torch.manual_seed(0)
    offsets = torch.randn(16) * 1000  # large per-dimension offsets must not leak into the variance
    x = torch.randn(512, 16) + offsets
    assert compute_fvu(x, x.mean(dim=0).expand_as(x)).item() == pytest.approx(1.0, abs=1e-6)
    assert compute_fvu(x, x.clone()).item() == 0.0


@pytest.mark.parametrize("shape", [(200, 8), (10, 20, 8)])
def test_fvu_matches_formula(shape):
    torch.manual_seed(1)
    x = torch.randn(shape) * torch.linspace(0.1, 5, shape[-1]) + torch.linspace(-10, 10, shape[-1])
    x_hat = x + 0.3 * torch.randn(shape)
    flat, flat_hat = x.reshape(-1, 8).double(), x_hat.reshape(-1, 8).double()
    expected = ((flat - flat_hat) ** 2).sum() / ((flat - flat.mean(0)) ** 2).sum()
    assert compute_fvu(x, x_hat).item() == pytest.approx(expected.item(), rel=1e-5)
    # Not the variance of the flattened tensor, which counts the per-dimension offsets too.
    wrong = ((flat - flat_hat) ** 2).sum() / ((flat - flat.mean()) ** 2).sum()
    assert abs(compute_fvu(x, x_hat).item() - wrong.item()) > 1e-3


def test_fvu_of_constant_batch_is_nan_and_shapes_checked():
    x = torch.ones(10, 4)
    assert torch.isnan(compute_fvu(x, x))
    with pytest.raises(ValueError, match="shapes differ"):
        compute_fvu(x, torch.ones(10, 5))


def test_cfg_json_names_objects_it_cannot_serialise():
    cfg = get_default_cfg()
    cfg["dataset_path"] = object()
    assert cfg_from_json(cfg_to_json(cfg))["dataset_path"] == "<object>"


@pytest.mark.parametrize(
    "key,suggestion",
    [
        ("learning_rate", "'lr'"),  # another library's name
        ("topk_aux", "'top_k_aux'"),  # a typo
        ("batchsize", "'batch_size'"),
        ("l1_coefficient", "'l1_coeff'"),
    ],
)
def test_misspelt_setting_is_an_error_with_a_suggestion(key, suggestion):
    cfg = get_default_cfg()
    cfg[key] = 1
    with pytest.raises(
        ValueError, match=f"cfg\\['{key}'\\] is not a setting; did you mean {suggestion}"
    ):
        post_init_cfg(cfg)


def test_notes_hold_the_users_bookkeeping():
    cfg = get_default_cfg()
    cfg["notes"] = {"experiment": "sweep 3", "tags": ["a", "b"]}
    assert post_init_cfg(cfg)["notes"]["experiment"] == "sweep 3"
    assert cfg_from_json(cfg_to_json(cfg))["notes"] == cfg["notes"]


@pytest.mark.parametrize(
    "change,message",
    [
        ({"lr": "1e-3"}, "cfg\\['lr'\\] must be a number \\(int or float\\), got str '1e-3'"),
        ({"top_k": 32.0}, "cfg\\['top_k'\\] must be an integer, got float 32.0"),
        ({"batch_size": True}, "cfg\\['batch_size'\\] must be an integer, got bool"),
        ({"input_unit_norm": "yes"}, "cfg\\['input_unit_norm'\\] must be True or False"),
        ({"exclude_bos": 1}, "cfg\\['exclude_bos'\\] must be True or False"),
        ({"group_sizes": "768,768"}, "group_sizes must be a list of positive integers"),
        ({"group_sizes": [6144.0, 6144.0]}, "group_sizes must be a list of positive integers"),
        ({"model_dtype": 16}, "cfg\\['model_dtype'\\] = 16 is not a dtype"),
        ({"site": 8}, "cfg\\['site'\\] must be a string"),
    ],
)
def test_wrong_type_names_the_setting_and_the_type(change, message):
    cfg = get_default_cfg()
    cfg.update(change)
    with pytest.raises(ValueError, match=message):
        post_init_cfg(cfg)


def test_token_count_may_be_written_as_a_float():
    cfg = get_default_cfg()
    cfg["num_tokens"] = 1e8
    assert post_init_cfg(cfg)["num_tokens"] == 100_000_000
    cfg["num_tokens"] = 1.5
    with pytest.raises(ValueError, match="cfg\\['num_tokens'\\] must be an integer"):
        post_init_cfg(cfg)


def test_config_saved_by_an_earlier_version_still_loads(tmp_path):
    """An old config.json lacks settings added since and may hold retired ones: it loads, with a
    warning for what is dropped, and builds the same SAE as the cfg it was saved from."""
    import json

    from matryoshka_sae.checkpoint import load_sae, save_checkpoint
    from matryoshka_sae.sae import create_sae

    cfg = get_default_cfg()
    cfg.update(
        act_size=16, model_name="synthetic", dict_size=64, group_sizes=None, top_k=4, device="cpu"
    )
    cfg = post_init_cfg(cfg)
    sae = create_sae(cfg)
    save_checkpoint(tmp_path, sae, cfg)
    saved = json.loads((tmp_path / "config.json").read_text())
    for key in ("notes", "transcoder_skip"):  # settings younger than the checkpoint
        saved.pop(key, None)
    saved["an_old_setting"] = 3
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.warns(UserWarning, match="'an_old_setting', which this version no longer has"):
        loaded = load_sae(tmp_path)
    assert "an_old_setting" not in loaded.cfg and loaded.cfg["notes"] is None
    x = torch.randn(8, 16)
    sae.eval(), loaded.eval()
    assert torch.equal(loaded.reconstruct(x), sae.reconstruct(x))
    post_init_cfg(loaded.cfg)  # a loaded cfg is valid as it stands


# ---------------------------------------------------------------------------------------------
# The settings table (settings.py): every key declared once
# ---------------------------------------------------------------------------------------------

# Defaults before derivation as they were when the table replaced config.default_settings()'s dict.
FROZEN_DEFAULTS = {
    "seed": 49,
    "sae_type": "matryoshka",
    "model_name": "gpt2-small",
    "site": "resid_pre",
    "layer": 8,
    "dict_size": None,
    "top_k": 32,
    "aux_penalty": 1 / 32,
    "n_batches_to_dead": 5,
    "l1_coeff_relative": True,
    "jumprelu_tanh_scale": 4.0,
    "pre_act_coeff": 3e-6,
    "jumprelu_relative_bandwidth": 0.1,
    "jumprelu_threshold_lr_scale": 10.0,
    "threshold_ema_rate": 0.05,
    "input_unit_norm": True,
    "dtype": torch.float32,
    "batch_size": 4096,
    "lr": 3e-4,
    "beta1": 0.9,
    "beta2": 0.99,
    "max_grad_norm": 100000,
    "num_tokens": 10**9,
    "model_dtype": torch.float32,
    "model_batch_size": 512,
    "num_batches_in_buffer": 10,
    "dataset_path": "HuggingFaceFW/fineweb-edu",
    "n_eval_rows": 32,
    "wandb_project": "sparse_autoencoders",
    "log_freq": 10,
    "perf_log_freq": 1000,
    "checkpoint_freq": 10000,
    "checkpoint_dir": "checkpoints",
    "distributed_timeout_s": 600,
    "transcoder_skip": False,
    "transcoder_selection": "batchtopk",
    "clt_sparsity": "global",
    "notes": None,
}


def test_every_setting_has_a_default_a_type_and_help():
    for name, setting in SETTINGS.items():
        assert setting.name == name and setting.type in TYPES, name
        assert len(setting.help) > 10, f"{name} needs a help text"
        if setting.default is not None and setting.type in (
            "int",
            "count",
            "number",
            "bool",
            "str",
        ):
            check_types({name: setting.default})  # the default has the declared type
        if setting.choices is not None and setting.default is not None:
            assert setting.default in setting.choices, name
        assert set(setting.used_by) <= set(SAE_TYPES), name
        assert all(0 <= version < FORMAT_VERSION for version in setting.upgrades), name


def test_the_table_generates_the_pre_refactor_defaults():
    defaults = default_settings()
    assert len(defaults) == 68 and set(DERIVED_KEYS) == {
        "n_layers",
        "hook_point",
        "source_hook_point",
        "target_hook_point",
        "source_act_size",
        "target_act_size",
        "name",
        "derived",
    }
    assert {key: defaults[key] for key in FROZEN_DEFAULTS} == FROZEN_DEFAULTS
    assert known_keys() == set(defaults) | set(DERIVED_KEYS)
    cfg = get_default_cfg()
    assert (cfg["top_k_aux"], cfg["l1_coeff"], cfg["l1_warmup_steps"], cfg["l0_coeff"]) == (
        384,
        0.0,
        12207,
        1e-3,
    )
    assert (cfg["jumprelu_objective"], cfg["exclude_bos"]) == ("step", False)


def test_other_names_and_format_upgrades_name_settings():
    assert set(OTHER_NAMES.values()) <= set(SETTINGS)
    assert not set(OTHER_NAMES) & set(SETTINGS)
    assert OTHER_NAMES["learning_rate"] == "lr" and OTHER_NAMES["d_sae"] == "dict_size"
    assert set(FORMAT_UPGRADES) == set(range(FORMAT_VERSION))
    assert set(FORMAT_UPGRADES[0]) == {
        "target_l0",
        "jumprelu_objective",
        "l1_coeff_relative",
        "l1_warmup_steps",
        "relu_bias_init",
        "l0_warmup_steps",
        "jumprelu_threshold_lr_scale",
        "transcoder_skip",
        "source_act_size",
        "target_act_size",
    }


@pytest.mark.parametrize("name", names_of_type("int", "count", "number", "bool", "str"))
def test_a_value_of_the_wrong_type_is_rejected_for_every_typed_setting(name):
    cfg = get_default_cfg()
    cfg[name] = [1]  # no setting's type
    description = TYPES[SETTINGS[name].type].replace("(", "\\(").replace(")", "\\)")
    with pytest.raises(ValueError, match=f"cfg\\['{name}'\\] must be {description}, got list"):
        post_init_cfg(cfg)


@pytest.mark.parametrize(
    "name,extra",
    [
        ("sae_type", {}),
        ("site", {}),
        ("wandb_mode", {}),
        ("jumprelu_objective", {}),
        ("transcoder_selection", {}),
        ("clt_sparsity", {"sae_type": "matryoshka_clt"}),
    ],
)
def test_a_value_outside_a_settings_choices_is_rejected(name, extra):
    assert SETTINGS[name].choices
    cfg = get_default_cfg()
    cfg.update(extra, **{name: "neither"})
    with pytest.raises(ValueError, match="neither"):
        post_init_cfg(cfg)
