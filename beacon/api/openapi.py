"""The OpenAPI 3 description of the REST API (served at GET /v1/openapi.json).

Kept next to the handlers and checked by the test suite against the routes the
server really registers, so the document cannot silently drift.
"""

from __future__ import annotations

from functools import cache
from typing import Any

_STATES = ["passing", "warning", "critical", "draining"]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str, *, index: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description, "content": {"application/json": {"schema": schema}}}
    if index:
        out["headers"] = {"X-Beacon-Index": {"$ref": "#/components/headers/X-Beacon-Index"}}
    return out


def _error(description: str) -> dict[str, Any]:
    return _json(_ref("Error"), description)


_BLOCKING = [{"$ref": "#/components/parameters/index"}, {"$ref": "#/components/parameters/wait"}]
_ID_PARAM = {
    "name": "id",
    "in": "path",
    "required": True,
    "description": "Endpoint id (1-128 characters: letters, digits, _.:@-)",
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$"},
}
_AUTH: list[dict[str, list[str]]] = [{}, {"bearer": []}]  # the token is required only when --api-token is set
_WRITE_ERRORS = {
    "400": _error("Malformed JSON"),
    "401": _error("Missing or wrong bearer token (when --api-token is set)"),
    "404": _error("No manual endpoint with this id"),
    "409": _error("The id belongs to a container, or the request does not fit the endpoint"),
    "422": _error("Invalid field; `field` names it"),
}

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error", "field"],
        "properties": {
            "error": {"type": "string", "description": "What is wrong, for a human"},
            "field": {"type": ["string", "null"], "description": "The input field at fault, if any"},
        },
    },
    "State": {"type": "string", "enum": _STATES},
    "Source": {
        "type": "object",
        "required": ["kind"],
        "properties": {
            "kind": {"type": "string", "enum": ["container", "manual"]},
            "container_id": {"type": "string"},
            "container_name": {"type": "string"},
        },
    },
    "CheckStatus": {
        "type": "object",
        "properties": {
            "state": _ref("State"),
            "output": {"type": "string", "maxLength": 4096},
            "last_checked": {"type": "number", "description": "Unix time of the last result"},
            "last_change": {"type": "number", "description": "Unix time the state last changed"},
            "consecutive_passes": {"type": "integer"},
            "consecutive_failures": {"type": "integer"},
        },
    },
    "Endpoint": {
        "type": "object",
        "required": ["id", "service", "address", "port", "state", "weight", "tags", "meta", "source"],
        "properties": {
            "id": {"type": "string"},
            "service": {"type": "string"},
            "address": {"type": "string", "description": "IPv4 or IPv6 address"},
            "port": {"type": "integer", "minimum": 1, "maximum": 65535},
            "protocol": {"type": "string"},
            "node": {"type": "string"},
            "state": _ref("State"),
            "weight": {"type": "integer"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "meta": {"type": "object", "additionalProperties": {"type": "string"}},
            "source": _ref("Source"),
            "check": {"type": "object", "description": "The active check configured, if any"},
            "check_status": _ref("CheckStatus"),
        },
    },
    "Service": {
        "type": "object",
        "required": ["name", "tags", "endpoints"],
        "properties": {
            "name": {"type": "string"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "meta": {"type": "object", "additionalProperties": {"type": "string"}},
            "endpoints": {"type": "array", "items": _ref("Endpoint")},
        },
    },
    "ServiceSummary": {
        "type": "object",
        "required": ["name", "tags", "passing", "total"],
        "properties": {
            "name": {"type": "string"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "passing": {"type": "integer", "description": "Endpoints in state passing"},
            "total": {"type": "integer", "description": "All endpoints"},
            "states": {"type": "object", "additionalProperties": {"type": "integer"}},
        },
    },
    "Check": {
        "type": "object",
        "description": "An active check run by Beacon: exactly one of http or tcp",
        "additionalProperties": False,
        "properties": {
            "http": {"type": "string", "pattern": "^/", "description": "Path probed with HTTP; 2xx/3xx pass"},
            "tcp": {"type": "boolean", "enum": [True], "description": "Probe by TCP connect"},
            "method": {"type": "string", "default": "GET"},
            "status": {
                "type": ["string", "integer"],
                "description": "Passing HTTP status: 200, 200-399 or 2xx",
                "default": "200-399",
            },
            "interval": {"$ref": "#/components/schemas/Duration"},
            "timeout": {"$ref": "#/components/schemas/Duration"},
            "rise": {"type": "integer", "minimum": 1, "maximum": 100, "default": 2},
            "fall": {"type": "integer", "minimum": 1, "maximum": 100, "default": 3},
        },
    },
    "Duration": {
        "oneOf": [
            {"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*(ms|s|m|h)?\s*$", "example": "10s"},
            {"type": "number", "description": "seconds"},
        ]
    },
    "Registration": {
        "type": "object",
        "required": ["service", "address", "port"],
        "additionalProperties": False,
        "properties": {
            "id": {"type": "string", "description": "Optional; must equal the id in the path"},
            "service": {
                "type": "string",
                "pattern": "^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$",
                "description": "A DNS label (stored lowercased)",
            },
            "address": {"type": "string", "description": "IPv4 or IPv6 address (not a wildcard)"},
            "port": {"type": "integer", "minimum": 1, "maximum": 65535},
            "protocol": {"type": "string", "enum": ["tcp", "udp"], "default": "tcp"},
            "tags": {"type": "array", "maxItems": 64, "items": {"type": "string", "minLength": 1}},
            "meta": {"type": "object", "maxProperties": 64, "additionalProperties": {"type": "string"}},
            "weight": {"type": "integer", "minimum": 1, "maximum": 65535, "default": 1},
            "ttl": {
                "$ref": "#/components/schemas/Duration",
                "description": "Heartbeat TTL (0.1s-24h): critical until the first heartbeat and "
                "when none arrives within the TTL",
            },
            "check": _ref("Check"),
        },
    },
    "Heartbeat": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "status": {"type": "string", "enum": ["passing", "warning", "critical"], "default": "passing"},
            "output": {"type": "string", "description": "Kept up to 4096 characters"},
        },
    },
}

