"""Bad input where a user types or points: one clear error that names the input and the fix.

Config values of the wrong type or range and unknown keys, config files that are not config files, data
files that are empty or hold unusable images, a workdir or checkpoint of another model config, and the
converter pointed at a file of the wrong kind. Each row calls the function the entry scripts call
(`load_config`, `trainer.mode_config`, `data.load_dataset`, the trainers' `main`, the checkpoint and converter
readers) and expects the project's own exception, whose message names the field or the file and says what
to do. A few cases run the real command lines as subprocesses, to check what the user finally sees: the
exit status, a single `error: ...` message, no traceback, and the file pointed at left byte-for-byte
unchanged.

Bad inputs already covered next to their modules are not repeated here: overrides and model fields in
tests/test_config.py, missing / corrupt / mis-shaped npz files in tests/test_data.py, damaged neutral files
in tests/test_neutral.py, mismatched upstream checkpoints in tests/test_upstream.py, images outside
[0, vocab_size) at the model boundary in tests/test_core_*.py.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import ml_collections
import numpy as np
import pytest

import convert
from vdm_common import config as config_lib
from vdm_common import data, neutral, run, trainer, upstream
from vdm_common import workdir as workdir_lib
from vdm_common.config import ConfigError
from vdm_common.weights import ConversionError

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
from vdm_jax import convert as jax_convert  # noqa: E402
from vdm_torch import checkpoint as torch_checkpoint  # noqa: E402
from vdm_torch import convert as torch_convert  # noqa: E402
from tests.conftest import run_mode  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = str(ROOT / "configs" / "quickstart.py")

# The quickstart (digits) with a tiny model and a 2-step run, as in tests/test_train_torch.py: a second or two.
TINY = ["model.sm_n_embd=8", "model.sm_n_layer=1", "model.norm_groups=4", "model.sm_pdrop=0.0",
        "training.num_steps_train=2", "training.substeps=2", "training.batch_size_train=16",
        "training.batch_size_eval=100", "training.num_eval_batches=1", "training.steps_per_logging=2",
        "training.steps_per_eval=2", "training.steps_per_save=2", "training.steps_per_sample=0"]
OTHER_MODEL = "model.sm_n_embd=16"          # the same run with a wider model


def tiny_config(*extra: str) -> ml_collections.ConfigDict:
    return config_lib.load_config(QUICKSTART, TINY + list(extra))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A workdir of 2 steps of the torch trainer (native + neutral checkpoints of step 2), and beside it the
    EMA weights as a flax msgpack file (ema.msgpack)."""
    workdir = tmp_path_factory.mktemp("trained") / "run"
    run_mode("torch", tiny_config(), workdir, device="cpu")
    jax_convert.save_native(workdir.parent / "ema.msgpack", neutral.load_neutral(workdir_lib.layout(workdir).neutral_path(2)),
                            "ema_params")
    return workdir


@dataclasses.dataclass
class Case:
    """Call `call(tmp_path, workdir)`; expect `error`, with every string of `names` (the input; '{tmp}' is
    tmp_path, '{run}' the trained workdir) and `fix` in its message."""

    call: Callable[[Path, Path], object]
    error: type[Exception]
    names: tuple[str, ...]
    fix: str
    needs_run: bool = False


def write(path: Path, content: bytes | str) -> Path:
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def folder(path: Path) -> Path:
    path.mkdir()
    return path


def npz(tmp: Path, **arrays) -> Path:
    np.savez(tmp / "images.npz", **arrays)
    return tmp / "images.npz"


def load_npz(path: Path) -> data.Dataset:
    values = dict(config_lib.default_training()["data"], dataset="npz", npz_path=str(path))
    return data.load_dataset(ml_collections.ConfigDict(values))


def stored_config(tmp: Path, content: bytes | str) -> ml_collections.ConfigDict:
    """Eval mode of a workdir whose config.json holds `content` (eval reads the stored config)."""
    write(tmp / workdir_lib.CONFIG_FILE, content)
    return trainer.mode_config("eval", str(tmp), None)


def quickstart_json(**changes) -> str:
    tree = config_lib.load_config(QUICKSTART).to_dict()
    for section, fields in changes.items():
        tree[section] = fields if not isinstance(fields, dict) else {**tree[section], **fields}
    return json.dumps(tree)


