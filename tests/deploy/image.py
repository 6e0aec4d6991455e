"""Beacon's image for the deploy tests, built once per session by deploy/build-image.sh
(exactly as a user builds it offline) - and started early, in the background.

A cold build (empty wheelhouse, no Docker cache) takes one to two minutes, nearly
all of it waiting on `pip` and the legacy builder's one container per step. The
tests that need the image run last in the session (`tests/deploy/conftest.py`
moves them there), and the build starts when the UI tests start (`tests/ui/
conftest.py`), so it overlaps browser work rather than the latency-measuring
DNS/proxy/isolation tests that run before them. A session without UI tests
starts it at the first test that needs the image.

The tag is per checkout: several worktrees on one Docker engine each build and
remove their own image, never another's mid-test.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
from pathlib import Path

from tests.conftest import ROOT

IMAGE = f"beacon-test/beacon:{hashlib.sha256(str(ROOT).encode()).hexdigest()[:12]}"
BUILD_TIMEOUT = 240.0


class ImageBuild:
    """One run of deploy/build-image.sh in a thread; `result()` waits for it."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self._thread: threading.Thread | None = None
        self._result: subprocess.CompletedProcess[str] | BaseException | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="beacon-image-build", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        env = dict(os.environ)
        pip = Path(sys.executable).with_name("pip")
        if pip.exists():
            env["PIP"] = str(pip)
        try:
            self._result = subprocess.run(
                ["bash", str(ROOT / "deploy/build-image.sh"), self.tag],
                env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT,
            )  # fmt: skip
        except BaseException as exc:  # a timeout, a missing bash: reported by result()
            self._result = exc

    def result(self) -> str:
        """The tag, once built; an AssertionError with the build's stderr if it failed."""
        self.start()
        assert self._thread is not None
        self._thread.join(BUILD_TIMEOUT + 10)
        result = self._result
        if isinstance(result, BaseException):
            raise AssertionError(f"building {self.tag} failed: {result!r}")
        assert result is not None, f"building {self.tag} did not finish within {BUILD_TIMEOUT}s"
        assert result.returncode == 0, result.stderr
        return self.tag


BUILD = ImageBuild(IMAGE)
