"""The HTTP API's extra route sets (the dashboard); the REST API itself still lives in beacon.registry.api."""
