"""Input checks at the model boundary, shared by both backends (numpy only).

The backends call these with concrete arrays (outside jit / before a training step); inside compiled
code only the static shape and dtype checks run.
"""
from __future__ import annotations

import numpy as np

from vdm_common.errors import UserError


class InputError(UserError, ValueError):
    """Images or conditioning the model cannot use; the message says what is wrong and the fix."""


def check_image_shape(shape, dtype_is_integer: bool, dtype_name: str, channels: int, channel_axis: int,
                      layout: str) -> None:
    """Static checks: rank 4, integer dtype, the configured channel count on `channel_axis`."""
    if len(shape) != 4:
        raise InputError(f"images must be a 4-D {layout} batch, got shape {tuple(shape)}")
    if not dtype_is_integer:
        raise InputError(f"images must hold integers in [0, vocab_size) (e.g. uint8), got dtype {dtype_name}; "
                         f"pass the raw pixel values, not floats in [-1, 1]")
    if shape[channel_axis] != channels:
        raise InputError(f"images of shape {tuple(shape)} ({layout}) have {shape[channel_axis]} channels on axis "
                         f"{channel_axis}, but model.image_channels is {channels}; check the layout "
                         f"({layout}) or set model.image_channels")


def check_image_values(images: np.ndarray, vocab_size: int) -> None:
    """Value check on a concrete batch: every pixel in [0, vocab_size)."""
    lo, hi = int(images.min()), int(images.max())
    if lo < 0 or hi >= vocab_size:
        raise InputError(f"image values span [{lo}, {hi}] but must lie in [0, {vocab_size}) "
                         f"(model.vocab_size = {vocab_size}); rescale the data or set model.vocab_size")


def check_conditioning_shape(shape, batch: int) -> None:
    """Conditioning must be one scalar per example, shape (B,)."""
    if tuple(shape) != (batch,):
        raise InputError(f"conditioning must have shape ({batch},), one scalar per image, got {tuple(shape)}")


def check_conditioning_values(conditioning: np.ndarray) -> None:
    """Value check on concrete conditioning: every entry finite."""
    if not np.all(np.isfinite(conditioning)):
        raise InputError("conditioning holds non-finite values (nan or inf); pass finite scalars "
                         "(0 for plain images, 1 for augmented ones)")
