"""Core unit tests of the JAX backend: score UNet, schedules, VLB terms, sampler, dtypes, input errors.

Mirrored by tests/test_core_torch.py (same test names). Tiny models (tests/conftest.py), 8x8 images, NHWC.
Every expected number comes from an independent numpy formula (conftest `ref`) or from an identity the
model must satisfy; float64 runs inside `jax.enable_x64(True)` so the flag does not leak into other tests.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from vdm_common import checks  # noqa: E402
from vdm_common.config import GAMMA_TYPES, ModelConfig, load_config, model_config  # noqa: E402
from vdm_jax import schedules, unet, vdm  # noqa: E402
from vdm_jax.unet import ScoreUNet  # noqa: E402
from vdm_jax.vdm import VDM, Noise  # noqa: E402

pytestmark = pytest.mark.jax

HW, B = 8, 4


@pytest.fixture(scope="module", autouse=True)
def fast_compiles():
    """XLA's optimisation passes take about 2/3 of the compile time of these tiny models, and the tests
    compile a dozen of them; the function computed is the same. Restored after this module."""
    old = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)


# ------------------------------------------------------------------------------------------------ helpers

def images_for(config, seed=0, batch=B):
    rs = np.random.RandomState(seed)
    return jnp.asarray(rs.randint(0, config.vocab_size, (batch, HW, HW, config.image_channels)), jnp.int32)


def normal(seed, shape, dtype=np.float32):
    return np.random.RandomState(seed).standard_normal(shape).astype(dtype)


def init(config):
    return jax.jit(functools.partial(vdm.init_params, config, image_shape=(HW, HW, config.image_channels)))(
        jax.random.PRNGKey(0))


def perturb(params, seed=1, scale=0.05):
    """Every parameter plus N(0, scale^2) noise: the zero-initialised convs become non-zero, so eps_hat != z.
    (numpy draws: jax.random would compile once per parameter shape.)"""
    rs = np.random.RandomState(seed)
    return jax.tree_util.tree_map(
        lambda a: jnp.asarray(np.asarray(a) + scale * rs.standard_normal(a.shape).astype(a.dtype)), params)


def restrict(params, config):
    """The parameters of the smaller model `config` (fewer blocks) taken from a bigger model's tree, cast to
    config's dtype: same weights, faster compiles."""
    shapes = jax.eval_shape(functools.partial(vdm.init_params, config, image_shape=(HW, HW, config.image_channels)),
                            jax.random.PRNGKey(0))
    return jax.tree_util.tree_map_with_path(
        lambda path, s: jnp.asarray(functools.reduce(lambda node, k: node[k.key], path, params), s.dtype), shapes)


@functools.lru_cache(maxsize=None)
def loss_fn(config, deterministic=True):
    """jit(params, images, conditioning, noise, dropout_rng) -> LossTerms, one compile per config."""
    model = VDM(config)
    return jax.jit(lambda params, images, cond, noise, rng: model.apply(
        params, images, cond, noise, deterministic, rngs={"dropout": rng}))


@functools.lru_cache(maxsize=None)
def unet_fn(config):
    """jit(score_params, z, g_t, conditioning) -> eps_hat."""
    return jax.jit(ScoreUNet(config).apply)


@functools.lru_cache(maxsize=None)
def step_fn(config, T):
    """jit(params, z_t, i, conditioning, eps) -> z_s, i traced."""
    return jax.jit(lambda params, z, i, cond, eps: VDM(config).apply(params, z, i, T, cond, eps,
                                                                      method=VDM.sample_step))


def terms_np(terms):
    return [np.asarray(x, np.float64) for x in terms]


def score_params(params):
    return {"params": params["params"]["score_model"]}


def gamma_params(params):
    """The schedule's parameters, neutral names relative to gamma/ (as conftest.gamma wants them)."""
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params["params"].get("gamma", {}))[0]:
        flat["/".join(k.key for k in path)] = np.asarray(leaf)
    return flat


@pytest.fixture(scope="module")
def cfg(make_config):
    return make_config()          # learnable_scalar, attention and Fourier features on, 3 channels, V=256


@pytest.fixture(scope="module")
def params(cfg):
    return init(cfg)


@pytest.fixture(scope="module")
def perturbed(params):
    return perturb(params)


