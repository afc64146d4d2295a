"""End-to-end test of the browser client (`server/static`): headless Chromium, driven by Playwright, talks to
`personaplex serve` (the real app on the tiny checkpoint) with a fake microphone.

Needs Debian's Chromium (`apt-get install -y chromium`) and `pip install playwright` (no `playwright install`:
the system browser is used). Skipped when either is missing.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import shutil
import struct
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import sphn

from conftest import speech_like

STATIC_DIR = Path(__file__).resolve().parents[1] / "src" / "personaplex" / "server" / "static"
SCREENSHOT = os.environ.get("PERSONAPLEX_WEB_SCREENSHOT")  # where to keep the screenshots (default: a tmp dir)
SERVER_PROMPT = "You are Kim, the persona this server was started with."


def _chromium() -> str | None:
    for candidate in (os.environ.get("PERSONAPLEX_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


CHROMIUM = _chromium()
if CHROMIUM is None:
    pytest.skip("no Chromium binary (/usr/bin/chromium): install it with `apt-get install -y chromium` to run the "
                "browser end-to-end test", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed "
                               "(`pip install playwright`; the system Chromium is used, no `playwright install`)")

from aiohttp import web  # noqa: E402


# ------------------------------------------------------------------------------------------------ Ogg checks
def _ogg_crc(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) if crc & 0x80000000 else crc << 1
            crc &= 0xFFFFFFFF
    return crc


def _ogg_pages(data: bytes) -> list[dict]:
    """Split an Ogg stream into pages (raises AssertionError on a malformed page or a bad CRC)."""
    pages, pos = [], 0
    while pos < len(data):
        assert data[pos:pos + 4] == b"OggS", f"no Ogg capture pattern at byte {pos}"
        flags, granule, serial, seq, crc, nseg = struct.unpack_from("<xBqIIIB", data, pos + 4)
        lacing = data[pos + 27:pos + 27 + nseg]
        size = 27 + nseg + sum(lacing)
        raw = bytearray(data[pos:pos + size])
        raw[22:26] = b"\0\0\0\0"
        assert _ogg_crc(bytes(raw)) == crc, f"bad CRC on Ogg page {seq}"
        body, packets, start, off = data[pos + 27 + nseg:pos + size], [], 0, 0
        for n in lacing:
            off += n
            if n < 255:
                packets.append(body[start:off])
                start = off
        pages.append({"flags": flags, "granule": granule, "serial": serial, "seq": seq, "packets": packets})
        pos += size
    return pages


def _opus_samples_48k(packet: bytes) -> int:
    toc = packet[0]
    config = toc >> 3
    if config < 12:
        frame = (480, 960, 1920, 2880)[config & 3]
    elif config < 16:
        frame = (480, 960)[config & 1]
    else:
        frame = (120, 240, 480, 960)[config & 3]
    count = {0: 1, 1: 2, 2: 2}.get(toc & 3) or packet[1] & 0x3F
    return frame * count


# ------------------------------------------------------------------------------------------------ servers
class ServerThread:
    """Runs an aiohttp application on 127.0.0.1 (a free port) in a thread with its own event loop."""

    def __init__(self, make_app) -> None:
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(make_app,), daemon=True)
        self.thread.start()
        if not self.ready.wait(120):
            raise TimeoutError("the test server did not start within 120 s")
        if self.error is not None:
            raise self.error

    def _run(self, make_app) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.runner = web.AppRunner(make_app(), access_log=None, handle_signals=False)
            self.loop.run_until_complete(self.runner.setup())
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            self.loop.run_until_complete(site.start())
            self.port = site._server.sockets[0].getsockname()[1]
        except BaseException as error:  # reported to the constructor
            self.error = error
            self.ready.set()
            return
        self.ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self.runner.cleanup())
        self.loop.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)


def fake_app(received: list) -> web.Application:
    """A stand-in for `personaplex serve` (used only when the real server cannot be imported): serves the
    client, lists two voices, and on /api/chat sends a handshake, then echoes the caller's audio back frame by
    frame (re-encoded with sphn, one Ogg page per message) with a text piece every few frames."""
    async def index(request):
        return web.FileResponse(STATIC_DIR / "index.html")

    async def static(request):
        path = (STATIC_DIR / request.match_info["name"]).resolve()
        if not path.is_relative_to(STATIC_DIR) or not path.is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(path)

    async def voices(request):
        return web.json_response({"voices": ["NATF0", "NATM1"], "default": "NATM1"})

    async def info(request):
        return web.json_response({"demo": True, "max_conversations": 1, "sample_rate": 24000, "frame_rate": 12.5,
                                  "sampling_defaults": {"text_temperature": 0.7, "text_topk": 25,
                                                        "audio_temperature": 0.8, "audio_topk": 250}})

    async def chat(request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_bytes(b"\x04" + b'{"queue_position":0}')
        await asyncio.sleep(0.3)  # "the persona prompt"
        await ws.send_bytes(b"\x00")
        reader, writer = sphn.OpusStreamReader(24000), sphn.OpusStreamWriter(24000)
        pending, frames = np.zeros(0, np.float32), 0
        async for msg in ws:
            if msg.type != web.WSMsgType.BINARY or not msg.data or msg.data[0] != 1:
                continue
            pcm = reader.append_bytes(msg.data[1:])
            if pcm is None or not pcm.size:
                continue
            received.append(pcm)
            pending = np.concatenate([pending, pcm])
            while pending.size >= 1920:
                frame, pending = pending[:1920], pending[1920:]
                for page in _split_pages(writer.append_pcm(frame)):
                    await ws.send_bytes(b"\x01" + page)
                frames += 1
                if frames % 3 == 0:
                    await ws.send_bytes(b"\x02" + (" hello" if frames % 2 else " world").encode())
        return ws

    app = web.Application()
    app.router.add_get("/", index)
    app.router.add_get("/static/{name}", static)
    app.router.add_get("/api/voices", voices)
    app.router.add_get("/api/info", info)
    app.router.add_get("/api/chat", chat)
    return app


def _split_pages(data: bytes) -> list[bytes]:
    pages, pos = [], 0
    while pos < len(data):
        nseg = data[pos + 26]
        size = 27 + nseg + sum(data[pos + 27:pos + 27 + nseg])
        pages.append(data[pos:pos + size])
        pos += size
    return pages


def _real_server_factory(request):
    """`personaplex serve`'s app on the tiny checkpoint, or None if the server package is not there yet."""
    try:
        from personaplex.server import ServerSettings, build_server, create_app
    except ImportError:
        return None
    checkpoint = request.getfixturevalue("checkpoint")

    def make():
        settings = ServerSettings(max_conversations=2, demo=True, heartbeat_seconds=None,
                                  default_text_prompt=SERVER_PROMPT)
        return create_app(build_server(checkpoint, settings))

    return make


