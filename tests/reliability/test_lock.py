"""A second training run in a workdir that a live run holds is refused with a message naming the holder; the
lock of a run that died (SIGKILL) does not block the next one (an flock: the kernel drops it with its holder).
"""
from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, RUN, env, run_with_fault
from vdm_common import config as config_lib
from vdm_common import workdir as workdir_lib
from tests.conftest import run_mode

HOLD = """
import sys, time
from vdm_common.workdir import workdir_lock
with workdir_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def holder(tmp_path):
    """A process holding the workdir lock (as a running training run does); yields it, kills it after."""
    workdir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(workdir)], cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "locked"
    yield proc
    proc.kill()
    proc.wait()


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_second_run_is_refused_while_the_first_holds_the_workdir(backend, holder, tmp_path):
    workdir = tmp_path / "run"
    config = config_lib.load_config(str(ROOT / "configs" / "quickstart.py"), RUN)
    with pytest.raises(workdir_lib.WorkdirLockedError) as error:
        run_mode(backend, config, workdir)
    message = str(error.value)
    assert f"pid {holder.pid}" in message and "in use by another training run" in message
    assert "different --workdir" in message
    assert sorted(p.name for p in workdir.iterdir()) == [".lock"]      # the refused run wrote nothing


def test_the_lock_of_a_killed_run_is_taken_over(holder, tmp_path):
    workdir = tmp_path / "run"
    proc = run_with_fault("torch", workdir)
    assert proc.returncode == 1 and f"pid {holder.pid}" in proc.stderr.split("error: ", 1)[1]
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    proc = run_with_fault("torch", workdir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (workdir / "checkpoints" / "torch" / "step_12.pt").is_file()
