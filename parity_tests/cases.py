"""The configurations, weights and inputs of the parity suite (numpy only, shared by both backends).

The grid covers every axis that changes the computed function with a few tiny models instead of the full
product (8x8 images, 16 channels, one resnet level; each compiles in seconds):

    case                            schedule                  time  attention  Fourier      C  vocab
    scalar-cont-c1-v17              learnable_scalar          cont  off        channel-maj  1  17
    nnet-cont-attn2-c3-v256         learnable_nnet            cont  2 heads    off          3  256
    fixed-T10-attn-c3-v17           fixed                     T=10  1 head     freq-maj     3  17
    nnet-T10-c1-v256                learnable_nnet            T=10  off        channel-maj  1  256
    endpoints-vm-cont-attn2-c3-v17  learnable_nnet_endpoints  cont  2 heads    channel-maj  3  17
                                    + variance_minimisation

so each schedule, continuous and discrete time, attention on / off (1 and 2 heads), Fourier features on /
off (both orders), 1 / 3 channels and vocab 256 / 17 appear at least once, learnable_nnet (a time
derivative through a network) in both times, and the variance-minimising loss (a custom VJP on each side,
whose gradients could disagree where the outputs agree). Every case runs in float64 and float32.
nnet-T10-c1-v256 configures dropout 0.1 and runs with dropout off (deterministic=True), which must equal
the dropout-free function in both backends; dropout on is tested per backend (test_dropout.py).

Weights: a seeded torch init taken to the neutral form, then every tensor perturbed by 0.05 N(0, 1) (in
float64, then cast), so that the zero-initialised output convolutions, conditioning projections and
attention outputs are active and every parameter influences the output: a bug in any of them shows.

ZERO_CASES (model comparison only): grid configs whose schedule weights hold exact zeros, where |w| has no
derivative and each framework picks one (JAX: d|w|/dw = 1 at 0; torch.abs: 0; issue 16). One per place
the schedules take |.|: the scalar w, the monotone network's kernels, the endpoints' |gamma_1 - gamma_0|,
and the shape network under the variance-minimising gradient.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import ml_collections
import numpy as np

from vdm_common.config import ModelConfig, make_config
from vdm_common.types import Noise

DTYPES = ("float64", "float32")
BATCH = 4
HW = 8
SAMPLE_STEPS = 50          # T of the ancestral sampling comparison
TRAIN_STEPS = 20           # optimizer steps of the training-trajectory comparison
CONTINUE_AT = 5            # continued training: convert the state after this many steps ...
CONTINUE_STEPS = 10        # ... and train this many more in the other backend
PERTURBATION = 0.05        # std of the noise added to every initial tensor
FOURIER_SAMPLING_SCALE = 0.003   # see sampling_weights

_BASE = dict(sm_n_embd=16, sm_n_layer=1, norm_groups=4, sm_pdrop=0.0, attention_heads=1)

CASES: dict[str, dict] = {
    "scalar-cont-c1-v17": dict(gamma_type="learnable_scalar", sm_n_timesteps=0, with_attention=False,
                               with_fourier_features=True, image_channels=1, vocab_size=17,
                               gamma_min=-8.0, gamma_max=6.0),
    "nnet-cont-attn2-c3-v256": dict(gamma_type="learnable_nnet", sm_n_timesteps=0, with_attention=True,
                                    attention_heads=2, with_fourier_features=False, image_channels=3,
                                    vocab_size=256),
    "fixed-T10-attn-c3-v17": dict(gamma_type="fixed", sm_n_timesteps=10, with_attention=True,
                                  with_fourier_features=True, fourier_order="frequency_major", image_channels=3,
                                  vocab_size=17, gamma_min=-8.0, gamma_max=6.0),
    "nnet-T10-c1-v256": dict(gamma_type="learnable_nnet", sm_n_timesteps=10, with_attention=False,
                             with_fourier_features=True, image_channels=1, vocab_size=256, sm_pdrop=0.1),
    "endpoints-vm-cont-attn2-c3-v17": dict(gamma_type="learnable_nnet_endpoints", variance_minimisation=True,
                                           sm_n_timesteps=0, with_attention=True, attention_heads=2,
                                           with_fourier_features=True, image_channels=3, vocab_size=17,
                                           gamma_min=-8.0, gamma_max=6.0),
}



def _zeros(entries: dict[str, slice]):
    """A weight edit setting `flat[key].flat[entries]` to exactly 0 for each key."""
    def edit(flat):
        for key, where in entries.items():
            flat[key] = flat[key].copy()
            flat[key].flat[where] = 0.0
    return edit


def _equal_endpoints(flat):
    """gamma_1 = gamma_0: |gamma_1 - gamma_0| at 0 (a degenerate, constant schedule; its gradient is not)."""
    flat["gamma/gamma_1"] = flat["gamma/gamma_0"].copy()


_ENDPOINTS = dict(CASES["endpoints-vm-cont-attn2-c3-v17"], variance_minimisation=False)

# case -> (config, in-place edit of the perturbed float64 weights). The zeros sit where their gradient is
# not multiplied away: every third entry of the monotone kernels (the rest keep the schedule increasing),
# or all of the scalar w / of the endpoints' gap (gamma is then constant in t, its gradient is not). With
# gamma_1 = gamma_0 the shape network's gradient is exactly 0 on both sides, so its zeros get their own
# case, under the variance-minimising gradient.
ZERO_CASES: dict[str, tuple[dict, Callable[[dict], None]]] = {
    "scalar-cont-c1-v17-w0": (CASES["scalar-cont-c1-v17"], _zeros({"gamma/w": slice(None)})),
    "nnet-cont-attn2-c3-v256-zeros": (CASES["nnet-cont-attn2-c3-v256"], _zeros(
        {"gamma/l2/kernel": slice(0, None, 3), "gamma/l3/kernel": slice(1, None, 3)})),
    "endpoints-cont-attn2-c3-v17-equal": (_ENDPOINTS, _equal_endpoints),
    "endpoints-vm-cont-attn2-c3-v17-zeros": (CASES["endpoints-vm-cont-attn2-c3-v17"], _zeros(
        {"gamma/f/l2/kernel": slice(0, None, 3), "gamma/f/l3/kernel": slice(1, None, 3)})),
}
MODEL_CASES = (*CASES, *ZERO_CASES)   # the model comparison (forward, loss terms, gradients) runs on these

# The training comparisons (20 steps, continued training) use two cases: the optimizer update does not
# depend on the architecture beyond which parameters exist and which gradient they get; these two hold
# every kind of parameter (learned scalar, network schedule with learned endpoints, attention with its
# analytically-zero k/bias gradient) and the variance-minimising gradient (a custom VJP on each side).
TRAIN_CASES = ("scalar-cont-c1-v17", "endpoints-vm-cont-attn2-c3-v17")


def model_config(case: str, dtype: str) -> ModelConfig:
    """The ModelConfig of a case in float64 or float32 (compute_dtype selects the parameter dtype)."""
    config = ZERO_CASES[case][0] if case in ZERO_CASES else CASES[case]
    return ModelConfig.from_config(dict(_BASE, **config, compute_dtype=dtype))


def optimizer_config() -> ml_collections.ConfigDict:
    """AdamW as in training, with every part of the update active within 20 steps: warmup 5 steps, clipping
    at 0.5 (the gradient norms of these models are larger, so it clips), EMA 0.9 (0.9999 would keep the
    EMA at its start and hide EMA bugs), weight decay 0.01 on the non-bias tensors."""
    return make_config({}, optimizer=dict(learning_rate=2e-3, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.01,
                                          num_steps_lr_warmup=5, grad_clip_norm=0.5, ema_rate=0.9)).optimizer


@functools.lru_cache(maxsize=None)
def _weights64(case: str) -> dict[str, np.ndarray]:
    import torch

    from vdm_torch import convert as torch_convert
    from vdm_torch.vdm import init_params

    cfg = model_config(case, "float64")
    with torch.random.fork_rng(devices=[]):
        flat = torch_convert.params_to_neutral(init_params(cfg, seed=0))
    rs = np.random.RandomState(1)
    out = {k: flat[k] + PERTURBATION * rs.standard_normal(flat[k].shape) for k in sorted(flat)}
    if case in ZERO_CASES:
        ZERO_CASES[case][1](out)
    return out


def weights(case: str, dtype: str) -> dict[str, np.ndarray]:
    """The case's test weights in neutral form (the same float64 values, cast to `dtype`)."""
    return {k: v.astype(dtype) for k, v in _weights64(case).items()}


