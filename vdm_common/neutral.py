"""The framework-neutral checkpoint file: one safetensors file that either backend reads with numpy alone.

Tensors are stored under prefixed neutral keys (JAX paths joined with '/', JAX layouts; see `weights`):

    params/<key>        the trained parameters
    ema_params/<key>    their EMA (optional)
    opt/mu/<key>        AdamW first moments (optional, with opt/nu)
    opt/nu/<key>        AdamW second moments

The safetensors metadata (strings only) holds

    format          "vdm-neutral"
    format_version  "1"
    model_config    the ModelConfig as JSON
    step            optimizer updates done (the trainers' TrainState.step)
    opt_count       the Adam count (optax's count == torch AdamW's per-parameter `step`), with the moments
    extra           a JSON object of free-form strings (source file, backend, ...)

Every tensor set present must have exactly the keys and shapes of `params`; `save_neutral` and
`load_neutral` refuse anything else with a `ConversionError` / `NeutralFileError` naming the path.
"""
from __future__ import annotations

import dataclasses
import json
import os
import struct
from pathlib import Path
from typing import Mapping, Optional

import numpy as np
import safetensors.numpy

from vdm_common import integrity
from vdm_common.config import ConfigError, ModelConfig
from vdm_common.errors import UserError
from vdm_common.weights import ConversionError, check_tensors
from vdm_common.workdir import atomic_write_bytes

FORMAT = "vdm-neutral"
FORMAT_VERSION = 1
SUFFIX = ".safetensors"

# Tensor-set name in NeutralCheckpoint -> key prefix in the file.
PREFIXES = {"params": "params/", "ema_params": "ema_params/", "opt_mu": "opt/mu/", "opt_nu": "opt/nu/"}

Flat = dict[str, np.ndarray]


class NeutralFileError(UserError, ValueError):
    """A file that is not a readable neutral checkpoint; the message names the path and what is wrong."""


@dataclasses.dataclass
class NeutralCheckpoint:
    """A training state (or just weights) in neutral form: flat {neutral key: numpy array}, JAX layouts.

    step:       optimizer updates done.
    ema_params: None when the source had no EMA.
    opt_mu, opt_nu, opt_count: AdamW state (all three or none); opt_count is the Adam bias-correction
                count, equal to `step` for the trainers of this project.
    extra:      free-form string metadata (e.g. {'backend': 'jax', 'source': path}).
    """

    model_config: ModelConfig
    params: Flat
    step: int = 0
    ema_params: Optional[Flat] = None
    opt_mu: Optional[Flat] = None
    opt_nu: Optional[Flat] = None
    opt_count: Optional[int] = None
    extra: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def has_optimizer(self) -> bool:
        return self.opt_mu is not None

    def validate(self, what: str = "checkpoint") -> None:
        """Raises ConversionError unless every tensor set matches `params` key for key and shape, the
        optimizer state is complete (mu, nu and count together) and the counts are integers >= 0."""
        if not isinstance(self.model_config, ModelConfig):
            raise ConversionError(f"{what}: model_config must be a ModelConfig, got {type(self.model_config)}")
        if not self.params:
            raise ConversionError(f"{what} holds no parameters")
        shapes = {k: np.shape(v) for k, v in self.params.items()}
        for name in ("ema_params", "opt_mu", "opt_nu"):
            tensors = getattr(self, name)
            if tensors is not None:
                check_tensors(tensors, shapes, f"{what}: {name} (against params)")
        parts = {"opt_mu": self.opt_mu is not None, "opt_nu": self.opt_nu is not None,
                 "opt_count": self.opt_count is not None}
        if len(set(parts.values())) != 1:
            raise ConversionError(f"{what}: the optimizer state is incomplete ({parts}); "
                                  f"opt_mu, opt_nu and opt_count come together or not at all")
        for name in ("step", "opt_count"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, np.integer)) or isinstance(value, bool)
                                      or value < 0):
                raise ConversionError(f"{what}: {name} = {value!r} must be an integer >= 0")


def save_neutral(path: str | os.PathLike, ckpt: NeutralCheckpoint) -> Path:
    """Writes `ckpt` to `path` (a .safetensors file) atomically; returns the path.

    The parent directory is created if needed. Raises ConversionError for an inconsistent checkpoint.
    """
    path = Path(path)
    ckpt.validate(f"checkpoint for {path}")
    tensors = {}
    for name, prefix in PREFIXES.items():
        flat = getattr(ckpt, name)
        for key, value in (flat or {}).items():
            tensors[prefix + key] = np.ascontiguousarray(value)
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "model_config": ckpt.model_config.to_json(),
        "step": str(int(ckpt.step)),
        "extra": json.dumps({str(k): str(v) for k, v in ckpt.extra.items()}, sort_keys=True),
    }
    if ckpt.opt_count is not None:
        metadata["opt_count"] = str(int(ckpt.opt_count))
    metadata["sha256"] = _digest(tensors, metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, safetensors.numpy.save(tensors, metadata=metadata))
    return path


