"""The Wan checkpoint loader and the memory estimate wired into the product (issue #18).

- `--transformer`: a checkpoint in a causal trainer's format replaces the Wan model's
  transformer (tiny-wan, and a Wan folder whose own transformer weights are absent: they
  are never read); misuse is one line, before anything loads.
- `--text-encoder-offload`: the text encoder's parameters stay on the CPU while the other
  modules go to `device` (here the meta device, so "on the device" and "on the CPU" differ
  on a CPU-only machine); embeddings equal the resident encoder's and a stream's frames
  equal the resident stream's; each distinct prompt runs the encoder once (a forward hook
  counts its calls), however often a stream comes back to it.
- the GPU-memory check: on a (faked) CUDA device, the estimate of a Wan2.1-T2V-1.3B folder
  (configs only: no weights exist, so anything that loaded would fail) is said in one
  line, and a card too small is refused in one line naming what to lower, exit 2,
  before `load_components` is called (patched to fail the test); a card that fits goes
  on to load (tiny-wan: the whole run, exit 0).
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from diffstream.config import CausalVideoConfig, ModelConfig, RunConfig, StreamConfig
from diffstream.errors import ConfigError, ModelLoadError
from diffstream.models.wan import tiny_wan_transformer
from diffstream.models.wan_checkpoints import UMT5_XXL, WAN21_T2V_1_3B, checkpoint_config

GiB = 2**30


def _checkpoints_helpers():
    """`in_format` of tests/models/test_wan_checkpoints.py (the documented original names)."""
    spec = importlib.util.spec_from_file_location("wan_ckpt_helpers", Path(__file__).parent / "test_wan_checkpoints.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def one_line(call, *args, **kwargs) -> str:
    with pytest.raises((ConfigError, ModelLoadError)) as e:
        call(*args, **kwargs)
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.fixture(scope="module")
def wan():
    from diffstream.models.loading import load_components

    return load_components(ModelConfig(model="tiny-wan", device="cpu"))


# --- --transformer --------------------------------------------------------------------


def test_transformer_replaces_tiny_wan_and_a_folder_transformer(wan, tmp_path):
    """A Self-Forcing-style training checkpoint ({"generator_ema": {"model." + Wan names}})
    of another tiny transformer replaces tiny-wan's, and a Wan folder's whose transformer/
    holds a config only (its weights are not read: loading them would fail)."""
    from diffstream.models.loading import load_components

    other = tiny_wan_transformer(seed=7)
    helpers = _checkpoints_helpers()
    path = tmp_path / "self_forcing_dmd.pt"
    torch.save({"generator_ema": helpers.in_format(other.state_dict(), "self-forcing"), "critic": {}}, path)
    assert checkpoint_config(path)["num_layers"] == other.config.num_layers

    folder = tmp_path / "wan"
    for part in ("vae", "text_encoder", "tokenizer", "scheduler"):
        getattr(wan, part).save_pretrained(folder / part)
    wan.transformer.save_config(folder / "transformer")  # config.json alone: no weights
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    for model in ("tiny-wan", str(folder)):
        loaded = load_components(ModelConfig(model=model, device="cpu", transformer=str(path)))
        ours, theirs = other.state_dict(), loaded.transformer.state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), model
    assert not torch.equal(wan.transformer.state_dict()["proj_out.weight"], other.state_dict()["proj_out.weight"])


def test_transformer_misuse_is_one_line_before_loading(tmp_path, monkeypatch):
    import diffstream.models.wan as wan_module
    from diffstream.models.loading import load_components

    assert "Wan-AI/Wan2.1-T2V-1.3B-Diffusers" in one_line(ModelConfig, model="tiny", transformer="x.pt")
    assert "--text-encoder-offload" in one_line(ModelConfig, model="sd15-lcm", text_encoder_offload=True)
    assert "--method causal-video" in one_line(
        RunConfig, model=ModelConfig(model=str(tmp_path), transformer="x.pt"), stream=StreamConfig())
    monkeypatch.setattr(wan_module, "tiny_wan_modules", lambda *a, **k: pytest.fail("model loaded"))
    # a folder or hub id that is not a Wan model
    assert "Wan-AI/Wan2.1-T2V-1.3B-Diffusers" in one_line(
        load_components, ModelConfig(model="someone/sd-model", device="cpu", transformer=str(tmp_path)))
    # a missing file says what to pass
    assert "model.pt" in one_line(load_components, ModelConfig(model="tiny-wan", device="cpu",
                                                               transformer=str(tmp_path / "no.pt")))


def test_a_transformer_for_another_text_encoder_is_one_line(tmp_path):
    from diffusers import WanTransformer3DModel

    from diffstream.models.loading import load_components

    config = dict(tiny_wan_transformer().config)
    config.update(text_dim=16)
    wrong = WanTransformer3DModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    wrong.save_pretrained(tmp_path / "wrong")
    assert "text 16 wide" in one_line(load_components, ModelConfig(model="tiny-wan", device="cpu",
                                                                    transformer=str(tmp_path / "wrong")))


# --- --text-encoder-offload ------------------------------------------------------------


def count_calls(module) -> list:
    calls = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_offload_keeps_the_encoder_on_the_cpu_and_embeddings_go_to_the_device():
    """On the meta device (a device that is not the CPU, on any machine): everything but
    the text encoder is there; prompts are encoded on the CPU, their embeddings land there."""
    from diffstream.models.loading import load_components

    comp = load_components(ModelConfig(model="tiny-wan", device="meta", text_encoder_offload=True))
    assert {p.device.type for p in comp.text_encoder.parameters()} == {"cpu"}
    for part in (comp.transformer, comp.vae):
        assert {p.device.type for p in part.parameters()} == {"meta"}
    emb = comp.encode_text(["a cat", "a dog"])
    assert emb.device.type == "meta" and emb.shape == (2, comp.max_text_tokens, comp.transformer.config.text_dim)
    resident = load_components(ModelConfig(model="tiny-wan", device="meta"))
    assert {p.device.type for p in resident.text_encoder.parameters()} == {"meta"}


def test_offload_equals_resident_and_encodes_each_prompt_once(wan):
    """Embeddings and a stream's frames equal the resident encoder's; prompt A, then B,
    then A again runs the encoder twice (once per distinct prompt), not three times."""
    from diffstream.models.loading import load_components
    from diffstream.pipelines.factory import make_pipeline
    from diffstream.testing import make_frames

    off = load_components(ModelConfig(model="tiny-wan", device="cpu", text_encoder_offload=True))
    calls = count_calls(off.text_encoder)
    resident = wan.encode_text(["a cat", "a dog"])  # (2, L, D)
    assert torch.equal(off.encode_text(["a cat", "a dog"]), resident) and len(calls) == 1
    assert torch.equal(off.encode_text(["a dog", "a cat", "a dog"]), resident[[1, 0, 1]])
    assert len(calls) == 1, "cached prompts are not encoded again"

    frames = make_frames(9, 48, 64)
    outputs = {}
    for name, comp in (("resident", wan), ("offload", off)):
        before = len(calls)
        pipe = make_pipeline(comp, StreamConfig(method="causal-video", prompt="a red fox", size=64, seed=3))
        out = pipe.process(frames[0])
        pipe.update(prompt="a blue car")
        for frame in frames[1:5]:
            out += pipe.process(frame)
        pipe.update(prompt="a red fox")
        for frame in frames[5:]:
            out += pipe.process(frame)
        pipe.close()
        outputs[name] = out
        if name == "offload":
            assert len(calls) - before == 2, "each distinct prompt is encoded once"
    assert len(outputs["offload"]) == 9
    assert all((a == b).all() for a, b in zip(outputs["resident"], outputs["offload"]))


# --- the GPU-memory check ----------------------------------------------------------------


@pytest.fixture
def wan_1_3b_configs(tmp_path):
    """A Wan2.1-T2V-1.3B diffusers folder with its configs and no weights."""
    folder = tmp_path / "Wan2.1-T2V-1.3B-Diffusers"
    parts = {"transformer": {"_class_name": "WanTransformer3DModel", **WAN21_T2V_1_3B},
             "text_encoder": {"_class_name": "UMT5EncoderModel", "vocab_size": UMT5_XXL["vocab"],
                              "d_model": UMT5_XXL["d_model"], "d_ff": UMT5_XXL["d_ff"], "num_layers": UMT5_XXL["layers"],
                              "num_heads": UMT5_XXL["heads"], "d_kv": UMT5_XXL["d_kv"],
                              "relative_attention_num_buckets": UMT5_XXL["buckets"]},
             "vae": {"_class_name": "AutoencoderKLWan"}}
    for part, config in parts.items():
        (folder / part).mkdir(parents=True)
        (folder / part / "config.json").write_text(json.dumps(config))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    return str(folder)


@pytest.fixture
def fake_cuda(monkeypatch):
    """`--device cuda` resolves (to a CUDA device this machine has not), with `free[0]`
    bytes free; `load_components` records its calls and fails with a marker line."""
    import diffstream.models.loading as loading
    from diffstream.commands import common
    from diffstream.errors import DiffstreamError

    real = loading.resolve_device
    monkeypatch.setattr(loading, "resolve_device", lambda d: torch.device("cuda") if d == "cuda" else real(d))
    free = [80 * GiB]
    monkeypatch.setattr(common, "cuda_free_bytes", lambda device: free[0] if device.type == "cuda" else None)
    loads = []

    def load(config):
        loads.append(config)
        raise DiffstreamError("stub: the model would load now")

    monkeypatch.setattr(loading, "load_components", load)
    return free, loads


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    from diffstream.testing import make_frames, write_video

    return write_video(tmp_path_factory.mktemp("clip") / "clip.mp4", make_frames(5, 48, 64), fps=25)


def run(clip, tmp_path, *args):
    from diffstream.cli import main

    return main(["run", clip, "-o", str(tmp_path / "out.mp4"), "--method", "causal-video", "--prompt", "x",
                 "--no-progress", *args])


def test_a_gpu_too_small_is_refused_before_loading(wan_1_3b_configs, fake_cuda, clip, tmp_path, capsys):
    free, loads = fake_cuda
    free[0] = 12 * GiB
    assert run(clip, tmp_path, "--model", wan_1_3b_configs, "--device", "cuda", "--size", "832") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert not loads and not (tmp_path / "out.mp4").exists()
    assert err[-2].startswith("diffstream: GPU memory estimate") and "text encoder 10.6" in err[-2]
    assert err[-1].startswith("diffstream: error: ") and "832x624" in err[-1] and "12.0 GiB is free" in err[-1]
    assert "lower: --text-encoder-offload (-10.6 GiB)" in err[-1]  # UMT5-XXL in fp16, the biggest saving first
    assert "--int8 (-4.7 GiB)" in err[-1]  # int8 Linear weights of the transformer and UMT5
    assert "--steps" not in err[-1]  # an option that would not lower it (run's steps are sequential calls)


def test_a_gpu_that_fits_goes_on_to_load(wan_1_3b_configs, fake_cuda, clip, tmp_path, capsys):
    free, loads = fake_cuda
    free[0] = 12 * GiB
    assert run(clip, tmp_path, "--model", wan_1_3b_configs, "--device", "cuda", "--size", "480",
               "--text-encoder-offload") == 2
    err = capsys.readouterr().err
    assert len(loads) == 1 and loads[0].text_encoder_offload and "stub: the model would load now" in err
    assert "GPU memory estimate" in err and "text encoder" not in err.split("GPU memory estimate")[1].splitlines()[0]


def test_tiny_wan_that_fits_runs_to_the_end(fake_cuda, clip, tmp_path, capsys, monkeypatch):
    import diffstream.models.loading as loading

    def load(config):  # the CUDA device is fake: the model runs on the CPU
        fake_cuda[1].append(config)
        return loading.load_wan_components(config, torch.device("cpu"), torch.float32)

    monkeypatch.setattr(loading, "load_components", load)
    assert run(clip, tmp_path, "--model", "tiny-wan", "--device", "cuda", "--size", "64") == 0
    err = capsys.readouterr().err
    assert "GPU memory estimate 0.5 GiB" in err and "80.0 GiB free" in err and "wrote 5 frames" in err


def test_serve_refuses_before_loading_and_names_max_clients(wan_1_3b_configs, fake_cuda, capsys):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from diffstream.commands import serve

    free, loads = fake_cuda
    free[0] = 6 * GiB
    assert serve.main(["--model", wan_1_3b_configs, "--device", "cuda", "--port", "0", "--size", "512",
                       "--max-clients", "4", "--text-encoder-offload"]) == 2
    err = capsys.readouterr().err
    assert not loads
    line = [x for x in err.splitlines() if x.startswith("diffstream: error:")][0]
    assert "512x512" in line and "--max-clients 2" in line and "--window-chunks" not in line


def test_serve_takes_the_causal_video_options_and_counts_a_cache_per_step(wan_1_3b_configs, capsys, monkeypatch):
    """serve has run's cache options: its sessions' base config carries them, and with
    the stream batch (a KV cache per denoising step, 2 steps) the estimate counts two rows
    per client."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from diffstream.commands import serve

    for extra, rows in (([], 4), (["--video-stream-batch", "--sink-chunks", "1"], 8)):
        assert serve.main(["--model", wan_1_3b_configs, "--device", "cpu", "--port", "0", "--size", "512",
                           "--max-clients", "4", "--vram-estimate", *extra]) == 0
        assert f"GPU memory estimate, 512x512, {rows} KV cache row(s)" in capsys.readouterr().out
    assert serve.main(["--model", wan_1_3b_configs, "--port", "0", "--video-stream-batch", "--kv-record",
                       "clean"]) == 2
    assert "--kv-record" in capsys.readouterr().err.strip().splitlines()[-1]


