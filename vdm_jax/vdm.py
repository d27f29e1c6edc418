"""The Variational Diffusion Model in Flax: encoder/decoder, the three VLB terms, ancestral sampling.

Layout NHWC. Images are integers in [0, vocab_size). Loss terms are per example, in nats.
RNG streams: 'sample' (loss noise when none is injected, sampled decoding), 'dropout'.
"""
from __future__ import annotations

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vdm_common import checks
from vdm_common.config import ModelConfig
from vdm_common.types import LossTerms, Noise, bits_per_dim, nats_to_bpd_scale  # noqa: F401  (re-exported)
from vdm_jax.schedules import make_schedule
from vdm_jax.unet import ScoreUNet, dtypes


def draw_noise(rng: jax.Array, images_shape, config: ModelConfig) -> Noise:
    """Draws (t, eps, eps_0) for one loss evaluation: antithetic t if configured, rounded up to k/T in
    discrete time; eps and eps_0 standard normal of `images_shape` (B, H, W, C)."""
    dtype = dtypes(config)[0]
    rng_t, rng_eps, rng_eps0 = jax.random.split(rng, 3)
    batch = images_shape[0]
    if config.antithetic_time_sampling:
        t0 = jax.random.uniform(rng_t, (), dtype)
        t = jnp.mod(t0 + jnp.arange(batch, dtype=dtype) / batch, 1.0)
    else:
        t = jax.random.uniform(rng_t, (batch,), dtype)
    T = config.sm_n_timesteps
    if T > 0:
        t = jnp.ceil(t * T) / T
    eps = jax.random.normal(rng_eps, images_shape, dtype)
    eps_0 = jax.random.normal(rng_eps0, images_shape, dtype)
    return Noise(t=t, eps=eps, eps_0=eps_0)


def noise_mse(score_model, f, g_t, eps, conditioning, deterministic: bool):
    """||eps - eps_hat(z_t)||^2 per example (B,), z_t = alpha_t f + sigma_t eps with sigma_t^2 = sigmoid(g_t)."""
    var_t = jax.nn.sigmoid(g_t)[:, None, None, None]
    z_t = jnp.sqrt(1.0 - var_t) * f + jnp.sqrt(var_t) * eps
    eps_hat = score_model(z_t, g_t, conditioning, deterministic)
    return jnp.sum(jnp.square(eps - eps_hat), axis=(1, 2, 3))


def check_inputs(images, conditioning, config: ModelConfig) -> None:
    """Shape and dtype checks always; value checks when the arrays are concrete (not traced by jit)."""
    checks.check_image_shape(images.shape, jnp.issubdtype(images.dtype, jnp.integer), str(images.dtype),
                             config.image_channels, channel_axis=3, layout="NHWC")
    checks.check_conditioning_shape(jnp.shape(conditioning), images.shape[0])
    if not isinstance(images, jax.core.Tracer):
        checks.check_image_values(np.asarray(images), config.vocab_size)
    if not isinstance(conditioning, jax.core.Tracer):
        checks.check_conditioning_values(np.asarray(conditioning))


