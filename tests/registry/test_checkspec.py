"""Pure parsing of beacon.check.* / beacon.autoheal* labels and API check objects."""

from __future__ import annotations

from typing import Any

import pytest

from beacon.registry.checkspec import (
    OUTPUT_LIMIT,
    CheckSpecError,
    check_spec_from_json,
    parse_check_labels,
    truncate_output,
)
from beacon.registry.model import AutohealSpec, CheckSpec

HTTP_DEFAULT = CheckSpec(kind="http", path="/health", interval=5.0, timeout=2.0, rise=2, fall=3)
TCP_DEFAULT = CheckSpec(kind="tcp", interval=5.0, timeout=2.0, rise=2, fall=3)


@pytest.mark.parametrize(
    ("labels", "check"),
    [
        pytest.param({}, None, id="no-labels"),
        pytest.param({"beacon.service": "web", "com.example": "x"}, None, id="unrelated-labels"),
        pytest.param({"beacon.check.http": "/health"}, HTTP_DEFAULT, id="http-defaults"),
        pytest.param({"beacon.check.http": " /health "}, HTTP_DEFAULT, id="http-trimmed"),
        pytest.param(
            {"beacon.check.http": "/status?full=1", "beacon.check.http.method": "head"},
            CheckSpec(kind="http", path="/status?full=1", method="HEAD", rise=2, fall=3),
            id="http-query-and-method",
        ),
        pytest.param(
            {"beacon.check.http": "/h", "beacon.check.http.status": "200"},
            CheckSpec(kind="http", path="/h", status_min=200, status_max=200, rise=2, fall=3),
            id="status-single",
        ),
        pytest.param(
            {"beacon.check.http": "/h", "beacon.check.http.status": "200-204"},
            CheckSpec(kind="http", path="/h", status_min=200, status_max=204, rise=2, fall=3),
            id="status-range",
        ),
        pytest.param(
            {"beacon.check.http": "/h", "beacon.check.http.status": "2xx"},
            CheckSpec(kind="http", path="/h", status_min=200, status_max=299, rise=2, fall=3),
            id="status-class",
        ),
        pytest.param(
            {
                "beacon.check.http": "/h",
                "beacon.check.interval": "500ms",
                "beacon.check.timeout": "0.25",
                "beacon.check.rise": "1",
                "beacon.check.fall": "5",
            },
            CheckSpec(kind="http", path="/h", interval=0.5, timeout=0.25, rise=1, fall=5),
            id="timing",
        ),
        pytest.param({"beacon.check.tcp": "true"}, TCP_DEFAULT, id="tcp"),
        pytest.param({"beacon.check.tcp": "YES", "beacon.check.interval": "1m"},
                     CheckSpec(kind="tcp", interval=60.0, rise=2, fall=3), id="tcp-interval"),
        pytest.param({"beacon.check.tcp": "false"}, None, id="tcp-false"),
    ],
)
def test_valid_check_labels(labels: dict[str, str], check: CheckSpec | None) -> None:
    got, autoheal, problems = parse_check_labels(labels)
    assert problems == []
    assert got == check
    assert autoheal is None


