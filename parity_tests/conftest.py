"""The parity suite's precision policy, tolerance table and report, wired into pytest.

    pytest parity_tests -q            # prints the report summary at the end; files in the --basetemp dir

- Precision and dtype policy (policy.parity_mode): JAX x64 and 'highest' matmul precision, torch TF32 off
  and 'highest' float32 matmuls, one torch thread. It is entered around every test of this directory and
  restored afterwards (so the per-backend tests in tests/ keep their defaults in a shared run).
- Tolerances: the one table is parity_tests/tolerances.py (each number with the reason for it).
- Comparison helper: compare.py (`assert_all_close` raises an AssertionError that names the quantity, the
  case, the worst parameter / element and both values).
- Report: every test records its measurements through the `record` fixture; at the end of the session
  the report (report.py, the same code as `python -m parity_tests.report`) is written to
  <basetemp>/parity_report/ and its summary printed.
"""
from __future__ import annotations

import pytest

from parity_tests.compare import Measurement, assert_all_close
from parity_tests.policy import parity_mode

_MEASUREMENTS: list[Measurement] = []
_MUTATIONS: list = []
_WRITTEN: list = []


@pytest.fixture(autouse=True)
def _parity_mode():
    with parity_mode():
        yield


@pytest.fixture
def check():
    """check(measurements): record them for the report, then assert each is within its tolerance."""
    def run(measurements):
        _MEASUREMENTS.extend(measurements)
        assert_all_close(measurements)
        return measurements
    return run


@pytest.fixture
def record_mutation():
    return _MUTATIONS.append


@pytest.fixture(scope="session", autouse=True)
def _parity_report(tmp_path_factory):
    yield
    if _MEASUREMENTS or _MUTATIONS:
        from parity_tests import report
        out = tmp_path_factory.getbasetemp() / "parity_report"
        _WRITTEN.extend(report.write_report(out, _MEASUREMENTS, _MUTATIONS))


def pytest_terminal_summary(terminalreporter):
    if not _WRITTEN:
        return
    from parity_tests import report
    text = report.markdown(_MEASUREMENTS, _MUTATIONS)
    summary = text.split("\n## ", 2)
    terminalreporter.section("parity report")
    terminalreporter.write_line("## " + summary[1].rstrip() if len(summary) > 1 else text)
    terminalreporter.write_line(f"full report: {_WRITTEN[0]} and {_WRITTEN[1]}")


def pytest_collection_modifyitems(items):
    """Every parity test runs both backends."""
    for item in items:
        if "parity_tests" in str(item.fspath):
            item.add_marker(pytest.mark.jax)
            item.add_marker(pytest.mark.torch)
