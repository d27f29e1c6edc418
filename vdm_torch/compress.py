"""Lossless compression with a trained VDM in PyTorch: the model face of the bits-back coder.

    face = ModelFace.from_neutral(load_neutral("runs/q/checkpoints/neutral/step_5000.safetensors"))
    data = compress(face, images, timesteps=100)          # bytes; images uint8 (N, H, W, C)
    assert (decompress(face, data) == images).all()

The coder (vdm_common.bitsback) and the file format (vdm_common.compressed_file) are framework-free; this
module gives them gamma, the score network and the decoder p(x | z_0) as numpy functions. A file decodes
only with the weights, backend and device kind that wrote it (floating-point results must repeat bit for
bit); see the README's "Lossless compression".
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from vdm_common import bitsback
# The coder's functions, written once (framework-free) and taking a ModelFace: compress(face, images, T),
# decompress(face, data), discrete_vlb(face, images, T).
from vdm_common.bitsback import discrete_vlb
from vdm_common.compressed_file import compress, decompress
from vdm_common.config import ModelConfig
from vdm_common.neutral import NeutralCheckpoint
from vdm_common.types import Noise
from vdm_torch import convert
from vdm_torch.vdm import VDM, float_dtype

__all__ = ["ModelFace", "compress", "decompress", "discrete_vlb"]


@contextlib.contextmanager
def _fixed_threads():
    """No grad, and one intra-op thread on the CPU: torch's CPU kernels round differently with 1 and 2
    threads (measured: a file written with 2 does not decode with 1), so the coder's calls always use 1."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            yield
    finally:
        torch.set_num_threads(old)


def _nchw(x: np.ndarray, dtype, device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).to(device=device, dtype=dtype).permute(0, 3, 1, 2)


class ModelFace:
    """The functions of one trained model that the bits-back coder needs, numpy NHWC float64 in and out.

    model_config: the model's ModelConfig; weights: the backend's weights (JAX: the flax params tree, with
    or without its 'params' key; torch: the VDM module, on any device). The same inputs give bit-identical
    outputs, which is what lets the decoder repeat the encoder's model calls.
    """

    def __init__(self, model_config: ModelConfig, weights):
        self.model_config = model_config
        self.backend = "torch"
        self._model = weights.eval()
        param = next(weights.parameters())
        self.device = "gpu" if param.device.type == "cuda" else param.device.type
        self._torch_device = param.device
        self._dtype = float_dtype(model_config)
        self._digest = None
        self._losses = {}

    @classmethod
    def from_neutral(cls, checkpoint: NeutralCheckpoint, which: str = "ema") -> "ModelFace":
        """The face of a neutral checkpoint's EMA weights (which='ema', falling back to the params when the
        checkpoint has no EMA) or its params (which='params')."""
        flat = checkpoint.ema_params if which == "ema" and checkpoint.ema_params is not None else checkpoint.params
        return cls(checkpoint.model_config, convert.model_from_neutral(flat, checkpoint.model_config))

    @property
    def digest(self) -> str:
        """bitsback.model_digest of the config and weights (the same for the same weights in either backend)."""
        if self._digest is None:
            self._digest = bitsback.model_digest(self.model_config, convert.params_to_neutral(self._model))
        return self._digest

    def gamma(self, t: np.ndarray) -> np.ndarray:
        """gamma(t) (n,) at the times t (n,), computed in the model's dtype."""
        with _fixed_threads():
            g = self._model.gamma(torch.as_tensor(np.asarray(t), dtype=self._dtype, device=self._torch_device))
        return g.cpu().numpy().astype(np.float64)

    def eps_hat(self, z_t: np.ndarray, t: float) -> np.ndarray:
        """The score network's noise prediction at time t for z_t (B, H, W, C), no conditioning, no dropout."""
        batch = z_t.shape[0]
        with _fixed_threads():
            g_t = self._model.gamma(torch.as_tensor(t, dtype=self._dtype, device=self._torch_device))
            out = self._model.score_model(_nchw(z_t, self._dtype, self._torch_device), g_t.expand(batch),
                                          torch.zeros((batch,), dtype=self._dtype, device=self._torch_device),
                                          deterministic=True)
        return out.permute(0, 2, 3, 1).cpu().numpy().astype(np.float64)

    def decoder_logprobs(self, z_0: np.ndarray) -> np.ndarray:
        """log p(x = v | z_0) (B, H, W, C, V), the decoder of the reconstruction term."""
        model = self._model
        with _fixed_threads():
            g_0 = model.gamma(torch.as_tensor(0.0, dtype=self._dtype, device=self._torch_device))
            z = _nchw(z_0, self._dtype, self._torch_device)
            logprobs = model.decode(z / torch.sqrt(1.0 - torch.sigmoid(g_0)), g_0)           # (B, C, H, W, V)
        return logprobs.permute(0, 2, 3, 1, 4).cpu().numpy().astype(np.float64)

    def loss_terms(self, model_config: ModelConfig, images: np.ndarray, noise: Noise) -> dict[str, np.ndarray]:
        """vdm.VDM.loss_terms of `model_config` (same weights) with injected noise: {'recon', 'klz', 'diff'}
        per image (B,), nats, float64."""
        if model_config not in self._losses:
            model = VDM(model_config).to(self._torch_device)
            model.load_state_dict(self._model.state_dict())
            self._losses[model_config] = model.eval()
        device, dtype = self._torch_device, self._dtype
        noise = Noise(t=torch.as_tensor(np.asarray(noise.t), dtype=dtype, device=device),
                      eps=_nchw(noise.eps, dtype, device), eps_0=_nchw(noise.eps_0, dtype, device))
        images = torch.from_numpy(np.ascontiguousarray(images)).to(device=device, dtype=torch.int64)
        with torch.no_grad():
            terms = self._losses[model_config](images.permute(0, 3, 1, 2),
                                               torch.zeros((len(images),), dtype=dtype, device=device), noise)
        return {name: value.cpu().numpy().astype(np.float64) for name, value in terms._asdict().items()}
