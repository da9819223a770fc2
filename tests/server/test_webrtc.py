"""WHIP ingest and WHEP playback (`diffstream serve --webrtc`) with real aiortc peers.

The server runs in-process (uvicorn on a free 127.0.0.1 port, in the test's event loop)
on the tiny model at processing size 64; the peers are aiortc connections of the same
process. ICE gathers on 127.0.0.1 only (the server's `ice_addresses` for a loopback
host) and no STUN server is asked: nothing leaves the machine.

Which frame an output belongs to: the tiny model turns any frame into noise, so the
pipeline is wrapped (`Stamped`) to paint the left half of each output in the mean colour
of the input it restyles (the pipeline emits outputs in input order, which
`tests/pipelines` proves). Inputs are solid colours of a palette, one per frame index,
so a frame that went through VP8, JPEG and VP8 again still names its index.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
import time
from collections import deque
from fractions import Fraction

import numpy as np
import pytest

aiortc = pytest.importorskip("aiortc", reason="the webrtc extra (aiortc) is not installed")

import av  # noqa: E402
import httpx  # noqa: E402
import uvicorn  # noqa: E402
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription  # noqa: E402
from aiortc.mediastreams import MediaStreamTrack  # noqa: E402

from diffstream.pipelines.factory import make_pipeline  # noqa: E402
from diffstream.server.app import create_app  # noqa: E402
from diffstream.server.webrtc import ice_addresses  # noqa: E402

# Saturated colours far apart, one per frame index (a lossy codec keeps them apart).
PALETTE = np.array(
    [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
     (70, 240, 240), (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40), (128, 0, 0),
     (0, 0, 128), (128, 128, 0), (255, 255, 255), (0, 0, 0), (250, 190, 212), (170, 255, 195)],
    dtype=np.float64,
)
# A frame whose colour is no frame index: sent after each batch, because aiortc's jitter
# buffer closes a frame only when the next one starts (the last frame sent waits there).
FILLER = len(PALETTE) - 1
FRAME_HW = (96, 128)  # (height, width) of what the publisher sends
SEND_PERIOD = 0.08
# How long a test waits for an event, a counter or a connection. A passing run needs well
# under a second for each; the mutation suite's failing runs wait it out, so it is short.
WAIT = 8.0


def solid(index: int) -> np.ndarray:
    """Frame `index`: (96, 128, 3) uint8 RGB, all one palette colour."""
    return np.broadcast_to(PALETTE[index % len(PALETTE)].astype(np.uint8), (*FRAME_HW, 3)).copy()


def colour_index(pixels: np.ndarray) -> tuple[int, float]:
    """(nearest palette index, its distance) of the mean colour of `pixels`."""
    mean = pixels.reshape(-1, 3).astype(np.float64).mean(axis=0)
    distances = np.sqrt(((PALETTE - mean) ** 2).sum(axis=1))
    return int(distances.argmin()), float(distances.min())


class Stamped:
    """A real tiny-model pipeline whose outputs carry their input's colour on the left half.

    Records, per processed frame, (colour index of the input, the pipeline's prompt).
    """

    def __init__(self, pipe, log: list, delay: float = 0.0):
        self.pipe = pipe
        self.log = log
        self.delay = delay  # extra seconds per frame: a slower model
        self.colours: deque = deque()

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def process(self, image):
        index, _ = colour_index(image)
        self.log.append((index, self.pipe.config.prompt))
        time.sleep(self.delay)
        self.colours.append(PALETTE[index].astype(np.uint8))
        outputs = []
        for out in self.pipe.process(image):
            out = out.copy()
            out[:, : out.shape[1] // 2] = self.colours.popleft()
            outputs.append(out)
        return outputs

    def reset(self):
        self.colours.clear()
        self.pipe.reset()


class FrameTrack(MediaStreamTrack):
    """The publisher's camera: sends what the test puts in `queue`, (H, W, 3) RGB."""

    kind = "video"

    def __init__(self):
        super().__init__()
        self.queue: asyncio.Queue = asyncio.Queue()
        self._pts = 0

    async def recv(self):
        image = await self.queue.get()
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        frame.pts, frame.time_base = self._pts, Fraction(1, 90000)
        self._pts += 3000
        return frame


def _config():
    return RTCConfiguration(iceServers=[])


async def _post_offer(http: httpx.AsyncClient, url: str, pc) -> httpx.Response:
    await pc.setLocalDescription(await pc.createOffer())
    return await http.post(url, content=pc.localDescription.sdp, headers={"Content-Type": "application/sdp"})


class Publisher:
    """A WHIP publisher with a data channel; collects the events it gets."""

    def __init__(self):
        self.pc = RTCPeerConnection(_config())
        self.track = FrameTrack()
        self.pc.addTransceiver(self.track, direction="sendonly")
        self.channel = self.pc.createDataChannel("diffstream")
        self.events: list[dict] = []
        self.channel.on("message", lambda m: self.events.append(json.loads(m)))
        self.location = self.token = None
        self.sent = 0

    async def publish(self, http, expect: int = 201) -> httpx.Response:
        response = await _post_offer(http, "/whip", self.pc)
        assert response.status_code == expect, response.text
        if expect == 201:
            self.location = response.headers["location"]
            self.token = self.location.rsplit("/", 1)[1]
            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=response.text, type="answer"))
        return response

    async def event(self, kind: str, timeout: float = WAIT, after: int = 0) -> dict:
        """The first event of `kind` received after the first `after` events."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.events[after:]:
                if event["type"] == kind:
                    return event
            await asyncio.sleep(0.01)
        raise AssertionError(f"no {kind!r} event in {timeout} s; got {[e['type'] for e in self.events]}")

    async def stats(self) -> dict:
        """The server's counters once every message sent before is handled (a ping barrier)."""
        mark = len(self.events)
        self.send(type="ping", t=mark)
        pong = await self.event("pong", after=mark)
        return pong["stats"]

    async def until(self, predicate, timeout: float = WAIT) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            stats = await self.stats()
            if predicate(stats):
                return stats
            assert time.monotonic() < deadline, f"not reached in {timeout} s: {stats}"
            await asyncio.sleep(0.05)

    def send(self, **message) -> None:
        self.channel.send(json.dumps(message))

    async def frames(self, indices) -> None:
        """Send these frames, then a FILLER frame that pushes the last one out."""
        for i in [*indices, FILLER]:
            await self.track.queue.put(solid(i))
            self.sent += 1
            await asyncio.sleep(SEND_PERIOD)

    async def settled(self) -> dict:
        """The stats once the server has every frame sent but the held-back last, and
        nothing waits in its slot."""
        return await self.until(lambda s: s["received"] == self.sent - 1 and s["pending"] == 0)

    def errors(self) -> list[str]:
        return [e["message"] for e in self.events if e["type"] == "error"]


