"""What both trainers do around the math, written once (framework-free): modes, paths, eval statistics.

`vdm_jax.train` and `vdm_torch.train` call these, so a workdir looks and reads the same whichever backend
wrote it. Files a run writes beside `vdm_common.workdir`'s layout:

    checkpoints/neutral/step_<N>.safetensors   the neutral export of the state at step N (vdm_common.neutral):
                                               params, EMA, AdamW moments; readable without either framework
    checkpoints/damaged/                       checkpoints that failed to restore, moved aside (`restore_newest`)
    eval/step_<N>.json                         an evaluation of the EMA params of step N (`eval_statistics`)
    samples/step_<N>_n<num>_T<steps>.png       a grid of <num> samples drawn in <steps> ancestral steps
    plots/bpd.png                              train and eval bpd against step (`plot`)

Modes (`--mode`): train (resume from the latest checkpoint, or start), eval (test-set bpd of the EMA params
over the whole test split, with its standard error and the per-pixel baseline), sample (a grid of
training.num_samples samples in training.sample_steps steps), plot (bpd curves from metrics.jsonl).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
from pathlib import Path
from typing import Any, Callable, Mapping

import ml_collections
import numpy as np

from vdm_common import config as config_lib
from vdm_common import metrics as metrics_lib
from vdm_common import workdir as workdir_lib

MODES = ("train", "eval", "sample", "plot")
NEUTRAL_DIR = "neutral"            # under <workdir>/checkpoints/
DAMAGED_DIR = "damaged"            # under <workdir>/checkpoints/: checkpoints that failed to restore
PLOT_FILE = "bpd.png"              # under <workdir>/plots/
EVAL_TERMS = ("bpd", "bpd_recon", "bpd_latent", "bpd_diff")
_STEP_FILE = re.compile(r"^step_(\d+)\.safetensors$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the step, the path and what to do."""


class DamagedCheckpointError(CheckpointError):
    """A checkpoint's files cannot be read back as written (damaged, truncated, checksum mismatch)."""


class RunError(ValueError):
    """A run cannot start as asked (devices, batch sizes, mode, missing checkpoint); the message says the fix."""


def default_workdir(config_path: str, backend: str) -> str:
    """runs/<config file name>_<backend>: `configs/quickstart.py` -> `runs/quickstart_jax`."""
    return str(Path("runs") / f"{Path(config_path).stem}_{backend}")


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise RunError(f"--mode={mode!r} is not one of {MODES}")


def check_divisible(batch_size: int, num_devices: int, field: str) -> None:
    """The global batch must split evenly over the devices (data parallelism): RunError naming the field."""
    if batch_size % num_devices:
        lower = batch_size - batch_size % num_devices
        nearest = " or ".join(str(b) for b in (lower, lower + num_devices) if b > 0)
        raise RunError(f"config.{field} = {batch_size} is not divisible by the number of devices ({num_devices}): "
                       f"each device takes an equal share of the global batch. Pass --config.{field}= a multiple "
                       f"of {num_devices} (nearest: {nearest}).")


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
    check_mode(mode)
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


# ------------------------------------------------------------------------------------------- evaluation

