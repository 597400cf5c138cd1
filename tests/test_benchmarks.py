"""The benchmarks: they time the library's own training step, share one harness, and docs/results.md
is what benchmarks/results/*.json give."""

import ast
import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import harness  # noqa: E402
import render_results  # noqa: E402

# peers.py assembles the other libraries' steps from their own trainer code (their optimizers and
# backward passes); every other file must step our dictionaries through training.py.
PEER_CODE = {"peers.py"}
SCRIPTS = sorted(
    path for path in BENCHMARKS.glob("*.py") if path.name not in PEER_CODE | {"harness.py"}
)


def calls_and_attributes(path: Path) -> tuple[set[str], set[str]]:
    tree = ast.parse(path.read_text())
    attributes = {ast.unparse(node) for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    calls = {
        node.func.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
    }
    return calls, attributes


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda path: path.name)
def test_benchmarks_step_through_the_library(path):
    """No optimizer, backward pass or decoder-norm step of a benchmark's own: training.py's
    make_optimizer and training_step (or its loops) are what gets timed."""
    calls, attributes = calls_and_attributes(path)
    own = sorted(
        {a for a in attributes if a.startswith("torch.optim")}
        | calls
        & {"backward", "clip_grad_norm_", "remove_parallel_decoder_grad", "normalize_decoder"}
    )
    assert not own, (
        f"{path.name} builds its own training step ({own}); use training.make_optimizer/training_step"
    )


def test_the_peers_file_steps_no_dictionary_of_ours():
    tree = ast.parse((BENCHMARKS / "peers.py").read_text())
    imported = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not imported & {"sae", "training", "sparse_ops"}


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda path: path.name)
def test_benchmarks_use_the_harness(path):
    """Import paths come from harness.py (no sys.path edits of their own), so that every script
    runs from any folder the same way."""
    tree = ast.parse(path.read_text())
    imports = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    assert "harness" in imports, f"{path.name} does not import harness"
    assert "sys.path" not in {
        ast.unparse(node) for node in ast.walk(tree) if isinstance(node, ast.Attribute)
    }


def test_timing_synchronises_the_device(monkeypatch):
    events = []
    monkeypatch.setattr(
        torch.cuda, "synchronize", lambda device=None: events.append(("sync", device))
    )
    seconds = harness.timed(lambda: events.append("work"), "cuda:0")
    assert events == [("sync", "cuda:0"), "work", ("sync", "cuda:0")] and seconds >= 0
    events.clear()
    harness.timed(lambda: events.append("work"), "cpu")
    assert events == ["work"]
    assert len(harness.step_times(lambda i: None, steps=3, warmup=2)) == 3


