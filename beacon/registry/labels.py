"""Pure: one container's inspect data + labels -> the endpoints it offers.

No Docker, no sockets, no clock. The Docker source inspects a container and
hands the dict (as the Docker SDK returns it) to `container_endpoints`, which
decides whether the container is registered, under which service names, at
which addresses, and with which per-endpoint settings. Every bad label value is
reported as a problem naming the container and the label, and the container is
registered with the default for that setting (or skipped when no sensible
default exists) - a label never makes Beacon crash.

Labels and registrator variables are documented in `beacon/registry/README.md`.

Length (~640 lines): one pure parser for every label and registrator variable, so every bound
and every problem message is in one place; it is table-tested as a unit.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from beacon import grammar
from beacon.registry.checkspec import parse_check_labels
from beacon.registry.model import EMPTY_MAP, Balancing, Endpoint, NetworkAddress, Source, State

MAX_DNS_TTL = 86400
MAX_WEIGHT = 65535  # an SRV weight is 16 bits
# Anyone who can start a container writes these: bound what one label may cost
# (the manual API's limits: 64 tags or meta entries, 4 KB values).
MAX_VALUE = 4096  # characters in one beacon.* label or SERVICE_* variable
MAX_ITEMS = 64  # hosts or tags in one list label; beacon.meta.* labels per container
# Problem messages kept per container (each ~200 bytes; a container may carry
# thousands of bad labels): the rest are only counted (`more_problems`).
MAX_PROBLEMS = 64

_TAG = re.compile(r"[a-z0-9]([a-z0-9_.-]{0,61}[a-z0-9])?")
_META_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
# Numbers are bounded runs of ASCII digits: str.isdigit() and \d also accept
# characters such as '²' or Arabic-Indic digits (int() raises on some), and int() refuses
# strings over 4300 digits - a label value must never reach int() unchecked.
_PORT_SPEC = re.compile(r"([0-9]{1,5})(?:/(tcp|udp|sctp))?")
_WEIGHT = re.compile(r"[0-9]{1,5}")
_PER_PORT_SERVICE = re.compile(r"beacon\.([0-9]{1,5})\.service")
_REGISTRATOR_PORT_KEY = re.compile(r"SERVICE_([0-9]{1,5})_(NAME|TAGS|IGNORE)")


@dataclass(frozen=True, slots=True)
class LabelOptions:
    """What the parser needs from the configuration and the host."""

    address_mode: Literal["host", "internal"] = "host"
    # Advertised for ports published on a wildcard address (0.0.0.0 / ::) and for
    # containers on the host network: --advertise-ip, else the detected address.
    host_ip: str = "127.0.0.1"
    network: str = ""  # --network (internal mode); the label beacon.network wins
    explicit: bool = False  # --explicit: only beacon.enable=true containers
    node: str = ""


@dataclass(frozen=True, slots=True)
class ContainerEndpoints:
    """The parser's verdict on one container."""

    endpoints: tuple[Endpoint, ...] = ()
    # Invalid label values, each naming the container and the label (the first MAX_PROBLEMS).
    problems: tuple[str, ...] = ()
    # Why a running container has no endpoints (None: it has some, or is not running).
    ignored: str | None = None
    # Decisions worth logging once, e.g. which of several networks was chosen.
    notes: tuple[str, ...] = ()
    more_problems: int = 0  # problems found beyond `problems`, counted only


@dataclass(frozen=True, slots=True)
class _Port:
    number: int
    protocol: str  # tcp | udp | sctp
    bindings: tuple[tuple[str, int], ...] = ()  # (host ip, host port), as Docker reports

    @property
    def key(self) -> str:
        return f"{self.number}/{self.protocol}"


@dataclass(slots=True)
class _Problems:
    who: str
    items: list[str] = field(default_factory=list)
    more: int = 0

    def add(self, label: str, value: str, why: str, action: str = "ignored") -> None:
        if len(self.items) >= MAX_PROBLEMS:
            self.more += 1  # not even formatted: a bound on memory and time
            return
        self.items.append(f"container {self.who}: label {_escaped(label)}={_shown(value)}: {why}; {action}")

    def extend(self, messages: Iterable[str]) -> None:
        for message in messages:
            if len(self.items) >= MAX_PROBLEMS:
                self.more += 1
            else:
                self.items.append(f"container {self.who}: {_one_line(message)}")


