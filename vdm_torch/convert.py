"""PyTorch side of the weight conversion: state_dicts and TrainStates <-> the neutral form (numpy).

Mirrors `vdm_jax.convert`. Names and layouts go through the one table in `vdm_common.weights`
(`score_model.conv_in.weight` OIHW <-> `score_model/conv_in/kernel` HWIO). Conversion is strict: a tensor
set that does not match the model key for key and shape raises `ConversionError` listing every missing,
unexpected and mis-shaped key, in the names of the side that was given.

Optimizer state: torch AdamW keeps, per parameter, `step` (the Adam count), `exp_avg` (mu) and
`exp_avg_sq` (nu). They are read and written by parameter NAME (through `model.named_parameters()`), never
by position; a fresh AdamW (no step taken yet) has no state, which is the same as zero moments and count 0.

Native file of this backend (`load_native` / `save_native`, `.pt`): `torch.save` of

    {'model': state_dict, 'ema': state_dict, 'optimizer': AdamW state_dict, 'step': int,
     'model_config': ModelConfig as a dict}

('ema' and 'optimizer' optional), or a plain state_dict (then the model config must be given).
"""
from __future__ import annotations

import copy
import io
import os
from pathlib import Path
from typing import Mapping

import ml_collections
import numpy as np
import torch
from torch import nn

from vdm_common.config import ConfigError, ModelConfig, default_training
from vdm_common.neutral import NeutralCheckpoint
from vdm_common.weights import (ConversionError, check_tensors, neutral_to_torch_layout, strip_wrapper_prefixes,
                                torch_key_to_jax, torch_layout_to_neutral)
from vdm_common.workdir import atomic_write_bytes
from vdm_torch.steps import TrainState, make_optimizer
from vdm_torch.vdm import VDM, float_dtype

NATIVE_SUFFIXES = (".pt", ".pth")


