"""Training configuration, the model table, hook names and the FVU metric.

A configuration is a plain dict. Its settings are declared once, in the table of settings.py (name,
default, type, help, flag), whose names this module re-exports. `get_default_cfg()` gives every
setting with its default; `post_init_cfg(cfg)` fills in what can be derived from the model and the
other settings and validates the rest. Derived values are remembered in ``cfg["derived"]``, so a
cfg can be edited (say, a new ``model_name``) and passed through `post_init_cfg` again: values that
were derived are derived anew, values the user set are checked against the model.
"""

from __future__ import annotations

import json
import re
import warnings
from typing import Any

import torch

from matryoshka_sae.settings import (  # noqa: F401  (the table's names, re-exported)
    DERIVED_KEYS,
    HOOK_SITES,
    OTHER_NAMES,
    SAE_TYPES,
    SETTINGS,
    check_known_keys,
    check_types,
    default_settings,
    format_upgrades,
    names_of_type,
)

# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------

MODEL_TABLE: dict[str, dict[str, int]] = {
    "gpt2": {"act_size": 768, "n_layers": 12},
    "gpt2-medium": {"act_size": 1024, "n_layers": 24},
    "gpt2-large": {"act_size": 1280, "n_layers": 36},
    "gpt2-xl": {"act_size": 1600, "n_layers": 48},
    "gemma-2-2b": {"act_size": 2304, "n_layers": 26},
    "gemma-2-9b": {"act_size": 3584, "n_layers": 42},
    "gemma-2-27b": {"act_size": 4608, "n_layers": 46},
    "smollm2-135m": {"act_size": 576, "n_layers": 30},
}

MODEL_ALIASES: dict[str, str] = {
    "gpt2-small": "gpt2",
    "openai-community/gpt2": "gpt2",
    "openai-community/gpt2-medium": "gpt2-medium",
    "openai-community/gpt2-large": "gpt2-large",
    "openai-community/gpt2-xl": "gpt2-xl",
    "google/gemma-2-2b": "gemma-2-2b",
    "google/gemma-2-9b": "gemma-2-9b",
    "google/gemma-2-27b": "gemma-2-27b",
    "smollm2-135m-instruct": "smollm2-135m",
    "SmolLM2-135M-Instruct": "smollm2-135m",
    "HuggingFaceTB/SmolLM2-135M-Instruct": "smollm2-135m",
}

SAE_TYPE_ALIASES = {
    "batch_topk": "batchtopk",
    "global-matryoshka-topk": "matryoshka",
    "global-matryoshka-batchtopk": "matryoshka",
    "matryoshka-batchtopk": "matryoshka",
    "matryoshka-transcoder": "matryoshka_transcoder",
    "transcoder": "matryoshka_transcoder",
    "matryoshka-clt": "matryoshka_clt",
    "clt": "matryoshka_clt",
}

# A cross-layer transcoder's sites when cfg leaves them unset: the MLP's normalised input and its output.
CLT_DEFAULT_SITES = {"source_site": "ln2_normalized", "target_site": "mlp_out"}

# The user's document splits the dictionary into groups of 1/16, 2/16, 4/16 and 9/16.
MATRYOSHKA_GROUP_PROPORTIONS = (1, 2, 4, 9)
DICT_EXPANSION = 16


def canonical_model_name(model_name: str) -> str | None:
    """The model table's name for `model_name`, or None for a model the table does not know."""
    if model_name in MODEL_TABLE:
        return model_name
    return MODEL_ALIASES.get(model_name)


def get_model_config(model_name: str) -> dict[str, int]:
    """Return ``{"act_size", "n_layers"}`` of a known model (exact names and known aliases only)."""
    name = canonical_model_name(model_name)
    if name is None:
        known = ", ".join(sorted(MODEL_TABLE) + sorted(a for a in MODEL_ALIASES if "/" not in a))
        raise ValueError(
            f"Unknown model_name {model_name!r}. Known models: {known}. For any other source of "
            f"activations set cfg['act_size'] (and cfg['n_layers'] if a layer must be checked)."
        )
    return dict(MODEL_TABLE[name])


