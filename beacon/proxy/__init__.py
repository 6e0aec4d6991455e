"""HTTP reverse proxy balancing across healthy endpoints from registry snapshots."""

from beacon.proxy.server import ProxyServer

__all__ = ["ProxyServer"]