def sampling_weights(case: str, dtype: str) -> dict[str, np.ndarray]:
    """The weights of the sampling comparison: `weights` with the conv_in kernel rows that read the Fourier
    features scaled by FOURIER_SAMPLING_SCALE.

    With random weights, the features sin(2 pi 2^7 z) give eps_hat a Jacobian in z of order 1e2, and the
    sampler then amplifies any rounding difference ~40x per step: float64 trajectories of the same model
    part at step 10 (1e-1), float32 ones at step 2. That is chaos of a random network, not a difference
    between the backends; scaled by 0.003 the features still feed the UNet (a wrong feature order moves
    z_0 by ~1e-4) and the map stops being chaotic (float64 trajectories then agree to ~1e-15).
    """
    flat = weights(case, dtype)
    cfg = model_config(case, dtype)
    if cfg.with_fourier_features:
        kernel = flat["score_model/conv_in/kernel"].copy()        # (3, 3, C + 2CF, E): z first, then features
        kernel[:, :, cfg.image_channels:, :] *= FOURIER_SAMPLING_SCALE
        flat["score_model/conv_in/kernel"] = kernel
    return flat


def draw_t(rs: np.random.RandomState, cfg: ModelConfig) -> np.ndarray:
    """Antithetic t as the backends draw it: (t0 + i / B) mod 1, rounded up to k/T in discrete time."""
    t = np.mod(rs.uniform() + np.arange(BATCH) / BATCH, 1.0)
    if cfg.sm_n_timesteps > 0:
        t = np.ceil(t * cfg.sm_n_timesteps) / cfg.sm_n_timesteps
    return t


