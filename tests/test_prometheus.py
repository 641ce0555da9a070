"""The Prometheus config, alerting rules and Grafana dashboard, checked for real.

``promtool`` checks the config and the rules and runs the rules' unit tests;
every PromQL expression of the dashboard and the rules is parsed and its
metric names compared with a live ``/metrics`` after traffic; and a real
Prometheus server on the project's own scrape config reads the service's
metrics back through its HTTP query API.
"""

import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kvstore.embedded import free_port
from tests.observability import (
    DASHBOARD,
    PROMETHEUS_DIR,
    SCRAPE_SERIES,
    kvstore_server,
    load_yaml,
    project_expressions,
    prometheus_server,
    query,
    require_binary,
    sample_names,
    selector_names,
    wait_for_value,
)

JSON_HEADERS = {"Content-Type": "application/json"}
ROOT = PROMETHEUS_DIR.parent


def promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    binary = require_binary("promtool")
    return subprocess.run(
        [binary, *args], cwd=cwd, capture_output=True, text=True, check=False
    )


def test_promtool_accepts_the_scrape_config_and_its_rule_files() -> None:
    result = promtool("check", "config", "prometheus/prometheus.yml")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_accepts_the_alerting_rules() -> None:
    result = promtool("check", "rules", "prometheus/alerts.yml")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 5 rules found" in result.stdout


def test_alerting_rules_fire_and_stay_quiet_as_their_unit_tests_say() -> None:
    result = promtool("test", "rules", "alerts_test.yml", cwd=PROMETHEUS_DIR)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_alerts_cover_what_an_operator_must_know() -> None:
    rules = load_yaml(PROMETHEUS_DIR / "alerts.yml")

    alerts = {
        rule["alert"]: rule for group in rules["groups"] for rule in group["rules"]
    }

    assert {
        "KvstoreDown",
        "KvstoreRedisUnreachable",
        "KvstoreHighErrorRatio",
        "KvstoreHighLatency",
    } <= set(alerts)
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert rule["annotations"]["summary"], name
        assert rule["annotations"]["description"], name


def test_name_check_catches_a_metric_the_service_does_not_expose() -> None:
    exposed = {"kvstore_http_requests_total"}

    names = selector_names(
        "sum(rate(kvstore_http_requests_total[$__rate_interval]))"
        " / sum(rate(kvstore_requests_missing_total[5m]))"
    )

    assert names - exposed == {"kvstore_requests_missing_total"}


@pytest.fixture(scope="module")
def after_traffic(live_url: str) -> str:
    """The live server's exposition after requests of every kind."""
    key = f"traffic-{uuid.uuid4().hex}"
    with httpx.Client(base_url=live_url) as http:
        http.put(f"/keys/{key}", content=b'{"a": 1}', headers=JSON_HEADERS)
        http.put("/keys", content=b'{"x1": 1, "x2": 2}', headers=JSON_HEADERS)
        http.get(f"/keys/{key}")
        http.head(f"/keys/{key}")
        http.get("/keys/never-stored")
        http.get("/keys", params={"filter": "x$"})
        http.delete(f"/keys/{key}")
        http.get("/readyz")
        return http.get("/metrics").text


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_every_expression_uses_only_metrics_the_service_exposes(
    after_traffic: str, source: str
) -> None:
    exposed = sample_names(after_traffic)
    expressions = project_expressions()[source]

    used = set().union(*(selector_names(expression) for expression in expressions))

    assert expressions
    assert used - exposed - SCRAPE_SERIES == set()
    assert any(name.startswith("kvstore_") for name in used)


def test_dashboard_variables_query_exposed_metrics(after_traffic: str) -> None:
    dashboard = json.loads(DASHBOARD.read_text())

    variables = dashboard["templating"]["list"]

    for variable in variables:
        definition = variable["definition"]
        assert definition.startswith("label_values(")
        selector = definition.removeprefix("label_values(").rpartition(",")[0]
        assert selector_names(selector) <= sample_names(after_traffic)


