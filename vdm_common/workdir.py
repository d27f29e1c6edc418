"""The run directory (workdir) shared by both trainers: layout, config-mismatch checks, locking, atomic writes.

    <workdir>/
      config.json      the full config of the run, written once by the first training run
      run.json         which backend created the run, and when
      metrics.jsonl    one JSON object per logged step (vdm_common.metrics)
      checkpoints/     <native>/ (orbax/<step>/ or torch/step_<step>.pt), neutral/step_<step>.safetensors
                       (read by either backend), damaged/ (checkpoints that failed to restore, kept)
      samples/         sample grids, step_<step>_n<num>_T<steps>_seed<seed>_<weights>_<backend>.png
      eval/            eval results, step_<step>_<bound>_x<draws>_<N>img_<weights>_<backend>.json
      tensorboard/     TensorBoard event files, one run per split (train/, eval/)
      plots/           bpd.png, the curves of metrics.jsonl
      profile/         traces written by --profile
      .lock            held (flock) by the training run writing this workdir

Nothing in an existing workdir is overwritten by a run with a different config: `prepare_workdir` compares
the stored config.json field by field and refuses, listing every differing field. On multi-process runs only
process 0 calls `prepare_workdir` and holds `workdir_lock`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import fcntl
import itertools
import json
import os
import socket
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

import ml_collections

from vdm_common import config as config_lib
from vdm_common.errors import UserError

CONFIG_FILE = "config.json"
RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
LOCK_FILE = ".lock"
CHECKPOINTS_DIR = "checkpoints"
SAMPLES_DIR = "samples"
EVAL_DIR = "eval"
TENSORBOARD_DIR = "tensorboard"
PLOTS_DIR = "plots"
PROFILE_DIR = "profile"            # made by --profile only
NEUTRAL_DIR = "neutral"            # under checkpoints/
DAMAGED_DIR = "damaged"            # under checkpoints/
PLOT_FILE = "bpd.png"              # under plots/
SUBDIRS = (CHECKPOINTS_DIR, SAMPLES_DIR, EVAL_DIR, TENSORBOARD_DIR, PLOTS_DIR)
BACKENDS = ("jax", "torch", "upstream:official", "upstream:pytorch-port")  # who created a run

# Config fields that may differ between config.json and the config of a resumed run, because they do not
# change the function being trained nor the training trajectory up to the current step: train longer,
# change how often we log / evaluate / save / sample, how much we evaluate or sample, where the data lives.
RESUMABLE_FIELDS = frozenset({
    "training.num_steps_train",
    "training.steps_per_logging",
    "training.steps_per_eval",
    "training.steps_per_save",
    "training.steps_per_sample",
    "training.checkpoints_to_keep",
    "training.num_samples",
    "training.sample_steps",
    "training.batch_size_eval",
    "training.num_eval_batches",
    "training.eval_timesteps",
    "training.eval_noise_samples",
    "training.max_nonfinite_steps",
    "data.data_dir",
    "data.manual_dir",
})


class WorkdirError(UserError, ValueError):
    """The workdir cannot be used as asked; the message says why and what to do."""


class WorkdirLockedError(WorkdirError):
    """Another live process holds the workdir lock."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """Every path of a workdir, in one place (nothing is created).

    Results are named by what made them, so that no run or mode replaces another's (`eval_path`,
    `sample_path`); `write_new` refuses to replace a file with other bytes.
    """

    root: Path

    config = property(lambda self: self.root / CONFIG_FILE)
    run = property(lambda self: self.root / RUN_FILE)
    metrics = property(lambda self: self.root / METRICS_FILE)
    lock = property(lambda self: self.root / LOCK_FILE)
    checkpoints = property(lambda self: self.root / CHECKPOINTS_DIR)
    samples = property(lambda self: self.root / SAMPLES_DIR)
    eval = property(lambda self: self.root / EVAL_DIR)
    tensorboard = property(lambda self: self.root / TENSORBOARD_DIR)
    plots = property(lambda self: self.root / PLOTS_DIR)
    profile = property(lambda self: self.root / PROFILE_DIR)
    neutral = property(lambda self: self.checkpoints / NEUTRAL_DIR)     # the neutral exports of every step
    damaged = property(lambda self: self.checkpoints / DAMAGED_DIR)     # checkpoints that failed to restore
    plot = property(lambda self: self.plots / PLOT_FILE)

    def native(self, kind: str) -> Path:
        """checkpoints/<kind>/: a backend's own checkpoints ('orbax', 'torch')."""
        return self.checkpoints / kind

    def neutral_path(self, step: int) -> Path:
        """checkpoints/neutral/step_<step>.safetensors: the neutral export of the state after `step` updates."""
        return self.neutral / f"step_{step}.safetensors"

    def eval_path(self, step: int, bound: str, noise_samples: int, num_images: int, weights: str,
                  backend: str) -> Path:
        """eval/step_<step>_<bound>_x<draws>_<N>img_<weights>_<backend>.json, e.g.
        eval/step_5000_continuous_x16_297img_ema_jax.json."""
        return self.eval / f"step_{step}_{bound}_x{noise_samples}_{num_images}img_{weights}_{backend}.json"

    def sample_path(self, step: int, num_samples: int, sample_steps: int, seed: int, weights: str,
                    backend: str) -> Path:
        """samples/step_<step>_n<num>_T<steps>_seed<seed>_<weights>_<backend>.png."""
        return self.samples / f"step_{step}_n{num_samples}_T{sample_steps}_seed{seed}_{weights}_{backend}.png"


