"""JAX side of the weight conversion: parameter trees and TrainStates <-> the neutral form (numpy).

The neutral form is the JAX tree itself, flattened ('score_model/conv_in/kernel'), so this side only
flattens, checks and rebuilds; `vdm_torch.convert` mirrors these functions with renames and transposes.
Conversion is strict: a tensor set that does not match the model key for key and shape raises
`ConversionError` listing every missing, unexpected and mis-shaped key.

Optimizer state: `make_optimizer` is an optax chain (optionally clip_by_global_norm, then scale_by_adam,
masked add_decayed_weights, scale_by_schedule). Its one `ScaleByAdamState` holds mu, nu and the Adam count;
every `count` in the chain (Adam's and the schedule's) equals the number of updates done. The neutral
opt_count is that count, the same number as torch AdamW's per-parameter `step`.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Mapping

import flax.serialization
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vdm_common.config import ModelConfig
from vdm_common.neutral import NeutralCheckpoint
from vdm_common.weights import ConversionError, check_tensors, flatten_tree, unflatten_tree
from vdm_common.workdir import atomic_write_bytes
from vdm_jax.steps import TrainState, make_optimizer
from vdm_jax.unet import dtypes
from vdm_jax.vdm import init_params

# Native file of this backend for `load_native` / `save_native`: a flax msgpack of one parameter tree.
NATIVE_SUFFIXES = (".msgpack",)


@functools.lru_cache(maxsize=64)
def expected_shapes(model_config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """{neutral key: shape} of the model's parameters, from `jax.eval_shape` (nothing is computed).

    Parameter shapes do not depend on the image size, so a 1x1 image stands in for it.
    """
    variables = jax.eval_shape(lambda: init_params(model_config, jax.random.PRNGKey(0),
                                                   (1, 1, model_config.image_channels)))
    leaves = jax.tree_util.tree_leaves_with_path(variables["params"])
    return {"/".join(k.key for k in path): tuple(value.shape) for path, value in leaves}


def params_to_neutral(params: Mapping) -> dict[str, np.ndarray]:
    """A parameter tree (TrainState.params, or the variables {'params': tree}) -> flat numpy, neutral keys.

    The arrays are copies (fetched from the devices), in the parameters' own dtype.
    """
    if set(params) == {"params"}:
        params = params["params"]
    fetched = jax.device_get(params)
    return {key: np.array(value, copy=True) for key, value in flatten_tree(fetched).items()}


def params_from_neutral(flat: Mapping[str, np.ndarray], model_config: ModelConfig, what: str = "weights"):
    """Flat neutral tensors -> the model's parameter tree (jax arrays), checked strictly against the model.

    Raises ConversionError listing missing, unexpected and mis-shaped keys (`what` names the source in the
    message) or non-float tensors. Values are cast to the model's parameter dtype (float32, or float64 when
    model_config.compute_dtype is 'float64'); same-dtype conversion is bit-exact.
    """
    check_tensors(flat, expected_shapes(model_config), what)
    not_float = sorted(k for k, v in flat.items() if not np.issubdtype(np.asarray(v).dtype, np.floating))
    if not_float:
        raise ConversionError(f"{what}: tensors that are not floating point: {not_float}")
    dtype = dtypes(model_config)[0]
    return unflatten_tree({key: jnp.asarray(np.asarray(value), dtype=dtype) for key, value in flat.items()})


def adam_state(opt_state) -> optax.ScaleByAdamState:
    """The one ScaleByAdamState (count, mu, nu) inside an optax state; ConversionError if not exactly one."""
    found = [s for s in jax.tree_util.tree_leaves(opt_state, is_leaf=_is_adam) if _is_adam(s)]
    if len(found) != 1:
        raise ConversionError(f"the optimizer state holds {len(found)} ScaleByAdamState entries, expected "
                              f"exactly 1 (the AdamW of vdm_jax.steps.make_optimizer)")
    return found[0]


def _is_adam(node) -> bool:
    return isinstance(node, optax.ScaleByAdamState)


def _has_count(node) -> bool:
    return isinstance(node, tuple) and hasattr(node, "_fields") and "count" in node._fields


def _counts(opt_state) -> list[int]:
    """Every `count` field of the optax chain (Adam's and the LR schedule's)."""
    return [int(s.count) for s in jax.tree_util.tree_leaves(opt_state, is_leaf=_has_count) if _has_count(s)]


def state_to_neutral(state: TrainState, model_config: ModelConfig, extra: Mapping[str, str] | None = None
                     ) -> NeutralCheckpoint:
    """A TrainState -> NeutralCheckpoint: params, EMA, step, Adam mu / nu / count (numpy copies)."""
    adam = adam_state(state.opt_state)
    counts = set(_counts(state.opt_state))
    if len(counts) != 1:
        raise ConversionError(f"the optax state's counts disagree ({sorted(counts)}); every count of the chain "
                              f"must equal the number of updates done")
    ckpt = NeutralCheckpoint(
        model_config=model_config, step=int(state.step), params=params_to_neutral(state.params),
        ema_params=params_to_neutral(state.ema_params), opt_mu=params_to_neutral(adam.mu),
        opt_nu=params_to_neutral(adam.nu), opt_count=counts.pop(), extra={"backend": "jax", **(extra or {})})
    ckpt.validate("JAX TrainState")
    return ckpt


def state_from_neutral(ckpt: NeutralCheckpoint, opt_config: ml_collections.ConfigDict,
                       fresh_optimizer: bool = False) -> TrainState:
    """NeutralCheckpoint -> TrainState with the optimizer of `opt_config` (vdm_jax.steps.make_optimizer).

    The Adam moments and every count of the optax chain come from the checkpoint, so training continues on
    the same trajectory. A checkpoint without EMA starts the EMA at the parameters. A checkpoint without
    optimizer state raises ConversionError unless fresh_optimizer=True, which starts zero moments and step 0
    (a new run from these weights: LR warmup starts again).
    """
    cfg = ckpt.model_config
    params = params_from_neutral(ckpt.params, cfg, "params")
    ema = params_from_neutral(ckpt.ema_params, cfg, "ema_params") if ckpt.ema_params is not None else \
        jax.tree_util.tree_map(jnp.copy, params)
    opt_state = make_optimizer(opt_config).init(params)
    if fresh_optimizer:
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=ema, opt_state=opt_state)
    if not ckpt.has_optimizer:
        raise ConversionError("the checkpoint has no optimizer state (opt/mu, opt/nu): training cannot continue "
                              "on its trajectory. Pass fresh_optimizer=True to start a new optimizer at step 0.")
    mu = params_from_neutral(ckpt.opt_mu, cfg, "opt_mu")
    nu = params_from_neutral(ckpt.opt_nu, cfg, "opt_nu")

    def restore(node):
        if _is_adam(node):
            return node._replace(count=jnp.asarray(ckpt.opt_count, node.count.dtype), mu=mu, nu=nu)
        if _has_count(node):
            return node._replace(count=jnp.asarray(ckpt.opt_count, node.count.dtype))
        return node

    opt_state = jax.tree_util.tree_map(restore, opt_state, is_leaf=lambda n: _is_adam(n) or _has_count(n))
    return TrainState(step=jnp.asarray(ckpt.step, jnp.int32), params=params, ema_params=ema, opt_state=opt_state)


def load_native(path: str | os.PathLike, model_config: ModelConfig | None = None) -> NeutralCheckpoint:
    """Reads this backend's native weights file: a flax msgpack (`flax.serialization.to_bytes`) of one
    parameter tree (or of {'params': tree}). It holds no config, so `model_config` is required."""
    path = Path(path)
    if model_config is None:
        raise ConversionError(f"{path}: a msgpack parameter file holds no model config; pass one "
                              f"(convert.py --config=CONFIG)")
    try:
        contents = path.read_bytes()
    except FileNotFoundError:
        raise ConversionError(f"{path} does not exist") from None
    except OSError as e:
        raise ConversionError(f"{path} cannot be read: {e.strerror}") from None
    try:
        tree = flax.serialization.msgpack_restore(contents)
    except Exception as e:  # msgpack raises several unrelated exception types on garbage
        hint = "; it is a zip archive (a torch .pt file?): give it the .pt extension" if contents[:2] == b"PK" else ""
        raise ConversionError(f"{path} is not a flax msgpack file ({type(e).__name__}: {e}){hint}") from None
    if not isinstance(tree, dict):
        raise ConversionError(f"{path} does not hold a parameter tree (got {type(tree).__name__})")
    try:
        flat = params_to_neutral(tree)
    except (TypeError, ValueError, AttributeError) as e:  # {'params': 0}, ragged lists, undecodable bytes
        raise ConversionError(f"{path} does not hold a tree of arrays ({type(e).__name__}: {e}); it is not a "
                              f"flax parameter file") from None
    params_from_neutral(flat, model_config, str(path))  # strict check only
    return NeutralCheckpoint(model_config=model_config, params=flat, extra={"source": str(path)})


def save_native(path: str | os.PathLike, ckpt: NeutralCheckpoint, weights: str = "params") -> Path:
    """Writes one parameter tree of `ckpt` ('params' or 'ema_params') as a flax msgpack file, atomically."""
    flat = getattr(ckpt, weights)
    if flat is None:
        raise ConversionError(f"the checkpoint has no {weights}")
    params_from_neutral(flat, ckpt.model_config, weights)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, flax.serialization.msgpack_serialize(unflatten_tree(flat)))
    return path