@pytest.fixture(scope="module")
def server(request):
    """The real `personaplex serve` app on the tiny checkpoint (the fake one only if the server package is
    missing, or when PERSONAPLEX_WEB_FAKE_SERVER is set)."""
    received: list = []
    make = None if os.environ.get("PERSONAPLEX_WEB_FAKE_SERVER") else _real_server_factory(request)
    kind = "real"
    if make is None:
        kind, make = "fake", lambda: fake_app(received)
    thread = ServerThread(make)
    thread.kind, thread.received = kind, received
    yield thread
    thread.stop()


@pytest.fixture(scope="module")
def echo_server():
    """The fake server: it plays the caller's own audio back, so the round trip can be measured."""
    received: list = []
    thread = ServerThread(lambda: fake_app(received))
    thread.kind, thread.received = "fake", received
    yield thread
    thread.stop()


@pytest.fixture(scope="module")
def mic_wav(tmp_path_factory) -> Path:
    """What the fake microphone plays (Chromium loops it): a voiced, speech-like signal."""
    path = tmp_path_factory.mktemp("fake-mic") / "mic.wav"
    sf.write(path, speech_like(3.0, seed=3, rate=48000), 48000, subtype="PCM_16")
    return path


@pytest.fixture(scope="module")
def browser(mic_wav):
    args = ["--no-sandbox", "--headless", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={mic_wav}", "--autoplay-policy=no-user-gesture-required",
            "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--no-first-run"]
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=args, headless=True)
        yield b
        b.close()


class Client:
    """A page of the web client plus what went over its websocket and what its console said."""

    def __init__(self, browser, server) -> None:
        self.server = server
        self.context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
        self.page = page = self.context.new_page()
        self.console: list[str] = []
        self.sent: list[bytes] = []
        self.received: list[bytes] = []
        page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda e: self.console.append(f"pageerror: {e}"))
        page.on("websocket", self._on_socket)
        page.goto(server.url)
        page.wait_for_function("document.documentElement.dataset.ready === 'true'", timeout=20_000)

    def _on_socket(self, ws) -> None:
        ws.on("framesent", lambda data: self.sent.append(data) if isinstance(data, bytes) else None)
        ws.on("framereceived", lambda data: self.received.append(data) if isinstance(data, bytes) else None)

    def stats(self) -> dict:
        return self.page.evaluate("window.personaplex.stats()")

    def wav(self) -> bytes:
        return base64.b64decode(self.page.evaluate("""async () => {
            const bytes = new Uint8Array(await window.personaplex.buildWav().arrayBuffer());
            let s = '';
            for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
            return btoa(s);
        }"""))

    def diagnose(self) -> None:
        page = self.page
        print("server:", self.server.kind, "| status:", page.inner_text("#status"), "| error:",
              page.inner_text("#error"), "| support:", page.inner_text("#support-banner"))
        print("stats:", page.evaluate("window.personaplex && window.personaplex.stats()"))
        print("messages received:", [m[:1] for m in self.received[:10]], len(self.received), "sent:", len(self.sent))
        print("console:", *self.console[-30:], sep="\n  ")

    def close(self) -> list[str]:
        errors = [c for c in self.console if c.startswith(("error", "pageerror"))]
        self.context.close()
        return errors


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if x.size else 0.0


