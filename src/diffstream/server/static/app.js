// diffstream live: sends camera / file / screen frames to the server over a WebSocket and
// draws the restyled frames it sends back. Protocol: src/diffstream/server/protocol.py.
// Plain browser JavaScript, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const video = $("source");
const output = $("output");
const outputCtx = output.getContext("2d");
const capture = document.createElement("canvas");
const captureCtx = capture.getContext("2d");

const JPEG_QUALITY = 0.8;
// Frames waiting in the socket's send buffer beyond this are not sent: the server keeps
// only the newest frame anyway, so queueing more would only add latency.
const MAX_BUFFERED_BYTES = 512 * 1024;
const BUSY_RETRY_MS = 5000;
const MAX_RETRY_MS = 10000;

const state = {
  ws: null,
  ready: false,
  busy: false,
  idle: null, // the server closed the session as idle: reconnect only when the user acts
  fatal: null, // a server error that reconnecting will not fix by itself (model failed to load)
  retryMs: 1000,
  size: 512, // the server's processing size: frames are scaled to it before sending
  limits: null,
  sendSeq: 0, // id of the next frame sent on this connection (the server counts the same way)
  sentAt: new Map(), // frame id -> performance.now() when sent
  encoding: false,
  lastDrawnId: -1,
  framesDrawn: 0,
  latencies: [],
  localDrops: 0,
  server: {},
  sourceKind: null,
  stream: null,
  objectUrl: null,
};

// --- status lines -------------------------------------------------------------------
function setStatus(text, kind) {
  const el = $("status");
  el.textContent = text;
  el.dataset.state = kind;
}

let errorTimer = null;
function showError(text, sticky = false) {
  const el = $("error");
  el.textContent = text;
  el.hidden = false;
  clearTimeout(errorTimer);
  if (!sticky) errorTimer = setTimeout(() => { el.hidden = true; }, 6000);
}

let noticeTimer = null;
function showNotice(text) {
  const el = $("notice");
  el.textContent = text;
  el.hidden = false;
  clearTimeout(noticeTimer);
  noticeTimer = setTimeout(() => { el.hidden = true; }, 3000);
}

function clearError() {
  $("error").hidden = true;
}

// --- connection ---------------------------------------------------------------------
function connect() {
  state.idle = null;
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const ws = new WebSocket(`${scheme}//${location.host}/ws`);
  ws.binaryType = "arraybuffer";
  state.ws = ws;
  state.ready = false;
  state.busy = false;
  state.sendSeq = 0;
  state.sentAt.clear();
  state.lastDrawnId = -1;
  state.encoding = false;
  ws.onopen = () => { state.retryMs = 1000; };
  ws.onmessage = (event) => {
    if (ws !== state.ws) return;
    if (typeof event.data === "string") handleEvent(JSON.parse(event.data));
    else handleFrame(event.data);
  };
  ws.onclose = (event) => {
    if (ws !== state.ws) return;
    state.ready = false;
    if (state.idle) {
      // Reconnecting by itself would only hold a session for another idle period.
      setStatus(`Disconnected: ${state.idle} Choose a source or change a setting to reconnect.`, "idle");
      return;
    }
    if (state.busy || event.code === 1013) {
      setStatus(`Server busy: all sessions are in use. Retrying in ${BUSY_RETRY_MS / 1000} s…`, "busy");
      setTimeout(connect, BUSY_RETRY_MS);
      return;
    }
    const seconds = Math.round(state.retryMs / 1000);
    const reason = state.fatal ? `Server error: ${state.fatal}` : `Disconnected from the server${event.code ? ` (code ${event.code})` : ""}`;
    setStatus(`${reason}. Reconnecting in ${seconds} s…`, "error");
    setTimeout(connect, state.retryMs);
    state.retryMs = Math.min(state.retryMs * 2, MAX_RETRY_MS);
  };
}

function send(message) {
  const ws = state.ws;
  if (ws && ws.readyState === WebSocket.OPEN && state.ready) {
    ws.send(JSON.stringify(message));
    return true;
  }
  reconnectIfIdle(); // the settings are sent in full once the new session is ready
  return false;
}

