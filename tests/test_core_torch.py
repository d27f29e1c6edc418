"""Core unit tests of the PyTorch backend: score UNet, schedules, VLB terms, sampler, dtypes, input errors.

Mirror of tests/test_core_jax.py (same test names). Tiny models (tests/conftest.py), 8x8 images, NCHW.
Every expected number comes from an independent numpy formula (conftest `ref`) or from an identity the
model must satisfy.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from vdm_common import checks, weights  # noqa: E402
from vdm_common.config import GAMMA_TYPES, ModelConfig, load_config, model_config  # noqa: E402
from vdm_torch import schedules, unet, vdm  # noqa: E402
from vdm_torch.vdm import VDM, Noise  # noqa: E402

pytestmark = pytest.mark.torch

HW, B = 8, 4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on these tiny tensors the second thread only adds synchronisation (5x the CPU
    time on a busy machine). Restored after this module."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ------------------------------------------------------------------------------------------------ helpers

def images_for(config, seed=0, batch=B):
    """The same pixel values as the JAX tests' images_for, in NCHW."""
    rs = np.random.RandomState(seed)
    nhwc = rs.randint(0, config.vocab_size, (batch, HW, HW, config.image_channels))
    return torch.as_tensor(nhwc.transpose(0, 3, 1, 2).copy(), dtype=torch.int64)


def normal(seed, shape, dtype=torch.float32):
    return torch.as_tensor(np.random.RandomState(seed).standard_normal(shape), dtype=dtype)


def perturb(model, seed=1, scale=0.05):
    """A copy with every parameter plus N(0, scale^2) noise: the zero-initialised convs become non-zero,
    so eps_hat != z."""
    out = VDM(model.config)
    out.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return out


def with_config(model, config):
    """A model of `config` (same parameter tree) holding `model`'s weights."""
    out = VDM(config)
    out.load_state_dict(model.state_dict())
    return out


def terms_np(terms):
    return [x.detach().double().numpy() for x in terms]


def gamma_params(state, prefix="gamma."):
    """The schedule's parameters in `state` under `prefix`, neutral names relative to gamma/ (as
    conftest.gamma wants them), through the weights table."""
    state = {k[len(prefix):]: v.detach().double().numpy() for k, v in state.items() if k.startswith(prefix)}
    return weights.torch_layout_to_neutral(state)


def loss(model, images, cond, noise, deterministic=True):
    with torch.no_grad():
        return model.loss_terms(images, cond, noise, deterministic)


@pytest.fixture(scope="module")
def cfg(make_config):
    return make_config()          # learnable_scalar, attention and Fourier features on, 3 channels, V=256


@pytest.fixture(scope="module")
def model(cfg):
    return vdm.init_params(cfg, 0)


@pytest.fixture(scope="module")
def perturbed(model):
    return perturb(model)


# ------------------------------------------------------------------------------------------ 1. the UNet

def test_unet_returns_z_at_init(cfg, model, perturbed):
    z = normal(0, (B, 3, HW, HW)) * 2.0
    cond = torch.tensor([0.0, 1.0, 0.0, 1.0])
    with torch.no_grad():
        for g_t in (torch.linspace(-13.3, 5.0, B), torch.tensor(-2.0)):              # (B,) and 0-d
            out = model.score_model(z, g_t, cond)
            assert out.dtype == torch.float32 and out.shape == z.shape
            assert torch.equal(out, z)
        # The identity comes from the zero output conv: with it perturbed, eps_hat moves away from z.
        out = perturbed.score_model(z, torch.tensor(-2.0), cond)
    assert (out - z).abs().mean() > 1e-2


def test_timestep_embedding_matches_formula(ref):
    t = np.array([0.0, 0.013, 0.5, 1.0], np.float32)
    got = unet.timestep_embedding(torch.as_tensor(t), 16).double().numpy()
    np.testing.assert_allclose(got, ref.timestep_embedding(t, 16), atol=2e-4)      # angles up to 1000 rad


