"""Pure balancing: which endpoint of a service gets the next request, and the
endpoint state (in-flight count, failures, ejection) that decides it.

No sockets and no clock: callers pass `now` (monotonic seconds) and the random
source is injected, so every policy is a deterministic table test. The data
path changes an endpoint's counters only through `Balancer`'s hooks (take /
drop / success / failure, as HAProxy's lb_ops), never by writing fields.
Policies, stickiness and ejection rules are described in README.md.
"""

from __future__ import annotations

import enum
import hashlib
import random
from bisect import bisect_right
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate

from beacon.proxy.router import HTTP_PROTOCOLS
from beacon.registry.model import POLICIES, Endpoint, Service, State

P2C_THRESHOLD = 8
INF = float("inf")


class FailureKind(enum.Enum):
    """Why a try failed; every kind counts towards ejection."""

    CONNECT_FAILED = "connect failed"
    CONNECT_TIMEOUT = "connect timeout"
    RESET = "reset"
    INVALID_RESPONSE = "invalid response"
    RESPONSE_HEAD_TOO_LARGE = "response header too large"
    TIMEOUT = "timeout"  # no response header within the try timeout
    STALLED = "stalled mid-response"
    GATEWAY_ERROR = "gateway error"  # the upstream answered 502/503/504

    @property
    def timed_out(self) -> bool:
        return self is FailureKind.TIMEOUT or self is FailureKind.CONNECT_TIMEOUT


# ------------------------------------------------------------------ sticky
def sticky_token(endpoint_id: str) -> bytes:
    """A short opaque cookie value naming an endpoint (no internal id leaks)."""
    return hashlib.blake2s(endpoint_id.encode(), digest_size=8).hexdigest().encode()


def cookie_name(service: str) -> bytes:
    return b"beacon_" + service.encode("ascii", "replace").replace(b".", b"_")


def set_cookie_line(service: str, token: bytes) -> bytes:
    """A raw-head Set-Cookie line (leading CRLF) naming the chosen endpoint."""
    return b"\r\nSet-Cookie: " + cookie_name(service) + b"=" + token + b"; Path=/; HttpOnly; SameSite=Lax"


def sticky_cookie(cookie: bytes | None, service: str) -> bytes | None:
    """The sticky token a Cookie header value carries for `service`, if any."""
    if not cookie:
        return None
    wanted = cookie_name(service) + b"="
    for part in cookie.split(b";"):
        part = part.strip()
        if part.startswith(wanted):
            return part[len(wanted) :]
    return None


class EndpointState:
    """Mutable per-endpoint state shared by the balancer and the data path."""

    __slots__ = (
        "address",
        "ejected_until",
        "ejections",
        "failures",
        "id",
        "inflight",
        "port",
        "returned_at",
        "service",
        "token",
        "weight",
    )

    def __init__(self, id: str, service: str, address: str, port: int, weight: int = 1) -> None:
        self.id = id
        self.service = service
        self.address = address
        self.port = port
        self.weight = max(1, weight)
        self.inflight = 0
        self.failures = 0  # consecutive
        self.ejected_until = 0.0
        self.ejections = 0  # recent ejections (grows the ejection time, decays)
        self.returned_at = 0.0
        self.token = b""  # set by a sticky Pool (hashing every endpoint up front is wasted)

    def is_ejected(self, now: float) -> bool:
        return self.ejected_until > now

    def __repr__(self) -> str:
        return f"<EndpointState {self.id} {self.address}:{self.port} inflight={self.inflight}>"


@dataclass(frozen=True, slots=True)
class Ejection:
    threshold: int = 5
    base_time: float = 30.0
    max_fraction: float = 0.5
    max_factor: int = 10  # ejection time is capped at base_time x max_factor

    def duration(self, ejections: int) -> float:
        return self.base_time * min(max(1, ejections), self.max_factor)


