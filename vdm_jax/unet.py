"""The VDM score UNet in Flax (NHWC), parameter tree identical to the official google-research/vdm one.

Shapes: B batch, H x W image, C image channels, E = model.sm_n_embd channels inside the UNet.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from vdm_common.config import ModelConfig


def dtypes(config: ModelConfig):
    """(param_dtype, compute_dtype or None) of a model config; None lets Flax follow the inputs."""
    param_dtype = jnp.float64 if config.compute_dtype == "float64" else jnp.float32
    compute = jnp.bfloat16 if config.compute_dtype == "bfloat16" else None
    return param_dtype, compute


def group_norm(config: ModelConfig, name: str) -> nn.GroupNorm:
    """The model's GroupNorm: config.norm_groups groups, epsilon config.norm_eps."""
    # Variance E[x^2] - E[x]^2 in one pass over x: the official model's formula (Flax had no other then), 8% of
    # the small CPU training step faster than two passes; torch's two-pass variance agrees to rounding.
    param_dtype, compute = dtypes(config)
    return nn.GroupNorm(num_groups=config.norm_groups, epsilon=config.norm_eps, use_fast_variance=True,
                        dtype=compute, param_dtype=param_dtype, name=name)


def timestep_embedding(t: jax.Array, dim: int) -> jax.Array:
    """Sinusoidal embedding of t in [0, 1] scaled by 1000: (B,) -> (B, dim) = [sin(1000 t w), cos(1000 t w)]."""
    assert t.ndim == 1 and dim % 2 == 0
    half = dim // 2
    freqs = jnp.exp(jnp.arange(half, dtype=t.dtype) * -(math.log(10000.0) / (half - 1)))
    angles = (t * 1000.0)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=1)


def fourier_features(z: jax.Array, start: int, stop: int, order: str) -> jax.Array:
    """Base-2 Fourier features of z: (B, H, W, C) -> (B, H, W, 2 C F), F = stop - start frequencies.

    channel_major (official):   [c0f0, c0f1, ..., c1f0, ...] then sin of all, cos of all.
    frequency_major (torch port): [f0c0, f0c1, ..., f1c0, ...] then sin of all, cos of all.
    """
    n_freq, channels = stop - start, z.shape[-1]
    w = 2.0 ** jnp.arange(start, stop, dtype=z.dtype) * 2 * math.pi                 # (F,)
    if order == "channel_major":
        h = jnp.repeat(z, n_freq, axis=-1) * jnp.tile(w, channels)                 # (B, H, W, C F)
    else:
        h = jnp.tile(z, (1, 1, 1, n_freq)) * jnp.repeat(w, channels)                # (B, H, W, F C)
    return jnp.concatenate([jnp.sin(h), jnp.cos(h)], axis=-1)


def _conv3x3(x, k, precision):
    """3x3 stride-1 'SAME' convolution, (B, H, W, C_in) x (3, 3, C_in, C_out) -> (B, H, W, C_out)."""
    return jax.lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision=precision)


@jax.custom_vjp
def _conv3x3_plain_backward(x, k, precision):
    return _conv3x3(x, k, precision)


def _conv3x3_fwd(x, k, precision):
    return _conv3x3(x, k, precision), (x, k, precision)


def _conv3x3_bwd(residuals, dy):
    x, k, precision = residuals
    dx = _conv3x3(dy, jnp.flip(k, (0, 1)).swapaxes(2, 3), precision)                # (B, H, W, C_in)
    # dk[a, b, i, o] = sum_{n,h,w} x_pad[n, h + a, w + b, i] dy[n, h, w, o]: a convolution with C_in as the batch
    # and B as the input features, (C_in, 3, 3, C_out) -> (3, 3, C_in, C_out).
    dk = _conv3x3(x.transpose(3, 1, 2, 0), dy.transpose(1, 2, 0, 3), precision).transpose(1, 2, 0, 3)
    return dx, dk, None


_conv3x3_plain_backward.defvjp(_conv3x3_fwd, _conv3x3_bwd)


def _cpu_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
              feature_group_count=1, precision=None, **unused):
    """nn.Conv's 3x3 convolution with its two backward convolutions written as plain NHWC x HWIO ones.

    XLA:CPU rewrites autodiff's transposed convolutions into that form (for its fast kernels) only outside
    loops: inside the substep scan they ran as naive loops, 30-50x slower (quickstart: 2.9 s a step against
    0.08 s), and an unrolled scan compiles the step S times over. The same function; the same gradients to
    rounding (the parity suite holds them to the torch ones)."""
    assert tuple(window_strides) == (1, 1) and rhs.shape[:2] == (3, 3) and feature_group_count == 1, rhs.shape
    assert padding in ("SAME", ((1, 1), (1, 1)), [(1, 1), (1, 1)]), padding
    assert all(d in (None, 1, (1, 1)) for d in (lhs_dilation, rhs_dilation))
    return _conv3x3_plain_backward(lhs, rhs, precision)


def conv3x3(features: int, name: str, dtype, param_dtype, zero: bool = False) -> nn.Conv:
    """The model's 3x3 'SAME' convolution: a LeCun-normal kernel, or zeros (zero=True); bias zero.
    JAX: on the CPU backend with the backward of _cpu_conv."""
    init = dict(kernel_init=nn.initializers.zeros) if zero else {}
    return nn.Conv(features, (3, 3), dtype=dtype, param_dtype=param_dtype, name=name, **init,
                   conv_general_dilated=_cpu_conv if jax.default_backend() == "cpu" else None)