function reconnectIfIdle() {
  if (state.idle && state.ws && state.ws.readyState === WebSocket.CLOSED) connect();
}

function handleEvent(event) {
  switch (event.type) {
    case "ready":
      state.ready = true;
      state.fatal = null;
      state.size = event.params.size;
      state.limits = event.limits;
      fillMethods(event.methods, event.params.method);
      fillControlNets(event.controlnets || [], event.params.control_scales);
      $("ip-adapter").hidden = !event.ip_adapter;
      $("ip-scale").value = String(event.params.ip_adapter_scale);
      $("ip-scale-value").textContent = Number(event.params.ip_adapter_scale).toFixed(2);
      setStatus(event.state === "loading" ? "Connected. The model is loading…" : connectedText(), "ok");
      sendAllParams();
      break;
    case "status":
      if (event.methods) fillMethods(event.methods, $("method").value);
      if (event.state === "ready") setStatus(connectedText(), "ok");
      break;
    case "params":
      showApplied(event.params, event.restarted);
      break;
    case "reset":
      showNotice("Stream reset: temporal state cleared.");
      break;
    case "stats":
      state.server = event;
      break;
    case "error":
      showError(`Server: ${event.message}`, Boolean(event.fatal));
      if (event.fatal) {
        state.fatal = event.message;
        setStatus(`Server error: ${event.message}`, "error");
      }
      break;
    case "warning":
      showNotice(event.message);
      break;
    case "idle":
      state.idle = event.message.replace(/^session closed: /, "the server closed the session after ")
        .replace(/; connect again to go on$/, ".");
      break;
    case "busy":
      state.busy = true;
      setStatus(`${event.message}. Retrying in ${BUSY_RETRY_MS / 1000} s…`, "busy");
      break;
    default:
      break; // newer servers may send more event types; ignoring them keeps old pages working
  }
}

function connectedText() {
  return state.sourceKind ? `Connected: streaming the ${state.sourceKind}.` : "Connected. Choose a source: camera, video file or screen.";
}

function handleFrame(buffer) {
  if (buffer.byteLength < 5) return;
  const id = new DataView(buffer).getUint32(0);
  const receivedAt = performance.now();
  const blob = new Blob([new Uint8Array(buffer, 4)], { type: "image/jpeg" });
  createImageBitmap(blob).then((bitmap) => {
    // Decoding is asynchronous: never paint an older frame over a newer one.
    if (id < state.lastDrawnId) { bitmap.close(); return; }
    state.lastDrawnId = id;
    if (output.width !== bitmap.width || output.height !== bitmap.height) {
      output.width = bitmap.width;
      output.height = bitmap.height;
    }
    outputCtx.drawImage(bitmap, 0, 0);
    bitmap.close();
    state.framesDrawn += 1;
    const sent = state.sentAt.get(id);
    if (sent !== undefined) {
      state.latencies.push(receivedAt - sent);
      if (state.latencies.length > 30) state.latencies.shift();
    }
    // Ids at or below this one will never come back (they were dropped or are drawn).
    for (const key of state.sentAt.keys()) {
      if (key <= id) state.sentAt.delete(key); else break;
    }
  }).catch(() => showError("Could not decode a frame from the server."));
}

// --- sending frames -----------------------------------------------------------------
function fitSize(width, height, longer) {
  const scale = Math.min(1, longer / Math.max(width, height));
  return [Math.max(1, Math.round(width * scale)), Math.max(1, Math.round(height * scale))];
}

function maxFps() {
  const value = Number($("max-fps").value);
  return Number.isFinite(value) ? Math.min(30, Math.max(1, value)) : 15;
}

