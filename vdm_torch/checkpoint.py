"""Checkpoints of the PyTorch trainer: atomic torch files, with the neutral export beside them.

    <workdir>/checkpoints/
      torch/step_<step>.pt               the TrainState after <step> updates (`torch.save` of a dict):
                                         'model', 'ema' (state_dicts of the unwrapped VDMs: no `module.` or
                                         `_orig_mod.` prefixes), 'optimizer' (AdamW state_dict), 'step',
                                         'model_config', 'rng' (the saving process's torch RNG states)
      neutral/step_<step>.safetensors    the same state in the neutral format (vdm_common.neutral): params,
                                         EMA, AdamW moments and count, model config; numpy + safetensors only,
                                         so the JAX trainer (or any script) reads a torch run without torch

Both keep the newest `max_to_keep` steps. Saving is synchronous and atomic: each file is written to a
temporary file in the same directory, fsynced and renamed over its final name (then the directory is
fsynced), so a crash leaves the previous checkpoints and never a partial file under a final name. Process 0
alone writes (the caller decides); the native file first, then the neutral export, then the pruning.

Randomness needed to continue exactly: the training draws are functions of (seed, step) (the loss noise
from `steps.step_generator`, the dropout masks from `steps.seed_dropout`, the batches from
`vdm_common.data.train_batch`), so `step` is what a resume needs; the checkpoint also holds the saving
process's CPU (and CUDA) RNG states, restored on request, so the default generators continue where an
uninterrupted run has them.

Each torch file holds a SHA-256 of its contents (`digest`, key 'sha256'), the neutral export one of its
tensors; a checkpoint that fails it (or fails to load) is reported and the previous one restored
(`restore_latest`). Restoring maps every tensor to the requested device, so a checkpoint written on a GPU restores on a CPU and
one written by N processes restores in M.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import ml_collections
import torch

from vdm_common import integrity, neutral, run
from vdm_common.config import ConfigError, ModelConfig
from vdm_common.run import CheckpointError, DamagedCheckpointError
from vdm_common.workdir import atomic_write
from vdm_common.weights import ConversionError, strip_wrapper_prefixes
from vdm_torch import convert
from vdm_torch.steps import TrainState, make_optimizer
from vdm_torch.vdm import VDM

TORCH_DIR = "torch"
SUFFIX = ".pt"
_STEP_FILE = re.compile(r"^step_(\d+)\.pt$")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """`torch.save(obj)` to `path` so that readers see the old file or the new one, never a partial one
    (vdm_common.workdir.atomic_write: temp file, fsync, rename, fsync of the directory), written straight to
    the file without a second copy in memory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: torch.save(obj, f))
    return path


def digest(obj: Any, prefix: str = "") -> str:
    """The checksum of a checkpoint dict (vdm_common.integrity): every tensor by dtype, shape and bytes, every
    other value by its text, the `sha256` entry itself left out."""
    return integrity.digest_arrays(_leaves(obj, prefix))


def _leaves(obj: Any, prefix: str) -> list[tuple[str, Any]]:
    if isinstance(obj, dict):
        return [leaf for key, value in obj.items() if key != "sha256"
                for leaf in _leaves(value, f"{prefix}{key}/")]
    if isinstance(obj, (list, tuple)):
        return [leaf for i, value in enumerate(obj) for leaf in _leaves(value, f"{prefix}{i}/")]
    if isinstance(obj, torch.Tensor):
        flat = obj.detach().cpu().contiguous().reshape(-1)
        return [(prefix, f"{obj.dtype}{tuple(obj.shape)}"), (prefix + "bytes", flat.view(torch.uint8).numpy())]
    return [(prefix, repr(obj))]


def rng_states() -> dict[str, Any]:
    """This process's default generators: {'torch': CPU state, 'cuda': [state per GPU]} (no 'cuda' without GPUs)."""
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Sets the default generators from `rng_states()`'s dict (CUDA states only when the GPU count matches)."""
    torch.set_rng_state(states["torch"].cpu())
    cuda = states.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])


