"""Reader of the official VDM checkpoints (google-research/vdm), saved by clu's `MultihostCheckpoint`.

`<workdir>/checkpoints-0/` holds `ckpt-N.flax` (the flax msgpack of its TrainState: `step`, `params`,
`ema_params`, `opt_state`) beside TensorFlow files that hold only a save counter; it is read with plain
`msgpack`, without flax or TensorFlow. Its parameter tree is ours, so the import is a strict check of names
and shapes (`vdm_common.architecture.model_param_shapes`) against the model config the user names
(`configs/cifar10.py`, `configs/cifar10_aug.py` are the two released models); a mismatch says what model
config the checkpoint's tensors imply.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import ml_collections
import numpy as np

from vdm_common.architecture import model_param_shapes
from vdm_common.config import ModelConfig, make_config, validate
from vdm_common.upstream import UpstreamError, UpstreamImport, checked_count
from vdm_common.weights import ConversionError, check_tensors, flatten_tree

OFFICIAL_SCHEDULES = ("fixed", "learnable_scalar", "learnable_nnet")     # those the upstream formats hold
_CKPT_RE = re.compile(r"ckpt-(\d+)\.flax")
_OFFICIAL_TOP = {"step", "params", "ema_params", "opt_state"}


def describe_official_tree(flat: Mapping[str, np.ndarray]) -> str:
    """The model fields a flat official parameter tree implies, as a hint for a config mismatch."""
    try:
        c_in, E = np.shape(flat["score_model/conv_in/kernel"])[2:]
        C = np.shape(flat["score_model/conv_out/kernel"])[3]
        n_freq = (c_in // C - 1) // 2
    except (KeyError, ValueError, IndexError, ZeroDivisionError):
        return "(the tree has no 4-D score_model/conv_in and conv_out kernels: not a VDM parameter tree)"
    n_layer = sum(1 for k in flat if re.fullmatch(r"score_model/down\.block_\d+/conv1/kernel", k))
    attention = any(k.startswith("score_model/down.attn_") for k in flat)
    gamma = ("learnable_scalar" if "gamma/w" in flat else "learnable_nnet" if "gamma/l1/kernel" in flat
             else "fixed")
    fourier = "with_fourier_features=False" if c_in == C else f"{n_freq} Fourier frequencies"
    return (f"sm_n_embd={E}, sm_n_layer={n_layer}, image_channels={C}, with_attention={attention}, "
            f"gamma_type={gamma!r}, {fourier}")


def _as_float32(flat: Mapping[str, Any], source: str) -> dict[str, np.ndarray]:
    """float32 arrays; float32 inputs are kept as they are (read-only views into the file's bytes for the
    official format: a 2 GB checkpoint is not copied)."""
    out = {}
    for key, value in flat.items():
        arr = np.asarray(value)
        if not np.issubdtype(arr.dtype, np.floating) and arr.dtype.name != "bfloat16":
            raise UpstreamError(f"{source}: tensor {key} has dtype {arr.dtype}, expected floating point")
        out[key] = arr if arr.dtype == np.float32 else arr.astype(np.float32)
    return out


def _official_tensors(tree: Any, source: str, what: str) -> dict[str, np.ndarray]:
    """The flat tensors of a parameter tree of an official checkpoint ({} when it is not a tree)."""
    if not isinstance(tree, dict):
        return {}
    try:
        return flatten_tree(tree)
    except (TypeError, ValueError) as err:
        raise UpstreamError(f"{source} {what} holds a leaf that is not an array ({err}); the file is damaged") \
            from err


def find_clu_checkpoint(path, number: int | None = None) -> tuple[Path, list[str]]:
    """The `ckpt-N.flax` to read and notes on the choice.

    path: the official workdir (holding `checkpoints-0/`), the `checkpoints-0` directory itself, or a
    `ckpt-N.flax` file. Default N: the one TensorFlow's `checkpoint` file names (what clu restores), else
    the highest N present.
    """
    p = Path(path)
    if p.is_file():
        m = _CKPT_RE.fullmatch(p.name)
        if number is not None and (m is None or int(m.group(1)) != number):
            raise UpstreamError(f"{p} is not ckpt-{number}.flax; pass the directory to pick a checkpoint number")
        return p, [f"checkpoint file {p}"]
    if not p.is_dir():
        raise UpstreamError(f"{p} does not exist; pass the official run directory, its checkpoints-0/ "
                            f"directory or a ckpt-N.flax file")
    if not any(_CKPT_RE.fullmatch(f.name) for f in p.iterdir()):
        hosts = sorted(d for d in p.glob("checkpoints-*") if d.is_dir())
        if not hosts:
            listing = sorted(f.name for f in p.iterdir())[:20]
            raise UpstreamError(f"{p} holds no ckpt-N.flax files and no checkpoints-<host>/ directory "
                                f"(found: {listing}); an official run keeps its checkpoints in "
                                f"<workdir>/checkpoints-0/ckpt-N.flax")
        p = hosts[0]        # every host of a multi-host run saves the same (replicated) state
    numbers = sorted(int(_CKPT_RE.fullmatch(f.name).group(1)) for f in p.iterdir() if _CKPT_RE.fullmatch(f.name))
    if not numbers:
        raise UpstreamError(f"{p} holds no ckpt-N.flax files (found: {sorted(f.name for f in p.iterdir())[:20]})")
    notes = [f"checkpoints in {p}: {', '.join(f'ckpt-{n}' for n in numbers)}"]
    if number is not None:
        if number not in numbers:
            raise UpstreamError(f"{p} has no ckpt-{number}.flax; available: {numbers}")
        chosen = number
    else:
        chosen, tf_index = numbers[-1], p / "checkpoint"
        if tf_index.is_file():
            m = re.search(r'^model_checkpoint_path:\s*"(?:.*/)?ckpt-(\d+)"', tf_index.read_text(errors="replace"),
                          re.M)
            if m and int(m.group(1)) in numbers:
                chosen = int(m.group(1))
                if chosen != numbers[-1]:
                    notes.append(f"TensorFlow's 'checkpoint' file names ckpt-{chosen}, the last complete save "
                                 f"(ckpt-{numbers[-1]}.flax has no TensorFlow part); reading ckpt-{chosen}")
    return p / f"ckpt-{chosen}.flax", notes


def _ndarray_from_ext(payload: bytes, source: str) -> np.ndarray:
    import msgpack

    shape, dtype_name, buffer = msgpack.unpackb(payload, raw=True)
    name = dtype_name.decode() if isinstance(dtype_name, bytes) else dtype_name
    if name == "bfloat16":
        import ml_dtypes                                   # installed with jax; only bf16 checkpoints need it
        dtype = np.dtype(ml_dtypes.bfloat16)
    else:
        dtype = np.dtype(name)
    return np.frombuffer(buffer, dtype=dtype).reshape(shape)


def read_flax_msgpack(path) -> dict:
    """A flax msgpack file (`flax.serialization.to_bytes`) as a nested dict of numpy arrays, with plain
    `msgpack`: arrays are extension type 1 and numpy scalars type 3, each (shape, dtype name, C-order bytes)."""
    import msgpack

    path = Path(path)
    data = path.read_bytes()
    if data[:2] == b"PK":
        raise UpstreamError(f"{path} is a zip archive (a PyTorch model.pt?), not a flax msgpack checkpoint; "
                            f"for the PyTorch port use --from-upstream=pytorch-port")
    if not data:
        raise UpstreamError(f"{path} is empty; the save was interrupted: pick another ckpt-N")

    def ext_hook(code, payload):
        if code == 1:
            return _ndarray_from_ext(payload, str(path))
        if code == 3:
            return np.asarray(_ndarray_from_ext(payload, str(path)))       # 0-d array
        if code == 2:
            real, imag = msgpack.unpackb(payload)
            return complex(real, imag)
        raise ValueError(f"unknown msgpack extension type {code}")

    try:
        tree = msgpack.unpackb(data, ext_hook=ext_hook, raw=False, strict_map_key=False)
    except Exception as err:  # msgpack raises several types for truncated or foreign data
        raise UpstreamError(f"{path} cannot be read as a flax msgpack checkpoint ({type(err).__name__}: {err}); "
                            f"the file is truncated, corrupt or of another format") from err
    if not isinstance(tree, dict):
        raise UpstreamError(f"{path} holds a msgpack {type(tree).__name__}, not the state dict of a TrainState")
    try:
        return _unchunk(tree)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise UpstreamError(f"{path}: a chunked array (over 2 GiB, stored in parts) is damaged ({type(err).__name__}: "
                            f"{err}); the file is truncated or corrupt") from err


def _unchunk(node):
    """Flax splits arrays over 2 GiB into {'__msgpack_chunked_array__', 'shape', 'chunks'}; rejoin them."""
    if isinstance(node, dict):
        if node.get("__msgpack_chunked_array__"):
            shape = tuple(int(node["shape"][str(i)]) for i in range(len(node["shape"])))
            chunks = [node["chunks"][str(i)] for i in range(len(node["chunks"]))]
            return np.concatenate(chunks).reshape(shape)
        return {k: _unchunk(v) for k, v in node.items()}
    return node


def _leaves(node, prefix: str = "") -> dict[str, Any]:
    """Flat {'a/b': leaf} of a nested dict; empty dicts (empty optax states) have no leaves."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            out.update(_leaves(v, f"{prefix}{k}/"))
        return out
    return {prefix.rstrip("/"): node}


