"""Pure answer building: (query, zone) -> reply. No sockets, no clock.

A `Zone` holds the lookup tables for one catalog snapshot; `resolve` turns a
parsed query into a reply from it, or returns None when the name is not ours
(the server then forwards it). Everything here is deterministic for a given
query and snapshot, which is what lets the server cache packed answers keyed
on the query bytes.

Names under the domain (default `beacon.`):
  <service>.service.D             A / AAAA / SRV of the service's usable endpoints
  <tag>.<service>.service.D       the same, filtered by tag
  _<service>._tcp.service.D       RFC 2782 (also _udp, or _<tag> for a tag filter)
  <container>.container.D         A / AAAA of one container, whatever its health,
                                  as the querier reaches it (see `reach`)
  <hex-address>.addr.D            A / AAAA spelled in hex: the target of every SRV
  ns.D                            the server's own non-wildcard listen addresses
  D                               SOA, NS
and PTR for the reverse name of an address the querier is told for some
endpoint (its own view's addresses only; others are forwarded like unknown ones).
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from dnslib import AAAA, EDNS0, NS, PTR, QTYPE, RD, RR, SOA, SRV, A, DNSHeader, DNSLabel, DNSRecord

from beacon.dns.wire import FORMERR, MAX_UDP_PAYLOAD, MIN_UDP_PAYLOAD, NOERROR, NOTIMP, NXDOMAIN, REFUSED
from beacon.registry.model import Endpoint, Service, Snapshot, State

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# MAX_UDP_PAYLOAD: our receive limit, advertised in every OPT; also the cap on
# what we send over UDP whatever the client claims (larger datagrams fragment).

CLASS_IN = 1
OPCODE_QUERY = 0
BADVERS = 16  # extended rcode: upper 8 bits go in the OPT TTL

T_A, T_NS, T_SOA, T_PTR, T_HINFO = 1, 2, 6, 12, 13
T_AAAA, T_SRV, T_OPT, T_AXFR, T_IXFR, T_ANY = 28, 33, 41, 252, 251, 255

# RFC 8482 section 4.2: answer ANY with one synthesized HINFO record.
_RFC8482_HINFO = RD(b"\x07RFC8482\x00")

_SOA_REFRESH, _SOA_RETRY, _SOA_EXPIRE = 3600, 600, 86400
_REVERSE_ZONES = ((b"in-addr", b"arpa"), (b"ip6", b"arpa"))


@dataclass(frozen=True, slots=True)
class ZoneSettings:
    domain: str = "beacon."
    ttl: int = 0
    negative_ttl: int = 5
    only_passing: bool = False
    # Non-wildcard addresses the server listens on: the A/AAAA of ns.<domain>.
    ns_addresses: tuple[str, ...] = ()
    recursion_available: bool = False


@dataclass(slots=True)
class Answer:
    """A reply plus what the transport needs to send it."""

    reply: DNSRecord
    udp_limit: int  # largest reply the client accepts over UDP
    rotate: bool = False  # the answer section is one RRset whose order may rotate
    # The one service (its lowercased name, a key of `Zone.services`) this
    # answer was built from alone; None: it may depend on anything in the
    # snapshot (negative answers carry the SOA, whose serial is the index).
    # The server keeps a cached answer across snapshots only while this
    # service object is unchanged.
    service: str | None = None


def addr_label(address: IPAddress) -> str:
    """The hex spelling of an address used under addr.<domain> (like Consul's)."""
    return address.packed.hex()


def parse_addr_label(label: str) -> IPAddress | None:
    if len(label) not in (8, 32):
        return None
    try:
        packed = bytes.fromhex(label)
    except ValueError:
        return None
    return ipaddress.ip_address(packed)


@functools.lru_cache(maxsize=65536)
def _ip(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None


@functools.lru_cache(maxsize=65536)
def _reverse_labels(ip: IPAddress) -> tuple[bytes, ...]:
    return _labels(ip.reverse_pointer)


@functools.lru_cache(maxsize=4096)
def _net(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None


@functools.lru_cache(maxsize=65536)
def _is_loopback(ip: IPAddress) -> bool:
    return ip.is_loopback


@dataclass(frozen=True, slots=True)
class View:
    """What one querier can reach: an answer must be usable by the client that asked.

    `subnets`: the Docker networks (of some endpoint) its address lies on; an
    endpoint attached to one of them is offered at its container address and
    port there. `loopback`: the querier is the host itself, the only one that
    can reach an endpoint published on 127.0.0.1 / ::1.
    """

    loopback: bool = True
    subnets: frozenset[str] = frozenset()


HOST_VIEW = View()  # the host itself: what every answer was before views


def reach(ep: Endpoint, view: View) -> tuple[IPAddress, int] | None:
    """Where the querier of `view` reaches `ep`, or None when it cannot."""
    if view.subnets:
        for na in ep.networks:
            if na.subnet in view.subnets and (ip := _ip(na.address)) is not None:
                return ip, na.port
    ip = _ip(ep.address)
    if ip is None or (not view.loopback and _is_loopback(ip)):
        return None  # published on loopback only: useless to anyone else
    return ip, ep.port


def _labels(name: str) -> tuple[bytes, ...]:
    return tuple(p.encode() for p in name.strip(".").lower().split(".") if p)


class Zone:
    """Lookup tables for one snapshot, shared by every query until the next one.

    Built on the first miss after a snapshot swap, so it must be cheap: the
    service map is built at once, the container and reverse indexes only when
    a query needs them, and address parsing is memoized across snapshots.
    """

    def __init__(self, snapshot: Snapshot, settings: ZoneSettings) -> None:
        self.snapshot = snapshot
        self.settings = settings
        self.domain = settings.domain if settings.domain.endswith(".") else settings.domain + "."
        self.domain_labels = _labels(self.domain)
        self.serial = snapshot.index & 0xFFFFFFFF
        self.services: dict[str, Service] = {n.lower(): s for n, s in snapshot.services.items()}
        self.ns_name = f"ns.{self.domain}"
        self.ns_ips = [ip for ip in (_ip(a) for a in settings.ns_addresses) if ip is not None]
        # The records of service answers built so far, by (qname labels as
        # asked, qtype): a second query for the same name (another EDNS size,
        # other flags) reuses them instead of walking every endpoint again.
        self.service_records: dict[tuple[tuple[bytes, ...], int, View], _ServiceRecords] = {}
        # Container addresses and PTR records by (name, view), built on first
        # use: each view is told only what it can reach.
        self.container_records: dict[tuple[str, View], tuple[IPAddress, ...]] = {}
        self.ptr_memo: dict[tuple[tuple[bytes, ...], View], tuple[RR, ...]] = {}

    @functools.cached_property
    def subnets(self) -> tuple[str, ...]:
        """Every Docker subnet some endpoint is reachable on (built on first use)."""
        found: dict[str, None] = {}
        for ep in self.snapshot.endpoints.values():
            for na in ep.networks:
                found[na.subnet] = None
        return tuple(found)

    def view_of(self, source: str) -> View:
        """What a querier at `source` can reach, under this snapshot."""
        ip = _ip(source)
        if ip is None:
            return View(loopback=False)
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # a dual-stack socket reports IPv4 clients as ::ffff:a.b.c.d
        on = frozenset(s for s in self.subnets if (net := _net(s)) is not None and ip in net)
        return View(loopback=ip.is_loopback, subnets=on)

    @staticmethod
    def ip_of(ep: Endpoint) -> IPAddress | None:
        """The endpoint's address; None (invisible to DNS) when it is not an IP."""
        return _ip(ep.address)

    @functools.cached_property
    def containers(self) -> dict[str, tuple[Endpoint, ...]]:
        """Container name -> its endpoints (view-less; each query picks its
        view's addresses from these few)."""
        out: dict[str, list[Endpoint]] = {}
        for ep in self.snapshot.endpoints.values():
            cname = (ep.source.container_name or "").lstrip("/").lower()
            if cname:
                out.setdefault(cname, []).append(ep)
        return {k: tuple(v) for k, v in out.items()}

    @functools.cached_property
    def reverse(self) -> dict[tuple[bytes, ...], tuple[IPAddress, tuple[Endpoint, ...]]]:
        """Reverse name -> (its address, the endpoints that some view reaches
        at it): the endpoint address and each of its Docker network addresses.
        Which of them a querier is told is decided per view (`ptr_records`)."""
        out: dict[tuple[bytes, ...], tuple[IPAddress, list[Endpoint]]] = {}
        for ep in self.snapshot.endpoints.values():
            for text in (ep.address, *(na.address for na in ep.networks)):
                ip = _ip(text)
                if ip is None:
                    continue
                found = out.setdefault(_reverse_labels(ip), (ip, []))[1]
                if not found or found[-1] is not ep:
                    found.append(ep)
        return {k: (ip, tuple(eps)) for k, (ip, eps) in out.items()}

    def container_ips(self, name: str, view: View) -> tuple[IPAddress, ...] | None:
        """The addresses of container `name` as the querier of `view` reaches
        them (the rule of service answers, whatever the health); None: no
        such container; empty: it exists, but nothing of it is reachable."""
        memo = self.container_records.get((name, view))
        if memo is None:
            eps = self.containers.get(name)
            if eps is None:
                return None
            ips = dict.fromkeys(at[0] for ep in eps if (at := reach(ep, view)) is not None)
            memo = tuple(sorted(ips, key=_ip_sort_key))
            if len(self.container_records) < MAX_SERVICE_RECORDS:
                self.container_records[name, view] = memo
        return memo

    def ptr_records(self, qname: DNSLabel, labels: tuple[bytes, ...], view: View) -> tuple[RR, ...] | None:
        """The PTR records of a reverse name for the querier of `view`: the
        names of the containers it is told this address for (the addr name
        for manual endpoints). None when this view is told no endpoint at that
        address: the name is then handled like an unknown address (forwarded),
        so names on networks the querier is not on never leak. Memoized as
        records (the host address in host mode may name every container)."""
        found = self.reverse.get(labels)
        if found is None:
            return None
        key = (tuple(qname.label), view)
        memo = self.ptr_memo.get(key)
        if memo is None:
            ip, eps = found
            targets: set[str] = set()
            for ep in eps:
                at = reach(ep, view)
                if at is None or at[0] != ip:
                    continue
                cname = (ep.source.container_name or "").lstrip("/").lower()
                targets.add(f"{cname}.container.{self.domain}" if cname else f"{addr_label(ip)}.addr.{self.domain}")
            ttl = self.settings.ttl
            memo = tuple(RR(qname, T_PTR, ttl=ttl, rdata=PTR(t)) for t in sorted(targets))
            if len(self.ptr_memo) < MAX_SERVICE_RECORDS:
                self.ptr_memo[key] = memo
        return memo or None

    def usable(self, ep: Endpoint) -> bool:
        return ep.state is State.PASSING or (ep.state is State.WARNING and not self.settings.only_passing)

    def service_ttl(self, svc: Service) -> int:
        # One TTL per RRset (RFC 2181): the catalog folds the smallest beacon.dns.ttl.
        return svc.dns_ttl if svc.dns_ttl is not None else self.settings.ttl

    def soa(self) -> SOA:
        return SOA(
            self.ns_name,
            f"hostmaster.{self.domain}",
            (self.serial, _SOA_REFRESH, _SOA_RETRY, _SOA_EXPIRE, self.settings.negative_ttl),
        )


def _ip_sort_key(ip: IPAddress) -> tuple[int, bytes]:
    return (ip.version, ip.packed)


def _rr_for_ip(name: object, ip: IPAddress, ttl: int) -> RR:
    if ip.version == 4:
        return RR(name, T_A, ttl=ttl, rdata=A(str(ip)))
    return RR(name, T_AAAA, ttl=ttl, rdata=AAAA(str(ip)))


class _Reply:
    """Accumulates one reply; `finish` returns it as an Answer."""

    def __init__(self, request: DNSRecord, zone: Zone | None, ra: bool) -> None:
        h = request.header
        self.zone = zone
        self.record = DNSRecord(
            DNSHeader(id=h.id, bitmap=0, qr=1, opcode=h.opcode, rd=h.rd, cd=h.cd, ra=int(ra))
        )
        self.record.questions = list(request.questions)
        self.udp_limit = MIN_UDP_PAYLOAD
        self.opt: RR | None = None
        self.rotate = False
        self.service: str | None = None

    def rcode(self, rcode: int) -> _Reply:
        self.record.header.rcode = rcode
        return self

    def negative(self, rcode: int) -> _Reply:
        """NXDOMAIN or NODATA: the SOA in authority gives the negative TTL (RFC 2308)."""
        self.record.header.rcode = rcode
        self.service = None  # the SOA serial is the snapshot index
        if self.zone is not None:
            self.record.header.aa = 1
            self.record.add_auth(
                RR(self.zone.domain, T_SOA, ttl=self.zone.settings.negative_ttl, rdata=self.zone.soa())
            )
        return self

    def finish(self) -> Answer:
        if self.opt is not None:
            self.record.add_ar(self.opt)
        self.record.set_header_qa()
        return Answer(self.record, self.udp_limit, self.rotate, self.service)


def resolve(request: DNSRecord, zone: Zone, view: View | None = None) -> Answer | None:
    """Answer `request` from `zone` for a querier with `view` (default: the
    host itself); None when the name is not ours (forward it)."""
    settings = zone.settings
    out = _Reply(request, zone, settings.recursion_available)
    h = request.header
    if h.opcode != OPCODE_QUERY:
        return out.rcode(NOTIMP).finish()
    opts = [rr for rr in request.ar if rr.rtype == T_OPT]
    if len(opts) > 1:
        return out.rcode(FORMERR).finish()
    if opts:
        opt = opts[0]
        out.udp_limit = max(MIN_UDP_PAYLOAD, min(opt.rclass, MAX_UDP_PAYLOAD))
        if (opt.ttl >> 16) & 0xFF != 0:
            # RFC 6891: an EDNS version we do not speak gets BADVERS, version 0.
            out.opt = EDNS0(udp_len=MAX_UDP_PAYLOAD, ext_rcode=BADVERS >> 4)
            return out.finish()
        out.opt = EDNS0(udp_len=MAX_UDP_PAYLOAD)
    if h.q != 1 or len(request.questions) != 1:
        return out.rcode(FORMERR).finish()
    q = request.questions[0]
    labels = tuple(label.lower() for label in q.qname.label)
    if sum(len(label) + 1 for label in labels) + 1 > 255:
        # RFC 1035 caps a name at 255 bytes: it cannot be echoed (nor packed),
        # so the FORMERR carries no question.
        out.record.questions = []
        return out.rcode(FORMERR).finish()
    if q.qclass != CLASS_IN:
        # CHAOS (version.bind, hostname.bind, id.server) and other classes:
        # refused here, never forwarded (an upstream would tell its version
        # or name to anyone who asks us).
        return out.rcode(REFUSED).finish()
    dl = zone.domain_labels
    if len(labels) >= len(dl) and labels[len(labels) - len(dl) :] == dl:
        if q.qtype in (T_AXFR, T_IXFR):
            return out.rcode(REFUSED).finish()
        out.record.header.aa = 1
        _answer_local(out, zone, q.qname, q.qtype, labels[: len(labels) - len(dl)], view or HOST_VIEW)
        return out.finish()
    ptrs = zone.ptr_records(q.qname, labels, view or HOST_VIEW) if labels[-2:] in _REVERSE_ZONES else None
    if ptrs is not None:
        out.record.header.aa = 1
        if q.qtype in (T_PTR, T_ANY):
            out.record.add_answer(*ptrs)
            out.rotate = len(ptrs) > 1
        else:
            out.negative(NOERROR)
        return out.finish()
    return None


def _answer_local(
    out: _Reply, zone: Zone, qname: DNSLabel, qtype: int, rel: tuple[bytes, ...], view: View
) -> None:
    rec = out.record
    if not rel:  # the apex
        if qtype == T_SOA:
            rec.add_answer(RR(qname, T_SOA, ttl=zone.settings.negative_ttl, rdata=zone.soa()))
        elif qtype == T_NS:
            rec.add_answer(RR(qname, T_NS, ttl=zone.settings.ttl, rdata=NS(zone.ns_name)))
            rec.add_ar(*(_rr_for_ip(zone.ns_name, ip, zone.settings.ttl) for ip in zone.ns_ips))
        elif qtype == T_ANY:
            rec.add_answer(RR(qname, T_HINFO, ttl=zone.settings.ttl, rdata=_RFC8482_HINFO))
        else:
            out.negative(NOERROR)
        return
    kind = rel[-1]
    if len(rel) == 1 and kind in (b"service", b"container", b"addr", b"ns"):
        if kind == b"ns":
            _answer_addresses(out, zone, qname, qtype, zone.ns_ips, zone.settings.ttl)
        else:
            out.negative(NOERROR)  # an empty non-terminal: names exist below it (RFC 8020)
        return
    if kind == b"service" and len(rel) in (2, 3):
        _answer_service(out, zone, qname, qtype, rel[:-1], view)
        return
    if kind == b"container":
        name = b".".join(rel[:-1]).decode("utf-8", "replace")
        ips = zone.container_ips(name, view)
        if ips is None:
            out.negative(NXDOMAIN)
        else:
            _answer_addresses(out, zone, qname, qtype, ips, zone.settings.ttl)
        return
    if kind == b"addr" and len(rel) == 2:
        ip = parse_addr_label(rel[0].decode("ascii", "replace"))
        if ip is None:
            out.negative(NXDOMAIN)
        else:
            _answer_addresses(out, zone, qname, qtype, [ip], zone.settings.ttl)
        return
    out.negative(NXDOMAIN)


def _answer_addresses(
    out: _Reply, zone: Zone, qname: DNSLabel, qtype: int, ips: Sequence[IPAddress], ttl: int
) -> None:
    if qtype == T_ANY:
        if not ips:
            out.negative(NOERROR)
        else:
            out.record.add_answer(RR(qname, T_HINFO, ttl=ttl, rdata=_RFC8482_HINFO))
        return
    want = 4 if qtype == T_A else 6 if qtype == T_AAAA else 0
    records = [_rr_for_ip(qname, ip, ttl) for ip in ips if ip.version == want]
    if not records:
        out.negative(NOERROR)
        return
    out.record.add_answer(*records)
    out.rotate = len(records) > 1


@dataclass(frozen=True, slots=True)
class _ServiceRecords:
    """A positive or NODATA service answer, ready to add to any reply."""

    answers: tuple[RR, ...]  # empty: NODATA
    additional: tuple[RR, ...] = ()


MAX_SERVICE_RECORDS = 4096  # memoized answers per zone; beyond it answers are built each time


def _answer_service(
    out: _Reply, zone: Zone, qname: DNSLabel, qtype: int, parts: tuple[bytes, ...], view: View
) -> None:
    memo_key = (tuple(qname.label), qtype, view)
    memo = zone.service_records.get(memo_key)
    if memo is None:
        built = _build_service_answer(out, zone, qname, qtype, parts, view)
        if built is None:
            return
        memo = built
        if len(zone.service_records) < MAX_SERVICE_RECORDS:
            zone.service_records[memo_key] = memo
    out.service = _service_key(parts)
    if not memo.answers:
        out.negative(NOERROR)
        return
    out.record.add_answer(*memo.answers)
    out.record.add_ar(*memo.additional)
    out.rotate = len(memo.answers) > 1


def _service_key(parts: tuple[bytes, ...]) -> str:
    name = parts[0][1:] if len(parts) == 2 and parts[0].startswith(b"_") and parts[1].startswith(b"_") else parts[-1]
    return name.decode("utf-8", "replace")


def _build_service_answer(
    out: _Reply, zone: Zone, qname: DNSLabel, qtype: int, parts: tuple[bytes, ...], view: View
) -> _ServiceRecords | None:
    """The records of a service answer; None after answering NXDOMAIN itself."""
    tag: str | None = None
    protocol: str | None = None
    if len(parts) == 1:
        name = parts[0]
    elif parts[0].startswith(b"_") and parts[1].startswith(b"_"):
        # RFC 2782: _<service>._<proto> (tcp/udp) or _<service>._<tag>.
        name = parts[0][1:]
        second = parts[1][1:].decode("utf-8", "replace")
        if second in ("tcp", "udp"):
            protocol = second
        else:
            tag = second
    else:
        tag, name = parts[0].decode("utf-8", "replace"), parts[1]
    svc = zone.services.get(name.decode("utf-8", "replace"))
    if svc is None:
        out.negative(NXDOMAIN)
        return None
    # From here on only `svc` (and fixed settings) shape the answer.
    members: Iterable[Endpoint] = svc.endpoints
    if tag is not None:
        members = [e for e in members if tag in (t.lower() for t in e.tags)]
    if protocol is not None:
        members = [e for e in members if e.protocol.lower() == protocol]
    members = list(members)
    if not members:
        out.negative(NXDOMAIN)  # no endpoint has this tag or protocol: the name does not exist
        return None
    # A known name with no usable endpoint answers NODATA, not SERVFAIL (README:
    # SERVFAIL makes stub resolvers fail over to other servers and retry).
    # Each endpoint as this querier can reach it, or not at all.
    usable = [(e, *at) for e in members if zone.usable(e) and (at := reach(e, view)) is not None]
    ttl = zone.service_ttl(svc)
    if qtype == T_SRV:
        targets: dict[str, IPAddress] = {}
        answers = []
        for ep, ip, port in usable:
            target = f"{addr_label(ip)}.addr.{zone.domain}"
            targets[target] = ip
            srv = SRV(priority=1, weight=max(0, min(ep.weight, 0xFFFF)), port=port, target=target)
            answers.append(RR(qname, T_SRV, ttl=ttl, rdata=srv))
        return _ServiceRecords(tuple(answers), tuple(_rr_for_ip(t, ip, ttl) for t, ip in targets.items()))
    if qtype == T_ANY:
        return _ServiceRecords((RR(qname, T_HINFO, ttl=ttl, rdata=_RFC8482_HINFO),) if usable else ())
    # Two ports of one address: one A record (no duplicate RRs); a dict keeps
    # this linear for services with thousands of endpoints.
    want = 4 if qtype == T_A else 6 if qtype == T_AAAA else 0
    unique = dict.fromkeys(ip for _, ip, _ in usable if ip.version == want)
    return _ServiceRecords(tuple(_rr_for_ip(qname, ip, ttl) for ip in unique))


def rotation_count(answer: Answer, limit: int) -> int:
    """How many rotated orders of the answer RRset to hand out in turn (1: no rotation)."""
    n = len(answer.reply.rr)
    return 1 if not answer.rotate or n < 2 or limit < 2 else min(n, limit)


def rotation(answer: Answer, i: int, count: int) -> DNSRecord:
    """The reply with its answer RRset rotated to the i-th of `count` even shifts.

    One at a time, so a server packs only the orders it hands out.
    """
    if count <= 1:
        return answer.reply
    rr = answer.reply.rr
    shift = i * len(rr) // count
    copy = DNSRecord(answer.reply.header, answer.reply.questions, rr[shift:] + rr[:shift])
    copy.auth = answer.reply.auth
    copy.ar = answer.reply.ar
    return copy


def rotations(answer: Answer, limit: int) -> list[DNSRecord]:
    """Up to `limit` copies of the reply with the answer RRset rotated evenly."""
    count = rotation_count(answer, limit)
    return [rotation(answer, i, count) for i in range(count)]


# Least wire size of one record (an OPT: root owner and 10 fixed bytes; any
# other has a 2-byte compressed owner or more, and rdata); enough to tell without packing that an
# answer with hundreds of records cannot fit a UDP reply.
_MIN_RR_SIZE = 11  # the OPT record: root owner (1) + 10


def size_at_least(answer: Answer) -> int:
    """A lower bound of the packed reply's size (header and records, no packing)."""
    r = answer.reply
    return 12 + _MIN_RR_SIZE * (len(r.rr) + len(r.auth) + len(r.ar))


def truncated(answer: Answer) -> DNSRecord:
    """The UDP reply when the full one does not fit: TC set, question and OPT only."""
    src = answer.reply
    header = DNSHeader(id=src.header.id, bitmap=src.header.bitmap, tc=1)
    record = DNSRecord(header, list(src.questions))
    record.ar = [rr for rr in src.ar if rr.rtype == T_OPT]
    record.set_header_qa()
    return record


def pack(record: DNSRecord) -> bytes:
    """Wire form (dnslib packs into a bytearray)."""
    return bytes(record.pack())


def qtype_name(qtype: int) -> str:
    name = QTYPE.get(qtype)
    return str(name)
