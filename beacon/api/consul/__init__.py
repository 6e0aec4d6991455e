"""A Consul-compatible HTTP API over Beacon's snapshots (see CONSUL.md next to this package).

Tools that discover services through Consul's HTTP API - Prometheus's
`consul_sd_configs`, consul-template, Traefik's and fabio's Consul catalog
providers, py-consul - read the catalog, health and agent endpoints served
here and work against Beacon unchanged.

Layout, pure parts first:
  query.py         Consul's query options (?dc, ?stale, ?wait as a Go duration, ?index, flags)
  indexes.py       IndexTracker: per-service/per-node Consul indexes from snapshot deltas (and the epoch)
  views.py         snapshot → Consul's JSON shapes (catalog, health, agent)
  filters.py       the ?filter language (go-bexpr) → a predicate
  registration.py  Consul registrations and checks → Beacon's manual registrations
  errors.py        ConsulError, raised by all of the above
  routes.py        ConsulApi (the aiohttp routes, an API server extension) and store_leader;
                   its blocking queries park in beacon.api.waiters.Waiters, as Beacon's own do
"""

from beacon.api.consul.errors import ConsulError
from beacon.api.consul.indexes import IndexTracker
from beacon.api.consul.query import parse_go_duration, parse_query_options
from beacon.api.consul.registration import registration_from_consul
from beacon.api.consul.routes import ConsulApi, store_leader
from beacon.api.consul.views import (
    ViewContext,
    agent_health_view,
    catalog_node_view,
    catalog_nodes_view,
    catalog_service_view,
    catalog_services_view,
    health_service_view,
)

__all__ = [
    "ConsulApi",
    "ConsulError",
    "IndexTracker",
    "ViewContext",
    "agent_health_view",
    "catalog_node_view",
    "catalog_nodes_view",
    "catalog_service_view",
    "catalog_services_view",
    "health_service_view",
    "parse_go_duration",
    "parse_query_options",
    "registration_from_consul",
    "store_leader",
]