def _find_adam_state(opt_state) -> tuple[str, dict] | None:
    """(path, node) of the one {count, mu, nu} node (optax scale_by_adam) in an optimizer state dict."""
    found = []

    def walk(node, path):
        if isinstance(node, dict):
            if {"count", "mu", "nu"} <= set(node):
                found.append((path, node))
                return
            for k, v in node.items():
                walk(v, f"{path}/{k}" if path else str(k))
    walk(opt_state, "")
    if len(found) > 1:
        raise UpstreamError(f"the optimizer state holds {len(found)} Adam states ({[p for p, _ in found]}); "
                            f"expected one")
    return found[0] if found else None


def official_state_to_import(state: Mapping, config, source: str, notes: list | None = None) -> UpstreamImport:
    """The TrainState dict of an official checkpoint -> UpstreamImport, strictly checked against `config`
    (a full ConfigDict, or a ModelConfig, of the model the checkpoint was trained with)."""
    config = full_config(config)
    mc = ModelConfig.from_config(config.model)
    report = list(notes or [])
    unexpected_top = sorted(set(state) - _OFFICIAL_TOP, key=str)
    missing_top = sorted({"step", "params", "ema_params"} - set(state))
    if unexpected_top or missing_top:
        raise UpstreamError(f"{source} is not an official VDM TrainState: top-level entries {sorted(state, key=str)}; "
                            f"expected {sorted(_OFFICIAL_TOP)}"
                            + (f" (missing {missing_top})" if missing_top else "")
                            + (f" (unexpected {unexpected_top})" if unexpected_top else ""))
    if mc.gamma_type not in OFFICIAL_SCHEDULES:
        raise UpstreamError(f"model.gamma_type {mc.gamma_type!r} has no upstream counterpart; upstream "
                            f"checkpoints hold 'fixed', 'learnable_scalar' or 'learnable_nnet' schedules")
    expected = model_param_shapes(mc)
    params = _official_tensors(state["params"], source, "params")
    ema = _official_tensors(state["ema_params"], source, "ema_params")
    _check_or_hint(params, expected, f"{source} params", mc)
    _check_or_hint(ema, expected, f"{source} ema_params", mc)
    step = checked_count(state["step"], "step", source)
    report.append(f"read {source}: step {step}, {len(params)} parameter tensors "
                  f"({sum(int(np.prod(s)) for s in expected.values()):,} numbers), EMA parameters")

    opt_mu = opt_nu = None
    opt_count = 0
    opt_state = state.get("opt_state")
    if opt_state is not None and not isinstance(opt_state, dict):
        raise UpstreamError(f"{source}: opt_state is a {type(opt_state).__name__}, not the optax state of a "
                            f"TrainState; the file is damaged or not an official checkpoint")
    if opt_state:
        found = _find_adam_state(opt_state)
        leaves = _leaves(opt_state)
        if found is None:
            raise UpstreamError(f"{source}: opt_state holds no Adam state (count, mu, nu); leaves: "
                                f"{sorted(leaves)[:10]}")
        adam_path, adam = found
        others = sorted(k for k in leaves if not (k == adam_path or k.startswith(adam_path + "/")))
        if others:
            raise UpstreamError(f"{source}: opt_state holds tensors besides the Adam moments that this import "
                                f"would drop: {others[:20]}; the official optimizer (AdamW with the bias mask, "
                                f"optionally after clipping) keeps only count, mu and nu")
        extra_adam = sorted(set(adam) - {"count", "mu", "nu"}, key=str)
        if extra_adam:
            raise UpstreamError(f"{source}: opt_state/{adam_path} has unexpected entries {extra_adam}")
        opt_mu = _official_tensors(adam["mu"], source, f"opt_state/{adam_path}/mu")
        opt_nu = _official_tensors(adam["nu"], source, f"opt_state/{adam_path}/nu")
        _check_or_hint(opt_mu, expected, f"{source} opt_state/{adam_path}/mu", mc)
        _check_or_hint(opt_nu, expected, f"{source} opt_state/{adam_path}/nu", mc)
        opt_count = checked_count(adam["count"], f"opt_state/{adam_path}/count", source)
        opt_mu, opt_nu = _as_float32(opt_mu, source), _as_float32(opt_nu, source)
        report.append(f"AdamW moments (opt_state/{adam_path}), update count {opt_count}")
    else:
        report.append("no optimizer state: training continues with fresh AdamW moments")
    return UpstreamImport("official", source, config, step, _as_float32(params, source), _as_float32(ema, source),
                          opt_mu, opt_nu, opt_count, report)


