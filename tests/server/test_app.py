"""The live demo's app through FastAPI's test client, with the tiny model.

Frames are 64x48 and the processing size is 64, so a frame costs a few tens of ms.
The default schedule has 4 denoising steps: with stream batch, the output of frame i
comes out when frame i + 3 is pushed. A "ping" is answered only after every frame sent
before it was processed, which makes these tests deterministic without sleeping.
"""

import contextlib
import io
import json
import threading
import time

import anyio
import numpy as np
import pytest
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from diffstream.config import METHODS, StreamConfig
from diffstream.errors import ConfigError, ModelLoadError
from diffstream.frames import decode_image_bytes, encode_jpeg
from diffstream.pipelines.factory import make_pipeline
from diffstream.server.app import create_app
from diffstream.server.protocol import Limits, unpack_output
from diffstream.testing import make_frames

FRAMES = make_frames(12, height=48, width=64)
FILL = 3  # pushes before the first output with the default 4-step stream batch


class Client:
    """A test-side WebSocket client that keeps output frames and events apart."""

    def __init__(self, ws):
        self.ws = ws
        self.outputs: list[tuple[int, bytes]] = []
        self.events: list[dict] = []
        self._pings = 0

    def receive(self, timeout: float = 30.0):
        """The next server message: ("frame", (id, jpeg)), ("event", dict) or ("close", code)."""

        async def get():
            # The test client's receive has no timeout; a hung server must fail, not hang.
            with anyio.fail_after(timeout):
                return await self.ws._send_rx.receive()

        message = self.ws.portal.call(get)
        if message["type"] == "websocket.close":
            return "close", message.get("code")
        if message.get("bytes") is not None:
            return "frame", unpack_output(message["bytes"])
        return "event", json.loads(message["text"])

    def wait_for(self, kind: str, timeout: float = 30.0) -> dict:
        """Read until an event of `kind`; frames and other events are kept."""
        deadline = time.monotonic() + timeout
        while True:
            what, value = self.receive(max(0.1, deadline - time.monotonic()))
            if what == "frame":
                self.outputs.append(value)
            elif what == "close":
                raise AssertionError(f"connection closed with code {value} while waiting for {kind!r}")
            elif value["type"] == kind:
                return value
            elif value["type"] != "stats":
                self.events.append(value)

    def send(self, **message) -> None:
        self.ws.send_text(json.dumps(message))

    def frame(self, index: int) -> None:
        self.ws.send_bytes(encode_jpeg(FRAMES[index % len(FRAMES)]))

    def ping(self) -> dict:
        """Barrier: returns the stats once every message sent before was handled."""
        self._pings += 1
        self.send(type="ping", t=self._pings)
        pong = self.wait_for("pong")
        assert pong["t"] == self._pings
        return pong["stats"]

    def frames(self, count: int, start: int = 0) -> dict:
        """Send `count` frames, each processed before the next is sent (no drops)."""
        stats = None
        for i in range(start, start + count):
            self.frame(i)
            stats = self.ping()
        return stats

    def errors(self) -> list[str]:
        return [e["message"] for e in self.events if e["type"] == "error"]


def connect(test_client, **kwargs) -> Client:
    """Open a WebSocket that the `make_client` fixture closes, and read its "ready" event."""
    client = Client(test_client.sockets.enter_context(test_client.websocket_connect("/ws", **kwargs)))
    client.ready = client.wait_for("ready")
    return client


@pytest.fixture
def make_client(tiny):
    """Builds an app on the tiny model and a started test client; afterwards closes its
    sockets (the app's lifespan cannot end while a session is open), then the client."""
    with contextlib.ExitStack() as stack:

        def build(**app_kwargs):
            app_kwargs.setdefault("size", 64)
            app_kwargs.setdefault("stats_interval", 0.2)
            app = create_app(app_kwargs.pop("model", tiny), **app_kwargs)
            test_client = stack.enter_context(TestClient(app))
            test_client.sockets = stack.enter_context(contextlib.ExitStack())
            return test_client

        yield build


def wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


