"""Where a server's CPU goes per request: ``python -m bench.profile``.

Starts a private Redis and each HTTP target as the suite does, drives it with
wrk (single-key GET or PUT, 64 connections by default) and samples every
worker process with py-spy while the load runs. Each sample is charged to the
package of the innermost Python frame, so the shares add up to the workers'
busy time:

- time inside a C call is charged to the Python frame that made it, so the
  ``socket writes`` row is mostly the kernel sending on loopback, and
  ``event loop`` is uvloop's own C code (polling, reading sockets, running
  callbacks) between Python frames;
- py-spy shows coroutine stacks only down to where they resumed, which is
  why shares are given per package of the innermost frame, not per call
  tree.

The table goes to stdout and to ``profile-get.md`` (or ``-put``) in the
output directory;
the raw samples (py-spy's collapsed format) go to its ``tmp`` folder.
py-spy needs permission to read other processes' memory (root, or
``CAP_SYS_PTRACE``).
"""

import argparse
import collections
import concurrent.futures
import datetime
import http.client
import logging
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from urllib.parse import quote

from bench.dataset import KEY_ID_PREFIX
from bench.loadgen import run_wrk
from bench.procs import LOOPBACK, Child
from bench.targets import (
    BENCH_DIR,
    FLASK,
    KVSTORE,
    QUART_BARE,
    ServerSettings,
    loaded_redis,
    new_api_token,
    start_server,
)

log = logging.getLogger("bench.profile")

KEY_PREFIX = "kvstore:"
KEYS = 10_000
WILDCARD = "WILDCARD"
SAMPLE_RATE = 200
WARMUP_SECONDS = 2

# (row, path prefixes), first match wins. py-spy names files from the
# import root: ``quart/app.py``, ``asyncio/streams.py``, ``kvstore/api.py``.
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("kvstore", ("kvstore/",)),
    ("Hypercorn", ("hypercorn/",)),
    ("h11 (HTTP/1.1 parsing)", ("h11/",)),
    ("Quart, Werkzeug, Blinker", ("quart/", "werkzeug/", "blinker/")),
    ("Flask", ("flask/",)),
    ("gunicorn", ("gunicorn/",)),
    ("redis-py", ("redis/",)),
    ("aioprometheus", ("aioprometheus/",)),
    ("socket writes", ("asyncio/streams.py",)),
    ("event loop", ("asyncio/runners.py", "asyncio/base_events.py")),
    ("asyncio (tasks, timeouts)", ("asyncio/",)),
)
OTHER = "other (stdlib, logging)"


def frame_file(frame: str) -> str:
    """The file of a py-spy frame such as ``Quart.handle (quart/app.py:1465)``."""
    _, _, location = frame.rpartition(" (")
    path, _, _ = location.rpartition(":")
    return path


def category(frame: str) -> str:
    """The row a sample whose innermost frame is `frame` is charged to."""
    path = frame_file(frame)
    for name, prefixes in CATEGORIES:
        if path.startswith(prefixes):
            return name
    return OTHER


def shares(collapsed: Iterable[str]) -> tuple[dict[str, int], int]:
    """Samples per category from py-spy's collapsed stacks, and their total."""
    counts: collections.Counter[str] = collections.Counter()
    for line in collapsed:
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        innermost = stack.rsplit(";", 1)[-1]
        counts[category(innermost)] += int(count)
    return dict(counts), sum(counts.values())


def sample_workers(
    server: Child, seconds: int, out_dir: Path, label: str
) -> list[Path]:
    """Record every worker of `server` for `seconds`; return the sample files."""
    processes = server.processes()
    # A worker is a process that serves: the tree's root only supervises
    # when there are children, and multiprocessing's resource tracker is idle.
    workers = [
        p for p in processes[1:] if "resource_tracker" not in " ".join(p.cmdline())
    ] or processes[:1]
    recorders = []
    paths = []
    for process in workers:
        path = out_dir / f"{label}-{process.pid}.txt"
        argv = [
            _require("py-spy"),
            "record",
            "--format",
            "raw",
            "--rate",
            str(SAMPLE_RATE),
            "--duration",
            str(seconds),
            "--nonblocking",
            "--pid",
            str(process.pid),
            "--output",
            str(path),
        ]
        recorders.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL))  # noqa: S603
        paths.append(path)
    for recorder in recorders:
        recorder.wait(timeout=seconds + 60)
    return paths


def _require(program: str) -> str:
    found = shutil.which(program) or shutil.which(
        program, path=str(Path(sys.executable).parent)
    )
    if found is None:
        raise SystemExit(f"{program} is not installed; pip install {program}")
    return found


