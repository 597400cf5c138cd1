"""Data-parallel training under torchrun (distributed.py), 2 CPU processes with gloo.

One torchrun launch runs every scenario of distributed_worker.py (starting processes is the slow
part); each test compares what the ranks saved with one process on the same global batches.
"""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import distributed_worker as worker
import pytest
import torch
from helpers import PlantedStore
from state_checks import assert_state_close

from matryoshka_sae.checkpoint import load_metrics, load_sae
from matryoshka_sae.sae import create_sae
from matryoshka_sae.sparse_ops import select_batch_topk
from matryoshka_sae.training import train_sae, train_sae_group

# rank_raises breaks the process group, so it runs last.
SCENARIOS = [
    "select",
    *worker.TRAINED,
    "crash_on_two_ranks",
    "resume_on_two_ranks",
    "store_shares",
    "store_resume",
    "across_rank_counts",
    "global_batches",
    "several_hooks",
    "spread_group",
    "cli_main",
    "cli_gemma_transcoder",
    "uneven_batch",
    "diverged",
    "rank_nan",
    "rank_raises",
]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> dict:
    """{scenario: [rank 0's result, rank 1's result]} from one 2-process torchrun launch."""
    out = tmp_path_factory.mktemp("torchrun")
    worker.make_datasets(out)
    worker.train_until_crash(out / "one_rank")  # for resume_on_two_ranks
    worker.save_several_hooks_position(out)  # for several_hooks
    worker.write_cache(out)  # for across_rank_counts and global_batches, with:
    worker.store_run(out, "live_one_rank", crash_at=worker.STEPS_BEFORE_CRASH)
    worker.store_run(
        out,
        "cache_one_rank",
        crash_at=worker.STEPS_BEFORE_CRASH,
        activation_cache=str(out / "cache"),
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(Path(worker.__file__)),
        str(out),
        *SCENARIOS,
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        pytest.fail(f"torchrun failed ({done.returncode}):\n{done.stderr[-4000:]}")
    results = {
        name: [torch.load(out / f"{name}.rank{r}.pt") for r in range(2)] for name in SCENARIOS
    }
    results["out"] = out
    return results


def _single_process_run(sae_type: str, checkpoint_dir: Path, **overrides):
    """The same training on one process, fed the global batches; its SAE and selections."""
    cfg = worker.train_cfg(sae_type, str(checkpoint_dir), **overrides)
    sae = create_sae(cfg)
    selections = worker.record_selections(sae)
    store = PlantedStore(
        seed=1, paired=sae_type == "matryoshka_transcoder", batch_size=worker.GLOBAL_BATCH
    )
    train_sae(sae, store, None, cfg)
    return sae, selections


def test_global_batchtopk_selects_as_one_process_on_the_whole_batch(ranks):
    for name, case in worker.selection_cases().items():
        code = select_batch_topk(case["pre"], case["k"], case.get("lower_bound"))
        expected = torch.stack([code.rows, code.latents])
        selected = torch.cat([ranks["select"][0][name], ranks["select"][1][name]], dim=1)
        assert torch.equal(selected, expected), name


def test_ties_at_the_threshold_split_across_ranks_in_row_order(ranks):
    """Rank 0 holds 100 of the ties at t, rank 1 the rest; 206 ties complete the 256 kept."""
    for name in ("ties_across_ranks", "ties_across_ranks_lower_bound"):
        rank0, rank1 = (ranks["select"][r][name] for r in range(2))
        assert rank0.shape[1] == 100 and rank1.shape[1] == 156, name


@pytest.mark.parametrize("scenario", list(worker.TRAINED))
def test_training_on_two_ranks_equals_one_process(ranks, scenario, tmp_path):
    sae_type, overrides = worker.TRAINED[scenario]
    sae, selections = _single_process_run(sae_type, tmp_path, **overrides)
    rank0, rank1 = ranks[scenario]
    for key in sae.state_dict():
        assert torch.equal(rank0["state"][key], rank1["state"][key]), f"{key} differs between ranks"
    assert_state_close(rank0["state"], sae.state_dict(), 1e-5, scenario)
    assert (
        len(rank0["selections"])
        == len(selections)
        == (worker.N_STEPS if hasattr(sae, "select") else 0)
    )
    for step, (expected, part0, part1) in enumerate(
        zip(selections, rank0["selections"], rank1["selections"])
    ):
        assert torch.equal(torch.cat([part0, part1], dim=1), expected), (
            f"{scenario}: selection of step {step}"
        )


def test_resume_with_another_number_of_ranks_continues_exactly(ranks, tmp_path):
    """Stopped at step 8 on 2 ranks and resumed on 1 process, or the reverse: the weights after step
    12 are those of an uninterrupted single-process run."""
    uninterrupted, _ = _single_process_run(worker.RESUMED_TYPE, tmp_path / "uninterrupted")
    two_then_one = worker.resume_after_crash(
        tmp_path / "resumed", Path(ranks["crash_on_two_ranks"][0]["folder"])
    )
    one_then_two = ranks["resume_on_two_ranks"]
    for key, expected in uninterrupted.state_dict().items():
        assert torch.equal(one_then_two[0]["state"][key], one_then_two[1]["state"][key]), key
        for resumed in (two_then_one[key], one_then_two[0]["state"][key]):
            if expected.is_floating_point():
                assert (resumed - expected).norm() <= 1e-5 * expected.norm().clamp(min=1e-12), key
            else:
                assert torch.equal(resumed, expected), key


def test_resume_on_two_ranks_through_the_activation_store_is_exact(ranks):
    """Each rank's data position is in the checkpoint: stopped after step 8 and resumed, 2 ranks
    end bit-identical to 2 ranks that never stopped."""
    for result in ranks["store_resume"]:
        for key, expected in result["uninterrupted"].items():
            assert torch.equal(result["resumed"][key], expected), key


@pytest.mark.parametrize("store", ["live", "cache"])
def test_resume_on_another_number_of_ranks_through_the_real_stores_is_exact(ranks, store):
    """The global batches do not depend on the number of ranks, so (relative 1e-5): 2 ranks train as
    one process (the live store with the 2 ranks' 2 data lanes); stopped after step 8 on 2 ranks and
    resumed on 1 process, or stopped on 1 process and resumed on 2 ranks, the weights after step 12
    are those of an uninterrupted run, with no approximate-resume warning."""
    out = ranks["out"]
    overrides = {"activation_cache": str(out / "cache")} if store == "cache" else {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        two_then_one = worker.store_run(
            out,
            f"{store}_two_then_one",
            **overrides,
            resume_from=worker.stopped_folder(out, f"{store}_two_ranks"),
        )
    assert not [w for w in caught if "approximately" in str(w.message)]
    as_two_ranks = worker.store_run(
        out,
        f"{store}_one_process_two_lanes",
        **overrides,
        **({} if store == "cache" else {"data_lanes": 2}),
    )
    one_process = worker.store_run(out, f"{store}_one_process", **overrides)
    two_ranks = [result[store] for result in ranks["across_rank_counts"]]
    for rank in range(2):
        assert_state_close(
            two_ranks[rank]["uninterrupted"], as_two_ranks, 1e-5, f"{store}: 2 ranks vs 1 process"
        )
        assert_state_close(
            two_ranks[rank]["one_then_two"], one_process, 1e-5, f"{store}: 1 process, then 2 ranks"
        )
    assert_state_close(two_then_one, as_two_ranks, 1e-5, f"{store}: 2 ranks, then 1 process")


@pytest.mark.parametrize("lanes", [None, 1, 4, "cache"])
def test_two_ranks_serve_disjoint_halves_of_the_one_process_global_batch(ranks, lanes):
    """Rank r's batch is rows [32 r, 32 (r + 1)) of the global batch that one process serves,
    bit-identical, across blocks: the ranks' rows are disjoint and together the global batch. The
    live store with 2 lanes (the 2 ranks' default), 1 lane (each rank computes it all and serves its
    half), 4 lanes (two a rank); the cache (each rank reads its rows)."""
    from conftest import build_tiny_model

    from matryoshka_sae.activation_cache import CachedActivationsStore
    from matryoshka_sae.activation_store import ActivationsStore

    out = ranks["out"]
    if lanes == "cache":
        store = CachedActivationsStore(
            worker.store_run_cfg(out, "unused", activation_cache=str(out / "cache"))
        )
    else:
        store = ActivationsStore(
            build_tiny_model("gpt2"), worker.store_run_cfg(out, "unused", data_lanes=lanes or 2)
        )
    for step in range(6):
        expected = store.next_batch()
        rank0, rank1 = (ranks["global_batches"][r][lanes][step] for r in range(2))
        assert rank0.shape == rank1.shape == (32, 64)
        assert torch.equal(torch.cat([rank0, rank1]), expected), f"{lanes} lanes, batch {step}"


def test_two_ranks_serve_halves_of_the_transcoder_stores_global_pairs(ranks):
    """The transcoder's store inherits the lanes: each rank's (source, target) rows are its half of
    the pairs one process serves with the same 2 lanes, still paired token by token."""
    from conftest import build_tiny_model

    from matryoshka_sae.transcoder_activation_store import TranscoderActivationsStore

    store = TranscoderActivationsStore(
        build_tiny_model("gpt2"), worker.transcoder_store_cfg(ranks["out"], data_lanes=2)
    )
    for step in range(6):
        source, target = store.next_batch()
        halves = [ranks["global_batches"][r]["transcoder"][step] for r in range(2)]
        assert torch.equal(torch.cat([halves[0][0], halves[1][0]]), source), f"source, batch {step}"
        assert torch.equal(torch.cat([halves[0][1], halves[1][1]]), target), f"target, batch {step}"
        assert not torch.equal(source, target)


def _joined(halves: list[dict]) -> dict:
    return {name: torch.cat([half[name] for half in halves]) for name in halves[0]}


def test_the_several_hooks_store_serves_halves_and_resumes_on_another_number_of_ranks(ranks):
    """The multi-hook store inherits the lanes: on 2 ranks each hook's rows are the ranks' halves of
    one process's batch with the same 2 lanes (rows still paired across hooks); 2 ranks' position
    resumed on 1 process, and 1 process's position (1 lane) resumed on 2 ranks, continue exactly."""
    out, stop = ranks["out"], worker.SEVERAL_HOOKS_BEFORE_STOP
    results = ranks["several_hooks"]
    one_process = worker.several_hooks_store(out)
    one_process.load_state_dict(results[0]["position"])  # 2 lanes, kept from the position
    assert one_process.n_lanes == 2
    for step in range(stop, 2 * stop):
        expected = one_process.next_batch()
        assert list(expected) == ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"]
        joined = _joined([results[r]["batches"][step] for r in range(2)])
        for name, batch in expected.items():
            assert torch.equal(joined[name], batch), (
                f"{name}, batch {step} after resuming on 1 process"
            )
    two_lanes = worker.several_hooks_store(out, data_lanes=2)
    for step in range(stop):
        expected, joined = (
            two_lanes.next_batch(),
            _joined([results[r]["batches"][step] for r in range(2)]),
        )
        assert all(torch.equal(joined[name], batch) for name, batch in expected.items()), (
            f"batch {step}"
        )
    uninterrupted = worker.several_hooks_store(out)
    batches = [uninterrupted.next_batch() for _ in range(2 * stop)][stop:]
    for step, expected in enumerate(batches):
        joined = _joined([results[r]["resumed"][step] for r in range(2)])
        for name, batch in expected.items():
            assert torch.equal(joined[name], batch), (
                f"{name}, batch {step} after resuming on 2 ranks"
            )


def test_a_batch_that_does_not_divide_among_the_lanes_is_refused(ranks):
    from conftest import build_tiny_model

    from matryoshka_sae.activation_store import ActivationsStore

    with pytest.raises(
        ValueError, match="batch_size'] = 64 does not divide among 5 data lanes.*--data-lanes"
    ):
        ActivationsStore(
            build_tiny_model("gpt2"), worker.store_run_cfg(ranks["out"], "unused", data_lanes=5)
        )


def test_dictionaries_spread_over_ranks_train_as_one_process(ranks, tmp_path):
    """distribute_dictionaries: rank r trains dictionaries r, r + 2, ... on the whole batch, writes
    their checkpoints, and every rank returns every trained dictionary, bit-identical to one process."""
    cfgs = worker.spread_group_cfgs(tmp_path)
    saes = train_sae_group(
        [create_sae(cfg) for cfg in cfgs],
        PlantedStore(seed=1, batch_size=worker.GLOBAL_BATCH),
        None,
        cfgs,
    )
    names = ranks["spread_group"][0]["names"]
    assert ranks["spread_group"][0]["written"] == [names[0], names[2]] * 2  # steps 8 and 12
    assert ranks["spread_group"][1]["written"] == [names[1]] * 2
    for rank in range(2):
        for sae, state in zip(saes, ranks["spread_group"][rank]["states"]):
            for key, expected in sae.state_dict().items():
                assert torch.equal(state[key], expected), key


def test_rank_0_alone_writes_the_checkpoints(ranks):
    for scenario in worker.TRAINED:
        assert ranks[scenario][0]["saved_steps"] == [8, worker.N_STEPS]
        assert ranks[scenario][1]["saved_steps"] == []


def test_each_rank_reads_its_own_documents(ranks):
    """ActivationsStore: rank r runs the model on training documents N_HELD_OUT + r, + 2, ... and
    serves batches of batch_size / 2 rows; both hold out the same rows."""
    documents = [ranks["store_shares"][r]["documents"] for r in range(2)]
    for rank, seen in enumerate(documents):
        assert seen == list(
            range(worker.N_HELD_OUT + rank, worker.N_HELD_OUT + rank + 2 * len(seen), 2)
        )
        assert ranks["store_shares"][rank]["shapes"] == [(16, 64)] * 6
        assert ranks["store_shares"][rank]["eval"].tolist() == list(range(worker.N_HELD_OUT))
    assert not set(documents[0]) & set(documents[1])


@pytest.mark.parametrize(
    "scenario, folder", [("cli_main", "cli_main"), ("cli_gemma_transcoder", "cli_gemma")]
)
def test_the_scripts_train_under_torchrun(ranks, scenario, folder):
    assert ranks[scenario] == [{"done": True}, {"done": True}]
    runs = sorted((ranks["out"] / folder).iterdir())
    assert len(runs) == (2 if scenario == "cli_main" else 1)
    for run in runs:
        metrics = load_metrics(run)
        assert metrics["step"] == 4 and "loss_recovered" in metrics
        load_sae(run)


def test_a_batch_that_does_not_divide_is_an_error_on_every_rank(ranks):
    for result in ranks["uneven_batch"]:
        assert "does not divide among 2 ranks" in result["error"]


def test_the_weight_check_finds_a_rank_that_diverged(ranks):
    for result in ranks["diverged"]:
        assert "b_enc differ between ranks" in result["error"]


def test_nan_on_one_rank_stops_every_rank_with_the_same_error(ranks):
    for result in ranks["rank_nan"]:
        assert result["error"].startswith(
            "NonFiniteError: Non-finite activations (NaN/inf) in 1 batch(es)"
        )
        assert "(step 4)" in result["error"]  # the checkpoint before the NaN, written by rank 0


def test_a_rank_that_raises_stops_the_other_without_a_hang(ranks):
    raised, other = ranks["rank_raises"][1]["error"], ranks["rank_raises"][0]["error"]
    assert raised == "RuntimeError: rank 1's store failed"
    assert other is not None and "closed by peer" in other