class ResnetBlock(nn.Module):
    """GroupNorm-swish-conv, plus the projected conditioning, GroupNorm-swish-dropout-conv(zero init), skip."""

    config: ModelConfig
    out_ch: int | None = None

    @nn.compact
    def __call__(self, x, cond, deterministic: bool):
        cfg = self.config
        param_dtype, compute = dtypes(cfg)
        B, _, _, C = x.shape                                                         # (B, H, W, C_in)
        out_ch = C if self.out_ch is None else self.out_ch
        h = nn.swish(group_norm(cfg, "GroupNorm_0")(x))
        h = conv3x3(out_ch, "conv1", compute, param_dtype)(h)
        assert cond.shape[0] == B and cond.ndim == 2                                 # (B, 4E)
        h = h + nn.Dense(out_ch, use_bias=False, kernel_init=nn.initializers.zeros, dtype=compute,
                         param_dtype=param_dtype, name="cond_proj")(cond)[:, None, None, :]
        h = nn.swish(group_norm(cfg, "GroupNorm_1")(h))
        h = nn.Dropout(rate=cfg.sm_pdrop)(h, deterministic=deterministic)
        h = conv3x3(out_ch, "conv2", compute, param_dtype, zero=True)(h)
        if C != out_ch:
            x = nn.Dense(out_ch, dtype=compute, param_dtype=param_dtype, name="nin_shortcut")(x)
        assert x.shape == h.shape
        return x + h                                                                 # (B, H, W, out_ch)


class AttnBlock(nn.Module):
    """Self-attention over all H*W positions; heads are contiguous channel blocks; residual."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        param_dtype, compute = dtypes(cfg)
        B, H, W, C = x.shape
        heads = cfg.attention_heads
        dense = dict(dtype=compute, param_dtype=param_dtype)
        h = group_norm(cfg, "GroupNorm_0")(x)
        # (B, H*W, heads, C/heads) each
        q, k, v = (nn.Dense(C, name=n, **dense)(h).reshape(B, H * W, heads, C // heads) for n in "qkv")
        # Logits and softmax in float32 (or float64) even under bf16 compute.
        acc = jnp.promote_types(x.dtype, jnp.float32)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(acc), k.astype(acc)) / math.sqrt(C // heads)
        weights = jax.nn.softmax(logits, axis=-1)                                    # (B, heads, HW, HW)
        h = jnp.einsum("bhqk,bkhd->bqhd", weights, v.astype(acc)).reshape(B, H, W, C)
        h = nn.Dense(C, kernel_init=nn.initializers.zeros, name="proj_out", **dense)(h)
        return x + h


class ScoreUNet(nn.Module):
    """eps_hat(z_t, gamma_t, conditioning): predicts the noise in z_t. No down/upsampling (as in VDM)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, z, g_t, conditioning, deterministic: bool = True):
        """z: (B, H, W, C); g_t: () or (B,) gamma at t; conditioning: (B,). Returns eps_hat (B, H, W, C)."""
        cfg = self.config
        param_dtype, compute = dtypes(cfg)
        n_embd = cfg.sm_n_embd
        B = z.shape[0]
        # t in [0, 1] from gamma through the config's (fixed) range, as the official model does.
        t = (g_t - cfg.gamma_min) / (cfg.gamma_max - cfg.gamma_min)
        t = jnp.broadcast_to(jnp.asarray(t, z.dtype), (B,))
        cond = jnp.concatenate([timestep_embedding(t, n_embd), conditioning[:, None].astype(t.dtype)], axis=1)
        dense = dict(dtype=compute, param_dtype=param_dtype)
        cond = nn.swish(nn.Dense(n_embd * 4, name="dense0", **dense)(cond))          # (B, 4E)
        cond = nn.swish(nn.Dense(n_embd * 4, name="dense1", **dense)(cond))

        h = z
        if cfg.with_fourier_features:
            h = jnp.concatenate([z, fourier_features(z, cfg.fourier_start, cfg.fourier_stop, cfg.fourier_order)],
                                axis=-1)                                             # (B, H, W, C + 2CF)
        h = conv3x3(n_embd, "conv_in", compute, param_dtype)(h)                      # (B, H, W, E)
        hs = [h]
        for i in range(cfg.sm_n_layer):
            h = ResnetBlock(cfg, out_ch=n_embd, name=f"down.block_{i}")(hs[-1], cond, deterministic)
            if cfg.with_attention:
                h = AttnBlock(cfg, name=f"down.attn_{i}")(h)
            hs.append(h)
        h = ResnetBlock(cfg, name="mid.block_1")(hs[-1], cond, deterministic)
        h = AttnBlock(cfg, name="mid.attn_1")(h)
        h = ResnetBlock(cfg, name="mid.block_2")(h, cond, deterministic)
        for i in range(cfg.sm_n_layer + 1):
            h = jnp.concatenate([h, hs.pop()], axis=-1)                              # (B, H, W, 2E)
            h = ResnetBlock(cfg, out_ch=n_embd, name=f"up.block_{i}")(h, cond, deterministic)
            if cfg.with_attention:
                h = AttnBlock(cfg, name=f"up.attn_{i}")(h)
        assert not hs
        h = nn.swish(group_norm(cfg, "GroupNorm_0")(h))
        eps_pred = conv3x3(z.shape[-1], "conv_out", compute, param_dtype, zero=True)(h)
        # Base measure: at init (zero conv_out) the model predicts eps_hat = z.
        return (eps_pred + z).astype(z.dtype)
