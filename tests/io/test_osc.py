"""OSC control (`diffstream run --osc PORT`, `diffstream.server.osc`): real UDP datagrams
from python-osc's client to a server on a free port; each message is checked by the web
protocol's rules, a bad one costs one line and nothing else, and the run applies the
accepted ones from the next frame."""

from __future__ import annotations

import re
import socket
import sys
import time

import numpy as np
import pytest

pytest.importorskip("pythonosc")
from pythonosc.udp_client import SimpleUDPClient  # noqa: E402

from diffstream.config import StreamConfig  # noqa: E402
from diffstream.errors import ConfigError  # noqa: E402
from diffstream.server import osc as osc_module  # noqa: E402
from diffstream.server.osc import Control, OSCControl, host_warning  # noqa: E402
from diffstream.server.protocol import MAX_SEED, Limits, parse_params  # noqa: E402

CONFIG = StreamConfig(prompt="x")


def wait_for(control: OSCControl, received: int, timeout: float = 5.0) -> None:
    """Block until the server thread has handled `received` messages."""
    deadline = time.monotonic() + timeout
    while control.received < received:
        assert time.monotonic() < deadline, f"only {control.received} of {received} OSC messages arrived"
        time.sleep(0.002)


class Osc:
    """A started control on a free port, a client for it, and the lines it printed."""

    def __init__(self, config: StreamConfig = CONFIG, turbo: bool = False):
        self.lines: list[str] = []
        self.control = OSCControl(0, say=self.lines.append)
        self.control.start(config, turbo=turbo)
        self.client = SimpleUDPClient("127.0.0.1", self.control.port)

    def send(self, address: str, *args) -> None:
        """Send one message and wait until it has been handled."""
        before = self.control.received
        self.client.send_message(address, list(args))
        wait_for(self.control, before + 1)


@pytest.fixture
def osc():
    o = Osc()
    yield o
    o.control.close()


def test_the_bound_port_is_known_and_close_frees_it():
    with OSCControl(0) as control:
        port = control.port
        assert port != 0 and control.requested is None
    control.close()  # idempotent
    with OSCControl(port) as again:  # freed: the same port binds again
        assert again.port == port


# --- valid messages -----------------------------------------------------------------
def test_valid_messages_arrive_typed_as_the_web_protocol_types_them(osc):
    sent = [
        ("/prompt", "a pencil sketch"), ("/negative_prompt", "blurry"),
        ("/strength", 1), ("/strength", 0.4), ("/steps", 2), ("/seed", 7), ("/guidance", 1.5),
        ("/guidance", None), ("/delta", 0.5), ("/similarity_threshold", 0.98), ("/similarity_threshold", None),
    ]
    for address, value in sent:
        osc.send(address, value)
    got = osc.control.poll()
    assert osc.lines == [] and osc.control.accepted == len(sent)
    assert got == [Control({address[1:]: value}) for address, value in sent]
    # The same values as a web "params" message gives, types included (an int
    # strength is a float) ...
    for control, (address, value) in zip(got, sent):
        web = parse_params({address[1:]: value}, Limits())
        assert control.changes == web and type(control.changes[address[1:]]) is type(web[address[1:]])
    # ... and an OSC float 0.4 (32 bits on the wire) is the 0.4 of --strength 0.4: the
    # same schedule (its binary value, 0.4000000059604645, would start at index 29).
    assert got[3].changes["strength"] == 0.4 and got[9].changes["similarity_threshold"] == 0.98
    assert CONFIG.replace(**got[3].changes).t_indices() == StreamConfig(strength=0.4).t_indices() == (30, 35, 40, 45)
    assert osc.control.poll() == []


def test_a_burst_is_polled_at_once_in_order_and_reset_arrives_as_a_reset(osc):
    osc.send("/prompt", "a")
    osc.send("/reset")
    osc.send("/prompt", "b")
    osc.send("/seed", 3)
    assert osc.control.poll() == [Control({"prompt": "a"}), Control(reset=True), Control({"prompt": "b"}),
                                  Control({"seed": 3})]
    assert osc.control.poll() == [] and osc.lines == []


def test_changes_are_checked_against_the_settings_as_they_will_be(osc):
    osc.send("/strength", 0.1)  # at most 5 steps from here on
    osc.send("/steps", 8)
    osc.send("/steps", 5)
    assert osc.control.poll() == [Control({"strength": 0.1}), Control({"steps": 5})]
    assert len(osc.lines) == 1 and "--steps" not in osc.lines[0]
    assert re.search(r"steps 8 is too many for strength 0\.1", osc.lines[0]), osc.lines
    assert osc.control.requested == CONFIG.replace(strength=0.1, steps=5)


def test_seed_minus_one_picks_a_random_seed_and_says_which(osc):
    osc.send("/seed", -1)
    (control,) = osc.control.poll()
    seed = control.changes["seed"]
    assert 0 <= seed <= MAX_SEED
    assert osc.lines == [f"OSC /seed -1: using seed {seed}"]
    assert osc.control.requested.seed == seed


