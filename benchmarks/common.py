"""Benchmark helpers live in the package (the report uses them too); scripts import them here."""

from longserve.bench.env import environment, median_time, write

__all__ = ["environment", "median_time", "write"]
