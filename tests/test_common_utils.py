"""Fast tests of the framework-free workdir, metrics and image utilities (vdm_common)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from PIL import Image

from vdm_common import config as config_lib
from vdm_common import images, metrics, weights, workdir


def small_config(**model):
    return config_lib.make_config(dict(dict(sm_n_embd=32, sm_n_layer=2, norm_groups=8), **model),
                                  training=dict(num_steps_train=100), data=dict(dataset="digits"))


def with_changes(config, changes=(), removed=()):
    """A copy of config with {dotted: value} set (new fields allowed) and dotted fields removed."""
    tree = config.to_dict()
    for dotted, value in dict(changes).items():
        section, field = dotted.split(".")
        tree[section][field] = value
    for dotted in removed:
        section, field = dotted.split(".")
        del tree[section][field]
    return ml_collections.ConfigDict(tree)


def snapshot(path):
    """{relative path: bytes} of every file under path."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------- workdir

def test_prepare_new_workdir_writes_config_run_and_layout(tmp_path):
    config = small_config()
    root = workdir.prepare_workdir(tmp_path / "run", config, "jax")
    assert root == tmp_path / "run"
    assert json.loads((root / "config.json").read_text()) == config.to_dict()
    run = json.loads((root / "run.json").read_text())
    assert run["backend"] == "jax" and run["created"]
    assert workdir.read_run_info(root)["backend"] == "jax"
    for sub in ("checkpoints", "samples", "eval", "tensorboard", "plots"):
        assert (root / sub).is_dir()
    assert sorted(p.name for p in root.iterdir() if p.is_file()) == ["config.json", "run.json"]
    assert workdir.read_config(root).to_dict() == config.to_dict()
    # The same config again (a resume, from the other backend) is accepted and changes nothing.
    before = snapshot(root)
    workdir.prepare_workdir(root, config, "torch")
    assert snapshot(root) == before


def test_mismatch_lists_exactly_the_differing_fields_and_changes_nothing(tmp_path):
    config = small_config()
    root = workdir.prepare_workdir(tmp_path, config, "torch")
    (root / "metrics.jsonl").write_text('{"step": 1}\n')
    before = snapshot(root)
    changed = with_changes(config, {
        "model.sm_n_layer": 4,
        "optimizer.learning_rate": 1e-3,
        "training.num_steps_train": 10**6,        # allowed: not reported
        "data.extra": "x",                        # a field the stored config lacks
    }, removed=["training.seed"])
    with pytest.raises(workdir.WorkdirError) as info:
        workdir.prepare_workdir(root, changed, "jax")
    message = str(info.value)
    listed = [line.strip() for line in message.splitlines() if ": stored=" in line]
    assert listed == [
        "data.extra: stored=<missing> new='x'",
        "model.sm_n_layer: stored=2 new=4",
        "optimizer.learning_rate: stored=0.0002 new=0.001",
        "training.seed: stored=1 new=<missing>",
    ]
    assert "4 field(s) differ" in message and "new --workdir" in message
    assert snapshot(root) == before


def test_resumable_fields_may_differ(tmp_path):
    config = small_config()
    flat = workdir.flatten(config.to_dict())
    assert workdir.RESUMABLE_FIELDS <= set(flat), "RESUMABLE_FIELDS names a field the schema lacks"
    root = workdir.prepare_workdir(tmp_path, config, "jax")
    before = snapshot(root)
    changes = {name: ("/elsewhere" if isinstance(flat[name], str) else flat[name] + 7)
               for name in workdir.RESUMABLE_FIELDS}
    workdir.prepare_workdir(root, with_changes(config, changes), "torch")
    assert snapshot(root) == before
    # One non-resumable field on top of them is still refused, and only it is listed.
    with pytest.raises(workdir.WorkdirError, match=r"1 field\(s\) differ\):\n  training.batch_size_train: "
                                                   r"stored=128 new=64\n"):
        workdir.prepare_workdir(root, with_changes(config, {**changes, "training.batch_size_train": 64}), "jax")


