"""Pure parsing of health-check and autoheal settings: container labels and API JSON.

Two front doors share one set of value parsers:

- `parse_check_labels(labels)` for containers (`beacon.check.*`, `beacon.autoheal*`).
  It never raises: an invalid label is reported by name in `problems` and
  ignored, so a typo costs the user a warning, never the registration.
- `check_spec_from_json(obj)` for manual endpoints registered through the API.
  It raises `CheckSpecError` naming the offending field, so the API can answer
  422 and change nothing.

Defaults (and why):
- interval 5 s, timeout 2 s: fast enough that a dead backend leaves rotation
  within ~15 s, cheap enough for thousands of endpoints.
- rise 2, fall 3 (HAProxy's defaults): one lost probe on a busy host does not
  pull a backend out of DNS and the proxy, and one lucky probe does not put a
  failing one back. Readiness is the exception: an endpoint that has never
  passed becomes passing on its first pass, so a new container gets traffic
  one interval after it is ready, not two.
- HTTP status 200-399 is passing (redirects are not followed), 429 is warning
  (as in Consul), anything else critical.
- autoheal: restart after 3 consecutive failures, at most 3 restarts per 10 min,
  at least 10 s between restarts, doubling with each restart in the window.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from beacon.grammar import parse_bool, parse_duration
from beacon.registry.model import AutohealSpec, CheckSpec

CHECK_PREFIX = "beacon.check."
AUTOHEAL_LABEL = "beacon.autoheal"

DEFAULT_INTERVAL = 5.0
DEFAULT_TIMEOUT = 2.0
DEFAULT_RISE = 2
DEFAULT_FALL = 3
DEFAULT_STATUS = (200, 399)
OUTPUT_LIMIT = 4096  # characters of check output kept (Consul's cap)

HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

# Bounds keep a typo ("5ms" for "5s", "1000" rise) from hurting the host or the check.
_INTERVAL_RANGE = (0.1, 86400.0)
_TIMEOUT_RANGE = (0.05, 300.0)
_COUNT_RANGE = (1, 100)
_WINDOW_RANGE = (1.0, 7 * 86400.0)
_BACKOFF_RANGE = (0.0, 86400.0)

_PATH = re.compile(r"/[\x21-\x7e]*")  # absolute path (+ query), visible ASCII, no spaces


class CheckSpecError(ValueError):
    """An invalid check setting; `field` names it (e.g. "check.interval")."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


# ------------------------------------------------------------- value parsers
# Each takes a label string or a JSON value and returns the typed value, or
# raises ValueError with a message meant for the user.


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value.strip()


def _duration(lo: float, hi: float) -> Callable[[object], float]:
    def parse(value: object) -> float:
        if isinstance(value, bool):
            raise ValueError(f"expected a duration like 5s or 500ms, got {value!r}")
        try:
            seconds = float(value) if isinstance(value, int | float) else parse_duration(_text(value))
        except OverflowError:  # a JSON integer beyond any float: far out of range
            seconds = float("inf")
        if not lo <= seconds <= hi:
            raise ValueError(f"must be between {_fmt(lo)} and {_fmt(hi)}, got {_shown(value)}")
        return seconds

    return parse


