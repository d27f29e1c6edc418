"""The same computations on both backends, and their comparison as `Measurement`s.

Each `measure_*` function runs one comparison for one case and dtype and returns one Measurement per
quantity; the tests assert them, the report tabulates them. The JAX side is the reference and is cached
per (case, dtype) (it is also where the compile time goes); the torch side is recomputed on every call,
so a mutation test (test_mutations.py) that alters torch code sees its effect. Everything runs under
`policy.parity_mode()`, which the caller enters.

Layouts: the harness speaks NHWC numpy (JAX layout); torch inputs are transposed to NCHW and its outputs
back, so every element index in a report is a JAX-layout index.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import tempfile
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch

from parity_tests import cases
from parity_tests.compare import Measurement, array_error, count_measurement, tree_error
from parity_tests.tolerances import floor, tolerance
from vdm_common.neutral import NeutralCheckpoint, load_neutral, save_neutral
from vdm_common.types import Noise, bits_per_dim
from vdm_common.weights import torch_layout_to_neutral
from vdm_jax import convert as jax_convert
from vdm_jax import steps as jax_steps
from vdm_jax import vdm as jax_vdm
from vdm_torch import convert as torch_convert
from vdm_torch import steps as torch_steps
from vdm_torch import vdm as torch_vdm

MODEL_QUANTITIES = ("unet_output", "decoder_logprobs", "decoder_probs", "loss_recon", "loss_klz", "loss_diff",
                    "bpd")


# ------------------------------------------------------------------------------------------------ layouts

def to_nchw(x: np.ndarray) -> torch.Tensor:
    """(..., B, H, W, C) numpy -> (..., B, C, H, W) torch tensor (a copy)."""
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(x), -1, -3)))


def to_nhwc(x: torch.Tensor) -> np.ndarray:
    """(..., B, C, H, W) torch tensor -> (..., B, H, W, C) numpy."""
    return np.moveaxis(x.detach().cpu().numpy(), -3, -1)


def torch_noise(noise: Noise) -> Noise:
    return Noise(torch.from_numpy(np.asarray(noise.t)), to_nchw(noise.eps), to_nchw(noise.eps_0))


def _fetch(tree, dtype: str, what: str):
    """jax arrays -> numpy, asserting that float results carry the case's dtype (x64 is on in parity mode,
    so a float32 case that silently computed in float64 would otherwise look "better than float32")."""
    out = jax.tree_util.tree_map(np.asarray, jax.device_get(tree))
    for leaf in jax.tree_util.tree_leaves(out):
        if np.issubdtype(leaf.dtype, np.floating) and leaf.dtype != np.dtype(dtype):
            raise AssertionError(f"JAX {what} came out in {leaf.dtype} in a {dtype} case")
    return out


# ------------------------------------------------------------------------------- model: forward, gradient

def _score(module, z, g_t, conditioning):
    return module.score_model(z, g_t, conditioning, True)


def _gamma(module, t):
    return module.gamma(t)


@functools.partial(jax.jit, static_argnums=0)
def _jax_model_fn(cfg, params, images, conditioning, noise, z, g_t, z0, g0):
    model = jax_vdm.VDM(cfg)
    unet = model.apply({"params": params}, z, g_t, conditioning, method=_score)
    logprobs = model.apply({"params": params}, z0, g0, method=jax_vdm.VDM.decode)

    def loss(p):
        terms = model.apply({"params": p}, images, conditioning, noise, True, method=jax_vdm.VDM.loss_terms)
        return bits_per_dim(terms, images.shape[1:])["bpd"], terms

    (bpd, terms), grads = jax.value_and_grad(loss, has_aux=True)(params)
    outputs = dict(unet_output=unet, decoder_logprobs=logprobs, loss_recon=terms.recon, loss_klz=terms.klz,
                   loss_diff=terms.diff, bpd=bpd)
    return outputs, grads


@dataclasses.dataclass
class ModelResults:
    outputs: dict[str, np.ndarray]   # MODEL_QUANTITIES, JAX layouts
    grads: dict[str, np.ndarray]     # neutral key -> d bpd / d parameter


@functools.lru_cache(maxsize=None)
def jax_model(case: str, dtype: str) -> ModelResults:
    cfg = cases.model_config(case, dtype)
    x = cases.model_inputs(case, dtype)
    params = jax_convert.params_from_neutral(cases.weights(case, dtype), cfg)
    outputs, grads = _jax_model_fn(cfg, params, jnp.asarray(x.images), jnp.asarray(x.conditioning),
                                   Noise(*map(jnp.asarray, x.noise)), jnp.asarray(x.z), jnp.asarray(x.g_t),
                                   jnp.asarray(x.z0), jnp.asarray(x.g0))
    return ModelResults(_fetch(outputs, dtype, "model outputs"),
                        jax_convert.params_to_neutral(_fetch(grads, dtype, "gradients")))


def torch_model(case: str, dtype: str) -> ModelResults:
    cfg = cases.model_config(case, dtype)
    x = cases.model_inputs(case, dtype)
    model = torch_convert.model_from_neutral(cases.weights(case, dtype), cfg)
    conditioning = torch.from_numpy(x.conditioning)
    with torch.no_grad():
        unet = to_nhwc(model.score_model(to_nchw(x.z), torch.from_numpy(x.g_t), conditioning, True))
        logprobs = model.decode(to_nchw(x.z0), torch.from_numpy(x.g0))              # (B, C, H, W, V)
        logprobs = np.moveaxis(logprobs.numpy(), 1, -2)                               # (B, H, W, C, V)
    model.zero_grad(set_to_none=True)
    terms = model.loss_terms(to_nchw(x.images), conditioning, torch_noise(x.noise), deterministic=True)
    bpd = bits_per_dim(terms, x.images.shape[1:])["bpd"]
    bpd.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    if no_grad:
        raise AssertionError(f"torch parameters without a gradient: {no_grad}")
    grads = torch_layout_to_neutral({n: p.grad.numpy() for n, p in model.named_parameters()})
    outputs = dict(unet_output=unet, decoder_logprobs=logprobs, loss_recon=terms.recon.detach().numpy(),
                   loss_klz=terms.klz.detach().numpy(), loss_diff=terms.diff.detach().numpy(),
                   bpd=bpd.detach().numpy())
    return ModelResults(outputs, grads)


def _compare(pairs: list[tuple[str, Callable]], jax_side, torch_side, case: str, dtype: str,
             references: Callable[[], tuple] | None) -> list[Measurement]:
    """One Measurement per (quantity, compare(quantity, x, y) -> Measurement) of the JAX and torch results.

    In float32, `references()` gives the float64 (JAX, torch) results: each measurement then also records
    the larger of the two backends' own float32 errors against them (Measurement.rounding).
    """
    out = [compare(q, jax_side, torch_side) for q, compare in pairs]
    if dtype == "float32" and references is not None:
        jax64, torch64 = references()
        for m, (q, compare) in zip(out, pairs):
            m.rounding = max(compare(q, jax_side, jax64).error, compare(q, torch_side, torch64).error)
    return out


def _arrays(case: str, dtype: str, field: str):
    """compare(quantity, x, y) for array quantities held in x.<field>[quantity]."""
    def compare(q, x, y):
        return array_error(q, case, dtype, getattr(x, field)[q], getattr(y, field)[q], tolerance(q, dtype))
    return compare


def _model_values(results: ModelResults) -> ModelResults:
    # Relative to the largest |log p| (~1e6 for far bins at vocab 256), the log-probabilities of the bins
    # that matter are barely seen: the probabilities themselves (scale 1) show those.
    probs = np.exp(results.outputs["decoder_logprobs"].astype(np.float64))
    return ModelResults({**results.outputs, "decoder_probs": probs}, results.grads)


def measure_model(case: str, dtype: str) -> list[Measurement]:
    """UNet output, decoder log-probabilities, each loss term per example, bpd, and d bpd / d parameter."""
    def grads(q, x, y):
        return tree_error(q, case, dtype, x.grads, y.grads, tolerance(q, dtype), floor(q, dtype))

    pairs = [(q, _arrays(case, dtype, "outputs")) for q in MODEL_QUANTITIES] + [("grad_bpd", grads)]
    return _compare(pairs, _model_values(jax_model(case, dtype)), _model_values(torch_model(case, dtype)),
                    case, dtype, lambda: (_model_values(jax_model(case, "float64")),
                                          _model_values(torch_model(case, "float64"))))


# ------------------------------------------------------------------------------------------------ sampling

@dataclasses.dataclass
class SamplingResults:
    trajectory: np.ndarray   # (T + 1, B, H, W, C): z_1, ..., z_0
    images: np.ndarray       # (B, H, W, C) int


@functools.lru_cache(maxsize=None)
def jax_sampling(case: str, dtype: str) -> SamplingResults:
    cfg = cases.model_config(case, dtype)
    x = cases.sampling_inputs(case, dtype)
    params = jax_convert.params_from_neutral(cases.sampling_weights(case, dtype), cfg)
    images, _, trajectory = jax_vdm.sample(cfg, {"params": params}, jnp.asarray(x.z1), cases.SAMPLE_STEPS,
                                           jnp.asarray(x.conditioning), step_noise=jnp.asarray(x.step_noise),
                                           return_trajectory=True)
    return SamplingResults(_fetch(trajectory, dtype, "sampling trajectory"), np.asarray(images))


def torch_sampling(case: str, dtype: str) -> SamplingResults:
    cfg = cases.model_config(case, dtype)
    x = cases.sampling_inputs(case, dtype)
    model = torch_convert.model_from_neutral(cases.sampling_weights(case, dtype), cfg)
    images, _, trajectory = torch_vdm.sample(model, to_nchw(x.z1), cases.SAMPLE_STEPS,
                                             torch.from_numpy(x.conditioning), step_noise=to_nchw(x.step_noise),
                                             return_trajectory=True)
    return SamplingResults(to_nhwc(trajectory), to_nhwc(images))


@functools.lru_cache(maxsize=None)
def _jax_gamma0(case: str, dtype: str) -> float:
    cfg = cases.model_config(case, dtype)
    params = jax_convert.params_from_neutral(cases.sampling_weights(case, dtype), cfg)
    return float(jax_vdm.VDM(cfg).apply({"params": params}, 0.0, method=_gamma))


def boundary_distance(z0: np.ndarray, g0: float, vocab_size: int) -> np.ndarray:
    """Distance of each z_0 to the nearest decision boundary of the argmax decoder (in z_0 units).

    argmax_v p(x = v | z_0) picks the bin centre nearest to z_0 / alpha_0 (the logits are -(z - v)^2 up to
    scale); bin k's boundaries are at 2k / V - 1 (k = 1..V-1) on that rescaled axis.
    """
    alpha0 = np.sqrt(1.0 - 1.0 / (1.0 + np.exp(-g0)))
    u = (np.asarray(z0, np.float64) / alpha0 + 1.0) * vocab_size / 2.0       # boundaries at integers
    nearest = np.clip(np.round(u), 1, vocab_size - 1)
    return np.abs(u - nearest) * 2.0 / vocab_size * alpha0


def measure_sampling(case: str, dtype: str) -> list[Measurement]:
    """The full T-step ancestral trajectory (z_1 .. z_0, same step noise) and the decoded integer images."""
    cfg = cases.model_config(case, dtype)
    a, b = jax_sampling(case, dtype), torch_sampling(case, dtype)
    traj_tol = tolerance("sample_trajectory", dtype)

    def trajectory(q, x, y):
        return array_error(q, case, dtype, x.trajectory, y.trajectory, traj_tol)
    [traj] = _compare([("sample_trajectory", trajectory)], a, b, case, dtype,
                      lambda: (jax_sampling(case, "float64"), torch_sampling(case, "float64")))
    # A pixel may decode differently only if its z_0 lies within the allowed trajectory error of a bin
    # boundary (a near-tie that float32 rounding may legitimately flip).
    margin = traj_tol * float(np.max(np.abs(a.trajectory)))
    z0 = a.trajectory[-1]
    differ = a.images != b.images
    unexplained = differ & (boundary_distance(z0, _jax_gamma0(case, dtype), cfg.vocab_size) > margin)
    where, va, vb = "", np.nan, np.nan
    if unexplained.any():
        idx = np.unravel_index(int(np.flatnonzero(unexplained)[0]), unexplained.shape)
        where, va, vb = f"index {tuple(int(i) for i in idx)}", a.images[idx], b.images[idx]
    images = count_measurement("sample_images", case, dtype, int(unexplained.sum()),
                               tolerance("sample_images", dtype), where, va, vb,
                               note=f"{int(differ.sum())} of {differ.size} pixels differ")
    return [traj, images]


# ------------------------------------------------------------------------------------------------ training

@dataclasses.dataclass
class TrainingRun:
    snapshots: dict[int, NeutralCheckpoint]   # state after k steps
    metrics: dict[str, np.ndarray]             # per step: bpd, grad_norm


SNAPSHOTS = (cases.CONTINUE_AT, cases.CONTINUE_AT + cases.CONTINUE_STEPS, cases.TRAIN_STEPS)


@functools.lru_cache(maxsize=None)
def _jax_train_step(cfg):
    opt = cases.optimizer_config()
    rng = jax.random.PRNGKey(0)  # unused: the noise is injected and dropout is off
    return jax.jit(lambda state, images, conditioning, noise: jax_steps.train_step(
        cfg, opt, state, images, conditioning, rng, noise, deterministic=True))


def jax_train(state, case: str, dtype: str, start: int, stop: int, snapshots=()) -> tuple:
    """Steps start..stop-1 of the case's batches from a JAX TrainState; returns (state, TrainingRun)."""
    cfg = cases.model_config(case, dtype)
    step = _jax_train_step(cfg)
    run = TrainingRun({}, {"bpd": [], "grad_norm": []})
    for i, batch in enumerate(cases.training_batches(case, dtype, stop)[start:], start):
        state, metrics = step(state, jnp.asarray(batch.images), jnp.asarray(batch.conditioning),
                              Noise(*map(jnp.asarray, batch.noise)))
        run.metrics["bpd"].append(float(metrics["bpd"]))
        run.metrics["grad_norm"].append(float(metrics["grad_norm"]))
        if i + 1 in snapshots:
            run.snapshots[i + 1] = jax_convert.state_to_neutral(state, cfg)
    run.metrics = {k: np.asarray(v) for k, v in run.metrics.items()}
    return state, run