def _escaped(key: str, limit: int = 128) -> str:
    """A label key for a log line: control characters (a newline would start a
    forged line) and non-ASCII escaped, cut short."""
    text = key.encode("unicode_escape").decode("ascii")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _one_line(text: str) -> str:
    """No control character of a message may end a log line or start a new one."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _shown(value: str, limit: int = 80) -> str:
    """repr() of a value for a log line, cut short (a label may be 4 KB)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def _bounded(values: Mapping[str, str], problems: _Problems) -> dict[str, str]:
    """The beacon.* / SERVICE_* entries Beacon reads, without oversized values."""
    out: dict[str, str] = {}
    for key, value in values.items():
        if not (key.startswith(("beacon.", "SERVICE_")) or key == "com.docker.compose.service"):
            continue  # not ours: never read, never logged
        if len(value) > MAX_VALUE:
            problems.add(key, value, f"value longer than {MAX_VALUE} characters ({len(value)})")
            continue
        out[key] = value
    return out


# ------------------------------------------------------------------ naming
def image_base_name(image: str) -> str:
    """'registry.example:5000/team/web:1.2@sha256:..' -> 'web' (no host, tag or digest)."""
    ref = image.split("@", 1)[0]
    base = ref.rsplit("/", 1)[-1]
    return base.split(":", 1)[0]


def dns_label(raw: str) -> str:
    """Normalise a name to one DNS label: lowercase a-z0-9 and '-', at most 63 chars.

    A value that looks like an image reference is reduced to its base name first,
    so no registry host, tag or digest leaks into a service name. Returns '' when
    nothing usable is left.
    """
    text = raw.strip().lstrip("/")
    if "/" in text or "@" in text or ":" in text:
        text = image_base_name(text)
    text = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return text[:63].rstrip("-")


def _with_port(name: str, port: int) -> str:
    suffix = f"-{port}"
    return name[: 63 - len(suffix)].rstrip("-") + suffix


# ----------------------------------------------------------------- parsing
def parse_bool(text: str) -> bool | None:
    """The grammar's booleans; None for anything else (the caller reports it)."""
    try:
        return grammar.parse_bool(text)
    except ValueError:
        return None


