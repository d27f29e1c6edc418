"""Data sets as uint8 NHWC numpy arrays, and the batches of training and evaluation.

Every backend reads its data through this module, so both see the same pixels in the same order:

  load_dataset(config.data)          -> Dataset(train (N, H, W, C) uint8, test (M, H, W, C) uint8, vocab_size)
  train_batch(dataset, seed, step, ...) -> the batch of optimizer step `step`, this process's slice of it
  eval_batches(dataset, batch_size, ...) -> the test split in order, in fixed-shape padded batches with a mask
  pixel_baseline_bpd(dataset)        -> bits/dim of an independent per-pixel model, the number to beat

`train_batch` is a pure function of (seed, step): there is no iterator state to checkpoint, a resumed run
sees exactly the batches it would have seen, and a run on 1, 2 or 8 processes trains on the same global
batches. Every random draw comes from a numpy bit generator's raw stream (PCG64 seeded through
SeedSequence), which numpy keeps identical across versions, turned into permutations and uniforms here.

Data sets (`config.data.dataset`):
  digits       scikit-learn's 8x8 digits (17 grey levels), shipped inside scikit-learn: no download.
  cifar10      CIFAR-10 through tensorflow-datasets (`pip install 'vdm[cifar]'`).
  cifar10_aug  CIFAR-10 with the official VDM augmentation (flips and 90-degree rotations).
  imagenet32   tfds `imagenet_resized/32x32` (train / validation).
  npz          your own images: a .npz file with uint8 arrays `train` and `test` (`config.data.npz_path`).

Only numpy is imported here; scikit-learn and tensorflow-datasets are imported by the loaders that need them.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import logging
import os
from typing import Any, Iterator, Sequence

import numpy as np

from vdm_common.config import DATASETS
from vdm_common.errors import UserError

DIGITS_NUM_TEST = 297        # of the 1,797 digits: 1,500 train, 297 test

# tfds name, train split, test split. ImageNet 32x32 has no public test split: the VDM paper reports on
# its validation split.
_TFDS_SOURCES = {
    "cifar10": ("cifar10", "train", "test"),
    "cifar10_aug": ("cifar10", "train", "test"),
    "imagenet32": ("imagenet_resized/32x32", "train", "validation"),
}
_READ_CHUNK = 4096           # examples decoded per bulk read from a tfds source
# The archives tfds downloads to prepare a data set; offline, they go into config.data.manual_dir.
_TFDS_ARCHIVES = {
    "cifar10": ("https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",),
    "imagenet_resized/32x32": ("http://www.image-net.org/data/downsample/Imagenet32_train_npz.zip",
                               "http://www.image-net.org/data/downsample/Imagenet32_val_npz.zip"),
}
_PROBE_SECONDS = 2.0         # how long the test that a download can start waits for a connection

# Tags that keep the random streams of different uses apart for the same seed.
_STREAM_DIGITS_SPLIT = 0
_STREAM_SHUFFLE = 1
_STREAM_AUGMENT = 2


class DataError(UserError, ValueError):
    """A data file or data set cannot be used; the message names the path and what to do."""


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A whole data set in memory: integer pixels in [0, vocab_size), NHWC.

    `augment` is True for `cifar10_aug` only: `train_batch` then flips and rotates the training images.
    """

    train: np.ndarray        # (N, H, W, C) uint8
    test: np.ndarray         # (M, H, W, C) uint8
    vocab_size: int
    name: str
    augment: bool = False

    def __post_init__(self):
        for split in ("train", "test"):
            array = getattr(self, split)
            if not isinstance(array, np.ndarray) or array.dtype != np.uint8 or array.ndim != 4 or not len(array):
                raise DataError(f"data set {self.name!r}: {split} must be a non-empty uint8 array (N, H, W, C), "
                                f"got {getattr(array, 'dtype', type(array))} {getattr(array, 'shape', '')}")
        if self.train.shape[1:] != self.test.shape[1:]:
            raise DataError(f"data set {self.name!r}: train images {self.train.shape[1:]} and test images "
                            f"{self.test.shape[1:]} differ in (H, W, C)")
        if not 2 <= self.vocab_size <= 256:
            raise DataError(f"data set {self.name!r}: vocab_size {self.vocab_size} is not in [2, 256]")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of every image."""
        return tuple(self.train.shape[1:])


# ----------------------------------------------------------------------------------------------- loading

def load_dataset(data_config: Any) -> Dataset:
    """Loads the data set that `config.data` names (fields dataset, data_dir, manual_dir, npz_path).

    Raises DataError, naming the path and the fix, when the data is missing, corrupt or cannot be prepared.
    """
    name = data_config.dataset
    if not isinstance(name, str) or name not in DATASETS:
        raise DataError(f"config.data.dataset = {name!r} is not a known data set; use one of {DATASETS}")
    if name == "digits":
        return _load_digits()
    if name in _TFDS_SOURCES:
        tfds_name, train_split, test_split = _TFDS_SOURCES[name]
        train, test = _load_tfds(tfds_name, (train_split, test_split), data_config.data_dir,
                                 data_config.manual_dir)
        return Dataset(train=train, test=test, vocab_size=256, name=name, augment=name == "cifar10_aug")
    return _load_npz(data_config.npz_path)      # name == "npz"


def _load_digits() -> Dataset:
    """scikit-learn's 1,797 8x8 digits, values 0..16, split once and for all into 1,500 train / 297 test.

    The split: order the images by a permutation drawn from seed 0 (see `_permutation`, stable across
    numpy versions); the last 297 in that order are the test split, the rest (in that order) the training split.
    """
    from sklearn.datasets import load_digits  # scikit-learn ships these images: no network

    images = load_digits().images.astype(np.uint8)[..., None]    # (1797, 8, 8, 1), values 0..16
    order = _permutation((_STREAM_DIGITS_SPLIT, 0), len(images))  # (1797,)
    return Dataset(train=images[order[:-DIGITS_NUM_TEST]], test=images[order[-DIGITS_NUM_TEST:]],
                   vocab_size=17, name="digits")


def _load_npz(path: str) -> Dataset:
    """A user's .npz file: uint8 `train` and `test` (N, H, W, C) or (N, H, W); optional scalar `vocab_size`."""
    fix = "write it with np.savez(path, train=train_uint8_nhwc, test=test_uint8_nhwc)"
    if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
        problem = "is a directory" if isinstance(path, (str, os.PathLike)) and os.path.isdir(path) else \
            "does not exist"
        raise DataError(f"npz file {path!r} {problem}; set config.data.npz_path to a .npz file with uint8 "
                        f"arrays 'train' and 'test' (N, H, W, C): {fix}")
    try:
        with np.load(path, allow_pickle=False) as contents:
            arrays = {key: contents[key] for key in contents.files}
    except Exception as e:  # np.load raises many types for damaged files (BadZipFile, ValueError, EOFError...)
        raise DataError(f"npz file {path!r} is not a readable .npz archive ({type(e).__name__}: {e}); {fix}") from e
    missing = [key for key in ("train", "test") if key not in arrays]
    if missing:
        raise DataError(f"npz file {path!r} has no array {missing} (it holds {sorted(arrays)}); {fix}")
    vocab_size = 256
    if "vocab_size" in arrays:
        stored = arrays["vocab_size"]
        if stored.shape != () or stored.dtype.kind not in "iu" or not 2 <= int(stored) <= 256:
            raise DataError(f"npz file {path!r}: 'vocab_size' must be an integer scalar in [2, 256], got "
                            f"{stored.dtype} {stored.shape} {stored!r}")
        vocab_size = int(stored)
    splits = {}
    for key in ("train", "test"):
        array = arrays[key]
        if array.dtype != np.uint8:
            raise DataError(f"npz file {path!r}: '{key}' has dtype {array.dtype}, expected uint8 integer pixels "
                            f"in [0, vocab_size); convert with np.clip(x, 0, 255).astype(np.uint8) and rewrite it")
        if array.ndim == 3:
            array = array[..., None]      # (N, H, W) -> (N, H, W, 1)
        if array.ndim != 4 or not array.size:
            raise DataError(f"npz file {path!r}: '{key}' has shape {arrays[key].shape}, expected a non-empty "
                            f"(N, H, W, C) or (N, H, W) array (every size >= 1)")
        if int(array.max()) >= vocab_size:
            raise DataError(f"npz file {path!r}: '{key}' holds the value {int(array.max())}, outside "
                            f"[0, vocab_size = {vocab_size}); store a larger 'vocab_size' or fix the pixels")
        splits[key] = array
    if splits["train"].shape[1:] != splits["test"].shape[1:]:
        raise DataError(f"npz file {path!r}: train images {splits['train'].shape[1:]} and test images "
                        f"{splits['test'].shape[1:]} differ in (H, W, C); both splits need the same image shape")
    return Dataset(train=splits["train"], test=splits["test"], vocab_size=vocab_size, name="npz")


