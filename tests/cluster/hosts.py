"""A real second Docker host on this machine, and Beacon agents as subprocesses.

`SecondEngine` starts `dockerd` with its own config file (`{}`: the main
engine's daemon.json pins its data root and storage driver), data root, exec
root, pidfile, socket, the vfs storage driver, no iptables, and a bridge it
creates first on an unused private /24 (NEVER `--bridge none`: dockerd then
deletes the host's docker0). Ports published on 127.0.0.2 are reachable from
the host through docker-proxy. The suite's busybox image is loaded into it with
`docker save | docker load`. Everything is undone after: containers, dockerd,
the nsfs mount under the exec root, the directories, the bridge.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import docker

from tests.cluster.etcdtest import free_port


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), check=check, capture_output=True, text=True)


def unused_subnet() -> int:
    """The third octet of a 10.213.X.0/24 that no route on this machine covers."""
    routes = _run("ip", "route").stdout
    for x in range(10, 250):
        if f"10.213.{x}." not in routes:
            return x
    raise RuntimeError("no free 10.213.X.0/24 found")


class SecondEngine:
    def __init__(self, run_id: str) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="bcd-", dir="/tmp"))
        self.bridge = f"bcn{run_id[:8]}"
        self.socket = self.root / "d.sock"
        self.exec_root = self.root / "x"
        self.proc: subprocess.Popen[bytes] | None = None
        self.client: docker.DockerClient | None = None

    @property
    def host(self) -> str:
        return f"unix://{self.socket}"

    def start(self, image: str) -> None:
        x = unused_subnet()
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        _run("ip", "addr", "add", f"10.213.{x}.1/24", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")
        config = self.root / "daemon.json"
        config.write_text("{}")
        log = open(self.root / "dockerd.log", "ab")
        self.proc = subprocess.Popen(
            [
                "dockerd", "--config-file", str(config), "--data-root", str(self.root / "data"),
                "--exec-root", str(self.exec_root), "--pidfile", str(self.root / "d.pid"),
                "-H", self.host, "--storage-driver", "vfs", "--iptables=false", "--ip6tables=false",
                "--bridge", self.bridge,
            ],
            stdout=log, stderr=log,
        )
        log.close()
        deadline = time.monotonic() + 40
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"second dockerd exited: {self.log_tail()}")
            if self.socket.exists():
                client = docker.DockerClient(base_url=self.host, timeout=60)
                try:
                    client.ping()
                    self.client = client
                    break
                except Exception:
                    client.close()
            if time.monotonic() > deadline:
                raise RuntimeError(f"second dockerd not up within 40s: {self.log_tail()}")
            time.sleep(0.2)
        save = subprocess.Popen(["docker", "save", image], stdout=subprocess.PIPE)
        load = subprocess.run(["docker", "--host", self.host, "load"], stdin=save.stdout, capture_output=True)
        save.wait()
        assert save.stdout is not None
        save.stdout.close()
        if load.returncode != 0 or save.returncode != 0:
            raise RuntimeError(f"loading {image} into the second engine failed: {load.stderr!r}")

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return (self.root / "dockerd.log").read_text(errors="replace")[-2000:]
        return ""

    def stop(self) -> None:
        if self.client is not None:
            for c in self.client.containers.list(all=True):  # every container here is ours
                with contextlib.suppress(Exception):
                    c.remove(force=True)
            self.client.close()
            self.client = None
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        netns = self.exec_root / "netns" / "default"
        if netns.exists():
            _run("umount", str(netns), check=False)
        _run("ip", "link", "del", self.bridge, check=False)
        shutil.rmtree(self.root, ignore_errors=True)


class Agent:
    """One `python -m beacon run` subprocess with its own node name and listeners."""

    def __init__(self, node: str, *, store: str, prefix: str, docker_host: str, advertise_ip: str,
                 lease_ttl: str = "2s", extra: tuple[str, ...] = ()) -> None:
        self.node = node
        self.store = store
        self.prefix = prefix
        self.docker_host = docker_host
        self.advertise_ip = advertise_ip
        self.lease_ttl = lease_ttl
        self.extra = extra
        self.api_port = free_port()
        self.dns_port = free_port()
        self.proxy_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = Path(tempfile.mkstemp(prefix=f"beacon-agent-{node}-", suffix=".log")[1])

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def args(self) -> list[str]:
        return [
            sys.executable, "-m", "beacon", "run", "--node", self.node, "--store", self.store,
            "--store-prefix", self.prefix, "--lease-ttl", self.lease_ttl, "--docker-host", self.docker_host,
            "--advertise-ip", self.advertise_ip, "--explicit",
            "--api-listen", f"127.0.0.1:{self.api_port}", "--dns-listen", f"127.0.0.1:{self.dns_port}",
            "--proxy-listen", f"127.0.0.1:{self.proxy_port}", "--dns-recursors", "none",
            "--resync-interval", "30s", "--shutdown-timeout", "3s", "--proxy-connect-timeout", "1s",
            *self.extra,
        ]

    def start(self, *, wait: bool = True) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BEACON_")}
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.args(), stdout=log, stderr=log, env=env)
        log.close()
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"agent {self.node} exited: {self.log_tail()}")
            with contextlib.suppress(OSError, ValueError):
                with urllib.request.urlopen(f"{self.api}/healthz", timeout=1) as resp:
                    if json.loads(resp.read()).get("status") == "ok":
                        return
            time.sleep(0.05)
        raise RuntimeError(f"agent {self.node} not healthy within {timeout}s: {self.log_tail()}")

    def get(self, path: str) -> Any:
        try:
            with urllib.request.urlopen(f"{self.api}{path}", timeout=5) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return json.loads(exc.read())

    def endpoints(self) -> dict[str, dict[str, Any]]:
        return {e["id"]: e for e in self.get("/v1/endpoints")}

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-3000:]
        return ""

    def remove(self) -> None:
        self.kill(signal.SIGTERM)
        with contextlib.suppress(OSError):
            self.log_path.unlink()
