"""NDI input and output (`ndi:NAME`, `diffstream.io.ndi`).

The loopback test runs the real NDI runtime (bundled by cyndilib) in a child process
inside a network namespace of its own (`unshare -n`: only a loopback interface, so
NDI's mDNS announcements and its sender can reach nothing but 127.0.0.1), with an NDI
config that asks 127.0.0.1 directly for sources (`networks.ips`) since there is no mDNS
responder there. The rest runs on a fake cyndilib that delivers given frames.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest

from diffstream.errors import InputError, OutputError
from diffstream.io import ndi
from diffstream.io.sinks import check_output, open_sink
from diffstream.io.sources import open_source

# --- the real runtime, over loopback ------------------------------------------------------
LOOPBACK_CHILD = textwrap.dedent(
    """
    import json, sys, threading, time
    import numpy as np
    from diffstream.io.sinks import open_sink
    from diffstream.io.sources import open_source

    PALETTE = np.array(json.loads(sys.argv[1]), np.uint8)
    N, FILLER, GAP = len(PALETTE) - 1, len(PALETTE) - 1, float(sys.argv[2])

    def solid(i):
        return np.broadcast_to(PALETTE[i], (48, 64, 3)).copy()

    def index(frame):
        mean = frame.reshape(-1, 3).mean(0)
        return int(((PALETTE.astype(float) - mean) ** 2).sum(1).argmin())

    sink = open_sink("ndi:diffstream-loop", 30, (64, 48))
    # A receiver sees only frames sent after it connected: send FILLER frames until the
    # source has opened (it waits for its first frame).
    opened = threading.Event()
    def warm_up():
        while not opened.is_set():
            sink.write(solid(FILLER))
            time.sleep(0.03)
    thread = threading.Thread(target=warm_up)
    thread.start()
    try:
        source = open_source("ndi:diffstream-loop")
    finally:
        opened.set()
        thread.join()
    source.read_timeout = 0.5  # the end: no frame for this long after the last one sent
    received = []
    reader = threading.Thread(target=lambda: received.extend(index(f) for f in source))
    reader.start()
    started = time.monotonic()
    for i in range(N):
        sink.write(solid(i))
        time.sleep(GAP)
    sending = time.monotonic() - started
    reader.join()
    print(json.dumps({"received": received, "sent": N, "filler": FILLER, "sending_s": sending,
                      "size": [source.width, source.height], "live": source.is_live,
                      "runtime": source._receiver.get_performance_data()["video"],
                      "warnings": source.warnings}))
    source.close()
    sink.close()
    """
)

PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40), (128, 0, 0),
           (0, 0, 128), (128, 128, 0), (255, 255, 255), (0, 0, 0)]


def _namespace_prefix() -> list[str]:
    """The command prefix that runs a child in a fresh network namespace with lo up, or a skip."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("the NDI loopback test needs unshare and ip (util-linux, iproute2) for a private network")
    probe = subprocess.run(["unshare", "-n", "ip", "link", "set", "lo", "up"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a private network namespace here (unshare -n: {probe.stderr.strip()}); "
                    f"the NDI runtime would otherwise announce itself on the real network")
    return ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" "$@"']


LOOPBACK_GAP_S = 0.03  # between two frames sent (about 30 fps)


@pytest.fixture(scope="module")
def ndi_loopback(tmp_path_factory):
    """Runs LOOPBACK_CHILD once: 15 palette frames out through ndi:diffstream-loop and
    back in from the same name, LOOPBACK_GAP_S apart. Returns its report."""
    pytest.importorskip("cyndilib", reason="the ndi extra (cyndilib) is not installed")
    prefix = _namespace_prefix()
    home = tmp_path_factory.mktemp("ndi")
    (home / "ndi-config.v1.json").write_text(json.dumps({"ndi": {"networks": {"ips": "127.0.0.1"}}}))
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "NDI_CONFIG_DIR": str(home)}
    result = subprocess.run([*prefix, sys.executable, "-c", LOOPBACK_CHILD, json.dumps(PALETTE), str(LOOPBACK_GAP_S)],
                            capture_output=True, text=True, timeout=90, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_ndi_loopback_keeps_the_live_input_contract(ndi_loopback):
    report = ndi_loopback
    # The runtime itself got every frame sent (and the warm-up frame(s)), dropping none.
    assert report["runtime"]["frames_total"] >= report["sent"] and report["runtime"]["frames_dropped"] == 0, report
    assert report["size"] == [64, 48] and report["live"] is True
    assert any("stopped after frame" in w for w in report["warnings"]), report
    # Waiting for a frame does not hold up the sender's thread (cyndilib's receive keeps
    # the GIL while it waits: these 15 sends took 3.1 s instead of 0.46 s when the source
    # waited in it up to 200 ms).
    assert report["sending_s"] < report["sent"] * LOOPBACK_GAP_S + 1.0, report


def test_ndi_loopback_frames_one_to_one(ndi_loopback):
    """Every frame the runtime received comes out of the input, in order: the warm-up
    frames, then each frame sent exactly once."""
    report = ndi_loopback
    received, filler = report["received"], report["filler"]
    warm = received.index(0) if 0 in received else len(received)
    assert warm >= 1 and received[:warm] == [filler] * warm, report
    assert received[warm:] == list(range(report["sent"])), report
    assert report["runtime"]["frames_total"] == len(received), report


# --- a fake runtime -------------------------------------------------------------------------
def _usleep_holding_the_gil(microseconds: int) -> None:
    if microseconds > 0:
        import ctypes

        ctypes.PyDLL(None).usleep(microseconds)  # a PyDLL call keeps the GIL, as cyndilib's receive does


class _Flags(int):
    recv_video = 1


class FakeVideoFrame(bytearray):
    """The received frame: a buffer plus the getters NDISource reads."""

    def __init__(self):
        super().__init__()
        self.size = (0, 0)

    def get_resolution(self):
        return self.size

    def get_line_stride(self):
        return 4 * self.size[0]

    def get_frame_rate(self):
        from fractions import Fraction

        return Fraction(25)

    def get_fourcc(self):
        return "RGBA"


def fake_cyndilib(monkeypatch, sources: dict[str, list[np.ndarray]]):
    """Install a fake cyndilib: `sources` maps full NDI names to the RGB frames they send.
    Returns the module (its `sent` list holds what fake senders got; `runtime_dropped` is
    what the receivers made after it is set report as dropped by the runtime)."""
    module = types.ModuleType("cyndilib")
    module.sent, module.frame_syncs_alive, module.runtime_dropped = [], 0, 0
    module.FourCC = types.SimpleNamespace(RGBA="RGBA", RGBX="RGBX", BGRA="BGRA", BGRX="BGRX")
    module.RecvColorFormat = types.SimpleNamespace(RGBX_RGBA=1)
    module.RecvBandwidth = types.SimpleNamespace(highest=1)
    module.VideoRecvFrame = FakeVideoFrame

    class Finder:
        def open(self):
            pass

        def get_source_names(self):
            return list(sources)

        def get_source(self, name):
            return name

        def wait_for_sources(self, timeout):
            return False

        def update_sources(self):
            return list(sources)

        def close(self):
            pass

    class FrameSync:
        """cyndilib binds one to every Receiver; while bound, it takes every other video frame."""

        def __init__(self):
            module.frame_syncs_alive += 1

        def __del__(self):
            module.frame_syncs_alive -= 1

    class Receiver:
        # Slots, as a Cython class has: `frame_sync` is a read-only view of a word of the object.
        __slots__ = ("_frame_sync", "frames", "video", "timeouts", "taken", "dropped")

        def __init__(self, **kwargs):
            self._frame_sync = FrameSync()
            self.frames, self.timeouts, self.taken, self.dropped = [], [], 0, module.runtime_dropped

        @property
        def frame_sync(self):
            return self._frame_sync

        def set_video_frame(self, frame):
            self.video = frame

        def connect_to(self, name):
            self.frames = list(sources[name])

        def receive(self, flags, timeout_ms):
            """cyndilib's receive: the next frame waiting, else waits `timeout_ms` holding the GIL."""
            self.timeouts.append(timeout_ms)
            while self.frames and self._frame_sync is not None and len(self.frames) % 2 == 0:
                self.frames.pop(0)  # the frame-sync's: counted received, never delivered
                self.taken += 1
            if not self.frames:
                _usleep_holding_the_gil(timeout_ms * 1000)
                return 0
            frame = self.frames.pop(0)
            rgba = np.concatenate([frame, np.full(frame.shape[:2] + (1,), 255, np.uint8)], axis=2)
            self.video.size = (frame.shape[1], frame.shape[0])
            self.video[:] = rgba.tobytes()
            return _Flags.recv_video

        def get_performance_data(self):
            return {"video": {"frames_total": 0, "frames_dropped": self.dropped}}

        def disconnect(self):
            pass

    class VideoSendFrame:
        def set_resolution(self, w, h):
            self.size = (w, h)

        def set_fourcc(self, fourcc):
            self.fourcc = fourcc

        def set_frame_rate(self, rate):
            self.rate = rate

    class Sender:
        def __init__(self, name, clock_video=True):
            self.name = name

        def set_video_frame(self, frame):
            self.frame = frame

        def open(self):
            pass

        def write_video(self, data):
            w, h = self.frame.size
            module.sent.append(np.asarray(data).reshape(h, w, 4).copy())
            return True

        def get_num_connections(self, timeout):
            return 0

        def close(self):
            pass

    module.Finder, module.Receiver, module.Sender, module.VideoSendFrame = Finder, Receiver, Sender, VideoSendFrame
    receiver_module = types.ModuleType("cyndilib.receiver")
    receiver_module.ReceiveFrameType = _Flags
    module.__spec__ = types.SimpleNamespace(name="cyndilib")  # find_spec finds it in sys.modules
    monkeypatch.setitem(sys.modules, "cyndilib", module)
    monkeypatch.setitem(sys.modules, "cyndilib.receiver", receiver_module)
    return module


def _frames(n, h=48, w=64):
    from diffstream.testing import make_frames

    return make_frames(n, height=h, width=w)


def test_source_finds_by_stream_name_and_yields_rgb_frames(monkeypatch):
    frames = _frames(5)
    fake_cyndilib(monkeypatch, {"HOST (cam)": frames, "HOST (other)": []})
    monkeypatch.setattr(ndi, "READ_TIMEOUT_S", 0.3)
    with open_source("ndi:cam") as source:
        assert source.is_live and (source.width, source.height) == (64, 48) and source.fps == 25
        got = list(source)
    assert len(got) == 5 and all(np.array_equal(a, b) for a, b in zip(got, frames))
    assert source.warnings == ["NDI source ndi:cam stopped after frame 5: nothing for 0.3 s"]


def test_source_errors_are_one_line(monkeypatch):
    fake_cyndilib(monkeypatch, {"A (cam)": _frames(1), "B (cam)": _frames(1), "C (silent)": []})
    monkeypatch.setattr(ndi, "FIND_TIMEOUT_S", 0.2)
    monkeypatch.setattr(ndi, "READ_TIMEOUT_S", 0.2)
    cases = {
        "ndi:missing": "NDI source 'missing' not found within 0.2 s (sources seen: A (cam), B (cam), C (silent))",
        "ndi:cam": "ndi:cam matches several NDI sources (A (cam), B (cam)); give the full name, e.g. ndi:A (cam)",
        "ndi:silent": "no decodable frames in input ndi:silent: connected, but no frame came within 0.2 s",
        "ndi: ": "ndi: needs a name",
    }
    for spec, message in cases.items():
        with pytest.raises(InputError) as err:
            open_source(spec)
        assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
    with open_source("ndi:A (cam)") as source:  # a full name picks one of the two
        assert len(list(source)) == 1


def test_every_frame_comes_out_though_cyndilib_binds_a_frame_sync(monkeypatch):
    """cyndilib binds an NDI frame-sync to each receiver, which takes frames from it: the
    source destroys it, and reports the frames the runtime itself dropped."""
    frames = _frames(6)
    fake = fake_cyndilib(monkeypatch, {"HOST (cam)": frames})
    fake.runtime_dropped = 3
    monkeypatch.setattr(ndi, "READ_TIMEOUT_S", 0.1)
    with open_source("ndi:cam") as source:
        got = list(source)
        assert source._receiver.taken == 0 and fake.frame_syncs_alive == 0
    assert len(got) == 6 and all(np.array_equal(a, b) for a, b in zip(got, frames))
    assert source.warnings[-1] == ("NDI source ndi:cam: the NDI runtime dropped 3 frames that came faster "
                                   "than they were read")


def test_a_receiver_of_unknown_layout_is_left_alone():
    class Held:
        pass

    class Receiver:
        __slots__ = ("first", "second")

        @property
        def frame_sync(self):
            return self.first

    receiver, held = Receiver(), Held()
    receiver.first = receiver.second = held  # two words hold it: which one is frame_sync is unknown
    assert ndi._detach_frame_sync(receiver) is False
    assert receiver.first is held and receiver.second is held


def test_waiting_for_a_frame_neither_holds_the_gil_nor_spins(monkeypatch):
    """cyndilib's receive keeps the GIL while it waits: the source must not ask it to wait
    (other threads would stop), nor poll without pause (a core would be busy)."""
    import threading
    import time

    fake_cyndilib(monkeypatch, {"HOST (cam)": _frames(1)})
    monkeypatch.setattr(ndi, "READ_TIMEOUT_S", 0.4)
    source = open_source("ndi:cam")
    reader = threading.Thread(target=lambda: list(source))
    reader.start()
    longest = 0.0
    while reader.is_alive():  # 1 ms naps, while the source waits for a frame that never comes
        start = time.monotonic()
        time.sleep(0.001)
        longest = max(longest, time.monotonic() - start)
    calls = len(source._receiver.timeouts)
    source.close()
    assert longest < 0.1, f"a 1 ms sleep took {longest:.3f} s while the NDI source waited"
    assert calls < 200, f"{calls} receive calls in 0.4 s of waiting"


def test_sink_sends_each_frame_as_rgbx_at_the_output_size(monkeypatch):
    fake = fake_cyndilib(monkeypatch, {})
    frames = _frames(3, 40, 50)
    check_output("ndi:out", inputs=("ndi:cam",))
    with open_sink("ndi:out", 25, (64, 48)) as sink:
        for frame in frames:
            sink.write(frame)
    assert sink.frames_written == 3 and len(fake.sent) == 3
    assert all(s.shape == (48, 64, 4) and (s[..., 3] == 255).all() for s in fake.sent)
    from diffstream.frames import resize

    assert np.array_equal(fake.sent[1][..., :3], resize(frames[1], (64, 48)))


def test_missing_cyndilib_and_bad_outputs_are_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "cyndilib", None)
    with pytest.raises(InputError, match=r"^NDI \(ndi:NAME\) needs cyndilib: pip install 'diffstream\[ndi\]'$"):
        open_source("ndi:cam")
    with pytest.raises(OutputError, match=r"^NDI \(ndi:NAME\) needs cyndilib: pip install 'diffstream\[ndi\]'$"):
        check_output("ndi:out")
    monkeypatch.undo()
    fake_cyndilib(monkeypatch, {})
    with pytest.raises(OutputError, match="the run would receive its own output"):
        check_output("ndi:loop", inputs=("ndi:loop",))
    with pytest.raises(OutputError, match="ndi: needs a name"):
        check_output("ndi:")
    with pytest.raises(OutputError, match="this command writes a file"):
        check_output("ndi:out", live_ok=False)


