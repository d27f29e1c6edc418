"""SIGTERM (a preemption notice) and SIGINT (Ctrl-C): the run finishes the steps under way, saves a checkpoint
of the current step, says so and exits with status 128 + the signal number; the next start resumes from that
checkpoint and ends bit-identical to a run never stopped. A second signal stops at once, without saving.
"""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, RUN, assert_same_state, env, final_state, run_with_fault
from vdm_common import run


@pytest.mark.parametrize("backend,signame", [("jax", "SIGTERM"), ("torch", "SIGTERM"), ("torch", "SIGINT")])
def test_signal_saves_the_current_step_and_the_run_resumes_exactly(backend, signame, tmp_path, uninterrupted):
    workdir = tmp_path / "run"
    # The signal arrives while the call of steps 4..6 runs (the loop loads the next call's batches, 6..8,
    # while a call runs): that call completes, then the loop saves step 6 (a step no periodic save covers:
    # they are every 4) and stops.
    proc = run_with_fault(backend, workdir, f"signal-at-step:7:{signame}")
    assert proc.returncode == 128 + signal.Signals[signame].value, proc.stderr[-2000:]
    assert f"received {signame}" in proc.stdout and f"stopped by {signame} at step 6" in proc.stdout
    assert "Traceback" not in proc.stderr
    assert run.neutral_steps(str(workdir)) == [4, 6]
    proc = run_with_fault(backend, workdir)
    assert proc.returncode == 0, proc.stderr
    assert "resumed from step 6" in proc.stdout
    assert_same_state(final_state(workdir), final_state(uninterrupted(backend)))


def test_a_second_signal_stops_at_once_without_saving(tmp_path):
    workdir = tmp_path / "run"
    proc = run_with_fault("torch", workdir, "signal-at-step:7:twice")
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:]
    assert "received SIGTERM:" in proc.stdout and "stopped by" not in proc.stdout
    assert proc.stdout.count("received SIGTERM again: stopped at once, without saving") == 1
    assert "Traceback" not in proc.stderr
    assert run.neutral_steps(str(workdir)) == [4]


SECOND_SIGNAL = """
import os, signal, sys, time
from vdm_common.interrupts import StopSignals

signum, busy = signal.Signals[sys.argv[1]], sys.argv[2] == "busy"
with StopSignals() as stop:
    if busy:  # the main thread as in a long native call: signals reach it only when it runs Python again
        signal.pthread_sigmask(signal.SIG_BLOCK, {signum})
    os.kill(os.getpid(), signum)
    time.sleep(0.5)                 # (two signals sent back to back would merge into one)
    print("first:", signal.Signals(stop.received).name, flush=True)
    os.kill(os.getpid(), signum)
    time.sleep(60)
print("not stopped")
"""


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("main_thread", ["idle", "busy"])
def test_the_second_signal_ends_the_process_at_once_with_one_line(signame, main_thread):
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", SECOND_SIGNAL, signame, main_thread], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=120)
    assert time.monotonic() - start < 30                        # not after the main thread's 60 s
    assert proc.returncode == 128 + signal.Signals[signame].value, proc.stderr
    assert proc.stderr == ""                                    # no KeyboardInterrupt traceback
    assert proc.stdout.splitlines() == [
        f"received {signame}: stopping after the current steps and saving a checkpoint (send it again to stop at "
        f"once, without saving)",
        f"first: {signame}",
        f"received {signame} again: stopped at once, without saving; the newest checkpoint is where the next start "
        f"resumes"]


@pytest.mark.multiprocess
def test_a_signal_to_one_ddp_process_stops_all_at_the_same_step(tmp_path):
    # Rank 0 alone gets SIGTERM (a preemption notice may reach one host first): both processes agree to stop
    # after the call of steps 4..6, save step 6 once and stop; torchrun reports the exit status.
    workdir = tmp_path / "run"
    proc = run_with_fault("torch", workdir, "signal-at-step:7:SIGTERM:0", processes=2)
    assert proc.returncode != 0 and "stopped by SIGTERM at step 6" in proc.stdout, proc.stderr[-3000:]
    assert run.neutral_steps(str(workdir)) == [4, 6]
    proc = run_with_fault("torch", workdir, processes=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from step 6" in proc.stdout
    whole = tmp_path / "whole"
    assert run_with_fault("torch", whole, processes=2).returncode == 0
    assert_same_state(final_state(workdir), final_state(whole))


@pytest.mark.multiprocess
def test_a_signal_to_one_jax_process_stops_both_at_the_same_step(tmp_path):
    # Two JAX processes (one CPU device each, gloo collectives); process 0 alone gets SIGTERM while the call of
    # steps 4..6 runs: both stop after it, step 6 is saved once, both exit with 128 + SIGTERM.
    workdir = tmp_path / "run"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [f"--workdir={workdir}", *(f"--config.{item}" for item in RUN), f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2"]
    procs = [subprocess.Popen([sys.executable, str(Path(__file__).with_name("faults.py")), "signal-at-step:7:SIGTERM:0",
                               "train_jax.py", *args, f"--process_id={i}"], cwd=ROOT, env=dict(env(), RANK=str(i)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "stopped by SIGTERM at step 6" in outputs[0][0]
    assert run.neutral_steps(str(workdir)) == [4, 6]
