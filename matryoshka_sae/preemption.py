"""Stopping training cleanly when the job is told to stop (preemption, Ctrl-C).

A cluster scheduler ends a job with SIGTERM (and SIGKILL a grace period later); Ctrl-C sends SIGINT.
While `StopSignals` is active, either signal only sets `stop.signal_name`; the training loop looks at
it after every step, writes a checkpoint there and raises `TrainingInterrupted`, which the scripts
turn into a message with the command that resumes the run. Long phases inside training (the CE
evaluation) look at `stop_requested()` and end early, saying so. A second signal before that takes the
default action (a second Ctrl-C stops at once).
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Sequence

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingInterrupted(Exception):
    """Training stopped on a signal after `steps_done` steps, with a checkpoint in each of `folders`."""

    def __init__(self, signal_name: str, steps_done: int, folders: Sequence[Path]):
        self.signal_name = signal_name
        self.steps_done = steps_done
        self.folders = [Path(folder) for folder in folders]
        super().__init__(
            f"training stopped by {signal_name} after step {steps_done}; checkpoint written to "
            f"{', '.join(str(folder) for folder in self.folders)}"
        )

    @property
    def exit_status(self) -> int:
        """128 + the signal number, the shell's status for a process ended by that signal."""
        return 128 + signal.Signals[self.signal_name].value


_ACTIVE: list["StopSignals"] = []  # the StopSignals contexts entered, innermost last


def stop_requested() -> str | None:
    """The name of the stop signal received inside the innermost active `StopSignals`, if any: long
    phases within training (the CE evaluation) look at it to end early."""
    return _ACTIVE[-1].signal_name if _ACTIVE else None


class StopSignals:
    """Context manager: SIGTERM/SIGINT set `signal_name` (None until one arrives) instead of stopping.

    Handlers can only be installed in the main thread; elsewhere this does nothing.
    """

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc_info) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        if self in _ACTIVE:
            _ACTIVE.remove(self)

    def _on_signal(self, signum: int, frame) -> None:
        if self.signal_name is not None:  # asked twice: the default action, now
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self.signal_name = signal.Signals(signum).name
