"""End to end, model included: tokens/s and peak memory to train SAEs on SmolLM2-135M, ours and peers.

    python benchmarks/bench_end_to_end.py                        # the five cases, 49,152 tokens each
    python benchmarks/bench_end_to_end.py --tokens 16384         # a smoke test
    python benchmarks/bench_end_to_end.py --cases ours_live saelens --sae-types batchtopk --json out.json

Setup (once): bash benchmarks/setup_bench_env.sh   (.bench-venv: SAELens, sparsify, gguf, SmolLM2)
Every case runs in its own subprocess of .bench-venv/bin/python (our modules are imported from the
repository root; the peers and ours share that torch), one after the other, so that each process's
peak memory is its own. The driver itself needs no torch.

What is timed: the training, i.e. every model forward pass, reading and buffering the activations
and every SAE step, from the moment the store (or trainer's data loop) is created to the end of the
last step, including the final checkpoint each library writes at the end. Not timed: imports,
loading the model, building the SAE and optimizer, one untimed warm-up model pass. tokens/s =
activations trained on (per dictionary) / seconds. Peak memory: the process's peak resident set
size during the timed section (Linux VmHWM, reset through /proc/self/clear_refs when the timer
starts, so model loading does not count; where that reset is refused, the whole process's
``resource.getrusage`` peak, marked "process").

Cases (--cases), each for a Matryoshka and a BatchTopK SAE (--sae-types) where the library has them:

* ours_live: `ActivationsStore` + `train_sae` (the path of main.py and the demo) on the live model.
* ours_cache: `write_activation_cache` once (timed on its own row: the model's passes and the
  shards), then `CachedActivationsStore` + `train_sae` in a process without the model (main.py
  --activations would also load the model, for the CE evaluation, which is off here for every case).
* ours_layers: three dictionaries, layers 4, 6 and 8, from one model pass per chunk
  (`MultiHookActivationsStore` + `train_sae_group`, i.e. main.py --layers 4 6 8); the model stops
  after block 8. tokens/s counts tokens of text: each trains all three dictionaries.
* saelens: SAELens's `LanguageModelSAETrainingRunner` with `BatchTopKTrainingSAE` or
  `MatryoshkaBatchTopKTrainingSAE`, given our loaded HookedTransformer (`override_model`) and the
  token rows (`override_dataset`); its model passes stop after the hooked block too.
* sparsify: EleutherAI sparsify's `Trainer` on SmolLM2 as a `transformers` Llama model (loaded from
  the same GGUF file). sparsify trains TopK sparse coders only (no BatchTopK, no Matryoshka): its row
  is TopK. Its trainer runs the whole model (30 blocks and the logits) on every batch.
* sparsify_layers (only when named in --cases): the same on the outputs of blocks 3, 5 and 7 (= our
  layers 4, 6, 8) at once, sparsify's way of training several layers from one pass.

Shared settings: SmolLM2-135M-Instruct (fp32, CPU), the residual stream before block 4
(TransformerLens ``blocks.4.hook_resid_pre``, i.e. the output of HF's ``model.layers.3``), 576 -> 9216
latents, k = 32, batches of 2048 activations, lr 2e-3 with no warm-up, Adam (0.9, 0.99), AuxK
coefficient 1/32, a latent dead after 5 batches without firing, Matryoshka groups 1:2:4:9 sixteenths
(576, 1152, 2304, 5184). Text: Python's documentation (builtin_corpus.py, the demo's train split),
tokenised without special tokens, packed into rows of 128 tokens that each start with the BOS token
<|im_start|> (as the demo does), as does every document; BOS positions are left out of training by
every library, so a row gives at most 127 activations. Model passes of 16 rows. Shuffle buffers of 16,384 activations.
The rows are built once (the `prepare` worker), the same for everyone; ours reads the text and
tokenises it itself (its real path: the rows are checked equal, `same rows` in --json).

What each peer has to be told differently:

* SAELens: pre-tokenised rows (`is_dataset_tokenized`, `prepend_bos=False`: the rows carry BOS),
  ``exclude_special_tokens=[BOS]``, ``n_batches_in_buffer=128`` (its buffer holds that many x
  context_size activations: 16,384), ``store_batch_size_prompts=16``, ``lr_scheduler_name="constant"``,
  ``aux_loss_coefficient=1/32``, ``dead_feature_window=5``, ``matryoshka_widths`` cumulative; no
  wandb, no checkpoints, no output folder. Its mixing buffer keeps half of the buffer back, so it runs
  the model on 8,192 activations more than it trains on. Its decoder is not normalised (it rescales
  by the decoder norms), no input normalisation (ours standardises each token: `input_unit_norm`).
* sparsify: ``batch_size=16`` rows (sparsify counts sequences: about 2,020 activations a step once
  BOS positions are dropped; it trains on the rows' activations, within a batch of the others'
  count), ``hookpoints=["layers.3"]``,
  ``exclude_tokens=[BOS]``, ``optimizer="adam"`` (torch Adam with default betas 0.9, 0.999, no
  bitsandbytes on CPU), ``lr=2e-3``, ``lr_warmup_steps=0`` (its schedule then decays linearly to 0;
  it has no constant one), ``auxk_alpha=1/32`` (its default 0 switches AuxK off),
  ``dead_feature_threshold=5 x 2048`` tokens, no wandb, one checkpoint at the end (it always writes one).

Output: a markdown table (tokens/s, the ratio to ours live, the estimated model-forward share, RSS
when the timer starts and its peak, the FVU of the first batch and the mean FVU and L0 of the last
five, which show that each library really trained) and, with --json PATH, the raw records (with an
FVU trace of every run and each process's wall time).
"model fwd" is a profile: after the timed run, the same library's model call (TransformerLens
``run_with_cache`` stopped after the hook, or the HF model's full forward for sparsify) is timed
alone on up to 32 of the same rows, and scaled to the rows the run processed; "rest" is the timed
seconds minus it (SAE steps, data, buffers); on a busy machine the two see different loads (rest can
even come out negative): read the profile from a quiet run. A case that cannot run shows the reason
instead of a number.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness
from harness import BENCH_PYTHON

LAYER = 4
LAYERS = (4, 6, 8)
DICT_SIZE = 9216
TOP_K = 32
BATCH = 2048
LR = 2e-3
SEQ_LEN = 128
MODEL_BATCH = 16  # rows per model pass
BUFFER_BATCHES = 8  # our shuffle buffer: 8 x 2048 = 16,384 activations
BUFFER = BUFFER_BATCHES * BATCH
PER_ROW = (
    SEQ_LEN - 1
)  # activations per row at most: BOS left out (documents starting inside it have one too)
PROFILE_ROWS = 32

CASES = ("ours_live", "ours_cache", "ours_layers", "saelens", "sparsify", "sparsify_layers")
DEFAULT_CASES = CASES[:-1]  # sparsify_layers on request: a few more minutes
SAE_TYPES = ("matryoshka", "batchtopk")
SINGLE_TYPE_CASES = {"sparsify": "topk", "sparsify_layers": "topk"}  # peers with one kind of SAE
DEFAULT_TOKENS = (
    49152  # 24 steps: 3 fills of our buffer; the default run takes ~10-15 min on 2 cores
)
LABELS = {
    "ours_live": "ours, live",
    "ours_cache_write": "ours, writing the cache",
    "ours_cache": "ours, from the cache",
    "ours_layers": "ours, layers 4 6 8 from one pass",
    "saelens": "SAELens LanguageModelSAETrainingRunner",
    "sparsify": "sparsify Trainer",
    "sparsify_layers": "sparsify Trainer, layers 4 6 8",
}


# =============================================================================================
# Driver (no torch)
# =============================================================================================


def main() -> None:
    args = build_parser().parse_args()
    if args.worker:
        run_worker(args)
        return
    python = Path(args.python)
    if not python.exists():
        sys.exit(
            f"error: {python} does not exist; create the benchmark environment with "
            f"bash benchmarks/setup_bench_env.sh (or pass --python)."
        )
    at_start = harness.environment(threads=args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_e2e_") as workdir:
        prepared = call_worker(args, python, workdir, "prepare", "-")
        if "error" in prepared:
            sys.exit(f"error: preparing the token rows failed: {prepared['error']}")
        records = [prepared]
        for case, sae_type in planned_runs(args):
            print(f"... {case} {sae_type}", file=sys.stderr, flush=True)
            records.append(call_worker(args, python, workdir, case, sae_type))
    print(markdown_report(records, args))
    save_results(records, args, at_start)


def save_results(records: list[dict], args, at_start: dict) -> None:
    """benchmarks/results/end_to_end.json (or --json): one row per case, the raw records beside."""
    prepared, runs = records[0], records[1:]
    columns = [
        "case",
        "sae_type",
        "tokens",
        "seconds",
        "tokens_per_s",
        "forward_s",
        "fvu_first",
        "fvu_last",
        "l0_last",
        "peak_rss_mb",
    ]
    rows = [
        {"case": LABELS.get(r["case"], r["case"]), **{key: r.get(key) for key in columns[1:]}}
        if "error" not in r
        else {"case": LABELS.get(r["case"], r["case"]), "sae_type": r["sae_type"]}
        for r in runs
    ]
    settings = {
        "model": "smollm2-135m",
        "layer": LAYER,
        "dict_size": DICT_SIZE,
        "top_k": TOP_K,
        "batch_size": BATCH,
        "lr": LR,
        "seq_len": SEQ_LEN,
        "steps": prepared.get("n_steps"),
        "worker_packages": prepared.get("versions"),
    }
    path = harness.save(
        "end_to_end",
        "End to end with the model included: ours against SAELens and sparsify",
        rows,
        settings,
        columns=columns,
        environment_at_start=at_start,
        path=args.json,
    )
    record = json.loads(path.read_text())
    record["raw_records"] = records
    path.write_text(json.dumps(record, indent=1) + "\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--tokens",
        type=int,
        default=DEFAULT_TOKENS,
        help=f"activations each dictionary trains on, rounded down to whole batches of {BATCH} "
        f"(default {DEFAULT_TOKENS})",
    )
    parser.add_argument(
        "--cases",
        nargs="+",
        choices=CASES,
        default=list(DEFAULT_CASES),
        help=f"default: {' '.join(DEFAULT_CASES)}",
    )
    parser.add_argument("--sae-types", nargs="+", choices=SAE_TYPES, default=list(SAE_TYPES))
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count(), help="torch threads in every case"
    )
    parser.add_argument(
        "--json", help="the result file (default benchmarks/results/end_to_end.json)"
    )
    parser.add_argument("--python", default=str(BENCH_PYTHON), help="the interpreter of the cases")
    parser.add_argument(
        "--timeout", type=float, default=3600, help="seconds before a case is given up"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--sae-type", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    return parser


def planned_runs(args) -> list[tuple[str, str]]:
    """(worker, sae_type) in the order they run; writing the cache comes before training from it."""
    runs = []
    for case in args.cases:
        if case in SINGLE_TYPE_CASES:
            runs.append((case, SINGLE_TYPE_CASES[case]))
            continue
        if case == "ours_cache":
            runs.append(("ours_cache_write", "-"))
        runs.extend((case, sae_type) for sae_type in args.sae_types)
    return runs


def call_worker(args, python: Path, workdir: str, worker: str, sae_type: str) -> dict:
    """Run one case in a fresh process; its record, or {"error": why} when it produced none."""
    out = Path(workdir) / f"{worker}_{sae_type}.json"
    command = [
        str(python),
        str(Path(__file__).resolve()),
        "--worker",
        worker,
        "--sae-type",
        sae_type,
        "--tokens",
        str(args.tokens),
        "--threads",
        str(args.threads),
        "--workdir",
        workdir,
    ]
    env = {
        **os.environ,
        "WANDB_MODE": "disabled",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONWARNINGS": "ignore",
    }
    record = {"case": worker, "sae_type": sae_type}
    start = time.perf_counter()
    try:
        done = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=args.timeout
        )
    except subprocess.TimeoutExpired:
        return {**record, "error": f"gave up after --timeout {args.timeout:.0f} s"}
    record["wall_s"] = (
        time.perf_counter() - start
    )  # the whole process: imports, model loading, profile
    if done.returncode != 0 or not out.exists():
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        return {
            **record,
            "error": lines[-1] if lines else f"exit status {done.returncode}, no output",
        }
    return {**json.loads(out.read_text()), **record}


def markdown_report(records: list[dict], args) -> str:
    """The table of every case, then the notes (errors, the cache write, the settings)."""
    prepared = records[0]
    runs = records[1:]
    baseline = {
        r["sae_type"]: r["tokens_per_s"]
        for r in runs
        if r["case"] == "ours_live" and "error" not in r
    }
    if "batchtopk" in baseline:  # sparsify's TopK is compared with our BatchTopK, its closest
        baseline["topk"] = baseline["batchtopk"]
    lines = [
        f"SmolLM2-135M, layer {LAYER} resid_pre, {DICT_SIZE} latents, k {TOP_K}, batch {BATCH}, "
        f"{prepared.get('n_steps', '?')} steps ({prepared.get('tokens', '?'):,} tokens per dictionary), "
        f"{args.threads} threads, torch {prepared.get('versions', {}).get('torch', '?')}",
        "",
        "| case | SAE | tokens | seconds | tokens/s | vs ours live | model fwd s (est.) | rest s | "
        "RSS start -> peak GB | FVU first -> last | L0 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    notes = []
    for r in runs:
        label = LABELS.get(r["case"], r["case"])
        if "error" in r:
            lines.append(f"| {label} | {r['sae_type']} | | | not run | | | | | | |")
            notes.append(f"{label} ({r['sae_type']}): not run: {r['error']}")
            continue
        ratio = baseline.get(r["sae_type"])
        ratio = (
            f"{r['tokens_per_s'] / ratio:.2f}x" if ratio and r["case"] != "ours_cache_write" else ""
        )
        fwd = r.get("forward_s")
        rest = "" if fwd is None else f"{r['seconds'] - fwd:.1f}"
        fvu = "" if r.get("fvu_first") is None else f"{r['fvu_first']:.3f} -> {r['fvu_last']:.3f}"
        l0 = "" if r.get("l0_last") is None else f"{r['l0_last']:.1f}"
        start = "?" if r.get("start_rss_mb") is None else f"{r['start_rss_mb'] / 1024:.2f}"
        peak = f"{start} -> {r['peak_rss_mb'] / 1024:.2f}"
        peak += " (process)" if r.get("peak_kind") == "process" else ""
        lines.append(
            f"| {label} | {r['sae_desc']} | {r['tokens']:,} | {r['seconds']:.1f} | "
            f"{r['tokens_per_s']:,.0f} | {ratio} | {'' if fwd is None else f'{fwd:.1f}'} | {rest} | "
            f"{peak} | {fvu} | {l0} |"
        )
        if r.get("same_rows") is False:
            notes.append(
                f"{label} ({r['sae_type']}): WARNING its token rows differ from the peers'."
            )
        notes.extend(f"{label} ({r['sae_type']}): {note}" for note in r.get("notes", []))
    notes.extend(cache_totals(runs))
    versions = ", ".join(f"{k} {v}" for k, v in prepared.get("versions", {}).items())
    notes.append(f"Versions: {versions}.")
    wall = sum(r.get("wall_s", 0) for r in records)
    notes.append(
        f"The benchmark's processes took {wall / 60:.1f} min in all (model loading included)."
    )
    return "\n".join(lines + [""] + [f"- {note}" for note in notes])


def cache_totals(runs: list[dict]) -> list[str]:
    """Notes: writing the cache once plus training one dictionary from it, against ours live."""
    done = {(r["case"], r["sae_type"]): r for r in runs if "error" not in r}
    write = done.get(("ours_cache_write", "-"))
    notes = []
    for (case, sae_type), r in done.items():
        if case != "ours_cache" or write is None:
            continue
        total = write["seconds"] + r["seconds"]
        live = done.get(("ours_live", sae_type))
        versus = f"; ours live: {live['seconds']:.1f} s" if live else ""
        notes.append(
            f"cache written once ({write['seconds']:.1f} s) + one {r['sae_desc']} trained from it "
            f"({r['seconds']:.1f} s) = {total:.1f} s, {r['tokens'] / total:,.0f} tokens/s{versus}; "
            f"each further dictionary of a sweep costs only its {r['seconds']:.1f} s."
        )
    return notes


# =============================================================================================
# Workers (run in .bench-venv; torch and the libraries are imported here)
# =============================================================================================


def run_worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    plan = Plan(args.tokens, Path(args.workdir))
    record = WORKERS[args.worker](plan, args.sae_type)
    record.update(case=args.worker, sae_type=args.sae_type, threads=args.threads)
    (plan.workdir / f"{args.worker}_{args.sae_type}.json").write_text(json.dumps(record))


class Plan:
    """The sizes every case shares, from --tokens."""

    def __init__(self, tokens: int, workdir: Path):
        self.n_steps = max(1, tokens // BATCH)
        self.tokens = self.n_steps * BATCH
        self.workdir = workdir
        # Enough rows for every library's read-ahead (buffers, a model pass) past the tokens trained.
        self.n_rows = math.ceil((self.tokens + 2 * BUFFER) / (0.9 * PER_ROW)) + 2 * MODEL_BATCH
        self.rows_path = workdir / "rows"
        self.cache_path = workdir / "cache"


# ---------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    import importlib.metadata as md

    found = {}
    for name in ("torch", "transformer-lens", "transformers", "sae-lens", "eai-sparsify"):
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            found[name] = "not installed"
    return found


def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from matryoshka_sae.model_loading import smollm2_gguf_path

    path = smollm2_gguf_path()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def training_documents():
    """The demo's training text: Python's documentation, train split (a `datasets.Dataset`)."""
    from matryoshka_sae.builtin_corpus import python_docs_dataset

    return python_docs_dataset(split="train")


def load_rows(plan: Plan):
    """The token rows ``[n_rows, seq_len]`` (long) written by the prepare worker."""
    import datasets

    rows = datasets.load_from_disk(str(plan.rows_path))
    rows.set_format("torch", columns=["input_ids"])
    return rows


class PeakMemory:
    """Peak RSS of this process from `start()` on: VmHWM after resetting it (Linux), else ru_maxrss."""

    def start(self) -> None:
        gc.collect()
        self.start_mb = self._status("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.kind = "timed section"
        except OSError:
            self.kind = "process"

    def peak_mb(self) -> float:
        if self.kind == "process":
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return self._status("VmHWM")

    @staticmethod
    def _status(key: str) -> float | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return None


class Recorder:
    """FVU and L0 of every training batch of one dictionary, kept as 0-d tensors (no host sync)."""

    def __init__(self):
        self.fvu, self.l0 = [], []

    def add(self, x, x_hat, l0) -> None:
        import torch

        with torch.no_grad():
            x, x_hat = x.detach().float(), x_hat.detach().float()
            self.fvu.append((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
            self.l0.append(l0.detach().float())

    def summary(self) -> dict:
        """FVU of the first batch, mean FVU and L0 of the last (up to) 5 batches."""
        if not self.fvu:
            return {"fvu_first": None, "fvu_last": None, "l0_last": None, "steps_seen": 0}
        last = slice(-min(5, len(self.fvu)), None)
        every = max(1, len(self.fvu) // 16)
        return {
            "fvu_first": float(self.fvu[0]),
            "fvu_last": float(sum(self.fvu[last]) / len(self.fvu[last])),
            "l0_last": float(sum(self.l0[last]) / len(self.l0[last])),
            "steps_seen": len(self.fvu),
            "fvu_trace": [round(float(f), 4) for f in self.fvu[::every]],
        }


def merged_summary(recorders: list[Recorder]) -> dict:
    """Means over several dictionaries' summaries (the multi-layer cases)."""
    parts = [r.summary() for r in recorders]
    merged = {
        key: sum(p[key] for p in parts) / len(parts) for key in ("fvu_first", "fvu_last", "l0_last")
    }
    return {
        **merged,
        "steps_seen": min(p["steps_seen"] for p in parts),
        "fvu_trace": [p["fvu_trace"] for p in parts],
    }


