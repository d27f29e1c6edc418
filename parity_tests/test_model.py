"""Forward pass and gradient parity: the same weights, inputs and injected noise in both backends give the
same UNet output, decoder log-probabilities, per-example loss terms, bpd and d bpd / d parameter; also on
the cases whose schedule weights hold exact zeros (cases.ZERO_CASES), where |w|'s derivative is a choice."""
from __future__ import annotations

import pytest

from parity_tests import cases, measure


@pytest.mark.parametrize("dtype", cases.DTYPES)
@pytest.mark.parametrize("case", cases.MODEL_CASES)
def test_model(case, dtype, check):
    check(measure.measure_model(case, dtype))