class Viewer:
    """A WHEP viewer; keeps the colour index of each frame it gets."""

    def __init__(self):
        self.pc = RTCPeerConnection(_config())
        self.pc.addTransceiver("video", direction="recvonly")
        self.indices: list[int] = []
        self.distances: list[float] = []
        self.right_std: list[float] = []
        self._task = None
        self.pc.on("track", lambda track: setattr(self, "_task", asyncio.ensure_future(self._read(track))))

    async def _read(self, track):
        with contextlib.suppress(Exception):
            while True:
                image = (await track.recv()).to_ndarray(format="rgb24")
                index, distance = colour_index(image[:, : image.shape[1] // 2][:, 4:-4])
                self.indices.append(index)
                self.distances.append(distance)
                self.right_std.append(float(image[:, image.shape[1] // 2 + 4:].std()))

    async def view(self, http, token: str, expect: int = 201) -> httpx.Response:
        response = await _post_offer(http, f"/whep/{token}", self.pc)
        assert response.status_code == expect, response.text
        if expect == 201:
            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=response.text, type="answer"))
        return response


async def connected(*pcs, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not all(pc.connectionState == "connected" for pc in pcs):
        assert time.monotonic() < deadline, [pc.connectionState for pc in pcs]
        await asyncio.sleep(0.02)


async def eventually(predicate, timeout: float = WAIT, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not reached in {timeout} s"
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def serving(tiny, log: list | None = None, delay: float = 0.0, **kwargs):
    """The app with --webrtc on a free loopback port; yields (httpx client, app)."""
    log = [] if log is None else log
    kwargs.setdefault("size", 64)
    kwargs.setdefault("stats_interval", 0.2)
    kwargs.setdefault("pipeline_factory",
                      lambda components, config: Stamped(make_pipeline(components, config), log, delay))
    app = create_app(tiny, webrtc=True, host="127.0.0.1", **kwargs)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    await eventually(lambda: server.started or task.done(), what="server start")
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    peers: list = []
    app.state.peers = peers
    try:
        async with httpx.AsyncClient(base_url=url, timeout=20) as http:
            yield http, app
    finally:
        for pc in peers:
            await pc.close()
        server.should_exit = True
        await asyncio.wait_for(task, 30)
        sock.close()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


# --- the stream ------------------------------------------------------------------------
def test_frames_go_through_the_server_and_every_returned_frame_belongs_to_a_sent_one(tiny):
    """Two publishers at once, each watched: every frame a viewer gets restyles a frame
    its own publisher sent, in order, none twice; every frame received is accounted for."""

    async def main():
        log: list = []
        async with serving(tiny, log) as (http, app):
            publishers, viewers = [Publisher(), Publisher()], [Viewer(), Viewer()]
            app.state.peers += [p.pc for p in publishers] + [v.pc for v in viewers]
            for publisher, viewer in zip(publishers, viewers):
                response = await publisher.publish(http)
                assert response.headers["content-type"].startswith("application/sdp")
                assert response.headers["link"] == f'</whep/{publisher.token}>; rel="alternate"'
                ready = await publisher.event("ready")
                assert ready["whep"] == f"/whep/{publisher.token}" and ready["params"]["size"] == 64
                answer = await viewer.view(http, publisher.token)
                assert answer.headers["location"].startswith(f"/whep/{publisher.token}/")
            await connected(*[p.pc for p in publishers], *[v.pc for v in viewers])
            info = (await http.get("/api/info")).json()
            assert (info["clients"], info["webrtc"]["publishers"], info["webrtc"]["viewers"]) == (2, 2, 2)

            # Disjoint colours: publisher 0 sends frames 0-8, publisher 1 frames 9-16.
            ranges = [range(0, 9), range(9, 17)]
            await asyncio.gather(*(p.frames(r) for p, r in zip(publishers, ranges)))
            stats = [await p.settled() for p in publishers]
            for viewer, s in zip(viewers, stats):
                await eventually(lambda: len(viewer.indices) >= s["outputs"] - 1, what="the outputs to arrive")

        for publisher, viewer, sent, s in zip(publishers, viewers, ranges, stats):
            # Every frame the server decoded for this session was one it sent, in order.
            processed = [index for index, _ in log if index in sent]
            assert processed == sorted(set(processed)), processed
            assert s["processed"] == len(processed) and s["processed"] + s["dropped"] == len(sent), s
            # The stream batch holds the last 3 frames: every other processed frame came out.
            assert s["outputs"] == len(processed) - 3, s
            # Every frame the viewer got restyles a frame its publisher sent, in order, once.
            assert len(viewer.indices) >= min(3, s["outputs"]), viewer.indices
            assert set(viewer.indices) <= set(processed[:-3]), (viewer.indices, processed)
            assert viewer.indices == sorted(set(viewer.indices)), viewer.indices
            assert max(viewer.distances) < 40, viewer.distances
            assert min(viewer.right_std) > 5  # the model's half is there (noise), not the flat input
            assert publisher.errors() == []

    run(main())


def test_frames_arriving_faster_than_inference_drop_the_oldest_and_are_counted(tiny):
    """A model slower than the camera: a frame that arrives while another waits replaces
    it (the older one is dropped and counted), so the newest frame is always the next."""

    async def main():
        log: list = []
        async with serving(tiny, log, delay=0.25) as (http, app):
            publisher = Publisher()
            app.state.peers.append(publisher.pc)
            await publisher.publish(http)
            await connected(publisher.pc)
            sent = 12
            for i in [*range(sent), FILLER]:  # 25 fps against 4 frames/s
                await publisher.track.queue.put(solid(i))
                publisher.sent += 1
                await asyncio.sleep(0.04)
            stats = await publisher.settled()
        processed = [index for index, _ in log]
        assert stats["received"] == sent and stats["dropped"] > 0, stats
        assert stats["processed"] + stats["dropped"] == sent, stats
        assert processed == sorted(set(processed)) and processed[-1] == sent - 1, processed

    run(main())


def test_a_slow_viewer_gets_the_newest_output():
    from diffstream.server.webrtc import _track_class

    async def main():
        track = _track_class()()
        for value in (10, 20, 30):  # three outputs before the encoder asks for one
            track.put(np.full((8, 8, 3), value, np.uint8))
        frame = await track.recv()
        assert int(frame.to_ndarray(format="rgb24").mean()) == 30 and track.replaced == 2
        track.put(np.full((8, 8, 3), 40, np.uint8))
        later = await track.recv()
        assert later.pts > frame.pts and later.time_base == Fraction(1, 90000)
        track.stop()
        with pytest.raises(Exception):
            await track.recv()  # a stopped track ends its encoder's loop

    run(main())


def test_params_over_the_data_channel_apply_from_the_next_frame_and_are_validated(tiny):
    async def main():
        log: list = []
        async with serving(tiny, log) as (http, app):
            publisher = Publisher()
            app.state.peers.append(publisher.pc)
            await publisher.publish(http)
            await publisher.event("ready")
            await connected(publisher.pc)
            await publisher.frames(range(5))
            await publisher.settled()
            before = log[-1][1]

            mark = len(publisher.events)
            publisher.send(type="params", prompt="a watercolor painting", seed=7)
            applied = await publisher.event("params", after=mark)
            assert applied["params"]["prompt"] == "a watercolor painting" and applied["params"]["seed"] == 7
            # Refused by the web protocol's own rules: one error each, nothing changes.
            publisher.send(type="params", strength=2.0)
            publisher.send(type="params", steps=2.5)
            publisher.send(type="params", size=128)
            publisher.channel.send("x" * 9000)
            publisher.channel.send(b"\x00\x01")
            stats = await publisher.stats()
            errors = publisher.errors()
            assert len(errors) == 5, errors
            assert "strength must be in (0, 1]" in errors[0] or "strength" in errors[0], errors
            assert "steps must be an integer" in errors[1]
            assert "size is fixed by the server" in errors[2]
            assert "control message too long" in errors[3]
            assert "send JSON text on the data channel" in errors[4]
            assert stats["rejected"] == 5

            await publisher.frames(range(5, 10))
            await publisher.settled()
            mark = len(publisher.events)
            publisher.send(type="params", strength=0.5)  # still allowed: nothing above changed the settings
            assert (await publisher.event("params", after=mark))["params"]["prompt"] == "a watercolor painting"

        prompts = {index: prompt for index, prompt in log if index != FILLER}
        assert before != "a watercolor painting"
        assert all(prompts[i] == before for i in prompts if i < 5), log
        assert all(prompts[i] == "a watercolor painting" for i in prompts if i >= 5), log
        assert any(i >= 5 for i in prompts), log

    run(main())


# --- sessions: limits, ends, errors -------------------------------------------------------
def test_sessions_are_limited_freed_on_delete_and_when_the_peer_goes(tiny):
    async def main():
        async with serving(tiny, max_clients=1) as (http, app):
            engine = app.state.engine
            first, second = Publisher(), Publisher()
            app.state.peers += [first.pc, second.pc]
            await first.publish(http)
            busy = await second.publish(http, expect=503)
            assert "server busy: all 1 sessions are in use" in busy.text and busy.headers["retry-after"] == "5"
            assert busy.text.count("\n") == 1
            await connected(first.pc)
            assert engine.clients == 1

            # DELETE ends it: the session is free at once, a second DELETE finds nothing.
            assert (await http.delete(first.location)).status_code == 200
            assert engine.clients == 0 and app.state.webrtc.publications == []
            assert (await http.delete(first.location)).status_code == 404
            assert (await http.post(f"/whep/{first.token}", content="v=0\r\n",
                                    headers={"Content-Type": "application/sdp"})).status_code == 404

            # A peer that closes its connection without DELETE frees its session too.
            third = Publisher()
            app.state.peers.append(third.pc)
            await third.publish(http)
            await connected(third.pc)
            assert engine.clients == 1
            await third.pc.close()
            await eventually(lambda: engine.clients == 0, what="the session to be freed")
            assert app.state.webrtc.publications == []

    run(main())


def test_a_silent_publisher_is_told_and_freed_after_the_idle_timeout(tiny):
    async def main():
        async with serving(tiny, idle_timeout=1.0) as (http, app):
            publisher = Publisher()
            app.state.peers.append(publisher.pc)
            await publisher.publish(http)
            await connected(publisher.pc)
            await publisher.frames(range(2))
            idle = await publisher.event("idle", timeout=5)
            assert "no frame or message for 1 s" in idle["message"]
            await eventually(lambda: app.state.engine.clients == 0, what="the session to be freed")
            await eventually(lambda: publisher.pc.connectionState == "closed", what="the connection to close")

    run(main())


def test_bad_offers_get_one_line_errors_and_leave_other_sessions_alone(tiny):
    async def main():
        log: list = []
        async with serving(tiny, log, max_clients=2) as (http, app):
            good = Publisher()
            app.state.peers.append(good.pc)
            await good.publish(http)
            await connected(good.pc)
            sdp = {"Content-Type": "application/sdp"}

            cases = [
                ("v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\nm=video garbage\r\n", sdp, 400, "malformed SDP offer"),
                ("hello", sdp, 400, "an SDP description starts with v=0"),
                ("v=0\r\n", {"Content-Type": "text/plain"}, 415, "Content-Type: application/sdp"),
                ("v=0\r\n" + "a=x\r\n" * 20000, sdp, 413, "SDP offer too large"),
            ]
            for body, headers, status, text in cases:
                response = await http.post("/whip", content=body, headers=headers)
                assert response.status_code == status and text in response.text, (status, response.text)
                assert response.text.count("\n") == 1, response.text
            # An offer that sends no video (a data channel alone).
            lone = RTCPeerConnection(_config())
            app.state.peers.append(lone)
            lone.createDataChannel("x")
            response = await _post_offer(http, "/whip", lone)
            assert response.status_code == 400 and "the offer sends no video" in response.text
            # Another site's page may not publish.
            response = await http.post("/whip", content="v=0\r\n", headers={**sdp, "Origin": "https://evil.example"})
            assert response.status_code == 403
            # None of that took a session; the good one streams on.
            assert app.state.engine.clients == 1
            await good.frames(range(6))
            stats = await good.settled()
            assert stats["processed"] >= 1 and good.errors() == []

    run(main())


def test_ice_stays_on_the_listening_address():
    assert ice_addresses("127.0.0.1") == ["127.0.0.1"]
    assert ice_addresses("localhost") == ["127.0.0.1"]
    assert ice_addresses("0.0.0.0") is None
    assert ice_addresses("10.1.2.3") == ["10.1.2.3"]


def test_serve_webrtc_without_aiortc_is_one_line_before_the_model_loads(monkeypatch, capsys):
    import diffstream.models.loading as loading
    from diffstream.commands import serve

    def refuse(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(loading, "load_components", refuse)
    monkeypatch.setitem(sys.modules, "aiortc", None)
    assert serve.main(["--model", "tiny", "--port", "0", "--webrtc"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["diffstream: error: WebRTC (--webrtc) needs aiortc: pip install 'diffstream[webrtc]'"]
