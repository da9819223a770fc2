// diffstream live: sends camera / file / screen frames to the server and shows the
// restyled frames it sends back, over either transport:
// - WebSocket (the default): JPEG frames both ways, JSON messages and events as text;
// - WebRTC (a server started with --webrtc): the frames as a video stream published with
//   WHIP, the restyled stream played with WHEP, the same JSON messages on a data channel.
// Protocol: src/diffstream/server/protocol.py; WHIP/WHEP: src/diffstream/server/webrtc.py.
// Plain browser JavaScript, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const video = $("source");
const output = $("output");
const outputCtx = output.getContext("2d");
const restyled = $("restyled"); // plays the WebRTC stream (the WebSocket's frames go to `output`)
const capture = document.createElement("canvas");
const captureCtx = capture.getContext("2d");

const JPEG_QUALITY = 0.8;
// Frames waiting in the socket's send buffer beyond this are not sent: the server keeps
// only the newest frame anyway, so queueing more would only add latency.
const MAX_BUFFERED_BYTES = 512 * 1024;
const BUSY_RETRY_MS = 5000;
const MAX_RETRY_MS = 10000;
// WHIP/WHEP here take no trickled ICE candidates: an offer is sent once gathering is
// complete (host candidates only, no STUN: milliseconds), or after this long at most.
const ICE_GATHER_MS = 2000;
const PING_MS = 1000; // WebRTC: how often the data channel's round trip is timed

const state = {
  transport: "websocket", // or "webrtc": the choice the next connect() uses
  link: null, // the current connection, over either transport (see connect())
  retryTimer: null,
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
  latencies: [], // WebSocket: a frame's round trip, ms
  rtts: [], // WebRTC: a "ping"'s round trip on the data channel, ms
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
// One "link" at a time, over either transport: an object
//   {kind, closed, canSend(), sendText(text), backlogged(), sendFrame(), dispose(why), close(leaving)}
// made by openWebSocket() or openWebRTC(). Both hand the server's JSON events to
// linkEvent() and report their end to linkEnded(), so all the rest (the controls through
// send(), handleEvent, the busy / idle / reconnect logic, the stats) is the same for both.
function connect() {
  clearTimeout(state.retryTimer);
  state.idle = null;
  state.ready = false;
  state.busy = false;
  state.sendSeq = 0;
  state.sentAt.clear();
  state.lastDrawnId = -1;
  state.encoding = false;
  state.rtts = [];
  state.server = {};
  state.link = state.transport === "webrtc" ? openWebRTC() : openWebSocket();
  showOutput(state.link.kind);
}

function retryIn(ms) {
  clearTimeout(state.retryTimer);
  state.retryTimer = setTimeout(connect, ms);
}

function linkEvent(link, event) {
  if (link === state.link) handleEvent(event);
}

// The link is gone, or never came up: say why, and connect again unless the server closed
// the session as idle. `why.busy`: the server had no free session; `why.byServer`: the
// server ended it (nothing to DELETE); `why.detail`: shown.
function linkEnded(link, why = {}) {
  if (link.closed) return; // ended already, or closed by the page itself
  link.closed = true;
  link.dispose(why);
  if (link !== state.link) return;
  state.ready = false;
  if (state.idle) {
    // Reconnecting by itself would only hold a session for another idle period.
    setStatus(`Disconnected: ${state.idle} Choose a source or change a setting to reconnect.`, "idle");
    return;
  }
  if (state.busy || why.busy) {
    setStatus(`Server busy: all sessions are in use. Retrying in ${BUSY_RETRY_MS / 1000} s…`, "busy");
    retryIn(BUSY_RETRY_MS);
    return;
  }
  const seconds = Math.round(state.retryMs / 1000);
  const reason = state.fatal ? `Server error: ${state.fatal}` : `Disconnected from the server${why.detail ? ` (${why.detail})` : ""}`;
  setStatus(`${reason}. Reconnecting in ${seconds} s…`, "error");
  retryIn(state.retryMs);
  state.retryMs = Math.min(state.retryMs * 2, MAX_RETRY_MS);
}

// Send one JSON control message ("params", "reset", "ping", "image_prompt") over the
// current link, whichever transport it uses. Returns whether it went out.
function send(message) {
  const link = state.link;
  if (link && !link.closed && link.canSend() && state.ready) {
    try {
      link.sendText(JSON.stringify(message));
      return true;
    } catch (err) { // e.g. over the data channel's message size limit
      showError(`Could not send the ${message.type} message: ${err.message || err}`);
      return false;
    }
  }
  reconnectIfIdle(); // the settings are sent in full once the new session is ready
  return false;
}

function reconnectIfIdle() {
  if (state.idle && state.link && state.link.closed) connect();
}

// Switch transport (the select): end the current link first, so that its session is
// free again before the new one asks for one.
async function chooseTransport(kind) {
  const select = $("transport");
  select.disabled = true; // one switch at a time
  state.transport = kind;
  const old = state.link;
  state.link = null;
  clearTimeout(state.retryTimer);
  try {
    if (old && !old.closed) await old.close();
  } finally {
    select.disabled = false;
    connect();
  }
}

function showOutput(kind) {
  // WebSocket frames are drawn on the canvas; the WebRTC stream plays in a video element.
  output.hidden = kind === "webrtc";
  restyled.hidden = kind !== "webrtc";
  if (kind !== "webrtc") restyled.srcObject = null;
}

// --- the WebSocket transport ----------------------------------------------------------
function openWebSocket() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const ws = new WebSocket(`${scheme}//${location.host}/ws`);
  ws.binaryType = "arraybuffer";
  const gone = new Promise((resolve) => ws.addEventListener("close", resolve));
  const link = {
    kind: "websocket",
    closed: false,
    canSend: () => ws.readyState === WebSocket.OPEN,
    sendText: (text) => ws.send(text),
    // The JPEG encoder or the network is behind: the frame is skipped (counted).
    backlogged: () => state.encoding || ws.bufferedAmount > MAX_BUFFERED_BYTES,
    sendFrame: () => sendJpeg(link, ws),
    dispose: () => {},
    close: () => { link.closed = true; ws.close(); return gone; }, // resolves once closed
  };
  ws.onopen = () => { state.retryMs = 1000; };
  ws.onmessage = (event) => {
    if (typeof event.data === "string") linkEvent(link, JSON.parse(event.data));
    else if (link === state.link) handleFrame(event.data);
  };
  ws.onclose = (event) => linkEnded(link, { busy: event.code === 1013, detail: event.code ? `code ${event.code}` : "" });
  return link;
}

