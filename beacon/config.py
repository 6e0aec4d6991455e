"""One frozen configuration object, built once at the edge.

Every option is declared once in `OPTIONS`: its flag, its `BEACON_*`
environment variable, its parser and its default. The CLI builds argparse from
this table, and `build_config` is the only code in Beacon that reads the
environment. Precedence: flag > environment variable > default.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

from beacon.grammar import (
    HostPort,
    is_dns_name,
    parse_bool,
    parse_duration,
    parse_hostport,
)


class ConfigError(ValueError):
    """A bad flag or environment value; the message names the option."""


# The value grammar lives in beacon.grammar; these names are re-exported for
# the code that imported them from here.
__all__ = ["OPTIONS", "Config", "ConfigError", "HostPort", "Option", "build_config", "parse_bool",
           "parse_duration", "parse_hostport"]  # fmt: skip


# --------------------------------------------------------------------- parsers
def _positive_duration(text: str) -> float:
    """A timeout or base time: zero would make every try fail or divide by zero."""
    value = parse_duration(text)
    if value <= 0:
        raise ValueError(f"expected a duration above zero, got {text!r}")
    return value


def _whole_number(text: str, what: str = "a whole number") -> int:
    """ASCII digits only (int() also takes '²'-like digits and '1_000'), with a message
    that says what was expected."""
    t = text.strip()
    if not (t.isascii() and t.lstrip("-").isdigit()) or len(t) > 19:
        raise ValueError(f"expected {what}, got {text!r}")
    return int(t)


def _auto_bool(text: str) -> bool | None:
    """parse_bool, or None for 'auto' (validate() decides from other options)."""
    return None if text.strip().lower() == "auto" else parse_bool(text)


def _positive_int(text: str) -> int:
    value = _whole_number(text)
    if value < 1:
        raise ValueError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    value = _whole_number(text)
    if value < 0:
        raise ValueError(f"expected an integer >= 0, got {text!r}")
    return value


def _dns_ttl(text: str) -> int:
    """TTL in seconds: 0 .. 2^31-1 (RFC 2181, section 8)."""
    value = _whole_number(text, "seconds")
    if value < 0:
        raise ValueError(f"expected an integer >= 0 (seconds), got {text!r}")
    if value > 2**31 - 1:
        raise ValueError(f"TTL must be at most 2147483647 seconds, got {text!r}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected a fraction between 0 and 1, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"expected a fraction between 0 and 1, got {text!r}")
    return value


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}, got {text!r}")
        return text

    parse.choices = allowed  # type: ignore[attr-defined]  # shown by `beacon run --help`
    return parse


def _ip(text: str) -> str:
    return str(ipaddress.ip_address(text.strip()))


def _network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text.strip(), strict=False)


def _dns_domain(text: str) -> str:
    name = text.strip().strip(".").lower()
    if not is_dns_name(name):
        raise ValueError(f"not a valid DNS domain: {text!r}")
    return name + "."


def _allowed_host(text: str) -> str:
    name = text.strip().rstrip(".").lower()
    if name != "*" and not is_dns_name(name, wildcard=True):
        raise ValueError(f"not a host name: {text!r}")
    return name


def _recursor(text: str) -> HostPort:
    text = text.strip()
    try:
        return HostPort(str(ipaddress.ip_address(text)), 53)
    except ValueError:
        return parse_hostport(text)


def _store_url(text: str) -> str:
    """'memory' or etcd://HOST:PORT[,HOST:PORT...] (normalised)."""
    t = text.strip()
    if t == "memory":
        return t
    if not t.startswith("etcd://"):
        raise ValueError(f"expected memory or etcd://HOST:PORT[,HOST:PORT...], got {text!r}")
    members = [p for p in t[len("etcd://"):].split(",") if p.strip()]
    if not members:
        raise ValueError(f"no etcd endpoint in {text!r}")
    parsed = [parse_hostport(m) for m in members]
    if any(hp.port == 0 for hp in parsed):
        raise ValueError(f"an etcd endpoint needs a port, got {text!r}")
    return "etcd://" + ",".join(str(hp) for hp in parsed)


