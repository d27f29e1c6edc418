"""Tolerances of the tests that compare a run split over devices or processes (or run with other kernels) with
the same run unsplit, and why those runs are float64 (model.compute_dtype=float64, in both backends).

The per-example computation is the same on 1 or N devices; what changes is the order of the reductions: the
batch sums (N partial sums and an all-reduce) and, with the thread count and the CPU, the sums inside the
kernels. In float32 that difference is no small one for Adam: a gradient element that is rounding noise (or
nearly cancels, as many do in the first steps) is of the size of eps = 1e-8, and the update
lr * m / (sqrt(v) + eps) turns it into a step of up to the learning rate, different in each run. A float32
comparison can then promise no more than |d param| <= steps * lr, the size of the steps themselves (seen: 3.6e-6
on one element after 3 DDP steps on a 2-core AMD AVX2 CPU, where the tolerance was 1e-6).

In float64 a gradient element's rounding difference delta is 2^-53 (1.1e-16) times the magnitudes it sums: a
conv kernel's gradient sums B * H * W = 16 * 8 * 8 = 1024 terms, the gradients here are <= 1.4 (|mu| <= 0.135),
so delta <= 1e-13, far below eps. The update's derivative in the gradient is at most lr / eps, so a step moves
a parameter differently by at most lr * delta / eps = 2e-3 * 1e-13 / 1e-8 = 2e-8: after S steps
|d param| <= S * 2e-8 (five orders below one step, lr = 2e-3), and the EMA of the parameters the same;
|d mu| <= delta and |d nu| <= 2 |g| delta stay below 1e-12. RTOL covers the large values (a float64 sum of
~1e3 terms: 1e-13 relative). Measured (3 DDP steps, 2 processes vs 1, 1 vs 2 threads): params 2.9e-15, EMA
2.8e-17, moments 7e-17 apart, where float32 gave 2.8e-7, 7e-9 and 3e-8.
"""
from __future__ import annotations

import numpy as np

FLOAT64 = "model.compute_dtype=float64"
LEARNING_RATE, ADAM_EPS = 2e-3, 1e-8          # TINY_MODEL's learning rate, the default optimizer.eps
GRADIENT_ROUNDING = 1e-13                     # delta above
RTOL = 1e-10
MOMENTS_ATOL = 1e-12
METRICS_RTOL = 1e-10                          # bpd terms, grad_norm: float64 losses and means


def params_atol(steps: int) -> float:
    """The bound on a parameter's (or its EMA's) difference after `steps` float64 Adam steps."""
    return steps * LEARNING_RATE * GRADIENT_ROUNDING / ADAM_EPS


def assert_state_close(x, y, part: str, steps: int, name: str = "") -> None:
    """x, y: the same leaf (float64, or an integer) of two runs after `steps` steps; part: 'params',
    'ema_params', 'opt_mu' or 'opt_nu' (what it is decides its bound)."""
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and (x.dtype == np.float64 or not np.issubdtype(x.dtype, np.floating)), (name, x.dtype)
    atol = MOMENTS_ATOL if part in ("opt_mu", "opt_nu") else params_atol(steps)
    np.testing.assert_allclose(x, y, rtol=RTOL, atol=atol, err_msg=f"{part} {name}")


def assert_neutral_close(a, b) -> None:
    """Two neutral checkpoints of float64 runs: same step and count, every leaf within its bound."""
    assert a.step == b.step and a.opt_count == b.opt_count
    for part in ("params", "ema_params", "opt_mu", "opt_nu"):
        x, y = getattr(a, part), getattr(b, part)
        assert sorted(x) == sorted(y)
        for key in x:
            assert_state_close(x[key], y[key], part, a.opt_count, key)
