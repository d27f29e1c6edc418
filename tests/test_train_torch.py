"""The PyTorch engine (vdm_torch.engine, vdm_torch.checkpoint) under the shared trainer, train_torch.py, and its
workdirs read by and from the JAX engine.

Multi-process cases run under torchrun (gloo on CPU) with one thread per process (OMP_NUM_THREADS=1: the
machine may have 2 cores). Models are tiny (11K parameters), as in tests/test_train_jax.py, so a step takes
milliseconds; process start-up dominates.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vdm_common import config as config_lib
from vdm_common import data as data_lib
from vdm_common import neutral, run
from vdm_common import workdir as workdir_lib
from vdm_common.types import Noise
from vdm_torch import checkpoint, engine, steps, vdm
from tests import data_parallel
from tests.conftest import assert_tiny_run_outputs, TINY_MODEL, TINY_RUN, cli_args, records, run_mode, tiny_config, tree_digest

pytestmark = pytest.mark.torch

ROOT = Path(__file__).resolve().parents[1]
# 3 steps of a warm learning rate (no warmup: the first step moves the parameters), everything logged, in
# float64: the runs on 2 processes and on 1 are compared with the bounds of tests/data_parallel.py (why: there).
DDP_RUN = TINY_MODEL + [
    "training.num_steps_train=3", "training.substeps=1", "training.batch_size_train=16",
    "training.batch_size_eval=100", "training.steps_per_logging=1", "training.steps_per_eval=3",
    "training.steps_per_save=3", "training.steps_per_sample=0", "optimizer.num_steps_lr_warmup=0",
    data_parallel.FLOAT64,
]
TRAIN_FIELDS = {"step", "split", "bpd", "bpd_recon", "bpd_latent", "bpd_diff", "learning_rate", "grad_norm",
                "steps_per_sec", "skipped"}


def env_one_thread() -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_cli(args, processes: int = 0, check: bool = True) -> subprocess.CompletedProcess:
    """train_torch.py in one plain process (processes=0) or under torchrun with that many processes."""
    launcher = [] if processes == 0 else ["-m", "torch.distributed.run", "--standalone",
                                          f"--nproc_per_node={processes}", "--max_restarts=0"]
    proc = subprocess.run([sys.executable, *launcher, str(ROOT / "train_torch.py"), *args], cwd=ROOT,
                          env=env_one_thread(), capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"train_torch.py {args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def assert_same_state(a: dict, b: dict) -> None:
    """Two native checkpoint dicts hold bit-identical model, EMA and optimizer state."""
    assert a["step"] == b["step"]
    for part in ("model", "ema"):
        assert list(a[part]) == list(b[part])
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key}"
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sorted(sa) == sorted(sb) and len(sa) > 50
    for index in sa:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(sa[index][key], sb[index][key]), f"optimizer state {index} {key}"
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]


def load_pt(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------------------------- pieces

def test_shard_noise_is_the_global_draw_sliced():
    mc = config_lib.model_config(tiny_config())
    whole = vdm.draw_noise(steps.step_generator(3, 5), (16, 1, 8, 8), mc)
    halves = [steps.draw_shard_noise(steps.step_generator(3, 5), (8, 1, 8, 8), mc, (i, 2)) for i in range(2)]
    for field in Noise._fields:
        joined = torch.cat([getattr(h, field) for h in halves])
        assert torch.equal(joined, getattr(whole, field)), field
    # t is antithetic over the GLOBAL batch: 16 evenly spaced times, 8 per process.
    spacing = torch.diff(torch.sort(whole.t).values)
    torch.testing.assert_close(spacing, torch.full_like(spacing, 1 / 16))
    alone = steps.draw_shard_noise(steps.step_generator(3, 5), (16, 1, 8, 8), mc)
    assert all(torch.equal(x, y) for x, y in zip(alone, whole))


def test_bf16_autocast_keeps_t_gamma_and_the_loss_in_float32():
    mc = config_lib.model_config(tiny_config("model.compute_dtype='bfloat16'", "model.with_attention=True"))
    model = vdm.init_params(mc, 0)
    seen = {}

    def record(name, index=None):
        def hook(module, inputs, output=None):
            seen.setdefault(name, (output if index is None else inputs[index]).dtype)
        return hook

    model.gamma.register_forward_hook(record("gamma"))
    model.score_model.conv_in.register_forward_hook(record("conv"))
    model.score_model.register_forward_hook(record("eps_hat"))
    model.score_model.dense0.register_forward_pre_hook(record("t_embedding", 0))
    images = torch.randint(0, 17, (4, 1, 8, 8))
    terms = model.loss_terms(images, torch.zeros(4), generator=steps.step_generator(0, 0))
    assert seen == {"gamma": torch.float32, "t_embedding": torch.float32, "conv": torch.bfloat16,
                    "eps_hat": torch.float32}
    assert all(x.dtype == torch.float32 for x in terms)
    state = steps.create_train_state(mc, tiny_config().optimizer, 0)
    steps.train_step(mc, tiny_config().optimizer, state, images, torch.zeros(4), steps.step_generator(0, 0))
    for name, tensors in (("params", state.model.parameters()), ("ema", state.ema.parameters())):
        assert all(p.dtype == torch.float32 for p in tensors), name
    assert all(s["exp_avg"].dtype == torch.float32 for s in state.optimizer.state.values())


def test_checkpoints_are_atomic_keep_the_newest_and_restore_exactly(tmp_path, monkeypatch):
    config = tiny_config()
    mc, opt = config_lib.model_config(config), config.optimizer
    state = steps.create_train_state(mc, opt, 0, fused=True)
    ckpt = checkpoint.Checkpointer(tmp_path, mc, max_to_keep=2)
    ds = data_lib.load_dataset(config.data)
    saved = {}
    for step in range(3):
        images, cond = data_lib.train_batch(ds, 0, step, 16)
        steps.train_step(mc, opt, state, engine.to_device(images, torch.device("cpu")), torch.from_numpy(cond),
                         steps.step_generator(0, step))
        ckpt.save(state.step, state)
        saved[state.step] = load_pt(ckpt.path(state.step))
    assert ckpt.torch_steps() == [2, 3] and run.neutral_steps(str(tmp_path)) == [2, 3]
    assert ckpt.latest() == (3, "torch")
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in saved[3]["model"])
    assert set(saved[3]) == {"model", "ema", "optimizer", "step", "model_config", "rng", "sha256"}

    restored = ckpt.restore(3, "torch", opt, fused=False)       # saved with fused AdamW, resumed without
    again = checkpoint.convert.state_to_checkpoint(restored)
    again["optimizer"]["param_groups"] = saved[3]["optimizer"]["param_groups"]     # only 'fused' differs
    assert_same_state(again, saved[3])
    assert restored.step == 3 and all(g["fused"] is False for g in restored.optimizer.param_groups)
    assert all(s["step"].device.type == "cpu" for s in restored.optimizer.state.values())
    exported = neutral.load_neutral(workdir_lib.layout(tmp_path).neutral_path(3))
    assert exported.opt_count == 3 and exported.extra["backend"] == "torch"

    # A write that dies half-way leaves no file under a final name and no temporary file; older steps stay.
    before = tree_digest(tmp_path)

    def dying_save(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", dying_save)
    state.step = 4
    with pytest.raises(checkpoint.CheckpointError, match=r"step 4 .*No space left.*Earlier checkpoints are intact"):
        ckpt.save(4, state)
    assert tree_digest(tmp_path) == before and not list(tmp_path.rglob("*.tmp"))


# --------------------------------------------------------------------------------- CLI, single process

@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """`train_torch.py` (quickstart config, tiny model, 6 steps) in one plain process."""
    workdir = tmp_path_factory.mktemp("cli") / "run"
    proc = run_cli([f"--workdir={workdir}", *cli_args(TINY_RUN)])
    return workdir, proc


def test_quickstart_cli_end_to_end(cli_run):
    workdir, proc = cli_run
    out = proc.stdout + proc.stderr
    assert "[torch] 1 device(s) in 1 process(es); global batch 16 = 16 per device" in out
    assert "10.88K parameters" in out and f"metrics      {workdir}/metrics.jsonl" in out
    assert json.loads((workdir / "run.json").read_text())["backend"] == "torch"
    train_rows, eval_rows = records(workdir, "train"), records(workdir, "eval")
    assert [r["step"] for r in train_rows] == [2, 4, 6] and [r["step"] for r in eval_rows] == [6]
    for row in train_rows:
        assert set(row) == TRAIN_FIELDS
        assert row["bpd"] == pytest.approx(row["bpd_recon"] + row["bpd_latent"] + row["bpd_diff"], rel=1e-5)
        assert 1.0 < row["bpd"] < 20.0 and row["grad_norm"] > 0 and row["steps_per_sec"] > 0
    # LR warmup over 2 steps from 0: steps 0, 1 -> 0, 1e-3 (mean 5e-4); then 2e-3 (as float32, as JAX logs it).
    assert train_rows[0]["learning_rate"] == pytest.approx(5e-4, rel=1e-6)
    assert train_rows[2]["learning_rate"] == pytest.approx(2e-3, rel=1e-6)
    assert set(eval_rows[0]) == {"step", "split", "bpd", "bpd_recon", "bpd_latent", "bpd_diff", "bpd_stderr"}
    assert eval_rows[0]["bpd_stderr"] > 0 and 1.0 < eval_rows[0]["bpd"] < 20.0
    assert "over 297 images (step 6" in out and "per-pixel categorical baseline 2.4131" in out
    ckpt = checkpoint.Checkpointer(workdir, config_lib.model_config(tiny_config()), 2, read_only=True)
    assert_tiny_run_outputs(workdir, "torch", ckpt.torch_steps())
    # Eval mode on the finished run reproduces the final eval of training (same params, same noise).
    result = run_mode("torch", None, workdir, "eval", device="cpu")
    assert result["bpd"] == pytest.approx(eval_rows[0]["bpd"], rel=1e-9) and result["checkpoint"] == "torch"
    # The same settings as the training run's final eval, the same record: the same file, not a copy.
    stored = workdir / "eval" / "step_6_continuous_x1_297img_ema_torch.json"
    assert result["path"] == str(stored) and len(list((workdir / "eval").iterdir())) == 1
    assert json.loads(stored.read_text())["bpd_stderr"] == result["bpd_stderr"]


# --------------------------------------------------------------------------------- data parallelism

@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """DDP_RUN in 2 gloo processes under torchrun, and in 1 plain process: (workdir2, proc2, workdir1)."""
    base = tmp_path_factory.mktemp("ddp")
    two, one = base / "two", base / "one"
    proc = run_cli([f"--workdir={two}", *cli_args(DDP_RUN)], processes=2)
    run_cli([f"--workdir={one}", *cli_args(DDP_RUN)])
    return two, proc, one


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_ddp_processes_equal_one_process(ddp_runs):
    two, proc, one = ddp_runs
    assert "[torch] 2 device(s) in 2 process(es); global batch 16 = 8 per device" in proc.stdout
    a = neutral.load_neutral(workdir_lib.layout(two).neutral_path(3))
    b = neutral.load_neutral(workdir_lib.layout(one).neutral_path(3))
    data_parallel.assert_neutral_close(a, b)
    init_seed = engine.stream_seed(tiny_config().training.seed, 0, 0)        # the engine's init stream
    start = checkpoint.convert.params_to_neutral(vdm.init_params(a.model_config, init_seed))
    # Each of the 3 steps moved most parameters by ~lr = 2e-3, 3e4 times the bound.
    moved = [k for k in start if np.max(np.abs(a.params[k] - start[k])) > 1e-4]
    assert len(moved) > 0.8 * len(start)
    for split in ("train", "eval"):
        for x, y in zip(records(two, split), records(one, split), strict=True):
            assert x["step"] == y["step"]
            for name in ("bpd", "bpd_recon", "bpd_latent", "bpd_diff") + (("grad_norm",) if split == "train" else ()):
                assert x[name] == pytest.approx(y[name], rel=data_parallel.METRICS_RTOL), (split, x["step"], name)
    saved = load_pt(checkpoint.Checkpointer(two, a.model_config, 3).path(3))
    for part in ("model", "ema"):
        assert not any(k.startswith(("module.", "_orig_mod.")) for k in saved[part]), part
    # The checkpoint of 2 processes restores in 1, whose eval (the same draws) is the 2-process eval.
    result = run_mode("torch", None, two, "eval", device="cpu")
    assert result["checkpoint"] == "torch"
    assert result["bpd"] == pytest.approx(records(two, "eval")[-1]["bpd"], rel=data_parallel.METRICS_RTOL)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_batch_not_divisible_by_the_processes_is_refused(ddp_runs):
    two, _, _ = ddp_runs
    before = tree_digest(two)
    overrides = [o for o in DDP_RUN if not o.startswith("training.batch_size_train")]
    proc = run_cli([f"--workdir={two}", *cli_args(overrides), "--config.training.batch_size_train=15"], processes=2,
                   check=False)
    assert proc.returncode != 0
    assert ("config.training.batch_size_train = 15 is not divisible by the number of devices (2)" in proc.stderr
            and "nearest: 14 or 16" in proc.stderr)
    assert "vdm_torch" not in proc.stderr        # a message, not a traceback from our code
    assert tree_digest(two) == before


# ------------------------------------------------------------------------------- the other backend

@pytest.fixture(scope="module")
def jax_run(tmp_path_factory):
    """A 6-step run of the JAX engine (1 device, no sample grid): (workdir, config)."""
    jax = pytest.importorskip("jax")
    workdir = tmp_path_factory.mktemp("jax") / "run"
    config = tiny_config("training.steps_per_sample=0")
    run_mode("jax", config, workdir, devices=jax.devices()[:1])
    return workdir, config


def assert_same_eval(a: dict, b: dict, rel=2e-6):
    """Two evaluations with the same params and noise (both backends draw it from the seed, vdm_common.noise):
    float32 per-example values (the parity suite bounds bpd at 1e-5 relative; 2e-6 is the worst seen on
    these means of 297), float64 means."""
    assert a["num_examples"] == b["num_examples"] == 297
    for name in ("bpd", "bpd_recon", "bpd_latent", "bpd_diff", "bpd_stderr"):
        assert a[name] == pytest.approx(b[name], rel=rel, abs=1e-7), name


def assert_same_images(a: np.ndarray, b: np.ndarray):
    """Samples of the same weights and noise in the two backends. Their z_0 agree to float32 rounding (the
    parity suite: 4e-6 relative after 50 steps); a pixel's argmax decoding flips only where z_0 lies within
    that of a boundary between two of the 17 bins (2/17 apart): about 1e-4 of the pixels. Allow 1% to
    differ, by one grey level."""
    assert a.shape == b.shape
    differ = a != b
    assert differ.mean() <= 0.01 and np.all(np.abs(a.astype(int) - b.astype(int)) <= 1)


@pytest.mark.slow
def test_torch_eval_and_sample_of_a_jax_workdir(jax_run):
    import jax
    workdir, config = jax_run
    one = jax.devices()[:1]
    result = run_mode("torch", None, workdir, "eval", device="cpu")
    assert result["step"] == 6 and result["checkpoint"] == "neutral" and result["num_examples"] == 297
    assert result["baseline_bpd"] == pytest.approx(2.4131, abs=1e-4)
    # The same noise in both backends: the JAX engine's eval of its own checkpoint gives the same numbers.
    assert_same_eval(result, run_mode("jax", None, workdir, "eval", devices=one))
    overrides = {"training.num_samples": 9}
    grids = [run_mode("jax", None, workdir, "sample", overrides, devices=one),
             run_mode("torch", None, workdir, "sample", overrides, device="cpu")]
    assert grids[1]["path"].endswith("samples/step_6_n9_T3_seed1_ema_torch.png")
    from PIL import Image
    assert_same_images(*(np.asarray(Image.open(g["path"])) for g in grids))


@pytest.mark.slow
def test_jax_eval_of_a_torch_workdir(cli_run):
    jax = pytest.importorskip("jax")
    workdir, _ = cli_run
    # 2 draws per image, the discrete-time bound with T = 10: the same numbers in both backends.
    overrides = {"training.eval_timesteps": 10, "training.eval_noise_samples": 2}
    result = run_mode("jax", None, workdir, "eval", overrides, devices=jax.devices()[:1])
    assert result["step"] == 6 and result["checkpoint"] == "neutral" and result["bound"] == "T10"
    assert_same_eval(result, run_mode("torch", None, workdir, "eval", overrides, device="cpu"))


@pytest.mark.slow
def test_torch_continues_a_jax_run_from_its_neutral_export(jax_run, tmp_path):
    import shutil
    source, config = jax_run
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir)
    summary = run_mode("torch", tiny_config("training.steps_per_sample=0", "training.num_steps_train=8"), workdir,
                       device="cpu")
    assert summary["step"] == 8
    exported = neutral.load_neutral(workdir_lib.layout(workdir).neutral_path(8))
    assert exported.opt_count == 8 and exported.extra["backend"] == "torch"
    assert [r["step"] for r in records(workdir, "train")] == [2, 4, 6, 8]
    # What it resumed from: the JAX state of step 6, Adam moments and count included, bit for bit.
    jax_six = neutral.load_neutral(workdir_lib.layout(source).neutral_path(6))
    reader = checkpoint.Checkpointer(source, config_lib.model_config(config), 2, read_only=True)
    assert reader.latest() == (6, "neutral")
    resumed = checkpoint.convert.state_to_neutral(reader.restore(6, "neutral", config.optimizer))
    assert resumed.step == resumed.opt_count == 6
    for name in ("params", "ema_params", "opt_mu", "opt_nu"):
        assert neutral.same_tensors(getattr(resumed, name), getattr(jax_six, name)) == [], name


@pytest.mark.slow
def test_speed_options_train_the_same_model(tmp_path):
    """torch.compile (of the score UNet), channels_last and fused AdamW change how the steps run, not what
    they compute; nothing saved carries a `_orig_mod.` prefix. Other kernels sum in other orders: float64, with
    the bounds of tests/data_parallel.py."""
    config = tiny_config("training.num_steps_train=2", "training.substeps=1", "training.steps_per_save=2",
                         "training.steps_per_eval=2", "training.num_eval_batches=1", "training.steps_per_sample=0",
                         "optimizer.num_steps_lr_warmup=0", data_parallel.FLOAT64)
    run_mode("torch", config, tmp_path / "plain", device="cpu", fused_adamw=False)
    fast = run_mode("torch", config, tmp_path / "fast", device="cpu", fused_adamw=True, compile=True,
                    channels_last=True)
    assert fast["state"].model.score_model.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    a, b = (neutral.load_neutral(workdir_lib.layout(tmp_path / name).neutral_path(2)) for name in ("plain", "fast"))
    data_parallel.assert_neutral_close(a, b)
    saved = load_pt(checkpoint.Checkpointer(tmp_path / "fast", a.model_config, 3).path(2))
    for part in ("model", "ema"):
        assert not any("_orig_mod" in k or k.startswith("module.") for k in saved[part]), part
    assert records(tmp_path / "fast", "eval")[0]["bpd"] == pytest.approx(records(tmp_path / "plain", "eval")[0]["bpd"],
                                                                       rel=data_parallel.METRICS_RTOL)


def test_profile_writes_a_trace_of_the_steps_after_the_first_call(tmp_path, capsys):
    workdir = tmp_path / "run"
    run_mode("torch", tiny_config(), workdir, device="cpu", profile_steps=2)
    # Calls of 2 steps: tracing starts after the first (steps 0..2) and covers the next one, 2..4.
    assert "profile of steps 2..4" in capsys.readouterr().out
    trace = json.loads((workdir / "profile" / "trace_rank0.json").read_text())
    names = {event.get("name") for event in trace["traceEvents"]}
    assert "Optimizer.step#AdamW.step" in names and any("convolution" in str(n) for n in names)
    assert "aten::" in (workdir / "profile" / "summary_rank0.txt").read_text()
