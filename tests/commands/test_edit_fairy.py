"""`diffstream edit --method fairy` end to end on the tiny models: audio kept, 1:1
frames, one-line errors before the model loads, Ctrl-C keeps frames."""

import sys

import av
import numpy as np
import pytest
import torch

from diffstream import frames as F
from diffstream.commands.edit_fairy import edit_command, edit_model_config, fairy_config
from diffstream.config import ModelConfig
from diffstream.errors import ConfigError, InputError
from diffstream.io.clip import Clip
from diffstream.models.loading import load_components
from diffstream.pipelines.fairy import INSTRUCT_DEFAULT_MODEL, FairyPipeline
from diffstream.testing import make_frames, write_video

torch.set_num_threads(1)
INSTR = "Turn into a marble Roman sculpture"


@pytest.fixture(scope="module")
def instruct():
    """The tiny 8-channel InstructPix2Pix-style model, fp32 on the CPU."""
    return load_components(ModelConfig(model="tiny", device="cpu", instruct=True))


# --- the command ------------------------------------------------------------------------

class edit_parser:
    """The real `diffstream edit` parser with --method fairy filled in."""

    def parse_args(self, argv):
        from diffstream.cli import build_parser

        return build_parser().parse_args(["edit", "--method", "fairy", *argv])


def read_video(path):
    with av.open(str(path)) as c:
        kinds = [s.type for s in c.streams]
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    return frames, kinds


def test_edit_command_end_to_end(tmp_path, instruct):
    video = write_video(tmp_path / "in.mp4", make_frames(9, 48, 64), fps=10, audio_seconds=0.9)
    out = tmp_path / "out.mp4"
    common = ["--model", "tiny", "--device", "cpu", "--instruction", INSTR, "--steps", "2", "--size", "64",
              "--anchors", "2", "--chunk-size", "3", "--no-progress", "--seed", "4"]
    args = edit_parser().parse_args([video, "-o", str(out)] + common)
    assert edit_command(args) == 0
    frames, kinds = read_video(out)
    assert len(frames) == 9 and frames[0].shape == (48, 64, 3) and "audio" in kinds
    # A lossless PNG output holds exactly what the Python API computes.
    png = tmp_path / "png/"
    assert edit_command(edit_parser().parse_args([video, "-o", str(png) + "/"] + common)) == 0
    written = [F.load_image(p) for p in sorted(png.iterdir())]
    config = fairy_config(args)
    with FairyPipeline(instruct, config) as pipe:
        expected = list(pipe.edit(Clip(video)))
    assert len(written) == 9 and all(np.array_equal(a, b) for a, b in zip(written, expected))


def test_edit_command_sdedit_with_prompt_and_max_frames(tmp_path, capsys):
    video = write_video(tmp_path / "in.mp4", make_frames(6, 48, 64), fps=10)
    out = tmp_path / "out/"
    args = edit_parser().parse_args([video, "-o", str(out), "--model", "tiny", "--device", "cpu", "--prompt", "a fox",
                                     "--steps", "4", "--strength", "0.5", "--size", "64", "--max-frames", "4"])
    assert edit_command(args) == 0
    assert len(list(out.iterdir())) == 4
    err = capsys.readouterr().err
    assert "4/4" in err and "wrote 4 of 4 frames" in err  # progress bar, then the summary line


def test_model_choice_for_instructions():
    args = edit_parser().parse_args(["in.mp4", "-o", "o.mp4", "--model", "tiny", "--instruction", "x"])
    assert edit_model_config(args, fairy_config(args)).instruct
    args = edit_parser().parse_args(["in.mp4", "-o", "o.mp4", "--instruction", "x"])
    assert edit_model_config(args, fairy_config(args)).model == INSTRUCT_DEFAULT_MODEL
    args = edit_parser().parse_args(["in.mp4", "-o", "o.mp4", "--model", "tiny", "--prompt", "x"])
    assert not edit_model_config(args, fairy_config(args)).instruct


def test_sampler_option():
    base = ["in.mp4", "-o", "o.mp4", "--model", "tiny", "--instruction", "x"]
    assert fairy_config(edit_parser().parse_args(base)).resolve().sampler == "euler-a"  # Fairy's default
    for sampler in ("euler-a", "ddim"):
        config = fairy_config(edit_parser().parse_args(base + ["--sampler", sampler]))
        assert config.sampler == sampler and config.resolve().steps == 10
    with pytest.raises(ConfigError, match="--sampler lcm") as err:
        fairy_config(edit_parser().parse_args(base + ["--sampler", "lcm"]))
    assert "\n" not in str(err.value)
    with pytest.raises(SystemExit):  # argparse refuses an unknown sampler, naming the choices
        edit_parser().parse_args(base + ["--sampler", "euler"])


def test_edit_command_errors_come_before_the_model(tmp_path, monkeypatch):
    import diffstream.models.loading as loading

    def no_loading(*a, **k):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(loading, "load_components", no_loading)
    video = write_video(tmp_path / "in.mp4", make_frames(3, 48, 64), fps=10)
    base = [video, "-o", str(tmp_path / "o.mp4"), "--model", "tiny"]
    with pytest.raises(ConfigError, match="nothing to edit"):
        edit_command(edit_parser().parse_args(base))
    with pytest.raises(ConfigError, match="--chunk-size"):
        edit_command(edit_parser().parse_args(base + ["--instruction", "x", "--chunk-size", "0"]))
    with pytest.raises(InputError, match="not found"):
        edit_command(edit_parser().parse_args([str(tmp_path / "missing.mp4")] + base[1:] + ["--instruction", "x"]))
    monkeypatch.setitem(sys.modules, "ray", None)  # Ray not installed
    with pytest.raises(ConfigError, match=r"diffstream\[ray\]") as err:
        edit_command(edit_parser().parse_args(base + ["--instruction", "x", "--workers", "2"]))
    assert "--workers 2" in str(err.value) and "\n" not in str(err.value)


def test_ctrl_c_keeps_every_frame_done(tmp_path, monkeypatch):
    import diffstream.io.sinks as sinks

    real_open = sinks.open_sink

    def open_interrupting(*a, **k):
        sink = real_open(*a, **k)
        write = sink.write

        def write_then_interrupt(frame):
            if sink.frames_written == 5:
                raise KeyboardInterrupt
            write(frame)

        sink.write = write_then_interrupt
        return sink

    monkeypatch.setattr(sinks, "open_sink", open_interrupting)
    video = write_video(tmp_path / "in.mp4", make_frames(9, 48, 64), fps=10, audio_seconds=0.9)
    out = tmp_path / "out.mp4"
    args = edit_parser().parse_args([video, "-o", str(out), "--model", "tiny", "--device", "cpu", "--instruction",
                                     INSTR, "--steps", "2", "--size", "64", "--no-progress"])
    assert edit_command(args) == 130
    frames, kinds = read_video(out)
    assert len(frames) == 5 and "audio" in kinds


@pytest.mark.parametrize("method", ["fairy", "fatezero"])
def test_sdxl_models_are_refused_in_one_line(tmp_path, capsys, method):
    from diffstream.cli import main

    video = write_video(tmp_path / "in.mp4", make_frames(3, 48, 64), fps=10)
    out = tmp_path / "out.mp4"
    extra = ["--source-prompt", "y"] if method == "fatezero" else []
    code = main(["edit", video, "-o", str(out), "--method", method, "--model", "tiny-sdxl", "--prompt", "x",
                 "--size", "64", "--no-progress", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and f"--method {method} runs SD 1.x/2.x checkpoints" in err[-1]
    assert not out.exists()
