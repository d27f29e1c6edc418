"""Framework-neutral containers and unit conversions used by both backends.

They hold jax arrays in `vdm_jax` and torch tensors in `vdm_torch`; both are NamedTuples, so they are
JAX pytrees and can be passed through `jax.jit` unchanged.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence


class Noise(NamedTuple):
    """Every random draw of one loss evaluation.

    t:     (B,) diffusion times in [0, 1] (already rounded up to k/T in discrete time)
    eps:   image-shaped standard normal noise of z_t
    eps_0: image-shaped standard normal noise of z_0 (reconstruction term)
    """

    t: Any
    eps: Any
    eps_0: Any


class LossTerms(NamedTuple):
    """The three terms of the VLB per example, in nats, each of shape (B,). Their sum is -ELBO."""

    recon: Any   # -log p(x | z_0)
    klz: Any     # KL(q(z_1 | x) || N(0, I))
    diff: Any    # diffusion loss (continuous or discrete time)


def bits_per_dim(terms: LossTerms, image_shape: Sequence[int]) -> dict:
    """Batch means of the loss terms in bits per dimension: {'bpd', 'bpd_recon', 'bpd_latent', 'bpd_diff'}.

    image_shape: the shape of one image, (H, W, C) or (C, H, W); only its size matters.
    Works on jax arrays and torch tensors alike (it only uses `.mean()`).
    """
    scale = 1.0 / (math.prod(image_shape) * math.log(2.0))
    recon = terms.recon.mean() * scale
    latent = terms.klz.mean() * scale
    diff = terms.diff.mean() * scale
    return {"bpd": recon + latent + diff, "bpd_recon": recon, "bpd_latent": latent, "bpd_diff": diff}


def nats_to_bpd_scale(image_shape: Sequence[int]) -> float:
    """The factor that turns a per-example loss in nats into bits per dimension."""
    return 1.0 / (math.prod(image_shape) * math.log(2.0))
