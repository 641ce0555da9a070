"""Helpers for the metrics, Prometheus and deployment tests.

Reading an exposition, starting ``kvstore serve`` and a real Prometheus
server, and finding the metric names the dashboard and the rules use.
"""

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import promql_parser
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from kvstore.embedded import free_port
from tests.helpers import wait_until_healthy

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "grafana" / "dashboards" / "kvstore.json"
PROMETHEUS_DIR = ROOT / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"

# Series Prometheus itself adds for every scrape target; queries may use them.
SCRAPE_SERIES = frozenset(
    {
        "up",
        "scrape_duration_seconds",
        "scrape_samples_scraped",
        "scrape_samples_post_metric_relabeling",
        "scrape_series_added",
    }
)

# Grafana's interval variables, replaced by a duration before parsing.
GRAFANA_INTERVALS = ("$__rate_interval", "$__interval", "$__range")


def parse_samples(exposition: str) -> list[Sample]:
    """Every sample of a text exposition, read by Prometheus's own parser."""
    return [
        sample
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
    ]


def value_of(exposition: str, name: str, **labels: str) -> float:
    """The sum of the samples named ``name`` whose labels include ``labels``."""
    return sum(
        sample.value
        for sample in parse_samples(exposition)
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def families(exposition: str) -> dict[str, str]:
    """Metric family names of an exposition, with their types."""
    return {
        family.name: family.type
        for family in text_string_to_metric_families(exposition)
    }


def sample_names(exposition: str) -> set[str]:
    """The names of the samples an exposition holds."""
    return {sample.name for sample in parse_samples(exposition)}


def selector_names(expression: str) -> set[str]:
    """The metric names a PromQL expression selects, read by a PromQL parser."""
    for variable in GRAFANA_INTERVALS:
        expression = expression.replace(variable, "5m")
    names: set[str] = set()

    def visit(node: promql_parser.Expr) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            if node.name is None:
                raise ValueError(f"a selector without a metric name in {expression}")
            names.add(node.name)
        return True

    promql_parser.walk(promql_parser.parse(expression), visit)
    return names


def dashboard_expressions(dashboard: Mapping[str, Any]) -> list[str]:
    """Every PromQL expression of a Grafana dashboard's panels and rows."""
    expressions: list[str] = []
    for panel in dashboard["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            expressions.extend(target["expr"] for target in inner.get("targets", []))
    return expressions


def rule_expressions(rules: Mapping[str, Any]) -> list[str]:
    """Every PromQL expression of a Prometheus rules file."""
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def load_yaml(path: Path) -> Any:
    """A YAML file's content."""
    return yaml.safe_load(path.read_text())


def project_expressions() -> dict[str, list[str]]:
    """The PromQL of the dashboard and of the alerting rules, by file."""
    return {
        "dashboard": dashboard_expressions(json.loads(DASHBOARD.read_text())),
        "alerts": rule_expressions(load_yaml(ALERTS)),
    }


def require_binary(name: str) -> str:
    """The path of ``name``, or skip the test saying how to get it."""
    found = shutil.which(name)
    if found is None:
        pytest.skip(
            f"{name} is not installed (Debian: apt-get install prometheus); "
            ".ci/run installs it"
        )
    return found


@contextlib.contextmanager
def kvstore_server(
    environ: Mapping[str, str], log_path: Path, *, health_url: str
) -> Iterator["subprocess.Popen[bytes]"]:
    """A ``kvstore serve`` process with ``environ`` added, serving until exit."""
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "kvstore", "serve"],
            env={**os.environ, **environ},
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_until_healthy(health_url, process, timeout=60.0)
            yield process
        finally:
            process.terminate()
            process.wait(timeout=30)


@contextlib.contextmanager
def prometheus_server(
    target: str, workdir: Path, scrape_interval: str = "1s"
) -> Iterator[str]:
    """A real Prometheus on the project's config, scraping ``target``.

    The config is the project's ``prometheus/prometheus.yml`` with the
    kvstore job's targets replaced by ``target`` and the intervals shortened
    so a test need not wait; its rule files are the project's. Yields the
    server's base URL.
    """
    binary = require_binary("prometheus")
    config = load_yaml(PROMETHEUS_DIR / "prometheus.yml")
    config["global"]["scrape_interval"] = scrape_interval
    config["global"]["evaluation_interval"] = scrape_interval
    config["global"]["scrape_timeout"] = scrape_interval
    config["rule_files"] = [
        str(PROMETHEUS_DIR / rule_file) for rule_file in config["rule_files"]
    ]
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "kvstore"]
    job["static_configs"] = [{"targets": [target]}]
    config_path = workdir / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = workdir / "prometheus.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_until_ready(url, process, log_path)
            yield url
        finally:
            process.terminate()
            process.wait(timeout=30)


def wait_until_ready(
    url: str, process: "subprocess.Popen[bytes]", log_path: Path, timeout: float = 60.0
) -> None:
    """Return once Prometheus says it is ready; fail if it exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"prometheus exited: {log_path.read_text()[-2000:]}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/-/ready", timeout=1.0).status_code == 200:
                return
        time.sleep(0.1)
    pytest.fail(f"prometheus was not ready within {timeout} s")


def query(prometheus_url: str, expression: str) -> list[dict[str, Any]]:
    """The result vector of an instant query through Prometheus's HTTP API."""
    response = httpx.get(
        f"{prometheus_url}/api/v1/query", params={"query": expression}, timeout=10.0
    )
    response.raise_for_status()
    body = response.json()
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def wait_for_value(
    prometheus_url: str, expression: str, expected: float, timeout: float = 60.0
) -> float:
    """Poll a query until its single value is ``expected``; return the last one."""
    deadline = time.monotonic() + timeout
    last = float("nan")
    while time.monotonic() < deadline:
        result = query(prometheus_url, expression)
        if result:
            last = float(result[0]["value"][1])
            if last == expected:
                return last
        time.sleep(0.5)
    return last
