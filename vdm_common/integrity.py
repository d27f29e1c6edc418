"""Checksums of checkpoints, so that a damaged one is found before it is trusted.

A flipped bit inside a tensor is invisible to the file formats (torch's zip records, safetensors, orbax's
array store read it back as a wrong number), so each checkpoint carries a SHA-256 of what it holds:

  neutral .safetensors   metadata `sha256`: `digest_arrays` of its tensors (names, dtypes, shapes, bytes)
  torch step_N.pt        key `sha256`: the same digest over every tensor and value of the saved dict
  orbax step directory   `vdm_digest.json`: SHA-256 and size of every file, written once orbax finished it

Readers recompute and compare; a checkpoint written before these checksums existed has none and is read
unchecked (its format's own checks still apply).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

import numpy as np

from vdm_common.workdir import atomic_write_text

MANIFEST = "vdm_digest.json"


def digest_arrays(named: Iterable[tuple[str, np.ndarray | str]]) -> str:
    """SHA-256 (hex) of (name, value) pairs in sorted name order: arrays by dtype, shape and bytes, other
    values by their text."""
    h = hashlib.sha256()
    for name, value in sorted(named, key=lambda item: item[0]):
        h.update(name.encode() + b"\0")
        if isinstance(value, np.ndarray):
            h.update(f"{value.dtype.str}{value.shape}".encode())
            h.update(np.ascontiguousarray(value).view(np.uint8).reshape(-1).data)
        else:
            h.update(str(value).encode())
        h.update(b"\0")
    return h.hexdigest()


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(directory: str | os.PathLike) -> Path:
    """Writes <directory>/vdm_digest.json: {relative path: {"sha256", "size"}} of every file below it."""
    directory = Path(directory)
    files = {str(p.relative_to(directory)): {"sha256": _file_digest(p), "size": p.stat().st_size}
             for p in _files(directory)}
    path = directory / MANIFEST
    atomic_write_text(path, json.dumps(files, indent=1, sort_keys=True) + "\n")
    return path


def check_manifest(directory: str | os.PathLike) -> list[str] | None:
    """The problems of a directory against its manifest ([] when every file matches), or None when it has
    no manifest. Files added since are ignored; missing, resized and changed files are problems."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        return None
    try:
        expected = json.loads(path.read_text())
        items = [(name, entry["sha256"], int(entry["size"])) for name, entry in expected.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return [f"{path} is unreadable ({type(e).__name__}: {e})"]
    problems = []
    for name, sha256, size in items:
        file = directory / name
        if not file.is_file():
            problems.append(f"{file} is missing")
        elif file.stat().st_size != size:
            problems.append(f"{file} has {file.stat().st_size} bytes, {size} were written")
        elif _file_digest(file) != sha256:
            problems.append(f"{file} does not match its checksum (its bytes changed after it was written)")
    return problems
