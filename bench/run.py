"""Run the kvstore benchmark suite: ``python -m bench.run [--quick]``.

Starts a private Redis, then for each scenario measures every target in
turn, for several rounds, rotating the order each round so that slow drift
of the machine touches every target alike. Writes ``latest.json``,
``latest.md`` and ``concurrency.png`` to the output directory (by default
``bench/results``); server logs go below its ``tmp`` folder.
"""

import argparse
import datetime
import http.client
import importlib.metadata
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench import report
from bench.loadgen import LoadGeneratorError
from bench.procs import (
    ChildExitedError,
    exit_on_sigterm,
    raise_open_files_limit,
)
from bench.scenarios import (
    ALL_TARGETS,
    Kind,
    Plan,
    Scenario,
    build_scenarios,
    execution_order,
    select_scenarios,
)
from bench.suite import Measurement, Suite, SuiteConfig
from bench.targets import BENCH_DIR, KVSTORE, locate_kvstore, parse_kvstore_env

log = logging.getLogger("bench.run")

DEFAULT_SWEEP = (1, 16, 64, 256, 1024)
MEASUREMENT_ERRORS = (
    LoadGeneratorError,
    ChildExitedError,
    TimeoutError,
    OSError,
    http.client.HTTPException,
    subprocess.SubprocessError,
)
PACKAGES = ("kvstore", "quart", "hypercorn", "flask", "gunicorn", "redis", "uvloop")


