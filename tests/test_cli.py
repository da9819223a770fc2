"""`diffstream run` end to end: outputs, audio, bad input, bad options, interruption."""

import os
import re
import signal
import subprocess
import sys
import threading

import av
import numpy as np
import pytest

from diffstream.cli import main
from diffstream.testing import make_frames, write_video

TINY = ["--model", "tiny", "--size", "64", "--no-progress", "--prompt", "x"]


def count_frames(path):
    with av.open(str(path)) as c:
        return sum(1 for _ in c.decode(video=0))


def streams(path):
    with av.open(str(path)) as c:
        return {s.type for s in c.streams}


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "in.mp4"
    return write_video(path, make_frames(9, 48, 64), fps=25, audio_seconds=1.0)


def one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_run_video_keeps_count_fps_and_audio(clip, tmp_path, capsys):
    out = tmp_path / "out.mp4"
    assert main(["run", clip, "-o", str(out), "--prompt", "a cat", "--steps", "2", *TINY]) == 0
    assert count_frames(out) == 9
    assert streams(out) == {"video", "audio"}
    with av.open(str(out)) as c:
        assert c.streams.video[0].average_rate == 25
        assert (c.streams.video[0].width, c.streams.video[0].height) == (64, 48)
    assert "wrote 9 frames" in capsys.readouterr().err


