"""Noise schedules gamma(t) = -log SNR(t), increasing in t, in PyTorch.

Every schedule maps t of any shape (a Python float, a 0-d or a (B,) tensor) to gamma of the same shape.
Parameter names mirror the JAX tree: `gamma.w`, `gamma.b`, `gamma.l1.weight` (= JAX `gamma/l1/kernel`).
"""
from __future__ import annotations

import torch
from torch import nn

from vdm_common.config import ModelConfig

NNET_FEATURES = 1024


class _AbsJaxDerivative(torch.autograd.Function):
    """torch.abs forward; backward (and forward-mode) by JAX's rule for |x|: select(x >= 0, +1, -1)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return torch.abs(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return torch.where(x >= 0, grad, -grad)

    @staticmethod
    def jvp(ctx, tangent):
        (x,) = ctx.saved_tensors
        return torch.where(x >= 0, tangent, -tangent)


def weight_abs(x: torch.Tensor) -> torch.Tensor:
    """|x| for the schedules' weights, differentiated as JAX differentiates it: sign(x), and +1 at x = 0.

    The schedules keep a weight's effect positive through |w|. At w = 0 exactly (an official
    learnable_nnet model has such weights) |w| has no derivative and the frameworks choose: jnp.abs's is
    +1 (also at -0.0), torch.abs's is 0, which would give such a weight no gradient and keep it at 0.
    Both backends use JAX's, the official model's.
    """
    return _AbsJaxDerivative.apply(x)


def as_tensor(t, like: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    device = like.device if like is not None else None
    return torch.as_tensor(t, dtype=dtype, device=device)


class FixedLinear(nn.Module):
    """gamma(t) = gamma_min + (gamma_max - gamma_min) t, no parameters."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)  # carries device and dtype

    def forward(self, t) -> torch.Tensor:
        cfg = self.config
        t = as_tensor(t, self._anchor, self._anchor.dtype)
        return cfg.gamma_min + (cfg.gamma_max - cfg.gamma_min) * t


class LearnedScalar(nn.Module):
    """gamma(t) = b + |w| t with scalar parameters w, b of shape (1,) (official `NoiseSchedule_Scalar`)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.w = nn.Parameter(torch.full((1,), float(config.gamma_max - config.gamma_min)))
        self.b = nn.Parameter(torch.full((1,), float(config.gamma_min)))

    def forward(self, t) -> torch.Tensor:
        t = as_tensor(t, self.w, self.w.dtype)
        return self.b[0] + weight_abs(self.w[0]) * t


class DenseMonotone(nn.Module):
    """Linear layer whose weight is used through its absolute value, so the map is increasing."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))          # (out, in) as nn.Linear
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:                             # (N, in) -> (N, out)
        return nn.functional.linear(x, weight_abs(self.weight), self.bias)


class LearnedNNet(nn.Module):
    """The official monotone network: gamma(t) = l1(t) + l3(2 (sigmoid(l2(2t - 1)) - 1/2)) / 1024.

    l1: 1 -> 1 (kernel gamma_max - gamma_min, bias gamma_min); l2: 1 -> 1024; l3: 1024 -> 1 without bias.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.l1 = DenseMonotone(1, 1)
        self.l2 = DenseMonotone(1, NNET_FEATURES)
        self.l3 = DenseMonotone(NNET_FEATURES, 1, bias=False)
        with torch.no_grad():
            self.l1.weight.fill_(config.gamma_max - config.gamma_min)
            self.l1.bias.fill_(config.gamma_min)
            nn.init.normal_(self.l2.weight, std=0.01)
            nn.init.normal_(self.l3.weight, std=0.01)

    def forward(self, t) -> torch.Tensor:
        t = as_tensor(t, self.l1.weight, self.l1.weight.dtype)
        x = t.reshape(-1, 1)                                                         # (N, 1)
        g = 2.0 * (torch.sigmoid(self.l2(2.0 * (x - 0.5))) - 0.5)                    # (N, 1024) in (-1, 1)
        return (self.l1(x) + self.l3(g) / NNET_FEATURES).reshape(t.shape)


class LearnedNNetEndpoints(nn.Module):
    """A monotone network's shape between learned endpoints (paper Appendix I.2):

        gamma(t) = gamma_0 + |gamma_1 - gamma_0| (f(t) - f(0)) / (f(1) - f(0)),  f = LearnedNNet.

    gamma(0) = gamma_0 and gamma(1) = gamma_1 exactly (for gamma_1 > gamma_0), so the VLB's prior and
    reconstruction terms depend on the endpoints only, and the network f only shapes the path between them.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gamma_0 = nn.Parameter(torch.full((1,), float(config.gamma_min)))
        self.gamma_1 = nn.Parameter(torch.full((1,), float(config.gamma_max)))
        self.f = LearnedNNet(config)

    def endpoints(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(gamma(0), gamma(1)) as 0-d tensors."""
        g0 = self.gamma_0[0]
        return g0, g0 + weight_abs(self.gamma_1[0] - g0)

    def shape(self, t) -> torch.Tensor:
        """(f(t) - f(0)) / (f(1) - f(0)): increasing from 0 at t=0 to 1 at t=1, same shape as t."""
        t = as_tensor(t, self.gamma_0, self.gamma_0.dtype)
        f_ends = self.f(torch.tensor([0.0, 1.0], dtype=t.dtype, device=t.device))
        return (self.f(t) - f_ends[0]) / (f_ends[1] - f_ends[0])

    def forward(self, t) -> torch.Tensor:
        g0, g1 = self.endpoints()
        return g0 + (g1 - g0) * self.shape(t)


SCHEDULES = {"fixed": FixedLinear, "learnable_scalar": LearnedScalar, "learnable_nnet": LearnedNNet,
             "learnable_nnet_endpoints": LearnedNNetEndpoints}


def make_schedule(config: ModelConfig) -> nn.Module:
    """The schedule module named by `config.gamma_type`."""
    return SCHEDULES[config.gamma_type](config)