# ------------------------------------------------------------------------------------------------ the tests
def test_web_client_end_to_end(server, browser, tmp_path):
    """Page -> voices and defaults -> connect -> handshake -> mic audio out, agent audio and text in -> stats ->
    disconnect -> the stereo WAV download, against `personaplex serve` on the tiny checkpoint."""
    t_start = time.monotonic()
    screenshot = Path(SCREENSHOT) if SCREENSHOT else tmp_path / "web_client.png"
    client = Client(browser, server)
    page = client.page
    try:
        # -- the page: voices, defaults, demo banner, WebCodecs support
        voices = page.eval_on_selector_all("#voice option", "os => os.map(o => o.value)")
        with urllib.request.urlopen(server.url + "api/voices") as r:
            expected = json.load(r)
        assert voices == expected["voices"] and voices, (voices, expected)
        assert page.is_visible("#demo-banner"), "the demo banner is hidden although /api/info says demo"
        assert page.input_value("#text_topk") == "25" and page.input_value("#audio_topk") == "250"
        assert page.evaluate("window.personaplex.codec") is not None, (
            "WebCodecs Opus is not available: " + page.inner_text("#support-banner"))
        assert page.is_hidden("#support-banner"), page.inner_text("#support-banner")
        if server.kind == "real":  # the page shows the server's default prompt (serve --default-text-prompt)
            assert page.input_value("#prompt") == SERVER_PROMPT
            assert page.get_attribute("#presets button:has-text('Server default')", "aria-pressed") == "true"
        page.click("#presets button:has-text('Customer service')")
        assert "SwiftPlex" in page.input_value("#prompt")
        page.click("#presets button:has-text('Teacher')")  # short: the tiny model's context holds 400 frames
        assert page.get_attribute("#presets button:has-text('Teacher')", "aria-pressed") == "true"
        # byte-fallback pieces ("<0xC3><0xA9>") are decoded as UTF-8, control characters dropped
        assert page.evaluate("window.personaplex.decodePiece(' caf<0xC3><0xA9><0x00>!')") == " café!"
        page.click(".advanced summary")
        page.fill("#seed", "1234")

        # -- connect: handshake, then audio both ways and text
        page.click("#connect")
        page.wait_for_function("window.personaplex.state === 'live'", timeout=30_000)
        assert page.is_disabled("#prompt") and page.inner_text("#connect").strip() == "Disconnect"
        page.wait_for_function(
            "(() => { const s = window.personaplex.stats();"
            " return s && s.framesDecoded >= 30 && s.framesEncoded >= 100 && s.playedMs > 1500; })()",
            timeout=25_000)
        if server.kind == "fake":
            page.wait_for_function("window.personaplex.transcript().length > 0", timeout=10_000)
        stats = client.stats()
        print(f"\n[{server.kind} server] codec:", page.evaluate("window.personaplex.codec"), "\nclient stats:", stats)
        assert stats["state"] == "live" and stats["decodeErrors"] == 0 and stats["oggCrcErrors"] == 0, stats
        assert stats["firstAudioMs"] is not None and stats["receivedMs"] > 0, stats
        assert stats["contextRate"] == 24000 and stats["latencyMs"] > 0, stats
        text_pieces = sum(1 for m in client.received if m[:1] == b"\x02")
        assert abs(stats["textPieces"] - text_pieces) <= 3, (stats["textPieces"], text_pieces)  # in flight
        if text_pieces:  # random weights: words are likely, not certain
            assert page.evaluate("window.personaplex.transcript()").strip(), "text arrived, transcript is empty"
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(screenshot), full_page=True)

        # -- disconnect
        page.click("#connect")
        page.wait_for_function("window.personaplex.state === 'idle'", timeout=10_000)
        assert page.inner_text("#connect").strip() == "Connect" and page.is_enabled("#prompt")
        assert page.is_hidden("#error"), page.inner_text("#error")
        page.wait_for_function("!window.personaplex.socketOpen()", timeout=5_000)

        # -- what went over the wire: a valid Ogg Opus stream carrying the (non-silent) microphone
        kinds = [m[:1] for m in client.received]
        assert b"\x00" in kinds and b"\x01" in kinds[kinds.index(b"\x00"):], kinds[:10]
        audio_out = [m[1:] for m in client.sent if m[:1] == b"\x01"]
        assert len(audio_out) >= 100
        pages = _ogg_pages(b"".join(audio_out))
        assert pages[0]["flags"] & 0x02 and pages[0]["packets"][0][:8] == b"OpusHead"
        head = pages[0]["packets"][0]
        assert head[9] == 1 and struct.unpack_from("<I", head, 12)[0] == 24000
        assert pages[1]["packets"][0][:8] == b"OpusTags"
        assert [p["seq"] for p in pages] == list(range(len(pages)))
        assert len({p["serial"] for p in pages}) == 1
        total = 0
        for p in pages[2:]:
            total += sum(_opus_samples_48k(pk) for pk in p["packets"])
            assert p["granule"] == total, "granule positions must count 48 kHz samples"
            assert all(_opus_samples_48k(pk) == 960 for pk in p["packets"]), "20 ms frames expected"
        pcm = sphn.OpusStreamReader(24000).append_bytes(b"".join(audio_out))
        assert pcm.size >= 2 * 24000, pcm.size
        assert _rms(pcm[4800:]) > 0.01, "the microphone audio sent is silent"
        if server.kind == "fake":
            got = np.concatenate(server.received)
            assert got.size >= 24000 and _rms(got) > 0.01

        # -- the download: a stereo 16-bit WAV at 24 kHz, agent left, user right
        wav = client.wav()
        assert wav[:4] == b"RIFF" and wav[8:16] == b"WAVEfmt " and wav[36:40] == b"data"
        assert struct.unpack_from("<I", wav, 4)[0] == len(wav) - 8
        assert struct.unpack_from("<HHIIHH", wav, 20) == (1, 2, 24000, 96000, 4, 16)
        assert struct.unpack_from("<I", wav, 40)[0] == len(wav) - 44
        data, sr = sf.read(io.BytesIO(wav), dtype="float32")
        assert sr == 24000 and data.ndim == 2 and data.shape[1] == 2 and data.shape[0] >= 2 * 24000
        assert _rms(data[:, 1]) > 0.01, "the user channel is silent"
        assert float(np.abs(data[:, 0]).max()) > 0.001, "the agent channel is silent"
        with page.expect_download() as download:
            page.click("#download")
        assert download.value.suggested_filename.endswith(".wav")

        # -- a server-side refusal (an unknown voice) arrives as 0x05 and is shown; the page recovers
        page.evaluate("(() => { const v = document.getElementById('voice');"
                      " v.append(new Option('NO_SUCH_VOICE', 'NO_SUCH_VOICE')); v.value = 'NO_SUCH_VOICE'; })()")
        page.click("#connect")
        page.wait_for_function("window.personaplex.state === 'error'", timeout=20_000)
        assert page.is_visible("#error") and page.inner_text("#error").startswith("Server error:")
        assert "NO_SUCH_VOICE" in page.inner_text("#error") or "voice" in page.inner_text("#error").lower()
        assert page.is_enabled("#connect") and page.inner_text("#connect").strip() == "Connect"
        page.screenshot(path=str(screenshot.with_name(screenshot.stem + "-error.png")))
        client.console = [c for c in client.console if "NO_SUCH_VOICE" not in c]
    except BaseException:
        client.diagnose()
        raise
    finally:
        errors = client.close()
    assert not errors, errors
    assert time.monotonic() - t_start < 60


