"""`diffstream bench` on the tiny model: table, JSON, plot, registry errors, offline adapters."""

import json

import pytest
import torch

torch.set_num_threads(1)

from diffstream.commands.bench import add_arguments as add_bench_arguments  # noqa: E402
from diffstream.commands.bench import bench_command  # noqa: E402
from diffstream.commands.common import Parser, add_model_options  # noqa: E402
from diffstream.metrics.bench import OFFLINE, BenchMethod, run_benchmark  # noqa: E402
from diffstream.testing import make_frames, write_video  # noqa: E402

TIMING_KEYS = ("fps", "seconds_per_frame", "wall_seconds", "wall_fps", "latency_mean", "latency_p50",
               "latency_p95", "latency_max", "first_output_latency", "peak_memory_bytes", "memory_delta_bytes")
QUALITY_KEYS = ("warp_error_255", "warp_error_01", "clip_temporal_consistency", "clip_temporal_consistency_x100",
                "clip_text_score", "clip_text_score_x100")


@pytest.fixture(scope="module")
def clip_video(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("bench") / "in.mp4", make_frames(6, 48, 64, seed=4))


@pytest.fixture(scope="module")
def scorer():
    """A tiny random CLIP (real CLIP BPE tokenizer), built from config."""
    from diffstream.metrics.clip import ClipScorer
    from diffstream.models.tiny import tiny_clip

    return ClipScorer.from_components(*tiny_clip(), device="cpu")


def _args(*argv):
    parser = Parser(prog="diffstream bench")
    add_model_options(parser)
    add_bench_arguments(parser)
    return parser.parse_args([str(a) for a in argv])


def _stream_outputs(components, frames, method, **cfg):
    from diffstream.config import StreamConfig
    from diffstream.pipelines.factory import make_pipeline

    pipe = make_pipeline(components, StreamConfig(method=method, **cfg))
    try:
        outs = [o for o in (pipe.push(f) for f in frames) if o is not None]
        return outs + pipe.flush()
    finally:
        pipe.close()


def test_bench_two_methods_table_json_and_plot(tiny, scorer, clip_video, tmp_path, capsys):
    from diffstream.metrics.bench import load_clip_frames
    from diffstream.metrics.warp import warp_error

    js, png = tmp_path / "bench.json", tmp_path / "bench.png"
    args = _args(clip_video, "--prompt", "a watercolor cat", "--methods", "streamdiffusion, StreamV2V",
                 "--model", "tiny", "--device", "cpu", "--frames", 6, "--size", 64, "--steps", 2,
                 "--json", js, "--plot", png, "--flow-preset", "fast")
    assert bench_command(args, clip=scorer, components=tiny) == 0
    captured = capsys.readouterr()
    table = captured.out.strip().splitlines()
    assert table[0].startswith("| method") and "latency p95 s" in table[0] and "peak mem MiB" in table[0]
    assert [row.split("|")[1].strip() for row in table[2:]] == ["streamdiffusion", "streamv2v", "input (reference)"]
    assert "warning" not in captured.err

    d = json.loads(js.read_text())
    assert list(d["methods"]) == ["streamdiffusion", "streamv2v"]
    assert d["frames"] == 6 and (d["width"], d["height"]) == (64, 48) and d["seed"] == 2 and d["steps"] == 2
    assert d["memory_kind"] == "rss" and d["clip_model"] and d["warnings"] == []
    for name, m in d["methods"].items():
        assert m["kind"] == "stream" and m["error"] is None
        assert m["frames_in"] == m["frames_out"] == 6
        for key in TIMING_KEYS + QUALITY_KEYS:
            assert isinstance(m[key], (int, float)) and not isinstance(m[key], bool), (name, key)
        assert m["latency_max"] >= m["latency_p95"] >= m["latency_p50"] > 0
        assert 0 < m["first_output_latency"] <= m["wall_seconds"]
        assert m["peak_memory_bytes"] > 100 * 2**20  # the process RSS, model included
        assert len(m["per_frame_latency"]) == 6 and len(m["per_pair_warp_255"]) == 5
        assert m["warp_error_01"] == pytest.approx(m["warp_error_255"] / 255**2)
        assert m["unet_calls"] >= 6
    assert isinstance(d["input_reference"]["warp_error_255"], float)

    # Same clip, model and seed as a plain run: warm-up + reset leave no trace in the outputs.
    frames, _ = load_clip_frames(clip_video, 6, 64, tiny.size_multiple)
    for method in ("streamdiffusion", "streamv2v"):
        outs = _stream_outputs(tiny, frames, method, prompt="a watercolor cat", size=64, steps=2, seed=2)
        expected = warp_error(frames, outs, preset="fast").mean_255
        assert d["methods"][method]["warp_error_255"] == pytest.approx(expected, rel=1e-6)

    head = png.read_bytes()
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and len(head) > 10_000