function tick() {
  setTimeout(tick, 1000 / maxFps());
  const ws = state.ws;
  if (!ws || ws.readyState !== WebSocket.OPEN || !state.ready) return;
  if (!state.sourceKind || video.readyState < 2 || !video.videoWidth) return;
  if (state.encoding || ws.bufferedAmount > MAX_BUFFERED_BYTES) {
    state.localDrops += 1; // the network or the encoder is behind: skip this frame
    return;
  }
  const [w, h] = fitSize(video.videoWidth, video.videoHeight, state.size);
  if (capture.width !== w || capture.height !== h) {
    capture.width = w;
    capture.height = h;
  }
  captureCtx.drawImage(video, 0, 0, w, h);
  state.encoding = true;
  capture.toBlob(async (blob) => {
    try {
      if (!blob || ws !== state.ws || ws.readyState !== WebSocket.OPEN) return;
      if (state.limits && blob.size > state.limits.max_frame_bytes) {
        showError(`A frame of ${blob.size} bytes is over the server's limit; lower the source resolution.`);
        return;
      }
      const buffer = await blob.arrayBuffer();
      if (ws !== state.ws || ws.readyState !== WebSocket.OPEN) return;
      ws.send(buffer);
      state.sentAt.set(state.sendSeq, performance.now());
      state.sendSeq += 1;
    } finally {
      state.encoding = false;
    }
  }, "image/jpeg", JPEG_QUALITY);
}

// --- sources ------------------------------------------------------------------------
function stopSource() {
  if (state.stream) state.stream.getTracks().forEach((track) => track.stop());
  state.stream = null;
  if (state.objectUrl) URL.revokeObjectURL(state.objectUrl);
  state.objectUrl = null;
  video.srcObject = null;
  video.removeAttribute("src");
}

function useStream(stream, kind) {
  stopSource();
  reconnectIfIdle();
  state.stream = stream;
  state.sourceKind = kind;
  video.srcObject = stream;
  video.play().catch(() => {});
  $("source-label").textContent = `(${kind})`;
  stream.getVideoTracks().forEach((track) => {
    track.addEventListener("ended", () => {
      if (state.stream !== stream) return;
      state.sourceKind = null;
      $("source-label").textContent = "(ended)";
      showError(`The ${kind} stopped. Choose a source again.`, true);
    });
  });
  clearError();
  if (state.ready) setStatus(connectedText(), "ok");
}

function mediaUnavailable() {
  return !window.isSecureContext || !navigator.mediaDevices;
}

const SECURE_HINT = "Camera and screen capture need a secure page: open http://127.0.0.1 or http://localhost "
  + "on the server's port (or https). A video file works anywhere.";

async function useCamera() {
  if (mediaUnavailable() || !navigator.mediaDevices.getUserMedia) { showError(SECURE_HINT, true); return; }
  try {
    const stream = await navigator.mediaDevices.getUserMedia({
      video: { width: { ideal: 640 }, height: { ideal: 480 } }, audio: false,
    });
    useStream(stream, "camera");
  } catch (err) {
    showError(cameraMessage(err), true);
    $("source-label").textContent = "(no camera)";
  }
}

function cameraMessage(err) {
  switch (err && err.name) {
    case "NotAllowedError":
    case "SecurityError":
      return "Camera permission denied: allow the camera for this page (icon in the address bar) and press Camera, or choose a video file.";
    case "NotFoundError":
    case "OverconstrainedError":
      return "No camera found: choose a video file or the screen instead.";
    case "NotReadableError":
    case "AbortError":
      return "The camera is in use by another program: close it and press Camera, or choose a video file.";
    default:
      return `Could not open the camera (${err && err.name ? err.name : err}): choose a video file or the screen.`;
  }
}

async function useScreen() {
  if (mediaUnavailable() || !navigator.mediaDevices.getDisplayMedia) { showError(SECURE_HINT, true); return; }
  try {
    useStream(await navigator.mediaDevices.getDisplayMedia({ video: true, audio: false }), "screen");
  } catch (err) {
    showError(err && err.name === "NotAllowedError" ? "Screen capture was cancelled or denied." : `Screen capture failed: ${err}`);
  }
}