_PATHS: dict[str, Any] = {
    "/v1/services": {
        "get": {
            "operationId": "listServices",
            "summary": "Every service with its tags and passing/total endpoint counts",
            "parameters": _BLOCKING,
            "responses": {
                "200": _json({"type": "array", "items": _ref("ServiceSummary")}, "Services by name", index=True),
                "400": _error("Bad index or wait"),
            },
        }
    },
    "/v1/services/{name}": {
        "get": {
            "operationId": "getService",
            "summary": "One service and all its endpoints; a blocking query wakes only when it changes",
            "parameters": [
                {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}},
                *_BLOCKING,
            ],
            "responses": {
                "200": _json(_ref("Service"), "The service", index=True),
                "400": _error("Bad index or wait"),
                "404": _error("Unknown service"),
            },
        }
    },
    "/v1/endpoints": {
        "get": {
            "operationId": "listEndpoints",
            "summary": "Endpoints, filtered by service, tag and state",
            "parameters": [
                {"name": "service", "in": "query", "schema": {"type": "string"}},
                {"name": "tag", "in": "query", "schema": {"type": "string"}},
                {
                    "name": "state",
                    "in": "query",
                    "description": "One state or a comma-separated list",
                    "schema": {"type": "string", "example": "passing,warning"},
                },
                *_BLOCKING,
            ],
            "responses": {
                "200": _json({"type": "array", "items": _ref("Endpoint")}, "Matching endpoints", index=True),
                "400": _error("Bad filter, index or wait"),
            },
        }
    },
    "/v1/endpoints/{id}": {
        "get": {
            "operationId": "getEndpoint",
            "summary": "One endpoint (container or manual)",
            "parameters": [_ID_PARAM, *_BLOCKING],
            "responses": {
                "200": _json(_ref("Endpoint"), "The endpoint", index=True),
                "400": _error("Bad index or wait"),
                "404": _error("Unknown endpoint"),
            },
        },
        "put": {
            "operationId": "registerEndpoint",
            "summary": "Register or replace a manual endpoint (not a container)",
            "security": _AUTH,
            "parameters": [_ID_PARAM],
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref("Registration")}},
            },
            "responses": {
                "200": _json(_ref("Endpoint"), "Replaced", index=True),
                "201": _json(_ref("Endpoint"), "Created", index=True),
                **_WRITE_ERRORS,
            },
        },
        "delete": {
            "operationId": "deregisterEndpoint",
            "summary": "Remove a manual endpoint",
            "security": _AUTH,
            "parameters": [_ID_PARAM],
            "responses": {
                "200": _json(
                    {
                        "type": "object",
                        "properties": {"id": {"type": "string"}, "deregistered": {"type": "boolean"}},
                    },
                    "Removed",
                    index=True,
                ),
                **{k: v for k, v in _WRITE_ERRORS.items() if k != "422"},
            },
        },
    },
    "/v1/endpoints/{id}/heartbeat": {
        "put": {
            "operationId": "heartbeat",
            "summary": "TTL heartbeat: sets the endpoint's check status and re-arms its TTL",
            "security": _AUTH,
            "parameters": [
                _ID_PARAM,
                {"name": "status", "in": "query", "schema": {"type": "string", "enum": ["passing", "warning", "critical"]}},
                {"name": "output", "in": "query", "schema": {"type": "string"}},
            ],
            "requestBody": {"required": False, "content": {"application/json": {"schema": _ref("Heartbeat")}}},
            "responses": {"200": _json(_ref("Endpoint"), "The endpoint after the heartbeat", index=True), **_WRITE_ERRORS},
        }
    },
    "/v1/watch": {
        "get": {
            "operationId": "watch",
            "summary": "Server-sent events: `snapshot` (full state) on connect, then one `change` per new "
            "snapshot with the changed services and removed names; comments as heartbeats",
            "parameters": [{"name": "service", "in": "query", "schema": {"type": "string"}}],
            "responses": {
                "200": {"description": "An event stream", "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                "400": _error("Bad service filter"),
            },
        }
    },
    "/v1/autoheal": {
        "get": {
            "operationId": "autohealLog",
            "summary": "Container restarts made by autoheal, oldest first",
            "responses": {"200": _json({"type": "array", "items": {"type": "object"}}, "Restarts", index=True)},
        }
    },
    "/v1/routes": {
        "get": {
            "operationId": "routes",
            "summary": "The proxy's routing table: every host/path route and the conflicts found "
            "(two label routes on one host and path; the most specific match wins)",
            "responses": {"200": _json({"type": "object"}, "Routes and conflicts", index=True)},
        }
    },
    "/v1/nodes": {
        "get": {
            "operationId": "nodes",
            "summary": "The nodes of the cluster (etcd store): lease state (alive, released, expired; "
            "'local' for this node, 'none' with the memory store), last change seen, endpoint counts, "
            "and this agent's store connection",
            "responses": {"200": _json({"type": "object"}, "Nodes and store state", index=True)},
        }
    },
    "/v1/traffic": {
        "get": {
            "operationId": "traffic",
            "summary": "Proxy traffic per service over the last ~10 s, computed from the proxy's counters "
            "(what the dashboard shows): only catalog services that had requests in the window are listed, "
            "as [requests, errors (5xx), p99_seconds]; `window_seconds` is 0 until a second sample exists "
            "(samples are taken at most once a second, only while someone asks)",
            "responses": {
                "200": _json(
                    {
                        "type": "object",
                        "required": ["window_seconds", "fields", "services"],
                        "properties": {
                            "window_seconds": {"type": "number", "description": "Seconds the figures cover"},
                            "fields": {"type": "array", "items": {"type": "string"},
                                       "description": "The columns: requests, errors, p99_seconds"},
                            "services": {
                                "type": "object",
                                "additionalProperties": {
                                    "type": "array",
                                    "prefixItems": [{"type": "integer"}, {"type": "integer"},
                                                    {"type": ["number", "null"]}],
                                },
                            },
                        },
                    },
                    "Per-service figures",
                    index=True,
                )
            },
        }
    },
    "/v1/openapi.json": {
        "get": {
            "operationId": "openapi",
            "summary": "This document",
            "responses": {"200": _json({"type": "object"}, "OpenAPI 3 document")},
        }
    },
    "/healthz": {
        "get": {
            "operationId": "healthz",
            "summary": "Beacon's own health: the Docker connection",
            "responses": {
                "200": _json(
                    {
                        "type": "object",
                        "properties": {
                            "status": {"type": "string", "enum": ["ok"]},
                            "docker": {"type": "string", "enum": ["connected", "disabled"]},
                        },
                    },
                    "Healthy (docker is 'disabled' when Docker watching is off)",
                    index=True,
                ),
                "503": _json(
                    {
                        "type": "object",
                        "properties": {
                            "status": {"type": "string", "enum": ["degraded", "starting"]},
                            "docker": {"type": "string", "enum": ["connected", "disabled", "disconnected"]},
                            "store": {"type": "string", "enum": ["disconnected"]},
                        },
                    },
                    "The Docker connection (or the shared store) is down, or Beacon is still starting "
                    "(the API listens before DNS and the proxy)",
                    index=True,
                ),
            },
        }
    },
    "/metrics": {
        "get": {
            "operationId": "metrics",
            "summary": "Prometheus metrics (text exposition format)",
            "responses": {"200": {"description": "Metrics", "content": {"text/plain": {"schema": {"type": "string"}}}}},
        }
    },
}


@cache
def openapi_document(version: str) -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Beacon registry API",
            "version": version,
            "description": "Service discovery for Docker hosts. Every error is JSON "
            '{"error": "...", "field": "..."}. Reads accept blocking queries: pass the '
            "X-Beacon-Index of a previous answer as ?index= and the read returns when the answer "
            "may have changed, or after ?wait= (default 5m, at most 10m, plus up to wait/16 jitter).",
        },
        "paths": _PATHS,
        "components": {
            "schemas": _SCHEMAS,
            "parameters": {
                "index": {
                    "name": "index",
                    "in": "query",
                    "description": "Block until the answer changes after this index (X-Beacon-Index)",
                    "schema": {"type": "integer", "minimum": 0},
                },
                "wait": {
                    "name": "wait",
                    "in": "query",
                    "description": "Longest wait of a blocking query, e.g. 30s (default 5m, capped at 10m)",
                    "schema": {"type": "string", "example": "30s"},
                },
            },
            "headers": {
                "X-Beacon-Index": {
                    "description": "Index of the catalog snapshot the answer was rendered from",
                    "schema": {"type": "integer"},
                }
            },
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
