"""The live web demo's transport: FastAPI routes and the WebSocket loops of a session.

    app = create_app(load_components(ModelConfig(model="tiny")), size=256, max_clients=4)
    uvicorn.run(app, host="127.0.0.1", port=7860)

The sessions, their one-frame slots and the inference thread live in
`diffstream.server.engine`; the messages and their checks in `diffstream.server.protocol`.
Here: the page's files (read once from the package, never from a request path), the
server facts at /api/info, and per WebSocket a receive loop (checks and hands messages to
the engine), a send loop (the socket's only writer) and a stats loop.
"""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Callable

from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from diffstream.config import StreamConfig
from diffstream.errors import ConfigError
from diffstream.metrics.timing import current_rss_bytes
from diffstream.server.engine import Engine, Session
from diffstream.server.protocol import (
    PROTOCOL_VERSION,
    Limits,
    ProtocolError,
    is_loopback,  # noqa: F401  (server/serve.py imported it from here; import it from protocol)
    origin_allowed,
    parse_control,
    public_params,
)

# Close codes (RFC 6455 / IANA registry).
CLOSE_POLICY = 1008  # cross-site page tried to connect
CLOSE_INTERNAL = 1011  # the model failed to load
CLOSE_TRY_AGAIN = 1013  # all sessions are in use
CLOSE_NORMAL = 1000  # the session was idle for too long (an "idle" event says so first)
# Seconds without any message from a client before its session is closed: an open but
# silent tab must not hold one of the `max_clients` sessions forever.
DEFAULT_IDLE_TIMEOUT = 60.0
STATIC_FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}


@dataclass(frozen=True)
class _CloseSocket:
    """Put last in a session's outbox: the send loop closes the socket and ends."""

    code: int
    reason: str


def _read_static() -> dict[str, bytes]:
    """The page's files, read once from the package (never from a request path)."""
    root = resources.files("diffstream.server") / "static"
    return {name: (root / name).read_bytes() for name in STATIC_FILES}


