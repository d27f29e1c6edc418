"""What the shared trainer does the same way in both backends, run in each: a resume after a crash is
bit-identical, bad input touches no checkpoint, eval reports its bound and averages noise draws."""
from __future__ import annotations

import json

import numpy as np
import pytest

from vdm_common import data as data_lib
from vdm_common import neutral, trainer
from vdm_common import workdir as workdir_lib
from tests.conftest import records, run_mode, tiny_config, tree_digest

BACKENDS = [pytest.param("jax", marks=pytest.mark.jax), pytest.param("torch", marks=pytest.mark.torch)]
NATIVE = {"jax": "checkpoints/orbax/2/", "torch": "checkpoints/torch/step_2.pt"}


def one_device(backend: str) -> dict:
    if backend == "jax":
        import jax
        return dict(devices=tuple(jax.devices()[:1]))
    return dict(device="cpu")


class Crash(Exception):
    """Stands for whatever kills a run (preemption, a failing disk) between two checkpoints."""


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_interrupted_run_resumes_bit_identical(backend, tmp_path, monkeypatch):
    # Dropout on: its masks must come back the same after a resume as well.
    config = tiny_config("training.num_steps_train=8", "training.steps_per_save=4", "training.steps_per_eval=8",
                         "training.num_eval_batches=1", "training.steps_per_sample=0", "model.sm_pdrop=0.1")
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    run_mode(backend, config, whole, **one_device(backend))
    real_batch = data_lib.train_batch

    def failing_batch(dataset, seed, step, *args, **kwargs):
        if step >= 6:
            raise Crash(f"killed at step {step}")
        return real_batch(dataset, seed, step, *args, **kwargs)

    monkeypatch.setattr(data_lib, "train_batch", failing_batch)
    with pytest.raises(Crash):
        run_mode(backend, config, broken, **one_device(backend))
    monkeypatch.undo()
    assert (broken / "checkpoints" / "neutral" / "step_4.safetensors").is_file()   # saved before the crash
    assert [r["step"] for r in records(broken, "train")] == [2, 4]   # died loading the batches of steps 6..7
    import torch
    torch.manual_seed(12345)       # whatever the process did meanwhile: the run's draws do not depend on it
    assert run_mode(backend, config, broken, **one_device(backend))["step"] == 8
    a, b = (neutral.load_neutral(workdir_lib.layout(w).neutral_path(8)) for w in (whole, broken))
    assert (a.step, a.opt_count) == (b.step, b.opt_count) == (8, 8)
    for name in ("params", "ema_params", "opt_mu", "opt_nu"):
        assert neutral.same_tensors(getattr(a, name), getattr(b, name)) == [], name
    assert records(whole, "eval")[-1] == records(broken, "eval")[-1]
    # The resumed run logged 6 and 8 once each: the rows equal the uninterrupted run's (but the speed).
    strip = lambda rows: [{k: v for k, v in r.items() if k != "steps_per_sec"} for r in rows]   # noqa: E731
    assert strip(records(whole, "train")) == strip(records(broken, "train"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_give_clear_errors_and_touch_no_checkpoint(backend, tmp_path):
    digits = data_lib.load_dataset(tiny_config().data)
    npz = tmp_path / "images.npz"
    np.savez(npz, train=digits.train[:200], test=digits.test[:50], vocab_size=np.int64(17))
    overrides = ["data.dataset=npz", f"data.npz_path={npz}", "training.num_steps_train=2",
                 "training.steps_per_sample=0", "training.batch_size_eval=50"]
    workdir = tmp_path / "run"
    run_mode(backend, tiny_config(*overrides), workdir, **one_device(backend))
    before = tree_digest(workdir)
    assert any(name.startswith(NATIVE[backend]) for name in before)
    good = npz.read_bytes()

    npz.write_bytes(good[: len(good) // 2])                               # a truncated file
    with pytest.raises(data_lib.DataError, match=str(npz)):
        run_mode(backend, tiny_config(*overrides), workdir, **one_device(backend))
    npz.unlink()                                                          # a missing file
    with pytest.raises(data_lib.DataError, match=r"does not exist"):
        run_mode(backend, tiny_config(*overrides), workdir, **one_device(backend))
    npz.write_bytes(good)
    with pytest.raises(workdir_lib.WorkdirError) as error:               # a different config
        run_mode(backend, tiny_config(*overrides, "model.sm_n_embd=16", "optimizer.learning_rate=1e-3"), workdir,
                 **one_device(backend))
    assert "2 field(s) differ" in str(error.value)
    assert "model.sm_n_embd: stored=8 new=16" in str(error.value)
    assert "optimizer.learning_rate: stored=0.002 new=0.001" in str(error.value)
    with pytest.raises(trainer.RunError, match=r"refused: \['model.sm_n_embd'\]"):
        run_mode(backend, None, workdir, "eval", {"model.sm_n_embd": 16}, **one_device(backend))
    assert tree_digest(workdir) == before


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_reports_the_bound_and_averages_noise_draws(backend, tmp_path):
    """--config.training.eval_timesteps picks the bound (continuous, or discrete with T steps: higher, and
    closer to the continuous one as T grows); eval_noise_samples averages draws per image, shrinking the
    standard error; each result names its bound and lands in its own file."""
    workdir = tmp_path / "run"
    run_mode(backend, tiny_config("training.steps_per_sample=0"), workdir, **one_device(backend))

    def evaluate(timesteps: int, draws: int) -> dict:
        overrides = {"training.eval_timesteps": timesteps, "training.eval_noise_samples": draws}
        return run_mode(backend, None, workdir, "eval", overrides, **one_device(backend))

    continuous, coarse, fine = evaluate(0, 8), evaluate(10, 8), evaluate(1000, 8)
    assert continuous["bound"] == "continuous" and coarse["bound"] == "T10" and fine["bound"] == "T1000"
    # Same t draws (rounded up to k/T), same eps: the T=10 bound is clearly above, T=1000 near the continuous one.
    assert coarse["bpd_diff"] > fine["bpd_diff"] + 5 * fine["bpd_stderr"]
    assert abs(fine["bpd"] - continuous["bpd"]) < 0.1 * (coarse["bpd"] - continuous["bpd"])
    # The prior and reconstruction terms do not depend on the bound.
    assert coarse["bpd_recon"] == pytest.approx(continuous["bpd_recon"], rel=1e-6)
    assert continuous["bpd_stderr"] < evaluate(0, 1)["bpd_stderr"]
    stored = workdir / "eval" / f"step_6_T10_x8_297img_ema_{backend}.json"
    assert json.loads(stored.read_text())["bpd"] == coarse["bpd"]
    assert trainer.format_eval(coarse).startswith("test bpd (discrete-time VLB, T=10, 8 noise draws per image)")
