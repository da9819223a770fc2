"""Wan 2.1 checkpoints in their original formats, and the VRAM estimate (issue #18).

Loading. The original-format state dicts are written here from the *documented original
names* (Wan 2.1's `WanModel`, whose tree CausVid's / Self-Forcing's / StreamDiffusionV2's
`CausalWanModel` keeps: `self_attn.q`, `norm3` for the cross-attention norm,
`ffn.0`, `modulation`, `head.head`, ...; notes field-2026-12.md Sec. 5), by an inverse map
independent of diffusers' converter: every diffusers key of the 1.3B model (built from
its config on the meta device: no weights) is renamed to its original name, put under
each format's prefix or nesting, and must come back through `convert_to_diffusers` as the
*same tensor object* under the right name: nothing missing, nothing extra, nothing
swapped (q and k have the same shape; identity tells them apart). Then the tiny Wan
transformer with real random weights is saved in each format (.safetensors and .pt),
loaded by `load_wan_transformer` with no config, and must give the original's outputs
exactly.

Memory. The estimate's exact items are checked against what they count: the KV-cache
item against `BlockCausalState.nbytes()` after a stream has wrapped its ring, the weight
items against the parameters' bytes (fp32, bf16 with diffusers' fp32 modules, the 1.3B
on the meta device), the text-encoder and VAE counts against transformers' /
diffusers' models.
"""

import math

import pytest
import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel

from diffstream.attention.base import BatchLayout
from diffstream.attention.block_causal import BlockCausal, BlockCausalConfig
from diffstream.errors import ConfigError, ModelLoadError
from diffstream.models.wan import TINY_WAN_TEXT_DIM, WAN_LATENT_CHANNELS, tiny_wan_transformer
from diffstream.models.wan_checkpoints import (
    WAN21_T2V_1_3B,
    WAN21_VAE_PARAMS,
    check_fits,
    convert_to_diffusers,
    detect_format,
    estimate_vram,
    infer_config,
    keeps_fp32,
    load_wan_transformer,
    transformer_parameters,
    umt5_encoder_parameters,
    unwrap_checkpoint,
    wan_transformer_from_state_dict,
)

# diffusers name -> Wan 2.1's original name, outside the blocks ...
TOP = {
    "patch_embedding": "patch_embedding",
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",  # Sequential(Linear, SiLU, Linear)
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",  # Sequential(SiLU, Linear)
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",  # Sequential(Linear, GELU, Linear)
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "proj_out": "head.head",
    "scale_shift_table": "head.modulation",
}
# ... and inside block N (`blocks.N.` on both sides).
BLOCK = {
    **{f"attn{i}.{ours}": f"{attn}.{theirs}" for i, attn in ((1, "self_attn"), (2, "cross_attn"))
       for ours, theirs in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "o"),
                            ("norm_q", "norm_q"), ("norm_k", "norm_k"))},
    "norm2": "norm3",  # the cross-attention LayerNorm is Wan's norm3 (its norm2 has no weights)
    "ffn.net.0.proj": "ffn.0",  # Sequential(Linear, GELU(tanh), Linear)
    "ffn.net.2": "ffn.2",
    "scale_shift_table": "modulation",
}
# Where each format keeps Wan's keys (Self-Forcing's WanDiffusionWrapper holds the model as
# `self.model`; FSDP inserts its wrapper; ComfyUI re-saves under model.diffusion_model.).
PREFIXES = {"wan": "", "self-forcing": "model.", "self-forcing-fsdp": "model._fsdp_wrapped_module.",
            "comfyui": "model.diffusion_model."}


def to_original(key: str) -> str:
    """The original Wan name of a diffusers `WanTransformer3DModel` key."""
    if key.startswith("blocks."):
        _, n, rest = key.split(".", 2)
        table, head = BLOCK, f"blocks.{n}."
    else:
        rest, table, head = key, TOP, ""
    module, _, param = rest.rpartition(".") if rest.endswith((".weight", ".bias")) else (rest, "", "")
    return head + table[module] + (f".{param}" if param else "")


def in_format(state: dict, fmt: str) -> dict:
    """`state` (diffusers names) as format `fmt` saves it (flat)."""
    if fmt == "diffusers":
        return dict(state)
    return {PREFIXES[fmt] + to_original(k): v for k, v in state.items()}


@pytest.fixture(scope="module")
def meta_1_3b() -> dict:
    """Wan2.1-T2V-1.3B's state dict on the meta device (shapes only)."""
    with torch.device("meta"):
        model = WanTransformer3DModel(**WAN21_T2V_1_3B)
    return dict(model.state_dict())