def test_run_reads_ndi_as_a_live_input_and_sends_every_output(monkeypatch, tiny, capsys):
    """`diffstream run ndi:cam -o ndi:out`: every frame read comes out (the run keeps up
    here: nothing to drop), through the same live-input reader as a webcam."""
    import diffstream.io.queues as queues
    import diffstream.models.loading as loading
    from diffstream.cli import main

    fake = fake_cyndilib(monkeypatch, {"HOST (cam)": _frames(6)})
    monkeypatch.setattr(ndi, "READ_TIMEOUT_S", 0.3)
    monkeypatch.setattr(loading, "load_components", lambda config: tiny)
    readers = []
    original = queues.ThreadedReader

    def reader(*args, **kwargs):
        readers.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(queues, "ThreadedReader", reader)
    code = main(["run", "ndi:cam", "-o", "ndi:out", "--model", "tiny", "--size", "64", "--steps", "2",
                 "--prompt", "x", "--no-progress"])
    assert code == 0
    assert readers == [{"maxsize": 8, "drop_oldest": True}]
    assert len(fake.sent) == 6 and fake.sent[0].shape == (48, 64, 4)
    err = capsys.readouterr().err
    assert "wrote 6 frames" in err, err


def test_run_without_cyndilib_fails_before_the_model_loads(monkeypatch, tmp_path, capsys):
    import diffstream.models.loading as loading
    from diffstream.cli import main

    def refuse(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(loading, "load_components", refuse)
    monkeypatch.setitem(sys.modules, "cyndilib", None)
    code = main(["run", "ndi:cam", "-o", str(tmp_path / "out"), "--model", "tiny", "--prompt", "x"])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "diffstream: error: NDI (ndi:NAME) needs cyndilib: pip install 'diffstream[ndi]'"]
