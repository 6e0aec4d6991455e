"""Beacon: service discovery, DNS and HTTP load balancing for Docker hosts."""

__version__ = "0.1.0"
