"""Lossless compression (vdm_common.bitsback, vdm_common.compressed_file, vdm_*/compress.py) in both backends.

Tiny randomly initialised models on 8x8x1 images with 17 levels: the round trip is bit-exact, every
malformed file is one CompressionError, the measured codelength is that of the latents it coded, and that
codelength is the model's own discrete-time VLB within a tolerance derived from the Monte-Carlo noise.
"""
from __future__ import annotations

import math
import struct
import zlib

import numpy as np
import pytest

from vdm_common import bitsback, compressed_file
from vdm_common.bitsback import CompressionError
from vdm_common.config import ModelConfig
from vdm_common.run import RunError

CONFIG = dict(vocab_size=17, image_channels=1, gamma_type="learnable_scalar", gamma_min=-8.0, gamma_max=6.0,
              sm_n_embd=16, sm_n_layer=1, norm_groups=4, sm_pdrop=0.0, with_fourier_features=True,
              fourier_start=2, fourier_stop=5)
SHAPE = (8, 8, 1)


def images(n, seed=0):
    """Digit-like test images: a smooth blob plus noise, values 0..16 (a random-init model fits them no
    worse than uniform noise, and they exercise the whole range)."""
    rs = np.random.RandomState(seed)
    yy, xx = np.mgrid[:8, :8]
    out = []
    for _ in range(n):
        cy, cx = rs.uniform(2, 6, 2)
        blob = 16 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / rs.uniform(2, 8))
        out.append(np.clip(np.round(blob + rs.normal(0, 1.5, blob.shape)), 0, 16))
    return np.stack(out)[..., None].astype(np.uint8)


def jax_face(seed=0, **fields):
    jax = pytest.importorskip("jax")
    from vdm_jax import compress, vdm
    config = ModelConfig.from_config(dict(CONFIG, **fields))
    params = vdm.init_params(config, jax.random.PRNGKey(seed), SHAPE)["params"]
    return compress.ModelFace(config, params)


def torch_face(seed=0, **fields):
    pytest.importorskip("torch")
    from vdm_torch import compress, vdm
    config = ModelConfig.from_config(dict(CONFIG, **fields))
    return compress.ModelFace(config, vdm.init_params(config, seed))


FACES = {"jax": jax_face, "torch": torch_face}


@pytest.fixture(scope="module", params=sorted(FACES))
def backend(request):
    return request.param


@pytest.fixture(scope="module")
def face(backend):
    return FACES[backend]()


@pytest.fixture(scope="module")
def coded(face):
    """A file of 9 images at T = 5 (4 single-image probe chunks, then larger ones)."""
    x = images(9)
    data, stream = compressed_file.encode_file(face, x, 5, collect_terms=True)
    return x, data, stream


def backend_module(face):
    if face.backend == "jax":
        from vdm_jax import compress
    else:
        from vdm_torch import compress
    return compress


# ------------------------------------------------------------------------------------------ round trips

def test_round_trip_small_T(face, coded):
    x, data, stream = coded
    assert len(stream.chunks) > bitsback.PROBE_CHUNKS
    np.testing.assert_array_equal(backend_module(face).decompress(face, data), x)


@pytest.mark.parametrize("timesteps, n", [(1, 3), (40, 6)])
def test_round_trip(face, timesteps, n):
    x = images(n, seed=timesteps)
    data = backend_module(face).compress(face, x, timesteps)
    np.testing.assert_array_equal(compressed_file.decompress(face, data, timesteps), x)


def test_round_trip_one_image_and_batch_limit(face):
    x = images(6, seed=3)
    for sample, max_batch in ((x[:1], 256), (x, 1)):
        data = compressed_file.compress(face, sample, 8, max_batch=max_batch)
        np.testing.assert_array_equal(compressed_file.decompress(face, data), sample)


def test_compression_is_deterministic(face, coded):
    x, data, _ = coded
    assert compressed_file.compress(face, x, 5) == data


def test_random_pixels_round_trip(face):
    """Uniform noise images, which the model predicts badly: windows widen, the round trip still holds."""
    x = np.random.RandomState(5).randint(0, 17, (5, *SHAPE)).astype(np.uint8)
    data = compressed_file.compress(face, x, 3)
    np.testing.assert_array_equal(compressed_file.decompress(face, data), x)


def test_progress_counts_every_image_step(face):
    x, seen = images(5), []
    data = compressed_file.compress(face, x, 4, progress=seen.append)
    assert sum(seen) == 5 * (4 + 1)
    seen.clear()
    compressed_file.decompress(face, data, progress=seen.append)
    assert sum(seen) == 5 * (4 + 1)


# ------------------------------------------------------------------------------------- malformed files

def with_crc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def header_edit(data: bytes, offset: int, value: int) -> bytes:
    """The file with byte `offset` set to `value` and a valid CRC (so the checks behind the CRC are reached)."""
    body = bytearray(data[:-4])
    body[offset] = value
    return with_crc(bytes(body))


def decode_error(face, data, **kwargs) -> str:
    with pytest.raises(CompressionError) as info:
        compressed_file.decompress(face, data, **kwargs)
    return str(info.value)


