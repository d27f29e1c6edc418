"""Sampling parity: a full T-step ancestral trajectory from the same z_1 with the same step noise, and the
integer images decoded from it."""
from __future__ import annotations

import pytest

from parity_tests import cases, measure


@pytest.mark.parametrize("dtype", cases.DTYPES)
@pytest.mark.parametrize("case", list(cases.CASES))
def test_sampling(case, dtype, check):
    check(measure.measure_sampling(case, dtype))