def _load_tfds(name: str, splits: Sequence[str], data_dir: str, manual_dir: str) -> list[np.ndarray]:
    """Reads tfds splits into uint8 arrays, preparing the data set first if `data_dir` lacks it.

    Reading uses the random-access array_record format and needs no TensorFlow; preparing does.
    """
    if importlib.util.find_spec("tensorflow_datasets") is None:
        raise DataError(f"data set {name!r} is read with tensorflow-datasets, which is not installed: "
                        f"pip install 'vdm[cifar]' (tensorflow-datasets, importlib_resources, array_record)")
    import tensorflow_datasets as tfds

    data_dir = data_dir or None    # None: tfds's default, $TFDS_DATA_DIR or ~/tensorflow_datasets
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    if not builder.is_prepared():
        _prepare_tfds(builder, name, manual_dir)
    try:
        sources = tfds.data_source(name, split=list(splits), data_dir=data_dir, download=False)
    except Exception as e:  # e.g. data prepared as tfrecord, which has no random access
        raise DataError(f"cannot read the prepared data set {name!r} in {builder.data_dir} "
                        f"({type(e).__name__}: {e}); it must be prepared in the array_record format: move that "
                        f"folder away and let this program prepare it again") from e
    return [_read_images(source, f"{builder.data_dir} ({split})") for source, split in zip(sources, splits)]


