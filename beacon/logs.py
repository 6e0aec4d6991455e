"""Logging set-up shared by the main process and the proxy's worker processes.

Below the CLI on purpose: `proxy/worker.py` configures its process's logging
the same way without importing the command line.

`--log-format json` writes one JSON object a line - time (UTC, ISO 8601),
level, logger, message (the verb-first message as is), and exception (the
traceback) when there is one - for log shippers that would otherwise have to
parse the text format.
"""

from __future__ import annotations

import json
import logging
import sys
import time

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_FORMATS = ("text", "json")


class JsonFormatter(logging.Formatter):
    """One log record as one line of JSON (control characters escaped by json)."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = {
            "time": f"{stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=True)


def setup_logging(level: str, fmt: str = "text") -> None:
    """Log to stderr at `level`, as text (FORMAT) or JSON lines (`fmt` "json")."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {fmt!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(FORMAT))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])


__all__ = ["FORMAT", "LOG_FORMATS", "JsonFormatter", "setup_logging"]
