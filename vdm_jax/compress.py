"""Lossless compression with a trained VDM in JAX: the model face of the bits-back coder.

    face = ModelFace.from_neutral(load_neutral("runs/q/checkpoints/neutral/step_5000.safetensors"))
    data = compress(face, images, timesteps=100)          # bytes; images uint8 (N, H, W, C)
    assert (decompress(face, data) == images).all()

The coder (vdm_common.bitsback) and the file format (vdm_common.compressed_file) are framework-free; this
module gives them gamma, the score network and the decoder p(x | z_0) as numpy functions. A file decodes
only with the weights, backend and device kind that wrote it (floating-point results must repeat bit for
bit); see the README's "Lossless compression".
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vdm_common import bitsback
# The coder's functions, written once (framework-free) and taking a ModelFace: compress(face, images, T),
# decompress(face, data), discrete_vlb(face, images, T).
from vdm_common.bitsback import discrete_vlb
from vdm_common.compressed_file import compress, decompress
from vdm_common.config import ModelConfig
from vdm_common.neutral import NeutralCheckpoint
from vdm_common.types import Noise
from vdm_jax import convert
from vdm_jax.unet import dtypes
from vdm_jax.vdm import VDM

__all__ = ["ModelFace", "compress", "decompress", "discrete_vlb"]


def _eps_hat(model: VDM, z_t, t):
    g_t = model.gamma(t)
    batch = z_t.shape[0]
    return model.score_model(z_t, jnp.broadcast_to(g_t, (batch,)), jnp.zeros((batch,), g_t.dtype), True)


def _padded(x: np.ndarray, dtype) -> tuple[jax.Array, int]:
    """x with zero rows up to the next power of two (one compiled program per power), and its row count:
    the encoder and the decoder pad alike, so the model sees the same batches on both sides."""
    rows = x.shape[0]
    size = 1 << (rows - 1).bit_length()
    return jnp.asarray(np.concatenate([x, np.zeros((size - rows, *x.shape[1:]))]) if size > rows else x, dtype), rows


def _decoder_logprobs(model: VDM, z_0):
    g_0 = model.gamma(0.0)
    return model.decode(z_0 / jnp.sqrt(1.0 - jax.nn.sigmoid(g_0)), g_0)


class ModelFace:
    """The functions of one trained model that the bits-back coder needs, numpy NHWC float64 in and out.

    model_config: the model's ModelConfig; weights: the backend's weights (JAX: the flax params tree, with
    or without its 'params' key; torch: the VDM module, on any device). The same inputs give bit-identical
    outputs, which is what lets the decoder repeat the encoder's model calls.
    """

    def __init__(self, model_config: ModelConfig, weights):
        params = weights["params"] if set(weights) == {"params"} else weights
        self.model_config = model_config
        self.backend = "jax"
        self.device = jax.default_backend()
        self._variables = {"params": params}
        self._dtype = dtypes(model_config)[0]
        self._digest = None
        model = VDM(model_config)
        self._gamma = jax.jit(lambda v, t: model.apply(v, t, method=lambda m, t: m.gamma(t)))
        self._eps = jax.jit(lambda v, z, t: model.apply(v, z, t, method=_eps_hat))
        self._logprobs = jax.jit(lambda v, z: model.apply(v, z, method=_decoder_logprobs))
        self._losses = {}

    @classmethod
    def from_neutral(cls, checkpoint: NeutralCheckpoint, which: str = "ema") -> "ModelFace":
        """The face of a neutral checkpoint's EMA weights (which='ema', falling back to the params when the
        checkpoint has no EMA) or its params (which='params')."""
        flat = checkpoint.ema_params if which == "ema" and checkpoint.ema_params is not None else checkpoint.params
        return cls(checkpoint.model_config, convert.params_from_neutral(flat, checkpoint.model_config))

    @property
    def digest(self) -> str:
        """bitsback.model_digest of the config and weights (the same for the same weights in either backend)."""
        if self._digest is None:
            self._digest = bitsback.model_digest(self.model_config,
                                                 convert.params_to_neutral(self._variables["params"]))
        return self._digest

    def gamma(self, t: np.ndarray) -> np.ndarray:
        """gamma(t) (n,) at the times t (n,), computed in the model's dtype."""
        return np.asarray(self._gamma(self._variables, jnp.asarray(t, self._dtype)), np.float64)

    def eps_hat(self, z_t: np.ndarray, t: float) -> np.ndarray:
        """The score network's noise prediction at time t for z_t (B, H, W, C), no conditioning, no dropout."""
        z, rows = _padded(z_t, self._dtype)
        return np.asarray(self._eps(self._variables, z, jnp.asarray(t, self._dtype)), np.float64)[:rows]

    def decoder_logprobs(self, z_0: np.ndarray) -> np.ndarray:
        """log p(x = v | z_0) (B, H, W, C, V), the decoder of the reconstruction term."""
        z, rows = _padded(z_0, self._dtype)
        return np.asarray(self._logprobs(self._variables, z), np.float64)[:rows]

    def loss_terms(self, model_config: ModelConfig, images: np.ndarray, noise: Noise) -> dict[str, np.ndarray]:
        """vdm.VDM.loss_terms of `model_config` (same weights) with injected noise: {'recon', 'klz', 'diff'}
        per image (B,), nats, float64."""
        if model_config not in self._losses:
            model = VDM(model_config)
            self._losses[model_config] = jax.jit(lambda v, x, noise: model.apply(
                v, x, jnp.zeros((x.shape[0],), noise.t.dtype), noise, True, method=VDM.loss_terms))
        noise = Noise(*(jnp.asarray(a, self._dtype) for a in noise))
        terms = self._losses[model_config](self._variables, jnp.asarray(images, jnp.int32), noise)
        return {name: np.asarray(value, np.float64) for name, value in terms._asdict().items()}