def _prepare_tfds(builder: Any, name: str, manual_dir: str) -> None:
    """Downloads (or takes from `manual_dir`) and prepares a tfds data set as array_record files.

    Runs once per data_dir. In a multi-process run, prepare on one process (or beforehand) so that the
    processes do not all prepare the same folder at once.
    """
    where = builder.data_dir
    if importlib.util.find_spec("tensorflow") is None:
        raise DataError(f"data set {name!r} is not prepared in {where}, and preparing it needs TensorFlow, which "
                        f"is not installed. Either `pip install tensorflow-cpu` and run again, or prepare it "
                        f"on another machine with tfds.builder({name!r}, data_dir=D, file_format='array_record')"
                        f".download_and_prepare() and copy D/{builder.info.full_name} to {where}")
    _check_download_possible(name, where, manual_dir)
    import tensorflow as tf
    import tensorflow_datasets as tfds

    try:  # TensorFlow only encodes images here; keep it off the GPUs that JAX or torch will use
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TensorFlow was already initialized by the caller; leave its devices as they are
        pass
    # Offline, the download manager takes the archive from manual_dir (cifar10: cifar-10-binary.tar.gz)
    # and checks its registered size and sha256 before extracting it.
    config = tfds.download.DownloadConfig(manual_dir=manual_dir or None, try_download_gcs=False)
    logging.getLogger(__name__).warning(
        "Preparing %s into %s once (from %s); offline, a download retries for minutes before it fails: "
        "set config.data.manual_dir to a folder holding the original archive.", name, where,
        f"manual_dir {manual_dir}" if manual_dir else "the internet")
    try:
        builder.download_and_prepare(download_config=config)
    except Exception as e:
        raise DataError(f"preparing {name!r} into {where} failed ({type(e).__name__}: {e}). Without internet, put "
                        f"the original archive (for cifar10: cifar-10-binary.tar.gz) into a folder and set "
                        f"config.data.manual_dir to it (now {manual_dir!r})") from e


