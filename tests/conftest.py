"""Shared pieces of the core unit tests of both backends (tests/test_core_jax.py, tests/test_core_torch.py).

Framework-free on purpose: tiny model configs, the loss-term combinations, independent numpy references
of the VDM formulas (float64, written from the paper, not from the library), the official parameter
shapes, and the mirrored-layout check. Each backend's tests reach them through the fixtures below.
"""
from __future__ import annotations

import ast
import json
import os
import pathlib
import re
import tempfile
from types import SimpleNamespace

import numpy as np
import pytest

from vdm_common.config import ModelConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = pathlib.Path(__file__).resolve().parent / "data"

# The JAX engine's persistent compilation cache (on by default, in ~/.cache/vdm/jax) in a directory of this
# test session, for the tests and the trainers they start: tests neither read a user's cache nor fill it.
os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="vdm-test-jax-cache-")

HW = 8          # images are HW x HW in every core test
BATCH = 4

# Tiny model: compiles in about a second, runs in milliseconds.
SMALL = dict(sm_n_embd=16, sm_n_layer=1, norm_groups=4, sm_pdrop=0.0, image_channels=3, vocab_size=256,
             gamma_type="learnable_scalar", with_attention=True, with_fourier_features=True)

# Every schedule in both continuous and discrete time; attention, Fourier features, 1 / 3 channels and
# vocab 256 / 17 each on and off (pairwise, not the full product, to stay fast). Vocab 17 goes with the
# quickstart's gamma range: at gamma_0 = -13.3 its bins are 90 sigma_0 wide and recon is exactly 0.
# No resnet blocks on the way down (the middle and up.block_0 remain): these paths compile fastest.
COMBOS = {
    "fixed-cont-fourier-c3-v256": dict(gamma_type="fixed", sm_n_timesteps=0, with_attention=False,
                                       with_fourier_features=True, image_channels=3, vocab_size=256),
    "fixed-T10-attn-c1-v17": dict(gamma_type="fixed", sm_n_timesteps=10, with_attention=True,
                                  with_fourier_features=False, image_channels=1, vocab_size=17,
                                  gamma_min=-8.0, gamma_max=6.0),
    "scalar-cont-attn-c3-v17": dict(gamma_type="learnable_scalar", sm_n_timesteps=0, with_attention=True,
                                    with_fourier_features=False, image_channels=3, vocab_size=17,
                                    gamma_min=-8.0, gamma_max=6.0),
    "scalar-T1000-fourier-c1-v256": dict(gamma_type="learnable_scalar", sm_n_timesteps=1000,
                                         with_attention=False, with_fourier_features=True, image_channels=1,
                                         vocab_size=256, fourier_order="frequency_major"),
    "nnet-cont-c1-v256": dict(gamma_type="learnable_nnet", sm_n_timesteps=0, with_attention=False,
                              with_fourier_features=False, image_channels=1, vocab_size=256),
    "nnet-T10-attn2-fourier-c3-v17": dict(gamma_type="learnable_nnet", sm_n_timesteps=10, with_attention=True,
                                          attention_heads=2, with_fourier_features=True, image_channels=3,
                                          vocab_size=17, gamma_min=-8.0, gamma_max=6.0),
    "endpoints-varmin-cont-c1-v256": dict(gamma_type="learnable_nnet_endpoints", variance_minimisation=True,
                                          sm_n_timesteps=0, with_attention=False, with_fourier_features=True,
                                          image_channels=1, vocab_size=256),
}
COMBOS = {name: dict(fields, sm_n_layer=0) for name, fields in COMBOS.items()}


def small_config(**fields) -> ModelConfig:
    """The tiny validated model config with `fields` changed."""
    return ModelConfig.from_config(dict(SMALL, **fields))


def pytest_generate_tests(metafunc):
    if "combo" in metafunc.fixturenames:
        metafunc.parametrize("combo", list(COMBOS.values()), ids=list(COMBOS))


@pytest.fixture(scope="session")
def make_config():
    return small_config


# ------------------------------------------------------------------------------------ numpy references