# ------------------------------------------------------------------------------------------ 1. the UNet

def test_unet_returns_z_at_init(cfg, params, perturbed):
    z = normal(0, (B, HW, HW, 3)) * 2.0
    cond = np.array([0.0, 1.0, 0.0, 1.0], np.float32)
    for g_t in (np.linspace(-13.3, 5.0, B).astype(np.float32), np.float32(-2.0)):    # (B,) and 0-d
        out = unet_fn(cfg)(score_params(params), z, g_t, cond)
        assert out.dtype == jnp.float32 and out.shape == z.shape
        np.testing.assert_array_equal(np.asarray(out), z)
    # The identity comes from the zero output conv: with it perturbed, eps_hat moves away from z.
    out = unet_fn(cfg)(score_params(perturbed), z, np.float32(-2.0), cond)
    assert np.abs(np.asarray(out) - z).mean() > 1e-2


def test_timestep_embedding_matches_formula(ref):
    t = np.array([0.0, 0.013, 0.5, 1.0], np.float32)
    got = np.asarray(unet.timestep_embedding(jnp.asarray(t), 16), np.float64)
    np.testing.assert_allclose(got, ref.timestep_embedding(t, 16), atol=2e-4)      # angles up to 1000 rad


@pytest.mark.parametrize("order", ["channel_major", "frequency_major"])
def test_fourier_features_match_formula(ref, order):
    z = normal(0, (2, 3, 3, 3)) * 0.1                                             # |z 2 pi 128| ~ 100 rad
    got = np.asarray(unet.fourier_features(jnp.asarray(z), 6, 8, order), np.float64)
    assert got.shape == (2, 3, 3, 12)
    np.testing.assert_allclose(got, ref.fourier_features(z, 6, 8, order), atol=1e-4)


# ---------------------------------------------------------------------------------------- 2. the decoder

