"""What every benchmark shares: import paths, timing, isolation, the environment stamp, results.

    import harness                      # first: puts the repository root and benchmarks/ on sys.path
    seconds = harness.timed(fn, device)             # synchronises CUDA before and after
    times = harness.step_times(fn, steps, warmup, device)
    result = harness.run_isolated([script, "--worker", ...], python)   # one case in its own process
    harness.emit(result)                            # a worker's answer: one "RESULT {json}" line
    harness.save("step", rows, settings, args)      # benchmarks/results/step.json, stamped

Results: one JSON file per benchmark (and per variant, e.g. step_cuda) in benchmarks/results/,
``{"benchmark", "title", "command", "environment", "settings", "columns", "rows", "notes"}``, where
"environment" is `environment()`: when (UTC), the commit (and whether the tree had changes), the
Python and package versions, the CPU model, its cores, the torch threads, the GPU, and the load
average at the start and at the end of the run. benchmarks/render_results.py turns the folder into
docs/results.md, so every figure there says when, where and with what it was measured.

Importable with the standard library alone (a driver may run under any Python; torch is imported
where a measurement needs it).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
BENCH_PYTHON = (
    ROOT / ".bench-venv" / "bin" / "python"
)  # the peers' environment (setup_bench_env.sh)
RESULT_PREFIX = "RESULT "

for _path in (str(BENCH_DIR), str(ROOT)):  # scripts run from any folder import the flat modules
    if _path not in sys.path:
        sys.path.insert(0, _path)

# Versions recorded in the stamp (those installed in the measuring interpreter).
PACKAGES = (
    "torch",
    "transformer-lens",
    "transformers",
    "datasets",
    "sae-lens",
    "dictionary-learning",
    "eai-sparsify",
)


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def synchronize(device: str = "cpu") -> None:
    """Wait for the device's queued work (CUDA kernels run asynchronously; the CPU's do not)."""
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: str = "cpu") -> float:
    """Seconds `fn()` takes, the device synchronised before and after (its work included)."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def step_times(
    fn: Callable[[int], Any], steps: int, warmup: int, device: str = "cpu"
) -> list[float]:
    """`timed` fn(i) for i in 0..warmup + steps - 1; the times of the last `steps` calls."""
    times = [timed(lambda: fn(i), device) for i in range(warmup + steps)]
    return times[warmup:]


# ---------------------------------------------------------------------------------------------
# One case in its own process
# ---------------------------------------------------------------------------------------------


def worker_env(threads: int | None = None, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a measuring subprocess: offline, quiet, and `threads` BLAS/OpenMP threads."""
    env = dict(os.environ)
    env.update(
        WANDB_MODE="disabled",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONWARNINGS="ignore",
    )
    if threads is not None:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(threads)
    env.update(extra or {})
    return env


def trace_command(
    exported: Path, source: Path, out: Path, max_feature_nodes: int, prompts: Sequence[str]
) -> list[str]:
    """The command that traces `prompts` through an exported set or CLT with trace_circuit.py in
    circuit-tracer's environment (.ct-venv), checked against `source` (the folder it was exported
    from), into `out`, keeping `max_feature_nodes` feature nodes a graph; run it with cwd=ROOT."""
    command = [
        str(ROOT / ".ct-venv" / "bin" / "python"),
        str(ROOT / "trace_circuit.py"),
        str(exported),
        "--from",
        str(source),
        "--out",
        str(out),
        "--max-feature-nodes",
        str(max_feature_nodes),
    ]
    for prompt in prompts:
        command += ["--prompt", prompt]
    return command


def emit(result: dict) -> None:
    """A worker's answer to `run_isolated`: one line ``RESULT {json}`` on stdout."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_isolated(
    args: Sequence[str],
    python: str | Path = sys.executable,
    env: dict[str, str] | None = None,
    timeout: float = 1800,
) -> dict:
    """Run ``python *args`` in a fresh process (its own imports, allocator and threads, nothing
    shared with the cases before it) from the repository root; returns the dict of its last
    ``RESULT`` line, or ``{"error": "..."}`` with the end of its output."""
    try:
        proc = subprocess.run(
            [str(python), *map(str, args)],
            cwd=ROOT,
            env=env or worker_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:g} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
    return {"error": f"exit {proc.returncode}:\n{tail}"}


def library_at(revision: str, folder: Path, script: str | Path) -> Path:
    """The benchmark `script` (and harness.py) beside the library of commit `revision`, under
    `folder`: the path of the script to run, which imports matryoshka_sae/ as it was at that commit
    (for before/after comparisons in alternating processes)."""
    folder.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "archive", revision, "matryoshka_sae"], cwd=ROOT, capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    (folder / "benchmarks").mkdir()
    for name in ("harness.py", Path(script).name):
        shutil.copy(BENCH_DIR / name, folder / "benchmarks" / name)
    return folder / "benchmarks" / Path(script).name


def commit_of(revision: str) -> str:
    """The short hash of `revision`."""
    return subprocess.run(
        ["git", "rev-parse", "--short=10", revision],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


# ---------------------------------------------------------------------------------------------
# The environment stamp
# ---------------------------------------------------------------------------------------------


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_versions(names: Sequence[str] = PACKAGES) -> dict[str, str]:
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def gpu_name() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def environment(threads: int | None = None) -> dict[str, Any]:
    """When, where and with what a measurement is taken (see the module docstring).

    `threads`: the torch threads the measurement used, if not this process's."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    stamp = {
        "when": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": _git("rev-parse", "--short=10", "HEAD"),
        "uncommitted_changes": bool(status) if status is not None else None,
        "python": platform.python_version(),
        "packages": package_versions(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "gpu": gpu_name(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    if threads is None:
        try:
            import torch

            threads = torch.get_num_threads()
        except ImportError:
            pass
    stamp["threads"] = threads
    return stamp


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


def result_path(name: str) -> Path:
    return RESULTS_DIR / f"{name}.json"


def save(
    name: str,
    title: str,
    rows: list[dict],
    settings: dict,
    argv: Sequence[str] | None = None,
    columns: Sequence[str] | None = None,
    notes: str = "",
    environment_at_start: dict | None = None,
    path: str | Path | None = None,
) -> Path:
    """Write the benchmark's result file (default benchmarks/results/<name>.json) and return its path.

    `rows`: one dict per measured case, `columns` the keys shown in docs/results.md (default: the
    first row's); `settings`: what every row shares; `argv`: the command line (default sys.argv);
    `environment_at_start`: `environment()` taken before measuring (its load average is kept beside
    the one at the end)."""
    stamp = environment()
    if environment_at_start is not None:
        stamp["load_average_at_start"] = environment_at_start["load_average"]
        stamp["when"] = environment_at_start["when"]
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(ROOT)
    except ValueError:
        pass
    args = list(sys.argv[1:] if argv is None else argv)
    record = {
        "benchmark": name,
        "title": title,
        "command": " ".join(["python", str(script), *args]),
        "environment": stamp,
        "settings": settings,
        "columns": list(columns or (rows[0].keys() if rows else [])),
        "rows": rows,
        "notes": notes,
    }
    path = Path(path) if path is not None else result_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {path}")
    return path
