"""OSC control of a server (`diffstream serve --osc PORT`): one controller steers every
stream the server serves. Real UDP datagrams from python-osc's client reach the app's
`OSCControl`; the app hands each accepted change to every open session as if its client
had sent it (`Engine.broadcast`), so it applies from that session's next frame, and to
the settings later sessions start with. The tiny model at 64 px; sessions are WebSocket
clients of FastAPI's test client (`tests/server/test_app.py`'s helpers)."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("pythonosc")
from pythonosc.udp_client import SimpleUDPClient  # noqa: E402

from diffstream.pipelines.factory import make_pipeline  # noqa: E402
from diffstream.server.osc import OSCControl  # noqa: E402
from tests.server.test_app import connect, make_client  # noqa: E402,F401  (the fixture)

TIMEOUT = 5.0


class Recorder:
    """A pipeline factory recording, per session, the settings each pushed frame ran with."""

    def __init__(self):
        self.pushes: dict[int, list] = {}

    def __call__(self, components, config):
        pipe = make_pipeline(components, config)
        record = self.pushes.setdefault(len(self.pushes), [])
        pipe.on_push.append(lambda index: record.append(pipe.config))
        return pipe


@pytest.fixture
def served(make_client):
    """(test client, the OSC client, the lines the control printed, the recorder)."""
    lines: list[str] = []
    control = OSCControl(0, say=lines.append)
    recorder = Recorder()
    test_client = make_client(osc=control, pipeline_factory=recorder)
    sender = SimpleUDPClient("127.0.0.1", control.port)

    def send(address, *values):
        """Send one message and wait until the control has handled it."""
        before = control.received
        sender.send_message(address, list(values))
        deadline = time.monotonic() + TIMEOUT
        while control.received <= before:
            assert time.monotonic() < deadline, f"OSC {address} was not handled"
            time.sleep(0.002)

    yield test_client, send, lines, recorder
    control.close()


def eventually(check, what: str) -> None:
    """Wait (at most TIMEOUT) until `check()` is true; an AssertionError naming `what` if never."""
    deadline = time.monotonic() + TIMEOUT
    while not check():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.002)


def settled(test_client, check, what: str) -> None:
    """Wait until the oldest session's settings pass `check`. `Engine.broadcast` queues a
    change on every session in one go, so then every session has been handed it."""
    engine = test_client.app.state.engine
    eventually(lambda: check(engine.sessions[0].requested), what)


def applied(client) -> dict:
    """The settings of the last "params" event a client got, once every earlier message
    to its session has been handled (a ping is the barrier)."""
    client.ping()
    events = [e for e in client.events if e["type"] == "params"]
    assert events, "no params event"
    return events[-1]["params"]


def test_a_change_reaches_every_session_from_its_next_frame_and_new_sessions_start_with_it(served):
    test_client, send, lines, recorder = served
    a, b = connect(test_client), connect(test_client)
    a.frames(2)
    send("/prompt", "a watercolor painting")
    send("/strength", 0.5)
    settled(test_client, lambda c: c.strength == 0.5, "/strength 0.5 handed to the sessions")
    for client in (a, b):  # each session answers as if its client had sent the change
        params = applied(client)
        assert (params["prompt"], params["strength"]) == ("a watercolor painting", 0.5)
    a.frames(2, start=2)
    b.frames(1)
    pushes_a, pushes_b = recorder.pushes[0], recorder.pushes[1]
    before = pushes_a[0].prompt
    assert before != "a watercolor painting"
    assert [c.prompt for c in pushes_a] == [before, before, "a watercolor painting", "a watercolor painting"]
    assert [c.strength for c in pushes_a] == [0.4, 0.4, 0.5, 0.5]
    assert [(c.prompt, c.strength) for c in pushes_b] == [("a watercolor painting", 0.5)]
    # A session opened afterwards starts on the controller's settings.
    c = connect(test_client)
    assert (c.ready["params"]["prompt"], c.ready["params"]["strength"]) == ("a watercolor painting", 0.5)
    info = test_client.get("/api/info").json()["osc"]
    assert info["host"] == "127.0.0.1" and "/method" in info["addresses"] and "/reset" in info["addresses"]
    assert lines == []


def test_method_and_reset_reach_every_session_and_a_bad_method_is_one_line(served):
    test_client, send, lines, recorder = served
    a, b = connect(test_client), connect(test_client)
    a.frames(1)
    send("/method", "nonexistent")
    send("/method", "streamv2v")
    assert len(lines) == 1 and "OSC /method 'nonexistent' ignored" in lines[0] and "streamv2v" in lines[0], lines
    settled(test_client, lambda c: c.method == "streamv2v", "/method streamv2v handed to the sessions")
    for client in (a, b):
        assert applied(client)["method"] == "streamv2v"
    send("/reset")
    for client in (a, b):
        client.wait_for("reset", TIMEOUT)
    a.frames(1, start=1)
    assert [c.method for c in recorder.pushes[0]] == ["streamdiffusion"]  # the first pipeline's frame
    assert [c.method for c in recorder.pushes[1]] == ["streamv2v"]  # a new pipeline for the new method


def test_a_change_one_session_cannot_take_is_refused_for_it_alone(served):
    test_client, send, lines, recorder = served
    a, b = connect(test_client), connect(test_client)
    a.send(type="params", strength=0.05, steps=2)
    a.wait_for("params", TIMEOUT)
    send("/steps", 4)  # fine for the server's settings and b's, too many for a's strength
    engine = test_client.app.state.engine
    eventually(lambda: engine.sessions[1].requested.steps == 4, "/steps 4 handed to the second session")
    assert applied(b)["steps"] == 4
    a.ping()
    assert a.errors() == ["a controller's change was not applied: steps 4 is too many for strength 0.05: at most 2"]
    assert a.ping()["rejected"] == 1
    eventually(lambda: lines, "a line about the refusal")
    assert len(lines) == 1 and "not applied to session" in lines[0] and "at most 2" in lines[0], lines


def test_serve_osc_options_are_checked_before_anything_loads(capsys, monkeypatch):
    import diffstream.models.loading as loading
    from diffstream.commands import serve

    def refuse(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(loading, "load_components", refuse)
    assert serve.main(["--model", "tiny", "--osc-host", "0.0.0.0"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "diffstream: error: --osc-host needs --osc PORT (the UDP port to listen on)"]
    with OSCControl(0) as taken:  # a taken UDP port: one line, before loading
        assert serve.main(["--model", "tiny", "--port", "0", "--osc", str(taken.port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"diffstream: error: cannot listen for OSC on 127.0.0.1:{taken.port}")
