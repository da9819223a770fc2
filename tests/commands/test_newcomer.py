"""A newcomer's first hour (issue #12): outputs that never destroy inputs or good files,
errors found before any model loads, and messages that say what is happening."""

import os
import signal
import subprocess
import sys

import av
import pytest
import torch

from diffstream.cli import build_parser, main
from diffstream.testing import make_frames, write_video

torch.set_num_threads(1)
TINY = ["--model", "tiny", "--size", "64", "--no-progress", "--prompt", "x"]


def count_frames(path):
    with av.open(str(path)) as c:
        return sum(1 for _ in c.decode(video=0))


@pytest.fixture
def clip(tmp_path):
    return write_video(tmp_path / "in.mp4", make_frames(6, 48, 64), fps=10)


@pytest.fixture
def no_model(monkeypatch):
    """Any model load fails the test: the check under test must come before it."""
    import diffstream.models.loading as loading

    def refuse(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(loading, "load_components", refuse)


def error_lines(capsys):
    return [line for line in capsys.readouterr().err.strip().splitlines() if line]


# --- 1. data loss ---------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["same", "relative", "symlink", "hardlink"])
def test_output_that_is_the_input_is_refused_and_the_input_survives(clip, tmp_path, capsys, how, no_model,
                                                                     monkeypatch):
    before = open(clip, "rb").read()
    out = {"same": clip, "relative": "in.mp4", "symlink": str(tmp_path / "link.mp4"),
           "hardlink": str(tmp_path / "hard.mp4")}[how]
    if how == "symlink":
        os.symlink(clip, out)
    if how == "hardlink":
        os.link(clip, out)
    monkeypatch.chdir(tmp_path)
    for argv in (["run", clip, "-o", out, *TINY],
                 ["edit", clip, "-o", out, "--method", "fairy", "--instruction", "x", "--model", "tiny"],
                 ["edit", clip, "-o", out, "--method", "fatezero", "--source-prompt", "a", "--prompt", "b",
                  "--model", "tiny"]):
        assert main(argv) == 2
        lines = error_lines(capsys)
        assert len(lines) == 1 and "destroy the input" in lines[0], lines
    assert open(clip, "rb").read() == before


def test_output_inside_an_input_image_folder_is_refused(tmp_path, capsys, no_model):
    from diffstream import frames as F

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, f in enumerate(make_frames(3, 32, 32)):
        F.save_image(folder / f"{i}.png", f)
    assert main(["run", str(folder), "-o", str(folder / "out"), *TINY]) == 2
    assert "inside the input folder" in error_lines(capsys)[0]
    assert main(["run", str(folder), "-o", str(folder), *TINY]) == 2
    assert sorted(p.name for p in folder.iterdir()) == ["0.png", "1.png", "2.png"]


def _interrupt_after(monkeypatch, n):
    """Make the stream raise KeyboardInterrupt once n frames came out."""
    import diffstream.pipelines.factory as factory

    real = factory.make_pipeline

    def make(*a, **k):
        pipe = real(*a, **k)
        process = pipe.process
        count = [0]

        def interrupting(frame):
            if count[0] >= n:
                raise KeyboardInterrupt
            outs = process(frame)
            count[0] += len(outs)
            return outs

        pipe.process = interrupting
        return pipe

    monkeypatch.setattr(factory, "make_pipeline", make)


def test_an_existing_output_is_kept_until_the_first_frame_is_ready(clip, tmp_path, capsys, monkeypatch):
    keep = tmp_path / "keep.mp4"
    keep.write_bytes(b"a good file from yesterday")
    _interrupt_after(monkeypatch, 0)
    assert main(["run", clip, "-o", str(keep), *TINY]) == 130
    assert keep.read_bytes() == b"a good file from yesterday"
    assert "was not written" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []


def test_an_interrupted_run_replaces_the_output_with_a_valid_file(clip, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out.mp4"
    out.write_bytes(b"old")
    _interrupt_after(monkeypatch, 2)
    assert main(["run", clip, "-o", str(out), *TINY]) == 130
    assert count_frames(out) == 2
    assert "interrupted: wrote 2 frames" in capsys.readouterr().err


def test_help_says_what_happens_to_an_existing_output(capsys):
    for cmd in ("run", "edit"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        assert "existing file is replaced only" in " ".join(capsys.readouterr().out.split())


# --- 5-7. refused before anything loads ----------------------------------------------------
@pytest.mark.parametrize("method", ["streamdiffusion", "streamv2v"])
def test_motion_adapter_with_an_image_method_is_one_line(clip, tmp_path, capsys, method, no_model):
    out = tmp_path / "x.mp4"
    assert main(["run", clip, "-o", str(out), "--motion-adapter", "tiny", "--method", method, *TINY]) == 2
    lines = error_lines(capsys)
    assert len(lines) == 1 and "--method live2diff" in lines[0]
    assert not out.exists()


def test_image_methods_on_a_video_unet_are_refused_by_the_library(tiny):
    import dataclasses

    from diffstream.config import StreamConfig
    from diffstream.errors import ConfigError
    from diffstream.models.motion import load_motion_adapter, motion_unet
    from diffstream.pipelines.factory import make_pipeline

    adapter, _, _ = load_motion_adapter("tiny", tiny.unet.config.block_out_channels)
    video = dataclasses.replace(tiny, unet=motion_unet(tiny.unet, adapter))
    for method in ("streamdiffusion", "streamv2v"):
        with pytest.raises(ConfigError, match="motion modules"):
            make_pipeline(video, StreamConfig(method=method))


@pytest.mark.parametrize("device,needle", [("cuda", "CUDA"), ("cuda:3", "CUDA"), ("mps", "MPS")])
def test_a_device_this_machine_lacks_is_one_line(clip, tmp_path, capsys, device, needle, no_model):
    if torch.cuda.is_available() and device.startswith("cuda"):
        pytest.skip("this machine has CUDA")
    assert main(["run", clip, "-o", str(tmp_path / "o.mp4"), "--device", device, *TINY]) == 2
    lines = error_lines(capsys)
    assert len(lines) == 1 and needle in lines[0] and "--device cpu" in lines[0]


def test_out_of_memory_is_one_line_naming_what_to_lower(monkeypatch, capsys):
    from diffstream import cli

    def oom(args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setitem(cli.COMMANDS, "run", oom)
    assert main(["run", "in.mp4", "-o", "o.mp4", "--prompt", "x"]) == 2
    lines = error_lines(capsys)
    assert len(lines) == 1 and "--size" in lines[0]


@pytest.mark.parametrize("name", ["x.avi", "x.gif", "x.webm"])
def test_unsupported_output_kinds_fail_before_the_model(clip, tmp_path, capsys, name, no_model):
    assert main(["run", clip, "-o", str(tmp_path / name), *TINY]) == 2
    assert ".mp4" in error_lines(capsys)[0]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_fails_before_the_model(clip, tmp_path, capsys, no_model):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert main(["run", clip, "-o", str(ro / "o.mp4"), *TINY]) == 2
        assert "not writable" in error_lines(capsys)[0]
    finally:
        ro.chmod(0o700)


def test_read_only_output_file_fails_before_the_model(clip, tmp_path, capsys, no_model, monkeypatch):
    out = tmp_path / "o.mp4"
    out.write_bytes(b"keep")
    monkeypatch.setattr(os, "access", lambda path, mode: str(path) != str(out))
    assert main(["run", clip, "-o", str(out), *TINY]) == 2
    assert "read-only" in error_lines(capsys)[0]


# --- 8. say what is happening ---------------------------------------------------------------
def test_run_says_it_is_loading_and_keeps_download_progress(clip, tmp_path, capsys):
    from huggingface_hub.utils import are_progress_bars_disabled

    from diffstream.commands.common import quiet_libraries

    assert main(["run", clip, "-o", str(tmp_path / "o.mp4"), "--model", "tiny", "--size", "64",
                 "--prompt", "x"]) == 0
    err = capsys.readouterr().err
    assert "loading model tiny" in err and err.index("loading model") < err.index("wrote 6 frames")
    quiet_libraries()
    assert not are_progress_bars_disabled()


# --- 9. quietly wrong -----------------------------------------------------------------------
def test_run_requires_a_prompt(clip, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["run", clip, "-o", str(tmp_path / "o.mp4"), "--model", "tiny"])
    assert info.value.code == 2 and "--prompt" in capsys.readouterr().err


def test_one_name_per_concept_fatezero_reads_steps_and_guidance():
    from diffstream.commands.edit_fatezero import edit_config

    args = build_parser().parse_args(["edit", "in.mp4", "-o", "o.mp4", "--method", "fatezero", "--source-prompt",
                                      "a cat", "--prompt", "a dog", "--steps", "7", "--guidance", "3"])
    config = edit_config(args)
    assert config.fatezero.steps == 7 and config.guidance == 3
    default = edit_config(build_parser().parse_args(["edit", "i.mp4", "-o", "o.mp4", "--method", "fatezero",
                                                     "--source-prompt", "a cat", "--prompt", "a dog"]))
    assert default.fatezero.steps == 50 and default.guidance == 7.5


def test_image_folder_input_takes_fps(tmp_path):
    from diffstream import frames as F

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, f in enumerate(make_frames(4, 32, 32)):
        F.save_image(folder / f"{i:02d}.png", f)
    out = tmp_path / "o.mp4"
    assert main(["run", str(folder), "-o", str(out), "--fps", "12", *TINY]) == 0
    with av.open(str(out)) as c:
        assert c.streams.video[0].average_rate == 12


# --- 10. polish -----------------------------------------------------------------------------
def test_version_and_bare_command(capsys):
    from diffstream import __version__

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and __version__ in capsys.readouterr().out
    assert main([]) == 2
    assert "usage: diffstream" in capsys.readouterr().err


def _subcommands(parser, prefix=""):
    """(name, parser) of every subcommand, nested ones (`tune equivariant`) included."""
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            for name, p in action.choices.items():
                yield f"{prefix}{name}", p
                yield from _subcommands(p, f"{prefix}{name} ")


def test_every_option_with_a_default_says_it_in_help():
    names = []
    for name, p in _subcommands(build_parser()):
        names.append(name)
        text = " ".join(p.format_help().split())
        with_default = 0
        for action in p._actions:
            if not action.option_strings or action.help == "==SUPPRESS==" or action.nargs == 0:
                continue
            if action.default in (None, "", [], False):
                continue
            help_text = " ".join(p._get_formatter()._expand_help(action).split())
            assert "default" in help_text, (name, action.option_strings)
            with_default += 1
        assert "default" in text or not with_default
    assert {"run", "edit", "tune equivariant", "tune video"} <= set(names)


def test_a_closed_pipe_ends_quietly(tmp_path):
    """`diffstream eval ... | head -1`: the reader leaves after one line of a long table."""
    script = tmp_path / "many_lines.py"
    script.write_text(
        "import sys\n"
        "from diffstream import cli\n"
        "def table(args):\n"
        "    for i in range(200000):\n"
        "        print('| row', i, '|')\n"
        "    return 0\n"
        "cli.COMMANDS['eval'] = table\n"
        "sys.exit(cli.main(['eval', '--source', 'a.mp4', '--output', 'b.mp4']))\n"
    )
    proc = subprocess.run(f"{sys.executable} {script} | head -1", shell=True, capture_output=True, text=True,
                          timeout=120)
    assert proc.stdout == "| row 0 |\n"
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr[-300:]


def test_interrupted_before_any_frame_says_nothing_was_written():
    from diffstream.commands.common import closing_line

    assert closing_line(130, 0, "x.mp4", 1.0) == "interrupted before the first frame: x.mp4 was not written"
    assert closing_line(130, 3, "x.mp4", 1.0).startswith("interrupted: wrote 3 frames")


def test_quoted_library_errors_end_on_a_word():
    from diffstream.errors import one_line

    text = "We couldn't connect to the hub to load this file. Check your internet connection or see the docs " * 3
    short = one_line(text, 60)
    assert len(short) <= 60 and short.endswith("…")
    assert text.startswith(short[:-1]) and text[len(short) - 1] in " .,"


def test_a_missing_lora_file_is_named_with_its_option(clip, tmp_path, capsys):
    argv = ["run", clip, "-o", str(tmp_path / "o.mp4"), *TINY, "--lora", str(tmp_path / "style.safetensors")]
    assert main(argv) == 2
    lines = error_lines(capsys)
    assert len(lines) == 1 and "--lora" in lines[0] and "no such file" in lines[0]
    assert "--lcm-lora none" not in lines[0] and "offline" not in lines[0]


def test_a_prompt_past_77_tokens_is_warned_about_once(clip, tmp_path, capsys):
    long = "a watercolor painting of " + " and ".join(f"a tree number {i}" for i in range(40)) + " at dusk"
    assert main(["run", clip, "-o", str(tmp_path / "o.mp4"), *TINY, "--prompt", long]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "77 tokens" in line]
    assert len(warnings) == 1 and "cut after" in warnings[0] and "number 12" in warnings[0]


def test_seed_minus_one_means_a_random_seed_on_the_command_line_too(clip, tmp_path, capsys, monkeypatch):
    import diffstream.server.protocol as protocol

    monkeypatch.setattr(protocol.secrets, "randbelow", lambda n: 1234)
    from diffstream.commands.run import stream_config

    args = build_parser().parse_args(["run", clip, "-o", "o.mp4", "--prompt", "x", "--seed", "-1"])
    assert stream_config(args).seed == 1234
    assert "using seed 1234" in capsys.readouterr().err


def test_serve_has_an_idle_timeout_option():
    from diffstream.commands.serve import build_parser as serve_parser

    assert serve_parser().parse_args([]).idle_timeout == 60.0
    assert serve_parser().parse_args(["--idle-timeout", "0"]).idle_timeout == 0.0