def test_read_config_without_config_json_is_a_clear_error(tmp_path):
    with pytest.raises(workdir.WorkdirError, match="has no config.json.*train first"):
        workdir.read_config(tmp_path)


def test_lock_refuses_a_second_holder_in_this_process(tmp_path):
    with workdir.workdir_lock(tmp_path) as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        with pytest.raises(workdir.WorkdirLockedError, match=f"pid {os.getpid()} on host"):
            with workdir.workdir_lock(tmp_path):
                pass
    with workdir.workdir_lock(tmp_path):           # released on exit
        pass


def test_lock_refuses_a_live_process_and_takes_over_from_a_dead_one(tmp_path):
    lock_path = tmp_path / workdir.LOCK_FILE
    holder_code = ("import fcntl, json, os, sys, time\n"
                   f"fd = os.open({str(lock_path)!r}, os.O_RDWR | os.O_CREAT)\n"
                   "fcntl.flock(fd, fcntl.LOCK_EX)\n"
                   "os.write(fd, json.dumps(dict(pid=os.getpid(), host='h', since='t')).encode())\n"
                   "print('locked', flush=True)\n"
                   "time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", holder_code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(workdir.WorkdirLockedError, match=f"pid {holder.pid} on host h"):
            with workdir.workdir_lock(tmp_path):
                pass
    finally:
        holder.kill()
        holder.wait()
    # The holder died without cleaning up: its pid is still in the file, and the lock is taken over.
    assert json.loads(lock_path.read_text())["pid"] == holder.pid
    with workdir.workdir_lock(tmp_path):
        assert json.loads(lock_path.read_text())["pid"] == os.getpid()


def test_atomic_write_replaces_and_leaves_no_temp_files(tmp_path, monkeypatch):
    target = tmp_path / "state.bin"
    workdir.atomic_write_bytes(target, b"one")
    workdir.atomic_write_text(target, "two \u03b3")
    assert target.read_bytes() == "two \u03b3".encode()
    assert [p.name for p in tmp_path.iterdir()] == ["state.bin"]

    def failing_replace(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        workdir.atomic_write_bytes(target, b"three")
    assert target.read_bytes() == "two \u03b3".encode()
    assert [p.name for p in tmp_path.iterdir()] == ["state.bin"]


# ---------------------------------------------------------------------------------------------- metrics

def test_metrics_jsonl_round_trip_and_nan_is_null(tmp_path):
    with metrics.MetricsWriter(tmp_path) as writer:
        writer.write(10, "train", bpd=np.float32(3.25), learning_rate=np.array(2e-4), grad_norm=float("nan"),
                     steps_per_sec=12)
        writer.write(20, "eval", bpd=np.float64(3.5), bpd_diff=float("inf"))
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert lines[0].startswith('{"step": 10, "split": "train", "bpd": 3.25')
    assert "null" in lines[0]

    def strict(constant):
        raise AssertionError(f"invalid JSON constant {constant}")
    for line in lines:
        json.loads(line, parse_constant=strict)
    assert metrics.read_metrics(tmp_path / "metrics.jsonl") == [
        {"step": 10, "split": "train", "bpd": 3.25, "learning_rate": 2e-4, "grad_norm": None, "steps_per_sec": 12},
        {"step": 20, "split": "eval", "bpd": 3.5, "bpd_diff": None},
    ]


def test_metrics_writer_rejects_bad_input_and_is_a_noop_when_disabled(tmp_path):
    with metrics.MetricsWriter(tmp_path / "a") as writer:
        with pytest.raises(ValueError, match="split 'test'"):
            writer.write(1, "test", bpd=1.0)
        with pytest.raises(TypeError, match="metric 'bpd' is not a scalar"):
            writer.write(1, "train", bpd=np.ones(3))
    disabled = metrics.MetricsWriter(tmp_path / "b", enabled=False)
    disabled.write(1, "train", bpd=1.0)
    disabled.close()
    assert not (tmp_path / "b").exists()


def test_metrics_appends_after_a_partial_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "split": "train", "bpd": 5.0}\n{"step": 2, "spl')
    with metrics.MetricsWriter(tmp_path) as writer:
        writer.write(2, "train", bpd=4.0)
    with pytest.warns(UserWarning, match=r"skipped unreadable line\(s\) \[2\]"):
        records = metrics.read_metrics(path)
    assert [(r["step"], r["bpd"]) for r in records] == [(1, 5.0), (2, 4.0)]


def test_tensorboard_events_hold_the_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with metrics.MetricsWriter(tmp_path) as writer:
        writer.write(100, "train", bpd=3.0, learning_rate=1e-4)
        writer.write(200, "train", bpd=2.5, learning_rate=2e-4)
        writer.write(200, "eval", bpd=2.75)
    train = EventAccumulator(str(tmp_path / "tensorboard" / "train"))
    train.Reload()
    assert sorted(train.Tags()["scalars"]) == ["bpd", "learning_rate"]
    assert [(e.step, e.value) for e in train.Scalars("bpd")] == [(100, 3.0), (200, 2.5)]
    assert train.Scalars("learning_rate")[1].value == pytest.approx(2e-4)
    evaluation = EventAccumulator(str(tmp_path / "tensorboard" / "eval"))
    evaluation.Reload()
    assert [(e.step, e.value) for e in evaluation.Scalars("bpd")] == [(200, 2.75)]


def test_progress_bar_shows_step_and_bpd(capsys):
    bar = metrics.ProgressBar(total_steps=100, initial_step=10)
    bar.update(30, np.float32(3.1))
    bar.close()
    err = capsys.readouterr().err
    assert "30/100" in err and "bpd=3.1000" in err and "step/s" in err
    quiet = metrics.ProgressBar(total_steps=100, enabled=False)
    quiet.update(50, 1.0)
    quiet.close()
    assert capsys.readouterr().err == ""


def test_plot_metrics_writes_a_png_and_errors_clearly(tmp_path):
    with metrics.MetricsWriter(tmp_path) as writer:
        for step in range(0, 500, 100):
            writer.write(step, "train", bpd=8.0 - step / 100)
        writer.write(400, "eval", bpd=4.2)
    out = metrics.plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "plots" / "bpd.png")
    assert out.stat().st_size > 1000
    with Image.open(out) as png:
        assert png.format == "PNG" and png.size == (800, 500)
    with pytest.raises(FileNotFoundError, match="no metrics file"):
        metrics.plot_metrics(tmp_path / "missing.jsonl", tmp_path / "x.png")
    (tmp_path / "other.jsonl").write_text('{"step": 1, "split": "train", "grad_norm": 1.0}\n')
    with pytest.raises(ValueError, match="no rows with a bpd"):
        metrics.plot_metrics(tmp_path / "other.jsonl", tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_format_count_and_bytes():
    assert metrics.format_count(30_578_181) == "30.58M"
    assert metrics.format_count(512) == "512"
    assert metrics.format_count(1234) == "1.23K"
    assert metrics.format_count(999_999) == "1.00M"
    assert metrics.format_count(2_500_000_000) == "2.50B"
    assert metrics.format_bytes(3 * 2**30) == "3.00 GiB"
    assert metrics.format_bytes(512) == "512 B"


def test_estimate_memory_bytes_formula():
    # 1000 params, 250 activation elements per example, 8 examples per device, float32:
    # 4 bytes * (5 * 1000 params/grads/adam m/adam v/EMA) + 4 bytes * 250 * 8 = 20_000 + 8_000.
    assert metrics.estimate_memory_bytes(1000, 250, 8) == 28_000
    # bf16 activations with float32 params: 20_000 + 2 * 250 * 8.
    assert metrics.estimate_memory_bytes(1000, 250, 8, activation_bytes_per_element=2) == 24_000


# ---------------------------------------------------------------------------------------------- weights

def test_wrapper_prefixes_are_stripped_when_every_key_carries_them():
    """DDP's `module.` and torch.compile's `_orig_mod.`, nested in either order and repeated; a prefix that
    only some keys carry stays (the strict check then reports those keys)."""
    state = {"a.weight": 1, "b.bias": 2}
    for prefix in ("module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module.", "module.module."):
        assert weights.strip_wrapper_prefixes({prefix + k: v for k, v in state.items()}) == state
    mixed = {"module.a.weight": 1, "b.bias": 2}
    assert weights.strip_wrapper_prefixes(mixed) == mixed
    assert weights.strip_wrapper_prefixes({}) == {}


# ---------------------------------------------------------------------------------------------- images

def test_image_grid_places_and_rescales_each_image():
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 17, size=(5, 2, 3, 1)).astype(np.uint8)
    imgs[4] = [[[0], [1], [8]], [[16], [15], [2]]]
    grid = images.image_grid(imgs, vocab_size=17, ncols=3)
    # Upscale s: the smallest integer with 3 * (3 s + 1) + 1 >= 256 is 28, so tiles are 56 x 84.
    assert grid.dtype == np.uint8 and grid.shape == (2 * 57 + 1, 3 * 85 + 1, 1)
    tile4 = grid[1 + 57:1 + 57 + 56, 1 + 85:1 + 85 + 84, 0]          # row 1, column 1
    expected = np.array([[0, 15, 127], [255, 239, 31]], np.uint8)   # v * 255 // 16
    np.testing.assert_array_equal(tile4, np.kron(expected, np.ones((28, 28), np.uint8)))
    for k in range(5):
        y, x = 1 + (k // 3) * 57, 1 + (k % 3) * 85
        np.testing.assert_array_equal(grid[y:y + 56:28, x:x + 84:28, 0], imgs[k, :, :, 0].astype(int) * 255 // 16)
    assert (grid[0] == 255).all() and (grid[57] == 255).all() and (grid[:, 85] == 255).all()
    assert (grid[58:58 + 56, 1 + 2 * 85:1 + 2 * 85 + 84] == 255).all()   # empty slot 5


def test_image_grid_rgb_without_upscaling_and_save(tmp_path):
    imgs = np.arange(64 * 32 * 32 * 3, dtype=np.int64).reshape(64, 32, 32, 3) % 256
    grid = images.image_grid(imgs, vocab_size=256)
    assert grid.shape == (8 * 33 + 1, 8 * 33 + 1, 3)
    np.testing.assert_array_equal(grid[1 + 2 * 33:1 + 2 * 33 + 32, 1 + 5 * 33:1 + 5 * 33 + 32], imgs[21])
    path = images.save_image_grid(tmp_path / "samples" / "step_1.png", imgs[:4, :8, :8, :1], vocab_size=256)
    with Image.open(path) as png:
        np.testing.assert_array_equal(np.asarray(png), images.image_grid(imgs[:4, :8, :8, :1], 256)[..., 0])
    assert [p.name for p in path.parent.iterdir()] == ["step_1.png"]
    with pytest.raises(ValueError, match=r"values in \[0, 16\)"):
        images.image_grid(np.full((1, 2, 2, 1), 16), vocab_size=16)


def test_workdir_of_an_earlier_version_reads_with_new_fields_defaulted(tmp_path):
    """A config.json written before a field joined the schema gets that field's default on read and resume."""
    config = small_config()
    workdir.prepare_workdir(tmp_path, config, "jax")
    stored = json.loads((tmp_path / "config.json").read_text())
    del stored["training"]["eval_noise_samples"], stored["model"]["variance_minimisation"]
    (tmp_path / "config.json").write_text(json.dumps(stored))
    assert workdir.read_config(tmp_path).training.eval_noise_samples == 1
    assert workdir.read_config(tmp_path).model.variance_minimisation is False
    workdir.prepare_workdir(tmp_path, config, "jax")            # resuming with today's config is accepted