# --- HTTP -----------------------------------------------------------------------------
def test_page_assets_and_info(make_client):
    http = make_client(max_clients=3)
    page = http.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'src="app.js"' in page.text and 'id="output"' in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    script = http.get("/app.js")
    assert script.status_code == 200 and "new WebSocket" in script.text
    assert http.get("/style.css").headers["content-type"].startswith("text/css")
    info = http.get("/api/info").json()
    assert info["methods"][0] == "streamdiffusion"
    assert set(info["methods"]) | set(info["unavailable_methods"]) == set(METHODS)
    assert (info["size"], info["clients"], info["max_clients"], info["state"]) == (64, 0, 3, "ready")
    assert info["rss_bytes"] > 0
    # No route maps a request path to a file.
    for path in ("/static/index.html", "/..%2f..%2fetc%2fpasswd", "/app.js/../../etc/passwd", "/server/app.py"):
        assert http.get(path).status_code == 404


# --- frames and params -------------------------------------------------------------------
def test_frames_in_frames_out(make_client):
    http = make_client()
    client = connect(http)
    assert client.ready["methods"] == http.get("/api/info").json()["methods"]
    assert client.ready["params"]["size"] == 64
    stats = client.frames(6)
    # Output i belongs to input i and comes out FILL pushes later.
    assert [frame_id for frame_id, _ in client.outputs] == [0, 1, 2]
    for _, jpeg in client.outputs:
        assert decode_image_bytes(jpeg).shape == (48, 64, 3)
    assert (stats["received"], stats["processed"], stats["outputs"], stats["dropped"]) == (6, 6, 3, 0)
    assert stats["latency_ms"] is not None and stats["latency_ms"] > 0
    assert client.errors() == []


def test_params_change_keeps_temporal_state_and_reset_drops_it(make_client):
    client = connect(make_client())
    client.frames(FILL + 1)
    assert len(client.outputs) == 1
    client.send(type="params", prompt="a charcoal sketch", seed=5)
    applied = client.wait_for("params")
    assert applied["params"]["prompt"] == "a charcoal sketch" and applied["params"]["seed"] == 5
    assert applied["restarted"] is False
    # The stream batch is still full: the very next frame yields an output.
    client.frames(1, start=FILL + 1)
    assert len(client.outputs) == 2

    client.send(type="reset")
    client.wait_for("reset")
    client.frames(FILL, start=FILL + 2)
    assert len(client.outputs) == 2  # refilling after the reset
    client.frames(1, start=2 * FILL + 2)
    assert len(client.outputs) == 3
    # The settings survive a reset; only the temporal state goes.
    client.send(type="params", strength=0.5)
    assert client.wait_for("params")["params"]["prompt"] == "a charcoal sketch"


def test_method_change_starts_a_new_stream(make_client):
    client = connect(make_client())
    if len(client.ready["methods"]) < 2:
        pytest.skip(f"only one method runs on the tiny model: {client.ready['methods']}")
    other = client.ready["methods"][1]
    client.frames(FILL + 1)
    client.send(type="params", method=other)
    applied = client.wait_for("params")
    assert applied["params"]["method"] == other and applied["restarted"] is True
    client.frames(FILL + 1, start=FILL + 1)
    assert len(client.outputs) == 2  # one before the change, one after refilling
    assert client.errors() == []


def test_methods_the_model_cannot_run_are_refused_with_the_reason(make_client, tiny):
    from diffstream.server.engine import probe_methods

    usable, reasons = probe_methods(tiny, StreamConfig())
    assert "streamdiffusion" in usable and set(usable) | set(reasons) == set(METHODS)
    if not reasons:
        pytest.skip("the tiny model runs every method")
    method, reason = next(iter(reasons.items()))
    client = connect(make_client())
    assert method not in client.ready["methods"]
    client.send(type="params", method=method, prompt="ignored")
    error = client.wait_for("error")
    assert error["message"].startswith(f"method {method} is not available with this model ({reason})")
    client.send(type="params", seed=3)
    params = client.wait_for("params")["params"]
    assert (params["method"], params["prompt"]) == ("streamdiffusion", "")  # nothing of it applied
    with pytest.raises(ConfigError, match=f"--method {method} cannot run on this model"):
        create_app(tiny, base_config=StreamConfig(method=method))


