// PersonaPlex web client: microphone -> WebCodecs Opus -> Ogg pages -> websocket, and back the same way into a
// jitter-buffered AudioWorklet player. No dependencies, no build step.
import { OggOpusMuxer, OggReader, isOpusTags, opusPacketSamples48k, parseOpusHead } from "./ogg.js";
import { StereoRecorder, StreamResampler, rms } from "./dsp.js";

const RATE = 24000; // protocol sample rate
const FRAME_MS = 20; // mic frames sent to the encoder
const SILENCE_TIMEOUT_MS = 10000; // close when the server sends nothing for this long (like the reference client)
const MAX_WS_BUFFERED = 1 << 20; // stop sending mic audio while the socket has this much unsent
const PACKETS_PER_PAGE = 1; // Opus packets per Ogg page sent (1 = lowest latency)
const PRE_SKIP_48K = 312; // libopus encoder look-ahead at 24 kHz (6.5 ms), in 48 kHz samples

const KIND = { HANDSHAKE: 0, AUDIO: 1, TEXT: 2, CONTROL: 3, METADATA: 4, ERROR: 5, PING: 6 };
const CONTROL_NAMES = ["start", "endTurn", "pause", "restart"];

const FALLBACK_DEFAULTS = { text_temperature: 0.7, text_topk: 25, audio_temperature: 0.8, audio_topk: 250 };

const PRESETS = [
  {
    id: "assistant",
    label: "Assistant",
    text:
      "You are Nova, a warm and knowledgeable voice assistant. Answer questions clearly and accurately, explain " +
      "things step by step when they are complicated, and keep each reply to a few sentences so the conversation " +
      "stays natural. If a request is ambiguous, ask one short clarifying question. If you do not know something, " +
      "say so honestly.",
  },
  {
    id: "service",
    label: "Customer service",
    text:
      "You work for SwiftPlex Appliances which is a company that sells and repairs kitchen and laundry " +
      "appliances, and your name is Maya Torres. You help customers check on orders, book repair visits and " +
      "troubleshoot common problems. Information: standard delivery takes 3 to 5 business days; repair visits " +
      "can be booked Monday to Saturday between 8 AM and 6 PM; the in-home repair fee is $79, waived for " +
      "appliances under warranty; every appliance has a two-year warranty from the delivery date. Be polite and " +
      "patient, ask for the order number before discussing an order, and offer to transfer the customer to a " +
      "supervisor if you cannot solve the problem.",
  },
  {
    id: "casual",
    label: "Casual chat",
    text:
      "You enjoy having a good conversation. Have a relaxed, friendly chat with the other person about their " +
      "day, their plans and whatever else comes up. Your name is Sam; you live in Portland, you love hiking, " +
      "cooking and old science-fiction films, and you are curious about other people's stories. Keep it light, " +
      "react naturally, and share a little about yourself too.",
  },
  {
    id: "teacher",
    label: "Teacher",
    text:
      "You are a wise and friendly teacher. Answer questions or provide advice in a clear and engaging way.",
  },
];

const $ = (id) => document.getElementById(id);
const ui = {
  status: $("status"),
  statusText: $("status-text"),
  demoBanner: $("demo-banner"),
  supportBanner: $("support-banner"),
  error: $("error"),
  presets: $("presets"),
  prompt: $("prompt"),
  promptCount: $("prompt-count"),
  voice: $("voice"),
  params: ["text_temperature", "text_topk", "audio_temperature", "audio_topk", "seed"].map((id) => $(id)),
  bufferMs: $("buffer_ms"),
  resetDefaults: $("reset-defaults"),
  connect: $("connect"),
  download: $("download"),
  transcript: $("transcript"),
  micLevel: $("mic-level"),
  agentLevel: $("agent-level"),
  serverInfo: $("server-info"),
  stat: {
    latency: $("stat-latency"),
    first: $("stat-first"),
    buffer: $("stat-buffer"),
    underruns: $("stat-underruns"),
    dropped: $("stat-dropped"),
    frames: $("stat-frames"),
    messages: $("stat-messages"),
    duration: $("stat-duration"),
  },
};

const app = {
  info: null,
  defaults: { ...FALLBACK_DEFAULTS },
  codec: null, // { encoderConfig, decoderConfigs } once support is checked
  session: null, // the current conversation
  recorder: new StereoRecorder(RATE),
  lastStats: null,
  state: "idle",
};