class Checkpointer(run.CheckpointDirectory):
    """The checkpoints of one workdir: save every K steps (the caller decides when), keep N, restore latest.

    read_only: for eval / sample modes: nothing is created, written or deleted.
    Mirrors `vdm_jax.checkpoint.Checkpointer` (save / wait / close / latest / restore), with torch files in
    place of orbax steps.
    """

    def __init__(self, workdir: str | os.PathLike, model_config: ModelConfig, max_to_keep: int,
                 read_only: bool = False):
        super().__init__(workdir, model_config, max_to_keep, read_only, TORCH_DIR)

    # ------------------------------------------------------------------------------------------- steps
    def path(self, step: int) -> Path:
        """checkpoints/torch/step_<step>.pt"""
        return self.directory / f"step_{step}{SUFFIX}"

    def torch_steps(self) -> list[int]:
        """Steps of the native checkpoints present, ascending."""
        if not self.directory.is_dir():
            return []
        return sorted(int(m.group(1)) for m in map(_STEP_FILE.match, (p.name for p in self.directory.iterdir()))
                      if m)

    def latest(self) -> tuple[int, str] | None:
        """(step, 'torch' | 'neutral') of the newest checkpoint, or None (see run.latest_checkpoint)."""
        return run.latest_checkpoint(self.workdir, self.torch_steps(), "torch")

    # -------------------------------------------------------------------------------------------- save
    def save(self, step: int, state: TrainState, rng: dict[str, Any] | None = None) -> Path:
        """Writes `state` (after `step` updates) as checkpoints/torch/step_<step>.pt and its neutral export,
        then removes all but the newest `max_to_keep` of each. Call on process 0 only. `rng`: the RNG states
        to store (default: this process's, `rng_states()`). Raises CheckpointError; earlier files are intact.
        """
        if self.read_only:
            raise CheckpointError("this Checkpointer is read-only (eval / sample mode)")
        if int(state.step) != step:
            raise CheckpointError(f"saving step {step}: the state is at step {state.step}")
        path = self.path(step)
        try:
            obj = convert.state_to_checkpoint(state)
            obj["rng"] = rng_states() if rng is None else rng
            obj["sha256"] = digest(obj)
            atomic_torch_save(obj, path)
            ckpt = convert.state_to_neutral(state, extra={"source": "vdm_torch.train"})
            neutral.save_neutral(self.paths.neutral_path(step), ckpt)
        except (OSError, RuntimeError, ConversionError) as e:
            raise CheckpointError(f"saving checkpoint step {step} into {self.directory} failed: "
                                  f"{type(e).__name__}: {e}. Earlier checkpoints are intact; fix the cause (disk "
                                  f"space, permissions) and resume.") from e
        self._prune()
        return path

    def _prune(self) -> None:
        for old in self.torch_steps()[:-self.max_to_keep]:
            self.path(old).unlink(missing_ok=True)
        run.prune_neutral(self.workdir, self.max_to_keep)

    def wait(self) -> None:
        """Nothing to wait for: saves are synchronous (the JAX Checkpointer's saves are not)."""

    def close(self) -> None:
        """Nothing to release; for symmetry with the JAX Checkpointer."""

    # ----------------------------------------------------------------------------------------- restore
    def restore(self, step: int, source: str, opt_config: ml_collections.ConfigDict,
                device: torch.device | str = "cpu", fused: bool | None = None, restore_rng: bool = False,
                fresh_optimizer: bool = False) -> TrainState:
        """The TrainState of `step` on `device`, its AdamW built by `steps.make_optimizer(..., fused)`.

        source 'torch' reads checkpoints/torch/step_<step>.pt; 'neutral' reads the neutral export (e.g.
        written by the JAX trainer: params, EMA and the Adam moments and count, so training continues from
        it). restore_rng: also set this process's default generators to the stored states (torch files).
        fresh_optimizer: accept a neutral file without optimizer state (eval / sample need only the EMA).
        Raises CheckpointError naming the file; nothing is deleted.
        """
        if source == "neutral":
            return self._restore_neutral(step, opt_config, device, fused, fresh_optimizer)
        if source != "torch":
            raise CheckpointError(f"unknown checkpoint source {source!r}: 'torch' or 'neutral'")
        path = self.path(step)
        hint = (f"If that step is damaged, move the file away to resume from the previous one (steps present: "
                f"{self.torch_steps()}).")
        try:
            obj = torch.load(path, map_location=device, weights_only=True)
        except FileNotFoundError:
            raise DamagedCheckpointError(f"checkpoint {path} does not exist (steps present: {self.torch_steps()})") \
                from None
        except Exception as e:  # pickle / zip errors of many kinds for a damaged file
            raise DamagedCheckpointError(f"cannot read checkpoint {path}: it {convert._unreadable(path, e)}. "
                                         f"{hint}") from e
        if not isinstance(obj, dict):
            raise DamagedCheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict. {hint}")
        if "sha256" in obj and digest(obj) != obj["sha256"]:
            raise DamagedCheckpointError(f"{path} does not match its checksum: the file is damaged (its bytes "
                                         f"changed after it was written). {hint}")
        try:
            stored = ModelConfig.from_config(obj["model_config"])
        except (KeyError, TypeError, ConfigError) as e:
            raise DamagedCheckpointError(f"{path} holds no valid model_config ({e}). {hint}") from None
        if stored != self.model_config:
            raise CheckpointError(f"{path} holds a model config different from this run's: "
                                  f"{run.config_differences(stored, self.model_config)}")
        try:
            with torch.random.fork_rng(devices=[]):   # the throw-away init must not move the caller's RNG
                model, ema = VDM(self.model_config), VDM(self.model_config)
            model, ema = model.to(device), ema.to(device)
            model.load_state_dict(strip_wrapper_prefixes(obj["model"]), strict=True)
            ema.load_state_dict(strip_wrapper_prefixes(obj["ema"]), strict=True)
            ema.requires_grad_(False)
            optimizer = make_optimizer(model, opt_config, fused)
            optimizer.load_state_dict(obj["optimizer"])
            if int(obj["step"]) != step:
                raise ValueError(f"it holds step {obj['step']}, not {step}")
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            raise DamagedCheckpointError(f"cannot restore {path}: {type(e).__name__}: {e}. {hint}") from e
        _apply_optimizer_choice(optimizer, fused)
        if restore_rng and obj.get("rng") is not None:
            set_rng_states(obj["rng"])
        return TrainState(step=step, model=model, ema=ema, optimizer=optimizer)

    def restore_latest(self, opt_config: ml_collections.ConfigDict, device: torch.device | str = "cpu",
                       fused: bool | None = None, restore_rng: bool = False, fresh_optimizer: bool = False,
                       say=print, step: int | None = None) -> tuple[TrainState, tuple[int, str]] | None:
        """(state, (step, source)) of the newest intact checkpoint (of `step` only, when given), or None when
        there is none: a damaged one is reported and the previous one used (vdm_common.run.restore_newest;
        damaged ones are moved to checkpoints/damaged/ unless read_only). Arguments as `restore`."""
        return run.restore_newest(
            run.checkpoint_candidates(self.workdir, self.torch_steps(), TORCH_DIR, step),
            lambda step, source: self.restore(step, source, opt_config, device, fused, restore_rng, fresh_optimizer),
            lambda step, source: self.path(step) if source == TORCH_DIR else self.paths.neutral_path(step),
            move_damaged=not self.read_only, say=say)

    def _restore_neutral(self, step: int, opt_config, device, fused, fresh_optimizer: bool) -> TrainState:
        path = self.paths.neutral_path(step)
        try:
            ckpt = neutral.load_neutral(path)
        except (neutral.NeutralFileError, ConversionError) as e:
            raise DamagedCheckpointError(f"cannot restore step {step} from {path}: {e}") from e
        if ckpt.model_config != self.model_config:
            raise CheckpointError(f"{path} holds a model config different from this run's: "
                                  f"{run.config_differences(ckpt.model_config, self.model_config)}")
        if ckpt.step != step:
            raise DamagedCheckpointError(f"{path} holds step {ckpt.step}, not {step}")
        try:
            return convert.state_from_neutral(ckpt, opt_config, device=device, fused=fused,
                                              fresh_optimizer=fresh_optimizer and not ckpt.has_optimizer)
        except ConversionError as e:
            raise CheckpointError(f"cannot restore step {step} from {path}: {e}") from e


def _apply_optimizer_choice(optimizer: torch.optim.AdamW, fused: bool | None) -> None:
    """`load_state_dict` brings back the SAVED groups' settings, 'fused' included; keep this run's choice
    instead (a run saved on a GPU with fused AdamW may resume on a CPU without it), and put each `step`
    where that implementation keeps it (on the parameter's device when fused, else on the CPU)."""
    for group in optimizer.param_groups:
        group["fused"] = fused
        for p in group["params"]:
            state = optimizer.state.get(p)
            if state and "step" in state:
                state["step"] = state["step"].to(device=p.device if fused else "cpu", dtype=torch.float32)

