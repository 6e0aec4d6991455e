"""The API's answer shapes: JSON bodies with the snapshot index, JSON errors."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping

from aiohttp import web

from beacon.registry import Snapshot

INDEX_HEADER = "X-Beacon-Index"
MAX_BODY = 64 * 1024


class ApiError(Exception):
    """An error answer: status, message and the field it is about."""

    def __init__(
        self, status: int, message: str, field: str | None = None, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.headers = dict(headers or {})


def error_response(
    status: int, message: str, field: str | None = None, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.json_response({"error": message, "field": field}, status=status, headers=headers)


def json_response(data: object, snapshot: Snapshot, *, status: int = 200) -> web.Response:
    """A JSON body rendered from `snapshot`, with its index in X-Beacon-Index."""
    return web.Response(
        body=json.dumps(data, separators=(",", ":")).encode(),
        status=status,
        content_type="application/json",
        headers={INDEX_HEADER: str(snapshot.index)},
    )


def jsonable(item: object) -> object:
    to_json = getattr(item, "to_json", None)
    if callable(to_json):
        return to_json()
    if dataclasses.is_dataclass(item) and not isinstance(item, type):
        return dataclasses.asdict(item)
    if isinstance(item, Mapping):
        return dict(item)
    return item


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not valid JSON")


def parse_json_body(raw: bytes) -> object:
    """Strict JSON (no NaN/Infinity); malformed → ApiError 400 on field `body`."""
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, f"malformed JSON: {exc}", "body") from None