def torch_shapes(model_config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """{state_dict name: shape} of the model, from a model on the meta device (nothing is allocated)."""
    with torch.device("meta"):
        model = VDM(model_config)
    return {name: tuple(value.shape) for name, value in model.state_dict().items()}


def expected_shapes(model_config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """{neutral key: shape (JAX layout)} of the model's parameters."""
    out = {}
    for name, shape in torch_shapes(model_config).items():
        key, axes = torch_key_to_jax(name, len(shape))
        out[key] = tuple(shape[a] for a in axes) if axes else shape
    return out


def check_state_dict(state: Mapping[str, torch.Tensor], model_config: ModelConfig, what: str) -> None:
    """Strict check of a torch state_dict against the model, in torch names (ConversionError lists every
    missing, unexpected and mis-shaped key)."""
    check_tensors(state, torch_shapes(model_config), what)


def params_to_neutral(model_or_state_dict: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """A VDM (or its state_dict) -> flat numpy with neutral keys and JAX layouts (copies, same dtype)."""
    state = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else \
        model_or_state_dict
    return torch_layout_to_neutral({k: _to_numpy(v) for k, v in strip_wrapper_prefixes(state).items()})


def params_from_neutral(flat: Mapping[str, np.ndarray], model_config: ModelConfig, what: str = "weights",
                        device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Flat neutral tensors -> a state_dict for `VDM(model_config).load_state_dict(..., strict=True)`.

    Checked strictly against the model (ConversionError lists missing, unexpected and mis-shaped keys in
    neutral names; `what` names the source). Values are cast to the model's dtype (float32, or float64
    when model_config.compute_dtype is 'float64'); same-dtype conversion is bit-exact.
    """
    check_tensors(flat, expected_shapes(model_config), what)
    not_float = sorted(k for k, v in flat.items() if not np.issubdtype(np.asarray(v).dtype, np.floating))
    if not_float:
        raise ConversionError(f"{what}: tensors that are not floating point: {not_float}")
    dtype = float_dtype(model_config)
    return {name: torch.from_numpy(np.array(value, copy=True)).to(device=device, dtype=dtype)
            for name, value in neutral_to_torch_layout(flat).items()}


def model_from_neutral(flat: Mapping[str, np.ndarray], model_config: ModelConfig, what: str = "weights",
                       device: torch.device | str = "cpu") -> VDM:
    """A VDM holding the neutral weights `flat` (strict, see params_from_neutral)."""
    state = params_from_neutral(flat, model_config, what, device)
    with torch.random.fork_rng(devices=[]):  # the throw-away init must not advance the caller's RNG
        model = VDM(model_config)
    model = model.to(device)
    model.load_state_dict(state, strict=True)
    return model


def _to_numpy(value: torch.Tensor) -> np.ndarray:
    value = value.detach().to("cpu")
    if value.dtype == torch.bfloat16:    # numpy has no bfloat16; widening to float32 is exact
        value = value.float()
    return value.numpy().copy()


def _named_adam_state(state: TrainState) -> tuple[dict, dict, int]:
    """(mu, nu) as {torch name: numpy} and the Adam count, read by parameter name."""
    names = {id(p): n for n, p in state.model.named_parameters()}
    in_optimizer = [p for group in state.optimizer.param_groups for p in group["params"]]
    strangers = [p for p in in_optimizer if id(p) not in names]
    missing = sorted(set(names.values()) - {names[id(p)] for p in in_optimizer if id(p) in names})
    if strangers or missing:
        raise ConversionError(f"the optimizer does not hold exactly the model's parameters ({len(strangers)} "
                              f"foreign tensors; model parameters not in it: {missing}); build it with "
                              f"vdm_torch.steps.make_optimizer(state.model, ...)")
    if any(group.get("amsgrad") for group in state.optimizer.param_groups):
        raise ConversionError("AMSGrad state (max_exp_avg_sq) has no neutral form; the trainers use plain AdamW")
    mu, nu, counts, without = {}, {}, {}, []
    for name, p in state.model.named_parameters():
        st = state.optimizer.state.get(p, {})
        if not st:
            without.append(name)
            mu[name] = np.zeros(tuple(p.shape), _to_numpy(p).dtype)
            nu[name] = np.zeros(tuple(p.shape), _to_numpy(p).dtype)
            continue
        mu[name], nu[name] = _to_numpy(st["exp_avg"]), _to_numpy(st["exp_avg_sq"])
        counts.setdefault(int(st["step"]), []).append(name)
    if without and counts:
        raise ConversionError(f"AdamW holds state for some parameters but not for {without}: every parameter "
                              f"must have taken the same number of steps")
    if len(counts) > 1:
        raise ConversionError("AdamW's per-parameter step counts differ: "
                              + "; ".join(f"step {c}: {names_[:3]}..." for c, names_ in sorted(counts.items())))
    return mu, nu, (next(iter(counts)) if counts else 0)


def state_to_neutral(state: TrainState, extra: Mapping[str, str] | None = None) -> NeutralCheckpoint:
    """A TrainState -> NeutralCheckpoint: params, EMA, step, AdamW exp_avg / exp_avg_sq / step (numpy copies).

    A fresh AdamW (no update yet) gives zero moments and opt_count 0.
    """
    mu, nu, count = _named_adam_state(state)
    ckpt = NeutralCheckpoint(
        model_config=state.model.config, step=int(state.step), params=params_to_neutral(state.model),
        ema_params=params_to_neutral(state.ema), opt_mu=torch_layout_to_neutral(mu),
        opt_nu=torch_layout_to_neutral(nu), opt_count=count, extra={"backend": "torch", **(extra or {})})
    ckpt.validate("torch TrainState")
    return ckpt


def state_from_neutral(ckpt: NeutralCheckpoint, opt_config: ml_collections.ConfigDict,
                       device: torch.device | str = "cpu", fused: bool | None = None,
                       fresh_optimizer: bool = False) -> TrainState:
    """NeutralCheckpoint -> TrainState with the AdamW of `opt_config` (vdm_torch.steps.make_optimizer).

    Each parameter's AdamW state (step = opt_count, exp_avg = mu, exp_avg_sq = nu) is set by name, so
    training continues on the same trajectory. A checkpoint without EMA starts the EMA at the parameters.
    A checkpoint without optimizer state raises ConversionError unless fresh_optimizer=True (zero moments,
    step 0: a new run from these weights).
    """
    cfg = ckpt.model_config
    model = model_from_neutral(ckpt.params, cfg, "params", device)
    if ckpt.ema_params is not None:
        ema = model_from_neutral(ckpt.ema_params, cfg, "ema_params", device)
    else:
        ema = copy.deepcopy(model)
    ema.requires_grad_(False)
    optimizer = make_optimizer(model, opt_config, fused)
    if fresh_optimizer:
        return TrainState(step=0, model=model, ema=ema, optimizer=optimizer)
    if not ckpt.has_optimizer:
        raise ConversionError("the checkpoint has no optimizer state (opt/mu, opt/nu): training cannot continue "
                              "on its trajectory. Pass fresh_optimizer=True to start a new optimizer at step 0.")
    mu = params_from_neutral(ckpt.opt_mu, cfg, "opt_mu", device)
    nu = params_from_neutral(ckpt.opt_nu, cfg, "opt_nu", device)
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        group = group_of[id(p)]
        # `step` as torch.optim.AdamW creates it: a float32 scalar (exact for counts below 2^24), on the
        # parameter's device only for the fused / capturable implementations.
        on_device = bool(group.get("fused")) or bool(group.get("capturable"))
        step = torch.tensor(float(ckpt.opt_count), dtype=torch.float32, device=p.device if on_device else "cpu")
        optimizer.state[p] = {"step": step, "exp_avg": mu[name], "exp_avg_sq": nu[name]}
    return TrainState(step=int(ckpt.step), model=model, ema=ema, optimizer=optimizer)


def state_to_checkpoint(state: TrainState) -> dict:
    """The native checkpoint dict of a TrainState (see the module docstring)."""
    return {"model": state.model.state_dict(), "ema": state.ema.state_dict(),
            "optimizer": state.optimizer.state_dict(), "step": int(state.step),
            "model_config": state.model.config.to_dict()}


def load_native(path: str | os.PathLike, model_config: ModelConfig | None = None) -> NeutralCheckpoint:
    """Reads a `.pt` file: the native checkpoint dict (model, ema, optimizer, step, model_config) or a plain
    state_dict. `model_config` is needed when the file has none; when both exist they must agree."""
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConversionError(f"{path} does not exist") from None
    except Exception as e:  # pickle / zip errors of many kinds
        raise ConversionError(f"{path} {_unreadable(path, e)}") from None
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict or a state_dict")
    if "model" not in obj:
        if not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise ConversionError(f"{path} is neither a checkpoint dict (no 'model' key) nor a plain state_dict "
                                  f"(keys {sorted(obj, key=str)[:8]}...)")
        obj = {"model": obj}
    model_config = _agree(path, obj.get("model_config"), model_config)
    params = _read_state_dict(path, obj, "model", model_config)
    ema = _read_state_dict(path, obj, "ema", model_config) if obj.get("ema") is not None else None
    try:
        step = int(obj.get("step", 0))
    except (TypeError, ValueError, RuntimeError):
        raise ConversionError(f"{path}: 'step' = {obj['step']!r:.80} is not an integer") from None
    ckpt = NeutralCheckpoint(model_config=model_config, params=params, ema_params=ema, step=step,
                             extra={"source": str(path), "backend": "torch"})
    if obj.get("optimizer") is not None:
        # Rebuild the trainer's optimizer and let torch map the saved state onto it, exactly as a resume
        # does; then read it back by parameter name. The hyper-parameters come from the file.
        opt = ml_collections.ConfigDict(default_training()["optimizer"])
        try:
            state = state_from_neutral(ckpt, opt, fresh_optimizer=True)
            state.optimizer.load_state_dict(obj["optimizer"])
            _check_param_names(path, obj["optimizer"], state)
            mu, nu, count = _named_adam_state(state)
        except ConversionError as e:
            raise ConversionError(f"{path}: {e}") from None
        except (ValueError, KeyError, TypeError, IndexError, AttributeError, RuntimeError, OverflowError) as e:
            # load_state_dict and the per-parameter reads trust the saved structure; a damaged one fails anywhere
            raise ConversionError(f"{path}: the optimizer state does not fit vdm_torch.steps.make_optimizer's "
                                  f"AdamW for this model ({type(e).__name__}: {e})") from None
        ckpt.opt_mu, ckpt.opt_nu, ckpt.opt_count = torch_layout_to_neutral(mu), torch_layout_to_neutral(nu), count
    ckpt.validate(str(path))
    return ckpt


def _unreadable(path: Path, error: Exception) -> str:
    """Why torch.load refused a file, in the user's terms, as the words after its path: the kind of file it
    looks like (torch.save writes a zip archive; before torch 1.6 a pickle), else the first line of torch's
    reason."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError:                                      # a directory, no permission: torch's reason says it
        head = None
    if head is not None and not head.startswith((b"PK\x03\x04", b"\x80")):
        if len(head) >= 9 and head[8:9] == b"{":        # safetensors: an 8-byte header length, then JSON
            return "is not a torch checkpoint: it is a safetensors file; give it the .safetensors extension"
        if head and (0x81 <= head[0] <= 0x8F or head[0] in (0xDE, 0xDF)):   # a msgpack map
            return ("is not a torch checkpoint: it looks like a flax msgpack file; give it the .msgpack extension "
                    "(and pass --config)")
        return (f"is not a torch checkpoint: torch.save writes a zip archive (its first bytes b'PK\\x03\\x04'), "
                f"and this file {_looks_like(head)}")
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    if reason.startswith("Weights only load failed"):
        reason = "it holds objects other than tensors, numbers, strings and containers"
    return (f"is not a torch file that torch.load(weights_only=True) reads: {reason} (the file is truncated, "
            f"corrupt or not written by torch.save)")


def _looks_like(head: bytes) -> str:
    """'is empty', 'starts with text: ...' or 'starts with the bytes ...' for the first bytes of a file."""
    if not head:
        return "is empty"
    text = head.decode("utf-8", "ignore")
    if len(text.encode()) >= len(head) - 3 and all(c.isprintable() or c in "\t\n\r" for c in text):
        return f"starts with text: {text[:40]!r}"
    return f"starts with the bytes {head[:8]!r}"


def _read_state_dict(path: Path, obj: Mapping, key: str, model_config: ModelConfig) -> dict[str, np.ndarray]:
    """obj[key], a state_dict of the model (strictly checked), as neutral tensors."""
    state = obj[key]
    if not isinstance(state, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                 for k, v in state.items()):
        raise ConversionError(f"{path} ['{key}'] is not a state_dict (a mapping of parameter names to tensors), "
                              f"but a {type(state).__name__}")
    # Keys with a wrapper prefix that not every key carries are reported as unexpected.
    check_state_dict(strip_wrapper_prefixes(state), model_config, f"{path} ['{key}']")
    return params_to_neutral(state)


def _check_param_names(path: Path, saved: Mapping, state: TrainState) -> None:
    """If the saved optimizer recorded parameter names (AdamW built from named parameters), they must be
    the names the model gives the same positions."""
    names = {id(p): n for n, p in state.model.named_parameters()}
    for g_saved, g_now in zip(saved["param_groups"], state.optimizer.param_groups):
        if "param_names" in g_saved:
            now = [names[id(p)] for p in g_now["params"]]
            if list(g_saved["param_names"]) != now:
                bad = [f"{a} != {b}" for a, b in zip(g_saved["param_names"], now) if a != b]
                raise ConversionError(f"{path}: the optimizer state was saved for other parameters: {bad[:5]}")


def _agree(path: Path, stored, given: ModelConfig | None) -> ModelConfig:
    if stored is None:
        if given is None:
            raise ConversionError(f"{path} holds no model_config; pass one (convert.py --config=CONFIG)")
        return given
    try:
        stored = ModelConfig.from_config(stored)
    except ConfigError as e:
        raise ConversionError(f"{path}: invalid model_config: {e}") from None
    if given is not None and given != stored:
        diff = [f"{k}: file={v!r} given={getattr(given, k)!r}" for k, v in stored.to_dict().items()
                if getattr(given, k) != v]
        raise ConversionError(f"{path}: its model_config differs from the one given: {diff}")
    return stored


def save_native(path: str | os.PathLike, ckpt: NeutralCheckpoint,
                opt_config: ml_collections.ConfigDict | None = None) -> Path:
    """Writes `ckpt` as the native checkpoint dict (`torch.save`, atomically).

    The AdamW state_dict carries the optimizer's hyper-parameters, so a checkpoint with optimizer state
    needs `opt_config` (the run's config.optimizer); without one only model, ema, step and config are saved.
    """
    path = Path(path)
    if ckpt.has_optimizer and opt_config is None:
        raise ConversionError(f"writing {path}: the checkpoint has optimizer state, and a torch AdamW state_dict "
                              f"holds the run's optimizer settings; pass them (convert.py --config=CONFIG)")
    if ckpt.has_optimizer:
        obj = state_to_checkpoint(state_from_neutral(ckpt, opt_config))
    else:
        model = model_from_neutral(ckpt.params, ckpt.model_config, "params")
        obj = {"model": model.state_dict(), "step": int(ckpt.step), "model_config": ckpt.model_config.to_dict()}
        if ckpt.ema_params is not None:
            obj["ema"] = model_from_neutral(ckpt.ema_params, ckpt.model_config, "ema_params").state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return path
