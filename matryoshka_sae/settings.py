"""Every key a cfg may hold, declared once (`SETTINGS`): name, default, type, help, command-line
flag, the dictionaries that read it, what other libraries call it and the value that older saved
cfgs stand for.

From this table come the default cfg (`default_settings`), the type and name checks that
`post_init_cfg` runs (`check_types`, `check_known_keys`), the format upgrades of saved cfgs
(config.FORMAT_UPGRADES) and the scripts' options (cli/options.py). A script's own defaults are a
small dict of overrides (setting -> value, e.g. cli/train_clt.py's `CLT_DEFAULTS`): nothing else
restates a setting's default, type or help.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

# The values of `sae_type`: one dictionary class each (sae.SAE_CLASSES).
SAE_TYPES = (
    "batchtopk",
    "topk",
    "vanilla",
    "jumprelu",
    "matryoshka",
    "matryoshka_transcoder",
    "matryoshka_clt",
)

# The values of `site` (and of a transcoder's `source_site` and `target_site`): the sites of a
# transformer block and the TransformerLens hook each one names.
HOOK_SITES: dict[str, str] = {
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "resid_mid": "blocks.{layer}.hook_resid_mid",
    "attn_out": "blocks.{layer}.hook_attn_out",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
    "resid_post": "blocks.{layer}.hook_resid_post",
    # Transcoder sources: the MLP's input (needs model.set_use_hook_mlp_in(True)) and the
    # output of the pre-MLP norm, which is what the MLP actually reads.
    "mlp_in": "blocks.{layer}.hook_mlp_in",
    "ln2_normalized": "blocks.{layer}.ln2.hook_normalized",
}

# The types a setting may have. The first five are checked by `check_types`; the others are
# checked where they are read (dtypes, group sizes, layers, devices) or not at all (paths, notes).
TYPES: dict[str, str] = {
    "int": "an integer",
    "count": "an integer",  # a count of tokens: a whole float such as 1e8 is taken as an int
    "number": "a number (int or float)",
    "bool": "True or False",
    "str": "a string",
    "ints": "a list of integers",
    "dtype": "a torch dtype or its name ('bfloat16')",
    "device": "a torch device or its name ('cuda:1')",
    "path": "a file or folder",
    "dataset": "a hub dataset's name, a local file or folder, or a datasets.Dataset",
    "dict": "a dict",
    "any": "any JSON-safe value",
}

# Which dictionary classes read a setting (`Setting.used_by`; empty: every class).
TOPK_FAMILY = ("topk", "batchtopk", "matryoshka", "matryoshka_transcoder", "matryoshka_clt")
BATCHTOPK = ("batchtopk", "matryoshka", "matryoshka_transcoder", "matryoshka_clt")
MATRYOSHKA = ("matryoshka", "matryoshka_transcoder", "matryoshka_clt")
VANILLA = ("vanilla",)
JUMPRELU = ("jumprelu",)
# target_l0 and learned thresholds: a CLT has them with clt_sparsity "jumprelu".
STEERED_L0 = ("vanilla", "jumprelu", "matryoshka_clt")
THRESHOLDS = ("jumprelu", "matryoshka_clt")
TRANSCODER = ("matryoshka_transcoder",)
CLT = ("matryoshka_clt",)
TRANSCODERS = TRANSCODER + CLT


@dataclass(frozen=True)
class Setting:
    """One key of a cfg.

    `default` None means derived by `post_init_cfg` or unused. `flag` is the command-line option
    that sets it: offered by every script that takes the run options (`shared`), or, with
    `shared=False`, only by the scripts that add it by name. `upgrades` maps an older format
    version to the value that gives a saved cfg of that version lacking the setting the behaviour
    of the code that saved it (a function of the saved cfg, or a value). `derived_only`: a key that
    `post_init_cfg` adds, not one of `default_settings()`.
    """

    name: str
    default: Any
    type: str
    help: str
    flag: str | None = None
    shared: bool = True
    choices: tuple | None = None
    metavar: str | None = None
    used_by: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    upgrades: dict[int, Any] = field(default_factory=dict)
    derived_only: bool = False


def _model_width(end: str) -> Callable[[dict], int | None]:
    """Format 0: both ends of a transcoder (`end`: "source" or "target") had the model's width."""
    return lambda cfg: cfg["act_size"] if cfg.get(f"{end}_hook_point") else None


