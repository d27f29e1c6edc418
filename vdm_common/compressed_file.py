"""The compressed file of a set of images, and the readers / writers of what goes in and comes out.

    offset  size
    0       4    magic b"VDMZ"
    4       1    format version (1)
    5       1    numerics that wrote it: backend (1 jax, 2 torch) * 16 + device (0 cpu, 1 gpu, 2 tpu, 15 other)
    6       ...  unsigned LEB128 varints: T, N, H, W, C, grid_bits, max_batch, growth, pool_words, kept
            8    model digest: the first 8 bytes of bitsback.model_digest (SHA-256 of config + weights)
            4k   the coder's words (uint32, little-endian), without the `kept` initial words it rebuilds
    end-4   4    CRC-32 of everything before it

The SHA-256 of the images (their shape as text, then their bytes) is inside the coder's words: its 8
words are the first initial bits the encoder borrows (bitsback.Stream's `top`), and decoding ends with
them back on the stack. It costs no bits: they stand in for 256 of the pseudo-random initial bits that
the first image borrows anyway (about 17 per dimension).

`compress` / `decompress` are the Python API (the backends' compress.py and the CLI modes call them).
Decompressing checks, in order, the magic, version, CRC, model digest, numerics and T before it decodes, and
the SHA-256 after; every failure is one CompressionError, and nothing is written on failure.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np

from vdm_common import bitsback
from vdm_common.bitsback import CompressionError, ModelFace, Progress

MAGIC = b"VDMZ"
FORMAT_VERSION = 1
SUFFIX = ".vdmz"
DIGEST_BYTES = 8
BACKENDS = {"jax": 1, "torch": 2}
DEVICES = {"cpu": 0, "gpu": 1, "cuda": 1, "tpu": 2}
_OTHER_DEVICE = 15
_FIELDS = ("timesteps", "num_images", "height", "width", "channels", "grid_bits", "max_batch", "growth",
           "pool_words", "kept")
CHECKSUM_WORDS = 8
_MIN_SIZE = len(MAGIC) + 2 + len(_FIELDS) + DIGEST_BYTES + 4


@dataclasses.dataclass(frozen=True)
class Header:
    """Everything a compressed file says about itself (sizes in bytes)."""

    version: int
    backend: str
    device: str
    timesteps: int
    num_images: int
    height: int
    width: int
    channels: int
    grid_bits: int
    max_batch: int
    growth: int
    pool_words: int
    kept: int
    model_digest: bytes
    header_bytes: int
    payload_bytes: int

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.height, self.width, self.channels


def numerics_code(backend: str, device: str) -> int:
    return BACKENDS[backend] * 16 + DEVICES.get(device, _OTHER_DEVICE)


def _numerics_names(code: int) -> tuple[str, str]:
    backend = {v: k for k, v in BACKENDS.items()}.get(code // 16, f"backend #{code // 16}")
    device = {0: "cpu", 1: "gpu", 2: "tpu"}.get(code % 16, "another device")
    return backend, device


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise CompressionError("the compressed file's header is damaged (a size field runs past its end)")
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return value, pos


def images_sha256(images: np.ndarray) -> bytes:
    """SHA-256 of (N, H, W, C) uint8 images: their shape as text, then their bytes."""
    h = hashlib.sha256(str(tuple(images.shape)).encode())
    h.update(np.ascontiguousarray(images, np.uint8).data)
    return h.digest()


def checksum_words(images: np.ndarray) -> np.ndarray:
    """images_sha256 as 8 uint32 words, a zero word made 1 (the coder drops a trailing zero word)."""
    words = np.frombuffer(images_sha256(images), "<u4").astype(np.uint32)
    words[words == 0] = 1
    return words


def pack(stream: bitsback.Stream, face: ModelFace) -> bytes:
    """The file of a coded stream (layout in the module docstring)."""
    values = (stream.timesteps, stream.num_images, *stream.image_shape, stream.grid_bits, stream.max_batch,
              stream.growth, stream.pool_words, stream.kept)
    body = (MAGIC + bytes([FORMAT_VERSION, numerics_code(face.backend, face.device)])
            + b"".join(_varint(int(v)) for v in values) + bytes.fromhex(face.digest)[:DIGEST_BYTES]
            + np.asarray(stream.words, "<u4").tobytes())
    return body + struct.pack("<I", zlib.crc32(body))


def read_header(data: bytes) -> Header:
    """The header of a compressed file; CompressionError for an empty, truncated, foreign or damaged one."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CompressionError(f"compressed data must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise CompressionError("the compressed file is empty")
    if data[:len(MAGIC)] != MAGIC[:len(data)] or len(data) < len(MAGIC):
        raise CompressionError(f"not a VDM compressed file (it starts with {data[:4]!r}, expected {MAGIC!r})")
    if len(data) < _MIN_SIZE:
        raise CompressionError(f"the compressed file is truncated ({len(data)} bytes; even its header needs "
                               f"{_MIN_SIZE})")
    version = data[4]
    if version != FORMAT_VERSION:
        raise CompressionError(f"the compressed file has format version {version}; this code reads version "
                               f"{FORMAT_VERSION}" + (" (update the code)" if version > FORMAT_VERSION else ""))
    if struct.unpack("<I", data[-4:])[0] != zlib.crc32(data[:-4]):
        raise CompressionError(f"the compressed file is damaged or truncated: its CRC-32 does not match its "
                               f"{len(data)} bytes")
    backend, device = _numerics_names(data[5])
    pos, values = 6, []
    for _ in _FIELDS:
        value, pos = _read_varint(data, pos)
        values.append(value)
    fields = dict(zip(_FIELDS, values))
    digest = data[pos:pos + DIGEST_BYTES]
    pos += DIGEST_BYTES
    payload = len(data) - 4 - pos
    if payload < 0 or payload % 4 or min(values[:5]) < 1:
        raise CompressionError("the compressed file's header is damaged (its sizes do not fit the file)")
    return Header(version=version, backend=backend, device=device, **fields, model_digest=digest,
                  header_bytes=pos + 4, payload_bytes=payload)