UNKNOWN_FIELD_FILE = """from configs.quickstart import get_config as quickstart


def get_config():
    config = quickstart()
    config.training.bogus = 1
    return config
"""


def official_run(tmp: Path) -> Path:
    """An official run directory (its checkpoints-0/ folder), which a port import does not read."""
    (tmp / "checkpoints-0").mkdir()
    write(tmp / "checkpoints-0" / "ckpt-1.flax", b"")
    return tmp


def other_model_config() -> config_lib.ModelConfig:
    return config_lib.model_config(tiny_config(OTHER_MODEL))


def torch_restore_text(tmp: Path, workdir: Path):
    """Restoring step 2 of a copy of the workdir whose torch checkpoint of step 2 is a text file."""
    copy = tmp / "run"
    shutil.copytree(workdir, copy)
    write(copy / "checkpoints" / "torch" / "step_2.pt", "notes, not a checkpoint\n")
    ckpt = torch_checkpoint.Checkpointer(copy, config_lib.model_config(tiny_config()), 2, read_only=True)
    return ckpt.restore(2, "torch", tiny_config().optimizer, fresh_optimizer=True)


def torch_restore(workdir: Path, source: str):
    """The torch Checkpointer of a run of the other model config, restoring the workdir's step 2."""
    ckpt = torch_checkpoint.Checkpointer(workdir, other_model_config(), 2, read_only=True)
    return ckpt.restore(2, source, tiny_config(OTHER_MODEL).optimizer, fresh_optimizer=True)


def overriding(override: str):
    """A Case action: the quickstart config loaded with one --config override."""
    return lambda tmp, _: config_lib.load_config(QUICKSTART, [override])