def torch_train(state, case: str, dtype: str, start: int, stop: int, snapshots=()) -> tuple:
    """Steps start..stop-1 of the case's batches on a torch TrainState (in place); returns (state, run)."""
    cfg = cases.model_config(case, dtype)
    opt = cases.optimizer_config()
    run = TrainingRun({}, {"bpd": [], "grad_norm": []})
    for i, batch in enumerate(cases.training_batches(case, dtype, stop)[start:], start):
        metrics = torch_steps.train_step(cfg, opt, state, to_nchw(batch.images),
                                         torch.from_numpy(batch.conditioning), noise=torch_noise(batch.noise),
                                         deterministic=True)
        run.metrics["bpd"].append(float(metrics["bpd"]))
        run.metrics["grad_norm"].append(float(metrics["grad_norm"]))
        if i + 1 in snapshots:
            run.snapshots[i + 1] = torch_convert.state_to_neutral(state)
    run.metrics = {k: np.asarray(v) for k, v in run.metrics.items()}
    return state, run


def initial_checkpoint(case: str, dtype: str) -> NeutralCheckpoint:
    """The common starting point: the case's weights, EMA = weights, fresh optimizer."""
    return NeutralCheckpoint(cases.model_config(case, dtype), params=cases.weights(case, dtype))


