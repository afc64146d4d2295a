"""Real HAProxy (Debian's package) with deploy/haproxy.cfg in front of two `personaplex serve --demo` servers on
loopback: calls spread over both until both are full, then a clear "busy" answer; a server killed mid-call
closes its caller's websocket and new calls go to the other; a draining server takes no new calls and its
call ends cleanly. Skips with a reason where `haproxy` is not installed (scripts/test.sh installs it).

The servers are subprocesses with one row each, on random free ports; the configuration is the shipped file
with only its addresses, ports and per-server row count changed for loopback (each change asserted).
"""

from __future__ import annotations

import asyncio
import csv
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import aiohttp
import pytest

ROOT = Path(__file__).resolve().parents[1]
HAPROXY = shutil.which("haproxy") or next((p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy")
                                           if os.access(p, os.X_OK)), None)
pytestmark = pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (scripts/test.sh installs it "
                                                        "with apt-get where it runs as root)")
BUSY = "all PersonaPlex servers are busy"
DRAIN_SECONDS = 3


class Process:
    """A subprocess whose output is collected by a thread (shown when a test fails)."""

    def __init__(self, args: list[str], env: dict | None = None) -> None:
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=env, start_new_session=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())

    def wait_line(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if match := re.search(pattern, line):
                    return match
            assert self.proc.poll() is None, "exited early:\n" + self.output()
            time.sleep(0.05)
        raise AssertionError(f"no line matching {pattern!r} within {timeout} s:\n" + self.output())

    def output(self) -> str:
        return "\n".join(self.lines[-40:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


def loopback_config(text: str, front: int, stats: int, servers: list[int], rows: int) -> str:
    """The shipped configuration, pointed at loopback ports (every substitution must match)."""
    def sub(pattern: str, replacement: str, count: int) -> None:
        nonlocal text
        text, n = re.subn(pattern, replacement, text, flags=re.M)
        assert n == count, f"deploy/haproxy.cfg changed: {pattern!r} matched {n} times, expected {count}"

    sub(r"^\s+(log /dev/log|chroot|user|group|daemon|stats socket)\b.*\n", "", 6)
    sub(r"^    bind :443 .*\n    bind :80\n", f"    bind 127.0.0.1:{front}\n", 1)
    sub(r"^    http-request redirect scheme https.*\n", "", 1)  # no TLS on loopback
    sub(r"^    bind 127\.0\.0\.1:8404$", f"    bind 127.0.0.1:{stats}", 1)
    sub(r"maxconn 64$", f"maxconn {rows}", 1)
    sub(r"^    maxconn 20000 .*$", "    maxconn 500", 1)  # HAProxy needs 2 descriptors per connection
    for i, port in enumerate(servers, start=1):
        sub(rf"^    server gpu{i} \S+$", f"    server gpu{i} 127.0.0.1:{port}", 2)
    return text


@pytest.fixture(scope="module")
def cluster(demo_dir, tmp_path_factory):
    """Two demo servers (one row each, no queue, drain 3 s) and HAProxy; yields (haproxy url, stats url, servers)."""
    from personaplex.demo import DEMO_VERSION

    tmp = tmp_path_factory.mktemp("haproxy")
    cache = tmp / "cache"
    cache.mkdir()
    (cache / f"demo-v{DEMO_VERSION}").symlink_to(demo_dir)  # `--demo` finds it built
    env = {**os.environ, "PERSONAPLEX_CACHE": str(cache), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "personaplex.cli", "serve", "--demo", "--port", "0", "--max-conversations",
               "1", "--queue", "0", "--max-connections-per-ip", "0", "--codec-workers", "0", "--idle-timeout", "0",
               "--drain-seconds", str(DRAIN_SECONDS)]
    servers = [Process(command, env) for _ in range(2)]
    processes = list(servers)
    try:
        ports = [int(s.wait_line(r"listening on http://127\.0\.0\.1:(\d+)", 180).group(1)) for s in servers]
        front, stats = free_port(), free_port()
        config = tmp / "haproxy.cfg"
        config.write_text(loopback_config((ROOT / "deploy" / "haproxy.cfg").read_text(), front, stats, ports, 1))
        check = subprocess.run([HAPROXY, "-c", "-f", str(config)], capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stdout + check.stderr
        proxy = Process([HAPROXY, "-db", "-f", str(config)])
        processes.append(proxy)
        wait_listening(proxy, stats, 10)
        for server, port in zip(servers, ports):
            server.port = port
        yield f"http://127.0.0.1:{front}", f"http://127.0.0.1:{stats}/stats;csv", servers
    finally:
        for process in processes:
            process.stop()


def wait_listening(process: Process, port: int, timeout: float) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert process.proc.poll() is None and time.monotonic() < deadline, process.output()
            time.sleep(0.05)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def states(http: aiohttp.ClientSession, stats: str) -> dict[str, str]:
    """{server name: UP/DOWN/...} of the `calls` backend, from HAProxy's stats page."""
    async with http.get(stats) as response:
        text = (await response.text()).lstrip("# ")
    return {row["svname"]: row["status"].split()[0] for row in csv.DictReader(io.StringIO(text))
            if row["pxname"] == "calls" and row["svname"] not in ("FRONTEND", "BACKEND")}


async def wait_states(http, stats: str, wanted: dict[str, str], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        now = await states(http, stats)
        if all(now.get(k, "").startswith(v) for k, v in wanted.items()):
            return
        assert time.monotonic() < deadline, f"HAProxy says {now}, expected {wanted}"
        await asyncio.sleep(0.1)


async def admitted(http, server) -> int:
    async with http.get(f"http://127.0.0.1:{server.port}/healthz") as response:
        return (await response.json())["admitted"]


async def call(http, base: str) -> aiohttp.ClientWebSocketResponse:
    ws = await http.ws_connect(base.replace("http", "ws", 1) + "/api/chat")
    msg = await ws.receive(timeout=30)
    assert msg.type == aiohttp.WSMsgType.BINARY and msg.data == b"\x00", msg
    return ws


async def refusal(http, base: str) -> str:
    """What a new call is told when it cannot get a row: HAProxy's 503 text, or the server's 0x05 message."""
    try:
        async with http.ws_connect(base.replace("http", "ws", 1) + "/api/chat") as ws:
            msg = await ws.receive(timeout=15)
            assert msg.type == aiohttp.WSMsgType.BINARY and msg.data[0] == 0x05, msg
            return msg.data[1:].decode()
    except aiohttp.WSServerHandshakeError as error:
        assert error.status == 503, error
    async with http.get(base + "/api/chat", headers={"Connection": "Upgrade", "Upgrade": "websocket",
                                                     "Sec-WebSocket-Version": "13",
                                                     "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}) as response:
        assert response.status == 503
        return await response.text()


async def ended(ws: aiohttp.ClientWebSocketResponse, timeout: float) -> list[str]:
    """Read until the websocket ends (bounded); returns the 0x05 messages seen."""
    errors, deadline = [], time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0, "the call was not closed in time"
        msg = await ws.receive(timeout=left)
        if msg.type != aiohttp.WSMsgType.BINARY:
            assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING,
                                aiohttp.WSMsgType.ERROR), msg
            return errors
        if msg.data[:1] == b"\x05":
            errors.append(msg.data[1:].decode())


def test_two_servers_behind_haproxy(cluster):
    base, stats, servers = cluster
    names = ["gpu1", "gpu2"]  # HAProxy's names for servers[0], servers[1]

    async def main():
        async with aiohttp.ClientSession() as http:
            await wait_states(http, stats, {"gpu1": "UP", "gpu2": "UP"}, timeout=20)
            # calls spread over both servers until both are full, then a clear answer
            first_call = await call(http, base)
            holding = [await admitted(http, s) for s in servers]
            assert sorted(holding) == [0, 1], holding
            second_call = await call(http, base)
            assert [await admitted(http, s) for s in servers] == [1, 1]
            await wait_states(http, stats, {"gpu1": "DOWN", "gpu2": "DOWN"})  # each /healthz says "full"
            assert BUSY in await refusal(http, base)
            # the server of the first call dies: that call's websocket ends, the other goes on
            victim = holding.index(1)
            survivor = 1 - victim
            servers[victim].proc.send_signal(signal.SIGKILL)
            servers[victim].proc.wait(timeout=10)
            await ended(first_call, 5)
            assert not second_call.closed
            await second_call.close()  # a row frees up on the survivor: new calls go there
            await wait_states(http, stats, {names[victim]: "DOWN", names[survivor]: "UP"})
            fresh = await call(http, base)
            assert await admitted(http, servers[survivor]) == 1
            # the survivor is told to stop: it leaves the rotation and its call ends cleanly
            servers[survivor].proc.send_signal(signal.SIGTERM)
            servers[survivor].wait_line("draining", 10)
            await wait_states(http, stats, {names[survivor]: "DOWN"}, timeout=5)
            answer = await refusal(http, base)
            assert BUSY in answer or "draining" in answer, answer
            errors = await ended(fresh, DRAIN_SECONDS + 10)
            assert errors and "shutting down" in errors[-1], errors
            assert servers[survivor].proc.wait(timeout=15) == 0, servers[survivor].output()

    asyncio.run(main())
