"""Scenario selection and ordering."""

import pytest

from bench.scenarios import (
    Plan,
    build_scenarios,
    execution_order,
    select_scenarios,
    short_count,
)

PLAN = Plan(
    connections=64,
    delay_connections=256,
    sweep=(1, 1024),
    keys=10_000,
    large_keys=1_000_000,
    delete_keys=100_000,
    key_prefix="kvstore:",
    bulk_read_repeats=3,
)


def test_counts_are_shortened_in_names() -> None:
    assert [short_count(n) for n in (10_000, 1_000_000, 2_500)] == ["10k", "1m", "2500"]


def test_groups_select_all_their_members() -> None:
    chosen = select_scenarios(build_scenarios(PLAN), ["sweep", "get"])

    assert [s.name for s in chosen] == ["get", "sweep_c1", "sweep_c1024"]


def test_unknown_scenario_names_are_refused() -> None:
    with pytest.raises(ValueError, match="nope"):
        select_scenarios(build_scenarios(PLAN), ["nope"])


def test_delayed_scenarios_run_last_and_small_data_first() -> None:
    ordered = execution_order(build_scenarios(PLAN))

    delayed = [s.delayed for s in ordered]
    assert delayed == sorted(delayed)
    direct_keys = [s.keys for s in ordered if not s.delayed]
    assert direct_keys == sorted(direct_keys)


def test_head_is_driven_by_httpload() -> None:
    head = select_scenarios(build_scenarios(PLAN), ["head"])[0]

    assert head.driver == "httpload"
