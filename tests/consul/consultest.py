"""Helpers for the Consul tests: endpoints written straight into a real Catalog (the seam the
Docker source and manual registrations use), and a shape comparison against Consul's docs."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

from beacon.registry import Catalog, Endpoint, Source, State
from beacon.registry.model import CheckSpec, CheckStatus


def container_endpoint(
    cid: str,
    service: str,
    *,
    port: int = 80,
    address: str = "10.0.0.5",
    node: str = "node-a",
    state: State = State.PASSING,
    tags: Iterable[str] = (),
    meta: Mapping[str, str] | None = None,
    check: CheckSpec | None = None,
    check_status: CheckStatus | None = None,
) -> Endpoint:
    return Endpoint(
        id=f"{cid}-{port}",
        service=service,
        address=address,
        port=port,
        source=Source("container", container_id=cid * 4, container_name=f"app-{cid}"),
        node=node,
        state=state,
        tags=tuple(tags),
        meta=MappingProxyType(dict(meta or {})),
        check=check,
        check_status=check_status,
    )


def put(catalog: Catalog, *endpoints: Endpoint) -> None:
    """Set each endpoint as its own container source and publish."""
    for ep in endpoints:
        catalog.set_source(f"container:{ep.id}", [ep])
    catalog.publish()


def drop(catalog: Catalog, *endpoint_ids: str) -> None:
    for eid in endpoint_ids:
        catalog.remove_source(f"container:{eid}")
    catalog.publish()


_JSON_TYPES: dict[type, str] = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
                                float: "number"}


def json_type(value: object) -> str:
    if value is None:
        return "null"
    return _JSON_TYPES[type(value)]


def compare_shape(
    ours: Any,
    reference: Any,
    path: str = "$",
    *,
    maps: frozenset[str] = frozenset(),
    omitted: frozenset[str] = frozenset(),
    extra: frozenset[str] = frozenset(),
) -> list[str]:
    """Field-by-field differences between our JSON and Consul's documented example.

    Names and JSON types must agree. `maps` are paths (like `$.Meta`) whose keys are data,
    not field names: their values are compared with the reference's first value. `omitted`
    are documented fields we leave out on purpose (paths without `[]`; a map's values are `.*`), `extra` fields we add (each justified in
    the test that passes them). A null in the reference accepts null, an object or an array
    (Consul documents empty collections as null in places).
    """
    problems: list[str] = []
    key = _generic(path)
    if reference is None:
        if ours is not None and json_type(ours) not in ("object", "array"):
            problems.append(f"{path}: expected null/object/array, got {json_type(ours)}")
        return problems
    if json_type(ours) != json_type(reference):
        return [f"{path}: expected {json_type(reference)}, got {json_type(ours)}"]
    if isinstance(reference, dict):
        if key in maps:
            if reference and ours:
                sample = next(iter(reference.values()))
                for v in ours.values():
                    problems += compare_shape(v, sample, f"{path}.*", maps=maps, omitted=omitted, extra=extra)
            return problems
        for name, ref_value in reference.items():
            child = f"{path}.{name}"
            if name not in ours:
                if _generic(child) not in omitted:
                    problems.append(f"{child}: missing")
                continue
            problems += compare_shape(ours[name], ref_value, child, maps=maps, omitted=omitted, extra=extra)
        for name in ours:
            child = f"{path}.{name}"
            if name not in reference and _generic(child) not in extra:
                problems.append(f"{child}: not in Consul's example")
    elif isinstance(reference, list) and reference and ours:
        for item in ours:
            problems += compare_shape(item, reference[0], f"{path}[]", maps=maps, omitted=omitted, extra=extra)
    return problems


def _generic(path: str) -> str:
    return path.replace("[]", "")
