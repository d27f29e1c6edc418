"""One process of a 2-process job dies (SIGKILL) or hangs (SIGSTOP) during a step, an eval or a checkpoint save:
the other stops within the peer timeout (default 20 s; asserted: 30 s) with one `error:` line naming the
missing process and the newest checkpoint, and exit status 75; rerunning the same command (a shell loop, or
torchrun's own restarts) resumes and ends bit-identical to an uninterrupted 2-process run."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import RUN, ROOT, SCRIPTS, assert_same_state, env, final_state
from tests.conftest import free_port

pytestmark = pytest.mark.multiprocess

FAULTS = str(Path(__file__).with_name("faults.py"))
EXIT_PEER_LOST = 75
WITHIN = 30.0            # seconds from the fault to the survivor's exit (the peer timeout is 20)


def commands(backend: str, workdir: Path, fault: str, port: int) -> list[list[str]]:
    """The command line of each of the 2 processes (--coordinator_address, no launcher)."""
    args = [f"--workdir={workdir}", *(f"--config.{item}" for item in RUN), f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2"]
    return [[sys.executable, FAULTS, fault, SCRIPTS[backend], *args, f"--process_id={i}"] for i in range(2)]


def stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] in ("T", "t")


def run_job(backend: str, workdir: Path, fault: str, victim: int, tmp_path: Path) -> dict:
    """Starts both processes, waits until the victim is dead or stopped and the survivor has exited; returns
    the survivor's exit status, output and the seconds from the fault to its exit."""
    logs = [(open(tmp_path / f"out{i}", "w+"), open(tmp_path / f"err{i}", "w+")) for i in range(2)]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=dict(env(), RANK=str(i)), stdout=out, stderr=err)
             for i, (cmd, (out, err)) in enumerate(zip(commands(backend, workdir, fault, free_port()), logs))]
    survivor, faulted_at, deadline = procs[1 - victim], None, time.monotonic() + 600
    try:
        while survivor.poll() is None and time.monotonic() < deadline:
            if faulted_at is None and (procs[victim].poll() is not None or stopped(procs[victim].pid)):
                faulted_at = time.monotonic()
            time.sleep(0.2)
        exited_at = time.monotonic()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    out, err = (logs[1 - victim][k].seek(0) or logs[1 - victim][k].read() for k in (0, 1))
    assert faulted_at is not None, f"the fault never happened:\n{out}\n{err}"
    return dict(status=survivor.returncode, seconds=exited_at - faulted_at, out=out, err=err)


def assert_clean_stop(result: dict, missing: str) -> None:
    assert result["status"] == EXIT_PEER_LOST, result["err"][-3000:]
    assert result["seconds"] < WITHIN, result["seconds"]
    lines = [line for line in result["err"].splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and missing in lines[0] and "Newest checkpoint: step" in lines[0], result["err"][-3000:]
    assert "Traceback" not in result["err"] and "Fatal" not in result["err"], result["err"][-3000:]


def rerun(backend: str, workdir: Path) -> None:
    """The same command again, both processes, no fault: it must resume and finish."""
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=dict(env(), RANK=str(i)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for i, cmd in enumerate(commands(backend, workdir, "none", free_port()))]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    assert "resumed from step" in outputs[0][0]


@pytest.fixture(scope="module")
def uninterrupted2(tmp_path_factory):
    """backend -> the workdir of the 2-process run trained without a fault."""
    made = {}

    def get(backend: str) -> Path:
        if backend not in made:
            made[backend] = tmp_path_factory.mktemp(f"whole2_{backend}")
            procs = [subprocess.Popen(cmd, cwd=ROOT, env=dict(env(), RANK=str(i)), stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True)
                     for i, cmd in enumerate(commands(backend, made[backend], "none", free_port()))]
            for p in procs:
                assert p.wait(timeout=600) == 0, p.stderr.read()[-3000:]
        return made[backend]
    return get


def test_jax_a_killed_process_stops_the_other_and_a_shell_loop_restarts_the_job(tmp_path, uninterrupted2):
    """The README's restart loop, run as written for each process: the killed one (status 137) and the one it
    stopped (75) both start again; the job resumes from step 4 and ends as if never interrupted."""
    workdir = tmp_path / "run"
    loop = (ROOT / "README.md").read_text().split("```bash\n# restart-loop\n", 1)[1].split("```", 1)[0]
    port = free_port()
    procs = []
    for i in range(2):
        command = " ".join(commands("jax", workdir, f"once:{tmp_path}/fault,signal-at-step:7:SIGKILL:1", port)[i])
        script = loop.replace("python train_jax.py ARGS", command)
        procs.append(subprocess.Popen(["bash", "-c", script], cwd=ROOT, env=dict(env(), RANK=str(i)),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    first_attempt = outputs[0][1]
    assert "error: process 1 of 2 stopped responding" in first_attempt and "Newest checkpoint: step 4" in first_attempt
    assert "resumed from step 4" in outputs[0][0]
    assert_same_state(final_state(workdir), final_state(uninterrupted2("jax")))


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_a_stopped_process_in_an_eval_stops_the_other(backend, tmp_path):
    assert_clean_stop(run_job(backend, tmp_path / "run", "signal-in-eval:1:SIGSTOP:1", 1, tmp_path), "process 1 of 2")


def test_jax_a_process_killed_while_a_checkpoint_is_written_leaves_nothing_half_done(tmp_path, uninterrupted2):
    workdir = tmp_path / "run"
    assert_clean_stop(run_job("jax", workdir, "kill-in-save:8:1", 1, tmp_path), "process 1 of 2")
    rerun("jax", workdir)
    assert not list((workdir / "checkpoints").rglob("*tmp*"))      # orbax's unfinished step 8 was removed
    assert_same_state(final_state(workdir), final_state(uninterrupted2("jax")))


def test_torch_process_0_killed_in_a_checkpoint_write_stops_the_other(tmp_path, uninterrupted2):
    # Process 0 hosts the TCPStore here (no torchrun): the other sees the store go silent.
    workdir = tmp_path / "run"
    assert_clean_stop(run_job("torch", workdir, "kill-in-write:step_8.pt:0", 0, tmp_path), "key-value store")
    rerun("torch", workdir)
    assert_same_state(final_state(workdir), final_state(uninterrupted2("torch")))


def test_torchrun_restarts_the_job_itself_after_a_kill(tmp_path, uninterrupted2):
    workdir = tmp_path / "run"
    args = [f"--workdir={workdir}", *(f"--config.{item}" for item in RUN)]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "--max_restarts=1", FAULTS, f"once:{tmp_path}/fault,signal-at-step:7:SIGKILL:1",
                           SCRIPTS["torch"], *args], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from step 4" in proc.stdout
    assert_same_state(final_state(workdir), final_state(uninterrupted2("torch")))
