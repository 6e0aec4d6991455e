"""The Docker source against the real engine: events, drains, health, networks, reconnects.

Each test drives a `Catalog` + `DockerSource` directly. Other suites run
containers on the same engine at the same time, so assertions only look at the
containers a test created itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import random
import socket
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import docker
import pytest
from docker.models.containers import Container

from beacon.registry.catalog import Catalog
from beacon.registry.docker import DockerSource, detect_host_ip, usable_host_ip
from beacon.registry.model import Endpoint, Source, State
from tests.conftest import RUN_ID, ContainerFactory
from tests.helpers import eventually
from tests.helpers import test_config as make_config  # aliased: pytest would collect test_*

pytestmark = pytest.mark.docker

LOOPBACK_PORT = {"80/tcp": ("127.0.0.1", None)}  # published on loopback, random host port
# Like the default web server, but SIGTERM takes ~2 s to finish (a draining app).
SLOW_STOP = (
    "mkdir -p /www && hostname > /www/index.html && "
    "trap 'sleep 2; exit 0' TERM; trap '' HUP; httpd -f -p 80 -h /www & wait; wait"
)
# A web server whose /health appears only when the test creates it.
NO_HEALTH_YET = "mkdir -p /www && hostname > /www/index.html && trap 'exit 0' TERM; httpd -f -p 80 -h /www & wait"
HEALTHCHECK = {
    "test": ["CMD-SHELL", "wget -q -O- http://127.0.0.1/health"],
    "interval": 300_000_000,  # ns
    "timeout": 2_000_000_000,
    "retries": 1,
    # Failures while "starting" do not count: the container stays "starting"
    # until its first success, so the test controls the transitions.
    "start_period": 60_000_000_000,
}

Watch = Callable[..., Awaitable[tuple[Catalog, DockerSource]]]


@pytest.fixture
async def watch() -> AsyncIterator[Watch]:
    """Start a DockerSource on a (new or given) catalog; stopped after the test."""
    started: list[DockerSource] = []

    async def make(catalog: Catalog | None = None, **overrides: Any) -> tuple[Catalog, DockerSource]:
        cat = catalog if catalog is not None else Catalog()
        tuning = {k: overrides.pop(k) for k in ("backoff_initial", "backoff_max") if k in overrides}
        source = DockerSource(make_config(**overrides), cat, node="test-node", **tuning)
        await source.start()
        started.append(source)
        return cat, source

    yield make
    for source in reversed(started):
        await source.stop()


def mine(catalog: Catalog, container: Container) -> list[Endpoint]:
    """The published endpoints of one container, by id."""
    return sorted(
        (e for e in catalog.snapshot.endpoints.values() if e.source.container_id == container.id),
        key=lambda e: e.id,
    )


def exactly(n: int, catalog: Catalog, container: Container) -> list[Endpoint] | None:
    eps = mine(catalog, container)
    return eps if len(eps) == n else None


def host_port(container: Container, key: str = "80/tcp") -> int:
    container.reload()
    return int(container.attrs["NetworkSettings"]["Ports"][key][0]["HostPort"])


def states(catalog: Catalog, container: Container) -> list[str]:
    return [e.state.value for e in mine(catalog, container)]


def unique(prefix: str) -> str:
    return f"bt-{RUN_ID}-{prefix}-{uuid.uuid4().hex[:6]}"


# ---------------------------------------------------------------- lifecycle
async def test_listed_and_started_containers_are_registered_and_removed(
    run_container: ContainerFactory, watch: Watch
) -> None:
    before = run_container(ports=LOOPBACK_PORT)  # found by the first list
    cat, source = await watch()
    assert source.connected
    after = run_container(ports=LOOPBACK_PORT, name=unique("Late_Web"))  # found by its start event

    for c in (before, after):
        (ep,) = await eventually(lambda c=c: mine(cat, c))  # type: ignore[misc]
        assert ep.id == f"{c.id[:12]}-80"
        assert (ep.address, ep.port, ep.protocol) == ("127.0.0.1", host_port(c), "tcp")
        assert ep.state is State.PASSING
        assert ep.node == "test-node"
        assert ep.source == Source("container", container_id=c.id, container_name=c.name)
        assert ep.service in cat.snapshot.services
    assert mine(cat, after)[0].service == after.name.lower().replace("_", "-")

    # stop (SIGTERM, exits at once), SIGKILL and force-remove: all leave the catalog.
    killed = run_container(ports=LOOPBACK_PORT)
    await eventually(lambda: mine(cat, killed))
    await asyncio.to_thread(before.stop, timeout=5)
    await asyncio.to_thread(killed.kill)
    await asyncio.to_thread(after.remove, force=True)
    for c in (before, killed, after):
        await eventually(lambda c=c: not mine(cat, c))  # type: ignore[misc]


async def test_sigterm_drains_while_the_container_still_runs(
    run_container: ContainerFactory, watch: Watch
) -> None:
    cat, _ = await watch()
    c = run_container(ports=LOOPBACK_PORT, command=["sh", "-c", SLOW_STOP])
    await eventually(lambda: states(cat, c) == ["passing"])

    # Other signals (SIGHUP: reload) do not drain. The pause that follows is
    # seen after the HUP in the same event stream, so once the endpoint turns
    # critical, the HUP has been handled too.
    await asyncio.to_thread(c.kill, signal="SIGHUP")
    await asyncio.to_thread(c.pause)
    await eventually(lambda: states(cat, c) == ["critical"])
    await asyncio.to_thread(c.unpause)
    await eventually(lambda: states(cat, c) == ["passing"])

    stopping = asyncio.ensure_future(asyncio.to_thread(c.stop, timeout=10))
    await eventually(lambda: states(cat, c) == ["draining"], timeout=5, interval=0.02)
    c.reload()
    assert c.status == "running", "draining must be visible before the process exits"
    await stopping
    await eventually(lambda: not mine(cat, c))


async def test_docker_healthcheck_maps_to_state(run_container: ContainerFactory, watch: Watch) -> None:
    cat, _ = await watch()
    c = run_container(ports=LOOPBACK_PORT, command=["sh", "-c", NO_HEALTH_YET], healthcheck=HEALTHCHECK)
    await eventually(lambda: states(cat, c) == ["critical"])
    c.reload()
    assert c.attrs["State"]["Health"]["Status"] == "starting"  # starting -> critical, not routed

    await asyncio.to_thread(c.exec_run, ["sh", "-c", "echo ok > /www/health"])
    await eventually(lambda: states(cat, c) == ["passing"])  # healthy -> passing

    await asyncio.to_thread(c.exec_run, ["rm", "/www/health"])
    await eventually(lambda: states(cat, c) == ["critical"])  # unhealthy -> critical
    c.reload()
    assert c.attrs["State"]["Health"]["Status"] == "unhealthy"


# ------------------------------------------------------------ ports, labels
async def test_multi_port_and_beacon_labels(
    run_container: ContainerFactory, watch: Watch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="beacon.registry.docker")
    cat, _ = await watch()
    shop = unique("shop")
    c = run_container(
        ports={"80/tcp": ("127.0.0.1", None), "8080/tcp": ("127.0.0.1", None)},
        labels={
            "beacon.service": shop,
            "beacon.8080.service": f"{shop}-admin",
            "beacon.tags": "blue,v2",
            "beacon.weight": "heavy",  # invalid: logged, default used
            "beacon.meta.team": "payments",
            "beacon.lb": "least_conn",
        },
    )
    eps = await eventually(lambda: exactly(2, cat, c))
    web, admin = eps
    assert (web.id, web.service, web.port) == (f"{c.id[:12]}-80", f"{shop}-80", host_port(c, "80/tcp"))
    assert (admin.id, admin.service, admin.port) == (f"{c.id[:12]}-8080", f"{shop}-admin", host_port(c, "8080/tcp"))
    for ep in eps:
        assert ep.tags == ("blue", "v2")
        assert ep.weight == 1
        assert dict(ep.meta) == {"team": "payments"}
        assert ep.lb == "least_conn"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(c.id[:12] in w and "beacon.weight='heavy'" in w for w in warnings), warnings

    # beacon.port picks one of several ports; beacon.enable=false excludes a container.
    one = run_container(
        ports={"80/tcp": ("127.0.0.1", None), "8080/tcp": ("127.0.0.1", None)},
        labels={"beacon.port": "8080", "beacon.service": unique("one")},
    )
    off = run_container(ports=LOOPBACK_PORT, labels={"beacon.enable": "false"})
    (ep,) = await eventually(lambda: mine(cat, one))
    assert (ep.port, ep.service) == (host_port(one, "8080/tcp"), one.labels["beacon.service"])
    await eventually(lambda: any(off.id[:12] in r.getMessage() and "ignored:" in r.getMessage() for r in caplog.records))
    assert mine(cat, off) == []


async def test_registrator_variables(run_container: ContainerFactory, watch: Watch) -> None:
    cat, _ = await watch()
    billing = unique("billing")
    c = run_container(
        ports={"80/tcp": ("127.0.0.1", None), "443/tcp": ("127.0.0.1", None)},
        environment={"SERVICE_NAME": billing, "SERVICE_TAGS": "legacy,eu", "SERVICE_443_NAME": f"{billing}-tls"},
        labels={"SERVICE_TAGS": "primary"},  # a label beats the same variable in env
    )
    ignored = run_container(ports=LOOPBACK_PORT, environment={"SERVICE_IGNORE": "1"})
    port_ignored = run_container(
        ports={"80/tcp": ("127.0.0.1", None), "443/tcp": ("127.0.0.1", None)},
        environment={"SERVICE_443_IGNORE": "true"},
    )
    eps = await eventually(lambda: exactly(2, cat, c))
    # Ids sort "-443" before "-80". Tags: the label SERVICE_TAGS replaced the env one.
    assert [(e.service, e.tags) for e in eps] == [(f"{billing}-tls", ("primary",)), (f"{billing}-80", ("primary",))]
    (only,) = await eventually(lambda: mine(cat, port_ignored))
    assert only.id == f"{port_ignored.id[:12]}-80"
    assert mine(cat, ignored) == []


# ------------------------------------------------------- networks, addresses
async def test_internal_mode_networks(
    run_container: ContainerFactory, make_network: Callable[..., Any], watch: Watch
) -> None:
    sub = random.randrange(1, 0xFFFF)
    net_a = make_network(
        name=unique("a"), enable_ipv6=True,
        ipam=docker.types.IPAMConfig(pool_configs=[docker.types.IPAMPool(subnet=f"fd00:bea:{sub:x}::/64")]),
    )
    net_z = make_network(name=unique("z"))
    # Docker allocates both IPv4 subnets (the IPv6 one is ours), none is fixed.
    # Published on loopback only, so port 80 is exposed; the others name their
    # port with beacon.port (the test image exposes none).
    multi = run_container(network=net_z.name, ports=LOOPBACK_PORT)
    net_a.connect(multi)
    picked = run_container(network=net_z.name, labels={"beacon.network": net_z.name, "beacon.port": "80"})
    net_a.connect(picked)

    cat, _ = await watch(address_mode="internal")
    eps = await eventually(lambda: mine(cat, multi))
    multi.reload()
    nets = multi.attrs["NetworkSettings"]["Networks"]
    # Several networks, none chosen: the first by name (a), deterministically.
    assert [(e.id, e.address, e.port) for e in eps] == [
        (f"{multi.id[:12]}-80", nets[net_a.name]["IPAddress"], 80),
        (f"{multi.id[:12]}-80-1", nets[net_a.name]["GlobalIPv6Address"], 80),
    ]
    assert eps[1].is_ipv6
    # The label beacon.network picks the other one.
    (ep,) = await eventually(lambda: mine(cat, picked))
    picked.reload()
    assert ep.address == picked.attrs["NetworkSettings"]["Networks"][net_z.name]["IPAddress"]

    # --network: a container not on it is ignored until it connects (network events).
    cat2, _ = await watch(address_mode="internal", network=net_z.name)
    late = run_container(network=net_a.name, labels={"beacon.port": "80"})
    await eventually(lambda: mine(cat2, multi))
    assert mine(cat2, late) == []
    await asyncio.to_thread(net_z.connect, late)
    (ep,) = await eventually(lambda: mine(cat2, late))
    late.reload()
    assert ep.address == late.attrs["NetworkSettings"]["Networks"][net_z.name]["IPAddress"]
    await asyncio.to_thread(net_z.disconnect, late)
    await eventually(lambda: not mine(cat2, late))


async def test_host_mode_advertises_loopback_bindings_as_loopback(
    run_container: ContainerFactory, watch: Watch
) -> None:
    # Even with an advertised host address, a port published only on 127.0.0.1
    # is reachable only there.
    cat, _ = await watch(advertise_ip="192.0.2.77")
    c = run_container(ports={"80/tcp": ("127.0.0.1", None), "81/tcp": ("::1", None)})
    eps = await eventually(lambda: exactly(2, cat, c))
    c.reload()
    ports = c.attrs["NetworkSettings"]["Ports"]
    assert {(e.address, e.port) for e in eps} == {
        ("127.0.0.1", int(ports["80/tcp"][0]["HostPort"])),
        ("::1", int(ports["81/tcp"][0]["HostPort"])),
    }


def test_detected_host_address_is_a_local_routable_address() -> None:
    ip = detect_host_ip()
    assert ip is not None, "this machine has a default route"
    assert usable_host_ip(ip)
    with socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET) as s:
        s.bind((ip, 0))  # only possible for an address of this host
    for bad in ("0.0.0.0", "127.0.0.1", "127.0.1.1", "::", "::1", "169.254.1.1", ""):
        assert not usable_host_ip(bad)


async def test_rename_changes_the_service_name(run_container: ContainerFactory, watch: Watch) -> None:
    cat, _ = await watch()
    c = run_container(ports=LOOPBACK_PORT)
    await eventually(lambda: mine(cat, c))
    new_name = unique("renamed")
    await asyncio.to_thread(c.rename, new_name)
    (ep,) = await eventually(lambda: [e for e in mine(cat, c) if e.service == new_name])
    assert ep.source.container_name == new_name
    assert new_name in cat.snapshot.services


# ------------------------------------------------------------- convergence
async def test_restarted_watcher_converges_without_ghosts(
    run_container: ContainerFactory, watch: Watch
) -> None:
    gone, stays = run_container(ports=LOOPBACK_PORT), run_container(ports=LOOPBACK_PORT)
    cat, first = await watch()
    await eventually(lambda: mine(cat, gone) and mine(cat, stays))
    await first.stop()

    # Beacon is down while containers come and go: every event is missed.
    await asyncio.to_thread(gone.stop, timeout=5)
    new = run_container(ports=LOOPBACK_PORT)
    assert mine(cat, gone), "nobody is watching: the catalog still holds the stale endpoint"

    # A new watcher on the same catalog (missed events) and on a fresh one (restart).
    for catalog in (cat, None):
        cat2, _ = await watch(catalog=catalog)
        await eventually(lambda cat2=cat2: not mine(cat2, gone) and mine(cat2, stays) and mine(cat2, new))  # type: ignore[misc]


async def test_resync_is_a_diff_and_repairs_drift(run_container: ContainerFactory, watch: Watch) -> None:
    c = run_container(ports=LOOPBACK_PORT)
    cat, source = await watch(resync_interval=1.0)
    await eventually(lambda: mine(cat, c))
    key = f"container:{c.id}"

    # Steady state: resyncs find nothing new for our container and re-set nothing.
    changed: list[str] = []
    original = cat.set_source

    def recording(source_key: str, endpoints: Any) -> bool:
        result = original(source_key, endpoints)
        if result:
            changed.append(source_key)
        return result

    cat.set_source = recording  # type: ignore[method-assign]
    syncs = source.syncs
    await eventually(lambda: source.syncs >= syncs + 2, timeout=10)
    assert key not in changed

    # Drift (as after a missed event): a lost endpoint comes back, a ghost goes.
    ghost_id = "f" * 64
    ghost = Endpoint(
        id="ghost-1", service=unique("ghost"), address="127.0.0.1", port=9,
        source=Source("container", container_id=ghost_id, container_name="ghost"),
    )
    original(f"container:{ghost_id}", [ghost])
    original(key, [])
    await eventually(lambda: mine(cat, c) and "ghost-1" not in cat.snapshot.endpoints, timeout=10)


def engine_socket() -> str:
    """The unix socket the suite's Docker client uses."""
    host = os.environ.get("DOCKER_HOST", "")
    if host and not host.startswith("unix://"):
        pytest.fail(f"the relay test needs a unix-socket Docker engine, DOCKER_HOST={host}")
    return host.removeprefix("unix://") or "/var/run/docker.sock"