@pytest.mark.parametrize("vocab,g_0", [(256, -13.3), (17, -8.0)])
def test_decoder_normalised_and_sharp_at_high_snr(make_config, ref, vocab, g_0):
    config = make_config(vocab_size=vocab)
    x = np.asarray(images_for(config, seed=vocab))
    f = ref.encode(x, vocab)
    e = np.random.RandomState(1).uniform(-1.0, 1.0, x.shape)            # noise of at most one sigma_0
    z = (f + math.exp(0.5 * g_0) * e).astype(np.float32)
    logp = np.asarray(VDM(config).apply({}, z, jnp.float32(g_0), method=VDM.decode), np.float64)
    assert logp.shape == x.shape + (vocab,)
    np.testing.assert_allclose(np.exp(logp).sum(-1), 1.0, atol=1e-6)
    p_true = np.exp(np.take_along_axis(logp, x[..., None], axis=-1))[..., 0]
    assert p_true.min() > 0.99, p_true.min()
    np.testing.assert_allclose(np.exp(logp), np.exp(ref.decoder_logprobs(z, g_0, vocab)), atol=1e-5)
    # log_prob picks the true value's entry and sums it over the image.
    log_prob = VDM(config).apply({}, x, z, jnp.float32(g_0), method=VDM.log_prob)
    np.testing.assert_allclose(np.asarray(log_prob), np.log(p_true).reshape(B, -1).sum(1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("vocab", [256, 17])
def test_decoder_spread_at_low_snr(make_config, ref, vocab):
    config = make_config(vocab_size=vocab)
    z = normal(2, (B, HW, HW, 3))
    logp = np.asarray(VDM(config).apply({}, z, jnp.float32(5.0), method=VDM.decode), np.float64)
    np.testing.assert_allclose(np.exp(logp).sum(-1), 1.0, atol=1e-6)
    assert np.exp(logp).max() < 0.5
    np.testing.assert_allclose(np.exp(logp), np.exp(ref.decoder_logprobs(z, 5.0, vocab)), atol=1e-6)


def test_decoder_normalised_float64(make_config, ref):
    with jax.enable_x64(True):
        config = make_config(compute_dtype="float64")
        z = normal(3, (B, HW, HW, 3), np.float64) * 0.5
        logp = VDM(config).apply({}, z, jnp.float64(-13.3), method=VDM.decode)
        assert logp.dtype == jnp.float64
        logp = np.asarray(logp)
    np.testing.assert_allclose(np.exp(logp).sum(-1), 1.0, atol=1e-12)
    np.testing.assert_allclose(logp, ref.decoder_logprobs(z, -13.3, 256), atol=1e-6)


# ----------------------------------------------------------------------------------- 3. the VLB's terms

def test_kl_and_recon_match_closed_form(cfg, perturbed, ref):
    """With every parameter perturbed (so gamma_0, gamma_1 are not the config's), the prior and
    reconstruction terms equal their formulas; the diffusion term is 1/2 gamma' ||eps - eps_hat||^2."""
    x = images_for(cfg)
    cond = np.zeros(B, np.float32)
    noise = vdm.draw_noise(jax.random.PRNGKey(5), x.shape, cfg)
    recon, klz, diff = terms_np(loss_fn(cfg)(perturbed, x, cond, noise, jax.random.PRNGKey(0)))

    p = gamma_params(perturbed)
    w, b = abs(float(p["w"][0])), float(p["b"][0])
    g_0, g_1 = b, b + w
    assert abs(g_1 - 5.0) > 1e-4                                        # the perturbation moved gamma_1
    f = ref.encode(np.asarray(x), 256)
    alpha2, sigma2 = ref.sigmoid(-g_1), ref.sigmoid(g_1)
    expected_kl = 0.5 * (alpha2 * f ** 2 + sigma2 - np.log(sigma2) - 1.0).sum(axis=(1, 2, 3))
    np.testing.assert_allclose(klz, expected_kl, rtol=1e-4)            # float32 sum of 192 small terms

    logp = ref.decoder_logprobs(f + np.exp(0.5 * g_0) * np.asarray(noise.eps_0, np.float64), g_0, 256)
    expected_recon = -np.take_along_axis(logp, np.asarray(x)[..., None], axis=-1).sum(axis=(1, 2, 3, 4))
    np.testing.assert_allclose(recon, expected_recon, rtol=1e-3, atol=1e-4)

    t = np.asarray(noise.t, np.float64)
    var_t = ref.sigmoid(b + w * t)[:, None, None, None]
    eps = np.asarray(noise.eps, np.float64)
    z_t = np.sqrt(1.0 - var_t) * f + np.sqrt(var_t) * eps
    eps_hat = unet_fn(cfg)(score_params(perturbed), z_t.astype(np.float32), (b + w * t).astype(np.float32), cond)
    mse = ((eps - np.asarray(eps_hat, np.float64)) ** 2).sum(axis=(1, 2, 3))
    np.testing.assert_allclose(diff, 0.5 * w * mse, rtol=1e-4)


def test_discrete_loss_converges_to_continuous(make_config, params, check_discrete_converges):
    """Same weights (perturbed), same eps, same t (the grid j/10, which lies on every k/T grid) for
    T = 10, 100, 1000, 10000 and continuous time, in float64. See conftest.assert_discrete_converges for
    why the gap is positive and decreases monotonically to 0."""
    reps = 2
    small = dict(compute_dtype="float64", sm_n_layer=0, with_attention=False)    # no down blocks: fast compiles
    with jax.enable_x64(True):
        base = make_config(**small)
        p64 = restrict(perturb(params, seed=2), base)
        x = images_for(base, seed=3, batch=10 * reps)
        cond = jnp.zeros(10 * reps, jnp.float64)
        eps, eps_0 = normal(4, x.shape, np.float64), normal(5, x.shape, np.float64)
        j = np.repeat(np.arange(1, 11), reps)
        losses = {}
        for T in (0, 10, 100, 1000, 10000):
            config = make_config(**small, sm_n_timesteps=T)
            # t = k / T with integer k = j T / 10: exactly the float64 value j / 10 on every grid.
            t = (j * (T // 10)) / T if T else j / 10
            terms = loss_fn(config)(p64, x, cond, Noise(jnp.asarray(t), jnp.asarray(eps), jnp.asarray(eps_0)),
                                    jax.random.PRNGKey(0))
            assert terms.diff.dtype == jnp.float64
            losses[T] = float(terms.diff.mean())
    w = abs(float(p64["params"]["gamma"]["w"][0]))
    continuous = losses.pop(0)
    check_discrete_converges(losses, continuous, w)


def test_draw_noise_antithetic_and_discrete_rounding(make_config):
    for T in (0, 10):
        config = make_config(sm_n_timesteps=T)
        noise = vdm.draw_noise(jax.random.PRNGKey(T), (64, HW, HW, 3), config)
        t = np.sort(np.asarray(noise.t, np.float64))
        assert noise.eps.shape == noise.eps_0.shape == (64, HW, HW, 3)
        assert not np.allclose(noise.eps, noise.eps_0)
        assert 0.0 <= t.min() and t.max() <= 1.0
        if T == 0:
            np.testing.assert_allclose(np.diff(t), 1.0 / 64, atol=1e-6)         # t0 + k/B mod 1
        else:
            np.testing.assert_allclose(t * T, np.round(t * T), atol=1e-5)      # on the grid k/T
            assert t.min() >= 1.0 / T - 1e-7                                   # rounded up: s = t - 1/T >= 0


# -------------------------------------------------------------------------------------------- 5. schedules

def perturb_schedule(variables, seed):
    """Parameters moved by N(0, 1) with the raw slope weights made negative (|w| is what counts) and, for
    the endpoints schedule, the raw gamma_1 put below gamma_0."""
    rs = np.random.RandomState(seed)

    def move(path, a):
        name = "/".join(k.key for k in path)
        a = np.asarray(a) + rs.standard_normal(a.shape).astype(a.dtype)
        return jnp.asarray(-np.abs(a) if name.endswith(("w", "l1/kernel")) else a)

    out = jax.tree_util.tree_map_with_path(move, variables["params"])
    if "gamma_1" in out:
        out["gamma_1"] = out["gamma_0"] - 3.0
    return {"params": out}


@pytest.mark.parametrize("gamma_type", GAMMA_TYPES)
def test_schedule_increasing_with_endpoints(make_config, ref, gamma_type):
    config = make_config(gamma_type=gamma_type)
    schedule = schedules.make_schedule(config)
    variables = schedule.init(jax.random.PRNGKey(0), jnp.zeros(()))
    grid = np.linspace(0.0, 1.0, 1001, dtype=np.float32)
    apply = jax.jit(schedule.apply)

    def check(variables):
        g = np.asarray(apply(variables, grid), np.float64)
        assert g.shape == grid.shape
        assert np.all(np.diff(g) > 0), np.diff(g).min()
        p = gamma_params({"params": {"gamma": variables.get("params", {})}})
        np.testing.assert_allclose(g, ref.gamma(config, p, grid)[0], rtol=1e-5, atol=1e-5)
        return g, p

    g, p = check(variables)
    assert apply(variables, 0.5).shape == () and apply(variables, jnp.zeros((3,))).shape == (3,)
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
            check(perturb_schedule(variables, seed))


# ---------------------------------------------------------------------------------- 6. every combination

def test_loss_terms_finite_positive(make_config, ref, combo):
    """At init (eps_hat = z_t) every term also equals its numpy formula."""
    config = make_config(**combo)
    x = images_for(config, seed=7)
    cond = np.array([0.0, 1.0, 1.0, 0.0], np.float32)
    noise = vdm.draw_noise(jax.random.PRNGKey(8), x.shape, config)
    terms, variables = jax.jit(lambda k, x, c, n: VDM(config).init_with_output({"params": k}, x, c, n))(
        jax.random.PRNGKey(0), x, cond, noise)
    got = terms_np(terms)
    for name, value in zip(terms._fields, got):
        assert value.shape == (B,) and terms[0].dtype == jnp.float32
        assert np.all(np.isfinite(value)) and np.all(value > 0), (name, value)
    expected = ref.vlb_terms_at_init(config, gamma_params(variables), np.asarray(x), np.asarray(noise.t, np.float64),
                                     np.asarray(noise.eps, np.float64), np.asarray(noise.eps_0, np.float64))
    # recon sums log-softmaxes of logits up to 1e6 (float32); T = 1000 differences gamma to 5e-5.
    for name, value, want, rtol, atol in zip(terms._fields, got, expected, (2e-3, 1e-4, 2e-4), (1e-3, 0, 0)):
        np.testing.assert_allclose(value, want, rtol=rtol, atol=atol, err_msg=name)


# ----------------------------------------------------------------------------------------- 7. float64

def test_float64_end_to_end(make_config, params):
    with jax.enable_x64(True):
        shapes = jax.eval_shape(functools.partial(vdm.init_params, make_config(compute_dtype="float64"),
                                                  image_shape=(HW, HW, 3)), jax.random.PRNGKey(0))
        assert {a.dtype for a in jax.tree_util.tree_leaves(shapes)} == {jnp.dtype("float64")}
        # Every layer type (resnet, attention, Fourier features), without the down blocks: faster compiles.
        config = make_config(compute_dtype="float64", sm_n_layer=0)
        p64 = restrict(perturb(params), config)
        x = images_for(config)
        cond = jnp.zeros(B, jnp.float64)
        noise = vdm.draw_noise(jax.random.PRNGKey(1), x.shape, config)
        assert {a.dtype for a in noise} == {jnp.dtype("float64")}

        def total(p):
            terms = VDM(config).apply(p, x, cond, noise)
            return sum(v.mean() for v in terms), terms

        (value, terms), grads = jax.jit(jax.value_and_grad(total, has_aux=True))(p64)
        assert {a.dtype for a in terms} == {jnp.dtype("float64")} and value.dtype == jnp.float64
        leaves = jax.tree_util.tree_leaves(grads)
        assert {a.dtype for a in leaves} == {jnp.dtype("float64")}
        assert all(bool(jnp.all(jnp.isfinite(a))) for a in leaves)
        assert float(jnp.abs(grads["params"]["gamma"]["w"]).max()) > 0

        z_1 = jnp.asarray(normal(2, x.shape, np.float64))
        images, z_0 = vdm.sample(config, p64, z_1, 3, cond, step_noise=jnp.asarray(normal(3, (3,) + x.shape,
                                                                                        np.float64)))
        assert z_0.dtype == jnp.float64 and images.dtype == jnp.int32
        assert np.all(np.isfinite(np.asarray(z_0)))


# ------------------------------------------------------------------------------------------ 8. sampling

def test_sample_shapes_range_and_determinism(cfg, perturbed):
    T = 10
    z_1 = jnp.asarray(normal(0, (B, HW, HW, 3)))
    cond = jnp.zeros(B)
    noise_a, noise_b = (jnp.asarray(normal(s, (T, B, HW, HW, 3))) for s in (1, 2))
    images, z_0, traj = vdm.sample(cfg, perturbed, z_1, T, cond, step_noise=noise_a, return_trajectory=True)
    assert images.shape == (B, HW, HW, 3) and images.dtype == jnp.int32
    assert 0 <= int(images.min()) and int(images.max()) < cfg.vocab_size
    assert traj.shape == (T + 1, B, HW, HW, 3)
    np.testing.assert_array_equal(traj[0], z_1)
    np.testing.assert_array_equal(traj[-1], z_0)
    again = vdm.sample(cfg, perturbed, z_1, T, cond, step_noise=noise_a, return_trajectory=True)
    for a, b in zip((images, z_0, traj), again):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    other = vdm.sample(cfg, perturbed, z_1, T, cond, step_noise=noise_b, return_trajectory=True)
    assert np.abs(np.asarray(other[1]) - np.asarray(z_0)).max() > 1e-3
    # Every step of the trajectory is one sample_step with that step's noise.
    for i in range(T):
        np.testing.assert_allclose(np.asarray(step_fn(cfg, T)(perturbed, traj[i], i, cond, noise_a[i])),
                                   np.asarray(traj[i + 1]),
                                   rtol=1e-5, atol=1e-5)
    # Without injected noise the step noise comes from rng, reproducibly.
    first = vdm.sample(cfg, perturbed, z_1, T, cond, rng=jax.random.PRNGKey(3))
    second = vdm.sample(cfg, perturbed, z_1, T, cond, rng=jax.random.PRNGKey(3))
    np.testing.assert_array_equal(np.asarray(first[1]), np.asarray(second[1]))


@pytest.mark.parametrize("i", [0, 5, 9])
def test_sample_step_matches_formula(cfg, perturbed, ref, i):
    """Mean and noise scale of the step, checked apart: z_s(eps = 0) is the mean, z_s(eps) - z_s(0) the noise."""
    T = 10
    z_t, eps = normal(10 + i, (B, HW, HW, 3)), normal(20 + i, (B, HW, HW, 3))
    cond = np.array([0.0, 1.0, 0.0, 1.0], np.float32)
    z_s = step_fn(cfg, T)(perturbed, z_t, i, cond, eps)
    mean = np.asarray(step_fn(cfg, T)(perturbed, z_t, i, cond, np.zeros_like(eps)), np.float64)
    assert z_s.shape == z_t.shape and z_s.dtype == jnp.float32
    p = gamma_params(perturbed)
    w, b = abs(float(p["w"][0])), float(p["b"][0])
    g_t, g_s = b + w * (T - i) / T, b + w * (T - i - 1) / T
    eps_hat = np.asarray(unet_fn(cfg)(score_params(perturbed), z_t, np.full((B,), g_t, np.float32), cond), np.float64)
    expected = ref.sample_step(z_t.astype(np.float64), eps_hat, eps.astype(np.float64), g_s, g_t)
    expected_mean = ref.sample_step(z_t.astype(np.float64), eps_hat, 0.0, g_s, g_t)
    np.testing.assert_allclose(mean, expected_mean, rtol=1e-4, atol=1e-5)
    scale = (np.asarray(z_s, np.float64) - mean) / eps                               # sigma_s sqrt(c) per pixel
    expected_scale = np.sqrt(ref.sigmoid(g_s) * -np.expm1(g_s - g_t))
    np.testing.assert_allclose(np.median(scale), expected_scale, rtol=1e-3)
    np.testing.assert_allclose(np.asarray(z_s, np.float64), expected, rtol=1e-4, atol=1e-5)


def test_generate_x_is_argmax_of_decode(make_config, cfg, params, ref):
    model = VDM(cfg)
    g_0 = float(model.apply(params, 0.0, method=lambda m, t: m.gamma(t)))
    alpha_0, sigma_0 = math.sqrt(ref.sigmoid(-g_0)), math.sqrt(ref.sigmoid(g_0))
    z_0 = normal(0, (B, HW, HW, 3)) * 0.6
    out = model.apply(params, z_0, method=VDM.generate_x)
    assert out.dtype == jnp.int32 and out.shape == z_0.shape
    logp = model.apply(params, jnp.asarray(z_0 / alpha_0), jnp.float32(g_0), method=VDM.decode)
    np.testing.assert_array_equal(np.asarray(out), np.argmax(np.asarray(logp), axis=-1))
    # From z_0 = alpha_0 f(x) + half a sigma_0 of noise, the argmax is x itself.
    x = np.asarray(images_for(cfg, seed=9))
    z_0 = (alpha_0 * ref.encode(x, 256) + 0.5 * sigma_0 * normal(1, x.shape)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(model.apply(params, z_0, method=VDM.generate_x)), x)
    # sample_softmax: at the midpoint between bins v and v + 1 both come out, about half the time each.
    sampled_cfg = make_config(sample_softmax=True)
    v = x.clip(0, 254)
    z_mid = (alpha_0 * (ref.encode(v, 256) + 1.0 / 256)).astype(np.float32)
    draws = np.asarray(VDM(sampled_cfg).apply(params, z_mid, jax.random.PRNGKey(0), method=VDM.generate_x))
    assert set(np.unique(draws - v)) == {0, 1}
    assert 0.4 < (draws - v).mean() < 0.6
    again = VDM(sampled_cfg).apply(params, z_mid, jax.random.PRNGKey(0), method=VDM.generate_x)
    np.testing.assert_array_equal(np.asarray(again), draws)


# ------------------------------------------------------------------------------------------------ 9. bf16

@pytest.fixture(scope="module")
def bf16_and_float32_terms(make_config, cfg, perturbed):
    """Loss terms of the perturbed model with bfloat16 and float32 compute, same params and noise."""
    config = make_config(compute_dtype="bfloat16")
    x = images_for(cfg)
    cond = np.zeros(B, np.float32)
    noise = vdm.draw_noise(jax.random.PRNGKey(5), x.shape, cfg)
    return [loss_fn(c)(perturbed, x, cond, noise, jax.random.PRNGKey(0)) for c in (config, cfg)]


def test_bf16_compute_close_to_float32(make_config, bf16_and_float32_terms):
    shapes = jax.eval_shape(functools.partial(vdm.init_params, make_config(compute_dtype="bfloat16"),
                                              image_shape=(HW, HW, 3)), jax.random.PRNGKey(0))
    assert {a.dtype for a in jax.tree_util.tree_leaves(shapes)} == {jnp.dtype("float32")}
    low, full = bf16_and_float32_terms
    assert {a.dtype for a in low} == {jnp.dtype("float32")}
    for name, a, b in zip(low._fields, terms_np(low), terms_np(full)):
        np.testing.assert_allclose(a, b, rtol=5e-2, err_msg=name)


def test_bf16_compute_changes_unet_activations(bf16_and_float32_terms):
    """The option is not a no-op: the diffusion term (the only one through the UNet) moves by bf16 rounding."""
    low, full = (terms_np(terms) for terms in bf16_and_float32_terms)
    rel = np.abs(low[2] - full[2]) / full[2]
    assert np.all(rel > 1e-6) and np.all(rel < 5e-2), rel


# ------------------------------------------------------------------------------- 10. official param tree

def test_param_tree_matches_official_cifar10(official_param_shapes):
    config = model_config(load_config("configs/cifar10.py"))
    shapes = jax.eval_shape(functools.partial(vdm.init_params, config, image_shape=(32, 32, 3)),
                            jax.random.PRNGKey(0))
    assert set(shapes) == {"params"}
    ours = {"/".join(k.key for k in path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(shapes["params"])[0]}
    assert len(official_param_shapes) == 691
    assert sum(math.prod(s) for s in official_param_shapes.values()) == 30_578_181
    assert sorted(set(ours) - set(official_param_shapes)) == []
    assert sorted(set(official_param_shapes) - set(ours)) == []
    assert {k: v for k, v in ours.items() if official_param_shapes[k] != v} == {}
    assert sum(math.prod(s) for s in ours.values()) == 30_578_181


# ------------------------------------------------------------------------------------------- 11. errors

def bad_inputs():
    x = np.asarray(np.random.RandomState(0).randint(0, 256, (B, HW, HW, 3)), np.int32)
    cond = np.zeros(B, np.float32)
    return {
        "float images": (x.astype(np.float32) / 255.0, cond, r"must hold integers in \[0, vocab_size\).*float32"),
        "NCHW": (x.transpose(0, 3, 1, 2).copy(), cond, r"have 8 channels on axis 3.*image_channels is 3.*NHWC"),
        "one channel": (x[..., :1], cond, r"have 1 channels on axis 3.*image_channels is 3"),
        "3-D": (x[0], cond, r"4-D NHWC batch, got shape \(8, 8, 3\)"),
        "negative": (np.where(x == x.max(), -1, x), cond, r"span \[-1, \d+\].*\[0, 256\)"),
        "too large": (np.where(x == x.max(), 256, x), cond, r"span \[\d+, 256\].*\[0, 256\).*vocab_size"),
        "nan conditioning": (x, np.array([0.0, np.nan, 0.0, 0.0], np.float32), "non-finite"),
        "inf conditioning": (x, np.array([0.0, 0.0, np.inf, 0.0], np.float32), "non-finite"),
        "conditioning (B, 1)": (x, cond[:, None], r"conditioning must have shape \(4,\).*got \(4, 1\)"),
        "conditioning (B + 1,)": (x, np.zeros(B + 1, np.float32), r"conditioning must have shape \(4,\)"),
    }


@pytest.mark.parametrize("case", list(bad_inputs()))
def test_bad_input_raises_clear_error(cfg, params, case):
    images, cond, match = bad_inputs()[case]
    with pytest.raises(checks.InputError, match=match):
        VDM(cfg).apply(params, images, cond, rngs={"sample": jax.random.PRNGKey(0)})


# ------------------------------------------------------------------------------------ 12. mirrored layout

def test_public_names_mirror_other_backend(mirror_check):
    assert mirror_check("jax") == []


# ------------------------------------------------------------------------------------------- 13. dropout

def test_dropout_only_when_not_deterministic(make_config, cfg, perturbed):
    config = make_config(sm_pdrop=0.5)
    x = images_for(config)
    cond = np.zeros(B, np.float32)
    noise = vdm.draw_noise(jax.random.PRNGKey(5), x.shape, config)
    k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
    train = loss_fn(config, deterministic=False)
    a, b, a2 = (np.asarray(train(perturbed, x, cond, noise, k).diff) for k in (k1, k2, k1))
    assert np.all(np.abs(a - b) > 1e-3 * np.abs(a)), (a, b)
    np.testing.assert_array_equal(a, a2)
    det = loss_fn(config, deterministic=True)
    c, d = (np.asarray(det(perturbed, x, cond, noise, k).diff) for k in (k1, k2))
    np.testing.assert_array_equal(c, d)
    np.testing.assert_allclose(c, np.asarray(loss_fn(cfg)(perturbed, x, cond, noise, k1).diff), rtol=1e-6)


# -------------------------------------------------------------------------------------------- JAX only

@pytest.mark.parametrize("shape", [(B + 1,), (B, 1)])
def test_bad_conditioning_shape_under_jit(cfg, params, shape):
    """The conditioning's shape is static, so jit (the trainer's path) can check it like the images' shape."""
    x = images_for(cfg)
    with pytest.raises(checks.InputError, match=r"conditioning must have shape \(4,\)"):
        loss_fn(cfg)(params, x, jnp.zeros(shape), vdm.draw_noise(jax.random.PRNGKey(0), x.shape, cfg),
                     jax.random.PRNGKey(0))


def test_variance_minimisation_gives_the_shape_network_the_gradient_of_the_mean_squared_loss():
    """With variance minimisation the shape network f of the schedule gets d/d eta mean_i(L_i^2) (L_i the
    per-example diffusion loss in bits/dim), computed here the slow way by autodiff of that mean; the UNet
    and the endpoints get exactly the VLB's gradient (the same as with the switch off)."""
    from vdm_common.types import nats_to_bpd_scale
    from vdm_common.weights import flatten_tree, unflatten_tree
    with jax.enable_x64(True):
        plain = ModelConfig.from_config(dict(sm_n_embd=16, sm_n_layer=1, norm_groups=4, sm_pdrop=0.0,
                                             gamma_type="learnable_nnet_endpoints", compute_dtype="float64"))
        varmin = dataclasses.replace(plain, variance_minimisation=True)
        rs = np.random.RandomState(0)
        flat = flatten_tree(jax.device_get(vdm.init_params(plain, jax.random.PRNGKey(0), (8, 8, 3))["params"]))
        params = unflatten_tree({k: v + 0.05 * rs.standard_normal(v.shape) for k, v in flat.items()})
        images = jnp.asarray(rs.randint(0, 256, (6, 8, 8, 3)))
        cond = jnp.zeros(6)
        noise = vdm.draw_noise(jax.random.PRNGKey(1), images.shape, plain)

        def bpd(p, config):
            terms = VDM(config).apply({"params": p}, images, cond, noise)
            return vdm.bits_per_dim(terms, images.shape[1:])["bpd"]

        def mean_squared(p):
            diff = VDM(plain).apply({"params": p}, images, cond, noise).diff * nats_to_bpd_scale(images.shape[1:])
            return jnp.mean(diff ** 2)

        assert bpd(params, plain) == pytest.approx(float(bpd(params, varmin)), rel=1e-14)
        g_vlb, g_vm, g_slow = (flatten_tree(jax.device_get(g)) for g in (
            jax.grad(bpd)(params, plain), jax.grad(bpd)(params, varmin), jax.grad(mean_squared)(params)))
        # f's gradients against the largest of them: l1's is a near-cancelling residue (its bias cancels in
        # the normalised shape exactly), so a per-tensor relative error would measure rounding.
        scale = max(np.abs(g_slow[k]).max() for k in g_slow if k.startswith("gamma/f/"))
        for key in g_vlb:
            if key.startswith("gamma/f/"):
                np.testing.assert_allclose(g_vm[key], g_slow[key], rtol=0, atol=1e-9 * scale, err_msg=key)
            else:
                np.testing.assert_allclose(g_vm[key], g_vlb[key], rtol=1e-12, atol=1e-15, err_msg=key)
        # The two gradients of f differ (so the test above can tell them apart).
        assert np.abs(g_vm["gamma/f/l2/kernel"] - g_vlb["gamma/f/l2/kernel"]).max() > \
            0.1 * np.abs(g_vlb["gamma/f/l2/kernel"]).max()
