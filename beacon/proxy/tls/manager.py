"""Which ACME certificates exist, which to order or renew, and when to retry.

Runs on the event loop; each order runs in a thread (the `acme` package is
synchronous). Decisions use an injected wall clock (`clock`), so tests move
time instead of waiting:

- order on first need: a host that `policy.may_order` admits and that has no
  stored certificate;
- renew at two thirds of the lifetime, or at the ARI time when the ACME server
  gave one;
- one order per host at a time (a task per host in this process, plus the
  store's issuance lock across processes);
- a failed order keeps serving the old certificate and is retried after
  RETRY_BASE * 2^(failures-1), capped at RETRY_CAP; the failure count and the
  next attempt are stored, so a restart (or a crash loop) does not retry early.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

from beacon.proxy.tls.certs import Certificate, load_pair
from beacon.proxy.tls.issuer import AcmeIssuer, Issued
from beacon.proxy.tls.store import CertStore

log = logging.getLogger("beacon.proxy.tls")

# Module constants rather than options: they protect the CA's rate limits and
# need no tuning per deployment (tests patch them).
T = TypeVar("T")
RETRY_BASE = 60.0
RETRY_CAP = 6 * 3600.0
CHECK_INTERVAL = 10.0


def retry_delay(failures: int) -> float:
    """Pure: the wait after the n-th failure in a row (n >= 1)."""
    return min(RETRY_CAP, RETRY_BASE * 2.0 ** min(failures - 1, 30))


def in_daemon_thread(loop: asyncio.AbstractEventLoop, call: Callable[[str], T], arg: str) -> asyncio.Future[T]:
    """Run a blocking ACME call in its own daemon thread. Not an executor: a
    thread inside `acme`'s polling cannot be interrupted, and executor threads
    are joined at exit - a stalled CA would hold up Beacon's shutdown. Orders
    are rare (one thread per order, one order per host at a time)."""
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, exc: BaseException | None) -> None:
        if future.done():
            return  # cancelled (shutdown) meanwhile
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def work() -> None:
        try:
            result = call(arg)
        except BaseException as exc:
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits any more
                loop.call_soon_threadsafe(settle, None, exc)
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=work, name=f"beacon-acme-{arg}", daemon=True).start()
    return future


def store_key(host: str) -> str:
    return host.replace("*", "_")


@dataclass(slots=True)
class HostState:
    failures: int = 0
    next_attempt: float = 0.0
    ari_renew_at: float | None = None
    last_error: str = ""


class CertificateManager:
    def __init__(self, store: CertStore, issuer: AcmeIssuer, on_change: Callable[[], None],
                 clock: Callable[[], float] = time.time) -> None:  # fmt: skip
        self.store = store
        self.issuer = issuer
        self.on_change = on_change
        self.clock = clock
        self.certs: dict[str, Certificate] = {}
        self.states: dict[str, HostState] = {}
        self.wanted: frozenset[str] = frozenset()
        self.orders: dict[str, asyncio.Task[None]] = {}
        self.issued_total: dict[str, int] = {}
        self.failures_total: dict[str, int] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------ lifecycle
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.load_stored()
        self._timer = loop.call_later(CHECK_INTERVAL, self._tick)

    async def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for task in list(self.orders.values()):
            task.cancel()
        if self.orders:
            await asyncio.gather(*self.orders.values(), return_exceptions=True)

    def load_stored(self) -> None:
        """Certificates and retry state from the store: a restart re-issues nothing."""
        for name in self.store.names("certs/"):
            if not name.endswith(".crt"):
                continue
            key = name[: -len(".crt")]
            host = key[len("certs/") :]
            chain, pem_key = self.store.read(name), self.store.read(key + ".key")
            if chain is None or pem_key is None:
                continue
            try:
                cert = load_pair(chain, pem_key, origin="acme")
            except ValueError as exc:
                log.error("failed: stored certificate for %s: %s", host, exc)
                continue
            self.certs[host] = cert
        for name in self.store.names("state/"):
            raw = self.store.read(name)
            host = name[len("state/") : -len(".json")]
            try:
                data = json.loads(raw or b"{}")
                self.states[host] = HostState(int(data.get("failures", 0)), float(data.get("next_attempt", 0.0)),
                                              data.get("ari_renew_at"), str(data.get("last_error", "")))  # fmt: skip
            except (ValueError, TypeError):
                continue
        if self.certs:
            log.info("loaded: %d stored ACME certificate%s (%s)", len(self.certs), "s" if len(self.certs) > 1 else "",
                     ", ".join(sorted(self.certs)))  # fmt: skip

    def _save_state(self, host: str, state: HostState) -> None:
        data = {"failures": state.failures, "next_attempt": state.next_attempt, "ari_renew_at": state.ari_renew_at,
                "last_error": state.last_error[:500]}  # fmt: skip
        self.store.write(f"state/{store_key(host)}.json", json.dumps(data).encode())

    # ------------------------------------------------------------ decisions
    def want(self, hosts: Iterable[str]) -> None:
        """The hosts that may be ordered now (from the routes); orders what is due."""
        self.wanted = frozenset(hosts)
        for host in sorted(self.wanted):
            self._consider(host)

    def renew_at(self, host: str) -> float:
        cert = self.certs[host]
        state = self.states.get(host)
        if state is not None and state.ari_renew_at is not None and state.ari_renew_at < cert.not_after:
            return state.ari_renew_at
        return cert.renew_at()

    def due(self, host: str, now: float) -> bool:
        """Pure decision: order or renew `host` now?"""
        if host in self.orders:
            return False
        state = self.states.get(host)
        if state is not None and state.failures and now < state.next_attempt:
            return False
        return host not in self.certs or now >= self.renew_at(host)

    def _consider(self, host: str) -> None:
        if self._loop is None or not self.due(host, self.clock()):
            return
        self.orders[host] = self._loop.create_task(self._order(host))

    def _tick(self) -> None:
        try:
            for host in sorted(self.wanted):
                self._consider(host)
        finally:
            if self._loop is not None:
                self._timer = self._loop.call_later(CHECK_INTERVAL, self._tick)

    # --------------------------------------------------------------- orders
    async def _order(self, host: str) -> None:
        loop = asyncio.get_running_loop()
        renewing = host in self.certs
        log.info("ordering: certificate for %s (%s)", host, "renewal" if renewing else "first")
        try:
            issued = await in_daemon_thread(loop, self._locked_issue, host)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._failed(host, exc)
            return
        finally:
            self.orders.pop(host, None)
        if issued is None:
            log.info("ignored: certificate for %s is being ordered by another holder of the storage lock", host)
            return
        try:
            cert = load_pair(issued.chain_pem, issued.key_pem, origin="acme")
        except ValueError as exc:
            self._failed(host, exc)
            return
        key = f"certs/{store_key(host)}"
        # Key first: a crash between the two writes leaves the old pair or a
        # new key with an old chain, which fails to load and is re-ordered.
        self.store.write(key + ".key", issued.key_pem, secret=True)
        self.store.write(key + ".crt", issued.chain_pem)
        self.certs[host] = cert
        state = HostState(ari_renew_at=issued.renew_at)
        self.states[host] = state
        self._save_state(host, state)
        self.issued_total[host] = self.issued_total.get(host, 0) + 1
        log.info("issued: certificate for %s valid until %s (renewal after %s)", host,
                 _iso(cert.not_after), _iso(self.renew_at(host)))  # fmt: skip
        self.on_change()

    def _locked_issue(self, host: str) -> Issued | None:
        with self.store.issuance_lock(store_key(host)) as held:
            if not held:
                return None
            return self.issuer.issue(host)

    def _failed(self, host: str, exc: BaseException) -> None:
        state = self.states.setdefault(host, HostState())
        state.failures += 1
        delay = retry_delay(state.failures)
        state.next_attempt = self.clock() + delay
        state.last_error = f"{type(exc).__name__}: {exc}"
        self.failures_total[host] = self.failures_total.get(host, 0) + 1
        self.issuer.forget_client()
        old = self.certs.get(host)
        log.error("failed: ACME order for %s (%s); %s; retrying in %.0fs", host, state.last_error,
                  f"still serving the certificate valid until {_iso(old.not_after)}" if old else "no certificate yet",
                  delay)  # fmt: skip
        try:
            self._save_state(host, state)
        except OSError as e:
            log.error("failed: storing the retry state of %s: %s", host, e)


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
