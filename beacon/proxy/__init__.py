"""HTTP reverse proxy balancing across healthy endpoints from registry snapshots."""

from beacon.proxy.metrics import LATENCY_BUCKETS, response_status
from beacon.proxy.server import ProxyServer

__all__ = ["LATENCY_BUCKETS", "ProxyServer", "response_status"]
