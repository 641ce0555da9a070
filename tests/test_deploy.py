"""The Dockerfile and compose.yaml, checked without a Docker engine.

hadolint lints the Dockerfile; the compose file is validated against the
Compose specification's JSON schema; and the names, ports and paths that
the Dockerfile, compose.yaml, the Prometheus config, Grafana's provisioning
and the service must agree on are compared.
"""

import dataclasses
import importlib.metadata
import json
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from packaging.requirements import Requirement

from kvstore.app import create_app
from kvstore.settings import Settings, env_name, tcp_port
from tests.observability import DASHBOARD, ROOT, load_yaml

COMPOSE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"


@dataclasses.dataclass
class Instruction:
    """One Dockerfile instruction, continuation lines joined."""

    keyword: str
    arguments: str
    stage: int


def read_dockerfile(path: Path = DOCKERFILE) -> list[Instruction]:
    instructions: list[Instruction] = []
    pending = ""
    stage = -1
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, arguments = (pending + stripped).partition(" ")
        pending = ""
        if keyword.upper() == "FROM":
            stage += 1
        instructions.append(Instruction(keyword.upper(), arguments.strip(), stage))
    return instructions


def run_tool(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    # Installed by pip beside the interpreter, which need not be on PATH.
    beside = Path(sys.executable).parent / name
    binary = str(beside) if beside.exists() else shutil.which(name)
    if binary is None:
        pytest.skip(f"{name} is not installed: pip install -e '.[test]' brings it")
    return subprocess.run(
        [binary, *args], cwd=ROOT, capture_output=True, text=True, check=False
    )


def compose() -> dict[str, Any]:
    document: dict[str, Any] = load_yaml(COMPOSE)
    return document


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Bind mounts of a compose service: container path to host path."""
    found: dict[str, str] = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        found[target] = source
    return found


def test_hadolint_passes_the_dockerfile() -> None:
    result = run_tool("hadolint", "--no-color", "Dockerfile")

    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""


def test_compose_file_follows_the_compose_specification_schema() -> None:
    result = run_tool(
        "check-jsonschema", "--builtin-schema", "vendor.compose-spec", "compose.yaml"
    )

    assert result.returncode == 0, result.stdout + result.stderr


def test_schema_check_rejects_a_broken_compose_file(tmp_path: Path) -> None:
    broken = compose()
    broken["services"]["kvstore"]["depends_on"]["redis"]["condition"] = "whenever"
    broken["services"]["redis"]["healthcheck"]["retries"] = "many"
    path = tmp_path / "compose.yaml"
    path.write_text(json.dumps(broken))

    result = run_tool(
        "check-jsonschema", "--builtin-schema", "vendor.compose-spec", str(path)
    )

    assert result.returncode == 1
    assert "whenever" in result.stdout + result.stderr


def test_every_variable_compose_sets_is_a_setting_the_service_reads() -> None:
    settings_variables = {
        env_name(field.name) for field in dataclasses.fields(Settings)
    }
    environment = compose()["services"]["kvstore"]["environment"]

    settings = Settings.from_env(environment)

    assert set(environment) <= settings_variables
    assert settings.redis_url is not None
    assert settings.metrics_bind is not None


def test_every_variable_the_dockerfile_sets_for_kvstore_is_a_setting() -> None:
    settings_variables = {
        env_name(field.name) for field in dataclasses.fields(Settings)
    }
    variables: dict[str, str] = {}
    for instruction in read_dockerfile():
        if instruction.keyword == "ENV":
            for pair in shlex.split(instruction.arguments):
                name, _, value = pair.partition("=")
                variables[name] = value

    kvstore_variables = {k: v for k, v in variables.items() if k.startswith("KVSTORE_")}
    settings = Settings.from_env(kvstore_variables)

    assert set(kvstore_variables) <= settings_variables
    assert settings.bind.startswith("0.0.0.0:")


def test_service_ports_agree_across_dockerfile_compose_and_prometheus() -> None:
    services = compose()["services"]
    environment = services["kvstore"]["environment"]
    instructions = read_dockerfile()
    exposed = {
        int(port)
        for instruction in instructions
        if instruction.keyword == "EXPOSE"
        for port in instruction.arguments.split()
    }
    (healthcheck,) = [i.arguments for i in instructions if i.keyword == "HEALTHCHECK"]
    health_url = next(
        word for word in healthcheck.replace("'", " ").split() if "://" in word
    )
    published = {
        int(mapping.rpartition(":")[2]) for mapping in services["kvstore"]["ports"]
    }
    scrape = load_yaml(ROOT / "prometheus" / "prometheus.yml")
    (job,) = scrape["scrape_configs"]
    (target,) = job["static_configs"][0]["targets"]
    target_host, _, target_port = target.partition(":")

    api_port = tcp_port(environment["KVSTORE_BIND"])
    metrics_port = tcp_port(environment["KVSTORE_METRICS_BIND"])
    assert environment["KVSTORE_BIND"].startswith("0.0.0.0:")
    assert environment["KVSTORE_METRICS_BIND"].startswith("0.0.0.0:")
    assert published == {api_port}
    assert exposed == {api_port, metrics_port}
    assert urlsplit(health_url).port == api_port
    assert target_host == "kvstore"
    assert int(target_port) == metrics_port


def test_paths_agree_with_the_routes_the_service_serves() -> None:
    rules = {
        rule.rule
        for rule in create_app(Settings(redis_url="redis://x")).url_map.iter_rules()
    }
    (healthcheck,) = [
        i.arguments for i in read_dockerfile() if i.keyword == "HEALTHCHECK"
    ]
    health_url = next(
        word for word in healthcheck.replace("'", " ").split() if "://" in word
    )
    scrape = load_yaml(ROOT / "prometheus" / "prometheus.yml")

    assert urlsplit(health_url).path == "/healthz"
    assert {"/healthz", scrape["scrape_configs"][0]["metrics_path"]} <= rules


def test_redis_url_names_the_redis_service_and_its_port() -> None:
    services = compose()["services"]

    url = urlsplit(services["kvstore"]["environment"]["KVSTORE_REDIS_URL"])
    redis_command = services["redis"]["command"]

    assert url.scheme == "redis"
    assert url.hostname in services
    assert url.hostname == "redis"
    assert url.port == 6379
    assert "--port" not in redis_command
    assert services["redis"]["image"].startswith("redis:")


def test_redis_persists_on_a_named_volume_and_kvstore_waits_for_it() -> None:
    document = compose()
    redis_service = document["services"]["redis"]

    command = redis_service["command"]
    data_mount = mounts(redis_service)["/data"]

    assert command[command.index("--appendonly") + 1] == "yes"
    assert data_mount in document["volumes"]
    assert "redis-cli" in redis_service["healthcheck"]["test"]
    assert document["services"]["kvstore"]["depends_on"]["redis"] == {
        "condition": "service_healthy"
    }
    assert document["services"]["kvstore"]["build"] == "."


def test_prometheus_service_loads_the_project_config_and_rules() -> None:
    prometheus = compose()["services"]["prometheus"]

    mounted = mounts(prometheus)
    config_flag = next(
        flag for flag in prometheus["command"] if flag.startswith("--config.file=")
    )
    config_path = Path(config_flag.partition("=")[2])
    host_dir = ROOT / mounted[str(config_path.parent)]
    scrape = load_yaml(host_dir / config_path.name)

    assert (host_dir / config_path.name).is_file()
    for rule_file in scrape["rule_files"]:
        assert (host_dir / rule_file).is_file(), rule_file


def test_grafana_provisioning_matches_compose_and_the_dashboard() -> None:
    services = compose()["services"]
    grafana = services["grafana"]
    mounted = mounts(grafana)
    provisioning = ROOT / mounted["/etc/grafana/provisioning"]
    (source,) = load_yaml(provisioning / "datasources" / "prometheus.yml")[
        "datasources"
    ]
    (provider,) = load_yaml(provisioning / "dashboards" / "kvstore.yml")["providers"]
    dashboard = json.loads(DASHBOARD.read_text())
    listen = next(
        flag
        for flag in services["prometheus"]["command"]
        if flag.startswith("--web.listen-address=")
    )

    source_url = urlsplit(source["url"])
    dashboards_dir = provider["options"]["path"]
    home = Path(grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])

    assert source_url.hostname == "prometheus"
    assert source_url.port == tcp_port(listen.partition("=")[2])
    assert ROOT / mounted[dashboards_dir] == DASHBOARD.parent
    assert home.parent == Path(dashboards_dir)
    assert (DASHBOARD.parent / home.name).is_file()
    uids = {
        target["datasource"]["uid"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    }
    assert uids == {source["uid"]}
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"


def test_published_ports_listen_on_loopback_only() -> None:
    services = compose()["services"]

    mappings = [
        mapping for service in services.values() for mapping in service.get("ports", [])
    ]

    assert mappings
    assert all(mapping.startswith("127.0.0.1:") for mapping in mappings)
    assert "ports" not in services["redis"]


def test_dockerfile_builds_in_stages_and_runs_unprivileged() -> None:
    instructions = read_dockerfile()
    final_stage = max(instruction.stage for instruction in instructions)

    bases = [i.arguments for i in instructions if i.keyword == "FROM"]
    args = {
        name: value
        for i in instructions
        if i.keyword == "ARG"
        for name, _, value in [i.arguments.partition("=")]
    }
    final = [i for i in instructions if i.stage == final_stage]
    users = [i.arguments for i in final if i.keyword == "USER"]
    (command,) = [i.arguments for i in final if i.keyword == "CMD"]
    copies = [i.arguments for i in final if i.keyword == "COPY"]

    assert final_stage >= 1
    assert bases[0] == "${PYTHON_IMAGE} AS build"
    assert bases[-1] == "${PYTHON_IMAGE}"
    assert "-slim" in args["PYTHON_IMAGE"]
    assert users
    assert users[-1].split(":")[0] not in {"0", "root"}
    assert json.loads(command) == ["kvstore", "serve"]
    assert all(copy.startswith("--from=") for copy in copies)
    assert any(i.keyword == "HEALTHCHECK" for i in final)


def test_image_installs_dependencies_from_the_pinned_constraints() -> None:
    runs = " ".join(i.arguments for i in read_dockerfile() if i.keyword == "RUN")

    assert "--requirement constraints.txt" in runs
    assert "--no-deps ." in runs


def test_constraints_pin_every_runtime_dependency_within_its_bounds() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            requirement = Requirement(line)
            (specifier,) = requirement.specifier
            assert specifier.operator == "==", line
            pins[normalize(requirement.name)] = specifier.version

    # Every distribution installing kvstore brings here, markers applied.
    needed: dict[str, Requirement] = {}
    pending = [
        requirement
        for requirement in map(Requirement, project["dependencies"])
        if requirement.marker is None or requirement.marker.evaluate({"extra": ""})
    ]
    while pending:
        requirement = pending.pop()
        needed.setdefault(normalize(requirement.name), requirement)
        for text in importlib.metadata.requires(requirement.name) or []:
            child = Requirement(text)
            if child.marker is None or any(
                child.marker.evaluate({"extra": extra})
                for extra in requirement.extras or {""}
            ):
                pending.append(child)

    assert set(needed) <= set(pins), set(needed) - set(pins)
    for name in (normalize(Requirement(text).name) for text in project["dependencies"]):
        if name in pins:
            assert needed[name].specifier.contains(pins[name]), (name, pins[name])


def test_docker_build_context_holds_what_the_dockerfile_copies() -> None:
    allowed = {
        line.removeprefix("!").rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }

    sources = [
        word
        for i in read_dockerfile()
        if i.keyword == "COPY" and not i.arguments.startswith("--from=")
        for word in i.arguments.split()[:-1]
    ]

    assert sources
    assert set(sources) <= allowed
    assert all((ROOT / source).exists() for source in sources)


def normalize(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")
