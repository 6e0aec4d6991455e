"""Every Beacon metric follows one naming scheme, with help text (enforced here
over all modules of the package, CoreDNS-style)."""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

import aiohttp
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

import beacon
from beacon.metrics import exposition, metric_name_problems
from tests.helpers import running_app

ROOT = Path(__file__).resolve().parent.parent
METRICS_DOC = ROOT / "docs" / "METRICS.md"
_DOC_ROW = re.compile(r"^\| `([a-zA-Z_:][a-zA-Z0-9_:]*)` \|", re.MULTILINE)
_TYPE_LINE = re.compile(r"^# TYPE (\S+) \S+$", re.MULTILINE)
# A metric declared in the source: prometheus_client's metric classes and the
# families scrape-time collectors build, with the name as the first argument.
_DECLARED = re.compile(
    r"\b(Counter|Gauge|Histogram|Summary|Info|CounterMetricFamily|GaugeMetricFamily|HistogramMetricFamily)"
    r"\(\s*\"(beacon_[a-z0-9_]+)\""
)


def import_every_module() -> None:
    for module in pkgutil.walk_packages(beacon.__path__, "beacon."):
        if not module.name.endswith("__main__"):  # importing it would run the CLI
            importlib.import_module(module.name)


def documented_metrics() -> set[str]:
    return set(_DOC_ROW.findall(METRICS_DOC.read_text()))


def declared_metrics() -> set[str]:
    """Every beacon_* metric the source declares, as the exposition names it."""
    names: set[str] = set()
    for path in (ROOT / "beacon").rglob("*.py"):
        for kind, name in _DECLARED.findall(path.read_text()):
            if kind.startswith("Counter"):
                name = name if name.endswith("_total") else name + "_total"
            elif kind == "Info":
                name += "_info"
            names.add(name)
    return names


def test_every_beacon_metric_is_well_named() -> None:
    import_every_module()
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


async def test_docs_metrics_md_lists_every_metric_beacon_exports() -> None:
    """docs/METRICS.md stays complete: every family a running Beacon's /metrics
    exports and every metric the source declares has a row, and every row is
    a metric that exists."""
    import_every_module()  # collectors of components that are off (TLS) register at import
    async with running_app(docker=False) as app, aiohttp.ClientSession() as http:
        async with http.get(f"http://{app.api.address}/metrics") as resp:
            assert resp.status == 200
            text = await resp.text()
    exported = set(_TYPE_LINE.findall(text))
    declared = declared_metrics()
    assert {"beacon_proxy_requests_total", "beacon_registry_checks_total", "beacon_build_info"} <= exported
    assert len(declared) > 40, declared  # the source scan finds what it should
    documented = documented_metrics()
    assert sorted(exported - documented) == [], "exported on /metrics but missing from docs/METRICS.md"
    assert sorted(declared - documented) == [], "declared in beacon/ but missing from docs/METRICS.md"
    assert sorted(documented - exported - declared) == [], "docs/METRICS.md lists metrics that do not exist"


def test_the_completeness_check_sees_a_missing_row() -> None:
    """The doc check compares names, not prose: a row dropped is a name missing."""
    documented = documented_metrics()
    assert "beacon_proxy_requests_total" in documented and "process_open_fds" in documented
    text = METRICS_DOC.read_text().replace("| `beacon_proxy_requests_total` |", "| beacon_proxy_requests |")
    assert "beacon_proxy_requests_total" not in set(_DOC_ROW.findall(text))