def etcd_endpoints(store: str) -> tuple[str, ...]:
    """The HOST:PORT list of an etcd:// store URL (empty for memory)."""
    return tuple(store[len("etcd://"):].split(",")) if store.startswith("etcd://") else ()


def _store_prefix(text: str) -> str:
    t = text.strip()
    if not re.fullmatch(r"/[A-Za-z0-9_.\-/]*", t) or "//" in t:
        raise ValueError(f"expected a key prefix like /beacon/, got {text!r}")
    return t if t.endswith("/") else t + "/"


def _lease_ttl(text: str) -> float:
    value = parse_duration(text)
    if not 1 <= value <= 3600:
        raise ValueError(f"expected a lease TTL between 1s and 1h, got {text!r}")
    return value


@dataclass(frozen=True, slots=True)
class Option:
    name: str  # Config field
    flag: str
    parse: Callable[[str], Any]
    default: Any
    help: str
    repeated: bool = False  # flag may be given several times; env var is comma-separated
    metavar: str | None = None

    @property
    def env(self) -> str:
        return "BEACON_" + self.name.upper()

    @property
    def is_switch(self) -> bool:
        """A boolean: `--explicit` alone means true; `--explicit false` is allowed too."""
        return self.parse is parse_bool or self.parse is _auto_bool


# Parsers whose values are durations: `beacon run --help` says so and prints
# their defaults as durations (10s, not 10.0).
DURATION_PARSERS: frozenset[Callable[[str], Any]] = frozenset({parse_duration, _positive_duration, _lease_ttl})


_LOOPBACK_NETS = ("127.0.0.0/8", "::1/128")

