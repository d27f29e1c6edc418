"""Variational Diffusion Models in PyTorch.

    import vdm_torch
    model = vdm_torch.load("runs/quickstart_jax")   # a run directory of either backend, or a checkpoint file
    model.bpd(images).bpd                            # per-image bits/dim, numpy (N,)
    model.sample(16)                                 # uint8 (16, H, W, C)

`load` returns a `vdm_common.api.TrainedModel` over `vdm_torch.engine.Engine`; `model.weights` is the
`vdm_torch.vdm.VDM` module (`.to(device)`, `torch.no_grad()`, autocast). The same seed gives the same
numbers as vdm_jax.
"""
from __future__ import annotations

from vdm_common.api import Bpd, TrainedModel

__all__ = ["load", "TrainedModel", "Bpd"]


def load(path, weights: str = "ema", step: int | None = None, config=None, options=None) -> TrainedModel:
    """The trained VDM at `path`: a run directory (either backend's, or an upstream import), a neutral
    `.safetensors`, a torch `.pt` or a flax `.msgpack` (read with JAX, with `config`).

    weights: 'ema' (default) or 'params' (the online weights). step: that checkpoint of a run (default: the
    newest intact one). config: the run config to use (default: the run's; for a file, the library's
    defaults around the file's model config). options: vdm_torch.engine.EngineOptions (device, ...).
    """
    from vdm_common import api
    from vdm_torch import engine
    return api.load(engine.Engine(options or engine.EngineOptions()), path, weights, step, config)