def test_vram_estimate_prints_the_table_and_loads_nothing_on_cpu(wan_1_3b_configs, clip, tmp_path, capsys,
                                                                  monkeypatch):
    import diffstream.models.loading as loading

    monkeypatch.setattr(loading, "load_components", lambda config: pytest.fail("model loaded"))
    assert run(clip, tmp_path, "--model", wan_1_3b_configs, "--device", "cpu", "--size", "832",
               "--vram-estimate") == 0
    out = capsys.readouterr().out
    assert "GPU memory estimate, 832x624, 1 KV cache row(s), float16:" in out  # as on a GPU: --dtype auto is fp16 there
    assert "text_encoder       10.58 GiB" in out and "kv_cache" in out and "total" in out
    # --int8: the weight items of int8 Linear weights (torchao weight-only), nothing loaded either
    if importlib.util.find_spec("torchao") is not None:
        assert run(clip, tmp_path, "--model", wan_1_3b_configs, "--device", "cpu", "--size", "832",
                   "--vram-estimate", "--int8") == 0
        int8 = capsys.readouterr().out
        assert "text_encoder        7.21 GiB" in int8 and "transformer         1.33 GiB" in int8
    # on a CPU without the flag: nothing is printed, the model loads
    def stub(config):
        raise ModelLoadError("stub")

    monkeypatch.setattr(loading, "load_components", stub)
    assert run(clip, tmp_path, "--model", wan_1_3b_configs, "--device", "cpu", "--size", "832") == 2
    assert "GPU memory estimate" not in capsys.readouterr().err