@dataclasses.dataclass
class ModelInputs:
    """Inputs of the model-level comparisons, NHWC numpy in the case's dtype (images int32)."""

    images: np.ndarray         # (B, H, W, C) integers in [0, V)
    conditioning: np.ndarray   # (B,)
    noise: Noise               # t (B,), eps, eps_0 (B, H, W, C): the loss's draws
    z: np.ndarray              # (B, H, W, C) UNet input
    g_t: np.ndarray            # (B,) gamma at which the UNet is evaluated
    z0: np.ndarray             # (B, H, W, C) rescaled z_0 for the decoder
    g0: np.ndarray             # () gamma_0 of the decoder


def model_inputs(case: str, dtype: str) -> ModelInputs:
    cfg = model_config(case, dtype)
    rs = np.random.RandomState(2)
    shape = (BATCH, HW, HW, cfg.image_channels)
    images = rs.randint(0, cfg.vocab_size, shape).astype(np.int32)
    conditioning = rs.uniform(size=BATCH)
    t = draw_t(rs, cfg)
    eps, eps_0 = rs.standard_normal(shape), rs.standard_normal(shape)
    z = rs.standard_normal(shape)
    g_t = cfg.gamma_min + (cfg.gamma_max - cfg.gamma_min) * rs.uniform(size=BATCH)
    g0 = np.asarray(cfg.gamma_min)
    # The decoder's input as the loss forms it: bin centre + sigma_0 / alpha_0 noise.
    z0 = 2.0 * (images + 0.5) / cfg.vocab_size - 1.0 + np.exp(0.5 * g0) * rs.standard_normal(shape)
    cast = lambda x: np.asarray(x, dtype)  # noqa: E731
    return ModelInputs(images, cast(conditioning), Noise(cast(t), cast(eps), cast(eps_0)), cast(z), cast(g_t),
                       cast(z0), cast(g0))


@dataclasses.dataclass
class SamplingInputs:
    z1: np.ndarray             # (B, H, W, C)
    step_noise: np.ndarray     # (T, B, H, W, C)
    conditioning: np.ndarray   # (B,)


def sampling_inputs(case: str, dtype: str) -> SamplingInputs:
    cfg = model_config(case, dtype)
    rs = np.random.RandomState(3)
    shape = (BATCH, HW, HW, cfg.image_channels)
    return SamplingInputs(rs.standard_normal(shape).astype(dtype),
                          rs.standard_normal((SAMPLE_STEPS, *shape)).astype(dtype),
                          rs.uniform(size=BATCH).astype(dtype))


@dataclasses.dataclass
class Batch:
    images: np.ndarray
    conditioning: np.ndarray
    noise: Noise


def training_batches(case: str, dtype: str, steps: int = TRAIN_STEPS) -> list[Batch]:
    """The batches and injected noise of training steps 0..steps-1 (the same values in both dtypes)."""
    cfg = model_config(case, dtype)
    rs = np.random.RandomState(4)
    shape = (BATCH, HW, HW, cfg.image_channels)
    out = []
    for _ in range(steps):
        images = rs.randint(0, cfg.vocab_size, shape).astype(np.int32)
        conditioning = rs.randint(0, 2, BATCH).astype(dtype)   # the augmentation flag in training
        t = draw_t(rs, cfg).astype(dtype)
        noise = Noise(t, rs.standard_normal(shape).astype(dtype), rs.standard_normal(shape).astype(dtype))
        out.append(Batch(images, conditioning, noise))
    return out
