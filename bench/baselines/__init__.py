"""Benchmark baselines: small reference apps, not part of the product."""
