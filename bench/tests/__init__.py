"""Tests of the benchmark suite's own parts (run: pytest bench/tests)."""