def layout(workdir: str | os.PathLike) -> Layout:
    """The paths of a workdir (nothing is created)."""
    return Layout(Path(workdir).absolute())


def write_new(path: Path, data: bytes) -> Path:
    """Writes `data` atomically to `path`, or, when `path` holds other bytes, to the first free
    `<stem>.<k><suffix>`: a result is never replaced. Returns the path written (or the one that already
    holds these bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    candidate = path
    for k in itertools.count(1):
        if not candidate.exists():
            atomic_write_bytes(candidate, data)
            return candidate
        if candidate.read_bytes() == data:
            return candidate
        candidate = path.with_name(f"{path.stem}.{k}{path.suffix}")
    raise AssertionError("unreachable")


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Calls `write(file)` so that readers of `path` see the old file or the new one, never a partial one.

    Temp file in the same directory (so os.replace is a rename on one file system), fsync, os.replace,
    then fsync the directory so the rename itself survives a crash. The directory must exist. The file
    gets mode 0o644.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fchmod(f.fileno(), 0o644)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes `data` to `path` atomically (see atomic_write)."""
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """`atomic_write_bytes` of UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


class _Missing:
    """Shown for a field that one of two configs lacks."""

    def __repr__(self) -> str:
        return "<missing>"


_MISSING = _Missing()


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists and other leaves are kept as values."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def diff_configs(stored: dict, new: dict, allowed: frozenset[str] = RESUMABLE_FIELDS) -> list[str]:
    """Lines `section.field: stored=X new=Y` for every field that differs and is not in `allowed`.

    Both arguments are nested dicts (as in config.json); a field present on one side only is shown with
    `<missing>` on the other.
    """
    a, b = flatten(stored), flatten(new)
    lines = []
    for name in sorted(set(a) | set(b)):
        x, y = a.get(name, _MISSING), b.get(name, _MISSING)
        if name not in allowed and x != y:
            lines.append(f"{name}: stored={x!r} new={y!r}")
    return lines


def _config_tree(config: ml_collections.ConfigDict | dict) -> dict:
    """The config as config.json holds it (JSON types: tuples become lists)."""
    tree = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return json.loads(json.dumps(tree))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:           # ValueError: JSON syntax, or bytes that are not UTF-8
        raise WorkdirError(f"cannot read {path}: {e}; restore or remove it, or use a new --workdir") from e


def prepare_workdir(workdir: str | os.PathLike, config: ml_collections.ConfigDict, backend: str) -> Path:
    """Creates the workdir for a training run, or checks that an existing one was made with this config.

    New workdir: writes config.json and run.json ({"backend", "created", "host"}) atomically, and makes the
    subdirectories. Existing one (config.json present): raises `WorkdirError` listing every field that
    differs from the stored config, except those in `RESUMABLE_FIELDS`; nothing is written or removed then.
    Returns the absolute workdir path.
    """
    if backend not in BACKENDS:
        raise WorkdirError(f"backend {backend!r} is not one of {BACKENDS}")
    paths = layout(workdir)
    if paths.root.exists() and not paths.root.is_dir():
        raise WorkdirError(f"--workdir {paths.root} exists and is not a directory; pass a directory path")
    new = _config_tree(config)
    if paths.config.exists():
        diff = diff_configs(_config_tree(config_lib.with_defaults(_read_json(paths.config))), new)
        if diff:
            raise WorkdirError(
                f"workdir {paths.root} holds a run with a different config ({len(diff)} field(s) differ):\n  "
                + "\n  ".join(diff)
                + "\nUse a new --workdir for this config, or resume with the stored config "
                  f"({paths.config}). Fields that may differ on resume: {', '.join(sorted(RESUMABLE_FIELDS))}.")
    else:
        paths.root.mkdir(parents=True, exist_ok=True)
        run = dict(backend=backend, host=socket.gethostname(),
                   created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        # run.json first: config.json is what marks the workdir as taken.
        atomic_write_text(paths.run, json.dumps(run, indent=2) + "\n")
        atomic_write_text(paths.config, json.dumps(new, indent=2, sort_keys=True) + "\n")
    for sub in SUBDIRS:
        (paths.root / sub).mkdir(exist_ok=True)
    return paths.root


def read_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The validated config stored in a workdir (for eval / sample modes, whichever backend trained it)."""
    paths = layout(workdir)
    if not paths.config.is_file():
        raise WorkdirError(f"{paths.root} has no {CONFIG_FILE}: it is not the workdir of a training run. "
                           f"Pass the --workdir a training run wrote, or train first (--mode=train).")
    return config_lib.validate(ml_collections.ConfigDict(config_lib.with_defaults(_read_json(paths.config))))


