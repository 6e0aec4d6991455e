"""Beacon out of file descriptors must never pull a healthy endpoint (issue 10 §3).

The test really exhausts this process's file descriptors (soft RLIMIT_NOFILE
lowered, then /dev/null opened until EMFILE) while a TCP check runs against a
live listener: the probe fails with EMFILE, which says nothing about the
endpoint. Before the fix the endpoint turned critical ("Too many open files")
and left DNS and the proxy.
"""

from __future__ import annotations

import asyncio
import errno
import os
import resource
from collections.abc import Iterator
from contextlib import contextmanager

from beacon.registry import Catalog, CheckSpec, State
from tests.helpers import eventually
from tests.registry.test_checker import endpoint, metric, running_checker, status_of


@contextmanager
def no_free_fds() -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, in_use + 32), hard))
    held: list[int] = []
    try:
        while True:
            try:
                held.append(os.open(os.devnull, os.O_RDONLY))
            except OSError as exc:
                assert exc.errno == errno.EMFILE
                break
        yield
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def probes_run() -> float:
    return sum(metric("beacon_registry_checks_total", kind="tcp", result=r)
               for r in ("passing", "warning", "critical", "skipped"))


async def test_a_check_that_fails_for_lack_of_fds_keeps_the_endpoint_passing() -> None:
    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    tcp = CheckSpec(kind="tcp", interval=0.05, timeout=1.0, rise=1, fall=1)
    catalog = Catalog()
    try:
        async with running_checker(catalog):
            catalog.set_source("manual:db", [endpoint("db", port, tcp)])
            await eventually(lambda: (s := status_of(catalog, "db")) is not None and s.state is State.PASSING)
            skipped = metric("beacon_registry_checks_total", kind="tcp", result="skipped")
            passed = metric("beacon_registry_checks_total", kind="tcp", result="passing")
            ran = probes_run()
            with no_free_fds():
                # Several intervals' worth of probes, each failing with EMFILE.
                await eventually(lambda: probes_run() >= ran + 5)
                catalog.publish()
                ep = catalog.snapshot.endpoints["db"]
                assert ep.state is State.PASSING, ep.check_status
                assert metric("beacon_registry_checks_total", kind="tcp", result="skipped") >= skipped + 5
            # Descriptors back: the endpoint is probed (and passes) again.
            await eventually(lambda: metric("beacon_registry_checks_total", kind="tcp", result="passing") > passed)
            assert catalog.snapshot.endpoints["db"].state is State.PASSING
    finally:
        server.close()
        await server.wait_closed()
