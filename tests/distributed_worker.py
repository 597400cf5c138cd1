"""What each rank runs in the torchrun tests of test_distributed.py.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_worker.py OUT SCENARIO...

Every scenario writes rank-r results to OUT/<scenario>.rank<r>.pt (training scenarios also write
checkpoints under OUT/<scenario>/), for the test to compare with one process on the same global
batches. The inputs are made from seeds alone, so the test builds the same ones.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from matryoshka_sae import distributed  # noqa: E402

N_STEPS = 12
GLOBAL_BATCH = 64


# ---------------------------------------------------------------------------------------------
# Inputs shared with the test
# ---------------------------------------------------------------------------------------------


def selection_cases() -> dict[str, dict]:
    """Global batches [B, S] of pre-activations and select_batch_topk arguments."""
    generator = torch.Generator().manual_seed(0)
    normal = torch.randn(32, 256, generator=generator)
    coarse = torch.randint(-4, 6, (32, 256), generator=generator).float() / 4  # many ties at t
    peaked = torch.randn(32, 256, generator=generator)
    peaked[5] += 4.0  # one row holds most of the top values: the candidates must widen
    split_ties = (
        torch.rand(32, 256, generator=generator) * 0.5
    )  # rank 0: 100 ties at 1, rank 1: 300
    split_ties.view(-1)[torch.randperm(16 * 256, generator=generator)[:100]] = 1.0
    split_ties.view(-1)[16 * 256 + torch.randperm(16 * 256, generator=generator)[:350]] = 1.0
    split_ties[20, :50] = (
        2.0  # 50 above t; the 206 ties kept are rank 0's 100 and rank 1's first 106
    )
    few_positive = -torch.rand(32, 256, generator=generator)
    few_positive[0, :3] = torch.tensor([0.5, 0.25, 0.25])
    return {
        "normal": dict(pre=normal, k=8),
        "ties": dict(pre=coarse, k=8),
        "ties_lower_bound": dict(pre=coarse, k=8, lower_bound=torch.tensor(0.25)),
        "ties_across_ranks": dict(pre=split_ties, k=8),
        "ties_across_ranks_lower_bound": dict(pre=split_ties, k=8, lower_bound=torch.tensor(0.9)),
        "lower_bound": dict(pre=normal, k=8, lower_bound=torch.tensor(0.5)),
        "lower_bound_too_high": dict(pre=normal, k=8, lower_bound=torch.tensor(3.0)),
        "widening": dict(pre=peaked, k=4),
        "few_positive": dict(pre=few_positive, k=4),
        "bfloat16_ties": dict(pre=normal.bfloat16().float(), k=16),
        "negative_threshold": dict(pre=normal - 3.0, k=8),
    }


def train_cfg(sae_type: str, checkpoint_dir: str, **overrides) -> dict:
    from helpers import planted_cfg  # the planted-dictionary settings of the training tests

    settings = dict(
        batch_size=GLOBAL_BATCH, num_tokens=GLOBAL_BATCH * N_STEPS, log_freq=4, checkpoint_freq=8
    )
    return planted_cfg(sae_type, Path(checkpoint_dir), **{**settings, **overrides})


class ShardStore:
    """Rank `rank` of `world`'s rows of each global batch of a store."""

    def __init__(self, store, rank: int, world: int):
        self.store, self.rank, self.world = store, rank, world

    def __getattr__(
        self, name
    ):  # the wrapped store's state_dict, skip_tokens, cfg... where it has them
        if name == "store":
            raise AttributeError(name)
        return getattr(self.store, name)

    def next_batch(self):
        batch = self.store.next_batch()
        take = lambda x: x.chunk(self.world)[self.rank]  # noqa: E731
        return tuple(take(x) for x in batch) if isinstance(batch, tuple) else take(batch)


def record_selections(sae) -> list:
    """Wrap sae.select to keep each training step's (rows, latents), rows in global batch numbering."""
    selections = []
    if not hasattr(sae, "select"):  # a dense code: nothing is selected
        return selections
    select = sae.select

    def recording_select(pre):
        code = select(pre)
        if sae.training:
            offset = distributed.rank() * pre.shape[0]
            selections.append(torch.stack([code.rows + offset, code.latents]))
        return code

    sae.select = recording_select
    return selections