@pytest.fixture
def short_tmp() -> Iterator[str]:
    """A short directory path (unix socket paths are limited to ~100 bytes)."""
    with tempfile.TemporaryDirectory(prefix="beacon-relay-") as path:
        yield path


class SocketRelay:
    """A unix-socket relay to the Docker engine that the test can cut and restore."""

    def __init__(self, target: str, path: str) -> None:
        self.target, self.path = target, path
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._handle, path=self.path)

    async def cut(self) -> None:
        """Refuse new connections and abort every relayed one (both sides)."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    async def stop(self) -> None:
        await self.cut()
        for t in list(self._tasks):
            t.cancel()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_unix_connection(self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            dst.close()


async def test_event_stream_cut_mid_run_loses_nothing(
    run_container: ContainerFactory, watch: Watch, short_tmp: str
) -> None:
    relay = SocketRelay(engine_socket(), os.path.join(short_tmp, "docker.sock"))
    await relay.start()
    try:
        before = run_container(ports=LOOPBACK_PORT)
        cat, source = await watch(docker_host=f"unix://{relay.path}", backoff_initial=0.05, backoff_max=0.5)
        await eventually(lambda: mine(cat, before))
        sessions = source.sessions

        await relay.cut()
        await eventually(lambda: not source.connected)
        # While the stream is down: one container stops, another starts.
        await asyncio.to_thread(before.stop, timeout=5)
        during = run_container(ports=LOOPBACK_PORT)
        await asyncio.sleep(1.0)  # several failed reconnects (refused) happen here
        assert mine(cat, before) and not mine(cat, during), "the cut watcher saw nothing"

        await relay.start()
        await eventually(lambda: source.connected and source.sessions > sessions)
        await eventually(lambda: not mine(cat, before) and mine(cat, during))
        # And the new stream delivers events again.
        after = run_container(ports=LOOPBACK_PORT)
        await eventually(lambda: mine(cat, after))
    finally:
        await relay.stop()


# 300 over-long beacon.meta.* labels (~1.2 MB): each one a problem.
HOSTILE_META = {f"beacon.meta.k{j}": "v" * 4100 for j in range(300)}


def invalid_lines(caplog: pytest.LogCaptureFixture, container: Container) -> list[str]:
    return [
        m for r in caplog.records
        if r.levelno >= logging.WARNING and (m := r.getMessage()).startswith("invalid:") and container.id[:12] in m
    ]  # fmt: skip


async def test_hostile_labels_log_a_few_lines_once_not_one_per_problem_per_resync(
    run_container: ContainerFactory, watch: Watch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="beacon.registry.docker")
    c = run_container(ports=LOOPBACK_PORT, labels={"beacon.service": unique("hostile"), **HOSTILE_META})
    cat, source = await watch(resync_interval=1.0)
    await eventually(lambda: mine(cat, c))
    lines = invalid_lines(caplog, c)
    assert len(lines) == 6, lines[:8]  # the first 5 problems, then how many more
    assert all("beacon.meta.k" in m and "longer than 4096" in m for m in lines[:5]), lines
    assert "and 295 more label problems" in lines[5] and "--log-level debug" in lines[5], lines[5]
    syncs = source.syncs
    await eventually(lambda: source.syncs >= syncs + 2, timeout=10)
    assert len(invalid_lines(caplog, c)) == 6  # an unchanged container: nothing logged again


async def test_a_crash_looping_container_logs_its_label_problems_once(
    run_container: ContainerFactory, watch: Watch, caplog: pytest.LogCaptureFixture
) -> None:
    """Between two runs Docker reports it restarting (no ports): it is kept,
    critical, and its verdict keeps the label problems, so running again
    does not log them all anew at every turn of the loop."""
    caplog.set_level(logging.WARNING, logger="beacon.registry.docker")
    cat, _ = await watch()
    states: list[str] = []
    c = run_container(
        ports=LOOPBACK_PORT, labels={"beacon.service": unique("crashy"), **HOSTILE_META},
        command=["sh", "-c", "sleep 0.5; exit 3"], restart_policy={"Name": "always"},
    )  # fmt: skip

    def turns() -> int:
        """Runs seen after a restarting phase (critical, then running again)."""
        eps = mine(cat, c)
        state = "absent" if not eps else "restarting" if eps[0].reason.startswith("restarting") else "running"
        if not states or states[-1] != state:
            states.append(state)
        return sum(1 for a, b in itertools.pairwise(states) if (a, b) == ("restarting", "running"))

    await eventually(lambda: turns() >= 2, timeout=30, interval=0.02)
    assert len(invalid_lines(caplog, c)) == 6, (states, len(invalid_lines(caplog, c)))