def timed(run) -> tuple[float, PeakMemory]:
    """Seconds `run()` takes and the peak memory meanwhile."""
    memory = PeakMemory()
    memory.start()
    start = time.perf_counter()
    run()
    return time.perf_counter() - start, memory


def result(plan: Plan, seconds: float, memory: PeakMemory, summary: dict, **extra) -> dict:
    tokens = extra.pop("tokens", plan.tokens)
    return {
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "peak_rss_mb": memory.peak_mb(),
        "start_rss_mb": memory.start_mb,
        "peak_kind": memory.kind,
        **summary,
        **extra,
    }


def hooked_forward_seconds(model, rows, hook_names: list[str], stop_at_layer: int) -> float:
    """Seconds per row of TransformerLens passes stopped after `stop_at_layer` blocks (as ours and
    SAELens run them), over up to PROFILE_ROWS rows in passes of MODEL_BATCH rows."""
    import torch

    sample = rows[:PROFILE_ROWS]
    start = time.perf_counter()
    with torch.no_grad():
        for chunk in sample.split(MODEL_BATCH):
            model.run_with_cache(
                chunk,
                names_filter=hook_names,
                stop_at_layer=stop_at_layer,
                return_cache_object=False,
            )
    return (time.perf_counter() - start) / len(sample)


