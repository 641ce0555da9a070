"""What a Redis Cluster costs kvstore: one Redis against three primaries.

Starts, on this machine and on loopback only, one standalone Redis and a
Redis Cluster of three primaries (no replicas), each behind its own
``kvstore serve`` process with the same settings, then drives each with
``wrk`` for a bounded time per scenario:

- ``GET /keys/{id}`` of random keys among the seeded ones,
- ``PUT /keys/{id}`` of random keys,
- ``GET /keys?filter=bench-1$0``, a wildcard read matching about 1 % of
  the keys (every such read scans the whole key space, on every primary).

Prints a Markdown table (and writes it to ``--output``)::

    python bench/cluster.py                 # 10 s per run, about 4 minutes
    python bench/cluster.py --duration 3 --rounds 1   # a quick look

Everything it starts is stopped at the end; nothing is persisted.
"""

import argparse
import contextlib
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from kvstore.embedded import EmbeddedCluster, EmbeddedRedis, free_port

KEYS = 10_000
# "$" is the API's wildcard: keys from "bench-1" to "...0", 111 of them.
WILDCARD = "bench-1$0"
WILDCARD_MATCHES = sum(
    1 for n in range(KEYS) if re.fullmatch(r"bench-1.*0", f"bench-{n}")
)

GET_SCRIPT = """
math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16))
request = function()
    return wrk.format("GET", "/keys/bench-" .. math.random(0, %(keys)d - 1))
end
"""

PUT_SCRIPT = """
math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16))
local headers = {["Content-Type"] = "application/json"}
request = function()
    local key = "bench-" .. math.random(0, %(keys)d - 1)
    return wrk.format("PUT", "/keys/" .. key, headers, '{"n": 1, "s": "abcdefgh"}')
end
"""


@dataclasses.dataclass(frozen=True)
class Scenario:
    """One wrk run: a name, a path and optionally a Lua script."""

    name: str
    path: str
    script: str | None


@dataclasses.dataclass(frozen=True)
class Result:
    """Throughput, latency and service CPU time of one scenario on one target.

    ``cpu_us`` is the CPU time the ``kvstore serve`` process spent per
    request: unlike throughput, it barely moves when other processes load
    the machine, so it shows what the cluster costs the service itself.
    """

    requests_per_second: float
    average_ms: float
    p99_ms: float
    errors: int
    cpu_us: float = 0.0


SCENARIOS = [
    Scenario("GET one key", "/", GET_SCRIPT % {"keys": KEYS}),
    Scenario("PUT one key", "/", PUT_SCRIPT % {"keys": KEYS}),
    Scenario(
        f"wildcard read ({WILDCARD_MATCHES} of {KEYS:,} keys)",
        f"/keys?filter={WILDCARD}",
        None,
    ),
]


def main(argv: list[str] | None = None) -> int:
    """Run the comparison; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per run")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="runs per figure")
    parser.add_argument("--output", type=Path, default=Path("bench/results/cluster.md"))
    options = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        sys.stderr.write("bench/cluster.py needs wrk (apt-get install wrk)\n")
        return 2
    with tempfile.TemporaryDirectory(prefix="kvstore-cluster-bench-") as scratch:
        table = run(Path(scratch), options)
    options.output.parent.mkdir(parents=True, exist_ok=True)
    options.output.write_text(table)
    sys.stdout.write(table)
    return 0


def run(scratch: Path, options: argparse.Namespace) -> str:
    """Start both deployments, measure every scenario, return the table.

    Both services run at once and the runs alternate between them, so load
    from other processes on the machine falls on both alike; each figure is
    the best of ``--rounds`` runs.
    """
    single = EmbeddedRedis(
        scratch / "single", port=free_port(), persist=False, supervise=False
    )
    cluster = EmbeddedCluster(scratch / "cluster", primaries=3)
    labels = ("one Redis", "cluster, 3 primaries")
    results: dict[str, dict[str, Result]] = {label: {} for label in labels}
    with (
        single,
        cluster,
        serve(single.url, scratch / "single.log") as single_service,
        serve(cluster.url, scratch / "cluster.log") as cluster_service,
    ):
        services = dict(zip(labels, (single_service, cluster_service), strict=True))
        for base_url, _ in services.values():
            seed(base_url)
        for scenario in SCENARIOS:
            for _ in range(options.rounds):
                for label, (base_url, pid) in services.items():
                    result = measure(base_url, pid, scenario, scratch, options)
                    best = results[label].get(scenario.name)
                    if best is None or result.requests_per_second > (
                        best.requests_per_second
                    ):
                        results[label][scenario.name] = result
    return render(results, options)


@contextlib.contextmanager
def serve(redis_url: str, log_path: Path) -> Iterator[tuple[str, int]]:
    """A ``kvstore serve`` process on ``redis_url``; yields its URL and pid."""
    port = free_port()
    environ = {
        **os.environ,
        "KVSTORE_REDIS_URL": redis_url,
        "KVSTORE_BIND": f"127.0.0.1:{port}",
        "KVSTORE_KEY_PREFIX": "bench:",
        "KVSTORE_ACCESS_LOG": "false",
        "KVSTORE_LOG_LEVEL": "WARNING",
    }
    base_url = f"http://127.0.0.1:{port}"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "kvstore", "serve"],
            env=environ,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_until_ready(base_url, process)
            yield base_url, process.pid
        finally:
            process.terminate()
            process.wait(timeout=15)


def wait_until_ready(base_url: str, process: "subprocess.Popen[bytes]") -> None:
    """Return once the service answers ``/readyz``."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"kvstore exited with {process.returncode}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{base_url}/readyz", timeout=1.0).status_code == 200:
                return
        time.sleep(0.05)
    raise RuntimeError("kvstore did not become ready")


