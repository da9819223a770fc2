"""The live demo in a real browser: headless Chromium, a fake camera, the tiny model.

Chromium's fake capture device plays a .y4m file written here (a moving pattern), the
page streams it to a uvicorn server on 127.0.0.1 running the tiny model, and the test
checks that restyled frames are drawn and keep changing, that a prompt typed in the
page reaches the server and comes back applied, that a second page is told the server
is busy and reconnects by itself once the first leaves, and takes screenshots. Over
WebRTC (a server with --webrtc, the page on its WebRTC transport) it checks the same:
restyled frames played from WHEP, a prompt applied over the data channel, the stats,
busy, and the publication DELETEd when the page switches back to the WebSocket.

Needs Debian's chromium (/usr/bin/chromium) and the `playwright` Python package (its
own browser download is never used), and aiortc for the WebRTC test; without them the
tests are skipped, saying which is missing and how to install it.
"""

import contextlib
import importlib.util
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from diffstream.server.app import create_app
from diffstream.testing import make_frames

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
# As root on this kind of machine Chromium needs no sandbox and must not phone home
# (background networking to Google's hosts is refused here and slows every start).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
]
TIMEOUT_MS = 60_000


def find_chromium() -> str | None:
    env = os.environ.get("DIFFSTREAM_CHROMIUM")
    for path in ((env,) if env else ()) + CHROMIUM_CANDIDATES:
        if path and Path(path).is_file() and os.access(path, os.X_OK):
            return path
    return shutil.which("chromium")


