"""Deliberate bugs, each applied to the torch side only, that the parity comparisons must catch.

Each mutation is a context manager that patches one thing in vdm_torch (or in the conversion into it) and
restores it on exit; `MUTATIONS` names the comparison that must fail under it and the quantities expected
to report the failure. The bugs are the classic ways two implementations of one model drift apart: a
GroupNorm epsilon, a kernel layout, an attention scale, a feature order, the weight-decay mask, the
clipping formula, an LR schedule off by one step, an EMA kept in lower precision, a custom gradient
that changes the gradient but not the loss, and torch.abs's derivative at 0 in the schedules.
"""
from __future__ import annotations

import contextlib
import dataclasses
import types
from typing import Callable, ContextManager

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from parity_tests import measure
from vdm_common.weights import jax_key_to_torch
from vdm_torch import convert as torch_convert
from vdm_torch import schedules as torch_schedules
from vdm_torch import steps as torch_steps
from vdm_torch import unet as torch_unet
from vdm_torch import vdm as torch_vdm


@contextlib.contextmanager
def patched(owner, name: str, value):
    """owner.name = value for the duration of the block."""
    old = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, old)


def groupnorm_eps_1e5():
    """torch GroupNorm with PyTorch's default epsilon 1e-5 instead of the configured 1e-6."""
    return patched(torch_unet, "group_norm", lambda config, channels: nn.GroupNorm(config.norm_groups, channels,
                                                                                   eps=1e-5))


def _layout_bug(key: str, bug: Callable[[np.ndarray], np.ndarray]):
    """The conversion into torch mishandles one tensor (the model is right; its weight is wrong)."""
    original = torch_convert.neutral_to_torch_layout

    def convert(flat):
        out = original(flat)
        name = jax_key_to_torch(key, np.ndim(flat[key]))[0] if key in flat else None
        if name in out:
            out[name] = np.ascontiguousarray(bug(out[name]))
        return out
    return patched(torch_convert, "neutral_to_torch_layout", convert)


def conv_kernel_hw_swapped():
    """conv_in's kernel converted with H and W exchanged (OIHW -> OIWH): the shapes still match (3x3)."""
    return _layout_bug("score_model/conv_in/kernel", lambda w: w.transpose(0, 1, 3, 2))


def dense_kernel_not_transposed():
    """An attention q kernel (square, E x E) copied without the (in, out) -> (out, in) transpose: strict
    shape checks cannot see it."""
    return _layout_bug("score_model/mid.attn_1/q/kernel", lambda w: w.T)


def attention_scale_1_over_d():
    """Attention logits scaled by 1/d instead of 1/sqrt(d)."""
    def sdpa(q, k, v, *args, **kwargs):
        return F.scaled_dot_product_attention(q, k, v, *args, scale=1.0 / q.shape[-1], **kwargs)
    proxy = types.SimpleNamespace(**{n: getattr(F, n) for n in dir(F) if not n.startswith("__")})
    proxy.scaled_dot_product_attention = sdpa
    return patched(torch_unet, "F", proxy)


def fourier_order_swapped():
    """Fourier features always in the other order (channel-major vs frequency-major), as in the port."""
    original = torch_unet.fourier_features

    def features(z, start, stop, order):
        other = "frequency_major" if order == "channel_major" else "channel_major"
        return original(z, start, stop, other)
    return patched(torch_unet, "fourier_features", features)


def no_decay_mask():
    """AdamW weight decay on every parameter, biases included (the torch port's recipe)."""
    return patched(torch_steps, "decay_mask", lambda model: {n: True for n, _ in model.named_parameters()})


def torch_clip_formula():
    """torch.nn.utils.clip_grad_norm_ instead of optax's formula: it scales by max_norm / (norm + 1e-6)."""
    def clip(params, max_norm):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    return patched(torch_steps, "clip_by_global_norm_", clip)


def warmup_off_by_one():
    """The LR of update k computed for k + 1 (a schedule read after incrementing the step)."""
    original = torch_steps.learning_rate
    return patched(torch_steps, "learning_rate", lambda opt: (lambda count: original(opt)(count + 1)))


def ema_in_float32():
    """The EMA update computed in float32 (an EMA buffer kept in lower precision than the model)."""
    @torch.no_grad()
    def update(ema, model, rate):
        for e, p in zip(ema.parameters(), model.parameters()):
            e.copy_((e.float() + (1.0 - rate) * (p.float() - e.float())).to(e.dtype))
    return patched(torch_steps, "update_ema_", update)


def variance_weight_in_nats():
    """The variance-minimising gradient weight 2 L_i in nats instead of bits/dim: the loss is unchanged,
    only the gradient of the schedule's shape network differs (outputs agree, gradients must not)."""
    return patched(torch_vdm, "nats_to_bpd_scale", lambda image_shape: 1.0)


def torch_abs_in_schedules():
    """The schedules' |w| through torch.abs, whose derivative at w = 0 is 0 (JAX's is 1): the same values,
    so only the gradient of a weight that is exactly 0 differs."""
    return patched(torch_schedules, "weight_abs", torch.abs)


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str
    apply: Callable[[], ContextManager]
    measure: Callable                  # measure.measure_* taking (case, dtype)
    case: str
    catches: tuple[str, ...]           # quantities that must report it (at least one of them)
    only: bool = False                 # the failing quantities must be exactly `catches`


MUTATIONS = (
    Mutation("groupnorm_eps_1e-5", groupnorm_eps_1e5, measure.measure_model, "scalar-cont-c1-v17",
             ("unet_output", "loss_diff", "grad_bpd")),
    Mutation("conv_kernel_hw_swapped", conv_kernel_hw_swapped, measure.measure_model, "scalar-cont-c1-v17",
             ("unet_output", "grad_bpd")),
    Mutation("dense_kernel_not_transposed", dense_kernel_not_transposed, measure.measure_model,
             "nnet-cont-attn2-c3-v256", ("unet_output", "grad_bpd")),
    Mutation("attention_scale_1/d", attention_scale_1_over_d, measure.measure_model, "nnet-cont-attn2-c3-v256",
             ("unet_output", "grad_bpd")),
    Mutation("fourier_order_swapped", fourier_order_swapped, measure.measure_model, "fixed-T10-attn-c3-v17",
             ("unet_output", "grad_bpd")),
    Mutation("variance_weight_in_nats", variance_weight_in_nats, measure.measure_model,
             "endpoints-vm-cont-attn2-c3-v17", ("grad_bpd",), only=True),
    Mutation("torch_abs_in_schedules", torch_abs_in_schedules, measure.measure_model,
             "nnet-cont-attn2-c3-v256-zeros", ("grad_bpd",), only=True),
    Mutation("no_weight_decay_mask", no_decay_mask, measure.measure_training, "scalar-cont-c1-v17",
             ("train_params",)),
    Mutation("torch_clip_formula", torch_clip_formula, measure.measure_training, "scalar-cont-c1-v17",
             ("train_mu", "train_params")),
    Mutation("warmup_off_by_one", warmup_off_by_one, measure.measure_training, "scalar-cont-c1-v17",
             ("train_params",)),
    Mutation("ema_in_float32", ema_in_float32, measure.measure_training, "scalar-cont-c1-v17", ("train_ema",)),
)


def run(mutation: Mutation, dtype: str = "float64") -> list:
    """The mutation's comparison with the mutation applied (its measurements; some must fail)."""
    with mutation.apply():
        return mutation.measure(mutation.case, dtype)