@pytest.fixture(scope="module")
def tiny():
    return tiny_wan_transformer(seed=0)


# ---------------------------------------------------------------------------------------
# Loading: the 1.3B's names and shapes


@pytest.mark.parametrize("fmt", ["wan", "self-forcing", "self-forcing-fsdp", "comfyui", "diffusers"])
def test_1_3b_every_tensor_lands_once(meta_1_3b, fmt):
    """Each original format of the 1.3B converts to exactly the model's keys, each tensor
    under its own name (identity), and the config read off the shapes is the 1.3B's."""
    original = in_format(meta_1_3b, fmt)
    assert len(original) == len(meta_1_3b) == 825  # the inverse map is one-to-one
    assert detect_format(original.keys()) == ("self-forcing" if fmt == "self-forcing-fsdp" else fmt)
    converted = convert_to_diffusers(original)
    assert len(converted) == len(original) and converted.keys() == meta_1_3b.keys()
    assert all(converted[k] is t for k, t in meta_1_3b.items())
    assert infer_config(converted) == WAN21_T2V_1_3B


@pytest.mark.parametrize("ema", [None, True, False])
def test_nested_training_checkpoint(meta_1_3b, ema):
    """{"generator", "generator_ema", "critic", ...}: the EMA generator by default and with
    ema=True, the plain one with ema=False; keys under model. either way."""
    ema_sd = in_format(meta_1_3b, "self-forcing")
    plain = {k: v.new_empty(v.shape) for k, v in ema_sd.items()}
    checkpoint = {"generator": plain, "generator_ema": ema_sd, "critic": {"x.weight": torch.zeros(1)}, "step": 3}
    state, where = unwrap_checkpoint(checkpoint, ema)
    expected, expected_where = (plain, "generator") if ema is False else (ema_sd, "generator_ema")
    assert where == expected_where and state.keys() == expected.keys()
    assert all(state[k] is t for k, t in expected.items())
    assert detect_format(state) == "self-forcing"


def test_1_3b_loads_on_meta_with_diffusers_dtypes(meta_1_3b):
    """The loader fills the 1.3B (meta tensors in, meta model out) in bf16 with diffusers'
    fp32 modules; its bytes are the estimate's transformer item exactly."""
    model = wan_transformer_from_state_dict(in_format(meta_1_3b, "self-forcing"), dtype=torch.bfloat16)
    params = dict(model.named_parameters())
    assert all(p.is_meta for p in params.values()) and not any(b.is_meta for b in model.buffers())
    assert {n for n, p in params.items() if p.dtype == torch.float32} == {n for n in params if keeps_fp32(n)}
    counted = transformer_parameters(WAN21_T2V_1_3B)
    assert counted["total"] == sum(p.numel() for p in params.values())  # 1,418,996,800
    weights = sum(p.numel() * p.element_size() for p in params.values())
    assert weights == estimate_vram(WAN21_T2V_1_3B, 480, 832, dtype_bytes=2)["transformer"]


# ---------------------------------------------------------------------------------------
# Loading: the tiny model, real weights, through files


def forward(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, WAN_LATENT_CHANNELS, 2, 4, 4, generator=g)
    text = torch.randn(1, 5, TINY_WAN_TEXT_DIM, generator=g)
    with torch.no_grad():
        return model(x, torch.tensor([500]), encoder_hidden_states=text, return_dict=False)[0]


def save(obj: dict, path):
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(obj, str(path))
    else:
        torch.save(obj, path)


@pytest.mark.parametrize("fmt,suffix", [("wan", ".safetensors"), ("wan", ".pth"), ("self-forcing", ".safetensors"),
                                        ("self-forcing", ".pt"), ("comfyui", ".safetensors"),
                                        ("diffusers", ".safetensors")])
def test_tiny_round_trip_is_exact(tiny, tmp_path, fmt, suffix):
    """The tiny model saved in each format loads (config inferred) to the same outputs, bit for bit."""
    path = tmp_path / f"ckpt{suffix}"
    save(in_format(tiny.state_dict(), fmt), path)
    loaded = load_wan_transformer(path)
    assert all(torch.equal(p, tiny.state_dict()[n]) for n, p in loaded.state_dict().items())
    assert torch.equal(forward(loaded), forward(tiny))