# ---------------------------------------------------------------------------------------------
# Scenarios
# ---------------------------------------------------------------------------------------------


def scenario_select(out: Path) -> dict:
    from matryoshka_sae.sparse_ops import select_batch_topk

    group = distributed.batch_group()
    results = {}
    for name, case in selection_cases().items():
        local = case["pre"].chunk(distributed.world_size())[distributed.rank()]
        code = select_batch_topk(local, case["k"], case.get("lower_bound"), group=group)
        results[name] = torch.stack([code.rows + distributed.rank() * local.shape[0], code.latents])
    return results


# Training scenarios: name -> (sae_type, cfg overrides), for the worker and the test alike.
TRAINED = {
    "batchtopk": ("batchtopk", {}),
    "matryoshka": ("matryoshka", {}),
    "transcoder": ("matryoshka_transcoder", {}),
    "topk": ("topk", {}),
    "jumprelu": ("jumprelu", {}),
    "vanilla_target_l0": ("vanilla", {"target_l0": 6.0}),  # adaptive L1 steered by the batch's L0
    "jumprelu_quadratic": ("jumprelu", {"target_l0": 6.0, "jumprelu_objective": "quadratic"}),
}


def _train(name: str, out: Path) -> dict:
    """Train scenario `name` of TRAINED (with the weight check of debug mode on)."""
    from helpers import PlantedStore

    from matryoshka_sae import training
    from matryoshka_sae.sae import create_sae

    sae_type, overrides = TRAINED[name]
    cfg = train_cfg(sae_type, str(out / name), distributed_debug=True, **overrides)
    distributed.init_from_env(cfg)
    sae = create_sae(cfg)
    selections = record_selections(sae)
    paired = sae_type == "matryoshka_transcoder"
    store = ShardStore(
        PlantedStore(seed=1, paired=paired, batch_size=GLOBAL_BATCH),
        distributed.rank(),
        distributed.world_size(),
    )
    saved_steps = []
    save_checkpoint = training.save_checkpoint

    def counting_save(*args, **kwargs):
        saved_steps.append(kwargs["step"])
        return save_checkpoint(*args, **kwargs)

    training.save_checkpoint = counting_save
    try:
        training.train_sae(sae, store, None, cfg)
    finally:
        training.save_checkpoint = save_checkpoint
    return {"state": sae.state_dict(), "selections": selections, "saved_steps": saved_steps}


SPREAD_GROUP = [("batchtopk", {}), ("matryoshka", {}), ("topk", {})]


def spread_group_cfgs(checkpoint_dir: Path) -> list[dict]:
    """Three dictionaries trained together, each by one rank (distribute_dictionaries)."""
    return [
        train_cfg(sae_type, str(checkpoint_dir), distribute_dictionaries=True, **overrides)
        for sae_type, overrides in SPREAD_GROUP
    ]


def scenario_spread_group(out: Path) -> dict:
    """train_sae_group with the dictionaries spread over the ranks: rank r trains dictionaries r, r + 2."""
    from helpers import PlantedStore

    from matryoshka_sae import training
    from matryoshka_sae.sae import create_sae

    cfgs = spread_group_cfgs(out / "spread_group")
    store = ShardStore(
        PlantedStore(seed=1, batch_size=GLOBAL_BATCH), distributed.rank(), distributed.world_size()
    )
    written = []
    save_checkpoint = training.save_checkpoint

    def recording_save(folder, *args, **kwargs):
        written.append(Path(folder).name)
        return save_checkpoint(folder, *args, **kwargs)

    training.save_checkpoint = recording_save
    try:
        saes = training.train_sae_group([create_sae(cfg) for cfg in cfgs], store, None, cfgs)
    finally:
        training.save_checkpoint = save_checkpoint
    return {
        "states": [sae.state_dict() for sae in saes],
        "written": written,
        "names": [c["name"] for c in cfgs],
    }


def scenario_uneven_batch(out: Path) -> dict:
    """A global batch that does not divide among the ranks: every rank raises the same error."""
    try:
        distributed.init_from_env(
            train_cfg("batchtopk", str(out / "uneven"), batch_size=GLOBAL_BATCH + 1)
        )
    except ValueError as error:
        return {"error": str(error)}
    return {"error": None}


