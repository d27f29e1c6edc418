"""The noise of evaluation and sampling, drawn framework-free (numpy) so that both backends see the same draws.

Each image has its own generator, seeded by (seed, use, the image's index[, the draw]): the noise an image
gets does not depend on the batch size, on how many images are evaluated with it, on the process count or
on the backend. `vdm_jax` and `vdm_torch` take these arrays in (NHWC numpy; torch permutes to NCHW), so
`bpd` and `sample` of one model give the same numbers in both, to float32 rounding.

Training noise is not drawn here: it is drawn on the device inside the step (JAX keys, torch generators),
where it costs nothing.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from vdm_common.types import Noise

_EVAL, _SAMPLE = 0x6576616C, 0x73616D70          # keep the uses of one seed apart ('eval', 'samp')


def _generator(seed: int, use: int, *index: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed) % 2**64, use, *map(int, index)])))


def eval_noise(seed: int, indices: Sequence[int], draw: int, image_shape, timesteps: int) -> Noise:
    """(t, eps, eps_0) for the images `indices` (B,) of an evaluation, draw number `draw`, float64.

    t (B,) uniform in [0, 1), independent per image (so the per-image values are i.i.d. and their standard
    error is honest), rounded up to k/T when timesteps T > 0; eps, eps_0 (B, H, W, C) standard normal.
    """
    t = np.empty(len(indices))
    eps = np.empty((len(indices), *image_shape))
    eps_0 = np.empty_like(eps)
    for row, index in enumerate(indices):
        rng = _generator(seed, _EVAL, index, draw)
        t[row] = rng.random()
        eps[row] = rng.standard_normal(image_shape)
        eps_0[row] = rng.standard_normal(image_shape)
    if timesteps > 0:
        t = np.ceil(t * timesteps) / timesteps
    return Noise(t=t, eps=eps, eps_0=eps_0)


class SampleNoise:
    """The draws of ancestral sampling for the images `indices`: z_1, then each step's noise, then (for a
    sampled decoder) Gumbel noise; each image from its own generator, in that order, all float64 NHWC."""

    def __init__(self, seed: int, indices: Sequence[int], image_shape):
        self.image_shape = tuple(image_shape)
        self._generators = [_generator(seed, _SAMPLE, index) for index in indices]

    def normal(self) -> np.ndarray:
        """(B, H, W, C): z_1 at the first call, then the noise of one step per call."""
        return np.stack([g.standard_normal(self.image_shape) for g in self._generators])

    def gumbel(self, vocab_size: int) -> np.ndarray:
        """(B, H, W, C, V) standard Gumbel noise for decoding by Gumbel-max (a sample of p(x | z_0))."""
        return np.stack([g.gumbel(size=(*self.image_shape, vocab_size)) for g in self._generators])