def check_images(images, face: ModelFace) -> np.ndarray:
    """images as (N, H, W, C) uint8 within the model's vocabulary and channels, else CompressionError."""
    images = np.asarray(images)
    cfg = face.model_config
    if images.ndim != 4 or not images.size:
        raise CompressionError(f"images must be a non-empty (N, H, W, C) array, got shape {images.shape}")
    if images.shape[3] != cfg.image_channels:
        raise CompressionError(f"images have {images.shape[3]} channels (shape {images.shape}, NHWC); the model "
                               f"takes {cfg.image_channels}")
    if not np.issubdtype(images.dtype, np.integer):
        raise CompressionError(f"images must hold integer pixel values, got dtype {images.dtype}")
    if images.min() < 0 or images.max() >= cfg.vocab_size:
        raise CompressionError(f"pixel values run from {images.min()} to {images.max()}; the model codes values "
                               f"0..{cfg.vocab_size - 1} (vocab_size {cfg.vocab_size})")
    return images.astype(np.uint8)


def encode_file(face: ModelFace, images, timesteps: int, grid_bits: int = bitsback.GRID_BITS,
                max_batch: int = bitsback.MAX_BATCH, progress: Progress | None = None,
                collect_terms: bool = False) -> tuple[bytes, bitsback.Stream]:
    """compress, also returning the coded Stream with what the encoder measured (chunk costs, Terms)."""
    images = check_images(images, face)
    if not 1 <= grid_bits <= 16 or not 1 <= max_batch or not 1 <= timesteps:
        raise CompressionError(f"timesteps = {timesteps}, grid_bits = {grid_bits}, max_batch = {max_batch}: "
                               f"need timesteps >= 1, grid_bits in 1..16, max_batch >= 1")
    stream = bitsback.encode(face, images, timesteps, grid_bits, max_batch, progress, collect_terms,
                             top=checksum_words(images))
    return pack(stream, face), stream


