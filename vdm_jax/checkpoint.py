"""Checkpoints of the JAX trainer: orbax-checkpoint, asynchronous, with the neutral export beside them.

    <workdir>/checkpoints/
      orbax/<step>/                      the TrainState after <step> updates (orbax CheckpointManager)
      neutral/step_<step>.safetensors    the same state in the neutral format (vdm_common.neutral): params,
                                         EMA, AdamW moments and count, model config; numpy + safetensors only,
                                         so the torch trainer (or any script) reads a JAX run without orbax

Both keep the newest `max_to_keep` steps. Saving is asynchronous: `save` returns once the state is copied off
the devices, and orbax writes it in a background thread (into a temporary directory renamed on success, so a
crash never leaves a half-written step that looks complete). An error of that background write is never
lost: the next `save`, `wait` and `close` raise it as `CheckpointError`. The neutral export is written
synchronously by process 0 (it is small: the parameters four times).

Each finished orbax step gets a manifest of its files' SHA-256 (vdm_common.integrity), the neutral export
a checksum of its tensors; a checkpoint that fails it (or fails to load) is reported and the previous one
restored (`restore_latest`). Restoring takes an abstract TrainState whose leaves carry the target shardings (built with `jax.eval_shape`
for the current mesh), so a checkpoint written on 4 devices restores onto 1, or onto 8 hosts.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from vdm_common import integrity, neutral, run
from vdm_common.config import ModelConfig
from vdm_common.run import CheckpointError, DamagedCheckpointError
from vdm_jax import convert
from vdm_jax.steps import TrainState

ORBAX_DIR = "orbax"


def to_host(tree: Any) -> Any:
    """A tree of replicated jax.Arrays -> numpy copies (works for arrays spanning several processes, where
    each process holds the whole value)."""
    def fetch(x):
        if isinstance(x, jax.Array):
            if not x.is_fully_replicated:
                raise ValueError(f"to_host expects replicated arrays, got sharding {x.sharding}")
            return np.asarray(x.addressable_data(0))
        return np.asarray(x)
    return jax.tree_util.tree_map(fetch, tree)


class Checkpointer(run.CheckpointDirectory):
    """The checkpoints of one workdir: save every K steps (the caller decides when), keep N, restore latest.

    read_only: for eval / sample modes: nothing is created, written or deleted.
    """

    def __init__(self, workdir: str | os.PathLike, model_config: ModelConfig, max_to_keep: int,
                 read_only: bool = False):
        super().__init__(workdir, model_config, max_to_keep, read_only, ORBAX_DIR)
        self._pending: int | None = None     # step of the save that may still be running in the background
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=not read_only, read_only=read_only,
            enable_async_checkpointing=True, cleanup_tmp_directories=not read_only)
        if read_only and not self.directory.is_dir():
            self._manager = None
        else:
            self._manager = ocp.CheckpointManager(self.directory, options=options)

    # ------------------------------------------------------------------------------------------- steps
    def orbax_steps(self) -> list[int]:
        return sorted(self._manager.all_steps()) if self._manager is not None else []

    def step_dir(self, step: int) -> Path:
        """checkpoints/orbax/<step>"""
        return self.directory / str(step)

    def latest(self) -> tuple[int, str] | None:
        """(step, 'orbax' | 'neutral') of the newest checkpoint, or None (see run.latest_checkpoint)."""
        return run.latest_checkpoint(self.workdir, self.orbax_steps(), "orbax")

    # ------------------------------------------------------------------------------------------- save
    def save(self, step: int, state: TrainState) -> None:
        """Starts saving `state` (after `step` updates) and writes its neutral export (process 0).

        First waits for the previous save and raises its error, if any. Returns before the orbax files are
        written; `wait` / `close` finish them. Call on every process (orbax synchronises them).
        """
        if self.read_only:
            raise CheckpointError("this Checkpointer is read-only (eval / sample mode)")
        self.wait()
        try:
            saved = self._manager.save(step, args=ocp.args.StandardSave(state), force=True)
        except Exception as e:
            raise CheckpointError(f"saving checkpoint step {step} into {self.directory} failed: "
                                  f"{type(e).__name__}: {e}") from e
        if not saved:
            raise CheckpointError(f"orbax did not save step {step} into {self.directory} (it already holds it?)")
        self._pending = step
        if jax.process_index() == 0:
            ckpt = convert.state_to_neutral(to_host(state), self.model_config, extra={"source": "vdm_jax.train"})
            try:
                neutral.save_neutral(self.paths.neutral_path(step), ckpt)
            except OSError as e:
                raise CheckpointError(f"saving the neutral export of step {step} into {self.paths.neutral} "
                                      f"failed: {type(e).__name__}: {e}. Earlier checkpoints are intact; fix the "
                                      f"cause (disk space, permissions) and resume.") from e
            run.prune_neutral(self.workdir, self.max_to_keep)

    def wait(self) -> None:
        """Blocks until the background save is written; raises CheckpointError if it failed."""
        if self._manager is None or self._pending is None:
            return
        step, self._pending = self._pending, None
        try:
            self._manager.wait_until_finished()
            if jax.process_index() == 0:
                integrity.write_manifest(self.step_dir(step))
        except Exception as e:
            raise CheckpointError(
                f"writing checkpoint step {step} into {self.directory} failed in the background: "
                f"{type(e).__name__}: {e}. Earlier checkpoints are intact; fix the cause (disk space, "
                f"permissions) and resume.") from e

    def close(self) -> None:
        """Waits for the last save (raising its error) and releases orbax's threads."""
        try:
            self.wait()
        finally:
            if self._manager is not None:
                self._manager.close()
                self._manager = None

    # ---------------------------------------------------------------------------------------- restore
    def restore_latest(self, abstract_state: TrainState, opt_config, fresh_optimizer: bool = False,
                       say=print, step: int | None = None) -> tuple[TrainState, tuple[int, str]] | None:
        """(state, (step, source)) of the newest intact checkpoint (of `step` only, when given), or None when
        there is none: a damaged one is reported and the previous one used (vdm_common.run.restore_newest;
        process 0 moves damaged ones to checkpoints/damaged/ unless read_only). Arguments as `restore`."""
        restored = run.restore_newest(
            run.checkpoint_candidates(self.workdir, self.orbax_steps(), ORBAX_DIR, step),
            lambda step, source: self.restore(step, source, abstract_state, opt_config, fresh_optimizer),
            lambda step, source: self.step_dir(step) if source == ORBAX_DIR else self.paths.neutral_path(step),
            move_damaged=not self.read_only and jax.process_index() == 0, say=say)
        if self._manager is not None:
            self._manager.reload()          # a damaged step moved away is no longer orbax's
        return restored

    def restore(self, step: int, source: str, abstract_state: TrainState, opt_config,
                fresh_optimizer: bool = False) -> TrainState:
        """The TrainState of `step`, placed as `abstract_state`'s leaves say (their `.sharding`).

        source 'orbax' reads the orbax step; 'neutral' reads the neutral export (e.g. written by the torch
        trainer) and places it likewise. fresh_optimizer: accept a neutral file without optimizer state (eval
        and sample need only the EMA). Raises CheckpointError naming the files; nothing is deleted.
        """
        if source == "orbax":
            problems = integrity.check_manifest(self.step_dir(step))
            if problems:
                raise DamagedCheckpointError(f"checkpoint step {step} in {self.step_dir(step)} is damaged: "
                                             + "; ".join(problems))
            try:
                return self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
            except Exception as e:
                raise DamagedCheckpointError(
                    f"cannot restore checkpoint step {step} from {self.step_dir(step)}: "
                    f"{type(e).__name__}: {e} (steps present: {self.orbax_steps()}).") from e
        path = self.paths.neutral_path(step)
        try:
            ckpt = neutral.load_neutral(path)
        except (neutral.NeutralFileError, convert.ConversionError) as e:
            raise DamagedCheckpointError(f"cannot restore step {step} from {path}: {e}") from e
        if ckpt.model_config != self.model_config:
            raise CheckpointError(f"{path} holds a model config different from this run's: "
                                  f"{run.config_differences(ckpt.model_config, self.model_config)}")
        try:
            state = convert.state_from_neutral(ckpt, opt_config,
                                               fresh_optimizer=fresh_optimizer and not ckpt.has_optimizer)
        except convert.ConversionError as e:
            raise CheckpointError(f"cannot restore step {step} from {path}: {e}") from e
        state = to_host(state)                                              # numpy: the same on every process
        return jax.tree_util.tree_map(
            lambda value, target: jax.make_array_from_callback(target.shape, target.sharding, lambda i: value[i]),
            state, abstract_state)