// ---------------------------------------------------------------- UI helpers

function setStatus(state, text) {
  app.state = state;
  ui.status.dataset.state = state;
  ui.statusText.textContent = text;
  const busy = state !== "idle" && state !== "error";
  ui.connect.textContent = busy ? (state === "closing" ? "Disconnecting…" : "Disconnect") : "Connect";
  ui.connect.classList.toggle("danger", busy);
  ui.connect.disabled = state === "closing" || (!busy && !app.codec);
  for (const el of [ui.prompt, ui.voice, ui.bufferMs, ui.resetDefaults, ...ui.params]) el.disabled = busy;
  for (const b of ui.presets.querySelectorAll("button")) b.disabled = busy;
  ui.download.disabled = busy || app.recorder.frames === 0;
}

function showError(message) {
  ui.error.textContent = message;
  ui.error.hidden = !message;
}

function fmtMs(ms) {
  if (ms == null || !isFinite(ms)) return "—";
  return ms >= 10000 ? `${(ms / 1000).toFixed(1)} s` : `${Math.round(ms)} ms`;
}

function fmtDuration(ms) {
  const s = Math.floor(ms / 1000);
  return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
}

function setLevel(el, value) {
  // value: linear amplitude; show dBFS from -60 to 0
  const db = value > 0 ? 20 * Math.log10(value) : -100;
  el.style.width = `${Math.max(0, Math.min(100, ((db + 60) / 60) * 100))}%`;
}

function clearTranscript(placeholder = "Waiting for the agent…") {
  pieceDecoder = new TextDecoder("utf-8");
  ui.transcript.replaceChildren();
  ui.transcript.dataset.empty = "true";
  const p = document.createElement("p");
  p.className = "placeholder";
  p.textContent = placeholder;
  ui.transcript.append(p);
}

// Text pieces are SentencePiece pieces: a byte-fallback piece arrives as "<0xE2>", and a multi-byte character
// spans several of them, so bytes go through a streaming UTF-8 decoder. Control characters are dropped.
const BYTE_PIECE = /<0x([0-9A-Fa-f]{2})>/g;
let pieceDecoder = new TextDecoder("utf-8");

function decodePiece(piece) {
  let out = "";
  let last = 0;
  let bytes = [];
  const flushBytes = (final) => {
    if (bytes.length) out += pieceDecoder.decode(new Uint8Array(bytes), { stream: !final });
    else if (final) out += pieceDecoder.decode();
    bytes = [];
  };
  for (const m of piece.matchAll(BYTE_PIECE)) {
    if (m.index > last) {
      flushBytes(true);
      out += piece.slice(last, m.index);
    }
    bytes.push(parseInt(m[1], 16));
    last = m.index + m[0].length;
  }
  if (last < piece.length) {
    flushBytes(true);
    out += piece.slice(last);
  } else {
    flushBytes(false);
  }
  return out.replace(/[\u0000-\u0008\u000B-\u001F\u007F]/g, "");
}

function appendTranscript(rawPiece) {
  let piece = decodePiece(rawPiece);
  if (!piece) return;
  const t = ui.transcript;
  const nearBottom = t.scrollHeight - t.scrollTop - t.clientHeight < 40;
  if (t.dataset.empty === "true") {
    t.replaceChildren(document.createElement("p"));
    t.dataset.empty = "false";
    piece = piece.replace(/^\s+/, "");
  }
  t.lastElementChild.append(document.createTextNode(piece));
  if (nearBottom) t.scrollTop = t.scrollHeight;
}

// ---------------------------------------------------------------- persona & parameters

// The presets shown: the server's default prompt (`serve --default-text-prompt`, from /api/info) first when it
// has one, then the page's own.
let presets = [...PRESETS];

function renderPresets() {
  ui.presets.replaceChildren();
  for (const preset of presets) {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = preset.label;
    b.dataset.preset = preset.id;
    b.setAttribute("aria-pressed", "false");
    b.addEventListener("click", () => {
      ui.prompt.value = preset.text;
      onPromptInput();
    });
    ui.presets.append(b);
  }
}

