"""Shared pieces of the fault-injection tests: a tiny run of each trainer, run with a fault (faults.py) in a
subprocess, and the final state of the same run uninterrupted, to compare bit for bit.

The run: the digits with an 11K-parameter model, dropout on (so the resumed dropout masks are checked too),
12 steps in calls of 2, a checkpoint every 4 steps, an eval (one batch) every 6.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vdm_common import neutral
from vdm_common import workdir as workdir_lib
from tests.conftest import tree_digest  # noqa: F401  (the reliability tests import it from here)

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = {"jax": "train_jax.py", "torch": "train_torch.py"}
TOTAL_STEPS = 12
RUN = ["model.sm_n_embd=8", "model.sm_n_layer=1", "model.norm_groups=4", "model.sm_pdrop=0.1",
       "model.fourier_start=6", "model.fourier_stop=8", "optimizer.learning_rate=2e-3",
       "optimizer.num_steps_lr_warmup=2", f"training.num_steps_train={TOTAL_STEPS}", "training.substeps=2",
       "training.batch_size_train=16", "training.batch_size_eval=32", "training.num_eval_batches=2",
       "training.steps_per_logging=2", "training.steps_per_eval=6", "training.steps_per_save=4",
       "training.checkpoints_to_keep=3", "training.steps_per_sample=0"]


def env() -> dict:
    out = dict(os.environ, JAX_PLATFORMS="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    out.pop("XLA_FLAGS", None)
    return out


def run_with_fault(backend: str, workdir: Path, fault: str = "none", *extra: str,
                   processes: int = 0) -> subprocess.CompletedProcess:
    """Runs the backend's trainer on `workdir` with `fault` injected (torch: under torchrun with that many
    processes when processes > 0); returns the finished process."""
    args = [f"--workdir={workdir}"] + [f"--config.{item}" for item in RUN + list(extra)]
    launcher = [] if processes == 0 else ["-m", "torch.distributed.run", "--standalone",
                                          f"--nproc_per_node={processes}", "--max_restarts=0"]
    return subprocess.run([sys.executable, *launcher, str(Path(__file__).with_name("faults.py")), fault,
                           SCRIPTS[backend], *args], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)


def final_state(workdir: Path, step: int = TOTAL_STEPS) -> neutral.NeutralCheckpoint:
    return neutral.load_neutral(workdir_lib.layout(workdir).neutral_path(step))


def assert_same_state(a: neutral.NeutralCheckpoint, b: neutral.NeutralCheckpoint) -> None:
    """Bit-identical: step, Adam count, params, EMA and both moments."""
    assert (a.step, a.opt_count) == (b.step, b.opt_count)
    for name in ("params", "ema_params", "opt_mu", "opt_nu"):
        assert neutral.same_tensors(getattr(a, name), getattr(b, name)) == [], name


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory):
    """backend -> the workdir of the run trained to the end without a fault (made once per session)."""
    made: dict[str, Path] = {}

    def get(backend: str) -> Path:
        if backend not in made:
            workdir = tmp_path_factory.mktemp(f"uninterrupted_{backend}")
            proc = run_with_fault(backend, workdir)
            assert proc.returncode == 0, proc.stderr
            made[backend] = workdir
        return made[backend]
    return get


@pytest.fixture
def copy_of(tmp_path):
    """A fresh copy of a workdir (so a test may damage it)."""
    def copy(workdir: Path) -> Path:
        target = tmp_path / f"copy_{workdir.name}"
        shutil.copytree(workdir, target)
        return target
    return copy
