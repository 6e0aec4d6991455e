"""Shared metrics plumbing: the exposition of the default registry, the naming
rule every Beacon metric follows, and a scrape-time collector for the catalog.

Naming: `beacon_<component>_<name>[_<unit>]` with help text; counters get
`_total` from prometheus_client, durations end in `_seconds`, sizes in
`_bytes`. `metric_name_problems()` checks the rule so a test can enforce it
over every metric the package defines.
"""

from __future__ import annotations

import platform
import re
from collections.abc import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Info, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from beacon import __version__
from beacon.registry.model import Snapshot, State

BUILD_INFO = Info("beacon_build", "Beacon's version and the Python running it (always 1)")
BUILD_INFO.info({"version": __version__, "python": platform.python_version()})


class DockerConnectionCollector(Collector):
    """`beacon_docker_connected`: 1 while the Docker source holds a live events
    stream, else 0 (also when Docker watching is off). Read at scrape time from
    the Beacon that started last."""

    def __init__(self) -> None:
        self._connected: Callable[[], bool] = lambda: False

    def attach(self, connected: Callable[[], bool]) -> None:
        self._connected = connected

    def collect(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily("beacon_docker_connected", "1 while connected to the Docker engine's events stream")
        gauge.add_metric([], 1.0 if self._connected() else 0.0)
        yield gauge

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("beacon_docker_connected", "1 while connected to the Docker engine's events stream")


DOCKER_CONNECTION = DockerConnectionCollector()
REGISTRY.register(DOCKER_CONNECTION)

COMPONENTS = ("registry", "dns", "proxy", "health", "store", "tls")
_NAME = re.compile(rf"beacon_({'|'.join(COMPONENTS)})_[a-z][a-z0-9_]*[a-z0-9]")
# Names issue 12 spells out (a user contract) outside that scheme: the usual
# <app>_build_info (family "beacon_build"), and the Docker connection alerts watch.
CONTRACT_NAMES = frozenset({"beacon_build", "beacon_docker_connected"})
# A name that measures time must end in the base unit (seconds, not ms).
_TIME_WORDS = frozenset({"duration", "latency", "delay", "timeout", "age", "time", "seconds", "ms"})


def exposition(registry: CollectorRegistry = REGISTRY) -> tuple[bytes, str]:
    """The text exposition of `registry` and its content type (for GET /metrics)."""
    return generate_latest(registry), CONTENT_TYPE_LATEST


def metric_name_problems(registry: CollectorRegistry = REGISTRY) -> list[str]:
    """Every Beacon metric in `registry` that breaks the naming rule, explained."""
    problems: list[str] = []
    for family in registry.collect():
        name = family.name
        if not name.startswith("beacon_"):
            continue  # process_*, python_* from prometheus_client itself
        if not _NAME.fullmatch(name) and name not in CONTRACT_NAMES:
            problems.append(f"{name}: expected beacon_<{'|'.join(COMPONENTS)}>_<name>[_<unit>]")
        if not family.documentation.strip():
            problems.append(f"{name}: no help text")
        words = set(name.split("_"))
        if words & _TIME_WORDS and not name.endswith("_seconds"):
            problems.append(f"{name}: a time measurement must end in _seconds")
        if "bytes" in words and not name.endswith("_bytes"):
            problems.append(f"{name}: a size must end in _bytes")
    return problems


class SnapshotCollector(Collector):
    """Catalog gauges computed at scrape time from the current snapshot.

    Computing them per scrape (not per publish) keeps the publish path free of
    an O(endpoints) count. One collector serves the process; `attach` points it
    at the catalog of the Beacon that started last (tests run several in turn).
    """

    def __init__(self) -> None:
        self._current: Callable[[], Snapshot] | None = None

    def attach(self, current: Callable[[], Snapshot]) -> None:
        self._current = current

    def detach(self, current: Callable[[], Snapshot]) -> None:
        if self._current == current:
            self._current = None

    def collect(self) -> Iterator[Metric]:
        current = self._current
        if current is None:
            return
        snap = current()
        index = GaugeMetricFamily(
            "beacon_registry_snapshot_index", "Index of the catalog snapshot currently published"
        )
        index.add_metric([], snap.index)
        yield index
        services = GaugeMetricFamily("beacon_registry_services", "Services in the catalog")
        services.add_metric([], len(snap.services))
        yield services
        counts = dict.fromkeys(State, 0)
        for ep in snap.endpoints.values():
            counts[ep.state] += 1
        endpoints = GaugeMetricFamily(
            "beacon_registry_endpoints", "Endpoints in the catalog by state", labels=["state"]
        )
        for state, n in counts.items():
            endpoints.add_metric([state.value], n)
        yield endpoints

    def describe(self) -> Iterator[Metric]:
        # Described without a catalog so registration never calls collect().
        yield GaugeMetricFamily("beacon_registry_snapshot_index", "")
        yield GaugeMetricFamily("beacon_registry_services", "")
        yield GaugeMetricFamily("beacon_registry_endpoints", "", labels=["state"])


# `*_created` series double the exposition and nothing of ours reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]
SNAPSHOT_COLLECTOR = SnapshotCollector()
REGISTRY.register(SNAPSHOT_COLLECTOR)
