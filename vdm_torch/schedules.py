"""Noise schedules gamma(t) = -log SNR(t), increasing in t, in PyTorch.

Every schedule maps t of any shape (a Python float, a 0-d or a (B,) tensor) to gamma of the same shape.
Parameter names mirror the JAX tree: `gamma.w`, `gamma.b`, `gamma.l1.weight` (= JAX `gamma/l1/kernel`).
"""
from __future__ import annotations

import torch
from torch import nn

from vdm_common.config import ModelConfig

NNET_FEATURES = 1024


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
        return self.b[0] + torch.abs(self.w[0]) * t


class DenseMonotone(nn.Module):
    """Linear layer whose weight is used through its absolute value, so the map is increasing."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))          # (out, in) as nn.Linear
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:                             # (N, in) -> (N, out)
        return nn.functional.linear(x, torch.abs(self.weight), self.bias)


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


SCHEDULES = {"fixed": FixedLinear, "learnable_scalar": LearnedScalar, "learnable_nnet": LearnedNNet}


def make_schedule(config: ModelConfig) -> nn.Module:
    """The schedule module named by `config.gamma_type`."""
    return SCHEDULES[config.gamma_type](config)