def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def encode(x, vocab_size):
    """Bin centre of integer x in (-1, 1): f = 2 (x + 1/2) / V - 1."""
    return 2.0 * (np.asarray(x, np.float64) + 0.5) / vocab_size - 1.0


def decoder_logprobs(z_rescaled, g_0, vocab_size):
    """log p(x = v | z_0) for every v: the Gaussian q(z_0 | x = v) normalised over v. Shape (..., V)."""
    values = encode(np.arange(vocab_size), vocab_size)
    logits = -0.5 * ((np.asarray(z_rescaled, np.float64)[..., None] - values) / np.exp(0.5 * g_0)) ** 2
    logits = logits - logits.max(axis=-1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))


def kl_prior(f, g_1):
    """KL(N(alpha_1 f, sigma_1^2) || N(0, 1)) summed over all but the batch axis."""
    alpha2, sigma2 = sigmoid(-g_1), sigmoid(g_1)
    kl = 0.5 * (alpha2 * f ** 2 + sigma2 - np.log(sigma2) - 1.0)
    return kl.reshape(kl.shape[0], -1).sum(axis=1)


def gamma(config: ModelConfig, p: dict, t):
    """gamma(t) and d gamma / dt in float64 from the schedule's parameters `p` (neutral names relative to
    `gamma/`, JAX layouts: kernels (in, out)), for every config.GAMMA_TYPES."""
    t = np.asarray(t, np.float64)
    if config.gamma_type == "fixed":
        w, b = config.gamma_max - config.gamma_min, config.gamma_min
        return b + w * t, np.full_like(t, w)
    if config.gamma_type == "learnable_scalar":
        w, b = abs(float(p["w"][0])), float(p["b"][0])
        return b + w * t, np.full_like(t, w)
    if config.gamma_type == "learnable_nnet":
        return _monotone_nnet(p, t)
    assert config.gamma_type == "learnable_nnet_endpoints", config.gamma_type
    # gamma_0 + |gamma_1 - gamma_0| (f(t) - f(0)) / (f(1) - f(0)), f the monotone network under f/.
    f_params = {k[len("f/"):]: v for k, v in p.items() if k.startswith("f/")}
    f, df = _monotone_nnet(f_params, t)
    f_ends, _ = _monotone_nnet(f_params, np.array([0.0, 1.0]))
    g_0 = float(p["gamma_0"][0])
    scale = abs(float(p["gamma_1"][0]) - g_0) / (f_ends[1] - f_ends[0])
    return g_0 + scale * (f - f_ends[0]), scale * df


def _monotone_nnet(p, t):
    """The official monotone network l1(t) + l3(2 (sigmoid(l2(2t - 1)) - 1/2)) / 1024, kernels used through
    their absolute values, and its derivative in t."""
    k1, b1 = abs(float(p["l1/kernel"][0, 0])), float(p["l1/bias"][0])
    k2, b2 = np.abs(np.asarray(p["l2/kernel"], np.float64)[0]), np.asarray(p["l2/bias"], np.float64)  # (1024,)
    k3 = np.abs(np.asarray(p["l3/kernel"], np.float64)[:, 0])                                        # (1024,)
    s = sigmoid((2.0 * t[..., None] - 1.0) * k2 + b2)                                                # (..., 1024)
    g = k1 * t + b1 + (2.0 * (s - 0.5)) @ k3 / k3.size
    dg = k1 + (2.0 * s * (1.0 - s) * 2.0 * k2) @ k3 / k3.size
    return g, dg


