"""Embedded DNS server answering <service>.service.<domain> from registry snapshots."""

from beacon.dns.server import DnsServer

__all__ = ["DnsServer"]