def write_y4m(path: Path, count: int = 30, width: int = 160, height: int = 120) -> None:
    """A short clip of a drifting pattern as YUV4MPEG2 (what Chromium's fake camera plays)."""
    import av

    from diffstream.frames import frame_to_av_frame

    with av.open(str(path), "w", format="yuv4mpegpipe") as container:
        stream = container.add_stream("rawvideo", rate=15)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i, frame in enumerate(make_frames(count, height=height, width=width, seed=3)):
            av_frame = frame_to_av_frame(frame)
            av_frame.pts = i
            for packet in stream.encode(av_frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture
def browser_tools():
    """(chromium path, playwright.sync_api), or a skip that says what is missing."""
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("Chromium not found: install it with `apt-get install -y chromium` (or set DIFFSTREAM_CHROMIUM)")
    try:
        from playwright import sync_api
    except ImportError:
        pytest.skip("Playwright not installed: `pip install playwright` (the browser comes from Debian's chromium)")
    if not any(importlib.util.find_spec(name) for name in ("websockets", "wsproto")):
        pytest.skip("uvicorn cannot serve WebSockets without the websockets package: `pip install websockets`")
    return chromium, sync_api


@pytest.fixture
def live_server(tiny):
    """The demo app on the tiny model, served by uvicorn on 127.0.0.1 in a thread."""
    # One session only, so a second page has to wait for the first (busy, then reconnect).
    with serving(create_app(tiny, size=64, max_clients=1, stats_interval=0.25)) as served:
        yield served


@contextlib.contextmanager
def serving(app):
    """Serve `app` with uvicorn on a free 127.0.0.1 port in a thread: (base URL, app)."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", ws_per_message_deflate=False, lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", app
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


CANVAS_PIXELS = """() => {
    const c = document.getElementById('output');
    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    return {width: c.width, height: c.height, data: Array.from(d)};
}"""


def canvas_pixels(page) -> np.ndarray:
    snap = page.evaluate(CANVAS_PIXELS)
    return np.array(snap["data"], dtype=np.uint8).reshape(snap["height"], snap["width"], 4)


def frames_drawn(page) -> int:
    return int(page.text_content("#stat-frames"))


def wait_for_frames(page, at_least: int) -> None:
    # Predicates are functions, not expressions: the page's CSP forbids eval, which
    # Playwright would need for an expression string.
    page.wait_for_function(
        "(n) => Number(document.getElementById('stat-frames').textContent) >= n", arg=at_least, timeout=TIMEOUT_MS
    )


def wait_until(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_live_demo_in_headless_chromium(browser_tools, live_server, tmp_path):
    chromium, sync_api = browser_tools
    url, app = live_server
    clip = tmp_path / "pattern.y4m"
    write_y4m(clip)
    console = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=chromium,
            headless=True,
            args=CHROMIUM_ARGS + [f"--use-file-for-fake-video-capture={clip}"],
        )
        try:
            context = browser.new_context(viewport={"width": 1100, "height": 820})
            context.grant_permissions(["camera"], origin=url)
            page = context.new_page()
            page.on("console", lambda msg: console.append(f"{msg.type}: {msg.text}"))
            page.on("pageerror", lambda err: console.append(f"pageerror: {err}"))
            page.goto(url)

            # Restyled frames are drawn, and they change over time (the input moves).
            wait_for_frames(page, 3)
            first = canvas_pixels(page)
            assert first.shape[:2] == (48, 64), first.shape  # the server's processing size
            assert first[:, :, 3].min() == 255 and first[:, :, :3].std() > 5
            drawn = frames_drawn(page)
            wait_for_frames(page, drawn + 5)
            later = canvas_pixels(page)
            assert np.abs(first.astype(int) - later.astype(int)).mean() > 1.0

            # A prompt typed in the page reaches the server and comes back applied,
            # and frames keep coming without a reset.
            page.fill("#prompt", "a watercolor fox")
            page.press("#prompt", "Enter")
            page.wait_for_function(
                "(p) => document.getElementById('applied').dataset.prompt === p",
                arg="a watercolor fox",
                timeout=TIMEOUT_MS,
            )
            assert "a watercolor fox" in page.text_content("#applied")
            (session,) = app.state.engine.sessions
            assert session.applied.prompt == "a watercolor fox"
            drawn = frames_drawn(page)
            wait_for_frames(page, drawn + 3)

            # A second prompt blended in by a weight reaches the server as a prompt blend.
            page.fill("#blend-prompt", "a pencil sketch")
            page.fill("#blend-weight", "0.25")
            page.dispatch_event("#blend-weight", "change")
            page.wait_for_function("() => document.getElementById('applied').dataset.blend !== ''", timeout=TIMEOUT_MS)
            assert session.applied.prompt_blend == (("a watercolor fox", 0.75), ("a pencil sketch", 0.25))
            page.fill("#blend-weight", "0")
            page.dispatch_event("#blend-weight", "change")
            page.wait_for_function("() => document.getElementById('applied').dataset.blend === ''", timeout=TIMEOUT_MS)
            assert session.applied.prompt_blend is None
            page.fill("#seed-weight", "0.5")
            page.dispatch_event("#seed-weight", "change")
            wait_until(lambda: session.applied.seed_blend == ((2, 0.5), (3, 0.5)))
            page.fill("#seed-weight", "0")
            page.dispatch_event("#seed-weight", "change")
            wait_until(lambda: session.applied.seed_blend is None)

            # Seed -1 means a random seed, as on the command line: the page shows the one picked.
            assert page.text_content("#applied").endswith("seed 2")
            page.fill("#seed", "-1")
            page.dispatch_event("#seed", "change")
            page.wait_for_function(
                "() => { const m = /seed (\\d+)$/.exec(document.getElementById('applied').textContent);"
                " return m !== null && m[1] !== '2'; }",
                timeout=TIMEOUT_MS,
            )
            assert 0 <= session.applied.seed < 2**32
            assert page.text_content("#applied").endswith(f"seed {session.applied.seed}")

            assert page.get_attribute("#status", "data-state") == "ok", page.text_content("#status")
            assert page.is_hidden("#error"), page.text_content("#error")
            page.wait_for_function(
                "() => Number(document.getElementById('stat-fps').textContent) > 0 && "
                "document.getElementById('stat-latency').textContent.endsWith('ms')",
                timeout=TIMEOUT_MS,
            )
            shot = tmp_path / "live_demo.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000

            # A second page finds the only session taken: it says so and waits; once
            # the first page is gone it reconnects by itself and streams.
            second = context.new_page()
            second.on("pageerror", lambda err: console.append(f"pageerror: {err}"))
            second.goto(url)
            second.wait_for_function(
                "() => document.getElementById('status').dataset.state === 'busy'", timeout=TIMEOUT_MS
            )
            assert "Server busy" in second.text_content("#status")
            busy_shot = tmp_path / "live_demo_busy.png"
            second.screenshot(path=str(busy_shot))
            page.close()
            wait_for_frames(second, 2)
            assert second.get_attribute("#status", "data-state") == "ok"
            keep = os.environ.get("DIFFSTREAM_SCREENSHOT_DIR")
            if keep:
                Path(keep).mkdir(parents=True, exist_ok=True)
                for path in (shot, busy_shot):
                    shutil.copy(path, Path(keep) / path.name)
        finally:
            browser.close()
    assert not [line for line in console if line.startswith(("error", "pageerror"))], console


def test_an_idle_page_is_told_and_reconnects_when_used_again(browser_tools, tiny, tmp_path):
    """The server closes a session that sends nothing; the page says why, does not hold a
    session by reconnecting on its own, and reconnects once the user picks a source."""
    chromium, sync_api = browser_tools
    clip = tmp_path / "pattern.y4m"
    write_y4m(clip)
    app = create_app(tiny, size=64, max_clients=1, stats_interval=0.25, idle_timeout=1.5)
    with serving(app) as (url, app), sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=chromium, headless=True,
            args=CHROMIUM_ARGS + [f"--use-file-for-fake-video-capture={clip}"],
        )
        try:
            context = browser.new_context()
            context.grant_permissions(["camera"], origin=url)
            page = context.new_page()
            page.goto(url)
            wait_for_frames(page, 2)
            # The source goes away (as when a camera is unplugged): nothing more is sent.
            page.evaluate("() => { state.sourceKind = null; }")
            page.wait_for_function(
                "() => document.getElementById('status').dataset.state === 'idle'", timeout=TIMEOUT_MS
            )
            assert "closed the session after no message for 1.5 s" in page.text_content("#status")
            assert app.state.engine.clients == 0
            time.sleep(3)  # two idle periods: the page has not taken the session back
            assert app.state.engine.clients == 0
            page.click("#use-camera")
            drawn = frames_drawn(page)
            wait_for_frames(page, drawn + 2)
            assert page.get_attribute("#status", "data-state") == "ok", page.text_content("#status")
        finally:
            browser.close()


# --- the same page over WebRTC (WHIP ingest, WHEP playback, the data channel) -------------
# A passing run needs a few seconds for each wait; a broken one (the mutation suite's runs)
# fails at the first, so it is shorter than TIMEOUT_MS.
WEBRTC_TIMEOUT_MS = 20_000

VIDEO_PIXELS = """() => {
    const v = document.getElementById('restyled');
    if (!v.videoWidth) return null;
    const c = document.createElement('canvas');
    c.width = v.videoWidth;
    c.height = v.videoHeight;
    const ctx = c.getContext('2d');
    ctx.drawImage(v, 0, 0);
    return {width: c.width, height: c.height, data: Array.from(ctx.getImageData(0, 0, c.width, c.height).data)};
}"""


def video_pixels(page) -> np.ndarray:
    """The frame the page's WebRTC <video> shows now, (H, W, 4) uint8."""
    snap = page.evaluate(VIDEO_PIXELS)
    assert snap is not None, "the restyled <video> shows nothing"
    return np.array(snap["data"], dtype=np.uint8).reshape(snap["height"], snap["width"], 4)


def wait_in_page(page, predicate: str, arg=None, what: str = "condition") -> None:
    """Wait for a JS predicate, or fail with an AssertionError saying what the page shows
    (a stuck page is a failed proof, not a crash of the test)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(predicate, arg=arg, timeout=WEBRTC_TIMEOUT_MS)
    except PlaywrightTimeout:
        raise AssertionError(f"{what} not reached in {WEBRTC_TIMEOUT_MS / 1000:g} s; status: "
                             f"{page.text_content('#status')!r}; error: {page.text_content('#error')!r}") from None


# The page's count of output frames shown (drawn on the canvas or played by the video):
# its own counter, not the stats line, which is refreshed every 0.5 s only.
SHOWN = "() => state.framesDrawn"
# At least n frames shown, or an error shown (the assertion after the wait says which).
FRAMES_OR_ERROR = "(n) => state.framesDrawn >= n || !document.getElementById('error').hidden"


@pytest.fixture
def webrtc_live_server(tiny):
    """The demo app with --webrtc (WHIP/WHEP) on the tiny model; skips without aiortc."""
    pytest.importorskip("aiortc",
                        reason="the webrtc extra (aiortc) is not installed: `pip install 'diffstream[webrtc]'`")
    with serving(create_app(tiny, size=64, max_clients=1, stats_interval=0.25, webrtc=True)) as served:
        yield served


def test_live_demo_over_webrtc_in_headless_chromium(browser_tools, webrtc_live_server, tmp_path):
    """The page switched to WebRTC (?transport=webrtc) publishes the fake camera with WHIP,
    plays the restyled stream from WHEP, and steers the session over the data channel with
    the same messages as the WebSocket; a busy server is shown as busy; switching back to
    the WebSocket DELETEs the publication."""
    chromium, sync_api = browser_tools
    url, app = webrtc_live_server
    engine, gateway = app.state.engine, app.state.webrtc
    clip = tmp_path / "pattern.y4m"
    write_y4m(clip)
    console = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=chromium, headless=True,
            # Chromium leaves the loopback interface out of ICE unless told: on a machine
            # with no other interface it would have no candidate for the 127.0.0.1 server.
            args=CHROMIUM_ARGS + [f"--use-file-for-fake-video-capture={clip}", "--allow-loopback-in-peer-connection"],
        )
        try:
            context = browser.new_context()
            context.grant_permissions(["camera"], origin=url)
            page = context.new_page()
            page.on("console", lambda msg: console.append(f"{msg.type}: {msg.text}"))
            page.on("pageerror", lambda err: console.append(f"pageerror: {err}"))
            page.goto(f"{url}/?transport=webrtc")

            # Restyled frames come back as a WebRTC stream, at the server's processing
            # size, shown in the <video> where the canvas was, and they keep changing.
            wait_in_page(page, FRAMES_OR_ERROR, 3, "3 restyled frames shown")
            assert page.is_hidden("#error"), page.text_content("#error")
            assert page.is_visible("#transport") and page.input_value("#transport") == "webrtc"
            assert page.is_visible("#restyled") and page.is_hidden("#output")
            (pub,) = gateway.publications
            assert len(pub.viewers) == 1 and pub.channels, "no WHEP viewer or data channel"
            first = video_pixels(page)
            assert first.shape[:2] == (48, 64), first.shape
            assert first[:, :, :3].std() > 5
            wait_in_page(page, FRAMES_OR_ERROR, page.evaluate(SHOWN) + 5, "5 more frames shown")
            later = video_pixels(page)
            assert np.abs(first.astype(int) - later.astype(int)).mean() > 1.0

            # A prompt typed in the page goes over the data channel and comes back applied.
            page.fill("#prompt", "a watercolor fox")
            page.press("#prompt", "Enter")
            wait_in_page(page, "(p) => document.getElementById('applied').dataset.prompt === p",
                         "a watercolor fox", "the prompt applied")
            (session,) = engine.sessions
            assert session is pub.session and session.applied.prompt == "a watercolor fox"

            # The stats come over the data channel too: frames the server got from the
            # page's video track, and a latency (the data channel's ping round trips).
            wait_in_page(page, "() => ['stat-received', 'stat-frames', 'stat-fps'].every("
                               "(id) => Number(document.getElementById(id).textContent) > 0) && "
                               "document.getElementById('stat-latency').textContent.endsWith('ms')",
                         what="received and shown frames, fps and latency in the stats")
            assert pub.frames_in > 0 and engine.stats(session)["received"] > 0
            assert gateway.info()["publishers"] == 1
            assert page.get_attribute("#status", "data-state") == "ok", page.text_content("#status")
            assert "over WebRTC" in page.text_content("#status")

            # A second page finds the only session taken: WHIP's 503 shows as "busy".
            second = context.new_page()
            second.on("pageerror", lambda err: console.append(f"pageerror: {err}"))
            second.goto(f"{url}/?transport=webrtc")
            wait_in_page(second, "() => document.getElementById('status').dataset.state === 'busy'",
                         what="the busy status")
            assert "Server busy" in second.text_content("#status")
            second.close()

            # Back to the WebSocket: the page DELETEs its publication (the session is free
            # at once) and draws the WebSocket's frames on the canvas again.
            page.select_option("#transport", "websocket")
            wait_until(lambda: not gateway.publications, timeout=WEBRTC_TIMEOUT_MS / 1000)
            assert pub.reason == "ended by the publisher (DELETE)", pub.reason
            wait_in_page(page, "() => state.link && state.link.kind === 'websocket' && state.lastDrawnId >= 2"
                               " || !document.getElementById('error').hidden", what="WebSocket frames after the switch")
            assert page.is_hidden("#error"), page.text_content("#error")
            assert page.is_visible("#output") and page.is_hidden("#restyled")
            assert canvas_pixels(page).shape[:2] == (48, 64)
        finally:
            browser.close()
    assert not [line for line in console if line.startswith(("error", "pageerror"))], console
