"""A run directory written by the trainers before the shared trainer (tests/data/run_before_engines: step 4
of a tiny run, dropout on) resumes under it, and its continuation is exact: resuming at step 4 and training
to 8 equals resuming at 4, stopping at 6 and resuming again, bit for bit.

(The step-4 state was computed on one CPU; on another, float32 kernels round differently, so a fresh run there
is not bit-identical to it: the comparisons here are between runs made on the machine running the test.)"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import assert_same_state
from vdm_common import neutral
from vdm_common import workdir as workdir_lib
from vdm_common.metrics import read_metrics
from tests.conftest import run_mode

DATA = Path(__file__).resolve().parents[1] / "data" / "run_before_engines"


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_a_run_of_the_previous_trainer_resumes_bit_identical(backend, tmp_path):
    states = []
    for stops in ([8], [6, 8]):
        workdir = tmp_path / f"run_{len(stops)}"
        shutil.copytree(DATA / backend, workdir)
        before = read_metrics(workdir / "metrics.jsonl")
        for stop in stops:
            config = workdir_lib.read_config(workdir)
            config.training.num_steps_train = stop             # a field a resume may change
            summary = run_mode(backend, config, workdir)
            assert summary["step"] == stop
        rows = read_metrics(workdir / "metrics.jsonl")
        assert rows[:len(before)] == before and [r["step"] for r in rows if r["split"] == "train"] == [2, 4, 6, 8]
        states.append(neutral.load_neutral(workdir_lib.layout(workdir).neutral_path(8)))
    assert_same_state(*states)