def test_tiny_training_checkpoint_and_folders(tiny, tmp_path):
    """A Self-Forcing-style .pt (EMA taken; ema=False the plain generator), StreamDiffusionV2's
    checkpoint folder (model.pt), a diffusers model folder and a pipeline folder."""
    other = tiny_wan_transformer(seed=1)
    sdv2 = tmp_path / "sdv2"
    sdv2.mkdir()
    save({"generator": in_format(other.state_dict(), "self-forcing"),
          "generator_ema": in_format(tiny.state_dict(), "self-forcing"), "step": 600}, sdv2 / "model.pt")
    reference, reference_other = forward(tiny), forward(other)
    assert torch.equal(forward(load_wan_transformer(sdv2)), reference)
    assert torch.equal(forward(load_wan_transformer(sdv2 / "model.pt", ema=False)), reference_other)
    tiny.save_pretrained(tmp_path / "folder")
    tiny.save_pretrained(tmp_path / "pipeline" / "transformer")
    for folder in ("folder", "pipeline"):
        assert torch.equal(forward(load_wan_transformer(tmp_path / folder)), reference)


def test_dtypes_match_diffusers_from_pretrained(tiny, tmp_path):
    """In bf16 the loader keeps the same parameters in fp32 as diffusers' from_pretrained,
    with the same values."""
    tiny.save_pretrained(tmp_path)
    theirs = WanTransformer3DModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16).state_dict()
    save(in_format(tiny.state_dict(), "wan"), tmp_path / "wan.safetensors")
    ours = load_wan_transformer(tmp_path / "wan.safetensors", dtype=torch.bfloat16).state_dict()
    assert ours.keys() == theirs.keys()
    assert all(ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]) for k in ours)
    assert {k for k, t in ours.items() if t.dtype == torch.float32}  # some are kept in fp32


# ---------------------------------------------------------------------------------------
# Errors: one line each


