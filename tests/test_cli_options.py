"""cli_options: the scripts' shared options, their types, overrides of a cfg, one-line usage errors
and what --resume may change."""

import argparse
import sys
from pathlib import Path

import pytest
import torch
from helpers import train_briefly

from matryoshka_sae.checkpoint import checkpoint_folder
from matryoshka_sae.cli import options as cli_options
from matryoshka_sae.cli.options import (
    RUN_OPTIONS,
    ArgumentParser,
    add_resume_argument,
    add_run_arguments,
    apply_overrides,
    check_device,
    check_repeated_options,
    non_negative_int,
    positive_int,
    resumed_cfgs,
)
from matryoshka_sae.config import get_default_cfg, known_keys, post_init_cfg
from matryoshka_sae.settings import SETTINGS, default_settings


def parser_with_run_options(**kwargs) -> ArgumentParser:
    parser = ArgumentParser(prog="script")
    add_run_arguments(parser, **kwargs)
    add_resume_argument(parser)
    return parser


def test_every_run_option_sets_a_setting():
    assert {key for key, _ in RUN_OPTIONS.values()} <= known_keys()


def test_unset_options_keep_the_scripts_values():
    args = parser_with_run_options().parse_args(["--lr", "1e-3", "--top-k", "16"])
    cfg = apply_overrides(get_default_cfg(), args)
    assert (cfg["lr"], cfg["top_k"], cfg["batch_size"]) == (
        1e-3,
        16,
        get_default_cfg()["batch_size"],
    )
    assert apply_overrides(get_default_cfg(), None) == get_default_cfg()


def test_sizes_follow_a_new_model_unless_given():
    args = parser_with_run_options().parse_args(["--model", "gemma-2-2b"])
    cfg = post_init_cfg(apply_overrides(get_default_cfg(), args))
    assert cfg["dict_size"] == 16 * 2304 and sum(cfg["group_sizes"]) == cfg["dict_size"]
    args = parser_with_run_options().parse_args(["--model", "gemma-2-2b", "--dict-size", "4608"])
    cfg = post_init_cfg(apply_overrides(get_default_cfg(), args))
    assert cfg["dict_size"] == 4608 and sum(cfg["group_sizes"]) == 4608


def test_token_counts_read_scientific_notation():
    args = parser_with_run_options().parse_args(["--num-tokens", "2e7"])
    assert args.num_tokens == 20_000_000


