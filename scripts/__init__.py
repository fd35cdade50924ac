"""Benchmarks and tools, run from the repository root (`python scripts/NAME.py`); never imported by the tests."""