@pytest.mark.parametrize("order", ["channel_major", "frequency_major"])
def test_fourier_features_match_formula(ref, order):
    z = normal(0, (2, 3, 3, 3)) * 0.1                                             # NHWC draws, as in JAX
    got = unet.fourier_features(z.permute(0, 3, 1, 2), 6, 8, order).permute(0, 2, 3, 1).double().numpy()
    assert got.shape == (2, 3, 3, 12)
    np.testing.assert_allclose(got, ref.fourier_features(z.numpy(), 6, 8, order), atol=1e-4)


# ---------------------------------------------------------------------------------------- 2. the decoder

@pytest.mark.parametrize("vocab,g_0", [(256, -13.3), (17, -8.0)])
def test_decoder_normalised_and_sharp_at_high_snr(make_config, ref, vocab, g_0):
    config = make_config(vocab_size=vocab)
    model = VDM(config)
    x = images_for(config, seed=vocab)
    f = ref.encode(x.numpy(), vocab)
    e = np.random.RandomState(1).uniform(-1.0, 1.0, x.shape)            # noise of at most one sigma_0
    z = torch.as_tensor(f + math.exp(0.5 * g_0) * e, dtype=torch.float32)
    logp = model.decode(z, torch.tensor(g_0)).double().numpy()
    assert logp.shape == tuple(x.shape) + (vocab,)
    np.testing.assert_allclose(np.exp(logp).sum(-1), 1.0, atol=1e-6)
    p_true = np.exp(np.take_along_axis(logp, x.numpy()[..., None], axis=-1))[..., 0]
    assert p_true.min() > 0.99, p_true.min()
    np.testing.assert_allclose(np.exp(logp), np.exp(ref.decoder_logprobs(z.numpy(), g_0, vocab)), atol=1e-5)
    # log_prob picks the true value's entry and sums it over the image.
    log_prob = model.log_prob(x, z, torch.tensor(g_0))
    np.testing.assert_allclose(log_prob.numpy(), np.log(p_true).reshape(B, -1).sum(1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("vocab", [256, 17])
def test_decoder_spread_at_low_snr(make_config, ref, vocab):
    config = make_config(vocab_size=vocab)
    z = normal(2, (B, 3, HW, HW))
    logp = VDM(config).decode(z, torch.tensor(5.0)).double().numpy()
    np.testing.assert_allclose(np.exp(logp).sum(-1), 1.0, atol=1e-6)
    assert np.exp(logp).max() < 0.5
    np.testing.assert_allclose(np.exp(logp), np.exp(ref.decoder_logprobs(z.numpy(), 5.0, vocab)), atol=1e-6)


def test_decoder_normalised_float64(make_config, ref):
    config = make_config(compute_dtype="float64")
    z = normal(3, (B, 3, HW, HW), torch.float64) * 0.5
    logp = VDM(config).decode(z, torch.tensor(-13.3, dtype=torch.float64))
    assert logp.dtype == torch.float64
    logp = logp.numpy()
    np.testing.assert_allclose(np.exp(logp).sum(-1), 1.0, atol=1e-12)
    np.testing.assert_allclose(logp, ref.decoder_logprobs(z.numpy(), -13.3, 256), atol=1e-6)


# ----------------------------------------------------------------------------------- 3. the VLB's terms

def test_kl_and_recon_match_closed_form(cfg, perturbed, ref):
    """With every parameter perturbed (so gamma_0, gamma_1 are not the config's), the prior and
    reconstruction terms equal their formulas; the diffusion term is 1/2 gamma' ||eps - eps_hat||^2."""
    x = images_for(cfg)
    cond = torch.zeros(B)
    noise = vdm.draw_noise(torch.Generator().manual_seed(5), x.shape, cfg)
    recon, klz, diff = terms_np(loss(perturbed, x, cond, noise))

    p = gamma_params(perturbed.state_dict())
    w, b = abs(float(p["w"][0])), float(p["b"][0])
    g_0, g_1 = b, b + w
    assert abs(g_1 - 5.0) > 1e-4                                        # the perturbation moved gamma_1
    f = ref.encode(x.numpy(), 256)
    alpha2, sigma2 = ref.sigmoid(-g_1), ref.sigmoid(g_1)
    expected_kl = 0.5 * (alpha2 * f ** 2 + sigma2 - np.log(sigma2) - 1.0).sum(axis=(1, 2, 3))
    np.testing.assert_allclose(klz, expected_kl, rtol=1e-4)            # float32 sum of 192 small terms

    logp = ref.decoder_logprobs(f + np.exp(0.5 * g_0) * noise.eps_0.double().numpy(), g_0, 256)
    expected_recon = -np.take_along_axis(logp, x.numpy()[..., None], axis=-1).sum(axis=(1, 2, 3, 4))
    np.testing.assert_allclose(recon, expected_recon, rtol=1e-3, atol=1e-4)

    t = noise.t.double().numpy()
    var_t = ref.sigmoid(b + w * t)[:, None, None, None]
    eps = noise.eps.double().numpy()
    z_t = np.sqrt(1.0 - var_t) * f + np.sqrt(var_t) * eps
    with torch.no_grad():
        eps_hat = perturbed.score_model(torch.as_tensor(z_t, dtype=torch.float32),
                                        torch.as_tensor(b + w * t, dtype=torch.float32), cond)
    mse = ((eps - eps_hat.double().numpy()) ** 2).sum(axis=(1, 2, 3))
    np.testing.assert_allclose(diff, 0.5 * w * mse, rtol=1e-4)


def test_discrete_loss_converges_to_continuous(make_config, check_discrete_converges):
    """Same weights (perturbed), same eps, same t (the grid j/10, which lies on every k/T grid) for
    T = 10, 100, 1000, 10000 and continuous time, in float64. See conftest.assert_discrete_converges for
    why the gap is positive and decreases monotonically to 0."""
    reps = 2
    small = dict(compute_dtype="float64", sm_n_layer=0, with_attention=False)    # mirrors the JAX test
    base = perturb(vdm.init_params(make_config(**small), 0), seed=2)
    x = images_for(base.config, seed=3, batch=10 * reps)
    cond = torch.zeros(10 * reps, dtype=torch.float64)
    eps = normal(4, tuple(x.shape), torch.float64)
    eps_0 = normal(5, tuple(x.shape), torch.float64)
    j = np.repeat(np.arange(1, 11), reps)
    losses = {}
    for T in (0, 10, 100, 1000, 10000):
        m = with_config(base, make_config(**small, sm_n_timesteps=T))
        # t = k / T with integer k = j T / 10: exactly the float64 value j / 10 on every grid.
        t = torch.as_tensor((j * (T // 10)) / T if T else j / 10)
        terms = loss(m, x, cond, Noise(t, eps, eps_0))
        assert terms.diff.dtype == torch.float64
        losses[T] = float(terms.diff.mean())
    w = abs(base.gamma.w.item())
    continuous = losses.pop(0)
    check_discrete_converges(losses, continuous, w)


def test_draw_noise_antithetic_and_discrete_rounding(make_config):
    for T in (0, 10):
        config = make_config(sm_n_timesteps=T)
        noise = vdm.draw_noise(torch.Generator().manual_seed(T), (64, 3, HW, HW), config)
        t = np.sort(noise.t.double().numpy())
        assert noise.eps.shape == noise.eps_0.shape == (64, 3, HW, HW)
        assert not torch.allclose(noise.eps, noise.eps_0)
        assert 0.0 <= t.min() and t.max() <= 1.0
        if T == 0:
            np.testing.assert_allclose(np.diff(t), 1.0 / 64, atol=1e-6)         # t0 + k/B mod 1
        else:
            np.testing.assert_allclose(t * T, np.round(t * T), atol=1e-5)      # on the grid k/T
            assert t.min() >= 1.0 / T - 1e-7                                   # rounded up: s = t - 1/T >= 0


# -------------------------------------------------------------------------------------------- 5. schedules

def perturb_schedule(schedule, seed):
    """Parameters moved by N(0, 1) with the raw slope weights made negative (|w| is what counts) and, for
    the endpoints schedule, the raw gamma_1 put below gamma_0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in schedule.named_parameters():
            p.add_(torch.randn(p.shape, generator=g))
            if name == "w" or name.endswith("l1.weight"):
                p.copy_(-p.abs())
        if hasattr(schedule, "gamma_1"):
            schedule.gamma_1.copy_(schedule.gamma_0 - 3.0)


@pytest.mark.parametrize("gamma_type", GAMMA_TYPES)
def test_schedule_increasing_with_endpoints(make_config, ref, gamma_type):
    config = make_config(gamma_type=gamma_type)
    schedule = schedules.make_schedule(config)
    grid = torch.linspace(0.0, 1.0, 1001)

    def check():
        with torch.no_grad():
            g = schedule(grid).double().numpy()
        assert g.shape == tuple(grid.shape)
        assert np.all(np.diff(g) > 0), np.diff(g).min()
        p = gamma_params(schedule.state_dict(), prefix="")
        np.testing.assert_allclose(g, ref.gamma(config, p, grid.double().numpy())[0], rtol=1e-5, atol=1e-5)
        return g, p

    g, p = check()
    assert schedule(0.5).shape == () and schedule(torch.zeros(3)).shape == (3,)
    if gamma_type == "learnable_nnet":
        # l1 alone spans [gamma_min, gamma_max]; l3 adds at most mean |l3| (its input is in (-1, 1)).
        bound = np.abs(p["l3/kernel"]).mean()
        offsets = g[[0, -1]] - [config.gamma_min, config.gamma_max]
        assert np.all(np.abs(offsets) < bound) and bound < 0.02
        expected = ref.gamma(config, p, np.array([0.0, 1.0]))[0] - [config.gamma_min, config.gamma_max]
        assert np.all(np.abs(expected) > 1e-5)                          # l3's part is there, and measured:
        np.testing.assert_allclose(offsets, expected, atol=4e-6)        # (4 float32 ulps of gamma_min)
    else:
        np.testing.assert_allclose([g[0], g[-1]], [config.gamma_min, config.gamma_max], rtol=1e-6, atol=1e-6)
    if gamma_type != "fixed":
        for seed in range(3):
            perturb_schedule(schedule, seed)
            check()


# ---------------------------------------------------------------------------------- 6. every combination

def test_loss_terms_finite_positive(make_config, ref, combo):
    """At init (eps_hat = z_t) every term also equals its numpy formula."""
    config = make_config(**combo)
    model = vdm.init_params(config, 0)
    x = images_for(config, seed=7)
    cond = torch.tensor([0.0, 1.0, 1.0, 0.0])
    noise = vdm.draw_noise(torch.Generator().manual_seed(8), x.shape, config)
    terms = model.loss_terms(x, cond, noise)
    got = terms_np(terms)
    for name, value in zip(terms._fields, got):
        assert value.shape == (B,) and terms[0].dtype == torch.float32
        assert np.all(np.isfinite(value)) and np.all(value > 0), (name, value)
    expected = ref.vlb_terms_at_init(config, gamma_params(model.state_dict()), x.numpy(), noise.t.double().numpy(),
                                     noise.eps.double().numpy(), noise.eps_0.double().numpy())
    # recon sums log-softmaxes of logits up to 1e6 (float32); T = 1000 differences gamma to 5e-5.
    for name, value, want, rtol, atol in zip(terms._fields, got, expected, (2e-3, 1e-4, 2e-4), (1e-3, 0, 0)):
        np.testing.assert_allclose(value, want, rtol=rtol, atol=atol, err_msg=name)
    # Gradients reach every parameter that the loss uses and are finite.
    sum(v.mean() for v in terms).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


# ----------------------------------------------------------------------------------------- 7. float64

def test_float64_end_to_end(make_config):
    config = make_config(compute_dtype="float64", sm_n_layer=0)
    m64 = perturb(vdm.init_params(config, 0))
    assert {p.dtype for p in m64.parameters()} == {torch.float64}
    x = images_for(config)
    cond = torch.zeros(B, dtype=torch.float64)
    noise = vdm.draw_noise(torch.Generator().manual_seed(1), x.shape, config)
    assert {a.dtype for a in noise} == {torch.float64}
    terms = m64.loss_terms(x, cond, noise)
    assert {a.dtype for a in terms} == {torch.float64}
    sum(v.mean() for v in terms).backward()
    grads = [p.grad for p in m64.parameters()]
    assert all(g is not None and g.dtype == torch.float64 and torch.isfinite(g).all() for g in grads)
    assert m64.gamma.w.grad.abs().max() > 0

    z_1 = normal(2, tuple(x.shape), torch.float64)
    images, z_0 = vdm.sample(m64, z_1, 3, cond, step_noise=normal(3, (3,) + tuple(x.shape), torch.float64))
    assert z_0.dtype == torch.float64 and images.dtype == torch.int32
    assert torch.isfinite(z_0).all()


# ------------------------------------------------------------------------------------------ 8. sampling

def test_sample_shapes_range_and_determinism(cfg, perturbed):
    T = 10
    z_1 = normal(0, (B, 3, HW, HW))
    cond = torch.zeros(B)
    noise_a, noise_b = (normal(s, (T, B, 3, HW, HW)) for s in (1, 2))
    images, z_0, traj = vdm.sample(perturbed, z_1, T, cond, step_noise=noise_a, return_trajectory=True)
    assert images.shape == (B, 3, HW, HW) and images.dtype == torch.int32
    assert 0 <= int(images.min()) and int(images.max()) < cfg.vocab_size
    assert traj.shape == (T + 1, B, 3, HW, HW)
    assert torch.equal(traj[0], z_1) and torch.equal(traj[-1], z_0)
    again = vdm.sample(perturbed, z_1, T, cond, step_noise=noise_a, return_trajectory=True)
    for a, b in zip((images, z_0, traj), again):
        assert torch.equal(a, b)
    other = vdm.sample(perturbed, z_1, T, cond, step_noise=noise_b, return_trajectory=True)
    assert (other[1] - z_0).abs().max() > 1e-3
    # Every step of the trajectory is one sample_step with that step's noise.
    with torch.no_grad():
        for i in range(T):
            torch.testing.assert_close(perturbed.sample_step(traj[i], i, T, cond, noise_a[i]), traj[i + 1],
                                       rtol=1e-5, atol=1e-5)
    # Without injected noise the step noise comes from the generator, reproducibly.
    first = vdm.sample(perturbed, z_1, T, cond, generator=torch.Generator().manual_seed(3))
    second = vdm.sample(perturbed, z_1, T, cond, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first[1], second[1])


@pytest.mark.parametrize("i", [0, 5, 9])
def test_sample_step_matches_formula(cfg, perturbed, ref, i):
    """Mean and noise scale of the step, checked apart: z_s(eps = 0) is the mean, z_s(eps) - z_s(0) the noise."""
    T = 10
    z_t, eps = normal(10 + i, (B, 3, HW, HW)), normal(20 + i, (B, 3, HW, HW))
    cond = torch.tensor([0.0, 1.0, 0.0, 1.0])
    with torch.no_grad():
        z_s = perturbed.sample_step(z_t, i, T, cond, eps)
        mean = perturbed.sample_step(z_t, i, T, cond, torch.zeros_like(eps)).double().numpy()
    assert z_s.shape == z_t.shape and z_s.dtype == torch.float32
    p = gamma_params(perturbed.state_dict())
    w, b = abs(float(p["w"][0])), float(p["b"][0])
    g_t, g_s = b + w * (T - i) / T, b + w * (T - i - 1) / T
    with torch.no_grad():
        eps_hat = perturbed.score_model(z_t, torch.full((B,), g_t), cond).double().numpy()
    expected = ref.sample_step(z_t.double().numpy(), eps_hat, eps.double().numpy(), g_s, g_t)
    expected_mean = ref.sample_step(z_t.double().numpy(), eps_hat, 0.0, g_s, g_t)
    np.testing.assert_allclose(mean, expected_mean, rtol=1e-4, atol=1e-5)
    scale = (z_s.double().numpy() - mean) / eps.double().numpy()                     # sigma_s sqrt(c) per pixel
    expected_scale = np.sqrt(ref.sigmoid(g_s) * -np.expm1(g_s - g_t))
    np.testing.assert_allclose(np.median(scale), expected_scale, rtol=1e-3)
    np.testing.assert_allclose(z_s.double().numpy(), expected, rtol=1e-4, atol=1e-5)


def test_generate_x_is_argmax_of_decode(make_config, cfg, model, ref):
    with torch.no_grad():
        g_0 = float(model.gamma(0.0))
    alpha_0, sigma_0 = math.sqrt(ref.sigmoid(-g_0)), math.sqrt(ref.sigmoid(g_0))
    z_0 = normal(0, (B, 3, HW, HW)) * 0.6
    with torch.no_grad():
        out = model.generate_x(z_0)
        logp = model.decode(z_0 / alpha_0, torch.tensor(g_0))
    assert out.dtype == torch.int32 and out.shape == z_0.shape
    assert torch.equal(out, logp.argmax(-1).to(torch.int32))
    # From z_0 = alpha_0 f(x) + half a sigma_0 of noise, the argmax is x itself.
    x = images_for(cfg, seed=9)
    z_0 = torch.as_tensor(alpha_0 * ref.encode(x.numpy(), 256), dtype=torch.float32) + 0.5 * sigma_0 * normal(
        1, tuple(x.shape))
    with torch.no_grad():
        assert torch.equal(model.generate_x(z_0), x.to(torch.int32))
    # sample_softmax: at the midpoint between bins v and v + 1 both come out, about half the time each.
    sampled = with_config(model, make_config(sample_softmax=True))
    v = x.clamp(0, 254).numpy()
    z_mid = torch.as_tensor(alpha_0 * (ref.encode(v, 256) + 1.0 / 256), dtype=torch.float32)
    with torch.no_grad():
        draws = sampled.generate_x(z_mid, torch.Generator().manual_seed(0)).numpy()
        again = sampled.generate_x(z_mid, torch.Generator().manual_seed(0)).numpy()
    assert set(np.unique(draws - v)) == {0, 1}
    assert 0.4 < (draws - v).mean() < 0.6
    np.testing.assert_array_equal(again, draws)


# ------------------------------------------------------------------------------------------------ 9. bf16

@pytest.fixture(scope="module")
def bf16_and_float32_terms(make_config, cfg, perturbed):
    """Loss terms of the perturbed model with bfloat16 and float32 compute, same params and noise."""
    low_model = with_config(perturbed, make_config(compute_dtype="bfloat16"))
    x = images_for(cfg)
    cond = torch.zeros(B)
    noise = vdm.draw_noise(torch.Generator().manual_seed(5), x.shape, cfg)
    return low_model, [loss(m, x, cond, noise) for m in (low_model, perturbed)]


def test_bf16_compute_close_to_float32(bf16_and_float32_terms):
    low_model, (low, full) = bf16_and_float32_terms
    assert {p.dtype for p in low_model.parameters()} == {torch.float32}
    assert {a.dtype for a in low} == {torch.float32}
    for name, a, b in zip(low._fields, terms_np(low), terms_np(full)):
        np.testing.assert_allclose(a, b, rtol=5e-2, err_msg=name)


def test_bf16_compute_changes_unet_activations(bf16_and_float32_terms):
    """The option is not a no-op: the diffusion term (the only one through the UNet) moves by bf16 rounding."""
    low, full = (terms_np(terms) for terms in bf16_and_float32_terms[1])
    rel = np.abs(low[2] - full[2]) / full[2]
    assert np.all(rel > 1e-6) and np.all(rel < 5e-2), rel


# ------------------------------------------------------------------------------- 10. official param tree

def test_param_tree_matches_official_cifar10(official_param_shapes):
    """The torch model of configs/cifar10.py, built on the meta device (no memory), maps through the
    weights table onto exactly the official JAX tree."""
    config = model_config(load_config("configs/cifar10.py"))
    with torch.device("meta"):
        model = VDM(config)
    assert sum(p.numel() for p in model.parameters()) == 30_578_181
    state = model.state_dict()
    assert len(state) == 691
    # Zero-stride numpy stand-ins of the right shapes (one byte of memory each) for the layout rules.
    stand_ins = {k: np.broadcast_to(np.zeros((), np.bool_), tuple(v.shape)) for k, v in state.items()}
    neutral = {k: tuple(v.shape) for k, v in weights.torch_layout_to_neutral(stand_ins).items()}
    assert sorted(set(neutral) - set(official_param_shapes)) == []
    assert sorted(set(official_param_shapes) - set(neutral)) == []
    assert {k: v for k, v in neutral.items() if official_param_shapes[k] != v} == {}


# ------------------------------------------------------------------------------------------- 11. errors

def bad_inputs():
    x = torch.as_tensor(np.random.RandomState(0).randint(0, 256, (B, 3, HW, HW)))
    cond = torch.zeros(B)
    return {
        "float images": (x.float() / 255.0, cond, r"must hold integers in \[0, vocab_size\).*float32"),
        "NHWC": (x.permute(0, 2, 3, 1).contiguous(), cond, r"have 8 channels on axis 1.*image_channels is 3.*NCHW"),
        "one channel": (x[:, :1], cond, r"have 1 channels on axis 1.*image_channels is 3"),
        "3-D": (x[0], cond, r"4-D NCHW batch, got shape \(3, 8, 8\)"),
        "negative": (torch.where(x == x.max(), -1, x), cond, r"span \[-1, \d+\].*\[0, 256\)"),
        "too large": (torch.where(x == x.max(), 256, x), cond, r"span \[\d+, 256\].*\[0, 256\).*vocab_size"),
        "nan conditioning": (x, torch.tensor([0.0, float("nan"), 0.0, 0.0]), "non-finite"),
        "inf conditioning": (x, torch.tensor([0.0, 0.0, float("inf"), 0.0]), "non-finite"),
        "conditioning (B, 1)": (x, cond[:, None], r"conditioning must have shape \(4,\).*got \(4, 1\)"),
        "conditioning (B + 1,)": (x, torch.zeros(B + 1), r"conditioning must have shape \(4,\)"),
    }


@pytest.mark.parametrize("case", list(bad_inputs()))
def test_bad_input_raises_clear_error(model, case):
    images, cond, match = bad_inputs()[case]
    with pytest.raises(checks.InputError, match=match):
        model.loss_terms(images, cond, generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------ 12. mirrored layout

def test_public_names_mirror_other_backend(mirror_check):
    assert mirror_check("torch") == []


# ------------------------------------------------------------------------------------------- 13. dropout

def test_dropout_only_when_not_deterministic(make_config, cfg, perturbed):
    """Dropout follows `deterministic` alone (not train()/eval()); its mask comes from torch's global RNG."""
    dropping = with_config(perturbed, make_config(sm_pdrop=0.5))
    x = images_for(cfg)
    cond = torch.zeros(B)
    noise = vdm.draw_noise(torch.Generator().manual_seed(5), x.shape, cfg)

    def diff(seed, deterministic, train_mode):
        dropping.train(train_mode)
        torch.manual_seed(seed)
        return loss(dropping, x, cond, noise, deterministic).diff.numpy()

    a, b, a2 = diff(1, False, False), diff(2, False, False), diff(1, False, True)
    assert np.all(np.abs(a - b) > 1e-3 * np.abs(a)), (a, b)
    np.testing.assert_array_equal(a, a2)
    c, d = diff(1, True, True), diff(2, True, False)
    np.testing.assert_array_equal(c, d)
    np.testing.assert_allclose(c, loss(perturbed, x, cond, noise).diff.numpy(), rtol=1e-6)


# ------------------------------------------------------------------------------------------ torch only

def test_loss_terms_under_inference_mode(cfg, perturbed):
    """Evaluation code commonly runs under torch.inference_mode(); the continuous-time loss needs
    gamma'(t) from autograd there too, and must equal the no_grad result."""
    x = images_for(cfg)
    cond = torch.zeros(B)
    noise = vdm.draw_noise(torch.Generator().manual_seed(5), x.shape, cfg)
    expected = terms_np(loss(perturbed, x, cond, noise))
    with torch.inference_mode():
        got = terms_np(perturbed.loss_terms(x, cond, noise))
    for name, a, b in zip(("recon", "klz", "diff"), got, expected):
        np.testing.assert_allclose(a, b, rtol=1e-6, err_msg=name)


def test_variance_minimisation_gives_the_shape_network_the_gradient_of_the_mean_squared_loss():
    """With variance minimisation the shape network f of the schedule gets d/d eta mean_i(L_i^2) (L_i the
    per-example diffusion loss in bits/dim), computed here the slow way by autograd of that mean; the UNet
    and the endpoints get exactly the VLB's gradient (the same as with the switch off)."""
    import dataclasses

    from vdm_common.types import nats_to_bpd_scale
    plain = ModelConfig.from_config(dict(sm_n_embd=16, sm_n_layer=1, norm_groups=4, sm_pdrop=0.0,
                                         gamma_type="learnable_nnet_endpoints", compute_dtype="float64"))
    varmin = dataclasses.replace(plain, variance_minimisation=True)
    torch.manual_seed(0)
    model = VDM(plain)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (6, 3, 8, 8), generator=gen)
    cond = torch.zeros(6, dtype=torch.float64)
    noise = vdm.draw_noise(gen, images.shape, plain)

    def grads(config, loss_of):
        model.config = config
        model.zero_grad()
        loss_of(model.loss_terms(images, cond, noise)).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    g_vlb = grads(plain, lambda t: vdm.bits_per_dim(t, images.shape[1:])["bpd"])
    g_vm = grads(varmin, lambda t: vdm.bits_per_dim(t, images.shape[1:])["bpd"])
    g_slow = grads(plain, lambda t: torch.mean((t.diff * nats_to_bpd_scale(images.shape[1:])) ** 2))
    model.config = plain
    # f's gradients against the largest of them: l1's is a near-cancelling residue.
    scale = max(g.abs().max().item() for n, g in g_slow.items() if n.startswith("gamma.f."))
    for name in g_vlb:
        if name.startswith("gamma.f."):
            torch.testing.assert_close(g_vm[name], g_slow[name], rtol=0, atol=1e-9 * scale, msg=name)
        else:
            torch.testing.assert_close(g_vm[name], g_vlb[name], rtol=1e-12, atol=1e-15, msg=name)
    assert (g_vm["gamma.f.l2.weight"] - g_vlb["gamma.f.l2.weight"]).abs().max() > \
        0.1 * g_vlb["gamma.f.l2.weight"].abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_weight_abs_derivative_is_jaxs_at_zero(make_config, dtype):
    """weight_abs: torch.abs's values, and JAX's derivative of |x| (jax.grad(jnp.abs) is +1 at 0.0 and at
    -0.0, -1 below 0, measured with jax 0.10), in reverse mode, forward mode and a double backward; so a
    schedule weight at exactly 0 gets a gradient and can leave 0."""
    x = torch.tensor([-2.0, -0.0, 0.0, 3.0], dtype=dtype, requires_grad=True)
    y = schedules.weight_abs(x)
    assert torch.equal(y, torch.abs(x)) and not torch.signbit(y).any()              # -0.0 -> +0.0 as abs
    (grad,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    assert grad.tolist() == [-1.0, 1.0, 1.0, 1.0]
    (second,) = torch.autograd.grad((grad * x).sum(), x)                            # d/dx (sign(x) x)
    assert second.tolist() == [-1.0, 1.0, 1.0, 1.0]
    _, tangent = torch.func.jvp(schedules.weight_abs, (x.detach(),), (torch.ones_like(x),))
    assert tangent.tolist() == [-1.0, 1.0, 1.0, 1.0]

    # Each place a schedule takes |.|, at exactly 0: the gradient JAX gives there, not torch.abs's 0.
    scalar = schedules.LearnedScalar(make_config(gamma_type="learnable_scalar")).to(dtype)
    with torch.no_grad():
        scalar.w.zero_()
    scalar(0.25).backward()
    assert scalar.w.grad.item() == 0.25                                            # d (b + |w| t) / dw = t
    layer = schedules.DenseMonotone(2, 1, bias=False).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.0, -0.5]]))
    layer(torch.tensor([[3.0, 4.0]], dtype=dtype)).sum().backward()
    assert layer.weight.grad.tolist() == [[3.0, -4.0]]
    ends = schedules.LearnedNNetEndpoints(make_config(gamma_type="learnable_nnet_endpoints")).to(dtype)
    with torch.no_grad():
        ends.gamma_1.copy_(ends.gamma_0)
    ends.endpoints()[1].backward()                                   # g1 = g0 + |gamma_1 - g0|
    assert ends.gamma_1.grad.item() == 1.0 and ends.gamma_0.grad.item() == 0.0