# --- invalid messages -----------------------------------------------------------------
INVALID = {
    "steps-float": ("/steps", [4.0], "steps must be an integer", "/steps 4"),
    "steps-fraction": ("/steps", [4.5], "steps must be an integer", "/steps 4"),
    "steps-bool": ("/steps", [True], "steps must be an integer", "/steps 4"),
    "steps-too-many": ("/steps", [51], "steps must be between 1 and 50", "/steps 4"),
    "strength-text": ("/strength", ["0.5"], "strength must be a number, got a string", "/strength 0.4"),
    "strength-range": ("/strength", [2.0], "strength must be in (0, 1], got 2.0", "/strength 0.4"),
    "strength-nan": ("/strength", [float("nan")], "strength must be a number", "/strength 0.4"),
    "strength-two-args": ("/strength", [0.5, 0.6], "takes one argument, got 2", "/strength 0.4"),
    "strength-no-arg": ("/strength", [], "takes one argument, got 0", "/strength 0.4"),
    "prompt-number": ("/prompt", [3], "prompt must be a string", '/prompt "a watercolor painting"'),
    "prompt-too-long": ("/prompt", ["x" * 1001], "the limit is 1000", '/prompt "a watercolor painting"'),
    "seed-range": ("/seed", [-2], "seed must be -1 (a random seed) or between 0 and", "/seed 42"),
    "seed-float": ("/seed", [1.5], "seed must be an integer", "/seed 42"),
    "guidance-negative": ("/guidance", [-1.0], "guidance must be >= 0", "/guidance 1.2"),
    "threshold-one": ("/similarity_threshold", [1.0], "similarity_threshold must be in [0, 1)",
                      "/similarity_threshold 0.98"),
    "reset-with-arg": ("/reset", [1], "/reset takes no arguments", "send /reset alone"),
    "unknown-address": ("/strenght", [0.5], "unknown address", "/prompt, /negative_prompt, /strength"),
    "address-pattern": ("/s*", [0.5], "unknown address", "/similarity_threshold, /reset"),
    "method": ("/method", ["streamv2v"], "cannot change during a run", "--method"),
}


@pytest.mark.parametrize("case", list(INVALID), ids=list(INVALID))
def test_an_invalid_message_prints_one_line_and_changes_nothing(osc, case):
    address, args, reason, instead = INVALID[case]
    osc.send(address, *args)
    assert osc.control.poll() == []
    assert (osc.control.accepted, osc.control.rejected) == (0, 1)
    assert osc.control.requested == CONFIG
    assert len(osc.lines) == 1 and "\n" not in osc.lines[0], osc.lines
    line = osc.lines[0]
    assert line.startswith(f"OSC {address}") and " ignored: " in line
    assert reason in line and instead in line, line
    assert len(line) < 260, line  # a 1001-character prompt is not echoed whole
    osc.send("/prompt", "still listening")  # the server lives on
    assert osc.control.poll() == [Control({"prompt": "still listening"})]


def test_a_datagram_that_is_not_osc_prints_one_line(osc):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
        raw.sendto(b"hello", ("127.0.0.1", osc.control.port))
        wait_for(osc.control, 1)
    assert osc.control.poll() == []
    assert len(osc.lines) == 1 and "not an OSC message" in osc.lines[0]


def test_changes_beyond_the_pending_limit_are_refused_without_counting():
    lines: list[str] = []
    with OSCControl(0, say=lines.append, max_pending=2) as control:
        control.start(CONFIG)
        client = SimpleUDPClient("127.0.0.1", control.port)
        for strength in (0.5, 0.6, 0.7):
            client.send_message("/strength", strength)
        wait_for(control, 3)
        assert [c.changes for c in control.poll()] == [{"strength": 0.5}, {"strength": 0.6}]
        assert len(lines) == 1 and "2 changes already wait for the next frame" in lines[0]
        assert control.requested.strength == 0.6  # the refused 0.7 is not what the stream will have


# --- start-up errors ------------------------------------------------------------------
def test_a_port_in_use_is_a_one_line_config_error():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError) as err:
            OSCControl(port)
    message = str(err.value)
    assert "\n" not in message and f"127.0.0.1:{port}" in message and "choose another --osc port" in message


def test_a_port_out_of_range_is_a_config_error():
    with pytest.raises(ConfigError, match="--osc must be a UDP port from 0 to 65535"):
        OSCControl(70000)


def test_non_loopback_hosts_are_warned_about():
    assert host_warning("127.0.0.1") is None and host_warning("localhost") is None and host_warning("::1") is None
    warning = host_warning("0.0.0.0")
    assert "without authentication" in warning and "--osc-host 127.0.0.1" in warning and "\n" not in warning


# --- diffstream run --osc ----------------------------------------------------------------
TINY = ["--model", "tiny", "--size", "64", "--no-progress", "--prompt", "x", "--steps", "2"]


def write_pngs(folder, frames) -> str:
    from PIL import Image

    folder.mkdir()
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"{i:03d}.png")
    return str(folder)


