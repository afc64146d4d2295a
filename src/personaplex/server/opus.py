"""Opus decode and encode off the event loop: a few codec worker processes, each holding the codec state of
the connections assigned to it.

sphn's `OpusStreamReader.append_bytes` and `OpusStreamWriter.append_pcm` hold the GIL (measured: two threads
take as long as one thread doing both jobs, docs/serving.md "Audio codec"), so threads cannot spread them
over cores, and on the server's own process they would take the GIL from the event loop and the model thread.
`CodecPool(workers=N)` starts N processes (`python opus.py`, stdlib + numpy + sphn only, no torch); each
connection's reader and writer live in one of them for the whole call. The event loop talks to the workers
over their stdin/stdout with small binary frames through its own non-blocking pipe transports: no threads,
no GIL hand-offs, and neither the event loop nor the model thread ever waits for a codec:

- decode: the event loop queues a connection's checked Ogg pages (`ogg.OggFilter`) and goes on; the PCM
  comes back as a pipe event and goes to that connection's callback (the model's input buffer).
- encode: each agent frame is queued as soon as the model delivers it (`submit_encode`); the connection's
  send task awaits, in order, the futures the worker's replies resolve.

Every queue is bounded: per worker `QUEUE_BYTES` of requests not yet taken by the process, per connection
`MAX_PENDING_BYTES` of Ogg and `MAX_PENDING_SAMPLES` of audio waiting to be decoded; past that, audio is
dropped and counted (`dropped_decodes`, `dropped_encodes`), never queued. A worker that dies fails its
connections (they get an 0x05 error) and is replaced for later calls.

`workers=0` runs the codec inline on the calling thread (small tests and tools; no isolation).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import os
import select
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np

log = logging.getLogger("personaplex.server")

_FRAME = struct.Struct("<BII")  # operation, stream id, payload length
OP_CLOSE, OP_DECODE, OP_ENCODE = 2, 3, 4  # to a worker
OP_PCM, OP_PAGES, OP_ERROR, OP_READY = 11, 12, 13, 14  # from a worker
_DECODE_LIMIT = struct.Struct("<I")  # a decode request starts with the most samples it may produce
SAMPLE_RATE = 24_000
QUEUE_BYTES = 8 * 2**20  # requests waiting in the pipe buffer of one worker
MAX_PENDING_BYTES = 256 * 1024  # Ogg bytes of one connection queued for decoding
MAX_PENDING_SAMPLES = 2 * SAMPLE_RATE  # and the audio they carry: 2 s (a worker that falls further behind
# drops audio instead of adding its backlog to the caller's latency)
READY_TIMEOUT = 60.0  # seconds a new worker may take to import its codec


# -- the worker process ---------------------------------------------------------------------------------------
def _read_exactly(stream, n: int) -> bytes | None:
    data = stream.read(n)
    return data if data is not None and len(data) == n else None


class _Input:
    """Blocking reads of whole frames from a pipe, 64 KiB at a time. `before_wait` runs before each read that
    may block (the worker flushes its replies there: never while it could wait for more requests)."""

    def __init__(self, fd: int, before_wait) -> None:
        self.fd, self.buffer, self.before_wait = fd, bytearray(), before_wait

    def read(self, n: int) -> bytes | None:
        while len(self.buffer) < n:
            if not select.select([self.fd], [], [], 0)[0]:
                self.before_wait()
            chunk = os.read(self.fd, 1 << 16)
            if not chunk:
                return None
            self.buffer += chunk
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        return data


def worker_main() -> None:
    """A codec worker: frames in on stdin, frames out on stdout, until stdin closes. Replies are flushed
    whenever no request is waiting, so a burst (one tick's frames for every caller) costs few system calls."""
    import sphn

    stdout = sys.stdout.buffer
    stdin = _Input(sys.stdin.fileno(), stdout.flush)
    stdout.write(_FRAME.pack(OP_READY, 0, 0))  # imported: requests are answered from now on
    stdout.flush()
    readers: dict[int, object] = {}
    writers: dict[int, object] = {}

    def reply(op: int, stream: int, payload: bytes) -> None:
        stdout.write(_FRAME.pack(op, stream, len(payload)))
        stdout.write(payload)

    while True:
        header = _read_exactly(stdin, _FRAME.size)
        if header is None:
            return
        op, stream, length = _FRAME.unpack(header)
        payload = _read_exactly(stdin, length) if length else b""
        if payload is None:
            return
        if op == OP_CLOSE:
            readers.pop(stream, None)
            writers.pop(stream, None)
        elif op == OP_DECODE:
            (limit,) = _DECODE_LIMIT.unpack_from(payload)
            reader = readers.get(stream) or readers.setdefault(stream, sphn.OpusStreamReader(SAMPLE_RATE))
            try:
                pcm = np.asarray(reader.append_bytes(payload[_DECODE_LIMIT.size:]), dtype=np.float32)
            except Exception as error:  # libopus refused a packet: start this stream's decoder afresh
                readers.pop(stream, None)
                reply(OP_ERROR, stream, f"undecodable Opus audio ignored ({error})".encode())
                reply(OP_PCM, stream, b"")
            else:
                reply(OP_PCM, stream, pcm[:limit].tobytes())  # never more than the packets can carry
        elif op == OP_ENCODE:
            writer = writers.get(stream) or writers.setdefault(stream, sphn.OpusStreamWriter(SAMPLE_RATE))
            try:
                pages = writer.append_pcm(np.frombuffer(payload, dtype=np.float32))
            except Exception as error:
                writers.pop(stream, None)
                reply(OP_ERROR, stream, f"encoding failed ({error})".encode())
                reply(OP_PAGES, stream, b"")
            else:
                reply(OP_PAGES, stream, bytes(pages))


# -- the server side ------------------------------------------------------------------------------------------
class CodecStream:
    """One connection's codec: `decode(pages, max_samples)` (the PCM goes to `on_pcm`), `submit_encode(pcm)`
    -> a future of the Ogg pages, `close()`. Event loop only."""

    def __init__(self, pool: "CodecPool", worker: "_Worker | None", sid: int, on_pcm, on_error) -> None:
        self.pool, self.worker, self.id = pool, worker, sid
        self.on_pcm, self.on_error = on_pcm, on_error
        self.pending: collections.deque[tuple[int, int]] = collections.deque()  # (bytes, samples) in flight
        self.pending_bytes = self.pending_samples = 0
        self.encodes: collections.deque = collections.deque()  # futures, in request order
        self.closed = False
        self._reader = self._writer = None  # inline mode only

    def decode(self, pages: bytes, max_samples: int) -> bool:
        """Queue `pages` for decoding; False if dropped (the connection or its worker is too far behind)."""
        if self.closed or not pages:
            return False
        if self.worker is None:
            return self._decode_inline(pages, max_samples)
        if (self.pending_bytes + len(pages) > MAX_PENDING_BYTES
                or self.pending_samples + max_samples > MAX_PENDING_SAMPLES
                or not self.worker.put(OP_DECODE, self.id, _DECODE_LIMIT.pack(max_samples) + pages)):
            self.pool.dropped_decodes += 1
            return False
        self.pending.append((len(pages), max_samples))
        self.pending_bytes += len(pages)
        self.pending_samples += max_samples
        return True

    def submit_encode(self, pcm) -> asyncio.Future | None:
        """Queue one frame (1920,) for encoding now; the future gives its Ogg pages (None: dropped). Frames
        of a connection are encoded in the order submitted."""
        if self.closed:
            return None
        data = np.ascontiguousarray(pcm, dtype=np.float32)
        future = asyncio.get_running_loop().create_future()
        if self.worker is None:
            if self._writer is None:
                import sphn

                self._writer = sphn.OpusStreamWriter(SAMPLE_RATE)
            future.set_result(bytes(self._writer.append_pcm(data)))
            return future
        if not self.worker.put(OP_ENCODE, self.id, data.tobytes()):
            self.pool.dropped_encodes += 1
            return None
        self.encodes.append(future)
        return future

    async def encode(self, pcm) -> bytes | None:
        future = self.submit_encode(pcm)
        return None if future is None else await future

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.worker is not None:
            self.worker.streams.pop(self.id, None)
            self.worker.put(OP_CLOSE, self.id, b"", force=True)
        self._resolve_all()

    def _resolve_all(self) -> None:
        for future in self.encodes:
            if not future.done():
                future.set_result(None)
        self.encodes.clear()

    def _decode_inline(self, pages: bytes, max_samples: int) -> bool:
        import sphn

        if self._reader is None:
            self._reader = sphn.OpusStreamReader(SAMPLE_RATE)
        try:
            pcm = np.asarray(self._reader.append_bytes(pages), dtype=np.float32)[:max_samples]
        except Exception as error:
            self._reader = None
            self.on_error(f"undecodable Opus audio ignored ({error})")
            return False
        if pcm.size:
            self.on_pcm(pcm)
        return True

    def _received(self, op: int, payload: bytes) -> None:
        if op == OP_PCM:
            if self.pending:
                size, samples = self.pending.popleft()
                self.pending_bytes -= size
                self.pending_samples -= samples
            if payload and not self.closed:
                self.on_pcm(np.frombuffer(payload, dtype=np.float32))
        elif op == OP_PAGES:
            if self.encodes:
                future = self.encodes.popleft()
                if not future.done():
                    future.set_result(payload)
        elif op == OP_ERROR:
            self.on_error(payload.decode("utf-8", "replace"))

    def _worker_died(self) -> None:
        self._resolve_all()
        if not self.closed:
            self.closed = True
            self.on_error("the audio codec worker stopped; please reconnect", fatal=True)


class _Worker(asyncio.SubprocessProtocol):
    """One codec process, driven by the event loop's own pipe transports (no threads, no blocking)."""

    def __init__(self, pool: "CodecPool", index: int) -> None:
        self.pool, self.index = pool, index
        self.streams: dict[int, CodecStream] = {}
        self.alive = False
        self.transport: asyncio.SubprocessTransport | None = None
        self.stdin: asyncio.WriteTransport | None = None
        self.exited: asyncio.Future = pool.loop.create_future()
        self.ready: asyncio.Future = pool.loop.create_future()
        self._buffer = bytearray()

    async def start(self) -> "_Worker":
        """Start the process and wait until it has imported its codec (so no call's audio waits on that)."""
        await self.pool.loop.subprocess_exec(lambda: self, sys.executable, "-I", str(Path(__file__).resolve()),
                                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None)
        done, _ = await asyncio.wait({self.ready, self.exited}, timeout=READY_TIMEOUT,
                                     return_when=asyncio.FIRST_COMPLETED)
        if not self.ready.done():
            self.transport.kill()
            raise RuntimeError(f"the audio codec worker did not start within {READY_TIMEOUT:.0f} s "
                               "(is sphn installed for this Python?)")
        return self

    @property
    def pid(self) -> int | None:
        return self.transport.get_pid() if self.transport else None

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.stdin = transport.get_pipe_transport(0)
        self.alive = True

    def put(self, op: int, sid: int, payload: bytes, force: bool = False) -> bool:
        """Write one request; False (dropped) when the worker is gone or `QUEUE_BYTES` are already waiting."""
        if not self.alive or self.stdin is None or self.stdin.is_closing():
            return False
        if not force and self.stdin.get_write_buffer_size() > QUEUE_BYTES:
            return False
        self.stdin.write(_FRAME.pack(op, sid, len(payload)) + payload)
        return True

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        if fd != 1:
            return
        buffer = self._buffer
        buffer += data
        offset = 0
        while len(buffer) - offset >= _FRAME.size:
            op, sid, length = _FRAME.unpack_from(buffer, offset)
            end = offset + _FRAME.size + length
            if len(buffer) < end:
                break
            stream = self.streams.get(sid)
            if op == OP_READY and not self.ready.done():
                self.ready.set_result(None)
            elif stream is not None:
                try:
                    stream._received(op, bytes(buffer[offset + _FRAME.size:end]))
                except Exception:
                    log.exception("codec stream %d: a reply could not be handled", sid)
            offset = end
        del buffer[:offset]

    def process_exited(self) -> None:
        self.alive = False
        if not self.exited.done():
            self.exited.set_result(self.transport.get_returncode() if self.transport else None)
        if not self.pool.closing:
            log.error("audio codec worker %d stopped (exit status %s); its calls are ended", self.index,
                      self.transport.get_returncode() if self.transport else None)
            self.pool._replace(self)
        for stream in list(self.streams.values()):
            stream._worker_died()
        self.streams.clear()

    async def stop(self, timeout: float) -> None:
        if self.stdin is not None and not self.stdin.is_closing():
            self.stdin.close()  # the worker ends when its input does
        try:
            await asyncio.wait_for(asyncio.shield(self.exited), timeout)
        except asyncio.TimeoutError:
            self.transport.kill()
            await self.exited
        self.transport.close()


class CodecPool:
    """`workers` codec processes shared by every connection of a server (0: the codec runs inline)."""

    def __init__(self, workers: int = 1) -> None:
        if workers < 0:
            raise ValueError(f"codec workers must be >= 0, got {workers}")
        self.workers_wanted = workers
        self.workers: list[_Worker] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self.closing = False
        self.dropped_decodes = 0  # caller audio dropped because its codec was too far behind
        self.dropped_encodes = 0
        self._ids = itertools.count(1)

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.workers = list(await asyncio.gather(*(_Worker(self, i).start() for i in range(self.workers_wanted))))

    def open(self, on_pcm, on_error) -> CodecStream:
        """A codec for one connection, on the least busy live worker. `on_pcm(pcm)` and
        `on_error(text, fatal=False)` are called on the event loop."""
        if self.workers_wanted and self.loop is None:
            raise RuntimeError("the codec pool is not started")
        live = [w for w in self.workers if w.alive]
        worker = min(live, key=lambda w: len(w.streams)) if live else None
        if worker is None and self.workers_wanted:
            raise RuntimeError("no audio codec worker is running; try again in a moment")
        stream = CodecStream(self, worker, next(self._ids), on_pcm, on_error)
        if worker is not None:
            worker.streams[stream.id] = stream
        return stream

    def _replace(self, dead: _Worker) -> None:
        async def restart() -> None:
            try:
                fresh = await _Worker(self, dead.index).start()
            except OSError:
                log.exception("audio codec worker %d could not be restarted", dead.index)
                return
            if self.closing:
                await fresh.stop(1.0)
                return
            self.workers = [fresh if w is dead else w for w in self.workers]

        self.loop.create_task(restart())

    def pids(self) -> list[int]:
        return [w.pid for w in self.workers]

    async def close(self, timeout: float = 5.0) -> None:
        self.closing = True
        await asyncio.gather(*(w.stop(timeout) for w in self.workers), return_exceptions=True)
        self.workers = []


if __name__ == "__main__":  # a worker process: started by CodecPool as `python -I opus.py`
    worker_main()

__all__ = ["CodecPool", "CodecStream", "worker_main", "QUEUE_BYTES", "MAX_PENDING_BYTES", "MAX_PENDING_SAMPLES"]