// `save`: the user typed or picked this prompt (remembered for the next visit); the page's own updates
// (start-up, the server's limits) are not remembered, so a later visit shows the server's default again.
function onPromptInput(save = true) {
  ui.promptCount.textContent = `${ui.prompt.value.length} / ${ui.prompt.maxLength > 0 ? ui.prompt.maxLength : 1000}`;
  const text = ui.prompt.value.trim();
  for (const b of ui.presets.querySelectorAll("button")) {
    const preset = presets.find((p) => p.id === b.dataset.preset);
    b.setAttribute("aria-pressed", String(preset.text === text));
  }
  if (save === false) return;
  try {
    localStorage.setItem("personaplex.prompt", ui.prompt.value);
  } catch {}
}

function useServerDefaultPrompt(text) {
  if (typeof text !== "string" || !text.trim()) return;
  presets = [{ id: "server", label: "Server default", text: text.trim() }, ...PRESETS];
  renderPresets();
  if (!safeGet("personaplex.prompt")) ui.prompt.value = text.trim(); // unless the user chose one before
  onPromptInput(false);
}

function applyDefaults() {
  for (const el of ui.params) el.value = el.id === "seed" ? "" : app.defaults[el.id] ?? "";
}

function collectParams() {
  const params = new URLSearchParams();
  params.set("text_prompt", ui.prompt.value.trim());
  params.set("voice_prompt", ui.voice.value);
  for (const el of ui.params) {
    const v = el.value.trim();
    if (v === "") continue;
    if (!el.checkValidity()) throw new Error(`“${el.labels[0].textContent}” is out of range.`);
    params.set(el.id, v);
  }
  return params;
}

// ---------------------------------------------------------------- server info and codec support

async function loadServerInfo() {
  try {
    const [info, voices] = await Promise.all([
      fetch("api/info").then((r) => (r.ok ? r.json() : Promise.reject(new Error(`api/info: HTTP ${r.status}`)))),
      fetch("api/voices").then((r) => (r.ok ? r.json() : Promise.reject(new Error(`api/voices: HTTP ${r.status}`)))),
    ]);
    app.info = info;
    app.defaults = { ...FALLBACK_DEFAULTS, ...(info.defaults || info.sampling_defaults || {}) };
    applyDefaults();
    ui.demoBanner.hidden = !info.demo;
    if (info.max_prompt_chars > 0) {
      ui.prompt.maxLength = info.max_prompt_chars;
      onPromptInput(false);
    }
    useServerDefaultPrompt(info.default_text_prompt);
    const list = Array.isArray(voices.voices) ? voices.voices : [];
    ui.voice.replaceChildren(
      ...list.map((name) => {
        const o = document.createElement("option");
        o.value = name;
        o.textContent = name;
        return o;
      }),
    );
    if (!list.length) ui.voice.append(new Option("No voices on the server", ""));
    const saved = safeGet("personaplex.voice");
    ui.voice.value = list.includes(saved) ? saved : list.includes(voices.default) ? voices.default : list[0] ?? "";
    const bits = [];
    bits.push(describeModel(info.model));
    bits.push(`${info.sample_rate ?? RATE} Hz`, `${info.frame_rate ?? 12.5} frames/s`);
    if (info.max_conversations) bits.push(`up to ${info.max_conversations} conversation(s) at a time`);
    if (info.demo) bits.push("demo checkpoint");
    ui.serverInfo.textContent = `Server: ${bits.join(" · ")}`;
  } catch (err) {
    applyDefaults();
    ui.serverInfo.textContent = "Server information unavailable.";
    showError(`Could not load the server settings (${err.message}). Is the server running?`);
  }
}

function describeModel(model) {
  if (!model) return "model";
  if (typeof model !== "object") return String(model);
  const parts = [];
  if (model.source) parts.push(String(model.source).split(/[\\/]/).filter(Boolean).pop());
  if (model.parameters) {
    const p = model.parameters;
    parts.push(p >= 1e9 ? `${(p / 1e9).toFixed(1)}B params` : `${(p / 1e6).toFixed(1)}M params`);
  }
  if (model.device) parts.push(model.device);
  return parts.join(", ") || "model";
}

function safeGet(key) {
  try {
    return localStorage.getItem(key);
  } catch {
    return null;
  }
}

