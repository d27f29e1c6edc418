"""Dropout on: each backend against the statistics dropout must have (the two RNGs differ, so the masks
cannot be compared with each other).

A resnet block whose second conv is the identity (centre tap = I, no bias) returns x + dropout(a), with a
the activation before dropout, so each output element is x + a / (1 - p) (kept) or x (dropped): the mask
and the scaling can be read off exactly.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from parity_tests import cases
from vdm_common.weights import neutral_to_torch_layout, unflatten_tree
from vdm_jax import unet as jax_unet
from vdm_torch import unet as torch_unet

P = 0.25
COPIES = 256          # the same example repeated: every copy draws its own mask
CASE = "nnet-T10-c1-v256"
BLOCK = "score_model/down.block_0/"


def _setup():
    cfg = dataclasses.replace(cases.model_config(CASE, "float64"), sm_pdrop=P)
    E = cfg.sm_n_embd
    flat = {k[len(BLOCK):]: v for k, v in cases.weights(CASE, "float64").items() if k.startswith(BLOCK)}
    identity = np.zeros((3, 3, E, E))
    identity[1, 1] = np.eye(E)
    flat["conv2/kernel"], flat["conv2/bias"] = identity, np.zeros(E)
    rs = np.random.RandomState(5)
    x = np.repeat(rs.standard_normal((1, cases.HW, cases.HW, E)), COPIES, axis=0)
    cond = np.repeat(rs.standard_normal((1, 4 * E)), COPIES, axis=0)
    return cfg, flat, x, cond


def _run_jax(cfg, flat, x, cond, deterministic):
    block = jax_unet.ResnetBlock(cfg, out_ch=cfg.sm_n_embd)
    params = jax.tree_util.tree_map(jnp.asarray, unflatten_tree(flat))
    out = block.apply({"params": params}, jnp.asarray(x), jnp.asarray(cond), deterministic,
                      rngs={"dropout": jax.random.PRNGKey(0)})
    return np.asarray(out)


def _run_torch(cfg, flat, x, cond, deterministic):
    block = torch_unet.ResnetBlock(cfg, cfg.sm_n_embd, cfg.sm_n_embd).double()
    block.load_state_dict({k: torch.from_numpy(v) for k, v in neutral_to_torch_layout(flat).items()})
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)
        out = block(torch.from_numpy(np.moveaxis(x, -1, 1).copy()), torch.from_numpy(cond), deterministic)
    return np.moveaxis(out.numpy(), 1, -1)


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_dropout_statistics(backend):
    cfg, flat, x, cond = _setup()
    run = _run_jax if backend == "jax" else _run_torch
    a = run(cfg, flat, x, cond, True) - x                 # dropout off: the activation itself
    d = run(cfg, flat, x, cond, False) - x                # dropout on
    assert np.all(a != 0) and np.all(a == a[:1]), "deterministic=True must not drop anything"
    kept = d != 0
    # Inverted dropout: kept elements scaled by exactly 1 / (1 - p), dropped ones exactly 0.
    np.testing.assert_allclose(d[kept], (a / (1.0 - P))[kept], rtol=1e-12, atol=0)
    # The dropped fraction is p, within 5 binomial standard deviations.
    n = d.size
    frac = 1.0 - kept.mean()
    assert abs(frac - P) < 5 * np.sqrt(P * (1 - P) / n), (backend, frac)
    # Every copy draws its own mask: two copies agree on an element with probability p^2 + (1 - p)^2.
    agree = (kept[1:] == kept[:-1]).mean()
    q = P ** 2 + (1 - P) ** 2
    assert abs(agree - q) < 5 * np.sqrt(q * (1 - q) / kept[1:].size), (backend, agree)
    # Elementwise masks, not one per channel (spatial dropout): no channel map is all kept or all dropped.
    per_map = kept.mean(axis=(1, 2))                      # (copies, channels)
    assert np.all((per_map > 0) & (per_map < 1)), backend
