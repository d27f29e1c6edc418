"""Noise schedules gamma(t) = -log SNR(t), increasing in t, in Flax.

Every schedule maps t of any shape (a Python float, a 0-d or a (B,) array) to gamma of the same shape.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from vdm_common.config import ModelConfig
from vdm_jax.unet import dtypes

NNET_FEATURES = 1024


def weight_abs(x):
    """|x| for the schedules' weights, differentiated as JAX differentiates it: sign(x), and +1 at x = 0.

    The schedules keep a weight's effect positive through |w|. At w = 0 exactly (an official
    learnable_nnet model has such weights) |w| has no derivative and the frameworks choose: jnp.abs's is
    +1 (also at -0.0), torch.abs's is 0, which would give such a weight no gradient and keep it at 0.
    Both backends use JAX's, the official model's.
    """
    return jnp.abs(x)


def constant_init(value):
    def init(key, shape, dtype=jnp.float32):
        return jnp.full(shape, value, dtype)
    return init


class FixedLinear(nn.Module):
    """gamma(t) = gamma_min + (gamma_max - gamma_min) t, no parameters."""

    config: ModelConfig

    def __call__(self, t):
        cfg = self.config
        t = jnp.asarray(t, dtypes(cfg)[0])
        return cfg.gamma_min + (cfg.gamma_max - cfg.gamma_min) * t


class LearnedScalar(nn.Module):
    """gamma(t) = b + |w| t with scalar parameters w, b of shape (1,) (official `NoiseSchedule_Scalar`)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, t):
        cfg = self.config
        param_dtype = dtypes(cfg)[0]
        w = self.param("w", constant_init(cfg.gamma_max - cfg.gamma_min), (1,), param_dtype)
        b = self.param("b", constant_init(cfg.gamma_min), (1,), param_dtype)
        t = jnp.asarray(t, param_dtype)
        return b[0] + weight_abs(w[0]) * t


class DenseMonotone(nn.Module):
    """Dense layer whose kernel is used through its absolute value, so the map is increasing."""

    features: int
    use_bias: bool = True
    kernel_init: nn.initializers.Initializer = nn.initializers.normal(0.01)
    bias_init: nn.initializers.Initializer = nn.initializers.zeros
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):                                                           # (N, in) -> (N, features)
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), self.param_dtype)
        y = x @ weight_abs(kernel)
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (self.features,), self.param_dtype)
        return y


class LearnedNNet(nn.Module):
    """The official monotone network: gamma(t) = l1(t) + l3(2 (sigmoid(l2(2t - 1)) - 1/2)) / 1024.

    l1: 1 -> 1 (kernel gamma_max - gamma_min, bias gamma_min); l2: 1 -> 1024; l3: 1024 -> 1 without bias.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, t):
        cfg = self.config
        param_dtype = dtypes(cfg)[0]
        t = jnp.asarray(t, param_dtype)
        shape = t.shape
        x = t.reshape(-1, 1)                                                         # (N, 1)
        h = DenseMonotone(1, kernel_init=constant_init(cfg.gamma_max - cfg.gamma_min),
                          bias_init=constant_init(cfg.gamma_min), param_dtype=param_dtype, name="l1")(x)
        g = DenseMonotone(NNET_FEATURES, param_dtype=param_dtype, name="l2")(2.0 * (x - 0.5))
        g = 2.0 * (jax.nn.sigmoid(g) - 0.5)                                          # (N, 1024) in (-1, 1)
        h = h + DenseMonotone(1, use_bias=False, param_dtype=param_dtype, name="l3")(g) / NNET_FEATURES
        return h.reshape(shape)


class LearnedNNetEndpoints(nn.Module):
    """A monotone network's shape between learned endpoints (paper Appendix I.2):

        gamma(t) = gamma_0 + |gamma_1 - gamma_0| (f(t) - f(0)) / (f(1) - f(0)),  f = LearnedNNet.

    gamma(0) = gamma_0 and gamma(1) = gamma_1 exactly (for gamma_1 > gamma_0), so the VLB's prior and
    reconstruction terms depend on the endpoints only, and the network f only shapes the path between them.
    """

    config: ModelConfig

    def setup(self):
        cfg = self.config
        param_dtype = dtypes(cfg)[0]
        self.gamma_0 = self.param("gamma_0", constant_init(cfg.gamma_min), (1,), param_dtype)
        self.gamma_1 = self.param("gamma_1", constant_init(cfg.gamma_max), (1,), param_dtype)
        self.f = LearnedNNet(cfg)

    def endpoints(self):
        """(gamma(0), gamma(1)) as 0-d arrays."""
        g0 = self.gamma_0[0]
        return g0, g0 + weight_abs(self.gamma_1[0] - g0)

    def shape(self, t):
        """(f(t) - f(0)) / (f(1) - f(0)): increasing from 0 at t=0 to 1 at t=1, same shape as t."""
        t = jnp.asarray(t, dtypes(self.config)[0])
        f_ends = self.f(jnp.array([0.0, 1.0], t.dtype))
        return (self.f(t) - f_ends[0]) / (f_ends[1] - f_ends[0])

    def __call__(self, t):
        g0, g1 = self.endpoints()
        return g0 + (g1 - g0) * self.shape(t)


SCHEDULES = {"fixed": FixedLinear, "learnable_scalar": LearnedScalar, "learnable_nnet": LearnedNNet,
             "learnable_nnet_endpoints": LearnedNNetEndpoints}


def make_schedule(config: ModelConfig) -> nn.Module:
    """The schedule module named by `config.gamma_type` (unbound; named by the attribute it is set to)."""
    return SCHEDULES[config.gamma_type](config)
