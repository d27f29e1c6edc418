"""The Python API (vdm_jax.load, vdm_torch.load -> vdm_common.api.TrainedModel) on tiny runs of each backend:
every kind of path, the same numbers as the eval mode, the same numbers in both backends, clear errors, and
the README's "Python" code blocks, executed."""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")

import vdm_jax  # noqa: E402
import vdm_torch  # noqa: E402
from vdm_common import checks, data  # noqa: E402
from vdm_common import workdir as workdir_lib  # noqa: E402
from vdm_common.api import LoadError  # noqa: E402
from tests.conftest import ROOT, run_mode, tiny_config  # noqa: E402

pytestmark = [pytest.mark.jax, pytest.mark.torch]

LOADERS = {"jax": vdm_jax.load, "torch": vdm_torch.load}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """backend -> a finished 6-step tiny run of that backend (checkpoints of steps 4 and 6)."""
    base = tmp_path_factory.mktemp("api")
    made = {}
    for backend, options in (("jax", dict(devices=tuple(jax.devices()[:1]))), ("torch", dict(device="cpu"))):
        made[backend] = base / backend
        run_mode(backend, tiny_config("training.steps_per_sample=0"), made[backend], **options)
    return made


@pytest.fixture(scope="module")
def test_images(runs) -> np.ndarray:
    return data.load_dataset(tiny_config().data).test            # (297, 8, 8, 1) uint8


def same_images_bound(a: np.ndarray, b: np.ndarray) -> None:
    """Samples of the same weights and noise in the two backends: z_0 agrees to float32 rounding (the parity
    suite: 4e-6 relative after 50 steps), so argmax decoding differs only for a pixel within that of a
    boundary between two of the 17 bins (2/17 apart): about 1e-4 of the pixels. Allow 1%, by one level."""
    assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
    assert (a != b).mean() <= 0.01 and np.all(np.abs(a.astype(int) - b.astype(int)) <= 1)


@pytest.mark.parametrize("reader", ["jax", "torch"])
@pytest.mark.parametrize("writer", ["jax", "torch"])
def test_load_a_run_directory_of_either_backend(runs, test_images, reader, writer):
    model = LOADERS[reader](runs[writer])
    assert model.engine.name == reader and model.step == 6 and model.which == "ema"
    assert model.source == ("neutral" if reader != writer else {"jax": "orbax", "torch": "torch"}[reader])
    result = model.bpd(test_images[:20])
    assert result.bpd.shape == (20,) and result.bound == "continuous" and np.all(result.bpd > 0)
    np.testing.assert_allclose(result.bpd, result.bpd_recon + result.bpd_latent + result.bpd_diff, rtol=1e-6)


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_load_files_steps_and_weights(runs, test_images, backend):
    load, paths = LOADERS[backend], workdir_lib.layout(runs["torch"])
    from_run = load(runs["torch"]).bpd(test_images[:10]).bpd
    config = tiny_config()
    for path, kwargs in ((paths.neutral_path(6), {}), (paths.native("torch") / "step_6.pt", {})):
        model = load(path, **kwargs)
        assert model.step == 6 and model.source == str(path)
        np.testing.assert_allclose(model.bpd(test_images[:10]).bpd, from_run, rtol=1e-6)
    # A flax msgpack holds one parameter tree and no config.
    from vdm_common import neutral
    from vdm_jax import convert as jax_convert
    msgpack = jax_convert.save_native(paths.root.parent / f"ema_{backend}.msgpack",
                                      neutral.load_neutral(paths.neutral_path(6)), "ema_params")
    with pytest.raises(LoadError, match="holds no model config; pass config="):
        load(msgpack)
    np.testing.assert_allclose(load(msgpack, config=config).bpd(test_images[:10]).bpd, from_run, rtol=1e-6)
    # step= picks an older checkpoint; weights='params' the online weights (not the EMA).
    older = load(runs["torch"], step=4)
    assert older.step == 4 and not np.allclose(older.bpd(test_images[:10]).bpd, from_run)
    online = load(runs["torch"], weights="params")
    assert online.which == "params" and not np.allclose(online.bpd(test_images[:10]).bpd, from_run)
    with pytest.raises(Exception, match="no checkpoint of step 5; steps present: \\[4, 6\\]"):
        load(runs["torch"], step=5)


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_bpd_through_the_api_equals_the_eval_mode(runs, test_images, backend):
    overrides = {"training.eval_noise_samples": 3, "training.eval_timesteps": 20}
    options = dict(devices=tuple(jax.devices()[:1])) if backend == "jax" else dict(device="cpu")
    evaluated = run_mode(backend, None, runs[backend], "eval", overrides, **options)
    seed = tiny_config().training.seed
    result = LOADERS[backend](runs[backend]).bpd(test_images, noise_samples=3, timesteps=20, seed=seed)
    summary = result.summary()
    assert result.bound == evaluated["bound"] == "T20" and summary["num_examples"] == 297
    for name in ("bpd", "bpd_recon", "bpd_latent", "bpd_diff", "bpd_stderr"):
        assert summary[name] == pytest.approx(evaluated[name], rel=1e-12), name


