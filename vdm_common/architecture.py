"""The score UNet's shape, described once (framework-free): parameter shapes, FLOPs, activation estimate.

`unet_blocks` lists the UNet's blocks in forward order (name, kind, in / out channels, positions), the
structure vdm_jax/unet.py and vdm_torch/unet.py build; `layers` expands a block into the pieces that hold
parameters or do matmul work. `model_param_shapes` and `unet_forward_flops` sum over those layers,
`unet_activation_elements` over a per-block count of what backward keeps.

FLOPs: every convolution, dense layer and attention matmul, as 2 FLOPs per multiply-add. Not counted:
normalisation, activations, the decoder, the optimizer and other element-wise work, which are a few percent
of the total for the configs of interest. A training step is counted as forward plus a backward of twice
the forward (gradients with respect to both inputs and weights of every layer).
"""
from __future__ import annotations

import dataclasses
from typing import Any

from vdm_common.config import ModelConfig

NNET_FEATURES = 1024        # width of the learnable_nnet schedule (vdm_jax / vdm_torch .schedules)
_NNET = {"l1/kernel": (1, 1), "l1/bias": (1,), "l2/kernel": (1, NNET_FEATURES), "l2/bias": (NNET_FEATURES,),
         "l3/kernel": (NNET_FEATURES, 1)}
SCHEDULE_PARAM_SHAPES = {   # gamma_type: {name under gamma/: shape}
    "fixed": {},
    "learnable_scalar": {"w": (1,), "b": (1,)},
    "learnable_nnet": _NNET,
    "learnable_nnet_endpoints": {"gamma_0": (1,), "gamma_1": (1,), **{f"f/{k}": s for k, s in _NNET.items()}},
}


@dataclasses.dataclass(frozen=True)
class Block:
    """A block of the score UNet, its parameters under score_model/{name}.

    kind: 'dense' (the conditioning MLP), 'conv' (3x3, SAME), 'resnet', 'attention' or 'norm' (the final
    GroupNorm + swish). pixels: the positions it runs on, H*W, or 1 for the conditioning vector. c_cond:
    the width of the conditioning vector a resnet block projects; heads: an attention block's heads.
    """

    name: str
    kind: str
    c_in: int
    c_out: int
    pixels: int
    c_cond: int = 0
    heads: int = 0


@dataclasses.dataclass(frozen=True)
class Layer:
    """A piece of a block: kind 'conv3', 'dense', 'norm' or 'attend' (the QK^T and AV matmuls, no
    parameters), applied at `positions` positions; `name` is its full neutral prefix."""

    name: str
    kind: str
    c_in: int
    c_out: int
    positions: int
    bias: bool = True


def unet_blocks(config: ModelConfig, image_shape: tuple[int, ...] = (1, 1)) -> list[Block]:
    """The score UNet's blocks in forward order. image_shape: (H, W) or (H, W, C), the channels being
    those of the model; only H*W matters (the default serves what does not depend on it: the shapes)."""
    E, C, n = config.sm_n_embd, config.image_channels, config.sm_n_layer
    P = image_shape[0] * image_shape[1]
    n_freq = config.fourier_stop - config.fourier_start
    c_in = C * (1 + 2 * n_freq) if config.with_fourier_features else C             # z and its Fourier features

    def resnet(name, cin):
        return Block(name, "resnet", cin, E, P, c_cond=4 * E)

    def attention(name):
        return Block(name, "attention", E, E, P, heads=config.attention_heads)

    blocks = [Block("dense0", "dense", E + 1, 4 * E, 1), Block("dense1", "dense", 4 * E, 4 * E, 1),
              Block("conv_in", "conv", c_in, E, P)]
    for i in range(n):
        blocks.append(resnet(f"down.block_{i}", E))
        if config.with_attention:
            blocks.append(attention(f"down.attn_{i}"))
    blocks += [resnet("mid.block_1", E), attention("mid.attn_1"), resnet("mid.block_2", E)]
    for i in range(n + 1):
        blocks.append(resnet(f"up.block_{i}", 2 * E))                                # concat(h, skip): 2E
        if config.with_attention:
            blocks.append(attention(f"up.attn_{i}"))
    return blocks + [Block("GroupNorm_0", "norm", E, E, P), Block("conv_out", "conv", E, C, P)]


def layers(block: Block) -> list[Layer]:
    """The layers of a block, in the order the models register their parameters."""
    b, P = block, block.pixels
    at = lambda name: f"score_model/{b.name}/{name}"                                 # noqa: E731
    if b.kind in ("dense", "conv", "norm"):
        return [Layer(f"score_model/{b.name}", {"conv": "conv3"}.get(b.kind, b.kind), b.c_in, b.c_out, P)]
    if b.kind == "resnet":
        out = [Layer(at("GroupNorm_0"), "norm", b.c_in, b.c_in, P), Layer(at("conv1"), "conv3", b.c_in, b.c_out, P),
               Layer(at("cond_proj"), "dense", b.c_cond, b.c_out, 1, bias=False),      # on the (4E,) vector
               Layer(at("GroupNorm_1"), "norm", b.c_out, b.c_out, P),
               Layer(at("conv2"), "conv3", b.c_out, b.c_out, P)]
        return out + ([Layer(at("nin_shortcut"), "dense", b.c_in, b.c_out, P)] if b.c_in != b.c_out else [])
    if b.kind == "attention":
        c = b.c_in
        return ([Layer(at("GroupNorm_0"), "norm", c, c, P)] + [Layer(at(q), "dense", c, c, P) for q in "qkv"]
                + [Layer(at("attend"), "attend", c, c, P), Layer(at("proj_out"), "dense", c, c, P)])
    raise ValueError(f"unknown block kind {b.kind!r}")


