"""The registry: the catalog of services and endpoints and the sources that feed it.

What other packages use: the model (`Snapshot`, `Service`, `Endpoint`, ...),
the `Catalog`, and the sources `app.py` composes - `DockerSource`,
`ManualRegistry`, `HealthChecker`, `ClusterSource`. The heavy ones (the
Docker SDK, aiohttp's client, the store) load on first use, so a process that only reads snapshots
(a proxy worker) does not import them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from beacon.registry.catalog import Catalog, EndpointConflict
from beacon.registry.manual import ManualRegistry, RegistrationConflict, RegistrationError
from beacon.registry.model import (
    AutohealSpec,
    Balancing,
    CheckSpec,
    CheckStatus,
    Endpoint,
    RouteSpec,
    Service,
    ServiceSettings,
    Snapshot,
    SnapshotDelta,
    Source,
    State,
)

if TYPE_CHECKING:
    from beacon.registry.checker import HealthChecker
    from beacon.registry.cluster import ClusterSource
    from beacon.registry.docker import DockerSource

_LAZY = {
    "ClusterSource": "beacon.registry.cluster",
    "DockerSource": "beacon.registry.docker",
    "HealthChecker": "beacon.registry.checker",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'beacon.registry' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = [
    "AutohealSpec",
    "Balancing",
    "Catalog",
    "CheckSpec",
    "CheckStatus",
    "ClusterSource",
    "DockerSource",
    "Endpoint",
    "EndpointConflict",
    "HealthChecker",
    "ManualRegistry",
    "RegistrationConflict",
    "RegistrationError",
    "RouteSpec",
    "Service",
    "ServiceSettings",
    "Snapshot",
    "SnapshotDelta",
    "Source",
    "State",
]