// --- the WebRTC transport (WHIP + WHEP) ---------------------------------------------------
function openWebRTC() {
  // What is published is the capture canvas (the source scaled to the server's size at
  // the page's max fps, as the WebSocket sends it): one track whatever the source, so a
  // new source needs no new negotiation. tick() asks for each frame (captureStream(0)).
  const track = capture.captureStream(0).getVideoTracks()[0];
  const link = {
    kind: "webrtc",
    closed: false,
    pc: null, // the publishing connection (WHIP): frames out, the data channel
    viewer: null, // the playing connection (WHEP): the restyled stream in
    channel: null,
    whip: null, // the resources to DELETE at the end
    whep: null,
    canSend: () => link.channel !== null && link.channel.readyState === "open",
    sendText: (text) => {
      // A data channel message has a size limit (aiortc's: 256 KB); say so in words.
      const max = link.pc.sctp && link.pc.sctp.maxMessageSize;
      const size = new Blob([text]).size;
      if (max && size > max) throw new Error(`it is ${size} bytes, the data channel takes at most ${max} (use a smaller image, or the WebSocket)`);
      link.channel.send(text);
    },
    backlogged: () => false, // the browser's encoder paces the stream itself
    sendFrame: () => { track.requestFrame(); state.sendSeq += 1; },
    dispose: (why) => releaseWebRTC(link, track, why.byServer ? "gone" : "ask"),
    close: (leaving) => { link.closed = true; return releaseWebRTC(link, track, leaving ? "leave" : "ask"); },
  };
  startWebRTC(link, track).catch((err) => {
    if (link.closed) return; // closed by the page meanwhile
    if (link === state.link) showError(`WebRTC: ${err.message || err}`);
    linkEnded(link, { detail: "WebRTC could not connect" });
  });
  return link;
}

