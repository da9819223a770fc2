"""`diffstream edit --method fatezero` end to end on the tiny model: audio, saved
inversions, Ctrl-C, one-line errors before the model loads, outputs left untouched."""

import json
from pathlib import Path

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


# --- --video-model: a Tune-A-Video-style video UNet for shape edits -------------------------
from diffstream.attention.fatezero import FateZeroAttnProcessor, FateZeroConfig  # noqa: E402
from diffstream.commands import edit_fatezero as efz  # noqa: E402
from diffstream.errors import ModelLoadError  # noqa: E402
from diffstream.models.video_unet import inflate, is_motion_module, save_video_model, video_model_id  # noqa: E402
from diffstream.pipelines.fatezero import SHAPE_EDIT, FateZeroEditConfig, FateZeroEditor  # noqa: E402


def tuned_like(unet, seed=1):
    """An inflated UNet with the weights a tuning run moves set to something non-trivial:
    motion modules that mix frames, query projections off the base model's."""
    video = inflate(unet)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in video.named_modules():
            if is_motion_module(name + ".") and name.endswith("proj_out"):
                module.weight.copy_(torch.randn(module.weight.shape, generator=g) * 0.2)
                module.bias.copy_(torch.randn(module.bias.shape, generator=g) * 0.2)
            if name.endswith((".attn1.to_q", ".attn2.to_q")) and not is_motion_module(name):
                module.weight.add_(torch.randn(module.weight.shape, generator=g) * 0.05)
    return video


@pytest.fixture(scope="module")
def video_model(tmp_path_factory):
    """A saved video model of the tiny base (its UNet is tiny_unet(seed 0))."""
    from diffstream.models.tiny import tiny_unet

    folder = tmp_path_factory.mktemp("video") / "final"
    save_video_model(tuned_like(tiny_unet()), folder,
                     dict(base_model="tiny", lcm_lora=None, loras=[], source_prompt=SWAN, frames=5, size=[32, 32]))
    return str(folder)


def video_args(clip, out, video_model, *extra):
    """`diffstream edit --method fatezero --video-model DIR` argv; --model left out (the base's)."""
    return [clip, "-o", str(out), "--video-model", video_model, "--device", "cpu", "--size", "32",
            "--source-prompt", SWAN, "--prompt", DUCK, "--steps", "4", "--fz-window", "3", "--no-progress",
            "--blend-words", "swan", "duck", *extra]


def test_video_model_edit_end_to_end_and_its_inversion_is_refused_by_the_image_model(
        clip, video_model, tmp_path, monkeypatch, capsys):
    from diffstream import cli

    seen = []
    real = fzp.edit_frames

    def spy(components, frames, config, **kw):
        seen.append((components, config))
        return real(components, frames, config, **kw)

    monkeypatch.setattr(fzp, "edit_frames", spy)
    out = tmp_path / "out.mp4"
    argv = ["edit", "--method", "fatezero",
            *video_args(clip, out, video_model, "--save-inversion", str(tmp_path / "inv"))]
    assert cli.main(argv) == 0
    assert count_frames(out) == (5, True)
    components, config = seen[0]
    saved_id = json.loads((Path(video_model) / "video_model.json").read_text())["id"]
    assert components.is_video_unet and video_model_id(components.unet) == saved_id
    assert components.name == "tiny"  # the video model's base, --model left out
    assert {k: getattr(config.fatezero, k) for k in SHAPE_EDIT} == SHAPE_EDIT

    # The same schedule on the image model: only the fingerprint differs, and it refuses.
    capsys.readouterr()
    same_schedule = ["--frame-attention", "previous+first", "--reference-frame", "previous",
                     "--cross-frame-min-downsample", "1", "--cross-replace", "0", "--self-replace", "0.5",
                     "--blend-threshold", "0.2"]
    argv = ["edit", "--method", "fatezero", clip, "-o", str(tmp_path / "again.mp4"), "--model", "tiny", "--device",
            "cpu", "--size", "32", "--source-prompt", SWAN, "--prompt", DUCK, "--steps", "4", "--fz-window", "3",
            "--no-progress", "--blend-words", "swan", "duck", "--load-inversion", str(tmp_path / "inv"), *same_schedule]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "video_model" in err[0] and "--video-model" in err[0], err


