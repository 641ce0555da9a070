"""Turning measurements into ``latest.json``, ``latest.md`` and a plot.

Absolute figures move by up to 1.7x between runs on the same machine, so the
report leans on ratios: each target's figure divided by the reference's figure
from the same round (measured minutes apart, under the same machine state),
then the median over rounds. Medians of the absolute figures are shown too.
"""

import json
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.scenarios import FLOOR, REDIS_BENCHMARK, Kind, Scenario
from bench.suite import Measurement
from bench.targets import FLASK, KVSTORE, QUART_BARE

MEDIAN_FIELDS = (
    "rps",
    "p50_ms",
    "p99_ms",
    "p999_ms",
    "cpu_us_per_request",
    "backend_cpu_us_per_request",
    "wall_ms",
    "peak_rss_mb",
    "base_rss_mb",
    "other_cores",
)
RATIO_FIELDS = (
    "rps",
    "p50_ms",
    "p99_ms",
    "p999_ms",
    "cpu_us_per_request",
    "wall_ms",
    "peak_rss_mb",
)
HEADLINE_OTHERS = (QUART_BARE, FLASK, REDIS_BENCHMARK, FLOOR)
# Above this many cores of outside load, a figure is flagged as disturbed.
NOISY_CORES = 0.25


def _median(values: Iterable[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


def _value(measurement: Measurement, name: str) -> float | None:
    value = getattr(measurement, name)
    return None if value is None else float(value)


def round_ratios(
    measurements: Sequence[Measurement], target: str, reference: str, name: str
) -> float | None:
    """Median over rounds of `target`'s `name` divided by `reference`'s.

    Only rounds where both were measured count, so drift between rounds
    cancels out.
    """
    by_round = {m.round_index: m for m in measurements if m.target == reference}
    ratios: list[float] = []
    for measurement in measurements:
        if measurement.target != target:
            continue
        other = by_round.get(measurement.round_index)
        if other is None:
            continue
        mine, theirs = _value(measurement, name), _value(other, name)
        if mine is not None and theirs:
            ratios.append(mine / theirs)
    return _median(ratios)


def _primary_field(scenario: Scenario) -> str:
    return "rps" if scenario.kind is Kind.LOAD else "wall_ms"


def choose_reference(
    scenario: Scenario, measurements: Sequence[Measurement]
) -> str | None:
    """Return the first of the scenario's references that has figures."""
    field = _primary_field(scenario)
    for reference in scenario.references:
        if any(
            m.target == reference and _value(m, field) is not None for m in measurements
        ):
            return reference
    return None


def summarize_target(
    measurements: Sequence[Measurement], target: str, reference: str | None
) -> dict[str, Any]:
    """Median figures, summed failures and ratios of one target in one scenario."""
    mine = [m for m in measurements if m.target == target]
    summary: dict[str, Any] = {
        name: _median(_value(m, name) for m in mine) for name in MEDIAN_FIELDS
    }
    summary["rounds"] = len(mine)
    summary["requests"] = sum(m.requests for m in mine)
    summary["status_errors"] = sum(m.status_errors for m in mine)
    summary["socket_errors"] = sum(m.socket_errors for m in mine)
    summary["timeouts"] = sum(m.timeouts for m in mine)
    summary["capped"] = any(m.capped for m in mine)
    summary["rss_mb"] = mine[-1].rss_mb if mine else []
    summary["items"] = mine[-1].items if mine else None
    summary["notes"] = sorted({m.note for m in mine if m.note})
    rates = [m.rps for m in mine if m.rps]
    summary["rps_spread"] = (
        (max(rates) - min(rates)) / statistics.median(rates) if len(rates) > 1 else None
    )
    summary["ratios"] = (
        {}
        if reference is None
        else {
            name: round_ratios(measurements, target, reference, name)
            for name in RATIO_FIELDS
        }
    )
    return summary


def summarize(
    scenarios: Sequence[Scenario], measurements: Sequence[Measurement]
) -> list[dict[str, Any]]:
    """Build the per-scenario summaries that the JSON and Markdown report show."""
    summaries: list[dict[str, Any]] = []
    for scenario in scenarios:
        mine = [m for m in measurements if m.scenario == scenario.name]
        if not mine:
            continue
        reference = choose_reference(scenario, mine)
        measured = [t for t in scenario.targets if any(m.target == t for m in mine)]
        field = _primary_field(scenario)
        summaries.append(
            {
                "name": scenario.name,
                "title": scenario.title,
                "kind": str(scenario.kind),
                "group": scenario.group,
                "keys": scenario.keys,
                "connections": scenario.connections,
                "delayed": scenario.delayed,
                "reference": reference,
                "targets": {
                    target: summarize_target(mine, target, reference)
                    for target in measured
                },
                "kvstore_vs": {
                    other: round_ratios(mine, KVSTORE, other, field)
                    for other in HEADLINE_OTHERS
                    if other in measured and KVSTORE in measured
                },
            }
        )
    return summaries


def write_json(
    path: Path,
    meta: Mapping[str, Any],
    summaries: Sequence[Mapping[str, Any]],
    measurements: Sequence[Measurement],
) -> None:
    """Write the summaries and every raw measurement as one JSON document."""
    document = {
        "meta": meta,
        "scenarios": summaries,
        "measurements": [asdict(m) for m in measurements],
    }
    path.write_text(json.dumps(document, indent=2) + "\n")


def _number(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines.extend("| " + " | ".join(row) + " |" for row in rows)
    return lines


def _failures(summary: Mapping[str, Any]) -> str:
    return (
        f"{summary['status_errors']}/{summary['socket_errors']}/{summary['timeouts']}"
    )


def _load_rows(targets: Mapping[str, Mapping[str, Any]]) -> list[list[str]]:
    rows: list[list[str]] = []
    for target, s in targets.items():
        ratios = s["ratios"]
        rows.append(
            [
                target,
                _number(s["rps"]),
                _ratio(ratios.get("rps")),
                _number(s["p50_ms"], 2),
                _number(s["p99_ms"], 2),
                _number(s["p999_ms"], 2),
                _ratio(ratios.get("p99_ms")),
                _number(s["cpu_us_per_request"], 1),
                _ratio(ratios.get("cpu_us_per_request")),
                _number(s["backend_cpu_us_per_request"], 1),
                _failures(s),
                " + ".join(f"{size:.0f}" for size in s["rss_mb"]) or "-",
                _number(s["other_cores"], 2),
            ]
        )
    return rows


LOAD_HEADER = (
    "target",
    "req/s",
    "x ref",
    "p50 ms",
    "p99 ms",
    "p99.9 ms",
    "p99 x ref",
    "CPU µs/req",
    "CPU x ref",
    "Redis CPU µs/req",
    "4xx-5xx/socket/timeout",
    "RSS MB per process",
    "other load",
)
BULK_HEADER = (
    "target",
    "wall ms",
    "x ref",
    "server CPU ms",
    "CPU x ref",
    "Redis CPU ms",
    "peak RSS MB",
    "growth MB",
    "items",
    "failed",
)


def _bulk_rows(targets: Mapping[str, Mapping[str, Any]]) -> list[list[str]]:
    rows: list[list[str]] = []
    for target, s in targets.items():
        ratios = s["ratios"]
        cpu = s["cpu_us_per_request"]
        backend = s["backend_cpu_us_per_request"]
        peak, base = s["peak_rss_mb"], s["base_rss_mb"]
        growth = None if peak is None or base is None else peak - base
        rows.append(
            [
                target,
                _number(s["wall_ms"], 1),
                _ratio(ratios.get("wall_ms")),
                _number(None if cpu is None else cpu / 1000, 1),
                _ratio(ratios.get("cpu_us_per_request")),
                _number(None if backend is None else backend / 1000, 1),
                _number(peak, 1),
                _number(growth, 1),
                _number(s["items"]),
                str(s["status_errors"]),
            ]
        )
    return rows


def _headline(summaries: Sequence[Mapping[str, Any]]) -> list[str]:
    rows = []
    for summary in summaries:
        vs = summary["kvstore_vs"]
        if not vs:
            continue
        kvstore = summary["targets"][KVSTORE]
        reference = summary["reference"]
        cpu_ratio = (
            kvstore["ratios"].get("cpu_us_per_request")
            if reference != KVSTORE
            else None
        )
        rows.append(
            [
                summary["name"],
                "req/s" if summary["kind"] == Kind.LOAD else "wall time",
                *(_ratio(vs.get(other)) for other in HEADLINE_OTHERS),
                f"{_ratio(cpu_ratio)} of {reference}" if cpu_ratio else "-",
            ]
        )
    if not rows:
        return []
    header = ("scenario", "figure", *(f"vs {o}" for o in HEADLINE_OTHERS), "CPU/req")
    return [
        "## kvstore against the references",
        "",
        "kvstore's figure divided by each reference's, median of per-round ratios.",
        "For req/s higher is better; for wall time lower is better.",
        "",
        *_table(header, rows),
        "",
    ]


def render_markdown(
    meta: Mapping[str, Any], summaries: Sequence[Mapping[str, Any]]
) -> str:
    """Render the summaries as a Markdown report."""
    config = meta["config"]
    lines = [
        "# kvstore benchmark",
        "",
        f"Run {meta['started']} on {meta['machine']}, {meta['duration_s']:.0f} s in "
        f"total. {config['rounds']} round(s), {config['duration']} s per load run "
        f"after {config['warmup']} s of warm-up, wrk -t1, {config['workers']} "
        "workers per HTTP target.",
        "",
        "Redis round trip (median PING at rest): "
        + ", ".join(f"{k} {v:.3f} ms" for k, v in meta["round_trips_ms"].items())
        + "."
        + (
            f" The delay proxy held each chunk {meta['proxy_delay_ms']:.3f} ms "
            "each way."
            if meta.get("proxy_delay_ms") is not None
            else ""
        ),
        "",
        "Each figure is the median over rounds; `x ref` is the median of per-round "
        "ratios to the reference named above each table. CPU is user+system time "
        "of the server's process tree from /proc, divided by completed requests. "
        "Failures: HTTP status ≥ 400 / socket errors / timeouts. Other load: CPU "
        "cores busy with processes outside the benchmark during the run (median); "
        f"figures taken while it was above {NOISY_CORES} are flagged.",
        "",
        *_headline(summaries),
    ]
    for summary in summaries:
        lines.append(f"## {summary['name']}: {summary['title']}")
        lines.append("")
        lines.append(f"Reference: {summary['reference'] or 'none measured'}.")
        lines.append("")
        targets = summary["targets"]
        if summary["kind"] == Kind.LOAD:
            lines.extend(_table(LOAD_HEADER, _load_rows(targets)))
        else:
            lines.extend(_table(BULK_HEADER, _bulk_rows(targets)))
        notes = [f"- {t}: {n}" for t, s in targets.items() for n in s["notes"]]
        noisy = [
            t for t, s in targets.items() if (s["other_cores"] or 0.0) > NOISY_CORES
        ]
        if noisy:
            notes.append(
                f"- other processes used over {NOISY_CORES} cores while measuring "
                f"{', '.join(noisy)}: these figures are disturbed"
            )
        capped = [t for t, s in targets.items() if s["capped"]]
        if capped:
            notes.append(f"- stopped at the request cap: {', '.join(capped)}")
        if notes:
            lines.extend(["", *notes])
        lines.append("")
    return "\n".join(lines)


def plot_concurrency(
    path: Path,
    summaries: Sequence[Mapping[str, Any]],
    select: Callable[[Mapping[str, Any]], bool] | None = None,
) -> bool:
    """Plot req/s against connections per target; False if nothing to plot."""
    chosen = [s for s in summaries if (select or (lambda s: s["group"] == "sweep"))(s)]
    if len(chosen) < 2:
        return False

    # matplotlib takes a second to import; only the plot needs it.
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, (absolute, relative) = pyplot.subplots(
        1, 2, figsize=(12, 4.8), constrained_layout=True
    )
    targets = list(dict.fromkeys(t for s in chosen for t in s["targets"]))
    reference = chosen[0]["reference"]
    for target in targets:
        points = [
            (s["connections"], s["targets"][target]["rps"])
            for s in chosen
            if target in s["targets"] and s["targets"][target]["rps"]
        ]
        ratios = [
            (s["connections"], s["targets"][target]["ratios"].get("rps"))
            for s in chosen
            if target in s["targets"]
        ]
        if points:
            absolute.plot(*zip(*points, strict=True), marker="o", label=target)
        shown = [(c, r) for c, r in ratios if r is not None]
        # redis-benchmark runs tens of times faster; on the same linear axis
        # it would flatten the HTTP targets' lines.
        if shown and target != REDIS_BENCHMARK:
            relative.plot(*zip(*shown, strict=True), marker="o", label=target)
    absolute.set(
        xscale="log",
        yscale="log",
        xlabel="connections",
        ylabel="requests per second (median)",
        title="GET /keys/{id}: throughput",
    )
    relative.set(
        xscale="log",
        xlabel="connections",
        ylabel=f"req/s / {reference} (same round)",
        title="GET /keys/{id}: ratio to the reference",
    )
    for axes in (absolute, relative):
        axes.grid(visible=True, which="both", alpha=0.3)
        axes.legend()
    figure.savefig(path, dpi=110)
    pyplot.close(figure)
    return True
