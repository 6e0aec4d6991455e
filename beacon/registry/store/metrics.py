"""Metrics of the store connection (one agent's own store reports them)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

CONNECTED = Gauge("beacon_store_connected", "1 while the store session and its watch are up, else 0")
LAST_SYNC_AGE = Gauge(
    "beacon_store_last_sync_age_seconds",
    "Seconds since the mirrored catalog was last known current (-1: never synced)",
)
RELISTS = Counter("beacon_store_relists_total", "Full re-lists of the store range (first sync, compaction)")
SESSIONS = Counter("beacon_store_sessions_total", "Store sessions started (connect or reconnect)")
LEASES = Counter("beacon_store_leases_total", "Leases granted (first start, or after one expired)")
WRITES = Counter("beacon_store_writes_total", "Keys written or deleted by this agent", ["op"])
EVENTS = Counter("beacon_store_events_total", "Changes of the mirrored range applied (watch or re-list)")
