"""`python -m beacon.proxy.worker N`: one extra proxy process (see server.py).

Started by ProxyServer with `--proxy-workers` > 1, never by hand. It reads its
config and snapshots from stdin, listens on the parent's port with
SO_REUSEPORT, reports metrics on stdout, and drains and exits on a Q frame,
on SIGTERM, or when stdin closes (the parent is gone).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pickle
import signal
import sys

from beacon.config import Config
from beacon.grammar import HostPort
from beacon.logs import setup_logging
from beacon.proxy.server import LocalProxy
from beacon.proxy.wire import HEADER, SnapshotDecoder, frame

log = logging.getLogger("beacon.proxy")




async def _read_frame(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    kind, length = HEADER.unpack(await reader.readexactly(HEADER.size))
    return kind, await reader.readexactly(length)


async def run(number: int) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=2**31)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(0, "rb", buffering=0))
    out = os.fdopen(1, "wb", buffering=0)

    def send(kind: bytes, payload: bytes) -> None:
        out.write(frame(kind, payload))  # small frames on a pipe: a blocking write is fine

    kind, payload = await _read_frame(reader)
    assert kind == b"C", kind
    setup = pickle.loads(payload)
    config: Config = setup["config"]
    address: HostPort = setup["address"]
    setup_logging(config.log_level, config.log_format)
    kind, payload = await _read_frame(reader)
    assert kind == b"S", kind
    decoder = SnapshotDecoder()
    local = LocalProxy(config, stdout_fd=setup.get("stdout_fd", -1))
    bound = await local.start(address, True, decoder.decode(payload))
    log.info("listening: proxy worker %d on %s (pid %d)", number, bound, os.getpid())
    send(b"R", b"")

    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)

    async def report() -> None:
        while True:
            await asyncio.sleep(1.0)
            core = local.core
            if core is not None:
                send(b"M", json.dumps(core.report()).encode())

    async def feed() -> None:
        try:
            while True:
                kind, payload = await _read_frame(reader)
                if kind == b"S" and local.core is not None:
                    local.core.apply(decoder.decode(payload))
                elif kind == b"Q":
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the parent is gone
        stop.set()

    tasks = [loop.create_task(report()), loop.create_task(feed())]
    await stop.wait()
    await local.stop(max(0.1, config.shutdown_timeout * 0.9))
    for t in tasks:
        t.cancel()
    log.info("stopped: proxy worker %d", number)


def main() -> None:
    # Ctrl-C reaches the whole process group: the parent decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    number = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(run(number))


if __name__ == "__main__":
    main()
