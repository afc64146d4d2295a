// Ogg Opus framing (RFC 3533 pages, RFC 7845 Opus mapping): a page muxer, a streaming demuxer and the
// Opus header/packet helpers the client needs. No dependencies.

const CRC_TABLE = (() => {
  // Ogg's CRC-32: polynomial 0x04c11db7, MSB first (not reflected), initial value 0, no final xor.
  const table = new Uint32Array(256);
  for (let i = 0; i < 256; i++) {
    let r = i << 24;
    for (let j = 0; j < 8; j++) r = r & 0x80000000 ? (r << 1) ^ 0x04c11db7 : r << 1;
    table[i] = r >>> 0;
  }
  return table;
})();

export function oggCrc32(bytes) {
  let crc = 0;
  for (let i = 0; i < bytes.length; i++) crc = ((crc << 8) ^ CRC_TABLE[((crc >>> 24) ^ bytes[i]) & 0xff]) >>> 0;
  return crc >>> 0;
}

const CAPTURE = [0x4f, 0x67, 0x67, 0x53]; // "OggS"
const HEADER_SIZE = 27;
export const FLAG_CONTINUED = 0x01;
export const FLAG_BOS = 0x02;
export const FLAG_EOS = 0x04;

const ascii = (s) => Uint8Array.from(s, (c) => c.charCodeAt(0));

/** The OpusHead identification header (RFC 7845 §5.1). preSkip is in 48 kHz samples. */
export function opusHead({ channels = 1, preSkip = 312, inputSampleRate = 24000, outputGain = 0 } = {}) {
  const head = new Uint8Array(19);
  const view = new DataView(head.buffer);
  head.set(ascii("OpusHead"), 0);
  head[8] = 1; // version
  head[9] = channels;
  view.setUint16(10, preSkip, true);
  view.setUint32(12, inputSampleRate, true);
  view.setInt16(16, outputGain, true);
  head[18] = 0; // channel mapping family 0: mono or stereo, no mapping table
  return head;
}

/** The OpusTags comment header (RFC 7845 §5.2). */
export function opusTags(vendor = "personaplex-web", comments = []) {
  const enc = new TextEncoder();
  const vendorBytes = enc.encode(vendor);
  const commentBytes = comments.map((c) => enc.encode(c));
  const size = 8 + 4 + vendorBytes.length + 4 + commentBytes.reduce((n, c) => n + 4 + c.length, 0);
  const tags = new Uint8Array(size);
  const view = new DataView(tags.buffer);
  tags.set(ascii("OpusTags"), 0);
  let off = 8;
  view.setUint32(off, vendorBytes.length, true);
  tags.set(vendorBytes, off + 4);
  off += 4 + vendorBytes.length;
  view.setUint32(off, commentBytes.length, true);
  off += 4;
  for (const c of commentBytes) {
    view.setUint32(off, c.length, true);
    tags.set(c, off + 4);
    off += 4 + c.length;
  }
  return tags;
}

/** Parses an OpusHead packet; returns null if it is not one. */
export function parseOpusHead(packet) {
  if (!packet || packet.length < 19 || !startsWith(packet, "OpusHead")) return null;
  const view = new DataView(packet.buffer, packet.byteOffset, packet.byteLength);
  return {
    version: packet[8],
    channels: packet[9],
    preSkip: view.getUint16(10, true),
    inputSampleRate: view.getUint32(12, true),
    outputGain: view.getInt16(16, true),
    mappingFamily: packet[18],
  };
}

export function isOpusTags(packet) {
  return !!packet && packet.length >= 8 && startsWith(packet, "OpusTags");
}

function startsWith(bytes, magic) {
  for (let i = 0; i < magic.length; i++) if (bytes[i] !== magic.charCodeAt(i)) return false;
  return true;
}

