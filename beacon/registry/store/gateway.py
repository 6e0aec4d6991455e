"""A thin client for etcd's gRPC-JSON gateway (``/v3/...`` on the client port).

The messages are etcd's own protobuf messages in their JSON form (int64 as
strings, bytes as base64, zero values left out); this module only moves them.
It knows several endpoints and moves to the next one when a call fails to
connect, so a cluster with one member down keeps working. TLS (CA, client
certificate) goes through an `ssl.SSLContext`; user/password authentication
asks `/v3/auth/authenticate` for a token and sends it as the `Authorization`
header, getting a new one when etcd says it is invalid.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import ssl
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp

log = logging.getLogger("beacon.registry.store")

# A watch or range line can be large (a page of up to PAGE_LIMIT keys); bound it anyway.
MAX_LINE = 64 * 1024 * 1024


class GatewayError(RuntimeError):
    """etcd could not be reached, or answered with an error."""


class Unreachable(GatewayError):
    """No endpoint answered (connection refused, reset, timeout)."""


class EtcdError(GatewayError):
    """etcd answered with an error (`code` is the gRPC status code)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    endpoints: tuple[str, ...]  # "host:port" each
    cacert: str = ""
    cert: str = ""
    key: str = ""
    user: str = ""
    password: str = ""

    @property
    def scheme(self) -> str:
        return "https" if self.cacert or self.cert else "http"


def b64(text: str | bytes) -> str:
    raw = text.encode() if isinstance(text, str) else text
    return base64.b64encode(raw).decode("ascii")


def unb64(text: str) -> bytes:
    return base64.b64decode(text)


def prefix_end(prefix: bytes) -> bytes:
    """The range end that covers every key starting with `prefix` (etcd's rule)."""
    end = bytearray(prefix)
    for i in range(len(end) - 1, -1, -1):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[: i + 1])
    return b"\x00"


def _ssl_context(settings: GatewaySettings) -> ssl.SSLContext | None:
    if settings.scheme == "http":
        return None
    ctx = ssl.create_default_context(cafile=settings.cacert or None)
    if settings.cert:
        ctx.load_cert_chain(settings.cert, settings.key or None)
    return ctx


class Gateway:
    """Calls to one etcd cluster. One aiohttp session; start() before use."""

    def __init__(self, settings: GatewaySettings) -> None:
        if not settings.endpoints:
            raise ValueError("at least one etcd endpoint is needed")
        self._settings = settings
        self._current = 0
        self._session: aiohttp.ClientSession | None = None
        self._token: str | None = None

    async def start(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=_ssl_context(self._settings) or False, limit=64),
                timeout=aiohttp.ClientTimeout(total=None),
                cookie_jar=aiohttp.DummyCookieJar(),
            )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def endpoint(self) -> str:
        return self._settings.endpoints[self._current]

    def _url(self, path: str) -> str:
        return f"{self._settings.scheme}://{self.endpoint}/v3/{path}"

    def _rotate(self) -> None:
        self._current = (self._current + 1) % len(self._settings.endpoints)

    async def _headers(self, timeout: float) -> dict[str, str]:
        if not self._settings.user:
            return {}
        if self._token is None:
            body = {"name": self._settings.user, "password": self._settings.password}
            reply = await self._post_once("auth/authenticate", body, timeout, auth=False)
            self._token = str(reply.get("token", ""))
        return {"Authorization": self._token}

    async def call(self, path: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
        """POST one unary request; tries each endpoint once before giving up."""
        last: BaseException | None = None
        for _ in self._settings.endpoints:
            try:
                return await self._post_once(path, body, timeout)
            except Unreachable as exc:
                last = exc
                self._rotate()
            except EtcdError as exc:
                if exc.code == 16 and self._settings.user:  # UNAUTHENTICATED: token expired
                    self._token = None
                    last = exc
                    continue
                if exc.code == 14:  # UNAVAILABLE: this member has no leader, say
                    last = exc
                    self._rotate()
                    continue
                raise
        raise Unreachable(f"no etcd endpoint answered {path}: {last}")

    async def _post_once(
        self, path: str, body: dict[str, Any], timeout: float, *, auth: bool = True
    ) -> dict[str, Any]:
        assert self._session is not None, "Gateway.start() first"
        try:
            async with asyncio.timeout(timeout):
                headers = await self._headers(timeout) if auth else {}
                async with self._session.post(self._url(path), json=body, headers=headers) as resp:
                    data = await resp.read()
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise Unreachable(f"{self.endpoint}: {_describe(exc)}") from None
        try:
            reply = json.loads(data) if data else {}
        except ValueError:
            raise Unreachable(f"{self.endpoint}: answer to {path} is not JSON ({resp.status})") from None
        if not isinstance(reply, dict):
            raise Unreachable(f"{self.endpoint}: answer to {path} is not an object")
        if resp.status != 200 or ("error" in reply and "code" in reply):
            message = str(reply.get("message") or reply.get("error") or f"HTTP {resp.status}")
            raise EtcdError(f"{path}: {message}", int(reply.get("code") or 2))
        return reply

    @asynccontextmanager
    async def stream(
        self, path: str, body: dict[str, Any], connect_timeout: float
    ) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
        """POST a streaming request (watch); yields an iterator of the `result` messages."""
        assert self._session is not None, "Gateway.start() first"
        try:
            async with asyncio.timeout(connect_timeout):
                headers = await self._headers(connect_timeout)
                resp = await self._session.post(self._url(path), json=body, headers=headers)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            self._rotate()
            raise Unreachable(f"{self.endpoint}: {_describe(exc)}") from None
        try:
            if resp.status != 200:
                self._rotate()
                raise Unreachable(f"{path}: HTTP {resp.status}")
            yield _lines(resp)
        finally:
            resp.close()  # never back to the pool: a watch connection is not reusable


async def _lines(resp: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    buffer = bytearray()
    try:
        while True:
            chunk = await resp.content.readany()
            if not chunk:
                raise Unreachable("stream ended")
            buffer += chunk
            if len(buffer) > MAX_LINE:
                raise Unreachable("stream line too long")
            while (end := buffer.find(b"\n")) >= 0:
                line = bytes(buffer[:end])
                del buffer[: end + 1]
                if not line.strip():
                    continue
                message = json.loads(line)
                if "error" in message:
                    err = message["error"]
                    raise EtcdError(str(err.get("message", err)), int(err.get("grpc_code", err.get("code", 2))))
                yield message.get("result", {})
    except (aiohttp.ClientError, OSError) as exc:
        raise Unreachable(_describe(exc)) from None
    except ValueError as exc:
        raise Unreachable(f"bad stream message: {exc}") from None


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def split_endpoints(text: str) -> Sequence[str]:
    return [p.strip() for p in text.split(",") if p.strip()]
