"""Training state and the pure step functions of the JAX trainer (no I/O, no sharding decisions).

The update is the official one: loss = bpd of the batch, AdamW (optax) with weight decay on every leaf
but biases, LR warmup linear from 0, optional global-norm clipping, EMA `ema + (1 - rate)(params - ema)`.
`vdm_torch/steps.py` implements the same update; the parity suite checks them against each other.
"""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from vdm_common.config import ModelConfig
from vdm_common.types import Noise, bits_per_dim, nats_to_bpd_scale
from vdm_jax.vdm import VDM, draw_noise, init_params


class TrainState(flax.struct.PyTreeNode):
    """step: int32 scalar, updates done; params / ema_params: the model tree; opt_state: optax state."""

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any


def decay_mask(params):
    """True for leaves that get weight decay: all but those named `bias` (the official mask)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key != "bias", params)


def learning_rate(opt: ml_collections.ConfigDict):
    """LR after `count` updates: linear warmup from 0 to learning_rate over num_steps_lr_warmup, then flat."""
    warmup = opt.num_steps_lr_warmup

    def schedule(count):
        if warmup == 0:
            return jnp.asarray(opt.learning_rate, float)
        # In the default float dtype (float64 under jax_enable_x64): a float32 LR would round the update.
        return opt.learning_rate * jnp.minimum(jnp.asarray(count, float) / warmup, 1.0)
    return schedule


def make_optimizer(opt: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW with the decay mask; global-norm clipping first when optimizer.grad_clip_norm > 0.

    Without clipping the state has the official layout (opt_state/0 = scale_by_adam's count, mu, nu).
    """
    adamw = optax.adamw(learning_rate(opt), b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
                        mask=decay_mask)
    if opt.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), adamw)
    return adamw


def create_train_state(model_config: ModelConfig, opt: ml_collections.ConfigDict, rng: jax.Array,
                       image_shape) -> TrainState:
    """Fresh parameters (from rng), EMA equal to them, zero optimizer moments, step 0."""
    params = init_params(model_config, rng, image_shape)["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      ema_params=jax.tree_util.tree_map(jnp.copy, params),
                      opt_state=make_optimizer(opt).init(params))


def step_rngs(rng: jax.Array, step) -> tuple[jax.Array, jax.Array]:
    """(sample_rng, dropout_rng) of a global step: the run's key folded with the step.

    Keys are drawn for the global batch, so the numbers do not depend on how many devices share it.
    """
    sample_rng, dropout_rng = jax.random.split(jax.random.fold_in(rng, step))
    return sample_rng, dropout_rng


def loss_fn(params, model_config: ModelConfig, images, conditioning, noise: Noise, dropout_rng,
            deterministic: bool):
    """bpd of the batch (the training loss) and its parts, {'bpd', 'bpd_recon', 'bpd_latent', 'bpd_diff'}."""
    terms = VDM(model_config).apply({"params": params}, images, conditioning, noise, deterministic,
                                    rngs={"dropout": dropout_rng}, method=VDM.loss_terms)
    parts = bits_per_dim(terms, images.shape[1:])
    return parts["bpd"], parts


def adam_count(opt_state) -> jax.Array:
    """The number of updates AdamW has applied (optax's count; the LR schedule reads it)."""
    return optax.tree_utils.tree_get_all_with_path(opt_state, "count")[0][1]


def train_step(model_config: ModelConfig, opt: ml_collections.ConfigDict, state: TrainState, images,
               conditioning, rng: jax.Array, noise: Noise | None = None, deterministic: bool | None = None):
    """One optimizer step on the global batch images (B, H, W, C), conditioning (B,).

    noise: injected draws (parity tests); None draws them from `rng` folded with the step.
    deterministic: dropout off; defaults to model.sm_pdrop == 0.
    A step whose loss or gradient norm is not finite is skipped: params, EMA and optimizer state (its count
    too, so the LR schedule) stay as they were and only `step` advances, to the next batch.
    Returns (new_state, metrics) with metrics bpd, its parts, grad_norm (before clipping), learning_rate,
    skipped (1.0 for a skipped step, else 0.0).
    """
    sample_rng, dropout_rng = step_rngs(rng, state.step)
    if noise is None:
        noise = draw_noise(sample_rng, images.shape, model_config)
    if deterministic is None:
        deterministic = model_config.sm_pdrop == 0
    grads, parts = jax.grad(loss_fn, has_aux=True)(state.params, model_config, images, conditioning, noise,
                                                    dropout_rng, deterministic)
    grad_norm = optax.tree.norm(grads)

    def apply(_):
        updates, opt_state = make_optimizer(opt).update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = jax.tree_util.tree_map(lambda e, p: e + (1.0 - opt.ema_rate) * (p - e), state.ema_params, params)
        return params, ema, opt_state

    # A cond, not a where over the three trees: as fast as the update alone (a where costs 2% on the CPU).
    finite = jnp.isfinite(parts["bpd"]) & jnp.isfinite(grad_norm)
    params, ema, opt_state = jax.lax.cond(finite, apply, lambda _: (state.params, state.ema_params, state.opt_state),
                                          None)
    metrics = dict(parts, grad_norm=grad_norm, learning_rate=learning_rate(opt)(adam_count(state.opt_state)),
                   skipped=1.0 - finite.astype(jnp.float32))
    return TrainState(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state), metrics


def train_substeps(model_config: ModelConfig, opt: ml_collections.ConfigDict, state: TrainState, images,
                   conditioning, rng: jax.Array):
    """`S` optimizer steps in one call (lax.scan): images (S, B, H, W, C), conditioning (S, B).

    Returns (state, metrics): each metric averaged over the steps that were applied (NaN when none was),
    `skipped` summed over the S steps, and `skipped_per_step` (S,), 1.0 where a step was skipped.
    The scan stays rolled on every backend: one step is compiled, whatever S (on the CPU the UNet's
    convolutions have the backward of vdm_jax.unet._cpu_conv, as fast inside the loop as outside).
    """
    def body(state, batch):
        return train_step(model_config, opt, state, batch[0], batch[1], rng)

    state, metrics = jax.lax.scan(body, state, (images, conditioning))
    skipped = metrics.pop("skipped")
    applied = 1.0 - skipped
    means = jax.tree_util.tree_map(lambda m: jnp.sum(jnp.where(applied > 0, m, 0.0)) / jnp.sum(applied), metrics)
    return state, dict(means, skipped=jnp.sum(skipped), skipped_per_step=skipped)


def eval_terms(model_config: ModelConfig, params, images, conditioning, noise: Noise) -> dict:
    """Per-example -ELBO and its three terms in bits/dim, {'bpd', 'bpd_recon', 'bpd_latent', 'bpd_diff'}
    each (B,), with the injected noise (vdm_common.noise draws it for eval), dropout off: the eval quantity."""
    terms = VDM(model_config).apply({"params": params}, images, conditioning, noise, True, method=VDM.loss_terms)
    scale = nats_to_bpd_scale(images.shape[1:])
    return {"bpd": (terms.recon + terms.klz + terms.diff) * scale, "bpd_recon": terms.recon * scale,
            "bpd_latent": terms.klz * scale, "bpd_diff": terms.diff * scale}