@pytest.mark.parametrize(
    ("labels", "check", "bad_label", "words"),
    [
        # An invalid kind label: no check at all (the endpoint is passing at once).
        pytest.param({"beacon.check.http": "health"}, None, "beacon.check.http", "absolute path", id="relative-path"),
        pytest.param({"beacon.check.http": "/a b"}, None, "beacon.check.http", "absolute path", id="space-in-path"),
        pytest.param({"beacon.check.http": ""}, None, "beacon.check.http", "absolute path", id="empty-path"),
        pytest.param({"beacon.check.tcp": "maybe"}, None, "beacon.check.tcp", "true or false", id="tcp-not-bool"),
        # An invalid setting: the check keeps its default for it.
        pytest.param({"beacon.check.http": "/health", "beacon.check.interval": "fast"},
                     HTTP_DEFAULT, "beacon.check.interval", "duration", id="interval-word"),
        pytest.param({"beacon.check.http": "/health", "beacon.check.interval": "5ms"},
                     HTTP_DEFAULT, "beacon.check.interval", "between 100ms and 86400s", id="interval-too-short"),
        pytest.param({"beacon.check.http": "/health", "beacon.check.timeout": "-1s"},
                     HTTP_DEFAULT, "beacon.check.timeout", "duration", id="timeout-negative"),
        pytest.param({"beacon.check.http": "/health", "beacon.check.timeout": "10m"},
                     HTTP_DEFAULT, "beacon.check.timeout", "between", id="timeout-too-long"),
        pytest.param({"beacon.check.http": "/health", "beacon.check.rise": "0"},
                     HTTP_DEFAULT, "beacon.check.rise", "integer between 1 and 100", id="rise-zero"),
        pytest.param({"beacon.check.http": "/health", "beacon.check.fall": "2.5"},
                     HTTP_DEFAULT, "beacon.check.fall", "integer", id="fall-float"),
        pytest.param({"beacon.check.http": "/health", "beacon.check.fall": "1000"},
                     HTTP_DEFAULT, "beacon.check.fall", "integer", id="fall-huge"),
        pytest.param({"beacon.check.http": "/health", "beacon.check.http.method": "FETCH"},
                     HTTP_DEFAULT, "beacon.check.http.method", "GET", id="method-unknown"),
        pytest.param({"beacon.check.http": "/health", "beacon.check.http.status": "ok"},
                     HTTP_DEFAULT, "beacon.check.http.status", "200-399", id="status-word"),
        pytest.param({"beacon.check.http": "/health", "beacon.check.http.status": "399-200"},
                     HTTP_DEFAULT, "beacon.check.http.status", "min <= max", id="status-reversed"),
        pytest.param({"beacon.check.http": "/health", "beacon.check.http.status": "600"},
                     HTTP_DEFAULT, "beacon.check.http.status", "100-599", id="status-out-of-range"),
        pytest.param({"beacon.check.http": "/health", "beacon.check.tcp": "true"},
                     HTTP_DEFAULT, "beacon.check.tcp", "conflicts", id="http-and-tcp"),
        pytest.param({"beacon.check.tcp": "true", "beacon.check.http.status": "200"},
                     TCP_DEFAULT, "beacon.check.http.status", "only applies", id="http-setting-on-tcp"),
        pytest.param({"beacon.check.interval": "1s"}, None, "beacon.check.interval", "needs", id="setting-without-kind"),
        pytest.param({"beacon.check.http": "/health", "beacon.check.htpp.status": "200"},
                     HTTP_DEFAULT, "beacon.check.htpp.status", "unknown check label", id="typo"),
    ],
)
def test_invalid_check_label_is_named_and_ignored(
    labels: dict[str, str], check: CheckSpec | None, bad_label: str, words: str
) -> None:
    got, _autoheal, problems = parse_check_labels(labels)
    assert got == check
    assert len(problems) == 1, problems
    assert problems[0].startswith(bad_label + ":")
    assert words in problems[0]
    assert problems[0].endswith("ignored")


def test_every_bad_label_is_reported_at_once() -> None:
    labels = {
        "beacon.check.http": "/h",
        "beacon.check.interval": "x",
        "beacon.check.rise": "-1",
        "beacon.autoheal": "true",
        "beacon.autoheal.after": "zero",
    }
    check, autoheal, problems = parse_check_labels(labels)
    assert check == CheckSpec(kind="http", path="/h", rise=2, fall=3)
    assert autoheal == AutohealSpec()
    assert sorted(p.split(":")[0] for p in problems) == [
        "beacon.autoheal.after", "beacon.check.interval", "beacon.check.rise",
    ]


