"""Where certificates, keys and the ACME account live: a small blob interface.

`CertStore` is all the TLS code needs from storage: read / write named blobs
and take a per-name issuance lock. `FileCertStore` keeps them in a directory
(`--acme-storage`), written atomically (temp file + fsync + rename) with keys
mode 0600, and locks with `flock` on a lock file per name - so two Beacon
processes sharing one directory never order the same name at once (the race
that made Traefik drop shared storage, traefik#8248).

An etcd-backed store (the `cluster` work in `beacon/registry/store/`) drops in
by implementing the same four methods: blobs as keys under a prefix, the lock
as an etcd lease-held key created with `create_revision == 0`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

# Blob names are ours (never from a client), but keep them to a safe alphabet:
# a host name is lowercase LDH plus dots, "_" stands for a wildcard's "*".
_NAME = re.compile(r"[a-z0-9_][a-z0-9_.-]{0,253}(/[a-z0-9_][a-z0-9_.-]{0,253})?")


class CertStore(Protocol):
    def read(self, name: str) -> bytes | None:
        """The blob called `name`, or None if there is none."""
        ...

    def write(self, name: str, data: bytes, secret: bool = False) -> None:
        """Replace the blob atomically; `secret` blobs (private keys) are readable by us only."""
        ...

    def names(self, prefix: str) -> list[str]:
        """Blob names starting with `prefix` (e.g. "certs/")."""
        ...

    def issuance_lock(self, host: str) -> contextlib.AbstractContextManager[bool]:
        """Hold the right to order `host`; yields False if another holder has it (do not order)."""
        ...


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name) or ".." in name:
        raise ValueError(f"bad storage name {name!r}")
    return name


class FileCertStore:
    """Blobs as files under one directory (created 0700)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def open(self) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        (self.root / "locks").mkdir(mode=0o700, exist_ok=True)

    def _path(self, name: str) -> Path:
        return self.root / check_name(name)

    def read(self, name: str) -> bytes | None:
        try:
            return self._path(name).read_bytes()
        except FileNotFoundError:
            return None

    def write(self, name: str, data: bytes, secret: bool = False) -> None:
        path = self._path(name)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        try:
            os.fchmod(fd, 0o600 if secret else 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a crash
        finally:
            os.close(dir_fd)

    def names(self, prefix: str) -> list[str]:
        base = self._path(prefix.rstrip("/")) if prefix.rstrip("/") else self.root
        if not base.is_dir():
            return []
        return sorted(f"{prefix.rstrip('/')}/{p.name}" for p in base.iterdir()
                      if p.is_file() and not p.name.startswith("."))  # fmt: skip

    @contextlib.contextmanager
    def issuance_lock(self, host: str) -> Iterator[bool]:
        path = self.root / "locks" / (check_name(host) + ".lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
