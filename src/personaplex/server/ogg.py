"""Ogg/Opus from a caller, checked and re-paged before any decoder sees it (runs on the event loop, no codec).

A caller's 0x01 messages carry Ogg pages of Opus packets. Handed to a decoder as they come they can cost
unbounded memory (a packet whose lacing always ends in 255 never finishes, and the reader keeps it) or
unbounded audio (an empty packet decodes, by packet-loss concealment, to a frame of noise; a message of
thousands of them to minutes). `OggFilter` parses the pages itself and hands on only well-formed audio
packets, each in a fresh one-packet page, so the decoder never holds a partial packet:

- pages are found by their capture pattern and checked (version, length, CRC); garbage and bad pages are
  skipped, counted, and the stream resynchronised at the next good page;
- a packet is at most `MAX_PACKET_BYTES`; a longer one is dropped as it grows (only the part of the open
  packet up to that size is kept, across pages);
- empty packets, Opus header packets (`OpusHead`, `OpusTags`) and packets whose TOC byte does not describe
  1 to 120 ms of audio are dropped and counted;
- each packet's duration comes from its TOC byte (RFC 6716 section 3.1), so the audio a message may decode
  to is known exactly before decoding (`FilterResult.samples`, at most 120 ms per packet);
- a caller's decoded audio may run ahead of real time by at most `BURST_SECONDS`; packets beyond that are
  dropped (counted), so a fast sender costs no codec time;
- more than `STARVE_BYTES` of input without one audio packet resets the filter (`starved`); the server
  tells the caller with an 0x05 error.

Memory held per connection: at most one incomplete input page (`MAX_PAGE_BYTES`) and one open packet
(`MAX_PACKET_BYTES`).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

SAMPLE_RATE = 24_000
MAX_PAGE_BYTES = 27 + 255 + 255 * 255  # header, lacing table, body: the largest page Ogg can describe
MAX_PACKET_BYTES = 16 * 1024  # far above any Opus packet (<= 120 ms; 1275 bytes a frame at 510 kb/s)
MAX_PACKET_SAMPLES = SAMPLE_RATE * 120 // 1000  # 2880: Opus packets carry at most 120 ms
STARVE_BYTES = 64 * 1024  # input without one audio packet before the filter is reset
BURST_SECONDS = 2.0  # decoded audio a caller may send ahead of real time
_HEADER = struct.Struct("<4sBBqIIIB")  # capture, version, type, granule, serial, sequence, crc, segments
_CONTINUED, _FIRST = 0x01, 0x02
_REVERSED = bytes(int(f"{b:08b}"[::-1], 2) for b in range(256))


def ogg_crc(data: bytes) -> int:
    """Ogg's page CRC (polynomial 0x04C11DB7, not reflected, initial value 0), computed with zlib's reflected
    CRC-32 over bit-reversed bytes: C speed for what the filter checks and writes on every page."""
    reflected = zlib.crc32(data.translate(_REVERSED), 0xFFFFFFFF) ^ 0xFFFFFFFF
    return int(f"{reflected:032b}"[::-1], 2)


def build_page(packets: list[bytes], *, serial: int = 0, sequence: int = 0, granule: int = 0,
               header_type: int = 0, lacing: list[int] | None = None) -> bytes:
    """One Ogg page holding `packets` (or the raw `lacing` table given, for tests of broken streams)."""
    if lacing is None:
        lacing = []
        for packet in packets:
            lacing += [255] * (len(packet) // 255) + [len(packet) % 255]
    if len(lacing) > 255:
        raise ValueError(f"{len(lacing)} lacing values do not fit one page (at most 255)")
    header = _HEADER.pack(b"OggS", 0, header_type, granule, serial, sequence, 0, len(lacing))
    page = bytearray(header + bytes(lacing) + b"".join(packets))
    page[22:26] = struct.pack("<I", ogg_crc(bytes(page)))
    return bytes(page)


def packet_samples(packet: bytes) -> int:
    """Samples at 24 kHz that an Opus packet decodes to, from its TOC byte; 0 for a packet that is not valid
    Opus (empty, truncated, no frames, or longer than 120 ms)."""
    if not packet:
        return 0
    toc = packet[0]
    config, code = toc >> 3, toc & 0x03
    if config < 12:  # SILK: 10, 20, 40, 60 ms
        frame = (240, 480, 960, 1440)[config & 3]
    elif config < 16:  # hybrid: 10, 20 ms
        frame = (240, 480)[config & 1]
    else:  # CELT: 2.5, 5, 10, 20 ms
        frame = (60, 120, 240, 480)[config & 3]
    if code == 0:
        frames = 1
    elif code in (1, 2):
        frames = 2
    else:
        if len(packet) < 2:
            return 0
        frames = packet[1] & 0x3F
    samples = frames * frame
    return samples if 0 < samples <= MAX_PACKET_SAMPLES else 0


@dataclass
class FilterResult:
    pages: bytes = b""  # clean Ogg pages, one audio packet each, for the decoder
    packets: int = 0  # audio packets in `pages`
    samples: int = 0  # what `pages` decode to at most (24 kHz)
    empty: int = 0  # empty packets dropped
    absurd: int = 0  # packets dropped: too long, or no valid Opus TOC
    headers: int = 0  # OpusHead / OpusTags packets dropped
    malformed: int = 0  # bad pages (capture, version, CRC) and garbage runs skipped
    over_budget: int = 0  # audio packets dropped: the caller is more than BURST_SECONDS ahead of real time
    starved: bool = False  # STARVE_BYTES of input without audio: the filter was reset


class OggFilter:
    """One caller's Ogg/Opus input: `feed(bytes, now)` -> FilterResult. Not thread-safe (event loop only)."""

    def __init__(self, burst_seconds: float = BURST_SECONDS) -> None:
        self.burst_samples = burst_seconds * SAMPLE_RATE
        self._buffer = bytearray()  # an incomplete page, at most MAX_PAGE_BYTES
        self._open = bytearray()  # the packet continued on the next page, at most MAX_PACKET_BYTES
        self._is_open = False
        self._skipping = False  # dropping the rest of an over-long or orphaned packet
        self._since_audio = 0  # input bytes since the last audio packet
        self._budget = self.burst_samples  # token bucket of decodable audio (samples)
        self._clock: float | None = None
        self._sequence = 0
        self._granule = 0

    @property
    def held_bytes(self) -> int:
        return len(self._buffer) + len(self._open)

    def reset(self) -> None:
        self._buffer.clear()
        self._open.clear()
        self._is_open = self._skipping = False
        self._since_audio = 0

    def feed(self, data: bytes, now: float) -> FilterResult:
        result = FilterResult()
        if self._clock is not None:
            self._budget = min(self.burst_samples, self._budget + (now - self._clock) * SAMPLE_RATE)
        self._clock = now
        self._since_audio += len(data)
        self._buffer += data
        out: list[bytes] = []
        while self._next_page(result, out):
            pass
        if self._since_audio > STARVE_BYTES:
            self.reset()
            result.starved = True
        result.pages = b"".join(out)
        return result

    # -- pages ----------------------------------------------------------------------------------------------
    def _next_page(self, result: FilterResult, out: list[bytes]) -> bool:
        """Take one page off the buffer (or skip garbage); False when the buffer holds no whole page."""
        buf = self._buffer
        start = buf.find(b"OggS")
        if start != 0:
            keep = 3 if start < 0 else 0  # the buffer may end in the first bytes of a capture pattern
            skipped = len(buf) - keep if start < 0 else start
            if skipped > 0:
                del buf[:skipped]
                result.malformed += 1
                self._lose_open()
            if start < 0:
                return False
        if len(buf) < 27:
            return False
        if buf[4] != 0:  # version
            del buf[:4]
            result.malformed += 1
            self._lose_open()
            return True
        segments = buf[26]
        if len(buf) < 27 + segments:
            return False
        lacing = bytes(buf[27:27 + segments])
        size = 27 + segments + sum(lacing)
        if len(buf) < size:
            return False
        page = bytes(buf[:size])
        del buf[:size]
        stored = struct.unpack_from("<I", page, 22)[0]
        if ogg_crc(page[:22] + b"\0\0\0\0" + page[26:]) != stored:
            result.malformed += 1
            self._lose_open()
            return True
        self._packets(page, lacing, result, out)
        return True

    def _lose_open(self) -> None:
        """A page went missing: the open packet can never be completed, and a continuation is an orphan."""
        if self._is_open:
            self._open.clear()
            self._is_open = False
            self._skipping = True

    def _packets(self, page: bytes, lacing: bytes, result: FilterResult, out: list[bytes]) -> None:
        continued = bool(page[5] & _CONTINUED)
        if not continued and (self._is_open or self._skipping):  # the open packet's end never came
            self._open.clear()
            self._is_open = self._skipping = False
        offset, length, first = 27 + len(lacing), 0, True
        for value in lacing:
            length += value
            if value == 255:
                continue
            self._fragment(page[offset:offset + length], True, continued and first, result, out)
            offset, length, first = offset + length, 0, False
        if length or (lacing and lacing[-1] == 255):  # the last packet goes on in the next page
            self._fragment(page[offset:offset + length], False, continued and first, result, out)

    def _fragment(self, data: bytes, complete: bool, continuation: bool, result: FilterResult,
                  out: list[bytes]) -> None:
        if continuation and not (self._is_open or self._skipping):  # the packet's start was never seen
            self._skipping = not complete
            result.malformed += 1
            return
        if self._skipping:
            self._skipping = not complete
            return
        if len(self._open) + len(data) > MAX_PACKET_BYTES:
            self._open.clear()
            self._is_open, self._skipping = False, not complete
            result.absurd += 1
            return
        if not complete:
            self._open += data
            self._is_open = True
            return
        packet = bytes(self._open) + data if self._is_open else data
        self._open.clear()
        self._is_open = False
        self._packet(packet, result, out)

    def _packet(self, packet: bytes, result: FilterResult, out: list[bytes]) -> None:
        if not packet:
            result.empty += 1
            return
        if packet.startswith((b"OpusHead", b"OpusTags")):
            result.headers += 1
            return
        samples = packet_samples(packet)
        if not samples:
            result.absurd += 1
            return
        self._since_audio = 0
        if samples > self._budget:
            result.over_budget += 1
            return
        self._budget -= samples
        self._granule += 2 * samples  # Ogg/Opus granules count 48 kHz samples
        out.append(build_page([packet], serial=0x5050, sequence=self._sequence, granule=self._granule,
                              header_type=_FIRST if self._sequence == 0 else 0))
        self._sequence += 1
        result.packets += 1
        result.samples += samples


__all__ = ["OggFilter", "FilterResult", "build_page", "ogg_crc", "packet_samples", "MAX_PAGE_BYTES",
           "MAX_PACKET_BYTES", "MAX_PACKET_SAMPLES", "STARVE_BYTES", "BURST_SECONDS"]
