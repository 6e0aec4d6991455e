"""TLS termination for the proxy: certificates from files and from ACME (see README.md)."""

from beacon.proxy.tls.frontend import TlsFrontend

__all__ = ["TlsFrontend"]