class FailingStore(ShardStore):
    """Rank 1's batch `fail_at` holds a NaN (`nan`) or its store raises (`raise`)."""

    def __init__(self, store, rank, world, fail_at: int, how: str):
        super().__init__(store, rank, world)
        self.fail_at, self.how, self.served = fail_at, how, 0

    def next_batch(self):
        batch = super().next_batch()
        self.served += 1
        if self.rank == 1 and self.served == self.fail_at + 1:
            if self.how == "raise":
                raise RuntimeError("rank 1's store failed")
            batch[3, 5] = float("nan")
        return batch


def _train_until_failure(out: Path, name: str, how: str) -> dict:
    """Train with rank 1 failing at step 5; report the error each rank saw."""
    from helpers import PlantedStore

    from matryoshka_sae.sae import create_sae
    from matryoshka_sae.training import train_sae

    cfg = train_cfg(
        "batchtopk", str(out / name), log_freq=2, checkpoint_freq=4, distributed_timeout_s=30
    )
    distributed.init_from_env(cfg)
    store = FailingStore(
        PlantedStore(seed=1, batch_size=GLOBAL_BATCH),
        distributed.rank(),
        distributed.world_size(),
        fail_at=5,
        how=how,
    )
    try:
        train_sae(create_sae(cfg), store, None, cfg)
    except Exception as error:  # noqa: BLE001  (the test reads which error each rank saw)
        return {"error": f"{type(error).__name__}: {error}"}
    return {"error": None}


def scenario_rank_nan(out: Path) -> dict:
    """NaN activations on one rank: every rank stops with the same NonFiniteError."""
    return _train_until_failure(out, "rank_nan", "nan")


def scenario_rank_raises(out: Path) -> dict:
    """One rank raises: it stops with its error, the other with a failed collective; none hangs.
    (Run last: the process group is broken afterwards.)"""
    return _train_until_failure(out, "rank_raises", "raise")


def scenario_diverged(out: Path) -> dict:
    """check_same_on_every_rank raises on every rank when one rank's weights differ."""
    from matryoshka_sae.sae import create_sae

    sae = create_sae(train_cfg("batchtopk", str(out / "diverged")))
    distributed.check_same_on_every_rank(sae, "fresh SAE")
    if distributed.rank() == 1:
        with torch.no_grad():
            sae.b_enc[7] += 1e-6
    try:
        distributed.check_same_on_every_rank(sae, "perturbed SAE")
    except RuntimeError as error:
        return {"error": str(error)}
    return {"error": None}


# ---------------------------------------------------------------------------------------------
# Resuming with another number of ranks
# ---------------------------------------------------------------------------------------------

RESUMED_TYPE, STEPS_BEFORE_CRASH = "matryoshka", 8


class StoreStopped(RuntimeError):
    pass


class StoppingStore(ShardStore):
    """A ShardStore that fails (like a crashed job) when asked for batch `stop_at`."""

    def __init__(self, store, rank, world, stop_at: int):
        super().__init__(store, rank, world)
        self.stop_at, self.served = stop_at, 0

    def next_batch(self):
        if self.served == self.stop_at:
            raise StoreStopped("the job crashed")
        self.served += 1
        return super().next_batch()


def train_until_crash(checkpoint_dir: Path) -> Path:
    """Train on this process's ranks until the data fails at step 8; the checkpoint of step 8's folder."""
    from helpers import PlantedStore

    from matryoshka_sae.checkpoint import checkpoint_folder
    from matryoshka_sae.sae import create_sae
    from matryoshka_sae.training import train_sae

    cfg = train_cfg(RESUMED_TYPE, str(checkpoint_dir))
    store = StoppingStore(
        PlantedStore(seed=1, batch_size=GLOBAL_BATCH),
        distributed.rank(),
        distributed.world_size(),
        stop_at=STEPS_BEFORE_CRASH,
    )
    try:
        train_sae(create_sae(cfg), store, None, cfg)
    except StoreStopped:
        pass
    return checkpoint_folder(cfg)


def resume_after_crash(checkpoint_dir: Path, folder: Path) -> dict:
    """Resume from `folder` on this process's ranks, the data continuing at global batch 8."""
    from helpers import PlantedStore

    from matryoshka_sae.sae import create_sae
    from matryoshka_sae.training import train_sae

    cfg = train_cfg(RESUMED_TYPE, str(checkpoint_dir))
    store = ShardStore(
        PlantedStore(seed=1, start=STEPS_BEFORE_CRASH, batch_size=GLOBAL_BATCH),
        distributed.rank(),
        distributed.world_size(),
    )
    sae = create_sae(cfg)
    train_sae(sae, store, None, cfg, resume_from=folder)
    return sae.state_dict()