def _digest(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> str:
    """The checksum stored in the metadata: over the tensors and every other metadata entry."""
    entries = [(f"__metadata__/{k}", v) for k, v in metadata.items() if k != "sha256"]
    return integrity.digest_arrays(list(tensors.items()) + entries)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The `__metadata__` of a safetensors file (without reading its tensors)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise NeutralFileError(f"{path} is not a safetensors file (only {len(head)} bytes)")
            (size,) = struct.unpack("<Q", head)
            if size > min(os.path.getsize(path) - 8, 100_000_000):
                raise NeutralFileError(f"{path} is not a safetensors file (bad header length {size})")
            header = json.loads(f.read(size))
    except FileNotFoundError:
        raise NeutralFileError(f"{path} does not exist; pass the path of a neutral .safetensors checkpoint") \
            from None
    except IsADirectoryError:
        raise NeutralFileError(f"{path} is a directory; pass the path of a neutral .safetensors file") from None
    except NeutralFileError:
        raise
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError, JSONDecodeError, or nesting too deep
        raise NeutralFileError(f"{path} is not a safetensors file (its header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise NeutralFileError(f"{path} is not a safetensors file (its header is not a JSON object)")
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise NeutralFileError(f"{path} is not a safetensors file (its __metadata__ is not a mapping of strings)")
    return dict(metadata)


def load_neutral(path: str | os.PathLike) -> NeutralCheckpoint:
    """Reads a neutral checkpoint written by `save_neutral`; raises NeutralFileError naming the path
    (missing file, not safetensors, not a neutral checkpoint, invalid metadata) or ConversionError (tensor
    sets that do not match each other)."""
    path = Path(path)
    metadata = read_metadata(path)
    if metadata.get("format") != FORMAT:
        raise NeutralFileError(
            f"{path} is a safetensors file but not a VDM neutral checkpoint (metadata format="
            f"{metadata.get('format')!r}, expected {FORMAT!r}). Plain state_dict exports have no model config: "
            f"convert them with `python convert.py --from=FILE --to=OUT.safetensors --config=CONFIG`.")
    try:
        version = int(metadata.get("format_version", ""))
    except ValueError:
        raise NeutralFileError(f"{path}: metadata format_version={metadata.get('format_version')!r} is not an "
                               f"integer") from None
    if version > FORMAT_VERSION:
        raise NeutralFileError(f"{path} has format version {version}; this code reads up to {FORMAT_VERSION}. "
                               f"Update the code.")
    if "model_config" not in metadata:
        raise NeutralFileError(f"{path}: the metadata has no model_config")
    try:
        model_config = ModelConfig.from_json(metadata["model_config"])
    except (ConfigError, ValueError, TypeError, RecursionError) as e:
        raise NeutralFileError(f"{path}: invalid model_config in the metadata: {e}") from None
    try:
        step = int(metadata.get("step", "0"))
        opt_count = int(metadata["opt_count"]) if "opt_count" in metadata else None
        extra = json.loads(metadata.get("extra", "{}"))
    except (ValueError, RecursionError) as e:
        raise NeutralFileError(f"{path}: invalid step / opt_count / extra in the metadata: {e}") from None
    if not isinstance(extra, dict):
        raise NeutralFileError(f"{path}: the metadata's extra is not a JSON object: {extra!r:.80}")
    try:
        tensors = safetensors.numpy.load(path.read_bytes())
    except safetensors.SafetensorError as e:
        raise NeutralFileError(f"{path}: cannot read its tensors ({e}); the file is damaged or truncated") \
            from None
    if "sha256" in metadata and _digest(tensors, metadata) != metadata["sha256"]:
        raise NeutralFileError(f"{path} does not match its checksum: the file is damaged (its bytes changed after "
                               f"it was written)")
    sets: dict[str, Flat] = {}
    unknown = []
    for key, value in tensors.items():
        for name, prefix in PREFIXES.items():
            if key.startswith(prefix):
                sets.setdefault(name, {})[key[len(prefix):]] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise NeutralFileError(f"{path}: tensors outside the known sets {sorted(PREFIXES.values())}: "
                               f"{sorted(unknown)}")
    if "params" not in sets:
        raise NeutralFileError(f"{path} holds no params/ tensors")
    ckpt = NeutralCheckpoint(model_config=model_config, params=sets["params"], step=step,
                             ema_params=sets.get("ema_params"), opt_mu=sets.get("opt_mu"),
                             opt_nu=sets.get("opt_nu"), opt_count=opt_count, extra=dict(extra))
    ckpt.validate(str(path))
    return ckpt


def same_tensors(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> list[str]:
    """Keys whose tensors are not bit-identical (dtype, shape and bytes), plus keys on one side only."""
    diffs = [f"{k}: only in the first" for k in sorted(set(a) - set(b))]
    diffs += [f"{k}: only in the second" for k in sorted(set(b) - set(a))]
    for k in sorted(set(a) & set(b)):
        x, y = np.asarray(a[k]), np.asarray(b[k])
        if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
            diffs.append(f"{k}: {x.dtype}{x.shape} vs {y.dtype}{y.shape}, not bit-identical")
    return diffs