def vlb_terms_at_init(config: ModelConfig, p: dict, images, t, eps, eps_0):
    """(recon, klz, diff) per example for a model whose score network returns z_t itself (the model at
    init: zero output conv). Any layout: sums run over every axis but the batch one."""
    B = images.shape[0]
    f = encode(images, config.vocab_size)
    g_0, _ = gamma(config, p, 0.0)
    g_1, _ = gamma(config, p, 1.0)
    logp = decoder_logprobs(f + np.exp(0.5 * g_0) * eps_0, g_0, config.vocab_size)
    recon = -np.take_along_axis(logp, images[..., None].astype(np.int64), axis=-1).reshape(B, -1).sum(1)
    g_t, dg_t = gamma(config, p, t)
    var_t = sigmoid(g_t).reshape(B, *([1] * (images.ndim - 1)))
    z_t = np.sqrt(1.0 - var_t) * f + np.sqrt(var_t) * eps
    mse = ((eps - z_t) ** 2).reshape(B, -1).sum(1)
    T = config.sm_n_timesteps
    if T == 0:
        diff = 0.5 * dg_t * mse
    else:
        g_s, _ = gamma(config, p, t - 1.0 / T)
        diff = 0.5 * T * np.expm1(g_t - g_s) * mse
    return recon, kl_prior(f, g_1), diff


def timestep_embedding(t, dim):
    """[sin(1000 t w_k), cos(1000 t w_k)], w_k = 10000^(-k / (dim/2 - 1)), k < dim/2: (B,) -> (B, dim)."""
    half = dim // 2
    w = np.exp(-np.log(10000.0) * np.arange(half) / (half - 1))
    angles = 1000.0 * np.asarray(t, np.float64)[:, None] * w
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def fourier_features(z_nhwc, start, stop, order):
    """sin then cos of z_c 2 pi 2^f for f in [start, stop): channel_major orders the products (c, f),
    frequency_major (f, c). (B, H, W, C) -> (B, H, W, 2 C F)."""
    z = np.asarray(z_nhwc, np.float64)
    w = 2.0 * np.pi * 2.0 ** np.arange(start, stop)
    h = z[..., :, None] * w                                                        # (..., C, F)
    h = h.reshape(*z.shape[:-1], -1) if order == "channel_major" else \
        np.swapaxes(h, -1, -2).reshape(*z.shape[:-1], -1)
    return np.concatenate([np.sin(h), np.cos(h)], axis=-1)


def sample_step(z_t, eps_hat, eps, g_s, g_t):
    """The official ancestral step: z_s = sqrt(alpha_s^2 / alpha_t^2) (z_t - sigma_t c eps_hat)
    + sqrt(sigma_s^2 c) eps with c = 1 - exp(g_s - g_t)."""
    c = -np.expm1(g_s - g_t)
    mean = np.sqrt(sigmoid(-g_s) / sigmoid(-g_t)) * (z_t - np.sqrt(sigmoid(g_t)) * c * eps_hat)
    return mean + np.sqrt(sigmoid(g_s) * c) * eps


@pytest.fixture(scope="session")
def ref():
    """The numpy references above, as one namespace."""
    return SimpleNamespace(sigmoid=sigmoid, encode=encode, decoder_logprobs=decoder_logprobs, kl_prior=kl_prior,
                           gamma=gamma, vlb_terms_at_init=vlb_terms_at_init, sample_step=sample_step,
                           timestep_embedding=timestep_embedding, fourier_features=fourier_features)


def assert_discrete_converges(losses: dict, continuous: float, w: float):
    """Discrete-time diffusion losses {T: L_T} of one model (linear schedule of slope w, t on every grid)
    against its continuous-time loss L_inf.

    With the same t, eps and weights, z_t and eps_hat are the same in every T, so only the weight of
    ||eps - eps_hat||^2 differs: T/2 expm1(g_t - g_s) = T/2 expm1(w / T) in discrete time against
    g'(t)/2 = w/2 in continuous time. T expm1(w / T) = w + w^2 / (2T) + ... decreases to w as T grows, so
    the discrete VLB lies above the continuous one and converges to it from above (the paper's appendix):
    the gap is positive, strictly decreasing in T, and its ratio is exactly T expm1(w / T) / w.
    """
    Ts = sorted(losses)
    gaps = [losses[T] - continuous for T in Ts]
    assert all(g > 0 for g in gaps), gaps
    assert all(a > b for a, b in zip(gaps, gaps[1:])), gaps
    assert abs(gaps[-1]) / continuous < 1e-3, (gaps[-1], continuous)   # small at T = 10000: w / 2T = 9e-4
    for T in Ts:
        np.testing.assert_allclose(losses[T] / continuous, T * np.expm1(w / T) / w, rtol=1e-9)