def scenario_crash_on_two_ranks(out: Path) -> dict:
    return {"folder": str(train_until_crash(out / "two_ranks"))}


def scenario_resume_on_two_ranks(out: Path) -> dict:
    """Continue the single-process run that the test stopped at step 8 (in OUT/one_rank)."""
    folder = next((out / "one_rank").iterdir())
    return {"state": resume_after_crash(out / "one_rank_resumed", folder)}


# ---------------------------------------------------------------------------------------------
# The real activation store and scripts, on tiny models
# ---------------------------------------------------------------------------------------------

N_ID_DOCS, ID_SEQ_LEN, N_HELD_OUT = 40, 16, 4


def make_datasets(out: Path) -> None:
    """OUT/tokens: 64 rows of 32 random token ids; OUT/id_docs: document i is one row whose token 1
    is 2 + i (so a row tells which document it came from)."""
    from datasets import Dataset, DatasetDict

    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(2, 1000, (64, 32), generator=generator)
    tokens[:, 0] = 1
    DatasetDict({"train": Dataset.from_dict({"tokens": tokens.tolist()})}).save_to_disk(
        str(out / "tokens")
    )
    docs = torch.randint(100, 1000, (N_ID_DOCS, ID_SEQ_LEN), generator=generator)
    docs[:, 1] = 2 + torch.arange(N_ID_DOCS)
    Dataset.from_dict({"tokens": docs.tolist()}).save_to_disk(str(out / "id_docs"))


def _tiny_models():
    """Model names tiny-gpt2 and tiny-gemma2 that load_model resolves to the test models."""
    from conftest import build_tiny_model

    from matryoshka_sae import config, model_loading

    models = {"tiny-gpt2": build_tiny_model("gpt2"), "tiny-gemma2": build_tiny_model("gemma2")}
    for name in models:
        config.MODEL_TABLE[name] = {"act_size": 64, "n_layers": 2}
    model_loading.load_model = lambda name, device, dtype: models[name]
    return models


def scenario_store_shares(out: Path) -> dict:
    """The documents each rank's ActivationsStore runs the model on (ids), and its batch shape."""
    from matryoshka_sae.activation_store import ActivationsStore
    from matryoshka_sae.config import get_default_cfg, post_init_cfg

    model = _tiny_models()["tiny-gpt2"]
    cfg = get_default_cfg()
    cfg.update(
        model_name="tiny-gpt2",
        layer=0,
        dataset_path=str(out / "id_docs"),
        seq_len=ID_SEQ_LEN,
        n_eval_rows=N_HELD_OUT,
        batch_size=32,
        num_batches_in_buffer=2,
        model_batch_size=2,
        device="cpu",
        wandb_mode="disabled",
    )
    seen = []
    activations_of = ActivationsStore.activations_of

    def recording(store, tokens):
        seen.extend((tokens[:, 1] - 2).tolist())
        return activations_of(store, tokens)

    ActivationsStore.activations_of = recording
    try:
        store = ActivationsStore(model, post_init_cfg(cfg))
        shapes = [tuple(store.next_batch().shape) for _ in range(6)]
    finally:
        ActivationsStore.activations_of = activations_of
    return {"documents": seen, "shapes": shapes, "eval": store.get_eval_tokens()[:, 1] - 2}


def store_run_cfg(out: Path, name: str, **overrides) -> dict:
    """BatchTopK on the tiny GPT-2 (as "synthetic", width 64) over OUT/tokens: 12 steps of 64, a
    checkpoint at step 8; overrides e.g. data_lanes, or activation_cache to read a cache instead."""
    from matryoshka_sae.config import get_default_cfg, post_init_cfg

    cfg = get_default_cfg()
    cfg.update(
        model_name="synthetic",
        act_size=64,
        layer=1,
        dataset_path=str(out / "tokens"),
        seq_len=32,
        n_eval_rows=4,
        batch_size=64,
        num_tokens=64 * 12,
        num_batches_in_buffer=4,
        model_batch_size=2,
        dict_size=256,
        top_k=8,
        sae_type="batchtopk",
        device="cpu",
        wandb_mode="disabled",
        checkpoint_dir=str(out / name),
        checkpoint_freq=8,
        log_freq=4,
        **overrides,
    )
    return post_init_cfg(cfg)


