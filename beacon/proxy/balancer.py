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
from beacon.registry.model import POLICIES, Endpoint, Service, SnapshotDelta, State

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
        "_cum_stale",
        "_current",
        "_ejected",
        "_eligible_at",
        "_member_at",
        "_rr",
        "_total",
        "_weight_counts",
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
        self._member_at: dict[str, int] = {m.id: i for i, m in enumerate(self.members)}
        self.eligible: list[EndpointState] = []
        self._eligible_at: dict[str, int] = {}
        self._ejected: dict[str, EndpointState] = {}  # members out until their ejected_until
        self.next_return = INF
        self._rr = 0
        self._current: list[int] = []  # smooth WRR current weights, parallel to eligible
        self._cum: list[int] = []  # weighted random: running sums of eligible weights
        self._cum_stale = False
        self._total = 0
        self._weight_counts: dict[int, int] = {}  # eligible weight -> how many (weighted: more than one)
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
        """Recompute the non-ejected members from scratch, O(members).

        Construction uses it; updates, ejections and returns keep the same
        fields incrementally (`add`, `remove`, `reweight`, `_return_due`)."""
        eligible: list[EndpointState] = []
        ejected: dict[str, EndpointState] = {}
        next_return = INF
        for m in self.members:
            if m.ejected_until > now:
                next_return = min(next_return, m.ejected_until)
                ejected[m.id] = m
            else:
                if m.ejected_until:
                    m.ejected_until = 0.0
                    m.returned_at = now
                eligible.append(m)
        self.eligible = eligible
        self._eligible_at = {m.id: i for i, m in enumerate(eligible)}
        self._ejected = ejected
        self.next_return = next_return
        counts: dict[int, int] = {}
        for m in eligible:
            counts[m.weight] = counts.get(m.weight, 0) + 1
        self._weight_counts = counts
        self._weighted = len(counts) > 1
        self._current = [0] * len(eligible)
        self._cum = list(accumulate(m.weight for m in eligible))
        self._cum_stale = False
        self._total = self._cum[-1] if self._cum else 0
        if self._rr >= len(eligible):
            self._rr = 0

    # ----------------------------------------------------- incremental update
    # Each O(1) (a dict and a swap-remove from a list), so a snapshot that
    # changes k endpoints of a pool of n costs O(k), not O(n). Members and
    # eligible endpoints are unordered: a removal moves the last one into the
    # gap. Weighted random's running sums are rebuilt lazily, O(eligible), at
    # the first weighted random pick after a change (no other policy reads them).
    def add(self, m: EndpointState, now: float) -> None:
        """`m` joins the pool (it must not be a member yet)."""
        self._member_at[m.id] = len(self.members)
        self.members.append(m)
        if self.sticky:
            m.token = m.token or sticky_token(m.id)
            self.tokens[m.token] = m
        if m.ejected_until > now:
            self._ejected[m.id] = m
            self.next_return = min(self.next_return, m.ejected_until)
        else:
            if m.ejected_until:
                m.ejected_until = 0.0
                m.returned_at = now
            self._eligible_add(m)

    def remove(self, endpoint_id: str) -> EndpointState | None:
        """The member with this id leaves the pool; returns it (None: not a member)."""
        i = self._member_at.pop(endpoint_id, None)
        if i is None:
            return None
        members = self.members
        m = members[i]
        last = members.pop()
        if last is not m:
            members[i] = last
            self._member_at[last.id] = i
        if self.tokens.get(m.token) is m:
            del self.tokens[m.token]
        if self._ejected.pop(m.id, None) is None:
            self._eligible_remove(m)
        return m

    def reweight(self, m: EndpointState, weight: int) -> None:
        """Set a member's (or a non-member's) weight, keeping the pool's sums right."""
        weight = max(1, weight)
        old = m.weight
        if old == weight:
            return
        if self._eligible_at.get(m.id) is not None and self.eligible[self._eligible_at[m.id]] is m:
            self._count_weight(old, -1)
            self._count_weight(weight, 1)
            self._total += weight - old
            self._cum_stale = True
        m.weight = weight

    def is_member(self, m: EndpointState) -> bool:
        i = self._member_at.get(m.id)
        return i is not None and self.members[i] is m

    def _count_weight(self, weight: int, step: int) -> None:
        counts = self._weight_counts
        n = counts.get(weight, 0) + step
        if n:
            counts[weight] = n
        else:
            del counts[weight]
        self._weighted = len(counts) > 1

    def _eligible_add(self, m: EndpointState) -> None:
        self._eligible_at[m.id] = len(self.eligible)
        self.eligible.append(m)
        self._current.append(0)
        self._total += m.weight
        self._count_weight(m.weight, 1)
        self._cum_stale = True

    def _eligible_remove(self, m: EndpointState) -> None:
        i = self._eligible_at.pop(m.id)
        eligible, current = self.eligible, self._current
        last, last_current = eligible.pop(), current.pop()
        if last is not m:
            eligible[i], current[i] = last, last_current
            self._eligible_at[last.id] = i
        self._total -= m.weight
        self._count_weight(m.weight, -1)
        self._cum_stale = True
        if self._rr >= len(eligible):
            self._rr = 0

    def _return_due(self, now: float) -> None:
        """Ejected members whose time is up take requests again, O(ejected)."""
        next_return = INF
        for m in list(self._ejected.values()):
            if m.ejected_until > now:
                next_return = min(next_return, m.ejected_until)
                continue
            del self._ejected[m.id]
            m.ejected_until = 0.0
            m.returned_at = now
            self._eligible_add(m)
        self.next_return = next_return

    def ejected(self, now: float) -> list[EndpointState]:
        return [m for m in self._ejected.values() if m.ejected_until > now]

    # ---------------------------------------------------------------- picking
    def pick(self, now: float) -> EndpointState | None:
        """The endpoint for a new request, or None when the pool is empty."""
        if self.next_return <= now:
            self._return_due(now)
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
            if self._cum_stale:
                self._cum = list(accumulate(m.weight for m in eligible))
                self._cum_stale = False
            return eligible[bisect_right(self._cum, self.rng.random() * self._total)]
        return eligible[int(self.rng.random() * n)]

    def pick_retry(
        self, now: float, tried: Iterable[EndpointState], last: EndpointState | None
    ) -> EndpointState | None:
        """An endpoint for a retry: not tried yet if possible, never `last` again."""
        if self.next_return <= now:
            self._return_due(now)
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
        if not self.is_member(m):
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
        if m.id not in self._ejected:  # (else its last ejection is over but it has not returned yet)
            self._eligible_remove(m)
        self._ejected[m.id] = m
        self.next_return = min(self.next_return, m.ejected_until)
        return True


