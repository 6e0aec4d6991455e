"""The REST API: a reader of the catalog's snapshots, like DNS and the proxy.

`ApiServer` serves Beacon's own routes; other faces mount theirs as route sets
(`RouteSet = (app, ApiContext) -> None`, passed by app.py).
"""

from beacon.api.blocking import BlockingQuery, parse_blocking
from beacon.api.responses import INDEX_HEADER, ApiError, error_response, json_response, parse_json_body
from beacon.api.server import ApiContext, ApiServer, RouteSet

__all__ = [
    "INDEX_HEADER",
    "ApiContext",
    "ApiError",
    "ApiServer",
    "BlockingQuery",
    "RouteSet",
    "error_response",
    "json_response",
    "parse_blocking",
    "parse_json_body",
]
