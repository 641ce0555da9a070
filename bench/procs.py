"""Child processes for the benchmark: start, account for, and stop them.

Every server the suite measures runs as a `Child` started in a session of its
own, so its whole process tree (a master and its workers) can be signalled by
process group id and measured through /proc via psutil.
"""

import http.client
import logging
import os
import resource
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

import psutil

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


def find_free_port() -> int:
    """Return a TCP port on the loopback interface that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def raise_open_files_limit(wanted: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE towards `wanted`; return the result.

    Children inherit the limit, which is how the servers under test get enough
    descriptors for a thousand client sockets plus their Redis connections.
    The soft limit never goes past the hard one.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so cleanup code stops the children.

    The children run in sessions of their own and would outlive a runner
    killed by the default SIGTERM action.
    """

    def handle(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handle)


class ChildExitedError(RuntimeError):
    """A child process ended while the benchmark still needed it."""


class Child:
    """One started program and the process tree below it."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = dict(os.environ if env is None else env)
        self.cwd = cwd
        self._popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the program with stdout and stderr going to `log_path`."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log_file:
            # The argv is built by this package from fixed program names and
            # numbers, never from outside input.
            self._popen = subprocess.Popen(  # noqa: S603
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )
        log.debug("started %s as pid %d", self.name, self._popen.pid)

    @property
    def pid(self) -> int:
        """The process id of the program itself (also its process group id)."""
        if self._popen is None:
            raise RuntimeError(f"{self.name} was not started")
        return self._popen.pid

    def check_alive(self) -> None:
        """Raise `ChildExitedError`, quoting the log's end, if the program ended."""
        if self._popen is None or self._popen.poll() is None:
            return
        tail = self.read_log_tail()
        raise ChildExitedError(
            f"{self.name} exited with status {self._popen.returncode}:\n{tail}"
        )

    def read_log_tail(self, max_bytes: int = 4000) -> str:
        """Return the last `max_bytes` of the program's log."""
        try:
            data = self.log_path.read_bytes()
        except FileNotFoundError:
            return ""
        return data[-max_bytes:].decode("utf-8", "replace")

    def processes(self) -> list[psutil.Process]:
        """Return the program's process and all its live descendants."""
        try:
            root = psutil.Process(self.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def cpu_seconds(self) -> float:
        """Return user plus system CPU time used so far by the live tree."""
        total = 0.0
        for process in self.processes():
            try:
                times = process.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += times.user + times.system
        return total

    def rss_bytes(self) -> list[int]:
        """Return the resident set size of each live process in the tree."""
        sizes: list[int] = []
        for process in self.processes():
            try:
                sizes.append(process.memory_info().rss)
            except psutil.NoSuchProcess:
                continue
        return sizes

    def stop(self, grace: float = 10.0) -> None:
        """Ask the process group to end, then kill whatever is left after `grace`."""
        if self._popen is None:
            return
        popen, self._popen = self._popen, None
        pgid = popen.pid
        self._signal_group(pgid, signal.SIGTERM)
        try:
            popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0f s; killing it", self.name, grace)
        # Workers can outlive their master for a moment; the group id still
        # names only processes this Child started.
        self._signal_group(pgid, signal.SIGKILL)
        popen.wait(timeout=grace)

    @staticmethod
    def _signal_group(pgid: int, signum: signal.Signals) -> None:
        try:
            os.killpg(pgid, signum)
        except ProcessLookupError:
            return

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def machine_busy_seconds() -> float:
    """CPU seconds all cores have spent running processes since boot.

    Interrupt time is left out: loopback traffic is processed there and
    charged to no process, so the benchmark's own requests would show up as
    someone else's load. Steal counts: time the hypervisor gave to other
    machines is lost to the benchmark like time taken by other processes.
    """
    times = psutil.cpu_times()
    return times.user + times.nice + times.system + getattr(times, "steal", 0.0)


def own_cpu_seconds() -> float:
    """CPU seconds of this process and of the children it has waited for."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


class OtherLoad:
    """Measures how much CPU processes outside the benchmark took meanwhile.

    The machine's busy time over an interval, less this process, its reaped
    children (the load generators) and the servers' trees, is load the
    benchmark did not cause: other people's work on a shared machine. Shown
    next to each figure, it tells which figures to distrust.
    """

    def __init__(self) -> None:
        self._wall = time.monotonic()
        self._busy = machine_busy_seconds()
        self._own = own_cpu_seconds()

    def cores(self, accounted: float) -> float:
        """Average cores used by others since creation; `accounted` is the
        servers' CPU seconds over the same interval."""
        wall = time.monotonic() - self._wall
        busy = machine_busy_seconds() - self._busy
        own = own_cpu_seconds() - self._own
        return max(0.0, busy - own - accounted) / wall if wall > 0 else 0.0


def wait_for_port(child: Child, port: int, timeout: float = 30.0) -> None:
    """Block until something accepts TCP connections on `port`.

    Raises `ChildExitedError` if the child dies first and `TimeoutError` if
    nothing listens within `timeout` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        child.check_alive()
        try:
            with socket.create_connection((LOOPBACK, port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{child.name} did not listen on {port}") from None
            time.sleep(0.05)


def wait_for_http(child: Child, port: int, path: str, timeout: float = 60.0) -> None:
    """Block until an HTTP GET of `path` gets any response from the child.

    Any status counts, since readiness here means the server answers HTTP;
    the benchmark's warm-up then brings every worker into play.
    """
    deadline = time.monotonic() + timeout
    while True:
        child.check_alive()
        connection = http.client.HTTPConnection(LOOPBACK, port, timeout=2.0)
        try:
            connection.request("GET", path)
            connection.getresponse().read()
        except (OSError, http.client.HTTPException):
            if time.monotonic() > deadline:
                tail = child.read_log_tail()
                raise TimeoutError(
                    f"{child.name} did not answer HTTP:\n{tail}"
                ) from None
            time.sleep(0.1)
        else:
            return
        finally:
            connection.close()


class PeakRssSampler:
    """Sample a memory figure in a thread while a block runs, keeping the peak.

    `measure` returns bytes; use `tree_rss` for servers or `own_rss` for work
    done in this process. Wrapped around one long request, the peak covers the
    transient memory a server needs to build a large response.
    """

    def __init__(self, measure: Callable[[], int], interval: float = 0.005) -> None:
        self._measure = measure
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.baseline_bytes = 0
        self.peak_bytes = 0

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.peak_bytes = max(self.peak_bytes, self._measure())

    def __enter__(self) -> Self:
        self.baseline_bytes = self._measure()
        self.peak_bytes = self.baseline_bytes
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, self._measure())


def tree_rss(children: Sequence[Child]) -> Callable[[], int]:
    """Return a measure of the summed RSS of every process below `children`."""

    def measure() -> int:
        return sum(sum(child.rss_bytes()) for child in children)

    return measure


def own_rss() -> int:
    """Return the RSS of this Python process."""
    rss: int = psutil.Process().memory_info().rss
    return rss
