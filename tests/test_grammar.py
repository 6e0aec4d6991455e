"""One grammar for values: the table every parser of flags, labels, checks and the API shares."""

from __future__ import annotations

import pytest

from beacon import grammar
from beacon.config import ConfigError, build_config
from beacon.grammar import HostPort
from beacon.registry.checkspec import check_spec_from_json
from beacon.registry.labels import LabelOptions, container_endpoints
from beacon.registry.manual import RegistrationError, parse_registration

DURATIONS: list[tuple[str, float | None]] = [
    ("30s", 30.0), ("500ms", 0.5), ("1.5s", 1.5), ("5m", 300.0), ("1h", 3600.0), ("7", 7.0),
    (" 2s ", 2.0), ("0", 0.0), ("250 ms", 0.25),
    ("", None), ("s", None), ("5x", None), ("-1s", None), ("1d", None), ("1e3", None),
    ("\u0663\u0660s", None),  # Arabic-Indic digits: float() would read 30
    ("9" * 400, None),  # longer than a year
]


@pytest.mark.parametrize(("text", "seconds"), DURATIONS)
def test_parse_duration(text: str, seconds: float | None) -> None:
    if seconds is None:
        with pytest.raises(ValueError, match="duration"):
            grammar.parse_duration(text)
    else:
        assert grammar.parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("30s", 30), ("2m", 120), ("1000ms", 1), ("5", 5), ("0", 0), ("500ms", "whole seconds"), ("1.5s", "whole seconds"),
     ("x", "duration")],
)
def test_parse_whole_seconds(text: str, expected: int | str) -> None:
    if isinstance(expected, str):
        with pytest.raises(ValueError, match=expected):
            grammar.parse_whole_seconds(text)
    else:
        assert grammar.parse_whole_seconds(text) == expected


@pytest.mark.parametrize(
    ("text", "value"),
    [("true", True), ("Yes", True), (" on ", True), ("1", True), ("false", False), ("NO", False), ("off", False),
     ("0", False), ("", None), ("maybe", None), ("2", None), ("truee", None)],
)
def test_parse_bool(text: str, value: bool | None) -> None:
    if value is None:
        with pytest.raises(ValueError, match="true or false"):
            grammar.parse_bool(text)
    else:
        assert grammar.parse_bool(text) is value


@pytest.mark.parametrize(
    ("text", "label", "name", "wildcard"),
    [
        ("web", True, True, True), ("a", True, True, True), ("9lives", True, True, True), ("a-b", True, True, True),
        ("x" * 63, True, True, True), ("x" * 64, False, False, False), ("-web", False, False, False),
        ("web-", False, False, False), ("We", False, False, False), ("a_b", False, False, False), ("", False, False, False),
        ("api.example.com", False, True, True), ("a..b", False, False, False), ("*.example.com", False, False, True),
        ("*.com", False, False, False), ("a.*.com", False, False, False),
        (".".join(["abcdefgh"] * 29), False, False, False),  # 260 characters
    ],
)
def test_dns_labels_and_names(text: str, label: bool, name: bool, wildcard: bool) -> None:
    assert grammar.is_dns_label(text) is label
    assert grammar.is_dns_name(text) is name
    assert grammar.is_dns_name(text, wildcard=True) is wildcard


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:8700", HostPort("127.0.0.1", 8700)), ("[::1]:53", HostPort("::1", 53)),
        ("localhost:0", HostPort("localhost", 0)), (" host:65535 ", HostPort("host", 65535)),
        ("host", None), ("host:", None), (":80", None), ("host:65536", None), ("::1:53", None),
        ("host:\u0663", None), ("host:123456", None),
    ],
)
def test_parse_hostport(text: str, expected: HostPort | None) -> None:
    if expected is None:
        with pytest.raises(ValueError, match=r"HOST:PORT|port out of range"):
            grammar.parse_hostport(text)
    else:
        assert grammar.parse_hostport(text) == expected
        assert str(expected) in (text.strip(), f"[{expected.host}]:{expected.port}")


# ---- every face parses a value the same way
def _label_problems(labels: dict[str, str]) -> tuple[str, ...]:
    attrs = {
        "Id": "ab" * 32, "Name": "/web",
        "Config": {"Image": "web", "Labels": labels, "ExposedPorts": {"80/tcp": {}}},
        "State": {"Running": True, "Status": "running"},
        "NetworkSettings": {"Ports": {"80/tcp": [{"HostIp": "0.0.0.0", "HostPort": "8080"}]}, "Networks": {}},
        "HostConfig": {"NetworkMode": "bridge"},
    }
    result = container_endpoints(attrs, LabelOptions(address_mode="host", host_ip="192.0.2.1", node="n"))
    assert result.endpoints
    return result.problems


def test_500ms_is_a_duration_for_every_face() -> None:
    assert check_spec_from_json({"tcp": True, "interval": "500ms"}).interval == 0.5
    assert build_config({"dns_recursor_timeout": "500ms"}, {}).dns_recursor_timeout == 0.5
    assert _label_problems({"beacon.check.tcp": "true", "beacon.check.interval": "500ms"}) == ()
    reg = parse_registration("db-1", {"service": "db", "address": "10.0.0.1", "port": 5432, "ttl": "500ms"}, node="n")
    assert reg.check is not None and reg.check.ttl == 0.5
    # A DNS TTL is a duration too, but it must come to whole seconds, and says so.
    (problem,) = _label_problems({"beacon.dns.ttl": "500ms"})
    assert "must be whole seconds" in problem
    assert _label_problems({"beacon.dns.ttl": "2m"}) == ()


def test_booleans_read_alike_in_flags_labels_and_checks() -> None:
    assert build_config({"explicit": "yes"}, {}).explicit is True
    assert check_spec_from_json({"tcp": "on"}).kind == "tcp"
    assert _label_problems({"beacon.http.path_prefix": "/a", "beacon.http.strip_prefix": "Yes"}) == ()
    with pytest.raises(ConfigError, match="true or false"):
        build_config({"explicit": "maybe"}, {})


def test_service_names_are_dns_labels_for_the_api_and_labels() -> None:
    with pytest.raises(RegistrationError, match="DNS label"):
        parse_registration("x", {"service": "a_b", "address": "10.0.0.1", "port": 1, "ttl": "5s"}, node="n")
    (problem,) = _label_problems({"beacon.http.host": "a_b.test"})
    assert "not a host name" in problem
