"""API client commands: `beacon status`, `watch`, `services`, `endpoints`, `nodes`, `register`,
`deregister`, `heartbeat`.

Standard library only (urllib), so the CLI starts fast. Each command prints a
readable, aligned table, or the API's JSON answer with `--json`. Any failure
(API unreachable, an error answer) is one line on stderr and exit code 1;
usage errors exit 2.

Proxy environment variables are ignored on purpose: the API listens on
loopback by default, and a corporate HTTP proxy must not see its token.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from beacon.config import ClientConfig, ConfigError, build_client_config

Handler = Callable[[argparse.Namespace, "ApiClient"], int]


class ClientError(Exception):
    """A failure to show the user as one line."""


class ApiClient:
    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def request(
        self, method: str, path: str, body: object = None, query: dict[str, str] | None = None
    ) -> Any:
        url = self.config.api + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.config.token:
            headers["Authorization"] = f"Bearer {self.config.token}"
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with self._opener.open(req, timeout=self.config.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raise ClientError(_describe_error(exc)) from None
        except urllib.error.URLError as exc:
            raise ClientError(f"cannot reach the Beacon API at {self.config.api}: {exc.reason}") from None
        except (OSError, ValueError) as exc:  # timeouts, resets, a malformed URL
            raise ClientError(f"cannot reach the Beacon API at {self.config.api}: {exc}") from None
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            raise ClientError(f"the Beacon API at {self.config.api} did not answer JSON") from None


    def stream_events(self, path: str) -> Iterator[tuple[str, Any]]:
        """Server-sent events of `path` as (event, data), until the server closes.

        Beacon sends a keep-alive comment every 15 s, so a read that waits
        four times that long means the stream is dead, not quiet.
        """
        req = urllib.request.Request(self.config.api + path, headers={"Accept": "text/event-stream"})
        try:
            resp = self._opener.open(req, timeout=max(self.config.timeout, 60.0))
        except urllib.error.HTTPError as exc:
            raise ClientError(_describe_error(exc)) from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            raise ClientError(f"cannot reach the Beacon API at {self.config.api}: {reason}") from None
        event, data = "message", ""
        with resp:
            try:
                for raw in resp:
                    line = raw.decode("utf-8", "replace").rstrip("\r\n")
                    if not line:  # a blank line ends one event
                        if data:
                            yield event, json.loads(data)
                        event, data = "message", ""
                    elif line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:"):
                        data += line[5:].strip()
            except (OSError, ValueError) as exc:
                raise ClientError(f"the watch stream from {self.config.api} broke: {exc}") from None


def _describe_error(exc: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(exc.read())
        message = str(body["error"])
        field = body.get("field")
    except Exception:  # not our JSON shape: something else answered on that port
        return f"the API answered {exc.code} {exc.reason}"
    return f"the API answered {exc.code}: {message}" + (f" (field {field})" if field else "")


def _seg(text: str) -> str:
    """One URL path segment: a '/' in a name cannot reach another route."""
    return urllib.parse.quote(text, safe="")


# ------------------------------------------------------------------ output
def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Columns padded to their widest cell, two spaces apart, no trailing blanks."""
    cells = [[str(h) for h in headers], *([str(c) for c in row] for row in rows)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def _tags(tags: Sequence[str]) -> str:
    return ",".join(tags) or "-"


def _source(source: dict[str, str]) -> str:
    if source.get("kind") == "container":
        return f"container {source.get('container_name') or source.get('container_id', '')[:12]}"
    return str(source.get("kind", "?"))


def _endpoint_rows(endpoints: Sequence[dict[str, Any]]) -> str:
    rows = [
        (e["id"], e["address"], e["port"], e["state"], e["weight"], _tags(e["tags"]), _source(e["source"]))
        for e in endpoints
    ]
    return format_table(("ID", "ADDRESS", "PORT", "STATE", "WEIGHT", "TAGS", "SOURCE"), rows)


def _emit(args: argparse.Namespace, data: object, text: Callable[[], str]) -> int:
    print(json.dumps(data, indent=2) if args.json else text())
    return 0


# ---------------------------------------------------------------- commands
def _problems(services: Sequence[dict[str, Any]]) -> list[str]:
    """One line per endpoint that is not passing, worst services first."""
    lines = []
    for svc in services:
        for e in svc["endpoints"]:
            if e["state"] != "passing":
                reason = e.get("reason") or (e.get("check_status") or {}).get("output") or ""
                reason = " ".join(str(reason).split())[:120]
                lines.append(f"{e['state']:<9} {svc['name']} {e['id']} {e['address']}:{e['port']}"
                             + (f" ({reason})" if reason else ""))
    return lines


def cmd_status(args: argparse.Namespace, api: ApiClient) -> int:
    status = api.request("GET", "/v1/status")
    summaries = api.request("GET", "/v1/services")
    # Problems first: services with fewer passing than total, then the healthy ones.
    summaries = sorted(summaries, key=lambda s: (s["passing"] == s["total"], s["passing"] > 0, s["name"]))
    details = [api.request("GET", f"/v1/services/{_seg(s['name'])}") for s in summaries if s["passing"] < s["total"]]
    data = {"status": status, "services": summaries, "problems": _problems(details)}

    def text() -> str:
        ls = status["listeners"]
        store = status["store"]
        head = [
            f"node      {status['node']}   (catalog index {status['index']})",
            f"api       {ls['api']}",
            f"dns       {', '.join(ls['dns']) or '-'}",
            f"proxy     {ls['proxy'] or '-'}" + (f"   tls {ls['proxy_tls']}" if ls.get("proxy_tls") else ""),
            f"docker    {status['docker']}",
            f"store     {store['kind']} ({'connected' if store['connected'] else 'DISCONNECTED'})",
            "",
        ]
        problems = data["problems"]
        head += ["problems:", *(f"  {p}" for p in problems), ""] if problems else ["problems: none", ""]
        rows = [(s["name"], f"{s['passing']}/{s['total']}", "" if s["passing"] == s["total"] else
                 ("DOWN" if s["passing"] == 0 else "degraded")) for s in summaries]
        table = format_table(("SERVICE", "PASSING", ""), rows) if rows else "no services"
        return "\n".join(head) + table

    return _emit(args, data, text)


def _change_line(event: str, data: dict[str, Any]) -> str:
    services = data.get("services", [])
    if event == "snapshot":
        return f"index {data.get('index')}: {len(services)} services"
    parts = []
    for svc in services:
        counts = [e["state"] for e in svc.get("endpoints", [])]
        parts.append(f"{svc['name']} {counts.count('passing')}/{len(counts)} passing")
    parts += [f"{name} removed" for name in data.get("removed", [])]
    return f"index {data.get('index')}: " + ("; ".join(parts) or "no visible change")


def cmd_watch(args: argparse.Namespace, api: ApiClient) -> int:
    path = "/v1/watch" + (f"?service={urllib.parse.quote(args.service)}" if args.service else "")
    changes = 0
    try:
        for event, data in api.stream_events(path):
            if event not in ("snapshot", "change") or not isinstance(data, dict):
                continue
            print(json.dumps({"event": event, **data}) if args.json else _change_line(event, data), flush=True)
            if event == "change":
                changes += 1
                if args.count and changes >= args.count:
                    return 0
    except KeyboardInterrupt:  # Ctrl-C is how a watch ends
        return 130
    print("beacon: the watch stream ended (Beacon stopped?)", file=sys.stderr)
    return 1


def cmd_services(args: argparse.Namespace, api: ApiClient) -> int:
    services = api.request("GET", "/v1/services")
    return _emit(
        args,
        services,
        lambda: format_table(
            ("NAME", "PASSING", "TOTAL", "TAGS"),
            [(s["name"], s["passing"], s["total"], _tags(s["tags"])) for s in services],
        )
        if services
        else "no services",
    )


def cmd_endpoints(args: argparse.Namespace, api: ApiClient) -> int:
    service = api.request("GET", f"/v1/services/{_seg(args.name)}")
    return _emit(args, service, lambda: _endpoint_rows(service["endpoints"]))


def cmd_nodes(args: argparse.Namespace, api: ApiClient) -> int:
    table = api.request("GET", "/v1/nodes")
    return _emit(
        args,
        table,
        lambda: format_table(
            ("NODE", "LEASE", "ENDPOINTS", "LAST CHANGE"),
            [
                (n["node"] + (" (this)" if n.get("local") else ""), n.get("lease", ""), n.get("endpoints", 0),
                 _ago(n.get("last_change")))
                for n in table["nodes"]
            ],
        ),
    )


def _ago(wall: object) -> str:
    import time

    return f"{max(0.0, time.time() - wall):.1f}s ago" if isinstance(wall, (int, float)) else "-"


def _meta_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def cmd_register(args: argparse.Namespace, api: ApiClient) -> int:
    body: dict[str, Any] = {"service": args.service, "address": args.address, "port": args.port}
    if args.tag:
        body["tags"] = args.tag
    if args.meta:
        body["meta"] = dict(args.meta)
    if args.weight is not None:
        body["weight"] = args.weight
    if args.protocol is not None:
        body["protocol"] = args.protocol
    if args.ttl is not None:
        body["ttl"] = args.ttl
    check: dict[str, Any] = {}
    if args.check_http is not None:
        check["http"] = args.check_http
    if args.check_tcp:
        check["tcp"] = True
    if check:
        if args.check_interval is not None:
            check["interval"] = args.check_interval
        if args.check_timeout is not None:
            check["timeout"] = args.check_timeout
        body["check"] = check
    ep = api.request("PUT", f"/v1/endpoints/{_seg(args.id)}", body)
    return _emit(
        args,
        ep,
        lambda: f"registered: {ep['id']} service={ep['service']} address={ep['address']} "
        f"port={ep['port']} state={ep['state']}",
    )


def cmd_deregister(args: argparse.Namespace, api: ApiClient) -> int:
    answer = api.request("DELETE", f"/v1/endpoints/{_seg(args.id)}")
    return _emit(args, answer, lambda: f"deregistered: {args.id}")


def cmd_heartbeat(args: argparse.Namespace, api: ApiClient) -> int:
    body: dict[str, str] = {"status": args.status}
    if args.output is not None:
        body["output"] = args.output
    ep = api.request("PUT", f"/v1/endpoints/{_seg(args.id)}/heartbeat", body)
    return _emit(args, ep, lambda: f"heartbeat: {ep['id']} state={ep['state']}")


def _runner(command: Handler) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            config = build_client_config(args.api, args.token)
        except ConfigError as exc:
            print(f"beacon: {exc}", file=sys.stderr)
            return 2
        try:
            return command(args, ApiClient(config))
        except ClientError as exc:
            print(f"beacon: {exc}", file=sys.stderr)
            return 1
        except (KeyError, TypeError) as exc:  # an answer without the fields we print
            print(f"beacon: unexpected answer from the API at {config.api}: {exc!r}", file=sys.stderr)
            return 1

    return run


def add_client_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--api", default=None, metavar="URL", help="Beacon API URL [env BEACON_API; default http://127.0.0.1:8700]"
    )
    common.add_argument("--token", default=None, help="bearer token for writes [env BEACON_API_TOKEN]")
    common.add_argument("--json", action="store_true", help="print the API's JSON answer (for scripts)")

    p = sub.add_parser("status", parents=[common], help="one screen: listeners, Docker/store, problems first")
    p.set_defaults(handler=_runner(cmd_status))

    p = sub.add_parser("watch", parents=[common], help="print catalog changes as they happen (the SSE stream)")
    p.add_argument("--service", default=None, help="only this service")
    p.add_argument("--count", type=int, default=0, metavar="N", help="stop after N changes (0: until interrupted)")
    p.set_defaults(handler=_runner(cmd_watch))

    p = sub.add_parser("services", parents=[common], help="list services with passing/total endpoints")
    p.set_defaults(handler=_runner(cmd_services))

    p = sub.add_parser("endpoints", parents=[common], help="list the endpoints of one service")
    p.add_argument("name", metavar="NAME", help="service name")
    p.set_defaults(handler=_runner(cmd_endpoints))

    p = sub.add_parser("nodes", parents=[common], help="list the nodes of the cluster (etcd store)")
    p.set_defaults(handler=_runner(cmd_nodes))

    p = sub.add_parser("register", parents=[common], help="register a manual endpoint (not a container)")
    p.add_argument("id", metavar="ID", help="endpoint id, chosen by you")
    p.add_argument("--service", required=True, help="service name (a DNS label)")
    p.add_argument("--address", required=True, help="IPv4 or IPv6 address")
    p.add_argument("--port", required=True, type=int)
    p.add_argument("--tag", action="append", default=[], help="tag (repeatable)")
    p.add_argument("--meta", action="append", default=[], type=_meta_pair, metavar="KEY=VALUE", help="metadata (repeatable)")
    p.add_argument("--weight", type=int, default=None)
    p.add_argument("--protocol", choices=("tcp", "udp"), default=None)
    p.add_argument("--ttl", default=None, metavar="DURATION", help="heartbeat TTL, e.g. 10s: critical without heartbeats")
    p.add_argument("--check-http", default=None, metavar="PATH", help="HTTP check path, e.g. /health")
    p.add_argument("--check-tcp", action="store_true", help="TCP connect check")
    p.add_argument("--check-interval", default=None, metavar="DURATION")
    p.add_argument("--check-timeout", default=None, metavar="DURATION")
    p.set_defaults(handler=_runner(cmd_register))

    p = sub.add_parser("deregister", parents=[common], help="remove a manual endpoint")
    p.add_argument("id", metavar="ID")
    p.set_defaults(handler=_runner(cmd_deregister))

    p = sub.add_parser("heartbeat", parents=[common], help="send a TTL heartbeat for a manual endpoint")
    p.add_argument("id", metavar="ID")
    p.add_argument("--status", choices=("passing", "warning", "critical"), default="passing")
    p.add_argument("--output", default=None, help="text shown with the check status")
    p.set_defaults(handler=_runner(cmd_heartbeat))
