"""The etcd store: a lease per agent, an ownership key, a resumable watch.

What etcd's Python clients leave to their users is done here, and tested
against a real three-member cluster through a relay that cuts or stalls the
connection (tests/cluster):

* **Session.** A lease of `lease_ttl` kept alive every ttl/3. The node's
  ownership key ``nodes/<node>/owner`` is created in a transaction comparing
  `create_revision == 0`, so a second agent with the same name is refused
  (`NodeNameTaken`) instead of overwriting the first. If the key is held, the
  holder's lease is watched for up to one TTL: a lease whose remaining TTL goes
  *up* is being kept alive by a live agent (refuse); one that runs out belonged
  to a dead agent (take the name). A clean stop marks the record `released`,
  so a restart takes over at once, and its endpoints do not flap.
* **Own keys.** The cluster source says what it wants (`set_own`); a writer
  puts the difference in transactions of at most `TXN_OPS` operations. If the
  lease expired while etcd was unreachable, a new one is granted, the name
  claimed again and every own key re-written.
* **Mirror.** The whole ``nodes/`` range is listed once at one revision, then
  watched from that revision + 1 (resumed from the last seen revision + 1 after
  any failure). A compacted revision cancels the watch: the range is listed
  again at one revision and the *difference* reported, then watched from there.
  Only real value changes are reported, so re-writing an unchanged key costs
  the receivers nothing.
* **Liveness.** Progress notifications are asked for; since etcd sends them
  only every 10 minutes by default, a quiet watch is also checked against the
  revision the keepalive answers carry: if etcd moved on and the watch said
  nothing for `watch_idle`, the session restarts (resuming, not re-listing).

Length (~600 lines): session, writer and watch share the lease and the last seen revision.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from types import MappingProxyType
from typing import Any

from beacon.registry.store import metrics
from beacon.registry.store.base import Change, ChangeListener, NodeNameTaken, NodeRecord, StoreError
from beacon.registry.store.gateway import (
    EtcdError,
    Gateway,
    GatewayError,
    GatewaySettings,
    Unreachable,
    b64,
    prefix_end,
    unb64,
)

log = logging.getLogger("beacon.registry.store")

TXN_OPS = 128  # etcd's default --max-txn-ops
PAGE_LIMIT = 5000  # keys per range page in a re-list


class LeaseLost(GatewayError):
    """The lease expired (etcd answered a keepalive with TTL 0)."""


class WatchStalled(GatewayError):
    """The watch said nothing while etcd's revision moved on."""


def _header_revision(reply: Mapping[str, Any]) -> int:
    return int(reply.get("header", {}).get("revision", 0))


