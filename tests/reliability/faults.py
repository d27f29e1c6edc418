"""Runs train_jax.py or train_torch.py with one fault injected at a chosen point (a test helper).

    python tests/reliability/faults.py FAULT train_jax.py --workdir=W --config.training.x=...

FAULT (comma-separated, each KIND:ARG):
  kill-at-step:N      SIGKILL when the batch of step N is loaded (while the steps before it run)
  signal-at-step:N:S[:R]  send signal S (SIGTERM, SIGINT, SIGKILL, SIGSTOP) to itself there (only the
                      process whose RANK variable is R, when R is given); `twice` as S sends SIGTERM twice
  kill-in-write:NAME[:R]  a checkpoint file whose name contains NAME is half written, then SIGKILL (before
                      the rename that would complete it)
  kill-in-eval:K      SIGKILL after the first batch of the K-th evaluation of this process
  signal-in-eval:K:S[:R]  signal S to itself there
  kill-in-save:N[:R]  SIGKILL just after the save of step N has started (JAX: its files are being written
                      in the background)
  once:PATH           install the faults only if PATH.<RANK> does not exist (and create it): a restarted
                      job runs without them
  enospc-in-write:NAME  writing a checkpoint file whose name contains NAME fails with "No space left on device"
  nan-at-steps:A:B    the loss and gradients of steps A..B-1 become NaN
  none                no fault

The entry script then runs as `python SCRIPT ARGS` would (its exit status is this process's); under
`torchrun ... faults.py FAULT SCRIPT ARGS` every process installs the fault.
"""
from __future__ import annotations

import errno
import os
import runpy
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from vdm_common import data  # noqa: E402


def _kill() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def at_step(step: int, action) -> None:
    original = data.train_batch

    def train_batch(dataset, seed, s, *args, **kwargs):
        if int(s) == step:
            action()
        return original(dataset, seed, s, *args, **kwargs)
    data.train_batch = train_batch


def nan_at_steps(first: int, stop: int, script: str) -> None:
    """JAX: NaN conditioning (the jitted step does not look at its values). Torch, which checks its inputs
    on the host: NaN noise eps, by noting the step whose generator the loop makes."""
    if "jax" in script:
        original = data.train_batch

        def train_batch(dataset, seed, s, *args, **kwargs):
            images, conditioning = original(dataset, seed, s, *args, **kwargs)
            if first <= int(s) < stop:
                conditioning = conditioning + float("nan")
            return images, conditioning
        data.train_batch = train_batch
        return
    from vdm_torch import steps
    make_generator, draw = steps.step_generator, steps.draw_shard_noise
    current = {"step": -1}

    def step_generator(seed, step, *args, **kwargs):
        current["step"] = int(step)
        return make_generator(seed, step, *args, **kwargs)

    def draw_shard_noise(*args, **kwargs):
        noise, step = draw(*args, **kwargs), current["step"]
        current["step"] = -1                       # the training step's draw; the eval's draws come without
        return noise._replace(eps=noise.eps * float("nan")) if first <= step < stop else noise
    steps.step_generator, steps.draw_shard_noise = step_generator, draw_shard_noise


def mine(rank: str | None) -> bool:
    """Whether a fault meant for process `rank` (None: every process) applies to this one."""
    return rank is None or os.environ.get("RANK") == rank


def in_write(name: str, action, rank: str | None = None) -> None:
    """Every atomic write ends with os.replace(temp, final): act on the temp file before it."""
    original = os.replace

    def replace(src, dst, *args, **kwargs):
        if name in os.path.basename(os.fspath(dst)) and mine(rank):
            action(src)
        return original(src, dst, *args, **kwargs)
    os.replace = replace


def half_written_then_killed(temp) -> None:
    size = os.path.getsize(temp)
    os.truncate(temp, size // 2)
    _kill()


def no_space(temp) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(temp))


def in_eval(k: int, action) -> None:
    original = data.image_batches
    calls = {"n": 0}

    def image_batches(*args, **kwargs):
        calls["n"] += 1
        for i, batch in enumerate(original(*args, **kwargs)):
            if calls["n"] == k and i == 1:
                action()
            yield batch
    data.image_batches = image_batches


def in_save(step: int, script: str, rank: str | None) -> None:
    if "jax" in script:
        from vdm_jax import checkpoint
    else:
        from vdm_torch import checkpoint
    original = checkpoint.Checkpointer.save

    def save(self, s, state, *args, **kwargs):
        result = original(self, s, state, *args, **kwargs)
        if int(s) == step and mine(rank):
            _kill()
        return result
    checkpoint.Checkpointer.save = save


def send(name: str, rank: str | None = None):
    def action():
        if not mine(rank):
            return
        for signum in ([signal.SIGTERM, signal.SIGTERM] if name == "twice" else [signal.Signals[name]]):
            os.kill(os.getpid(), signum)
    return action


def install(spec: str, script: str) -> None:
    items = spec.split(",")
    if items[0].startswith("once:"):
        marker = Path(f"{items.pop(0)[len('once:'):]}.{os.environ.get('RANK', '0')}")
        if marker.exists():
            return
        marker.touch()
    for item in items:
        kind, *args = item.split(":")
        if kind == "kill-at-step":
            at_step(int(args[0]), _kill)
        elif kind == "signal-at-step":
            at_step(int(args[0]), send(*args[1:]))
        elif kind == "kill-in-write":
            in_write(args[0], half_written_then_killed, *args[1:])
        elif kind == "kill-in-eval":
            in_eval(int(args[0]), _kill)
        elif kind == "signal-in-eval":
            in_eval(int(args[0]), send(*args[1:]))
        elif kind == "kill-in-save":
            in_save(int(args[0]), script, *args[1:])
        elif kind == "enospc-in-write":
            in_write(args[0], no_space)
        elif kind == "nan-at-steps":
            nan_at_steps(int(args[0]), int(args[1]), script)
        elif kind != "none":
            raise SystemExit(f"unknown fault {item!r}")


if __name__ == "__main__":
    install(sys.argv[1], sys.argv[2])
    script = str(ROOT / sys.argv[2])
    sys.argv = [script, *sys.argv[3:]]
    runpy.run_path(script, run_name="__main__")
