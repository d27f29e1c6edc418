"""Analytic FLOP count of the VDM score UNet and of one training step (framework-free).

Counted: every convolution, dense layer and attention matmul, as 2 FLOPs per multiply-add. Not
counted: normalisation, activations, the decoder, the optimizer and other element-wise work, which are
a few percent of the total for the configs of interest. A training step is counted as forward plus a
backward of twice the forward (gradients with respect to both inputs and weights of every layer).
"""
from __future__ import annotations

from vdm_common.config import ModelConfig


def unet_forward_flops(config: ModelConfig, image_shape) -> int:
    """FLOPs of one score-UNet forward pass for one image of shape (H, W, C)."""
    H, W, C = image_shape
    E, P = config.sm_n_embd, H * W
    conv3 = lambda cin, cout: 2 * P * 9 * cin * cout                       # noqa: E731  3x3 conv, SAME
    dense = lambda cin, cout: 2 * P * cin * cout                           # noqa: E731  per-pixel Dense

    def resnet(cin: int, cout: int) -> int:
        flops = conv3(cin, cout) + conv3(cout, cout) + 2 * (4 * E) * cout   # + cond_proj on the (4E,) vector
        return flops + (dense(cin, cout) if cin != cout else 0)            # nin_shortcut

    def attention(ch: int) -> int:
        return 4 * dense(ch, ch) + 2 * (2 * P * P * ch)                    # q, k, v, proj_out; QK^T and AV

    n_fourier = 2 * C * (config.fourier_stop - config.fourier_start) if config.with_fourier_features else 0
    flops = 2 * (E + 1) * 4 * E + 2 * 4 * E * 4 * E                       # the conditioning MLP
    flops += conv3(C + n_fourier, E) + conv3(E, C)                         # conv_in, conv_out
    flops += config.sm_n_layer * resnet(E, E) + (config.sm_n_layer + 1) * resnet(2 * E, E)
    flops += 2 * resnet(E, E) + attention(E)                               # middle
    if config.with_attention:
        flops += (2 * config.sm_n_layer + 1) * attention(E)
    return flops


def train_step_flops(config: ModelConfig, image_shape, batch_size: int) -> int:
    """FLOPs of one training step on a batch: 3x the forward (forward + backward)."""
    return 3 * batch_size * unet_forward_flops(config, image_shape)


def sample_step_flops(config: ModelConfig, image_shape, batch_size: int) -> int:
    """FLOPs of one ancestral sampling step on a batch: one forward pass."""
    return batch_size * unet_forward_flops(config, image_shape)