class RecordingFactory:
    """A pipeline factory that records the prompt each pushed frame was processed with."""

    def __init__(self):
        self.prompts = []

    def __call__(self, components, config):
        pipe = make_pipeline(components, config)
        push = pipe.push

        def recording_push(frame):
            out = push(frame)
            self.prompts.append(pipe.config.prompt)
            return out

        pipe.push = recording_push
        return pipe


def test_params_apply_from_the_first_frame_sent_after_them(make_client):
    recorder = RecordingFactory()
    client = connect(make_client(pipeline_factory=recorder, base_config=StreamConfig(prompt="first")))
    client.frame(0)
    client.frame(1)
    client.send(type="params", prompt="second")
    client.frame(2)
    stats = client.ping()
    # Frame 1 may have been dropped (newest wins), but whatever was processed before the
    # change used the old prompt and frame 2 the new one.
    assert recorder.prompts[-1] == "second"
    assert recorder.prompts[:-1] and set(recorder.prompts[:-1]) == {"first"}
    assert stats["processed"] == len(recorder.prompts)


# --- bad input -----------------------------------------------------------------------------
def big_png(width, height):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height)).save(buf, format="PNG")
    return buf.getvalue()


def test_malformed_and_oversized_messages_are_rejected_and_the_connection_lives(make_client):
    client = connect(make_client(limits=Limits(max_frame_bytes=20_000, max_frame_side=512)))
    noisy = np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    oversized = encode_jpeg(noisy, quality=95)
    assert len(oversized) > 20_000
    bad_frames = [
        (b"", "frame 0 rejected: empty frame"),
        (b"\x89PNG garbage" * 10, "frame 1 rejected: frame is not a decodable image"),
        (oversized, "frame 2 rejected: frame too large"),
        (big_png(600, 10), "frame 3 rejected: frame is 600x10"),
    ]
    bad_texts = [
        ("{not json", "not valid JSON"),
        ('"reset"', "must be a JSON object"),
        ('{"type": "shutdown"}', "unknown message type 'shutdown'"),
        ('{"type": "params", "promt": "x"}', "unknown field 'promt'"),
        ('{"type": "params", "strength": "0.5"}', "strength must be a number, got a string"),
        ('{"type": "params", "seed": true}', "seed must be an integer, got a boolean"),
        ('{"type": "params", "strength": 2}', "strength must be in (0, 1]"),
        ('{"type": "params", "similarity_threshold": -0.5}', "similarity_threshold must be in [0, 1)"),
        ('{"type": "params", "method": "unknown"}', "unknown method 'unknown'"),
        (json.dumps({"type": "params", "prompt": "x" * 20_000}), "control message too long"),
    ]
    for data, fragment in bad_frames:
        client.ws.send_bytes(data)
        error = client.wait_for("error")
        assert fragment in error["message"], (fragment, error)
    for text, fragment in bad_texts:
        client.ws.send_text(text)
        error = client.wait_for("error")
        assert fragment in error["message"], (fragment, error)
        assert "\n" not in error["message"]
    stats = client.ping()
    assert stats["rejected"] == len(bad_frames) + len(bad_texts)
    assert stats["received"] == len(bad_frames)  # rejected frames still take an id
    # The rejected params changed nothing, and the session still works.
    client.send(type="params", seed=9)
    assert client.wait_for("params")["params"]["strength"] == 0.4
    client.frames(FILL + 1)
    assert [frame_id for frame_id, _ in client.outputs] == [len(bad_frames)]


def test_undecodable_image_body_is_reported_by_the_engine(make_client):
    client = connect(make_client())
    jpeg = encode_jpeg(FRAMES[0])
    # A valid header with the entropy-coded data replaced: the header check passes,
    # decoding fails or yields garbage; either way the session must go on.
    broken = jpeg[:200] + b"\x00" * 10 + b"\xff\xd9"
    client.ws.send_bytes(broken)
    client.ping()
    client.frames(FILL + 1, start=1)
    assert len(client.outputs) >= 1


