"""`diffstream eval` end to end with a tiny random CLIP and depth model loaded from folders."""

import json
import time

import numpy as np
import pytest
import torch

torch.set_num_threads(1)

from diffstream.commands.common import Parser  # noqa: E402
from diffstream.commands.eval import add_arguments as add_eval_arguments  # noqa: E402
from diffstream.commands.eval import eval_command  # noqa: E402
from diffstream.frames import resize  # noqa: E402
from diffstream.metrics.evaluate import evaluate_frames  # noqa: E402
from diffstream.testing import make_frames, write_video  # noqa: E402

SRC_SIZE, OUT_SIZE = (64, 48), (96, 72)  # (w, h): the output is larger, so the source is resized


def _decode(path):
    from diffstream.io.sources import open_source

    with open_source(str(path)) as src:
        return list(src)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """A source clip and a 'result' of it at another size (blurred, tinted, noisy)."""
    import cv2

    d = tmp_path_factory.mktemp("eval")
    src = make_frames(8, SRC_SIZE[1], SRC_SIZE[0], seed=1)
    rng = np.random.default_rng(3)
    out = []
    for f in src:
        g = cv2.GaussianBlur(resize(f, OUT_SIZE), (5, 5), 0).astype(np.int16)
        g[..., 0] += 20
        g += rng.integers(-12, 13, g.shape, dtype=np.int16)
        out.append(np.clip(g, 0, 255).astype(np.uint8))
    return write_video(d / "src.mp4", src), write_video(d / "out.mp4", out)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A tiny random CLIP (real CLIP BPE tokenizer) saved as a checkpoint folder."""
    from diffstream.models.tiny import tiny_clip

    folder = tmp_path_factory.mktemp("tiny-clip")
    for part in tiny_clip():
        part.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def depth_folder(tmp_path_factory):
    """A tiny random DPT depth model saved as a checkpoint folder."""
    from diffstream.models.tiny import tiny_dpt

    folder = tmp_path_factory.mktemp("tiny-dpt")
    for part in tiny_dpt(seed=0):
        part.save_pretrained(folder)
    return str(folder)


def _args(*argv):
    parser = Parser(prog="diffstream eval")
    add_eval_arguments(parser)
    return parser.parse_args([str(a) for a in argv])


def test_eval_prints_table_and_writes_json_with_every_metric(videos, clip_folder, depth_folder, tmp_path, capsys):
    from diffstream.metrics.clip import ClipScorer
    from diffstream.metrics.depth import depth_mse
    from diffstream.models.depth import DepthEstimator
    from diffstream.metrics.warp import warp_error

    src, out = videos
    js, png = tmp_path / "m.json", tmp_path / "m.png"
    args = _args("--source", src, "--output", out, "--prompt", "a red painting", "--source-prompt", "a photo",
                 "--clip-model", clip_folder, "--depth-model", depth_folder, "--json", js, "--plot", png,
                 "--device", "cpu")
    assert eval_command(args) == 0
    captured = capsys.readouterr()
    assert captured.err == ""  # no warnings: every model loaded
    table = captured.out.strip().splitlines()
    assert table[0].startswith("| metric") and len(table) == 2 + 7
    assert not any("n/a" in line for line in table)

    d = json.loads(js.read_text())
    assert d["frames"] == 8 and (d["width"], d["height"]) == OUT_SIZE
    assert (d["source_width"], d["source_height"]) == SRC_SIZE and d["source_resized"] is True
    for key in ("warp_error_255", "warp_error_01", "clip_temporal_consistency", "clip_temporal_consistency_x100",
                "clip_text_score", "clip_text_score_x100", "clip_frame_accuracy", "depth_mse"):
        assert isinstance(d[key], float), key
    assert len(d["per_pair_warp_255"]) == 7 and d["warnings"] == []
    assert d["clip_model"] == clip_folder and d["depth_model"] == depth_folder

    # The streamed single pass equals the batch definitions on the decoded, resized source.
    src_frames = [resize(f, OUT_SIZE) for f in _decode(src)]
    out_frames = _decode(out)
    ref = warp_error(src_frames, out_frames)
    assert d["warp_error_255"] == pytest.approx(ref.mean_255, rel=1e-6)
    assert d["warp_error_01"] == pytest.approx(ref.mean_255 / 255**2, rel=1e-6)
    clip = ClipScorer(clip_folder, device="cpu").evaluate(out_frames, "a red painting", "a photo")
    assert d["clip_temporal_consistency"] == pytest.approx(clip.temporal_consistency, abs=1e-6)
    assert d["clip_text_score"] == pytest.approx(clip.text_score, abs=1e-6)
    assert d["clip_frame_accuracy"] == pytest.approx(clip.frame_accuracy)
    est = DepthEstimator(depth_folder, device="cpu")
    assert d["depth_mse"] == pytest.approx(depth_mse(src_frames, out_frames, est), rel=1e-5)

    head = png.read_bytes()
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and len(head) > 10_000


def test_missing_clip_is_one_warning_and_other_metrics_still_computed(videos, tmp_path, capsys):
    src, out = videos
    js = tmp_path / "m.json"
    args = _args("--source", src, "--output", out, "--prompt", "a cat", "--clip-model", tmp_path / "no-clip",
                 "--json", js, "--max-frames", 5)
    assert eval_command(args) == 0
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("diffstream: warning: CLIP metrics skipped")
    assert "--clip-model PATH" in err[0]
    assert "n/a" in captured.out
    d = json.loads(js.read_text())
    assert d["frames"] == 5 and isinstance(d["warp_error_255"], float)
    for key in ("clip_temporal_consistency", "clip_text_score", "clip_frame_accuracy", "depth_mse", "clip_model"):
        assert key in d and d[key] is None
    assert d["warnings"] == [err[0].removeprefix("diffstream: warning: ")]


def test_default_hub_clip_fails_fast_without_network(monkeypatch, tmp_path):
    """No network: the default hub id fails at once (no minute of hub retries)."""
    import diffstream.models.hub as hub
    from diffstream.metrics.evaluate import load_clip_scorer

    monkeypatch.setattr(hub, "hub_reachable", lambda *a, **k: False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    start = time.perf_counter()
    scorer, warning = load_clip_scorer("openai/clip-vit-large-patch14", "cpu")
    assert scorer is None and "--clip-model PATH" in warning and "\n" not in warning
    assert time.perf_counter() - start < 20


def test_unequal_lengths_compare_the_common_prefix():
    frames = make_frames(6, 32, 40, seed=2)
    report = evaluate_frames(frames, frames[:4])
    assert report.frames == 4 and report.warp.num_pairs == 3
    assert report.warnings == ["the source has more frames than the output: compared the first 4"]
    assert report.to_dict()["clip_text_score"] is None


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--source-prompt", "a dog"], "--source-prompt needs --prompt"),
        (["--plot", "p.jpg"], "--plot must name a .png file"),
        (["--max-frames", "0"], "--max-frames must be >= 1"),
        (["--json", "/no/such/dir/m.json"], "cannot write --json"),
    ],
)
def test_bad_options_are_one_line_exit_2(videos, capsys, extra, expected):
    src, out = videos
    assert eval_command(_args("--source", src, "--output", out, "--clip-model", "none", *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("diffstream: error:") and expected in err[0]


def test_missing_input_is_one_line_exit_2(videos, tmp_path, capsys):
    src, _ = videos
    assert eval_command(_args("--source", src, "--output", tmp_path / "nope.mp4")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "input not found" in err[0]


def test_eval_figure_names_the_quantity_and_the_run(tmp_path):
    """`eval --plot`: the axis says what warp error is (an MSE on 0-255 pixel values, so up to
    255^2, not a value "0-255"), the title names both videos, frames, size and flow preset,
    and the legend sits beside the axes."""
    from diffstream.metrics.evaluate import EvalReport, plot_report, report_figure
    from diffstream.metrics.warp import WarpErrorResult

    errors = (120.0, 2100.0, 900.0, 0.5, 1500.0)
    report = EvalReport(frames=6, size=(96, 72), source_size=(64, 48), source="/x/src.mp4", output="/y/out.mp4",
                        warp=WarpErrorResult(errors, (0.97, 0.95, 0.96, 1.0, 0.9)), flow_preset="fast")
    fig = report_figure(report)
    ax_err, ax_valid = fig.axes
    assert ax_err.get_ylabel() == "warp error (MSE, pixels 0-255)"
    assert ax_err.get_title() == "out.mp4 vs src.mp4: 6 frames at 96x72, flow fast"
    (curve, mean) = ax_err.get_lines()
    assert list(curve.get_ydata()) == list(errors) and list(curve.get_xdata()) == [1, 2, 3, 4, 5]
    assert mean.get_ydata()[0] == pytest.approx(np.mean(errors)) and mean.get_label().startswith("mean ")
    renderer = fig.canvas.get_renderer()
    assert not ax_err.get_legend().get_window_extent(renderer).overlaps(ax_err.get_window_extent(renderer))
    assert [t for t in ax_err.get_xticks() if 1 <= t <= 5] == [1, 2, 3, 4, 5]  # pair numbers, no 2.5
    png = tmp_path / "e.png"
    plot_report(report, str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