class VDM(nn.Module):
    """Variational Diffusion Model: noise schedule `gamma` + score network `score_model`."""

    config: ModelConfig

    def setup(self):
        self.gamma = make_schedule(self.config)
        self.score_model = ScoreUNet(self.config)

    def __call__(self, images, conditioning, noise: Noise | None = None, deterministic: bool = True):
        return self.loss_terms(images, conditioning, noise, deterministic)

    @property
    def float_dtype(self):
        return dtypes(self.config)[0]

    def encode(self, x):
        """Integers in [0, V) -> bin centres in (-1, 1): 2 (x + 1/2) / V - 1."""
        return 2.0 * ((jnp.round(x).astype(self.float_dtype) + 0.5) / self.config.vocab_size) - 1.0

    def decode(self, z_0_rescaled, g_0):
        """Exact discretised decoder: log p(x = v | z_0) for every value v, (B, H, W, C) -> (B, H, W, C, V).

        p(x | z_0) is proportional to q(z_0 | x) per dimension, with z_0 rescaled to f + sigma_0/alpha_0 eps.
        """
        values = self.encode(jnp.arange(self.config.vocab_size))                     # (V,)
        inv_stdev = jnp.exp(-0.5 * g_0)
        logits = -0.5 * jnp.square((z_0_rescaled[..., None] - values) * inv_stdev)
        return jax.nn.log_softmax(logits, axis=-1)

    def log_prob(self, x, z_0_rescaled, g_0):
        """log p(x | z_0) summed over pixels and channels: (B,)."""
        logprobs = self.decode(z_0_rescaled, g_0)                                   # (B, H, W, C, V)
        picked = jnp.take_along_axis(logprobs, jnp.round(x).astype(jnp.int32)[..., None], axis=-1)
        return picked.sum(axis=(1, 2, 3, 4))

    def loss_terms(self, images, conditioning, noise: Noise | None = None, deterministic: bool = True) -> LossTerms:
        """The three VLB terms per example (nats). images: (B, H, W, C) integers; conditioning: (B,).

        noise: the draws to use; when None they come from the 'sample' RNG stream (see draw_noise).
        """
        cfg = self.config
        check_inputs(images, conditioning, cfg)
        if noise is None:
            noise = draw_noise(self.make_rng("sample"), images.shape, cfg)
        g_0, g_1 = self.gamma(0.0), self.gamma(1.0)
        var_1 = jax.nn.sigmoid(g_1)
        alpha_1_sq = jax.nn.sigmoid(-g_1)   # 1 - var_1 without the cancellation
        f = self.encode(images)                                                      # (B, H, W, C)

        # 1. Reconstruction: -log p(x | z_0), z_0 / alpha_0 = f + exp(g_0 / 2) eps_0.
        recon = -self.log_prob(images, f + jnp.exp(0.5 * g_0) * noise.eps_0, g_0)

        # 2. Prior: KL(q(z_1 | x) || N(0, I)) in closed form.
        klz = 0.5 * jnp.sum(alpha_1_sq * jnp.square(f) + var_1 - jnp.log(var_1) - 1.0, axis=(1, 2, 3))

        # 3. Diffusion loss at t.
        if cfg.variance_minimisation:
            diff = self.variance_minimising_diffusion_loss(f, noise, conditioning, deterministic)
        else:
            diff = self.diffusion_loss(f, noise, conditioning, deterministic)
        return LossTerms(recon=recon, klz=klz, diff=diff)

    def diffusion_loss(self, f, noise: Noise, conditioning, deterministic: bool):
        """Diffusion term per example (B,): continuous time, or discrete time with T = model.sm_n_timesteps."""
        t = noise.t
        g_t = self.gamma(t)                                                          # (B,)
        mse = noise_mse(self.score_model, f, g_t, noise.eps, conditioning, deterministic)
        T = self.config.sm_n_timesteps
        if T == 0:
            # Continuous time: 1/2 gamma'(t) ||eps - eps_hat||^2.
            _, dg_dt = jax.jvp(self.gamma, (t,), (jnp.ones_like(t),))
            return 0.5 * dg_dt * mse
        # Discrete time with T steps: T/2 (exp(gamma_t - gamma_s) - 1) ||eps - eps_hat||^2, s = t - 1/T.
        g_s = self.gamma(t - 1.0 / T)
        return 0.5 * T * jnp.expm1(g_t - g_s) * mse

    def variance_minimising_diffusion_loss(self, f, noise: Noise, conditioning, deterministic: bool):
        """Continuous-time diffusion term (B,) whose gradient for the schedule's shape network is that of
        the mean squared per-example loss in bits/dim (paper Appendix I.2); everything else gets the VLB's.

        gamma_t = g0 + (g1 - g0) s(t) and gamma'(t) = (g1 - g0) s'(t) enter a custom-VJP function of
        (s(t), s'(t)) whose backward multiplies their per-example cotangents by 2 L_i (L_i in bits/dim, no
        gradient through it). The shape network's parameters get d/d eta mean(L_i^2) in the same backward
        pass; the UNet and the endpoints get the usual cotangents.
        """
        t = noise.t
        s_t, ds_dt = jax.jvp(self.gamma.shape, (t,), (jnp.ones_like(t),))            # (B,) each
        g0, g1 = self.gamma.endpoints()
        bpd_scale = nats_to_bpd_scale(f.shape[1:])

        def loss(score_model, s_t, ds_dt, g0, g1):
            g_t = g0 + (g1 - g0) * s_t
            mse = noise_mse(score_model, f, g_t, noise.eps, conditioning, deterministic)
            return 0.5 * (g1 - g0) * ds_dt * mse

        def forward(score_model, *args):
            value, vjp_fn = nn.vjp(loss, score_model, *args)
            return value, (value, vjp_fn)

        def backward(residuals, cotangent):
            value, vjp_fn = residuals
            params_ct, s_ct, ds_ct, g0_ct, g1_ct = vjp_fn(cotangent)
            weight = 2.0 * jax.lax.stop_gradient(value) * bpd_scale                   # 2 L_i in bits/dim
            return params_ct, weight * s_ct, weight * ds_ct, g0_ct, g1_ct

        return nn.custom_vjp(loss, forward_fn=forward, backward_fn=backward)(self.score_model, s_t, ds_dt, g0, g1)

    def sample_step(self, z_t, i, T: int, conditioning, eps):
        """One ancestral step z_t -> z_s of p(z_s | z_t), t = (T - i)/T, s = (T - i - 1)/T.

        z_t, eps: (B, H, W, C); i: step index 0..T-1 (may be traced); eps: the step's standard normal noise.
        """
        t = (T - jnp.asarray(i, self.float_dtype)) / T
        s = (T - 1 - jnp.asarray(i, self.float_dtype)) / T
        g_s, g_t = self.gamma(s), self.gamma(t)
        eps_hat = self.score_model(z_t, jnp.broadcast_to(g_t, (z_t.shape[0],)), conditioning, deterministic=True)
        c = -jnp.expm1(g_s - g_t)
        sigma_t = jnp.sqrt(jax.nn.sigmoid(g_t))
        mean = jnp.sqrt(jax.nn.sigmoid(-g_s) / jax.nn.sigmoid(-g_t)) * (z_t - sigma_t * c * eps_hat)
        # sigma_s^2 c written as sigmoid(g_s) c: 1 - sigmoid(-g_s) cancels in float32 at g_s = -13.3.
        return mean + jnp.sqrt(jax.nn.sigmoid(g_s) * c) * eps

    def generate_x(self, z_0, rng: jax.Array | None = None, gumbel=None):
        """Decodes z_0 (B, H, W, C) to integer images: argmax of p(x | z_0), or a sample when
        model.sample_softmax: Gumbel-max with the injected `gumbel` (B, H, W, C, V) when given, else drawn
        from `rng` or the 'sample' stream."""
        g_0 = self.gamma(0.0)
        logprobs = self.decode(z_0 / jnp.sqrt(1.0 - jax.nn.sigmoid(g_0)), g_0)
        if self.config.sample_softmax and gumbel is not None:
            return jnp.argmax(logprobs + gumbel, axis=-1).astype(jnp.int32)
        if self.config.sample_softmax:
            rng = self.make_rng("sample") if rng is None else rng
            return jax.random.categorical(rng, logprobs, axis=-1).astype(jnp.int32)
        return jnp.argmax(logprobs, axis=-1).astype(jnp.int32)


