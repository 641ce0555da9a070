"""Ratios to the reference are taken within rounds."""

import pytest

from bench.report import round_ratios
from bench.suite import Measurement


def test_ratio_cancels_drift_between_rounds() -> None:
    measurements = [
        Measurement("get", "kvstore", 0, rps=800.0),
        Measurement("get", "quart-bare", 0, rps=1000.0),
        Measurement("get", "kvstore", 1, rps=1600.0),
        Measurement("get", "quart-bare", 1, rps=2000.0),
    ]

    ratio = round_ratios(measurements, "kvstore", "quart-bare", "rps")

    assert ratio == pytest.approx(0.8)


def test_rounds_missing_the_reference_are_skipped() -> None:
    measurements = [
        Measurement("get", "kvstore", 0, rps=800.0),
        Measurement("get", "kvstore", 1, rps=900.0),
        Measurement("get", "quart-bare", 1, rps=1000.0),
    ]

    assert round_ratios(measurements, "kvstore", "quart-bare", "rps") == 0.9
