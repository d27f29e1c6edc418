"""Import of upstream VDM checkpoints into the neutral form (numpy only; no backend, no TensorFlow).

Two upstream formats, each read by its own module:

  official      google-research/vdm's clu checkpoints (`ckpt-N.flax`): vdm_common/upstream/official.py
  pytorch-port  addtt/variational-diffusion-models' `model.pt` + `config.yaml`: vdm_common/upstream/port.py

`read_upstream` picks the reader by format; both return an `UpstreamImport` (the checkpoint in neutral
form), which `write_neutral` saves. Every upstream tensor is used exactly once: `UpstreamError` lists
every missing, unexpected and mis-shaped tensor with the file it came from.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from vdm_common.config import ModelConfig
from vdm_common.weights import ConversionError

KINDS = ("official", "pytorch-port")


class UpstreamError(ConversionError):
    """An upstream checkpoint that cannot be imported; the message names the file and every mismatch."""


@dataclasses.dataclass
class UpstreamImport:
    """An upstream checkpoint in neutral form (flat JAX names, JAX layouts, float32 numpy arrays).

    config: the full validated config (model + training + optimizer + data) a run continues with.
    ema_params: None when the file has no EMA. opt_mu / opt_nu: AdamW first / second moments in the params'
    names and layouts (None when the file has no optimizer state); opt_count: the Adam update count.
    """

    kind: str
    source: str
    config: Any
    step: int
    params: dict
    ema_params: dict | None
    opt_mu: dict | None
    opt_nu: dict | None
    opt_count: int
    report: list

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig.from_config(self.config.model)

    def to_neutral(self):
        """The `vdm_common.neutral.NeutralCheckpoint` of this import; `extra` records the source and the full
        config (JSON) so a run directory written from it keeps the training sections."""
        from vdm_common.neutral import NeutralCheckpoint

        has_opt = self.opt_mu is not None
        return NeutralCheckpoint(
            model_config=self.model_config, params=self.params, step=self.step, ema_params=self.ema_params,
            opt_mu=self.opt_mu, opt_nu=self.opt_nu, opt_count=self.opt_count if has_opt else None,
            extra={"upstream": self.kind, "source": self.source, "config": self.config.to_json()})

    def summary(self) -> str:
        return "\n".join(self.report)


def read_upstream(kind: str, path, config=None, number: int | None = None) -> UpstreamImport:
    """Reads an upstream checkpoint. kind: 'official' (needs `config`: a full ConfigDict, e.g. from
    `load_config('configs/cifar10.py')`; `number` picks ckpt-N, default the latest) or 'pytorch-port'
    (the config comes from the run's config.yaml; `config`, when given, supplies the training sections)."""
    from vdm_common.upstream import official, port   # here: the readers import this module's names

    if kind == "official":
        if config is None:
            raise UpstreamError("importing an official checkpoint needs the model config it was trained with: "
                                "pass --config=configs/cifar10.py (or configs/cifar10_aug.py for the "
                                "augmented release, or your own config file)")
        return official.read_official(path, config, number)
    if kind == "pytorch-port":
        if number is not None:
            raise UpstreamError("a PyTorch-port run holds one checkpoint (model.pt); drop the checkpoint number")
        return port.read_port(path, config)
    raise UpstreamError(f"unknown upstream format {kind!r}; one of {KINDS}")


def checked_count(value: Any, what: str, source: str) -> int:
    """An update count stored as an int, or a one-element integral array or tensor (torch AdamW: float32)."""
    try:
        number = np.asarray(to_numpy(value)).reshape(-1)
        if number.size == 1 and number.dtype.kind in "iuf" and float(number[0]).is_integer() and number[0] >= 0:
            return int(number[0])
    except (TypeError, ValueError, RuntimeError, OverflowError):
        pass
    raise UpstreamError(f"{source}: {what} = {value!r:.80} is not a count (an integer >= 0); the file is damaged "
                        f"or not an upstream checkpoint")


def to_numpy(value) -> np.ndarray:
    """A numpy array of a tensor read from a file (torch tensors, bfloat16 ones widened to float32)."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def write_neutral(imp: UpstreamImport, path):
    """Saves an import as a neutral .safetensors checkpoint (`vdm_common.neutral`); returns the path."""
    from vdm_common.neutral import save_neutral

    return save_neutral(path, imp.to_neutral())
