"""Metrics logging identical for both trainers: metrics.jsonl, TensorBoard events, progress bar, plots.

Each logged step is one line of `<workdir>/metrics.jsonl`,
    {"step": 1000, "split": "train", "bpd": 3.41, "learning_rate": 0.0002, ...}
and the same scalars go to TensorBoard under `<workdir>/tensorboard/<split>/` (so train and eval curves of
a tag overlay). Also here: parameter counts, a rough per-device memory estimate, and a bpd plot.
"""
from __future__ import annotations

import io
import itertools
import json
import math
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any

import tqdm
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

from vdm_common import architecture
from vdm_common import workdir as workdir_lib
from vdm_common.config import ModelConfig
from vdm_common.errors import UserError

SPLITS = ("train", "eval")


class MetricsFileError(UserError, FileNotFoundError):
    """A run directory has no metrics.jsonl to read (plot mode before any training)."""
_event_file_ids = itertools.count()


class _EventFile:
    """A TensorBoard event file of scalars, written synchronously.

    `tensorboard.summary.Writer` would do, but its EventFileWriter goes through `tf.io.gfile`, which
    imports TensorFlow whenever it is installed (the cifar extra installs it) -- slow, and TF beside JAX
    is a trap. This writes the same records with tensorboard's TF-free RecordWriter and protos.
    """

    def __init__(self, logdir: Path, purge_step: int | None = None):
        logdir.mkdir(parents=True, exist_ok=True)
        name = (f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}."
                f"{next(_event_file_ids)}")
        self._records = RecordWriter(open(logdir / name, "wb"))
        self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))
        if purge_step is not None:
            # TensorBoard hides the events of earlier files at steps >= purge_step (a restarted run).
            self._write(event_pb2.Event(wall_time=time.time(), step=purge_step,
                                        session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))

    def _write(self, event: event_pb2.Event) -> None:
        self._records.write(event.SerializeToString())

    def add_scalars(self, step: int, scalars: dict[str, float]) -> None:
        event = event_pb2.Event(wall_time=time.time(), step=step, summary=summary_pb2.Summary(
            value=[summary_pb2.Summary.Value(tag=tag, simple_value=v) for tag, v in scalars.items()]))
        self._write(event)
        self._records.flush()

    def close(self) -> None:
        self._records.close()


def _scalar(name: str, value: Any) -> float | int:
    """A Python number from a Python / numpy number or a one-element array (numpy, JAX or torch)."""
    if hasattr(value, "item"):
        try:
            value = value.item()
        except (ValueError, RuntimeError) as e:
            raise TypeError(f"metric {name!r} is not a scalar (shape {getattr(value, 'shape', '?')})") from e
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"metric {name!r} = {value!r} is not a number")
    return value