class CountedPasses:
    """Counts the token rows a HookedTransformer's `run_with_cache` is given (every library's model
    passes go through it) and keeps the first `keep` of them, to check which text was read."""

    def __init__(self, model, keep: int = 256):
        self.rows = 0
        self._first, self._keep = [], keep
        original = model.run_with_cache

        def counted(tokens, *args, **kwargs):
            if self.rows < self._keep:
                self._first.append(tokens[: self._keep - self.rows].detach().cpu().clone())
            self.rows += tokens.shape[0]
            return original(tokens, *args, **kwargs)

        model.run_with_cache = counted
        self._restore = lambda: setattr(model, "run_with_cache", original)

    def stop(self) -> int:
        """Stop counting; the rows counted."""
        self._restore()
        return self.rows

    def read_rows(self, rows) -> bool:
        """Whether the first rows given to the model are the first of `rows`."""
        import torch

        first = torch.cat(self._first)
        return bool(torch.equal(first, rows[: len(first)]))


def warm_up_hooked(model, rows, hook_names: list[str], stop_at_layer: int) -> None:
    import torch

    with torch.no_grad():
        model.run_with_cache(
            rows[:MODEL_BATCH],
            names_filter=hook_names,
            stop_at_layer=stop_at_layer,
            return_cache_object=False,
        )


