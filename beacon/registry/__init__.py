"""The registry: the catalog of services and endpoints and the sources that feed it."""

from beacon.registry.catalog import Catalog, EndpointConflict
from beacon.registry.model import (
    AutohealSpec,
    CheckSpec,
    CheckStatus,
    Endpoint,
    Service,
    Snapshot,
    Source,
    State,
)

__all__ = [
    "AutohealSpec",
    "Catalog",
    "CheckSpec",
    "CheckStatus",
    "Endpoint",
    "EndpointConflict",
    "Service",
    "Snapshot",
    "Source",
    "State",
]