/** Duration of one Opus packet in 48 kHz samples, from its TOC byte (RFC 6716 §3.1). 0 if malformed. */
export function opusPacketSamples48k(packet) {
  if (!packet || packet.length < 1) return 0;
  const toc = packet[0];
  const config = toc >> 3;
  let frame; // samples per frame at 48 kHz
  if (config < 12) frame = [480, 960, 1920, 2880][config & 3]; // SILK: 10, 20, 40, 60 ms
  else if (config < 16) frame = [480, 960][config & 1]; // hybrid: 10, 20 ms
  else frame = [120, 240, 480, 960][config & 3]; // CELT: 2.5, 5, 10, 20 ms
  let count;
  switch (toc & 3) {
    case 0: count = 1; break;
    case 1:
    case 2: count = 2; break;
    default:
      if (packet.length < 2) return 0;
      count = packet[1] & 0x3f;
  }
  return frame * count;
}

/** Builds Ogg pages of one logical stream. */
export class OggWriter {
  constructor(serial = (Math.random() * 0x100000000) >>> 0) {
    this.serial = serial >>> 0;
    this.sequence = 0;
  }

  /**
   * One page holding whole packets. granule: the stream's granule position after the last packet that ends on
   * this page (for Opus: 48 kHz samples including pre-skip), or -1 if no packet ends here.
   */
  page(packets, granule, flags = 0) {
    const lacing = [];
    for (const p of packets) {
      let n = p.length;
      while (n >= 255) {
        lacing.push(255);
        n -= 255;
      }
      lacing.push(n);
    }
    if (lacing.length > 255) throw new Error("Ogg page: too many segments; put fewer packets on a page");
    const bodySize = packets.reduce((n, p) => n + p.length, 0);
    const page = new Uint8Array(HEADER_SIZE + lacing.length + bodySize);
    const view = new DataView(page.buffer);
    page.set(CAPTURE, 0);
    page[4] = 0; // stream structure version
    page[5] = flags;
    writeGranule(view, 6, granule);
    view.setUint32(14, this.serial, true);
    view.setUint32(18, this.sequence++, true);
    view.setUint32(22, 0, true); // CRC, filled below
    page[26] = lacing.length;
    page.set(lacing, HEADER_SIZE);
    let off = HEADER_SIZE + lacing.length;
    for (const p of packets) {
      page.set(p, off);
      off += p.length;
    }
    view.setUint32(22, oggCrc32(page), true);
    return page;
  }
}

function writeGranule(view, off, granule) {
  if (granule < 0) {
    view.setUint32(off, 0xffffffff, true);
    view.setUint32(off + 4, 0xffffffff, true);
  } else {
    view.setUint32(off, granule % 0x100000000, true);
    view.setUint32(off + 4, Math.floor(granule / 0x100000000), true);
  }
}

/** An Ogg Opus stream writer: header pages, then audio pages with 48 kHz granule positions. */
export class OggOpusMuxer {
  constructor({ channels = 1, preSkip = 312, inputSampleRate = 24000, vendor = "personaplex-web", serial } = {}) {
    this.writer = new OggWriter(serial);
    this.head = opusHead({ channels, preSkip, inputSampleRate });
    this.tags = opusTags(vendor);
    this.granule = 0;
  }

  /** The two header pages: OpusHead alone on the first (BOS) page, OpusTags on the second. */
  headerPages() {
    return [this.writer.page([this.head], 0, FLAG_BOS), this.writer.page([this.tags], 0)];
  }

  /** One page holding the given Opus packets. */
  audioPage(packets, { eos = false } = {}) {
    for (const p of packets) this.granule += opusPacketSamples48k(p);
    return this.writer.page(packets, this.granule, eos ? FLAG_EOS : 0);
  }
}

/**
 * Streaming Ogg demuxer: push() any byte chunks (whole pages, several pages, or fragments) and get back the
 * pages they complete, with their packets reassembled across page boundaries.
 */