def test_the_backends_give_the_same_bpd_and_samples_for_one_seed(runs, test_images):
    jax_model, torch_model = vdm_jax.load(runs["jax"]), vdm_torch.load(runs["jax"])
    a = jax_model.bpd(test_images[:50], noise_samples=2, seed=5)
    b = torch_model.bpd(test_images[:50], noise_samples=2, seed=5, batch_size=16)   # batching changes nothing
    # float32 per-image values of the same function on the same noise: the parity suite's bpd tolerance.
    for name in ("bpd", "bpd_recon", "bpd_latent", "bpd_diff"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=1e-5, atol=1e-7, err_msg=name)
    other_seed = torch_model.bpd(test_images[:50], noise_samples=2, seed=6)
    assert np.max(np.abs(other_seed.bpd - b.bpd)) > 1e-3                               # the seed is the noise
    same_images_bound(jax_model.sample(8, steps=20, seed=3), torch_model.sample(8, steps=20, seed=3))
    # The first images of a larger draw are the same images: each image has its own noise.
    np.testing.assert_array_equal(torch_model.sample(4, steps=20, seed=3), torch_model.sample(8, steps=20, seed=3)[:4])


def test_the_raw_models_are_the_frameworks_own(runs, test_images):
    from vdm_torch.vdm import VDM
    model = vdm_torch.load(runs["torch"])
    assert isinstance(model.weights, VDM)
    images = torch.from_numpy(test_images[:4]).permute(0, 3, 1, 2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        terms = model.weights.to("cpu").loss_terms(images, torch.zeros(4), generator=torch.Generator().manual_seed(0))
    assert terms.recon.shape == (4,) and torch.isfinite(terms.diff).all()
    params = vdm_jax.load(runs["torch"]).weights
    assert set(params) == {"gamma", "score_model"}


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_bad_input_gets_one_clear_error(runs, test_images, backend, tmp_path):
    model = LOADERS[backend](runs[backend])
    cases = [
        (test_images[0], checks.InputError, r"4-D NHWC batch, got shape \(8, 8, 1\)"),
        (np.repeat(test_images[:2], 3, axis=3), checks.InputError, "have 3 channels on axis 3, but model.image_channels is 1"),
        (test_images[:2].astype(np.float32) / 16, checks.InputError, "must hold integers in \\[0, vocab_size\\)"),
        (test_images[:2] + 16, checks.InputError, r"span \[16, 32\] but must lie in \[0, 17\)"),
        (test_images[:0], checks.InputError, "holds no image"),
    ]
    for images, error, message in cases:
        with pytest.raises(error, match=message):
            model.bpd(images)
    with pytest.raises(LoadError, match="noise_samples=0"):
        model.bpd(test_images[:2], noise_samples=0)
    with pytest.raises(LoadError, match="n=0"):
        model.sample(0)
    (tmp_path / "notes.txt").write_text("not a run")
    for path, message in ((tmp_path, "has no config.json: it is not the workdir of a training run"),
                          (tmp_path / "notes.txt", "neither a run directory .* nor a checkpoint file")):
        with pytest.raises(Exception, match=message) as info:
            LOADERS[backend](path)
        assert isinstance(info.value, LoadError) or "workdir" in type(info.value).__name__.lower()
    with pytest.raises(LoadError, match="weights='best'"):
        LOADERS[backend](runs[backend], weights="best")


def python_blocks() -> list[str]:
    """The ```python blocks of the README's "## Python" section, in order."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Python\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_readmes_python_blocks_run(runs, tmp_path, monkeypatch):
    blocks = python_blocks()
    assert len(blocks) >= 2
    (tmp_path / "runs").mkdir()
    shutil.copytree(runs["jax"], tmp_path / "runs" / "quickstart_jax")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)       # noqa: S102 (the README's own code)
    assert namespace["samples"].shape == (16, 8, 8, 1) and namespace["result"].bpd.shape == (32,)
    assert os.getcwd() == str(tmp_path)
