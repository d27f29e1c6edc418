"""What a run's results and checkpoints are, written once (framework-free): eval statistics and bounds,
which checkpoint to restore (newest intact first, damaged ones moved aside), clean-up after a killed save.

The run directory's paths are `vdm_common.workdir.Layout`'s; the trainer (vdm_common.trainer) and both
backends' checkpointers call these, so a workdir reads the same whichever backend wrote it.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import re
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from vdm_common import config as config_lib
from vdm_common import workdir as workdir_lib
from vdm_common.errors import UserError

EVAL_TERMS = ("bpd", "bpd_recon", "bpd_latent", "bpd_diff")
_STEP_FILE = re.compile(r"^step_(\d+)\.safetensors$")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint could not be written or read; the message names the step, the path and what to do."""


class DamagedCheckpointError(CheckpointError):
    """A checkpoint's files cannot be read back as written (damaged, truncated, checksum mismatch)."""


class RunError(UserError, ValueError):
    """A run cannot start as asked (devices, batch sizes, mode, missing checkpoint); the message says the fix."""


class CheckpointDirectory:
    """What both backends' Checkpointers hold: the run's paths, the model config every checkpoint must match,
    how many checkpoints to keep, whether this one may write, and its own folder checkpoints/<native>/."""

    def __init__(self, workdir, model_config: config_lib.ModelConfig, max_to_keep: int, read_only: bool,
                 native: str):
        self.workdir = str(workdir)
        self.model_config = model_config
        self.max_to_keep = max_to_keep
        self.read_only = read_only
        self.paths = workdir_lib.layout(self.workdir)
        self.directory = self.paths.native(native)


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


# ------------------------------------------------------------------------------------- files of a run

def neutral_steps(workdir: str) -> list[int]:
    """Steps of the neutral exports present, ascending."""
    folder = workdir_lib.layout(workdir).neutral
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for m in map(_STEP_FILE.match, (p.name for p in folder.iterdir())) if m)


def config_differences(stored, current) -> list[str]:
    """'field: checkpoint=X run=Y' for each field where two ModelConfigs differ."""
    return [f"{name}: checkpoint={value!r} run={getattr(current, name)!r}"
            for name, value in stored.to_dict().items() if getattr(current, name) != value]


def checkpoint_candidates(workdir: str, native_steps: list[int], native: str, step: int | None = None
                          ) -> list[tuple[int, str]]:
    """Every checkpoint of a run (of `step` only, when given) as (step, native | 'neutral'), newest first;
    at one step the native one comes first, its neutral export second (a neutral export newer than every
    native step comes from the other backend continuing the run: then it is the one to resume from)."""
    neutral, own = set(neutral_steps(workdir)), set(native_steps)
    return [(s, source) for s in sorted(own | neutral, reverse=True) if step is None or s == step
            for source, steps in ((native, own), ("neutral", neutral)) if s in steps]


def latest_checkpoint(workdir: str, native_steps: list[int], native: str) -> tuple[int, str] | None:
    """(step, native | 'neutral') of the newest checkpoint of a run, or None."""
    candidates = checkpoint_candidates(workdir, native_steps, native)
    return candidates[0] if candidates else None


def no_checkpoint(workdir: str, step: int | None, steps_present: list[int]) -> RunError:
    """The error of a mode that needs a checkpoint the workdir does not hold."""
    if step is None:
        return RunError(f"{workdir_lib.layout(workdir).checkpoints} holds no checkpoint; train first "
                        f"(--mode=train --workdir={workdir})")
    return RunError(f"{workdir} holds no checkpoint of step {step}; steps present: {sorted(set(steps_present))}")


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
    folder = path.parent.parent / workdir_lib.DAMAGED_DIR
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
        path = workdir_lib.layout(workdir).neutral_path(step)
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed
