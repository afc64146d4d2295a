// AudioWorklet: one node does both directions on the audio clock, so the user and agent channels of the
// recording are sample-aligned.
//  * input 0 = microphone; it is posted to the page in 20 ms frames at 24 kHz (for the encoder and recording);
//  * output 0 = agent audio from a jitter buffer: it starts once `targetMs` are queued, plays silence and
//    re-buffers on underrun, drops the oldest audio when more than `maxMs` are queued; what it plays is posted
//    back with each mic frame (left channel of the recording).
import { StreamResampler } from "./dsp.js";

const RATE = 24000; // the protocol's sample rate
const FRAME = 480; // 20 ms at 24 kHz

class DuplexProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const o = (options && options.processorOptions) || {};
    this.setBuffer(o.targetMs ?? 120, o.maxMs ?? 400);
    this.inRes = new StreamResampler(sampleRate, RATE); // mic: context rate -> 24 kHz
    this.outRecRes = new StreamResampler(sampleRate, RATE); // played audio: context rate -> 24 kHz
    this.playRes = new StreamResampler(RATE, sampleRate); // agent audio: 24 kHz -> context rate
    this.capture = false;
    this.alive = true;
    this.micAcc = new Float32Array(FRAME);
    this.outAcc = new Float32Array(FRAME);
    this.micFill = 0;
    this.outFill = 0;
    this.resetPlayer();
    this.lastStats = 0;
    this.port.onmessage = (e) => this.onMessage(e.data);
  }

  setBuffer(targetMs, maxMs) {
    this.target = Math.round((targetMs / 1000) * sampleRate);
    this.max = Math.max(this.target + 128, Math.round((maxMs / 1000) * sampleRate));
  }

  resetPlayer() {
    this.queue = [];
    this.head = 0; // read offset in queue[0]
    this.buffered = 0;
    this.playing = false;
    this.started = false; // first agent audio received
    this.underruns = 0;
    this.underrunSamples = 0;
    this.droppedSamples = 0;
    this.playedSamples = 0;
    this.receivedSamples = 0;
    this.peak = 0;
  }

  onMessage(msg) {
    switch (msg.type) {
      case "push": {
        const samples = this.playRes.process(msg.samples);
        if (!samples.length) return;
        this.queue.push(samples);
        this.buffered += samples.length;
        this.receivedSamples += samples.length;
        this.started = true;
        if (this.buffered > this.max) this.drop(this.buffered - this.target);
        break;
      }
      case "reset":
        this.resetPlayer();
        this.micFill = this.outFill = 0;
        break;
      case "config":
        this.setBuffer(msg.targetMs, msg.maxMs);
        break;
      case "capture":
        this.capture = !!msg.on;
        this.micFill = this.outFill = 0;
        break;
      case "stop":
        this.alive = false;
        break;
    }
  }

  drop(n) {
    this.droppedSamples += n;
    this.buffered -= n;
    while (n > 0 && this.queue.length) {
      const avail = this.queue[0].length - this.head;
      if (avail <= n) {
        n -= avail;
        this.queue.shift();
        this.head = 0;
      } else {
        this.head += n;
        n = 0;
      }
    }
  }

  pull(out) {
    let i = 0;
    if (!this.playing && this.buffered >= this.target && this.buffered > 0) this.playing = true;
    if (this.playing) {
      while (i < out.length && this.queue.length) {
        const chunk = this.queue[0];
        const n = Math.min(out.length - i, chunk.length - this.head);
        out.set(chunk.subarray(this.head, this.head + n), i);
        i += n;
        this.head += n;
        this.buffered -= n;
        if (this.head >= chunk.length) {
          this.queue.shift();
          this.head = 0;
        }
      }
      this.playedSamples += i;
      if (i < out.length) {
        this.playing = false; // ran dry: re-buffer up to the target
        this.underruns++;
      }
    }
    if (i < out.length) {
      out.fill(0, i);
      if (this.playedSamples > 0) this.underrunSamples += out.length - i; // not the initial pre-buffering
    }
    for (let k = 0; k < out.length; k++) {
      const a = Math.abs(out[k]);
      if (a > this.peak) this.peak = a;
    }
  }

  process(inputs, outputs) {
    const output = outputs[0];
    const n = output && output.length ? output[0].length : 128;
    const out = output && output.length ? output[0] : new Float32Array(n);
    this.pull(out);
    for (let c = 1; c < (output ? output.length : 0); c++) output[c].set(out);

    if (this.capture) {
      const input = inputs[0];
      let mic;
      if (input && input.length) {
        mic = input[0];
        if (input.length > 1) {
          mic = new Float32Array(n);
          for (const ch of input) for (let k = 0; k < n; k++) mic[k] += ch[k] / input.length;
        }
      } else {
        mic = new Float32Array(n);
      }
      this.accumulate(this.inRes.process(mic), this.outRecRes.process(out));
    }

    if (currentTime - this.lastStats >= 0.1) {
      this.lastStats = currentTime;
      this.port.postMessage({
        type: "stats",
        bufferedMs: (1000 * this.buffered) / sampleRate,
        playing: this.playing,
        underruns: this.underruns,
        underrunMs: (1000 * this.underrunSamples) / sampleRate,
        droppedMs: (1000 * this.droppedSamples) / sampleRate,
        playedMs: (1000 * this.playedSamples) / sampleRate,
        receivedMs: (1000 * this.receivedSamples) / sampleRate,
        peak: this.peak,
        contextRate: sampleRate,
      });
      this.peak = 0;
    }
    return this.alive;
  }

  accumulate(mic, out) {
    // The two resamplers have the same delay, so equal counts come out; keep them in lockstep anyway.
    let i = 0;
    let j = 0;
    while (i < mic.length || j < out.length) {
      const nm = Math.min(FRAME - this.micFill, mic.length - i);
      this.micAcc.set(mic.subarray(i, i + nm), this.micFill);
      this.micFill += nm;
      i += nm;
      const no = Math.min(FRAME - this.outFill, out.length - j);
      this.outAcc.set(out.subarray(j, j + no), this.outFill);
      this.outFill += no;
      j += no;
      if (this.micFill === FRAME && this.outFill === FRAME) {
        this.port.postMessage({ type: "frame", mic: this.micAcc, out: this.outAcc }, [
          this.micAcc.buffer,
          this.outAcc.buffer,
        ]);
        this.micAcc = new Float32Array(FRAME);
        this.outAcc = new Float32Array(FRAME);
        this.micFill = this.outFill = 0;
      } else if (nm === 0 && no === 0) {
        break; // one side is full and waits for the other
      }
    }
  }
}

registerProcessor("personaplex-duplex", DuplexProcessor);