# ---------------------------------------------------------------------------------------------
# prepare: the token rows everyone reads
# ---------------------------------------------------------------------------------------------


def prepare(plan: Plan, _sae_type: str) -> dict:
    """Tokenise the training documents and pack them into rows as ActivationsStore does (BOS at the
    start of every document and row), cycling over the documents if more rows are needed."""
    import datasets
    import torch

    from matryoshka_sae.activation_store import pack_documents

    tokenizer = smollm2_tokenizer()
    texts = list(training_documents()["text"])
    docs = [
        torch.as_tensor(ids, dtype=torch.long)
        for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    ]
    rows, n_have, carry = [], 0, torch.empty(0, dtype=torch.long)
    while n_have < plan.n_rows:
        new_rows, carry = pack_documents(
            docs, SEQ_LEN, tokenizer.bos_token_id, tokenizer.eos_token_id, carry
        )
        rows.append(new_rows)
        n_have += len(new_rows)
    rows = torch.cat(rows)[: plan.n_rows]
    datasets.Dataset.from_dict({"input_ids": rows.tolist()}).save_to_disk(str(plan.rows_path))
    return {
        "case": "prepare",
        "n_rows": plan.n_rows,
        "n_steps": plan.n_steps,
        "tokens": plan.tokens,
        "bos_token_id": tokenizer.bos_token_id,
        "corpus_tokens": int(sum(len(d) for d in docs)),
        "versions": versions(),
    }


