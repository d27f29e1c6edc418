"""The VDM score UNet in PyTorch (NCHW), module names mirroring the official JAX parameter tree.

`score_model.down.block_0.conv1.weight` here is `score_model/down.block_0/conv1/kernel` in JAX: the names
match and only layouts differ (see vdm_common.weights). Initialisation follows Flax (truncated LeCun
normal kernels, zero biases, zero-initialised output convs).
Shapes: B batch, C image channels, H x W image, E = model.sm_n_embd.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vdm_common.config import ModelConfig


def lecun_normal_(weight: torch.Tensor, fan_in: int) -> None:
    """Flax's default kernel init: truncated normal (2 std) with variance 1 / fan_in."""
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978  # undo the truncation's variance shrink
    nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)


def dense(in_features: int, out_features: int, bias: bool = True, zero: bool = False) -> nn.Linear:
    layer = nn.Linear(in_features, out_features, bias=bias)
    nn.init.zeros_(layer.weight) if zero else lecun_normal_(layer.weight, in_features)
    if bias:
        nn.init.zeros_(layer.bias)
    return layer


def conv3x3(in_ch: int, out_ch: int, zero: bool = False) -> nn.Conv2d:
    """The model's 3x3 'SAME' convolution: a LeCun-normal kernel, or zeros (zero=True); bias zero."""
    layer = nn.Conv2d(in_ch, out_ch, 3, padding=1)
    nn.init.zeros_(layer.weight) if zero else lecun_normal_(layer.weight, in_ch * 9)
    nn.init.zeros_(layer.bias)
    return layer


