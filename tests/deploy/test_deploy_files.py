"""The shipped deployment files are valid for the tools that read them:
compose/deploy.yml for `docker compose config` (or docker-compose), the systemd
unit for `systemd-analyze verify`, deploy/beacon.env for Beacon's own config."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from beacon.config import build_config
from tests.conftest import ROOT

DEPLOY = ROOT / "compose/deploy.yml"


def compose_command() -> list[str]:
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    tool = shutil.which("docker-compose")
    assert tool, "neither `docker compose` nor docker-compose is installed (make test-deps installs it)"
    return [tool]


def compose_config(**env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DOCKER_GID", "BEACON_"))}
    return subprocess.run(
        [*compose_command(), "-f", str(DEPLOY), "config"],
        env={**clean, **env}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_compose_deploy_file_validates_with_the_settings_the_readme_promises() -> None:
    result = compose_config(DOCKER_GID="105")
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    beacon = config["services"]["beacon"]
    assert "/var/run/docker.sock:/var/run/docker.sock:ro" in beacon["volumes"]
    assert beacon["group_add"] == ["105"] or beacon["group_add"] == [105]
    assert beacon["networks"]["beacon"]["ipv4_address"] == "172.30.53.53"
    assert config["networks"]["beacon"]["ipam"]["config"] == [{"subnet": "172.30.53.0/24"}]
    assert beacon["command"][:5] == ["run", "--address-mode", "internal", "--network", "beacon"]
    assert beacon["read_only"] is True and beacon["cap_drop"] == ["ALL"]
    assert str(beacon["sysctls"]["net.ipv4.ip_unprivileged_port_start"]) == "0"
    ports = {_port(p) for p in beacon["ports"]}
    # Proxy on every address, API on loopback, DNS for the host's resolver on loopback.
    assert ports == {("", 80, 80, "tcp"), ("127.0.0.1", 8700, 8700, "tcp"),
                     ("127.0.0.1", 8600, 53, "udp"), ("127.0.0.1", 8600, 53, "tcp")}  # fmt: skip


def test_compose_deploy_file_names_the_missing_socket_group() -> None:
    result = compose_config()
    assert result.returncode != 0
    assert "DOCKER_GID" in result.stderr and "stat -c %g /var/run/docker.sock" in result.stderr


def test_compose_deploy_file_takes_another_subnet_and_address() -> None:
    result = compose_config(DOCKER_GID="105", BEACON_SUBNET="10.99.0.0/24", BEACON_DNS_IP="10.99.0.53")
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    assert config["services"]["beacon"]["networks"]["beacon"]["ipv4_address"] == "10.99.0.53"


def _port(entry: object) -> tuple[str, int, int, str]:
    """Short ('127.0.0.1:8600:53/udp') or long syntax -> (host ip, published, target, protocol)."""
    if isinstance(entry, dict):
        return (str(entry.get("host_ip", "")), int(entry["published"]), int(entry["target"]),
                str(entry.get("protocol", "tcp")))  # fmt: skip
    text, _, protocol = str(entry).partition("/")
    parts = text.split(":")
    host_ip = parts[0] if len(parts) == 3 else ""
    return host_ip, int(parts[-2]), int(parts[-1]), protocol or "tcp"


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    assert shutil.which("systemd-analyze"), "systemd-analyze is missing (make test-deps installs systemd)"
    # Point it at this checkout's beacon and an existing user; the rest as shipped.
    unit = (ROOT / "deploy/beacon.service").read_text()
    beacon = shutil.which("beacon") or str(Path(sys.executable).with_name("beacon"))
    unit = unit.replace("/opt/beacon/bin/beacon", beacon).replace("User=beacon", "User=root")
    unit = unit.replace("Group=beacon", "Group=root")
    path = tmp_path / "beacon.service"
    path.write_text(unit)
    result = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "beacon.service" not in result.stderr, result.stderr  # no warnings about our unit


def test_example_environment_file_is_a_valid_beacon_configuration() -> None:
    env: dict[str, str] = {}
    for line in (ROOT / "deploy/beacon.env").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key] = value
    config = build_config({}, env)
    assert [str(hp) for hp in config.dns_listen] == ["172.17.0.1:53", "127.0.0.1:8600"]
    assert str(config.proxy_listen) == "0.0.0.0:80" and str(config.api_listen) == "127.0.0.1:8700"