def _int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def _word_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _kvstore_variable(text: str) -> tuple[str, str]:
    try:
        return parse_kvstore_env(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _target_list(text: str) -> list[str]:
    targets = _word_list(text)
    unknown = sorted(set(targets) - set(ALL_TARGETS))
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown targets {unknown}; choose from {', '.join(ALL_TARGETS)}"
        )
    return targets


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser; unset options take --quick's or the
    full run's defaults."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="short runs, one round: a smoke test of a few minutes",
    )
    parser.add_argument(
        "--scenarios",
        type=_word_list,
        default=[],
        help="comma-separated names or groups (sweep, wildcard, delay); default all",
    )
    parser.add_argument(
        "--targets",
        type=_target_list,
        default=list(ALL_TARGETS),
        help=f"comma-separated subset of {', '.join(ALL_TARGETS)}",
    )
    parser.add_argument("--duration", type=int, help="seconds per load run (10)")
    parser.add_argument("--warmup", type=int, help="seconds of warm-up per run (1)")
    parser.add_argument("--rounds", type=int, help="rounds per scenario (2)")
    parser.add_argument(
        "--connections",
        type=int,
        default=64,
        help="connections of the scenarios outside the sweep (64)",
    )
    parser.add_argument(
        "--delay-connections",
        type=int,
        default=256,
        help="connections of the scenarios with a delay to Redis (256)",
    )
    parser.add_argument(
        "--sweep",
        type=_int_list,
        default=list(DEFAULT_SWEEP),
        help="connection counts of the concurrency sweep",
    )
    parser.add_argument(
        "--timeout", type=float, default=2.0, help="wrk's per-request timeout (s)"
    )
    parser.add_argument(
        "--keys",
        type=int,
        default=10_000,
        help="keys for single-key scenarios and the small bulk read (10000)",
    )
    parser.add_argument("--large-keys", type=int, help="large bulk read (1000000)")
    parser.add_argument(
        "--delete-keys", type=int, default=100_000, help="keys of the bulk delete"
    )
    parser.add_argument(
        "--delay-ms", type=float, default=0.5, help="proxy delay each way"
    )
    parser.add_argument(
        "--no-calibrate-delay",
        dest="calibrate_delay",
        action="store_false",
        help="use --delay-ms as is, without trimming it for the proxy's overhead",
    )
    parser.add_argument(
        "--workers", type=int, default=2, help="worker processes per HTTP target"
    )
    parser.add_argument(
        "--kvstore-env",
        type=_kvstore_variable,
        action="append",
        default=[],
        metavar="KVSTORE_NAME=VALUE",
        help="extra setting for kvstore, e.g. KVSTORE_SERVER=uvicorn; repeatable",
    )
    parser.add_argument(
        "--redis-requests",
        type=int,
        help="requests per redis-benchmark run (200000)",
    )
    parser.add_argument(
        "--max-requests",
        type=int,
        default=5_000_000,
        help="request cap of one wrk run, on top of its duration",
    )
    parser.add_argument(
        "--bulk-read-repeats",
        type=int,
        help="timed bulk reads per target and round, small data set (5)",
    )
    parser.add_argument(
        "--key-prefix", default="kvstore:", help="Redis key prefix of every target"
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=BENCH_DIR / "results",
        help="where latest.json, latest.md and concurrency.png go",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def apply_defaults(args: argparse.Namespace) -> None:
    """Fill options left unset with the quick or the full run's values."""
    quick = args.quick
    defaults = {
        "duration": 3 if quick else 10,
        "warmup": 1,
        "rounds": 1 if quick else 2,
        "large_keys": 1_000_000,
        "redis_requests": 50_000 if quick else 200_000,
        "bulk_read_repeats": 2 if quick else 5,
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def choose_targets(wanted: Sequence[str], kvstore_path: str | None) -> list[str]:
    """Return the wanted targets that can run here, saying why others cannot."""
    targets = list(wanted)
    if KVSTORE in targets and kvstore_path is None:
        log.warning(
            "kvstore is not installed in this environment (pip install -e .); "
            "measuring the reference targets only"
        )
        targets.remove(KVSTORE)
    return targets


def estimate_seconds(
    scenarios: Sequence[Scenario], targets: Sequence[str], args: argparse.Namespace
) -> float:
    """Roughly how long the run will take, for the opening log line."""
    total = 0.0
    for scenario in scenarios:
        present = [t for t in scenario.targets if t in targets]
        if scenario.kind is Kind.LOAD:
            per_run = args.duration + args.warmup + 1.5
        else:
            per_run = 2.0 + scenario.keys / 200_000 * scenario.repeats
        total += per_run * len(present) * args.rounds
    return total


def _program_version(argv: Sequence[str]) -> str:
    try:
        completed = subprocess.run(  # noqa: S603
            argv, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (completed.stdout or completed.stderr).strip().splitlines()[0]


def describe_machine() -> str:
    """CPU model and count, and the kernel, in one line."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        log.debug("no /proc/cpuinfo; using the platform's processor name")
    return f"{model}, {os.cpu_count()} CPUs, Linux {platform.release()}"


def package_versions() -> dict[str, str]:
    """Versions of the Python packages that shape the results."""
    versions: dict[str, str] = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def rotate(items: Sequence[str], steps: int) -> list[str]:
    """Return `items` rotated left by `steps`, so each round starts elsewhere."""
    if not items:
        return []
    shift = steps % len(items)
    return [*items[shift:], *items[:shift]]


def write_results(
    output_dir: Path,
    meta: dict[str, Any],
    scenarios: Sequence[Scenario],
    measurements: Sequence[Measurement],
) -> None:
    """Write latest.json, latest.md and (given a sweep) concurrency.png."""
    summaries = report.summarize(scenarios, measurements)
    report.write_json(output_dir / "latest.json", meta, summaries, measurements)
    (output_dir / "latest.md").write_text(report.render_markdown(meta, summaries))
    report.plot_concurrency(output_dir / "concurrency.png", summaries)


def build_meta(
    args: argparse.Namespace, stamp: datetime.datetime, kvstore_path: str | None
) -> dict[str, Any]:
    """What the report says about the run: when, where, with what."""
    return {
        "started": stamp.isoformat(timespec="seconds"),
        "machine": describe_machine(),
        "python": sys.version.split()[0],
        "programs": {
            "redis-server": _program_version(["redis-server", "--version"]),
            "wrk": _program_version(["wrk", "-v"]),
        },
        "packages": package_versions(),
        "kvstore_path": kvstore_path,
        "config": {
            key: str(value) if isinstance(value, Path) else value
            for key, value in vars(args).items()
        },
    }


def run_scenarios(
    suite: Suite,
    scenarios: Sequence[Scenario],
    targets: Sequence[str],
    rounds: int,
    checkpoint: Callable[[list[Measurement]], None],
) -> tuple[list[Measurement], int]:
    """Measure every scenario on every target; return figures and failure count.

    `checkpoint` gets the figures so far after each scenario, so an
    interrupted run still leaves a report.
    """
    measurements: list[Measurement] = []
    failures = 0
    for scenario in execution_order(scenarios):
        present = [t for t in scenario.targets if t in targets]
        suite.prepare(scenario)
        for round_index in range(rounds):
            for target in rotate(present, round_index):
                log.info("%s, round %d: %s", scenario.name, round_index + 1, target)
                try:
                    measurement = suite.measure(scenario, target, round_index)
                except MEASUREMENT_ERRORS:
                    failures += 1
                    log.exception("%s on %s failed", scenario.name, target)
                    continue
                _log_measurement(measurement)
                measurements.append(measurement)
        checkpoint(measurements)
    return measurements, failures


def main(argv: Sequence[str] | None = None) -> int:
    """Run the suite; return 0, or 1 if any measurement could not be made."""
    parser = build_parser()
    args = parser.parse_args(argv)
    apply_defaults(args)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    for program in ("wrk", "redis-benchmark", "redis-server"):
        if shutil.which(program) is None:
            log.error("%s is not installed; see bench/README.md", program)
            return 1

    started = time.monotonic()
    stamp = datetime.datetime.now(tz=datetime.UTC)
    output_dir: Path = args.output_dir
    log_dir = output_dir / "tmp" / stamp.strftime("%Y%m%dT%H%M%SZ")
    kvstore_path = locate_kvstore(log_dir)
    targets = choose_targets(args.targets, kvstore_path)
    plan = Plan(
        connections=args.connections,
        delay_connections=args.delay_connections,
        sweep=args.sweep,
        keys=args.keys,
        large_keys=args.large_keys,
        delete_keys=args.delete_keys,
        key_prefix=args.key_prefix,
        bulk_read_repeats=args.bulk_read_repeats,
    )
    try:
        chosen = select_scenarios(build_scenarios(plan), args.scenarios)
    except ValueError as exc:
        parser.error(str(exc))
    scenarios = [s for s in chosen if any(t in targets for t in s.targets)]
    most_connections = max([s.connections for s in scenarios] or [0])
    exit_on_sigterm()
    # Each client connection costs the server a descriptor, and the servers
    # inherit this limit; Redis pools and logs need some more.
    limit = raise_open_files_limit(4 * most_connections + 4096)
    log.info(
        "%d scenarios on %s; about %.0f min; open files limit %d",
        len(scenarios),
        ", ".join(targets),
        estimate_seconds(scenarios, targets, args) / 60,
        limit,
    )

    config = SuiteConfig(
        duration=args.duration,
        warmup=args.warmup,
        timeout=args.timeout,
        max_requests=args.max_requests,
        redis_requests=args.redis_requests,
        workers=args.workers,
        backlog=max(2048, 2 * most_connections),
        key_prefix=args.key_prefix,
        delay_ms=args.delay_ms,
        calibrate_delay=args.calibrate_delay,
        log_dir=log_dir,
        kvstore_env=tuple(args.kvstore_env),
    )
    meta = build_meta(args, stamp, kvstore_path)
    meta["open_files_limit"] = limit
    meta["log_dir"] = str(log_dir)

    def checkpoint(measurements: list[Measurement]) -> None:
        meta["duration_s"] = time.monotonic() - started
        meta["proxy_delay_ms"] = suite.proxy_delay_ms
        write_results(output_dir, meta, scenarios, measurements)

    with Suite(config) as suite:
        meta["round_trips_ms"] = suite.round_trips_ms
        measurements, failures = run_scenarios(
            suite, scenarios, targets, args.rounds, checkpoint
        )
    checkpoint(measurements)
    log.info("done in %.1f min: %s", meta["duration_s"] / 60, output_dir / "latest.md")
    return 1 if failures else 0


def _log_measurement(measurement: Measurement) -> None:
    if measurement.rps is not None:
        log.info(
            "  %.0f req/s, p50 %.2f ms, p99 %.2f ms, %s CPU us/req, failures %d/%d/%d",
            measurement.rps,
            measurement.p50_ms or 0.0,
            measurement.p99_ms or 0.0,
            measurement.cpu_us_per_request,
            measurement.status_errors,
            measurement.socket_errors,
            measurement.timeouts,
        )
    else:
        log.info(
            "  %.1f ms wall, peak RSS %s MB, %s items%s",
            measurement.wall_ms or 0.0,
            measurement.peak_rss_mb,
            measurement.items,
            f" ({measurement.note})" if measurement.note else "",
        )


if __name__ == "__main__":
    sys.exit(main())
