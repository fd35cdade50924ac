"""Helpers shared by the tests: synthetic shards, a tiny LM, fault scenarios (also runnable: `python -m tests.support.faults`)."""
