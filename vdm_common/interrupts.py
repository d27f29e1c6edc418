"""What both training loops do when training must stop early: a preemption notice, Ctrl-C, diverging steps.

SIGTERM (what SLURM, Kubernetes and cloud preemption send before killing) and SIGINT (Ctrl-C) do not kill
a training run: `StopSignals` records the signal, the loop finishes the steps it is running, saves a
checkpoint of the current step and returns; the entry scripts then exit with status 128 + the signal
number, the shell's convention for "ended by this signal", so job schedulers see a preempted run. A second
signal stops the process at once, with one line and the same exit status, even while the main thread is
inside a long step (a thread watches the signals as they arrive): a run that hangs can still be stopped.
Nothing is left half-written by that: every checkpoint is written under a temporary name and renamed (or
committed by orbax) when complete, and the next start removes what an unfinished one left.

`NonFiniteSteps` counts the steps skipped because their loss or gradient was not finite (the step
functions skip them, see `vdm_jax.steps.train_step`) and stops the run after
`training.max_nonfinite_steps` of them in a row.
"""
from __future__ import annotations

import os
import signal
import sys
import threading

from vdm_common.run import RunError

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """Context manager: while active, SIGTERM / SIGINT set `received` instead of ending the process; a
    second one ends it at once (exit status 128 + its number).

    Python runs a signal's handler in the main thread, between two bytecodes: not while the main thread
    waits in a long native call (an XLA step, a collective). The second signal is therefore seen by a
    watcher thread too, through `signal.set_wakeup_fd`, to which the interpreter writes each signal's number
    as it arrives. Handlers are installed only in the main thread (Python allows no other); elsewhere it does
    nothing.
    """

    def __init__(self, say=print):
        self.received: int | None = None
        self._say = say
        self._previous: dict[int, object] = {}
        self._previous_wakeup_fd = -1
        self._wakeup_write_fd: int | None = None
        self._stopping = threading.Lock()

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
            read_fd, self._wakeup_write_fd = os.pipe()
            os.set_blocking(self._wakeup_write_fd, False)     # set_wakeup_fd requires it
            self._previous_wakeup_fd = signal.set_wakeup_fd(self._wakeup_write_fd, warn_on_full_buffer=False)
            threading.Thread(target=self._watch, args=(read_fd,), name="vdm-second-signal", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        if self._wakeup_write_fd is not None:
            signal.set_wakeup_fd(self._previous_wakeup_fd)
            os.close(self._wakeup_write_fd)                   # the watcher reads the end of the pipe and ends
            self._wakeup_write_fd = None
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:
            self._stop_now(signum)
        self.received = signum
        self._say(f"received {signal.Signals(signum).name}: stopping after the current steps and saving a "
                  f"checkpoint (send it again to stop at once, without saving)")

    def _watch(self, read_fd: int) -> None:
        """The watcher thread: ends the process at the second SIGTERM / SIGINT, wherever the main thread is."""
        seen = 0
        try:
            while chunk := os.read(read_fd, 64):      # one byte per signal; b"" once the context has ended
                for signum in chunk:
                    if signum in SIGNALS:
                        seen += 1
                        if seen >= 2:
                            self._stop_now(signum)
        finally:
            os.close(read_fd)

    def _stop_now(self, signum: int) -> None:
        """One line, the output flushed, and the process ends with 128 + signum (no cleanup runs: what is
        being written stays under a temporary name, as after SIGKILL)."""
        with self._stopping:                          # the main thread's handler and the watcher: one line
            try:
                self._say(f"received {signal.Signals(signum).name} again: stopped at once, without saving; "
                          f"the newest checkpoint is where the next start resumes")
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(128 + signum)


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