async function checkCodecSupport() {
  if (!window.isSecureContext) {
    return "This page is not in a secure context, so the browser blocks the microphone and WebCodecs. " +
      "Open it over HTTPS (personaplex serve --ssl …) or as http://localhost / http://127.0.0.1.";
  }
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    return "This browser does not provide microphone access (navigator.mediaDevices.getUserMedia).";
  }
  if (!window.AudioWorkletNode) return "This browser does not support AudioWorklet.";
  if (!window.AudioEncoder || !window.AudioDecoder) {
    return "This browser does not support WebCodecs audio (AudioEncoder / AudioDecoder), which the page uses " +
      "to encode and decode Opus. Use a recent Chrome, Edge or Chromium (94+), or Firefox 130+.";
  }
  const base = { codec: "opus", numberOfChannels: 1, bitrate: 32000 };
  const candidates = [];
  for (const sampleRate of [RATE, 48000]) {
    candidates.push({ ...base, sampleRate, opus: { frameDuration: FRAME_MS * 1000, complexity: 5, application: "audio" } });
    candidates.push({ ...base, sampleRate, opus: { frameDuration: FRAME_MS * 1000 } });
    candidates.push({ ...base, sampleRate });
  }
  let encoderConfig = null;
  for (const c of candidates) {
    try {
      const r = await AudioEncoder.isConfigSupported(c);
      if (r.supported) {
        encoderConfig = r.config || c;
        break;
      }
    } catch {}
  }
  if (!encoderConfig) {
    return "This browser cannot encode Opus with WebCodecs (AudioEncoder.isConfigSupported({codec: 'opus', " +
      "sampleRate: 24000, numberOfChannels: 1}) is false). Use a recent Chrome, Edge or Chromium.";
  }
  const decoderConfigs = [];
  for (const sampleRate of [RATE, 48000]) {
    const c = { codec: "opus", sampleRate, numberOfChannels: 1 };
    try {
      if ((await AudioDecoder.isConfigSupported(c)).supported) decoderConfigs.push(c);
    } catch {}
  }
  if (!decoderConfigs.length) return "This browser cannot decode Opus with WebCodecs (AudioDecoder).";
  app.codec = { encoderConfig, decoderConfigs };
  return null;
}

// ---------------------------------------------------------------- a conversation

class Session {
  constructor(params) {
    this.params = params;
    this.closed = false;
    this.live = false;
    this.userClosed = false;
    this.t0 = performance.now();
    this.stats = {
      msgsIn: 0,
      msgsOut: 0,
      bytesIn: 0,
      bytesOut: 0,
      framesEncoded: 0,
      framesDecoded: 0,
      samplesDecoded: 0,
      packetsIn: 0,
      sentMs: 0, // mic audio sent since the handshake
      receivedMs: 0, // agent audio received (from packet durations)
      firstAudioMs: null,
      handshakeAt: null,
      micDroppedFrames: 0,
      decodeErrors: 0,
      decoderConfig: null,
      decodedRate: null,
      textPieces: 0,
      queuePosition: null,
      lastMetadata: null,
      controls: [],
    };
    this.pendingPackets = [];
    this.lastServerMessage = performance.now();
  }

  async start() {
    setStatus("connecting", "Opening the microphone…");
    await this.openAudio();
    if (this.closed) return;
    setStatus("connecting", "Connecting to the server…");
    const url = new URL("api/chat", document.baseURI);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    url.search = this.params.toString();
    const ws = new WebSocket(url);
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    ws.onopen = () => {
      if (!this.live) setStatus("preparing", "Preparing the persona…");
    };
    ws.onmessage = (e) => this.onMessage(e.data);
    ws.onerror = () => {
      if (!this.closed) this.fail("The websocket connection failed. Is the server running and reachable?");
    };
    ws.onclose = (e) => {
      if (this.closed) return;
      if (this.userClosed) return this.close();
      let msg;
      if (!this.live) {
        msg = "The server closed the connection before the conversation started" +
          (e.reason ? `: ${e.reason}` : ` (code ${e.code}).`);
      } else if (e.code !== 1000 && e.code !== 1001) {
        msg = `The connection was closed (code ${e.code}${e.reason ? `: ${e.reason}` : ""}).`;
      }
      if (msg && ui.error.hidden) showError(msg);
      this.close();
    };
    this.watchdog = setInterval(() => this.checkSilence(), 500);
  }