class Pool:
    """The passing endpoints of one service and how to choose among them."""

    __slots__ = (
        "_cum",
        "_current",
        "_rr",
        "_total",
        "_weighted",
        "ejection",
        "eligible",
        "members",
        "next_return",
        "policy",
        "rng",
        "service",
        "sticky",
        "tokens",
    )

    def __init__(
        self,
        service: str,
        members: Sequence[EndpointState],
        policy: str = "round_robin",
        sticky: bool = False,
        ejection: Ejection | None = None,
        rng: random.Random | None = None,
        now: float = 0.0,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown balancing policy {policy!r}")
        self.service = service
        self.members: list[EndpointState] = list(members)
        self.policy = policy
        self.sticky = sticky
        self.ejection = ejection or Ejection()
        self.rng = rng or random.Random()
        self.tokens: dict[bytes, EndpointState] = {}
        if sticky:
            for m in self.members:
                m.token = m.token or sticky_token(m.id)
                self.tokens[m.token] = m
        self.eligible: list[EndpointState] = []
        self.next_return = INF
        self._rr = 0
        self._current: list[int] = []
        self._cum: list[int] = []
        self._total = 0
        self._weighted = False
        self.refresh(now)
        # Start rotations at a random place so a burst of snapshots does not
        # send every first request to the same endpoint.
        if self.eligible:
            self._rr = self.rng.randrange(len(self.eligible)) if not self._weighted else 0

    def __len__(self) -> int:
        return len(self.members)

    # ------------------------------------------------------------ eligibility
    def refresh(self, now: float) -> None:
        """Recompute the non-ejected members (after an ejection or a return)."""
        eligible: list[EndpointState] = []
        next_return = INF
        for m in self.members:
            if m.ejected_until > now:
                next_return = min(next_return, m.ejected_until)
            else:
                if m.ejected_until:
                    m.ejected_until = 0.0
                    m.returned_at = now
                eligible.append(m)
        self.eligible = eligible
        self.next_return = next_return
        weights = [m.weight for m in eligible]
        self._weighted = len(set(weights)) > 1
        self._current = [0] * len(eligible)
        self._cum = list(accumulate(weights))
        self._total = self._cum[-1] if self._cum else 0
        if self._rr >= len(eligible):
            self._rr = 0

    def ejected(self, now: float) -> list[EndpointState]:
        return [m for m in self.members if m.ejected_until > now]

    # ---------------------------------------------------------------- picking
    def pick(self, now: float) -> EndpointState | None:
        """The endpoint for a new request, or None when the pool is empty."""
        if self.next_return <= now:
            self.refresh(now)
        eligible = self.eligible
        n = len(eligible)
        if n == 0:
            return None
        if n == 1:
            return eligible[0]
        policy = self.policy
        if policy == "round_robin":
            if self._weighted:
                return eligible[self._swrr(range(n))]
            i = self._rr
            self._rr = i + 1 if i + 1 < n else 0
            return eligible[i]
        if policy == "least_conn":
            if n > P2C_THRESHOLD:
                return self._p2c(eligible)
            return self._least(eligible)
        # random
        if self._weighted:
            return eligible[bisect_right(self._cum, self.rng.random() * self._total)]
        return eligible[int(self.rng.random() * n)]

    def pick_retry(self, now: float, tried: Iterable[EndpointState], last: EndpointState | None) -> EndpointState | None:
        """An endpoint for a retry: not tried yet if possible, never `last` again."""
        if self.next_return <= now:
            self.refresh(now)
        tried_ids = {id(t) for t in tried}
        candidates = [m for m in self.eligible if id(m) not in tried_ids]
        if not candidates:
            candidates = [m for m in self.eligible if m is not last]
        if not candidates:
            return None
        if len(candidates) == 1:
            return candidates[0]
        if self.policy == "least_conn":
            return self._least(candidates)
        if self.policy == "random":
            return candidates[int(self.rng.random() * len(candidates))]
        # round robin: the next one in rotation that is a candidate
        wanted = {id(c) for c in candidates}
        n = len(self.eligible)
        for step in range(n):
            m = self.eligible[(self._rr + step) % n]
            if id(m) in wanted:
                self._rr = (self._rr + step + 1) % n
                return m
        return candidates[0]

    def pick_sticky(self, token: bytes, now: float) -> EndpointState | None:
        """The endpoint a sticky cookie names, if it may still take requests."""
        m = self.tokens.get(token)
        if m is None or m.ejected_until > now:
            return None
        return m

    def _swrr(self, indices: Iterable[int]) -> int:
        # Smooth weighted round robin: raise every current weight by its weight,
        # take the largest, lower it by the total.
        best = -1
        best_value = 0
        current = self._current
        eligible = self.eligible
        for i in indices:
            value = current[i] + eligible[i].weight
            current[i] = value
            if best < 0 or value > best_value:
                best, best_value = i, value
        current[best] -= self._total
        return best

    def _least(self, candidates: Sequence[EndpointState]) -> EndpointState:
        best: list[EndpointState] = []
        best_score = INF
        for m in candidates:
            score = (m.inflight + 1) / m.weight
            if score < best_score:
                best, best_score = [m], score
            elif score == best_score:
                best.append(m)
        return best[0] if len(best) == 1 else best[int(self.rng.random() * len(best))]

    def _p2c(self, eligible: Sequence[EndpointState]) -> EndpointState:
        a, b = self.rng.sample(range(len(eligible)), 2)
        ma, mb = eligible[a], eligible[b]
        sa, sb = (ma.inflight + 1) / ma.weight, (mb.inflight + 1) / mb.weight
        if sa == sb:
            return ma if self.rng.random() < 0.5 else mb
        return ma if sa < sb else mb

    # --------------------------------------------------------- passive health
    def record_failure(self, m: EndpointState, now: float) -> bool:
        """Count a failure; returns True when it ejected the endpoint."""
        m.failures += 1
        if m.failures < self.ejection.threshold or m.ejected_until > now:
            return False
        if m not in self.members:
            return False  # no longer passing: nothing to eject from
        n = len(self.members)
        cap = min(int(n * self.ejection.max_fraction), n - 1)
        if len(self.ejected(now)) >= cap:
            return False  # the pool keeps its minimum; failures keep counting
        if m.returned_at and m.ejections and self.ejection.base_time > 0:
            # Forget one past ejection per base_time spent back in the pool.
            # (Config rejects a zero base time; should one slip through, a
            # ZeroDivisionError here would hang the client that failed.)
            healthy_periods = int((now - m.returned_at) / self.ejection.base_time)
            m.ejections = max(0, m.ejections - healthy_periods)
        m.ejections += 1
        m.ejected_until = now + self.ejection.duration(m.ejections)
        m.failures = 0
        self.refresh(now)
        return True


class Balancer:
    """Every service's Pool and every endpoint's state, across snapshots.

    The only writer of `EndpointState`: snapshots go through `update_service`
    / `remove_service`, requests through the hooks `take` (a try starts),
    `drop` (it ends), `success` and `failure`.
    """

    def __init__(self, ejection: Ejection, rng: random.Random) -> None:
        self.ejection = ejection
        self.rng = rng
        self.pools: dict[str, Pool] = {}
        self.states: dict[str, EndpointState] = {}
        self._passing: set[str] = set()

    # ------------------------------------------------------------- snapshots
    def update_service(
        self, svc: Service, policy: str, sticky: bool, now: float, prefer_node: str | None = None
    ) -> list[EndpointState]:
        """Rebuild the pool of a changed service; returns the endpoint states that
        take no new requests any more (replaced, or no longer passing).

        `prefer_node` (beacon.lb.locality=prefer-local): while any passing endpoint
        is on that node, the pool holds only those; else every passing endpoint."""
        states = self.states
        retired: list[EndpointState] = []
        members: list[EndpointState] = []
        for ep in svc.endpoints:
            st = states.get(ep.id)
            if st is None or st.address != ep.address or st.port != ep.port:
                if st is not None:
                    retired.append(st)
                st = states[ep.id] = EndpointState(ep.id, ep.service, ep.address, ep.port, ep.weight)
            st.weight = max(1, ep.weight)
            st.service = ep.service
            if ep.state is State.PASSING and ep.protocol in HTTP_PROTOCOLS:
                if ep.id not in self._passing:
                    # Back from critical/draining: an active check vouches for it.
                    st.ejected_until = 0.0
                    st.failures = 0
                    self._passing.add(ep.id)
                members.append(st)
            else:
                self._passing.discard(ep.id)
                retired.append(st)  # draining: no new requests, let the backend go
        if prefer_node is not None:
            local = {ep.id for ep in svc.endpoints if ep.node == prefer_node}
            members = [m for m in members if m.id in local] or members
        self.pools[svc.name] = Pool(svc.name, members, policy, sticky, self.ejection, self.rng, now)
        return retired

    def remove_service(self, name: str) -> None:
        self.pools.pop(name, None)

    def forget(self, old: Service, endpoints: Mapping[str, Endpoint]) -> list[EndpointState]:
        """Drop the state of endpoints of an old Service that left the catalog."""
        gone: list[EndpointState] = []
        for ep in old.endpoints:
            if ep.id not in endpoints:
                st = self.states.pop(ep.id, None)
                if st is not None:
                    gone.append(st)
                self._passing.discard(ep.id)
        return gone

    def takes_requests(self, m: EndpointState) -> bool:
        """Whether `m` is the current state of a passing endpoint (else its
        connections are not worth keeping)."""
        return self.states.get(m.id) is m and m.id in self._passing

    def in_flight(self) -> dict[str, int]:
        """In-flight tries per service (scrape time only: a sum over endpoints)."""
        counts: dict[str, int] = {}
        for m in self.states.values():
            counts[m.service] = counts.get(m.service, 0) + m.inflight
        return counts

    # ----------------------------------------------------------------- hooks
    def take(self, m: EndpointState) -> None:
        m.inflight += 1

    def drop(self, m: EndpointState) -> None:
        m.inflight -= 1

    def success(self, m: EndpointState) -> None:
        m.failures = 0

    def failure(self, m: EndpointState, kind: FailureKind, now: float) -> bool:
        """Count a failed try; returns True when it ejected the endpoint."""
        pool = self.pools.get(m.service)
        if pool is None:
            m.failures += 1  # the service left: nothing to eject from
            return False
        return pool.record_failure(m, now)
