"""DNS metrics, counted so the answer path stays fast.

The hot path only bumps plain ints (a cache entry's `hits`, a dict slot);
nothing touches a prometheus object per query. At scrape time one `Collector`
folds the counts of every running DnsServer into metric families:

  beacon_dns_queries_total{type,rcode}         answered queries
  beacon_dns_forwarded_queries_total           queries sent upstream
  beacon_dns_upstream_failures_total{upstream,reason}   timeout | servfail | refused | error
  beacon_dns_dropped_packets_total{reason}     not answered: short, response, send_error, overload
  beacon_dns_answer_latency_seconds{path}      cache | resolve | forward
  beacon_dns_cache_entries                     packed answers held now

Cache hits are timed per read batch (one clock read per batch, not per
query) and recorded as that batch's average, weighted by its size.
"""

from __future__ import annotations

import bisect
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import REGISTRY, Collector, CollectorRegistry

from beacon.dns.resolver import qtype_name

LATENCY_BUCKETS = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip
RCODE_NAMES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}
INVALID_QTYPE = -1  # a packet too broken to have a question


class Histogram:
    """Bucket counts as plain ints; exported cumulatively at scrape time."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.total = 0.0

    def observe(self, seconds: float, n: int = 1) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += n
        self.total += seconds * n

    def cumulative(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip((*LATENCY_BUCKETS, float("inf")), self.counts, strict=True):
            running += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), float(running)))
        return out


class DnsMetrics:
    """The counters of one DnsServer (read by the collector, written by the server)."""

    def __init__(self) -> None:
        self.queries: dict[tuple[int, int], int] = {}
        self.forwarded = 0
        self.upstream_failures: dict[tuple[str, str], int] = {}
        self.dropped: dict[str, int] = {}
        self.latency = {"cache": Histogram(), "resolve": Histogram(), "forward": Histogram()}
        # Counts still held by live cache entries, (qtype, rcode, hits) each.
        self.live_hits: Callable[[], Iterable[tuple[int, int, int]]] = lambda: ()
        self.cache_entries: Callable[[], int] = lambda: 0

    def count(self, qtype: int, rcode: int, n: int = 1) -> None:
        key = (qtype, rcode)
        self.queries[key] = self.queries.get(key, 0) + n

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def upstream_failure(self, upstream: str, reason: str) -> None:
        key = (upstream, reason)
        self.upstream_failures[key] = self.upstream_failures.get(key, 0) + 1

    def query_totals(self) -> dict[tuple[int, int], int]:
        totals = dict(self.queries)
        for qtype, rcode, hits in self.live_hits():
            if hits:
                totals[(qtype, rcode)] = totals.get((qtype, rcode), 0) + hits
        return totals


class DnsCollector(Collector):
    """Sums the metrics of every live DnsServer in this process."""

    def __init__(self) -> None:
        self._members: weakref.WeakSet[DnsMetrics] = weakref.WeakSet()
        self._lock = threading.Lock()

    def add(self, metrics: DnsMetrics) -> None:
        with self._lock:
            self._members.add(metrics)

    def discard(self, metrics: DnsMetrics) -> None:
        with self._lock:
            self._members.discard(metrics)

    def describe(self) -> Iterator[Metric]:
        return iter(self._families([]))

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            members = list(self._members)
        return iter(self._families(members))

    @staticmethod
    def _families(members: list[DnsMetrics]) -> list[Metric]:
        queries = CounterMetricFamily(
            "beacon_dns_queries", "DNS queries answered, by query type and response code.", labels=["type", "rcode"]
        )
        forwarded = CounterMetricFamily("beacon_dns_forwarded_queries", "DNS queries forwarded to an upstream resolver.")
        failures = CounterMetricFamily(
            "beacon_dns_upstream_failures",
            "Failed tries at an upstream resolver, by upstream and reason.",
            labels=["upstream", "reason"],
        )
        dropped = CounterMetricFamily(
            "beacon_dns_dropped_packets", "DNS packets received and not answered, by reason.", labels=["reason"]
        )
        latency = HistogramMetricFamily(
            "beacon_dns_answer_latency_seconds",
            "Time from reading a query to sending its answer, by path (cache hit, resolve, forward).",
            labels=["path"],
        )
        entries = GaugeMetricFamily("beacon_dns_cache_entries", "Packed DNS answers held in the answer cache.")
        q_totals: dict[tuple[str, str], int] = {}
        fwd = 0
        fail_totals: dict[tuple[str, str], int] = {}
        drop_totals: dict[str, int] = {}
        hists: dict[str, Histogram] = {}
        n_entries = 0
        for m in members:
            for (qtype, rcode), n in m.query_totals().items():
                key = ("invalid" if qtype == INVALID_QTYPE else qtype_name(qtype), RCODE_NAMES.get(rcode, str(rcode)))
                q_totals[key] = q_totals.get(key, 0) + n
            fwd += m.forwarded
            for fkey, n in list(m.upstream_failures.items()):
                fail_totals[fkey] = fail_totals.get(fkey, 0) + n
            for reason, n in list(m.dropped.items()):
                drop_totals[reason] = drop_totals.get(reason, 0) + n
            for path, h in m.latency.items():
                agg = hists.setdefault(path, Histogram())
                agg.counts = [a + b for a, b in zip(agg.counts, h.counts, strict=True)]
                agg.total += h.total
            n_entries += m.cache_entries()
        for (qtype_label, rcode_label), n in sorted(q_totals.items()):
            queries.add_metric([qtype_label, rcode_label], n)
        forwarded.add_metric([], fwd)
        for (upstream, reason), n in sorted(fail_totals.items()):
            failures.add_metric([upstream, reason], n)
        for reason, n in sorted(drop_totals.items()):
            dropped.add_metric([reason], n)
        for path, h in sorted(hists.items()):
            latency.add_metric([path], h.cumulative(), sum_value=h.total)
        entries.add_metric([], n_entries)
        return [queries, forwarded, failures, dropped, latency, entries]


COLLECTOR = DnsCollector()
# Weak: an id() could be reused by a new registry once an old one is freed
# (tests make many), and the collector would then never reach the new one.
_registered: weakref.WeakSet[CollectorRegistry] = weakref.WeakSet()


def register(metrics: DnsMetrics, registry: CollectorRegistry = REGISTRY) -> None:
    """Make `metrics` visible in `registry` (the collector is registered once)."""
    if registry not in _registered:
        registry.register(COLLECTOR)
        _registered.add(registry)
    COLLECTOR.add(metrics)


def unregister(metrics: DnsMetrics) -> None:
    COLLECTOR.discard(metrics)
