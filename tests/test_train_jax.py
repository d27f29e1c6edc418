"""The JAX engine (vdm_jax.engine, vdm_jax.checkpoint) under the shared trainer, and train_jax.py.

Multi-device cases run in subprocesses with fake CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count),
which must be set before JAX starts. One 4-device CLI run (`cli_run_4dev`) is shared by the end-to-end, restore
and multi-process tests. Models are tiny (11K parameters) so that every compile takes seconds.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from vdm_common import config as config_lib
from vdm_common import neutral
from vdm_common import workdir as workdir_lib
from vdm_jax import checkpoint, engine
from tests import data_parallel
from tests.conftest import QUICKSTART, assert_tiny_run_outputs, TINY_MODEL, TINY_RUN, cli_args, free_port, records, run_mode, tiny_config, tree_digest

pytestmark = pytest.mark.jax

ROOT = Path(__file__).resolve().parents[1]

# The data-parallel comparisons run in float64, with the bounds of tests/data_parallel.py (why: there).
METRICS = ("bpd", "bpd_recon", "bpd_latent", "bpd_diff")
# A float32 eval split over 4 devices against the same eval on 1: forward passes only (no Adam to amplify
# rounding), in kernels of other shapes; each backend's float32 bpd is within 1e-5 relative of the float64 one
# and of the other backend's (the parity suite's bound: parity_tests/tolerances.py, "bpd").
EVAL_RTOL = 1e-5


def device_env(num_devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_cli(args, num_devices: int = 1, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """train_jax.py with `args` on `num_devices` CPU devices (or in `env`)."""
    proc = subprocess.run([sys.executable, str(ROOT / "train_jax.py"), *args], cwd=ROOT,
                          env=env or device_env(num_devices), capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"train_jax.py {args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


# --------------------------------------------------------------------------------- data parallelism

SHARDED_STEP = r"""
import json, sys
import jax, numpy as np
from vdm_common import config as C, data
from vdm_jax import engine
from vdm_jax.checkpoint import to_host

cfg = C.load_config(sys.argv[1], sys.argv[3:])
mc, opt = C.model_config(cfg), cfg.optimizer
jax.config.update("jax_enable_x64", mc.compute_dtype == "float64")
ds = data.load_dataset(cfg.data)
B = cfg.training.batch_size_train
mesh1, mesh4 = engine.make_mesh(jax.devices()[:1]), engine.make_mesh()
assert mesh4.size == 4, mesh4
rng = jax.random.key(7)
f1, f4 = engine.make_train_fn(mc, opt, mesh1), engine.make_train_fn(mc, opt, mesh4)

def batch(mesh, step):
    images, cond = data.train_batch(ds, 0, step, B)
    return engine.global_array(mesh, images[None], 1), engine.global_array(mesh, cond[None], 1)

# Warm up on one device, so that the compared step has non-trivial gradients everywhere (at init the zero
# output convolution blocks them) and Adam moments away from zero.
state = engine.init_train_state(mc, opt, ds.image_shape, mesh1, jax.random.key(0))
for step in range(3):
    state, _ = f1(state, *batch(mesh1, step), rng)