def read_run_info(workdir: str | os.PathLike) -> dict:
    """run.json of a workdir: {"backend", "created", "host"}."""
    return _read_json(layout(workdir).run)


@contextlib.contextmanager
def workdir_lock(workdir: str | os.PathLike) -> Iterator[Path]:
    """Holds an exclusive lock on the workdir for the duration of the block (one training run at a time).

    An flock on `<workdir>/.lock`, which also records the holder's pid, host and start time for the error
    message. The kernel releases an flock when its process dies, so a lock file left by a dead run is simply
    taken over. Raises `WorkdirLockedError` naming the holder when a live process holds it. The lock file
    itself stays (emptied on release): removing it would let two processes lock two different files.
    """
    paths = layout(workdir)
    if paths.root.exists() and not paths.root.is_dir():
        raise WorkdirError(f"--workdir {paths.root} exists and is not a directory; pass a directory path")
    paths.root.mkdir(parents=True, exist_ok=True)
    fd = os.open(paths.lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            raise WorkdirLockedError(
                f"workdir {paths.root} is in use by another training run ({_holder(fd)}). Wait for it to "
                f"finish or stop that process, or use a different --workdir.") from None
        me = dict(pid=os.getpid(), host=socket.gethostname(),
                  since=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        try:
            yield paths.lock
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _holder(fd: int) -> str:
    """'pid 123 on host h since t' from the lock file (its holder may be rewriting it: then 'pid unknown')."""
    try:
        info = json.loads(os.pread(fd, 4096, 0))
        return f"pid {info['pid']} on host {info['host']} since {info['since']}"
    except (ValueError, KeyError, TypeError):
        return "pid unknown"
