"""The one table between the backends' parameter names and layouts (numpy only).

Neutral form: a flat dict of numpy arrays keyed by the JAX path joined with '/', in JAX layouts, e.g.
`score_model/down.block_0/conv1/kernel` (3, 3, Cin, Cout). The torch name is the same path joined with
'.', with the leaf renamed and the array transposed by these rules:

    JAX leaf   ndim  torch leaf  layout
    kernel     4     weight      HWIO -> OIHW   (convs)
    kernel     2     weight      (in, out) -> (out, in)   (Dense, DenseMonotone)
    scale      1     weight      same           (GroupNorm)
    bias, w, b any   same        same

Conversion is strict: `check_tensors` compares a converted set against what the target model holds and
stops with a list of every missing, unexpected and mis-shaped key.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from vdm_common.errors import UserError


class ConversionError(UserError, ValueError):
    """Weights that do not map one to one onto the target model; the message lists every mismatch."""


def jax_key_to_torch(key: str, ndim: int) -> tuple[str, tuple[int, ...] | None]:
    """('a/b/kernel', ndim) -> ('a.b.weight', transpose axes or None)."""
    *path, leaf = key.split("/")
    if leaf == "kernel" and ndim == 4:
        return ".".join(path + ["weight"]), (3, 2, 0, 1)
    if leaf == "kernel" and ndim == 2:
        return ".".join(path + ["weight"]), (1, 0)
    if leaf == "scale":
        return ".".join(path + ["weight"]), None
    return ".".join(path + [leaf]), None


def torch_key_to_jax(key: str, ndim: int) -> tuple[str, tuple[int, ...] | None]:
    """('a.b.weight', ndim) -> ('a/b/kernel', transpose axes or None); 1-D weights are GroupNorm scales.

    Module names may contain '.' in JAX (`down.block_0`): those are the ModuleDict entries in torch, so the
    split into path components goes through the known containers `down`, `mid`, `up`.
    """
    parts = key.split(".")
    path, i = [], 0
    while i < len(parts) - 1:
        if parts[i] in ("down", "mid", "up") and i + 1 < len(parts) - 1:
            path.append(parts[i] + "." + parts[i + 1])
            i += 2
        else:
            path.append(parts[i])
            i += 1
    leaf = parts[-1]
    if leaf == "weight" and ndim == 4:
        return "/".join(path + ["kernel"]), (2, 3, 1, 0)
    if leaf == "weight" and ndim == 2:
        return "/".join(path + ["kernel"]), (1, 0)
    if leaf == "weight" and ndim == 1:
        return "/".join(path + ["scale"]), None
    return "/".join(path + [leaf]), None


def neutral_to_torch_layout(flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Neutral (JAX names and layouts) -> torch state_dict names and layouts, as numpy arrays."""
    out = {}
    for key, value in flat.items():
        name, axes = jax_key_to_torch(key, value.ndim)
        out[name] = np.ascontiguousarray(value.transpose(axes)) if axes else value
    return out


def torch_layout_to_neutral(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Torch state_dict names and layouts (numpy arrays) -> neutral (JAX names and layouts)."""
    out = {}
    for key, value in state.items():
        name, axes = torch_key_to_jax(key, value.ndim)
        out[name] = np.ascontiguousarray(value.transpose(axes)) if axes else value
    return out


WRAPPER_PREFIXES = ("module.", "_orig_mod.")     # DDP's and torch.compile's


def strip_wrapper_prefixes(state: Mapping[str, Any]) -> dict[str, Any]:
    """The state dict without the DDP `module.` and torch.compile `_orig_mod.` prefixes that EVERY key
    carries, repeated and nested ones too (`module._orig_mod.x` -> `x`); else the same entries."""
    state = dict(state)
    changed = True
    while changed and state:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
    return state


def flatten_tree(tree: Mapping, prefix: str = "") -> dict[str, np.ndarray]:
    """Nested dict of arrays -> flat {'a/b/c': np.ndarray}."""
    flat = {}
    for name, value in tree.items():
        key = f"{prefix}{name}"
        if isinstance(value, Mapping):
            flat.update(flatten_tree(value, key + "/"))
        else:
            flat[key] = np.asarray(value)
    return flat


def unflatten_tree(flat: Mapping[str, np.ndarray]) -> dict:
    """Flat {'a/b/c': array} -> nested dict. Module names with '.' stay one level (`down.block_0`)."""
    tree: dict = {}
    for key, value in flat.items():
        *path, leaf = key.split("/")
        node = tree
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def check_tensors(got: Mapping[str, np.ndarray], expected: Mapping[str, tuple], what: str) -> None:
    """Raises ConversionError listing missing, unexpected and mis-shaped keys of `got` against the
    `expected` {key: shape} of the target model. `what` names the source in the message."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    misshaped = sorted(f"{k}: got {tuple(np.shape(got[k]))}, model has {tuple(expected[k])}"
                       for k in set(got) & set(expected) if tuple(np.shape(got[k])) != tuple(expected[k]))
    if missing or unexpected or misshaped:
        lines = [f"{what} does not match the model ({len(expected)} tensors expected, {len(got)} given):"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if items:
                lines.append(f"  {title} ({len(items)}):")
                lines.extend(f"    {item}" for item in items)
        lines.append("Check that the model config matches the one the weights were trained with.")
        raise ConversionError("\n".join(lines))
