"""Beacon's HTTP APIs: the REST API (`ApiServer`) and the views mounted on it
as extensions (Consul-compatible `consul/`, Prometheus SD `promsd.py`).

The REST API reads the catalog's snapshots, like DNS and the proxy.
"""

from beacon.api.blocking import BlockingQuery, parse_blocking
from beacon.api.responses import INDEX_HEADER, ApiError, error_response, json_response, parse_json_body
from beacon.api.server import ApiExtension, ApiServer

__all__ = [
    "INDEX_HEADER",
    "ApiError",
    "ApiExtension",
    "ApiServer",
    "BlockingQuery",
    "error_response",
    "json_response",
    "parse_blocking",
    "parse_json_body",
]