class EtcdStore:
    def __init__(
        self,
        settings: GatewaySettings,
        *,
        prefix: str,
        node: str,
        lease_ttl: float,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        report_metrics: bool = True,
        backoff_initial: float = 0.05,
        backoff_max: float = 2.0,
        watch_idle: float | None = None,
        start_timeout: float | None = None,
        mirror: bool = True,
    ) -> None:
        if lease_ttl < 1:
            raise ValueError("lease_ttl must be at least 1s (etcd leases count whole seconds)")
        self._gateway = Gateway(settings)
        self._endpoints = settings.endpoints
        self._prefix = prefix
        self._node = node
        self._ttl = lease_ttl
        self._clock = clock
        self._wall = wall_clock
        self._metrics = report_metrics
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._watch_idle = watch_idle if watch_idle is not None else max(3 * lease_ttl, 3.0)
        self._start_timeout = start_timeout if start_timeout is not None else lease_ttl + 5.0
        self._request_timeout = max(lease_ttl / 3, 0.5)
        # False: a writer only (no list, no watch) - the synthetic agents of bench/cluster.py.
        self._mirror = mirror
        self._instance = uuid.uuid4().hex
        self._nodes_range = (prefix + "nodes/").encode()
        self._own_prefix = f"nodes/{node}/"
        self._owner_key = f"nodes/{node}/owner"
        # Own (leased) and durable keys: what is wanted, what is written, what differs.
        self._desired: dict[bool, dict[str, bytes]] = {True: {}, False: {}}  # leased? -> key -> value
        self._written: dict[bool, dict[str, bytes]] = {True: {}, False: {}}
        self._dirty: dict[bool, set[str]] = {True: set(), False: set()}
        self._complete = False
        self._cleanup_pending = True
        self._old_lease: int | None = None
        self._lease: int | None = None
        # The mirror of the nodes/ range.
        self._view: dict[str, bytes] = {}
        self._revision = 0  # last revision the mirror reflects (0: never listed)
        self._head_revision = 0  # latest revision seen in any answer
        self._listeners: list[ChangeListener] = []
        self._connected = False
        self._down_logged = False  # one "disconnected" line per outage, also before the first connect
        self._refused: str | None = None
        self._last_sync: float | None = None
        self._last_watch_message = 0.0
        self._wake = asyncio.Event()
        self._flushed = asyncio.Event()
        self._first_attempt = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.sessions = 0
        self.relists = 0
        if report_metrics:
            metrics.LAST_SYNC_AGE.set_function(lambda: -1.0 if (age := self.last_sync_age()) is None else age)
            metrics.CONNECTED.set(0)

    # ----------------------------------------------------------------- reads
    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def refused(self) -> str | None:
        return self._refused

    @property
    def revision(self) -> int:
        return self._revision

    @property
    def lease(self) -> int | None:
        return self._lease

    @property
    def lease_ttl(self) -> float:
        return self._ttl

    @property
    def endpoints(self) -> tuple[str, ...]:
        return self._endpoints

    def last_sync_age(self) -> float | None:
        return None if self._last_sync is None else max(0.0, self._clock() - self._last_sync)

    def view(self) -> Mapping[str, bytes]:
        return MappingProxyType(self._view)

    def subscribe(self, listener: ChangeListener) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def pending_writes(self) -> int:
        return len(self._dirty[True]) + len(self._dirty[False])

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        await self._gateway.start()
        self._task = asyncio.create_task(self._run(), name=f"beacon-store-{self._node}")
        try:
            await asyncio.wait_for(self._first_attempt.wait(), self._start_timeout)
        except TimeoutError:
            log.warning("failed: etcd session not up within %.0fs; still trying", self._start_timeout)
        if self._refused is not None:
            await self.stop(release=False)
            raise NodeNameTaken(self._node, self._refused)

    async def stop(self, *, release: bool = True) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if release and self._lease is not None and self._refused is None:
            # Keep the lease (the endpoints stay valid: the containers still run)
            # but let a restarted agent take the name over at once.
            with contextlib.suppress(GatewayError):
                await self._put_owner(self._lease, released=True)
                log.info("released: node %s (lease %x kept for %gs)", self._node, self._lease, self._ttl)
        if self._connected:  # a requested stop is not an outage: no warning
            self._connected = False
            if self._metrics:
                metrics.CONNECTED.set(0)
            log.info("stopped: etcd session of node %s", self._node)
        await self._gateway.close()

    # --------------------------------------------------------------- writes
    def set_own(self, key: str, value: bytes | None) -> None:
        self._set(True, key, value)

    def set_durable(self, key: str, value: bytes | None) -> None:
        self._set(False, key, value)

    def _set(self, leased: bool, key: str, value: bytes | None) -> None:
        if leased and not key.startswith(self._own_prefix):
            raise ValueError(f"own key {key!r} outside {self._own_prefix!r}")
        desired = self._desired[leased]
        if value is None:
            # Deleting a key this session never wrote (one an earlier run left,
            # say) is still a delete: etcd may hold it.
            known = desired.pop(key, None) is not None or key in self._written[leased]
        else:
            if desired.get(key) == value:
                return
            desired[key] = value
            known = True
        if known and self._written[leased].get(key) == value:
            self._dirty[leased].discard(key)
        else:
            self._dirty[leased].add(key)
            self._flushed.clear()
            self._wake.set()

    def own_complete(self) -> None:
        self._complete = True
        self._wake.set()

    async def flush(self, timeout: float) -> bool:
        try:
            async with asyncio.timeout(timeout):
                while self.pending_writes() or (self._complete and self._cleanup_pending):
                    self._flushed.clear()
                    await self._flushed.wait()
        except TimeoutError:
            return False
        return True

    async def read_prefix(self, prefix: str) -> dict[str, bytes]:
        try:
            kvs, _ = await self._range((self._prefix + prefix).encode(), 0)
        except GatewayError as exc:
            raise StoreError(f"etcd unreachable: {exc}") from None
        return kvs

    # --------------------------------------------------------------- session
    async def _run(self) -> None:
        delay = self._backoff_initial
        while True:
            started = self._clock()
            try:
                await self._session()
            except NodeNameTaken as exc:
                self._refused = str(exc).split("(", 1)[-1].split(")", 1)[0]
                log.error("failed: %s", exc)
                self._set_connected(False, "node name taken")
                self._first_attempt.set()
                return
            except GatewayError as exc:
                self._set_connected(False, str(exc))
            except Exception as exc:  # a bug must not end the session loop for good
                log.exception("failed: etcd session")
                self._set_connected(False, repr(exc))
            self._first_attempt.set()
            # Pooled connections may be half-open after a failure: start afresh.
            await self._gateway.close()
            await self._gateway.start()
            if self._clock() - started > 5 * self._ttl:
                delay = self._backoff_initial  # a long healthy session resets the backoff
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._backoff_max)

    async def _session(self) -> None:
        self.sessions += 1
        if self._metrics:
            metrics.SESSIONS.inc()
        await self._ensure_lease()
        if self._mirror and (self._revision == 0 or await self._compacted_since_last_seen()):
            await self._relist()
        tasks = [
            asyncio.create_task(self._keepalive_loop(), name="beacon-store-keepalive"),
            asyncio.create_task(self._writer_loop(), name="beacon-store-writer"),
        ]
        if self._mirror:
            tasks.append(asyncio.create_task(self._watch_loop(), name="beacon-store-watch"))
        else:
            self._set_connected(True)
            self._first_attempt.set()
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()  # raises the first failure
            raise Unreachable("session tasks ended")  # pragma: no cover - they loop forever
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _set_connected(self, up: bool, why: str = "") -> None:
        if up == self._connected:
            if not up and not self._down_logged:  # never connected yet: say so once
                self._down_logged = True
                log.warning("disconnected: etcd unreachable (%s); serving local endpoints, retrying", why)
            return
        self._connected = up
        self._down_logged = not up
        if self._metrics:
            metrics.CONNECTED.set(1 if up else 0)
        if up:
            log.info("connected: etcd %s node=%s lease=%x revision=%d", self._gateway.endpoint, self._node,
                     self._lease or 0, self._revision)
        else:
            log.warning("disconnected: etcd (%s); serving the last catalog, local changes apply locally", why)

    async def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        reply = await self._gateway.call(path, body, self._request_timeout)
        self._head_revision = max(self._head_revision, _header_revision(reply))
        return reply

    # ---------------------------------------------------------------- lease
    async def _ensure_lease(self) -> None:
        if self._lease is not None:
            reply = await self._call("lease/keepalive", {"ID": str(self._lease)})
            if int(reply.get("result", reply).get("TTL", 0)) > 0:
                return  # same lease: every key written under it is still there
            log.warning("expired: lease %x of node %s; re-creating it and re-writing own keys",
                        self._lease, self._node)
            self._lease = None
        reply = await self._call("lease/grant", {"TTL": str(max(1, round(self._ttl)))})
        lease = int(reply["ID"])
        if self._metrics:
            metrics.LEASES.inc()
        await self._claim(lease)
        self._lease = lease
        self._written[True].clear()
        self._dirty[True] = set(self._desired[True])

    def _record(self, *, released: bool) -> bytes:
        rec = NodeRecord(self._node, self._instance, self._ttl, self._wall(), released)
        return json.dumps(asdict(rec), separators=(",", ":")).encode()

    async def _put_owner(self, lease: int, *, released: bool) -> None:
        key = b64(self._prefix + self._owner_key)
        await self._call("kv/put", {"key": key, "value": b64(self._record(released=released)), "lease": str(lease)})

    async def _claim(self, lease: int) -> None:
        """Create the ownership key under `lease`, or take it from a dead/released holder."""
        key = b64(self._prefix + self._owner_key)
        put = {"request_put": {"key": key, "value": b64(self._record(released=False)), "lease": str(lease)}}
        deadline = self._clock() + self._ttl + 2.0
        last_remaining: int | None = None
        while True:
            reply = await self._call("kv/txn", {
                "compare": [{"target": "CREATE", "key": key, "create_revision": "0"}],
                "success": [put],
                "failure": [{"request_range": {"key": key}}],
            })
            if reply.get("succeeded"):
                return
            kvs = reply.get("responses", [{}])[0].get("response_range", {}).get("kvs", [])
            if not kvs:
                continue  # deleted between the compare and the read: try again
            kv = kvs[0]
            holder_lease = int(kv.get("lease", 0))
            try:
                holder = json.loads(unb64(kv.get("value", "")))
            except ValueError:
                holder = {}
            if holder.get("instance") == self._instance or holder.get("released"):
                taken = await self._call("kv/txn", {
                    "compare": [{"target": "MOD", "key": key, "mod_revision": kv.get("mod_revision", "0")}],
                    "success": [put],
                })
                if taken.get("succeeded"):
                    if holder_lease and holder_lease != lease:
                        self._old_lease = holder_lease
                    log.info("claimed: node %s (taken over from %s)", self._node,
                             "a released agent" if holder.get("released") else "this agent's old lease")
                    return
                continue
            who = f"instance {str(holder.get('instance', '?'))[:8]}, lease {holder_lease:x}"
            ttl = await self._call("lease/timetolive", {"ID": str(holder_lease)})
            remaining = int(ttl.get("TTL", -1))
            if remaining > 0 and last_remaining is not None and remaining > last_remaining:
                raise NodeNameTaken(self._node, who)  # someone keeps that lease alive
            if remaining > 0:
                last_remaining = remaining
            if self._clock() > deadline:
                raise NodeNameTaken(self._node, who)
            if last_remaining is not None and remaining > 0:
                log.info("waiting: node %s is held by %s; taking it if that lease runs out", self._node, who)
            await asyncio.sleep(0.25)

    async def _keepalive_loop(self) -> None:
        interval = self._ttl / 3
        while True:
            await asyncio.sleep(interval)
            reply = await self._call("lease/keepalive", {"ID": str(self._lease)})
            result = reply.get("result", reply)
            self._head_revision = max(self._head_revision, _header_revision(result))
            if int(result.get("TTL", 0)) <= 0:
                raise LeaseLost(f"lease {self._lease or 0:x} expired")
            quiet = self._clock() - self._last_watch_message
            if self._mirror and quiet > self._watch_idle and self._head_revision > self._revision:
                raise WatchStalled(
                    f"watch silent for {quiet:.1f}s while etcd moved to revision {self._head_revision}"
                )
            if self._connected and quiet <= self._watch_idle:
                self._last_sync = self._clock()

    # ---------------------------------------------------------------- mirror
    async def _range(self, start: bytes, revision: int) -> tuple[dict[str, bytes], int]:
        end = prefix_end(start)
        out: dict[str, bytes] = {}
        cut = len(self._prefix.encode())
        key = start
        while True:
            body: dict[str, Any] = {"key": b64(key), "range_end": b64(end), "limit": str(PAGE_LIMIT)}
            if revision:
                body["revision"] = str(revision)
            reply = await self._call("kv/range", body)
            if not revision:
                revision = _header_revision(reply)
            kvs = reply.get("kvs", [])
            for kv in kvs:
                raw = unb64(kv["key"])
                out[raw[cut:].decode("utf-8", "surrogateescape")] = unb64(kv.get("value", ""))
            if not reply.get("more") or not kvs:
                return out, revision
            key = unb64(kvs[-1]["key"]) + b"\x00"

    async def _compacted_since_last_seen(self) -> bool:
        """True if etcd compacted beyond the last revision the mirror saw.

        etcd accepts a watch that starts exactly at the compact revision, but
        that revision has lost its deletions (compaction drops tombstones): a
        resumed watch would miss them. A read at the last seen revision fails
        precisely when the compaction went past it, so the mirror re-lists.
        """
        body = {"key": b64(self._nodes_range), "range_end": b64(prefix_end(self._nodes_range)),
                "revision": str(self._revision), "count_only": True}
        try:
            await self._call("kv/range", body)
        except EtcdError as exc:
            if exc.code == 11:  # OUT_OF_RANGE: "required revision has been compacted"
                log.warning("compacted: revision %d is gone; re-listing", self._revision)
                return True
            raise
        return False

    async def _relist(self) -> None:
        fresh, revision = await self._range(self._nodes_range, 0)
        old = self._view
        changes = [Change(k, v) for k, v in fresh.items() if old.get(k) != v]
        changes += [Change(k, None) for k in old if k not in fresh]
        self._view = fresh
        self._revision = revision
        self._last_sync = self._clock()
        self.relists += 1
        if self._metrics:
            metrics.RELISTS.inc()
        log.info("listed: %d keys at revision %d (%d changed)", len(fresh), revision, len(changes))
        self._emit(changes)

    def _emit(self, changes: Sequence[Change]) -> None:
        if not changes:
            return
        if self._metrics:
            metrics.EVENTS.inc(len(changes))
        for listener in list(self._listeners):
            try:
                listener(changes)
            except Exception:  # one broken listener must not stop the mirror
                log.exception("failed: store listener %r", listener)

    async def _watch_loop(self) -> None:
        while True:
            body = {"create_request": {
                "key": b64(self._nodes_range),
                "range_end": b64(prefix_end(self._nodes_range)),
                "start_revision": str(self._revision + 1),
                "progress_notify": True,
            }}
            self._last_watch_message = self._clock()
            async with self._gateway.stream("watch", body, self._request_timeout) as messages:
                compacted = await self._follow(messages)
            if compacted:
                log.warning("compacted: revision %d is gone (compacted at %d); re-listing",
                            self._revision + 1, compacted)
                await self._relist()

    async def _follow(self, messages: Any) -> int:
        """Apply watch messages; return the compact revision when the watch is canceled for it."""
        cut = len(self._prefix.encode())
        async for msg in messages:
            self._last_watch_message = self._clock()
            if msg.get("canceled"):
                compact = int(msg.get("compact_revision", 0))
                if compact:
                    return compact
                raise Unreachable(f"watch canceled: {msg.get('cancel_reason', 'no reason given')}")
            if msg.get("created"):
                self._head_revision = max(self._head_revision, _header_revision(msg))
                self._set_connected(True)
                self._first_attempt.set()
                self._last_sync = self._clock()
                continue
            events = msg.get("events") or []
            changes: list[Change] = []
            for ev in events:
                kv = ev.get("kv", {})
                key = unb64(kv.get("key", ""))[cut:].decode("utf-8", "surrogateescape")
                if ev.get("type") == "DELETE":
                    if self._view.pop(key, None) is not None:
                        changes.append(Change(key, None))
                else:
                    value = unb64(kv.get("value", ""))
                    if self._view.get(key) != value:
                        self._view[key] = value
                        changes.append(Change(key, value))
                self._revision = max(self._revision, int(kv.get("mod_revision", 0)))
            if not events:  # a progress notification: the mirror is current up to here
                self._revision = max(self._revision, _header_revision(msg))
            self._last_sync = self._clock()
            self._emit(changes)
        raise Unreachable("watch stream ended")

    # ---------------------------------------------------------------- writer
    async def _writer_loop(self) -> None:
        while True:
            # Clear before looking, never after: a key set while a batch or the
            # cleanup awaits etcd sets the event again, and is picked up next turn.
            self._wake.clear()
            for leased in (True, False):
                while self._dirty[leased]:
                    keys = [self._dirty[leased].pop() for _ in range(min(TXN_OPS, len(self._dirty[leased])))]
                    batch = {k: self._desired[leased].get(k) for k in keys}
                    try:
                        await self._write_batch(leased, batch)
                    except BaseException:
                        self._dirty[leased].update(k for k in keys if self._desired[leased].get(k)
                                                   != self._written[leased].get(k))
                        raise
            if self._complete and self._cleanup_pending:
                await self._cleanup()
            if not self.pending_writes():
                self._flushed.set()
            await self._wake.wait()

    async def _write_batch(self, leased: bool, batch: Mapping[str, bytes | None]) -> None:
        if not batch:
            return
        ops: list[dict[str, Any]] = []
        for key, value in batch.items():
            full = b64(self._prefix + key)
            if value is None:
                ops.append({"request_delete_range": {"key": full}})
            else:
                put: dict[str, Any] = {"key": full, "value": b64(value)}
                if leased:
                    put["lease"] = str(self._lease)
                ops.append({"request_put": put})
        await self._call("kv/txn", {"success": ops})
        written = self._written[leased]
        puts = 0
        for key, value in batch.items():
            if value is None:
                written.pop(key, None)
            else:
                written[key] = value
                puts += 1
        if self._metrics:
            metrics.WRITES.labels("put").inc(puts)
            metrics.WRITES.labels("delete").inc(len(batch) - puts)

    async def _cleanup(self) -> None:
        """After a (re)start: delete own keys an earlier session left that are not wanted now."""
        existing, _ = await self._range((self._prefix + self._own_prefix).encode(), 0)
        stale = {k: None for k in existing if k != self._owner_key and k not in self._desired[True]}
        items = list(stale.items())
        for i in range(0, len(items), TXN_OPS):
            await self._write_batch(True, dict(items[i : i + TXN_OPS]))
        if self._old_lease is not None:
            with contextlib.suppress(EtcdError):
                await self._call("lease/revoke", {"ID": str(self._old_lease)})
            self._old_lease = None
        self._cleanup_pending = False
        if stale:
            log.info("removed: %d keys of an earlier session of node %s", len(stale), self._node)