def create_app(
    components_or_factory,
    *,
    size: int = 512,
    max_clients: int = 4,
    limits: Limits | None = None,
    jpeg_quality: int = 80,
    stats_interval: float = 0.5,
    base_config: StreamConfig | None = None,
    pipeline_factory: Callable | None = None,
    allowed_origins: tuple[str, ...] = (),
    idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
    webrtc: bool = False,
    host: str = "127.0.0.1",
    osc=None,
):
    """Build the live demo app.

    Args:
        components_or_factory: loaded `Components`, or a zero-argument function that
            loads them (called on the engine thread at startup).
        size: longer side of the processing size, the same for every client.
        max_clients: sessions served at once; more get a "busy" event.
        limits: per-message limits (frame bytes and pixels, text length).
        jpeg_quality: quality of output frames (1-100).
        stats_interval: seconds between "stats" events of each session.
        base_config: the settings a new session starts with (default: StreamConfig()).
        pipeline_factory: builds a pipeline from (components, config).
        allowed_origins: extra browser origins allowed to connect (e.g. behind a proxy).
        idle_timeout: seconds a client may send nothing before its session is closed
            (it gets an "idle" event first) and given to the next client; None: never.
        webrtc: also serve WHIP ingest and WHEP playback (`diffstream.server.webrtc`;
            needs aiortc).
        host: the address the server listens on; WebRTC's ICE candidates use it.
        osc: a bound, not yet started `diffstream.server.osc.OSCControl`: its messages
            change every open session from its next frame (`Engine.broadcast`) and the
            settings later sessions start with; the app starts it and closes it.
    Returns:
        a FastAPI app; its engine is `app.state.engine`.
    Raises:
        ConfigError: an invalid setting.
    """
    if max_clients < 1:
        raise ConfigError(f"--max-clients must be >= 1, got {max_clients}")
    if not 1 <= int(jpeg_quality) <= 100:
        raise ConfigError(f"--jpeg-quality must be between 1 and 100, got {jpeg_quality}")
    if stats_interval <= 0:
        raise ConfigError(f"stats_interval must be > 0, got {stats_interval}")
    if idle_timeout is not None and not idle_timeout > 0:
        raise ConfigError(f"--idle-timeout must be > 0 seconds, got {idle_timeout}")
    limits = limits or Limits()
    base = (base_config or StreamConfig()).replace(size=int(size))
    engine = Engine(components_or_factory, base, max_clients, jpeg_quality, pipeline_factory)
    if base.method not in engine.methods:
        raise ConfigError(f"--method {base.method} cannot run on this model: {engine.unavailable.get(base.method)}")
    static = _read_static()
    allowed = tuple(allowed_origins)
    gateway = None
    if webrtc:
        from diffstream.server.webrtc import WebRTCGateway

        gateway = WebRTCGateway(engine, limits, ice_host=host, stats_interval=stats_interval,
                                idle_timeout=idle_timeout)

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        osc_task = None
        try:
            if osc is not None:
                osc_task = _start_osc(engine, osc)
            yield
        finally:
            if osc is not None:
                if osc_task is not None:
                    osc_task.cancel()
                    await asyncio.gather(osc_task, return_exceptions=True)
                osc.close()
            if gateway is not None:
                await gateway.close()
            await asyncio.to_thread(engine.stop)

    app = FastAPI(title="diffstream live", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.state.limits = limits
    app.state.webrtc = gateway

    def static_response(name: str) -> Response:
        headers = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
        if name == "index.html":
            headers["Content-Security-Policy"] = (
                "default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob: mediastream:; "
                "connect-src 'self' ws: wss:; frame-ancestors 'none'"
            )
        return Response(static[name], media_type=STATIC_FILES[name] + "; charset=utf-8", headers=headers)

    @app.get("/", include_in_schema=False)
    async def index():
        """The demo page."""
        return static_response("index.html")

    @app.get("/app.js", include_in_schema=False)
    async def app_js():
        """The page's script."""
        return static_response("app.js")

    @app.get("/style.css", include_in_schema=False)
    async def style_css():
        """The page's style sheet."""
        return static_response("style.css")

    @app.get("/api/info")
    async def info():
        """Server facts for clients and monitoring: model state, sessions, limits, memory."""
        return JSONResponse(
            {
                "protocol": PROTOCOL_VERSION,
                "model": getattr(engine.components, "name", None),
                "state": engine.state,
                "methods": list(engine.methods),
                "unavailable_methods": engine.unavailable,
                "size": base.size,
                "clients": engine.clients,
                "max_clients": engine.max_clients,
                "limits": limits.as_dict(),
                "idle_timeout": idle_timeout,
                "rss_bytes": current_rss_bytes(),
                "webrtc": gateway.info() if gateway is not None else None,
                "osc": {"host": osc.host, "port": osc.port, "addresses": osc.addresses} if osc is not None else None,
            }
        )

    if gateway is not None:
        _add_webrtc_routes(app, gateway, allowed)

    @app.websocket("/ws")
    async def stream(websocket: WebSocket):
        """One client's stream (protocol: `diffstream.server.protocol`)."""
        if not origin_allowed(websocket.headers, allowed):
            await websocket.close(code=CLOSE_POLICY, reason="cross-origin page")
            return
        await websocket.accept()
        if engine.state == "failed":
            await websocket.send_text(json.dumps({"type": "error", "message": engine.load_error, "fatal": True}))
            await websocket.close(code=CLOSE_INTERNAL)
            return
        session = engine.open_session(asyncio.get_running_loop())
        if session is None:
            await websocket.send_text(
                json.dumps(
                    {
                        "type": "busy",
                        "message": f"server busy: all {engine.max_clients} sessions are in use; try again later",
                        "max_clients": engine.max_clients,
                    }
                )
            )
            await websocket.close(code=CLOSE_TRY_AGAIN, reason="server busy")
            return
        await session.outbox.put(
            {
                "type": "ready",
                "protocol": PROTOCOL_VERSION,
                "session": session.id,
                "state": engine.state,
                "methods": list(engine.methods),
                # The ControlNets' kinds in order: the page shows one scale slider each.
                "controlnets": [unit.kind for unit in getattr(engine.components, "controlnets", ()) or ()],
                "ip_adapter": getattr(engine.components, "ip_adapter", None) is not None,
                "params": public_params(session.requested),
                "limits": limits.as_dict(),
                "clients": engine.clients,
                "max_clients": engine.max_clients,
            }
        )
        tasks = [
            asyncio.create_task(_send_loop(websocket, session)),
            asyncio.create_task(_stats_loop(engine, session, stats_interval)),
        ]
        if idle_timeout is not None:
            tasks.append(asyncio.create_task(_idle_loop(engine, session, idle_timeout)))
        try:
            await _receive_loop(websocket, engine, session, limits)
        finally:
            engine.close_session(session)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    return app


def _add_webrtc_routes(app: FastAPI, gateway, allowed: tuple[str, ...]) -> None:
    """WHIP (POST /whip, DELETE /whip/<id>) and WHEP (POST /whep/<id>, DELETE
    /whep/<id>/<viewer>) on `gateway` (`diffstream.server.webrtc.WebRTCGateway`)."""
    from diffstream.server.webrtc import MAX_SDP_BYTES, SDP_TYPE, WebRTCError, check_offer

    def refused(err: WebRTCError) -> Response:
        return PlainTextResponse(err.message + "\n", status_code=err.status, headers=err.headers)

    def check_origin(request: Request) -> None:
        # Pages of other sites may not start or end streams here (as for the WebSocket).
        if not origin_allowed(request.headers, allowed):
            raise WebRTCError(403, "cross-origin page: WHIP/WHEP requests must come from this server's pages")

    async def offer_of(request: Request) -> str:
        check_origin(request)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_SDP_BYTES:
                break  # check_offer says 413 without reading the rest
        return check_offer(request.headers.get("content-type"), bytes(body))

    @app.post("/whip")
    async def whip(request: Request):
        """WHIP ingest: an SDP offer that sends video starts a publication (a session)."""
        try:
            token, answer = await gateway.publish(await offer_of(request))
        except WebRTCError as err:
            return refused(err)
        return Response(answer, status_code=201, media_type=SDP_TYPE,
                        headers={"Location": f"/whip/{token}", "Link": f'</whep/{token}>; rel="alternate"'})

    @app.delete("/whip/{token}")
    async def whip_delete(token: str, request: Request):
        """End a publication."""
        try:
            check_origin(request)
            await gateway.unpublish(token)
        except WebRTCError as err:
            return refused(err)
        return Response(status_code=200)

    @app.post("/whep/{token}")
    async def whep(token: str, request: Request):
        """WHEP playback: an SDP offer that receives video gets the restyled stream."""
        try:
            viewer, answer = await gateway.view(token, await offer_of(request))
        except WebRTCError as err:
            return refused(err)
        return Response(answer, status_code=201, media_type=SDP_TYPE,
                        headers={"Location": f"/whep/{token}/{viewer}"})

    @app.delete("/whep/{token}/{viewer}")
    async def whep_delete(token: str, viewer: str, request: Request):
        """End a viewer."""
        try:
            check_origin(request)
            await gateway.unview(token, viewer)
        except WebRTCError as err:
            return refused(err)
        return Response(status_code=200)


def _start_osc(engine: Engine, osc) -> asyncio.Task:
    """Start `osc` on the engine's settings and a task that hands its changes to every
    session (on the event loop, where `Engine.put_control` runs)."""
    loop = asyncio.get_running_loop()
    wake = asyncio.Event()

    def notify() -> None:  # on the OSC thread
        try:
            loop.call_soon_threadsafe(wake.set)
        except RuntimeError:  # the loop is closing: the server is shutting down
            pass

    osc.start(engine.base_config, engine.turbo, methods=engine.methods, notify=notify)
    return asyncio.create_task(_osc_loop(engine, osc, wake))


async def _osc_loop(engine: Engine, osc, wake: asyncio.Event) -> None:
    """Carry out accepted OSC changes on every session, in the order they came."""
    while True:
        await wake.wait()
        wake.clear()
        for control in osc.poll():
            message = {"type": "reset"} if control.reset else {"type": "params", "changes": dict(control.changes)}
            for session_id, reason in engine.broadcast(message):
                osc.say(f"OSC change {control.changes} not applied to session {session_id}: {reason}")


async def _receive_loop(websocket, engine: Engine, session: Session, limits: Limits) -> None:
    """Read client messages until it disconnects; a bad message costs only an error event."""
    while True:
        message = await websocket.receive()
        session.last_message = time.monotonic()
        if message["type"] == "websocket.disconnect" or session.closed:
            return  # gone, or its session was closed for being idle
        data, text = message.get("bytes"), message.get("text")
        try:
            if data is not None:
                engine.put_frame(session, data, limits)
            elif text is not None:
                try:
                    engine.put_control(session, parse_control(text, limits))
                except ProtocolError:
                    engine.count_rejected(session)
                    raise
        except ProtocolError as err:
            # Awaiting the put slows a client that floods bad messages, not the server.
            await session.outbox.put({"type": "error", "message": str(err)})


async def _idle_loop(engine: Engine, session: Session, timeout: float) -> None:
    """Close the session once the client has sent nothing, not even a bad message, for
    `timeout` seconds: give it back to the engine at once, then tell the client why and
    close the socket (the send loop does both, after what it is already sending)."""
    while True:
        left = session.last_message + timeout - time.monotonic()
        if left > 0:
            await asyncio.sleep(left)
            continue
        engine.close_session(session)
        await session.outbox.put(
            {
                "type": "idle",
                "message": f"session closed: no message for {timeout:g} s; connect again to go on",
                "idle_timeout": timeout,
            }
        )
        await session.outbox.put(_CloseSocket(CLOSE_NORMAL, "idle"))
        return


async def _send_loop(websocket, session: Session) -> None:
    """The only writer of the socket: output frames and events, in order."""
    try:
        while True:
            item = await session.outbox.get()
            if isinstance(item, (bytes, bytearray)):
                await websocket.send_bytes(bytes(item))
            elif isinstance(item, _CloseSocket):
                await websocket.close(code=item.code, reason=item.reason)
                return
            else:
                await websocket.send_text(json.dumps(item))
    except asyncio.CancelledError:
        raise
    except Exception:  # the client went away mid-send; the receive loop ends the session
        return


async def _stats_loop(engine: Engine, session: Session, interval: float) -> None:
    """A "stats" event every `interval` seconds (skipped when the client lags behind)."""
    while True:
        await asyncio.sleep(interval)
        stats = engine.stats(session)
        stats["type"] = "stats"
        if not session.outbox.full():
            session.outbox.put_nowait(stats)
