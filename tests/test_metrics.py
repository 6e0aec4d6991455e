"""Every Beacon metric follows one naming scheme, with help text (enforced here
over all modules of the package, CoreDNS-style)."""

from __future__ import annotations

import importlib
import pkgutil

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

import beacon
from beacon.metrics import exposition, metric_name_problems


def test_every_beacon_metric_is_well_named() -> None:
    for module in pkgutil.walk_packages(beacon.__path__, "beacon."):
        if not module.name.endswith("__main__"):  # importing it would run the CLI
            importlib.import_module(module.name)
    assert metric_name_problems() == []
    text = exposition()[0].decode()
    assert "# HELP beacon_registry_api_requests_total" in text


def test_the_rule_catches_bad_names() -> None:
    registry = CollectorRegistry()
    Counter("beacon_registry_good", "fine", registry=registry)
    Gauge("beacon_dns_cache_entries", "fine", registry=registry)
    Histogram("beacon_proxy_request_duration_seconds", "fine", registry=registry)
    Gauge("beacon_widget_things", "unknown component", registry=registry)
    Gauge("beacon_proxy_latency_ms", "not in seconds", registry=registry)
    Gauge("beacon_registry_no_help", "", registry=registry)
    Gauge("other_metric", "not ours, ignored", registry=registry)
    problems = metric_name_problems(registry)
    assert len(problems) == 3, problems
    assert any(p.startswith("beacon_widget_things:") for p in problems)
    assert any(p.startswith("beacon_proxy_latency_ms:") and "_seconds" in p for p in problems)
    assert any(p.startswith("beacon_registry_no_help:") and "help" in p for p in problems)