def test_a_video_model_makes_the_shape_edit_schedule_the_default(clip, video_model, tmp_path):
    args = parser().parse_args(video_args(clip, tmp_path / "o.mp4", video_model))
    fz = efz.edit_config(args).fatezero
    assert {k: getattr(fz, k) for k in SHAPE_EDIT} == dict(
        cross_replace=0.0, self_replace=0.5, blend_threshold=0.2, reference_frame="previous",
        frame_attention="previous+first", cross_frame_min_downsample=1)
    assert efz.model_config(args).model == "tiny"
    explicit = parser().parse_args(video_args(clip, tmp_path / "o.mp4", video_model, "--self-replace", "0.7",
                                              "--frame-attention", "reference", "--reference-frame", "middle"))
    fz = efz.edit_config(explicit).fatezero
    assert (fz.self_replace, fz.frame_attention, fz.reference_frame, fz.cross_replace) == (
        0.7, "reference", "middle", 0.0)
    plain = efz.edit_config(cli_args(clip, tmp_path / "o.mp4")).fatezero  # no video model: style/attribute defaults
    assert (plain.cross_replace, plain.self_replace, plain.blend_threshold, plain.frame_attention,
            plain.reference_frame, plain.cross_frame_min_downsample) == (0.8, 0.8, 0.3, "reference", "middle", 2)


@pytest.mark.parametrize("extra,error,match", [
    (["--model", "toy"], ConfigError, "tuned from --model tiny"),
    (["--motion-adapter", "tiny"], ConfigError, "motion-adapter"),
])
def test_a_video_model_with_another_base_fails_before_the_model_loads(clip, video_model, tmp_path, monkeypatch,
                                                                     extra, error, match):
    def no_model(*a, **kw):
        raise AssertionError("the model must not load")

    monkeypatch.setattr("diffstream.models.loading.load_components", no_model)
    with pytest.raises(error, match=match) as info:
        edit_command(parser().parse_args(video_args(clip, tmp_path / "o.mp4", video_model, *extra)))
    assert "\n" not in str(info.value)
    with pytest.raises(ModelLoadError, match="--video-model .*no video_model.json"):
        edit_command(parser().parse_args(video_args(clip, tmp_path / "o.mp4", str(tmp_path))))


