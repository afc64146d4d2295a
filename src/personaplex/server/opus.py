"""Opus decode and encode off the event loop: a few codec worker processes, each holding the codec state of
the connections assigned to it.

sphn's `OpusStreamReader.append_bytes` and `OpusStreamWriter.append_pcm` hold the GIL (measured: two threads
take as long as one thread doing both jobs, docs/serving.md "Audio codec"), so threads cannot spread them
over cores, and on the server's own process they would take the GIL from the event loop and the model thread.
`CodecPool(workers=N)` starts N processes (`python opus.py`, stdlib + numpy + sphn only, no torch); each
connection's reader and writer live in one of them for the whole call. The server talks to a worker over
its stdin/stdout with small binary frames; a sender thread and a receiver thread per worker move them, so
neither the event loop nor the model thread ever waits for a codec:

- decode: the event loop queues a connection's checked Ogg pages (`ogg.OggFilter`) without waiting; the
  receiver thread hands the PCM straight to that connection's callback (the model's input buffer).
- encode: the connection's send task awaits a future the receiver thread resolves with the Ogg pages.

Every queue is bounded: per worker `QUEUE_FRAMES` requests, per connection `MAX_PENDING_BYTES` of Ogg waiting
to be decoded; past that, audio is dropped and counted (`dropped_decodes`, `dropped_encodes`), never queued. A worker
that dies fails its connections (they get an 0x05 error) and is replaced for later calls.

`workers=0` runs the codec inline on the calling thread (small tests and tools; no isolation).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import queue
import struct
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np

log = logging.getLogger("personaplex.server")

_FRAME = struct.Struct("<BII")  # operation, stream id, payload length
OP_OPEN, OP_CLOSE, OP_DECODE, OP_ENCODE = 1, 2, 3, 4  # to a worker
OP_PCM, OP_PAGES, OP_ERROR = 11, 12, 13  # from a worker
_DECODE_LIMIT = struct.Struct("<I")  # a decode request starts with the most samples it may produce
SAMPLE_RATE = 24_000
QUEUE_FRAMES = 4096  # requests waiting for one worker
MAX_PENDING_BYTES = 256 * 1024  # Ogg bytes of one connection queued for decoding


# -- the worker process ---------------------------------------------------------------------------------------
def _read_exactly(stream, n: int) -> bytes | None:
    data = stream.read(n)
    return data if data is not None and len(data) == n else None


def worker_main(stdin=None, stdout=None) -> None:
    """A codec worker: frames in on stdin, frames out on stdout, until stdin closes."""
    import sphn

    stdin = stdin or sys.stdin.buffer
    stdout = stdout or sys.stdout.buffer
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
        if op != OP_CLOSE:
            stdout.flush()


# -- the server side ------------------------------------------------------------------------------------------
class CodecStream:
    """One connection's codec: `decode(pages, max_samples)` (PCM goes to `on_pcm`, from a worker thread),
    `await encode(pcm)` -> Ogg pages (None: dropped), `close()`."""

    def __init__(self, pool: "CodecPool", worker, sid: int, on_pcm, on_error) -> None:
        self.pool, self.worker, self.id = pool, worker, sid
        self.on_pcm, self.on_error = on_pcm, on_error
        self.pending: collections.deque[int] = collections.deque()  # sizes of the decodes in flight, in order
        self.pending_bytes = 0
        self._lock = threading.Lock()  # pending: the event loop adds, the receiver thread removes
        self.encodes: collections.deque = collections.deque()  # futures, in request order
        self.closed = False
        self._reader = self._writer = None  # inline mode only

    def decode(self, pages: bytes, max_samples: int) -> bool:
        """Queue `pages` for decoding; False if dropped (the connection or its worker is too far behind)."""
        if self.closed or not pages:
            return False
        if self.worker is None:
            return self._decode_inline(pages, max_samples)
        with self._lock:
            if self.pending_bytes + len(pages) > MAX_PENDING_BYTES:
                self.pool.dropped_decodes += 1
                return False
            self.pending.append(len(pages))  # before queueing: the reply may come at once
            self.pending_bytes += len(pages)
        if not self.worker.put(OP_DECODE, self.id, _DECODE_LIMIT.pack(max_samples) + pages):
            with self._lock:
                self.pending.pop()
                self.pending_bytes -= len(pages)
            self.pool.dropped_decodes += 1
            return False
        return True

    async def encode(self, pcm) -> bytes | None:
        if self.closed:
            return None
        data = np.ascontiguousarray(pcm, dtype=np.float32)
        if self.worker is None:
            if self._writer is None:
                import sphn

                self._writer = sphn.OpusStreamWriter(SAMPLE_RATE)
            return bytes(self._writer.append_pcm(data))
        future = asyncio.get_running_loop().create_future()
        self.encodes.append(future)
        if not self.worker.put(OP_ENCODE, self.id, data.tobytes()):
            self.encodes.remove(future)
            self.pool.dropped_encodes += 1
            return None
        return await future

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.worker is not None:
            self.worker.streams.pop(self.id, None)
            self.worker.put(OP_CLOSE, self.id, b"", force=True)
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

    # -- called on the receiver thread --------------------------------------------------------------------
    def _received(self, op: int, payload: bytes) -> None:
        loop = self.pool.loop
        if op == OP_PCM:
            with self._lock:
                if self.pending:
                    self.pending_bytes -= self.pending.popleft()
            if payload and not self.closed:
                try:
                    self.on_pcm(np.frombuffer(payload, dtype=np.float32))
                except Exception:
                    log.exception("codec stream %d: decoded audio not delivered", self.id)
        elif op == OP_PAGES:
            _call_soon(loop, self._resolve_encode, payload)
        elif op == OP_ERROR:
            _call_soon(loop, self.on_error, payload.decode("utf-8", "replace"))

    def _resolve_encode(self, pages: bytes) -> None:
        if self.encodes:
            future = self.encodes.popleft()
            if not future.done():
                future.set_result(pages)

    def _worker_died(self) -> None:  # on the event loop
        for future in self.encodes:
            if not future.done():
                future.set_result(None)
        self.encodes.clear()
        if not self.closed:
            self.closed = True
            self.on_error("the audio codec worker stopped; please reconnect", fatal=True)


class _Worker:
    """One codec process with its sender and receiver threads."""

    def __init__(self, pool: "CodecPool", index: int) -> None:
        self.pool, self.index = pool, index
        self.streams: dict[int, CodecStream] = {}
        self.queue: queue.Queue = queue.Queue(QUEUE_FRAMES)
        self.alive = True
        self.process = subprocess.Popen([sys.executable, "-I", str(Path(__file__).resolve())],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True)
        self._sender = threading.Thread(target=self._send, name=f"personaplex-codec-{index}-send", daemon=True)
        self._receiver = threading.Thread(target=self._receive, name=f"personaplex-codec-{index}-recv",
                                          daemon=True)
        self._sender.start()
        self._receiver.start()

    def put(self, op: int, sid: int, payload: bytes, force: bool = False) -> bool:
        if not self.alive:
            return False
        frame = _FRAME.pack(op, sid, len(payload)) + payload
        try:
            if force:
                self.queue.put(frame, timeout=1.0)
            else:
                self.queue.put_nowait(frame)
        except queue.Full:
            return False
        return True

    def _send(self) -> None:
        pipe = self.process.stdin
        try:
            while True:
                frame = self.queue.get()
                if frame is None:
                    break
                pipe.write(frame)
                while True:  # write what else is waiting, then flush once
                    try:
                        frame = self.queue.get_nowait()
                    except queue.Empty:
                        break
                    if frame is None:
                        pipe.flush()
                        return
                    pipe.write(frame)
                pipe.flush()
        except (OSError, ValueError):  # the worker went away; the receiver reports it
            pass
        finally:
            try:
                pipe.close()
            except (OSError, ValueError):
                pass

    def _receive(self) -> None:
        pipe = self.process.stdout
        try:
            while True:
                header = _read_exactly(pipe, _FRAME.size)
                if header is None:
                    break
                op, sid, length = _FRAME.unpack(header)
                payload = _read_exactly(pipe, length) if length else b""
                if payload is None:
                    break
                stream = self.streams.get(sid)
                if stream is not None:
                    stream._received(op, payload)
        except (OSError, ValueError):
            pass
        self.alive = False
        if not self.pool.closing:
            log.error("audio codec worker %d stopped (exit status %s); its calls are ended", self.index,
                      self.process.poll())
        for stream in list(self.streams.values()):
            _call_soon(self.pool.loop, stream._worker_died)

    def stop(self, timeout: float) -> None:
        self.alive = False
        try:
            self.queue.put(None, timeout=timeout)
        except queue.Full:
            pass
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._sender.join(timeout)
        self._receiver.join(timeout)


class CodecPool:
    """`workers` codec processes shared by every connection of a server (0: the codec runs inline)."""

    def __init__(self, workers: int = 1) -> None:
        if workers < 0:
            raise ValueError(f"codec workers must be >= 0, got {workers}")
        self.workers_wanted = workers
        self.workers: list[_Worker] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self.closing = False
        self.dropped_decodes = 0  # caller audio dropped because its codec queue was full
        self.dropped_encodes = 0
        self._ids = itertools.count(1)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.workers = [_Worker(self, i) for i in range(self.workers_wanted)]

    def open(self, on_pcm, on_error) -> CodecStream:
        """A codec for one connection, on the least busy worker. `on_pcm(pcm)` runs on a worker thread;
        `on_error(text, fatal=False)` on the event loop."""
        if self.workers_wanted and self.loop is None:
            raise RuntimeError("the codec pool is not started")
        worker = None
        if self.workers:
            for i, w in enumerate(self.workers):
                if not w.alive and not self.closing:  # replace a worker that died
                    self.workers[i] = w = _Worker(self, i)
            worker = min(self.workers, key=lambda w: len(w.streams))
        sid = next(self._ids)
        stream = CodecStream(self, worker, sid, on_pcm, on_error)
        if worker is not None:
            worker.streams[sid] = stream
        return stream

    def pids(self) -> list[int]:
        return [w.process.pid for w in self.workers]

    def close(self, timeout: float = 5.0) -> None:
        self.closing = True
        for worker in self.workers:
            worker.stop(timeout)
        self.workers = []


def _call_soon(loop, fn, *args) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the event loop is closed: the server is going away
        pass


if __name__ == "__main__":  # a worker process: started by CodecPool as `python -I opus.py`
    worker_main()

__all__ = ["CodecPool", "CodecStream", "worker_main", "QUEUE_FRAMES", "MAX_PENDING_BYTES"]
