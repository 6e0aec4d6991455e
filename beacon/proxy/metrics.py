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
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import REGISTRY, Collector

if TYPE_CHECKING:
    from beacon.registry.model import Endpoint

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
UNROUTED = "unrouted"


# Request methods counted by name; any other (a client may send any token) is
# "OTHER", so the method label stays bounded whatever clients send.
METHODS = ("OTHER", "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE")
_METHOD_INDEX = {name.encode(): i * 1000 for i, name in enumerate(METHODS) if i}
OTHER_CODE = "other"  # a status outside 100-599 (never sent by a conforming upstream)


def _response_key(method: bytes, status: int) -> int:
    """method and status in one int: index * 1000 + status (0: out of range)."""
    return _METHOD_INDEX.get(method, 0) + (status if 100 <= status <= 599 else 0)


def response_status(key: int) -> int:
    """The status of a `_response_key` (0: out of range)."""
    return key % 1000


def response_labels(key: int) -> tuple[str, str]:
    """(method, code) of a `_response_key`."""
    status = response_status(key)
    return METHODS[key // 1000], str(status) if status else OTHER_CODE


class EndpointStats:
    """Counters of one endpoint (by id) within its service."""

    __slots__ = ("attempts", "ejections", "failures")

    def __init__(self) -> None:
        self.attempts = 0
        self.ejections = 0
        self.failures: dict[str, int] = {}  # FailureKind name (lowercase) -> count

    def to_json(self) -> dict[str, Any]:
        return {"attempts": self.attempts, "ejections": self.ejections, "failures": self.failures}


class ServiceStats:
    """Counters of one service (plain ints: the data path only adds)."""

    __slots__ = ("attempts", "buckets", "codes", "ejections", "endpoints", "retries", "total_seconds")

    def __init__(self) -> None:
        self.codes: dict[int, int] = {}  # _response_key(method, status) -> responses
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.total_seconds = 0.0
        self.attempts = 0
        self.retries = 0
        self.ejections = 0
        self.endpoints: dict[str, EndpointStats] = {}  # endpoint id -> its counters

    def observe(self, status: int, seconds: float, method: bytes = b"") -> None:
        key = _response_key(method, status)
        codes = self.codes
        codes[key] = codes.get(key, 0) + 1
        self.buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.total_seconds += seconds

    def endpoint(self, endpoint_id: str) -> EndpointStats:
        stats = self.endpoints.get(endpoint_id)
        if stats is None:
            stats = self.endpoints[endpoint_id] = EndpointStats()
        return stats

    def attempt(self, endpoint_id: str, retry: bool) -> None:
        """A try sent to an endpoint (`retry`: not the request's first)."""
        self.attempts += 1
        if retry:
            self.retries += 1
        self.endpoint(endpoint_id).attempts += 1


    def to_json(self) -> dict[str, Any]:
        return {
            "codes": {str(key): n for key, n in self.codes.items()},
            "buckets": self.buckets,
            "total_seconds": self.total_seconds,
            "attempts": self.attempts,
            "retries": self.retries,
            "ejections": self.ejections,
            "endpoints": {eid: e.to_json() for eid, e in self.endpoints.items()},
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

    # A try's outcome can arrive after its endpoint (or service) left the catalog
    # and its counters were dropped (a draining request): it must not bring
    # them back, so these only count into counters that exist. Counters of an
    # endpoint are created by `ServiceStats.attempt`, always of a live endpoint.
    def failed(self, service: str, endpoint_id: str, kind: str) -> None:
        """A try at an endpoint failed (`kind`: a FailureKind's name)."""
        stats = self.services.get(service)
        ep = stats.endpoints.get(endpoint_id) if stats is not None else None
        if ep is not None:
            ep.failures[kind] = ep.failures.get(kind, 0) + 1

    def ejected(self, service: str, endpoint_id: str) -> None:
        """Passive health checks ejected an endpoint."""
        stats = self.services.get(service)
        if stats is not None:
            stats.ejections += 1
            ep = stats.endpoints.get(endpoint_id)
            if ep is not None:
                ep.ejections += 1

    def forget_endpoint(self, service: str, endpoint_id: str, endpoints: Mapping[str, Endpoint]) -> None:
        """Drop an endpoint's counters when it left the catalog or moved to
        another service (`endpoints`: the new snapshot's), as `forget` does for
        services: endpoint ids come and go with containers."""
        ep = endpoints.get(endpoint_id)
        if ep is None or ep.service != service:
            stats = self.services.get(service)
            if stats is not None:
                stats.endpoints.pop(endpoint_id, None)

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


def _add_counts(into: dict[str, int], more: Mapping[str, int]) -> None:
    for key, n in more.items():
        into[key] = into.get(key, 0) + n


def fold_counters(into: dict[str, dict[str, Any]], services: dict[str, dict[str, Any]]) -> None:
    """Add per-service counters (`ServiceStats.to_json()` form) into `into`."""
    for name, s in services.items():
        m = into.setdefault(name, {
            "codes": {}, "buckets": [0] * (len(LATENCY_BUCKETS) + 1),
            "total_seconds": 0.0, "attempts": 0, "retries": 0, "ejections": 0, "endpoints": {},
        })  # fmt: skip
        _add_counts(m["codes"], s["codes"])
        m["buckets"] = [a + b for a, b in zip(m["buckets"], s["buckets"], strict=True)]
        for key in ("total_seconds", "attempts", "retries", "ejections"):
            m[key] += s[key]
        for eid, e in s.get("endpoints", {}).items():
            mine = m["endpoints"].setdefault(eid, {"attempts": 0, "ejections": 0, "failures": {}})
            mine["attempts"] += e["attempts"]
            mine["ejections"] += e["ejections"]
            _add_counts(mine["failures"], e["failures"])


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
        # One counter, as Traefik's traefik_service_requests_total{code,method,...}:
        # a class (5xx) is a query away (code=~"5.."), not a second counter.
        requests = CounterMetricFamily(
            "beacon_proxy_requests", "HTTP responses sent by the proxy, by request method and status code",
            labels=["service", "method", "code"],
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
        endpoint_attempts = CounterMetricFamily(
            "beacon_proxy_endpoint_attempts", "Tries sent to one endpoint", labels=["service", "endpoint"]
        )
        endpoint_failures = CounterMetricFamily(
            "beacon_proxy_endpoint_failures", "Tries at one endpoint that failed, by why",
            labels=["service", "endpoint", "kind"],
        )
        endpoint_ejections = CounterMetricFamily(
            "beacon_proxy_endpoint_ejections", "Passive-health ejections of one endpoint", labels=["service", "endpoint"]
        )
        for name, m in sorted(merged.items()):
            for key, n in sorted((int(k), n) for k, n in m["codes"].items()):
                requests.add_metric([name, *response_labels(key)], n)
            for eid, e in sorted(m["endpoints"].items()):
                endpoint_attempts.add_metric([name, eid], e["attempts"])
                endpoint_ejections.add_metric([name, eid], e["ejections"])
                for kind, n in sorted(e["failures"].items()):
                    endpoint_failures.add_metric([name, eid, kind], n)
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
        yield endpoint_attempts
        yield endpoint_failures
        yield endpoint_ejections
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
        yield CounterMetricFamily("beacon_proxy_requests", "", labels=["service", "method", "code"])
        yield HistogramMetricFamily("beacon_proxy_request_duration_seconds", "", labels=["service"])
        yield CounterMetricFamily("beacon_proxy_upstream_attempts", "", labels=["service"])
        yield CounterMetricFamily("beacon_proxy_retries", "", labels=["service"])
        yield CounterMetricFamily("beacon_proxy_ejections", "", labels=["service"])
        yield CounterMetricFamily("beacon_proxy_endpoint_attempts", "", labels=["service", "endpoint"])
        yield CounterMetricFamily("beacon_proxy_endpoint_failures", "", labels=["service", "endpoint", "kind"])
        yield CounterMetricFamily("beacon_proxy_endpoint_ejections", "", labels=["service", "endpoint"])
        yield GaugeMetricFamily("beacon_proxy_open_connections", "", labels=["side"])
        yield GaugeMetricFamily("beacon_proxy_in_flight_requests", "", labels=["service"])
        yield GaugeMetricFamily("beacon_proxy_route_conflicts", "")
        yield CounterMetricFamily("beacon_proxy_worker_restarts", "")
        yield CounterMetricFamily("beacon_proxy_refused_connections", "")
        yield CounterMetricFamily("beacon_proxy_access_log_dropped", "")


COLLECTOR = ProxyCollector()
REGISTRY.register(COLLECTOR)