def store_run(
    out: Path, name: str, crash_at: int | None = None, resume_from: Path | None = None, **overrides
) -> dict:
    """Train `store_run_cfg` through the real store (ActivationsStore, or the cache's) on this
    process's ranks; `crash_at`: the store fails when asked for that batch (after the checkpoint of
    step 8); `resume_from`: continue that checkpoint. The trained weights ({} after a crash)."""
    from conftest import build_tiny_model

    from matryoshka_sae.activation_cache import activation_store_for
    from matryoshka_sae.sae import create_sae
    from matryoshka_sae.training import train_sae

    cfg = store_run_cfg(out, name, **overrides)
    store = activation_store_for(build_tiny_model("gpt2"), cfg)
    if crash_at is not None:
        store = StoppingStore(store, 0, 1, stop_at=crash_at)
    sae = create_sae(cfg)
    try:
        train_sae(sae, store, None, cfg, resume_from=resume_from)
    except StoreStopped:
        return {}
    return sae.state_dict()


def stopped_folder(out: Path, name: str) -> Path:
    from matryoshka_sae.checkpoint import checkpoint_folder

    return checkpoint_folder(store_run_cfg(out, name))


def write_cache(out: Path) -> None:
    """OUT/cache: the tiny GPT-2's activations over OUT/tokens (written by one process)."""
    from conftest import build_tiny_model

    from matryoshka_sae.activation_cache import write_activation_cache

    write_activation_cache(
        build_tiny_model("gpt2"),
        store_run_cfg(out, "unused"),
        out / "cache",
        num_tokens=1500,
        shard_mb=0.1,
    )


def scenario_store_resume(out: Path) -> dict:
    """Through the real store on 2 ranks: stopped after step 8 and resumed, against uninterrupted."""
    uninterrupted = store_run(out, "store_uninterrupted")
    store_run(out, "store_resumed", crash_at=STEPS_BEFORE_CRASH)
    return {
        "uninterrupted": uninterrupted,
        "resumed": store_run(
            out, "store_resumed", resume_from=stopped_folder(out, "store_resumed")
        ),
    }


def scenario_across_rank_counts(out: Path) -> dict:
    """For the live store (default lanes: 2 here) and the cache: 2 ranks uninterrupted; 2 ranks stopped
    after step 8 (the test resumes them on one process); the one-process runs that the test stopped
    after step 8 (in OUT/<store>_one_rank) resumed on 2 ranks."""
    results = {}
    for store, overrides in (("live", {}), ("cache", {"activation_cache": str(out / "cache")})):
        store_run(out, f"{store}_two_ranks", crash_at=STEPS_BEFORE_CRASH, **overrides)
        results[store] = {
            "uninterrupted": store_run(out, f"{store}_uninterrupted", **overrides),
            "one_then_two": store_run(
                out,
                f"{store}_one_then_two",
                **overrides,
                resume_from=stopped_folder(out, f"{store}_one_rank"),
            ),
        }
    return results


def transcoder_store_cfg(out: Path, **overrides) -> dict:
    """`store_run_cfg` made a transcoder's: layer 1's resid_mid -> mlp_out of the tiny GPT-2."""
    from matryoshka_sae.transcoder_activation_store import create_transcoder_config

    return create_transcoder_config(
        store_run_cfg(out, "unused", **overrides), source_layer=1, target_layer=1
    )


def scenario_global_batches(out: Path) -> dict:
    """Each rank's first 6 batches (2 blocks) from the live store with 2, 1 and 4 data lanes, from
    the cache, and (source, target) pairs from the transcoder's store (2 lanes)."""
    from conftest import build_tiny_model

    from matryoshka_sae.activation_cache import CachedActivationsStore
    from matryoshka_sae.activation_store import ActivationsStore
    from matryoshka_sae.transcoder_activation_store import TranscoderActivationsStore

    model, batches = build_tiny_model("gpt2"), {}
    for lanes in (None, 1, 4):
        store = ActivationsStore(model, store_run_cfg(out, "unused", data_lanes=lanes))
        batches[lanes] = [store.next_batch() for _ in range(6)]
    store = CachedActivationsStore(
        store_run_cfg(out, "unused", activation_cache=str(out / "cache"))
    )
    batches["cache"] = [store.next_batch() for _ in range(6)]
    store = TranscoderActivationsStore(model, transcoder_store_cfg(out))
    batches["transcoder"] = [store.next_batch() for _ in range(6)]
    return batches