class MetricsWriter:
    """Appends metrics to `<workdir>/metrics.jsonl` and TensorBoard; a no-op when `enabled` is False.

    Pass `enabled=False` on every process but process 0 (JAX process_index / torch rank).
    resume_step: the step the run continues from. Rows past it were written by a run that stopped after its
    last checkpoint; they are dropped from metrics.jsonl (and purged from TensorBoard's view, as
    TensorBoard does after a restart: a SessionLog START at resume_step + 1), so each step appears once.
    """

    def __init__(self, workdir: str | os.PathLike, enabled: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        self._paths = workdir_lib.layout(workdir)
        self._events: dict[str, _EventFile] = {}
        self._file = None
        self._purge_step = None if resume_step is None else resume_step + 1
        if enabled:
            self._paths.root.mkdir(parents=True, exist_ok=True)
            if resume_step is not None:
                drop_rows_after(self._paths.metrics, resume_step)
            # A run killed mid-line left a partial last line: start ours on a fresh line.
            partial = False
            if self._paths.metrics.is_file() and self._paths.metrics.stat().st_size > 0:
                with open(self._paths.metrics, "rb") as f:
                    f.seek(-1, os.SEEK_END)
                    partial = f.read(1) != b"\n"
            self._file = open(self._paths.metrics, "a", encoding="utf-8")
            if partial:
                self._file.write("\n")

    def write(self, step: int, split: str, **scalars: Any) -> None:
        """Logs the scalars of one step; non-finite values become null in JSON (and NaN/inf in TensorBoard)."""
        if not self.enabled:
            return
        if split not in SPLITS:
            raise ValueError(f"split {split!r} is not one of {SPLITS}")
        values = {name: _scalar(name, v) for name, v in scalars.items()}
        record = {"step": int(step), "split": split}
        record.update({k: (v if math.isfinite(v) else None) for k, v in values.items()})
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        if split not in self._events:
            self._events[split] = _EventFile(self._paths.tensorboard / split, self._purge_step)
        self._events[split].add_scalars(int(step), {k: float(v) for k, v in values.items()})

    def close(self) -> None:
        """Flushes and closes the files; safe to call twice."""
        if self._file is not None:
            self._file.close()
            self._file = None
        for events in self._events.values():
            events.close()
        self._events.clear()

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def drop_rows_after(path: Path, step: int) -> int:
    """Rewrites a metrics.jsonl (atomically) without its rows of steps > `step`; returns how many it dropped.
    Unreadable lines are kept as they are."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            late = int(json.loads(line)["step"]) > step
        except (ValueError, KeyError, TypeError):
            late = False
        dropped += late
        if not late:
            kept.append(line if line.endswith("\n") else line + "\n")
    if dropped:
        workdir_lib.atomic_write_text(path, "".join(kept))
    return dropped


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl, in file order (null values as None).

    Lines that do not parse (a run killed mid-write) are skipped with a warning naming them.
    """
    path = Path(path)
    if not path.is_file():
        raise MetricsFileError(f"no metrics file {path}; a training run writes <workdir>/{workdir_lib.METRICS_FILE}")
    records, bad = [], []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    bad.append(number)
    if bad:
        warnings.warn(f"{path}: skipped unreadable line(s) {bad}")
    return records


class Window:
    """The train metrics of the steps since the last log line (both trainers log them alike).

    `add` takes the metrics of a call of n steps (means over its applied steps, and `skipped`: how many of
    the n were skipped for a non-finite loss or gradient); `flush` returns the means over the window's
    applied steps (NaN when none was applied), `skipped` summed, and steps/s over the time the calls took.
    """

    def __init__(self):
        self.steps, self.applied, self.seconds, self.skipped = 0, 0.0, 0.0, 0.0
        self.sums: dict[str, float] = {}

    def add(self, values: dict[str, Any], n: int, seconds: float) -> None:
        skipped = float(values.get("skipped", 0.0))
        applied = n - skipped
        self.steps, self.applied, self.seconds, self.skipped = (
            self.steps + n, self.applied + applied, self.seconds + seconds, self.skipped + skipped)
        for name, value in values.items():
            if name != "skipped" and applied:
                self.sums[name] = self.sums.get(name, 0.0) + float(value) * applied

    def flush(self) -> dict[str, float]:
        means = {name: s / self.applied if self.applied else math.nan for name, s in self.sums.items()}
        out = dict(means, skipped=self.skipped, steps_per_sec=self.steps / max(self.seconds, 1e-9))
        self.__init__()
        return out


class ProgressBar:
    """A tqdm bar over training steps showing bpd, steps/s and the ETA; a no-op when not `enabled`."""

    def __init__(self, total_steps: int, initial_step: int = 0, enabled: bool = True):
        self._bar = tqdm.tqdm(total=total_steps, initial=initial_step, disable=not enabled, unit="step",
                              dynamic_ncols=True, desc="train")

    def update(self, step: int, bpd: Any) -> None:
        """Moves the bar to `step` (the number of steps done) and shows the latest train bpd."""
        self._bar.set_postfix(bpd=f"{float(bpd):.4f}", refresh=False)
        self._bar.update(step - self._bar.n)

    def close(self) -> None:
        """Closes the bar."""
        self._bar.close()


def format_count(n: int | float) -> str:
    """A count with a K/M/B suffix and 2 decimals: 30_578_181 -> '30.58M'; below 1000 as is: 512 -> '512'."""
    if abs(n) < 1000:
        return f"{n:g}"
    for scale, suffix in ((1e3, "K"), (1e6, "M"), (1e9, "B")):
        if round(abs(n) / scale, 2) < 1000:
            break
    return f"{n / scale:.2f}{suffix}"


def format_bytes(n: int | float) -> str:
    """A byte count in binary units: 3 * 2**30 -> '3.00 GiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} B" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def estimate_memory_bytes(num_params: int, activation_elements_per_example: int, batch_per_device: int,
                          bytes_per_element: int = 4, *, activation_bytes_per_element: int | None = None) -> int:
    """A rough training-memory estimate for one device, in bytes:

        bytes_per_element * 5 * num_params            params + grads + 2 Adam moments + EMA
      + activation_bytes_per_element * activation_elements_per_example * batch_per_device

    `activation_bytes_per_element` defaults to `bytes_per_element` (pass 2 under bfloat16 compute: the params
    stay float32). Ignores framework workspace, fragmentation, the data batch and compiler rematerialisation,
    so treat it as an order of magnitude, not a limit.
    """
    act_bytes = bytes_per_element if activation_bytes_per_element is None else activation_bytes_per_element
    return bytes_per_element * 5 * num_params + act_bytes * activation_elements_per_example * batch_per_device


def training_memory_estimate(model_config: ModelConfig, num_params: int, image_shape, batch_per_device: int) -> int:
    """`estimate_memory_bytes` for a model config: 8-byte parameters in float64, else 4; activations of 2
    bytes under bfloat16 compute, else those of the parameters."""
    param_bytes = 8 if model_config.compute_dtype == "float64" else 4
    act_bytes = 2 if model_config.compute_dtype == "bfloat16" else param_bytes
    activations = architecture.unet_activation_elements(model_config, image_shape)
    return estimate_memory_bytes(num_params, activations, batch_per_device, param_bytes,
                                 activation_bytes_per_element=act_bytes)


def plot_metrics(metrics_path: str | os.PathLike, out_png: str | os.PathLike) -> Path:
    """Plots train and eval bpd against step from a metrics.jsonl (either backend's) into a PNG.

    Linear axes; a step logged twice (a resumed run re-logs steps after its last checkpoint) keeps its
    last value. Raises MetricsFileError for a missing file and ValueError when no row has a bpd.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    curves = {split: {} for split in SPLITS}
    for r in read_metrics(metrics_path):
        if r.get("split") in curves and r.get("bpd") is not None:
            curves[r["split"]][r["step"]] = r["bpd"]
    if not any(curves.values()):
        raise ValueError(f"{metrics_path} has no rows with a bpd value to plot")
    fig = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for split, style in (("train", "-"), ("eval", "o-")):
        if curves[split]:
            steps = sorted(curves[split])
            ax.plot(steps, [curves[split][s] for s in steps], style, label=split, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("bits per dimension")
    ax.set_title(f"bpd: {Path(metrics_path).parent.name}")
    ax.grid(alpha=0.3)
    ax.legend()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    workdir_lib.atomic_write_bytes(out_png, buffer.getvalue())
    return out_png