  async openAudio() {
    let ctx;
    try {
      ctx = new AudioContext({ sampleRate: RATE, latencyHint: "interactive" });
    } catch {
      ctx = new AudioContext({ latencyHint: "interactive" }); // the worklet resamples
    }
    this.ctx = ctx;
    await ctx.audioWorklet.addModule(new URL("./duplex-worklet.js", import.meta.url));
    try {
      this.stream = await navigator.mediaDevices.getUserMedia({
        audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1 },
        video: false,
      });
    } catch (err) {
      const name = err && err.name;
      if (name === "NotAllowedError" || name === "SecurityError") {
        throw new Error("Microphone access was denied. Allow the microphone for this page and try again.");
      }
      if (name === "NotFoundError") throw new Error("No microphone was found.");
      throw new Error(`Could not open the microphone: ${err.message || err}`);
    }
    if (this.closed) {
      for (const t of this.stream.getTracks()) t.stop();
      return;
    }
    let source;
    try {
      source = ctx.createMediaStreamSource(this.stream);
    } catch (err) {
      // Some browsers cannot connect a microphone to a context at another rate: use the device rate instead.
      await ctx.close();
      this.ctx = ctx = new AudioContext({ latencyHint: "interactive" });
      await ctx.audioWorklet.addModule(new URL("./duplex-worklet.js", import.meta.url));
      source = ctx.createMediaStreamSource(this.stream);
    }
    const targetMs = Number(ui.bufferMs.value) || 120;
    this.node = new AudioWorkletNode(ctx, "personaplex-duplex", {
      numberOfInputs: 1,
      numberOfOutputs: 1,
      outputChannelCount: [1],
      channelCount: 1,
      channelCountMode: "explicit",
      channelInterpretation: "speakers",
      processorOptions: { targetMs, maxMs: targetMs + 280 },
    });
    this.node.port.onmessage = (e) => this.onWorklet(e.data);
    source.connect(this.node);
    this.node.connect(ctx.destination);
    this.source = source;
    await ctx.resume();
  }

  send(kind, payload) {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return false;
    const msg = new Uint8Array(1 + (payload ? payload.length : 0));
    msg[0] = kind;
    if (payload) msg.set(payload, 1);
    this.ws.send(msg);
    this.stats.msgsOut++;
    this.stats.bytesOut += msg.length;
    return true;
  }

  onMessage(data) {
    if (this.closed) return;
    this.lastServerMessage = performance.now();
    if (!(data instanceof ArrayBuffer)) {
      console.warn("personaplex: ignoring a text websocket message", data);
      return;
    }
    const bytes = new Uint8Array(data);
    this.stats.msgsIn++;
    this.stats.bytesIn += bytes.length;
    if (!bytes.length) return;
    const payload = bytes.subarray(1);
    switch (bytes[0]) {
      case KIND.HANDSHAKE:
        this.onHandshake();
        break;
      case KIND.AUDIO:
        this.onAudio(payload);
        break;
      case KIND.TEXT: {
        const text = new TextDecoder().decode(payload);
        this.stats.textPieces++;
        appendTranscript(text);
        break;
      }
      case KIND.CONTROL:
        this.stats.controls.push(CONTROL_NAMES[payload[0]] ?? payload[0]);
        break;
      case KIND.METADATA:
        this.onMetadata(payload);
        break;
      case KIND.ERROR: {
        const text = new TextDecoder().decode(payload) || "The server reported an error.";
        showError(`Server error: ${text}`);
        break;
      }
      case KIND.PING:
        break; // keep-alive: receiving it already reset the silence timer
      default:
        console.warn("personaplex: unknown message kind", bytes[0]);
    }
  }

  onMetadata(payload) {
    let meta;
    try {
      meta = JSON.parse(new TextDecoder().decode(payload));
    } catch {
      console.warn("personaplex: bad metadata message");
      return;
    }
    this.stats.lastMetadata = meta;
    if (meta && typeof meta.queue_position === "number" && !this.live) {
      this.stats.queuePosition = meta.queue_position;
      setStatus(
        "queued",
        meta.queue_position > 0 ? `Waiting in queue — position ${meta.queue_position}` : "Preparing the persona…",
      );
    }
  }

  onHandshake() {
    if (this.live) return;
    this.live = true;
    this.stats.handshakeAt = performance.now();
    this.lastServerMessage = performance.now();
    setStatus("live", "Live — start talking");
    app.recorder.clear();
    this.startEncoder();
    this.node.port.postMessage({ type: "capture", on: true });
  }

  startEncoder() {
    const cfg = app.codec.encoderConfig;
    this.encodeRate = cfg.sampleRate;
    this.upsampler = cfg.sampleRate === RATE ? null : new StreamResampler(RATE, cfg.sampleRate);
    this.muxer = new OggOpusMuxer({ channels: 1, preSkip: PRE_SKIP_48K, inputSampleRate: RATE });
    for (const page of this.muxer.headerPages()) this.send(KIND.AUDIO, page);
    this.outPackets = [];
    this.encodedFrames = 0;
    this.encoder = new AudioEncoder({
      output: (chunk) => this.onEncoded(chunk),
      error: (e) => this.fail(`The Opus encoder failed: ${e.message || e}`),
    });
    this.encoder.configure(cfg);
    this.encTimestamp = 0;
  }

  onEncoded(chunk) {
    if (this.closed) return;
    const packet = new Uint8Array(chunk.byteLength);
    chunk.copyTo(packet);
    this.stats.framesEncoded++;
    this.outPackets.push(packet);
    if (this.outPackets.length < PACKETS_PER_PAGE) return;
    const packets = this.outPackets;
    this.outPackets = [];
    const page = this.muxer.audioPage(packets);
    if (this.ws && this.ws.bufferedAmount > MAX_WS_BUFFERED) {
      this.stats.micDroppedFrames += packets.length;
      return;
    }
    if (this.send(KIND.AUDIO, page)) {
      for (const p of packets) this.stats.sentMs += opusPacketSamples48k(p) / 48;
    }
  }

  onWorklet(msg) {
    if (msg.type === "stats") {
      this.playerStats = msg;
      setLevel(ui.agentLevel, msg.peak);
      return;
    }
    if (msg.type !== "frame" || this.closed) return;
    setLevel(ui.micLevel, Math.SQRT2 * rms(msg.mic));
    if (!this.live) return;
    app.recorder.append(msg.out, msg.mic);
    if (!this.encoder || this.encoder.state !== "configured") return;
    let data = msg.mic;
    if (this.upsampler) data = this.upsampler.process(data);
    if (!data.length) return;
    const audio = new AudioData({
      format: "f32",
      sampleRate: this.encodeRate,
      numberOfFrames: data.length,
      numberOfChannels: 1,
      timestamp: this.encTimestamp,
      data,
    });
    this.encTimestamp += Math.round((data.length / this.encodeRate) * 1e6);
    this.encoder.encode(audio);
    audio.close();
  }

  onAudio(payload) {
    if (!this.reader) this.reader = new OggReader();
    for (const page of this.reader.push(payload)) {
      for (const packet of page.packets) {
        const head = parseOpusHead(packet);
        if (head) {
          this.configureDecoder(packet, head);
          continue;
        }
        if (isOpusTags(packet)) continue;
        this.decodePacket(packet);
      }
    }
  }

  configureDecoder(headBytes, head) {
    if (this.decoder && this.decoder.state !== "closed") this.decoder.close();
    this.decodeTimestamp = 0;
    const errors = [];
    for (const base of app.codec.decoderConfigs) {
      for (const description of headBytes ? [headBytes, null] : [null]) {
        const cfg = { ...base, numberOfChannels: head ? head.channels : 1 };
        if (description) cfg.description = description;
        try {
          const dec = new AudioDecoder({
            output: (a) => this.onDecoded(a),
            error: (e) => {
              this.stats.decodeErrors++;
              console.warn("personaplex: decoder error", e);
              if (this.decoder === dec) this.decoder = null; // reconfigured on the next packet
            },
          });
          dec.configure(cfg);
          this.decoder = dec;
          this.stats.decoderConfig = { sampleRate: cfg.sampleRate, channels: cfg.numberOfChannels, opusHead: !!description };
          return;
        } catch (e) {
          errors.push(e.message || String(e));
        }
      }
    }
    this.fail(`Could not set up the Opus decoder: ${errors.join("; ")}`);
  }

  decodePacket(packet) {
    if (!this.decoder || this.decoder.state !== "configured") this.configureDecoder(null, null);
    if (!this.decoder) return;
    const samples48 = opusPacketSamples48k(packet);
    this.stats.packetsIn++;
    this.stats.receivedMs += samples48 / 48;
    if (this.stats.firstAudioMs == null && this.stats.handshakeAt != null) {
      this.stats.firstAudioMs = performance.now() - this.stats.handshakeAt;
    }
    const chunk = new EncodedAudioChunk({ type: "key", timestamp: this.decodeTimestamp, data: packet });
    this.decodeTimestamp += Math.round((samples48 / 48000) * 1e6) || 20000;
    try {
      this.decoder.decode(chunk);
    } catch (e) {
      this.stats.decodeErrors++;
      console.warn("personaplex: decode failed", e);
    }
  }

  onDecoded(audio) {
    try {
      if (this.closed) return;
      const n = audio.numberOfFrames;
      let pcm = new Float32Array(n);
      if (audio.format === "f32-planar" || (audio.format === "f32" && audio.numberOfChannels === 1)) {
        audio.copyTo(pcm, { planeIndex: 0 });
      } else {
        audio.copyTo(pcm, { planeIndex: 0, format: "f32-planar" });
      }
      this.stats.decodedRate = audio.sampleRate;
      if (audio.sampleRate !== RATE) {
        if (!this.downsampler || this.downsampler.inRate !== audio.sampleRate) {
          this.downsampler = new StreamResampler(audio.sampleRate, RATE);
        }
        pcm = this.downsampler.process(pcm);
      }
      this.stats.framesDecoded++;
      this.stats.samplesDecoded += pcm.length;
      if (pcm.length) this.node.port.postMessage({ type: "push", samples: pcm }, [pcm.buffer]);
    } finally {
      audio.close();
    }
  }

  checkSilence() {
    if (this.closed || !this.live) return;
    if (performance.now() - this.lastServerMessage > SILENCE_TIMEOUT_MS) {
      showError(`No data from the server for ${SILENCE_TIMEOUT_MS / 1000} s — the connection was closed.`);
      this.close();
    }
  }

  fail(message) {
    if (this.closed) return;
    showError(message);
    this.close();
  }

  stop() {
    this.userClosed = true;
    this.close();
  }

  close() {
    if (this.closed) return;
    this.closed = true;
    clearInterval(this.watchdog);
    if (this.ws && this.ws.readyState <= WebSocket.OPEN) {
      try {
        this.ws.close(1000, "client closed");
      } catch {}
    }
    for (const coder of [this.encoder, this.decoder]) {
      try {
        if (coder && coder.state !== "closed") coder.close();
      } catch {}
    }
    if (this.node) {
      this.node.port.postMessage({ type: "stop" });
      this.node.disconnect();
    }
    if (this.source) this.source.disconnect();
    if (this.stream) for (const t of this.stream.getTracks()) t.stop();
    if (this.ctx && this.ctx.state !== "closed") this.ctx.close().catch(() => {});
    if (app.session === this) app.session = null;
    if (ui.transcript.dataset.empty === "true") {
      clearTranscript(this.live ? "The agent said no words in this conversation." : "The agent's words appear here.");
    }
    setLevel(ui.micLevel, 0);
    setLevel(ui.agentLevel, 0);
    setStatus(ui.error.hidden ? "idle" : "error", ui.error.hidden ? "Disconnected" : "Disconnected (error)");
    app.lastStats = snapshotStats(this);
    renderStats();
  }
}

