"""A trained VDM as one Python object, the same in both frameworks: `vdm_jax.load(path)` and
`vdm_torch.load(path)` return a `TrainedModel` over their engine.

    model = vdm_torch.load("runs/quickstart_jax")        # a run directory of either backend, or a file
    result = model.bpd(images)                            # per-image bpd and its terms, numpy
    samples = model.sample(16, steps=100, seed=0)         # uint8 (16, H, W, C)
    data = model.compress(images, timesteps=100)          # bytes: bits-back coded, lossless
    assert (model.decompress(data) == images).all()

The noise of `bpd` and `sample` is drawn framework-free (vdm_common.noise) from `seed`, per image, so the two
backends give the same numbers for the same seed, to float32 rounding. The command line's eval and sample
modes call these same functions (vdm_common.trainer), and so do its compress and decompress modes (a file
decodes with the weights, backend and device kind that wrote it: vdm_common.compressed_file).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
from pathlib import Path
from typing import Any, Callable

import ml_collections
import numpy as np

from vdm_common import checks
from vdm_common import config as config_lib
from vdm_common import data as data_lib
from vdm_common import neutral
from vdm_common import noise as noise_lib
from vdm_common import run
from vdm_common import workdir as workdir_lib
from vdm_common.engine import Engine, Weights
from vdm_common.errors import UserError

WEIGHTS = ("ema", "params")


class LoadError(UserError, ValueError):
    """A path that `load` cannot read as a run or a checkpoint, or arguments it cannot use."""


@dataclasses.dataclass(frozen=True)
class Bpd:
    """Per-image bits per dimension (each (N,) float64) of one bound, and what made them."""

    bpd: np.ndarray          # -ELBO = recon + latent + diffusion
    bpd_recon: np.ndarray    # -log p(x | z_0)
    bpd_latent: np.ndarray   # KL(q(z_1 | x) || N(0, I))
    bpd_diff: np.ndarray     # the diffusion term of the bound
    bound: str               # 'continuous' or 'T<steps>' (run.bound_name spells it out)
    noise_samples: int
    seed: int

    def summary(self) -> dict[str, float]:
        """Means of the four, the standard error of the bpd mean and the image count (run.eval_statistics)."""
        return run.eval_statistics({name: getattr(self, name) for name in run.EVAL_TERMS})


def per_image_terms(engine: Engine, model_config: config_lib.ModelConfig, weights: Weights, images: np.ndarray,
                    seed: int, noise_samples: int, batch_size: int, num_batches: int = 0,
                    progress: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """Per-image bpd terms {name: (N,)} of `images` (N, H, W, C), averaged over `noise_samples` draws.

    Batches of `batch_size` (the last padded; the first `num_batches` only when > 0); image i, draw k gets
    noise_lib.eval_noise(seed, [i], k): the same draws whatever the batch size or the process count. Every
    process passes the same images and gets every value. progress(n): called with each batch's image count.
    """
    collected: dict[str, list[np.ndarray]] = {name: [] for name in run.EVAL_TERMS}
    image_shape = images.shape[1:]
    for rows, batch, mask in data_lib.image_batches(images, batch_size, num_batches):
        conditioning = np.zeros(len(rows), np.float32)
        sums: dict[str, np.ndarray] = {}
        for k in range(noise_samples):
            noise = noise_lib.eval_noise(seed, rows, k, image_shape, model_config.sm_n_timesteps)
            for name, values in engine.eval_terms(model_config, weights, batch, conditioning, noise).items():
                sums[name] = sums.get(name, 0.0) + values / noise_samples
        keep = mask > 0
        for name in run.EVAL_TERMS:
            collected[name].append(sums[name][keep])
        if progress is not None:
            progress(int(keep.sum()))
    return {name: np.concatenate(parts) for name, parts in collected.items()}


def sample_images(engine: Engine, model_config: config_lib.ModelConfig, weights: Weights, num: int, steps: int,
                  seed: int, image_shape) -> np.ndarray:
    """`num` images (N, H, W, C) int32 drawn in `steps` ancestral steps, the noise of image i from
    noise_lib.SampleNoise(seed, [i, ...]): this process alone."""
    draws = noise_lib.SampleNoise(seed, range(num), image_shape)
    z_1 = draws.normal()
    gumbel = draws.gumbel(model_config.vocab_size) if model_config.sample_softmax else None
    return engine.sample(model_config, weights, z_1, steps, draws.normal, gumbel)


class TrainedModel:
    """A VDM's weights on one engine, with its config: bpd of images, samples, lossless compression.

    Attributes: `config` (the run's whole config), `model_config`, `step` (of the checkpoint), `source` (the
    checkpoint read: 'orbax', 'torch', 'neutral' or a file path), `which` ('ema' or 'params'), `engine`, and
    `weights`: the engine's raw weights (JAX: the flax params tree; torch: the `VDM` module).
    """

    def __init__(self, engine: Engine, config: ml_collections.ConfigDict, weights: Weights, step: int,
                 source: str, which: str):
        self.engine, self.config, self.weights = engine, config, weights
        self.model_config = config_lib.model_config(config)
        self.step, self.source, self.which = step, source, which

    def __repr__(self) -> str:
        mc = self.model_config
        return (f"TrainedModel({self.engine.name}, step {self.step}, {self.which} weights from {self.source}; "
                f"{mc.image_channels} channel(s), vocab_size {mc.vocab_size})")

    def check_images(self, images: Any) -> np.ndarray:
        """`images` as an (N, H, W, C) integer numpy array, or InputError naming what was expected."""
        mc = self.model_config
        images = np.asarray(images)
        checks.check_image_shape(images.shape, np.issubdtype(images.dtype, np.integer), str(images.dtype),
                                 mc.image_channels, channel_axis=3, layout="NHWC")
        if not len(images):
            raise checks.InputError("images holds no image (N = 0); pass at least one")
        checks.check_image_values(images, mc.vocab_size)
        return images

    def bpd(self, images: Any, noise_samples: int = 1, timesteps: int | None = None, seed: int = 0,
            batch_size: int | None = None, progress: Callable[[int], None] | None = None) -> Bpd:
        """Per-image bits per dimension of `images` (N, H, W, C) integers in [0, vocab_size), dropout off.

        noise_samples: draws of (t, eps, eps_0) averaged per image. timesteps: the bound, as
        --config.training.eval_timesteps: None or -1 the one the model trains on, 0 the continuous-time VLB,
        T the discrete-time VLB with T steps. batch_size: images per call (default training.batch_size_eval).
        """
        images = self.check_images(images)
        for name, value, low in (("noise_samples", noise_samples, 1), ("batch_size", batch_size, 1)):
            if value is not None and not (isinstance(value, (int, np.integer)) and value >= low):
                raise LoadError(f"{name}={value!r}: pass an integer >= {low}")
        if timesteps is not None and not (isinstance(timesteps, (int, np.integer)) and timesteps >= -1):
            raise LoadError(f"timesteps={timesteps!r}: pass -1 (the trained bound), 0 (continuous) or T >= 1")
        model_config, bound = run.eval_bound(self.model_config, -1 if timesteps is None else int(timesteps))
        batch = batch_size or self.config.training.batch_size_eval
        batch = -(-batch // self.engine.device_count()) * self.engine.device_count()   # a multiple of the devices
        terms = per_image_terms(self.engine, model_config, self.weights, images, seed, noise_samples, batch,
                                progress=progress)
        return Bpd(**terms, bound=bound, noise_samples=noise_samples, seed=seed)

    def sample(self, n: int, steps: int | None = None, seed: int = 0, image_shape=None) -> np.ndarray:
        """`n` images (N, H, W, C) uint8 by ancestral sampling in `steps` steps (default
        training.sample_steps) from seed `seed`; image_shape (H, W, C) defaults to the run's data's."""
        for name, value in (("n", n), ("steps", steps)):
            if value is not None and not (isinstance(value, (int, np.integer)) and value >= 1):
                raise LoadError(f"{name}={value!r}: pass an integer >= 1")
        shape = tuple(image_shape) if image_shape is not None else self.image_shape()
        images = sample_images(self.engine, self.model_config, self.weights, int(n),
                               int(steps or self.config.training.sample_steps), seed, shape)
        return images.astype(np.uint8)

    def compress(self, images: Any, timesteps: int | None = None,
                 progress: Callable[[int], None] | None = None) -> bytes:
        """The compressed file (bytes) of `images` (N, H, W, C) integers in [0, vocab_size): bits-back coded
        with the discrete-time model of T = `timesteps` steps (default bitsback.DEFAULT_TIMESTEPS), about
        the discrete-time VLB of T steps per image plus one image's initial bits per file. Lossless:
        `decompress` gives the same images back with these weights, this backend and device kind.
        progress(n): n more image-steps done, N (T + 1) in all."""
        from vdm_common import bitsback, compressed_file
        images = self.check_images(images)
        timesteps = bitsback.DEFAULT_TIMESTEPS if timesteps is None else timesteps
        if not (isinstance(timesteps, (int, np.integer)) and timesteps >= 1):
            raise LoadError(f"timesteps={timesteps!r}: pass an integer T >= 1 (the steps of the coded model)")
        return compressed_file.compress(self.model_face, images.astype(np.uint8), int(timesteps), progress=progress)

    def decompress(self, data: bytes, timesteps: int | None = None,
                   progress: Callable[[int], None] | None = None) -> np.ndarray:
        """The images (N, H, W, C) uint8 of a file written by `compress`. timesteps: when given, the T the
        file must have. CompressionError (nothing decoded) for an empty, truncated, damaged or foreign file,
        one of other weights, backend or device kind, or another T."""
        from vdm_common import compressed_file
        return compressed_file.decompress(self.model_face, data, timesteps, progress)

    @functools.cached_property
    def model_face(self):
        """The backend's face of these weights for the bits-back coder (vdm_jax.compress.ModelFace or
        vdm_torch.compress.ModelFace): gamma, the noise prediction and the decoder, numpy in and out."""
        compress = importlib.import_module(f"vdm_{self.engine.name}.compress")
        return compress.ModelFace(self.model_config, self.weights)

    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of the run's data (read from the data set the config names)."""
        return data_lib.load_dataset(self.config.data).image_shape