def get_hook_name(site: str, layer: int, model_name: str | None = None) -> str:
    """TransformerLens hook name of `site` in block `layer`, e.g. ``blocks.8.hook_resid_pre``.

    When `model_name` is a known model the layer is checked against its depth.
    """
    if site not in HOOK_SITES:
        raise ValueError(f"Unknown site {site!r}; choose one of {', '.join(HOOK_SITES)}.")
    if not isinstance(layer, int) or isinstance(layer, bool) or layer < 0:
        raise ValueError(f"layer must be a non-negative integer, got {layer!r}.")
    if model_name is not None and canonical_model_name(model_name) is not None:
        n_layers = get_model_config(model_name)["n_layers"]
        if layer >= n_layers:
            raise ValueError(
                f"layer {layer} is outside {model_name}, which has layers 0..{n_layers - 1}; "
                f"set cfg['layer'] to one of those."
            )
    return HOOK_SITES[site].format(layer=layer)


# ---------------------------------------------------------------------------------------------
# FVU
# ---------------------------------------------------------------------------------------------


def compute_fvu(x_original: torch.Tensor, x_reconstruct: torch.Tensor) -> torch.Tensor:
    """Fraction of variance unexplained, a 0-dim float32 tensor (no gradient).

        FVU = sum_i ||x_i - x_hat_i||^2 / sum_i ||x_i - mean_batch(x)||^2

    The mean is taken per dimension over the batch, so the denominator is the total variance
    (summed over dimensions) of the batch, not the variance of the flattened tensor. Shapes
    ``[batch, d]`` and ``[batch, pos, d]`` (positions count as batch) are accepted.
    FVU of the batch mean is 1; of a perfect reconstruction, 0. A batch with no variance at all
    (one token, or identical tokens) has no defined FVU: the result is NaN then.
    """
    if x_original.shape != x_reconstruct.shape:
        raise ValueError(
            f"compute_fvu: shapes differ, x_original {tuple(x_original.shape)} vs "
            f"x_reconstruct {tuple(x_reconstruct.shape)}."
        )
    with torch.no_grad():
        x = x_original.detach().reshape(-1, x_original.shape[-1]).float()
        x_hat = x_reconstruct.detach().reshape(-1, x.shape[-1]).float()
        residual = (x - x_hat).pow(2).sum()
        total = (x - x.mean(dim=0)).pow(2).sum()
        return torch.where(total > 0, residual / total, torch.full_like(total, float("nan")))


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


def get_default_cfg() -> dict[str, Any]:
    """Every setting with its default, derived values filled in (GPT-2 small, layer 8, resid_pre)."""
    return post_init_cfg(default_settings())


# Keys of earlier versions found in saved config.json files: renamed (old -> new) or retired (-> None).
RETIRED_KEYS: dict[str, str | None] = {}

# The format of saved cfgs (config.json, and the cfg inside exported files). `cfg_to_json` writes it
# as "format_version"; a file without one is version 0.
FORMAT_VERSION = 1

# For each older format version, the settings that reproduce the behaviour of the code that wrote it,
# for the settings such a file may lack (they did not exist yet): `upgrade_saved_cfg` gives them to a
# file of that version or older before today's defaults fill the rest. A value may be a function of
# the saved cfg. Declared in the settings table (`Setting.upgrades`); the defaults that differ are
# today's choices, measured and explained where the setting is read (sae.py).
FORMAT_UPGRADES: dict[int, dict[str, Any]] = {
    version: format_upgrades(version) for version in range(FORMAT_VERSION)
}

# The settings of each type the table declares (checked by `settings.check_types`).
INT_SETTINGS = names_of_type("int", "count")
NUMBER_SETTINGS = names_of_type("number")
BOOL_SETTINGS = names_of_type("bool")
STR_SETTINGS = names_of_type("str")
DTYPE_SETTINGS = names_of_type("dtype")


def known_keys() -> set[str]:
    """Every key a cfg may hold: the settings, the derived keys and "notes"."""
    return set(SETTINGS)


