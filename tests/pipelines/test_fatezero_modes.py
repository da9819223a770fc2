"""FateZero's word-swap choice, store dtype and saved-inversion fingerprint (issue #13)."""

import dataclasses

import pytest
import torch

from diffstream.attention.fatezero import FateZeroConfig
from diffstream.config import ModelConfig
from diffstream.errors import ConfigError
from diffstream.pipelines.fatezero import FateZeroEditConfig, FateZeroEditor, build_token_fusion, edit_frames
from diffstream.testing import make_frames

SWAN = "a black swan swimming in a river"


def config(prompt, **kw):
    fz = FateZeroConfig(steps=kw.pop("steps", 4), cross_replace=0.5, self_replace=0.75)
    return FateZeroEditConfig(source_prompt=SWAN, prompt=prompt, fatezero=fz, **kw)


def test_word_swap_is_chosen_for_equal_token_counts_and_refused_otherwise(tiny):
    # "a black duck ...": 9 tokens as the source: word swap, every position reads its own
    assert build_token_fusion(tiny.tokenizer, config("a black duck swimming in a river")).mapper == tuple(range(77))
    # forced refinement of the same pair: "duck" (position 3) keeps its own map
    refine = build_token_fusion(tiny.tokenizer, config("a black duck swimming in a river", p2p="refine")).mapper
    assert refine == (0, 1, 2, -1) + tuple(range(4, 77))
    # 10 tokens vs 9: auto refines; replace is refused on one line naming the option
    longer = "a black swan swimming in a wide river"
    assert build_token_fusion(tiny.tokenizer, config(longer)).mapper[:9] == (0, 1, 2, 3, 4, 5, 6, -1, 7)
    with pytest.raises(ConfigError, match="--p2p replace") as err:
        build_token_fusion(tiny.tokenizer, config(longer, p2p="replace"))
    assert "\n" not in str(err.value) and "10" in str(err.value) and "9" in str(err.value)
    with pytest.raises(ConfigError, match="--p2p"):
        config(longer, p2p="swap")


class Inputs:
    """Records every attention module's input of the UNet (forward pre-hooks)."""

    def __init__(self, unet):
        self.seen = []
        self.handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in unet.named_modules()
                        if n.endswith(".attn1") or n.endswith(".attn2")]

    def _hook(self, name):
        def hook(module, args):
            self.seen.append((name + ".processor", args[0].clone()))
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("dtype, expected", [("model", torch.float32), ("fp16", torch.float16), ("fp32", torch.float32)])
def test_the_store_keeps_the_layer_inputs_in_its_dtype_and_recompute_agrees(tiny, dtype, expected):
    """"model" (the default) stores an fp32 model's inputs bit for bit; fp16 rounds them.
    Either way recomputation (which stores nothing) gives the very same edit."""
    assert FateZeroEditConfig(source_prompt=SWAN, prompt="x").store_dtype == "model"
    cfg = config("watercolor painting of a black swan swimming in a river", guidance=3.0, store_dtype=dtype)
    ed = FateZeroEditor(tiny, cfg, (4, 6))
    z0 = torch.randn(3, 4, 4, 6, generator=torch.Generator().manual_seed(1))
    store = ed.new_store()
    rec = Inputs(tiny.unet)
    try:
        with torch.no_grad():
            ed.invert(z0, [1, 1, 1], store)
    finally:
        rec.close()
    timesteps = [int(t) for t in ed.schedule.timesteps]
    layers_per_call = len(rec.seen) // 4
    checked = 0
    for key in store.keys():
        if key[0] not in ("self", "cross"):
            continue
        _, name, step = key
        call = 3 - step  # inversion runs the steps cleanest first
        inputs = dict(rec.seen[call * layers_per_call : (call + 1) * layers_per_call])
        value = store.get(key)
        assert value.dtype == expected and torch.equal(value, inputs[name].to(expected))
        checked += 1
    assert checked > 0 and timesteps[0] > timesteps[-1]
    with torch.no_grad():
        stored = ed.edit(store, [1, 1, 1])
        recomputed = FateZeroEditor(tiny, cfg.replace(fusion_source="recompute"), (4, 6))
        rstore = recomputed.new_store()
        recomputed.invert(z0, [1, 1, 1], rstore)
        assert torch.equal(stored, recomputed.edit(rstore, [1, 1, 1]))


def test_fp16_store_moves_an_fp32_edit_and_model_dtype_does_not(tiny):
    cfg = config("watercolor painting of a black swan swimming in a river", guidance=3.0)
    z0 = torch.randn(2, 4, 4, 6, generator=torch.Generator().manual_seed(2))
    out = {}
    for dtype in ("model", "fp16", "fp32"):
        ed = FateZeroEditor(tiny, cfg.replace(store_dtype=dtype), (4, 6))
        store = ed.new_store()
        with torch.no_grad():
            ed.invert(z0, [0, 0], store)
            out[dtype] = ed.edit(store, [0, 0])
    assert torch.equal(out["model"], out["fp32"])
    assert not torch.equal(out["model"], out["fp16"])
    assert (out["model"] - out["fp16"]).abs().max() < 1e-2  # rounding, not a different edit


def test_a_saved_inversion_refuses_another_model_fingerprint(tiny, tmp_path):
    frames = make_frames(2, 32, 32, seed=1)
    cfg = config("a black duck swimming in a river", steps=2)
    made_with = ModelConfig(model="tiny", device="cpu", loras=(("style.safetensors", 0.8),))
    list(edit_frames(tiny, frames, cfg, save_inversion=tmp_path / "inv", model_config=made_with))
    assert len(list(edit_frames(tiny, frames, cfg, load_inversion=tmp_path / "inv", model_config=made_with))) == 2
    for other, named in ((dataclasses.replace(made_with, loras=(("style.safetensors", 0.5),)), "loras"),
                         (dataclasses.replace(made_with, loras=()), "loras"),
                         (dataclasses.replace(made_with, lcm_lora="lcm.safetensors"), "lcm_lora"),
                         (dataclasses.replace(made_with, model="other-checkpoint"), "checkpoint")):
        with pytest.raises(ConfigError, match=named) as err:
            list(edit_frames(tiny, frames, cfg, load_inversion=tmp_path / "inv", model_config=other))
        assert "\n" not in str(err.value) and "re-invert" in str(err.value)
    with pytest.raises(ConfigError, match="store_dtype"):
        list(edit_frames(tiny, frames, cfg.replace(store_dtype="fp16"), load_inversion=tmp_path / "inv",
                         model_config=made_with))
    with pytest.raises(ConfigError, match="--size"):
        list(edit_frames(tiny, make_frames(2, 32, 40, seed=1), cfg, load_inversion=tmp_path / "inv",
                         model_config=made_with))