# ---------------------------------------------------------------------------------------------
# Ours
# ---------------------------------------------------------------------------------------------


def our_cfg(plan: Plan, sae_type: str, layer: int = LAYER, **extra) -> dict:
    from matryoshka_sae.builtin_corpus import python_docs_dataset
    from matryoshka_sae.config import get_default_cfg, post_init_cfg

    cfg = get_default_cfg()
    cfg.update(
        model_name="smollm2-135m",
        layer=layer,
        site="resid_pre",
        sae_type=sae_type,
        dict_size=DICT_SIZE,
        top_k=TOP_K,
        batch_size=BATCH,
        lr=LR,
        lr_warmup_steps=0,
        lr_decay_frac=0.0,
        num_tokens=plan.tokens,
        seq_len=SEQ_LEN,
        model_batch_size=MODEL_BATCH,
        num_batches_in_buffer=BUFFER_BATCHES,
        exclude_bos=True,
        bos_token_id=1,
        n_eval_rows=8,
        dataset_path=training_documents(),
        eval_dataset_path=python_docs_dataset(split="test"),
        device="cpu",
        wandb_mode="disabled",
        perf_log_freq=10**9,
        checkpoint_freq=10**9,
        checkpoint_dir=str(plan.workdir / "checkpoints" / f"{sae_type}_{layer}"),
        **extra,
    )
    return post_init_cfg(cfg)


