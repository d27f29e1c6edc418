"""Lossless compression of a trained run, in each backend: the Python API (TrainedModel.compress /
decompress) and the command line (train_<backend>.py --mode=compress / --mode=decompress), on tiny runs.

The coder itself (rates, malformed streams, every header check) is tests/test_compress.py's; here: the same
bytes through the API and the command line, a file written in one process decoded in another, the images
back bit for bit (.npz and PNG folders), and every refusal (existing output, damaged or truncated file,
another run, another T, another backend) as one `error:` line, exit status 1, nothing written.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vdm_common import compressed_file
from vdm_common import data as data_lib
from vdm_common.api import LoadError
from vdm_common.bitsback import CompressionError
from vdm_common.trainer import Coding, RunError
from tests.conftest import ROOT, run_mode, tiny_config, tree_digest

BACKENDS = [pytest.param("jax", marks=pytest.mark.jax), pytest.param("torch", marks=pytest.mark.torch)]
T = 3               # steps of the coded model: a few UNet calls per image keep every case fast
NUM_IMAGES = 10     # 4 single-image probe chunks, then chunks of 2 and more: batched calls are exercised


def one_device(backend: str) -> dict:
    if backend == "jax":
        import jax
        return dict(devices=tuple(jax.devices()[:1]))
    return dict(device="cpu")


def load(backend: str, workdir):
    if backend == "jax":
        import vdm_jax
        return vdm_jax.load(workdir)
    import vdm_torch
    return vdm_torch.load(workdir)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """backend -> a finished 6-step tiny run of that backend, trained when a test of the backend asks."""
    base, made = tmp_path_factory.mktemp("compress_runs"), {}

    def get(backend: str) -> Path:
        if backend not in made:
            pytest.importorskip(backend)
            made[backend] = base / backend
            run_mode(backend, tiny_config("training.steps_per_sample=0"), made[backend], **one_device(backend))
        return made[backend]
    return get


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    return data_lib.load_dataset(tiny_config().data).test[:NUM_IMAGES]          # (10, 8, 8, 1) uint8, 0..16


def cli(backend: str, workdir, *args) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    device = ["--device=cpu"] if backend == "torch" else []
    return subprocess.run([sys.executable, str(ROOT / f"train_{backend}.py"), f"--workdir={workdir}", *device,
                           *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def refused(proc: subprocess.CompletedProcess, *words: str) -> str:
    """The one error line of a refused command (exit status 1, no traceback), which holds `words`."""
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for word in words:
        assert word in errors[0], (word, errors[0])
    return errors[0]


# ------------------------------------------------------------------------------------------- Python API

@pytest.mark.parametrize("backend", BACKENDS)
def test_api_round_trip(backend, runs, digits):
    model = load(backend, runs(backend))
    data = model.compress(digits, timesteps=T)
    header = compressed_file.read_header(data)
    assert (header.timesteps, header.num_images, header.image_shape) == (T, NUM_IMAGES, (8, 8, 1))
    assert header.backend == backend and header.device == "cpu"
    seen = []
    np.testing.assert_array_equal(model.decompress(data, progress=seen.append), digits)
    assert sum(seen) == NUM_IMAGES * (T + 1)
    # Deterministic, and a new load of the run (another face, other compiled functions) writes the same bytes.
    assert load(backend, runs(backend)).compress(digits, timesteps=T) == data
    # Integer images of any dtype are taken (values checked), as by bpd().
    assert model.compress(digits.astype(np.int64), timesteps=T) == data


@pytest.mark.parametrize("backend", BACKENDS)
def test_api_refusals(backend, runs, digits):
    model = load(backend, runs(backend))
    data = model.compress(digits[:3], timesteps=T)
    with pytest.raises(LoadError, match="timesteps=0"):
        model.compress(digits, timesteps=0)
    with pytest.raises(Exception, match=r"span \[16, 32\] but must lie in \[0, 17\)"):
        model.compress(digits + 16, timesteps=T)
    with pytest.raises(CompressionError, match=f"compressed with T = {T} steps, not the {T + 1} asked for"):
        model.decompress(data, timesteps=T + 1)
    with pytest.raises(CompressionError, match="truncated"):
        model.decompress(data[:-5])
    # The other backend refuses the file before decoding: its floating-point results are not the same.
    other = "torch" if backend == "jax" else "jax"
    pytest.importorskip(other)
    with pytest.raises(CompressionError, match=f"compressed by the {backend} backend on cpu; this is {other}"):
        load(other, runs(backend)).decompress(data)


# ------------------------------------------------------------------------------------------- command line

@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_cli_round_trip_and_refusals(backend, runs, digits, tmp_path):
    workdir = runs(backend)
    source = tmp_path / "digits.npz"
    np.savez(source, images=digits)
    packed = tmp_path / "digits.vdmz"
    proc = cli(backend, workdir, "--mode=compress", f"--input={source}", f"--output={packed}", f"--timesteps={T}")
    assert proc.returncode == 0, proc.stderr
    data = packed.read_bytes()
    assert f"compressed {NUM_IMAGES} images (8, 8, 1) of {source} into {packed}: {len(data)} bytes" in proc.stdout
    # The command line writes what the API writes in this process, and this process decodes it.
    model = load(backend, workdir)
    assert model.compress(digits, timesteps=T) == data
    np.testing.assert_array_equal(model.decompress(data), digits)

    pngs = tmp_path / "pngs"
    proc = cli(backend, workdir, "--mode=decompress", f"--input={packed}", f"--output={pngs}")
    assert proc.returncode == 0, proc.stderr
    assert len(list(pngs.glob("*.png"))) == NUM_IMAGES
    np.testing.assert_array_equal(compressed_file.read_images(pngs), digits)

    # The PNG folder compresses to the same file as the .npz (same images, same order).
    again = tmp_path / "again.vdmz"
    assert cli(backend, workdir, "--mode=compress", f"--input={pngs}", f"--output={again}",
               f"--timesteps={T}").returncode == 0
    assert again.read_bytes() == data

    before = tree_digest(tmp_path)
    # An existing output is never replaced, whatever the mode.
    refused(cli(backend, workdir, "--mode=compress", f"--input={source}", f"--output={packed}", f"--timesteps={T}"),
            f"--output {packed} exists", "nothing is ever replaced", "does not exist yet")
    refused(cli(backend, workdir, "--mode=decompress", f"--input={packed}", f"--output={source}"),
            f"--output {source} exists")
    # A truncated file: one line naming it, nothing written.
    cut = tmp_path / "cut.vdmz"
    cut.write_bytes(data[: len(data) // 2])
    before[cut.name] = tree_digest(tmp_path)[cut.name]
    refused(cli(backend, workdir, "--mode=decompress", f"--input={cut}", f"--output={tmp_path / 'out.npz'}"),
            f"--input {cut}", "truncated", "nothing was written")
    assert tree_digest(tmp_path) == before and not (tmp_path / "out.npz").exists()


@pytest.mark.parametrize("backend", BACKENDS)
def test_modes_in_process(backend, runs, digits, tmp_path):
    """The compress and decompress modes of vdm_common.trainer (what the entries run): the summaries, the
    .npz output, and each refusal before anything is written."""
    workdir = runs(backend)
    source, packed, out = tmp_path / "in.npz", tmp_path / "x.vdmz", tmp_path / "out.npz"
    np.savez(source, images=digits)

    def mode(name: str, coding: Coding, run=workdir) -> dict:
        return run_mode(backend, None, run, name, coding=coding, **one_device(backend))

    done = mode("compress", Coding(str(source), str(packed), T))
    size = packed.stat().st_size
    assert done["bytes"] == size and done["num_images"] == NUM_IMAGES and done["timesteps"] == T
    assert done["bpd"] == pytest.approx(8 * size / digits.size, rel=1e-12)
    done = mode("decompress", Coding(str(packed), str(out)))
    assert done["path"] == str(out) and done["timesteps"] == T
    np.testing.assert_array_equal(compressed_file.read_images(out), digits)

    before = tree_digest(tmp_path)
    with pytest.raises(CompressionError, match=f"T = {T} steps, not the {T + 2} asked for.*nothing was written"):
        mode("decompress", Coding(str(packed), str(tmp_path / "new.npz"), T + 2))
    # Another run's weights: refused by the model digest, naming the fix.
    other = tmp_path / "other_run"
    run_mode(backend, tiny_config("training.steps_per_sample=0", "training.num_steps_train=2",
                                  "training.steps_per_eval=2"), other, **one_device(backend))
    before.update({k: v for k, v in tree_digest(tmp_path).items() if k.startswith("other_run/")})
    with pytest.raises(CompressionError, match="compressed with another model .* with the weights .* that compressed"):
        mode("decompress", Coding(str(packed), str(tmp_path / "new.npz")), run=other)
    damaged = bytearray(packed.read_bytes())
    damaged[len(damaged) // 2] ^= 0x40
    (tmp_path / "damaged.vdmz").write_bytes(bytes(damaged))
    before["damaged.vdmz"] = tree_digest(tmp_path)["damaged.vdmz"]
    with pytest.raises(CompressionError, match="damaged"):
        mode("decompress", Coding(str(tmp_path / "damaged.vdmz"), str(tmp_path / "new")))
    with pytest.raises(CompressionError, match=f"--input {tmp_path / 'nope.npz'} does not exist"):
        mode("compress", Coding(str(tmp_path / "nope.npz"), str(tmp_path / "new.vdmz")))
    with pytest.raises(RunError, match="--mode=compress needs --output"):
        mode("compress", Coding(str(source)))
    with pytest.raises(RunError, match="--input and --timesteps belong to --mode=compress"):
        mode("eval", Coding(input=str(source), timesteps=5))
    with pytest.raises(CompressionError, match="a .npz file or a folder"):
        mode("decompress", Coding(str(packed), str(tmp_path / "image.png")))
    assert tree_digest(tmp_path) == before