def layer_param_shapes(layer: Layer) -> dict[str, tuple[int, ...]]:
    """{neutral name: shape} of a layer's parameters (JAX layouts: HWIO convs, (in, out) dense)."""
    bias = {f"{layer.name}/bias": (layer.c_out,)} if layer.bias else {}
    if layer.kind == "conv3":
        return {f"{layer.name}/kernel": (3, 3, layer.c_in, layer.c_out), **bias}
    if layer.kind == "dense":
        return {f"{layer.name}/kernel": (layer.c_in, layer.c_out), **bias}
    if layer.kind == "norm":
        return {f"{layer.name}/scale": (layer.c_out,), f"{layer.name}/bias": (layer.c_out,)}
    return {}


def layer_flops(layer: Layer) -> int:
    """FLOPs of a layer for one example: 2 per multiply-add of its convolutions and matmuls."""
    P = layer.positions
    if layer.kind == "conv3":
        return 2 * P * 9 * layer.c_in * layer.c_out
    if layer.kind == "dense":
        return 2 * P * layer.c_in * layer.c_out
    if layer.kind == "attend":
        return 2 * (2 * P * P * layer.c_in)                                          # QK^T and AV
    return 0


def block_activation_elements(block: Block) -> int:
    """The elements a block keeps for backward, per example (an estimate; see unet_activation_elements)."""
    b = block
    if b.kind == "conv":
        per_pixel = b.c_in                               # its input, for the weight gradient
    elif b.kind == "norm":
        per_pixel = b.c_out                              # the GroupNorm output (its swish is conv_out's input)
    elif b.kind == "resnet":                             # input, GroupNorm, swish on c_in; conv1, GroupNorm,
        per_pixel = 3 * b.c_in + 4 * b.c_out + (b.c_out if b.c_in != b.c_out else 0)   # swish, conv2; shortcut
    elif b.kind == "attention":                          # input, GroupNorm, q, k, v, output; softmax weights
        per_pixel = 6 * b.c_in + b.heads * b.pixels
    else:
        per_pixel = 0                                    # the conditioning MLP: left out
    return b.pixels * per_pixel


def model_param_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """{neutral name: shape} of every parameter of our model (the official tree), from the config alone."""
    shapes = {f"gamma/{k}": s for k, s in SCHEDULE_PARAM_SHAPES[config.gamma_type].items()}
    for block in unet_blocks(config):
        for layer in layers(block):
            shapes.update(layer_param_shapes(layer))
    return shapes


def unet_forward_flops(config: ModelConfig, image_shape) -> int:
    """FLOPs of one score-UNet forward pass for one image of shape (H, W, C)."""
    return sum(layer_flops(layer) for block in unet_blocks(config, image_shape) for layer in layers(block))


def train_step_flops(config: ModelConfig, image_shape, batch_size: int) -> int:
    """FLOPs of one training step on a batch: 3x the forward (forward + backward)."""
    return 3 * batch_size * unet_forward_flops(config, image_shape)


def sample_step_flops(config: ModelConfig, image_shape, batch_size: int) -> int:
    """FLOPs of one ancestral sampling step on a batch: one forward pass."""
    return batch_size * unet_forward_flops(config, image_shape)


def unet_activation_elements(model: Any, image_shape: tuple[int, ...]) -> int:
    """An estimate of the activation elements one example keeps for backward in the score UNet.

    `model`: a ModelConfig, or a config.model ConfigDict / dict; `image_shape`: (H, W) or (H, W, C), the
    channels being those of the model. With P = H*W pixels, E = sm_n_embd, C_in = C (1 + 2F) with F Fourier
    frequencies (C without Fourier features), it counts per pixel:
      C_in                      the UNet input (kept for conv_in's weight gradient)
      3 c + 4 E (+ E)           each resnet block on c input channels: input, GroupNorm and swish on c;
                                conv1, GroupNorm, swish, conv2 on E; the 1x1 shortcut when c != E
                                (down and mid blocks: c = E; up blocks: c = 2E, the concatenated skip)
      6 E + heads * P           each attention block: input, GroupNorm, q, k, v, attention output, and
                                the (P x P) softmax weights per head
      2 E                       the final GroupNorm and swish
    Dropout masks, the time embedding and the loss are left out. An estimate, not a measurement.
    """
    mc = model if isinstance(model, ModelConfig) else ModelConfig.from_config(model)
    return sum(block_activation_elements(block) for block in unet_blocks(mc, image_shape))