def compress(face: ModelFace, images, timesteps: int, grid_bits: int = bitsback.GRID_BITS,
             max_batch: int = bitsback.MAX_BATCH, progress: Progress | None = None) -> bytes:
    """The compressed file of images (N, H, W, C) uint8 in [0, vocab_size), bits-back coded with the
    discrete-time model of T = `timesteps` steps. progress(n): n more image-steps done (N (T + 1) in all)."""
    return encode_file(face, images, timesteps, grid_bits, max_batch, progress)[0]


def check_file(face: ModelFace, data: bytes, timesteps: int | None = None) -> Header:
    """The header of a compressed file that `face` can decode, checked without decoding: CompressionError for
    an empty, truncated, foreign or damaged file, another model's file, one written by another backend or
    device kind, or (timesteps given) another T."""
    header = read_header(data)
    if header.model_digest != bytes.fromhex(face.digest)[:DIGEST_BYTES]:
        raise CompressionError(f"the file was compressed with another model (model digest "
                               f"{header.model_digest.hex()}, this model's is {face.digest[:2 * DIGEST_BYTES]}): "
                               f"decompress it with the weights (run and checkpoint) that compressed it")
    if (header.backend, header.device) != _numerics_names(numerics_code(face.backend, face.device)):
        raise CompressionError(f"the file was compressed by the {header.backend} backend on {header.device}; "
                               f"this is {face.backend} on {face.device}. Decoding repeats the encoder's float "
                               f"computations bit for bit, and backends and device kinds round differently: "
                               f"decompress it with {header.backend} on {header.device}")
    if timesteps is not None and timesteps != header.timesteps:
        raise CompressionError(f"the file was compressed with T = {header.timesteps} steps, not the "
                               f"{timesteps} asked for: ask for T = {header.timesteps}, or name no T (the file "
                               f"says which)")
    if header.kept > header.pool_words or header.image_shape[2] != face.model_config.image_channels:
        raise CompressionError("the compressed file's header is damaged (its sizes do not fit the model)")
    return header


def decompress(face: ModelFace, data: bytes, timesteps: int | None = None,
               progress: Progress | None = None) -> np.ndarray:
    """The images (N, H, W, C) uint8 of a compressed file. timesteps: when given, the T the file must have.

    CompressionError before decoding where check_file refuses the file; after decoding, when the images do
    not match the stored SHA-256.
    """
    header = check_file(face, data, timesteps)
    data = bytes(data)
    start = header.header_bytes - 4
    words = np.frombuffer(data[start:start + header.payload_bytes], "<u4").astype(np.uint32)
    stream = bitsback.Stream(timesteps=header.timesteps, num_images=header.num_images,
                             image_shape=header.image_shape, grid_bits=header.grid_bits,
                             max_batch=header.max_batch, growth=max(header.growth, 1),
                             pool_words=header.pool_words, kept=header.kept, words=words,
                             top_words=CHECKSUM_WORDS)
    images, checksum = bitsback.decode(face, stream, progress)
    if not np.array_equal(checksum, checksum_words(images)):
        raise CompressionError("the decompressed images do not match the file's SHA-256: the file is damaged, or "
                               "the floating-point results differ from the encoder's (another library version "
                               "or CPU)")
    return images


# ------------------------------------------------------------------------------------------ inputs, outputs

def read_images(path: str | os.PathLike, key: str | None = None) -> np.ndarray:
    """Images (N, H, W, C) uint8 from a .npz (array `key`; default 'images', else its only array, else the
    npz data set's 'test' split) or a folder of PNGs (sorted by name; greyscale -> C = 1, RGB -> C = 3)."""
    path = Path(path)
    if path.is_dir():
        return _read_pngs(path)
    if not path.is_file():
        raise CompressionError(f"--input {path} does not exist; give a .npz of uint8 images or a folder of PNGs")
    try:
        with np.load(path, allow_pickle=False) as contents:
            names = list(contents.files)
            if key is None:
                key = "images" if "images" in names else names[0] if len(names) == 1 else "test"
            if key not in names:
                raise CompressionError(f"{path} has no array {key!r} (it holds {names}); store the images as "
                                       f"np.savez(path, images=uint8_nhwc)")
            images = contents[key]
    except CompressionError:
        raise
    except Exception as e:  # np.load raises many types for files that are not npz archives
        raise CompressionError(f"{path} is not a readable .npz archive ({type(e).__name__}: {e})") from None
    if images.dtype != np.uint8:
        raise CompressionError(f"{path}: array {key!r} has dtype {images.dtype}; images are uint8 pixel values")
    return images[..., None] if images.ndim == 3 else images


