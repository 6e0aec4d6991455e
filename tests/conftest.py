"""Shared fixtures: the real Docker engine, the suite's own images, throwaway containers.

Docker tests are marked `docker`. When the engine is unreachable they fail with
a clear message; only an explicit BEACON_SKIP_DOCKER=1 turns them into skips
(for a laptop without Docker - never set in CI).
"""

from __future__ import annotations

import datetime
import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest
from docker.models.containers import Container
from docker.models.networks import Network

ROOT = Path(__file__).resolve().parent.parent
BUSYBOX_IMAGE = "beacon-test/busybox:latest"
# Every container and network the suite creates carries this label, so a
# crashed run's leftovers can be found and removed by the next one.
TEST_LABEL = "beacon.test.run"
RUN_ID = uuid.uuid4().hex[:8]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("BEACON_SKIP_DOCKER") == "1" and os.environ.get("CI"):
        raise pytest.UsageError("BEACON_SKIP_DOCKER=1 is not allowed in CI: Docker tests must run")


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    if os.environ.get("BEACON_SKIP_DOCKER") == "1":
        pytest.skip("BEACON_SKIP_DOCKER=1: Docker tests skipped on request")
    try:
        client = docker.from_env(timeout=60)
        client.ping()
    except Exception as exc:
        pytest.fail(
            f"Docker engine unreachable ({exc}). The suite needs a running Docker daemon; "
            "set BEACON_SKIP_DOCKER=1 to skip Docker tests locally.",
            pytrace=False,
        )
    _remove_leftovers(client)
    yield client
    _remove_leftovers(client, RUN_ID)
    client.close()


def _remove_leftovers(client: docker.DockerClient, run_id: str | None = None) -> None:
    label = TEST_LABEL if run_id is None else f"{TEST_LABEL}={run_id}"
    # Other sessions may be running on the same engine right now: without a
    # run id, only what is old enough to belong to a crashed run is removed.
    def stale(attrs: dict[str, Any]) -> bool:
        created = str(attrs.get("Created") or "")[:19]  # ISO, nanoseconds dropped
        try:
            born = datetime.datetime.strptime(created, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=datetime.UTC)
        except ValueError:
            return True
        return run_id is not None or time.time() - born.timestamp() > 600

    for c in client.containers.list(all=True, filters={"label": label}):
        if not stale(c.attrs):
            continue
        try:
            c.remove(force=True)
        except docker.errors.APIError:
            pass
    for n in client.networks.list(filters={"label": label}):
        if not stale(n.attrs):
            continue
        try:
            n.remove()
        except docker.errors.APIError:
            pass


@pytest.fixture(scope="session")
def busybox_image(docker_client: docker.DockerClient) -> str:
    """The suite's busybox image (built by `make images`; built here if missing)."""
    try:
        docker_client.images.get(BUSYBOX_IMAGE)
    except docker.errors.ImageNotFound:
        subprocess.run(["bash", str(ROOT / "tests/images/build.sh")], check=True)
    return BUSYBOX_IMAGE


ContainerFactory = Callable[..., Container]


@pytest.fixture
def run_container(docker_client: docker.DockerClient, busybox_image: str) -> Iterator[ContainerFactory]:
    """Start a busybox container (detached, removed after the test).

    Defaults to a web server on port 80 (`httpd -f`) answering with the
    container's hostname; pass `command=` for anything else. Extra keyword
    arguments go to `containers.run`.
    """
    created: list[Container] = []

    def start(**kwargs: Any) -> Container:
        labels = {TEST_LABEL: RUN_ID, **kwargs.pop("labels", {})}
        kwargs.setdefault("command", ["sh", "-c", HTTPD_HOSTNAME])
        kwargs.setdefault("name", f"bt-{RUN_ID}-{uuid.uuid4().hex[:6]}")
        container = docker_client.containers.run(
            kwargs.pop("image", busybox_image), detach=True, labels=labels, **kwargs
        )
        created.append(container)
        return container

    yield start
    for c in created:
        try:
            c.remove(force=True, v=True)
        except docker.errors.APIError:
            pass


# A web server whose index page is the container's hostname: tests can tell
# which backend answered. SIGTERM stops it at once (trap), like a well-behaved app.
HTTPD_HOSTNAME = (
    "mkdir -p /www && hostname > /www/index.html && echo ok > /www/health && "
    "trap 'exit 0' TERM; httpd -f -p 80 -h /www & wait"
)


@pytest.fixture
def make_network(docker_client: docker.DockerClient) -> Iterator[Callable[..., Network]]:
    created: list[Network] = []

    def make(**kwargs: Any) -> Network:
        name = kwargs.pop("name", f"bt-{RUN_ID}-{uuid.uuid4().hex[:6]}")
        labels = {TEST_LABEL: RUN_ID, **kwargs.pop("labels", {})}
        network = docker_client.networks.create(name, labels=labels, **kwargs)
        created.append(network)
        return network

    yield make
    for n in created:
        try:
            n.reload()
            for c in n.containers:
                try:
                    n.disconnect(c, force=True)
                except docker.errors.APIError:
                    pass
            n.remove()
        except docker.errors.APIError:
            pass