def test_run_folder_to_png_folder_with_max_frames_and_keep_size(tmp_path):
    from PIL import Image

    src = tmp_path / "imgs"
    src.mkdir()
    for i, f in enumerate(make_frames(5, 50, 70)):
        img = Image.fromarray(f)
        img = img.convert("L") if i == 1 else img.convert("RGBA") if i == 2 else img
        img.save(src / f"{i}.png")
    out = tmp_path / "pngs"
    assert main(["run", str(src), "-o", str(out), "--max-frames", "4", "--keep-size", *TINY]) == 0
    files = sorted(out.glob("*.png"))
    assert len(files) == 4
    assert np.asarray(Image.open(files[0])).shape == (50, 70, 3)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--strength", "2"], "--strength"),
        (["--size", "32"], "--size"),
        (["--t-index-list", "10,60"], "--t-index-list"),
        (["--method", "magic"], "invalid choice"),
        (["--similarity-filter", "1.5"], "--similarity-filter"),
        (["--max-frames", "0"], "--max-frames"),
        (["--backend", "tensorrt"], "invalid choice"),
    ],
)
def test_invalid_options_fail_before_loading(clip, tmp_path, capsys, args, needle, monkeypatch):
    import diffstream.models.loading as loading

    monkeypatch.setattr(loading, "load_components", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(SystemExit) if needle == "invalid choice" else _no_raise() as info:
        code = main(["run", clip, "-o", str(tmp_path / "o.mp4"), *TINY, *args])
    code = info.value.code if needle == "invalid choice" else code
    assert code == 2
    assert needle in one_error_line(capsys)


def test_compile_is_backend_compile():
    from diffstream.cli import build_parser
    from diffstream.commands.common import model_config

    for argv, backend in ((["--compile"], "compile"), (["--backend", "auto"], "auto"), ([], "eager")):
        args = build_parser().parse_args(["run", "in.mp4", "-o", "out.mp4", "--prompt", "", *argv])
        assert model_config(args).backend == backend


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("kind", ["missing", "empty", "text", "empty_folder"])
def test_bad_inputs_are_one_line_exit_2(tmp_path, capsys, kind):
    path = tmp_path / "bad.mp4"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("this is not a video\n" * 50)
    elif kind == "empty_folder":
        path = tmp_path / "folder"
        path.mkdir()
    assert main(["run", str(path), "-o", str(tmp_path / "o.mp4"), *TINY]) == 2
    assert str(path) in one_error_line(capsys)
    assert not (tmp_path / "o.mp4").exists()


def test_missing_model_is_one_line_exit_2(clip, tmp_path, capsys):
    assert main(["run", clip, "-o", str(tmp_path / "o.mp4"), "--model", "/no/such/model", "--no-progress", "--prompt", "x"]) == 2
    line = one_error_line(capsys)
    assert "--model tiny" in line


def test_damaged_file_processes_decodable_frames(tmp_path, capsys):
    src = write_video(tmp_path / "long.mp4", make_frames(40, 48, 64), fps=25)
    data = bytearray(open(src, "rb").read())
    cut = tmp_path / "cut.mp4"
    # mp4 keeps its index at the end by default; cut the file into a fragmentless tail
    cut.write_bytes(bytes(data[: int(len(data) * 0.6)]))
    out = tmp_path / "o.mp4"
    code = main(["run", str(cut), "-o", str(out), *TINY])
    err = capsys.readouterr().err
    if code == 2:  # a cut moov atom makes the file unreadable as a whole: a clean one-line error
        assert len(err.strip().splitlines()) == 1
    else:
        assert code == 0
        n = count_frames(out)
        assert 0 < n <= 40
        assert f"wrote {n} frames" in err


def _run_and_signal(tmp_path, sig):
    src = write_video(tmp_path / "long.mp4", make_frames(400, 48, 64), fps=25, audio_seconds=16)
    out = tmp_path / "o.mp4"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "diffstream", "run", src, "-o", str(out), "--model", "tiny", "--size", "64",
         "--prompt", "x"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env,
        # A parent that ignores SIGINT (Ray, started by earlier tests, does) would pass the
        # ignore on, and Python then installs no KeyboardInterrupt handler in the child.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    seen = []
    done = threading.Event()

    def read():
        chunks = []
        while True:
            chunk = proc.stderr.read1(4096)  # whatever is there: no byte-at-a-time lag behind the child
            if not chunk:
                break
            chunks.append(chunk)
            m = re.findall(rb"(\d+)/400", b"".join(chunks[-2:])[-200:])
            if m and int(m[-1]) >= 5:
                done.set()
        seen.append(b"".join(chunks).decode(errors="replace"))
        done.set()

    t = threading.Thread(target=read, daemon=True)
    t.start()
    assert done.wait(120), "no progress"
    proc.send_signal(sig)
    code = proc.wait(60)
    t.join(10)
    return code, out, seen[0]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_finalizes_a_valid_file(tmp_path, sig):
    code, out, err = _run_and_signal(tmp_path, sig)
    assert code == 130, err[-500:]
    m = re.search(r"interrupted: wrote (\d+) frames", err)
    assert m, err[-500:]
    written = int(m.group(1))
    assert 5 <= written < 400
    assert count_frames(out) == written
    assert "Traceback" not in err
    with av.open(str(out)) as c:  # audio kept and no longer than the video
        assert c.streams.audio
        video_seconds = written / 25
        audio = c.streams.audio[0]
        assert float(audio.duration * audio.time_base) <= video_seconds + 0.1


@pytest.mark.parametrize("spec,needle", [
    ("edges", "kind must be one of canny, depth"),
    ("canny:tiny:9", "in [0, 5]"),
    ("canny:/no/such/cn.safetensors", "does not exist"),
])
def test_bad_controlnets_are_one_line_exit_2_before_any_model_loads(clip, tmp_path, capsys, monkeypatch, spec, needle):
    import diffstream.models.tiny as tiny

    monkeypatch.setattr(tiny, "tiny_components", lambda *a, **k: pytest.fail("model loaded"))
    try:
        code = main(["run", clip, "-o", str(tmp_path / "o.mp4"), *TINY, "--controlnet", spec])
    except SystemExit as exit:  # argparse's own one-line errors
        code = exit.code
    assert code == 2
    assert needle in one_error_line(capsys)
    assert not (tmp_path / "o.mp4").exists()


def test_run_with_two_controlnets_writes_every_frame(clip, tmp_path, capsys):
    out = tmp_path / "out.mp4"
    assert main(["run", clip, "-o", str(out), *TINY, "--steps", "2", "--controlnet", "canny:tiny:0.8",
                 "--controlnet", "depth"]) == 0
    assert count_frames(out) == 9
    assert "wrote 9 frames" in capsys.readouterr().err


def test_run_with_an_ip_adapter_writes_every_frame(clip, tmp_path, capsys):
    import cv2

    image = tmp_path / "style.png"
    cv2.imwrite(str(image), np.full((32, 32, 3), 200, np.uint8))
    out = tmp_path / "out.mp4"
    assert main(["run", clip, "-o", str(out), *TINY, "--steps", "2", "--ip-adapter", "tiny",
                 "--ip-adapter-image", str(image), "--ip-adapter-scale", "0.7"]) == 0
    assert count_frames(out) == 9


@pytest.mark.parametrize("args,needle", [
    (["--ip-adapter", "tiny", "--ip-adapter-image", "/no/such.png"], "cannot read the IP-Adapter image"),
    (["--ip-adapter-image", "/no/such.png"], "cannot read the IP-Adapter image"),
    (["--ip-adapter", "magic"], "--ip-adapter takes sd15, plus-sd15, tiny"),
    (["--ip-adapter", "/no/such/ip.safetensors"], "does not exist"),
    (["--ip-adapter", "tiny", "--ip-adapter-scale", "-1"], "--ip-adapter-scale must be a number in [0, 5]"),
])
def test_bad_ip_adapter_options_are_one_line_exit_2_before_any_model_loads(clip, tmp_path, capsys, monkeypatch,
                                                                            args, needle):
    import diffstream.models.tiny as tiny

    monkeypatch.setattr(tiny, "tiny_components", lambda *a, **k: pytest.fail("model loaded"))
    assert main(["run", clip, "-o", str(tmp_path / "o.mp4"), *TINY, *args]) == 2
    assert needle in one_error_line(capsys)


def test_run_with_prompt_and_seed_blends(clip, tmp_path, capsys):
    out = tmp_path / "out.mp4"
    assert main(["run", clip, "-o", str(out), *TINY, "--steps", "2", "--prompt-blend", "a cat: sitting:0.7",
                 "--prompt-blend", "a dog:0.3", "--blend", "slerp", "--seed-blend", "3:1", "--seed-blend", "4:1"]) == 0
    assert count_frames(out) == 9
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(["run", clip, "-o", str(out), *TINY, "--prompt-blend", "a cat"])
    assert info.value.code == 2 and "expected VALUE:WEIGHT" in one_error_line(capsys)


def test_run_tiny_sdxl_writes_every_frame(clip, tmp_path, capsys):
    out = tmp_path / "out.mp4"
    assert main(["run", clip, "-o", str(out), "--model", "tiny-sdxl", "--size", "64", "--no-progress", "--prompt", "x",
                 "--steps", "2", "--method", "streamv2v", "--controlnet", "canny:tiny"]) == 0
    assert count_frames(out) == 9


def test_a_controlnet_for_another_base_model_is_one_line_exit_2(clip, tmp_path, capsys):
    import json

    folder = tmp_path / "cn15"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "_class_name": "ControlNetModel", "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768}))
    assert main(["run", clip, "-o", str(tmp_path / "o.mp4"), *TINY, "--controlnet", f"canny:{folder}"]) == 2
    assert "is for another base model" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "o.mp4").exists()