function useFile(file) {
  if (!file) return;
  stopSource();
  reconnectIfIdle();
  state.objectUrl = URL.createObjectURL(file);
  video.src = state.objectUrl;
  video.loop = true;
  state.sourceKind = "video file";
  $("source-label").textContent = `(${file.name})`;
  video.play().then(clearError).catch(() => showError("This video file cannot be played by the browser: try an .mp4 or .webm.", true));
  if (state.ready) setStatus(connectedText(), "ok");
}

// --- controls -----------------------------------------------------------------------
function fillMethods(methods, current) {
  // Only the methods the server's model can run are offered.
  const select = $("method");
  const chosen = select.value;
  select.replaceChildren(...methods.map((name) => new Option(name, name)));
  select.value = methods.includes(chosen) ? chosen : current;
}

function sendImagePrompt(file) {
  // The image travels as a data: URI in an "image_prompt" message, checked by the server
  // like a frame (the server never reads a file or URL a page names).
  if (!file) return;
  if (state.limits && file.size > state.limits.max_frame_bytes) {
    showError(`The image prompt is ${file.size} bytes; the server accepts at most ${state.limits.max_frame_bytes}.`);
    return;
  }
  const reader = new FileReader();
  reader.onload = () => send({ type: "image_prompt", data: reader.result });
  reader.readAsDataURL(file);
}

function fillControlNets(kinds, scales) {
  // One slider per ControlNet of the server, in its order; a change sends every scale.
  const box = $("controlnets");
  box.replaceChildren(...kinds.map((kind, i) => {
    const label = document.createElement("label");
    const value = scales ? scales[i] : 1.0;
    label.append(`ControlNet ${kind} `);
    const slider = Object.assign(document.createElement("input"),
      { type: "range", min: "0", max: "2", step: "0.05", value: String(value), className: "control-scale" });
    const shown = Object.assign(document.createElement("output"), { textContent: Number(value).toFixed(2) });
    slider.addEventListener("input", () => { shown.textContent = Number(slider.value).toFixed(2); });
    slider.addEventListener("change", () => send({ type: "params", control_scales: controlScales() }));
    label.append(slider, shown);
    return label;
  }));
}

function controlScales() {
  const sliders = [...document.querySelectorAll("#controlnets .control-scale")];
  return sliders.length ? sliders.map((s) => Number(s.value)) : null;
}

function similarityValue() {
  return $("similarity-on").checked ? Number($("similarity").value) : null;
}

function readSeed() {
  // -1 asks the server for a random seed; the "params" answer shows the one it picked.
  const seed = Number($("seed").value);
  if (!Number.isInteger(seed) || seed < -1) {
    showError("Seed must be a whole number of 0 or more, or -1 for a random seed.");
    return null;
  }
  return seed;
}

function promptParams() {
  // The prompt alone, or mixed with the "Blend with" prompt by its weight (the server's
  // prompt_blend: [[prompt, 1 - w], [other, w]], linear or slerp on the text embeddings).
  const weight = Number($("blend-weight").value);
  const other = $("blend-prompt").value.trim();
  const blend = weight > 0 && other
    ? [[$("prompt").value, 1 - weight], [other, weight]]
    : null;
  return { prompt: $("prompt").value, prompt_blend: blend, blend: $("blend-mode").value };
}

function seedBlend(seed) {
  // The seed alone, or its noise mixed with the "Blend seed"'s by the weight (seed_blend).
  const weight = Number($("seed-weight").value);
  const other = Number($("blend-seed").value);
  if (!(weight > 0) || !Number.isInteger(other) || other < 0 || seed === null || seed < 0) return null;
  return [[seed, 1 - weight], [other, weight]];
}

function sendAllParams() {
  const message = {
    type: "params",
    ...promptParams(),
    method: $("method").value,
    strength: Number($("strength").value),
    similarity_threshold: similarityValue(),
  };
  const scales = controlScales();
  if (scales) message.control_scales = scales;
  if (!$("ip-adapter").hidden) message.ip_adapter_scale = Number($("ip-scale").value);
  const seed = readSeed();
  if (seed !== null) message.seed = seed;
  message.seed_blend = seedBlend(seed);
  send(message);
}

