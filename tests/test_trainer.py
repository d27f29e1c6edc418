"""The framework-free parts of a run (vdm_common.trainer, run, workdir, metrics, noise, api): no backend needed."""
from __future__ import annotations


import numpy as np
import pytest

from vdm_common import metrics, noise, run, trainer
from vdm_common import workdir as workdir_lib
from vdm_common.metrics import read_metrics
from tests.conftest import tiny_config


def test_eval_statistics_mean_and_standard_error():
    values = {"bpd": np.array([1.0, 2.0, 3.0, 6.0]), "bpd_diff": np.array([0.5, 1.0, 1.5, 3.0])}
    stats = run.eval_statistics(values)
    assert stats["bpd"] == 3.0 and stats["bpd_diff"] == 1.5 and stats["num_examples"] == 4
    # sample std: sqrt(((-2)^2 + (-1)^2 + 0 + 3^2) / 3) = sqrt(14 / 3); stderr = that / 2
    assert stats["bpd_stderr"] == pytest.approx(np.sqrt(14 / 3) / 2, rel=1e-12)
    assert run.eval_statistics({"bpd": np.array([2.5])})["bpd_stderr"] == 0.0


def test_check_divisible_names_the_field_and_the_nearest_sizes():
    trainer.check_divisible(64, 8, "training.batch_size_train")
    with pytest.raises(run.RunError, match=r"batch_size_train = 100 is not divisible .*\(8\).*nearest: 96 or 104"):
        trainer.check_divisible(100, 8, "training.batch_size_train")


def test_neutral_exports_are_pruned_to_the_newest(tmp_path):
    paths = workdir_lib.layout(tmp_path)
    paths.neutral.mkdir(parents=True)
    for step in (2, 10, 4, 8):
        paths.neutral_path(step).write_bytes(b"x")
    (paths.neutral / "notes.txt").write_text("kept")
    assert run.neutral_steps(str(tmp_path)) == [2, 4, 8, 10]
    run.prune_neutral(str(tmp_path), keep=2)
    assert run.neutral_steps(str(tmp_path)) == [8, 10] and (paths.neutral / "notes.txt").exists()


def test_eval_and_sample_modes_refuse_model_overrides(tmp_path):
    workdir_lib.prepare_workdir(tmp_path, tiny_config(), "jax")
    config = trainer.mode_config("sample", str(tmp_path), None, {"training.num_samples": 9})
    assert config.training.num_samples == 9 and config.model.sm_n_embd == 8
    with pytest.raises(run.RunError, match=r"refused: \['model.sm_n_embd'\]"):
        trainer.mode_config("eval", str(tmp_path), None, {"model.sm_n_embd": 16})


def test_results_are_named_by_what_made_them_and_never_replaced(tmp_path):
    paths = workdir_lib.layout(tmp_path)
    assert paths.eval_path(5000, "T1000", 16, 297, "ema", "torch").name == "step_5000_T1000_x16_297img_ema_torch.json"
    assert paths.sample_path(6, 4, 3, 1, "ema", "jax").name == "step_6_n4_T3_seed1_ema_jax.png"
    target = paths.eval / "result.json"
    assert workdir_lib.write_new(target, b"first") == target
    assert workdir_lib.write_new(target, b"first") == target                 # the same bytes: nothing new
    second = workdir_lib.write_new(target, b"second")
    assert second.name == "result.1.json" and workdir_lib.write_new(target, b"third").name == "result.2.json"
    assert target.read_bytes() == b"first" and second.read_bytes() == b"second"


def test_a_resumed_run_drops_the_rows_past_its_checkpoint(tmp_path):
    # A run logged steps 2..8 and was killed after its checkpoint of step 4; the resumed one logs 6 and 8 again.
    with metrics.MetricsWriter(tmp_path) as writer:
        for step in (2, 4, 6, 8):
            writer.write(step, "train", bpd=float(step))
        writer.write(4, "eval", bpd=1.0)
        writer.write(8, "eval", bpd=2.0)
    with metrics.MetricsWriter(tmp_path, resume_step=4) as writer:
        writer.write(6, "train", bpd=60.0)
    rows = [(r["step"], r["split"], r["bpd"]) for r in read_metrics(tmp_path / "metrics.jsonl")]
    assert rows == [(2, "train", 2.0), (4, "train", 4.0), (4, "eval", 1.0), (6, "train", 60.0)]
    # TensorBoard: the resumed run's event file starts with a SessionLog START at step 5, which makes
    # TensorBoard drop the earlier files' events of steps >= 5.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    accumulator = EventAccumulator(str(tmp_path / "tensorboard" / "train"))
    accumulator.Reload()
    assert [(e.step, e.value) for e in accumulator.Scalars("bpd")] == [(2, 2.0), (4, 4.0), (6, 60.0)]


def test_eval_noise_of_an_image_does_not_depend_on_its_batch():
    whole = noise.eval_noise(3, np.arange(10), 0, (4, 4, 1), timesteps=0)
    part = noise.eval_noise(3, np.arange(6, 10), 0, (4, 4, 1), timesteps=0)
    for a, b in zip(whole, part):
        np.testing.assert_array_equal(a[6:], b)
    other_draw = noise.eval_noise(3, np.arange(10), 1, (4, 4, 1), timesteps=0)
    assert not np.any(other_draw.t == whole.t) and 0 <= whole.t.min() and whole.t.max() < 1
    discrete = noise.eval_noise(3, np.arange(10), 0, (4, 4, 1), timesteps=10)
    np.testing.assert_allclose(discrete.t, np.ceil(whole.t * 10) / 10)
    # Standard normal draws: over 10 x 16 x 2 values, mean within 4 standard errors of 0, variance of 1.
    values = np.concatenate([whole.eps.ravel(), whole.eps_0.ravel()])
    assert abs(values.mean()) < 4 / np.sqrt(values.size) and abs(values.var() - 1) < 4 * np.sqrt(2 / values.size)


def test_sample_noise_of_an_image_does_not_depend_on_how_many_are_drawn():
    four, two = noise.SampleNoise(0, range(4), (2, 2, 1)), noise.SampleNoise(0, range(2), (2, 2, 1))
    for _ in range(3):                         # z_1, then two steps
        np.testing.assert_array_equal(four.normal()[:2], two.normal())
    np.testing.assert_array_equal(four.gumbel(5)[:2], two.gumbel(5))


def test_format_eval_names_the_bound_and_the_draws():
    result = dict(bpd=1.5, bpd_stderr=0.01, num_examples=297, step=6, bpd_recon=0.1, bpd_latent=0.0, bpd_diff=1.4,
                  bound="T10", noise_samples=8, baseline_bpd=2.0)
    assert trainer.format_eval(result).startswith("test bpd (discrete-time VLB, T=10, 8 noise draws per image) 1.5000")
    assert "the model is 0.5000 bits/dim better" in trainer.format_eval(result)