OPTIONS: tuple[Option, ...] = (
    # --- general
    Option("log_level", "--log-level", _choice("debug", "info", "warning", "error"), "info", "log verbosity"),
    Option("log_format", "--log-format", _choice("text", "json"), "text", "Beacon's own log lines on stderr: text, or JSON (one object a line)"),
    Option("shutdown_timeout", "--shutdown-timeout", _positive_duration, 10.0, "bound on graceful shutdown"),
    Option("node", "--node", str, "", "node name reported with endpoints (default: hostname)"),
    # --- registry
    Option("api_listen", "--api-listen", parse_hostport, HostPort("127.0.0.1", 8700), "REST API listener", metavar="HOST:PORT"),
    Option("api_token", "--api-token", str, "", "bearer token required for API writes (empty: none)"),
    Option("api_max_watchers", "--api-max-watchers", _positive_int, 1024, "concurrent /v1/watch streams and blocking queries (more: 429)"),
    Option("api_allowed_hosts", "--api-allowed-hosts", _allowed_host, (), "host names API writes may be addressed to besides localhost and IP addresses (DNS rebinding guard; '*': any)", repeated=True, metavar="NAME"),
    Option("docker_host", "--docker-host", str, "", "Docker engine URL (default: DOCKER_HOST or the local socket)"),
    Option("docker", "--docker", parse_bool, True, "watch the Docker engine (false: manual registrations only)"),
    Option("explicit", "--explicit", parse_bool, False, "register only containers labelled beacon.enable=true"),
    Option("address_mode", "--address-mode", _choice("host", "internal"), "host", "advertise published host ports (host) or container IPs (internal)"),
    Option("network", "--network", str, "", "Docker network whose container IP is advertised in internal mode"),
    Option("advertise_ip", "--advertise-ip", _ip, "", "host address advertised for published ports (default: detected)"),
    Option("resync_interval", "--resync-interval", parse_duration, 30.0, "periodic full resync with Docker (a diff)"),
    Option("deregister_critical_after", "--deregister-critical-after", parse_duration, 60.0, "remove a manual endpoint critical for this long"),
    Option("check_concurrency", "--check-concurrency", _positive_int, 64, "active health checks run at once"),
    # --- cluster store (password: BEACON_ETCD_PASSWORD only, never a flag)
    Option("store", "--store", _store_url, "memory", "catalog store: memory (one host) or etcd://HOST:PORT[,HOST:PORT...]", metavar="URL"),
    Option("store_prefix", "--store-prefix", _store_prefix, "/beacon/", "key prefix of this Beacon cluster in etcd"),
    Option("lease_ttl", "--lease-ttl", _lease_ttl, 10.0, "etcd lease TTL: a dead agent's endpoints leave other nodes after it"),
    Option("etcd_cacert", "--etcd-cacert", str, "", "CA certificate file to verify etcd (turns on TLS)", metavar="FILE"),
    Option("etcd_cert", "--etcd-cert", str, "", "client certificate file for etcd (TLS)", metavar="FILE"),
    Option("etcd_key", "--etcd-key", str, "", "client key file for etcd (TLS)", metavar="FILE"),
    Option("etcd_user", "--etcd-user", str, "", "etcd user (password from BEACON_ETCD_PASSWORD)"),
    # --- dns
    Option("dns_listen", "--dns-listen", parse_hostport, (HostPort("127.0.0.1", 8600),), "DNS listener, UDP and TCP (repeatable)", repeated=True, metavar="HOST:PORT"),
    Option("dns_domain", "--dns-domain", _dns_domain, "beacon.", "domain Beacon is authoritative for"),
    Option("dns_ttl", "--dns-ttl", _dns_ttl, 0, "TTL of service answers, seconds"),
    Option("dns_negative_ttl", "--dns-negative-ttl", _dns_ttl, 5, "TTL of NXDOMAIN/NODATA (SOA minimum), seconds"),
    Option("dns_only_passing", "--dns-only-passing", parse_bool, False, "answer with passing endpoints only (not warning)"),
    Option("dns_recursors", "--dns-recursors", _recursor, None, "upstream resolvers for other names (default: /etc/resolv.conf; 'none': refuse)", repeated=True, metavar="IP[:PORT]"),
    Option("dns_recursor_timeout", "--dns-recursor-timeout", _positive_duration, 2.0, "timeout per upstream try"),
    Option("dns_allow", "--dns-allow", _network, None, "networks allowed to use forwarding when listening beyond loopback (default: loopback and Docker networks)", repeated=True, metavar="CIDR"),
    Option("dns_tcp_max_connections", "--dns-tcp-max-connections", _positive_int, 256, "DNS/TCP connections open at once; more are closed at accept"),
    Option("dns_tcp_idle_timeout", "--dns-tcp-idle-timeout", _positive_duration, 10.0, "close a DNS/TCP connection that completes no query for this long"),
    # --- proxy
    Option("proxy_listen", "--proxy-listen", parse_hostport, HostPort("127.0.0.1", 8080), "HTTP proxy listener", metavar="HOST:PORT"),
    Option("proxy_domain", "--proxy-domain", _dns_domain, "localhost.", "route Host <service>.<domain> to the service"),
    Option("proxy_expose_by_default", "--proxy-expose-by-default", parse_bool, True, "route every service at <service>.<proxy-domain> (false: only services with beacon.http.host or beacon.http.path_prefix labels)"),
    Option("lb", "--lb", _choice("round_robin", "least_conn", "random"), "round_robin", "default balancing policy (label beacon.lb overrides)"),
    Option("proxy_workers", "--proxy-workers", _positive_int, 1, "proxy processes sharing the port (SO_REUSEPORT)"),
    Option("proxy_isolated", "--proxy-isolated", _auto_bool, None, "forward only in worker processes (--proxy-workers of them), never in the process that runs the API, DNS and Docker watch: true, false or auto (default: auto - true, false with --proxy-tls-listen, whose TLS and ACME answers run in the control process)"),
    Option("trusted_proxies", "--trusted-proxies", _network, (), "networks whose X-Forwarded-* headers are trusted", repeated=True, metavar="CIDR"),
    Option("proxy_attempts", "--proxy-attempts", _positive_int, 3, "tries per request (first + retries)"),
    Option("proxy_try_timeout", "--proxy-try-timeout", _positive_duration, 30.0, "timeout of one upstream try (until the response header)"),
    Option("proxy_connect_timeout", "--proxy-connect-timeout", _positive_duration, 3.0, "upstream connect timeout"),
    Option("proxy_idle_timeout", "--proxy-idle-timeout", _positive_duration, 60.0, "idle keep-alive timeout, both sides"),
    Option("proxy_header_timeout", "--proxy-header-timeout", _positive_duration, 10.0, "time a client has to send its request header"),
    Option("proxy_max_header_size", "--proxy-max-header-size", _positive_int, 65536, "largest request header, bytes"),
    Option("proxy_max_connections", "--proxy-max-connections", _non_negative_int, 0, "most client connections per proxy process (0: from the open-file limit, at most 10000)"),
    Option("proxy_max_body_size", "--proxy-max-body-size", _non_negative_int, 0, "largest request body, bytes (0: no limit)"),
    Option("access_log", "--access-log", str, "", "proxy access log, one line per request: '-' or 'stdout', or a file appended to (empty: off)", metavar="FILE"),
    Option("access_log_format", "--access-log-format", _choice("common", "combined", "json"), "", "access log lines: common, combined (nginx's, plus Beacon's fields) or json (default: combined; json with --log-format json)"),
    Option("eject_consecutive_failures", "--eject-consecutive-failures", _positive_int, 5, "gateway errors in a row that eject an endpoint"),
    Option("eject_base_time", "--eject-base-time", _positive_duration, 30.0, "first ejection time, grows with each ejection"),
    Option("eject_max_percent", "--eject-max-percent", _fraction, 0.5, "most of a pool that may be ejected at once (at least one endpoint stays)"),
    # --- proxy TLS (beacon/proxy/tls/README.md)
    Option("proxy_tls_listen", "--proxy-tls-listen", parse_hostport, None, "HTTPS listener of the proxy (e.g. 0.0.0.0:443; default: none)", metavar="HOST:PORT"),
    Option("tls_cert_dir", "--tls-cert-dir", str, "", "directory of NAME.crt + NAME.key PEM pairs, reloaded on change"),
    Option("tls_default", "--tls-default", _choice("off", "on", "redirect"), "off", "TLS for services without a beacon.tls label: off, on, or on with a redirect from http"),
    Option("acme_storage", "--acme-storage", str, "", "directory for the ACME account and certificates (turns ACME on)"),
    Option("acme_email", "--acme-email", str, "", "contact address of the ACME account"),
    Option("acme_directory", "--acme-directory", str, "https://acme-v02.api.letsencrypt.org/directory", "ACME directory URL (Let's Encrypt staging: https://acme-staging-v02.api.letsencrypt.org/directory)"),
    Option("acme_ca_bundle", "--acme-ca-bundle", str, "", "CA bundle trusted for the ACME server's own HTTPS (step-ca, Pebble)"),
    Option("acme_allow", "--acme-allow", str, (), "host patterns ACME may order for (e.g. *.example.com; default: every public-looking TLS route host)", repeated=True, metavar="PATTERN"),
    Option("acme_challenge", "--acme-challenge", _choice("http-01", "tls-alpn-01"), "http-01", "challenge answered first (the other if the server lacks it)"),
)


