"""Forward pass and gradient parity: the same weights, inputs and injected noise in both backends give the
same UNet output, decoder log-probabilities, per-example loss terms, bpd and d bpd / d parameter."""
from __future__ import annotations

import pytest

from parity_tests import cases, measure


@pytest.mark.parametrize("dtype", cases.DTYPES)
@pytest.mark.parametrize("case", list(cases.CASES))
def test_model(case, dtype, check):
    check(measure.measure_model(case, dtype))