def test_estimate_items_follow_the_configs(wan_1_3b_configs):
    """The folder's configs give the 1.3B's items: the transformer's and UMT5-XXL's weights
    as `estimate_vram` counts them for those configs, the VAE as diffusers builds it."""
    from diffstream.attention.block_causal import BlockCausalConfig
    from diffstream.models.wan_checkpoints import WAN21_VAE_PARAMS, estimate_vram
    from diffstream.models.wan_memory import stream_estimate, wan_parts

    parts = wan_parts(ModelConfig(model=wan_1_3b_configs))
    assert parts.vae == WAN21_VAE_PARAMS and parts.text_len == 512
    bc = CausalVideoConfig().block_causal
    ours = stream_estimate(parts, 832, 480, bc, dtype_bytes=2, text_encoder_offload=False)
    ref = estimate_vram(WAN21_T2V_1_3B, 480, 832, steps=1, rows=1, chunk_frames=bc.chunk_frames,
                        sink_chunks=bc.sink_chunks, window_chunks=bc.window_chunks, vae_dtype_bytes=4)
    assert {k: v for k, v in ours.items() if k != "settings"} == {k: v for k, v in ref.items() if k != "settings"}
    assert isinstance(bc, BlockCausalConfig)


def test_cli_misuse_is_one_line_exit_2(clip, tmp_path, capsys, monkeypatch):
    import diffstream.models.loading as loading

    monkeypatch.setattr(loading, "load_components", lambda config: pytest.fail("model loaded"))
    for args, needle in ((["--model", "tiny-wan", "--transformer", str(tmp_path / "no.pt")], "no such file"),
                         (["--model", "tiny", "--transformer", str(tmp_path)], "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"),
                         (["--model", "tiny", "--text-encoder-offload"], "for Wan video models")):
        assert run(clip, tmp_path, *args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