def _shown(value: object, limit: int = 40) -> str:
    """repr() for a message, cut short: a JSON number may have hundreds of digits."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _count(value: object) -> int:
    lo, hi = _COUNT_RANGE
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"expected an integer between {lo} and {hi}, got {value!r}")
    text = str(value).strip()
    if not re.fullmatch(r"[0-9]{1,6}", text) or not lo <= int(text) <= hi:
        raise ValueError(f"expected an integer between {lo} and {hi}, got {value!r}")
    return int(text)


def _flag(value: object) -> bool:
    if isinstance(value, bool):
        return value
    return parse_bool(_text(value))


def _path(value: object) -> str:
    text = _text(value)
    if len(text) > 2048 or not _PATH.fullmatch(text):
        raise ValueError(f"expected an absolute path like /health, got {value!r}")
    return text


def _method(value: object) -> str:
    text = _text(value).upper()
    if text not in HTTP_METHODS:
        raise ValueError(f"expected one of {', '.join(sorted(HTTP_METHODS))}, got {value!r}")
    return text


def _status(value: object) -> tuple[int, int]:
    """'200', '200-299', '2xx' (or a JSON integer) -> inclusive (min, max)."""
    text = str(value).strip().lower() if isinstance(value, int | str) and not isinstance(value, bool) else ""
    m = re.fullmatch(r"([0-9]{3})(?: *- *([0-9]{3}))?|([1-5])xx", text)
    if m is None:
        raise ValueError(f"expected a status like 200, 200-399 or 2xx, got {value!r}")
    if m.group(3):
        lo = int(m.group(3)) * 100
        return lo, lo + 99
    lo = int(m.group(1))
    hi = int(m.group(2) or lo)
    if not 100 <= lo <= hi <= 599:
        raise ValueError(f"expected a range within 100-599 with min <= max, got {value!r}")
    return lo, hi


def _fmt(seconds: float) -> str:
    return f"{seconds * 1000:g}ms" if seconds < 1 else f"{seconds:g}s"


# -------------------------------------------------------------- the builders
@dataclass(frozen=True, slots=True)
class _Setting:
    key: str  # JSON key; label is beacon.check.<label_suffix>
    label_suffix: str
    parse: Callable[[object], Any]
    http_only: bool = False


_CHECK_SETTINGS = (
    _Setting("http", "http", _path),
    _Setting("tcp", "tcp", _flag),
    _Setting("method", "http.method", _method, http_only=True),
    _Setting("status", "http.status", _status, http_only=True),
    _Setting("interval", "interval", _duration(*_INTERVAL_RANGE)),
    _Setting("timeout", "timeout", _duration(*_TIMEOUT_RANGE)),
    _Setting("rise", "rise", _count),
    _Setting("fall", "fall", _count),
)
_BY_SUFFIX = {s.label_suffix: s for s in _CHECK_SETTINGS}
_BY_KEY = {s.key: s for s in _CHECK_SETTINGS}

_AUTOHEAL_SETTINGS: dict[str, Callable[[object], Any]] = {
    "after": _count,
    "max_restarts": _count,
    "window": _duration(*_WINDOW_RANGE),
    "backoff": _duration(*_BACKOFF_RANGE),
}


def _build_check(
    raw: Mapping[str, object], name: Callable[[str], str], problems: list[tuple[str, str]]
) -> CheckSpec | None:
    """Shared core: JSON-keyed raw values -> CheckSpec; problems get (name, message)."""
    values: dict[str, Any] = {}
    for key, value in raw.items():
        setting = _BY_KEY[key]
        try:
            values[key] = setting.parse(value)
        except ValueError as exc:
            problems.append((name(key), str(exc)))
    path: str | None = values.get("http")
    tcp = bool(values.get("tcp", False))
    if path is not None and tcp:
        problems.append((name("tcp"), f"conflicts with {name('http')}; the HTTP check is used"))
    kind: Literal["http", "tcp"] | None = "http" if path is not None else "tcp" if tcp else None
    if kind is None:
        if "http" in raw or "tcp" in raw:
            return None  # the kind label itself was bad or false: already explained
        for key in raw:
            if key not in ("http", "tcp") and key in values:
                problems.append((name(key), f"needs {name('http')} or {name('tcp')}=true"))
        return None
    if kind == "tcp":
        for key in raw:
            if _BY_KEY[key].http_only and key in values:
                problems.append((name(key), f"only applies to {name('http')}"))
    status = values.get("status", DEFAULT_STATUS)
    return CheckSpec(
        kind=kind,
        path=path or "/",
        method=values.get("method", "GET") if kind == "http" else "GET",
        status_min=status[0] if kind == "http" else DEFAULT_STATUS[0],
        status_max=status[1] if kind == "http" else DEFAULT_STATUS[1],
        interval=values.get("interval", DEFAULT_INTERVAL),
        timeout=values.get("timeout", DEFAULT_TIMEOUT),
        rise=values.get("rise", DEFAULT_RISE),
        fall=values.get("fall", DEFAULT_FALL),
    )


def parse_check_labels(
    labels: Mapping[str, str],
) -> tuple[CheckSpec | None, AutohealSpec | None, list[str]]:
    """Return (check, autoheal, problems). Each problem names the label and why
    it was ignored; an invalid check label is reported and ignored, never raised."""
    problems: list[tuple[str, str]] = []
    raw: dict[str, object] = {}
    for label in sorted(labels):
        if not label.startswith(CHECK_PREFIX):
            continue
        setting = _BY_SUFFIX.get(label[len(CHECK_PREFIX) :])
        if setting is None:
            known = ", ".join(CHECK_PREFIX + s for s in _BY_SUFFIX)
            problems.append((label, f"unknown check label (known: {known})"))
        else:
            raw[setting.key] = labels[label]
    suffix_of = {s.key: s.label_suffix for s in _CHECK_SETTINGS}
    check = _build_check(raw, lambda key: CHECK_PREFIX + suffix_of[key], problems)
    autoheal = _parse_autoheal(labels, problems)
    return check, autoheal, [f"{label}: {message}; ignored" for label, message in problems]


def _parse_autoheal(labels: Mapping[str, str], problems: list[tuple[str, str]]) -> AutohealSpec | None:
    enabled: bool | None = None
    if AUTOHEAL_LABEL in labels:
        try:
            enabled = _flag(labels[AUTOHEAL_LABEL])
        except ValueError as exc:
            problems.append((AUTOHEAL_LABEL, str(exc)))
    values: dict[str, Any] = {}
    for label in sorted(labels):
        if not label.startswith(AUTOHEAL_LABEL + "."):
            continue
        key = label[len(AUTOHEAL_LABEL) + 1 :]
        parse = _AUTOHEAL_SETTINGS.get(key)
        if parse is None:
            known = ", ".join(f"{AUTOHEAL_LABEL}.{k}" for k in _AUTOHEAL_SETTINGS)
            problems.append((label, f"unknown autoheal label (known: {known})"))
            continue
        try:
            values[key] = parse(labels[label])
        except ValueError as exc:
            problems.append((label, str(exc)))
            continue
        if enabled is None:
            # An explicit beacon.autoheal=false is a choice; a missing one is likely a slip.
            problems.append((label, f"needs {AUTOHEAL_LABEL}=true"))
    return AutohealSpec(**values) if enabled else None


def check_spec_from_json(obj: object, field: str = "check") -> CheckSpec:
    """Build a CheckSpec from an API body's check object.

    Accepted: {"http": "/health", "method": "GET", "status": "200-399",
    "interval": "5s", "timeout": "2s", "rise": 2, "fall": 3} or
    {"tcp": true, "interval": ..., "timeout": ..., "rise": ..., "fall": ...};
    durations may be strings ("500ms") or numbers of seconds. Raises
    CheckSpecError naming the first bad field (e.g. "check.interval").
    """
    if not isinstance(obj, Mapping):
        raise CheckSpecError(field, 'expected an object like {"http": "/health"} or {"tcp": true}')
    for key in obj:
        if key not in _BY_KEY:
            raise CheckSpecError(f"{field}.{key}", f"unknown field (known: {', '.join(_BY_KEY)})")
    problems: list[tuple[str, str]] = []
    check = _build_check(dict(obj), lambda key: f"{field}.{key}", problems)
    if problems:
        raise CheckSpecError(*problems[0])
    if check is None:
        raise CheckSpecError(field, 'needs "http" (a path) or "tcp": true')
    return check


def truncate_output(text: str, limit: int = OUTPUT_LIMIT) -> str:
    """Cap check output at `limit` characters, marking the cut."""
    if len(text) <= limit:
        return text
    marker = " …(truncated)"
    return text[: limit - len(marker)] + marker