def _read_pngs(folder: Path) -> np.ndarray:
    from PIL import Image

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".png")
    if not files:
        raise CompressionError(f"the folder {folder} holds no .png files")
    images = []
    for p in files:
        try:
            with Image.open(p) as im:
                if im.mode not in ("L", "RGB"):
                    raise CompressionError(f"{p} is a {im.mode} PNG; 8-bit greyscale (L) and RGB are read")
                array = np.asarray(im, np.uint8)
        except CompressionError:
            raise
        except Exception as e:  # PIL's errors for unreadable files
            raise CompressionError(f"{p} is not a readable PNG ({type(e).__name__}: {e})") from None
        images.append(array[..., None] if array.ndim == 2 else array)
    shapes = sorted({a.shape for a in images})
    if len(shapes) > 1:
        raise CompressionError(f"the PNGs in {folder} differ in shape ({shapes[:3]}); all images need one shape")
    return np.stack(images)


def refuse_existing(path: str | os.PathLike, empty_folder_ok: bool = False) -> Path:
    """`path` as a Path, or CompressionError when something is there already: compressing and decompressing
    never replace a file or folder (an empty folder may take PNGs when `empty_folder_ok`)."""
    path = Path(path)
    if empty_folder_ok and path.is_dir() and not any(path.iterdir()):
        return path
    if path.exists() or path.is_symlink():
        kind = "a folder" if path.is_dir() else "a file"
        raise CompressionError(f"--output {path} exists ({kind}); nothing is ever replaced. Name a path that "
                               f"does not exist yet, or move {path} away first")
    return path


def _write_new(path: Path, data: bytes) -> Path:
    """Writes `data` to `path`, which must not exist: a temporary file in the same folder, fsync, then a hard
    link to `path` (which fails when `path` appeared meanwhile, where a rename would replace it)."""
    refuse_existing(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), 0o644)
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            refuse_existing(path)
            raise
    finally:
        os.unlink(tmp)
    return path


def write_images(path: str | os.PathLike, images: np.ndarray) -> Path:
    """Writes images (N, H, W, C) uint8 to `path`, which must not exist (or be an empty folder, for PNGs):
    a .npz (array 'images') or a folder of PNGs 000000.png, ... (C = 1 or 3), each whole or not at all.
    Returns the path."""
    path = Path(path)
    if path.suffix == ".npz":
        buffer = io.BytesIO()
        np.savez(buffer, images=images)
        return _write_new(path, buffer.getvalue())
    if path.suffix.lower() in (".png", ".npy", SUFFIX):
        raise CompressionError(f"--output {path}: images are written to a .npz or to a folder of PNGs; name "
                               f"a .npz file or a folder")
    from PIL import Image

    if images.shape[3] not in (1, 3):
        raise CompressionError(f"PNG output takes 1 or 3 channels, the images have {images.shape[3]}; write "
                               f"a .npz instead")
    refuse_existing(path, empty_folder_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    width = max(6, len(str(len(images) - 1)))
    for i, image in enumerate(images):
        Image.fromarray(image[..., 0] if image.shape[2] == 1 else image).save(staging / f"{i:0{width}d}.png")
    if path.exists():
        path.rmdir()           # empty (checked above); fails, keeping staging, if files arrived meanwhile
    staging.rename(path)
    return path


def read_compressed(path: str | os.PathLike) -> bytes:
    """The bytes of a compressed file, or CompressionError naming `path` when it is no file."""
    path = Path(path)
    if not path.is_file():
        raise CompressionError(f"--input {path} is not a file; give a file written by --mode=compress")
    return path.read_bytes()


def write_compressed(path: str | os.PathLike, data: bytes) -> Path:
    """Writes a compressed file to `path`, which must not exist, whole or not at all; returns the path."""
    return _write_new(Path(path), data)