def group_norm(config: ModelConfig, channels: int) -> nn.GroupNorm:
    """The model's GroupNorm: config.norm_groups groups, epsilon config.norm_eps."""
    return nn.GroupNorm(config.norm_groups, channels, eps=config.norm_eps)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of t in [0, 1] scaled by 1000: (B,) -> (B, dim) = [sin(1000 t w), cos(1000 t w)]."""
    assert t.ndim == 1 and dim % 2 == 0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=t.dtype, device=t.device) * -(math.log(10000.0) / (half - 1)))
    angles = (t * 1000.0)[:, None] * freqs[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def fourier_features(z: torch.Tensor, start: int, stop: int, order: str) -> torch.Tensor:
    """Base-2 Fourier features of z: (B, C, H, W) -> (B, 2 C F, H, W), F = stop - start frequencies.

    channel_major (official):   [c0f0, c0f1, ..., c1f0, ...] then sin of all, cos of all.
    frequency_major (torch port): [f0c0, f0c1, ..., f1c0, ...] then sin of all, cos of all.
    """
    n_freq, channels = stop - start, z.shape[1]
    w = 2.0 ** torch.arange(start, stop, dtype=z.dtype, device=z.device) * 2 * math.pi      # (F,)
    if order == "channel_major":
        h = z.repeat_interleave(n_freq, dim=1) * w.repeat(channels)[None, :, None, None]    # (B, C F, H, W)
    else:
        h = z.repeat(1, n_freq, 1, 1) * w.repeat_interleave(channels)[None, :, None, None]  # (B, F C, H, W)
    return torch.cat([torch.sin(h), torch.cos(h)], dim=1)


class ResnetBlock(nn.Module):
    """GroupNorm-swish-conv, plus the projected conditioning, GroupNorm-swish-dropout-conv(zero init), skip."""

    def __init__(self, config: ModelConfig, in_ch: int, out_ch: int | None = None):
        super().__init__()
        out_ch = in_ch if out_ch is None else out_ch
        self.pdrop = config.sm_pdrop
        self.GroupNorm_0 = group_norm(config, in_ch)
        self.conv1 = conv3x3(in_ch, out_ch)
        self.cond_proj = dense(4 * config.sm_n_embd, out_ch, bias=False, zero=True)
        self.GroupNorm_1 = group_norm(config, out_ch)
        self.conv2 = conv3x3(out_ch, out_ch, zero=True)
        # A 1x1 projection of the skip when channels change (a Dense on channels in JAX).
        self.nin_shortcut = dense(in_ch, out_ch) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor, cond: torch.Tensor, deterministic: bool) -> torch.Tensor:
        h = self.conv1(F.silu(self.GroupNorm_0(x)))                                  # (B, out, H, W)
        h = h + self.cond_proj(cond)[:, :, None, None]                               # cond: (B, 4E)
        h = F.silu(self.GroupNorm_1(h))
        h = F.dropout(h, self.pdrop, training=not deterministic)
        h = self.conv2(h)
        if self.nin_shortcut is not None and x.device.type == "cpu":
            # On a CPU the Dense on channels as a 1x1 convolution of the same (out, in) weight: oneDNN's AVX-512
            # kernel, where a linear of x.movedim(1, -1) copies x to NHWC, runs MKL's GEMM (AVX2 on AMD CPUs)
            # and leaves a strided result to add to h: 2x less time for the 9 shortcuts of the small config,
            # 10% of its training step.
            x = F.conv2d(x, self.nin_shortcut.weight[:, :, None, None], self.nin_shortcut.bias)
        elif self.nin_shortcut is not None:
            # Elsewhere a matmul (a 1x1 convolution would follow cuDNN's TF32 setting, not the matmul one).
            x = F.linear(x.movedim(1, -1), self.nin_shortcut.weight, self.nin_shortcut.bias).movedim(-1, 1)
        assert x.shape == h.shape
        return x + h


class AttnBlock(nn.Module):
    """Self-attention over all H*W positions; heads are contiguous channel blocks; residual."""

    def __init__(self, config: ModelConfig, channels: int):
        super().__init__()
        self.heads = config.attention_heads
        self.GroupNorm_0 = group_norm(config, channels)
        self.q, self.k, self.v = (dense(channels, channels) for _ in range(3))
        self.proj_out = dense(channels, channels, zero=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.GroupNorm_0(x).flatten(2).transpose(1, 2)                           # (B, HW, C)
        # (B, heads, HW, C/heads) each; softmax in float32 (or float64) even under bf16 autocast.
        acc = torch.promote_types(x.dtype, torch.float32)
        q, k, v = (lin(h).view(B, H * W, self.heads, C // self.heads).transpose(1, 2).to(acc)
                   for lin in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)                                  # scale 1/sqrt(C/heads)
        h = self.proj_out(h.transpose(1, 2).reshape(B, H * W, C).to(x.dtype))
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class ScoreUNet(nn.Module):
    """eps_hat(z_t, gamma_t, conditioning): predicts the noise in z_t. No down/upsampling (as in VDM)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        E, C = config.sm_n_embd, config.image_channels
        self.dense0 = dense(E + 1, 4 * E)
        self.dense1 = dense(4 * E, 4 * E)
        n_fourier = 2 * C * (config.fourier_stop - config.fourier_start) if config.with_fourier_features else 0
        self.conv_in = conv3x3(C + n_fourier, E)
        attn = config.with_attention
        self.down = nn.ModuleDict()
        for i in range(config.sm_n_layer):
            self.down[f"block_{i}"] = ResnetBlock(config, E, E)
            if attn:
                self.down[f"attn_{i}"] = AttnBlock(config, E)
        self.mid = nn.ModuleDict({"block_1": ResnetBlock(config, E), "attn_1": AttnBlock(config, E),
                                  "block_2": ResnetBlock(config, E)})
        self.up = nn.ModuleDict()
        for i in range(config.sm_n_layer + 1):
            self.up[f"block_{i}"] = ResnetBlock(config, 2 * E, E)
            if attn:
                self.up[f"attn_{i}"] = AttnBlock(config, E)
        self.GroupNorm_0 = group_norm(config, E)
        self.conv_out = conv3x3(E, C, zero=True)

    def forward(self, z: torch.Tensor, g_t: torch.Tensor, conditioning: torch.Tensor,
                deterministic: bool = True) -> torch.Tensor:
        """z: (B, C, H, W); g_t: () or (B,) gamma at t; conditioning: (B,). Returns eps_hat (B, C, H, W)."""
        cfg = self.config
        with torch.autocast(z.device.type, dtype=torch.bfloat16, enabled=cfg.compute_dtype == "bfloat16"):
            eps_pred = self._predict(z, g_t, conditioning, deterministic)
        # Base measure: at init (zero conv_out) the model predicts eps_hat = z.
        return (eps_pred + z).to(z.dtype)

    def _predict(self, z, g_t, conditioning, deterministic: bool) -> torch.Tensor:
        """The network's correction to the base measure: eps_hat - z, (B, C, H, W)."""
        cfg = self.config
        B = z.shape[0]
        # t in [0, 1] from gamma through the config's (fixed) range, as the official model does.
        t = ((g_t - cfg.gamma_min) / (cfg.gamma_max - cfg.gamma_min)).to(z.dtype).expand(B)
        cond = torch.cat([timestep_embedding(t, cfg.sm_n_embd), conditioning[:, None].to(t.dtype)], dim=1)
        cond = F.silu(self.dense1(F.silu(self.dense0(cond))))                        # (B, 4E)

        h = z
        if cfg.with_fourier_features:
            h = torch.cat([z, fourier_features(z, cfg.fourier_start, cfg.fourier_stop, cfg.fourier_order)], dim=1)
        h = self.conv_in(h)                                                          # (B, E, H, W)
        hs = [h]
        for i in range(cfg.sm_n_layer):
            h = self.down[f"block_{i}"](hs[-1], cond, deterministic)
            if cfg.with_attention:
                h = self.down[f"attn_{i}"](h)
            hs.append(h)
        h = self.mid["block_1"](hs[-1], cond, deterministic)
        h = self.mid["attn_1"](h)
        h = self.mid["block_2"](h, cond, deterministic)
        for i in range(cfg.sm_n_layer + 1):
            h = self.up[f"block_{i}"](torch.cat([h, hs.pop()], dim=1), cond, deterministic)   # in: (B, 2E, H, W)
            if cfg.with_attention:
                h = self.up[f"attn_{i}"](h)
        assert not hs
        return self.conv_out(F.silu(self.GroupNorm_0(h)))