@pytest.mark.parametrize("value", ["1.5", "ten", "-3", "0", "1e30", "inf"])
def test_a_bad_token_count_is_a_one_line_usage_error(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parser_with_run_options().parse_args(["--num-tokens", value])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("script: error:") and err.count("\n") == 1
    assert "(see --help)" in err


def test_integer_types():
    assert positive_int("3") == 3 and non_negative_int("0") == 0
    for convert, text in ((positive_int, "0"), (non_negative_int, "-1"), (positive_int, "2.5")):
        with pytest.raises(argparse.ArgumentTypeError):
            convert(text)


def test_excluded_options_are_not_offered(capsys):
    parser = parser_with_run_options(exclude=("--sae-type",))
    with pytest.raises(SystemExit):
        parser.parse_args(["--sae-type", "topk"])
    assert "unrecognized arguments" in capsys.readouterr().err


def test_an_unknown_device_is_a_clear_error():
    with pytest.raises(ValueError, match="not a device torch knows"):
        check_device({"device": "gpu0"})
    check_device({"device": "cpu"})
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            check_device({"device": "cuda"})


def test_resume_repeats_the_saved_settings_and_may_change_the_device(tmp_path):
    _, cfg = train_briefly("batchtopk", tmp_path, n_steps=2)
    folder = str(checkpoint_folder(cfg))
    parser = parser_with_run_options()
    (resumed,) = resumed_cfgs(
        [folder],
        parser.parse_args(
            ["--resume", folder, "--top-k", str(cfg["top_k"]), "--wandb-mode", "offline"]
        ),
    )
    assert resumed["wandb_mode"] == "offline" and resumed["top_k"] == cfg["top_k"]
    assert resumed["name"] == cfg["name"] and resumed["checkpoint_dir"] == str(tmp_path)
    with pytest.raises(ValueError, match="--lr 0.5 \\(saved: 0.003\\)"):
        resumed_cfgs([folder], parser.parse_args(["--resume", folder, "--lr", "0.5"]))


def test_a_group_may_repeat_any_of_its_dictionaries_values():
    cfgs = [{"top_k": 16}, {"top_k": 32}]
    args = argparse.Namespace(top_k=32)
    check_repeated_options(args, cfgs)
    with pytest.raises(ValueError, match="--top-k 8"):
        check_repeated_options(argparse.Namespace(top_k=8), cfgs)


def test_the_options_are_shared_by_the_scripts():
    from matryoshka_sae.cli import main, train_gemma_example

    for parser in (main.build_parser(),):
        options = {action.option_strings[0] for action in parser._actions if action.option_strings}
        assert set(RUN_OPTIONS) <= options
    assert (
        cli_options.RUN_OPTIONS is RUN_OPTIONS
        and train_gemma_example.add_run_arguments is add_run_arguments
    )


def test_the_memory_check_counts_every_hook_a_cross_layer_transcoder_reads(monkeypatch):
    """A CLT over 30 layers buffers 60 hooks' activations: free memory for the dictionary and one
    hook's buffer is not enough."""
    from matryoshka_sae.checkpoint import dictionary_parameters

    cfg = get_default_cfg()
    cfg.update(
        model_name="smollm2-135m",
        sae_type="matryoshka_clt",
        dict_size=64,
        group_sizes=None,
        top_k=4,
        input_unit_norm=False,
        batch_size=4096,
        num_batches_in_buffer=9,
        device="cpu",
    )
    cfg = post_init_cfg(cfg)
    one_hook = 4 * cfg["act_size"] * cfg["batch_size"] * (cfg["num_batches_in_buffer"] + 1)
    enough_for_one_hook = 16 * dictionary_parameters(cfg) + 2 * one_hook
    monkeypatch.setattr(cli_options, "available_memory", lambda device: enough_for_one_hook)
    with pytest.raises(ValueError, match="GiB available"):
        cli_options.check_memory([cfg])
    monkeypatch.setattr(
        cli_options, "available_memory", lambda device: enough_for_one_hook + 60 * one_hook
    )
    cli_options.check_memory([cfg])


SCRIPTS = (
    "main",
    "train_gemma_example",
    "train_clt",
    "cache_activations",
    "inspect_sae",
    "inspect_transcoder_set",
    "evaluate_sae",
    "export_sae",
    "trace_circuit",
)

# Options of the tools that share a name with a setting but do not set a run's setting: where and
# on what text a finished run is evaluated, inspected or traced, and what an export records.
TOOL_OPTIONS = {
    ("train_clt evaluate", "--device"),
    ("evaluate_sae", "--device"),
    ("evaluate_sae", "--dataset"),
    ("evaluate_sae", "--num-tokens"),
    ("inspect_sae", "--num-tokens"),
    ("inspect_transcoder_set", "--num-tokens"),
    ("export_sae", "--dataset-path"),
    ("trace_circuit", "--device"),
    ("trace_circuit", "--batch-size"),
}


def script_options():
    """(script, argparse action) of every option of every script, subcommands included."""
    import importlib

    def walk(label, parser):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for command, subparser in action.choices.items():
                    yield from walk(f"{label} {command}", subparser)
            elif action.option_strings:
                yield label, action

    for script in SCRIPTS:
        module = importlib.import_module(f"matryoshka_sae.cli.{script}")
        yield from walk(script, module.build_parser())


def test_every_flag_that_sets_a_setting_comes_from_the_table():
    flags = {s.flag: name for name, s in SETTINGS.items() if s.flag}
    offered = set()
    for script, action in script_options():
        flag = action.option_strings[0]
        name = flags.get(flag) or (action.dest if action.dest in SETTINGS else None)
        if name is None or (script, flag) in TOOL_OPTIONS:
            continue
        setting = SETTINGS[name]
        negated = [f"--no-{setting.flag[2:]}"] if setting.type == "bool" else []  # --no-skip
        assert (action.option_strings, action.dest) == ([setting.flag, *negated], name), (
            script,
            flag,
        )
        assert action.help.startswith(setting.help), (script, flag)  # (default: ...) may follow
        assert action.choices == (None if setting.choices is None else list(setting.choices)) or (
            setting.type == "dtype"
        ), (script, flag)
        offered.add(name)
    assert offered == set(flags.values())  # and every flag of the table is offered somewhere


def test_the_scripts_override_only_settings_of_the_table():
    from matryoshka_sae.cli import demo, train_clt, train_gemma_example
    from matryoshka_sae.config import CLT_DEFAULT_SITES
    from matryoshka_sae.transcoder_set import SET_DEFAULTS

    overrides = {
        "train_clt.CLT_DEFAULTS": train_clt.CLT_DEFAULTS,
        "demo.DEMO_SETTINGS": demo.DEMO_SETTINGS,
        "train_gemma_example.GEMMA_SAE": train_gemma_example.GEMMA_SAE,
        "train_gemma_example.GEMMA_TRANSCODER": train_gemma_example.GEMMA_TRANSCODER,
        "transcoder_set.SET_DEFAULTS": SET_DEFAULTS,
        "config.CLT_DEFAULT_SITES": CLT_DEFAULT_SITES,
    }
    for where, table in overrides.items():
        assert set(table) <= set(default_settings()), f"{where}: {set(table) - set(SETTINGS)}"


def test_a_scripts_own_setting_flags_take_its_defaults():
    from matryoshka_sae.cli import train_clt, train_gemma_example

    args = train_clt.build_parser().parse_args(["train"])
    assert (args.clt_sparsity, args.source_site, args.target_site) == (
        "global",
        "ln2_normalized",
        "mlp_out",
    )
    args = train_gemma_example.build_parser().parse_args(["transcoder", "--skip"])
    assert (args.source_site, args.target_site, args.transcoder_skip) == (None, "mlp_out", True)


@pytest.mark.parametrize(
    "argv0, script, expected",
    [
        ("main.py", "main.py", "python main.py"),
        ("main.py", "export_sae.py", "python export_sae.py"),
        ("../repo/main.py", "main.py", "python ../repo/main.py"),
        ("../repo/main.py", "export_sae.py", "python ../repo/export_sae.py"),
        ("/venv/bin/sae-train", "main.py", "sae-train"),
        ("/venv/bin/sae-train", "export_sae.py", "sae-export"),
        ("/venv/bin/sae-train-clt", "train_clt.py", "sae-train-clt"),
    ],
)
def test_printed_commands_follow_how_the_user_started(monkeypatch, argv0, script, expected):
    from matryoshka_sae.cli.options import invocation

    monkeypatch.setattr(sys, "argv", [argv0])
    assert invocation(script) == expected


def test_printed_commands_after_python_dash_m(monkeypatch):
    from matryoshka_sae.cli import main as cli_main
    from matryoshka_sae.cli.options import invocation

    monkeypatch.setattr(sys, "argv", [cli_main.__file__])  # what `python -m` puts in argv[0]
    assert invocation("main.py") == "python -m matryoshka_sae.cli.main"


def test_every_console_script_has_its_root_file():
    import tomllib

    from matryoshka_sae.cli.options import CONSOLE_SCRIPTS

    scripts = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert set(CONSOLE_SCRIPTS.values()) == set(scripts["project"]["scripts"])
    for root_file, command in CONSOLE_SCRIPTS.items():
        module = scripts["project"]["scripts"][command].split(":")[0]
        assert module == f"matryoshka_sae.cli.{Path(root_file).stem}"
        assert (Path(__file__).resolve().parents[1] / root_file).is_file()


def test_printed_commands_from_python(monkeypatch):
    """Called from Python (a notebook, pytest), a script's follow-up commands read as typed at the root."""
    from matryoshka_sae.cli.options import invocation

    monkeypatch.setattr(sys, "argv", ["/venv/lib/python3.11/site-packages/pytest/__main__.py"])
    assert invocation("main.py") == "python main.py"
    monkeypatch.setattr(sys, "argv", [""])
    assert invocation("export_sae.py") == "python export_sae.py"
