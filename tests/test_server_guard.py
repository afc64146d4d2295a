"""The server against hostile and careless clients on loopback (server/guard.py): connection caps, header
timeout, Host/Origin checks, access token, queue timeout, banner, quiet logs; tiny checkpoint, CPU.

Every server here runs in the test's event loop behind a `GuardedSite`, as `personaplex serve` runs it. Loopback
has the whole 127.0.0.0/8, so "other clients" are sockets bound to 127.0.0.2, 127.0.0.3, ...
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest

from personaplex.engine import Personas
from personaplex.server import ServerSettings, build_server, make_runner
from personaplex.server.app import MAX_MESSAGE_BYTES, resolve_voice
from personaplex.server.guard import (SERVER_HEADER, GuardError, GuardSettings, GuardedSite, check_settings,
                                      fitting_max_connections, host_allowed, origin_allowed, raise_nofile_limit)

TOKEN = "s3cret-token-for-tests-0123456789"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def personas(checkpoint):
    return Personas(checkpoint.lm, checkpoint.mimi, checkpoint.tokenizer, checkpoint.files.voices_dir)


@contextlib.asynccontextmanager
async def guarded(checkpoint, personas, guard: GuardSettings | None = None, tls=None, **settings):
    settings.setdefault("default_text_prompt", "You are a casual friend.")
    settings.setdefault("codec_workers", 0)
    settings = ServerSettings(guard=guard or GuardSettings(), **settings)
    server = build_server(checkpoint, settings, personas=personas)
    runner = make_runner(server)
    await runner.setup()
    site = GuardedSite(runner, "127.0.0.1", 0, settings.guard, ssl_context=tls)
    server.connection_counter = site.counter  # as `personaplex serve` does, for /metrics
    await site.start()
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=False)) as http:
            yield server, site, f"{'https' if tls else 'http'}://127.0.0.1:{site.port}", http
    finally:
        await runner.cleanup()


async def healthz_seconds(base: str, http: aiohttp.ClientSession) -> float:
    started = time.perf_counter()
    async with http.get(base + "/healthz", timeout=aiohttp.ClientTimeout(total=5)) as response:
        assert response.status == 200, await response.text()
    return time.perf_counter() - started


async def open_idle(port: int, source: str, count: int) -> list[tuple]:
    """`count` sockets from `source` that never send a byte (half-open requests), opened 50 at a time."""
    sockets: list[tuple] = []
    for start in range(0, count, 50):
        batch = [asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
                 for _ in range(min(50, count - start))]
        sockets += await asyncio.wait_for(asyncio.gather(*batch), timeout=20)
    return sockets


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bytes:
    """What the server sent before closing; fails if it is still open after `seconds`."""
    return await asyncio.wait_for(reader.read(), timeout=seconds)


# -- rules ---------------------------------------------------------------------------------------------------
def test_host_and_origin_rules():
    loopback = GuardSettings(host="127.0.0.1")
    for host in (None, "127.0.0.1:8998", "localhost:8998", "LOCALHOST", "[::1]:8998", "app.localhost:1"):
        assert host_allowed(host, loopback), host
    for host in ("evil.example", "evil.example:8998", "10.0.0.5:8998", "127.0.0.1.nip.io", "", "a:b", "[::1"):
        assert not host_allowed(host, loopback), host
    named = GuardSettings(host="0.0.0.0", server_names=("talk.example.com",))
    for host in ("talk.example.com", "talk.example.com.:443", "10.1.2.3:8998", "[2001:db8::1]:8998", "localhost"):
        assert host_allowed(host, named), host
    assert not host_allowed("evil.example", named)
    assert not host_allowed("talk.example.com", GuardSettings(host="10.0.0.5"))
    assert host_allowed("10.0.0.5:8998", GuardSettings(host="10.0.0.5"))
    assert host_allowed("anything", GuardSettings(server_names=("*",)))

    same = GuardSettings()
    assert origin_allowed(None, "127.0.0.1:8998", same)
    assert origin_allowed("http://127.0.0.1:8998", "127.0.0.1:8998", same)
    assert origin_allowed("https://talk.example.com", "talk.example.com", same)  # behind a TLS proxy
    assert origin_allowed("http://talk.example.com", "talk.example.com:80", same)
    for origin in ("http://127.0.0.1:8999", "http://localhost:8998", "http://evil.example", "null", "file://",
                   "http://127.0.0.1:8998/page", "javascript:alert(1)"):
        assert not origin_allowed(origin, "127.0.0.1:8998", same), origin
    assert not origin_allowed("http://a.example", None, same)
    listed = GuardSettings(allow_origins=("https://app.example.com",))
    assert origin_allowed("https://app.example.com", "127.0.0.1:8998", listed)
    assert origin_allowed("https://APP.example.com:443", "127.0.0.1:8998", listed)
    assert not origin_allowed("https://app.example.com:8443", "127.0.0.1:8998", listed)
    assert origin_allowed("http://evil.example", "127.0.0.1", GuardSettings(allow_origins=("*",)))


def test_settings_checked_and_descriptors():
    for bad in (GuardSettings(auth_token="short"), GuardSettings(max_connections=-1),
                GuardSettings(header_timeout_seconds=0), GuardSettings(allow_origins=("example.com",))):
        with pytest.raises(GuardError):
            check_settings(bad)
    check_settings(GuardSettings(auth_token=TOKEN, allow_origins=("*", "https://a.example")))
    soft, hard = raise_nofile_limit()
    if soft >= 0:
        assert soft == hard or hard < 0 or soft == 1 << 20
    assert fitting_max_connections(5000, 1024) == 960
    assert fitting_max_connections(100, 1024) == 100
    assert fitting_max_connections(0, 1024) == 960
    assert fitting_max_connections(100, -1) == 100


def test_client_addresses_counted_per_ipv4_address_and_ipv6_network():
    from personaplex.server.guard import client_ip

    class Peer:
        def __init__(self, *peer):
            self.peer = peer

        def get_extra_info(self, name):
            return self.peer if name == "peername" else None

    assert client_ip(Peer("203.0.113.7", 5000)) == "203.0.113.7"
    assert client_ip(Peer("::ffff:203.0.113.7", 5000, 0, 0)) == "203.0.113.7"
    assert client_ip(Peer("2001:db8:1:2:aaaa::1", 5000, 0, 0)) == client_ip(Peer("2001:db8:1:2::ffff", 1, 0, 0)) \
        == "2001:db8:1:2::/64"
    assert client_ip(Peer("::1", 5000, 0, 0)) == "::1"


# -- connections -----------------------------------------------------------------------------------------------
def test_half_open_flood_is_capped_and_healthz_answers(checkpoint, personas):
    """1,000 sockets that never send a request: one address gets its 100, the rest are refused at once with a
    503 line; another client's /healthz still answers within 1 s; past the global cap everyone is refused."""
    soft, _ = raise_nofile_limit()
    if 0 <= soft < 1400:
        pytest.skip(f"the open-file limit ({soft}) is too low for 1,000 client sockets plus the server's")

    async def main():
        limits = GuardSettings(max_connections=300, max_connections_per_ip=100, header_timeout_seconds=30)
        async with guarded(checkpoint, personas, limits) as (server, site, base, http):
            flood = await open_idle(site.port, "127.0.0.2", 1000)
            await asyncio.sleep(0.2)
            assert site.counter.by_ip.get("127.0.0.2") == 100
            assert site.counter.refused["per_ip"] == 900
            seconds = await healthz_seconds(base, http)
            print(f"healthz after the flood: {seconds * 1000:.1f} ms")
            assert seconds < 1.0
            refused_text = await closed_within(flood[-1][0], 5)
            assert refused_text.startswith(b"HTTP/1.1 503") and b"too many connections from your address" in \
                refused_text and b"Server: " + SERVER_HEADER.encode() + b"\r\n" in refused_text
            more = [s for ip in range(3, 6) for s in await open_idle(site.port, f"127.0.0.{ip}", 70)]
            await asyncio.sleep(0.2)
            assert site.counter.total == 300 and site.counter.refused["total"] >= 10
            stranger = await asyncio.open_connection("127.0.0.1", site.port, local_addr=("127.0.0.9", 0))
            assert b"too many connections to this server" in await closed_within(stranger[0], 5)
            async with http.get(base + "/metrics") as response:
                metrics = await response.text()
            assert "personaplex_open_sockets 300\n" in metrics  # the cap (this request's keep-alive included)
            assert 'personaplex_sockets_refused_total{reason="per_ip"} 900' in metrics
            for _, writer in flood + more:
                writer.close()
            await asyncio.sleep(0.3)
            assert site.counter.total <= 1 and await healthz_seconds(base, http) < 1.0

    asyncio.run(main())