def test_every_unet_call_of_a_shape_edit_runs_the_video_model(clip, video_model, tmp_path, monkeypatch):
    """What each UNet call of `edit --video-model` receives, recorded with a forward
    pre-hook: one clip per branch group (5-D, R frames of the window), FateZero's
    sparse-causal processors (previous + first frame) on every spatial self-attention
    layer, the motion modules' own processors untouched, and the shape-edit schedule:
    int(4 * 0.5) = 2 self-attention fusion steps, no cross-attention fusion."""
    calls, motion = [], {}

    def record(module, args, kwargs):
        procs = module.attn_processors
        fz = {n: p for n, p in procs.items() if isinstance(p, FateZeroAttnProcessor)}
        if not fz:  # the editor's probe of the layer shapes (probe_layers), not an edit call
            return
        state = next(iter(fz.values())).state
        calls.append(dict(
            shape=tuple(args[0].shape), text=tuple(kwargs["encoder_hidden_states"].shape),
            phase=state.call.phase, step=state.call.step, sources=state.call.sources.tolist(),
            self_steps=state.plan.self_steps, cross_steps=state.plan.cross_steps, blend=state.plan.blend,
            config=(state.config.frame_attention, state.config.cross_frame_min_downsample),
            spatial_self={n for n in procs if ".attn1." in n and not is_motion_module(n)},
            fused_self={n for n, p in fz.items() if p.is_self and p.cross_frame},
            motion_same=all(procs[n] is p for n, p in motion.items())))

    from diffstream.models import loading

    real = loading.load_components

    def load_and_hook(config):
        components = real(config)
        motion.update({n: p for n, p in components.unet.attn_processors.items() if is_motion_module(n)})
        components.unet.register_forward_pre_hook(record, with_kwargs=True)
        return components

    monkeypatch.setattr(loading, "load_components", load_and_hook)
    assert edit_command(parser().parse_args(video_args(clip, tmp_path / "o.mp4", video_model))) == 0
    assert motion and len(calls) == 2 * 8  # 2 windows x (4 inversion + 4 editing steps)
    latent = (32 // 8, 32 // 8)
    windows = [(3, [[0, 0, 1], [0, 0, 0]]), (4, [[0, 1, 1, 2], [0, 0, 0, 0]])]  # rows (0,1,2), (0,2,3,4)
    expected = []
    for rows, sources in windows:
        for k in (3, 2, 1, 0):  # inversion, noisiest step last; fused steps store
            expected.append(((1, 4, rows, *latent), "store" if k < 2 else "plain", k, sources))
        for k in range(4):  # editing with guidance: (uncond, cond) clips
            expected.append(((2, 4, rows, *latent), "fuse" if k < 2 else "plain", k, sources))
    assert [(c["shape"], c["phase"], c["step"], c["sources"]) for c in calls] == expected
    for c in calls:
        assert c["text"] == (c["shape"][0] * c["shape"][2], 77, 32)  # the text once per frame
        assert (c["self_steps"], c["cross_steps"], c["blend"]) == ((0, 1), (), True)
        assert c["config"] == ("previous+first", 1)
        assert c["spatial_self"] and c["fused_self"] == c["spatial_self"]  # every spatial layer, cross-frame
        assert c["motion_same"]


def editor_edit(components, prompt=DUCK, guidance=3.0, blend=("swan", "duck"), reconstruct=False, **schedule):
    fz = FateZeroConfig(steps=4, **{**SHAPE_EDIT, **schedule})
    config = FateZeroEditConfig(source_prompt=SWAN, prompt=prompt, guidance=guidance, blend_words=blend,
                                fatezero=fz, store_dtype="fp32")
    editor = FateZeroEditor(components, config, (4, 4))
    z0 = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(5))  # unit-scale latents
    refs = fzp.plan_windows(3, 3, "previous", first=True)[0].ref_rows
    store = editor.new_store()
    z_T = editor.invert(z0, refs, store)
    edited = editor.edit(store, refs)
    return (edited, editor.reconstruct(z_T, refs)) if reconstruct else edited


def test_an_inflated_model_edits_like_the_image_model(tiny):
    """At its initial weights the video model is the image model frame by frame, so a
    shape edit (CFG: two clips per call) through it equals the image model's with the
    same sparse-causal attention; a video model that moved does not."""
    import dataclasses

    image = editor_edit(tiny)
    inflated = editor_edit(dataclasses.replace(tiny, unet=inflate(tiny.unet)))
    torch.testing.assert_close(inflated, image, rtol=0, atol=1e-4)
    moved = editor_edit(dataclasses.replace(tiny, unet=tuned_like(tiny.unet)))
    assert (moved - image).abs().max() > 1e-2


def test_target_equal_to_source_reproduces_the_reconstruction(tiny):
    """With the video model, editing with target = source at guidance 1: without fusion
    it is exactly the reconstruction; with the shape-edit schedule (the first half of the
    steps take the inversion's self-attention maps) it stays within a few percent of it
    (measured 1.8% at 4 steps, against 38% between the reconstruction and the input: the
    fused maps lag the edit by one step, as in tests/pipelines/test_fatezero.py). No blend
    words: at this toy resolution the 3x3-pooled blend mask is all ones, keeping every map."""
    import dataclasses

    video = dataclasses.replace(tiny, unet=tuned_like(tiny.unet))
    edited, recon = editor_edit(video, prompt=SWAN, guidance=1.0, blend=None, reconstruct=True, self_replace=0.0)
    assert torch.equal(edited, recon)
    edited, recon = editor_edit(video, prompt=SWAN, guidance=1.0, blend=None, reconstruct=True)
    z0 = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(5))  # editor_edit's latents
    rel = ((edited - recon).norm() / recon.norm()).item()
    assert 0 < rel < 0.05 and rel < 0.1 * ((recon - z0).norm() / z0.norm()).item(), rel
