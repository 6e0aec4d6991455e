r"""Pure: which hosts are served over TLS, redirected, sent HSTS, and may be ordered.

Labels (copied verbatim into `Endpoint.meta` by the label parser, so manual
registrations can set the same keys in their `meta`):

| label | meaning |
| --- | --- |
| `beacon.tls=true\|false` | the hosts this service's routes name are served over TLS |
| `beacon.tls.redirect=true` | plain HTTP to those hosts gets a 308 to https (implies `beacon.tls=true`) |
| `beacon.tls.hsts=true\|max-age=N[; includeSubDomains][; preload]` | HTTPS responses carry `Strict-Transport-Security` (`true` = one year) |

`--tls-default off|on|redirect` applies to every service without `beacon.tls`.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from beacon.proxy.router import ANY_HOST, service_routes
from beacon.registry.model import Service

LABEL_TLS = "beacon.tls"
LABEL_REDIRECT = "beacon.tls.redirect"
LABEL_HSTS = "beacon.tls.hsts"
HSTS_YEAR = "max-age=31536000"
_HSTS = re.compile(r"max-age=[0-9]{1,10}(\s*;\s*includeSubDomains)?(\s*;\s*preload)?", re.IGNORECASE)
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
# Suffixes no public CA issues for (RFC 2606, RFC 6761, RFC 6762, RFC 8375, common LAN names).
PRIVATE_SUFFIXES = ("localhost", "local", "internal", "test", "invalid", "example", "home.arpa",
                    "lan", "home", "corp", "intranet", "localdomain", "onion")  # fmt: skip
_LDH = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


@dataclass(frozen=True, slots=True)
class Site:
    """What TLS means for one host."""

    host: str
    redirect: bool = False
    hsts: str | None = None  # the header value
    services: tuple[str, ...] = ()


@dataclass(slots=True)
class SiteTable:
    exact: dict[str, Site] = field(default_factory=dict)
    wildcard: dict[str, Site] = field(default_factory=dict)  # "example.com" for *.example.com
    problems: tuple[str, ...] = ()

    def lookup(self, host: str) -> Site | None:
        site = self.exact.get(host)
        if site is not None:
            return site
        # A route wildcard covers any depth (as the router does).
        dot = host.find(".")
        while dot >= 0:
            site = self.wildcard.get(host[dot + 1 :])
            if site is not None:
                return site
            dot = host.find(".", dot + 1)
        return None

    def hosts(self) -> list[str]:
        return sorted(self.exact)


def _bool(value: str | None) -> bool | None:
    if value is None:
        return None
    v = value.strip().lower()
    return True if v in _TRUE else False if v in _FALSE else None


def service_settings(svc: Service, default: str, problems: list[str]) -> tuple[bool, bool, str | None]:
    """(tls, redirect, hsts) of a service: the first endpoint (by id) that sets a label decides."""
    tls_raw = redirect_raw = hsts_raw = None
    for ep in svc.endpoints:
        meta = ep.meta
        tls_raw = tls_raw if tls_raw is not None else meta.get(LABEL_TLS)
        redirect_raw = redirect_raw if redirect_raw is not None else meta.get(LABEL_REDIRECT)
        hsts_raw = hsts_raw if hsts_raw is not None else meta.get(LABEL_HSTS)
    tls = _bool(tls_raw)
    if tls_raw is not None and tls is None:
        problems.append(f"service {svc.name}: label {LABEL_TLS}={tls_raw!r}: expected true or false; using --tls-default")
    redirect = _bool(redirect_raw)
    if redirect_raw is not None and redirect is None:
        problems.append(f"service {svc.name}: label {LABEL_REDIRECT}={redirect_raw!r}: expected true or false; ignored")
    if tls is None:
        tls = default != "off" or bool(redirect)
        if redirect is None:
            redirect = default == "redirect"
    hsts: str | None = None
    if hsts_raw is not None:
        flag = _bool(hsts_raw)
        if flag is True:
            hsts = HSTS_YEAR
        elif flag is None:
            if _HSTS.fullmatch(hsts_raw.strip()):
                hsts = re.sub(r"\s*;\s*", "; ", hsts_raw.strip())
            else:
                problems.append(f"service {svc.name}: label {LABEL_HSTS}={hsts_raw!r}: expected true, false or "
                                "max-age=SECONDS[; includeSubDomains][; preload]; ignored")  # fmt: skip
    return tls, bool(redirect) and tls, hsts if tls else None


@dataclass(frozen=True, slots=True)
class _ServiceSites:
    service: Service
    hosts: tuple[str, ...]  # empty: no TLS
    redirect: bool
    hsts: str | None
    problems: tuple[str, ...]


def _service_sites(svc: Service, domain_b: bytes, default: str) -> _ServiceSites:
    problems: list[str] = []
    tls, redirect, hsts = service_settings(svc, default, problems)
    hosts: tuple[str, ...] = ()
    if tls:
        hosts = tuple(dict.fromkeys(r.host.decode("ascii", "replace") for r in service_routes(svc, domain_b)
                                    if r.host != ANY_HOST))  # fmt: skip
    return _ServiceSites(svc, hosts, redirect, hsts, tuple(problems))


def build_sites(services: Mapping[str, Service], domain: str, default: str = "off",
                memo: dict[str, _ServiceSites] | None = None) -> SiteTable:  # fmt: skip
    """Every host a TLS-enabled service's routes name -> its Site.

    Several services on one host (different path prefixes): TLS and redirect if
    any of them asks, HSTS from the first (by name) that sets it. `memo` (kept
    by the caller between snapshots) skips services whose object is unchanged.
    """
    domain_b = domain.strip().rstrip(".").lower().encode("ascii")
    memo = memo if memo is not None else {}
    for gone in [n for n in memo if n not in services]:
        del memo[gone]
    problems: list[str] = []
    merged: dict[str, Site] = {}
    for name in sorted(services):
        svc = services[name]
        part = memo.get(name)
        if part is None or part.service is not svc:
            part = memo[name] = _service_sites(svc, domain_b, default)
        problems += part.problems
        for host in part.hosts:
            old = merged.get(host)
            if old is None:
                merged[host] = Site(host, part.redirect, part.hsts, (name,))
            else:
                merged[host] = Site(host, old.redirect or part.redirect, old.hsts or part.hsts,
                                    tuple(dict.fromkeys((*old.services, name))))  # fmt: skip
    table = SiteTable(problems=tuple(problems))
    for host, site in merged.items():
        if host.startswith("*."):
            table.wildcard[host[2:]] = site
        else:
            table.exact[host] = site
    return table


def public_looking(host: str) -> bool:
    """A name a public CA could issue for: two or more LDH labels, alphabetic TLD,
    not an address, not a reserved or LAN suffix, no wildcard."""
    if len(host) > 253 or "." not in host or host.startswith("*"):
        return False
    parts = host.split(".")
    if not all(_LDH.fullmatch(p) for p in parts) or not parts[-1].isalpha():
        return False
    return not any(host == s or host.endswith("." + s) for s in PRIVATE_SUFFIXES)


def may_order(host: str, sites: SiteTable, allow: Iterable[str]) -> bool:
    """Only an exact, public-looking host that a TLS route names, and that the
    --acme-allow patterns (if any) admit, is ever ordered: never a name a client
    merely sent in SNI."""
    if host not in sites.exact or not public_looking(host):
        return False
    patterns = list(allow)
    return not patterns or any(fnmatch.fnmatchcase(host, p) for p in patterns)
