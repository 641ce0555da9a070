"""Load generators: wrk for HTTP targets, redis-benchmark for Redis itself.

Both return a `LoadResult`. wrk is always run with one thread (``-t1``), a
duration and a request cap; its figures come from the ``done()`` hook in
``bench/wrk/common.lua``, which prints one ``BENCH_RESULT {...}`` line.
redis-benchmark is bounded by its request count and reports in CSV.
"""

import json
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bench.procs import LOOPBACK

WRK_DIR = Path(__file__).resolve().parent / "wrk"
REPO_DIR = WRK_DIR.parent.parent
RESULT_MARKER = "BENCH_RESULT "
# test, rps, avg, min, p50, p95, p99, max
CSV_COLUMNS = 8


class LoadGeneratorError(RuntimeError):
    """A load generator failed or printed something this module cannot read."""


@dataclass(frozen=True)
class Errors:
    """Failed requests by kind; `status` counts HTTP responses of 400 and above."""

    status: int = 0
    connect: int = 0
    read: int = 0
    write: int = 0
    timeout: int = 0

    @property
    def socket(self) -> int:
        """Connect, read and write errors together."""
        return self.connect + self.read + self.write

    @property
    def total(self) -> int:
        """Every failed request, whatever the kind."""
        return self.status + self.socket + self.timeout


@dataclass(frozen=True)
class Latency:
    """Latency figures in milliseconds; None where the tool does not give one."""

    p50: float | None = None
    p99: float | None = None
    p999: float | None = None
    mean: float | None = None
    max: float | None = None


@dataclass(frozen=True)
class LoadResult:
    """What one load run did: how many requests, how fast, how many failed."""

    tool: str
    requests: int
    duration_s: float
    latency: Latency
    errors: Errors = field(default_factory=Errors)
    capped: bool = False

    @property
    def rps(self) -> float:
        """Completed requests per second over the run."""
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0


def require_program(name: str) -> str:
    """Return the absolute path of `name` on PATH or raise LoadGeneratorError."""
    path = shutil.which(name)
    if path is None:
        raise LoadGeneratorError(f"{name} is not installed (apt-get install {name})")
    return path


def parse_wrk_output(stdout: str) -> LoadResult:
    """Read the ``BENCH_RESULT`` line that the wrk scripts' done() prints."""
    for line in stdout.splitlines():
        if line.startswith(RESULT_MARKER):
            data: dict[str, Any] = json.loads(line.removeprefix(RESULT_MARKER))
            break
    else:
        raise LoadGeneratorError(f"wrk printed no result line:\n{stdout[-2000:]}")

    micros = data["latency_us"]
    completed = int(data["requests"])
    latency = Latency(
        p50=micros["p50"] / 1000,
        p99=micros["p99"] / 1000,
        p999=micros["p999"] / 1000,
        mean=micros["mean"] / 1000,
        max=micros["max"] / 1000,
    )
    if completed == 0 or micros["max"] == 0:
        # No latency was recorded: nothing completed, or every request took
        # longer than the timeout (wrk keeps those out of its histogram).
        latency = Latency()
    return LoadResult(
        tool="wrk",
        requests=completed,
        duration_s=data["duration_us"] / 1e6,
        latency=latency,
        errors=Errors(**{name: int(count) for name, count in data["errors"].items()}),
        capped=bool(data["capped"]),
    )


def run_wrk(
    url: str,
    script: str,
    *,
    connections: int,
    duration: int,
    timeout: float,
    max_requests: int,
    options: Mapping[str, str | int] | None = None,
) -> LoadResult:
    """Run wrk with one thread against `url` using ``bench/wrk/<script>``.

    `duration` is whole seconds (wrk's granularity), `timeout` is the latency
    past which wrk counts a request as timed out, and `max_requests` stops
    the run early if the target is faster than expected.
    """
    script_args = [f"{name}={value}" for name, value in (options or {}).items()]
    argv = [
        require_program("wrk"),
        "-t1",
        f"-c{connections}",
        f"-d{duration}s",
        f"--timeout={max(1, round(timeout))}s",
        "-s",
        script,
        url,
        "--",
        *script_args,
        f"max_requests={max_requests}",
    ]
    # The scripts load common.lua with require(), which searches the
    # working directory.
    completed = subprocess.run(  # noqa: S603
        argv,
        cwd=WRK_DIR,
        capture_output=True,
        text=True,
        timeout=duration + timeout + 60,
        check=False,
    )
    if completed.returncode != 0:
        raise LoadGeneratorError(
            f"wrk exited with {completed.returncode}: {completed.stderr[-2000:]}"
        )
    if completed.stderr.strip():
        # Lua errors in a script are reported on stderr without failing wrk.
        raise LoadGeneratorError(f"wrk reported: {completed.stderr[-2000:]}")
    return parse_wrk_output(completed.stdout)


