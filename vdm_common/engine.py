"""What the trainer (vdm_common.trainer) and the Python API (vdm_common.api) ask of a backend: its engine.

An engine holds only framework work: devices and processes (a JAX mesh, a torch process group), placement of
host batches, compiled step functions, native checkpoints, the profiler. Everything a user sees (modes,
cadence, messages, files) is the trainer's. `vdm_jax.engine.Engine` and `vdm_torch.engine.Engine` implement
this protocol; each takes its options as one frozen dataclass, `EngineOptions`. `on_main_process` is the
one collective pattern both the trainer and an engine use.

Arrays cross the boundary as numpy, NHWC, in the global batch: images uint8 in [0, vocab_size), conditioning
float32 (B,), noise float64 (vdm_common.noise). `State` and `Weights` are the engine's own objects (a JAX
TrainState of replicated arrays, a torch TrainState of modules); the trainer only passes them back.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol

import ml_collections
import numpy as np

from vdm_common.config import ModelConfig
from vdm_common.run import RunError
from vdm_common.types import Noise
from vdm_common.watchdog import KeyValueStore

State = Any
Weights = Any
Restored = tuple[int, str]              # (step, source): the checkpoint a state came from


class Profiler(Protocol):
    def after(self, step: int, state: State) -> None: ...   # after each training call, with the step reached
    def close(self) -> None: ...


class Engine(Protocol):
    name: str                                                # "jax" | "torch": run.json, messages, file names
    compiles: bool                                           # the first training call compiles (minutes)

    # -- processes and devices ----------------------------------------------------------------------------
    def process_index(self) -> int: ...
    def process_count(self) -> int: ...
    def device_count(self) -> int: ...                       # devices of all processes
    def all_ok(self, ok: bool) -> bool: ...                  # collective: True when True on every process
    def max_over_processes(self, value: int) -> int: ...     # collective
    def peer_store(self) -> KeyValueStore | None: ...        # the job's key-value store; None in one process

    # -- training -------------------------------------------------------------------------------------------
    def init_or_restore(self, config: ml_collections.ConfigDict, workdir: str, image_shape: tuple[int, int, int],
                        say: Callable[[str], None]) -> tuple[State, Restored | None]:
        """The state of the newest intact checkpoint of the workdir (opened for saving), or a fresh one for
        images of `image_shape` (H, W, C)."""

    def train_steps(self, state: State, first_step: int, images: np.ndarray, conditioning: np.ndarray
                    ) -> tuple[State, Any]:
        """Steps first_step.. on this process's rows (S, B_local, H, W, C) / (S, B_local); returns the new
        state and the metrics, possibly still being computed (see `fetch_metrics`)."""

    def fetch_metrics(self, pending: Any) -> dict[str, Any]:
        """Host values: means over the applied steps (bpd, its parts, grad_norm, learning_rate), `skipped`
        (how many were skipped) and `skipped_per_step` (a flag per step)."""

    def step_of(self, state: State) -> int: ...
    def count_params(self, state: State) -> int: ...
    def weights(self, state: State, which: str = "ema") -> Weights: ...   # "ema" or "params"
    def save(self, step: int, state: State) -> None: ...     # every process; may finish in the background
    def wait(self) -> None: ...                              # finishes a background save, raising its error
    def close(self) -> None: ...                             # wait, then release the checkpoints
    def profiler(self, directory, steps: int, say: Callable[[str], None]) -> Profiler: ...
    def describe_memory(self) -> str | None: ...             # peak device memory, where the framework knows it

    # -- evaluation and sampling ------------------------------------------------------------------------------
    def restore_weights(self, workdir: str, config: ml_collections.ConfigDict, which: str, step: int | None,
                        say: Callable[[str], None]) -> tuple[Weights, Restored]:
        """Read-only: the weights of checkpoint `step` (None: the newest intact one) of a run directory."""

    def weights_from_neutral(self, checkpoint, which: str) -> Weights: ...   # a vdm_common.neutral checkpoint

    def eval_terms(self, model_config: ModelConfig, weights: Weights, images: np.ndarray,
                   conditioning: np.ndarray, noise: Noise) -> dict[str, np.ndarray]:
        """Per-image bpd and its terms ('bpd', 'bpd_recon', 'bpd_latent', 'bpd_diff', each (B,) float64) of a
        global batch that every process passes whole; every process gets every row. Dropout off."""

    def sample(self, model_config: ModelConfig, weights: Weights, z_1: np.ndarray, steps: int,
               step_noise: Callable[[], np.ndarray], gumbel: np.ndarray | None) -> np.ndarray:
        """Ancestral sampling from z_1 (N, H, W, C) in `steps` steps, step_noise() giving each step's noise,
        then decoding (argmax, or Gumbel-max with `gumbel` (N, H, W, C, V)): images (N, H, W, C) int32.
        This process alone (no collectives)."""


def on_main_process(engine: Engine, fn: Callable[[], Any], what: str) -> Any:
    """Runs fn on process 0 and lets every process know whether it succeeded (the others raise too)."""
    error, result = None, None
    if engine.process_index() == 0:
        try:
            result = fn()
        except Exception as e:  # re-raised below, after telling the other processes
            error = e
    ok = engine.all_ok(error is None)
    if error is not None:
        raise error
    if not ok:
        raise RunError(f"process 0 failed to {what}; see its output")
    return result