@dataclass(frozen=True, slots=True)
class Config:
    log_level: str = "info"
    log_format: str = "text"
    shutdown_timeout: float = 10.0
    node: str = ""
    api_listen: HostPort = HostPort("127.0.0.1", 8700)
    api_token: str = ""
    api_allowed_hosts: tuple[str, ...] = ()
    api_max_watchers: int = 1024
    docker_host: str = ""
    docker: bool = True
    explicit: bool = False
    address_mode: str = "host"
    network: str = ""
    advertise_ip: str = ""
    resync_interval: float = 30.0
    deregister_critical_after: float = 60.0
    check_concurrency: int = 64
    store: str = "memory"
    store_prefix: str = "/beacon/"
    lease_ttl: float = 10.0
    etcd_cacert: str = ""
    etcd_cert: str = ""
    etcd_key: str = ""
    etcd_user: str = ""
    etcd_password: str = field(default="", repr=False)  # BEACON_ETCD_PASSWORD only
    dns_listen: tuple[HostPort, ...] = (HostPort("127.0.0.1", 8600),)
    dns_domain: str = "beacon."
    dns_ttl: int = 0
    dns_negative_ttl: int = 5
    dns_only_passing: bool = False
    # None: read /etc/resolv.conf at start; (): forwarding disabled ('none').
    dns_recursors: tuple[HostPort, ...] | None = None
    dns_recursor_timeout: float = 2.0
    # None: loopback plus the Docker networks, found at start.
    dns_allow: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] | None = None
    dns_tcp_max_connections: int = 256
    dns_tcp_idle_timeout: float = 10.0
    proxy_listen: HostPort = HostPort("127.0.0.1", 8080)
    proxy_domain: str = "localhost."
    proxy_expose_by_default: bool = True
    lb: str = "round_robin"
    proxy_workers: int = 1
    proxy_isolated: bool | None = None  # None: auto, resolved by validate()
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    proxy_attempts: int = 3
    proxy_try_timeout: float = 30.0
    proxy_connect_timeout: float = 3.0
    proxy_idle_timeout: float = 60.0
    proxy_header_timeout: float = 10.0
    proxy_max_header_size: int = 65536
    proxy_max_body_size: int = 0
    proxy_max_connections: int = 0
    access_log: str = ""
    access_log_format: str = ""  # "": combined, or json with --log-format json
    eject_consecutive_failures: int = 5
    eject_base_time: float = 30.0
    eject_max_percent: float = 0.5
    proxy_tls_listen: HostPort | None = None
    tls_cert_dir: str = ""
    tls_default: str = "off"
    acme_storage: str = ""
    acme_email: str = ""
    acme_directory: str = "https://acme-v02.api.letsencrypt.org/directory"
    acme_ca_bundle: str = ""
    acme_allow: tuple[str, ...] = ()
    acme_challenge: str = "http-01"

    def validate(self) -> Config:
        """Check options that depend on each other; raise ConfigError naming them."""
        if self.address_mode == "host" and self.network:
            raise ConfigError("--network only applies with --address-mode internal")
        if self.advertise_ip in ("0.0.0.0", "::"):
            raise ConfigError("--advertise-ip must be a routable address, not a wildcard")
        if self.proxy_try_timeout < self.proxy_connect_timeout:
            raise ConfigError("--proxy-try-timeout must be at least --proxy-connect-timeout")
        if self.access_log_format and not self.access_log:
            raise ConfigError("--access-log-format needs --access-log")
        if self.resync_interval < 1:
            raise ConfigError("--resync-interval must be at least 1s")
        if self.store == "memory" and (self.etcd_cacert or self.etcd_cert or self.etcd_key or self.etcd_user):
            raise ConfigError("--etcd-* options need --store etcd://...")
        if bool(self.etcd_cert) != bool(self.etcd_key):
            raise ConfigError("--etcd-cert and --etcd-key go together")
        if self.etcd_user and not self.etcd_password:
            raise ConfigError("--etcd-user needs the password in BEACON_ETCD_PASSWORD")
        if self.proxy_tls_listen is None and (self.tls_cert_dir or self.acme_storage):
            raise ConfigError("--tls-cert-dir and --acme-storage need --proxy-tls-listen")
        if self.proxy_tls_listen is not None and self.proxy_workers > 1:
            raise ConfigError("--proxy-tls-listen runs in the main process only: use --proxy-workers 1")
        if self.proxy_tls_listen is not None and self.proxy_isolated:
            # The TLS frontend, its HTTP-01 answers and the https redirect live
            # in the control process; worker processes know none of them.
            raise ConfigError("--proxy-tls-listen terminates TLS in the control process: use --proxy-isolated false (or auto)")
        if self.proxy_isolated is None:
            return replace(self, proxy_isolated=self.proxy_tls_listen is None).validate()
        if not self.acme_storage and (self.acme_email or self.acme_ca_bundle or self.acme_allow):
            raise ConfigError("--acme-email, --acme-ca-bundle and --acme-allow need --acme-storage")
        if self.acme_storage and not self.acme_directory.startswith(("https://", "http://")):
            raise ConfigError("--acme-directory must be an http(s) URL")
        return self


