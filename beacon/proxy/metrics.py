"""Proxy metrics, counted so the forwarding path stays fast.

The data path bumps plain ints in a per-service `ServiceStats` (one list index
per request, one bisect for the latency bucket); nothing touches a prometheus
object per request. At scrape time one `Collector` folds the counts of every
running ProxyServer - and of its worker processes, which report theirs over
their pipe - into the metric families listed in README.md "Metrics".

Requests that matched no route are counted under service "unrouted". A
service's counters are dropped when it leaves the catalog. A worker process
that dies leaves its last reported counters behind (kept by the parent), so
the sums never go backwards when it is replaced.
"""

from __future__ import annotations

import bisect
import threading
import weakref
from collections.abc import Iterator
from typing import Any, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import REGISTRY, Collector

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
UNROUTED = "unrouted"
CODE_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")


class ServiceStats:
    """Counters of one service (plain ints: the data path only adds)."""

    __slots__ = ("attempts", "buckets", "classes", "ejections", "retries", "total_seconds")

    def __init__(self) -> None:
        self.classes = [0] * 6  # index status // 100; 0 unused
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.total_seconds = 0.0
        self.attempts = 0
        self.retries = 0
        self.ejections = 0

    def observe(self, status: int, seconds: float) -> None:
        cls = status // 100
        if 1 <= cls <= 5:
            self.classes[cls] += 1
        self.buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.total_seconds += seconds

    def to_json(self) -> dict[str, Any]:
        return {
            "classes": self.classes,
            "buckets": self.buckets,
            "total_seconds": self.total_seconds,
            "attempts": self.attempts,
            "retries": self.retries,
            "ejections": self.ejections,
        }


class ProxyMetrics:
    """Every counter of one proxy process."""

    def __init__(self) -> None:
        self.services: dict[str, ServiceStats] = {}
        self.refused_connections = 0  # over --proxy-max-connections

    def service(self, name: str) -> ServiceStats:
        stats = self.services.get(name)
        if stats is None:
            stats = self.services[name] = ServiceStats()
        return stats

    def forget(self, name: str) -> None:
        """Drop the counters of a service that left the catalog: service names
        come and go with containers, and every worker sends all of its stats
        each second. (A returning service starts again from 0, which Prometheus
        reads as a counter reset.)"""
        if name != UNROUTED:
            self.services.pop(name, None)

    def to_json(
        self, client_connections: int, upstream_connections: int, conflicts: int, in_flight: dict[str, int]
    ) -> dict[str, Any]:
        """A plain-data copy (what worker processes send to the parent)."""
        return {
            "services": {name: s.to_json() for name, s in self.services.items()},
            "client_connections": client_connections,
            "upstream_connections": upstream_connections,
            "conflicts": conflicts,
            "in_flight": in_flight,
            "refused_connections": self.refused_connections,
        }


def fold_counters(into: dict[str, dict[str, Any]], services: dict[str, dict[str, Any]]) -> None:
    """Add per-service counters (`ServiceStats.to_json()` form) into `into`."""
    for name, s in services.items():
        m = into.setdefault(name, {
            "classes": [0] * 6, "buckets": [0] * (len(LATENCY_BUCKETS) + 1),
            "total_seconds": 0.0, "attempts": 0, "retries": 0, "ejections": 0,
        })  # fmt: skip
        m["classes"] = [a + b for a, b in zip(m["classes"], s["classes"], strict=True)]
        m["buckets"] = [a + b for a, b in zip(m["buckets"], s["buckets"], strict=True)]
        for key in ("total_seconds", "attempts", "retries", "ejections"):
            m[key] += s[key]


class MetricsSource(Protocol):
    def metrics_json(self) -> list[dict[str, Any]]:
        """One `ProxyMetrics.to_json()` per process this server runs."""
        ...