def recorded_sae(cfg: dict):
    """Our SAE of `cfg` with a Recorder on its forward pass."""
    from matryoshka_sae.sae import create_sae

    torch_seed(0)
    sae = create_sae(cfg)
    recorder = Recorder()
    sae.register_forward_hook(
        lambda module, inputs, out: recorder.add(inputs[0], out["sae_out"], out["l0_norm"])
    )
    return sae, recorder


def torch_seed(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


def load_our_model():
    from matryoshka_sae.model_loading import load_model

    start = time.perf_counter()
    model = load_model("smollm2-135m")
    return model, time.perf_counter() - start


def ours_live(plan: Plan, sae_type: str) -> dict:
    from matryoshka_sae.activation_store import ActivationsStore
    from matryoshka_sae.training import train_sae

    model, load_s = load_our_model()
    cfg = our_cfg(plan, sae_type)
    sae, recorder = recorded_sae(cfg)
    rows = load_rows(plan)[:]["input_ids"]
    warm_up_hooked(model, rows, [cfg["hook_point"]], LAYER + 1)
    passes = CountedPasses(model)
    seconds, memory = timed(lambda: train_sae(sae, ActivationsStore(model, cfg), None, cfg))
    forward_s = passes.stop() * hooked_forward_seconds(model, rows, [cfg["hook_point"]], LAYER + 1)
    return result(
        plan,
        seconds,
        memory,
        recorder.summary(),
        forward_s=forward_s,
        rows_processed=passes.rows,
        same_rows=passes.read_rows(rows),
        load_s=load_s,
        sae_desc=our_desc(sae_type),
    )


def our_desc(sae_type: str) -> str:
    return {"matryoshka": "Matryoshka BatchTopK", "batchtopk": "BatchTopK"}[sae_type]


def ours_cache_write(plan: Plan, _sae_type: str) -> dict:
    from matryoshka_sae.activation_cache import write_activation_cache

    model, load_s = load_our_model()
    cfg = our_cfg(plan, "matryoshka")
    rows = load_rows(plan)[:]["input_ids"]
    warm_up_hooked(model, rows, [cfg["hook_point"]], LAYER + 1)
    passes = CountedPasses(model)
    state = {}
    seconds, memory = timed(
        lambda: state.update(manifest=write_activation_cache(model, cfg, plan.cache_path))
    )
    forward_s = passes.stop() * hooked_forward_seconds(model, rows, [cfg["hook_point"]], LAYER + 1)
    size_mb = sum(f.stat().st_size for f in plan.cache_path.iterdir()) / 2**20
    return result(
        plan,
        seconds,
        memory,
        {},
        tokens=state["manifest"]["num_tokens"],
        forward_s=forward_s,
        rows_processed=passes.rows,
        same_rows=passes.read_rows(rows),
        load_s=load_s,
        sae_desc="(no SAE)",
        notes=[f"cache on disk: {size_mb:,.0f} MB (float32)"],
    )


def ours_cache(plan: Plan, sae_type: str) -> dict:
    from matryoshka_sae.activation_cache import CachedActivationsStore
    from matryoshka_sae.training import train_sae

    cfg = our_cfg(plan, sae_type, activation_cache=str(plan.cache_path))
    sae, recorder = recorded_sae(cfg)
    seconds, memory = timed(lambda: train_sae(sae, CachedActivationsStore(cfg), None, cfg))
    return result(
        plan, seconds, memory, recorder.summary(), forward_s=0.0, sae_desc=our_desc(sae_type)
    )


def ours_layers(plan: Plan, sae_type: str) -> dict:
    from matryoshka_sae.activation_store import MultiHookActivationsStore
    from matryoshka_sae.training import train_sae_group

    model, load_s = load_our_model()
    cfgs = [our_cfg(plan, sae_type, layer=layer) for layer in LAYERS]
    saes, recorders = zip(*(recorded_sae(cfg) for cfg in cfgs))
    hooks = [cfg["hook_point"] for cfg in cfgs]
    rows = load_rows(plan)[:]["input_ids"]
    warm_up_hooked(model, rows, hooks, max(LAYERS) + 1)
    passes = CountedPasses(model)
    seconds, memory = timed(
        lambda: train_sae_group(list(saes), MultiHookActivationsStore(model, cfgs), None, cfgs)
    )
    forward_s = passes.stop() * hooked_forward_seconds(model, rows, hooks, max(LAYERS) + 1)
    return result(
        plan,
        seconds,
        memory,
        merged_summary(list(recorders)),
        forward_s=forward_s,
        rows_processed=passes.rows,
        same_rows=passes.read_rows(rows),
        load_s=load_s,
        sae_desc=f"3 x {our_desc(sae_type)}",
    )


# ---------------------------------------------------------------------------------------------
# SAELens
# ---------------------------------------------------------------------------------------------


def saelens(plan: Plan, sae_type: str) -> dict:
    from itertools import accumulate

    from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAEConfig
    from sae_lens.saes.matryoshka_batchtopk_sae import MatryoshkaBatchTopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    from matryoshka_sae.config import get_default_cfg

    defaults = get_default_cfg()
    model, load_s = load_our_model()
    hook = f"blocks.{LAYER}.hook_resid_pre"
    common = dict(
        d_in=model.cfg.d_model,
        d_sae=DICT_SIZE,
        k=TOP_K,
        dtype="float32",
        device="cpu",
        aux_loss_coefficient=defaults["aux_penalty"],
    )
    if sae_type == "matryoshka":
        groups = [DICT_SIZE // 16 * share for share in (1, 2, 4, 9)]
        sae_cfg = MatryoshkaBatchTopKTrainingSAEConfig(
            matryoshka_widths=list(accumulate(groups)), **common
        )
    else:
        sae_cfg = BatchTopKTrainingSAEConfig(**common)
    bos = 1
    runner_cfg = LanguageModelSAERunnerConfig(
        sae=sae_cfg,
        model_name="smollm2-135m",
        hook_name=hook,
        dataset_path="python-docs rows",
        is_dataset_tokenized=True,
        streaming=False,
        context_size=SEQ_LEN,
        prepend_bos=False,
        exclude_special_tokens=[bos],
        training_tokens=plan.tokens,
        train_batch_size_tokens=BATCH,
        store_batch_size_prompts=MODEL_BATCH,
        n_batches_in_buffer=BUFFER // SEQ_LEN,
        lr=LR,
        lr_scheduler_name="constant",
        lr_warm_up_steps=0,
        adam_beta1=defaults["beta1"],
        adam_beta2=defaults["beta2"],
        dead_feature_window=defaults["n_batches_to_dead"],
        device="cpu",
        dtype="float32",
        seed=defaults["seed"],
        logger=LoggingConfig(log_to_wandb=False),
        n_checkpoints=0,
        checkpoint_path=None,
        output_path=None,
        verbose=False,
    )
    recorder = Recorder()
    original_step = SAETrainer.step

    def recording_step(self, batch):
        out = original_step(self, batch)
        recorder.add(out.sae_in, out.sae_out, (out.feature_acts > 0).sum(-1).float().mean())
        return out

    SAETrainer.step = recording_step
    dataset = load_rows(plan)
    rows = dataset[:]["input_ids"]
    torch_seed(0)
    runner = LanguageModelSAETrainingRunner(
        runner_cfg, override_dataset=dataset, override_model=model
    )
    warm_up_hooked(model, rows, [hook], LAYER + 1)
    passes = CountedPasses(model)
    seconds, memory = timed(runner.run)
    forward_s = passes.stop() * hooked_forward_seconds(model, rows, [hook], LAYER + 1)
    desc = "Matryoshka BatchTopK" if sae_type == "matryoshka" else "BatchTopK"
    return result(
        plan,
        seconds,
        memory,
        recorder.summary(),
        forward_s=forward_s,
        rows_processed=passes.rows,
        same_rows=passes.read_rows(rows),
        load_s=load_s,
        sae_desc=desc,
    )


# ---------------------------------------------------------------------------------------------
# sparsify
# ---------------------------------------------------------------------------------------------


def sparsify_run(plan: Plan, layers: tuple[int, ...]) -> dict:
    """sparsify's Trainer on the HF model at the outputs of blocks layer - 1 (= our resid_pre of layer)."""
    import torch
    from sparsify import SaeConfig, SparseCoder, TrainConfig, Trainer

    from matryoshka_sae.config import get_default_cfg
    from matryoshka_sae.model_loading import load_smollm2_hf

    defaults = get_default_cfg()
    start = time.perf_counter()
    hf_model, tokenizer = load_smollm2_hf()
    load_s = time.perf_counter() - start
    rows_per_step = MODEL_BATCH
    n_steps = max(1, round(plan.tokens / (rows_per_step * PER_ROW)))
    dataset = load_rows(plan).select(range(n_steps * rows_per_step))
    rows = dataset[:]["input_ids"]
    train_cfg = TrainConfig(
        SaeConfig(num_latents=DICT_SIZE, k=TOP_K),
        batch_size=rows_per_step,
        hookpoints=[f"layers.{layer - 1}" for layer in layers],
        optimizer="adam",
        lr=LR,
        lr_warmup_steps=0,
        auxk_alpha=defaults["aux_penalty"],
        dead_feature_threshold=defaults["n_batches_to_dead"] * BATCH,
        exclude_tokens=[tokenizer.bos_token_id],
        log_to_wandb=False,
        save_every=10**9,
        save_dir=str(plan.workdir / "sparsify"),
        run_name="bench",
    )
    torch_seed(0)
    trainer = Trainer(train_cfg, dataset, hf_model)
    recorders = []
    for sae in trainer.saes.values():
        recorder = Recorder()
        recorders.append(recorder)
        sae.register_forward_hook(
            lambda module, args, kwargs, out, recorder=recorder: recorder.add(
                kwargs["y"], out.sae_out, (out.latent_acts != 0).sum(-1).float().mean()
            ),
            with_kwargs=True,
        )
    assert all(isinstance(sae, SparseCoder) for sae in trainer.saes.values())
    with torch.no_grad():
        hf_model(rows[:MODEL_BATCH])  # warm-up
    seconds, memory = timed(trainer.fit)
    tokens = int((rows != tokenizer.bos_token_id).sum())
    sample = rows[:PROFILE_ROWS]
    start = time.perf_counter()
    with torch.no_grad():
        for chunk in sample.split(MODEL_BATCH):
            hf_model(chunk)
    forward_s = len(rows) * (time.perf_counter() - start) / len(sample)
    return result(
        plan,
        seconds,
        memory,
        merged_summary(recorders),
        tokens=tokens,
        forward_s=forward_s,
        rows_processed=len(rows),
        load_s=load_s,
        sae_desc=("TopK" if len(layers) == 1 else f"{len(layers)} x TopK") + " (no BatchTopK)",
        notes=[
            "sparsify has no BatchTopK or Matryoshka SAE: TopK; its trainer runs the whole "
            "model (30 blocks and the logits) on every batch."
        ],
    )


def sparsify(plan: Plan, _sae_type: str) -> dict:
    return sparsify_run(plan, (LAYER,))


def sparsify_layers(plan: Plan, _sae_type: str) -> dict:
    return sparsify_run(plan, LAYERS)


WORKERS = {
    "prepare": prepare,
    "ours_live": ours_live,
    "ours_cache_write": ours_cache_write,
    "ours_cache": ours_cache,
    "ours_layers": ours_layers,
    "saelens": saelens,
    "sparsify": sparsify,
    "sparsify_layers": sparsify_layers,
}


if __name__ == "__main__":
    main()