def one_line_error(call, *args, **kwargs) -> str:
    with pytest.raises(ModelLoadError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_unknown_keys_one_line(tmp_path):
    message = one_line_error(detect_format, ["conv_in.weight", "down_blocks.0.resnets.0.conv1.weight"])
    assert "not a Wan 2.1 transformer checkpoint" in message and "conv_in.weight" in message
    save({"first_stage_model.encoder.conv_in.weight": torch.zeros(2)}, tmp_path / "sd.safetensors")
    assert "first_stage_model.encoder" in one_line_error(load_wan_transformer, tmp_path / "sd.safetensors")
    assert "VACE" in one_line_error(detect_format, ["vace_blocks.0.after_proj.bias", "patch_embedding.weight"])
    assert "image-to-video" in one_line_error(detect_format, ["blocks.0.cross_attn.k_img.weight"])


def test_missing_unexpected_and_misshapen_tensors_one_line(tiny, tmp_path):
    state = in_format(tiny.state_dict(), "self-forcing")
    missing = {k: v for k, v in state.items() if k != "model.blocks.1.self_attn.q.weight"}
    save(missing, tmp_path / "missing.safetensors")
    message = one_line_error(load_wan_transformer, tmp_path / "missing.safetensors")
    assert "1 missing: blocks.1.attn1.to_q.weight" in message
    extra = {**state, "model.extra.weight": torch.zeros(3), "critic.head.weight": torch.zeros(3)}
    message = one_line_error(wan_transformer_from_state_dict, extra)
    assert "2 unexpected" in message and "extra.weight" in message and "critic.head.weight" in message
    wrong = {**state, "model.blocks.1.self_attn.o.weight": torch.zeros(3, 3)}
    assert "blocks.1.attn1.to_out.0.weight (3, 3) vs (48, 48)" in one_line_error(wan_transformer_from_state_dict,
                                                                                 wrong)
    assert "nested checkpoint without" in one_line_error(unwrap_checkpoint, {"optimizer": {"x": 1}, "step": 1})
    torch.save({"generator": state, "config": print}, tmp_path / "code.pt")  # a pickle that would run code
    assert "weights_only" in one_line_error(load_wan_transformer, tmp_path / "code.pt")


# ---------------------------------------------------------------------------------------
# Memory: the estimate's exact items against what they count


def layout(phase: str, rows: int) -> BatchLayout:
    return BatchLayout.branch_major(phase, 0, ("cond",), rows, 1)


@pytest.mark.parametrize("chunk,sinks,window", [(1, 1, 2), (2, 1, 1)])
def test_kv_cache_item_is_the_cache(tiny, chunk, sinks, window):
    """After a stream has wrapped its ring, `BlockCausalState.nbytes()` is the estimate's
    kv_cache item (rows = the stream batch over 2 steps), the cross-attention cache its
    text_kv_cache item, and the weights item is the parameters' bytes."""
    rows, size = 2, 64  # 64 px: 8 x 8 latents, 16 tokens per latent frame
    mech = BlockCausal(BlockCausalConfig(chunk_frames=chunk, sink_chunks=sinks, window_chunks=window))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad(), mech.attach(tiny):
        for _ in range(sinks + window + 3):
            x = torch.randn(rows, WAN_LATENT_CHANNELS, chunk, size // 8, size // 8, generator=g)
            mech.before_unet(layout("record", rows))
            mech.call_unet(tiny, x, torch.full((rows,), 500), torch.randn(rows, 5, TINY_WAN_TEXT_DIM, generator=g),
                           layout("record", rows))
    estimate = estimate_vram(tiny.config, size, size, steps=rows, chunk_frames=chunk, sink_chunks=sinks,
                             window_chunks=window, dtype_bytes=4, text_len=5)
    assert estimate["kv_cache"] == mech.state.nbytes() > 0
    assert estimate["transformer"] == sum(p.numel() * p.element_size() for p in tiny.parameters())
    # the cross-attention cache: every block's text K/V and the memoised text projection
    assert estimate["text_kv_cache"] == mech.cross.nbytes() + mech.cross.text.k.nbytes > 0


def test_weight_counts_of_each_part(tiny):
    """The counts behind the weight items, against the models: the transformer's total,
    fp32 part, Linear weights and rows (int8's inputs) on the tiny model; the UMT5 formula
    on a small UMT5 encoder; Wan 2.1's VAE on the meta device."""
    from transformers import UMT5Config, UMT5EncoderModel

    counted = transformer_parameters(tiny.config)
    params = dict(tiny.named_parameters())
    linears = [(n, m) for n, m in tiny.named_modules() if isinstance(m, torch.nn.Linear) and not keeps_fp32(n)]
    assert counted == {"total": sum(p.numel() for p in params.values()),
                       "fp32": sum(p.numel() for n, p in params.items() if keeps_fp32(n)),
                       "linear_weights": sum(m.weight.numel() for _, m in linears),
                       "linear_rows": sum(m.out_features for _, m in linears)}
    dims = dict(vocab=96, d_model=16, d_ff=40, layers=3, heads=4, d_kv=6, buckets=8)
    with torch.device("meta"):
        t5 = UMT5EncoderModel(UMT5Config(vocab_size=96, d_model=16, d_ff=40, num_layers=3, num_heads=4, d_kv=6,
                                         relative_attention_num_buckets=8, feed_forward_proj="gated-gelu"))
        vae = AutoencoderKLWan()
    # the Linear layers int8 quantizes: not transformers' fp32 `wo`
    t5_linears = [m for n, m in t5.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith(".wo")]
    assert umt5_encoder_parameters(**dims) == {"total": sum(p.numel() for p in t5.parameters()),
                                               "linear_weights": sum(m.weight.numel() for m in t5_linears),
                                               "linear_rows": sum(m.out_features for m in t5_linears)}
    assert WAN21_VAE_PARAMS == sum(p.numel() for p in vae.parameters())


def test_1_3b_estimate_and_refusal():
    """480x832, 2 steps, sink 1 + window 5, bf16: the items the notes estimate (DiT 2.6 GiB,
    UMT5-XXL ~11 GB, KV 1.87 GiB per row), and a one-line refusal on a 12 GiB card naming
    the offload and int8 first; with both it fits 12 GiB."""
    e = estimate_vram(WAN21_T2V_1_3B, 480, 832, steps=2, chunk_frames=1, sink_chunks=1, window_chunks=5)
    assert e["kv_cache"] == 30 * 2 * 2 * 7 * 1560 * 1536 * 2
    assert e["text_encoder"] == 5_680_910_336 * 2
    assert 2.6 < e["transformer"] / 2**30 < 2.7
    with pytest.raises(ConfigError) as info:
        check_fits(e, 12 * 2**30, WAN21_T2V_1_3B)
    message = str(info.value)
    assert "\n" not in message and message.index("--text-encoder-offload") < message.index("--int8")
    light = estimate_vram(WAN21_T2V_1_3B, 480, 832, text_encoder_offload=True, weights_int8=True)
    assert light["total"] < e["total"] - 11 * 2**30
    check_fits(light, 12 * 2**30, WAN21_T2V_1_3B)
    assert math.isclose(light["transformer"] / e["transformer"], 0.5, rel_tol=0.02)
