"""What both training loops do when training must stop early: a preemption notice, Ctrl-C, diverging steps.

SIGTERM (what SLURM, Kubernetes and cloud preemption send before killing) and SIGINT (Ctrl-C) do not kill
a training run: `StopSignals` records the signal, the loop finishes the steps it is running, saves a
checkpoint of the current step and returns; the entry scripts then exit with status 128 + the signal
number, the shell's convention for "ended by this signal", so job schedulers see a preempted run. A second
signal of the same kind acts at once (the handler that was there before takes over): a run that hangs
can still be stopped.

`NonFiniteSteps` counts the steps skipped because their loss or gradient was not finite (the step
functions skip them, see `vdm_jax.steps.train_step`) and stops the run after
`training.max_nonfinite_steps` of them in a row.
"""
from __future__ import annotations

import signal
import threading

from vdm_common.run import RunError

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """Context manager: while active, SIGTERM / SIGINT set `received` instead of ending the process.

    Handlers are installed only in the main thread (Python allows no other); elsewhere it does nothing.
    """

    def __init__(self, say=print):
        self.received: int | None = None
        self._say = say
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:
            # The second signal: give it to the previous handler (the default one ends the process,
            # Python's SIGINT handler raises KeyboardInterrupt).
            previous = self._previous.get(signum, signal.SIG_DFL)
            signal.signal(signum, previous)
            signal.raise_signal(signum)
            return
        self.received = signum
        self._say(f"received {signal.Signals(signum).name}: stopping after the current steps and saving a "
                  f"checkpoint (send it again to stop at once, without saving)")


def signal_name(signum: int | None) -> str | None:
    """'SIGTERM' for signal.SIGTERM; None for None or 0."""
    return signal.Signals(signum).name if signum else None


def exit_status(signal_name: str | None) -> int:
    """The process exit status of a run: 0, or 128 + the signal number for a run stopped by a signal."""
    return 128 + signal.Signals[signal_name].value if signal_name else 0


class NonFiniteError(RunError):
    """Training stopped: too many steps in a row had a non-finite loss or gradient."""


class NonFiniteSteps:
    """Counts skipped steps in a row; raises NonFiniteError when `limit` are reached."""

    def __init__(self, limit: int, checkpoints_dir):
        self.limit = limit
        self.checkpoints_dir = checkpoints_dir
        self.in_a_row = 0

    def update(self, first_step: int, skipped_per_step, last_saved: int | None) -> None:
        """skipped_per_step: a flag per step from `first_step` on (truthy: skipped); last_saved: the step of
        the newest checkpoint the run has (None: none yet)."""
        for offset, skipped in enumerate(skipped_per_step):
            self.in_a_row = self.in_a_row + 1 if skipped else 0
            if self.in_a_row >= self.limit:
                last = first_step + offset
                good = (f"step {last_saved} in {self.checkpoints_dir}" if last_saved is not None
                        else "none yet (the run saved no checkpoint)")
                raise NonFiniteError(
                    f"training stopped: the {self.in_a_row} steps {last + 1 - self.in_a_row}..{last} in a row had a "
                    f"non-finite loss or gradient and were skipped (none of them was applied: parameters, EMA and "
                    f"optimizer state are those from before them). Last good checkpoint: {good}. Lower "
                    f"optimizer.learning_rate, set optimizer.grad_clip_norm or check the data, then resume from "
                    f"it; training.max_nonfinite_steps (now {self.limit}) sets how many in a row are tolerated.")