def _table(*settings: Setting) -> dict[str, Setting]:
    """The settings by name (a name declared twice is an error)."""
    table = {}
    for setting in settings:
        if setting.name in table or setting.type not in TYPES:
            raise ValueError(f"setting {setting.name!r}: declared twice or of unknown type")
        table[setting.name] = setting
    return table


# The table: one row per key, in the order of the scripts' --help. Columns: name, default (None:
# derived by post_init_cfg, or unused), type, help; then the flag, allowed values, the classes that
# read it (none: every class), other libraries' names and format upgrades. Rows are laid out by
# hand (fmt: off) so that each reads as one entry.
# fmt: off
SETTINGS: dict[str, Setting] = _table(
    # Where the activations come from
    Setting("model_name", "gpt2-small", "str", "model name, e.g. gpt2, gemma-2-2b, smollm2-135m",
            flag="--model", aliases=("model",)),
    Setting("layer", 8, "int", "the block whose activations are read", flag="--layer",
            aliases=("hook_layer",)),
    Setting("hook_point", None, "str", "TransformerLens hook name (default: from --site and "
            "--layer, with which it must agree)", flag="--hook-point", aliases=("hook_name",),
            derived_only=True),
    Setting("site", "resid_pre", "str", "the hook's site in the block", flag="--site",
            choices=tuple(HOOK_SITES)),
    Setting("act_size", None, "int", "width of the activations; derived from the model",
            aliases=("d_in", "activation_dim")),
    Setting("n_layers", None, "int", "the model's depth, from the model table", derived_only=True),
    Setting("num_tokens", int(1e9), "count", "training tokens, e.g. 1e8", flag="--num-tokens",
            aliases=("training_tokens",)),
    # The dictionary
    Setting("dict_size", None, "int", "latents (a CLT: per source layer); derived: 16 x act_size",
            flag="--dict-size", aliases=("d_sae", "num_latents", "expansion_factor")),
    Setting("group_sizes", None, "ints", "Matryoshka groups (sum = dict size)",
            flag="--group-sizes", used_by=MATRYOSHKA),
    Setting("top_k", 32, "int", "active latents a token (a CLT: a token per source layer)",
            flag="--top-k", aliases=("k", "topk")),
    Setting("top_k_aux", None, "int", "dead latents the AuxK loss decodes; derived: act_size // 2",
            used_by=TOPK_FAMILY),
    Setting("aux_penalty", 1 / 32, "number", "weight of the AuxK loss", used_by=TOPK_FAMILY,
            aliases=("auxk_alpha",)),
    Setting("n_batches_to_dead", 5, "int", "a latent is dead after this many batches' worth of "
            "tokens unfired", aliases=("dead_feature_window",)),
    Setting("sae_type", "matryoshka", "str", "main.py: train one dictionary of this class",
            flag="--sae-type", choices=SAE_TYPES, aliases=("architecture",)),
    # Sparsity of the dense-code SAEs (vanilla ReLU + L1, JumpReLU); the TopK family uses top_k.
    Setting("target_l0", None, "number", "mean L0 for jumprelu (quadratic penalty) or vanilla "
            "(adaptive L1 coefficient); a jumprelu CLT: a token per source layer",
            flag="--target-l0", used_by=STEERED_L0, upgrades={0: None}),
    Setting("jumprelu_objective", None, "str", "jumprelu: the sparsity objective; derived: "
            "quadratic with a target_l0, else step", flag="--jumprelu-objective",
            choices=("step", "tanh", "quadratic"), used_by=JUMPRELU, upgrades={0: "step"}),
    Setting("l1_coeff", None, "number", "vanilla: L1 coefficient (default 4 / act_size; 0 for the "
            "TopK family)", flag="--l1-coeff", used_by=VANILLA, aliases=("l1_coefficient",)),
    Setting("l1_coeff_relative", True, "bool", "vanilla: l1_coeff times the RMS of the centred "
            "inputs (VanillaSAE)", used_by=VANILLA, upgrades={0: False}),
    Setting("l1_warmup_steps", None, "int", "vanilla: steps ramping l1_coeff up from 0; derived: "
            "5% of the run", used_by=VANILLA, upgrades={0: 0}),
    Setting("relu_bias_init", None, "number", "vanilla: the initial b_enc; None: from the first "
            "batch", used_by=VANILLA, upgrades={0: 0.0}),
    Setting("l0_coeff", None, "number", "jumprelu: the objective's coefficient (default 1 for the "
            "quadratic objective, else 1e-3)", flag="--l0-coeff", used_by=JUMPRELU),
    Setting("l0_warmup_steps", 0, "int", "jumprelu step/tanh objectives: steps ramping l0_coeff "
            "up from 0", used_by=JUMPRELU, upgrades={0: 0}),
    Setting("jumprelu_tanh_scale", 4.0, "number", "tanh objective: c in tanh(c z) (Anthropic's, "
            "standardised units)", used_by=JUMPRELU),
    Setting("pre_act_coeff", 3e-6, "number", "tanh objective: weight of the pre-activation loss "
            "(Anthropic's)", used_by=JUMPRELU),
    Setting("bandwidth", None, "number", "jumprelu straight-through window, pre-activation "
            "units; None: relative", used_by=THRESHOLDS),
    Setting("jumprelu_relative_bandwidth", 0.1, "number", "window = this x each latent's "
            "threshold (when bandwidth is None)", used_by=THRESHOLDS),
    Setting("jumprelu_threshold_init", None, "number", "initial thresholds; None: from the first "
            "batch, each latent firing at (target_l0 or top_k) / dict_size", used_by=THRESHOLDS),
    Setting("jumprelu_threshold_lr_scale", 10.0, "number", "log_threshold's lr / lr: thresholds "
            "keep up with the encoder", used_by=THRESHOLDS, upgrades={0: 1.0}),
    # A batch's smallest kept value is a quantile of k x batch values, so it is steady, and a fast
    # average keeps up with its drift during training.
    Setting("threshold_ema_rate", 0.05, "number", "BatchTopK eval threshold: the rate of the EMA "
            "of the smallest kept activation", used_by=BATCHTOPK),
    Setting("input_unit_norm", True, "bool", "standardise each token before encoding; outputs in "
            "original units", aliases=("normalize_activations",)),
    # Optimisation
    Setting("batch_size", 4096, "int", "activations per training step", flag="--batch-size",
            aliases=("train_batch_size_tokens",)),
    Setting("lr", 3e-4, "number", "Adam's learning rate", flag="--lr", aliases=("learning_rate",)),
    Setting("beta1", 0.9, "number", "Adam's beta1"),
    Setting("beta2", 0.99, "number", "Adam's beta2"),
    Setting("max_grad_norm", 100000, "number", "gradients are clipped to this norm"),
    Setting("lr_warmup_steps", 0, "int", "steps of linear learning-rate warm-up from 0",
            flag="--lr-warmup-steps", aliases=("lr_warm_up_steps", "warmup_steps")),
    Setting("lr_decay_frac", 0.0, "number", "fraction of training, at the end, with linear decay "
            "to 0", flag="--lr-decay-frac"),
    # Device and precision
    Setting("device", None, "device", "cuda, cuda:1, cpu, ... (derived: cuda when available, "
            "else cpu)", flag="--device"),
    Setting("dtype", torch.float32, "dtype", "SAE encoder matmul dtype (weights stay float32)",
            flag="--dtype"),
    Setting("model_dtype", torch.float32, "dtype", "the model's dtype", flag="--model-dtype"),
    # Activations: text streamed from the hub by default. (Skylion007/openwebtext, the original's,
    # is a loading script, which datasets >= 4 no longer runs.)
    Setting("dataset_path", "HuggingFaceFW/fineweb-edu", "dataset", "hub dataset, local file, or "
            "python-docs (no download)", flag="--dataset", aliases=("dataset",)),
    Setting("seq_len", 128, "int", "tokens a row of text", flag="--seq-len",
            aliases=("context_size", "ctx_len")),
    Setting("model_batch_size", 512, "int", "token rows per model forward pass",
            flag="--model-batch-size", aliases=("store_batch_size_prompts",)),
    Setting("num_batches_in_buffer", 10, "int", "training batches of activations in the "
            "shuffling buffer", flag="--num-batches-in-buffer"),
    Setting("n_eval_rows", 32, "int", "held-out rows of seq_len tokens for the CE evaluation "
            "(kept out of training)", flag="--n-eval-rows"),
    Setting("eval_dataset_path", None, "dataset", "where the held-out rows come from; None: the "
            "first documents of dataset_path"),
    Setting("exclude_bos", None, "bool", "leave BOS positions out; derived: True for Gemma (its "
            "BOS activations are outliers)"),
    Setting("bos_token_id", None, "int", "for token data without a tokenizer; else the "
            "tokenizer's BOS"),
    Setting("seed", 49, "int", "seed of the initialisation and the data order", flag="--seed"),
    # Logging and checkpoints
    Setting("wandb_mode", None, "str", "derived: online with an API key, else offline",
            flag="--wandb-mode", choices=("online", "offline", "disabled")),
    Setting("wandb_project", "sparse_autoencoders", "str", "wandb project",
            flag="--wandb-project"),
    Setting("log_freq", 10, "int", "steps between logs", flag="--log-freq"),
    Setting("perf_log_freq", 1000, "int", "steps between CE-loss evaluations",
            flag="--perf-log-freq"),
    Setting("checkpoint_freq", 10000, "int", "steps between checkpoints",
            flag="--checkpoint-freq"),
    Setting("checkpoint_dir", "checkpoints", "path", "folder of the run folders "
            "(checkpoint_dir/name)", flag="--checkpoint-dir"),
    Setting("activation_cache", None, "path", "train from this activation cache "
            "(cache_activations.py) instead of running the model", flag="--activations",
            metavar="DIR"),
    # torchrun (distributed.py)
    Setting("distribute_dictionaries", False, "bool", "under torchrun: each rank trains whole "
            "dictionaries of the group on every rank's activations (instead of every rank all of "
            "them)", flag="--distribute-dictionaries"),
    Setting("data_lanes", None, "int", "deal the documents to this many lanes (default: the "
            "number of ranks); the batches are the same on any number of ranks dividing it",
            flag="--data-lanes"),
    Setting("distributed_debug", False, "bool", "under torchrun: check every log_freq steps that "
            "the ranks' weights are equal", flag="--distributed-debug"),
    Setting("distributed_timeout_s", 600, "number", "a collective that waits longer fails (a "
            "rank died or hangs)"),
    # Transcoders (set by create_transcoder_config) and cross-layer transcoders
    Setting("source_site", None, "str", "the site a transcoder reads; default: resid_mid for one "
            "transcoder, ln2_normalized for a set (--layers) or a CLT", flag="--source-site",
            shared=False, choices=tuple(HOOK_SITES), used_by=TRANSCODERS),
    Setting("source_layer", None, "int", "the layer a transcoder reads", used_by=TRANSCODER),
    Setting("target_site", None, "str", "the site a transcoder predicts; default: mlp_out",
            flag="--target-site", shared=False, choices=tuple(HOOK_SITES), used_by=TRANSCODERS),
    Setting("target_layer", None, "int", "the layer a transcoder predicts", used_by=TRANSCODER),
    Setting("source_hook_point", None, "str", "a transcoder's source hook", used_by=TRANSCODER,
            derived_only=True),
    Setting("target_hook_point", None, "str", "a transcoder's target hook", used_by=TRANSCODER,
            derived_only=True),
    Setting("source_act_size", None, "int", "width of the source activations",
            used_by=TRANSCODERS, upgrades={0: _model_width("source")}, derived_only=True),
    Setting("target_act_size", None, "int", "width of the target activations",
            used_by=TRANSCODERS, upgrades={0: _model_width("target")}, derived_only=True),
    Setting("transcoder_skip", False, "bool", "skip transcoder: an affine path x W_skip added to "
            "every prediction", flag="--skip", shared=False, used_by=TRANSCODER,
            upgrades={0: False}),
    Setting("transcoder_target_norm", False, "bool", "divide a transcoder's target by a power of "
            "two near its RMS, measured on the first batch (input_unit_norm does too): each layer "
            "of a set then trains in units of its own size; exports fold the scale into the "
            "decoder", flag="--target-norm", shared=False, used_by=TRANSCODER),
    Setting("transcoder_selection", "batchtopk", "str", "transcoder latents: batchtopk (the k x "
            "batch largest of the batch) or topk (the k largest of each token)",
            choices=("batchtopk", "topk"), used_by=TRANSCODER),
    Setting("clt_layers", None, "ints", "the layers a CLT reads and writes, ascending; None: "
            "every layer of the model", used_by=CLT),
    Setting("clt_sparsity", "global", "str", "BatchTopK over every layer's latents (default) or "
            "within each source layer, or jumprelu: a learned threshold per latent, steered to "
            "--target-l0 a token per source layer", flag="--sparsity", shared=False,
            choices=("global", "per_layer", "jumprelu"), used_by=CLT),
    # Bookkeeping
    Setting("notes", None, "any", "free-form bookkeeping of the user's (any JSON-safe value); "
            "the library never reads it"),
    Setting("name", None, "str", "the run's name and folder; derived from the model, hook, "
            "class, sparsity, lr, tokens and seed", derived_only=True),
    Setting("derived", None, "dict", "the values post_init_cfg derived (derived anew when the "
            "cfg changes)", derived_only=True),
)
# fmt: on