export class OggReader {
  constructor({ checkCrc = true } = {}) {
    this.checkCrc = checkCrc;
    this.buffer = new Uint8Array(0);
    this.partial = []; // pieces of a packet continued on the next page
    this.crcErrors = 0;
    this.pages = 0;
    this.skippedBytes = 0;
  }

  push(chunk) {
    const bytes = chunk instanceof Uint8Array ? chunk : new Uint8Array(chunk);
    if (this.buffer.length === 0) {
      this.buffer = bytes.slice();
    } else {
      const merged = new Uint8Array(this.buffer.length + bytes.length);
      merged.set(this.buffer, 0);
      merged.set(bytes, this.buffer.length);
      this.buffer = merged;
    }
    const out = [];
    let pos = 0;
    const buf = this.buffer;
    while (true) {
      const start = findCapture(buf, pos);
      if (start < 0) {
        // keep up to 3 trailing bytes that may begin a capture pattern
        const keep = Math.min(3, buf.length - pos);
        this.skippedBytes += buf.length - pos - keep;
        pos = buf.length - keep;
        break;
      }
      this.skippedBytes += start - pos;
      pos = start;
      if (buf.length - pos < HEADER_SIZE) break;
      const nseg = buf[pos + 26];
      if (buf.length - pos < HEADER_SIZE + nseg) break;
      let bodySize = 0;
      for (let i = 0; i < nseg; i++) bodySize += buf[pos + HEADER_SIZE + i];
      const size = HEADER_SIZE + nseg + bodySize;
      if (buf.length - pos < size) break;
      const pageBytes = buf.subarray(pos, pos + size);
      if (this.checkCrc && !crcMatches(pageBytes)) {
        this.crcErrors++;
        pos += 1; // resynchronise on the next capture pattern
        continue;
      }
      out.push(this.parsePage(pageBytes, nseg));
      this.pages++;
      pos += size;
    }
    this.buffer = buf.slice(pos);
    return out;
  }

  parsePage(bytes, nseg) {
    const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    const flags = bytes[5];
    const lo = view.getUint32(6, true);
    const hi = view.getUint32(10, true);
    const granule = lo === 0xffffffff && hi === 0xffffffff ? -1 : hi * 0x100000000 + lo;
    const page = {
      flags,
      bos: !!(flags & FLAG_BOS),
      eos: !!(flags & FLAG_EOS),
      continued: !!(flags & FLAG_CONTINUED),
      granule,
      serial: view.getUint32(14, true),
      sequence: view.getUint32(18, true),
      packets: [],
    };
    if (!page.continued) this.partial = []; // a dangling continuation cannot be completed
    let off = HEADER_SIZE + nseg;
    let segStart = off;
    for (let i = 0; i < nseg; i++) {
      const len = bytes[HEADER_SIZE + i];
      off += len;
      if (len < 255) {
        const piece = bytes.slice(segStart, off);
        if (this.partial.length) {
          this.partial.push(piece);
          page.packets.push(concat(this.partial));
          this.partial = [];
        } else {
          page.packets.push(piece);
        }
        segStart = off;
      }
    }
    if (segStart < off || (nseg > 0 && bytes[HEADER_SIZE + nseg - 1] === 255)) {
      this.partial.push(bytes.slice(segStart, off));
    }
    return page;
  }
}

function findCapture(buf, from) {
  for (let i = from; i + 3 < buf.length; i++) {
    if (buf[i] === 0x4f && buf[i + 1] === 0x67 && buf[i + 2] === 0x67 && buf[i + 3] === 0x53) return i;
  }
  return -1;
}

function crcMatches(page) {
  const view = new DataView(page.buffer, page.byteOffset, page.byteLength);
  const expected = view.getUint32(22, true);
  const copy = page.slice();
  copy[22] = copy[23] = copy[24] = copy[25] = 0;
  return oggCrc32(copy) === expected;
}

function concat(parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let off = 0;
  for (const p of parts) {
    out.set(p, off);
    off += p.length;
  }
  return out;
}