def eval_statistics(per_example: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Means of per-example bpd values, and the standard error of the mean of 'bpd'.

    per_example: {'bpd': (N,), optionally 'bpd_recon', 'bpd_latent', 'bpd_diff': (N,)}, padding removed.
    Returns {name: mean, 'bpd_stderr': std(bpd, ddof=1) / sqrt(N) (0 when N == 1), 'num_examples': N}.
    The standard error covers both the test images and the single noise draw per image.
    """
    bpd = np.asarray(per_example["bpd"], np.float64)
    n = bpd.size
    if n == 0:
        raise RunError("evaluation saw no test examples; check the test split and training.num_eval_batches")
    stats = {name: float(np.mean(np.asarray(values, np.float64))) for name, values in per_example.items()}
    stats["bpd_stderr"] = float(np.std(bpd, ddof=1) / math.sqrt(n)) if n > 1 else 0.0
    stats["num_examples"] = n
    return stats


def eval_bound(model_config: config_lib.ModelConfig, eval_timesteps: int) -> tuple[config_lib.ModelConfig, str]:
    """The model config whose loss is the bound to report, and the bound's tag ('continuous' or 'T<steps>').

    eval_timesteps: -1 the bound the model trains on; 0 the continuous-time VLB; T the discrete-time VLB with
    T steps (same weights, only the diffusion term changes; it lies above the continuous-time bound).
    """
    T = model_config.sm_n_timesteps if eval_timesteps == -1 else eval_timesteps
    if T != model_config.sm_n_timesteps:
        model_config = dataclasses.replace(model_config, sm_n_timesteps=T, variance_minimisation=False)
    return model_config, ("continuous" if T == 0 else f"T{T}")


def bound_name(tag: str) -> str:
    """'continuous' -> 'continuous-time VLB'; 'T1000' -> 'discrete-time VLB, T=1000'."""
    return "continuous-time VLB" if tag == "continuous" else f"discrete-time VLB, T={tag[1:]}"


def eval_path(workdir: str, step: int, tag: str = "") -> Path:
    """eval/step_<step>.json, or eval/step_<step>_<tag>.json for a bound other than the trained one."""
    return workdir_lib.layout(workdir).eval / f"step_{step}{'_' + tag if tag else ''}.json"


def write_eval_result(workdir: str, result: Mapping[str, Any], trained_tag: str | None = None) -> Path:
    """Writes an eval result ({'step', 'bpd', 'bound', ...}) to eval/step_<step>[_<bound>].json atomically;
    the suffix appears when the result's bound differs from the trained one. Returns the path."""
    tag = result.get("bound", "")
    path = eval_path(workdir, int(result["step"]), "" if tag in ("", trained_tag) else tag)
    path.parent.mkdir(parents=True, exist_ok=True)
    workdir_lib.atomic_write_text(path, json.dumps(dict(result), indent=2, sort_keys=True) + "\n")
    return path


def format_eval(result: Mapping[str, Any]) -> str:
    """One line: test bpd +- stderr, its terms, and (when present) the per-pixel baseline and the gain."""
    bound = f"{bound_name(result['bound'])}, " if result.get("bound") else ""
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


# ------------------------------------------------------------------------------------- files of a run

def sample_grid_path(workdir: str, step: int, num_samples: int, sample_steps: int) -> Path:
    return workdir_lib.layout(workdir).samples / f"step_{step}_n{num_samples}_T{sample_steps}.png"


def neutral_dir(workdir: str) -> Path:
    return workdir_lib.layout(workdir).checkpoints / NEUTRAL_DIR


def neutral_path(workdir: str, step: int) -> Path:
    """checkpoints/neutral/step_<step>.safetensors: the neutral export of the state after `step` updates."""
    return neutral_dir(workdir) / f"step_{step}.safetensors"


def neutral_steps(workdir: str) -> list[int]:
    """Steps of the neutral exports present, ascending."""
    folder = neutral_dir(workdir)
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for m in map(_STEP_FILE.match, (p.name for p in folder.iterdir())) if m)


def config_differences(stored, current) -> list[str]:
    """'field: checkpoint=X run=Y' for each field where two ModelConfigs differ."""
    return [f"{name}: checkpoint={value!r} run={getattr(current, name)!r}"
            for name, value in stored.to_dict().items() if getattr(current, name) != value]


def checkpoint_candidates(workdir: str, native_steps: list[int], native: str) -> list[tuple[int, str]]:
    """Every checkpoint of a run as (step, native | 'neutral'), newest first; at one step the native one
    comes first, its neutral export second (a neutral export newer than every native step comes from the
    other backend continuing the run: then it is the one to resume from)."""
    neutral, own = set(neutral_steps(workdir)), set(native_steps)
    return [(step, source) for step in sorted(own | neutral, reverse=True)
            for source, steps in ((native, own), ("neutral", neutral)) if step in steps]


