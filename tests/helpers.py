"""Helpers shared by test modules."""

import subprocess
import time

import httpx
import pytest


def wait_until_healthy(
    url: str, process: "subprocess.Popen[bytes]", timeout: float = 20.0
) -> None:
    """Return once ``url`` answers ``/healthz``; fail if the process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"kvstore exited with {process.returncode} before serving")
        try:
            if httpx.get(f"{url}/healthz", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.05)
    pytest.fail(f"kvstore did not answer on {url} within {timeout} s")