async function startWebRTC(link, track) {
  // Publish: the data channel is created before the offer, so that the offer carries it.
  const pc = new RTCPeerConnection({ iceServers: [] });
  link.pc = pc;
  const channel = pc.createDataChannel("diffstream");
  link.channel = channel;
  channel.onopen = () => { state.retryMs = 1000; };
  channel.onmessage = (event) => linkEvent(link, JSON.parse(event.data));
  channel.onclose = () => linkEnded(link, { detail: "the server closed the connection", byServer: true });
  pc.onconnectionstatechange = () => {
    if (pc.connectionState === "failed") linkEnded(link, { detail: "connection failed" });
  };
  pc.addTransceiver(track, { direction: "sendonly" });
  const published = await postOffer(pc, "/whip");
  if (published.status !== 201) { await refused(link, "WHIP", published); return; }
  link.whip = published.headers.get("Location");
  if (link.closed) { releaseWebRTC(link, track, "ask"); return; } // closed while we waited: DELETE it
  const answer = await published.text();
  const playback = /<([^>]+)>/.exec(published.headers.get("Link") || "");
  if (!playback) throw new Error("the server's WHIP answer has no Link to its WHEP playback");
  await pc.setRemoteDescription({ type: "answer", sdp: answer });
  if (link.closed) return;

  // Play: a second connection that only receives, the restyled stream of this publication.
  const viewer = new RTCPeerConnection({ iceServers: [] });
  link.viewer = viewer;
  viewer.addTransceiver("video", { direction: "recvonly" });
  viewer.ontrack = (event) => showTrack(link, event.track);
  viewer.onconnectionstatechange = () => {
    if (viewer.connectionState === "failed") linkEnded(link, { detail: "playback connection failed" });
  };
  const watched = await postOffer(viewer, playback[1]);
  if (watched.status !== 201) { await refused(link, "WHEP", watched); return; }
  link.whep = watched.headers.get("Location");
  if (link.closed) { releaseWebRTC(link, track, "ask"); return; }
  await viewer.setRemoteDescription({ type: "answer", sdp: await watched.text() });
}

// Make an offer, wait until it holds every ICE candidate, POST it (WHIP or WHEP).
async function postOffer(pc, url) {
  await pc.setLocalDescription(await pc.createOffer());
  await new Promise((resolve) => {
    const check = () => { if (pc.iceGatheringState === "complete") resolve(); };
    pc.addEventListener("icegatheringstatechange", check);
    setTimeout(resolve, ICE_GATHER_MS);
    check();
  });
  return fetch(url, { method: "POST", headers: { "Content-Type": "application/sdp" }, body: pc.localDescription.sdp });
}

// A WHIP/WHEP POST that was refused: 503 with Retry-After is a busy server, shown as the
// WebSocket's "busy" event is; anything else is an error (a 503 without it: the model
// failed to load, which reconnecting will not fix by itself).
async function refused(link, what, response) {
  const text = (await response.text()).trim() || `${what} answered ${response.status}`;
  if (link.closed) return;
  if (response.status === 503 && response.headers.has("Retry-After")) {
    linkEvent(link, { type: "busy", message: text });
    linkEnded(link, { busy: true });
  } else {
    linkEvent(link, { type: "error", message: text, fatal: response.status === 503 });
    linkEnded(link, { detail: `${what} ${response.status}` });
  }
}

function showTrack(link, track) {
  if (link !== state.link) return;
  restyled.srcObject = new MediaStream([track]);
  restyled.play().catch(() => {});
  // The "frames" figure counts the frames shown, as the canvas counts the frames drawn.
  if (!restyled.requestVideoFrameCallback) return;
  const shown = () => {
    if (link !== state.link) return;
    state.framesDrawn += 1;
    restyled.requestVideoFrameCallback(shown);
  };
  restyled.requestVideoFrameCallback(shown);
}

// End a WebRTC link and both its connections. `how`: "ask" DELETEs the WHEP viewer, then
// the WHIP publication (the server frees the session at once; one after the other, as
// ending the publication ends its viewer too), then closes; "leave" (the page is going
// away, no time for answers) sends the WHIP DELETE without waiting and closes at once;
// "gone" (the server ended it) only closes. Resolves once done.
async function releaseWebRTC(link, track, how) {
  track.stop();
  const { whep, whip } = link;
  link.whep = link.whip = null;
  if (how === "leave" && whip) fetch(whip, { method: "DELETE", keepalive: true }).catch(() => {});
  if (how === "ask") {
    for (const url of [whep, whip]) {
      if (url) await fetch(url, { method: "DELETE" }).catch(() => {});
    }
  }
  for (const pc of [link.viewer, link.pc]) if (pc) pc.close();
}

