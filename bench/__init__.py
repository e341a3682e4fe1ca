"""Benchmarks: `python -m bench.run`; not part of the proxy package or the tests."""
