"""Tests of vdm_common.data: loaders, the pure batch functions, eval padding, the pixel baseline.

All run offline. CIFAR-10 reading is tested on a tiny data set prepared in a temporary tfds data_dir
(real array_record files, written by tfds without TensorFlow); real preparation from a tiny
`cifar-10-binary.tar.gz` needs TensorFlow and is marked slow.
"""
import hashlib
import importlib.util
import io
import os
import sys
import tarfile

import ml_collections
import numpy as np
import pytest

from vdm_common import data
from vdm_common.config import default_training


def data_config(**fields):
    """A `config.data` section of the real schema, with `fields` changed."""
    values = default_training()["data"]
    values.update(fields)
    return ml_collections.ConfigDict(values)


def indexed_dataset(n_train, n_test=5, augment=False):
    """Images (1, 2, 1) whose two pixels spell their own index (hi, lo), so a batch can be decoded to indices."""
    def images(n, offset):
        ids = np.arange(n) + offset
        return np.stack([ids // 256, ids % 256], axis=1).astype(np.uint8).reshape(n, 1, 2, 1)
    return data.Dataset(train=images(n_train, 0), test=images(n_test, 0), vocab_size=256, name="indexed",
                        augment=augment)


def ids(images):
    """Inverse of indexed_dataset: (B, 1, 2, 1) -> (B,) indices."""
    return images[:, 0, 0, 0].astype(np.int64) * 256 + images[:, 0, 1, 0]


def random_dataset(n_train, shape=(4, 4, 3), augment=False, seed=0):
    rng = np.random.default_rng(seed)
    return data.Dataset(train=rng.integers(0, 256, (n_train, *shape), dtype=np.uint8),
                        test=rng.integers(0, 256, (3, *shape), dtype=np.uint8),
                        vocab_size=256, name="random", augment=augment)


# ------------------------------------------------------------------------------------------------ digits

def test_digits_shapes_values_and_fixed_disjoint_split():
    from sklearn.datasets import load_digits

    ds = data.load_dataset(data_config(dataset="digits"))
    assert (ds.train.shape, ds.test.shape) == ((1500, 8, 8, 1), (297, 8, 8, 1))
    assert ds.train.dtype == ds.test.dtype == np.uint8
    assert ds.image_shape == (8, 8, 1)
    assert (ds.vocab_size, ds.name, ds.augment) == (17, "digits", False)
    assert ds.train.min() == 0 and ds.train.max() == 16 and ds.test.max() == 16

    # Way 1: find each loaded image among scikit-learn's (the 1,797 images are all distinct).
    originals = load_digits().images.astype(np.uint8)
    where = {image.tobytes(): i for i, image in enumerate(originals)}
    test_idx = np.array([where[image[..., 0].tobytes()] for image in ds.test])
    train_idx = np.array([where[image[..., 0].tobytes()] for image in ds.train])
    assert not set(test_idx) & set(train_idx)
    assert sorted(np.concatenate([train_idx, test_idx]).tolist()) == list(range(1797))
    # Way 2: the split is pinned; if this changes, every digits eval number ever reported changes with it.
    assert test_idx[:8].tolist() == [1023, 889, 883, 1258, 499, 1693, 849, 276]
    assert train_idx[:8].tolist() == [855, 921, 269, 1185, 11, 1271, 1526, 1308]
    assert hashlib.sha256(test_idx.astype("<i8").tobytes()).hexdigest() == (
        "409ed04e8bdbe203669a2ced53692e4c7501fd4dba6ff6d3a61741ed50835b30")
    again = data.load_dataset(data_config(dataset="digits"))
    np.testing.assert_array_equal(again.train, ds.train)
    np.testing.assert_array_equal(again.test, ds.test)


# ------------------------------------------------------------------------------------------- train_batch

def test_train_batch_is_a_pure_function_of_seed_and_step():
    ds = indexed_dataset(103)
    images, conditioning = data.train_batch(ds, seed=3, step=7, global_batch_size=10)
    assert images.shape == (10, 1, 2, 1) and images.dtype == np.uint8
    assert conditioning.shape == (10,) and conditioning.dtype == np.float32 and not conditioning.any()
    again, _ = data.train_batch(ds, seed=3, step=7, global_batch_size=10)
    np.testing.assert_array_equal(images, again)
    assert not np.array_equal(ids(images), ids(data.train_batch(ds, seed=3, step=8, global_batch_size=10)[0]))
    assert not np.array_equal(ids(images), ids(data.train_batch(ds, seed=4, step=7, global_batch_size=10)[0]))
    # Negative seeds are valid config values and give their own stream.
    negative = ids(data.train_batch(ds, seed=-3, step=7, global_batch_size=10)[0])
    assert not np.array_equal(ids(images), negative)


def test_one_epoch_visits_each_kept_example_once_and_epochs_reshuffle():
    ds = indexed_dataset(103)
    assert data.steps_per_epoch(ds, 10) == 10     # 103 // 10, the last 3 of each epoch dropped
    epoch0 = np.concatenate([ids(data.train_batch(ds, 5, step, 10)[0]) for step in range(10)])
    epoch1 = np.concatenate([ids(data.train_batch(ds, 5, step, 10)[0]) for step in range(10, 20)])
    for epoch in (epoch0, epoch1):
        assert len(epoch) == 100 and len(set(epoch.tolist())) == 100
        assert epoch.min() >= 0 and epoch.max() < 103
    assert not np.array_equal(epoch0, epoch1)
    assert np.mean(epoch0 == epoch1) < 0.2         # a new permutation, not a rotation of the old one


@pytest.mark.parametrize("process_count", [2, 4])
@pytest.mark.parametrize("augment", [False, True])
def test_process_slices_concatenate_to_the_global_batch(process_count, augment):
    ds = random_dataset(50, augment=augment)
    for step in (0, 3, 9):
        full_images, full_cond = data.train_batch(ds, 11, step, 12)
        parts = [data.train_batch(ds, 11, step, 12, p, process_count) for p in range(process_count)]
        assert all(images.shape == (12 // process_count, 4, 4, 3) for images, _ in parts)
        np.testing.assert_array_equal(np.concatenate([images for images, _ in parts]), full_images)
        np.testing.assert_array_equal(np.concatenate([cond for _, cond in parts]), full_cond)


def test_train_batch_refuses_bad_batch_sizes():
    ds = indexed_dataset(20)
    with pytest.raises(ValueError, match="not divisible by the number of processes 3"):
        data.train_batch(ds, 0, 0, 10, process_index=0, process_count=3)
    with pytest.raises(ValueError, match="larger than the training split"):
        data.train_batch(ds, 0, 0, 21)
    with pytest.raises(ValueError, match="process_index 2"):
        data.train_batch(ds, 0, 0, 10, process_index=2, process_count=2)


# ------------------------------------------------------------------------------------------ augmentation

def test_augmentation_flips_and_rotates_exactly_the_marked_images():
    plain = random_dataset(600, shape=(5, 5, 3))
    augmented = data.Dataset(train=plain.train, test=plain.test, vocab_size=256, name="aug", augment=True)
    seen = set()
    conditioning_all = []
    for step in range(2):
        # The permutation does not depend on augmentation: the plain batch holds the source images.
        sources, plain_cond = data.train_batch(plain, 7, step, 256)
        images, conditioning = data.train_batch(augmented, 7, step, 256)
        assert images.dtype == np.uint8 and conditioning.dtype == np.float32 and not plain_cond.any()
        for source, image, cond in zip(sources, images, conditioning):
            # Official order: optional left-right flip, then optional k * 90 degree counter-clockwise turn.
            matches = [(flip, k) for flip in (0, 1) for k in range(4)
                       if np.array_equal(image, np.rot90(np.flip(source, axis=1) if flip else source, k))]
            assert len(matches) == 1                        # random 5x5 images have no symmetry
            flip, k = matches[0]
            seen.add((flip, k))
            assert cond == float(flip or k > 0)             # 1 exactly for the augmented images
        # How the three uniforms of each image choose its transform, as in the official dataset.py.
        draws = data._uniform((data._STREAM_AUGMENT, 7, step), (256, 3))
        for source, image, (u_flip, u_k, u_rotate) in zip(sources, images, draws):
            expected = np.flip(source, axis=1) if u_flip > 0.5 else source
            if u_rotate > 0.5:
                expected = np.rot90(expected, int(np.ceil(3 * u_k)))
            np.testing.assert_array_equal(image, expected)
        conditioning_all.append(conditioning)
        np.testing.assert_array_equal(data.train_batch(augmented, 7, step, 256)[0], images)
    assert seen == {(f, k) for f in (0, 1) for k in range(4)}   # every flip / rotation combination occurs
    # P(augmented) = 1 - P(no flip) P(no rotation) = 3/4; 512 draws: 0.75 +- 0.06 is over 3 sigma.
    assert 0.69 < np.concatenate(conditioning_all).mean() < 0.81
    other_step = data.train_batch(augmented, 7, 2, 256)[1]
    assert not np.array_equal(other_step, conditioning_all[0])


# ------------------------------------------------------------------------------------------ eval_batches

@pytest.mark.parametrize("process_count", [1, 2])
@pytest.mark.parametrize("batch_size", [8, 10])      # 8 divides the 24 test images, 10 does not
def test_eval_batches_cover_the_test_split_once(process_count, batch_size):
    ds = data.Dataset(train=indexed_dataset(30).train, test=indexed_dataset(1, 24).test,
                      vocab_size=256, name="indexed")
    local = batch_size // process_count
    per_process = [list(data.eval_batches(ds, batch_size, p, process_count)) for p in range(process_count)]
    assert all(len(batches) == -(-24 // batch_size) for batches in per_process)
    real = []
    for b in range(len(per_process[0])):                   # the global batches, in order
        for p in range(process_count):
            images, conditioning, mask = per_process[p][b]
            assert images.shape == (local, 1, 2, 1) and images.dtype == np.uint8
            assert conditioning.dtype == mask.dtype == np.float32 and not conditioning.any()
            assert set(mask.tolist()) <= {0.0, 1.0}
            np.testing.assert_array_equal(images[mask == 0], np.broadcast_to(ds.test[0], images[mask == 0].shape))
            real.extend(ids(images[mask == 1]).tolist())
    assert real == list(range(24))                          # each test image once, in order
    n_padding = -(-24 // batch_size) * batch_size - 24
    assert sum(float((1 - m).sum()) for batches in per_process for _, _, m in batches) == n_padding


def test_eval_batches_num_batches_and_errors():
    ds = data.Dataset(train=indexed_dataset(30).train, test=indexed_dataset(1, 24).test,
                      vocab_size=256, name="indexed")
    batches = list(data.eval_batches(ds, 5, num_batches=2))
    assert len(batches) == 2
    assert np.concatenate([ids(images) for images, _, _ in batches]).tolist() == list(range(10))
    assert len(list(data.eval_batches(ds, 5, num_batches=99))) == 5
    with pytest.raises(ValueError, match="not divisible"):
        data.eval_batches(ds, 9, 0, 2)                      # raised at the call, not at the first next()


# ------------------------------------------------------------------------------------------ pixel baseline

def test_pixel_baseline_bpd_of_a_hand_made_dataset():
    # Two dimensions, vocabulary 3, three training images: counts per dimension (+1 each) over N + V = 6.
    train = np.array([[0, 2], [0, 2], [1, 2]], np.uint8).reshape(3, 1, 2, 1)
    test = np.array([[0, 2], [2, 1]], np.uint8).reshape(2, 1, 2, 1)
    ds = data.Dataset(train=train, test=test, vocab_size=3, name="tiny")
    # dimension 0: p(0) = 3/6, p(1) = 2/6, p(2) = 1/6;  dimension 1: p(0) = 1/6, p(1) = 1/6, p(2) = 4/6
    expected = -(np.log2(3 / 6) + np.log2(4 / 6) + np.log2(1 / 6) + np.log2(1 / 6)) / 4
    assert data.pixel_baseline_bpd(ds) == pytest.approx(expected, rel=1e-12)


def test_pixel_baseline_bpd_on_digits_matches_a_direct_computation():
    ds = data.load_dataset(data_config(dataset="digits"))
    bpd = data.pixel_baseline_bpd(ds)
    assert 0.0 < bpd < np.log2(17)
    train = ds.train.reshape(len(ds.train), -1)
    test = ds.test.reshape(len(ds.test), -1)
    probabilities = np.stack([(np.sum(train == v, axis=0) + 1) / (len(train) + 17) for v in range(17)])  # (V, D)
    direct = -np.mean(np.log2(np.take_along_axis(probabilities, test.astype(np.int64), axis=0)))
    assert bpd == pytest.approx(direct, rel=1e-12)
    assert bpd == pytest.approx(2.413124, abs=1e-6)


# --------------------------------------------------------------------------------------------------- npz

def test_npz_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    train = rng.integers(0, 5, (6, 3, 4), dtype=np.uint8)         # (N, H, W): one channel
    test = rng.integers(0, 5, (2, 3, 4), dtype=np.uint8)
    path = tmp_path / "mine.npz"
    np.savez(path, train=train, test=test, vocab_size=np.int64(5))
    ds = data.load_dataset(data_config(dataset="npz", npz_path=str(path)))
    assert (ds.name, ds.vocab_size, ds.image_shape, ds.augment) == ("npz", 5, (3, 4, 1), False)
    np.testing.assert_array_equal(ds.train[..., 0], train)
    np.testing.assert_array_equal(ds.test[..., 0], test)
    rgb = tmp_path / "rgb.npz"
    np.savez_compressed(rgb, train=rng.integers(0, 256, (4, 2, 2, 3), dtype=np.uint8),
                        test=rng.integers(0, 256, (1, 2, 2, 3), dtype=np.uint8))
    ds = data.load_dataset(data_config(dataset="npz", npz_path=str(rgb)))
    assert (ds.vocab_size, ds.train.shape, ds.test.shape) == (256, (4, 2, 2, 3), (1, 2, 2, 3))


def _write(path, **arrays):
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("corrupt", "not a readable .npz"),
    ("truncated", "not a readable .npz"),
    ("no_test", "has no array ['test']"),
    ("float", "has dtype float32"),
    ("rank", "has shape (6,)"),
    ("mismatch", "differ in (H, W, C)"),
    ("vocab", "outside [0, vocab_size = 4)"),
])
def test_npz_bad_inputs_raise_data_error_naming_the_file(tmp_path, case, message):
    path = tmp_path / f"{case}.npz"
    good = np.zeros((6, 4, 4, 3), np.uint8)
    if case == "corrupt":
        path.write_bytes(np.random.default_rng(0).bytes(300))
    elif case == "truncated":
        np.savez(path, train=good, test=good)
        path.write_bytes(path.read_bytes()[:200])
    elif case == "no_test":
        _write(path, train=good)
    elif case == "float":
        _write(path, train=good.astype(np.float32), test=good)
    elif case == "rank":
        _write(path, train=np.zeros(6, np.uint8), test=good)
    elif case == "mismatch":
        _write(path, train=good, test=np.zeros((2, 4, 4, 1), np.uint8))
    elif case == "vocab":
        _write(path, train=good + 4, test=good, vocab_size=np.int32(4))
    with pytest.raises(data.DataError) as info:
        data.load_dataset(data_config(dataset="npz", npz_path=str(path)))
    assert str(path) in str(info.value)
    assert message in str(info.value)


def test_unknown_dataset_is_a_data_error():
    with pytest.raises(data.DataError, match="'mnist' is not a known data set"):
        data.load_dataset(data_config(dataset="mnist"))


# ------------------------------------------------------------------------------------ CIFAR-10 via tfds

def _cifar_images(n, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


@pytest.fixture
def prepared_cifar10(tmp_path, monkeypatch):
    """A tfds data_dir holding a real prepared `cifar10` (array_record files) of 10 train / 4 test images.

    The builder's split generators are replaced by ones yielding PIL images, which tfds stores as PNG
    without TensorFlow (numpy images would need TensorFlow's encoder).
    """
    tfds = pytest.importorskip("tensorflow_datasets")
    from PIL import Image
    from tensorflow_datasets.image_classification import cifar

    train, test = _cifar_images(10, 1), _cifar_images(4, 2)

    def examples(prefix, images):
        for i, image in enumerate(images):
            yield i, {"id": f"{prefix}{i:05d}", "image": Image.fromarray(image), "label": i % 10}

    with monkeypatch.context() as patch:
        patch.setattr(cifar.Cifar10, "_split_generators",
                      lambda self, dl_manager: {"train": examples("train_", train), "test": examples("test_", test)})
        builder = tfds.builder("cifar10", data_dir=str(tmp_path / "tfds"), file_format="array_record")
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return str(tmp_path / "tfds"), train, test


def _as_sorted_bytes(images):
    return sorted(image.tobytes() for image in images)


@pytest.mark.parametrize("name", ["cifar10", "cifar10_aug"])
def test_cifar10_reads_prepared_array_record_data(prepared_cifar10, monkeypatch, name):
    data_dir, train, test = prepared_cifar10
    monkeypatch.setattr(data, "_READ_CHUNK", 3)             # several bulk reads, the last one partial
    ds = data.load_dataset(data_config(dataset=name, data_dir=data_dir))
    assert (ds.name, ds.vocab_size, ds.augment) == (name, 256, name == "cifar10_aug")
    assert ds.train.shape == (10, 32, 32, 3) and ds.test.shape == (4, 32, 32, 3)
    assert ds.train.dtype == ds.test.dtype == np.uint8
    # tfds stores the examples in its own (fixed) shuffled order: compare as sets, then check order is stable.
    assert _as_sorted_bytes(ds.train) == _as_sorted_bytes(train)
    assert _as_sorted_bytes(ds.test) == _as_sorted_bytes(test)
    again = data.load_dataset(data_config(dataset=name, data_dir=data_dir))
    np.testing.assert_array_equal(again.train, ds.train)
    if importlib.util.find_spec("tensorflow") is None:
        assert "tensorflow" not in sys.modules


def _hide_modules(monkeypatch, *hidden):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name in hidden else real(name, *args))


def test_cifar10_unprepared_without_tensorflow_says_what_to_install(tmp_path, monkeypatch):
    pytest.importorskip("tensorflow_datasets")
    _hide_modules(monkeypatch, "tensorflow")
    data_dir = str(tmp_path / "empty")
    with pytest.raises(data.DataError) as info:
        data.load_dataset(data_config(dataset="cifar10", data_dir=data_dir))
    assert "pip install tensorflow-cpu" in str(info.value)
    assert data_dir in str(info.value)


def _pretend_installed(monkeypatch, *present):
    """find_spec finds `present` (only checked for, never imported on the paths tested)."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: object() if name in present else real(name, *args))


@pytest.mark.parametrize("manual", ["unset", "empty", "absent"])
def test_cifar10_offline_without_the_archive_fails_at_once_saying_what_to_put_where(tmp_path, monkeypatch, manual):
    pytest.importorskip("tensorflow_datasets")
    _pretend_installed(monkeypatch, "tensorflow")
    probed = []
    monkeypatch.setattr(data, "_reachable", lambda url: probed.append(url) or False)   # no network
    data_dir, manual_dir = tmp_path / "tfds", {"unset": "", "empty": tmp_path / "manual",
                                               "absent": tmp_path / "nowhere"}[manual]
    if manual == "empty":
        manual_dir.mkdir()
    with pytest.raises(data.DataError) as info:
        data.load_dataset(data_config(dataset="cifar10", data_dir=str(data_dir), manual_dir=str(manual_dir)))
    message = str(info.value)
    assert probed == ["https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"]
    assert f"not prepared in {data_dir}" in message and "config.data.data_dir" in message
    assert "cannot be downloaded: no connection to www.cs.toronto.edu within 2 s" in message
    assert "Put cifar-10-binary.tar.gz (from https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz" in message
    assert {"unset": "config.data.manual_dir is not set",
            "empty": f"config.data.manual_dir = '{manual_dir}' has no cifar-10-binary.tar.gz",
            "absent": f"config.data.manual_dir = '{manual_dir}' does not exist"}[manual] in message
    assert not data_dir.exists() or not any(data_dir.rglob("*.array_record*"))


def test_cifar10_archive_in_manual_dir_needs_no_network(tmp_path, monkeypatch):
    # With the archive there, nothing is probed: preparing goes on to TensorFlow (hidden here: its message).
    pytest.importorskip("tensorflow_datasets")
    _hide_modules(monkeypatch, "tensorflow")
    manual_dir = tmp_path / "manual"
    manual_dir.mkdir()
    (manual_dir / "cifar-10-binary.tar.gz").write_bytes(b"")
    monkeypatch.setattr(data, "_reachable", lambda url: pytest.fail(f"probed {url}"))
    assert data._check_download_possible("cifar10", str(tmp_path / "tfds"), str(manual_dir)) is None
    with pytest.raises(data.DataError, match="pip install tensorflow-cpu"):
        data.load_dataset(data_config(dataset="cifar10", data_dir=str(tmp_path / "tfds"), manual_dir=str(manual_dir)))


def test_reachable_answers_within_its_timeout(monkeypatch):
    import socket
    import time
    for variable in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(variable, raising=False)
    with socket.socket() as server:                       # loopback only: a port that listens, one that does not
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        assert data._reachable(f"http://127.0.0.1:{server.getsockname()[1]}/x", timeout=2.0)
        with socket.socket() as closed:
            closed.bind(("127.0.0.1", 0))
            assert not data._reachable(f"http://127.0.0.1:{closed.getsockname()[1]}/x", timeout=2.0)
    # A name lookup that hangs (a resolver that never answers) still gives an answer within the timeout.
    def hanging_lookup(*args, **kwargs):
        time.sleep(30)
        raise socket.gaierror("the lookup never answered")

    monkeypatch.setattr(socket, "create_connection", hanging_lookup)
    start = time.monotonic()
    assert not data._reachable("https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz", timeout=0.5)
    assert time.monotonic() - start < 2.0


def test_tfds_missing_says_what_to_install(monkeypatch):
    _hide_modules(monkeypatch, "tensorflow_datasets")
    with pytest.raises(data.DataError, match=r"pip install 'vdm\[cifar\]'"):
        data.load_dataset(data_config(dataset="imagenet32"))


def _write_cifar10_archive(path, train, test):
    """A `cifar-10-binary.tar.gz` in the real format: per record a label byte, then 3072 channel-major bytes."""
    def records(images):
        labels = (np.arange(len(images)) % 10).astype(np.uint8)[:, None]                 # (N, 1)
        planes = images.transpose(0, 3, 1, 2).reshape(len(images), 3072)                 # (N, 3 * 32 * 32)
        return np.concatenate([labels, planes], axis=1).tobytes()

    members = {f"data_batch_{i + 1}.bin": records(train[i::5]) for i in range(5)}
    members["test_batch.bin"] = records(test)
    members["batches.meta.txt"] = ("\n".join(["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                              "horse", "ship", "truck"]) + "\n\n").encode()
    with tarfile.open(path, "w:gz") as archive:
        for name, content in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))


@pytest.mark.slow
def test_cifar10_prepares_from_an_archive_in_manual_dir(tmp_path, monkeypatch):
    pytest.importorskip("tensorflow")
    tfds = pytest.importorskip("tensorflow_datasets")
    manual_dir = tmp_path / "manual"
    manual_dir.mkdir()
    train, test = _cifar_images(15, 3), _cifar_images(6, 4)
    _write_cifar10_archive(manual_dir / "cifar-10-binary.tar.gz", train, test)
    # Our archive is not the real one: record its checksum in a private file instead of validating it
    # against the registered one (never write into the installed tfds package).
    checksums = tmp_path / "checksums.tsv"
    checksums.touch()
    original_init = tfds.download.DownloadManager.__init__

    def recording_init(self, *args, **kwargs):
        kwargs.update(register_checksums=True, register_checksums_path=checksums)
        original_init(self, *args, **kwargs)

    monkeypatch.setattr(tfds.download.DownloadManager, "__init__", recording_init)
    monkeypatch.setattr(data, "_reachable", lambda url: pytest.fail(f"probed {url}: the archive is there"))
    data_dir = str(tmp_path / "tfds")
    ds = data.load_dataset(data_config(dataset="cifar10", data_dir=data_dir, manual_dir=str(manual_dir)))
    assert ds.train.shape == (15, 32, 32, 3) and ds.test.shape == (6, 32, 32, 3)
    assert _as_sorted_bytes(ds.train) == _as_sorted_bytes(train)   # channel-major records -> HWC images
    assert _as_sorted_bytes(ds.test) == _as_sorted_bytes(test)
    assert "cifar-10-binary.tar.gz" in checksums.read_text()
    assert os.path.isdir(os.path.join(data_dir, "cifar10"))


@pytest.mark.slow
def test_cifar10_wrong_archive_in_manual_dir_is_a_data_error(tmp_path):
    pytest.importorskip("tensorflow")
    pytest.importorskip("tensorflow_datasets")
    manual_dir = tmp_path / "manual"
    manual_dir.mkdir()
    _write_cifar10_archive(manual_dir / "cifar-10-binary.tar.gz", _cifar_images(5, 5), _cifar_images(1, 6))
    with pytest.raises(data.DataError) as info:       # its size and sha256 are not those of the real archive
        data.load_dataset(data_config(dataset="cifar10", data_dir=str(tmp_path / "tfds"),
                                      manual_dir=str(manual_dir)))
    assert "NonMatchingChecksumError" in str(info.value) and str(manual_dir) in str(info.value)
