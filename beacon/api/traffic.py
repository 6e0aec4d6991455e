"""`GET /v1/traffic`: per-service request count, 5xx count and p99 over the last
few seconds, computed here from the proxy's counters - what the dashboard shows
per service, without it scraping all of `/metrics` (every per-endpoint counter
and histogram: megabytes at thousands of services) every 2 s.

`TrafficWindow` keeps a few samples of the proxy's cumulative counters (at
most one per `every` seconds, taken only when someone asks: no dashboard open,
no work) and answers the difference between the oldest sample in the window
and the newest. It reads the proxy's plain-data reports (`metrics_json()`: per
service the latency `buckets` and the responses by method and status `codes`), not the
metric families' label names, so renaming a label changes nothing here.

The answer lists only services in the catalog that had requests in the window
(the rest had none), as `[requests, errors, p99_seconds]`: bounded by the
catalog, ~30 bytes a service. One answer is rendered per sample and shared by
every dashboard that asks before the next one. A read, like `/metrics`: no
token needed.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any

from beacon.proxy import response_status

WINDOW = 10.0  # seconds the figures cover (at most; less right after the first poll)
SAMPLE_EVERY = 1.0  # seconds between two samples of the proxy's counters
FIELDS = ("requests", "errors", "p99_seconds")

# One service's cumulative counts: requests, 5xx responses, requests per latency bucket.
Counts = tuple[int, int, tuple[int, ...]]
Reports = Callable[[], Iterable[Mapping[str, Any]]]


def fold_reports(reports: Iterable[Mapping[str, Any]]) -> dict[str, Counts]:
    """Per service, the counts summed over every proxy process's report.

    Requests are the latency observations (every response has exactly one),
    errors the responses with a 5xx status (whatever the method)."""
    out: dict[str, Counts] = {}
    for report in reports:
        for name, stats in report.get("services", {}).items():
            buckets = tuple(stats.get("buckets", ()))
            # `codes`: responses by the proxy's method-and-status key.
            errors = sum(n for key, n in stats.get("codes", {}).items() if 500 <= response_status(int(key)) <= 599)
            had = out.get(name)
            if had is None:
                out[name] = (sum(buckets), errors, buckets)
            elif len(had[2]) == len(buckets):
                out[name] = (had[0] + sum(buckets), had[1] + errors, tuple(a + b for a, b in zip(had[2], buckets, strict=True)))
    return out


def quantile(q: float, bounds: Sequence[float], counts: Sequence[int]) -> float | None:
    """Prometheus's histogram_quantile over per-bucket (not cumulative) counts;
    `counts` has one more entry than `bounds` (+Inf). None without observations."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    below = 0
    for i, count in enumerate(counts):
        if count > 0 and below + count >= rank:
            if i >= len(bounds):
                return bounds[-1] if bounds else None  # beyond the highest bound, as Prometheus answers
            lower = bounds[i - 1] if i > 0 else 0.0
            return lower + (bounds[i] - lower) * (rank - below) / count
        below += count
    return bounds[-1] if bounds else None


def difference(now: Counts, then: Counts | None) -> Counts:
    """Counts added between two samples; a counter that went down was reset (the
    service left the catalog and came back): then the newest value is all of it."""
    if then is None or now[0] < then[0] or len(now[2]) != len(then[2]):
        return now
    return now[0] - then[0], max(0, now[1] - then[1]), tuple(max(0, a - b) for a, b in zip(now[2], then[2], strict=True))


class TrafficWindow:
    """Samples of the proxy's counters and the figures between them (pure but for `reports`)."""

    def __init__(
        self,
        reports: Reports,
        bounds: Sequence[float],
        *,
        window: float = WINDOW,
        every: float = SAMPLE_EVERY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._reports = reports
        self._bounds = tuple(bounds)
        self._window = window
        self._every = every
        self._clock = clock
        self._samples: deque[tuple[float, dict[str, Counts]]] = deque()
        self._rendered: tuple[tuple[float, int], bytes] | None = None

    def _sample(self) -> None:
        now = self._clock()
        samples = self._samples
        if samples and now - samples[-1][0] >= self._window + self._every:
            samples.clear()  # nobody asked for a while: those samples cover no window now
        if not samples or now - samples[-1][0] >= self._every:
            samples.append((now, fold_reports(self._reports())))
        # The oldest sample kept is the last one at least `window` old (the base of the figures).
        while len(samples) > 2 and now - samples[1][0] >= self._window:
            samples.popleft()

    def figures(self, live: Collection[str]) -> dict[str, Any]:
        """`{"window_seconds", "fields", "services": {name: [requests, errors, p99_seconds]}}`
        for the services in `live` that had requests between the oldest sample and the newest."""
        self._sample()
        return self._figures(live)

    def _figures(self, live: Collection[str]) -> dict[str, Any]:
        services: dict[str, list[float | int | None]] = {}
        seconds = 0.0
        if len(self._samples) >= 2:
            (t0, old), (t1, new) = self._samples[0], self._samples[-1]
            seconds = t1 - t0
            for name, counts in new.items():
                then = old.get(name)
                if (then is not None and then[0] == counts[0]) or name not in live:
                    continue  # no request in the window (the common case at thousands of services)
                requests, errors, buckets = difference(counts, then)
                if requests > 0:
                    p99 = quantile(0.99, self._bounds, buckets)
                    services[name] = [requests, errors, None if p99 is None else round(p99, 6)]
        return {"window_seconds": round(seconds, 3), "fields": list(FIELDS), "services": services}

    def render(self, live: Collection[str], version: int) -> bytes:
        """`figures` as JSON bytes, rendered once per sample and catalog `version`."""
        self._sample()
        key = (self._samples[-1][0], version)
        if self._rendered is None or self._rendered[0] != key:
            body = json.dumps(self._figures(live), separators=(",", ":")).encode()
            self._rendered = (key, body)
        return self._rendered[1]


def no_traffic() -> list[Mapping[str, Any]]:
    """The reports of a Beacon without a proxy (tests of the API alone)."""
    return []


__all__ = ["FIELDS", "TrafficWindow", "difference", "fold_reports", "no_traffic", "quantile"]