def default_settings() -> dict[str, Any]:
    """Every setting with its default before derivation (None: derived by `post_init_cfg`).

    These keys, the derived ones (`DERIVED_KEYS`) and ``"notes"`` are the only keys a cfg may hold.
    """
    return {name: s.default for name, s in SETTINGS.items() if not s.derived_only}


# Keys that `post_init_cfg` adds to a cfg besides the settings of `default_settings()`.
DERIVED_KEYS = tuple(name for name, s in SETTINGS.items() if s.derived_only)

# What other libraries (SAELens, sparsify, dictionary_learning) call our settings: suggested when a
# cfg holds one of these names, which string similarity alone would not find.
OTHER_NAMES = {alias: name for name, s in SETTINGS.items() for alias in s.aliases}


def names_of_type(*types: str) -> tuple[str, ...]:
    """The settings of these types, in the table's order."""
    return tuple(name for name, s in SETTINGS.items() if s.type in types)


def format_upgrades(version: int) -> dict[str, Any]:
    """The values that give a saved cfg of format `version` lacking a setting its behaviour."""
    return {name: s.upgrades[version] for name, s in SETTINGS.items() if version in s.upgrades}


def check_known_keys(cfg: dict) -> None:
    """A key that is not a setting is a misspelling: raise with the closest known names."""
    for key in cfg:
        if key in SETTINGS:
            continue
        close = (
            [OTHER_NAMES[key]]
            if key in OTHER_NAMES
            else difflib.get_close_matches(key, SETTINGS, n=3)
        )
        hint = (
            f"did you mean {' or '.join(repr(name) for name in close)}?"
            if close
            else "config.default_settings() lists the settings."
        )
        raise ValueError(
            f"cfg[{key!r}] is not a setting; {hint} (Keep notes of your own under cfg['notes'].)"
        )


def _has_type(value: Any, type_: str) -> bool:
    if type_ in ("int", "count"):
        return isinstance(value, int) and not isinstance(value, bool)
    if type_ == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if type_ == "bool":
        return isinstance(value, bool)
    return isinstance(value, str)


def check_types(cfg: dict) -> None:
    """Each int, count, number, bool and str setting holds that type (or None); raises naming the
    setting. A count written as a whole float (1e8, a natural way to write a token count) becomes
    an int."""
    for key in names_of_type("int", "count", "number", "bool", "str"):
        value, type_ = cfg.get(key), SETTINGS[key].type
        if type_ == "count" and isinstance(value, float) and value.is_integer():
            cfg[key] = value = int(value)
        if value is not None and not _has_type(value, type_):
            raise ValueError(
                f"cfg[{key!r}] must be {TYPES[type_]}, got {type(value).__name__} {value!r}."
            )