def test_a_case_runs_in_its_own_process(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(
        f"import sys; sys.path.insert(0, {str(BENCHMARKS)!r}); import harness, os\n"
        "print('noise'); harness.emit({'pid': os.getpid(), 'args': sys.argv[1:]})\n"
    )
    result = harness.run_isolated([worker, "a", 3])
    assert result["args"] == ["a", "3"] and result["pid"] != __import__("os").getpid()
    worker.write_text("raise SystemExit('no luck')\n")
    assert "no luck" in harness.run_isolated([worker])["error"]


def test_the_stamp_says_when_where_and_with_what():
    stamp = harness.environment(threads=3)
    assert stamp["commit"] and stamp["cores"] >= 1 and stamp["threads"] == 3
    assert len(stamp["load_average"]) == 3 and stamp["packages"]["torch"] == torch.__version__
    assert stamp["when"].endswith("UTC") and stamp["cpu"]


def test_results_render_with_their_stamp(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["benchmarks/bench_x.py", "--size", "8"])
    at_start = harness.environment()
    rows = [{"size": "8x64", "tokens_per_s": 1234.5}, {"size": "16x128", "tokens_per_s": 99.0}]
    harness.save(
        "x",
        "A benchmark",
        rows,
        {"batch": 16},
        environment_at_start=at_start,
        path=tmp_path / "x.json",
    )
    record = json.loads((tmp_path / "x.json").read_text())
    assert record["command"].endswith("bench_x.py --size 8") and record["columns"] == [
        "size",
        "tokens_per_s",
    ]
    page = render_results.render(tmp_path)
    assert "## A benchmark" in page and "| 8x64 | 1,234 |" in page and "| 16x128 | 99 |" in page
    assert (
        f"at commit {at_start['commit']}" in page
        and at_start["cpu"] in page
        and "load average" in page
    )


def test_docs_results_is_rendered_from_the_result_files():
    """docs/results.md is exactly what benchmarks/results/*.json give (run render_results.py after
    measuring), and every result file is a harness record."""
    assert (REPO / "docs" / "results.md").read_text() == render_results.render()
    for path in harness.RESULTS_DIR.glob("*.json"):
        record = json.loads(path.read_text())
        assert record["environment"]["commit"] and record["rows"], path.name


def test_budget_curve_levers_replace_the_curve_settings_and_refuse_unknown_keys():
    import budget_curve

    args = budget_curve.build_parser().parse_args(
        ["train", "--setting", "lr=0.004", "--setting", "aux_penalty=0", "--setting", "name=x"]
    )
    settings = budget_curve.run_settings(args, 20480)
    assert settings["lr"] == 0.004 and settings["aux_penalty"] == 0 and settings["name"] == "x"
    assert settings["num_tokens"] == 20480 and settings["dict_size"] == 1152
    for bad in ("learning_rat=1", "lr"):
        with pytest.raises(SystemExit, match="--setting"):
            budget_curve.extra_settings([bad])


@pytest.mark.parametrize(
    "pair, refusal",
    [
        ("input_unit_norm=false", "changes none of the set's cfgs"),  # the set's default
        ("transcoder_selection=topk", "changes none of the set's cfgs"),  # fixed by its kind
        ("aux_penalty=-1", "aux_penalty"),  # a value the cfgs reject
    ],
)
def test_budget_curve_refuses_a_lever_that_changes_nothing_or_is_rejected(pair, refusal):
    import budget_curve

    args = budget_curve.build_parser().parse_args(["train", "--setting", pair])
    with pytest.raises(SystemExit, match=refusal) as refused:
        budget_curve.check_settings(args)
    assert "\n" not in str(refused.value)
    skip = budget_curve.build_parser().parse_args(["train", "--setting", "transcoder_skip=true"])
    budget_curve.check_settings(skip)  # a lever that reaches the set's transcoders


def test_budget_curve_extrapolates_a_power_law_exactly():
    import budget_curve

    tokens = [20480, 81920, 327680]
    gaps = [3.0 * t**-0.25 for t in tokens]  # gap = a t^b with b = -1/4
    expected = (3.0 / 0.1) ** 4
    assert budget_curve.crossing_budget(tokens, gaps, 0.1) == pytest.approx(expected, rel=1e-6)
    assert budget_curve.crossing_budget(tokens, [0.5, 0.6, 0.7], 0.1) is None  # not shrinking


def test_budget_curve_says_when_the_features_overtake_the_errors():
    import math

    import budget_curve

    tokens = [20480, 81920, 327680]
    margins = [0.4 - 0.1 * math.log2(t / 20480) / 2 for t in tokens]  # -0.1 per 4x: 0 at 4^4 x
    assert budget_curve.share_crossing(tokens, margins) == pytest.approx(20480 * 4**4, rel=1e-6)
    assert budget_curve.share_crossing(tokens, [0.3, -0.1, -0.2]) == 81920  # measured, not fitted
    assert budget_curve.share_crossing(tokens, [0.1, 0.2, 0.3]) is None


def test_budget_curve_report_keeps_the_earlier_rows_of_a_dictionary_not_trained_again(
    tmp_path, monkeypatch
):
    """The CLT measured again under --out on a fresh machine: its rows are the new ones, and the
    set's (no run folder here) stay as the result file had them, with their environment."""
    import budget_curve

    earlier_set = [
        {"dictionary": "set", "tokens": 20480, "fvu_mean": 0.7},
        {"dictionary": "set, 2048 feature nodes", "tokens": 20480, "feature_share": 0.6},
    ]
    earlier = {
        "environment": {"when": "earlier"},
        "rows": [*earlier_set, {"dictionary": "clt", "tokens": 20480, "fvu_mean": 0.9}],
        "settings": {
            "runs": {"set": {"what": "set"}, "clt": {"what": "clt"}},
            "extrapolated_tokens_to_target": {"set": {"fvu_mean": 5}, "clt": {"fvu_mean": 6}},
        },
    }
    committed = tmp_path / "budget_curve.json"
    committed.write_text(json.dumps(earlier))
    monkeypatch.setattr(budget_curve.harness, "result_path", lambda name: committed)
    row = dict(tokens=20480, train_seconds=1.0, fvu_mean=0.5, fvu_max=0.6, dead_latents=0)
    row.update(loss_recovered=0.8, kl_divergence=5.0, l0_total=480.0)
    tokens = [20480, 81920]
    rows = [{**row, "tokens": t, "fvu_mean": 10.0 * t**-0.25} for t in tokens]
    (tmp_path / "out" / "clt").mkdir(parents=True)
    curve = {"rows": rows, "settings": {"what": "clt", "new": True}}
    (tmp_path / "out" / "clt" / "curve.json").write_text(json.dumps(curve))
    saved = {}
    monkeypatch.setattr(
        budget_curve.harness,
        "save",
        lambda name, title, rows, settings, **_: saved.update(rows=rows, settings=settings),
    )
    monkeypatch.setattr(budget_curve, "plot", lambda rows, path: None)
    args = budget_curve.build_parser().parse_args(["report", "--out", str(tmp_path / "out")])
    budget_curve.report(args)
    assert saved["rows"][:2] == earlier_set
    assert [(r["dictionary"], r["tokens"]) for r in saved["rows"][2:]] == [
        ("clt", 20480),
        ("clt", 81920),
    ]
    settings = saved["settings"]
    assert settings["runs"] == {"set": {"what": "set"}, "clt": {"what": "clt", "new": True}}
    assert settings["kept_from_the_earlier_result"] == {"set": {"when": "earlier"}}
    assert settings["extrapolated_tokens_to_target"]["set"] == {"fvu_mean": 5}
    assert settings["extrapolated_tokens_to_target"]["clt"]["fvu_mean"] > 81920  # measured anew
    # a second report keeps the first measurement's environment, not its own
    committed.write_text(
        json.dumps({"environment": {"when": "later"}, "rows": saved["rows"], "settings": settings})
    )
    budget_curve.report(args)
    assert saved["settings"]["kept_from_the_earlier_result"] == {"set": {"when": "earlier"}}
    with pytest.raises(SystemExit, match="train` first"):
        monkeypatch.setattr(budget_curve.harness, "result_path", lambda name: tmp_path / "none")
        budget_curve.report(budget_curve.build_parser().parse_args(["report", "--out", "/none"]))


def docs_recipe_argv() -> list[str]:
    """The arguments of the first command of docs/transcoder_sets.md (the CPU recipe)."""
    import re
    import shlex

    text = (REPO / "docs" / "transcoder_sets.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    command = re.search(r"^python train_gemma_example\.py (.*?)(?<!\\)\n", block, re.S | re.M)
    return shlex.split(command.group(1).replace("\\\n", " "))


def same_training(recipe: list[dict], curve: list[dict]) -> None:
    """Layer by layer, the cfgs differ only where the runs are written and how often they log or
    checkpoint, which do not change the training."""
    bookkeeping = {"checkpoint_dir", "checkpoint_freq", "wandb_mode", "perf_log_freq", "derived"}
    assert len(recipe) == len(curve) == 30
    for ours, theirs in zip(recipe, curve):
        differing = {k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k)}
        assert differing <= bookkeeping, differing


# The recipe's flags that are levers of the budget curve, as budget_curve.py's --setting.
RECIPE_LEVERS = {
    "--skip": "transcoder_skip=true",
    "--target-norm": "transcoder_target_norm=true",
}


@pytest.mark.parametrize("variant", ["recipe", "plain"])
def test_the_docs_cpu_recipe_trains_what_the_budget_curve_measured(variant):
    """The first command of docs/transcoder_sets.md builds the training settings of the budget
    curve's run with the same levers (--setting) and k, at the same token budget (the figures the
    docs give for it); without its levers and at k 16, those of the curve's plain set, the docs'
    second recipe."""
    import budget_curve

    from matryoshka_sae.cli import train_gemma_example

    documented = docs_recipe_argv()
    assert "--skip" in documented
    top_k = documented[documented.index("--top-k") + 1]
    levers = [flag for flag in documented if flag in RECIPE_LEVERS]
    curve_args = ["train", "--top-k", top_k]
    for flag in levers:
        curve_args += ["--setting", RECIPE_LEVERS[flag]]
    argv = documented
    if variant == "plain":  # the docs: without --skip, with --no-target-norm, k 16
        argv = [arg for arg in documented if arg not in RECIPE_LEVERS] + ["--no-target-norm"]
        argv[argv.index("--top-k") + 1] = "16"
        curve_args = ["train"]
    recipe = train_gemma_example.set_cfgs(train_gemma_example.build_parser().parse_args(argv))
    curve = budget_curve.set_cfgs(
        budget_curve.build_parser().parse_args(curve_args),
        recipe[0]["num_tokens"],
        Path("unused"),
        bos=None,
    )
    assert all(cfg["transcoder_skip"] == (variant == "recipe") for cfg in curve)
    same_training(recipe, curve)


def test_budget_curve_levers_table_names_what_each_variant_changed(tmp_path, monkeypatch):
    import budget_curve

    base = budget_curve.run_settings(budget_curve.build_parser().parse_args(["train"]), 81920)
    variants = (
        ("baseline", {}, 0.6),
        ("lr_0.004", {"lr": 0.004}, 0.5),
        ("aux", {"aux_penalty": 0}, 0.7),
    )
    for variant, change, fvu in variants:
        folder = tmp_path / variant / "set"
        folder.mkdir(parents=True)
        row = dict(tokens=81920, train_seconds=400.0, fvu_mean=fvu, fvu_max=0.9, dead_latents=3)
        row.update(loss_recovered=0.8, kl_divergence=5.0, l0_total=480.0)
        curve = {"rows": [row], "settings": {**base, **change, "what": "set", "layers": 30}}
        (folder / "curve.json").write_text(json.dumps(curve))
    # lr_0.004's budget traced under the protocol, and again with 2048 feature nodes
    means = {f"mean_{key}": 0.25 for key in budget_curve.GRAPH_MEASURES.values()}
    block = {**means, "graphs": [{"prompt": "a"}]}
    result = {"dictionary": block, "null_silent": means, "null_random": means}
    for folder in ("traces_81920", "traces_81920_nodes2048"):
        (tmp_path / "lr_0.004" / "set" / folder).mkdir()
        with_nodes = {**result, "protocol": {"max_feature_nodes": 2048}}
        (tmp_path / "lr_0.004" / "set" / folder / "trace_results.json").write_text(
            json.dumps(with_nodes)
        )
    # and measured again by `confirm` on its own text and prompts (traced with 2048 nodes)
    confirming = tmp_path / "lr_0.004" / "set" / "confirm_81920"
    confirming.mkdir()
    measured = {**row, "fvu_mean": 0.45, "environment": {}, "fvu_per_layer": {"0": 0.45}}
    (confirming / "confirm.json").write_text(json.dumps(measured))
    (confirming / "trace_results.json").write_text(json.dumps(with_nodes))
    # and its confirming prompts traced again by hand with 256 nodes, with the nulls
    by_hand = tmp_path / "lr_0.004" / "set" / "confirm_81920_nodes256"
    by_hand.mkdir()
    with_nulls = {**result, "protocol": {"max_feature_nodes": 256}}
    (by_hand / "trace_results.json").write_text(json.dumps(with_nulls))
    # aux's confirming trace stopped after one graph: that graph's figures stand for it
    stopped = tmp_path / "aux" / "set" / "confirm_81920"
    (stopped / "graphs").mkdir(parents=True)
    (stopped / "confirm.json").write_text(json.dumps({**measured, "max_feature_nodes": 2048}))
    one_graph = {"prompt": "b", **{key: 0.5 for key in budget_curve.GRAPH_MEASURES.values()}}
    (stopped / "graphs" / "prompt-0.json").write_text(json.dumps(one_graph))
    saved = {}
    monkeypatch.setattr(
        budget_curve.harness,
        "save",
        lambda name, title, rows, settings, **_: saved.update(rows=rows, settings=settings),
    )
    monkeypatch.setattr(budget_curve.harness, "result_path", lambda name: tmp_path / "none.json")
    budget_curve.levers(budget_curve.build_parser().parse_args(["levers", "--out", str(tmp_path)]))
    assert [(r["variant"], r["changed"], r.get("fvu_mean")) for r in saved["rows"]] == [
        ("baseline", "none", 0.6),
        ("aux", "aux_penalty=0", 0.7),
        ("aux", "aux_penalty=0", 0.45),  # confirmed; its trace stopped after one graph
        ("lr_0.004", "lr=0.004", 0.5),
        ("lr_0.004", "lr=0.004", None),  # its graphs with 2048 feature nodes
        ("lr_0.004", "lr=0.004", 0.45),  # confirmed on other text and prompts
        ("lr_0.004", "lr=0.004", None),  # its confirming prompts with 256 nodes and the nulls
    ]
    assert "feature_share" not in saved["rows"][0]
    stopped_row = saved["rows"][2]
    assert stopped_row["trace_complete"] is False and stopped_row["prompts"] == 1
    assert stopped_row["feature_share"] == 0.5 and stopped_row["feature_nodes"] == 2048
    traced, wider, confirmed, by_hand_row = saved["rows"][3:]
    assert traced["feature_share"] == traced["null_silent_error_share"] == 0.25
    assert wider["feature_nodes"] == 2048 and wider["tokens"] == 81920
    assert confirmed["held_out"] == "confirming" and "held_out" not in traced
    assert confirmed["feature_nodes"] == 2048 and confirmed["feature_share"] == 0.25
    assert "fvu_per_layer" not in confirmed
    assert by_hand_row["held_out"] == "confirming" and by_hand_row["tokens"] == 81920
    assert by_hand_row["feature_nodes"] == 256 and by_hand_row["null_random_feature_share"] == 0.25
    with pytest.raises(SystemExit, match="train first"):
        budget_curve.levers(
            budget_curve.build_parser().parse_args(["levers", "--out", "/nonexistent"])
        )
    # Trained again on a fresh machine, lr_0.004 alone: its new row stands, the others' stay as
    # the result file had them, each with the environment it was measured in.
    earlier = {
        "environment": {"when": "earlier"},
        "rows": saved["rows"],
        "settings": saved["settings"],
    }
    committed = tmp_path / "budget_levers.json"
    committed.write_text(json.dumps(earlier))
    monkeypatch.setattr(budget_curve.harness, "result_path", lambda name: committed)
    fresh = tmp_path / "fresh" / "lr_0.004" / "set"
    fresh.mkdir(parents=True)
    retrained = {"rows": [{**row, "fvu_mean": 0.3}], "settings": {**base, "lr": 0.004}}
    (fresh / "curve.json").write_text(json.dumps(retrained))
    args = budget_curve.build_parser().parse_args(["levers", "--out", str(tmp_path / "fresh")])
    budget_curve.levers(args)
    assert [(r["variant"], r.get("fvu_mean")) for r in saved["rows"]] == [
        ("baseline", 0.6),
        ("aux", 0.7),
        ("aux", 0.45),
        ("lr_0.004", 0.3),
    ]
    kept = saved["settings"]["kept_from_the_earlier_result"]
    assert kept == {"baseline": {"when": "earlier"}, "aux": {"when": "earlier"}}
    assert saved["settings"]["variants"]["aux"] == {"aux_penalty": 0}


def test_budget_curve_confirms_on_prompts_the_curve_never_traces(tmp_path):
    """`confirm` takes the held-out split's last documents (the curve its first), and refuses a
    budget the run has not trained before loading anything."""
    import budget_curve

    pytest.importorskip("datasets")
    first = budget_curve.held_out_prompts(5)
    last = budget_curve.held_out_prompts(5, last=True)
    assert len(set(first + last)) == 10
    (tmp_path / "set").mkdir()
    (tmp_path / "set" / "curve.json").write_text(json.dumps({"rows": [{"tokens": 81920}]}))
    args = ["confirm", "--out", str(tmp_path), "--budgets", "81920", "327680"]
    with pytest.raises(SystemExit, match=r"--budgets \[327680\] not trained"):
        budget_curve.confirm(budget_curve.build_parser().parse_args(args))


def test_budget_curve_reports_graphs_kept_with_more_feature_nodes(tmp_path):
    import budget_curve

    def graph(prompt, feature_share):
        return dict(
            prompt=prompt,
            replacement_score=0.5,
            completeness_score=0.8,
            logit_input_feature_share=feature_share,
            logit_input_error_share=1 - feature_share,
            logit_input_token_share=0.0,
        )

    traced = {
        "1310720": [graph("a", 0.6), graph("b", 0.8)],  # the set, on two prompts
        "null_random": [graph("b", 0.1)],  # the null, on one of them
    }
    for subject, graphs in traced.items():
        folder = tmp_path / "set" / f"traces_{subject}_nodes2048"
        folder.mkdir(parents=True)
        dictionary = budget_curve.on_prompts({"dictionary": {"graphs": graphs}}, {"a", "b"})
        result = {"protocol": {"max_feature_nodes": 2048}, **dictionary}
        (folder / "trace_results.json").write_text(json.dumps(result))
    (tmp_path / "set" / "traces_327680").mkdir()  # the curve's own traces are not these
    rows = budget_curve.wider_graphs(tmp_path, "set")
    assert [(r["dictionary"], r.get("tokens"), r["prompts"]) for r in rows] == [
        ("set, 2048 feature nodes", 1310720, 2),
        ("null random, 2048 feature nodes", None, 1),
        ("set, 2048 feature nodes, the null random's prompts", 1310720, 1),
    ]
    assert [r["feature_share"] for r in rows] == pytest.approx([0.7, 0.1, 0.8])
    assert all(r["feature_nodes"] == 2048 for r in rows)


def test_set_throughput_times_only_blocks_filled_inside_its_window(monkeypatch):
    """The clock starts when the second block's first batch is asked for, before the store fills
    that block, and stops when the loop asks for the store's position to write its final
    checkpoints; the first block (filled before) is not timed, and --tokens must be whole blocks."""
    import set_throughput

    seen = []

    class Store:
        def next_batch(self):
            seen.append(clock.started_at)  # what the clock knew when the store ran

        def state_dict(self):
            seen.append(clock.ended_at)
            return {"position": 16}

    clock = set_throughput.SecondBlockClock(Store(), batches_per_block=8)
    for _ in range(16):
        clock.next_batch()
    assert seen[:9] == [None] * 8 + [clock.started_at] and clock.started_at is not None
    assert clock.ended_at is None
    assert clock.state_dict() == {"position": 16} and seen[-1] == clock.ended_at
    first_end = clock.ended_at
    assert first_end >= clock.started_at
    clock.state_dict()  # a later checkpoint does not move the end
    assert clock.ended_at == first_end
    for tokens in ("8192", "20000"):  # one block only; not whole blocks of 8 x 1024
        monkeypatch.setattr("sys.argv", ["set_throughput.py", "--tokens", tokens])
        with pytest.raises(SystemExit):
            set_throughput.main()