def seed(base_url: str) -> None:
    """Store the keys the scenarios read, in bulk writes of 1,000."""
    with httpx.Client(base_url=base_url, timeout=30.0) as client:
        for start in range(0, KEYS, 1000):
            pairs = {f"bench-{n}": {"n": n} for n in range(start, start + 1000)}
            client.put("/keys", json=pairs).raise_for_status()


def measure(
    base_url: str,
    pid: int,
    scenario: Scenario,
    scratch: Path,
    options: argparse.Namespace,
) -> Result:
    """Run wrk for one scenario; read its summary and the service's CPU time."""
    command = [
        "wrk",
        f"--threads={options.threads}",
        f"--connections={options.connections}",
        f"--duration={options.duration}s",
        "--latency",
    ]
    if scenario.script is not None:
        script = scratch / f"{abs(hash(scenario.name))}.lua"
        script.write_text(scenario.script)
        command += ["--script", str(script)]
    command.append(base_url + scenario.path)
    cpu_before = cpu_seconds(pid)
    completed = subprocess.run(  # noqa: S603
        command, capture_output=True, text=True, check=True
    )
    cpu = cpu_seconds(pid) - cpu_before
    result = parse_wrk(completed.stdout)
    served = result.requests_per_second * options.duration
    return dataclasses.replace(result, cpu_us=cpu / max(served, 1) * 1e6)


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of process ``pid`` so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    # utime and stime are fields 14 and 15 of stat(5), counted from 1.
    ticks = int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def parse_wrk(output: str) -> Result:
    """Requests per second, average and 99th percentile latency, errors."""
    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    average = re.search(r"Latency\s+([\d.]+)(us|ms|s)", output)
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", output)
    if rate is None or average is None or p99 is None:
        raise RuntimeError(f"unexpected wrk output:\n{output}")
    errors = sum(
        int(count)
        for count in re.findall(r"(?:Non-2xx or 3xx responses|timeout)\D*(\d+)", output)
    )
    return Result(
        float(rate.group(1)),
        _milliseconds(average.group(1), average.group(2)),
        _milliseconds(p99.group(1), p99.group(2)),
        errors,
    )


def _milliseconds(value: str, unit: str) -> float:
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def render(results: dict[str, dict[str, Result]], options: argparse.Namespace) -> str:
    """The results as a Markdown table, cluster against one Redis."""
    single, cluster = results.values()
    lines = [
        f"wrk, {options.threads} threads, {options.connections} connections, "
        f"{options.duration} s per run, best of {options.rounds} alternating runs; "
        f"one `kvstore serve` process (one worker) per target; {KEYS:,} keys "
        "of about 20 bytes. CPU/request is the service process's CPU time "
        "per request served.",
        "",
        "| scenario | req/s, one Redis | req/s, cluster | p99, one Redis | "
        "p99, cluster | CPU/request, one Redis | CPU/request, cluster | "
        "cluster's CPU cost | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in single:
        alone, spread = single[name], cluster[name]
        lines.append(
            f"| {name} | {alone.requests_per_second:,.0f} | "
            f"{spread.requests_per_second:,.0f} | "
            f"{alone.p99_ms:.0f} ms | {spread.p99_ms:.0f} ms | "
            f"{alone.cpu_us:,.0f} µs | {spread.cpu_us:,.0f} µs | "
            f"{spread.cpu_us / alone.cpu_us - 1:+.0%} | "
            f"{alone.errors + spread.errors} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
