"""Benchmarks for mmspec (run as modules, e.g. ``python -m benchmarks.text``)."""