@pytest.mark.parametrize(
    ("labels", "autoheal", "problem"),
    [
        pytest.param({"beacon.autoheal": "true"}, AutohealSpec(after=3, max_restarts=3, window=600.0, backoff=10.0),
                     None, id="defaults"),
        pytest.param({"beacon.autoheal": "false", "beacon.autoheal.after": "2"}, None, None, id="explicitly-off"),
        pytest.param(
            {"beacon.autoheal": "on", "beacon.autoheal.after": "2", "beacon.autoheal.max_restarts": "5",
             "beacon.autoheal.window": "1h", "beacon.autoheal.backoff": "0"},
            AutohealSpec(after=2, max_restarts=5, window=3600.0, backoff=0.0), None, id="all-settings",
        ),
        pytest.param({"beacon.autoheal": "sometimes"}, None, "beacon.autoheal: expected true or false", id="not-bool"),
        pytest.param({"beacon.autoheal.after": "2"}, None, "beacon.autoheal.after: needs beacon.autoheal=true",
                     id="setting-without-switch"),
        pytest.param({"beacon.autoheal": "true", "beacon.autoheal.window": "0s"}, AutohealSpec(),
                     "beacon.autoheal.window: must be between 1s", id="window-zero"),
        pytest.param({"beacon.autoheal": "true", "beacon.autoheal.max_restarts": "0"}, AutohealSpec(),
                     "beacon.autoheal.max_restarts: expected an integer", id="max-zero"),
        pytest.param({"beacon.autoheal": "true", "beacon.autoheal.retries": "3"}, AutohealSpec(),
                     "beacon.autoheal.retries: unknown autoheal label", id="unknown"),
    ],
)
def test_autoheal_labels(labels: dict[str, str], autoheal: AutohealSpec | None, problem: str | None) -> None:
    check, got, problems = parse_check_labels(labels)
    assert check is None
    assert got == autoheal
    if problem is None:
        assert problems == []
    else:
        assert len(problems) == 1 and problems[0].startswith(problem), problems


@pytest.mark.parametrize(
    "labels",
    [
        {"beacon.check.http": "\x00/"},
        {"beacon.check.http": "/" + "a" * 5000},
        {"beacon.check.interval": "9" * 400 + "s", "beacon.check.tcp": "1"},
        {"beacon.check.rise": "\u0661", "beacon.check.tcp": "1"},  # a non-ASCII digit
        {"beacon.autoheal": "true", "beacon.autoheal.window": "nan"},
        {"beacon.check.": "", "beacon.autoheal.": ""},
    ],
)
def test_hostile_values_never_raise(labels: dict[str, str]) -> None:
    _check, _autoheal, problems = parse_check_labels(labels)
    assert problems  # each is reported


# ------------------------------------------------------------- API JSON
@pytest.mark.parametrize(
    ("obj", "check"),
    [
        ({"http": "/health"}, HTTP_DEFAULT),
        ({"tcp": True}, TCP_DEFAULT),
        ({"tcp": "true", "interval": 1, "timeout": 0.5, "rise": 1, "fall": 1},
         CheckSpec(kind="tcp", interval=1.0, timeout=0.5, rise=1, fall=1)),
        ({"http": "/h", "method": "POST", "status": 204, "interval": "250ms"},
         CheckSpec(kind="http", path="/h", method="POST", status_min=204, status_max=204, interval=0.25,
                   rise=2, fall=3)),
    ],
)
def test_check_from_json(obj: dict[str, Any], check: CheckSpec) -> None:
    assert check_spec_from_json(obj) == check


@pytest.mark.parametrize(
    ("obj", "field"),
    [
        ("/health", "check"),
        ([], "check"),
        ({}, "check"),
        ({"tcp": False}, "check"),
        ({"http": 5}, "check.http"),
        ({"http": "health"}, "check.http"),
        ({"http": "/h", "interval": True}, "check.interval"),
        ({"http": "/h", "interval": "soon"}, "check.interval"),
        ({"http": "/h", "interval": -1}, "check.interval"),
        ({"http": "/h", "interval": 10**400}, "check.interval"),  # float() overflows
        ({"tcp": True, "timeout": -(10**400)}, "check.timeout"),
        ({"http": "/h", "interval": float("inf")}, "check.interval"),
        ({"http": "/h", "rise": 1.5}, "check.rise"),
        ({"http": "/h", "fall": "0"}, "check.fall"),
        ({"http": "/h", "status": "abc"}, "check.status"),
        ({"http": "/h", "tcp": True}, "check.tcp"),
        ({"tcp": True, "method": "GET"}, "check.method"),
        ({"http": "/h", "ttl": "10s"}, "check.ttl"),
        ({"interval": "1s"}, "check.interval"),
    ],
)
def test_bad_check_json_names_the_field(obj: object, field: str) -> None:
    with pytest.raises(CheckSpecError) as info:
        check_spec_from_json(obj)
    assert info.value.field == field
    assert str(info.value).startswith(field + ":")


def test_truncate_output() -> None:
    assert truncate_output("short") == "short"
    long = "x" * (OUTPUT_LIMIT * 3)
    cut = truncate_output(long)
    assert len(cut) == OUTPUT_LIMIT
    assert cut.endswith("(truncated)")
