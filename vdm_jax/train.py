"""The JAX trainer: data-parallel training over all devices, eval, sampling, and the modes of train_jax.py.

    main(config, workdir, mode)     mode: train | eval | sample | plot (see vdm_common.run)

Parallelism is the pjit way: one `Mesh` of every device of every process with the single axis 'data';
the TrainState is replicated (`NamedSharding(mesh, P())`), the global batch is split along its batch axis
(`P(None, 'data')` for the (S, B, H, W, C) substep stack), and `jax.jit` with those shardings compiles the
global computation, inserting the gradient all-reduce. The state buffers are donated, and each host call
runs `training.substeps` optimizer steps (`vdm_jax.steps.train_substeps`, a lax.scan, as the official code).
Each process loads only its slice of the global batch (`vdm_common.data.train_batch`, pure in (seed, step))
and `jax.make_array_from_process_local_data` assembles the global array. Multi-host: launch one process per
host with --coordinator_address/--num_processes/--process_id (or --multihost on SLURM, Open MPI, TPU pods):
`jax.distributed.initialize` runs first, then `jax.devices()` lists every host's devices.

Randomness: the run key `jax.random.key(training.seed)` is split into streams for init, training, eval and
sampling. A training step folds its step number into its stream and draws the loss noise and the dropout
masks for the GLOBAL batch inside the jitted step: the partitionable threefry PRNG gives every device the
values of its own rows, so dropout is folded per step and differs per device and per example, and the
numbers do not depend on the device count (a per-device fold_in would make them depend on it).

Every number is the same on 1 or N devices up to float32 reassociation of the batch reductions, and a
resumed run is bit-identical to an uninterrupted one: batches and keys are functions of the step, and the
checkpoint holds the whole state.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import gzip
import json
import math
import re
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vdm_common import config as config_lib
from vdm_common import data as data_lib
from vdm_common import images as images_lib
from vdm_common import interrupts
from vdm_common import metrics as metrics_lib
from vdm_common import run
from vdm_common import workdir as workdir_lib
from vdm_common.config import ModelConfig
from vdm_common.types import nats_to_bpd_scale
from vdm_jax import steps, vdm
from vdm_jax.checkpoint import Checkpointer, to_host
from vdm_jax.unet import dtypes

BACKEND = "jax"
MESH_AXIS = "data"
# Streams of the run key, one per use (so that, e.g., more eval batches never change training).
_STREAM_INIT, _STREAM_TRAIN, _STREAM_EVAL, _STREAM_SAMPLE = range(4)


# ------------------------------------------------------------------------------------------- devices

def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """jax.distributed.initialize: explicit arguments, or none to let JAX detect the cluster (SLURM, Open MPI,
    TPU pods). Must run before anything touches a device. On CPU the collectives go through gloo."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh ('data',) over `devices` (default: all devices of all processes), ordered by process so
    that each process's devices hold one contiguous slice of the batch (its `train_batch` slice)."""
    devices = list(jax.devices() if devices is None else devices)
    devices.sort(key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(devices), (MESH_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, batch_axis: int) -> NamedSharding:
    """Split along `batch_axis` over the mesh, replicated along the others."""
    return NamedSharding(mesh, P(*([None] * batch_axis), MESH_AXIS))


def global_array(mesh: Mesh, local: np.ndarray, batch_axis: int) -> jax.Array:
    """This process's rows of a global batch -> the global jax.Array, split along `batch_axis`."""
    global_shape = list(local.shape)
    global_shape[batch_axis] *= jax.process_count()
    return jax.make_array_from_process_local_data(batch_sharding(mesh, batch_axis), local, tuple(global_shape))


def _process_count(mesh: Mesh) -> int:
    return len({d.process_index for d in mesh.devices.flat})


# --------------------------------------------------------------------------------------- step functions

def abstract_train_state(model_config: ModelConfig, opt: ml_collections.ConfigDict, image_shape,
                         mesh: Mesh) -> steps.TrainState:
    """The TrainState's shapes and dtypes (nothing computed), each leaf carrying the replicated sharding."""
    shapes = jax.eval_shape(functools.partial(steps.create_train_state, model_config, opt,
                                              image_shape=tuple(image_shape)), jax.random.key(0))
    sharding = replicated(mesh)
    return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


def init_train_state(model_config: ModelConfig, opt: ml_collections.ConfigDict, image_shape, mesh: Mesh,
                     rng: jax.Array) -> steps.TrainState:
    """A fresh TrainState created directly on the devices of the mesh (replicated)."""
    init = functools.partial(steps.create_train_state, model_config, opt, image_shape=tuple(image_shape))
    return jax.jit(init, out_shardings=replicated(mesh))(rng)


def make_train_fn(model_config: ModelConfig, opt: ml_collections.ConfigDict, mesh: Mesh) -> Callable:
    """(state, images (S, B, H, W, C), conditioning (S, B), rng) -> (state, metrics averaged over S steps).

    Jitted over the mesh: state replicated and donated, the batch split along B, the metrics replicated.
    The same arguments give the same jitted function (so a second run in one process compiles nothing).
    """
    return _train_fn(model_config, opt.to_json(sort_keys=True), mesh)


@functools.lru_cache(maxsize=8)
def _train_fn(model_config: ModelConfig, opt_json: str, mesh: Mesh) -> Callable:
    opt = ml_collections.ConfigDict(json.loads(opt_json))
    rep, split = replicated(mesh), batch_sharding(mesh, 1)
    return jax.jit(functools.partial(steps.train_substeps, model_config, opt),
                   in_shardings=(rep, split, split, rep), out_shardings=(rep, rep), donate_argnums=(0,))


def eval_bpd_terms(model_config: ModelConfig, params, images, conditioning, rng: jax.Array) -> dict:
    """Per-example -ELBO and its three terms, bits/dim, each (B,); dropout off.

    Unlike training, the diffusion times are drawn independently per example, not antithetically: the
    per-example values are then i.i.d., so their standard error is the honest uncertainty of their mean, and
    the padded rows of the last batch do not squeeze the real rows' times into a narrow band (antithetic
    times spread over the whole padded batch; the 41 real images of the quickstart's last batch would all
    get times within 41/256 of each other, which moved the test bpd by 0.3).
    """
    noise_config = dataclasses.replace(model_config, antithetic_time_sampling=False)
    terms = vdm.VDM(model_config).apply({"params": params}, images, conditioning,
                                        vdm.draw_noise(rng, images.shape, noise_config), True,
                                        method=vdm.VDM.loss_terms)
    scale = nats_to_bpd_scale(images.shape[1:])
    return {"bpd": (terms.recon + terms.klz + terms.diff) * scale, "bpd_recon": terms.recon * scale,
            "bpd_latent": terms.klz * scale, "bpd_diff": terms.diff * scale}


@functools.lru_cache(maxsize=8)
def make_eval_fn(model_config: ModelConfig, mesh: Mesh) -> Callable:
    """(params, images (B, ...), conditioning (B,), mask (B,), rng, index) -> (per-example terms, mask), the
    noise drawn from fold_in(rng, index); outputs replicated, so every process holds the whole batch's values."""
    rep, split = replicated(mesh), batch_sharding(mesh, 0)

    def fn(params, images, conditioning, mask, rng, index):
        return eval_bpd_terms(model_config, params, images, conditioning, jax.random.fold_in(rng, index)), mask
    return jax.jit(fn, in_shardings=(rep, split, split, split, rep, rep), out_shardings=(rep, rep))


def evaluate(eval_fn: Callable, params, dataset: data_lib.Dataset, batch_size: int, num_batches: int,
             mesh: Mesh, rng: jax.Array, noise_samples: int = 1) -> dict[str, float]:
    """Mean bpd (and terms) over the test split (or its first `num_batches` batches) with the standard error.

    Each image's value is the mean over `noise_samples` draws of (t, eps); draw k of batch b uses the noise of
    fold_in(fold_in(rng, k), b) (draw 0 is fold_in(rng, b)): the same draws at every evaluation of a run.
    The standard error is over images, of their averaged values.
    """
    collected: dict[str, list[np.ndarray]] = {name: [] for name in run.EVAL_TERMS}
    batches = data_lib.eval_batches(dataset, batch_size, jax.process_index(), jax.process_count(), num_batches)
    for b, (images, conditioning, mask) in enumerate(batches):
        args = (global_array(mesh, images, 0), global_array(mesh, conditioning, 0), global_array(mesh, mask, 0))
        sums: dict[str, np.ndarray] = {}
        for k in range(noise_samples):
            draw_rng = rng if k == 0 else jax.random.fold_in(rng, k)
            terms, global_mask = eval_fn(params, *args, draw_rng, np.int32(b))
            for name, values in to_host(terms).items():
                sums[name] = sums.get(name, 0.0) + values / noise_samples
        keep = to_host(global_mask) > 0
        for name, values in sums.items():
            collected[name].append(values[keep])
    return run.eval_statistics({name: np.concatenate(parts) for name, parts in collected.items()})


def draw_samples(model_config: ModelConfig, params, num_samples: int, sample_steps: int, image_shape,
                 rng: jax.Array) -> np.ndarray:
    """num_samples images (N, H, W, C) int32 from z_1 ~ N(0, I) in `sample_steps` ancestral steps.

    Runs on this process's first device with host copies of `params` (no collectives: process 0 alone may
    call it).
    """
    params = to_host(params)
    z_rng, step_rng = jax.random.split(rng)
    z_1 = jax.random.normal(z_rng, (num_samples, *image_shape), dtypes(model_config)[0])
    images, _ = vdm.sample(model_config, {"params": params}, z_1, sample_steps, jnp.zeros((num_samples,)),
                           rng=step_rng)
    return np.asarray(images)


def run_key(seed: int, stream: int, mesh: Mesh) -> jax.Array:
    """The key of one stream of the run, as a replicated global array (an input every process shares)."""
    return jax.jit(lambda: jax.random.fold_in(jax.random.key(seed), stream), out_shardings=replicated(mesh))()


def count_params(params) -> int:
    return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


# ------------------------------------------------------------------------------------------------ main

def main(config: ml_collections.ConfigDict | None, workdir: str, mode: str = "train",
         overrides: Mapping[str, Any] | None = None, *, devices=None, profile_steps: int = 0) -> dict:
    """Runs one mode on a workdir (see vdm_common.run). `overrides`: the command line's config overrides,
    applied to the stored config in eval / sample modes. `devices`: the mesh's devices (default: all).
    profile_steps: train mode writes a trace of that many steps into <workdir>/profile/.

    Returns a summary dict: train {'step', 'eval', 'samples', 'state', 'interrupted'}, eval: the eval result, sample {'path'},
    plot {'path'}.
    """
    run.check_mode(mode)
    if mode == "plot":
        path = run.plot(workdir)
        _say(f"wrote {path}")
        return {"path": str(path)}
    config = run.mode_config(mode, workdir, config, overrides)
    if config.model.compute_dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    if mode == "train":
        return train(config, workdir, devices=devices, profile_steps=profile_steps)
    return _eval_or_sample(config, workdir, mode, devices=devices)


class _Run:
    """What every mode sets up: model config, mesh, data, run keys (checks before anything is written)."""

    def __init__(self, config: ml_collections.ConfigDict, devices=None, need_train_batch: bool = True):
        self.config, t = config, config.training
        self.model_config = config_lib.model_config(config)
        self.mesh = make_mesh(devices)
        self.num_devices = self.mesh.size
        if need_train_batch:
            run.check_divisible(t.batch_size_train, self.num_devices, "training.batch_size_train")
        run.check_divisible(t.batch_size_eval, self.num_devices, "training.batch_size_eval")
        self.dataset = data_lib.load_dataset(config.data)
        mc, ds = self.model_config, self.dataset
        if ds.vocab_size != mc.vocab_size or ds.image_shape[-1] != mc.image_channels:
            raise run.RunError(f"data set {ds.name!r} has vocab_size {ds.vocab_size} and {ds.image_shape[-1]} "
                               f"channel(s), but config.model has vocab_size {mc.vocab_size} and image_channels "
                               f"{mc.image_channels}; set config.model to match the data")
        self.init_rng, self.train_rng, self.eval_rng = (
            run_key(t.seed, stream, self.mesh) for stream in (_STREAM_INIT, _STREAM_TRAIN, _STREAM_EVAL))
        # Sampling runs on process 0 alone, so its key stays a local array.
        self.sample_rng = jax.random.fold_in(jax.random.key(t.seed), _STREAM_SAMPLE)
        self.is_main = jax.process_index() == 0

    @functools.cached_property
    def baseline_bpd(self) -> float:
        """Test bpd of independent per-pixel categoricals fit on the training split (the number to beat)."""
        return data_lib.pixel_baseline_bpd(self.dataset)

    def abstract_state(self) -> steps.TrainState:
        return abstract_train_state(self.model_config, self.config.optimizer, self.dataset.image_shape, self.mesh)

    def sample_grid(self, workdir: str, params, step: int):
        """Draws and writes the sample grid of `step` (process 0); returns its path (None elsewhere)."""
        if not self.is_main:
            return None
        t = self.config.training
        samples = draw_samples(self.model_config, params, t.num_samples, t.sample_steps, self.dataset.image_shape,
                               jax.random.fold_in(self.sample_rng, step))
        return images_lib.save_image_grid(run.sample_grid_path(workdir, step, t.num_samples, t.sample_steps),
                                          samples, self.model_config.vocab_size)


def _say(message: str) -> None:
    """Prints on process 0, above the progress bar if one is showing."""
    if jax.process_index() == 0:
        tqdm.tqdm.write(message)


def _on_main_process(fn: Callable[[], Any], what: str) -> None:
    """Runs fn on process 0 and lets every process know whether it succeeded (other processes raise too)."""
    error = None
    if jax.process_index() == 0:
        try:
            fn()
        except Exception as e:  # re-raised below, after telling the other processes
            error = e
    if jax.process_count() > 1:
        ok = multihost_utils.broadcast_one_to_all(np.int32(error is None))
        if not ok and error is None:
            raise run.RunError(f"process 0 failed to {what}; see its output")
    if error is not None:
        raise error


def _agreed_signal(stop: interrupts.StopSignals) -> str | None:
    """The stop signal any process has received, or None: every process stops at the same step."""
    received = stop.received or 0
    if jax.process_count() > 1:
        received = int(np.max(multihost_utils.process_allgather(np.int32(received))))
    return interrupts.signal_name(received)


class Profiler:
    """--profile: a jax.profiler trace of about `steps` training steps into <workdir>/profile/ (TensorBoard's
    profile plugin or Perfetto read it: plugins/profile/<time>/<host>.xplane.pb and .trace.json.gz), and
    summary_rank<P>.txt: the compiled program's operations (XLA fusions, by kind) by time, as the torch
    trainer's summary lists its operators. Tracing starts after the first call, which compiles, and covers
    whole calls (training.substeps steps each)."""

    def __init__(self, workdir: str, steps: int):
        self.directory = workdir_lib.layout(workdir).profile
        self.steps, self.first, self.tracing = steps, None, False

    def after(self, step: int, state) -> None:
        """Called after each training call with the step reached and the (possibly still running) state."""
        if self.first is None:
            jax.block_until_ready(state)
            jax.profiler.start_trace(str(self.directory))
            self.first, self.tracing = step, True
        elif self.tracing and step - self.first >= self.steps:
            jax.block_until_ready(state)
            self.close()
            traces = sorted(self.directory.glob("plugins/profile/*/*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
            if traces:
                summary = self.directory / f"summary_rank{jax.process_index()}.txt"
                summary.write_text(trace_summary(traces[-1]))
            _say(f"profile of steps {self.first}..{step}: {self.directory}")

    def close(self) -> None:
        if self.tracing:
            jax.profiler.stop_trace()
            self.tracing = False


def trace_summary(path, rows: int = 30) -> str:
    """A table of a jax.profiler trace's device operations grouped by kind ('convolution.12' and
    'convolution.40' are one row): total ms, share of the operations' time, count. Python frames ('$...')
    and the runtime's wrappers are left out: what remains is the time inside the compiled program."""
    events = json.loads(gzip.decompress(Path(path).read_bytes()))["traceEvents"]
    totals: dict[str, float] = {}
    counts: dict[str, int] = {}
    for event in events:
        name = event.get("name", "")
        if event.get("ph") != "X" or name.startswith(("$", "ThunkExecutor", "PjitFunction")):
            continue
        kind = re.sub(r"\.\d+$", "", name)
        totals[kind] = totals.get(kind, 0.0) + event.get("dur", 0) / 1e3
        counts[kind] = counts.get(kind, 0) + 1
    whole = sum(totals.values()) or 1.0
    lines = [f"{'operation (kind)':40s} {'total ms':>10s} {'share':>7s} {'count':>7s}"]
    for kind, ms in sorted(totals.items(), key=lambda item: -item[1])[:rows]:
        lines.append(f"{kind[:40]:40s} {ms:10.1f} {100 * ms / whole:6.1f}% {counts[kind]:7d}")
    lines.append(f"{'all operations':40s} {whole:10.1f}")
    return "\n".join(lines) + "\n"


def train(config: ml_collections.ConfigDict, workdir: str, devices=None, profile_steps: int = 0) -> dict:
    """Trains to training.num_steps_train, resuming from the latest checkpoint of the workdir.

    Stops early, after saving a checkpoint, on SIGTERM / SIGINT (summary['interrupted'] names the signal).
    profile_steps > 0: write a trace of that many steps (`Profiler`)."""
    r = _Run(config, devices)
    t, opt, mc, mesh, ds = config.training, config.optimizer, r.model_config, r.mesh, r.dataset
    with contextlib.ExitStack() as stack:
        # Lock first: a run refused because another holds the workdir writes nothing.
        _on_main_process(lambda: stack.enter_context(workdir_lib.workdir_lock(workdir)), "lock the workdir")
        _on_main_process(lambda: workdir_lib.prepare_workdir(workdir, config, BACKEND), "prepare the workdir")
        if r.is_main:
            run.remove_partial_writes(workdir, say=_say)
        ckpt = Checkpointer(workdir, mc, t.checkpoints_to_keep)
        stack.callback(ckpt.close)      # waits for the last save and raises its error, even after a crash
        restored = ckpt.restore_latest(r.abstract_state(), opt, say=_say)
        if restored is None:
            state = init_train_state(mc, opt, ds.image_shape, mesh, r.init_rng)
        else:
            state, latest = restored
            _say(f"resumed from step {latest[0]} ({latest[1]} checkpoint in {workdir_lib.layout(workdir).checkpoints})")
        step = int(to_host(state.step))
        num_params = count_params(state.params)
        per_device = t.batch_size_train // r.num_devices
        _say(run.describe_start(
            backend=BACKEND, num_params=num_params,
            memory_bytes=metrics_lib.training_memory_estimate(mc, num_params, ds.image_shape, per_device),
            num_devices=r.num_devices, num_processes=jax.process_count(), batch_per_device=per_device,
            global_batch=t.batch_size_train, dataset_name=ds.name, num_train=len(ds.train), num_test=len(ds.test),
            image_shape=ds.image_shape, baseline_bpd=r.baseline_bpd))
        if step >= t.num_steps_train:
            _say(f"the run is at step {step}, training.num_steps_train = {t.num_steps_train}: nothing to train "
                 f"(raise --config.training.num_steps_train to continue)")
        writer = stack.enter_context(metrics_lib.MetricsWriter(workdir, enabled=r.is_main))
        summary = _train_loop(r, workdir, state, step, ckpt, writer, stack, profile_steps)
    if r.is_main:
        run.plot(workdir)
        _say(run.describe_outputs(workdir))
    return summary


def _train_loop(r: _Run, workdir: str, state, step: int, ckpt: Checkpointer, writer: metrics_lib.MetricsWriter,
                stack: contextlib.ExitStack, profile_steps: int) -> dict:
    t, mc, mesh, ds = r.config.training, r.model_config, r.mesh, r.dataset
    train_fn, eval_fn = make_train_fn(mc, r.config.optimizer, mesh), make_eval_fn(mc, mesh)
    pidx, pcount = jax.process_index(), jax.process_count()
    total = t.num_steps_train

    def crossed(period: int, before: int, after: int) -> bool:
        return period > 0 and after // period > before // period

    def host_batch(start: int):
        """The (S, B_local, ...) stack of steps start.. (S realigns to multiples of substeps after a resume
        from an odd step, so logging / eval / save boundaries are hit exactly), as global arrays."""
        n = min(t.substeps - start % t.substeps, total - start)
        parts = [data_lib.train_batch(ds, t.seed, s, t.batch_size_train, pidx, pcount) for s in range(start, start + n)]
        images, conditioning = np.stack([p[0] for p in parts]), np.stack([p[1] for p in parts])
        return n, global_array(mesh, images, 1), global_array(mesh, conditioning, 1)

    bar = metrics_lib.ProgressBar(total, initial_step=step, enabled=r.is_main)
    stack.callback(bar.close)
    stop = stack.enter_context(interrupts.StopSignals(say=_say))
    nonfinite = interrupts.NonFiniteSteps(t.max_nonfinite_steps, workdir_lib.layout(workdir).checkpoints)
    profiler = Profiler(workdir, profile_steps) if profile_steps else None
    if profiler:
        stack.callback(profiler.close)
    # steps/s counts the training calls only (not eval, sampling, checkpointing); the first window of a run
    # includes the compilation.
    window = metrics_lib.Window()
    last_eval, last_grid, interrupted = None, None, None
    last_saved = step if step > 0 else None             # a run at step > 0 was restored from that step
    pending = host_batch(step) if step < total else None
    while pending is not None:
        n, images, conditioning = pending
        started = time.time()
        state, metrics = train_fn(state, images, conditioning, r.train_rng)       # dispatched asynchronously
        before, step = step, step + n
        pending = host_batch(step) if step < total else None                       # overlaps the device work
        values = to_host(metrics)                                                  # waits for this call
        nonfinite.update(before, values.pop("skipped_per_step"), last_saved)
        window.add(values, n, time.time() - started)
        if profiler:
            profiler.after(step, state)
        bar.update(step, values["bpd"])
        final = step == total
        if crossed(t.steps_per_logging, before, step) or final:
            writer.write(step, "train", **window.flush())
        if crossed(t.steps_per_eval, before, step) or final:
            result = evaluate(eval_fn, state.ema_params, ds, t.batch_size_eval, t.num_eval_batches, mesh, r.eval_rng)
            writer.write(step, "eval", **{k: v for k, v in result.items() if k != "num_examples"})
            last_eval = dict(result, step=step, bound=run.eval_bound(mc, -1)[1])
            _say(f"step {step}: eval bpd {result['bpd']:.4f} +- {result['bpd_stderr']:.4f} "
                 f"({result['num_examples']} test images, EMA params)")
        if crossed(t.steps_per_sample, before, step) or (final and t.steps_per_sample > 0):
            last_grid = r.sample_grid(workdir, state.ema_params, step)
        interrupted = _agreed_signal(stop)
        if crossed(t.steps_per_save, before, step) or final or (interrupted and last_saved != step):
            ckpt.save(step, state)
            last_saved = step
        if interrupted:
            ckpt.wait()
            _say(f"stopped by {interrupted} at step {step}; saved checkpoint step {step} in "
                 f"{workdir_lib.layout(workdir).checkpoints}. Run the same command again to resume.")
            break
    bar.close()
    ckpt.wait()
    if last_eval is not None:
        last_eval["baseline_bpd"] = r.baseline_bpd
        _say(f"final {run.format_eval(last_eval)}")
    if last_grid is not None:
        _say(f"samples: {last_grid}")
    return {"step": step, "eval": last_eval, "samples": str(last_grid) if last_grid else None, "state": state,
            "interrupted": interrupted}


def _eval_or_sample(config: ml_collections.ConfigDict, workdir: str, mode: str, devices=None) -> dict:
    """eval: the EMA params of the latest checkpoint on the whole test split (+ baseline) -> eval/step_N.json;
    sample: a grid of training.num_samples samples in training.sample_steps steps -> samples/."""
    r = _Run(config, devices, need_train_batch=False)
    ckpt = Checkpointer(workdir, r.model_config, config.training.checkpoints_to_keep, read_only=True)
    try:
        restored = ckpt.restore_latest(r.abstract_state(), config.optimizer, fresh_optimizer=True, say=_say)
        if restored is None:
            raise run.RunError(f"{workdir_lib.layout(workdir).checkpoints} holds no checkpoint; train first "
                               f"(--mode=train --workdir={workdir})")
        state, latest = restored
    finally:
        ckpt.close()
    step = latest[0]                 # the checkpoint's step (a state without optimizer restarts its count)
    if mode == "sample":
        path = r.sample_grid(workdir, state.ema_params, step)
        _say(f"wrote {config.training.num_samples} samples ({config.training.sample_steps} steps) of step {step}: "
             f"{path}")
        return {"path": str(path) if path else None, "step": step}
    t = config.training
    eval_config, bound = run.eval_bound(r.model_config, t.eval_timesteps)
    result = evaluate(make_eval_fn(eval_config, r.mesh), state.ema_params, r.dataset, t.batch_size_eval, 0,
                      r.mesh, r.eval_rng, t.eval_noise_samples)
    result = dict(result, step=step, params="ema", backend=BACKEND, checkpoint=latest[1], bound=bound,
                  noise_samples=t.eval_noise_samples, baseline_bpd=r.baseline_bpd)
    if r.is_main:
        path = run.write_eval_result(workdir, result, trained_tag=run.eval_bound(r.model_config, -1)[1])
        _say(f"{run.format_eval(result)}\nwrote {path}")
    return result
