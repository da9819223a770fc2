"""Model building and loading: tokenizer, tiny model, errors, LoRA fusing."""

import pytest
import torch

from diffstream.config import ModelConfig
from diffstream.errors import ModelLoadError
from diffstream.models.loading import fuse_loras, load_components


def test_clip_tokenizer_is_the_real_vocabulary():
    from diffstream.models.tokenizer import clip_tokenizer

    tok = clip_tokenizer()
    assert len(tok) == 49408
    ids = tok("a photo of a cat").input_ids
    # <|startoftext|> a photo of a cat <|endoftext|>, as in every SD 1.x tokenizer
    assert ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_tiny_model_is_deterministic_and_sd_shaped(tiny):
    from diffstream.models.tiny import tiny_unet

    again = tiny_unet()
    for (name, p), q in zip(tiny.unet.state_dict().items(), again.state_dict().values()):
        assert torch.equal(p, q), name
    assert tiny.vae_scale_factor == 8 and tiny.latent_channels == 4 and tiny.size_multiple == 16
    emb = tiny.encode_prompt(["a cat", ""])
    assert emb.shape == (2, 77, 32)


def test_tiny_instruct_has_eight_input_channels():
    comp = load_components(ModelConfig(model="tiny", instruct=True))
    assert comp.unet_in_channels == 8


@pytest.mark.parametrize("spec", ["/no/such/folder", "missing.safetensors", "not a hub id at all"])
def test_missing_checkpoint_is_one_line(spec):
    with pytest.raises(ModelLoadError) as info:
        load_components(ModelConfig(model=spec))
    msg = str(info.value)
    assert "\n" not in msg and "--model" in msg


def test_folder_that_is_not_a_model(tmp_path):
    with pytest.raises(ModelLoadError, match="not a diffusers"):
        load_components(ModelConfig(model=str(tmp_path)))


def test_saved_tiny_model_loads_from_folder(tmp_path, tiny):
    """The real from_pretrained path, on a diffusers folder written from the tiny model."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=tiny.vae, text_encoder=tiny.text_encoder, tokenizer=tiny.tokenizer,
                                   unet=tiny.unet, scheduler=tiny.scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(tmp_path / "sd")
    loaded = load_components(ModelConfig(model=str(tmp_path / "sd"), device="cpu"))
    for (name, p), q in zip(tiny.unet.state_dict().items(), loaded.unet.state_dict().values()):
        assert torch.equal(p, q), name
    assert loaded.tokenizer("a cat").input_ids == tiny.tokenizer("a cat").input_ids


def test_lora_file_is_fused_into_the_unet(tmp_path):
    """A LoRA saved in diffusers' format, fused, gives the adapted model's output."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from diffstream.models.tiny import tiny_components

    adapted = tiny_components()
    torch.manual_seed(123)
    adapted["unet"].add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                           target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(adapted["unet"]),
                                              weight_name="style.safetensors")
    g = torch.Generator().manual_seed(0)
    x, emb = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        expected = adapted["unet"](x, 50, encoder_hidden_states=emb).sample

    fresh = tiny_components()
    with torch.no_grad():
        plain = fresh["unet"](x, 50, encoder_hidden_states=emb).sample
    fuse_loras(fresh, [(str(tmp_path / "style.safetensors"), 1.0)])
    with torch.no_grad():
        fused = fresh["unet"](x, 50, encoder_hidden_states=emb).sample
    assert not torch.allclose(plain, expected, atol=1e-3)
    assert torch.allclose(fused, expected, atol=1e-5)
    assert not any("lora" in n for n, _ in fresh["unet"].named_parameters())  # no adapter left


def test_missing_lora_is_one_line():
    from diffstream.models.tiny import tiny_components

    with pytest.raises(ModelLoadError) as info:
        fuse_loras(tiny_components(), [("/no/such/lora.safetensors", 1.0)])
    assert "\n" not in str(info.value)


def test_truncation_note_names_where_clip_cuts_the_prompt(tiny, capfd):
    from diffstream.models.tokenizer import clip_tokenizer, truncation_note

    tok = clip_tokenizer.__wrapped__()  # a fresh instance: transformers logs its length warning once per instance
    assert truncation_note(tok, "a watercolor painting of a cat") is None
    assert truncation_note(tok, " ".join(["cat"] * 75)) is None  # 75 + start + end = 77: nothing cut
    words = ["Cat"] * 73 + ["Watercolor", "Painting", "of", "Van", "Gogh"]  # one token each: 78 of text
    note = truncation_note(tok, " ".join(words))
    assert note == ("prompt is longer than CLIP's 77 tokens (it has 80): cut after "
                    "'... Cat Cat Cat Cat Watercolor Painting'; ignored: 'of Van Gogh'")
    # the words it says were kept are exactly what the text encoder sees
    kept = " ".join(words[:75])
    enc = dict(padding="max_length", max_length=77, truncation=True)
    assert tok(" ".join(words), **enc).input_ids == tok(kept, **enc).input_ids
    assert torch.equal(tiny.encode_prompt([" ".join(words)]), tiny.encode_prompt([kept]))
    # a cut inside a word (5 tokens, 2 of them kept) says so
    inside = truncation_note(tok, " ".join(["cat"] * 73 + ["supercalifragilistic", "dog"]))
    assert inside.endswith("cut after '... cat cat cat cat cat cat' (inside 'supercalifragilistic'); "
                           "ignored: 'supercalifragilistic dog'")
    assert "\n" not in note and "sequence length" not in capfd.readouterr().err


def test_truncation_warner_warns_once_per_distinct_prompt():
    from diffstream.models.tokenizer import TruncationWarner, clip_tokenizer

    notes = []
    check = TruncationWarner(clip_tokenizer(), notes.append)
    long_a, long_b = " ".join(["cat"] * 80), " ".join(["dog"] * 80)
    for prompt in ("a cat", long_a, None, "", long_a, long_b, long_a, "a cat"):
        check(prompt)
    assert len(notes) == 2 and "'cat cat cat cat cat'" in notes[0] and "'... dog" in notes[1]


def test_tiny_model_attends_only_below_full_latent_resolution(tiny):
    """Self-attention over every latent cell made `--model tiny` take seconds per frame
    at 512 px: the UNet attends at half resolution only (like SD 1.5's costly 64x64 blocks
    having none in up_blocks.0), the VAE not at all; fusion blocks still have attention."""
    from diffusers.models.attention_processor import Attention

    from diffstream.attention.base import block_of, is_self_attention

    queries = {}

    def record(name):
        def hook(module, args, kwargs):
            queries[name] = (args[0] if args else kwargs["hidden_states"]).shape[1]
        return hook

    hooks = [m.register_forward_pre_hook(record(f"{part}.{n}"), with_kwargs=True)
             for part, model in (("unet", tiny.unet), ("vae", tiny.vae))
             for n, m in model.named_modules() if isinstance(m, Attention)]
    try:
        with torch.no_grad():
            tiny.unet(torch.zeros(1, 4, 16, 16), 10, encoder_hidden_states=torch.zeros(1, 77, 32))
            tiny.decode_latents(tiny.encode_image(torch.zeros(1, 3, 128, 128)))
    finally:
        for h in hooks:
            h.remove()
    assert queries and all(n.startswith("unet.") for n in queries)  # the VAE has no attention
    assert max(queries.values()) == 8 * 8  # a 16x16 latent: attention on the 8x8 grid only
    self_blocks = {block_of(n) for n in tiny.unet.attn_processors if is_self_attention(n)}
    assert self_blocks == {"down_blocks.1", "mid_block", "up_blocks.0"}