@pytest.fixture(scope="session")
def check_discrete_converges():
    return assert_discrete_converges


# --------------------------------------------------------------------------- official parameter shapes

@pytest.fixture(scope="session")
def official_param_shapes() -> dict:
    """{'score_model/down.block_0/conv1/kernel': shape} of the official google-research/vdm CIFAR-10 model
    (stored from its `jax.eval_shape` as "['a']['b']" keys)."""
    raw = json.loads((DATA / "official_vdm_cifar10_param_shapes.json").read_text())
    return {"/".join(re.findall(r"\['([^']+)'\]", key)): tuple(shape) for key, shape in raw.items()}


# -------------------------------------------------------------------------------------- mirrored layout

MIRRORED_MODULES = ("unet", "schedules", "vdm", "compress")

# Public helpers that only one backend needs. Keep this list short: anything else must exist in both.
BACKEND_ONLY = {
    "jax": {
        "unet.dtypes",                 # Flax (param_dtype, dtype) pair; torch casts the module instead
        "schedules.constant_init",     # Flax initializer factory; torch fills parameters in __init__
    },
    "torch": {
        "unet.lecun_normal_",          # torch re-creates Flax's default kernel init ...
        "unet.dense",                  # ... through this layer factory
        "schedules.as_tensor",         # Python float -> tensor on the module's device and dtype
        "vdm.float_dtype",             # the role of JAX's unet.dtypes(config)[0]
        "vdm.value_and_time_derivative",   # autograd stand-in for jax.jvp (gamma'(t))
        "vdm.ScaleShapeGradient",      # autograd.Function; JAX writes the same as an inline nn.custom_vjp
    },
}
# Framework hooks that are the same thing under two names (Flax __call__/setup, torch forward/__init__).
FRAMEWORK_METHODS = {"setup", "forward"}


def public_api(path: pathlib.Path) -> dict[str, set[str]]:
    """{name: public method names} of the public top-level functions, classes and CONSTANTS of a file
    (from its source, without importing it). Functions and constants map to an empty set."""
    api = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            methods = set()
            if isinstance(node, ast.ClassDef):
                methods = {n.name for n in node.body if isinstance(n, ast.FunctionDef)
                           and not n.name.startswith("_")} - FRAMEWORK_METHODS
            api[node.name] = methods
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name) and target.id.isupper() and not target.id.startswith("_"):
                    api[target.id] = set()
    return api


def mirror_mismatches(backend: str) -> list[str]:
    """Public names (module.name or module.Class.method) of `backend` that the other backend lacks.

    Allow-listed names that this backend no longer defines, or that the other one now also defines, are
    reported too (as 'stale allow-list entry ...'), so the list cannot outlive its reason."""
    other = {"jax": "torch", "torch": "jax"}[backend]
    missing = []
    for module in MIRRORED_MODULES:
        mine = public_api(ROOT / f"vdm_{backend}" / f"{module}.py")
        theirs = public_api(ROOT / f"vdm_{other}" / f"{module}.py")
        missing += [f"stale allow-list entry {entry}" for entry in sorted(BACKEND_ONLY[backend])
                    if entry.split(".")[0] == module and (entry.split(".")[1] not in mine
                                                         or entry.split(".")[1] in theirs)]
        for name, methods in mine.items():
            if f"{module}.{name}" in BACKEND_ONLY[backend]:
                continue
            if name not in theirs:
                missing.append(f"{module}.{name}")
            else:
                missing += [f"{module}.{name}.{m}" for m in sorted(methods - theirs[name])]
    return missing


@pytest.fixture(scope="session")
def mirror_check():
    return mirror_mismatches


