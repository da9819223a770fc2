"""`diffstream edit --method fatezero` end to end on the tiny model: audio, saved
inversions, Ctrl-C, one-line errors before the model loads, outputs left untouched."""

import av
import pytest
import torch

from diffstream.commands.edit_fatezero import edit_command
from diffstream.errors import ConfigError, InputError, OutputError
from diffstream.pipelines import fatezero as fzp
from diffstream.testing import make_frames, write_video

torch.set_num_threads(1)
SWAN = "a black swan swimming in a river"
DUCK = "a white duck swimming in a river"


# --- the CLI entry point -------------------------------------------------------------------
class parser:
    """The real `diffstream edit` parser with --method fatezero filled in."""

    def parse_args(self, argv):
        from diffstream.cli import build_parser

        return build_parser().parse_args(["edit", "--method", "fatezero", *argv])


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "in.mp4"
    return write_video(path, make_frames(5, 48, 64, seed=6), fps=10, audio_seconds=0.5)


def cli_args(clip, out, *extra):
    return parser().parse_args([clip, "-o", str(out), "--model", "tiny", "--device", "cpu", "--size", "32",
                                "--source-prompt", SWAN, "--prompt", DUCK, "--steps", "2",
                                "--fz-window", "3", "--no-progress", *extra])


def count_frames(path):
    with av.open(str(path)) as c:
        video = sum(1 for _ in c.decode(video=0))
    with av.open(str(path)) as c:
        has_audio = any(s.type == "audio" for s in c.streams)
    return video, has_audio


def test_edit_command_end_to_end_with_audio_and_saved_inversion(clip, tmp_path, capsys):
    out = tmp_path / "out.mp4"
    args = cli_args(clip, out, "--blend-words", "swan", "duck", "--save-inversion", str(tmp_path / "inv"),
                    "--store-budget", "0")
    assert edit_command(args) == 0
    assert count_frames(out) == (5, True)
    err = capsys.readouterr().err
    assert "wrote 5 frames" in err and "2 window(s)" in err
    again = tmp_path / "again.mp4"
    args = cli_args(clip, again, "--blend-words", "swan", "duck", "--load-inversion", str(tmp_path / "inv"))
    args.source_prompt = None  # taken from the saved inversion
    assert edit_command(args) == 0
    assert count_frames(again) == (5, True)


def test_interrupt_finalises_the_output_with_the_frames_done(clip, tmp_path, monkeypatch):
    real = fzp.edit_frames

    def interrupted(*a, **kw):
        for n, item in enumerate(real(*a, **kw)):
            if n == 3:  # after the first window of three frames
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(fzp, "edit_frames", interrupted)
    out = tmp_path / "partial.mp4"
    assert edit_command(cli_args(clip, out)) == 130
    assert count_frames(out)[0] == 3


@pytest.mark.parametrize("extra,error,match", [
    (["--blend-words", "goose", "duck"], ConfigError, "goose"),
    (["--fz-reweight", "tiger=2"], ConfigError, "tiger"),
    (["--save-inversion", "a", "--load-inversion", "b"], ConfigError, "exclude"),
    (["--load-inversion", "/nonexistent/inv"], InputError, "meta.json"),
    (["--store-budget", "lots"], ConfigError, "store-budget"),
    (["--cross-replace", "2"], ConfigError, "cross-replace"),
    (["--guidance", "0.5"], ConfigError, "guidance"),
])
def test_bad_options_fail_in_one_line_before_the_model_loads(clip, tmp_path, monkeypatch, extra, error, match):
    def no_model(*a, **kw):
        raise AssertionError("the model must not load")

    monkeypatch.setattr("diffstream.models.loading.load_components", no_model)
    with pytest.raises(error, match=match) as info:
        edit_command(cli_args(clip, tmp_path / "o.mp4", *extra))
    assert "\n" not in str(info.value)


def test_missing_source_prompt_and_occupied_save_folder(clip, tmp_path):
    args = cli_args(clip, tmp_path / "o.mp4")
    args.source_prompt = None
    with pytest.raises(ConfigError, match="source-prompt"):
        edit_command(args)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(OutputError, match="not an empty folder"):
        edit_command(cli_args(clip, tmp_path / "o.mp4", "--save-inversion", str(tmp_path / "full")))
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    with pytest.raises(InputError):
        edit_command(cli_args(str(tmp_path / "missing.mp4"), tmp_path / "o.mp4"))


def test_an_unusable_saved_inversion_leaves_an_existing_output_untouched(clip, tmp_path):
    assert edit_command(cli_args(clip, tmp_path / "a.mp4", "--max-frames", "3",
                                     "--save-inversion", str(tmp_path / "inv"))) == 0
    other = write_video(tmp_path / "other.mp4", make_frames(5, 48, 64, seed=7), fps=10)
    keep = tmp_path / "keep.mp4"
    keep.write_bytes(b"precious")
    with pytest.raises(InputError, match="other frames"):
        edit_command(cli_args(other, keep, "--max-frames", "3", "--load-inversion", str(tmp_path / "inv")))
    with pytest.raises(ConfigError, match="num_frames"):
        edit_command(cli_args(clip, keep, "--max-frames", "4", "--load-inversion", str(tmp_path / "inv")))
    assert keep.read_bytes() == b"precious"


def test_p2p_and_store_dtype_options_reach_the_typed_config(clip, tmp_path):
    from diffstream.commands.edit_fatezero import edit_config

    default = edit_config(cli_args(clip, tmp_path / "o.mp4"))
    assert (default.p2p, default.store_dtype) == ("auto", "model")
    chosen = edit_config(cli_args(clip, tmp_path / "o.mp4", "--p2p", "refine", "--store-dtype", "fp16"))
    assert (chosen.p2p, chosen.store_dtype) == ("refine", "fp16")
    with pytest.raises(SystemExit):  # argparse refuses other values
        cli_args(clip, tmp_path / "o.mp4", "--p2p", "swap")
