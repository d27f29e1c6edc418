"""SIGKILL at any moment (during a step, half-way through writing a checkpoint, during an eval): the next start
resumes from the last complete checkpoint, and the run ends bit-identical to one never interrupted.

Each backend's run is killed three times in a row, each restart resuming from what the previous one left, and
then runs to the end; its final state (params, EMA, Adam moments and count) is compared bit for bit with the
uninterrupted run's.
"""
from __future__ import annotations

import signal

import pytest

from conftest import assert_same_state, final_state, run_with_fault
from vdm_common import run

# (fault, steps of the complete native checkpoints, of the complete neutral exports the killed process leaves).
# Checkpoints every 4 steps; the eval of step 6 comes before the save of step 8.
KILLS = {
    "jax": [("kill-at-step:6", [4], [4]),                    # during the steps 4..6
            ("kill-in-write:step_8", [4, 8], [4]),           # the neutral export of step 8 half written
            ("kill-in-eval:1", [4, 8], [4])],                # in the eval of step 6
    "torch": [("kill-at-step:6", [4], [4]),
              ("kill-in-write:step_8.pt", [4], [4]),         # the torch file of step 8 half written
              ("kill-in-write:step_8.safetensors", [4, 8], [4]),   # the torch file done, its neutral export not
              ("kill-in-eval:1", [4, 8], [4])],
}


def native_steps(workdir, backend: str) -> list[int]:
    """Complete native checkpoints: orbax step directories / torch step_N.pt files (not temporary ones)."""
    if backend == "jax":
        return sorted(int(p.name) for p in (workdir / "checkpoints" / "orbax").iterdir() if p.name.isdigit())
    return sorted(int(p.name[5:-3]) for p in (workdir / "checkpoints" / "torch").glob("step_*.pt"))


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_killed_repeatedly_resumes_to_the_uninterrupted_state(backend, tmp_path, uninterrupted):
    workdir = tmp_path / "run"
    for fault, native, exported in KILLS[backend]:
        proc = run_with_fault(backend, workdir, fault)
        assert proc.returncode == -signal.SIGKILL, (fault, proc.returncode, proc.stderr[-2000:])
        assert run.neutral_steps(str(workdir)) == exported, fault
        # orbax finishes a step in a background thread (the kill may come before it is done): its complete
        # steps are some of those listed; nothing incomplete has a step directory name.
        steps = native_steps(workdir, backend)
        assert steps == native if backend == "torch" else set(steps) <= set(native), (fault, steps)
    proc = run_with_fault(backend, workdir)
    assert proc.returncode == 0, proc.stderr
    assert "resumed from step" in proc.stdout
    assert not list(workdir.glob("checkpoints/*/.*.tmp")), "partial files of the killed saves are removed"
    assert_same_state(final_state(workdir), final_state(uninterrupted(backend)))
