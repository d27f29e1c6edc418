"""The Variational Diffusion Model in PyTorch: encoder/decoder, the three VLB terms, ancestral sampling.

Layout NCHW. Images are integers in [0, vocab_size). Loss terms are per example, in nats.
Randomness: a `torch.Generator` (loss noise when none is injected, sampled decoding); dropout is on
exactly when `deterministic=False`, whatever the module's train/eval mode, as in the JAX backend.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vdm_common import checks
from vdm_common.config import ModelConfig
from vdm_common.types import LossTerms, Noise, bits_per_dim, nats_to_bpd_scale  # noqa: F401  (re-exported)
from vdm_torch.schedules import make_schedule
from vdm_torch.unet import ScoreUNet


def float_dtype(config: ModelConfig) -> torch.dtype:
    """The dtype of parameters, t, gamma and the loss terms (float32 unless the model runs in float64)."""
    return torch.float64 if config.compute_dtype == "float64" else torch.float32


def draw_noise(generator: torch.Generator | None, images_shape, config: ModelConfig, device=None) -> Noise:
    """Draws (t, eps, eps_0) for one loss evaluation: antithetic t if configured, rounded up to k/T in
    discrete time; eps and eps_0 standard normal of `images_shape` (B, C, H, W)."""
    dtype = float_dtype(config)
    batch = images_shape[0]
    if config.antithetic_time_sampling:
        t0 = torch.rand((), generator=generator, dtype=dtype, device=device)
        t = torch.remainder(t0 + torch.arange(batch, dtype=dtype, device=device) / batch, 1.0)
    else:
        t = torch.rand((batch,), generator=generator, dtype=dtype, device=device)
    T = config.sm_n_timesteps
    if T > 0:
        t = torch.ceil(t * T) / T
    eps = torch.randn(images_shape, generator=generator, dtype=dtype, device=device)
    eps_0 = torch.randn(images_shape, generator=generator, dtype=dtype, device=device)
    return Noise(t=t, eps=eps, eps_0=eps_0)


def noise_mse(score_model, f, g_t, eps, conditioning, deterministic: bool) -> torch.Tensor:
    """||eps - eps_hat(z_t)||^2 per example (B,), z_t = alpha_t f + sigma_t eps with sigma_t^2 = sigmoid(g_t)."""
    var_t = torch.sigmoid(g_t)[:, None, None, None]
    z_t = torch.sqrt(1.0 - var_t) * f + torch.sqrt(var_t) * eps
    eps_hat = score_model(z_t, g_t, conditioning, deterministic)
    return torch.sum(torch.square(eps - eps_hat), dim=(1, 2, 3))


def value_and_time_derivative(fn, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fn(t), d fn / dt) for an elementwise fn of t (B,), the derivative kept in the graph when gradients
    are on, so the parameters of fn get its gradient (the torch counterpart of jax.jvp)."""
    outer_grad = torch.is_grad_enabled()
    with torch.inference_mode(False), torch.enable_grad():
        t = t.detach().clone().requires_grad_(True)
        value = fn(t)
        (derivative,) = torch.autograd.grad(value.sum(), t, create_graph=outer_grad)
    return value, derivative


class ScaleShapeGradient(torch.autograd.Function):
    """Identity on (s_t, ds_dt); the backward multiplies both per-example cotangents by holder['weight'],
    which the forward pass fills in once the loss it scales by is known."""

    @staticmethod
    def forward(ctx, s_t, ds_dt, holder):
        ctx.holder = holder
        return s_t.view_as(s_t), ds_dt.view_as(ds_dt)

    @staticmethod
    def backward(ctx, s_ct, ds_ct):
        weight = ctx.holder["weight"]
        return s_ct * weight, ds_ct * weight, None


def check_inputs(images: torch.Tensor, conditioning: torch.Tensor, config: ModelConfig) -> None:
    """Shape, dtype and value checks of a batch (NCHW integer images, (B,) finite conditioning)."""
    is_int = not (images.dtype.is_floating_point or images.dtype.is_complex or images.dtype == torch.bool)
    checks.check_image_shape(images.shape, is_int, str(images.dtype), config.image_channels, channel_axis=1,
                             layout="NCHW")
    checks.check_conditioning_shape(conditioning.shape, images.shape[0])
    # Value checks read the batch on the host: done for CPU tensors only (on a GPU they would sync every
    # step; the trainers' data comes from vdm_common.data, which checks the values of a data set on loading).
    if images.device.type == "cpu" and not torch.compiler.is_compiling():
        checks.check_image_values(images.detach().cpu().numpy(), config.vocab_size)
        checks.check_conditioning_values(conditioning.detach().float().cpu().numpy())