def test_web_client_audio_round_trip(echo_server, browser):
    """Against a server that plays the caller back: the agent channel of the download is the user channel,
    delayed by the round trip, so capture, Opus both ways, the Ogg framing, resampling and the player are
    faithful and the two channels stay aligned."""
    client = Client(browser, echo_server)
    page = client.page
    try:
        page.click("#connect")
        page.wait_for_function("window.personaplex.state === 'live'", timeout=20_000)
        page.wait_for_function("window.personaplex.stats().playedMs > 3000", timeout=20_000)
        stats = client.stats()
        page.click("#connect")
        page.wait_for_function("window.personaplex.state === 'idle'", timeout=10_000)
        data, sr = sf.read(io.BytesIO(client.wav()), dtype="float32")
        agent, user = data[:, 0].astype(np.float64), data[:, 1].astype(np.float64)
        start = int(0.5 * sr)  # past the pre-buffering
        seg = user[start:start + 2 * sr]
        best, lag = 0.0, None
        for d in range(0, int(0.8 * sr), 24):  # coarse search (1 ms), then refine
            a = agent[start + d:start + d + seg.size]
            if a.size < seg.size:
                break
            c = float(np.dot(a, seg) / (np.linalg.norm(a) * np.linalg.norm(seg) + 1e-12))
            if c > best:
                best, lag = c, d
        for d in range(max(0, lag - 24), lag + 25):
            a = agent[start + d:start + d + seg.size]
            if a.size == seg.size:
                c = float(np.dot(a, seg) / (np.linalg.norm(a) * np.linalg.norm(seg) + 1e-12))
                if c > best:
                    best, lag = c, d
        print(f"\n[echo] correlation {best:.3f} at {1000 * lag / sr:.1f} ms; client stats: {stats}")
        assert best > 0.6, f"the echoed audio does not match the microphone (correlation {best:.3f})"
        assert 0.08 <= lag / sr <= 0.6, f"implausible round trip {lag / sr:.3f} s"
        assert stats["droppedMs"] == 0 and stats["decodeErrors"] == 0, stats
    except BaseException:
        client.diagnose()
        raise
    finally:
        errors = client.close()
    assert not errors, errors