def test_slowloris_closed_after_the_header_timeout(checkpoint, personas):
    async def main():
        async with guarded(checkpoint, personas, GuardSettings(header_timeout_seconds=0.6)) as (_, site, base, http):
            silent = await asyncio.open_connection("127.0.0.1", site.port)
            trickle = await asyncio.open_connection("127.0.0.1", site.port)
            trickle[1].write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            started = time.perf_counter()

            async def drip():
                for i in range(30):  # a header line every 0.1 s, never the blank line
                    await asyncio.sleep(0.1)
                    if trickle[1].is_closing():
                        return
                    trickle[1].write(b"X-Drip-%d: x\r\n" % i)

            dripping = asyncio.create_task(drip())
            for reader, _ in (silent, trickle):
                with contextlib.suppress(ConnectionResetError):
                    await closed_within(reader, 3.0)
            elapsed = time.perf_counter() - started
            dripping.cancel()
            assert 0.4 < elapsed < 2.5, elapsed
            assert site.counter.refused["header_timeout"] == 2
            assert await healthz_seconds(base, http) < 1.0  # a whole request in time is served
            await asyncio.sleep(0.1)
            assert site.counter.total <= 1

    asyncio.run(main())


def test_tls_inside_the_guard(checkpoint, personas, tmp_path):
    """With TLS, a socket counts from accept, through its handshake: one that never handshakes is closed after
    the header timeout, one that fails its handshake is uncounted, and calls work over wss."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (needed to make a test certificate)")
    from personaplex.server.cli import ssl_context

    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=127.0.0.1", "-keyout", str(tmp_path / "key.pem"), "-out", str(tmp_path / "cert.pem")],
                   check=True, capture_output=True, timeout=60)
    tls = ssl_context(str(tmp_path / "cert.pem"), str(tmp_path / "key.pem"))

    async def main():
        limits = GuardSettings(header_timeout_seconds=0.8)
        async with guarded(checkpoint, personas, limits, tls=tls) as (_, site, base, http):
            assert base.startswith("https://") and await healthz_seconds(base, http) < 1.0
            async with http.ws_connect(base.replace("https", "wss", 1) + "/api/chat") as ws:
                assert (await ws.receive(timeout=30)).data == b"\x00"
            await asyncio.sleep(0.3)  # let the websocket's socket close
            baseline = site.counter.total
            silent = await asyncio.open_connection("127.0.0.1", site.port)
            garbage = await asyncio.open_connection("127.0.0.1", site.port)
            garbage[1].write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # not a TLS hello
            await asyncio.sleep(0.2)
            assert site.counter.total >= baseline + 1  # the silent one, still in its handshake, counts
            for reader, _ in (garbage, silent):
                with contextlib.suppress(ConnectionResetError):
                    await closed_within(reader, 3.0)
            await asyncio.sleep(0.1)
            assert site.counter.total <= baseline

    asyncio.run(main())


def test_deploy_files_agree_with_the_server():
    """The systemd unit's and the Deployment's flags parse, and their stop timeouts cover the drain."""
    yaml = pytest.importorskip("yaml")
    from personaplex.cli import build_parser

    unit = (ROOT / "deploy" / "personaplex.service").read_text()
    exec_start = re.search(r"^ExecStart=((?:.*\\\n)*.*)$", unit, re.M).group(1).replace("\\\n", " ")
    argv = shlex.split(exec_start)
    assert argv[0].endswith("/personaplex")
    args = build_parser().parse_args(argv[1:])
    assert float(re.search(r"^TimeoutStopSec=(\d+)$", unit, re.M).group(1)) > args.drain_seconds
    for line in ("DynamicUser=yes", "NoNewPrivileges=yes", "ProtectSystem=strict", "KillSignal=SIGTERM",
                 "Restart=on-failure"):
        assert f"\n{line}\n" in unit, line
    assert int(re.search(r"^LimitNOFILE=(\d+)$", unit, re.M).group(1)) > args.max_connections

    deployment, service = yaml.safe_load_all((ROOT / "deploy" / "k8s.yaml").read_text())
    assert (deployment["kind"], service["kind"]) == ("Deployment", "Service")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    args = build_parser().parse_args(container["args"])
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["failureThreshold"] == 1
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + args.drain_seconds
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]


# -- who may talk to it ----------------------------------------------------------------------------------------
def test_host_origin_and_token_checks(checkpoint, personas, demo_dir):
    async def main():
        limits = GuardSettings(auth_token=TOKEN, allow_origins=("https://app.example.com",))
        async with guarded(checkpoint, personas, limits) as (server, site, base, http):
            ws_base = base.replace("http", "ws", 1) + "/api/chat"
            bearer = {"Authorization": f"Bearer {TOKEN}"}

            async def status(url: str, headers: dict) -> int:
                try:
                    async with http.ws_connect(url, headers=headers) as ws:
                        msg = await ws.receive(timeout=30)
                        assert msg.type == aiohttp.WSMsgType.BINARY and msg.data == b"\x00", msg
                        return 101
                except aiohttp.WSServerHandshakeError as error:
                    return error.status

            assert await status(ws_base, {}) == 401
            assert await status(ws_base, {"Authorization": "Bearer wrong-token-wrong-token"}) == 403
            assert await status(ws_base + "?worker_auth_id=nope", {}) == 403
            assert await status(ws_base, bearer) == 101
            assert await status(ws_base + f"?worker_auth_id={TOKEN}", {}) == 101  # the released client's way
            assert await status(ws_base, {**bearer, "Origin": "https://evil.example"}) == 403
            assert await status(ws_base, {**bearer, "Origin": base}) == 101  # same origin
            assert await status(ws_base, {**bearer, "Origin": "https://app.example.com"}) == 101
            assert await status(ws_base, {**bearer, "Host": "evil.example"}) == 403  # DNS rebinding
            async with http.get(base + "/healthz", headers={"Host": "rebound.example:80"}) as response:
                assert response.status == 403 and "--server-name" in await response.text()
            async with http.get(base + "/healthz") as response:  # probes need no token
                assert response.status == 200 and response.headers["Server"] == SERVER_HEADER
            async with http.get(base + "/metrics") as response:
                assert response.status == 401 and response.headers["WWW-Authenticate"] == "Bearer"
            async with http.get(base + "/metrics", headers=bearer) as response:
                assert response.status == 200 and response.headers["Server"] == SERVER_HEADER
            async with http.get(base + "/no-such-file") as response:
                assert response.status == 404 and response.headers["Server"] == SERVER_HEADER
            async with http.get(base + "/api/info") as response:
                info = await response.json()
                text = json.dumps(info)
            assert str(demo_dir) not in text and str(Path(demo_dir).parent) not in text
            assert info["model"]["name"] == Path(demo_dir).name and "source" not in info["model"]
            # aiohttp's own answer to a malformed request carries no version either
            reader, writer = await asyncio.open_connection("127.0.0.1", site.port)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Header Line\r\n\r\n")
            head = (await closed_within(reader, 5)).split(b"\r\n\r\n")[0]
            assert head.split(b" ")[1] == b"400" and b"aiohttp" not in head.lower() and \
                b"python" not in head.lower(), head
            writer.close()

    asyncio.run(main())


def test_malformed_requests_logged_once_per_interval(checkpoint, personas, caplog):
    async def main():
        async with guarded(checkpoint, personas, GuardSettings(log_interval_seconds=30)) as (_, site, base, http):
            for i in range(20):
                reader, writer = await asyncio.open_connection("127.0.0.1", site.port)
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nno colon here %d\r\n\r\n" % i)
                await closed_within(reader, 5)
                writer.close()
            assert await healthz_seconds(base, http) < 1.0

    with caplog.at_level(logging.INFO):
        asyncio.run(main())
    lines = [r for r in caplog.records if "malformed HTTP request" in r.getMessage()]
    assert len(lines) == 1 and lines[0].exc_info is None, [r.getMessage() for r in lines]
    assert not [r for r in caplog.records if r.name == "aiohttp.server" or r.exc_info]


def test_queue_timeout_and_a_message_of_exactly_one_mib(checkpoint, personas):
    async def main():
        async with guarded(checkpoint, personas, max_conversations=1, queue=1,
                           queue_timeout_seconds=0.5) as (server, site, base, http):
            url = base.replace("http", "ws", 1) + "/api/chat"
            async with http.ws_connect(url) as first:
                assert (await first.receive(timeout=30)).data == b"\x00"
                await first.send_bytes(b"\x06" + b"x" * (MAX_MESSAGE_BYTES - 1))  # exactly 1 MiB: kept
                async with http.ws_connect(url) as queued:
                    started = time.perf_counter()
                    queued_meta = await queued.receive(timeout=10)
                    assert queued_meta.data[0] == 0x04 and json.loads(queued_meta.data[1:])["status"] == "queued"
                    error = await queued.receive(timeout=5)
                    assert error.data[0] == 0x05 and "no free row after 0.5 s in the queue" in error.data[1:].decode()
                    assert (await queued.receive(timeout=5)).type in (aiohttp.WSMsgType.CLOSE,
                                                                      aiohttp.WSMsgType.CLOSED)
                    assert 0.4 < time.perf_counter() - started < 3.0
                assert server.counters["rejected_queue_timeout"] == 1
                assert not first.closed
                await first.send_bytes(b"\x06" + b"x" * MAX_MESSAGE_BYTES)  # one byte more: refused by size
                for _ in range(200):  # agent audio may come first
                    closing = await first.receive(timeout=5)
                    if closing.type != aiohttp.WSMsgType.BINARY:
                        break
                assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), closing
                assert first.close_code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG

    asyncio.run(main())


# -- the released client -------------------------------------------------------------------------------------
def test_static_dir_served_instead_of_the_built_in_page(checkpoint, personas, tmp_path):
    dist = tmp_path / "dist"
    (dist / "assets").mkdir(parents=True)
    (dist / "index.html").write_text("<!doctype html><title>released client</title>")
    (dist / "assets" / "index-abc.js").write_text("console.log(1)")
    (tmp_path / "secret.txt").write_text("not for you")

    async def main():
        async with guarded(checkpoint, personas, static_dir=dist) as (_, site, base, http):
            async with http.get(base + "/") as response:
                assert "released client" in await response.text()
            async with http.get(base + "/assets/index-abc.js") as response:
                assert response.status == 200 and await response.text() == "console.log(1)"
            for path in ("/../secret.txt", "/assets/../../secret.txt", "/%2e%2e/secret.txt", "/app.js"):
                reader, writer = await asyncio.open_connection("127.0.0.1", site.port)
                writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
                answer = await closed_within(reader, 5)
                assert b"not for you" not in answer and answer.startswith(b"HTTP/1.1 404"), (path, answer[:80])
                writer.close()

    asyncio.run(main())


def test_demo_voices_under_the_released_names(checkpoint, tmp_path):
    from personaplex.demo import RELEASED_VOICE_ALIASES, _write_demo_voices
    from personaplex.hub import list_voices

    _write_demo_voices(tmp_path, aliases=True)
    names = list_voices(tmp_path)
    released = [f"NAT{g}{i}" for g in "FM" for i in range(4)] + [f"VAR{g}{i}" for g in "FM" for i in range(5)]
    assert set(released) | {"DEMO_HIGH", "DEMO_LOW"} == set(names) and len(RELEASED_VOICE_ALIASES) == 18
    assert (tmp_path / "NATF0.wav").read_bytes() == (tmp_path / "DEMO_HIGH.wav").read_bytes()
    assert (tmp_path / "VARM4.wav").read_bytes() == (tmp_path / "DEMO_LOW.wav").read_bytes()
    personas = Personas(checkpoint.lm, checkpoint.mimi, checkpoint.tokenizer, tmp_path)
    assert resolve_voice(personas, "NATF0.pt") == "NATF0"  # what the released client sends
    assert resolve_voice(personas, "VARM3.pt") == "VARM3"


def test_start_up_checks_and_warnings(capsys):
    """Bad guard flags fail in one line before any model loads; the exposure warning names what is missing
    (and never asks for TLS when TLS is on)."""
    from personaplex.cli import main
    from personaplex.server.cli import exposure_warning

    for argv, text in ((["--static", "/no/such/dir"], "no index.html there"),
                       (["--auth-token", "short"], "too short"),
                       (["--allow-origin", "example.com"], "is not an origin"),
                       (["--max-connections-per-ip", "-1"], "must be >= 0"),
                       (["--header-timeout", "0"], "positive number")):
        assert main(["serve", "--demo", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert text in err and len(err.splitlines()) == 1, err
    assert exposure_warning("127.0.0.1", tls=False, token=False) is None
    plain = exposure_warning("0.0.0.0", tls=False, token=False)
    assert "TLS" in plain and "access token" in plain
    tls_only = exposure_warning("0.0.0.0", tls=True, token=False)
    assert "TLS" not in tls_only and "access token" in tls_only
    assert "--ssl-cert" not in exposure_warning("10.0.0.5", tls=True, token=True)