def test_unknown_method_is_one_line_exit_2_before_any_model_loads(clip_video, monkeypatch, capsys):
    import diffstream.models.loading as loading

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(loading, "load_components", no_loading)
    args = _args(clip_video, "--prompt", "x", "--methods", "streamdiffusion,nope", "--model", "tiny")
    assert bench_command(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("diffstream: error: unknown method 'nope'")
    assert "streamdiffusion, streamv2v, live2diff, fairy, fatezero" in err[0]


def test_method_not_available_yet_is_one_line_naming_it(clip_video, monkeypatch, capsys):
    import diffstream.config as config

    monkeypatch.setattr(config, "METHODS", ("streamdiffusion", "streamv2v"))
    args = _args(clip_video, "--prompt", "x", "--methods", "streamdiffusion,live2diff", "--model", "tiny")
    assert bench_command(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "method 'live2diff' is not available" in err[0]
    with pytest.raises(ValueError, match="needs adapter"):
        BenchMethod("future", OFFLINE)


def test_offline_adapter_timing_and_a_failing_method(tiny, scorer):
    """An offline method: per-frame VAE round trip of the tiny model, reporting progress."""
    from diffstream import frames as F

    calls = []

    def roundtrip(components, frames, *, prompt, seed, size, progress=None):
        calls.append((prompt, seed, size, len(frames)))
        outs = []
        for i, frame in enumerate(frames):
            pixels = F.frames_to_tensor(frame, device=components.device, dtype=components.dtype)
            outs.append(F.tensor_to_frames(components.decode_latents(components.encode_image(pixels)))[0])
            if progress is not None:
                progress(i)
        return outs

    def broken(components, frames, **kwargs):
        return frames[:-1]

    frames = make_frames(5, 48, 64, seed=5)
    methods = [(BenchMethod("roundtrip", OFFLINE, adapter=roundtrip), roundtrip),
               (BenchMethod("broken", OFFLINE, adapter=broken), broken)]
    report = run_benchmark(frames, methods, prompt="a cat", components=tiny, clip=scorer, flow_preset="fast")
    assert calls == [("a cat", 2, (64, 48), 5)]
    ok, bad = (r.to_dict() for r in report.results)
    assert ok["kind"] == "offline" and ok["error"] is None and ok["frames_out"] == 5
    assert ok["latency_p50"] == ok["latency_p95"] == pytest.approx(ok["seconds_per_frame"])
    assert ok["seconds_per_frame"] == pytest.approx(ok["wall_seconds"] / 5)
    assert 0 < ok["first_output_latency"] < ok["wall_seconds"]  # from the progress callback
    assert isinstance(ok["warp_error_255"], float) and isinstance(ok["clip_text_score"], float)
    assert bad["error"] == "ValueError: broken returned 4 frames for 5 inputs"
    assert report.warnings == ["broken failed: ValueError: broken returned 4 frames for 5 inputs"]
    assert "failed" in report.table()
    json.dumps(report.to_dict(), allow_nan=False)


def test_the_bench_figure_says_what_it_shows(tiny):
    """Axis names the real quantity, the title names clip/frames/size/model, legends sit
    outside the axes, and an offline method gets no per-frame latency curve."""
    def same(components, frames, *, prompt, seed, size, progress=None):
        for i in range(len(frames)):
            if progress is not None:
                progress(i)
        return list(frames)

    frames = make_frames(4, 48, 64, seed=5)
    methods = [(bench_method_stream(), None), (BenchMethod("copy", OFFLINE, adapter=same), same)]
    report = run_benchmark(frames, methods, prompt="a cat", components=tiny, flow_preset="fast",
                           info={"input_name": "in.mp4"})
    fig = report.figure()
    ax_warp, ax_lat = fig.axes[:2]
    assert "MSE" in ax_warp.get_ylabel()
    title = ax_warp.get_title()
    assert "in.mp4" in title and "4 frames" in title and "64x48" in title and "tiny" in title
    renderer = fig.canvas.get_renderer()
    for ax in (ax_warp, ax_lat):
        legend = ax.get_legend().get_window_extent(renderer)
        assert legend.x0 >= ax.get_window_extent(renderer).x1  # beside the plot, never on a curve
    labels = [line.get_label() for line in ax_lat.get_lines()]
    assert any("streamdiffusion (latency per frame)" == label for label in labels)
    offline = [line for line in ax_lat.get_lines() if line.get_label().startswith("copy")]
    assert offline and all(len(line.get_xdata()) <= 2 for line in offline)  # a level and a marker, no curve
    assert any("amortised" in line.get_label() for line in offline)


def bench_method_stream():
    from diffstream.metrics.bench import REGISTRY

    return REGISTRY["streamdiffusion"]