def test_a_failing_push_restarts_the_stream_and_the_session_goes_on(make_client):
    pushes = []

    def flaky_factory(components, config):
        pipe = make_pipeline(components, config)
        push = pipe.push

        def flaky_push(frame):
            pushes.append(1)
            if len(pushes) == 2:
                raise RuntimeError("boom\nwith a second line")
            return push(frame)

        pipe.push = flaky_push
        return pipe

    client = connect(make_client(pipeline_factory=flaky_factory))
    client.frames(2)
    assert client.errors() == ["internal error: RuntimeError: boom"]
    client.frames(FILL + 1, start=2)
    assert [frame_id for frame_id, _ in client.outputs] == [2]  # a fresh stream from frame 2 on


# --- sessions ---------------------------------------------------------------------------
def test_two_clients_have_separate_streams(make_client):
    http = make_client(max_clients=2)
    a, b = connect(http), connect(http)
    assert a.ready["session"] != b.ready["session"]
    a.send(type="params", prompt="alpha")
    b.send(type="params", prompt="beta")
    assert a.wait_for("params")["params"]["prompt"] == "alpha"
    assert b.wait_for("params")["params"]["prompt"] == "beta"
    for i in range(FILL + 2):  # interleaved: the engine serves both round-robin
        a.frame(i)
        b.frame(i + 5)
        a.ping()
        stats_b = b.ping()
    assert [i for i, _ in a.outputs] == [0, 1] and [i for i, _ in b.outputs] == [0, 1]
    assert stats_b["clients"] == 2
    # Resetting one stream leaves the other's temporal state alone.
    b.send(type="reset")
    b.wait_for("reset")
    a.frames(1, start=20)
    b.frames(1, start=20)
    assert len(a.outputs) == 3 and len(b.outputs) == 2


def test_busy_when_all_sessions_are_taken(make_client):
    http = make_client(max_clients=1)
    first = connect(http)
    with http.websocket_connect("/ws") as ws:
        second = Client(ws)
        what, event = second.receive()
        assert what == "event" and event["type"] == "busy" and "server busy" in event["message"]
        assert second.receive() == ("close", 1013)
    first.frames(FILL + 1)
    assert len(first.outputs) == 1  # the refused client did not disturb the first
    first.ws.close()
    wait_until(lambda: http.get("/api/info").json()["clients"] == 0)
    third = connect(http)
    third.frames(1)


class GatedFactory:
    """Pipelines whose first push waits for `release`, to hold the engine busy."""

    def __init__(self):
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, components, config):
        pipe = make_pipeline(components, config)
        push = pipe.push

        def gated_push(frame):
            if not self.entered.is_set():
                self.entered.set()
                assert self.release.wait(30)
            return push(frame)

        pipe.push = gated_push
        return pipe


def test_newest_frame_wins_and_stale_frames_are_counted(make_client):
    gate = GatedFactory()
    # One denoising step: every push returns its own output, which makes ids easy to read.
    http = make_client(pipeline_factory=gate, base_config=StreamConfig(t_index_list=(30,)))
    client = connect(http)
    engine = http.app.state.engine
    client.frame(0)
    assert gate.entered.wait(30)  # the engine is inside frame 0
    for i in (1, 2, 3):
        client.frame(i)
    session = engine.sessions[0]
    wait_until(lambda: engine.stats(session)["received"] == 4)
    gate.release.set()
    stats = client.ping()
    assert [frame_id for frame_id, _ in client.outputs] == [0, 3]  # 1 and 2 went stale
    assert (stats["processed"], stats["dropped"], stats["outputs"]) == (2, 2, 2)
    # The page shows drops from the periodic stats events.
    deadline = time.monotonic() + 10
    while True:
        what, value = client.receive()
        if what == "event" and value["type"] == "stats":
            assert value["dropped"] == 2
            break
        assert time.monotonic() < deadline