def several_hooks_store(out: Path, **overrides):
    """The multi-hook store over layers 0 and 1 of the tiny GPT-2 (`store_run_cfg`'s data; overrides
    e.g. data_lanes)."""
    from conftest import build_tiny_model

    from matryoshka_sae.activation_store import MultiHookActivationsStore
    from matryoshka_sae.config import post_init_cfg

    cfgs = [
        post_init_cfg({**store_run_cfg(out, "unused", **overrides), "layer": layer})
        for layer in (0, 1)
    ]
    return MultiHookActivationsStore(build_tiny_model("gpt2"), cfgs)


SEVERAL_HOOKS_BEFORE_STOP = 3


def save_several_hooks_position(out: Path) -> None:
    """OUT/several_hooks_one_process.pt: one process's multi-hook store position after 3 batches."""
    store = several_hooks_store(out)
    for _ in range(SEVERAL_HOOKS_BEFORE_STOP):
        store.next_batch()
    torch.save(store.state_dict(), out / "several_hooks_one_process.pt")


def scenario_several_hooks(out: Path) -> dict:
    """The multi-hook store on 2 ranks (2 lanes): its first 6 batches and its position after 3; and
    3 batches after resuming one process's position (saved after 3 batches, 1 lane)."""
    store = several_hooks_store(out)
    batches = [store.next_batch() for _ in range(SEVERAL_HOOKS_BEFORE_STOP)]
    position = store.state_dict()
    batches += [store.next_batch() for _ in range(SEVERAL_HOOKS_BEFORE_STOP)]
    resumed = several_hooks_store(out)
    resumed.load_state_dict(torch.load(out / "several_hooks_one_process.pt", weights_only=True))
    return {
        "batches": batches,
        "position": position,
        "resumed": [resumed.next_batch() for _ in range(SEVERAL_HOOKS_BEFORE_STOP)],
    }


def _cli_args(out: Path, name: str) -> list[str]:
    return [
        "--layer",
        "1",
        "--num-tokens",
        "512",
        "--batch-size",
        "128",
        "--dict-size",
        "256",
        "--top-k",
        "8",
        "--dataset",
        str(out / "tokens"),
        "--seq-len",
        "32",
        "--model-batch-size",
        "4",
        "--num-batches-in-buffer",
        "4",
        "--checkpoint-dir",
        str(out / name),
        "--wandb-mode",
        "disabled",
        "--device",
        "cpu",
        "--perf-log-freq",
        "2",
    ]


def _run_script(main, argv: list[str]) -> dict:
    """Run a script's main(argv) as torchrun would, keeping the process group for the next scenario."""
    _tiny_models()
    shut_down, distributed.shut_down = distributed.shut_down, lambda: None
    try:
        main(argv)
    finally:
        distributed.shut_down = shut_down
    return {"done": True}


def scenario_cli_main(out: Path) -> dict:
    """main.py's group (a BatchTopK SAE beside the Matryoshka SAE) on the tiny GPT-2."""
    from matryoshka_sae.cli import main

    return _run_script(
        main.main, ["--model", "tiny-gpt2", "--batchtopk-k", "4", *_cli_args(out, "cli_main")]
    )


def scenario_cli_gemma_transcoder(out: Path) -> dict:
    """train_gemma_example.py transcoder on the tiny Gemma-2."""
    from matryoshka_sae.cli import train_gemma_example

    return _run_script(
        train_gemma_example.main,
        ["transcoder", "--model", "tiny-gemma2", *_cli_args(out, "cli_gemma")],
    )


def main() -> None:
    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    cfg = {"batch_size": GLOBAL_BATCH, "device": "cpu", "distributed_timeout_s": 60}
    distributed.init_from_env(cfg)
    for name in sys.argv[2:]:
        result = _train(name, out) if name in TRAINED else globals()[f"scenario_{name}"](out)
        torch.save(result, out / f"{name}.rank{distributed.rank()}.pt")
    distributed.shut_down()


if __name__ == "__main__":
    main()
