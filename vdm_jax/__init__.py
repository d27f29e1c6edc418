"""Variational Diffusion Models in JAX/Flax.

    import vdm_jax
    model = vdm_jax.load("runs/quickstart_jax")     # a run directory of either backend, or a checkpoint file
    model.bpd(images).bpd                            # per-image bits/dim, numpy (N,)
    model.sample(16)                                 # uint8 (16, H, W, C)

`load` returns a `vdm_common.api.TrainedModel` over `vdm_jax.engine.Engine`; `model.weights` is the flax
params tree of `vdm_jax.vdm.VDM(model.model_config)`. The same seed gives the same numbers as vdm_torch.
"""
from __future__ import annotations

from vdm_common.api import Bpd, TrainedModel

__all__ = ["load", "TrainedModel", "Bpd"]


def load(path, weights: str = "ema", step: int | None = None, config=None, options=None) -> TrainedModel:
    """The trained VDM at `path`: a run directory (either backend's, or an upstream import), a neutral
    `.safetensors`, a torch `.pt` (read with torch) or a flax `.msgpack` (with `config`).

    weights: 'ema' (default) or 'params' (the online weights). step: that checkpoint of a run (default: the
    newest intact one). config: the run config to use (default: the run's; for a file, the library's
    defaults around the file's model config). options: vdm_jax.engine.EngineOptions (devices).
    """
    from vdm_common import api
    from vdm_jax import engine
    return api.load(engine.Engine(options or engine.EngineOptions()), path, weights, step, config)
