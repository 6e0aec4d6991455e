"""Logging set-up shared by the main process and the proxy's worker processes.

Below the CLI on purpose: `proxy/worker.py` configures its process's logging
the same way without importing the command line.
"""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), format=FORMAT, stream=sys.stderr)


__all__ = ["FORMAT", "setup_logging"]
