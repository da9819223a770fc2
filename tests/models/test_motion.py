"""Motion-module checkpoints: every tensor of an original AnimateDiff / Live2Diff file lands."""

import re

import pytest
import torch

from diffstream.errors import ModelLoadError
from diffstream.models.motion import DepthPrior, load_motion_adapter, tiny_motion_adapter


def to_original_layout(diffusers_state):
    """Rename diffusers MotionAdapter keys to the layout of the released checkpoints:
    `<block>.motion_modules.<i>.temporal_transformer.{norm,proj_in,proj_out}` and
    `...transformer_blocks.<j>.{attention_blocks.<a>.{to_q,to_k,to_v,to_out.0,pos_encoder.pe},
    norms.<a>, ff.net.*, ff_norm}`."""
    out = {}
    for key, value in diffusers_state.items():
        new = re.sub(r"(motion_modules\.\d+)\.", r"\1.temporal_transformer.", key)
        new = new.replace(".attn1.", ".attention_blocks.0.").replace(".attn2.", ".attention_blocks.1.")
        new = new.replace(".norm1.", ".norms.0.").replace(".norm2.", ".norms.1.").replace(".norm3.", ".ff_norm.")
        if new.endswith(".pos_embed.pe"):  # one table per attention block in the original
            base = new[: -len(".pos_embed.pe")]
            out[base + ".attention_blocks.0.pos_encoder.pe"] = value.clone()
            out[base + ".attention_blocks.1.pos_encoder.pe"] = value.clone()
            continue
        out[new] = value
    return out


@pytest.mark.parametrize("flavour", ["animatediff", "live2diff"])
def test_every_tensor_of_an_original_checkpoint_lands(tmp_path, flavour):
    source = tiny_motion_adapter(seed=7)  # random tensors, the tiny UNet's widths
    expected = source.state_dict()
    state = to_original_layout(expected)
    assert any(".temporal_transformer.transformer_blocks.0.attention_blocks.1.to_k.weight" in k for k in state)
    depth = None
    if flavour == "live2diff":
        torch.manual_seed(3)
        depth = DepthPrior(out_channels=32)
        for p in depth.parameters():
            torch.nn.init.normal_(p)
        state.update({f"flow_conv_in.{k}": v for k, v in depth.state_dict().items()})
        state["down_blocks.0.motion_modules.0.temporal_transformer.grid"] = torch.zeros(1)
        state = {"state_dict": {f"module.{k}": v for k, v in state.items()}, "global_step": 9000}
    path = tmp_path / "mm.ckpt"
    torch.save(state, path)

    adapter, depth_state, report = load_motion_adapter(str(path), (32, 64))
    loaded = adapter.state_dict()
    assert set(loaded) == set(expected)
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key
    assert len(report.duplicates) == sum(1 for k in expected if k.endswith("pos_embed.pe"))
    if flavour == "live2diff":
        assert report.dropped == ["down_blocks.0.motion_modules.0.temporal_transformer.grid"]
        fresh = DepthPrior(out_channels=32)
        fresh.load_state_dict(depth_state, strict=True)  # every depth tensor has a place
        for key, value in depth.state_dict().items():
            assert torch.equal(fresh.state_dict()[key], value)
    else:
        assert depth_state is None


def test_wrong_layout_is_one_line(tmp_path):
    path = tmp_path / "bad.safetensors"
    from safetensors.torch import save_file

    save_file({"something.else": torch.zeros(2)}, str(path))
    with pytest.raises(ModelLoadError) as info:
        load_motion_adapter(str(path), (32, 64))
    assert "\n" not in str(info.value)


def test_missing_adapter_is_one_line():
    with pytest.raises(ModelLoadError, match="--motion-adapter"):
        load_motion_adapter("/no/such/adapter.ckpt", (32, 64))
