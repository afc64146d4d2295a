// Small audio helpers shared by the page and the audio worklet: a streaming windowed-sinc resampler, levels,
// and a stereo 16-bit WAV writer.

const PHASES = 256;

/** Streaming resampler (windowed sinc, Blackman window); keeps state across calls. */
export class StreamResampler {
  constructor(inRate, outRate, halfTaps = 16) {
    this.inRate = inRate;
    this.outRate = outRate;
    this.passthrough = inRate === outRate;
    this.step = inRate / outRate; // input samples per output sample
    this.half = halfTaps;
    const cutoff = 0.5 * Math.min(1, outRate / inRate) * 0.92; // cycles per input sample
    const taps = 2 * halfTaps;
    // table[phase][k]: weight of input sample (n - half + 1 + k) for an output at position n + phase/PHASES
    this.table = new Float32Array((PHASES + 1) * taps);
    for (let ph = 0; ph <= PHASES; ph++) {
      const frac = ph / PHASES;
      let sum = 0;
      for (let k = 0; k < taps; k++) {
        const d = frac + halfTaps - 1 - k; // distance from the output position to the tap
        const x = 2 * cutoff * d;
        const sinc = Math.abs(x) < 1e-9 ? 1 : Math.sin(Math.PI * x) / (Math.PI * x);
        const w = d / halfTaps; // in [-1, 1]
        const win = Math.abs(w) >= 1 ? 0 : 0.42 + 0.5 * Math.cos(Math.PI * w) + 0.08 * Math.cos(2 * Math.PI * w);
        const v = sinc * win;
        this.table[ph * taps + k] = v;
        sum += v;
      }
      for (let k = 0; k < taps; k++) this.table[ph * taps + k] /= sum; // unit DC gain
    }
    this.buf = new Float32Array(taps); // history (zeros at start)
    this.len = halfTaps; // valid samples in buf
    this.pos = halfTaps; // next output position (fractional index into buf): the first real input sample
  }

  process(input) {
    if (this.passthrough) return input;
    const taps = 2 * this.half;
    // append input
    if (this.len + input.length > this.buf.length) {
      const nb = new Float32Array(Math.max(this.len + input.length, this.buf.length * 2));
      nb.set(this.buf.subarray(0, this.len));
      this.buf = nb;
    }
    this.buf.set(input, this.len);
    this.len += input.length;
    const maxOut = Math.ceil((this.len - this.pos) / this.step) + 1;
    const out = new Float32Array(maxOut);
    let n = 0;
    const buf = this.buf;
    const table = this.table;
    while (true) {
      const i = Math.floor(this.pos);
      if (i + this.half >= this.len) break; // need samples up to i + half
      const ph = Math.round((this.pos - i) * PHASES);
      const base = i - this.half + 1;
      const t = ph * taps;
      let acc = 0;
      for (let k = 0; k < taps; k++) {
        const j = base + k;
        if (j >= 0) acc += buf[j] * table[t + k];
      }
      out[n++] = acc;
      this.pos += this.step;
    }
    // drop samples no longer needed
    const drop = Math.max(0, Math.floor(this.pos) - this.half + 1);
    if (drop > 0) {
      this.buf.copyWithin(0, drop, this.len);
      this.len -= drop;
      this.pos -= drop;
    }
    return out.subarray(0, n);
  }
}

export function rms(samples) {
  let s = 0;
  for (let i = 0; i < samples.length; i++) s += samples[i] * samples[i];
  return samples.length ? Math.sqrt(s / samples.length) : 0;
}

export function floatToInt16(samples) {
  const out = new Int16Array(samples.length);
  for (let i = 0; i < samples.length; i++) {
    const v = Math.max(-1, Math.min(1, samples[i]));
    out[i] = v < 0 ? Math.round(v * 32768) : Math.round(v * 32767);
  }
  return out;
}

/** Collects two aligned channels (16-bit) for the conversation download. */
export class StereoRecorder {
  constructor(sampleRate, maxSeconds = 3600) {
    this.sampleRate = sampleRate;
    this.maxFrames = Math.round(maxSeconds * sampleRate); // bounds memory (4 bytes a frame)
    this.left = [];
    this.right = [];
    this.frames = 0;
    this.truncated = false;
  }

  append(left, right) {
    let n = Math.min(left.length, right.length, this.maxFrames - this.frames);
    if (n < Math.min(left.length, right.length)) this.truncated = true;
    if (n <= 0) return;
    this.left.push(floatToInt16(left.subarray(0, n)));
    this.right.push(floatToInt16(right.subarray(0, n)));
    this.frames += n;
  }

  clear() {
    this.left = [];
    this.right = [];
    this.frames = 0;
    this.truncated = false;
  }

  /** A RIFF/WAVE file: PCM 16-bit, 2 channels (left = agent, right = user). */
  toWav() {
    return encodeWavStereo(this.left, this.right, this.frames, this.sampleRate);
  }
}

export function encodeWavStereo(leftChunks, rightChunks, frames, sampleRate) {
  const dataBytes = frames * 4;
  const buffer = new ArrayBuffer(44 + dataBytes);
  const view = new DataView(buffer);
  const str = (off, s) => {
    for (let i = 0; i < s.length; i++) view.setUint8(off + i, s.charCodeAt(i));
  };
  str(0, "RIFF");
  view.setUint32(4, 36 + dataBytes, true);
  str(8, "WAVE");
  str(12, "fmt ");
  view.setUint32(16, 16, true); // fmt chunk size
  view.setUint16(20, 1, true); // PCM
  view.setUint16(22, 2, true); // channels
  view.setUint32(24, sampleRate, true);
  view.setUint32(28, sampleRate * 4, true); // byte rate
  view.setUint16(32, 4, true); // block align
  view.setUint16(34, 16, true); // bits per sample
  str(36, "data");
  view.setUint32(40, dataBytes, true);
  const pcm = new Int16Array(buffer, 44, frames * 2);
  let f = 0;
  for (let c = 0; c < leftChunks.length; c++) {
    const l = leftChunks[c];
    const r = rightChunks[c];
    for (let i = 0; i < l.length; i++, f++) {
      pcm[2 * f] = l[i];
      pcm[2 * f + 1] = r[i];
    }
  }
  return new Blob([buffer], { type: "audio/wav" });
}