CASES = {
    # ------------------------------------------------------- config values and keys (--config.a.b=value)
    "override of the wrong type": Case(
        overriding("training.batch_size_train=abc"), ConfigError,
        ("config.training.batch_size_train", "'abc'"), "expected an integer"),
    "override out of range": Case(
        overriding("training.batch_size_train=0"), ConfigError,
        ("config.training.batch_size_train = 0",), "an integer >= 1"),
    "infinite learning rate": Case(
        overriding("optimizer.learning_rate=1e999"), ConfigError,
        ("config.optimizer.learning_rate = inf",), "a finite float > 0"),
    "infinite model float": Case(
        overriding("model.gamma_max=1e999"), ConfigError,
        ("config.model.gamma_max = inf",), "a finite number"),
    "unknown training field": Case(
        overriding("training.batch_size_trian=64"), ConfigError,
        ("config.training.batch_size_trian", "unknown field"), "'batch_size_train'"),
    "field used as a section": Case(
        overriding("model.sm_n_layer.depth=2"), ConfigError,
        ("config.model.sm_n_layer.depth", "unknown field"), "'sm_n_layer'"),
    "whole section replaced": Case(
        overriding("model={}"), ConfigError,
        ("config.model",), "override its fields one by one"),
    "data path not a string": Case(
        overriding("data.npz_path=5"), ConfigError,
        ("config.data.npz_path",), "expected a string"),
    # ------------------------------------------------------------------ config files (--config=FILE)
    "config file not python": Case(
        lambda tmp, _: config_lib.load_config(str(write(tmp / "config.json", "{}"))), ConfigError,
        ("{tmp}/config.json",), "pass one of configs/*.py"),
    "config file with a syntax error": Case(
        lambda tmp, _: config_lib.load_config(str(write(tmp / "mine.py", "def get_config(:\n"))), ConfigError,
        ("{tmp}/mine.py", "SyntaxError"), "fix the file"),
    "config file returning a dict": Case(
        lambda tmp, _: config_lib.load_config(str(write(tmp / "mine.py", "def get_config():\n    return {}\n"))),
        ConfigError, ("{tmp}/mine.py",), "not an ml_collections.ConfigDict"),
    "config file with an unknown field": Case(
        lambda tmp, _: config_lib.load_config(str(write(tmp / "mine.py", UNKNOWN_FIELD_FILE))), ConfigError,
        ("config.training", "'bogus'"), "known fields"),
    # ------------------------------------------------------- the config.json of a workdir (eval, sample)
    "stored config not json": Case(
        lambda tmp, _: stored_config(tmp, "{"), workdir_lib.WorkdirError, ("{tmp}/config.json",),
        "restore or remove it"),
    "stored config not utf-8": Case(
        lambda tmp, _: stored_config(tmp, b"\xff\xfe{}"), workdir_lib.WorkdirError, ("{tmp}/config.json",),
        "restore or remove it"),
    "stored config with an unknown field": Case(
        lambda tmp, _: stored_config(tmp, quickstart_json(training={"bogus": 1})), ConfigError,
        ("config.training", "'bogus'"), "known fields"),
    "stored config section not an object": Case(
        lambda tmp, _: stored_config(tmp, quickstart_json(training=5)), ConfigError,
        ("config.json", "'training'"), "restore it, or use a new --workdir"),
    "stored config with a nan": Case(
        lambda tmp, _: stored_config(tmp, quickstart_json(optimizer={"ema_rate": float("nan")})), ConfigError,
        ("config.optimizer.ema_rate = nan",), "a float in [0, 1)"),
    # ----------------------------------------------------------------------- data files (npz_path)
    "npz empty file": Case(
        lambda tmp, _: load_npz(write(tmp / "images.npz", b"")), data.DataError, ("{tmp}/images.npz",),
        "np.savez"),
    "npz images of zero size": Case(
        lambda tmp, _: load_npz(npz(tmp, train=np.zeros((5, 0, 4, 1), np.uint8), test=np.zeros((2, 3, 4, 1),
                                                                                              np.uint8))),
        data.DataError, ("{tmp}/images.npz", "'train'", "(5, 0, 4, 1)"), "every size >= 1"),
    "npz of pickled objects": Case(
        lambda tmp, _: load_npz(npz(tmp, train=np.array([{}], dtype=object), test=np.zeros((1, 2, 2), np.uint8))),
        data.DataError, ("{tmp}/images.npz", "allow_pickle"), "np.savez"),
    "npz path is a directory": Case(
        lambda tmp, _: load_npz(tmp), data.DataError, ("{tmp}", "is a directory"), "set config.data.npz_path"),
    "data vocabulary differs from the model's": Case(
        lambda tmp, _: run_mode("torch", tiny_config("model.vocab_size=256"), tmp / "run", device="cpu"),
        run.RunError, ("vocab_size 17", "config.model has vocab_size 256"), "set config.model to match the data"),
    # ----------------------------------------------------- a workdir / checkpoint of another model config
    "torch resume with another model": Case(
        lambda tmp, workdir: run_mode("torch", tiny_config(OTHER_MODEL), workdir, device="cpu"),
        workdir_lib.WorkdirError, ("{run}", "model.sm_n_embd: stored=8 new=16"), "Use a new --workdir",
        needs_run=True),
    "jax resume of a torch run with another model": Case(
        lambda tmp, workdir: run_mode("jax", tiny_config(OTHER_MODEL), workdir, devices=jax.devices()[:1]),
        workdir_lib.WorkdirError, ("{run}", "model.sm_n_embd: stored=8 new=16"), "Use a new --workdir",
        needs_run=True),
    "torch eval with another model": Case(
        lambda tmp, workdir: run_mode("torch", None, workdir, "eval", {"model.sm_n_embd": 16}, device="cpu"),
        run.RunError, ("{run}/config.json", "['model.sm_n_embd']"), "Fields that may be overridden here",
        needs_run=True),
    "jax eval with another model": Case(
        lambda tmp, workdir: run_mode("jax", None, workdir, "eval", {"model.sm_n_embd": 16},
                                       devices=jax.devices()[:1]),
        run.RunError, ("{run}/config.json", "['model.sm_n_embd']"), "Fields that may be overridden here",
        needs_run=True),
    "torch checkpoint restored as another model": Case(
        lambda tmp, workdir: torch_restore(workdir, "torch"), torch_checkpoint.CheckpointError,
        ("{run}/checkpoints/torch/step_2.pt", "sm_n_embd: checkpoint=8 run=16"), "model config different",
        needs_run=True),
    "neutral checkpoint restored as another model": Case(
        lambda tmp, workdir: torch_restore(workdir, "neutral"), torch_checkpoint.CheckpointError,
        ("{run}/checkpoints/neutral/step_2.safetensors", "sm_n_embd: checkpoint=8 run=16"),
        "model config different", needs_run=True),
    "convert a neutral file with another config": Case(
        lambda tmp, workdir: convert.convert(workdir_lib.layout(workdir).neutral_path(2), tmp / "out.pt",
                                             tiny_config(OTHER_MODEL)),
        ConversionError, ("{run}/checkpoints/neutral/step_2.safetensors", "sm_n_embd: file=8 config=16"),
        "differs from --config's", needs_run=True),
    "convert a torch file with another config": Case(
        lambda tmp, workdir: torch_convert.load_native(workdir / "checkpoints/torch/step_2.pt", other_model_config()),
        ConversionError, ("{run}/checkpoints/torch/step_2.pt", "sm_n_embd: file=8 given=16"),
        "differs from the one given", needs_run=True),
    "convert a msgpack file with another config": Case(
        lambda tmp, workdir: jax_convert.load_native(workdir.parent / "ema.msgpack", other_model_config()),
        ConversionError, ("ema.msgpack", "mis-shaped"), "Check that the model config matches", needs_run=True),
    # ------------------------------------------------------ the converter pointed at the wrong kind of file
    "text file named .safetensors": Case(
        lambda tmp, _: convert.convert(write(tmp / "x.safetensors", "hello"), tmp / "y.pt"),
        neutral.NeutralFileError, ("{tmp}/x.safetensors",), "is not a safetensors file"),
    "safetensors file named .pt": Case(
        lambda tmp, workdir: convert.convert(write(tmp / "x.pt", workdir_lib.layout(workdir).neutral_path(2).read_bytes()),
                                             tmp / "y.safetensors"),
        ConversionError, ("{tmp}/x.pt", "is not a torch checkpoint"), "give it the .safetensors extension",
        needs_run=True),
    "text file named .pt": Case(
        lambda tmp, _: convert.convert(write(tmp / "notes.pt", "hello, some notes\n"), tmp / "y.safetensors"),
        ConversionError, ("{tmp}/notes.pt", "is not a torch checkpoint", "starts with text: 'hello, some notes"),
        "torch.save writes a zip archive"),
    "empty file named .pt": Case(
        lambda tmp, _: convert.convert(write(tmp / "x.pt", b""), tmp / "y.safetensors"), ConversionError,
        ("{tmp}/x.pt", "is not a torch checkpoint", "is empty"), "torch.save writes a zip archive"),
    "text file found as a torch checkpoint": Case(
        lambda tmp, workdir: torch_restore_text(tmp, workdir), run.DamagedCheckpointError,
        ("{tmp}/run/checkpoints/torch/step_2.pt", "is not a torch checkpoint", "starts with text: 'notes"),
        "If that step is damaged, move the file away", needs_run=True),
    "torch file named .msgpack": Case(
        lambda tmp, workdir: convert.convert(
            write(tmp / "x.msgpack", (workdir / "checkpoints/torch/step_2.pt").read_bytes()), tmp / "y.safetensors",
            tiny_config()),
        ConversionError, ("{tmp}/x.msgpack", "is not a flax msgpack file"), "give it the .pt extension",
        needs_run=True),
    "folder named .pt": Case(
        lambda tmp, _: convert.convert(folder(tmp / "x.pt"), tmp / "y.safetensors"), ConversionError,
        ("{tmp}/x.pt", "Is a directory"), "not written by torch.save"),
    "folder named .msgpack": Case(
        lambda tmp, _: convert.convert(folder(tmp / "x.msgpack"), tmp / "y.safetensors", tiny_config()),
        ConversionError, ("{tmp}/x.msgpack",), "cannot be read: Is a directory"),
    "unknown extension": Case(
        lambda tmp, _: convert.convert(write(tmp / "x.txt", "hello"), tmp / "y.safetensors"), ConversionError,
        ("{tmp}/x.txt", "'.txt'"), "use .safetensors (neutral), .pt / .pth (torch) or .msgpack"),
    "official import of a torch file": Case(
        lambda tmp, workdir: upstream.read_upstream(
            "official", write(tmp / "ckpt-1.flax", (workdir / "checkpoints/torch/step_2.pt").read_bytes()),
            tiny_config()),
        upstream.UpstreamError, ("{tmp}/ckpt-1.flax", "zip archive"), "--from-upstream=pytorch-port",
        needs_run=True),
    "port import of an official run": Case(
        lambda tmp, _: upstream.read_upstream("pytorch-port", official_run(tmp)), upstream.UpstreamError,
        ("{tmp}", "has no model.pt"), "results directory holding model.pt"),
}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_bad_input_gives_one_clear_error(case: Case, request, tmp_path):
    workdir = request.getfixturevalue("trained") if case.needs_run else None
    before = _digest(workdir)
    with pytest.raises(case.error) as info:
        case.call(tmp_path, workdir)
    message = str(info.value)
    for name in case.names:
        assert name.format(tmp=tmp_path, run=workdir) in message, message
    assert case.fix in message, message
    assert _digest(workdir) == before                  # a refused run or import leaves the workdir alone


