"""Beacon's HTTP APIs: the REST API and the views mounted on it (Consul-compatible, Prometheus SD)."""