def _check_download_possible(name: str, where: str, manual_dir: str) -> None:
    """DataError at once when an archive that preparing `name` needs is neither in `manual_dir` nor can be
    downloaded: offline, tfds's download manager retries for minutes before it fails."""
    archives = _TFDS_ARCHIVES.get(name, ())
    missing = [url for url in archives if not (manual_dir and os.path.isfile(os.path.join(manual_dir, _filename(url))))]
    unreachable = sorted({_host(url) for url in missing if not _reachable(url)})
    if not unreachable:
        return
    files = " and ".join(_filename(url) for url in missing)
    if manual_dir:
        where_now = f"config.data.manual_dir = {manual_dir!r} has no {files}" if os.path.isdir(manual_dir) else \
            f"config.data.manual_dir = {manual_dir!r} does not exist"
    else:
        where_now = "config.data.manual_dir is not set"
    raise DataError(f"data set {name!r} is not prepared in {where} (config.data.data_dir), and it cannot be "
                    f"downloaded: no connection to {' and '.join(unreachable)} within {_PROBE_SECONDS:g} s. Put "
                    f"{files} (from {' and '.join(missing)}, fetched on a machine with internet) into a folder "
                    f"and set config.data.manual_dir to it ({where_now}); or set config.data.data_dir to a "
                    f"folder where {name!r} is prepared")


def _filename(url: str) -> str:
    return url.rsplit("/", 1)[-1]


def _host(url: str) -> str:
    import urllib.parse
    return urllib.parse.urlsplit(url).hostname or url


def _reachable(url: str, timeout: float = _PROBE_SECONDS) -> bool:
    """Whether a TCP connection to the host of `url` (or to the proxy the environment names for its scheme)
    opens within `timeout` seconds, the name lookup included (which a socket timeout does not bound: the
    lookup runs in a thread that is left behind when it takes longer)."""
    import socket
    import threading
    import urllib.parse
    import urllib.request

    parts = urllib.parse.urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(parts.hostname or ""):
        parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    address = (parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
    opened = threading.Event()

    def connect():
        try:
            with socket.create_connection(address, timeout=timeout):
                opened.set()
        except (OSError, ValueError):     # no route, refused, lookup failed, timed out; a malformed address
            pass

    threading.Thread(target=connect, name="vdm-download-probe", daemon=True).start()
    return opened.wait(timeout)


def _read_images(source: Any, where: str) -> np.ndarray:
    """All images of a tfds random-access source, read in bulk chunks, as one (N, H, W, C) uint8 array."""
    n = len(source)
    first = np.asarray(source[0]["image"])
    if first.ndim != 3 or first.dtype != np.uint8:
        raise DataError(f"{where}: images are {first.dtype} {first.shape}, expected uint8 (H, W, C)")
    images = np.empty((n, *first.shape), np.uint8)     # (N, H, W, C)
    for start in range(0, n, _READ_CHUNK):
        stop = min(n, start + _READ_CHUNK)
        examples = source.__getitems__(list(range(start, stop)))
        images[start:stop] = np.stack([example["image"] for example in examples])
    return images


# --------------------------------------------------------------------------------------------- randomness

def _seed_words(words: Sequence[int]) -> list[int]:
    """Non-negative words for SeedSequence (which refuses negatives); injective on 64-bit integers."""
    return [int(w) % 2**64 for w in words]


@functools.lru_cache(maxsize=4)
def _permutation(words: tuple[int, ...], n: int) -> np.ndarray:
    """A permutation of range(n) determined by `words` (cached: one per epoch is reused by every step)."""
    raw = np.random.PCG64(np.random.SeedSequence(_seed_words(words))).random_raw(n)   # (n,) uint64
    order = np.argsort(raw, kind="stable")
    order.setflags(write=False)
    return order


def _uniform(words: Sequence[int], shape: tuple[int, ...]) -> np.ndarray:
    """Float64 uniforms in [0, 1) from the top 53 bits of raw PCG64 output, determined by `words`."""
    raw = np.random.PCG64(np.random.SeedSequence(_seed_words(words))).random_raw(int(np.prod(shape)))
    return ((raw >> np.uint64(11)).astype(np.float64) * 2.0**-53).reshape(shape)


# ------------------------------------------------------------------------------------------------ batches

def steps_per_epoch(dataset: Dataset, global_batch_size: int) -> int:
    """Optimizer steps in one pass over the training split; the last partial batch is dropped."""
    return len(dataset.train) // global_batch_size


def _local_slice(global_batch_size: int, process_index: int, process_count: int) -> slice:
    """This process's contiguous part of a global batch."""
    if not (isinstance(global_batch_size, (int, np.integer)) and global_batch_size >= 1):
        raise ValueError(f"global batch size {global_batch_size!r} must be an integer >= 1")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} must be in [0, process_count = {process_count})")
    if global_batch_size % process_count:
        raise ValueError(f"global batch size {global_batch_size} is not divisible by the number of processes "
                         f"{process_count}; choose a batch size that is a multiple of {process_count}")
    local = global_batch_size // process_count
    return slice(process_index * local, (process_index + 1) * local)


