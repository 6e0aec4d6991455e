"""Logging what clients cause, without letting them write the log.

Everything from outside (names, addresses) goes through `escape` before it
reaches a log line, so a name with a newline or an escape sequence cannot
forge a line. Warnings a client can trigger at will go through a `Throttle`:
the first one of a kind is logged, the rest of that kind are counted and
summed up in the next line logged after the interval.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

MAX_LOGGED = 120  # characters of one outside value in a log line


def escape(value: object, limit: int = MAX_LOGGED) -> str:
    """Printable ASCII only (repr-style escapes for the rest), cut at `limit`."""
    text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
    out = text.encode("ascii", "backslashreplace").decode("ascii")
    out = "".join(c if " " <= c <= "~" else f"\\x{ord(c):02x}" for c in out)
    return out if len(out) <= limit else out[:limit] + f"...({len(out)} chars)"


class Throttle:
    """At most one log line per `key` every `interval` seconds."""

    MAX_KEYS = 1024  # keys are few and fixed in practice; bounded anyway

    def __init__(
        self, logger: logging.Logger, interval: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._log = logger
        self._interval = interval
        self._clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def log(self, level: int, key: str, msg: str, *args: object, exc_info: bool = False) -> bool:
        """Log `msg % args` unless `key` was logged less than `interval` ago. True when logged."""
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return False
        if len(self._last) >= self.MAX_KEYS and key not in self._last:
            self._last.clear()
            self._suppressed.clear()
        self._last[key] = now
        skipped = self._suppressed.pop(key, 0)
        if skipped:
            msg += " (%d more like it in the last %ds)"
            args = (*args, skipped, int(now - last)) if last is not None else (*args, skipped, 0)
        self._log.log(level, msg, *args, exc_info=exc_info)
        return True