class ProxyCollector(Collector):
    def __init__(self) -> None:
        self._sources: weakref.WeakSet[MetricsSource] = weakref.WeakSet()
        self._lock = threading.Lock()

    def add(self, source: MetricsSource) -> None:
        with self._lock:
            self._sources.add(source)

    def remove(self, source: MetricsSource) -> None:
        with self._lock:
            self._sources.discard(source)

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            sources = list(self._sources)
        reports = [r for s in sources for r in s.metrics_json()]
        merged: dict[str, dict[str, Any]] = {}
        in_flight: dict[str, int] = {}
        clients = upstreams = conflicts = 0
        restarts = refused = dropped = 0
        for report in reports:
            clients += report["client_connections"]
            upstreams += report["upstream_connections"]
            conflicts = max(conflicts, report["conflicts"])  # every process has the same table
            restarts += report.get("worker_restarts", 0)  # only the parent's report has it
            refused += report.get("refused_connections", 0)
            dropped += report.get("access_log_dropped", 0)
            fold_counters(merged, report["services"])
            for name, n in report.get("in_flight", {}).items():
                in_flight[name] = in_flight.get(name, 0) + n
        requests = CounterMetricFamily(
            "beacon_proxy_requests", "HTTP responses sent by the proxy", labels=["service", "code_class"]
        )
        duration = HistogramMetricFamily(
            "beacon_proxy_request_duration_seconds",
            "Time from a request's header to the end of its response",
            labels=["service"],
        )
        attempts = CounterMetricFamily(
            "beacon_proxy_upstream_attempts", "Tries sent to an upstream endpoint", labels=["service"]
        )
        retries = CounterMetricFamily(
            "beacon_proxy_retries", "Tries after the first one (another endpoint)", labels=["service"]
        )
        ejections = CounterMetricFamily(
            "beacon_proxy_ejections", "Endpoints ejected by passive health checks", labels=["service"]
        )
        for name, m in sorted(merged.items()):
            for cls, label in enumerate(CODE_CLASSES, start=1):
                if m["classes"][cls]:
                    requests.add_metric([name, label], m["classes"][cls])
            running = 0
            cumulative: list[tuple[str, float]] = []
            for bound, count in zip((*LATENCY_BUCKETS, float("inf")), m["buckets"], strict=True):
                running += count
                cumulative.append(("+Inf" if bound == float("inf") else repr(bound), float(running)))
            duration.add_metric([name], cumulative, m["total_seconds"])
            attempts.add_metric([name], m["attempts"])
            retries.add_metric([name], m["retries"])
            ejections.add_metric([name], m["ejections"])
        yield requests
        yield duration
        yield attempts
        yield retries
        yield ejections
        open_connections = GaugeMetricFamily(
            "beacon_proxy_open_connections", "Open proxy connections", labels=["side"]
        )
        open_connections.add_metric(["client"], clients)
        open_connections.add_metric(["upstream"], upstreams)
        yield open_connections
        in_flight_gauge = GaugeMetricFamily(
            "beacon_proxy_in_flight_requests", "Tries (and tunnels) an upstream endpoint is serving now",
            labels=["service"],
        )
        for name, n in sorted(in_flight.items()):
            in_flight_gauge.add_metric([name], n)
        yield in_flight_gauge
        conflict_gauge = GaugeMetricFamily("beacon_proxy_route_conflicts", "Conflicting routes in the current table")
        conflict_gauge.add_metric([], conflicts)
        yield conflict_gauge
        restart_counter = CounterMetricFamily(
            "beacon_proxy_worker_restarts", "Proxy worker processes restarted after they exited unasked"
        )
        restart_counter.add_metric([], restarts)
        yield restart_counter
        refused_counter = CounterMetricFamily(
            "beacon_proxy_refused_connections", "Client connections refused at --proxy-max-connections"
        )
        refused_counter.add_metric([], refused)
        yield refused_counter
        dropped_counter = CounterMetricFamily(
            "beacon_proxy_access_log_dropped", "Access log lines dropped because the sink could not keep up"
        )
        dropped_counter.add_metric([], dropped)
        yield dropped_counter

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily("beacon_proxy_requests", "", labels=["service", "code_class"])
        yield HistogramMetricFamily("beacon_proxy_request_duration_seconds", "", labels=["service"])
        yield CounterMetricFamily("beacon_proxy_upstream_attempts", "", labels=["service"])
        yield CounterMetricFamily("beacon_proxy_retries", "", labels=["service"])
        yield CounterMetricFamily("beacon_proxy_ejections", "", labels=["service"])
        yield GaugeMetricFamily("beacon_proxy_open_connections", "", labels=["side"])
        yield GaugeMetricFamily("beacon_proxy_in_flight_requests", "", labels=["service"])
        yield GaugeMetricFamily("beacon_proxy_route_conflicts", "")
        yield CounterMetricFamily("beacon_proxy_worker_restarts", "")
        yield CounterMetricFamily("beacon_proxy_refused_connections", "")
        yield CounterMetricFamily("beacon_proxy_access_log_dropped", "")


COLLECTOR = ProxyCollector()
REGISTRY.register(COLLECTOR)