# ------------------------------------------------------------------------------------------- trainer runs
# Shared by the trainer tests of both backends (tests/test_train_*.py, tests/reliability/): a tiny model on
# the digits (11K parameters, so that every compile takes seconds) and a schedule of a few steps that logs,
# evaluates, samples and saves. The learning rate is pinned here, so tuning the quickstart changes nothing.
QUICKSTART = str(ROOT / "configs" / "quickstart.py")
TINY_MODEL = ["model.sm_n_embd=8", "model.sm_n_layer=1", "model.norm_groups=4", "model.sm_pdrop=0.0",
              "model.fourier_start=6", "model.fourier_stop=8", "optimizer.learning_rate=2e-3"]
TINY_RUN = TINY_MODEL + [
    "training.num_steps_train=6", "training.substeps=2", "training.batch_size_train=16",
    "training.batch_size_eval=100", "training.num_eval_batches=0", "training.steps_per_logging=2",
    "training.steps_per_eval=6", "training.steps_per_save=2", "training.checkpoints_to_keep=2",
    "training.steps_per_sample=6", "training.num_samples=4", "training.sample_steps=3",
    "training.eval_noise_samples=1", "optimizer.num_steps_lr_warmup=2",
]


def tiny_config(*extra: str):
    """The quickstart config with TINY_RUN and `extra` overrides ('section.field=value')."""
    from vdm_common import config as config_lib
    return config_lib.load_config(QUICKSTART, TINY_RUN + list(extra))


def make_engine(backend: str, **options):
    """The engine of a backend with its EngineOptions fields (JAX: devices; torch: device, compile, ...)."""
    if backend == "jax":
        from vdm_jax import engine
    else:
        from vdm_torch import engine
    return engine.Engine(engine.EngineOptions(**options))


def run_mode(backend: str, config, workdir, mode: str = "train", overrides=None, profile_steps: int = 0,
             coding=None, **options) -> dict:
    """vdm_common.trainer.main on a fresh engine of `backend` (what train_<backend>.py does in-process);
    coding: the trainer.Coding of the compress and decompress modes."""
    from vdm_common import trainer
    return trainer.main(make_engine(backend, **options), config, str(workdir), mode, overrides,
                        profile_steps=profile_steps, coding=coding)


def cli_args(overrides) -> list[str]:
    """['section.field=value', ...] -> the command line's ['--config.section.field=value', ...]."""
    return [f"--config.{item}" for item in overrides]


def records(workdir, split: str) -> list[dict]:
    """The rows of one split ('train', 'eval') of a run's metrics.jsonl."""
    from vdm_common.metrics import read_metrics
    return [r for r in read_metrics(pathlib.Path(workdir) / "metrics.jsonl") if r["split"] == split]


def tree_digest(path) -> dict[str, str]:
    """{relative path: sha256} of every file under path (to prove what was left untouched)."""
    import hashlib
    path = pathlib.Path(path)
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def free_port() -> int:
    """A TCP port on localhost that is free now (for a coordinator address)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_tiny_run_outputs(workdir, backend: str, native_steps: list[int]) -> None:
    """What a finished TINY_RUN leaves, whichever backend ran it: the newest 2 checkpoints (native steps as
    given, and their neutral exports), the step-6 export, a 2 x 2 grid of 8x8 digits upscaled to >= 256
    pixels, the plot, one TensorBoard event file."""
    from PIL import Image
    from vdm_common import neutral, run
    from vdm_common import workdir as workdir_lib
    workdir = pathlib.Path(workdir)
    assert native_steps == [4, 6] and run.neutral_steps(str(workdir)) == [4, 6]
    exported = neutral.load_neutral(workdir_lib.layout(workdir).neutral_path(6))
    assert exported.step == 6 and exported.opt_count == 6 and exported.extra["backend"] == backend
    grid = Image.open(workdir / "samples" / f"step_6_n4_T3_seed1_ema_{backend}.png")
    assert grid.mode == "L" and grid.size[0] >= 256 and grid.size == grid.size[::-1]
    assert (workdir / "plots" / "bpd.png").stat().st_size > 1000
    assert len(list((workdir / "tensorboard" / "train").glob("events.out.tfevents.*"))) == 1
