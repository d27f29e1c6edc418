"""The trainer of both backends: modes, run checks, the training loop and its cadence, resume, the eval and
sample drivers and every message a user sees. Framework-free: an engine (vdm_common.engine) does the
framework work, `vdm_jax.engine.Engine` or `vdm_torch.engine.Engine`.

    main(engine, config, workdir, mode)     mode: train | eval | sample | plot | compress | decompress

train   resume from the newest intact checkpoint of the workdir (or start), train to
        training.num_steps_train, logging, evaluating, sampling and saving on the config's cadence; stop
        cleanly on SIGTERM / SIGINT (saving the current step) or after too many non-finite steps.
eval    test-set bpd of the EMA weights of the newest checkpoint, with its standard error and the baseline.
sample  a grid of training.num_samples samples in training.sample_steps steps.
plot    the bpd curves of metrics.jsonl.
compress / decompress   images (.npz, PNGs) <-> a bits-back coded file, with the newest checkpoint's EMA weights.

Every file a mode writes is named by what made it (vdm_common.workdir.Layout) and listed at the end.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import ml_collections
import numpy as np
import tqdm

from vdm_common import api
from vdm_common import config as config_lib
from vdm_common import data as data_lib
from vdm_common import images as images_lib
from vdm_common import interrupts
from vdm_common import metrics as metrics_lib
from vdm_common import run
from vdm_common import workdir as workdir_lib
from vdm_common.engine import Engine, on_main_process
from vdm_common.errors import UserError
from vdm_common.run import RunError

MODES = ("train", "eval", "sample", "plot", "compress", "decompress")


@dataclasses.dataclass(frozen=True)
class Coding:
    """What the compress and decompress modes read and write: --input, --output and --timesteps (compress:
    T, None for bitsback.DEFAULT_TIMESTEPS; decompress: the T the file must have, None for the file's)."""

    input: str | None = None
    output: str | None = None
    timesteps: int | None = None


# ------------------------------------------------------------------------------------------- the modes

def main(engine: Engine, config: ml_collections.ConfigDict | None, workdir: str, mode: str = "train",
         overrides: Mapping[str, Any] | None = None, *, profile_steps: int = 0, coding: Coding | None = None
         ) -> dict:
    """Runs one mode on a workdir. `config`: the run's config (None: the one stored in the workdir);
    `overrides`: the command line's config overrides, applied to the stored config in eval / sample /
    compress / decompress modes. profile_steps: train mode writes a profiler trace of that many steps into
    <workdir>/profile/. coding: the paths and T of the compress and decompress modes.

    Returns a summary dict: train {'step', 'eval', 'samples', 'state', 'interrupted', 'written'}, eval the
    eval result, sample {'path', 'step'}, plot {'path'}, compress and decompress {'path', 'num_images',
    'timesteps', 'bytes', 'bpd', 'seconds', 'step'}.
    """
    check_mode(mode)
    stray = [f"--{name}" for name in ("input", "output", "timesteps") if getattr(coding or Coding(), name)]
    if stray and mode not in ("compress", "decompress"):
        raise RunError(f"{' and '.join(stray)} belong to --mode=compress and --mode=decompress, not --mode={mode}")
    say = Say(engine)
    if mode == "plot":
        path = plot(workdir) if engine.process_index() == 0 else None
        say(f"wrote {path}")
        return {"path": str(path) if path else None}
    config = mode_config(mode, workdir, config, overrides)
    if mode == "train":
        return train(engine, config, workdir, profile_steps, say)
    if mode == "eval":
        return evaluate(engine, config, workdir, say)
    if mode == "sample":
        return sample(engine, config, workdir, say)
    code = compress if mode == "compress" else decompress
    return code(engine, config, workdir, coding or Coding(), say)


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise RunError(f"--mode={mode!r} is not one of {MODES}")


def default_workdir(config_path: str, backend: str) -> str:
    """runs/<config file name>_<backend>: `configs/quickstart.py` -> `runs/quickstart_jax`."""
    return str(Path("runs") / f"{Path(config_path).stem}_{backend}")


def entry_config(mode: str, workdir: str, config: ml_collections.ConfigDict, config_given: bool,
                 overrides: Mapping[str, Any] | None = None):
    """The config an entry script passes on: None where the workdir's stored config is to be used (plot
    mode, or --workdir of an existing run with neither --config nor overrides beyond those a resume may
    change), else the --config file's (with its overrides)."""
    resumable = all(k in workdir_lib.RESUMABLE_FIELDS for k in (overrides or {}))
    if mode == "plot" or (not config_given and resumable and workdir_lib.layout(workdir).config.is_file()):
        return None
    return config


def mode_config(mode: str, workdir: str, config: ml_collections.ConfigDict | None,
                overrides: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
    """The config a mode runs with.

    train: `config` itself (prepare_workdir then checks it against the workdir's stored config); with no
    config, the one stored in the workdir (continuing a run, e.g. one imported by convert.py).
    eval / sample: the config stored in the workdir (the model that was trained there, whichever backend
    trained it), with the command line's `overrides` ({'training.num_samples': 16}) applied; only fields
    that may differ on resume (workdir.RESUMABLE_FIELDS: eval batch size, sample count and steps, data paths)
    can be overridden, others raise RunError.
    """
    if mode == "train" and config is not None:
        return config_lib.validate(config)
    if mode == "train" and not workdir_lib.layout(workdir).config.is_file():
        raise RunError("--mode=train needs a config (--config=configs/...) or a --workdir holding a run")
    stored = workdir_lib.read_config(workdir)
    refused = sorted(k for k in (overrides or {}) if k not in workdir_lib.RESUMABLE_FIELDS)
    if refused:
        raise RunError(f"--mode={mode} uses the config stored in {workdir_lib.layout(workdir).config}; these overrides "
                       f"would change the trained model or its training and are refused: {refused}. Fields that may "
                       f"be overridden here: {sorted(workdir_lib.RESUMABLE_FIELDS)}.")
    for key, value in (overrides or {}).items():
        config_lib.set_field(stored, key, value)
    return config_lib.validate(stored)


class Say:
    """Prints on process 0, above the progress bar if one is showing."""

    def __init__(self, engine: Engine):
        self.enabled = engine.process_index() == 0

    def __call__(self, message: str) -> None:
        if self.enabled:
            tqdm.tqdm.write(message)


# ------------------------------------------------------------------------------------------- run setup

class Setup:
    """What every mode checks and loads before anything is written: batch sizes against the devices, the
    data set (process 0 first: it may prepare a tfds data set), the data against the model."""

    def __init__(self, engine: Engine, config: ml_collections.ConfigDict, training: bool):
        self.engine, self.config = engine, config
        self.model_config = config_lib.model_config(config)
        t, devices = config.training, engine.device_count()
        if training:
            check_divisible(t.batch_size_train, devices, "training.batch_size_train")
        check_divisible(t.batch_size_eval, devices, "training.batch_size_eval")
        loaded = on_main_process(engine, lambda: data_lib.load_dataset(config.data), "load the data set")
        self.dataset = loaded if engine.process_index() == 0 else data_lib.load_dataset(config.data)
        mc, ds = self.model_config, self.dataset
        if ds.vocab_size != mc.vocab_size or ds.image_shape[-1] != mc.image_channels:
            raise RunError(f"data set {ds.name!r} has vocab_size {ds.vocab_size} and {ds.image_shape[-1]} "
                           f"channel(s), but config.model has vocab_size {mc.vocab_size} and image_channels "
                           f"{mc.image_channels}; set config.model to match the data")

    @functools.cached_property
    def baseline_bpd(self) -> float:
        """Test bpd of independent per-pixel categoricals fit on the training split (the number to beat)."""
        return data_lib.pixel_baseline_bpd(self.dataset)


def check_divisible(batch_size: int, num_devices: int, field: str) -> None:
    """The global batch must split evenly over the devices (data parallelism): RunError naming the field."""
    if batch_size % num_devices:
        lower = batch_size - batch_size % num_devices
        nearest = " or ".join(str(b) for b in (lower, lower + num_devices) if b > 0)
        raise RunError(f"config.{field} = {batch_size} is not divisible by the number of devices ({num_devices}): "
                       f"each device takes an equal share of the global batch. Pass --config.{field}= a multiple "
                       f"of {num_devices} (nearest: {nearest}).")


# ------------------------------------------------------------------------------------------- training

def train(engine: Engine, config: ml_collections.ConfigDict, workdir: str, profile_steps: int = 0,
          say: Say | None = None) -> dict:
    """Trains to training.num_steps_train, resuming from the newest intact checkpoint of the workdir.

    Stops early, after saving a checkpoint, on SIGTERM / SIGINT (summary['interrupted'] names the signal).
    """
    say = say or Say(engine)
    setup = Setup(engine, config, training=True)
    t, mc, ds = config.training, setup.model_config, setup.dataset
    is_main = engine.process_index() == 0
    with contextlib.ExitStack() as stack:
        # Lock first: a run refused because another holds the workdir writes nothing.
        on_main_process(engine, lambda: stack.enter_context(workdir_lib.workdir_lock(workdir)), "lock the workdir")
        on_main_process(engine, lambda: workdir_lib.prepare_workdir(workdir, config, engine.name),
                        "prepare the workdir")
        if is_main:
            run.remove_partial_writes(workdir, say=say)
        stack.callback(engine.close)    # waits for the last save and raises its error, even after a crash
        state, restored = engine.init_or_restore(config, workdir, ds.image_shape, say)
        step = engine.step_of(state)
        if restored is not None:
            say(f"resumed from step {restored[0]} ({restored[1]} checkpoint in "
                f"{workdir_lib.layout(workdir).checkpoints})")
        num_params = engine.count_params(state)
        per_device = t.batch_size_train // engine.device_count()
        say(describe_start(
            backend=engine.name, num_params=num_params,
            memory_bytes=metrics_lib.training_memory_estimate(mc, num_params, ds.image_shape, per_device),
            num_devices=engine.device_count(), num_processes=engine.process_count(), batch_per_device=per_device,
            global_batch=t.batch_size_train, dataset_name=ds.name, num_train=len(ds.train), num_test=len(ds.test),
            image_shape=ds.image_shape, baseline_bpd=setup.baseline_bpd))
        if step >= t.num_steps_train:
            say(f"the run is at step {step}, training.num_steps_train = {t.num_steps_train}: nothing to train "
                f"(raise --config.training.num_steps_train to continue)")
        writer = stack.enter_context(metrics_lib.MetricsWriter(workdir, enabled=is_main, resume_step=step))
        summary = _train_loop(engine, setup, workdir, state, step, writer, stack, profile_steps, say)
    if is_main:
        summary["written"].append(plot(workdir))
        say(describe_outputs(workdir, summary["written"]))
    return summary


def crossed(period: int, before: int, after: int) -> bool:
    """Whether a multiple of `period` lies in (before, after]: time to log / eval / sample / save."""
    return period > 0 and after // period > before // period


def _train_loop(engine: Engine, setup: Setup, workdir: str, state, step: int, writer: metrics_lib.MetricsWriter,
                stack: contextlib.ExitStack, profile_steps: int, say: Say) -> dict:
    t, ds = setup.config.training, setup.dataset
    paths = workdir_lib.layout(workdir)
    pidx, pcount = engine.process_index(), engine.process_count()
    total = t.num_steps_train

    def host_batch(start: int):
        """This process's rows of the batches of steps start.. (S, B_local, ...): S realigns to multiples of
        substeps after a resume from an odd step, so logging / eval / save boundaries are hit exactly."""
        n = min(t.substeps - start % t.substeps, total - start)
        parts = [data_lib.train_batch(ds, t.seed, s, t.batch_size_train, pidx, pcount) for s in range(start, start + n)]
        return n, np.stack([p[0] for p in parts]), np.stack([p[1] for p in parts])

    stop = stack.enter_context(interrupts.StopSignals(say=say))
    nonfinite = interrupts.NonFiniteSteps(t.max_nonfinite_steps, paths.checkpoints)
    profiler = engine.profiler(paths.profile, profile_steps, say) if profile_steps else None
    if profiler:
        stack.callback(profiler.close)
    # steps/s counts the training calls only (not eval, sampling, checkpointing).
    window = metrics_lib.Window()
    bar = None
    last_eval, last_grid, interrupted, written = None, None, None, []
    last_saved = step if step > 0 else None             # a run at step > 0 was restored from that step
    pending_batch = host_batch(step) if step < total else None
    while pending_batch is not None:
        n, images, conditioning = pending_batch
        started = time.time()
        if bar is None and engine.compiles:
            say(f"[{engine.name}] compiling the training step (the first call) ...")
        state, pending = engine.train_steps(state, step, images, conditioning)     # may run asynchronously
        before, step = step, step + n
        pending_batch = host_batch(step) if step < total else None                  # overlaps the device work
        values = engine.fetch_metrics(pending)                                      # waits for this call
        nonfinite.update(before, values.pop("skipped_per_step"), last_saved)
        window.add(values, n, time.time() - started)
        if bar is None:     # the bar's clock starts after the first call, which compiles
            if engine.compiles:
                say(f"[{engine.name}] compiled and ran the first call ({n} steps) in {time.time() - started:.1f} s")
            bar = metrics_lib.ProgressBar(total, initial_step=step, enabled=pidx == 0)
            stack.callback(bar.close)
        if profiler:
            profiler.after(step, state)
        bar.update(step, values["bpd"])
        final = step == total
        if crossed(t.steps_per_logging, before, step) or final:
            writer.write(step, "train", **window.flush())
        if crossed(t.steps_per_eval, before, step) or final:
            last_eval, path = _eval_during_training(engine, setup, workdir, state, step, final, say)
            writer.write(step, "eval", **{k: last_eval[k] for k in (*run.EVAL_TERMS, "bpd_stderr")})
            written += [path] if path else []
        if crossed(t.steps_per_sample, before, step) or (final and t.steps_per_sample > 0):
            weights = engine.weights(state, "ema")
            last_grid = _write_grid(engine, setup, workdir, step, "ema", functools.partial(
                api.sample_images, engine, setup.model_config, weights))
            written += [last_grid] if last_grid else []
        interrupted = interrupts.signal_name(engine.max_over_processes(stop.received or 0))
        if crossed(t.steps_per_save, before, step) or final or (interrupted and last_saved != step):
            engine.save(step, state)
            last_saved = step
        if interrupted:
            engine.wait()
            say(f"stopped by {interrupted} at step {step}; saved checkpoint step {step} in {paths.checkpoints}. "
                f"Run the same command again to resume.")
            break
    if bar is not None:
        bar.close()
    engine.wait()
    memory = engine.describe_memory()
    if memory:
        say(memory)
    if last_eval is not None:
        say(f"final {format_eval(last_eval)}")
    return {"step": step, "eval": last_eval, "samples": str(last_grid) if last_grid else None, "state": state,
            "interrupted": interrupted, "written": written}


def _eval_during_training(engine: Engine, setup: Setup, workdir: str, state, step: int, final: bool, say: Say):
    """The periodic eval (one noise draw, training.num_eval_batches batches of the test split), and at the
    last step the full one (the whole split, training.eval_noise_samples draws). Returns (result, path)."""
    t = setup.config.training
    draws, batches = (t.eval_noise_samples, 0) if final else (1, t.num_eval_batches)
    model_config, bound = run.eval_bound(setup.model_config, -1)
    terms = api.per_image_terms(engine, model_config, engine.weights(state, "ema"), setup.dataset.test, t.seed,
                                draws, t.batch_size_eval, batches)
    result = _eval_record(engine, setup, run.eval_statistics(terms), step, "ema", bound, draws)
    say(f"step {step}: eval bpd {result['bpd']:.4f} +- {result['bpd_stderr']:.4f} ({result['num_examples']} test "
        f"images, {draws} noise draw{'s' if draws > 1 else ''} each, EMA params)")
    return result, _write_eval(engine, workdir, result)


# ------------------------------------------------------------------------------------------- eval, sample

def _eval_record(engine: Engine, setup: Setup, statistics: dict, step: int, which: str, bound: str,
                 noise_samples: int) -> dict:
    """An eval result as eval/ stores it: the statistics and what made them (the same settings give the same
    record, whether training or the eval mode made it)."""
    return dict(statistics, step=step, params=which, backend=engine.name, bound=bound, noise_samples=noise_samples,
                seed=setup.config.training.seed, baseline_bpd=setup.baseline_bpd)


def _write_eval(engine: Engine, workdir: str, result: dict) -> Path | None:
    """eval/<named by what made it>.json (process 0); never replaces another result."""
    if engine.process_index() != 0:
        return None
    path = workdir_lib.layout(workdir).eval_path(result["step"], result["bound"], result["noise_samples"],
                                                 result["num_examples"], result["params"], result["backend"])
    return workdir_lib.write_new(path, (json.dumps(result, indent=2, sort_keys=True) + "\n").encode())


def _write_grid(engine: Engine, setup: Setup, workdir: str, step: int, which: str,
                draw: Callable[[int, int, int, tuple], np.ndarray]) -> Path | None:
    """The sample grid of `step` (process 0): draw(num, steps, seed, image_shape) -> images; returns its path."""
    if engine.process_index() != 0:
        return None
    t, shape = setup.config.training, setup.dataset.image_shape
    path = workdir_lib.layout(workdir).sample_path(step, t.num_samples, t.sample_steps, t.seed, which, engine.name)
    images = draw(t.num_samples, t.sample_steps, t.seed, shape)
    return workdir_lib.write_new(path, images_lib.png_grid(images, setup.model_config.vocab_size))


def evaluate(engine: Engine, config: ml_collections.ConfigDict, workdir: str, say: Say | None = None) -> dict:
    """The eval mode: the EMA weights of the newest intact checkpoint on the whole test split, the bound of
    training.eval_timesteps, training.eval_noise_samples draws per image -> eval/. Through the Python API
    (vdm_common.api), as a user's `load(workdir).bpd(images)`."""
    say = say or Say(engine)
    setup = Setup(engine, config, training=False)
    t = config.training
    model = api.load(engine, workdir, config=config, say=say)
    bpd = model.bpd(setup.dataset.test, t.eval_noise_samples, t.eval_timesteps, t.seed, t.batch_size_eval)
    result = _eval_record(engine, setup, bpd.summary(), model.step, model.which, bpd.bound, bpd.noise_samples)
    path = _write_eval(engine, workdir, result)
    say(f"{format_eval(result)} ({model.source} checkpoint)\nresult in {path}")
    return dict(result, checkpoint=model.source, path=str(path) if path else None)


def sample(engine: Engine, config: ml_collections.ConfigDict, workdir: str, say: Say | None = None) -> dict:
    """The sample mode: a grid of training.num_samples samples of the newest checkpoint's EMA weights in
    training.sample_steps steps, seed training.seed. Through the Python API, as `load(workdir).sample(n)`."""
    say = say or Say(engine)
    setup = Setup(engine, config, training=False)
    t = config.training
    model = api.load(engine, workdir, config=config, say=say)
    path = _write_grid(engine, setup, workdir, model.step, model.which, model.sample)
    say(f"{t.num_samples} samples ({t.sample_steps} steps, seed {t.seed}) of step {model.step}: {path}")
    return {"path": str(path) if path else None, "step": model.step}


# ------------------------------------------------------------------------------------- compress, decompress

def _coding_paths(engine: Engine, mode: str, coding: Coding, reads: str, writes: str) -> tuple[Path, Path]:
    """--input and --output of a compress / decompress run, checked before anything is loaded: both given,
    the output not there yet (nothing is replaced), one process."""
    from vdm_common import compressed_file
    missing = [f"--{name}" for name in ("input", "output") if not getattr(coding, name)]
    if missing:
        raise RunError(f"--mode={mode} needs {' and '.join(missing)}: --input= {reads}, --output= {writes}")
    if engine.process_count() > 1:
        raise RunError(f"--mode={mode} runs in one process ({engine.process_count()} were started); start it "
                       f"without torchrun or --coordinator_address")
    output = compressed_file.refuse_existing(coding.output, empty_folder_ok=mode == "decompress")
    return Path(coding.input), output


def compress(engine: Engine, config: ml_collections.ConfigDict, workdir: str, coding: Coding,
             say: Say | None = None) -> dict:
    """The compress mode: the images of --input (.npz or a folder of PNGs) into the new file --output, bits-back
    coded with the newest checkpoint's EMA weights and the discrete-time model of --timesteps steps. Through
    the Python API, as `load(workdir).compress(images, timesteps)`."""
    from vdm_common import bitsback, compressed_file
    say = say or Say(engine)
    source, target = _coding_paths(engine, "compress", coding, "a .npz of uint8 images or a folder of PNGs",
                                   "the new compressed file (e.g. images.vdmz)")
    images = compressed_file.read_images(source)
    model = api.load(engine, workdir, config=config, say=say)
    T = coding.timesteps or bitsback.DEFAULT_TIMESTEPS
    started = time.time()
    try:
        model.check_images(images)
        with bitsback.progress_bar(len(images), T, "compress") as progress:
            data = model.compress(images, T, progress)
    except UserError as e:
        raise bitsback.CompressionError(f"--input {source}: {e}") from None
    seconds = time.time() - started
    path = compressed_file.write_compressed(target, data)
    bpd = 8 * len(data) / images.size
    say(f"compressed {len(images)} images {tuple(images.shape[1:])} of {source} into {path}: {len(data)} bytes, "
        f"{bpd:.4f} bits/dim (T = {T}, step {model.step} {model.which} weights, {engine.name}; "
        f"{len(images) / seconds:.1f} images/s). Decompress with --mode=decompress --input={path}")
    return {"path": str(path), "num_images": len(images), "timesteps": T, "bytes": len(data), "bpd": bpd,
            "seconds": seconds, "step": model.step}


def decompress(engine: Engine, config: ml_collections.ConfigDict, workdir: str, coding: Coding,
               say: Say | None = None) -> dict:
    """The decompress mode: the file --input written by the compress mode back into the images, written to
    --output (a new .npz, or a new folder of PNGs), with the same run's weights. A wrong run or T, a damaged
    or truncated file: one CompressionError, nothing written."""
    from vdm_common import bitsback, compressed_file
    say = say or Say(engine)
    source, target = _coding_paths(engine, "decompress", coding, "a file written by --mode=compress",
                                   "a new .npz or a new folder of PNGs")
    data = compressed_file.read_compressed(source)
    model = api.load(engine, workdir, config=config, say=say)
    started = time.time()
    try:
        header = compressed_file.check_file(model.model_face, data, coding.timesteps)
        with bitsback.progress_bar(header.num_images, header.timesteps, "decompress") as progress:
            images = model.decompress(data, coding.timesteps, progress)
    except UserError as e:
        raise bitsback.CompressionError(f"--input {source}: {e}; nothing was written") from None
    seconds = time.time() - started
    path = compressed_file.write_images(target, images)
    say(f"decompressed {len(images)} images {tuple(images.shape[1:])} of {source} into {path} (T = "
        f"{header.timesteps}, step {model.step} {model.which} weights, {engine.name}; "
        f"{len(images) / seconds:.1f} images/s)")
    return {"path": str(path), "num_images": len(images), "timesteps": header.timesteps, "bytes": len(data),
            "bpd": 8 * len(data) / images.size, "seconds": seconds, "step": model.step}


def plot(workdir: str) -> Path:
    """The plot mode: train and eval bpd curves of metrics.jsonl into plots/bpd.png; returns the path."""
    paths = workdir_lib.layout(workdir)
    return metrics_lib.plot_metrics(paths.metrics, paths.plot)


# ------------------------------------------------------------------------------------------- messages

def describe_start(*, backend: str, num_params: int, memory_bytes: int, num_devices: int, num_processes: int,
                   batch_per_device: int, global_batch: int, dataset_name: str, num_train: int, num_test: int,
                   image_shape, baseline_bpd: float) -> str:
    """The lines a trainer prints at start: devices, model size, memory estimate, data, baseline."""
    return "\n".join([
        f"[{backend}] {num_devices} device(s) in {num_processes} process(es); global batch {global_batch} "
        f"= {batch_per_device} per device",
        f"model: {metrics_lib.format_count(num_params)} parameters; estimated training memory per device "
        f"{metrics_lib.format_bytes(memory_bytes)} (params, grads, Adam, EMA + activations; a rough estimate)",
        f"data: {dataset_name}, {num_train} train / {num_test} test images of shape {tuple(image_shape)}; "
        f"per-pixel categorical baseline {baseline_bpd:.4f} bits/dim (the number to beat)",
    ])


def describe_outputs(workdir: str, written: list[Path]) -> str:
    """Where a run's outputs are, and the files this run wrote, for the end of a training run."""
    paths = workdir_lib.layout(workdir)
    lines = [
        f"outputs in {paths.root}:",
        f"  metrics      {paths.metrics}",
        f"  checkpoints  {paths.checkpoints}  (neutral exports in {paths.neutral})",
        f"  samples      {paths.samples}",
        f"  eval         {paths.eval}",
        f"  plot         {paths.plot}",
        f"  TensorBoard  tensorboard --logdir {paths.tensorboard}",
    ]
    if written:
        lines.append("written by this run:")
        lines += [f"  {path.relative_to(paths.root)}" for path in written]
    return "\n".join(lines)


def format_eval(result: Mapping[str, Any]) -> str:
    """One line: test bpd +- stderr, its terms, and (when present) the per-pixel baseline and the gain."""
    bound = f"{run.bound_name(result['bound'])}, " if result.get("bound") else ""
    draws = result.get("noise_samples", 1)
    text = (f"test bpd ({bound}{draws} noise draw{'s' if draws > 1 else ''} per image) "
            f"{result['bpd']:.4f} +- {result['bpd_stderr']:.4f} over {result['num_examples']} images "
            f"(step {result['step']}, EMA params; recon {result['bpd_recon']:.4f}, latent {result['bpd_latent']:.4f}, "
            f"diffusion {result['bpd_diff']:.4f})")
    if result.get("baseline_bpd") is not None:
        gain = result["baseline_bpd"] - result["bpd"]
        text += (f"; per-pixel categorical baseline {result['baseline_bpd']:.4f}: the model is {abs(gain):.4f} "
                 f"bits/dim {'better' if gain >= 0 else 'worse'}")
    return text