def run_httpload(
    url: str,
    method: str,
    *,
    keys: int,
    connections: int,
    duration: int,
    timeout: float,
    max_requests: int,
    token: str | None = None,
) -> LoadResult:
    """Run `bench.httpload` (for HEAD, which wrk cannot drive) in a child.

    The arguments mean what they mean for `run_wrk`; the result line has the
    same form, and the tool is recorded as ``httpload``.
    """
    argv = [
        sys.executable,
        "-m",
        "bench.httpload",
        "--url",
        url,
        "--method",
        method,
        "--keys",
        str(keys),
        "--connections",
        str(connections),
        "--duration",
        str(duration),
        "--timeout",
        str(timeout),
        "--max-requests",
        str(max_requests),
        # "=" keeps a token that starts with "-" from reading as an option.
        *([f"--token={token}"] if token else []),
    ]
    completed = subprocess.run(  # noqa: S603
        argv,
        cwd=REPO_DIR,
        capture_output=True,
        text=True,
        timeout=duration + timeout + 60,
        check=False,
    )
    if completed.returncode != 0 or completed.stderr.strip():
        raise LoadGeneratorError(
            f"httpload exited with {completed.returncode}: {completed.stderr[-2000:]}"
        )
    return replace(parse_wrk_output(completed.stdout), tool="httpload")


def parse_redis_benchmark_csv(text: str, requests: int) -> LoadResult:
    """Read redis-benchmark's ``--csv`` output for a single test of `requests`.

    The first column repeats the command unescaped, so a JSON argument can
    put commas and quotes in it; the seven numeric columns are read from the
    right. The duration is derived from the reported rate, which (unlike a
    wall clock around the process) leaves out connection setup.
    """
    lines = [line for line in text.splitlines() if line.strip()]
    header = lines[0].split(",") if lines else []
    if len(lines) != 2 or len(header) != CSV_COLUMNS:
        raise LoadGeneratorError(f"expected one CSV row from redis-benchmark:\n{text}")

    names = [name.strip('"') for name in header[1:]]
    fields = [value.strip('"') for value in lines[1].rsplit(",", CSV_COLUMNS - 1)[1:]]
    try:
        row = dict(zip(names, map(float, fields), strict=True))
    except ValueError as exc:
        raise LoadGeneratorError(f"unreadable redis-benchmark row: {lines[1]}") from exc
    if row["rps"] <= 0:
        raise LoadGeneratorError(f"redis-benchmark reported no throughput:\n{text}")
    return LoadResult(
        tool="redis-benchmark",
        requests=requests,
        duration_s=requests / row["rps"],
        latency=Latency(
            p50=row["p50_latency_ms"],
            p99=row["p99_latency_ms"],
            mean=row["avg_latency_ms"],
            max=row["max_latency_ms"],
        ),
    )


def run_redis_benchmark(
    port: int,
    command: Sequence[str],
    *,
    connections: int,
    requests: int,
    keyspace: int,
) -> LoadResult:
    """Run one redis-benchmark test of `command` against 127.0.0.1:`port`.

    ``__rand_int__`` in the command becomes a 12-digit number below
    `keyspace`, which is the form of the preloaded key ids.
    """
    argv = [
        require_program("redis-benchmark"),
        "-h",
        LOOPBACK,
        "-p",
        str(port),
        "-c",
        str(connections),
        "-n",
        str(requests),
        "-r",
        str(keyspace),
        "--csv",
        *command,
    ]
    completed = subprocess.run(  # noqa: S603
        argv, capture_output=True, text=True, timeout=600, check=False
    )
    if completed.returncode != 0:
        raise LoadGeneratorError(
            f"redis-benchmark exited with {completed.returncode}: "
            f"{completed.stderr[-2000:]}"
        )
    return parse_redis_benchmark_csv(completed.stdout, requests)