@functools.lru_cache(maxsize=None)
def jax_training(case: str, dtype: str) -> TrainingRun:
    state = jax_convert.state_from_neutral(initial_checkpoint(case, dtype), cases.optimizer_config(),
                                           fresh_optimizer=True)
    return jax_train(state, case, dtype, 0, cases.TRAIN_STEPS, SNAPSHOTS)[1]


def torch_training(case: str, dtype: str) -> TrainingRun:
    state = torch_convert.state_from_neutral(initial_checkpoint(case, dtype), cases.optimizer_config(),
                                             fresh_optimizer=True)
    return torch_train(state, case, dtype, 0, cases.TRAIN_STEPS, SNAPSHOTS)[1]


_STATE_SETS = (("params", "params"), ("ema", "ema_params"), ("mu", "opt_mu"), ("nu", "opt_nu"))


def _state_pairs(prefix: str, config: str, dtype: str) -> list:
    """(quantity, compare) for params, EMA, Adam mu and nu (per tensor) of two NeutralCheckpoints."""
    def tensors(attr):
        def compare(q, x, y):
            return tree_error(q, config, dtype, getattr(x, attr), getattr(y, attr), tolerance(q, dtype),
                              floor(q, dtype))
        return compare
    return [(f"{prefix}_{name}", tensors(attr)) for name, attr in _STATE_SETS]