// ---------------------------------------------------------------- stats

function snapshotStats(s) {
  const p = s.playerStats || {};
  const outputLatencyMs = s.ctx ? 1000 * ((s.ctx.outputLatency || 0) + (s.ctx.baseLatency || 0)) : 0;
  const lagMs = Math.max(0, s.stats.sentMs - s.stats.receivedMs);
  return {
    state: app.state,
    live: s.live,
    durationMs: s.stats.handshakeAt != null ? performance.now() - s.stats.handshakeAt : 0,
    ...s.stats,
    controls: [...s.stats.controls],
    bufferedMs: p.bufferedMs ?? 0,
    targetMs: Number(ui.bufferMs.value),
    underruns: p.underruns ?? 0,
    underrunMs: p.underrunMs ?? 0,
    droppedMs: p.droppedMs ?? 0,
    playedMs: p.playedMs ?? 0,
    playerReceivedMs: p.receivedMs ?? 0,
    contextRate: p.contextRate ?? (s.ctx ? s.ctx.sampleRate : null),
    pipelineLagMs: lagMs,
    latencyMs: s.stats.receivedMs > 0 ? lagMs + (p.bufferedMs ?? 0) + outputLatencyMs : null,
    oggCrcErrors: s.reader ? s.reader.crcErrors : 0,
    recordedFrames: app.recorder.frames,
  };
}

