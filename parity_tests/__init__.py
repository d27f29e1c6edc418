"""Cross-backend parity suite: `pytest parity_tests`, report: `python -m parity_tests.report --out=DIR`."""
