"""Run a script (main.py, train_gemma_example.py) as its own process with the tiny conftest models
standing in for the hub's, as the names 'tiny-gpt2' and 'tiny-gemma2':

    python tests/tiny_script.py main.py --model tiny-gpt2 ...

For the preemption tests the process can kill itself with SIGKILL at a chosen point:
TINY_KILL_AT_BATCH=n (when the store is asked for its n-th batch, i.e. after n - 1 steps) or
TINY_KILL_IN_SAVE=n (in the n-th checkpoint save of the weights file, after the new training state
is in place and before the weights are).
"""

import os
import runpy
import signal
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))

import conftest  # noqa: E402  (offline settings, one torch thread, the tiny models)

from matryoshka_sae import (  # noqa: E402
    activation_store,  # noqa: E402
    checkpoint,  # noqa: E402
    config,  # noqa: E402
    model_loading,  # noqa: E402
)

TINY_MODELS = {"tiny-gpt2": "gpt2", "tiny-gemma2": "gemma2"}


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def kill_at_batch(n: int) -> None:
    next_batch, served = activation_store.ActivationsStore._next_batches, [0]

    def counted(store):
        served[0] += 1
        if served[0] == n:
            die()
        return next_batch(store)

    activation_store.ActivationsStore._next_batches = counted


def kill_in_save(n: int) -> None:
    atomic_write, saves = checkpoint.atomic_write, [0]

    def write(path, writer, **options):
        if path.name == checkpoint.WEIGHTS_FILE:
            saves[0] += 1
            if saves[0] == n:
                die()
        atomic_write(path, writer, **options)

    checkpoint.atomic_write = write


def main() -> None:
    for name in TINY_MODELS:
        config.MODEL_TABLE[name] = {"act_size": conftest.TINY_D_MODEL, "n_layers": 2}
    model_loading.load_model = lambda name, device="cpu", dtype=None: conftest.build_tiny_model(
        TINY_MODELS[name]
    )
    if "TINY_KILL_AT_BATCH" in os.environ:
        kill_at_batch(int(os.environ["TINY_KILL_AT_BATCH"]))
    if "TINY_KILL_IN_SAVE" in os.environ:
        kill_in_save(int(os.environ["TINY_KILL_IN_SAVE"]))
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path.insert(0, str(TESTS.parent))
    # The path as a user at the root types it (`python main.py`): runpy puts it in sys.argv[0], from
    # which the scripts print their follow-up commands.
    runpy.run_path(os.path.relpath(TESTS.parent / script), run_name="__main__")


if __name__ == "__main__":
    main()