host = to_host(state)
images4, cond4 = batch(mesh4, 3)
assert images4.sharding.shard_shape(images4.shape) == (1, B // 4, 8, 8, 1)
assert "all-reduce" in f4.lower(host, images4, cond4, rng).compile().as_text()
s1, m1 = f1(jax.device_put(host, engine.replicated(mesh1)), *batch(mesh1, 3), rng)
s4, m4 = f4(jax.device_put(host, engine.replicated(mesh4)), images4, cond4, rng)
out = {}
for tag, tree in (("before", (host, {})), ("one", (to_host(s1), to_host(m1))), ("four", (to_host(s4), to_host(m4)))):
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        out[tag + jax.tree_util.keystr(path)] = np.asarray(leaf)
np.savez(sys.argv[2], **out)
"""


def test_sharded_step_on_four_devices_equals_one_device(tmp_path):
    out = tmp_path / "step.npz"
    overrides = TINY_MODEL + ["training.batch_size_train=32", "optimizer.num_steps_lr_warmup=0", data_parallel.FLOAT64]
    proc = subprocess.run([sys.executable, "-c", SHARDED_STEP, QUICKSTART, str(out), *overrides], cwd=ROOT,
                          env=device_env(4), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    arrays = np.load(out)
    before, one, four = ({k[len(tag):]: arrays[k] for k in arrays.files if k.startswith(tag)}
                         for tag in ("before", "one", "four"))
    assert sorted(one) == sorted(four) and len(one) > 100
    assert int(before["[0].step"]) == 3 and int(one["[0].step"]) == int(four["[0].step"]) == 4
    for key in one:        # the state: '[0].params[...]', '[0].opt_state[1][0].mu[...]'; the metrics: "[1]['bpd']"
        if key.startswith("[1]"):
            np.testing.assert_allclose(four[key], one[key], rtol=data_parallel.METRICS_RTOL, err_msg=key)
        else:
            part = "opt_mu" if re.search(r"\.(mu|nu)\[", key) else "params"
            data_parallel.assert_state_close(four[key], one[key], part, 1, key)
    # The compared step moved every parameter leaf by ~lr = 2e-3, 1e5 times the bound, but the attention key
    # bias: its gradient is zero in exact arithmetic (softmax ignores a shift per query), rounding noise far
    # below Adam's eps in float64.
    params = [k for k in before if k.startswith("[0].params")]
    moved = [k for k in params if np.max(np.abs(one[k] - before[k])) > 1e-6]
    assert sorted(set(params) - set(moved)) == ["[0].params['score_model']['mid.attn_1']['k']['bias']"]
    assert 1.0 < float(one["[1]['bpd']"]) < 20 and float(one["[1]['grad_norm']"]) > 0


# ------------------------------------------------------------------------------ CLI, multi-process, restore

@pytest.fixture(scope="module")
def cli_run_4dev(tmp_path_factory):
    """`train_jax.py` (quickstart config, tiny model, 6 steps) in one process with 4 devices."""
    workdir = tmp_path_factory.mktemp("cli4") / "run"
    proc = run_cli([f"--workdir={workdir}", *cli_args(TINY_RUN)], num_devices=4)
    return workdir, proc


@pytest.mark.slow
def test_quickstart_cli_end_to_end(cli_run_4dev):
    workdir, proc = cli_run_4dev
    assert "4 device(s) in 1 process(es); global batch 16 = 4 per device" in proc.stdout + proc.stderr
    assert "10.88K parameters" in proc.stdout and f"metrics      {workdir}/metrics.jsonl" in proc.stdout
    # The compile is announced before it starts and timed; the bar starts after it, at the first call's steps.
    notice = proc.stdout.index("[jax] compiling the training step (the first call) ...")
    assert re.search(r"\[jax\] compiled and ran the first call \(2 steps\) in \d+\.\d s", proc.stdout[notice:])
    assert re.search(r"train: +\d+%\|[^|]*\| 2/6 \[00:00<", proc.stderr), proc.stderr[:500]
    train_rows, eval_rows = records(workdir, "train"), records(workdir, "eval")
    assert [r["step"] for r in train_rows] == [2, 4, 6] and [r["step"] for r in eval_rows] == [6]
    for row in train_rows:
        assert set(row) == {"step", "split", "bpd", "bpd_recon", "bpd_latent", "bpd_diff", "learning_rate",
                            "grad_norm", "steps_per_sec", "skipped"}
        assert row["bpd"] == pytest.approx(row["bpd_recon"] + row["bpd_latent"] + row["bpd_diff"], rel=1e-5)
        assert 1.0 < row["bpd"] < 20.0 and row["grad_norm"] > 0 and row["steps_per_sec"] > 0
    # LR warmup over 2 steps from 0: steps 0, 1 -> 0, 1e-3 (mean 5e-4); then 2e-3.
    assert train_rows[0]["learning_rate"] == pytest.approx(5e-4, rel=1e-6)
    assert train_rows[2]["learning_rate"] == pytest.approx(2e-3, rel=1e-6)
    # Eval over the whole test split (297 images: 3 batches of 100, the last one padded and masked).
    assert eval_rows[0]["bpd_stderr"] > 0 and 1.0 < eval_rows[0]["bpd"] < 20.0
    assert "over 297 images (step 6" in proc.stdout and "per-pixel categorical baseline 2.4131" in proc.stdout
    # Checkpoints every 2 steps, the newest 2 kept, orbax and neutral alike.
    ckpt = checkpoint.Checkpointer(workdir, config_lib.model_config(tiny_config()), 2, read_only=True)
    assert_tiny_run_outputs(workdir, "jax", ckpt.orbax_steps())
    ckpt.close()


def cache_log_env(num_devices: int = 1) -> dict:
    """JAX's compiler log on stderr (cache hits and misses), every program written to the cache."""
    return dict(device_env(num_devices), JAX_DEBUG_LOG_MODULES="jax._src.compiler",
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


SHORT_RUN = [*cli_args(TINY_RUN), "--config.training.num_steps_train=2", "--config.training.steps_per_save=2"]


def test_a_second_start_loads_the_compiled_programs_from_the_cache(tmp_path):
    cache, workdir = tmp_path / "cache", tmp_path / "run"
    args = [f"--workdir={workdir}", f"--compilation_cache={cache}"]
    first = run_cli([*args, *cli_args(TINY_RUN)], check=False, env=cache_log_env())
    assert first.returncode == 0, first.stderr
    for name in ("jit_train_substeps", "jit_eval_terms", "jit_step"):     # training call, eval, sampler step
        assert f"PERSISTENT COMPILATION CACHE MISS for '{name}'" in first.stderr
        assert list(cache.glob(f"{name}-*-cache")), sorted(p.name for p in cache.iterdir())
    again = run_cli([*args, "--mode=eval"], check=False, env=cache_log_env())   # another mode, the same eval
    assert again.returncode == 0, again.stderr
    assert "Persistent compilation cache hit for 'jit_eval_terms'" in again.stderr
    assert "PERSISTENT COMPILATION CACHE MISS for 'jit_eval_terms'" not in again.stderr


def test_compilation_cache_off_and_unwritable(tmp_path):
    off = run_cli([f"--workdir={tmp_path / 'run'}", "--compilation_cache=", *SHORT_RUN], check=False,
                  env=cache_log_env())
    assert off.returncode == 0, off.stderr
    assert "persistent compilation cache" not in off.stderr.lower()
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    bad = run_cli([f"--workdir={tmp_path / 'run2'}", f"--compilation_cache={blocker}/cache", *SHORT_RUN], check=False)
    assert bad.returncode == 1 and not (tmp_path / "run2").exists()
    assert f"--compilation_cache={blocker}/cache: cannot create the directory" in bad.stderr
    assert "--compilation_cache= to run without the cache" in bad.stderr


# Another JAX program writing into a cache directory with JAX's default settings (no size bound): its entries
# have no access-time files beside them, as an entry cut short by a killed process has none.
FOREIGN_PROGRAM = "import jax, jax.numpy as jnp; jax.jit(lambda x: jnp.sin(x) @ x)(jnp.ones((64, 64)))"


def test_cache_entries_without_access_times_neither_stop_writes_nor_are_kept(tmp_path):
    cache = tmp_path / "cache"
    subprocess.run([sys.executable, "-c", FOREIGN_PROGRAM], check=True,
                   env=dict(cache_log_env(), JAX_COMPILATION_CACHE_DIR=str(cache)))
    assert list(cache.glob("*-cache")) and not list(cache.glob("*-atime"))
    (cache / "jit_cut_short-0123-cache").write_bytes(b"\x28\xb5")      # a write killed after two bytes
    proc = run_cli([f"--workdir={tmp_path / 'run'}", f"--compilation_cache={cache}", *SHORT_RUN], check=False,
                   env=cache_log_env())
    assert proc.returncode == 0, proc.stderr
    assert "Error writing persistent compilation cache" not in proc.stderr, proc.stderr[-3000:]
    # Every entry now has its access time (the foreign ones were removed; the trainer may write some again).
    entries = list(cache.glob("*-cache"))
    assert list(cache.glob("jit_train_substeps-*-cache")) and not (cache / "jit_cut_short-0123-cache").exists()
    assert all(p.with_name(p.name.removesuffix("-cache") + "-atime").exists() for p in entries)


def test_a_cache_named_by_jax_compilation_cache_dir_keeps_jax_settings(tmp_path):
    """$JAX_COMPILATION_CACHE_DIR is the user's cache for all of JAX: its size and entries are left to JAX."""
    cache = tmp_path / "cache"
    env = dict(cache_log_env(), JAX_COMPILATION_CACHE_DIR=str(cache))
    subprocess.run([sys.executable, "-c", FOREIGN_PROGRAM], env=env, check=True)
    foreign = sorted(cache.glob("*-cache"))
    proc = run_cli([f"--workdir={tmp_path / 'run'}", *SHORT_RUN], check=False, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "Error writing persistent compilation cache" not in proc.stderr, proc.stderr[-3000:]
    assert list(cache.glob("jit_train_substeps-*-cache")) and all(p.exists() for p in foreign)


@pytest.mark.slow
def test_checkpoint_of_four_devices_restores_on_one(cli_run_4dev, tmp_path):
    workdir, _ = cli_run_4dev
    config = tiny_config()
    mc = config_lib.model_config(config)
    mesh1 = engine.make_mesh(jax.devices()[:1])
    ckpt = checkpoint.Checkpointer(workdir, mc, 2, read_only=True)
    state = ckpt.restore(6, "orbax", engine.abstract_train_state(mc, config.optimizer, (8, 8, 1), mesh1),
                         config.optimizer)
    ckpt.close()
    assert state.params["score_model"]["conv_in"]["kernel"].sharding.mesh.size == 1
    written = neutral.load_neutral(workdir_lib.layout(workdir).neutral_path(6))    # exported by the 4-device run
    from vdm_jax import convert
    restored = convert.state_to_neutral(checkpoint.to_host(state), mc)
    assert neutral.same_tensors(restored.params, written.params) == []
    assert neutral.same_tensors(restored.ema_params, written.ema_params) == []
    assert neutral.same_tensors(restored.opt_mu, written.opt_mu) == []
    assert neutral.same_tensors(restored.opt_nu, written.opt_nu) == []
    # Eval mode on one device reads that checkpoint and reproduces the 4-device run's final eval.
    result = run_mode("jax", None, workdir, "eval", devices=jax.devices()[:1])
    assert result["step"] == 6 and result["num_examples"] == 297
    assert result["bpd"] == pytest.approx(records(workdir, "eval")[-1]["bpd"], rel=EVAL_RTOL)
    assert result["baseline_bpd"] == pytest.approx(2.4131, abs=1e-4)
    # The settings of the training run's final eval, on 1 device instead of 4: the numbers differ by float32
    # reassociation, so the result goes into a file of its own beside the training run's, which stays.
    stored = workdir / "eval" / "step_6_continuous_x1_297img_ema_jax.json"
    assert result["path"] == str(stored.with_name(stored.stem + ".1.json"))
    assert json.loads(stored.read_text())["bpd"] == pytest.approx(result["bpd"], rel=EVAL_RTOL)
    assert result["bpd_stderr"] > 0
    # Sample mode on one device redraws the training run's grid bit for bit (same EMA params, same noise) ...
    grid = workdir / "samples" / "step_6_n4_T3_seed1_ema_jax.png"
    drawn_in_training = grid.read_bytes()
    assert run_mode("jax", None, workdir, "sample", devices=jax.devices()[:1])["path"] == str(grid)
    assert grid.read_bytes() == drawn_in_training
    # ... and draws other grids on request, beside it.
    nine = run_mode("jax", None, workdir, "sample", {"training.num_samples": 9}, devices=jax.devices()[:1])
    from PIL import Image
    assert nine["path"].endswith("step_6_n9_T3_seed1_ema_jax.png") and Image.open(nine["path"]).size == (268, 268)
    assert grid.read_bytes() == drawn_in_training
    plot = workdir / "plots" / "bpd.png"
    plot.unlink()
    assert run_mode("jax", None, workdir, "plot")["path"] == str(plot) and plot.stat().st_size > 1000


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_of_two_devices_match_one_process_of_four(tmp_path):
    # TINY_RUN in float64 (tests/data_parallel.py), without the sample grid, in 1 process of 4 devices and in
    # 2 processes of 2, each with one thread (2 cores): other reduction orders, as on another CPU.
    overrides = TINY_RUN + [data_parallel.FLOAT64, "training.steps_per_sample=0"]
    workdir, workdir4 = tmp_path / "run", tmp_path / "run4"
    run_cli([f"--workdir={workdir4}", *cli_args(overrides)], num_devices=4)
    port = free_port()
    env = device_env(2)
    env["XLA_FLAGS"] += " --xla_cpu_multi_thread_eigen=false"     # 2 cores: one thread per process
    env["OMP_NUM_THREADS"] = "1"
    procs = [subprocess.Popen([sys.executable, str(ROOT / "train_jax.py"), f"--workdir={workdir}",
                               *cli_args(overrides), f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                               f"--process_id={i}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, f"{out}\n{err}"
    assert "4 device(s) in 2 process(es); global batch 16 = 4 per device" in outputs[0][0]
    a = neutral.load_neutral(workdir_lib.layout(workdir).neutral_path(6))
    b = neutral.load_neutral(workdir_lib.layout(workdir4).neutral_path(6))
    data_parallel.assert_neutral_close(a, b)
    for split in ("train", "eval"):
        for x, y in zip(records(workdir, split), records(workdir4, split), strict=True):
            assert x["step"] == y["step"]
            for name in METRICS + (("grad_norm",) if split == "train" else ()):
                assert x[name] == pytest.approx(y[name], rel=data_parallel.METRICS_RTOL), (split, x["step"], name)


# --------------------------------------------------------------------------------------- resume, faults

def test_failed_background_save_is_raised_not_lost(tmp_path, monkeypatch):
    config = tiny_config()
    mc = config_lib.model_config(config)
    mesh = engine.make_mesh(jax.devices()[:1])
    state = engine.init_train_state(mc, config.optimizer, (8, 8, 1), mesh, jax.random.key(0))
    ckpt = checkpoint.Checkpointer(tmp_path, mc, 3)
    ckpt.save(1, state)
    ckpt.wait()
    # The disk fills up while step 2 is written in the background: its final rename into place fails.
    real_rename = os.rename

    def rename(src, dst, *args, **kwargs):
        if str(src).endswith("2.orbax-checkpoint-tmp"):
            raise OSError(28, "No space left on device", str(src))
        return real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", rename)
    ckpt.save(2, state)                          # returns at once: the write runs in the background
    with pytest.raises(checkpoint.CheckpointError, match=r"step 2 .* failed in the background.*No space left"):
        ckpt.save(3, state)                      # the next save reports it before starting its own
    monkeypatch.undo()
    ckpt.close()
    reader = checkpoint.Checkpointer(tmp_path, mc, 3, read_only=True)
    assert reader.orbax_steps() == [1]           # step 1 intact, no half-written step 2
    reader.close()


@pytest.mark.slow
def test_batch_not_divisible_by_devices_is_refused(cli_run_4dev):
    workdir, _ = cli_run_4dev
    before = tree_digest(workdir)
    overrides = [o for o in TINY_RUN if not o.startswith("training.batch_size_train")]
    proc = run_cli([f"--workdir={workdir}", *cli_args(overrides), "--config.training.batch_size_train=18"],
                   num_devices=4, check=False)
    assert proc.returncode == 1
    assert ("error: config.training.batch_size_train = 18 is not divisible by the number of devices (4)"
            in proc.stderr) and "nearest: 16 or 20" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert tree_digest(workdir) == before


def test_profile_writes_a_trace_of_the_steps_after_the_first_call(tmp_path, capsys):
    workdir = tmp_path / "run"
    run_mode("jax", tiny_config(), workdir, profile_steps=2)
    # Calls of 2 steps: tracing starts after the first (steps 0..2, which compiles) and covers 2..4.
    assert "profile of steps 2..4" in capsys.readouterr().out
    traces = list((workdir / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    summary = (workdir / "profile" / "summary_rank0.txt").read_text().splitlines()
    assert summary[0].split()[0] == "operation" and summary[-1].startswith("all operations")
    assert float(summary[-1].split()[-1]) > 0 and len(summary) > 5
