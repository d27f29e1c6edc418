"""Damaged checkpoints (bytes flipped, a file cut short, metadata missing): detected (each checkpoint carries a
SHA-256 of its contents, vdm_common.integrity), reported by name, moved to checkpoints/damaged/ and the
newest intact checkpoint used; when none is intact, a clear error and nothing deleted or moved.

Each test damages a copy of the uninterrupted run (checkpoints at steps 4, 8 and 12) and resumes it with the
trainer's command line.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import safetensors.numpy

from conftest import assert_same_state, final_state, run_with_fault, tree_digest
from vdm_common import workdir as workdir_lib


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    offset = len(data) // 2 if offset is None else offset
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def cut_short(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def drop_metadata(path: Path) -> None:
    """Rewrites a safetensors file with the same tensors and no metadata."""
    tensors = safetensors.numpy.load(path.read_bytes())
    path.write_bytes(safetensors.numpy.save(tensors))


def native_file(workdir: Path, backend: str, step: int) -> Path:
    """The checkpoint file to damage: the torch file, or the largest file of the orbax step (array data)."""
    if backend == "torch":
        return workdir / "checkpoints" / "torch" / f"step_{step}.pt"
    return max((p for p in (workdir / "checkpoints" / "orbax" / str(step)).rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)


def resume(backend: str, workdir: Path, returncode: int = 0) -> str:
    """Runs the trainer on the workdir (as a user resuming would); returns its stdout + stderr."""
    proc = run_with_fault(backend, workdir)
    assert proc.returncode == returncode, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_flipped_bytes_in_the_native_checkpoint_fall_back_to_its_neutral_export(backend, uninterrupted, copy_of):
    workdir = copy_of(uninterrupted(backend))
    damaged = native_file(workdir, backend, 12)
    flip_byte(damaged)
    out = resume(backend, workdir)
    assert "cannot restore checkpoint step 12" in out and "resumed from step 12 (neutral" in out
    moved = list((workdir / "checkpoints" / "damaged").iterdir())
    assert len(moved) == 1 and moved[0].name.endswith("12" if backend == "jax" else "step_12.pt")


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_newest_step_damaged_everywhere_resumes_from_the_previous_one_and_retrains(backend, uninterrupted,
                                                                                   copy_of):
    workdir = copy_of(uninterrupted(backend))
    if backend == "jax":     # orbax's metadata file of step 12 missing, its neutral export cut short
        (workdir / "checkpoints" / "orbax" / "12" / "_CHECKPOINT_METADATA").unlink()
        cut_short(workdir_lib.layout(workdir).neutral_path(12))
    else:                    # the torch file cut short, the neutral export without its metadata
        cut_short(native_file(workdir, backend, 12))
        drop_metadata(workdir_lib.layout(workdir).neutral_path(12))
    out = resume(backend, workdir)
    assert out.count("cannot restore checkpoint step 12") == 2 and "resumed from step 8" in out
    # Steps 8..12 trained again give the very state the damaged files held.
    assert_same_state(final_state(workdir), final_state(uninterrupted(backend)))
    assert len(list((workdir / "checkpoints" / "damaged").iterdir())) == 2


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_no_intact_checkpoint_is_a_clear_error_and_nothing_is_touched(backend, uninterrupted, copy_of):
    workdir = copy_of(uninterrupted(backend))
    for step in (4, 8, 12):
        flip_byte(native_file(workdir, backend, step))
        # A flipped byte in the JSON header would make it unreadable; in the tensor bytes the checksum finds it.
        header = struct.unpack("<Q", workdir_lib.layout(workdir).neutral_path(step).read_bytes()[:8])[0]
        flip_byte(workdir_lib.layout(workdir).neutral_path(step), offset=8 + header + 5)
    before = tree_digest(workdir)
    message = resume(backend, workdir, returncode=1).split("error: ", 1)[1]
    for step in (4, 8, 12):
        assert f"step {step} (neutral)" in message and str(workdir_lib.layout(workdir).neutral_path(step)) in message
    assert "checksum" in message and "Nothing was deleted or moved" in message
    after = tree_digest(workdir)
    assert {k: v for k, v in after.items() if k != ".lock"} == {k: v for k, v in before.items() if k != ".lock"}


def test_orbax_manifest_lists_every_file(uninterrupted):
    manifest = json.loads((uninterrupted("jax") / "checkpoints" / "orbax" / "12" / "vdm_digest.json").read_text())
    files = {str(p.relative_to(uninterrupted("jax") / "checkpoints" / "orbax" / "12"))
             for p in (uninterrupted("jax") / "checkpoints" / "orbax" / "12").rglob("*") if p.is_file()}
    assert set(manifest) == files - {"vdm_digest.json"} and "_CHECKPOINT_METADATA" in manifest
