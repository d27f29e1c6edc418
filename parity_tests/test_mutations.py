"""The suite must fail on a deliberately altered model: each mutation (mutations.py) patches one thing on
the torch side, and the comparison that should notice it must raise, naming the right quantity."""
from __future__ import annotations

import pytest

from parity_tests import mutations, report
from parity_tests.compare import assert_all_close


@pytest.mark.parametrize("mutation", mutations.MUTATIONS, ids=[m.name for m in mutations.MUTATIONS])
def test_mutation_is_caught(mutation, record_mutation):
    measurements = mutations.run(mutation, "float64")
    result = report.mutation_result(mutation, measurements)
    record_mutation(result)
    with pytest.raises(AssertionError, match="backends disagree") as failure:
        assert_all_close(measurements)
    expected = "exactly" if mutation.only else "one of"
    assert result.ok, (f"{mutation.name} was expected to fail {expected} {mutation.catches}, but the failing "
                       f"quantities are {result.caught_by}:\n{failure.value}")


def test_mutations_restore_the_code():
    """After the mutation contexts, the unmutated comparison passes again (nothing leaked)."""
    from parity_tests import measure
    assert_all_close(measure.measure_model("scalar-cont-c1-v17", "float64"))
    assert_all_close(measure.measure_training("scalar-cont-c1-v17", "float64"))