def train_batch(dataset: Dataset, seed: int, step: int, global_batch_size: int, process_index: int = 0,
                process_count: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The training batch of optimizer step `step`: this process's slice of the global batch.

    A pure function of (seed, step). Epoch e = step // steps_per_epoch visits the training split in a
    permutation drawn from (seed, e); step takes the next `global_batch_size` images of it, and process p of
    P takes rows [p * B, (p + 1) * B) of those, B = global_batch_size // P. For an augmented data set each
    image of the global batch is flipped / rotated by draws from (seed, step, its row in the global batch),
    so the result does not depend on the number of processes either.

    Returns images (B, H, W, C) uint8 and conditioning (B,) float32: 1.0 for augmented images, else 0.0.
    """
    local = _local_slice(global_batch_size, process_index, process_count)
    n = len(dataset.train)
    if global_batch_size > n:
        raise ValueError(f"global batch size {global_batch_size} is larger than the training split of "
                         f"{dataset.name!r} ({n} images)")
    if step < 0:
        raise ValueError(f"step {step} must be >= 0")
    epoch, index = divmod(int(step), steps_per_epoch(dataset, global_batch_size))
    order = _permutation((_STREAM_SHUFFLE, int(seed), epoch), n)                         # (N,)
    rows = order[index * global_batch_size:(index + 1) * global_batch_size][local]      # (B,)
    images = dataset.train[rows]                                                         # (B, H, W, C), a copy
    conditioning = np.zeros(len(rows), np.float32)                                       # (B,)
    if dataset.augment:
        draws = _uniform((_STREAM_AUGMENT, int(seed), int(step)), (global_batch_size, 3))[local]   # (B, 3)
        images, conditioning = _augment(images, draws)
    return images, conditioning


def _augment(images: np.ndarray, draws: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The official VDM CIFAR-10 augmentation, given three uniforms per image.

    As in the official `dataset.py`: flip left-right when u0 > 0.5; then, when u2 > 0.5, rotate
    counter-clockwise by k * 90 degrees with k = ceil(3 * u1), i.e. k in {1, 2, 3}. The conditioning is 1
    when either happened (3/4 of the images), else 0; the model is told that it sees an augmented image.
    images (B, H, W, C) uint8, draws (B, 3) -> images (B, H, W, C) uint8, conditioning (B,) float32.
    """
    flip = draws[:, 0] > 0.5                                   # (B,)
    k = np.ceil(3.0 * draws[:, 1]).astype(np.int64)            # (B,) in {1, 2, 3} (0 only when u1 == 0 exactly)
    rotate = draws[:, 2] > 0.5                                 # (B,)
    images[flip] = images[flip, :, ::-1]                       # W axis reversed
    for turns in (1, 2, 3):
        chosen = rotate & (k == turns)
        images[chosen] = np.rot90(images[chosen], turns, axes=(1, 2))   # square images: H == W
    return images, (flip | rotate).astype(np.float32)


def image_batches(images: np.ndarray, batch_size: int, num_batches: int = 0
                  ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """`images` (N, ...) in order, as batches of `batch_size` (all of them, or the first `num_batches`).

    Every batch has the same shape, for jit and sharding: the last one is padded with copies of the first
    image, marked 0 in `mask`. Yields rows (B,) int64 (the index of each row in `images`; padded rows get
    indices >= N), the batch (B, ...) and mask (B,) float32.
    """
    if not (isinstance(batch_size, (int, np.integer)) and batch_size >= 1):
        raise ValueError(f"batch size {batch_size!r} must be an integer >= 1")
    n = len(images)
    total = -(-n // batch_size)
    if num_batches > 0:
        total = min(total, num_batches)

    def batches():
        for b in range(total):
            rows = np.arange(b * batch_size, (b + 1) * batch_size)        # (B,)
            real = rows < n                                                # (B,)
            yield rows, images[np.where(real, rows, 0)], real.astype(np.float32)

    return batches()


def eval_batches(dataset: Dataset, batch_size: int, process_index: int = 0, process_count: int = 1,
                 num_batches: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The test split in order, as global batches of `batch_size` (all of them, or the first `num_batches`).

    The batches of `image_batches` (the last one padded with copies of the first test image, marked 0 in
    `mask`); process p of P gets rows [p * B, (p + 1) * B) of each global batch, B = batch_size // P; over
    all processes the rows with mask 1 are the test split, each image once.

    Yields images (B, H, W, C) uint8, conditioning (B,) float32 zeros, mask (B,) float32.
    """
    local = _local_slice(batch_size, process_index, process_count)   # checked now, not at the first next()
    batches = image_batches(dataset.test, batch_size, num_batches)
    return ((images[local], np.zeros(local.stop - local.start, np.float32), mask[local])
            for _, images, mask in batches)


# ----------------------------------------------------------------------------------------------- baseline

def pixel_baseline_bpd(dataset: Dataset) -> float:
    """Bits per dimension on the test split of independent per-pixel categoricals fit on the training split.

    Each position and channel gets its own distribution over the vocab_size values, estimated from training
    counts with add-one (Laplace) smoothing: p(v) = (count(v) + 1) / (N + vocab_size). This ignores all
    dependence between pixels: a generative model that does not beat it has learned nothing about shapes.
    """
    n, m, v = len(dataset.train), len(dataset.test), dataset.vocab_size
    d = int(np.prod(dataset.image_shape))              # dimensions per image, H * W * C
    offsets = np.arange(d, dtype=np.int64) * v         # (D,) start of each dimension's row of counts
    counts = np.zeros(d * v, np.int64)                 # (D * V,) training counts, row d holds dimension d
    train = dataset.train.reshape(n, d)                # (N, D)
    for start in range(0, n, _READ_CHUNK):
        counts += np.bincount((train[start:start + _READ_CHUNK] + offsets).ravel(), minlength=d * v)
    log2_p = np.log2(counts + 1.0) - np.log2(n + v)    # (D * V,)
    test = dataset.test.reshape(m, d)                  # (M, D)
    total_bits = 0.0
    for start in range(0, m, _READ_CHUNK):
        total_bits -= float(log2_p[test[start:start + _READ_CHUNK] + offsets].sum())
    return total_bits / (m * d)
