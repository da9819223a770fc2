"""WebRTC transport of the live demo: WHIP ingest and WHEP playback (`diffstream serve --webrtc`).

    POST /whip             Content-Type: application/sdp, an SDP offer that sends video
                           -> 201, the answer SDP, Location: /whip/<id>, Link: </whep/<id>>
    DELETE /whip/<id>      ends the publication (and its session)
    POST /whep/<id>        an SDP offer that receives video -> 201, the answer SDP,
                           Location: /whep/<id>/<viewer>: the restyled stream of <id>
    DELETE /whep/<id>/<v>  ends that viewer

One WHIP publication is one engine `Session` (`diffstream.server.engine`), exactly like one
WebSocket connection: its own stream state, the same one-frame slot (a frame that arrives
while the previous one still waits replaces it and is counted as dropped, so the oldest
frames are the ones dropped), the same counters and stats, and it counts against the same
`max_clients`. A publisher that also opens a data channel talks the WebSocket protocol's
JSON text messages over it ("params", "reset", "ping", checked by
`protocol.parse_control` and `Engine.put_control` exactly as the WebSocket path checks
them) and gets the same events back ("ready", "params", "pong", "stats", "error",
"idle", ...). OBS (its WHIP output, OBS 30 and later) publishes without a data channel; the stream then
runs on the server's defaults.

Frames cross the engine as images, as they do for the WebSocket: the engine is
transport-free and takes encoded images (`Engine.put_frame`) and hands back JPEGs. Each
decoded WebRTC frame is scaled to the server's processing size and JPEG-encoded at
`INGEST_QUALITY` (about a millisecond at 256 px, beside the model's tens); an output is
decoded once per publication and only while someone watches it.

Liveness: a publication ends on DELETE, when its peer connection fails or closes (a
peer that closes its connection is seen at once; one that vanishes without a word is
seen when ICE consent checks fail, about 30 s), when its video track ends, or after
`idle_timeout` seconds without a frame or a data-channel message (the publisher is told
by an "idle" event first). Its viewers end with it.

ICE: no STUN or TURN servers (nothing leaves the machine to learn an address), and the
host candidates are the address the server listens on (`ice_addresses`): with the
default 127.0.0.1 that is the loopback address alone, which aioice otherwise leaves out.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable

from diffstream import frames as F
from diffstream.errors import ConfigError
from diffstream.server.protocol import (
    PROTOCOL_VERSION,
    Limits,
    ProtocolError,
    is_loopback,
    parse_control,
    public_params,
    unpack_output,
)

log = logging.getLogger("diffstream.server")

SDP_TYPE = "application/sdp"
# An offer of a few tracks is 2-6 KB; a bound keeps a client from making us buffer more.
MAX_SDP_BYTES = 64 * 1024
# Viewers (WHEP) of one publication at once; each costs one video encoder.
MAX_VIEWERS = 4
# JPEG quality of the frames handed to the engine: high, so the second lossy step after
# the video codec's own costs little picture quality.
INGEST_QUALITY = 95
# Events kept for a publisher whose data channel is not open yet (the first "status").
PENDING_EVENTS = 16
# A data channel whose send buffer holds more than this gets no "stats" until it drains.
STATS_BUFFER_LIMIT = 64 * 1024
# 90 kHz: the RTP clock of video, so outgoing timestamps need no conversion.
VIDEO_TIME_BASE = Fraction(1, 90000)
_MISSING = "WebRTC (--webrtc) needs aiortc: pip install 'diffstream[webrtc]'"


def check_available() -> None:
    """Raise a one-line ConfigError naming the extra when aiortc is not installed."""
    import importlib.util

    try:
        found = importlib.util.find_spec("aiortc") is not None
    except ValueError:  # a module set to None in sys.modules (tests) has no spec
        found = False
    if not found:
        raise ConfigError(_MISSING)


def ice_addresses(host: str) -> list[str] | None:
    """The host candidate addresses for a server listening on `host`.

    A loopback host gives ["127.0.0.1"] (media stays on this machine as the page does),
    a wildcard host (0.0.0.0, ::) None (every interface, aioice's own choice), any other
    address just that address.
    """
    host = host.strip().strip("[]")
    if is_loopback(host):
        return ["127.0.0.1"]
    if host in ("", "0.0.0.0", "::"):
        return None
    return [host]


def _use_ice_addresses(addresses: list[str] | None) -> Callable[[], None]:
    """Make aioice gather host candidates on `addresses` only; returns the undo.

    aioice reads its module-level `get_host_addresses` at every gathering and leaves
    127.0.0.1 out of it, so a loopback-only server would have no candidate at all.
    It is process-wide: every peer connection of this process (test peers included)
    then uses these addresses, which is what one server per process wants.
    """
    if addresses is None:
        return lambda: None
    import aioice.ice as ice

    original = ice.get_host_addresses

    def host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return [a for a in addresses if (use_ipv6 if ":" in a else use_ipv4)]

    ice.get_host_addresses = host_addresses

    def restore() -> None:
        if ice.get_host_addresses is host_addresses:
            ice.get_host_addresses = original

    return restore


class WebRTCError(Exception):
    """A refused WHIP/WHEP request: an HTTP status and one line saying what to do."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def check_offer(content_type: str | None, body: bytes) -> str:
    """The SDP offer text of a WHIP/WHEP POST, or a WebRTCError (415, 413, 400).

    Only the envelope is checked here (type, size, text, SDP's first line); the SDP
    itself is parsed by aiortc, whose complaints become 400s too.
    """
    kind = (content_type or "").split(";")[0].strip().lower()
    if kind != SDP_TYPE:
        raise WebRTCError(415, f"send the SDP offer with Content-Type: {SDP_TYPE} (got {kind or 'none'})")
    if len(body) > MAX_SDP_BYTES:
        raise WebRTCError(413, f"SDP offer too large: {len(body)} bytes, the limit is {MAX_SDP_BYTES}")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise WebRTCError(400, "malformed SDP offer: not UTF-8 text") from None
    if not text.lstrip().startswith("v=0"):
        raise WebRTCError(400, "malformed SDP offer: an SDP description starts with v=0")
    return text


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text[:200] if text else type(err).__name__


@dataclass
class _Viewer:
    id: str
    pc: object  # RTCPeerConnection
    track: object  # _track_class() instance


@dataclass
class Publication:
    """One WHIP publisher: its engine session, peer connection, data channels and viewers."""

    token: str
    session: object  # engine.Session
    pc: object  # RTCPeerConnection
    channels: list = field(default_factory=list)
    viewers: dict = field(default_factory=dict)  # viewer id -> _Viewer
    tasks: list = field(default_factory=list)
    pending: deque = field(default_factory=lambda: deque(maxlen=PENDING_EVENTS))
    closed: bool = False
    frames_in: int = 0  # video frames taken from the track
    reason: str | None = None  # why it ended


_TRACK_CLASS = None


def _track_class():
    """The class of a viewer's outgoing video track: the restyled stream of a publication.

    A one-frame slot, newest wins, like the engine's input slot: an output that arrives
    while the encoder still works on the previous one replaces the waiting one (counted
    in `replaced`), so a slow viewer sees the newest frame, never a growing queue.
    Timestamps are wall-clock on the 90 kHz RTP clock, strictly increasing. Built on
    aiortc's MediaStreamTrack at first use, so this module imports without aiortc.
    """
    global _TRACK_CLASS
    if _TRACK_CLASS is not None:
        return _TRACK_CLASS
    import av
    from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

    class _OutputTrack(MediaStreamTrack):
        kind = "video"

        def __init__(self):
            super().__init__()
            self._image = None
            self._ready = asyncio.Event()
            self._start: float | None = None
            self._last_pts = -1
            self.sent = 0
            self.replaced = 0

        def put(self, image) -> None:
            """Offer an output frame, (H, W, 3) uint8 RGB, to this viewer (event loop)."""
            _offer(self, image)

        async def recv(self):
            while self._image is None:
                if self.readyState != "live":
                    raise MediaStreamError
                self._ready.clear()
                await self._ready.wait()
            if self.readyState != "live":
                raise MediaStreamError
            image, self._image = self._image, None
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            now = time.monotonic()
            if self._start is None:
                self._start = now
            pts = max(int((now - self._start) * 90000), self._last_pts + 1)
            self._last_pts = pts
            frame.pts, frame.time_base = pts, VIDEO_TIME_BASE
            self.sent += 1
            return frame

        def stop(self) -> None:
            super().stop()
            self._ready.set()  # wakes a waiting recv, which then ends

    _TRACK_CLASS = _OutputTrack
    return _TRACK_CLASS


class WebRTCGateway:
    """WHIP publications and WHEP viewers on top of an engine (all on one event loop).

    Args:
        engine (Engine): the server's engine; publications are its sessions.
        limits (Limits): message limits (data-channel text, frame size).
        ice_host (str): the address the server listens on; sets the ICE host
            candidates (`ice_addresses`).
        stats_interval (float): seconds between "stats" events on a data channel.
        idle_timeout (float | None): seconds without a frame or data-channel message
            before a publication is ended; None: never.
        max_viewers (int): WHEP viewers per publication.
    """

    def __init__(self, engine, limits: Limits, *, ice_host: str = "127.0.0.1", stats_interval: float = 0.5,
                 idle_timeout: float | None = 60.0, max_viewers: int = MAX_VIEWERS):
        check_available()
        self.engine = engine
        self.limits = limits
        self.stats_interval = float(stats_interval)
        self.idle_timeout = idle_timeout
        self.max_viewers = int(max_viewers)
        self._publications: dict[str, Publication] = {}
        self._restore_ice = _use_ice_addresses(ice_addresses(ice_host))
        self._closed = False

    # --- what is open ------------------------------------------------------------------
    @property
    def publications(self) -> list[Publication]:
        """The open publications, oldest first."""
        return list(self._publications.values())

    def info(self) -> dict:
        """Facts for /api/info."""
        return {"whip": "/whip", "whep": "/whep/<id>", "publishers": len(self._publications),
                "viewers": sum(len(p.viewers) for p in self._publications.values()),
                "max_viewers": self.max_viewers}

    # --- WHIP ---------------------------------------------------------------------------
    async def publish(self, offer: str) -> tuple[str, str]:
        """Start a publication from a WHIP offer.

        Args:
            offer (str): SDP text that sends one video track (audio is accepted and not used).
        Returns:
            (the publication's id, the answer SDP).
        Raises:
            WebRTCError: 503 no free session / model failed, 400 the offer is unusable.
        """
        from aiortc import RTCPeerConnection, RTCSessionDescription

        engine = self.engine
        if engine.state == "failed":
            raise WebRTCError(503, engine.load_error or "the model failed to load")
        session = engine.open_session(asyncio.get_running_loop())
        if session is None:
            raise WebRTCError(503, f"server busy: all {engine.max_clients} sessions are in use; try again later",
                              {"Retry-After": "5"})
        pc = RTCPeerConnection(_configuration())
        pub = Publication(secrets.token_urlsafe(16), session, pc)

        @pc.on("track")
        def on_track(track):
            if track.kind == "video" and not any(t.get_name() == "ingest" for t in pub.tasks):
                pub.tasks.append(asyncio.create_task(self._ingest(pub, track), name="ingest"))

        @pc.on("datachannel")
        def on_datachannel(channel):
            self._attach_channel(pub, channel)

        @pc.on("connectionstatechange")
        async def on_state():
            if pc.connectionState in ("failed", "closed"):
                await self._end(pub, f"the publisher's connection {pc.connectionState}")

        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
            video = [t for t in pc.getTransceivers() if t.kind == "video"]
            if not any(t.receiver.track is not None for t in video):
                raise WebRTCError(400, "the offer sends no video: publish one video track (sendonly)")
            _silence_other_media(pc)
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as err:
            engine.close_session(session)
            for task in pub.tasks:
                task.cancel()
            await pc.close()
            if isinstance(err, WebRTCError):
                raise
            raise WebRTCError(400, f"malformed SDP offer: {_one_line(err)}") from None
        self._publications[pub.token] = pub
        pub.tasks.append(asyncio.create_task(self._pump(pub), name="pump"))
        pub.tasks.append(asyncio.create_task(self._stats(pub), name="stats"))
        if self.idle_timeout is not None:
            pub.tasks.append(asyncio.create_task(self._idle(pub), name="idle"))
        return pub.token, pc.localDescription.sdp

    async def unpublish(self, token: str) -> None:
        """End a publication (WHIP DELETE); WebRTCError 404 if there is none."""
        pub = self._get(token)
        await self._end(pub, "ended by the publisher (DELETE)")

    # --- WHEP ---------------------------------------------------------------------------
    async def view(self, token: str, offer: str) -> tuple[str, str]:
        """Add a viewer of publication `token` from a WHEP offer.

        Returns:
            (the viewer's id, the answer SDP).
        Raises:
            WebRTCError: 404 no such publication, 503 too many viewers, 400 unusable offer.
        """
        from aiortc import RTCPeerConnection, RTCSessionDescription

        pub = self._get(token)
        if len(pub.viewers) >= self.max_viewers:
            raise WebRTCError(503, f"publication {token} already has {self.max_viewers} viewers; try again later",
                              {"Retry-After": "5"})
        pc = RTCPeerConnection(_configuration())
        viewer = _Viewer(secrets.token_urlsafe(8), pc, _track_class()())
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
            video = [t for t in pc.getTransceivers() if t.kind == "video"]
            if not video:
                raise WebRTCError(400, "the offer receives no video: add a recvonly video transceiver")
            pc.addTrack(viewer.track)
            _silence_other_media(pc)
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as err:
            viewer.track.stop()
            await pc.close()
            if isinstance(err, WebRTCError):
                raise
            raise WebRTCError(400, f"malformed SDP offer: {_one_line(err)}") from None
        if pub.closed:  # ended while the answer was made
            viewer.track.stop()
            await pc.close()
            raise WebRTCError(404, f"no publication {token}: it has ended")
        pub.viewers[viewer.id] = viewer

        @pc.on("connectionstatechange")
        async def on_state():
            if pc.connectionState in ("failed", "closed"):
                await self._drop_viewer(pub, viewer.id)

        return viewer.id, pc.localDescription.sdp

    async def unview(self, token: str, viewer_id: str) -> None:
        """End one viewer (WHEP DELETE); WebRTCError 404 if there is none."""
        pub = self._get(token)
        if viewer_id not in pub.viewers:
            raise WebRTCError(404, f"no viewer {viewer_id} of publication {token}")
        await self._drop_viewer(pub, viewer_id)

    # --- shutdown -------------------------------------------------------------------------
    async def close(self) -> None:
        """End every publication and viewer; undo the ICE address setting."""
        if self._closed:
            return
        self._closed = True
        for pub in list(self._publications.values()):
            await self._end(pub, "the server is shutting down")
        self._restore_ice()

    # --- inside -------------------------------------------------------------------------
    def _get(self, token: str) -> Publication:
        pub = self._publications.get(token)
        if pub is None:
            raise WebRTCError(404, f"no publication {token}: it has ended or never existed")
        return pub

    async def _ingest(self, pub: Publication, track) -> None:
        """Hand every frame of the publisher's video track to the engine's slot."""
        from aiortc.mediastreams import MediaStreamError

        size = self.engine.base_config.size
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                break
            pub.session.last_message = time.monotonic()
            pub.frames_in += 1
            try:
                data = F.encode_jpeg(_to_rgb(frame, size), INGEST_QUALITY)
                self.engine.put_frame(pub.session, data, self.limits)
            except ProtocolError as err:
                self._send(pub, {"type": "error", "message": str(err)})
            except Exception as err:  # a frame that cannot be converted costs that frame only
                self._send(pub, {"type": "error", "message": f"frame rejected: {_one_line(err)}"})
        await self._end(pub, "the publisher's video track ended")

    def _attach_channel(self, pub: Publication, channel) -> None:
        pub.channels.append(channel)

        @channel.on("message")
        def on_message(message):
            pub.session.last_message = time.monotonic()
            if not isinstance(message, str):
                self.engine.count_rejected(pub.session)
                self._send(pub, {"type": "error", "message": "send JSON text on the data channel "
                                                            "(frames travel on the video track)"})
                return
            try:
                try:
                    self.engine.put_control(pub.session, parse_control(message, self.limits))
                except ProtocolError:
                    self.engine.count_rejected(pub.session)
                    raise
            except ProtocolError as err:
                self._send(pub, {"type": "error", "message": str(err)})

        @channel.on("close")
        def on_close():
            if channel in pub.channels:
                pub.channels.remove(channel)

        engine = self.engine
        ready = {"type": "ready", "protocol": PROTOCOL_VERSION, "session": pub.session.id, "state": engine.state,
                 "methods": list(engine.methods),
                 # As the WebSocket's "ready": the page shows a scale slider per ControlNet
                 # and the image-prompt controls when the model has them.
                 "controlnets": [unit.kind for unit in getattr(engine.components, "controlnets", ()) or ()],
                 "ip_adapter": getattr(engine.components, "ip_adapter", None) is not None,
                 "params": public_params(pub.session.requested),
                 "limits": self.limits.as_dict(), "clients": engine.clients, "max_clients": engine.max_clients,
                 "whep": f"/whep/{pub.token}"}
        _send_text(channel, ready)
        while pub.pending:
            _send_text(channel, pub.pending.popleft())

    def _send(self, pub: Publication, event: dict) -> None:
        """An event to the publisher's open data channels (kept a while if none is open)."""
        open_channels = [c for c in pub.channels if c.readyState == "open"]
        if not open_channels:
            if event.get("type") != "stats":
                pub.pending.append(event)
            return
        for channel in open_channels:
            _send_text(channel, event)

    async def _pump(self, pub: Publication) -> None:
        """Carry the engine's messages for the session: events to the data channel,
        output frames to every viewer's track."""
        outbox = pub.session.outbox
        while True:
            item = await outbox.get()
            if isinstance(item, (bytes, bytearray)):
                if not pub.viewers:
                    continue  # nobody watches: not even worth decoding
                try:
                    _, jpeg = unpack_output(bytes(item))
                    image = F.decode_image_bytes(jpeg)
                except (ProtocolError, ValueError) as err:
                    log.error("publication %s: unreadable output frame: %s", pub.token, err)
                    continue
                for viewer in list(pub.viewers.values()):
                    viewer.track.put(image)
            elif isinstance(item, dict):
                self._send(pub, item)

    async def _stats(self, pub: Publication) -> None:
        """A "stats" event every `stats_interval` seconds (skipped while the channel lags)."""
        while True:
            await asyncio.sleep(self.stats_interval)
            if not any(c.readyState == "open" and c.bufferedAmount < STATS_BUFFER_LIMIT for c in pub.channels):
                continue
            stats = self.engine.stats(pub.session)
            stats.update(type="stats", viewers=len(pub.viewers), frames_in=pub.frames_in)
            self._send(pub, stats)

    async def _idle(self, pub: Publication) -> None:
        """End the publication once it has sent nothing for `idle_timeout` seconds."""
        timeout = self.idle_timeout
        while True:
            left = pub.session.last_message + timeout - time.monotonic()
            if left > 0:
                await asyncio.sleep(left)
                continue
            self._send(pub, {"type": "idle", "idle_timeout": timeout,
                             "message": f"session closed: no frame or message for {timeout:g} s; "
                                        f"publish again to go on"})
            await asyncio.sleep(0.05)  # lets the event leave before the connection closes
            await self._end(pub, f"idle for {timeout:g} s")
            return

    async def _end(self, pub: Publication, reason: str) -> None:
        """Free the session at once, then close the viewers and the connection (idempotent)."""
        if pub.closed:
            return
        pub.closed, pub.reason = True, reason
        self._publications.pop(pub.token, None)
        self.engine.close_session(pub.session)
        current = asyncio.current_task()
        for task in pub.tasks:
            if task is not current:
                task.cancel()
        for viewer_id in list(pub.viewers):
            await self._drop_viewer(pub, viewer_id)
        await pub.pc.close()

    async def _drop_viewer(self, pub: Publication, viewer_id: str) -> None:
        viewer = pub.viewers.pop(viewer_id, None)
        if viewer is None:
            return
        viewer.track.stop()
        await viewer.pc.close()


def _offer(track, image) -> None:
    """Put `image` in a viewer track's one-frame slot: the newest output wins, the one it
    replaces is counted (the track's `put`; a function of the module so that the
    mutation suite can reach it in a class built at run time)."""
    if track._image is not None:
        track.replaced += 1
    track._image = image
    track._ready.set()


def _configuration():
    """No ICE servers: aiortc's default would ask a public STUN server for our address."""
    from aiortc import RTCConfiguration

    return RTCConfiguration(iceServers=[])


def _silence_other_media(pc) -> None:
    """Answer audio (OBS sends it) as inactive: nothing is decoded for a track nobody reads."""
    for transceiver in pc.getTransceivers():
        if transceiver.kind != "video":
            transceiver.direction = "inactive"


def _to_rgb(frame, size: int):
    """A decoded video frame as (H, W, 3) uint8 RGB, its longer side at most `size`
    (the engine scales to the processing size anyway; a smaller JPEG is cheaper)."""
    width, height = frame.width, frame.height
    longer = max(width, height)
    if longer > size:
        scale = size / longer
        width, height = max(2, round(width * scale)), max(2, round(height * scale))
        return frame.to_ndarray(format="rgb24", width=width, height=height)
    return frame.to_ndarray(format="rgb24")


def _send_text(channel, event: dict) -> None:
    try:
        channel.send(json.dumps(event))
    except Exception:  # closed under us: the connection-state handler ends the publication
        pass
