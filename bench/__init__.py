"""Benchmark suite for kvstore: reference apps, load drivers and the runner."""