def _check_or_hint(got, expected, what: str, mc: ModelConfig) -> None:
    try:
        check_tensors(got, expected, what)
    except ConversionError as err:
        raise UpstreamError(f"{err}\nThe checkpoint's tensors imply {describe_official_tree(got)}; the config "
                            f"given has {describe_model_config(mc)}. The released CIFAR-10 models are "
                            f"configs/cifar10.py (128 channels) and configs/cifar10_aug.py (320 channels).") from err


def describe_model_config(mc: ModelConfig) -> str:
    n_freq = mc.fourier_stop - mc.fourier_start
    fourier = f"{n_freq} Fourier frequencies" if mc.with_fourier_features else "with_fourier_features=False"
    return (f"sm_n_embd={mc.sm_n_embd}, sm_n_layer={mc.sm_n_layer}, image_channels={mc.image_channels}, "
            f"with_attention={mc.with_attention}, gamma_type={mc.gamma_type!r}, {fourier}")


def read_official(path, config, number: int | None = None) -> UpstreamImport:
    """Reads an official clu checkpoint (see `find_clu_checkpoint` for `path`) against `config`."""
    ckpt, notes = find_clu_checkpoint(path, number)
    return official_state_to_import(read_flax_msgpack(ckpt), config, str(ckpt), notes)


def full_config(config) -> ml_collections.ConfigDict:
    """A full validated ConfigDict from a full config, or from a ModelConfig (default training sections)."""
    if isinstance(config, ModelConfig):
        return validate(make_config(config.to_dict()))
    return validate(config)
