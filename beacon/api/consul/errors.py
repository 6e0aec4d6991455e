"""The error every part of the Consul-compatible API raises; the routes turn it into Consul's answer."""

from __future__ import annotations

from collections.abc import Mapping


class ConsulError(Exception):
    """An answer in Consul's error style: a status and a plain-text body."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})