# Per service: endpoints changed or added (new values), ids removed, ids moved to another service.
Changes = tuple[list[Endpoint], list[str], list[str]]
NO_CHANGES: Changes = ([], [], [])


class _Tracked:
    """What the balancer knows of one service's endpoints, so a snapshot that
    changes a few of them updates its pool per endpoint."""

    __slots__ = (
        "endpoints",
        "forced",
        "local",
        "node",
        "passing",
        "policy",
        "prefer_count",
        "sticky",
        "uses_local",
    )

    def __init__(self, node: str | None, forced: bool, policy: str, sticky: bool) -> None:
        self.node = node  # this proxy's node
        self.forced = forced  # prefer `node` whatever the labels say (update_service's prefer_node)
        self.policy = policy
        self.sticky = sticky
        self.endpoints: dict[str, Endpoint] = {}
        self.passing: dict[str, EndpointState] = {}  # passing HTTP endpoints
        self.local: dict[str, EndpointState] = {}  # those of them on `node`
        self.prefer_count = 0  # endpoints labelled beacon.lb.locality=prefer-local
        self.uses_local = False  # whether the pool holds `local` (else `passing`)

    def prefers_local(self) -> bool:
        return self.node is not None and (self.forced or self.prefer_count > 0) and bool(self.local)

    def chosen(self) -> dict[str, EndpointState]:
        return self.local if self.uses_local else self.passing


