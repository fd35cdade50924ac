"""Benchmarks and fault scenarios; a package so that tests import ``scripts.faults`` without path tricks."""