def test_compression_error_is_a_user_error():
    assert issubclass(CompressionError, RunError) and issubclass(CompressionError, ValueError)


def test_empty_file(face):
    assert "empty" in decode_error(face, b"")


def test_wrong_magic(face, coded):
    data = coded[1]
    assert "not a VDM compressed file" in decode_error(face, b"PK\x03\x04" + data[4:])
    assert "not a VDM compressed file" in decode_error(face, b"VD")


def test_wrong_version(face, coded):
    assert "format version 2" in decode_error(face, header_edit(coded[1], 4, 2))


def test_truncated_file(face, coded):
    data = coded[1]
    for size in (10, len(data) // 2, len(data) - 1):
        message = decode_error(face, data[:size])
        assert "truncated" in message


def test_flipped_byte_in_the_stream(face, coded):
    data = bytearray(coded[1])
    data[len(data) - 10] ^= 0x10
    assert "damaged" in decode_error(face, bytes(data))


def test_flipped_byte_behind_a_valid_crc(face, coded):
    """A change the CRC does not see (recomputed) is caught by the decoder's own checks."""
    x, data, stream = coded
    body = bytearray(data[:-4])
    body[len(body) - 6] ^= 0x01
    message = decode_error(face, with_crc(bytes(body)))
    assert "damaged" in message or "SHA-256" in message


def test_wrong_model(backend, coded):
    other = FACES[backend](seed=1)
    assert "another model" in decode_error(other, coded[1])


def test_wrong_timesteps(face, coded):
    assert "T = 5" in decode_error(face, coded[1], timesteps=6)


def test_other_backend_refused(face, coded):
    data = coded[1]
    other = compressed_file.numerics_code("torch" if face.backend == "jax" else "jax", "cpu")
    message = decode_error(face, header_edit(data, 5, other))
    assert "backend" in message and face.backend in message


def test_bad_images(face):
    for bad, words in ((images(2).astype(np.float32), "integer"), (images(2)[..., 0], "(N, H, W, C)"),
                       (np.full((2, *SHAPE), 17, np.uint8), "vocab_size"),
                       (np.zeros((2, 8, 8, 3), np.uint8), "channels")):
        with pytest.raises(CompressionError, match=words.replace("(", r"\(").replace(")", r"\)")):
            compressed_file.compress(face, bad, 3)


# ------------------------------------------------------------------------------------------- the rate

@pytest.fixture(scope="module")
def coded40(face):
    """24 images at T = 40, with the per-image terms on the coded latents and the model's own VLB."""
    x = images(24, seed=7)
    _, stream = compressed_file.encode_file(face, x, 40, collect_terms=True)
    return x, stream, backend_module(face).discrete_vlb(face, x, 40)


def test_pops_are_posterior_samples(coded40):
    """The q-pops' standardised noises are standard normal: their mean square is 1 within 4 standard errors
    (sqrt(2 / M) for M = 24 x 64 x 41 draws, 0.026). Without the dither (pops reading the quantiles just
    pushed) it is 1.3 here."""
    x, stream, _ = coded40
    draws = x.size * (stream.timesteps + 1)
    assert abs(stream.terms.noise_sq.sum() / draws - 1) < 4 * math.sqrt(2 / draws)


def test_net_codelength_is_that_of_the_coded_latents(coded40):
    """The coder's net bits are -log p(x, z) + log q(z | x) of the latents it coded: never more, beyond the
    discretisation (relative 2^-2k of each KL) and the word rounding (32 bits), so 0.005 bits/dim; less by
    under 1% (where the model misses by many stds, the quantiser's floor probability 2^-24 codes a value
    for less than the Gaussian's tail density)."""
    x, stream, _ = coded40
    net = stream.net_bits / x.size
    pointwise = stream.terms.total.sum() / math.log(2) / x.size
    assert net < pointwise + 0.005
    assert net > 0.99 * pointwise


def test_codelength_matches_the_models_vlb(coded40):
    """The coded single-sample bound, mean over images, equals the model's discrete-time VLB (vdm.loss_terms
    at every t = i/T) within 4 standard errors of the per-image differences (the Monte-Carlo noise of the
    coded latents and of the VLB's eps), plus 0.01 bits/dim for the coder itself."""
    x, stream, vlb = coded40
    per_dim = math.prod(SHAPE) * math.log(2)
    coded = stream.terms.total / per_dim
    bound = (vlb["recon"] + vlb["klz"] + vlb["diff"]) / per_dim
    diff = coded - bound
    tolerance = 4 * diff.std(ddof=1) / math.sqrt(len(x)) + 0.01
    assert abs(diff.mean()) < tolerance, (diff.mean(), tolerance)
    # klz in closed form is the model's to float32 rounding.
    np.testing.assert_allclose(stream.terms.klz, vlb["klz"], rtol=1e-4)


def test_initial_bits_are_about_one_image(coded):
    """The loan is paid once: the first chunk's (one image), not one per chunk or per image."""
    x, _, stream = coded
    assert stream.initial_bits <= 32 * math.ceil(stream.chunks[0].before - stream.chunks[0].low) / 32 + 64 * 32
    assert stream.initial_bits < 40 * math.prod(SHAPE)


# ------------------------------------------------------------------------------- framework-free pieces

def test_chunk_sizes():
    assert bitsback.chunk_sizes(3, 2, 64) == [1, 1, 1]
    assert bitsback.chunk_sizes(20, 2, 4) == [1, 1, 1, 1, 1, 2, 2, 4, 4, 3]
    assert sum(bitsback.chunk_sizes(1000, 3, 64)) == 1000
    assert max(bitsback.chunk_sizes(10_000, 1, 64)) == 64


def test_initial_words_are_a_fixed_stream():
    words = bitsback.initial_words(10)
    np.testing.assert_array_equal(bitsback.initial_words(4), words[:4])
    assert words.dtype == np.uint32 and (words != 0).all()


def test_schedule_refuses_a_flat_gamma():
    with pytest.raises(CompressionError, match="does not increase"):
        bitsback.Schedule.build(np.array([-8.0, -8.0, 6.0]), 4)


def test_schedule_grids_are_fine():
    sched = bitsback.Schedule.build(np.linspace(-8.0, 6.0, 101), 4)
    for i in range(101):
        assert 2 ** -5 < 2.0 ** sched.exponent[i] / sched.fwd_std[i] <= 2 ** -4
        assert 2.0 ** sched.exponent[i] / sched.p_std[i] < 2 ** -4 / math.sqrt(sched.c[1])


def test_varints_round_trip():
    for value in (0, 1, 127, 128, 300, 2 ** 40):
        assert compressed_file._read_varint(compressed_file._varint(value), 0) == (value, len(
            compressed_file._varint(value)))


def test_images_io_round_trip(tmp_path):
    x = images(5)
    compressed_file.write_images(tmp_path / "a.npz", x)
    np.testing.assert_array_equal(compressed_file.read_images(tmp_path / "a.npz"), x)
    compressed_file.write_images(tmp_path / "pngs", x)
    assert len(list((tmp_path / "pngs").glob("*.png"))) == 5
    np.testing.assert_array_equal(compressed_file.read_images(tmp_path / "pngs"), x)
    np.savez(tmp_path / "set.npz", train=x, test=x[:2])
    np.testing.assert_array_equal(compressed_file.read_images(tmp_path / "set.npz"), x[:2])
    with pytest.raises(CompressionError, match="exists \\(a folder\\); nothing is ever replaced"):
        compressed_file.write_images(tmp_path / "pngs", x)
    with pytest.raises(CompressionError, match="does not exist"):
        compressed_file.read_images(tmp_path / "missing.npz")
    with pytest.raises(CompressionError, match="uint8"):
        np.savez(tmp_path / "f.npz", images=x.astype(np.float32))
        compressed_file.read_images(tmp_path / "f.npz")


def test_same_weights_same_digest_in_both_backends():
    pytest.importorskip("jax")
    pytest.importorskip("torch")
    from vdm_jax import convert as jax_convert
    from vdm_torch import compress as torch_compress
    from vdm_torch import convert as torch_convert
    jf = jax_face()
    flat = jax_convert.params_to_neutral(jf._variables["params"])
    tf = torch_compress.ModelFace(jf.model_config, torch_convert.model_from_neutral(flat, jf.model_config))
    assert jf.digest == tf.digest


def test_torch_calls_do_not_depend_on_the_callers_threads():
    """torch's CPU kernels round differently with 1 and 2 threads; the face pins its calls to one thread,
    so a file written under 2 threads decodes under 1."""
    torch = pytest.importorskip("torch")
    face = torch_face(seed=2)
    x = images(4, seed=11)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        data = compressed_file.compress(face, x, 6)
        torch.set_num_threads(1)
        np.testing.assert_array_equal(compressed_file.decompress(face, data), x)
    finally:
        torch.set_num_threads(old)


def test_the_backends_faces_mirror_each_other():
    """vdm_jax/compress.py and vdm_torch/compress.py: the same public names (classes, methods, functions) in
    the same order, with the same docstrings, read from their source."""
    import ast
    from tests.conftest import ROOT

    def documented(backend):
        tree = ast.parse((ROOT / f"vdm_{backend}" / "compress.py").read_text())
        out = []
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                out.append((node.name, ast.get_docstring(node)))
                if isinstance(node, ast.ClassDef):
                    out += [(f"{node.name}.{n.name}", ast.get_docstring(n)) for n in node.body
                            if isinstance(n, ast.FunctionDef) and not n.name.startswith("_") or
                            isinstance(n, ast.FunctionDef) and n.name == "__init__"]
            elif isinstance(node, ast.ImportFrom) and node.module.startswith("vdm_common"):
                out += [(alias.name, node.module) for alias in node.names]
        return out
    jax_side, torch_side = documented("jax"), documented("torch")
    assert [name for name, _ in jax_side] == [name for name, _ in torch_side]
    assert jax_side == torch_side
    assert {"ModelFace", "ModelFace.eps_hat", "compress", "decompress", "discrete_vlb"} <= {n for n, _ in jax_side}