def latest_checkpoint(workdir: str, native_steps: list[int], native: str) -> tuple[int, str] | None:
    """(step, native | 'neutral') of the newest checkpoint of a run, or None."""
    candidates = checkpoint_candidates(workdir, native_steps, native)
    return candidates[0] if candidates else None


def restore_newest(candidates: list[tuple[int, str]], restore: Callable[[int, str], Any],
                   paths: Callable[[int, str], Path], move_damaged: bool, say: Callable[[str], None]):
    """Restores the newest checkpoint that is intact: returns (state, (step, source)), or None when there is
    no checkpoint at all.

    restore(step, source) raises DamagedCheckpointError for a checkpoint that cannot be read (damaged,
    truncated, checksum mismatch); each one is reported by name and the next older one is tried. With
    move_damaged (training), once one restored, the damaged newer ones are moved to
    checkpoints/damaged/ (kept, not deleted) so that they are neither retried nor overwritten. When none
    restores: DamagedCheckpointError listing each, and nothing is moved or deleted.
    """
    failures = []
    for step, source in candidates:
        try:
            state = restore(step, source)
        except DamagedCheckpointError as e:
            failures.append((step, source, e))
            say(f"warning: cannot restore checkpoint step {step} ({source}): {e}")
            continue
        if failures:
            say(f"resuming from the newest intact checkpoint, step {step} ({source}), instead of step "
                f"{failures[0][0]}")
            if move_damaged:
                for damaged_step, damaged_source, _ in failures:
                    moved = _move_aside(paths(damaged_step, damaged_source))
                    say(f"moved the damaged checkpoint to {moved}")
        return state, (step, source)
    if failures:
        raise DamagedCheckpointError(
            "no checkpoint of this run can be restored:\n  "
            + "\n  ".join(f"step {step} ({source}): {e}" for step, source, e in failures)
            + "\nNothing was deleted or moved. Restore the files from a backup, or move them away to start over.")
    return None


def _move_aside(path: Path) -> Path:
    """Moves a file or directory under checkpoints/ into checkpoints/damaged/ (a new name if taken)."""
    folder = path.parent.parent / DAMAGED_DIR
    folder.mkdir(exist_ok=True)
    target = folder / f"{path.parent.name}_{path.name}"
    for n in itertools.count(1):
        if not target.exists():
            break
        target = folder / f"{path.parent.name}_{path.name}.{n}"
    path.rename(target)
    return target


def remove_partial_writes(workdir: str, say: Callable[[str], None]) -> list[Path]:
    """Removes (and reports) the temporary files of atomic writes that a killed process left under
    checkpoints/: never a complete checkpoint, those have their final names. Call with the workdir locked."""
    found = [p for p in workdir_lib.layout(workdir).checkpoints.glob("*/.*.tmp") if p.is_file()]
    for p in found:
        p.unlink(missing_ok=True)
    if found:
        say(f"removed {len(found)} partial file(s) an interrupted save left: {[p.name for p in found]}")
    return found


def prune_neutral(workdir: str, keep: int) -> list[Path]:
    """Removes all but the `keep` newest neutral exports (the native checkpoints keep the same number)."""
    removed = []
    for step in neutral_steps(workdir)[:-keep] if keep > 0 else []:
        path = neutral_path(workdir, step)
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def plot(workdir: str) -> Path:
    """The plot mode: train and eval bpd curves of metrics.jsonl into plots/bpd.png; returns the path."""
    paths = workdir_lib.layout(workdir)
    return metrics_lib.plot_metrics(paths.metrics, paths.plots / PLOT_FILE)


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


def describe_outputs(workdir: str) -> str:
    """Where a run's outputs are, for the end of a training run."""
    paths = workdir_lib.layout(workdir)
    return "\n".join([
        f"outputs in {paths.root}:",
        f"  metrics      {paths.metrics}",
        f"  checkpoints  {paths.checkpoints}  (neutral exports in {paths.checkpoints / NEUTRAL_DIR})",
        f"  samples      {paths.samples}",
        f"  eval         {paths.eval}",
        f"  plot         {paths.plots / PLOT_FILE}",
        f"  TensorBoard  tensorboard --logdir {paths.tensorboard}",
    ])