def load(engine: Engine, path: str | Path, weights: str = "ema", step: int | None = None,
         config: ml_collections.ConfigDict | None = None, say: Callable[[str], None] = lambda _: None
         ) -> TrainedModel:
    """The TrainedModel of `path` on `engine` (what vdm_jax.load / vdm_torch.load call).

    path: a run directory written by either backend (or by convert.py's upstream import), a neutral
    `.safetensors` file, a torch `.pt` checkpoint or a flax `.msgpack` parameter file (with `config`). weights: 'ema' (default) or 'params'. step: that checkpoint of a run (default: the
    newest intact one). config: the run config to use (default: the run's config.json; for a file, which
    has only a model config, the library's defaults around it).
    """
    if weights not in WEIGHTS:
        raise LoadError(f"weights={weights!r}: pass one of {WEIGHTS}")
    path = Path(path)
    if path.is_dir():
        run_config = config if config is not None else workdir_lib.read_config(path)
        restored, (found, source) = engine.restore_weights(str(path), run_config, weights, step, say)
        return TrainedModel(engine, run_config, restored, found, source, weights)
    if path.is_file() and path.suffix in _FILE_READERS:
        if path.suffix == ".msgpack" and config is None:
            raise LoadError(f"{path}: a msgpack parameter file holds no model config; pass config= (a run config, "
                            f"e.g. vdm_common.config.load_config('configs/quickstart.py'))")
        ckpt = _FILE_READERS[path.suffix](path, None if config is None else config_lib.model_config(config))
        if step is not None and step != ckpt.step:
            raise LoadError(f"{path} holds step {ckpt.step}, not step={step}")
        run_config = config if config is not None else config_lib.make_config(ckpt.model_config.to_dict())
        return TrainedModel(engine, run_config, engine.weights_from_neutral(ckpt, weights), ckpt.step, str(path),
                            weights)
    raise LoadError(f"{path} is neither a run directory (with {workdir_lib.CONFIG_FILE} and checkpoints/) nor a "
                    f"checkpoint file ({', '.join(_FILE_READERS)}); pass one of those")


def _read_native(module: str, framework: str):
    """A backend's native-file reader (path, model_config) -> NeutralCheckpoint. Only the framework that
    wrote a file reads it (a torch .pt is pickled tensors), so it is imported here, when such a file is
    loaded, and not before: vdm_common needs no framework otherwise."""
    def read(path, model_config):
        try:
            convert = importlib.import_module(module)
        except ImportError as e:
            raise LoadError(f"{path} is a {framework} file: reading it needs {framework} ({e}); install it, or "
                            f"convert the file to .safetensors with convert.py where it is installed") from None
        return convert.load_native(path, model_config)
    return read


_FILE_READERS = {
    ".safetensors": lambda path, _: neutral.load_neutral(path),
    ".pt": _read_native("vdm_torch.convert", "torch"),
    ".msgpack": _read_native("vdm_jax.convert", "jax"),
}
