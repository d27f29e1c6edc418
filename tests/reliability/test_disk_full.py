"""A write error during a save (disk full, simulated: the checkpoint write fails with ENOSPC): a clear error
naming the step, the directory and the cause; the previous checkpoint intact and no partial file left; the
run resumes once the cause is gone and ends bit-identical to one that never failed.
"""
from __future__ import annotations

import pytest

from conftest import assert_same_state, final_state, run_with_fault


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_disk_full_during_a_save_keeps_the_previous_checkpoint(backend, tmp_path, uninterrupted):
    workdir = tmp_path / "run"
    proc = run_with_fault(backend, workdir, "enospc-in-write:step_8")
    assert proc.returncode == 1, proc.stderr[-2000:]
    error = proc.stderr.split("error: ", 1)[1]
    assert "step 8" in error and "No space left on device" in error and "Earlier checkpoints are intact" in error
    assert "Traceback" not in proc.stderr
    assert not list(workdir.glob("checkpoints/*/.*.tmp"))
    # The checkpoint before the failed save is the uninterrupted run's step 4, bit for bit.
    assert_same_state(final_state(workdir, 4), final_state(uninterrupted(backend), 4))
    proc = run_with_fault(backend, workdir)
    assert proc.returncode == 0, proc.stderr
    assert_same_state(final_state(workdir), final_state(uninterrupted(backend)))