def _parse_value(opt: Option, raw: str | Sequence[str]) -> Any:
    items = [raw] if isinstance(raw, str) else list(raw)
    if opt.repeated:
        split: list[str] = []
        for item in items:
            split.extend(p for p in item.split(",") if p.strip())
        if opt.name == "dns_recursors" and [s.strip().lower() for s in split] == ["none"]:
            return ()
        try:
            return tuple(opt.parse(s) for s in split)
        except ValueError as exc:
            raise ConfigError(f"{opt.flag}: {exc}") from None
    try:
        return opt.parse(items[-1])
    except ValueError as exc:
        raise ConfigError(f"{opt.flag}: {exc}") from None


def build_config(flags: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Config:
    """Build the Config from raw flag strings (None when not given) and the environment."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for opt in OPTIONS:
        raw = flags.get(opt.name)
        source = opt.flag
        if raw is None and opt.env in env:
            raw, source = env[opt.env], opt.env
        if raw is None:
            continue
        try:
            values[opt.name] = _parse_value(opt, raw)
        except ConfigError as exc:
            raise ConfigError(str(exc).replace(opt.flag, source, 1)) from None
    if env.get("BEACON_ETCD_PASSWORD"):
        values["etcd_password"] = env["BEACON_ETCD_PASSWORD"]  # never a flag: argv is visible to all
    if not values.get("docker_host") and env.get("DOCKER_HOST"):
        values["docker_host"] = env["DOCKER_HOST"]  # the Docker CLI's own variable
    known = {f.name for f in fields(Config)}
    assert set(values) <= known
    return Config(**values).validate()


# ------------------------------------------------------------ API client side
@dataclass(frozen=True, slots=True)
class ClientConfig:
    """Settings of the commands that talk to a running Beacon's API."""

    api: str = "http://127.0.0.1:8700"  # base URL, no trailing slash
    token: str = ""
    timeout: float = 10.0


def build_client_config(
    api: str | None, token: str | None, environ: Mapping[str, str] | None = None
) -> ClientConfig:
    """Flag > BEACON_API / BEACON_API_TOKEN > default. A bare HOST:PORT gets http://."""
    env = os.environ if environ is None else environ
    source = "--api" if api is not None else "BEACON_API"
    url = (api if api is not None else env.get("BEACON_API", "")).strip() or "http://127.0.0.1:8700"
    if "://" not in url:
        url = "http://" + url
    scheme, _, rest = url.partition("://")
    if scheme.lower() not in ("http", "https") or not rest.split("/", 1)[0]:
        raise ConfigError(f"{source}: expected a URL like http://127.0.0.1:8700, got {url!r}")
    tok = token if token is not None else env.get("BEACON_API_TOKEN", "")
    return ClientConfig(api=url.rstrip("/"), token=tok)