// WebRTC frames carry no ids to time a round trip with, so "ping"s are timed instead
// (only while a source streams: a page that sends nothing must still go idle).
function ping() {
  const link = state.link;
  if (link && link.kind === "webrtc" && !link.closed && state.ready && state.sourceKind) {
    send({ type: "ping", t: performance.now() });
  }
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
    case "pong":
      if (typeof event.t === "number") {
        state.rtts.push(performance.now() - event.t);
        if (state.rtts.length > 10) state.rtts.shift();
      }
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
        .replace(/; (connect|publish) again to go on$/, ".");
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
  const how = state.link && state.link.kind === "webrtc" ? " over WebRTC" : "";
  return state.sourceKind ? `Connected${how}: streaming the ${state.sourceKind}.` : `Connected${how}. Choose a source: camera, video file or screen.`;
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
  const link = state.link;
  if (!link || link.closed || !link.canSend() || !state.ready) return;
  if (!state.sourceKind || video.readyState < 2 || !video.videoWidth) return;
  if (link.backlogged()) {
    state.localDrops += 1; // the network or the encoder is behind: skip this frame
    return;
  }
  const [w, h] = fitSize(video.videoWidth, video.videoHeight, state.size);
  if (capture.width !== w || capture.height !== h) {
    capture.width = w;
    capture.height = h;
  }
  captureCtx.drawImage(video, 0, 0, w, h);
  link.sendFrame();
}

// WebSocket: the capture canvas as one JPEG message (its id is the count of frames sent).
function sendJpeg(link, ws) {
  const live = () => link === state.link && !link.closed && ws.readyState === WebSocket.OPEN;
  state.encoding = true;
  capture.toBlob(async (blob) => {
    try {
      if (!blob || !live()) return;
      if (state.limits && blob.size > state.limits.max_frame_bytes) {
        showError(`A frame of ${blob.size} bytes is over the server's limit; lower the source resolution.`);
        return;
      }
      const buffer = await blob.arrayBuffer();
      if (!live()) return;
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
  $("transport").addEventListener("change", () => chooseTransport($("transport").value));
  // Leaving the page ends the session at once (WebRTC: DELETE, not a 30 s consent timeout).
  window.addEventListener("pagehide", () => { if (state.link && !state.link.closed) state.link.close(true); });
}

// --- statistics ---------------------------------------------------------------------
function median(values) {
  if (!values.length) return null;
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)];
}

function currentLatency() {
  if (state.link && state.link.kind === "webrtc") {
    // The server's time from a frame's arrival to its output, plus a data-channel round
    // trip; the video codecs and the jitter buffer add a little more.
    const rtt = median(state.rtts);
    const server = state.server.latency_ms;
    return rtt === null || typeof server !== "number" ? null : server + rtt;
  }
  return median(state.latencies); // a frame's own round trip
}

function renderStats() {
  // The output rate is measured by the server (diffstream.server.engine.output_rate, right
  // at any speed and tested there); null until the first output.
  const fps = state.server.fps;
  $("stat-fps").textContent = typeof fps === "number" ? fps.toFixed(fps < 10 ? 2 : 1) : "–";
  const latency = currentLatency();
  $("stat-latency").textContent = latency === null ? "–" : `${Math.round(latency)} ms`;
  const serverDropped = state.server.dropped || 0;
  $("stat-dropped").textContent = `${serverDropped + state.localDrops}`;
  $("stat-dropped").title = `${serverDropped} replaced by newer frames on the server, ${state.localDrops} not sent (network or encoder busy)`;
  $("stat-skipped").textContent = `${state.server.skipped || 0}`;
  $("stat-frames").textContent = `${state.framesDrawn}`;
  $("stat-received").textContent = `${state.server.received || 0}`;
  $("stat-clients").textContent = state.server.clients ? `${state.server.clients} / ${state.server.max_clients}` : "–";
}

// The transport choice is offered when the server has WebRTC (/api/info says so); the
// page starts on the WebSocket unless its address asks for ?transport=webrtc.
async function start() {
  const wanted = new URLSearchParams(location.search).get("transport");
  try {
    const info = await (await fetch("/api/info", { cache: "no-store" })).json();
    if (info.webrtc && typeof RTCPeerConnection === "function") {
      $("transport-choice").hidden = false;
      if (wanted === "webrtc") state.transport = "webrtc";
    } else if (wanted === "webrtc") {
      showError("WebRTC is not available (the server runs without --webrtc, or the browser lacks it): using the WebSocket.");
    }
  } catch (err) {
    // The server cannot be reached yet: the WebSocket's reconnect loop says so and retries.
  }
  $("transport").value = state.transport;
  connect();
}

bindControls();
start();
useCamera();
tick();
setInterval(renderStats, 500);
setInterval(ping, PING_MS);