def test_cross_site_pages_are_refused(make_client):
    http = make_client()
    with pytest.raises(WebSocketDisconnect) as info:
        with http.websocket_connect("/ws", headers={"origin": "http://evil.example"}):
            pass
    assert info.value.code == 1008
    same_origin = connect(http, headers={"origin": "http://testserver"})
    same_origin.ping()


def test_model_factory_loads_on_the_engine_thread(make_client, tiny):
    calls = []

    def factory():
        calls.append(threading.current_thread().name)
        return tiny

    client = connect(make_client(model=factory))
    client.frames(FILL + 1)
    assert len(client.outputs) == 1
    assert calls == ["diffstream-engine"]


def test_model_load_failure_is_reported_and_the_server_lives(make_client):
    def factory():
        raise ModelLoadError("cannot load model 'x': pass a local folder")

    http = make_client(model=factory)
    wait_until(lambda: http.app.state.engine.state == "failed")
    with http.websocket_connect("/ws") as ws:
        client = Client(ws)
        what, event = client.receive()
        assert what == "event" and event["type"] == "error" and event["fatal"] is True
        assert event["message"] == "model failed to load: cannot load model 'x': pass a local folder"
        assert client.receive() == ("close", 1011)
    assert http.get("/api/info").json()["state"] == "failed"


def test_create_app_rejects_bad_settings(tiny):
    with pytest.raises(ConfigError, match="max-clients"):
        create_app(tiny, max_clients=0)
    with pytest.raises(ConfigError, match="jpeg-quality"):
        create_app(tiny, jpeg_quality=0)


# --- idle sessions, logged errors, random seeds ---------------------------------------------
def test_idle_sessions_are_told_why_and_closed(make_client):
    """A silent socket must not hold a session forever (4 of them made the server busy)."""
    http = make_client(max_clients=1, idle_timeout=0.6)
    assert http.get("/api/info").json()["idle_timeout"] == 0.6
    talker = connect(http)
    for _ in range(4):  # any message counts as activity: 1.2 s of pings keep it open
        time.sleep(0.3)
        talker.ping()
    deadline = time.monotonic() + 10
    while True:
        what, value = talker.receive()
        if what == "event" and value["type"] == "idle":
            break
        assert what != "close" and time.monotonic() < deadline, (what, value)
    assert "no message for 0.6 s" in value["message"] and value["idle_timeout"] == 0.6
    assert talker.receive() == ("close", 1000)
    wait_until(lambda: http.get("/api/info").json()["clients"] == 0)
    connect(http).frames(1)  # the session was given back: a new client is served


def test_idle_timeout_must_be_positive_or_none(tiny, make_client):
    with pytest.raises(ConfigError, match="idle-timeout must be > 0"):
        create_app(tiny, idle_timeout=0)
    assert make_client(idle_timeout=None).get("/api/info").json()["idle_timeout"] is None


def test_internal_errors_are_logged_on_the_server_too(make_client, caplog):
    def failing_factory(components, config):
        pipe = make_pipeline(components, config)

        def broken_push(frame):
            raise RuntimeError("boom")

        pipe.push = broken_push
        return pipe

    client = connect(make_client(pipeline_factory=failing_factory))
    with caplog.at_level("ERROR", logger="diffstream.server"):
        client.frames(1)
    assert client.errors() == ["internal error: RuntimeError: boom"]
    (record,) = [r for r in caplog.records if r.name == "diffstream.server"]
    assert record.levelname == "ERROR" and "internal error" in record.getMessage()
    assert record.exc_info and isinstance(record.exc_info[1], RuntimeError)  # with its traceback


def test_model_load_failure_is_logged(make_client, caplog):
    def factory():
        raise ModelLoadError("cannot load model 'x'")

    with caplog.at_level("ERROR", logger="diffstream.server"):
        http = make_client(model=factory)
        wait_until(lambda: http.app.state.engine.state == "failed")
    assert any("model failed to load: cannot load model 'x'" in r.getMessage() for r in caplog.records)