def _as_dtype(value: Any, setting: str) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        dtype = getattr(torch, value.removeprefix("torch."), None)
        if isinstance(dtype, torch.dtype):
            return dtype
    raise ValueError(
        f"cfg[{setting!r}] = {value!r} is not a dtype; use e.g. torch.bfloat16 or 'bfloat16'."
    )


def _derive(cfg: dict, derived: dict, key: str, value: Any) -> None:
    """Set cfg[key] to `value` unless the user set it; remember derived values."""
    previous = cfg.get("derived", {})
    user_set = cfg.get(key) is not None and not (key in previous and previous[key] == cfg[key])
    if not user_set:
        cfg[key] = value
        derived[key] = value


def split_into_groups(dict_size: int, proportions=MATRYOSHKA_GROUP_PROPORTIONS) -> list[int]:
    """Split `dict_size` into group sizes in the given proportions; the last group takes the rest."""
    total = sum(proportions)
    sizes = [max(1, dict_size * p // total) for p in proportions[:-1]]
    sizes.append(dict_size - sum(sizes))
    if sizes[-1] < 1:
        raise ValueError(
            f"dict_size {dict_size} is too small to split into {len(proportions)} groups."
        )
    return sizes


def _model_facts(cfg: dict) -> dict[str, int] | None:
    """The model table's entry for cfg's model, or None for activations from elsewhere.

    Another model needs cfg["act_size"]; a value carried over from an earlier model cannot be
    told apart from one set on purpose, and the activation stores check it against the hook.
    """
    if canonical_model_name(cfg["model_name"]) is not None:
        return get_model_config(cfg["model_name"])
    if cfg.get("act_size") is None:
        get_model_config(cfg["model_name"])  # raises the unknown-model error
    return None


def _check_positive(cfg: dict, keys: tuple[str, ...], allow_zero: bool = False) -> None:
    for key in keys:
        value = cfg.get(key)
        if value is None:
            continue
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not is_number or (value < 0 if allow_zero else value <= 0):
            need = "non-negative" if allow_zero else "positive"
            raise ValueError(f"cfg[{key!r}] must be {need}, got {value!r}.")


def post_init_cfg(cfg: dict[str, Any]) -> dict[str, Any]:
    """Derive what the user left unset and validate the rest; returns the same dict.

    Derived: act_size (from the model), dict_size (16 x act_size), group_sizes (1:2:4:9),
    top_k_aux (act_size // 2), hook_point, device, exclude_bos, l1/l0 coefficients, wandb_mode,
    name. Every problem is a ValueError naming the setting and the fix.
    """
    check_known_keys(cfg)
    check_types(cfg)
    derived: dict[str, Any] = {}
    cfg["sae_type"] = SAE_TYPE_ALIASES.get(cfg["sae_type"], cfg["sae_type"])
    if cfg["sae_type"] not in SAE_TYPES:
        raise ValueError(
            f"Unknown sae_type {cfg['sae_type']!r}; choose one of {', '.join(SAE_TYPES)}."
        )
    previous = cfg.get("derived", {})

    facts = _model_facts(cfg)
    if facts is not None:
        user_act_size = (
            cfg.get("act_size") is not None and previous.get("act_size") != cfg["act_size"]
        )
        if user_act_size and cfg["act_size"] != facts["act_size"]:
            raise ValueError(
                f"act_size mismatch: cfg['act_size'] = {cfg['act_size']} but {cfg['model_name']} has "
                f"act_size {facts['act_size']}. Remove cfg['act_size'] (set it to None) and let "
                f"post_init_cfg derive it."
            )
        _derive(cfg, derived, "act_size", facts["act_size"])
        _derive(cfg, derived, "n_layers", facts["n_layers"])
    elif "n_layers" in previous and previous["n_layers"] == cfg.get("n_layers"):
        cfg["n_layers"] = None  # derived from a model that is no longer the one configured
    _check_positive(cfg, ("act_size",))

    _derive(cfg, derived, "dict_size", DICT_EXPANSION * cfg["act_size"])
    _check_positive(
        cfg,
        (
            "dict_size",
            "batch_size",
            "lr",
            "seq_len",
            "model_batch_size",
            "num_batches_in_buffer",
            "num_tokens",
            "n_batches_to_dead",
            "bandwidth",
            "jumprelu_threshold_init",
            "threshold_ema_rate",
            "log_freq",
            "perf_log_freq",
            "checkpoint_freq",
            "max_grad_norm",
            "n_eval_rows",
            "distributed_timeout_s",
            "data_lanes",
        ),
    )
    _check_positive(cfg, ("aux_penalty", "lr_warmup_steps", "lr_decay_frac"), allow_zero=True)
    _derive(cfg, derived, "group_sizes", split_into_groups(cfg["dict_size"]))
    _validate_group_sizes(cfg)
    top_k = cfg["top_k"]
    if not isinstance(top_k, int) or not 1 <= top_k <= cfg["dict_size"]:
        raise ValueError(
            f"top_k must be an integer in 1..dict_size ({cfg['dict_size']}), got {top_k!r}."
        )
    _derive(cfg, derived, "top_k_aux", max(1, cfg["act_size"] // 2))
    _check_positive(cfg, ("top_k_aux",))
    _derive_sparsity_settings(cfg, derived)

    for key in DTYPE_SETTINGS:
        cfg[key] = _as_dtype(cfg[key], key)
    _derive(cfg, derived, "device", "cuda" if torch.cuda.is_available() else "cpu")
    _derive(
        cfg,
        derived,
        "exclude_bos",
        canonical_model_name(cfg["model_name"]) in ("gemma-2-2b", "gemma-2-9b", "gemma-2-27b"),
    )
    _derive(cfg, derived, "wandb_mode", _default_wandb_mode())
    if cfg["wandb_mode"] not in SETTINGS["wandb_mode"].choices:
        raise ValueError(
            f"wandb_mode must be 'online', 'offline' or 'disabled', got {cfg['wandb_mode']!r}."
        )

    n_layers = cfg.get("n_layers")
    _derive(cfg, derived, "hook_point", get_hook_name(cfg["site"], cfg["layer"]))
    _check_layer(cfg["layer"], n_layers, "layer")
    _check_hook_in_layer(cfg["hook_point"], cfg["layer"])
    if cfg["sae_type"] == "matryoshka_clt":
        _derive_clt_settings(cfg, derived, n_layers)
    elif cfg["sae_type"] == "matryoshka_transcoder" or cfg.get("source_site") is not None:
        _derive_transcoder_hooks(cfg, derived, n_layers)
    if cfg["transcoder_selection"] not in SETTINGS["transcoder_selection"].choices:
        raise ValueError(
            f"cfg['transcoder_selection'] = {cfg['transcoder_selection']!r}; choose 'batchtopk' "
            f"(the k x batch largest of the batch) or 'topk' (the k largest of each token)."
        )
    if cfg.get("transcoder_skip") and cfg["sae_type"] != "matryoshka_transcoder":
        raise ValueError(
            f"cfg['transcoder_skip'] is a transcoder's skip connection, but sae_type is "
            f"{cfg['sae_type']!r}; set transcoder_skip to False or train a transcoder."
        )

    _derive(cfg, derived, "name", run_name(cfg))
    cfg["derived"] = derived
    return cfg


def _derive_sparsity_settings(cfg: dict, derived: dict) -> None:
    """The dense-code SAEs' sparsity settings (see VanillaSAE and JumpReLUSAE for the formulas)."""
    target = cfg["target_l0"]
    if target is not None and not 0 < target < cfg["dict_size"]:
        raise ValueError(
            f"cfg['target_l0'] = {target!r} must lie between 0 and dict_size "
            f"({cfg['dict_size']}); set the mean number of active latents wanted, e.g. 32."
        )
    _derive(cfg, derived, "jumprelu_objective", "quadratic" if target is not None else "step")
    objective = cfg["jumprelu_objective"]
    if objective not in SETTINGS["jumprelu_objective"].choices:
        raise ValueError(
            f"cfg['jumprelu_objective'] = {objective!r}; choose 'step', 'tanh' or 'quadratic'."
        )
    if objective == "quadratic" and target is None:
        raise ValueError(
            "cfg['jumprelu_objective'] = 'quadratic' steers to cfg['target_l0'], which is "
            "None; set target_l0 (e.g. 32) or choose the 'step' or 'tanh' objective."
        )
    warmup = int(cfg["num_tokens"]) // cfg["batch_size"] // 20  # 5% of the run's steps
    _derive(cfg, derived, "l1_coeff", 4 / cfg["act_size"] if cfg["sae_type"] == "vanilla" else 0.0)
    _derive(cfg, derived, "l1_warmup_steps", warmup)  # read by vanilla only
    _derive(cfg, derived, "l0_coeff", 1.0 if objective == "quadratic" else 1e-3)
    _check_positive(
        cfg,
        ("l1_coeff", "l0_coeff", "l1_warmup_steps", "l0_warmup_steps", "pre_act_coeff"),
        allow_zero=True,
    )
    _check_positive(
        cfg, ("jumprelu_tanh_scale", "jumprelu_relative_bandwidth", "jumprelu_threshold_lr_scale")
    )


def _check_layer(layer: int, n_layers: int | None, setting: str) -> None:
    if n_layers is not None and not 0 <= layer < n_layers:
        raise ValueError(
            f"cfg[{setting!r}] = {layer} is outside the model's layers 0..{n_layers - 1}."
        )


def _validate_group_sizes(cfg: dict) -> None:
    groups = cfg["group_sizes"]
    if (
        not isinstance(groups, (list, tuple))
        or not groups
        or any(not isinstance(g, int) or isinstance(g, bool) or g <= 0 for g in groups)
    ):
        raise ValueError(f"group_sizes must be a list of positive integers, got {groups!r}.")
    if sum(groups) != cfg["dict_size"]:
        raise ValueError(
            f"group_sizes {groups} sum to {sum(groups)}, not dict_size {cfg['dict_size']}; make "
            f"them sum to dict_size, or set cfg['group_sizes'] = None to derive them."
        )


def _derive_transcoder_hooks(cfg: dict, derived: dict, n_layers: int | None) -> None:
    """Fill source/target hook points; the target may not precede the source."""
    for end in ("source", "target"):
        if cfg.get(f"{end}_site") is None or cfg.get(f"{end}_layer") is None:
            raise ValueError(
                f"A transcoder needs cfg['{end}_site'] and cfg['{end}_layer']; "
                f"use create_transcoder_config(cfg, ...)."
            )
        _check_layer(cfg[f"{end}_layer"], n_layers, f"{end}_layer")
        _derive(
            cfg,
            derived,
            f"{end}_hook_point",
            get_hook_name(cfg[f"{end}_site"], cfg[f"{end}_layer"]),
        )
        _derive(cfg, derived, f"{end}_act_size", cfg["act_size"])
    if cfg["target_layer"] < cfg["source_layer"]:
        raise ValueError(
            f"target_layer {cfg['target_layer']} precedes source_layer {cfg['source_layer']}; a "
            f"transcoder maps an earlier activation to a later one."
        )


def _derive_clt_settings(cfg: dict, derived: dict, n_layers: int | None) -> None:
    """A cross-layer transcoder's sites (default ln2_normalized -> mlp_out), layers (default: all of
    the model's) and sparsity mode; its source and target widths are the model's."""
    for key, site in CLT_DEFAULT_SITES.items():
        _derive(cfg, derived, key, site)
        get_hook_name(cfg[key], 0)  # a known site
    user_set = (
        cfg["clt_layers"] is not None
        and cfg.get("derived", {}).get("clt_layers") != cfg["clt_layers"]
    )
    if not user_set:
        if n_layers is None:
            raise ValueError(
                f"cfg['clt_layers'] is unset and the number of layers of {cfg['model_name']!r} is not "
                f"known; set cfg['clt_layers'] to the layers to read and write, e.g. [0, 1, 2]."
            )
        _derive(cfg, derived, "clt_layers", list(range(n_layers)))
    layers = cfg["clt_layers"]
    if (
        not isinstance(layers, (list, tuple))
        or not layers
        or any(not isinstance(x, int) or isinstance(x, bool) or x < 0 for x in layers)
        or list(layers) != sorted(set(layers))
    ):
        raise ValueError(
            f"cfg['clt_layers'] = {layers!r}; give distinct ascending layer numbers, e.g. [0, 1, 2], "
            f"or None for every layer of the model."
        )
    for layer in layers:
        _check_layer(layer, n_layers, "clt_layers")
    cfg["clt_layers"] = list(layers)
    if cfg["clt_sparsity"] not in SETTINGS["clt_sparsity"].choices:
        raise ValueError(
            f"cfg['clt_sparsity'] = {cfg['clt_sparsity']!r}; choose 'global' (BatchTopK over every "
            f"layer's latents), 'per_layer' (BatchTopK within each source layer) or 'jumprelu' "
            f"(a learned threshold per latent, steered to target_l0)."
        )
    if cfg["clt_sparsity"] == "jumprelu" and cfg["target_l0"] is None:
        raise ValueError(
            "cfg['clt_sparsity'] = 'jumprelu' steers the L0 to cfg['target_l0'], which is None; set "
            "target_l0 to the active latents wanted a token per source layer (train_clt.py --target-l0)."
        )
    if cfg["clt_sparsity"] == "jumprelu" and cfg["jumprelu_objective"] != "quadratic":
        raise ValueError(
            f"cfg['clt_sparsity'] = 'jumprelu' trains with the quadratic target-L0 objective, but "
            f"cfg['jumprelu_objective'] is {cfg['jumprelu_objective']!r}; set it to 'quadratic' (or None)."
        )
    if cfg["source_site"] == cfg["target_site"]:
        raise ValueError(
            f"cfg['source_site'] and cfg['target_site'] are both {cfg['source_site']!r}; a cross-layer "
            f"transcoder reads one site and predicts another (e.g. ln2_normalized -> mlp_out)."
        )
    _derive(cfg, derived, "source_act_size", cfg["act_size"])
    _derive(cfg, derived, "target_act_size", cfg["act_size"])


def clt_hooks(cfg: dict) -> tuple[list[str], list[str]]:
    """A cross-layer transcoder's source hooks and target hooks, one of each per layer of cfg["clt_layers"]."""
    return (
        [get_hook_name(cfg["source_site"], layer) for layer in cfg["clt_layers"]],
        [get_hook_name(cfg["target_site"], layer) for layer in cfg["clt_layers"]],
    )


def _default_wandb_mode() -> str:
    """online when an API key is configured, offline otherwise (so nobody waits on a login)."""
    import os

    if os.environ.get("WANDB_MODE") in ("online", "offline", "disabled"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = os.path.expanduser("~/.netrc")
    if os.path.exists(netrc):
        with open(netrc) as f:
            if "api.wandb.ai" in f.read():
                return "online"
    return "offline"


def _check_hook_in_layer(hook_point: str, layer: int) -> None:
    """A hook point given by hand (blocks.N....) must be in block cfg["layer"]."""
    match = re.match(r"blocks\.(\d+)\.", str(hook_point))
    if match and int(match.group(1)) != layer:
        raise ValueError(
            f"cfg['hook_point'] = {hook_point!r} is in block {match.group(1)} but cfg['layer'] is "
            f"{layer}; give the same layer (--layer {match.group(1)}) or leave hook_point unset."
        )


def _short_count(n: int) -> str:
    """1000000 -> '1M', 364544 -> '364544' (exact, so distinct counts stay distinct)."""
    for exponent, suffix in ((9, "G"), (6, "M"), (3, "k")):
        if n % 10**exponent == 0:
            return f"{n // 10**exponent}{suffix}"
    return str(n)


def run_name(cfg: dict) -> str:
    """A descriptive run name: model, hook, dict size, class, sparsity, lr, token budget and seed, e.g.
    ``gpt2_blocks.8.hook_resid_pre_12288_matryoshka_32_0.0003_100Mtok_seed42``. A new run whose folder
    exists takes the next free -2, -3... suffix (checkpoint.claim_run_folder)."""
    model = canonical_model_name(cfg["model_name"]) or cfg["model_name"]
    hook = cfg["hook_point"]
    if cfg["sae_type"] == "matryoshka_transcoder":
        hook = f"{cfg['source_hook_point']}-to-{cfg['target_hook_point']}"
        if cfg.get("transcoder_skip"):
            hook += "-skip"
        if cfg.get("transcoder_selection") == "topk":
            hook += "-topk"
    if cfg["sae_type"] == "matryoshka_clt":
        layers = cfg["clt_layers"]
        hook = f"{cfg['source_site']}-to-{cfg['target_site']}_layers{layers[0]}-{layers[-1]}"
        if cfg["clt_sparsity"] in ("per_layer", "jumprelu"):
            hook += "-" + cfg["clt_sparsity"].replace("_", "-")
    sparsity = cfg["top_k"]
    steers_l0 = cfg["sae_type"] in ("vanilla", "jumprelu") or (
        cfg["sae_type"] == "matryoshka_clt" and cfg["clt_sparsity"] == "jumprelu"
    )
    if steers_l0 and cfg.get("target_l0") is not None:
        sparsity = f"L0-{cfg['target_l0']:g}"
    return (
        f"{model.replace('/', '_')}_{hook}_{cfg['dict_size']}_{cfg['sae_type']}_{sparsity}_{cfg['lr']}"
        f"_{_short_count(int(cfg['num_tokens']))}tok_seed{cfg['seed']}"
    )


def cfg_to_json(cfg: dict[str, Any]) -> str:
    """Serialise a cfg (dtypes become strings such as 'bfloat16')."""

    def encode(value: Any) -> Any:
        if isinstance(value, torch.dtype):
            return str(value).removeprefix("torch.")
        if isinstance(value, torch.device):
            return str(value)
        if value is None or isinstance(value, (bool, int, float, str, list, dict)):
            return value
        return f"<{type(value).__name__}>"  # e.g. a datasets.Dataset given as dataset_path

    saved = {k: encode(v) for k, v in cfg.items()}
    saved["format_version"] = FORMAT_VERSION
    return json.dumps(saved, indent=2, sort_keys=True)


def cfg_from_json(text: str) -> dict[str, Any]:
    """Inverse of `cfg_to_json`: dtype settings come back as torch dtypes, and a cfg of an older
    format version comes back with the settings of its version (`upgrade_saved_cfg`)."""
    cfg = upgrade_saved_cfg(json.loads(text))
    for key in DTYPE_SETTINGS:
        if key in cfg:
            cfg[key] = _as_dtype(cfg[key], key)
    return cfg


def upgrade_saved_cfg(cfg: dict[str, Any]) -> dict[str, Any]:
    """A saved cfg (with its "format_version", absent: 0), brought to this version's keys with the
    behaviour of the version that saved it.

    Renamed keys take their new name and retired ones are dropped, each with a warning. Settings
    the file lacks take, for each format version from the file's up to this one, the values of
    `FORMAT_UPGRADES` (the older version's behaviour), then the defaults. The returned cfg holds no
    "format_version": it is written again by `cfg_to_json`.
    """
    version = cfg.pop("format_version", 0)
    if (
        not isinstance(version, int)
        or isinstance(version, bool)
        or not 0 <= version <= FORMAT_VERSION
    ):
        raise ValueError(
            f"The saved cfg has format_version {version!r}, but this version of the library reads "
            f"formats 0..{FORMAT_VERSION}; load it with the newer version that wrote it."
        )
    for old in range(version, FORMAT_VERSION):
        for key, value in FORMAT_UPGRADES[old].items():
            if key not in cfg:
                value = value(cfg) if callable(value) else value
                if value is not None or key in default_settings():
                    cfg[key] = value
    for key in [key for key in cfg if key not in known_keys()]:
        new_key = RETIRED_KEYS.get(key)
        value = cfg.pop(key)
        if new_key is not None:
            cfg.setdefault(new_key, value)
        warnings.warn(
            f"The saved cfg has the setting {key!r}, which this version "
            + (f"calls {new_key!r}." if new_key else "no longer has; it is ignored."),
            stacklevel=3,
        )
    for key, value in default_settings().items():
        cfg.setdefault(key, value)
    return cfg