def test_dashboard_shows_what_the_service_is_doing() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [panel for panel in dashboard["panels"] if panel["type"] != "row"]

    titles = {panel["title"] for panel in panels}
    used = {
        name
        for panel in panels
        for target in panel["targets"]
        for name in selector_names(target["expr"])
    }

    assert {
        "Request rate by route and status",
        "Error ratio",
        "Latency percentiles by route",
        "Redis latency by operation",
        "Redis errors by kind",
        "Connection pool",
        "Key operations",
    } <= titles
    assert {
        "kvstore_http_requests_total",
        "kvstore_http_request_duration_seconds_bucket",
        "kvstore_redis_command_duration_seconds_bucket",
        "kvstore_redis_errors_total",
        "kvstore_redis_pool_connections",
        "kvstore_keys_written_total",
        "kvstore_keys_read_total",
        "kvstore_keys_deleted_total",
    } <= used
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "prometheus"}
        assert panel["description"], panel["title"]


@pytest.fixture(scope="module")
def scraped_service(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str]]:
    """A kvstore with its own metrics listener, scraped by a real Prometheus.

    Yields the service's URL and Prometheus's URL.
    """
    require_binary("prometheus")
    workdir = tmp_path_factory.mktemp("prometheus")
    port, metrics_port = free_port(), free_port()
    environ = {
        "KVSTORE_REDIS_URL": redis_url,
        "KVSTORE_KEY_PREFIX": f"kvprom:{uuid.uuid4().hex[:12]}:",
        "KVSTORE_BIND": f"127.0.0.1:{port}",
        "KVSTORE_METRICS_BIND": f"127.0.0.1:{metrics_port}",
    }
    url = f"http://127.0.0.1:{port}"
    with (
        kvstore_server(environ, workdir / "kvstore.log", health_url=url),
        prometheus_server(f"127.0.0.1:{metrics_port}", workdir) as prometheus_url,
    ):
        yield url, prometheus_url
        with httpx.Client(base_url=url) as http:
            http.delete("/keys", params={"filter": "$"})


def test_a_real_prometheus_reads_the_service_metrics(
    scraped_service: tuple[str, str],
) -> None:
    url, prometheus_url = scraped_service
    writes = 9
    with httpx.Client(base_url=url) as http:
        for index in range(writes):
            response = http.put(
                f"/keys/e2e-{index}", content=b"1", headers=JSON_HEADERS
            )
            assert response.status_code == 201
        http.get("/keys/e2e-0")
        http.get("/keys", params={"filter": "e2e-$"})

    counted = wait_for_value(
        prometheus_url,
        'sum(kvstore_http_requests_total{job="kvstore", method="PUT",'
        ' route="/keys/{id}", status="201"})',
        writes,
    )
    written = wait_for_value(
        prometheus_url, 'sum(kvstore_keys_written_total{job="kvstore"})', writes
    )
    up = query(prometheus_url, 'up{job="kvstore"}')
    redis_up = query(prometheus_url, 'kvstore_redis_up{job="kvstore"}')

    assert counted == writes
    assert written == writes
    assert [sample["value"][1] for sample in up] == ["1"]
    assert [sample["value"][1] for sample in redis_up] == ["1"]


def test_every_metric_the_dashboard_and_rules_use_has_data_in_prometheus(
    scraped_service: tuple[str, str],
) -> None:
    url, prometheus_url = scraped_service
    with httpx.Client(base_url=url) as http:
        http.put("/keys/used", content=b"1", headers=JSON_HEADERS)
        http.get("/keys/used")
        http.get("/keys", params={"filter": "used$"})
    used = set().union(
        *(
            selector_names(expression)
            for expressions in project_expressions().values()
            for expression in expressions
        )
    )

    wait_for_value(
        prometheus_url, 'sum(kvstore_wildcard_read_keys_count{job="kvstore"}) > 0', 1
    )
    missing = {
        name
        for name in used
        if not query(prometheus_url, f'count({name}{{job="kvstore"}})')
    }

    assert missing == set()


def test_prometheus_evaluates_every_alerting_rule_without_error(
    scraped_service: tuple[str, str],
) -> None:
    _, prometheus_url = scraped_service

    deadline = time.monotonic() + 60
    while True:
        response = httpx.get(f"{prometheus_url}/api/v1/rules", timeout=10.0)
        groups = response.json()["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        evaluated = all(rule["health"] != "unknown" for rule in rules)
        if (rules and evaluated) or time.monotonic() > deadline:
            break
        time.sleep(0.5)

    assert len(rules) == 5
    for rule in rules:
        assert rule["health"] == "ok", rule
        assert rule["state"] == "inactive", rule