def init_params(config: ModelConfig, rng: jax.Array, image_shape) -> dict:
    """Initial variables {'params': ...} for images of shape (H, W, C)."""
    images = jnp.zeros((1, *image_shape), jnp.int32)
    rng_params, rng_sample = jax.random.split(rng)
    return VDM(config).init({"params": rng_params, "sample": rng_sample}, images, jnp.zeros((1,)))


@partial(jax.jit, static_argnames=("config", "T", "return_trajectory"))
def sample(config: ModelConfig, params, z_1, T: int, conditioning, rng=None, step_noise=None,
           return_trajectory: bool = False):
    """Ancestral sampling from z_1 (B, H, W, C) in T steps, then decoding.

    The noise of step i is `step_noise[i]` (T, B, H, W, C) when given, else normal(fold_in(rng, i)).
    Returns (images int32 (B, H, W, C), z_0), plus the trajectory z_1, ..., z_0 (T + 1, B, H, W, C) if asked.
    """
    model = VDM(config)

    def step(z_t, i):
        eps = step_noise[i] if step_noise is not None else jax.random.normal(jax.random.fold_in(rng, i), z_t.shape,
                                                                             z_t.dtype)
        z_s = model.apply(params, z_t, i, T, conditioning, eps, method=VDM.sample_step)
        return z_s, (z_s if return_trajectory else None)

    z_0, traj = jax.lax.scan(step, z_1, jnp.arange(T))
    decode_rng = None if rng is None else jax.random.fold_in(rng, T)
    images = model.apply(params, z_0, decode_rng, method=VDM.generate_x)
    if return_trajectory:
        return images, z_0, jnp.concatenate([z_1[None], traj], axis=0)
    return images, z_0
