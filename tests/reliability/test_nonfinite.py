"""Non-finite loss or gradients: the step is not applied (parameters, EMA and optimizer state unchanged, the
LR schedule's count too) and only the step counter advances to the next batch; after
training.max_nonfinite_steps such steps in a row the run stops with a message naming the steps and the last
good checkpoint. NaN is injected through the noise of the loss (unit tests) or an input of the step
(faults.py: nan-at-steps).
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import ROOT, RUN, final_state, run_with_fault
from vdm_common import config as config_lib
from vdm_common import data as data_lib


def config():
    return config_lib.load_config(str(ROOT / "configs" / "quickstart.py"), RUN)


def batch(step: int):
    return data_lib.train_batch(data_lib.load_dataset(config().data), 1, step, 16)


def test_jax_step_with_nan_changes_nothing_but_the_step():
    from vdm_jax import steps, vdm
    c = config()
    mc = config_lib.model_config(c)
    state = steps.create_train_state(mc, c.optimizer, jax.random.key(0), (8, 8, 1))
    rng = jax.random.key(1)
    state, _ = steps.train_step(mc, c.optimizer, state, *batch(0), rng)
    before = jax.tree_util.tree_map(np.asarray, state)
    images, conditioning = batch(1)
    noise = vdm.draw_noise(rng, images.shape, mc)
    after, metrics = steps.train_step(mc, c.optimizer, state, images, conditioning, rng,
                                      noise=noise._replace(eps=noise.eps * jnp.nan))
    assert float(metrics["skipped"]) == 1.0 and not np.isfinite(float(metrics["bpd"]))
    assert int(after.step) == 2
    for name in ("params", "ema_params", "opt_state"):
        for x, y in zip(jax.tree_util.tree_leaves(getattr(before, name)), jax.tree_util.tree_leaves(getattr(after, name))):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)
    # The next finite step is applied with the LR of one update done (warmup over 2: lr / 2), not of two.
    final, metrics = steps.train_step(mc, c.optimizer, after, *batch(2), rng)
    assert float(metrics["skipped"]) == 0.0 and int(steps.adam_count(final.opt_state)) == 2
    assert float(metrics["learning_rate"]) == pytest.approx(c.optimizer.learning_rate / 2)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(final.ema_params))


def test_torch_step_with_nan_changes_nothing_but_the_step():
    from vdm_torch import steps, vdm
    c = config()
    mc = config_lib.model_config(c)
    state = steps.create_train_state(mc, c.optimizer, 0)

    def step(s, nan=False):
        images, conditioning = batch(s)
        x = torch.from_numpy(np.moveaxis(images, -1, 1)).long()
        noise = vdm.draw_noise(steps.step_generator(1, s), x.shape, mc)
        if nan:
            noise = noise._replace(eps=noise.eps * torch.nan)
        return steps.train_step(mc, c.optimizer, state, x, torch.from_numpy(conditioning), noise=noise)

    step(0)
    snapshot = {k: v.clone() for k, v in state.model.state_dict().items()}
    ema = {k: v.clone() for k, v in state.ema.state_dict().items()}
    moments = {id(p): {k: v.clone() for k, v in s.items()} for p, s in state.optimizer.state.items()}
    metrics = step(1, nan=True)
    assert float(metrics["skipped"]) == 1.0 and state.step == 2 and state.updates == 1
    for k, v in state.model.state_dict().items():
        assert torch.equal(v, snapshot[k]), k
    for k, v in state.ema.state_dict().items():
        assert torch.equal(v, ema[k]), k
    for p, s in state.optimizer.state.items():
        for k, v in s.items():
            assert torch.equal(v, moments[id(p)][k]), k
    metrics = step(2)
    assert float(metrics["skipped"]) == 0.0 and state.updates == 2
    assert float(metrics["learning_rate"]) == pytest.approx(c.optimizer.learning_rate / 2)
    assert all(torch.isfinite(v).all() for v in state.ema.state_dict().values())


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_too_many_nonfinite_steps_in_a_row_stop_the_run(backend, tmp_path):
    workdir = tmp_path / "run"
    proc = run_with_fault(backend, workdir, "nan-at-steps:5:8", "training.max_nonfinite_steps=3")
    assert proc.returncode == 1, proc.stderr[-2000:]
    error = proc.stderr.split("error: ", 1)[1]
    assert "the 3 steps 5..7 in a row had a non-finite loss or gradient" in error
    assert f"Last good checkpoint: step 4 in {workdir / 'checkpoints'}" in error
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_fewer_nonfinite_steps_are_skipped_and_logged(backend, tmp_path):
    workdir = tmp_path / "run"
    proc = run_with_fault(backend, workdir, "nan-at-steps:5:7", "training.max_nonfinite_steps=3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    skipped = {r["step"]: r["skipped"] for r in rows if r["split"] == "train"}
    assert skipped == {2: 0, 4: 0, 6: 1, 8: 1, 10: 0, 12: 0}        # logged every 2 steps: 5 in 4..6, 6 in 6..8
    assert all(np.isfinite(r["bpd"]) for r in rows)
    state = final_state(workdir)
    assert state.opt_count == 10 and state.step == 12
    for tensors in (state.params, state.ema_params, state.opt_mu, state.opt_nu):
        assert all(np.isfinite(v).all() for v in tensors.values())