def _digest(workdir: Path | None) -> dict[str, bytes]:
    return {} if workdir is None else {str(p): p.read_bytes() for p in sorted(workdir.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------- the real command lines

def cli(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def truncated_npz(tmp: Path) -> Path:
    path = npz(tmp, train=np.zeros((4, 8, 8, 1), np.uint8), test=np.zeros((2, 8, 8, 1), np.uint8))
    return write(path, path.read_bytes()[:100])


# name: (files made in tmp_path -> the input file, command line ('{input}': its path, '{tmp}': tmp_path), exit
# status, the strings the message names, its fix)
CLI_CASES = {
    "override of the wrong type": pytest.param(
        lambda tmp: None, ("train_torch.py", "--config.training.batch_size_train=abc", "--workdir={tmp}/run"), 1,
        ("--config.training.batch_size_train", "abc"), "--help"),
    "unknown config key": pytest.param(
        lambda tmp: None, ("train_jax.py", "--config.training.batch_size_trian=64", "--workdir={tmp}/run"), 1,
        ("config.training.batch_size_trian", "unknown field"), "'batch_size_train'"),
    "config file that does not exist": pytest.param(
        lambda tmp: None, ("train_jax.py", "--config=configs/nope.py", "--workdir={tmp}/run"), 1,
        ("--config=configs/nope.py: no such file", "configs/*.py"),
        "(cifar10.py, cifar10_aug.py, imagenet32.py, quickstart.py)"),
    "truncated npz data file": pytest.param(
        truncated_npz, ("train_torch.py", "--config.data.dataset=npz", "--config.data.npz_path={input}",
                        "--workdir={tmp}/run"), 1,
        ("{input}", "not a readable .npz archive"), "np.savez"),
    "converter pointed at a text file": pytest.param(
        lambda tmp: write(tmp / "notes.safetensors", "not a checkpoint, some notes\n" * 4),
        ("convert.py", "--from={input}", "--to=out.pt"), 1,      # one status for every user error, as the trainers
        ("{input}", "is not a safetensors file"), "bad header length"),
}


@pytest.mark.parametrize("make, command, status, names, fix", list(CLI_CASES.values()), ids=list(CLI_CASES))
def test_command_line_prints_one_error_and_leaves_the_input_alone(tmp_path, make, command, status, names, fix):
    path = make(tmp_path)
    before = path.read_bytes() if path else None
    script, *args = command
    proc = cli(script, *(a.format(input=path, tmp=tmp_path) for a in args), cwd=tmp_path)
    assert proc.returncode == status, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("error:") == 1, proc.stderr
    for name in names:
        assert name.format(input=path) in proc.stderr, proc.stderr
    assert fix in proc.stderr, proc.stderr
    assert path is None or path.read_bytes() == before               # the file pointed at is unchanged
    assert not (tmp_path / "run").exists() and not (tmp_path / "out.pt").exists()   # nothing was written


@pytest.mark.parametrize("script", ["train_jax.py", "train_torch.py"])
def test_help_prints_the_flags_and_exits_with_0(script, tmp_path):
    for flag in ("--help", "--helpfull"):
        proc = cli(script, flag, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert "--workdir" in proc.stdout and "--config" in proc.stdout and "error" not in proc.stderr


def test_converter_reports_a_target_it_cannot_write(trained, tmp_path, capsys):
    blocker = write(tmp_path / "notes.txt", "a file where --to wants a folder")
    status = convert.main([f"--from={workdir_lib.layout(trained).neutral_path(2)}", f"--to={blocker}/out.safetensors"])
    err = capsys.readouterr().err
    assert status == 1 and err.startswith("error: ") and err.count("error:") == 1, err
    assert str(blocker) in err and "check the --from and --to paths" in err, err