def _env_map(env: Iterable[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in env or ():
        key, sep, value = item.partition("=")
        if sep and key.startswith("SERVICE_"):
            out[key] = value
    return out


def _split_list(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def _port_number(text: str) -> int | None:
    if not re.fullmatch(r"[0-9]{1,5}", text):
        return None
    value = int(text)
    return value if 1 <= value <= 65535 else None


def _container_ports(attrs: Mapping[str, Any]) -> dict[str, _Port]:
    """Exposed and published ports, keyed '80/tcp'. Unparseable keys are skipped."""
    exposed = (attrs.get("Config") or {}).get("ExposedPorts") or {}
    published = (attrs.get("NetworkSettings") or {}).get("Ports") or {}
    ports: dict[str, _Port] = {}
    for key in [*exposed, *published]:
        m = _PORT_SPEC.fullmatch(str(key))
        number = _port_number(m.group(1)) if m else None
        if m is None or number is None:
            continue
        bindings: list[tuple[str, int]] = []
        for b in published.get(key) or ():
            host_port = _port_number(str(b.get("HostPort") or ""))
            if host_port is not None:
                bindings.append((str(b.get("HostIp") or ""), host_port))
        proto = m.group(2) or "tcp"
        ports[f"{number}/{proto}"] = _Port(number, proto, tuple(bindings))
    return ports


def _host_addresses(port: _Port, host_ip: str) -> list[tuple[str, int]]:
    """Where a published port is reached from outside the container.

    A wildcard binding (0.0.0.0 or ::, which Docker usually reports as a pair
    for one host port) is the host's advertised address; a specific binding,
    e.g. 127.0.0.1 or ::1, is advertised as itself.
    """
    found: set[tuple[str, int]] = set()
    for ip, host_port in port.bindings:
        if ip in ("", "0.0.0.0", "::"):
            found.add((host_ip, host_port))
            continue
        try:
            found.add((str(ipaddress.ip_address(ip)), host_port))
        except ValueError:
            continue
    return sorted(found, key=_address_order)


def _address_order(item: tuple[str, int]) -> tuple[int, str, int]:
    ip, port = item
    return (1 if ":" in ip else 0, ip, port)


def _choose_network(
    attrs: Mapping[str, Any], wanted: str, wanted_from: str, notes: list[str], who: str
) -> tuple[str, Mapping[str, Any]] | str:
    """The network whose addresses are advertised, or the reason there is none."""
    networks: Mapping[str, Any] = (attrs.get("NetworkSettings") or {}).get("Networks") or {}
    usable = {
        name: net
        for name, net in networks.items()
        if net and (net.get("IPAddress") or net.get("GlobalIPv6Address"))
    }
    if wanted:
        if wanted in usable:
            return wanted, usable[wanted]
        # Compose prefixes network names with the project: accept the short name.
        project = ((attrs.get("Config") or {}).get("Labels") or {}).get("com.docker.compose.project")
        if project and f"{project}_{wanted}" in usable:
            full = f"{project}_{wanted}"
            return full, usable[full]
        return f"not attached to network {wanted!r} ({wanted_from})"
    if not usable:
        return "no container IP address on any network"
    name = sorted(usable)[0]
    if len(usable) > 1:
        notes.append(
            f"container {who}: on networks {', '.join(sorted(usable))}; chose {name} "
            "(first by name; set --network or label beacon.network to choose)"
        )
    return name, usable[name]


def _network_addresses(attrs: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(subnet, container IP) on every Docker network the container is attached to."""
    networks: Mapping[str, Any] = (attrs.get("NetworkSettings") or {}).get("Networks") or {}
    out: list[tuple[str, str]] = []
    for net in networks.values():
        for ip_key, len_key in (("IPAddress", "IPPrefixLen"), ("GlobalIPv6Address", "GlobalIPv6PrefixLen")):
            ip, prefix = (net or {}).get(ip_key), (net or {}).get(len_key)
            if not ip or not isinstance(prefix, int):
                continue
            try:
                subnet = ipaddress.ip_network(f"{ip}/{prefix}", strict=False)
            except (TypeError, ValueError):
                continue
            if (str(subnet), str(ip)) not in out:
                out.append((str(subnet), str(ip)))
    return out[:64]  # bounded: a container is on a few networks


def _container_state(attrs: Mapping[str, Any]) -> State | None:
    """None when the container is not running (it offers nothing)."""
    st = attrs.get("State") or {}
    if not st.get("Running") or st.get("Dead"):
        return None
    if st.get("Paused") or st.get("Restarting"):
        return State.CRITICAL
    health = (st.get("Health") or {}).get("Status")
    if health in ("starting", "unhealthy"):
        return State.CRITICAL  # starting: not ready yet, no traffic
    return State.PASSING


MAX_REASON = 500  # characters of Docker's health output kept


def container_reason(attrs: Mapping[str, Any]) -> str:
    """Why Docker's view keeps a running container from passing (empty when it does not)."""
    st = attrs.get("State") or {}
    if st.get("Paused"):
        return "paused"
    if st.get("Restarting"):
        return f"restarting: exit code {st.get('ExitCode')}, restart count {attrs.get('RestartCount', 0)}"
    health = st.get("Health") or {}
    status = health.get("Status")
    if status == "starting":
        return "HEALTHCHECK starting: no traffic before it passes"
    if status == "unhealthy":
        log = health.get("Log") or []
        last = log[-1] if isinstance(log, list) and log and isinstance(log[-1], Mapping) else {}
        output = " ".join(str(last.get("Output") or "").split())[:MAX_REASON]
        head = f"HEALTHCHECK unhealthy (exit code {last.get('ExitCode')})"
        return f"{head}: {output}" if output else head
    return ""


@dataclass(frozen=True, slots=True)
class _Settings:
    """Container-wide endpoint settings from beacon.* labels."""

    weight: int = 1
    tags: tuple[str, ...] = ()
    meta: Mapping[str, str] = field(default_factory=lambda: EMPTY_MAP)
    dns_ttl: int | None = None
    lb: str | None = None
    http_hosts: tuple[str, ...] = ()
    http_path_prefix: str | None = None
    http_strip_prefix: bool = False
    http_expose: bool | None = None
    locality: str | None = None


def _parse_tags(label: str, value: str, problems: _Problems) -> list[str]:
    tags: list[str] = []
    items = _split_list(value)
    if len(items) > MAX_ITEMS:
        problems.add(label, value, f"{len(items)} tags, at most {MAX_ITEMS}", "the rest ignored")
        items = items[:MAX_ITEMS]
    for raw in items:
        tag = raw.lower()
        if _TAG.fullmatch(tag):
            tags.append(tag)
        else:
            problems.add(label, value, f"tag {raw!r} is not 1-63 of a-z 0-9 . _ -", "tag dropped")
    return tags


def _address_label(labels: Mapping[str, str], problems: _Problems) -> str | None:
    """beacon.address: the IP to advertise instead of the detected one, or None."""
    raw = labels.get("beacon.address")
    if raw is None:
        return None
    try:
        ip = ipaddress.ip_address(raw.strip())
    except ValueError:
        problems.add("beacon.address", raw, "not an IP address", "using the detected address")
        return None
    if ip.is_unspecified or ip.is_multicast:
        problems.add("beacon.address", raw, "not an address a client can connect to", "using the detected address")
        return None
    return str(ip)


def _parse_settings(labels: Mapping[str, str], problems: _Problems) -> _Settings:
    weight = 1
    if (raw := labels.get("beacon.weight")) is not None:
        if _WEIGHT.fullmatch(raw.strip()) and 1 <= int(raw) <= MAX_WEIGHT:
            weight = int(raw)
        else:
            problems.add("beacon.weight", raw, f"expected an integer 1-{MAX_WEIGHT}", "using 1")

    tags: list[str] = []
    if (raw := labels.get("beacon.tags")) is not None:
        tags += _parse_tags("beacon.tags", raw, problems)

    meta: dict[str, str] = {}
    for key, value in labels.items():
        if key.startswith("beacon.meta."):
            name = key[len("beacon.meta.") :]
            if len(meta) == MAX_ITEMS:
                count = sum(1 for k in labels if k.startswith("beacon.meta."))
                problems.add(key, value, f"{count} beacon.meta.* labels, at most {MAX_ITEMS}", "the rest ignored")
                break
            if _META_KEY.fullmatch(name):
                meta[name] = value
            else:
                problems.add(key, value, "metadata key must be 1-128 of A-Z a-z 0-9 . _ -")
        elif key == "beacon.tls" or key.startswith("beacon.tls."):
            meta[key] = value  # parsed by beacon/proxy/tls/policy.py (its own typed parser)

    dns_ttl: int | None = None
    if (raw := labels.get("beacon.dns.ttl")) is not None:
        try:
            seconds = grammar.parse_whole_seconds(raw)
        except ValueError as exc:
            problems.add("beacon.dns.ttl", raw, f"{exc} (e.g. 5 or 30s)", "using --dns-ttl")
        else:
            if seconds <= MAX_DNS_TTL:
                dns_ttl = seconds
            else:
                problems.add("beacon.dns.ttl", raw, f"expected seconds 0-{MAX_DNS_TTL} (e.g. 5 or 30s)", "using --dns-ttl")

    lb: str | None = None
    if (raw := labels.get("beacon.lb")) is not None:
        try:
            # Parsed here once (cached): the catalog folds the same typed value into Service.balancing.
            Balancing.parse(raw)
        except ValueError as exc:
            problems.add("beacon.lb", raw, str(exc), "using --lb")
        else:
            lb = raw.strip().lower()

    locality: str | None = None  # cluster hook: beacon.lb.locality (prefer-local | any)
    if (raw := labels.get("beacon.lb.locality")) is not None:
        if raw.strip().lower() in ("prefer-local", "any"):
            locality = raw.strip().lower() if raw.strip().lower() != "any" else None
        else:
            problems.add("beacon.lb.locality", raw, "expected prefer-local or any", "using any")

    hosts: dict[str, None] = {}  # ordered, de-duplicated in linear time
    if (raw := labels.get("beacon.http.host")) is not None:
        items = _split_list(raw)
        if len(items) > MAX_ITEMS:
            problems.add("beacon.http.host", raw, f"{len(items)} hosts, at most {MAX_ITEMS}", "the rest ignored")
            items = items[:MAX_ITEMS]
        for item in items:
            host = item.lower().rstrip(".")
            # A wildcard covers one leading label: *.example.com.
            if grammar.is_dns_name(host, wildcard=True):
                hosts.setdefault(host, None)
            else:
                problems.add("beacon.http.host", raw, f"{item!r} is not a host name", "host dropped")

    prefix: str | None = None
    if (raw := labels.get("beacon.http.path_prefix")) is not None:
        value = raw.strip()
        if value.startswith("/") and not re.search(r"[\s?#]", value) and "//" not in value:
            prefix = value.rstrip("/") or "/"
        else:
            problems.add(
                "beacon.http.path_prefix", raw, "expected a path starting with '/' (no spaces, ? or #)"
            )

    strip = False
    if (raw := labels.get("beacon.http.strip_prefix")) is not None:
        parsed = parse_bool(raw)
        if parsed is None:
            problems.add("beacon.http.strip_prefix", raw, "expected true or false", "using false")
        else:
            strip = parsed
        if strip and prefix is None:
            problems.add("beacon.http.strip_prefix", raw, "needs beacon.http.path_prefix", "using false")
            strip = False

    expose: bool | None = None
    if (raw := labels.get("beacon.http.expose")) is not None:
        expose = parse_bool(raw)
        if expose is None:
            problems.add("beacon.http.expose", raw, "expected true or false", "using --proxy-expose-by-default")

    return _Settings(
        weight=weight,
        tags=tuple(tags),
        meta=MappingProxyType(dict(sorted(meta.items()))) if meta else EMPTY_MAP,
        dns_ttl=dns_ttl,
        lb=lb,
        http_hosts=tuple(hosts),
        http_path_prefix=prefix,
        http_strip_prefix=strip,
        http_expose=expose,
        locality=locality,
    )


def _explicit_name(label: str, value: str, problems: _Problems) -> str:
    """A user-chosen name, normalised; a change beyond case is reported."""
    name = dns_label(value)
    if not name:
        problems.add(label, value, "no valid DNS label left after normalising", "ignored")
    elif name != value.strip().lower():
        problems.add(label, value, "not a valid DNS label", f"using {name!r}")
    return name


# ------------------------------------------------------------------ entry
def container_endpoints(attrs: Mapping[str, Any], options: LabelOptions) -> ContainerEndpoints:
    """Decide what one container offers. Never raises for any label value."""
    cid = str(attrs.get("Id") or "")
    cname = str(attrs.get("Name") or "").lstrip("/") or cid[:12]
    who = f"{cid[:12]} ({cname})"
    config = attrs.get("Config") or {}
    problems = _Problems(who)
    labels = _bounded(config.get("Labels") or {}, problems)
    notes: list[str] = []

    def verdict(ignored: str | None, endpoints: tuple[Endpoint, ...] = ()) -> ContainerEndpoints:
        return ContainerEndpoints(endpoints, tuple(problems.items), ignored, tuple(notes), problems.more)

    state = _container_state(attrs)
    if state is None:
        return verdict(None)
    reason = container_reason(attrs)

    # registrator variables: environment first, a label of the same name wins.
    reg = _bounded(_env_map(config.get("Env")), problems)
    reg.update({k: v for k, v in labels.items() if k.startswith("SERVICE_")})

    enable: bool | None = None
    if (raw := labels.get("beacon.enable")) is not None:
        enable = parse_bool(raw)
        if enable is None:
            default = "not registered (--explicit)" if options.explicit else "registered"
            problems.add("beacon.enable", raw, "expected true or false", default)
    if enable is False:
        return verdict("label beacon.enable=false")
    if options.explicit and enable is not True:
        return verdict("no label beacon.enable=true (--explicit)")
    if (raw := reg.get("SERVICE_IGNORE")) is not None and parse_bool(raw) is not False and raw.strip():
        return verdict("SERVICE_IGNORE is set")

    # On the host network the container's ports are the host's own ports.
    host_network = (attrs.get("HostConfig") or {}).get("NetworkMode") == "host"
    ports = _container_ports(attrs)

    # beacon.port picks the one port to register (it need not be exposed).
    if (raw := labels.get("beacon.port")) is not None:
        m = _PORT_SPEC.fullmatch(raw.strip())
        number = _port_number(m.group(1)) if m else None
        if m is None or number is None:
            problems.add("beacon.port", raw, "expected a port 1-65535, optionally /tcp or /udp")
        else:
            key = f"{number}/{m.group(2) or 'tcp'}"
            picked = ports.get(key) or _Port(number, m.group(2) or "tcp")
            if options.address_mode == "host" and not host_network and not picked.bindings:
                return verdict(f"beacon.port {key} is not published (host address mode)")
            ports = {key: picked}

    if host_network:
        candidates = list(ports.values())
    elif options.address_mode == "host":
        candidates = [p for p in ports.values() if p.bindings]
    else:
        candidates = list(ports.values())
    if not candidates:
        why = "published" if options.address_mode == "host" and not host_network else "exposed"
        return verdict(f"no {why} port")

    # Where the container is reached, per port.
    network_addrs: list[str] = []
    if host_network:
        network_addrs = [options.host_ip]
    elif options.address_mode == "internal":
        wanted, wanted_from = options.network, "--network"
        if (raw := labels.get("beacon.network")) is not None and raw.strip():
            wanted, wanted_from = raw.strip(), "label beacon.network"
        chosen = _choose_network(attrs, wanted, wanted_from, notes, who)
        if isinstance(chosen, str):
            return verdict(chosen)
        _, net = chosen
        network_addrs = [a for a in (net.get("IPAddress"), net.get("GlobalIPv6Address")) if a]

    # Naming: one container-wide base name, then per port.
    base = ""
    for label, value in (
        ("beacon.service", labels.get("beacon.service")),
        ("SERVICE_NAME", reg.get("SERVICE_NAME")),
    ):
        if value is not None and not base:
            base = _explicit_name(label, value, problems)
    if not base:
        base = dns_label(labels.get("com.docker.compose.service", "")) or dns_label(cname)
    if not base:
        base = dns_label(image_base_name(str(config.get("Image") or ""))) or cid[:12]

    per_port_names: dict[int, tuple[str, str]] = {}
    for key, value in labels.items():
        if m := _PER_PORT_SERVICE.fullmatch(key):
            per_port_names[int(m.group(1))] = (key, value)
    per_port_reg: dict[tuple[int, str], str] = {}
    for key, value in reg.items():
        if m := _REGISTRATOR_PORT_KEY.fullmatch(key):
            per_port_reg[(int(m.group(1)), m.group(2))] = value

    settings = _parse_settings(labels, problems)
    base_tags = list(settings.tags)
    if (raw := reg.get("SERVICE_TAGS")) is not None:
        base_tags += _parse_tags("SERVICE_TAGS", raw, problems)

    check, autoheal, check_problems = parse_check_labels(labels)
    # Check labels are reported by their own parser: escape what came from outside.
    problems.extend(check_problems)

    source = Source("container", container_id=cid, container_name=cname)
    address_override = _address_label(labels, problems)
    on_networks = [] if host_network else _network_addresses(attrs)
    several = len({p.number for p in candidates}) > 1
    endpoints: list[Endpoint] = []
    for port in sorted(candidates, key=lambda p: (p.number, p.protocol)):
        ignore = per_port_reg.get((port.number, "IGNORE"))
        if ignore is not None and ignore.strip() and parse_bool(ignore) is not False:
            notes.append(f"container {who}: port {port.key} ignored (SERVICE_{port.number}_IGNORE)")
            continue
        name = ""
        if (item := per_port_names.get(port.number)) is not None:
            name = _explicit_name(item[0], item[1], problems)
        if not name and (value := per_port_reg.get((port.number, "NAME"))) is not None:
            name = _explicit_name(f"SERVICE_{port.number}_NAME", value, problems)
        if not name:
            name = _with_port(base, port.number) if several else base
        tags = list(base_tags)
        if (value := per_port_reg.get((port.number, "TAGS"))) is not None:
            tags += _parse_tags(f"SERVICE_{port.number}_TAGS", value, problems)

        if host_network:
            addresses = [(options.host_ip, port.number)]
        elif options.address_mode == "host":
            addresses = _host_addresses(port, options.host_ip)
        else:
            addresses = sorted(((a, port.number) for a in network_addrs), key=_address_order)

        if address_override is not None:
            # beacon.address replaces the detected IP (an app on the host network
            # bound to one address); the ports stay what Docker says.
            addresses = [(address_override, n) for n in dict.fromkeys(n for _, n in addresses)]

        base_id = f"{cid[:12]}-{port.number}" + ("" if port.protocol == "tcp" else f"-{port.protocol}")
        for i, (address, number) in enumerate(addresses):
            endpoints.append(
                Endpoint(
                    id=base_id if i == 0 else f"{base_id}-{i}",
                    service=name,
                    address=address,
                    port=number,
                    source=source,
                    node=options.node,
                    protocol=port.protocol,
                    state=state,
                    reason=reason,
                    weight=settings.weight,
                    tags=tuple(sorted(set(tags))),
                    meta=settings.meta,
                    dns_ttl=settings.dns_ttl,
                    lb=settings.lb,
                    http_hosts=settings.http_hosts,
                    http_path_prefix=settings.http_path_prefix,
                    http_strip_prefix=settings.http_strip_prefix,
                    http_expose=settings.http_expose,
                    locality=settings.locality,
                    check=check,
                    autoheal=autoheal,
                    networks=tuple(NetworkAddress(net, ip, port.number) for net, ip in on_networks),
                )
            )
    if not endpoints:
        return verdict("every port is ignored (SERVICE_<port>_IGNORE)")
    return verdict(None, tuple(endpoints))