function showApplied(params, restarted) {
  const el = $("applied");
  el.dataset.prompt = params.prompt;
  $("method").value = params.method; // the server may have refused a method change
  const shown = params.prompt_blend
    ? params.prompt_blend.map(([text, w]) => `${Number(w).toFixed(2)} “${text}”`).join(" + ")
    : `“${params.prompt}”`;
  el.dataset.blend = params.prompt_blend ? JSON.stringify(params.prompt_blend) : "";
  el.textContent = `— ${shown} · ${params.method} · strength ${Number(params.strength).toFixed(2)} · seed ${params.seed}`
    + (restarted ? " (new stream)" : "");
}

function bindControls() {
  $("controls").addEventListener("submit", (event) => {
    event.preventDefault();
    send({ type: "params", ...promptParams() });
  });
  $("method").addEventListener("change", () => send({ type: "params", method: $("method").value }));
  $("strength").addEventListener("input", () => { $("strength-value").textContent = Number($("strength").value).toFixed(2); });
  $("strength").addEventListener("change", () => send({ type: "params", strength: Number($("strength").value) }));
  $("seed").addEventListener("change", () => {
    const seed = readSeed();
    if (seed !== null) send({ type: "params", seed });
  });
  $("similarity-on").addEventListener("change", () => {
    $("similarity").disabled = !$("similarity-on").checked;
    send({ type: "params", similarity_threshold: similarityValue() });
  });
  $("similarity").addEventListener("input", () => { $("similarity-value").textContent = Number($("similarity").value).toFixed(2); });
  $("similarity").addEventListener("change", () => send({ type: "params", similarity_threshold: similarityValue() }));
  $("ip-scale").addEventListener("input", () => { $("ip-scale-value").textContent = Number($("ip-scale").value).toFixed(2); });
  $("ip-scale").addEventListener("change", () => send({ type: "params", ip_adapter_scale: Number($("ip-scale").value) }));
  $("ip-image").addEventListener("change", (event) => sendImagePrompt(event.target.files[0]));
  $("seed-weight").addEventListener("input", () => { $("seed-weight-value").textContent = Number($("seed-weight").value).toFixed(2); });
  for (const id of ["seed-weight", "blend-seed"]) {
    $(id).addEventListener("change", () => send({ type: "params", seed_blend: seedBlend(readSeed()) }));
  }
  $("blend-weight").addEventListener("input", () => { $("blend-weight-value").textContent = Number($("blend-weight").value).toFixed(2); });
  for (const id of ["blend-weight", "blend-mode", "blend-prompt"]) {
    $(id).addEventListener("change", () => send({ type: "params", ...promptParams() }));
  }
  $("reset").addEventListener("click", () => send({ type: "reset" }));
  $("use-camera").addEventListener("click", useCamera);
  $("use-screen").addEventListener("click", useScreen);
  $("file").addEventListener("change", (event) => useFile(event.target.files[0]));
}

// --- statistics ---------------------------------------------------------------------
function median(values) {
  if (!values.length) return null;
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)];
}

function renderStats() {
  // The output rate is measured by the server (diffstream.server.engine.output_rate, right
  // at any speed and tested there); null until the first output.
  const fps = state.server.fps;
  $("stat-fps").textContent = typeof fps === "number" ? fps.toFixed(fps < 10 ? 2 : 1) : "–";
  const latency = median(state.latencies);
  $("stat-latency").textContent = latency === null ? "–" : `${Math.round(latency)} ms`;
  const serverDropped = state.server.dropped || 0;
  $("stat-dropped").textContent = `${serverDropped + state.localDrops}`;
  $("stat-dropped").title = `${serverDropped} replaced by newer frames on the server, ${state.localDrops} not sent (network or encoder busy)`;
  $("stat-skipped").textContent = `${state.server.skipped || 0}`;
  $("stat-frames").textContent = `${state.framesDrawn}`;
  $("stat-clients").textContent = state.server.clients ? `${state.server.clients} / ${state.server.max_clients}` : "–";
}

bindControls();
connect();
useCamera();
tick();
setInterval(renderStats, 500);