def _counts(q: str, config: str, dtype: str, a: NeutralCheckpoint, b: NeutralCheckpoint) -> Measurement:
    """The step counters (TrainState.step, Adam count) must be identical."""
    return count_measurement(q, config, dtype, int(a.step != b.step) + int(a.opt_count != b.opt_count),
                             tolerance(q, dtype), "step, opt_count", a.opt_count, b.opt_count,
                             note=f"step jax={a.step} torch={b.step}")


def compare_states(prefix: str, config: str, dtype: str, a: NeutralCheckpoint, b: NeutralCheckpoint
                   ) -> list[Measurement]:
    """params, EMA, Adam mu and nu (per tensor), and the step counters of two checkpoints."""
    out = _compare(_state_pairs(prefix, config, dtype), a, b, config, dtype, None)
    return out + [_counts(f"{prefix}_count", config, dtype, a, b)]


def measure_training(case: str, dtype: str) -> list[Measurement]:
    """20 full AdamW steps (warmup, decay mask, clipping, EMA) from the same init, batches and noise."""
    final = cases.TRAIN_STEPS

    def final_state(run):
        return run.snapshots[final]

    def metric(name):
        def compare(q, x, y):
            return array_error(q, case, dtype, x.metrics[name], y.metrics[name], tolerance(q, dtype))
        return compare

    def on_final(compare):
        return lambda q, x, y: compare(q, final_state(x), final_state(y))

    pairs = [(q, on_final(c)) for q, c in _state_pairs("train", case, dtype)]
    pairs += [(f"train_{name}", metric(name)) for name in ("bpd", "grad_norm")]
    a, b = jax_training(case, dtype), torch_training(case, dtype)
    out = _compare(pairs, a, b, case, dtype, lambda: (jax_training(case, "float64"), torch_training(case, "float64")))
    return out + [_counts("train_count", case, dtype, final_state(a), final_state(b))]


