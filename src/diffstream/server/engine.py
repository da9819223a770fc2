"""The live demo's session engine: one inference thread serving the sessions of a model.

Transport-free (no web framework): `diffstream.server.app` wires it to FastAPI's
WebSockets; a test or another transport can drive it directly. Messages for a client
leave through `Session.deliver`, which hands them to the session's asyncio event loop.

Design (see `diffstream.server.protocol` for the messages):
- one `Session` per WebSocket connection, each with its own `StreamPipeline` (its own
  stream batch, temporal state and settings); at most `max_clients` sessions, a further
  client gets a "busy" event and is closed (code 1013) instead of slowing everyone down;
- each session has a one-frame input slot: a frame that arrives while the previous one
  still waits replaces it (newest wins) and the replaced one is counted as dropped, so
  latency stays bounded by one frame of waiting plus the stream batch, never a queue;
- one inference `Engine` thread per model serves the sessions round-robin, one frame at
  a time. All model work happens on that thread: the sessions share one UNet, and a
  mechanism such as StreamV2V's feature bank installs its own attention processors on
  it, so two sessions must never run at the same time (the pipeline swaps processors
  when the owner changes; serialising keeps that swap safe);
- settings ("params"), "reset" and "ping" are validated on the event loop and carried
  out on the engine thread in order with the frames: a change applies from the first
  frame sent after it, without resetting temporal state (a method change does start a
  new stream: one method's state means nothing to another);
- the event loop only receives, checks headers and sends; decoding, inference and JPEG
  encoding run on the engine thread, and nothing on the per-frame path logs; an internal
  error (a bug, a model failure) goes to its client as an "error" event and to the
  server's log (logger "diffstream.server", with the traceback).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from diffstream import frames as F
from diffstream.config import METHODS, StreamConfig
from diffstream.errors import ConfigError, DiffstreamError
from diffstream.metrics.timing import percentile
from diffstream.server.protocol import (
    Limits,
    ProtocolError,
    apply_params,
    check_frame,
    pack_output,
    public_params,
    resolve_seed,
)

log = logging.getLogger("diffstream.server")

# Outgoing messages waiting for a slow client; beyond it output frames are dropped.
SEND_QUEUE = 32
# Recent outputs the stats are computed over (latency percentiles, output rate).
STATS_WINDOW = 64
# The output rate counts about this many seconds of outputs (see `output_rate`).
FPS_WINDOW_SECONDS = 2.0


@dataclass
class _Frame:
    id: int
    received: float  # time.monotonic() at arrival
    data: bytes


@dataclass
class _Op:
    next_id: int  # the id the next frame will get: the op applies before that frame
    kind: str  # "params" | "reset" | "ping"
    payload: dict = field(default_factory=dict)


class Session:
    """One client's stream: its input slot, pending operations, counters and pipeline.

    Fields marked "engine" are touched only by the engine thread; the others are guarded
    by the engine's lock.
    """

    def __init__(self, session_id: int, loop: asyncio.AbstractEventLoop, config: StreamConfig):
        self.id = session_id
        self.loop = loop
        self.outbox: asyncio.Queue = asyncio.Queue(maxsize=SEND_QUEUE)
        # What the config will be once every accepted change is applied (event loop).
        self.requested = config
        # When the client last sent anything, frame or text (event loop; idle timeout).
        self.last_message = time.monotonic()
        # Shared state (engine lock).
        self.slot: _Frame | None = None
        self.ops: deque[_Op] = deque()
        self.closed = False
        self.received = 0
        self.dropped = 0
        self.rejected = 0
        self.processed = 0
        self.outputs = 0
        self.send_dropped = 0
        self.skipped = 0
        self.latencies: deque[float] = deque(maxlen=STATS_WINDOW)
        self.output_times: deque[float] = deque(maxlen=STATS_WINDOW)
        self.started: float | None = None  # time.monotonic() of the first accepted frame
        # Engine-thread state.
        self.applied = config
        self.pipe = None
        self.inputs: dict[int, _Frame] = {}  # pipeline frame index -> input frame
        self.skipped_before = 0  # similarity-filter skips of pipelines already reset

    @property
    def has_work(self) -> bool:
        """Whether the engine has something to do for this session."""
        return self.slot is not None or bool(self.ops)

    def deliver(self, item) -> bool:
        """Queue a message for the client from any thread; False if it had to be dropped."""

        def put():
            try:
                self.outbox.put_nowait(item)
            except asyncio.QueueFull:
                if isinstance(item, (bytes, bytearray)):
                    self.send_dropped += 1  # a late output frame is worth less than a fresh one

        try:
            self.loop.call_soon_threadsafe(put)
        except RuntimeError:  # the event loop is gone: the server is shutting down
            return False
        return True


class Engine:
    """The inference thread of one model and the sessions it serves.

    Args:
        components_or_factory: loaded `Components`, or a function returning them (called
            on the engine thread, so the server can start while the model loads).
        base_config: the settings a new session starts with (its `size` is the server's).
        max_clients: sessions served at once.
        jpeg_quality: quality of the output JPEGs.
        pipeline_factory: builds a session's pipeline from (components, config);
            default `diffstream.pipelines.factory.make_pipeline`.
    """

    def __init__(
        self,
        components_or_factory,
        base_config: StreamConfig,
        max_clients: int = 4,
        jpeg_quality: int = 80,
        pipeline_factory: Callable | None = None,
    ):
        self.base_config = base_config
        self.load_error: str | None = None
        # Until the model is there every known method is offered; see probe_methods.
        self.methods: tuple[str, ...] = tuple(METHODS)
        self.unavailable: dict[str, str] = {}
        if callable(components_or_factory) and not hasattr(components_or_factory, "unet"):
            self._factory, self.components = components_or_factory, None
            self.state = "loading"
        else:
            self._factory, self.components = None, components_or_factory
            self.state = "ready"
            # This engine's thread has not started, so no stream of it runs on the UNet yet.
            self.methods, self.unavailable = probe_methods(self.components, base_config)
        self.max_clients = int(max_clients)
        self.jpeg_quality = int(jpeg_quality)
        if pipeline_factory is None:
            from diffstream.pipelines.factory import make_pipeline

            pipeline_factory = make_pipeline
        self._pipeline_factory = pipeline_factory
        self._cond = threading.Condition()
        self._sessions: list[Session] = []
        self._closing: list[Session] = []
        self._next = 0
        self._ids = itertools.count(1)
        self._stop = False
        self._thread: threading.Thread | None = None

    # --- lifecycle (any thread) -------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread (idempotent)."""
        with self._cond:
            if self._thread is not None:
                return
            self._stop = False
            self._thread = threading.Thread(target=self._run, name="diffstream-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the engine thread after the frame it is on and release every pipeline."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                return  # still inside a frame: its pipelines are not ours to touch (daemon thread)
        with self._cond:
            self._thread = None
            sessions = self._sessions + self._closing
            self._sessions, self._closing = [], []
        for session in sessions:
            self._release(session)

    @property
    def turbo(self) -> bool:
        """Whether the loaded model is a turbo model (False while it loads)."""
        return bool(self.components is not None and getattr(self.components, "turbo", False))

    @property
    def clients(self) -> int:
        """Sessions currently open."""
        with self._cond:
            return len(self._sessions)

    @property
    def sessions(self) -> list[Session]:
        """A snapshot of the open sessions, oldest first."""
        with self._cond:
            return list(self._sessions)

    # --- sessions (event loop) --------------------------------------------------------
    def open_session(self, loop: asyncio.AbstractEventLoop) -> Session | None:
        """A new session, or None when `max_clients` are already served."""
        with self._cond:
            if len(self._sessions) >= self.max_clients:
                return None
            config = self.base_config
            if self.methods and config.method not in self.methods:
                # e.g. a model with motion modules runs live2diff only: start every
                # session on a method that works instead of failing every frame
                config = config.replace(method=self.methods[0])
            session = Session(next(self._ids), loop, config)
            self._sessions.append(session)
            return session

    def close_session(self, session: Session) -> None:
        """Forget a session; the engine thread releases its pipeline."""
        with self._cond:
            if session.closed:
                return
            session.closed = True
            session.slot = None
            session.ops.clear()
            if session in self._sessions:
                self._sessions.remove(session)
            self._closing.append(session)
            self._cond.notify_all()

    def put_frame(self, session: Session, data: bytes, limits: Limits) -> None:
        """Take a frame message: check it, then put it in the session's slot (newest wins).

        Raises:
            ProtocolError: the frame is rejected (it still consumed an id).
        """
        with self._cond:
            frame_id = session.received
            session.received += 1
        try:
            check_frame(data, limits)
        except ProtocolError as err:
            with self._cond:
                session.rejected += 1
            raise ProtocolError(f"frame {frame_id} rejected: {err}") from None
        frame = _Frame(frame_id, time.monotonic(), data)
        with self._cond:
            if session.closed:
                return
            if session.slot is not None:
                session.dropped += 1  # the engine never got to it: a newer frame is here
            if session.started is None:
                session.started = frame.received
            session.slot = frame
            self._cond.notify_all()

    def put_control(self, session: Session, message: dict) -> None:
        """Queue a validated control message to run before the next frame sent after it.

        Raises:
            ProtocolError: the params are out of range for this stream.
        """
        kind = message["type"]
        payload = {}
        if kind == "params":
            changes = dict(message["changes"])
            if "seed" in changes:
                # -1 is a random seed, picked here so every later message and the
                # "params" answer carry the seed actually used.
                changes["seed"] = resolve_seed(changes["seed"])
            method = changes.get("method")
            if method is not None and method not in self.methods:
                reason = self.unavailable.get(method, "unknown method")
                raise ProtocolError(
                    f"method {method} is not available with this model ({reason}); "
                    f"choose from {', '.join(self.methods)}"
                )
            if "ip_adapter_image" in changes and getattr(self.components, "ip_adapter", None) is None:
                raise ProtocolError("this server has no IP-Adapter (start it with --ip-adapter) for an image prompt")
            scales = changes.get("control_scales")
            count = len(getattr(self.components, "controlnets", ()) or ())
            if scales is not None and len(scales) != count:
                raise ProtocolError(f"control_scales needs one scale per ControlNet of this server ({count}), "
                                    f"got {len(scales)}")
            # Check against the settings as they will be, so consecutive changes compose.
            session.requested = apply_params(session.requested, changes, self.turbo)
            payload = {"changes": changes}
            for field in ("prompt", "negative_prompt"):
                if changes.get(field) and self.components is not None:
                    self._warn_long_prompt(session, changes[field])
        elif kind == "ping":
            payload = {"t": message.get("t")}
        with self._cond:
            if session.closed:
                return
            session.ops.append(_Op(session.received, kind, payload))
            self._cond.notify_all()

    def broadcast(self, message: dict) -> list[tuple[int, str]]:
        """Queue a validated "params" or "reset" message on every open session, as if
        each client had sent it (an OSC controller steers every stream of the server).
        A "params" change also becomes the default of sessions opened later.

        Event loop only (like `put_control`). A change that is out of range for one
        session's own settings (its strength against the new steps, say) is refused for
        that session alone, which gets an "error" event.

        Args:
            message: {"type": "params", "changes": {...}} or {"type": "reset"}.
        Returns:
            (session id, one-line reason) for each session that refused the change.
        """
        if message["type"] == "params":
            try:
                base = apply_params(self.base_config, message["changes"], self.turbo)
            except ProtocolError:
                base = self.base_config  # the sessions' own settings decide below
            with self._cond:
                self.base_config = base
        refused = []
        for session in self.sessions:
            try:
                self.put_control(session, message)
            except ProtocolError as err:
                with self._cond:
                    session.rejected += 1
                refused.append((session.id, str(err)))
                session.deliver({"type": "error", "message": f"a controller's change was not applied: {err}"})
        return refused

    def _warn_long_prompt(self, session: Session, prompt: str) -> None:
        """Tell the client (and, once per prompt, the server log) that CLIP cuts `prompt`."""
        from diffstream.models.tokenizer import truncation_note

        note = truncation_note(self.components.tokenizer, prompt)
        if note is None:
            return
        session.deliver({"type": "warning", "message": note})
        warned = self.__dict__.setdefault("_warned_prompts", set())
        if prompt not in warned:
            warned.add(prompt)
            log.warning("session %d: %s", session.id, note)

    def count_rejected(self, session: Session) -> None:
        """Count a rejected control message."""
        with self._cond:
            session.rejected += 1

    def stats(self, session: Session, now: float | None = None) -> dict:
        """The session's counters and recent speed, for the "stats" and "pong" events.

        "fps" is the session's output rate (`output_rate`; None before the first output),
        "latency_ms" / "latency_p95_ms" the time from a frame's arrival to its output.
        `now` (a time.monotonic() value) is for tests.
        """
        now = time.monotonic() if now is None else now
        with self._cond:
            latencies = list(session.latencies)
            fps = output_rate(session.output_times, now, start=session.started, total=session.outputs)
            stats = {
                "received": session.received,
                "processed": session.processed,
                "outputs": session.outputs,
                "dropped": session.dropped,
                "rejected": session.rejected,
                "skipped": session.skipped,
                "send_dropped": session.send_dropped,
                "pending": int(session.slot is not None),
                "clients": len(self._sessions),
                "max_clients": self.max_clients,
            }
        stats["fps"] = round(fps, 2) if fps is not None else None
        p50, p95 = percentile(latencies, 50), percentile(latencies, 95)
        stats["latency_ms"] = round(p50 * 1000, 1) if p50 is not None else None
        stats["latency_p95_ms"] = round(p95 * 1000, 1) if p95 is not None else None
        return stats

    # --- the engine thread --------------------------------------------------------------
    def _run(self) -> None:
        if self._factory is not None and not self._load():
            return
        while True:
            with self._cond:
                while not self._stop and not self._closing and not any(s.has_work for s in self._sessions):
                    self._cond.wait()
                if self._stop:
                    return
                closing, self._closing = self._closing, []
                session = self._pick()
                frame = ops = None
                if session is not None:
                    frame, session.slot = session.slot, None
                    ops = list(session.ops)
                    session.ops.clear()
            for gone in closing:
                self._release(gone)
            if session is not None:
                self._serve(session, frame, ops)

    def _load(self) -> bool:
        """Call the components factory; tell every session how it went."""
        try:
            components = self._factory()
        except Exception as err:  # any failure to load ends the same way: a clear message
            with self._cond:
                self.state, self.load_error = "failed", f"model failed to load: {_one_line(err)}"
                sessions = list(self._sessions)
            log.error("%s", self.load_error, exc_info=not isinstance(err, DiffstreamError))
            for session in sessions:
                session.deliver({"type": "error", "message": self.load_error, "fatal": True})
            return False
        methods, unavailable = probe_methods(components, self.base_config)
        with self._cond:
            self.components, self.state = components, "ready"
            self.methods, self.unavailable = methods, unavailable
            sessions = list(self._sessions)
        for session in sessions:
            session.deliver({"type": "status", "state": "ready", "methods": list(methods)})
        return True

    def _pick(self) -> Session | None:
        """The next session with work, round-robin (caller holds the lock)."""
        n = len(self._sessions)
        for k in range(n):
            i = (self._next + k) % n
            if self._sessions[i].has_work:
                self._next = (i + 1) % n
                return self._sessions[i]
        return None

    def _serve(self, session: Session, frame: _Frame | None, ops: list[_Op]) -> None:
        """Run a session's operations and frame in arrival order."""
        split = len(ops) if frame is None else sum(1 for op in ops if op.next_id <= frame.id)
        for op in ops[:split]:
            self._guarded(session, self._apply_op, session, op)
        if frame is not None:
            self._guarded(session, self._process, session, frame)
        for op in ops[split:]:
            self._guarded(session, self._apply_op, session, op)

    def _guarded(self, session: Session, fn, *args) -> None:
        """Keep the engine alive whatever one session's work raises."""
        try:
            fn(*args)
        except ConfigError as err:
            session.deliver({"type": "error", "message": _one_line(err)})
        except Exception as err:  # a bug or a model error must not stop other clients
            message = f"internal error: {type(err).__name__}: {_one_line(err)}"
            # The client sees one line; whoever runs the server needs the traceback.
            log.error("session %d: %s", session.id, message, exc_info=True)
            session.deliver({"type": "error", "message": message})

    def _apply_op(self, session: Session, op: _Op) -> None:
        if op.kind == "ping":
            session.deliver({"type": "pong", "t": op.payload.get("t"), "stats": self.stats(session)})
            return
        if op.kind == "reset":
            self._reset_pipe(session, close=False)
            session.deliver({"type": "reset"})
            return
        changes = dict(op.payload["changes"])
        new = session.applied.replace(**changes)
        restarted = new.method != session.applied.method and session.pipe is not None
        if new.method != session.applied.method:
            # A different mechanism: the next frame starts a new stream with a new pipeline.
            self._reset_pipe(session, close=True)
        else:
            changes.pop("method", None)
            if session.pipe is not None and changes:
                session.pipe.update(**changes)
        session.applied = new
        session.deliver({"type": "params", "params": public_params(new), "restarted": restarted})

    def _reset_pipe(self, session: Session, close: bool) -> None:
        pipe = session.pipe
        if pipe is None:
            return
        session.skipped_before += pipe.skipped
        session.inputs.clear()
        if close:
            pipe.close()
            session.pipe = None
        else:
            pipe.reset()

    def _process(self, session: Session, frame: _Frame) -> None:
        try:
            image = F.decode_image_bytes(frame.data)
        except ValueError as err:
            with self._cond:
                session.rejected += 1
            session.deliver({"type": "error", "message": f"frame {frame.id} rejected: {err}"})
            return
        if session.pipe is None:
            session.pipe = self._pipeline_factory(self.components, session.applied)
            notices = getattr(session.pipe, "on_notice", None)
            if notices is not None:  # e.g. a compiled model building graphs: this client's next frames are slow
                notices.append(lambda line: session.deliver({"type": "warning", "message": line}))
        pipe = session.pipe
        session.inputs[pipe.frames_in] = frame
        try:
            # Every output that is ready: a warmup or a filter skip can finish several.
            outs = pipe.process(image)
        except Exception:
            # A push that failed half-way leaves the stream state in doubt: start afresh.
            self._reset_pipe(session, close=True)
            raise
        with self._cond:
            session.processed += 1
            session.skipped = session.skipped_before + pipe.skipped
        # Outputs leave in input order: the k-th of these is number frames_out - len + k.
        first = pipe.frames_out - len(outs)
        for k, out in enumerate(outs):
            source = session.inputs.pop(first + k, None)
            frame_id = source.id if source is not None else frame.id
            message = pack_output(frame_id, F.encode_jpeg(out, self.jpeg_quality))
            now = time.monotonic()
            with self._cond:
                session.outputs += 1
                session.output_times.append(now)
                if source is not None:
                    session.latencies.append(now - source.received)
            session.deliver(message)

    def _release(self, session: Session) -> None:
        """Close a finished session's pipeline (restores the UNet's processors)."""
        if session.pipe is not None:
            try:
                session.pipe.close()
            finally:
                session.pipe = None
                session.inputs.clear()


def output_rate(
    times, now: float, *, start: float | None = None, total: int | None = None, window: float = FPS_WINDOW_SECONDS
) -> float | None:
    """Outputs per second over about the last `window` seconds, right at any speed.

    Counts the n outputs after a reference time t0 over the time they took, t_last - t0.
    t0 is the last output at least `window` old; failing that, the oldest one remembered
    when older ones were forgotten; failing that, the stream's start (its first input).
    So evenly spaced outputs read as their exact rate at 0.2 frames/s or 140, whenever
    it is asked; a burst (Live2Diff's warmup emits 8 frames at once) counts over the time
    it took to make, not the milliseconds between its frames; and once outputs stop, the
    time since the last one counts as soon as it exceeds the mean gap, so the figure falls.

    Args:
        times: the most recent output times (ascending; maybe only the last few).
        now: the current time, on the same clock.
        start: when the stream began, the reference before its first output.
        total: outputs there have been in all (more than len(times) when some were forgotten).
    Returns:
        outputs per second, or None before the first output (nothing to measure).
    """
    times = list(times)
    if not times:
        return None
    total = len(times) if total is None else total
    last = len(times) - 1
    ref = next((i for i in range(last, -1, -1) if times[i] <= now - window), None)
    if ref == last:  # nothing in the window: rate over the last gap and the silence since
        ref = last - 1 if last >= 1 else None
        if ref is None and (start is None or total > len(times)):
            return None
    if ref is not None:
        t0, n = times[ref], last - ref
    elif total > len(times) or start is None:
        t0, n = times[0], last
    else:
        t0, n = start, len(times)
    span = times[-1] - t0
    if n == 0:
        return None
    elapsed = max(span, now - t0 - span / n)
    return n / elapsed if elapsed > 0 else None


def _one_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name if it has none)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def probe_methods(components, base_config: StreamConfig) -> tuple[tuple[str, ...], dict[str, str]]:
    """Which methods this model can run: each method's mechanism is installed on the UNet
    once and removed again (a method that needs motion modules fails on a plain UNet).

    Returns:
        (usable method names in METHODS order, {unusable method: one-line reason}).
    """
    from diffstream.pipelines.factory import make_mechanism

    usable, reasons = [], {}
    for method in METHODS:
        try:
            mechanism = make_mechanism(base_config.replace(method=method), components)
            if mechanism is not None:
                with mechanism.attach(components.unet):
                    pass
        except Exception as err:  # whatever stops a mechanism from installing makes it unusable here
            reasons[method] = _one_line(err)
            continue
        usable.append(method)
    return tuple(usable), reasons
