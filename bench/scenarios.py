"""What the suite measures: each scenario, its targets and its reference.

A scenario is one workload run against several targets. Targets are the HTTP
servers of `bench.targets` plus two that are not HTTP: ``redis-benchmark``
(the same Redis driven by its own tool, the backend's limit) and ``floor``
(the bulk operation done in-process with redis-py, the least work it needs).
Every figure is reported as a ratio to the scenario's reference, the first of
its `references` that was measured in the same run.
"""

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

from bench.dataset import KEY_ID_PREFIX, value_json
from bench.targets import FLASK, HTTP_TARGETS, KVSTORE, QUART_BARE

REDIS_BENCHMARK = "redis-benchmark"
FLOOR = "floor"
ALL_TARGETS = (*HTTP_TARGETS, REDIS_BENCHMARK, FLOOR)
BULK_PAIRS = 100


class Kind(enum.StrEnum):
    """How a scenario is driven."""

    LOAD = "load"  # wrk (or redis-benchmark) for a fixed time
    BULK_READ = "bulk_read"  # one timed GET /keys?filter= at a time
    BULK_DELETE = "bulk_delete"  # one timed DELETE /keys over a fresh data set


@dataclass(frozen=True)
class Scenario:
    """One workload and the targets it runs against."""

    name: str
    title: str
    kind: Kind
    keys: int
    targets: tuple[str, ...]
    references: tuple[str, ...]
    connections: int = 0
    delayed: bool = False
    driver: str = "wrk"  # or "httpload", for HEAD
    script: str = ""
    script_options: dict[str, str | int] = field(default_factory=dict)
    redis_command: tuple[str, ...] = ()
    id_prefix: str = KEY_ID_PREFIX
    repeats: int = 1
    group: str = ""


@dataclass(frozen=True)
class Plan:
    """The knobs that shape the scenario list."""

    connections: int
    delay_connections: int
    sweep: Sequence[int]
    keys: int
    large_keys: int
    delete_keys: int
    key_prefix: str
    bulk_read_repeats: int


def short_count(count: int) -> str:
    """Write a key count the way scenario names use it: 10k, 1m, 2500."""
    for unit, size in (("m", 1_000_000), ("k", 1_000)):
        if count >= size and count % size == 0:
            return f"{count // size}{unit}"
    return str(count)


def _redis_key(plan: Plan) -> str:
    return f"{plan.key_prefix}{KEY_ID_PREFIX}__rand_int__"


def build_scenarios(plan: Plan) -> list[Scenario]:
    """Return every scenario, in the order they are listed in reports."""
    http = (KVSTORE, QUART_BARE, FLASK)
    with_redis = (*http, REDIS_BENCHMARK)
    single_refs = (QUART_BARE, REDIS_BENCHMARK, KVSTORE)
    key = _redis_key(plan)
    small = {"keys": plan.keys}
    scenarios = [
        Scenario(
            "get",
            f"GET /keys/{{id}}, c{plan.connections}",
            Kind.LOAD,
            plan.keys,
            with_redis,
            single_refs,
            connections=plan.connections,
            script="single.lua",
            script_options={"method": "GET", **small},
            redis_command=("GET", key),
        ),
        Scenario(
            "head",
            f"HEAD /keys/{{id}}, c{plan.connections}",
            Kind.LOAD,
            plan.keys,
            with_redis,
            single_refs,
            connections=plan.connections,
            # wrk would wait for a body after HEAD responses that carry the
            # Content-Length of the GET, as kvstore's do.
            driver="httpload",
            script_options={"method": "HEAD", **small},
            redis_command=("EXISTS", key),
        ),
        Scenario(
            "put",
            f"PUT /keys/{{id}}, c{plan.connections}",
            Kind.LOAD,
            plan.keys,
            with_redis,
            single_refs,
            connections=plan.connections,
            script="single.lua",
            script_options={"method": "PUT", **small},
            redis_command=("SET", key, value_json(1)),
        ),
        Scenario(
            "bulk_put",
            f"PUT /keys with {BULK_PAIRS} pairs, c{plan.connections}",
            Kind.LOAD,
            plan.keys,
            (KVSTORE, REDIS_BENCHMARK),
            (REDIS_BENCHMARK, KVSTORE),
            connections=plan.connections,
            script="bulk_put.lua",
            script_options={"pairs": BULK_PAIRS, **small},
            redis_command=(
                "MSET",
                *[part for _ in range(BULK_PAIRS) for part in (key, value_json(1))],
            ),
        ),
        Scenario(
            "mixed",
            f"mixed 80% GET / 20% PUT, c{plan.connections}",
            Kind.LOAD,
            plan.keys,
            http,
            (QUART_BARE, KVSTORE),
            connections=plan.connections,
            script="mixed.lua",
            script_options=dict(small),
        ),
    ]
    scenarios.extend(
        Scenario(
            f"sweep_c{connections}",
            f"GET /keys/{{id}}, c{connections}",
            Kind.LOAD,
            plan.keys,
            with_redis,
            single_refs,
            connections=connections,
            script="single.lua",
            script_options={"method": "GET", **small},
            redis_command=("GET", key),
            group="sweep",
        )
        for connections in plan.sweep
    )
    for keys in (plan.keys, plan.large_keys):
        scenarios.append(
            Scenario(
                f"wildcard_{short_count(keys)}",
                f"GET /keys?filter={KEY_ID_PREFIX}$ over {keys:,} keys",
                Kind.BULK_READ,
                keys,
                (KVSTORE, FLASK, FLOOR),
                (FLOOR, FLASK, KVSTORE),
                repeats=plan.bulk_read_repeats if keys < 100_000 else 1,
                group="wildcard",
            )
        )
    scenarios.append(
        Scenario(
            f"delete_{short_count(plan.delete_keys)}",
            f"DELETE /keys over {plan.delete_keys:,} keys",
            Kind.BULK_DELETE,
            plan.delete_keys,
            (KVSTORE, FLOOR),
            (FLOOR, KVSTORE),
        )
    )
    scenarios.extend(
        Scenario(
            f"delay_{method.lower()}",
            f"{method} /keys/{{id}} with 1 ms to Redis, c{plan.delay_connections}",
            Kind.LOAD,
            plan.keys,
            # Not redis-benchmark: its own connections on top of a server's
            # pools would pass what the delay proxy can hold.
            http,
            (QUART_BARE, KVSTORE),
            connections=plan.delay_connections,
            delayed=True,
            script="single.lua",
            script_options={"method": method, **small},
            group="delay",
        )
        for method in ("GET", "PUT")
    )
    return scenarios


def select_scenarios(
    scenarios: Sequence[Scenario], wanted: Sequence[str]
) -> list[Scenario]:
    """Pick scenarios by name or group (``sweep``, ``delay``); all if empty.

    Raises ValueError naming any word that matches nothing.
    """
    if not wanted:
        return list(scenarios)

    unknown = [
        word
        for word in wanted
        if not any(word in (scenario.name, scenario.group) for scenario in scenarios)
    ]
    if unknown:
        names = sorted(
            {s.name for s in scenarios} | {s.group for s in scenarios} - {""}
        )
        raise ValueError(f"unknown scenarios {unknown}; choose from {names}")
    return [s for s in scenarios if s.name in wanted or s.group in wanted]


def execution_order(scenarios: Sequence[Scenario]) -> list[Scenario]:
    """Order scenarios so data sets and delayed servers are set up once each.

    Direct scenarios run before delayed ones (which need their own servers),
    and within each, smaller data sets come first.
    """
    return sorted(scenarios, key=lambda s: (s.delayed, s.keys))
