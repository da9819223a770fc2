"""`--int8` / `--fp8` weights of a Wan model (issue #18, torchao weight-only quantization):
what gets quantized (every Linear but the modules the model keeps in fp32), that the
memory estimate's weight term is the bytes stored, that a stream on int8 weights stays
close to the full-precision one, and the one-line refusals (fp8 off a recent CUDA GPU,
torchao missing, not a Wan model)."""

import sys

import numpy as np
import pytest
import torch

from diffstream.attention.block_causal import BlockCausalConfig
from diffstream.config import CausalVideoConfig, ModelConfig, StreamConfig
from diffstream.errors import ConfigError
from diffstream.models.wan_checkpoints import _weights_bytes, transformer_parameters, umt5_encoder_parameters
from diffstream.testing import make_frames

pytest.importorskip("torchao")


def load(**kw):
    from diffstream.models.loading import load_components

    return load_components(ModelConfig(model="tiny-wan", device="cpu", **kw))


def linear_weights(module):
    """{name: weight} of every nn.Linear."""
    return {n: m.weight for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)}


def test_int8_quantizes_every_linear_but_the_fp32_modules_and_the_estimate_is_the_bytes_stored():
    from diffstream.models.quantize import weight_bytes

    wan = load(quantize="int8")
    keep = wan.unet._keep_in_fp32_modules  # Wan: time embedder, norms, modulation tables
    weights = linear_weights(wan.unet)
    kept = {n for n in weights if any(k in n.split(".") for k in keep)}
    assert kept and len(weights) > len(kept)
    for name, w in weights.items():
        quantized = type(w) is not torch.nn.Parameter
        assert quantized == (name not in kept), name
        if quantized:
            assert w.qdata.dtype == torch.int8 and w.scale.shape == (w.shape[0], 1)
    te = wan.text_encoder
    assert any(type(w) is not torch.nn.Parameter for w in linear_weights(te).values())
    c = te.config
    te_params = umt5_encoder_parameters(vocab=c.vocab_size, d_model=c.d_model, d_ff=c.d_ff, layers=c.num_layers,
                                        heads=c.num_heads, d_kv=c.d_kv, buckets=c.relative_attention_num_buckets)
    assert weight_bytes(te) == _weights_bytes(te_params, 4, True)
    # the estimate's weight term (`_weights_bytes`, the int8 formula) is what is stored, byte for byte
    assert weight_bytes(wan.unet) == _weights_bytes(transformer_parameters(wan.unet.config), 4, True)
    full = load()
    assert weight_bytes(full.unet) == _weights_bytes(transformer_parameters(full.unet.config), 4, False)
    assert weight_bytes(wan.unet) < 0.4 * weight_bytes(full.unet)


def test_a_stream_on_int8_weights_stays_close_to_full_precision():
    """The same clip through both: int8 weight-only keeps every output frame within a few
    grey levels of the fp32 model's (measured here: the largest mean difference of a frame
    is printed), far closer than another seed's noise puts them."""
    from diffstream.pipelines.factory import make_pipeline

    frames = make_frames(9, 48, 64)
    video = CausalVideoConfig(block_causal=BlockCausalConfig(chunk_frames=1, sink_chunks=1, window_chunks=1))

    def run(wan, seed=3):
        cfg = StreamConfig(prompt="a watercolor", method="causal-video", video=video, strength=0.7, steps=2, size=64,
                           seed=seed)
        with make_pipeline(wan, cfg) as pipe:
            return [o.astype(np.float64) for f in frames for o in pipe.process(f)] + [
                o.astype(np.float64) for o in pipe.flush()]

    full, int8 = load(), load(quantize="int8")
    a, b, other = run(full), run(int8), run(full, seed=4)
    quant = max(np.abs(x - y).mean() for x, y in zip(a, b))
    noise = max(np.abs(x - y).mean() for x, y in zip(a, other))
    print(f"int8 vs fp32: largest mean frame difference {quant:.3f} grey levels (another seed: {noise:.3f})")
    assert len(a) == len(b) == 9
    assert 0 < quant < 2.0 and quant < noise / 5


def test_refusals_are_one_line(monkeypatch):
    from diffstream.models.quantize import check_quantize

    with pytest.raises(ConfigError, match="compute capability 8.9") as err:
        load(quantize="fp8")  # the CPU
    assert "\n" not in str(err.value) and "--int8" in str(err.value)
    with pytest.raises(ConfigError, match="int8 or fp8"):
        ModelConfig(model="tiny-wan", quantize="int4")
    with pytest.raises(ConfigError, match="for Wan video models"):
        ModelConfig(model="tiny", quantize="int8")
    monkeypatch.setitem(sys.modules, "torchao", None)  # not installed
    with pytest.raises(ConfigError, match=r"diffstream\[quant\]"):
        check_quantize("int8", torch.device("cpu"))


def test_cli_int8_end_to_end(tmp_path, capsys):
    import av

    from diffstream.cli import main
    from diffstream.testing import write_video

    path = write_video(tmp_path / "clip.mp4", make_frames(5, 48, 64), fps=25)
    out = tmp_path / "out.mp4"
    assert main(["run", path, "-o", str(out), "--method", "causal-video", "--model", "tiny-wan", "--prompt", "x",
                 "--size", "64", "--no-progress", "--int8"]) == 0
    with av.open(str(out)) as c:
        assert sum(1 for _ in c.decode(video=0)) == 5
    with pytest.raises(SystemExit):  # one or the other (argparse)
        main(["run", path, "-o", str(out), "--model", "tiny-wan", "--method", "causal-video", "--prompt", "x",
              "--int8", "--fp8"])


def test_tiny_wan_parts_count_what_int8_quantizes():
    """The memory estimate's parts of tiny-wan (`wan_memory._tiny_parts`, built on the meta
    device) count the text encoder's Linear weights as the int8 path quantizes them (T5's
    `wo` left out), so its int8 term is the bytes the quantized encoder stores."""
    from diffstream.models.quantize import weight_bytes
    from diffstream.models.wan_memory import _tiny_parts

    te = load(quantize="int8").text_encoder
    assert weight_bytes(te) == _weights_bytes(_tiny_parts().text_encoder, 4, True)