class VDM(nn.Module):
    """Variational Diffusion Model: noise schedule `gamma` + score network `score_model`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.gamma = make_schedule(config)
        self.score_model = ScoreUNet(config)
        self.to(float_dtype(config))

    def forward(self, images, conditioning, noise: Noise | None = None, deterministic: bool = True,
                generator: torch.Generator | None = None) -> LossTerms:
        return self.loss_terms(images, conditioning, noise, deterministic, generator)

    @property
    def float_dtype(self) -> torch.dtype:
        return float_dtype(self.config)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Integers in [0, V) -> bin centres in (-1, 1): 2 (x + 1/2) / V - 1."""
        return 2.0 * ((torch.round(x.to(self.float_dtype)) + 0.5) / self.config.vocab_size) - 1.0

    def decode(self, z_0_rescaled: torch.Tensor, g_0: torch.Tensor) -> torch.Tensor:
        """Exact discretised decoder: log p(x = v | z_0) for every value v, (B, C, H, W) -> (B, C, H, W, V).

        p(x | z_0) is proportional to q(z_0 | x) per dimension, with z_0 rescaled to f + sigma_0/alpha_0 eps.
        """
        values = self.encode(torch.arange(self.config.vocab_size, device=z_0_rescaled.device))   # (V,)
        inv_stdev = torch.exp(-0.5 * g_0)
        logits = -0.5 * torch.square((z_0_rescaled[..., None] - values) * inv_stdev)
        return F.log_softmax(logits, dim=-1)

    def log_prob(self, x: torch.Tensor, z_0_rescaled: torch.Tensor, g_0: torch.Tensor) -> torch.Tensor:
        """log p(x | z_0) summed over channels and pixels: (B,)."""
        logprobs = self.decode(z_0_rescaled, g_0)                                   # (B, C, H, W, V)
        picked = torch.gather(logprobs, -1, torch.round(x.to(self.float_dtype)).long()[..., None])
        return picked.sum(dim=(1, 2, 3, 4))

    def loss_terms(self, images, conditioning, noise: Noise | None = None, deterministic: bool = True,
                   generator: torch.Generator | None = None) -> LossTerms:
        """The three VLB terms per example (nats). images: (B, C, H, W) integers; conditioning: (B,).

        noise: the draws to use; when None they are drawn from `generator` (see draw_noise).
        """
        cfg = self.config
        check_inputs(images, conditioning, cfg)
        if noise is None:
            noise = draw_noise(generator, images.shape, cfg, device=images.device)
        g_0, g_1 = self.gamma(0.0), self.gamma(1.0)
        var_1 = torch.sigmoid(g_1)
        alpha_1_sq = torch.sigmoid(-g_1)   # 1 - var_1 without the cancellation
        f = self.encode(images)                                                      # (B, C, H, W)

        # 1. Reconstruction: -log p(x | z_0), z_0 / alpha_0 = f + exp(g_0 / 2) eps_0.
        recon = -self.log_prob(images, f + torch.exp(0.5 * g_0) * noise.eps_0, g_0)

        # 2. Prior: KL(q(z_1 | x) || N(0, I)) in closed form.
        klz = 0.5 * torch.sum(alpha_1_sq * torch.square(f) + var_1 - torch.log(var_1) - 1.0, dim=(1, 2, 3))

        # 3. Diffusion loss at t.
        if cfg.variance_minimisation:
            diff = self.variance_minimising_diffusion_loss(f, noise, conditioning, deterministic)
        else:
            diff = self.diffusion_loss(f, noise, conditioning, deterministic)
        return LossTerms(recon=recon, klz=klz, diff=diff)

    def diffusion_loss(self, f, noise: Noise, conditioning, deterministic: bool) -> torch.Tensor:
        """Diffusion term per example (B,): continuous time, or discrete time with T = model.sm_n_timesteps."""
        T = self.config.sm_n_timesteps
        if T == 0:
            # Continuous time: 1/2 gamma'(t) ||eps - eps_hat||^2.
            g_t, dg_dt = value_and_time_derivative(self.gamma, noise.t)
            return 0.5 * dg_dt * noise_mse(self.score_model, f, g_t, noise.eps, conditioning, deterministic)
        # Discrete time with T steps: T/2 (exp(gamma_t - gamma_s) - 1) ||eps - eps_hat||^2, s = t - 1/T.
        g_t = self.gamma(noise.t)
        g_s = self.gamma(noise.t - 1.0 / T)
        mse = noise_mse(self.score_model, f, g_t, noise.eps, conditioning, deterministic)
        return 0.5 * T * torch.expm1(g_t - g_s) * mse

    def variance_minimising_diffusion_loss(self, f, noise: Noise, conditioning, deterministic: bool):
        """Continuous-time diffusion term (B,) whose gradient for the schedule's shape network is that of
        the mean squared per-example loss in bits/dim (paper Appendix I.2); everything else gets the VLB's.

        gamma_t = g0 + (g1 - g0) s(t) and gamma'(t) = (g1 - g0) s'(t), with (s(t), s'(t)) passed through an
        autograd Function whose backward multiplies their per-example cotangents by 2 L_i (L_i in bits/dim,
        no gradient through it). The shape network's parameters get d/d eta mean(L_i^2) in the same
        backward pass; the UNet and the endpoints get the usual gradients.
        """
        s_t, ds_dt = value_and_time_derivative(self.gamma.shape, noise.t)             # (B,) each
        holder = {}
        s_t, ds_dt = ScaleShapeGradient.apply(s_t, ds_dt, holder)
        g0, g1 = self.gamma.endpoints()
        g_t = g0 + (g1 - g0) * s_t
        diff = 0.5 * (g1 - g0) * ds_dt * noise_mse(self.score_model, f, g_t, noise.eps, conditioning, deterministic)
        holder["weight"] = 2.0 * diff.detach() * nats_to_bpd_scale(f.shape[1:])        # read by the backward
        return diff

    def sample_step(self, z_t, i, T: int, conditioning, eps):
        """One ancestral step z_t -> z_s of p(z_s | z_t), t = (T - i)/T, s = (T - i - 1)/T.

        z_t, eps: (B, C, H, W); i: step index 0..T-1; eps: the step's standard normal noise.
        """
        t = torch.as_tensor((T - i) / T, dtype=self.float_dtype, device=z_t.device)
        s = torch.as_tensor((T - 1 - i) / T, dtype=self.float_dtype, device=z_t.device)
        g_s, g_t = self.gamma(s), self.gamma(t)
        eps_hat = self.score_model(z_t, g_t.expand(z_t.shape[0]), conditioning, deterministic=True)
        c = -torch.expm1(g_s - g_t)
        sigma_t = torch.sqrt(torch.sigmoid(g_t))
        mean = torch.sqrt(torch.sigmoid(-g_s) / torch.sigmoid(-g_t)) * (z_t - sigma_t * c * eps_hat)
        # sigma_s^2 c written as sigmoid(g_s) c: 1 - sigmoid(-g_s) cancels in float32 at g_s = -13.3.
        return mean + torch.sqrt(torch.sigmoid(g_s) * c) * eps

    def generate_x(self, z_0, generator: torch.Generator | None = None, gumbel=None):
        """Decodes z_0 (B, C, H, W) to integer images: argmax of p(x | z_0), or a sample when
        model.sample_softmax: Gumbel-max with the injected `gumbel` (B, C, H, W, V) when given, else drawn
        from `generator`."""
        g_0 = self.gamma(0.0)
        logprobs = self.decode(z_0 / torch.sqrt(1.0 - torch.sigmoid(g_0)), g_0)
        if self.config.sample_softmax and gumbel is not None:
            return torch.argmax(logprobs + gumbel, dim=-1).to(torch.int32)
        if self.config.sample_softmax:
            probs = logprobs.exp().reshape(-1, logprobs.shape[-1])
            draws = torch.multinomial(probs, 1, generator=generator)
            return draws.reshape(logprobs.shape[:-1]).to(torch.int32)
        return torch.argmax(logprobs, dim=-1).to(torch.int32)


def init_params(config: ModelConfig, seed: int) -> VDM:
    """A freshly initialised model (parameters drawn from `torch.manual_seed(seed)`-style generator)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return VDM(config)


@torch.no_grad()
def sample(model: VDM, z_1, T: int, conditioning, generator: torch.Generator | None = None, step_noise=None,
           return_trajectory: bool = False):
    """Ancestral sampling from z_1 (B, C, H, W) in T steps, then decoding.

    The noise of step i is `step_noise[i]` (T, B, C, H, W) when given, else randn from `generator`.
    Returns (images int32 (B, C, H, W), z_0), plus the trajectory z_1, ..., z_0 (T + 1, B, C, H, W) if asked.
    """
    z = z_1
    trajectory = [z_1]
    for i in range(T):
        eps = step_noise[i] if step_noise is not None else torch.randn(
            z.shape, generator=generator, dtype=z.dtype, device=z.device)
        z = model.sample_step(z, i, T, conditioning, eps)
        if return_trajectory:
            trajectory.append(z)
    images = model.generate_x(z, generator)
    if return_trajectory:
        return images, z, torch.stack(trajectory)
    return images, z
