"""How two backends' results are compared, and how a failure is reported.

Every comparison yields a `Measurement`: the worst relative error of one quantity (for one configuration
and dtype), where it occurred (parameter name and element index, in JAX layouts) and both values there.
The tests assert measurements against `tolerances.TOLERANCES`; the report tabulates the same objects, so
the two cannot disagree.

Relative error of an array: max|a - b| / max(max|a|, max|b|) (the max-norm of the difference relative to
the max-norm of the values). Elementwise relative error is not used: elements near zero (a pixel of a
UNet output, an example's reconstruction term) would turn harmless rounding into huge ratios.

Relative error of a set of tensors (gradients, parameters, optimizer moments): the worst per-tensor
error, each tensor measured against max(its own max-norm, floor * the largest max-norm of the set). The
floor exists for tensors that are analytically zero: the gradient of an attention `k/bias` is exactly zero
(softmax over keys is invariant to adding q.b_k, a per-query constant), so both backends hold pure
rounding noise there (~1e-15 of the gradient scale in float64) and its own-scale relative error is
meaningless (~1). Against the floor such a tensor counts as an absolute error at the scale of the set.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Mapping, Sequence

import numpy as np


@dataclasses.dataclass
class Measurement:
    """The worst relative error of one quantity, for one configuration and dtype."""

    quantity: str
    config: str
    dtype: str
    error: float
    tolerance: float
    where: str = ""          # parameter name and/or element index of the worst error
    jax_value: float = math.nan
    torch_value: float = math.nan
    note: str = ""           # extra facts (e.g. raw mismatch counts)
    # float32 only: the larger of the two backends' own float32 errors against their float64 results (the
    # same metric), i.e. the size of float32 rounding for this quantity, for scale.
    rounding: float = math.nan

    @property
    def ok(self) -> bool:
        return bool(self.error <= self.tolerance)

    def describe(self) -> str:
        values = "" if math.isnan(self.jax_value) else f": jax={self.jax_value!r} torch={self.torch_value!r}"
        note = f" ({self.note})" if self.note else ""
        return (f"{self.quantity} [{self.config}, {self.dtype}]: worst relative error {self.error:.3e} > "
                f"tolerance {self.tolerance:.1e} at {self.where}{values}{note}")

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["ok"] = self.ok
        for key in ("error", "tolerance", "jax_value", "torch_value", "rounding"):
            if isinstance(out[key], float) and not math.isfinite(out[key]):
                out[key] = repr(out[key])
        return out


def _index(shape: Sequence[int], flat_index: int) -> str:
    return str(tuple(int(i) for i in np.unravel_index(flat_index, shape))) if shape else "()"


def array_error(quantity: str, config: str, dtype: str, a, b, tolerance: float) -> Measurement:
    """Max-norm relative error of two arrays of the same shape (a: JAX, b: torch, both in JAX layout)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return Measurement(quantity, config, dtype, math.inf, tolerance, f"shapes {a.shape} vs {b.shape}")
    diff = np.abs(a - b)
    if not np.all(np.isfinite(a)) or not np.all(np.isfinite(b)):
        bad = int(np.flatnonzero(~(np.isfinite(a) & np.isfinite(b)))[0])
        return Measurement(quantity, config, dtype, math.inf, tolerance, f"index {_index(a.shape, bad)}",
                           float(a.flat[bad]), float(b.flat[bad]), "non-finite value")
    worst = int(np.argmax(diff)) if diff.size else 0
    scale = max(float(np.max(np.abs(a), initial=0.0)), float(np.max(np.abs(b), initial=0.0)))
    error = float(diff.flat[worst]) / scale if scale > 0 else float(diff.max(initial=0.0))
    return Measurement(quantity, config, dtype, error, tolerance, f"index {_index(a.shape, worst)}",
                       float(a.flat[worst]) if a.size else math.nan, float(b.flat[worst]) if b.size else math.nan)


def tree_error(quantity: str, config: str, dtype: str, a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray],
               tolerance: float, floor: float) -> Measurement:
    """Worst per-tensor relative error over two {neutral key: array} sets (see the module docstring)."""
    if set(a) != set(b):
        only = sorted(set(a) ^ set(b))
        return Measurement(quantity, config, dtype, math.inf, tolerance, f"keys on one side only: {only[:5]}")
    global_scale = max(float(np.max(np.abs(np.asarray(v, np.float64)), initial=0.0)) for v in a.values())
    worst: Measurement | None = None
    for key in sorted(a):
        x, y = np.asarray(a[key], np.float64), np.asarray(b[key], np.float64)
        m = array_error(quantity, config, dtype, x, y, tolerance)
        if math.isfinite(m.error) and x.size:
            own = max(float(np.max(np.abs(x))), float(np.max(np.abs(y))))
            scale = max(own, floor * global_scale)
            m.error = float(np.max(np.abs(x - y))) / scale if scale > 0 else 0.0
            if own < floor * global_scale:
                m.note = f"tensor below the floor: measured against {floor:g} x the set scale {global_scale:.3e}"
        m.where = f"{key} {m.where}"
        if worst is None or m.error > worst.error:
            worst = m
    return worst


def count_measurement(quantity: str, config: str, dtype: str, count: int, tolerance: float, where: str = "",
                      a=math.nan, b=math.nan, note: str = "") -> Measurement:
    """A measurement that is a count (e.g. of mismatching integer pixels), not a relative error."""
    return Measurement(quantity, config, dtype, float(count), tolerance, where, float(a), float(b), note)


def assert_all_close(measurements: Iterable[Measurement]) -> None:
    """Raises AssertionError naming every quantity over its tolerance (the worst element and both values)."""
    failures = [m.describe() for m in measurements if not m.ok]
    if failures:
        raise AssertionError("backends disagree:\n  " + "\n  ".join(failures))