def through_file(ckpt: NeutralCheckpoint) -> NeutralCheckpoint:
    """ckpt written to a neutral file and read back (what a user converting between backends does)."""
    with tempfile.TemporaryDirectory() as tmp:
        return load_neutral(save_neutral(os.path.join(tmp, "state.safetensors"), ckpt))


def measure_continued(case: str, dtype: str = "float64") -> list[Measurement]:
    """Train CONTINUE_AT steps in one backend, convert the full state through the neutral file, train
    CONTINUE_STEPS more in the other; compare with the first backend training all the way."""
    opt = cases.optimizer_config()
    start, stop = cases.CONTINUE_AT, cases.CONTINUE_AT + cases.CONTINUE_STEPS
    jax_run, torch_run = jax_training(case, dtype), torch_training(case, dtype)
    # JAX -> torch
    state = torch_convert.state_from_neutral(through_file(jax_run.snapshots[start]), opt)
    state, _ = torch_train(state, case, dtype, start, stop)
    out = compare_states("continued", f"{case} jax->torch", dtype, jax_run.snapshots[stop],
                         torch_convert.state_to_neutral(state))
    # torch -> JAX
    state = jax_convert.state_from_neutral(through_file(torch_run.snapshots[start]), opt)
    state, _ = jax_train(state, case, dtype, start, stop)
    cfg = cases.model_config(case, dtype)
    out += compare_states("continued", f"{case} torch->jax", dtype, jax_convert.state_to_neutral(state, cfg),
                          torch_run.snapshots[stop])
    return out


# ------------------------------------------------------------------------------------------------ all of it

def measure_all(case_names=None, dtypes=cases.DTYPES) -> list[Measurement]:
    """Every comparison of the suite (what the report tabulates)."""
    out = []
    for case in case_names or cases.MODEL_CASES:
        for dtype in dtypes:
            out += measure_model(case, dtype)
            if case in cases.CASES:
                out += measure_sampling(case, dtype)
            if case in cases.TRAIN_CASES:
                out += measure_training(case, dtype)
        if case in cases.TRAIN_CASES and "float64" in dtypes:
            out += measure_continued(case)
    return out