class Balancer:
    """Every service's Pool and every endpoint's state, across snapshots.

    The only writer of `EndpointState`: snapshots go through `update_service`
    / `update_endpoints` / `remove_service`, requests through the hooks `take`
    (a try starts), `drop` (it ends), `success` and `failure`.
    """

    def __init__(self, ejection: Ejection, rng: random.Random) -> None:
        self.ejection = ejection
        self.rng = rng
        self.pools: dict[str, Pool] = {}
        self.states: dict[str, EndpointState] = {}
        self._passing: set[str] = set()
        self._tracked: dict[str, _Tracked] = {}

    # ------------------------------------------------------------- snapshots
    def update_service(
        self,
        svc: Service,
        policy: str,
        sticky: bool,
        now: float,
        prefer_node: str | None = None,
        local_node: str | None = None,
    ) -> list[EndpointState]:
        """Rebuild the pool of a changed service from all its endpoints, O(endpoints);
        returns the endpoint states that take no new requests any more (replaced,
        or no longer passing).

        beacon.lb.locality=prefer-local: while any passing endpoint is on the
        local node, the pool holds only those; else every passing endpoint.
        `local_node`: this node, preferred when an endpoint carries the label;
        `prefer_node`: a node preferred whatever the labels say."""
        node = prefer_node if prefer_node is not None else local_node
        tracked = _Tracked(node, prefer_node is not None, policy, sticky)
        self._tracked[svc.name] = tracked
        retired: list[EndpointState] = []
        for ep in svc.endpoints:
            retired += self._track(tracked, ep, set_weight=True)
        self._rebuild(svc.name, tracked, now)
        return retired

    def update_endpoints(
        self,
        svc: Service,
        changed: Iterable[Endpoint],
        removed: Iterable[str],
        policy: str,
        sticky: bool,
        now: float,
        local_node: str | None = None,
        moved_out: Iterable[str] = (),
    ) -> list[EndpointState]:
        """Update a service's pool for the endpoints `changed` (or added) in it,
        `removed` from the catalog and `moved_out` to another service, O(those) - the pool is rebuilt, O(endpoints),
        only when its policy or stickiness changes or prefer-local switches
        between the local endpoints and all. Returns what `update_service` does."""
        tracked = self._tracked.get(svc.name)
        pool = self.pools.get(svc.name)
        retired: list[EndpointState] = []
        touched: list[str] = []
        for eid in removed:
            if tracked is not None:
                self._untrack(tracked, eid)
            st = self.states.pop(eid, None)
            if st is not None:
                retired.append(st)
            self._passing.discard(eid)
            touched.append(eid)
        for eid in moved_out:  # (its new service's update may have detached it already)
            if tracked is not None:
                self._untrack(tracked, eid)
            touched.append(eid)
        if (
            tracked is None
            or pool is None
            or tracked.policy != policy
            or tracked.sticky != sticky
            or tracked.forced
            or tracked.node != local_node
        ):
            return retired + self.update_service(svc, policy, sticky, now, local_node=local_node)
        for ep in changed:
            self._untrack(tracked, ep.id)
            retired += self._track(tracked, ep, set_weight=False)
            touched.append(ep.id)
        if tracked.prefers_local() != tracked.uses_local:
            for eid in touched:  # the old pool goes: its sums need no care
                st, ep_now = self.states.get(eid), tracked.endpoints.get(eid)
                if st is not None and ep_now is not None:
                    st.weight = max(1, ep_now.weight)
            self._rebuild(svc.name, tracked, now)
            return retired
        chosen = tracked.chosen()
        at = pool._member_at
        for eid in touched:
            want = chosen.get(eid)
            i = at.get(eid)
            have = pool.members[i] if i is not None else None
            if have is not None and have is not want:
                pool.remove(eid)
            ep_now = tracked.endpoints.get(eid)
            st = self.states.get(eid)
            if ep_now is not None and st is not None:
                if have is not None and have is want:
                    pool.reweight(st, ep_now.weight)
                else:
                    st.weight = max(1, ep_now.weight)
            if want is not None and have is not want:
                pool.add(want, now)
        return retired

    def changes_by_service(
        self, delta: SnapshotDelta, endpoints: Mapping[str, Endpoint]
    ) -> dict[str, Changes]:
        """`update_endpoints`' arguments from a delta, by service, O(delta): the
        endpoints changed (new values), removed and moved out (ids)."""
        groups: dict[str, Changes] = {}
        for eid in delta.endpoints_changed:
            ep = endpoints.get(eid)
            if ep is not None:
                groups.setdefault(ep.service, ([], [], []))[0].append(ep)
                st = self.states.get(eid)
                if st is not None and st.service != ep.service:
                    groups.setdefault(st.service, ([], [], []))[2].append(eid)
        for eid in delta.endpoints_removed:
            st = self.states.get(eid)
            if st is not None:
                groups.setdefault(st.service, ([], [], []))[1].append(eid)
        return groups

    def _rebuild(self, name: str, tracked: _Tracked, now: float) -> None:
        tracked.uses_local = tracked.prefers_local()
        members = list(tracked.chosen().values())
        self.pools[name] = Pool(name, members, tracked.policy, tracked.sticky, self.ejection, self.rng, now)

    def _track(self, tracked: _Tracked, ep: Endpoint, set_weight: bool) -> list[EndpointState]:
        """Record `ep` (not tracked yet) in its service; its state, created or replaced."""
        retired: list[EndpointState] = []
        st = self.states.get(ep.id)
        if st is None or st.address != ep.address or st.port != ep.port:
            if st is not None:
                self._detach(st)
                retired.append(st)
            st = self.states[ep.id] = EndpointState(ep.id, ep.service, ep.address, ep.port, ep.weight)
        else:
            if st.service != ep.service:
                self._detach(st)  # moved here from another service
            if set_weight:
                st.weight = max(1, ep.weight)
        st.service = ep.service
        tracked.endpoints[ep.id] = ep
        if ep.locality == "prefer-local":
            tracked.prefer_count += 1
        if ep.state is State.PASSING and ep.protocol in HTTP_PROTOCOLS:
            if ep.id not in self._passing:
                # Back from critical/draining: an active check vouches for it.
                st.ejected_until = 0.0
                st.failures = 0
                self._passing.add(ep.id)
            tracked.passing[ep.id] = st
            if ep.node == tracked.node:
                tracked.local[ep.id] = st
        else:
            self._passing.discard(ep.id)
            retired.append(st)  # draining: no new requests, let the backend go
        return retired

    def _untrack(self, tracked: _Tracked, eid: str) -> None:
        ep = tracked.endpoints.pop(eid, None)
        if ep is None:
            return
        if ep.locality == "prefer-local":
            tracked.prefer_count -= 1
        tracked.passing.pop(eid, None)
        tracked.local.pop(eid, None)

    def _detach(self, st: EndpointState) -> None:
        """Take `st` out of the pool of the service it was in (it moved, or was
        replaced), so no pool ever holds a state whose weight another one sets."""
        other = self._tracked.get(st.service)
        if other is not None and other.endpoints.get(st.id) is not None:
            self._untrack(other, st.id)
        pool = self.pools.get(st.service)
        if pool is not None and pool.is_member(st):
            pool.remove(st.id)

    def remove_service(self, name: str) -> None:
        self.pools.pop(name, None)
        self._tracked.pop(name, None)

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