@pytest.fixture
def run_with_osc(monkeypatch, tiny, tmp_path):
    """Run `diffstream run ... --osc 0` on the shared tiny model; `at_push(index, pipe,
    send)` is called as each frame enters the pipeline (`send(address, *args)` sends an
    OSC message and waits until it is handled). Returns (exit code, pushes, stderr
    lines), pushes being (frame index, the pipeline's settings for that frame)."""
    import diffstream.models.loading as loading
    import diffstream.pipelines.factory as factory
    from diffstream.cli import main

    monkeypatch.setattr(loading, "load_components", lambda config: tiny)
    controls: list[OSCControl] = []

    class Recorded(OSCControl):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            controls.append(self)

    monkeypatch.setattr(osc_module, "OSCControl", Recorded)

    def run(src, args, at_push, capsys):
        pushes = []
        make = factory.make_pipeline

        def make_pipeline(components, config):
            pipe = make(components, config)
            client = SimpleUDPClient("127.0.0.1", controls[0].port)

            def send(address, *values):
                before = controls[0].received
                client.send_message(address, list(values))
                wait_for(controls[0], before + 1)

            def on_push(index):
                pushes.append((index, pipe.config))
                at_push(index, pipe, send)

            pipe.on_push.append(on_push)
            return pipe

        monkeypatch.setattr(factory, "make_pipeline", make_pipeline)
        code = main(["run", src, "-o", str(tmp_path / "out"), *TINY, "--osc", "0", *args])
        return code, pushes, capsys.readouterr().err.strip().splitlines()

    return run


def test_run_applies_an_osc_change_from_the_next_frame(run_with_osc, tmp_path, capsys):
    from diffstream.testing import make_frames

    src = write_pngs(tmp_path / "in", make_frames(8, 48, 64))

    def at_push(index, pipe, send):
        if index == 3:  # while frame 3 is in the pipeline
            send("/prompt", "a watercolor painting")
            send("/strength", 0.5)
            send("/steps", 2.5)  # refused: one line, no change

    code, pushes, err = run_with_osc(src, [], at_push, capsys)
    assert code == 0
    assert [i for i, _ in pushes] == list(range(8))
    assert [c.prompt for _, c in pushes] == ["x"] * 4 + ["a watercolor painting"] * 4
    assert [c.strength for _, c in pushes] == [0.4] * 4 + [0.5] * 4
    assert all(c.steps == 2 for _, c in pushes)
    assert len(list((tmp_path / "out").glob("*.png"))) == 8
    assert sum("OSC /steps 2.5 ignored: steps must be an integer" in line for line in err) == 1, err
    assert any(re.fullmatch(r"diffstream: OSC control on udp 127\.0\.0\.1:\d+ \(/prompt, .*, /reset\)", line)
               for line in err), err
    assert not any("warning" in line for line in err), err


def test_run_osc_reset_starts_a_new_stream_and_keeps_every_frame(run_with_osc, tmp_path, capsys):
    # Identical lossless frames: the similarity filter (threshold 0.5) skips every frame
    # after a stream's first, so the skips before and after the reset are known: 5 + 5.
    frame = np.full((48, 64, 3), 120, np.uint8)
    frame[:, :32] = 200
    src = write_pngs(tmp_path / "in", [frame] * 12)
    sent = []

    def at_push(index, pipe, send):
        if index == 5 and not sent:
            sent.append(index)
            send("/reset")

    code, pushes, err = run_with_osc(
        src, ["--similarity-filter", "0.5", "--max-skip", "100", "--osc-host", "0.0.0.0"], at_push, capsys)
    assert code == 0
    # The pipeline counts frames from 0 again after the reset, which came before frame 6.
    assert [i for i, _ in pushes] == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]
    # The frames in flight at the reset were finished and written: one output per input.
    assert len(list((tmp_path / "out").glob("*.png"))) == 12
    assert "wrote 12 frames" in err[-1] and "10 skipped by the similarity filter" in err[-1], err[-1]
    assert sum("listening on 0.0.0.0" in line and "without authentication" in line for line in err) == 1, err


def test_run_osc_option_errors_are_one_line_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import diffstream.models.loading as loading
    from diffstream.cli import main
    from diffstream.testing import make_frames

    def refuse(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(loading, "load_components", refuse)
    src = write_pngs(tmp_path / "in", make_frames(2, 48, 64))
    out = str(tmp_path / "out")

    def one_error(args):
        assert main(["run", src, "-o", out, *TINY, *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        return err[0]

    assert "--osc-host needs --osc PORT" in one_error(["--osc-host", "0.0.0.0"])
    assert "--osc must be a UDP port from 0 to 65535" in one_error(["--osc", "70000"])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        assert "choose another --osc port" in one_error(["--osc", str(taken.getsockname()[1])])
    monkeypatch.setitem(sys.modules, "pythonosc.dispatcher", None)  # python-osc not installed
    assert one_error(["--osc", "0"]) == "diffstream: error: OSC control needs python-osc: pip install 'diffstream[osc]'"