function renderStats() {
  const s = app.session ? snapshotStats(app.session) : app.lastStats;
  if (app.session) app.lastStats = s;
  if (!s) return;
  const st = ui.stat;
  st.latency.textContent = s.live || s.latencyMs != null ? fmtMs(s.latencyMs) : "—";
  st.first.textContent = fmtMs(s.firstAudioMs);
  st.buffer.textContent = s.live ? `${fmtMs(s.bufferedMs)} (${s.targetMs})` : "—";
  st.underruns.textContent = `${s.underruns} · ${fmtMs(s.underrunMs)}`;
  st.dropped.textContent = fmtMs(s.droppedMs) + (s.micDroppedFrames ? ` · mic ${s.micDroppedFrames}` : "");
  st.frames.textContent = `${s.framesDecoded} / ${s.framesEncoded}`;
  st.messages.textContent = `${s.msgsIn} / ${s.msgsOut} (${Math.round(s.bytesIn / 1024)} / ${Math.round(s.bytesOut / 1024)} kB)`;
  st.duration.textContent = s.live || s.durationMs ? fmtDuration(s.durationMs) : "—";
}

// ---------------------------------------------------------------- actions

async function connect() {
  showError("");
  const prompt = ui.prompt.value.trim();
  if (!prompt) {
    showError("Write a text prompt (or pick a preset) first.");
    ui.prompt.focus();
    return;
  }
  if (!ui.voice.value) {
    showError("No voice is selected: the server did not list any voices.");
    return;
  }
  let params;
  try {
    params = collectParams();
  } catch (e) {
    showError(e.message);
    return;
  }
  try {
    localStorage.setItem("personaplex.voice", ui.voice.value);
  } catch {}
  clearTranscript(); // the previous recording stays downloadable until the new conversation goes live
  app.lastStats = null;
  const session = new Session(params);
  app.session = session;
  try {
    await session.start();
  } catch (e) {
    session.fail(e.message || String(e));
  }
}