def profile_target(
    target: str,
    settings: ServerSettings,
    method: str,
    connections: int,
    seconds: int,
    out_dir: Path,
) -> tuple[dict[str, int], int, float]:
    """Sample `target` under load; return its category counts, total and req/s."""
    server = start_server(target, settings, "profile")
    duration = seconds + 2 * WARMUP_SECONDS
    token = settings.api_token or ""
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            load: concurrent.futures.Future[float]
            if method == WILDCARD:
                load = pool.submit(read_everything, server.port, token, duration)
            else:
                load = pool.submit(
                    _wrk_rate,
                    server.url,
                    method,
                    connections,
                    duration,
                    token,
                )
            time.sleep(WARMUP_SECONDS)
            paths = sample_workers(server.child, seconds, out_dir, target)
            rate = load.result()
    finally:
        server.child.stop()
    counts: collections.Counter[str] = collections.Counter()
    total = 0
    for path in paths:
        found, samples = shares(path.read_text().splitlines())
        counts.update(found)
        total += samples
    return dict(counts), total, rate


def _wrk_rate(
    url: str, method: str, connections: int, duration: int, token: str
) -> float:
    result = run_wrk(
        url,
        "single.lua",
        connections=connections,
        duration=duration,
        timeout=2.0,
        max_requests=50_000_000,
        options={"method": method, "keys": KEYS, "token": token},
    )
    return result.rps


def read_everything(port: int, token: str, duration: int) -> float:
    """Read every key by wildcard, one read after another; return reads/s."""
    path = "/keys?filter=" + quote(KEY_ID_PREFIX + "$")
    headers = {"Authorization": f"Bearer {token}"}
    started = time.monotonic()
    reads = 0
    while time.monotonic() - started < duration:
        connection = http.client.HTTPConnection(LOOPBACK, port, timeout=600)
        try:
            connection.request("GET", path, headers=headers)
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"wildcard read answered {response.status}")
        finally:
            connection.close()
        reads += 1
    return reads / (time.monotonic() - started)


def render(
    method: str,
    connections: int,
    results: dict[str, tuple[dict[str, int], int, float]],
) -> str:
    """A Markdown table: each category's share of each target's samples."""
    names = list(results)
    rows = [name for name, _ in CATEGORIES] + [OTHER]
    if method == WILDCARD:
        title = f"GET /keys?filter={KEY_ID_PREFIX}$ over every key, one at a time"
        rate = "reads/s"
    else:
        title = f"{method} /keys/{{id}}, c{connections}"
        rate = "req/s"
    lines = [
        f"# Where the workers' CPU goes: {title}",
        "",
        f"py-spy samples of every worker under load, {SAMPLE_RATE} per second, "
        "charged to the package of the innermost Python frame "
        "(see bench/profile.py).",
        "",
        "| where | " + " | ".join(names) + " |",
        "|---" * (len(names) + 1) + "|",
    ]
    for row in rows:
        cells = []
        for name in names:
            counts, total, _ = results[name]
            share = counts.get(row, 0) / total if total else 0.0
            cells.append(f"{share:.0%}")
        if any(cell != "0%" for cell in cells):
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines.append(
        f"| {rate} during sampling | "
        + " | ".join(f"{results[n][2]:,.1f}" for n in names)
        + " |"
    )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--targets",
        default=f"{KVSTORE},{QUART_BARE}",
        help=f"comma-separated, among {KVSTORE}, {QUART_BARE}, {FLASK}",
    )
    parser.add_argument(
        "--method",
        choices=("GET", "PUT", WILDCARD),
        default="GET",
        help=f"single-key GET or PUT by wrk, or {WILDCARD}: GET /keys?filter=key-$ "
        "over every key, one read at a time",
    )
    parser.add_argument(
        "--keys", type=int, default=KEYS, help="keys loaded into Redis (10000)"
    )
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--seconds", type=int, default=10, help="sampling time")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--output-dir", type=Path, default=BENCH_DIR / "results")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = set(targets) - {KVSTORE, QUART_BARE, FLASK}
    if unknown:
        parser.error(f"unknown targets: {', '.join(sorted(unknown))}")
    stamp = datetime.datetime.now(tz=datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    out_dir: Path = args.output_dir
    log_dir = out_dir / "tmp" / f"profile-{stamp}"
    log_dir.mkdir(parents=True, exist_ok=True)

    with loaded_redis(log_dir, KEY_PREFIX, args.keys) as redis:
        settings = ServerSettings(
            redis_url=redis.url,
            key_prefix=KEY_PREFIX,
            workers=args.workers,
            backlog=2048,
            log_dir=log_dir,
            api_token=new_api_token(),
        )
        results = {
            target: profile_target(
                target,
                settings,
                args.method,
                args.connections,
                args.seconds,
                log_dir,
            )
            for target in targets
        }

    table = render(args.method, args.connections, results)
    (out_dir / f"profile-{args.method.lower()}.md").write_text(table)
    sys.stdout.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