def test_seed_minus_one_picks_a_random_seed_and_says_which(make_client):
    client = connect(make_client())
    seeds = []
    for _ in range(3):
        client.send(type="params", seed=-1)
        params = client.wait_for("params")["params"]
        assert 0 <= params["seed"] < 2**32
        seeds.append(params["seed"])
    assert len(set(seeds)) > 1
    client.frames(FILL + 1)
    assert len(client.outputs) == 1 and client.errors() == []


def test_a_prompt_clip_would_cut_is_warned_about(make_client, caplog):
    client = connect(make_client())
    long = "a watercolor painting of " + " and ".join(f"a tree number {i}" for i in range(40))
    with caplog.at_level("WARNING", logger="diffstream.server"):
        client.send(type="params", prompt=long)
        warning = client.wait_for("warning")
    assert "77 tokens" in warning["message"] and "cut after" in warning["message"]
    assert any("77 tokens" in r.getMessage() for r in caplog.records)
    client.send(type="params", prompt="a short prompt")
    client.wait_for("params")
    assert not [e for e in client.events if e["type"] == "warning" and "short" in e["message"]]


def test_controlnet_scales_are_listed_and_changed_live(make_client):
    """A server with a ControlNet: "ready" names it, a scale change applies without a
    restart, and a list of the wrong length is refused in one line (the session lives)."""
    from diffstream.config import ModelConfig
    from diffstream.models.loading import load_components

    model = load_components(ModelConfig(model="tiny", device="cpu", controlnets=(("canny", "tiny"),)))
    client = connect(make_client(model=model))
    assert client.ready["controlnets"] == ["canny"] and client.ready["params"]["control_scales"] is None
    client.frames(FILL + 1)
    client.send(type="params", control_scales=[0.25])
    applied = client.wait_for("params")
    assert applied["params"]["control_scales"] == [0.25] and applied["restarted"] is False
    client.send(type="params", control_scales=[0.25, 1.0])
    assert "one scale per ControlNet of this server (1), got 2" in client.wait_for("error")["message"]
    client.frames(1, start=FILL + 1)
    assert len(client.outputs) == 2


def test_an_image_prompt_from_the_page_changes_the_stream(make_client, adapted, tiny):
    """An "image_prompt" message (a data: URI) switches the IP-Adapter on from the next frame
    without a restart; a server without an IP-Adapter refuses it in one line."""
    import base64

    uri = "data:image/jpeg;base64," + base64.b64encode(encode_jpeg(np.full((32, 32, 3), 200, np.uint8))).decode()
    client = connect(make_client(model=adapted))
    assert client.ready["ip_adapter"] is True and client.ready["params"]["image_prompt"] is False
    client.frames(FILL + 1)
    client.send(type="image_prompt", data=uri)
    applied = client.wait_for("params")
    assert applied["params"]["image_prompt"] is True and applied["restarted"] is False
    client.frames(1, start=FILL + 1)
    assert len(client.outputs) == 2
    plain = connect(make_client(model=tiny))
    plain.send(type="image_prompt", data=uri)
    assert "has no IP-Adapter" in plain.wait_for("error")["message"]


def test_a_wan_model_serves_causal_video_one_output_per_frame(make_client):
    """`serve --model tiny-wan` (its base settings on causal-video, as the serve command
    makes them): causal-video is the one method offered, and every frame comes back (the
    first alone, then a chunk of 4 at once)."""
    from diffstream.config import ModelConfig
    from diffstream.models.loading import load_components

    http = make_client(model=load_components(ModelConfig(model="tiny-wan", device="cpu")),
                       base_config=StreamConfig(method="causal-video"))
    assert http.get("/api/info").json()["methods"] == ["causal-video"]
    client = connect(http)
    assert client.ready["params"]["method"] == "causal-video"
    stats = client.frames(5)
    assert [frame_id for frame_id, _ in client.outputs] == [0, 1, 2, 3, 4]
    assert all(decode_image_bytes(jpeg).shape == (48, 64, 3) for _, jpeg in client.outputs)
    assert (stats["received"], stats["outputs"]) == (5, 5) and client.errors() == []
