"""Training parity: 20 full optimizer steps (AdamW with the weight-decay mask, LR warmup, clipping, EMA) from
the same init on the same batches and noise; and training continued in the other backend after converting
the full state through the neutral file."""
from __future__ import annotations

import pytest

from parity_tests import cases, measure


@pytest.mark.parametrize("dtype", cases.DTYPES)
@pytest.mark.parametrize("case", cases.TRAIN_CASES)
def test_training_trajectory(case, dtype, check):
    check(measure.measure_training(case, dtype))


@pytest.mark.parametrize("case", cases.TRAIN_CASES)
def test_continued_training_in_the_other_backend(case, check):
    """5 steps in JAX, the state converted to torch, 10 more there == 15 steps in JAX (float64); and the
    mirror, torch first."""
    check(measure.measure_continued(case, "float64"))
