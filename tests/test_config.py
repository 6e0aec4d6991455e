"""The frozen Config: flags > BEACON_* environment > defaults, and clear errors."""

from __future__ import annotations

import dataclasses
import ipaddress

import pytest

from beacon.cli import build_parser
from beacon.config import (
    OPTIONS,
    Config,
    ConfigError,
    HostPort,
    build_config,
    parse_duration,
    parse_hostport,
)


def test_defaults_match_the_contract() -> None:
    cfg = build_config({}, {})
    assert cfg.api_listen == HostPort("127.0.0.1", 8700)
    assert cfg.dns_listen == (HostPort("127.0.0.1", 8600),)
    assert cfg.proxy_listen == HostPort("127.0.0.1", 8080)
    assert (cfg.dns_domain, cfg.proxy_domain, cfg.lb) == ("beacon.", "localhost.", "round_robin")
    assert cfg.dns_recursors is None  # None: read /etc/resolv.conf at start


def test_every_option_default_equals_the_config_default() -> None:
    defaults = {f.name: f.default for f in dataclasses.fields(Config)}
    for opt in OPTIONS:
        assert defaults[opt.name] == opt.default, opt.name
        assert opt.env == "BEACON_" + opt.name.upper()


def test_flag_beats_environment_beats_default() -> None:
    env = {"BEACON_API_LISTEN": "127.0.0.2:9000", "BEACON_DNS_TTL": "3"}
    cfg = build_config({"api_listen": "127.0.0.3:0"}, env)
    assert cfg.api_listen == HostPort("127.0.0.3", 0)
    assert cfg.dns_ttl == 3


def test_repeated_options_from_flags_and_comma_separated_env() -> None:
    cfg = build_config({"dns_listen": ["127.0.0.1:0", "[::1]:5353"]}, {"BEACON_DNS_ALLOW": "10.0.0.0/8, 172.17.0.0/16"})
    assert cfg.dns_listen == (HostPort("127.0.0.1", 0), HostPort("::1", 5353))
    assert cfg.dns_allow == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("172.17.0.0/16"))
    assert str(cfg.dns_listen[1]) == "[::1]:5353"


@pytest.mark.parametrize(
    ("recursors", "expected"),
    [("none", ()), ("1.1.1.1", (HostPort("1.1.1.1", 53),)), ("127.0.0.1:5300,::1", (HostPort("127.0.0.1", 5300), HostPort("::1", 53)))],
)
def test_dns_recursors(recursors: str, expected: tuple[HostPort, ...]) -> None:
    assert build_config({}, {"BEACON_DNS_RECURSORS": recursors}).dns_recursors == expected


def test_docker_host_falls_back_to_dockers_own_variable() -> None:
    assert build_config({}, {"DOCKER_HOST": "tcp://127.0.0.1:2375"}).docker_host == "tcp://127.0.0.1:2375"
    assert build_config({"docker_host": "unix:///x.sock"}, {"DOCKER_HOST": "tcp://h:1"}).docker_host == "unix:///x.sock"


@pytest.mark.parametrize(
    ("flags", "env", "message"),
    [
        ({"api_listen": "localhost"}, {}, "--api-listen: expected HOST:PORT"),
        ({}, {"BEACON_PROXY_LISTEN": "127.0.0.1:70000"}, "BEACON_PROXY_LISTEN: port out of range"),
        ({"lb": "fastest"}, {}, "--lb: expected one of round_robin, least_conn, random"),
        ({"resync_interval": "soon"}, {}, "--resync-interval: expected a duration"),
        ({"proxy_workers": "0"}, {}, "--proxy-workers: expected a positive integer"),
        ({"dns_domain": "bad_domain!"}, {}, "--dns-domain: not a valid DNS domain"),
        ({"network": "backend"}, {}, "--network only applies with --address-mode internal"),
        ({"advertise_ip": "0.0.0.0"}, {}, "--advertise-ip must be a routable address"),
        ({"advertise_ip": "not-an-ip"}, {}, "--advertise-ip"),
        ({"eject_max_percent": "2"}, {}, "--eject-max-percent: expected a fraction"),
        ({"eject_base_time": "0"}, {}, "--eject-base-time: expected a duration above zero"),
        ({"proxy_connect_timeout": "0s"}, {}, "--proxy-connect-timeout: expected a duration above zero"),
        ({}, {"BEACON_DNS_RECURSOR_TIMEOUT": "0"}, "BEACON_DNS_RECURSOR_TIMEOUT: expected a duration above zero"),
        ({"proxy_idle_timeout": "9" * 400}, {}, "--proxy-idle-timeout: duration .* is longer than a year"),
        ({"dns_ttl": "5000000000"}, {}, "--dns-ttl: TTL must be at most 2147483647"),
        ({"dns_negative_ttl": "-1"}, {}, "--dns-negative-ttl: expected an integer >= 0"),
    ],
)
def test_bad_values_name_the_option(flags: dict[str, str], env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        build_config(flags, env)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["run"], (False, False)),
        (["run", "--explicit", "--dns-only-passing"], (True, True)),
        (["run", "--explicit", "false", "--dns-only-passing=yes"], (False, True)),
    ],
)
def test_boolean_flags_work_bare_or_with_a_value(argv: list[str], expected: tuple[bool, bool]) -> None:
    cfg = build_config(vars(build_parser().parse_args(argv)), {})
    assert (cfg.explicit, cfg.dns_only_passing) == expected


@pytest.mark.parametrize(
    ("argv", "env", "isolated"),
    [
        (["run"], {}, True),  # the data path stays out of the control process by default
        (["run", "--proxy-isolated", "false"], {}, False),
        (["run", "--proxy-isolated"], {}, True),
        (["run"], {"BEACON_PROXY_ISOLATED": "auto"}, True),
        (["run", "--proxy-tls-listen", "127.0.0.1:0"], {}, False),  # TLS terminates in the control process
        (["run", "--proxy-tls-listen", "127.0.0.1:0", "--proxy-isolated", "auto"], {}, False),
    ],
)
def test_proxy_isolation_is_on_unless_tls_needs_the_control_process(argv: list[str], env: dict[str, str], isolated: bool) -> None:
    assert build_config(vars(build_parser().parse_args(argv)), env).proxy_isolated is isolated


def test_explicit_isolation_with_a_tls_listener_is_refused_naming_both() -> None:
    with pytest.raises(ConfigError, match="--proxy-tls-listen terminates TLS in the control process: use --proxy-isolated false"):
        build_config({"proxy_tls_listen": "127.0.0.1:0", "proxy_isolated": "true"}, {})


def test_config_is_frozen() -> None:
    cfg = build_config({}, {})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.dns_ttl = 5  # type: ignore[misc]


@pytest.mark.parametrize(("text", "seconds"), [("30s", 30.0), ("250ms", 0.25), ("5m", 300.0), ("1h", 3600.0), ("2", 2.0)])
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_parse_hostport_ipv6() -> None:
    assert parse_hostport("[::1]:0") == HostPort("::1", 0)