function disconnect() {
  if (app.session) {
    setStatus("closing", "Disconnecting…");
    app.session.stop();
  }
}

function buildWav() {
  return app.recorder.toWav();
}

function download() {
  if (!app.recorder.frames) return;
  const blob = buildWav();
  const url = URL.createObjectURL(blob);
  const a = document.createElement("a");
  const stamp = new Date().toISOString().replace(/[:.]/g, "-").slice(0, 19);
  a.href = url;
  a.download = `personaplex-${stamp}.wav`;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

// ---------------------------------------------------------------- start-up

async function init() {
  renderPresets();
  ui.prompt.value = safeGet("personaplex.prompt") || PRESETS[0].text; // the server's default replaces it
  onPromptInput(false);
  ui.prompt.addEventListener("input", () => onPromptInput(true));
  ui.resetDefaults.addEventListener("click", applyDefaults);
  ui.connect.addEventListener("click", () => (app.session ? disconnect() : connect()));
  ui.download.addEventListener("click", download);
  window.addEventListener("beforeunload", () => app.session && app.session.stop());
  setStatus("idle", "Disconnected");
  const [problem] = await Promise.all([checkCodecSupport(), loadServerInfo()]);
  if (problem) {
    ui.supportBanner.textContent = problem;
    ui.supportBanner.hidden = false;
  }
  setStatus("idle", "Disconnected");
  setInterval(renderStats, 250);
  document.documentElement.dataset.ready = "true";
}

// A small scripting surface (used by the end-to-end test; handy from the console too).
window.personaplex = {
  get state() {
    return app.state;
  },
  get info() {
    return app.info;
  },
  get codec() {
    return app.codec;
  },
  stats: () => (app.session ? snapshotStats(app.session) : app.lastStats),
  transcript: () => (ui.transcript.dataset.empty === "true" ? "" : ui.transcript.textContent),
  socketOpen: () => !!(app.session && app.session.ws && app.session.ws.readyState === WebSocket.OPEN),
  decodePiece,
  connect,
  disconnect,
  buildWav,
  get presets() {
    return presets;
  },
};

init();
