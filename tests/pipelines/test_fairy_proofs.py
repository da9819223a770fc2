"""A whole Fairy edit followed step by step, against a hand-built expectation.

The edit (instruction mode, guidance 3.0 > 1 and image guidance 1.7 > 1, so all three
InstructPix2Pix branches run and the two scales differ, Euler ancestral and once DDIM, 3
steps, K = 3 anchors, chunks of 2, an odd and an even frame count) is recorded at every UNet call:
which frames its rows are (found from the image-conditioning channels), its timestep, its
text rows, the image rows, which step the anchor cache is told, and, in every
self-attention layer, which keys/values each row attends over. That trace is checked
against the expectation written out by hand (anchors at the centres of K equal parts,
chunks of the ordinary frames in order, diffusers' timesteps), and the output
frames against a reference edit built only from stock parts: diffusers' attention
processor over hand-assembled token sets (Fairy Fig. 4), InstructPix2Pix eq. 3 written as
the paper writes it, and diffusers' EulerAncestralDiscreteScheduler (or DDIMScheduler)
drawing each frame's noise from its own (seed, frame) generator. Attention is sharpened (self-attention
query weights x 4) so that what each token attends to shows in the output.
"""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler
from diffusers.models.attention_processor import AttnProcessor2_0

from diffstream import frames as F
from diffstream.attention.anchor import AnchorAttnProcessor
from diffstream.attention.base import install_processors, is_self_attention
from diffstream.config import ModelConfig
from diffstream.models.loading import load_components
from diffstream.pipelines.fairy import FairyConfig, FairyPipeline, frame_generator
from diffstream.testing import make_frames

INSTR = "Turn into a marble Roman sculpture"
NEG = "blurry"
STEPS, K, CHUNK, SEED = 3, 3, 2, 5
G_TEXT, G_IMAGE = 3.0, 1.7
# Written out by hand: anchor i at the centre of the i-th of K equal parts, floor((2i+1) N / 2K),
# and the ordinary frames in chunks of 2 in clip order (the last chunk may be short).
EXPECTED = {
    7: dict(anchors=(1, 3, 5), chunks=((0, 2), (4, 6))),
    8: dict(anchors=(1, 4, 6), chunks=((0, 2), (3, 5), (7,))),
}


@pytest.fixture(scope="module")
def sharp():
    """The tiny InstructPix2Pix-style model with self-attention queries scaled by 4 (sharper attention)."""
    comp = load_components(ModelConfig(model="tiny", device="cpu", instruct=True))
    with torch.no_grad():
        for name, module in comp.unet.named_modules():
            if name.endswith("attn1"):
                module.to_q.weight.mul_(4.0)
    return comp


def unscaled_latents(comp, pixels):
    """The source frames' unscaled VAE latents (InstructPix2Pix's image conditioning)."""
    with torch.no_grad():
        enc = comp.vae.encode(pixels)
        return enc.latents if comp.is_tiny_vae else enc.latent_dist.mode()


class Spy(AnchorAttnProcessor):
    """The pipeline's own anchor processor, logging what each call attends over."""

    def __init__(self, name, state, log):
        super().__init__(name, state)
        self.log = log

    def keys_values(self, attn, inputs):
        keys, values = super().keys_values(attn, inputs)
        self.log.append(dict(layer=self.name, mode=self.state.mode, step=self.state.step,
                             own=inputs.key, keys=keys, own_v=inputs.value, values=values))
        return keys, values


class Reference:
    """Stock attention over hand-assembled tokens: anchors over all anchors of their branch
    (Fig. 4a), ordinary frames over [own, anchors of this step and branch] (Fig. 4b)."""

    def __init__(self, name, ctl):
        self.name, self.ctl, self.stock = name, ctl, AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        rows, length, channels = hidden_states.shape  # (3*F, HW, C), branch-major
        frames = rows // 3
        by_branch = hidden_states.reshape(3, frames * length, channels)  # (3, F*HW, C)
        if self.ctl["mode"] == "record":
            self.ctl["anchors"][(self.name, self.ctl["step"])] = by_branch
            context = by_branch.repeat_interleave(frames, dim=0)  # (3*F, F*HW, C)
        else:
            anchors = self.ctl["anchors"][(self.name, self.ctl["step"])]  # (3, K*HW, C)
            context = torch.cat([hidden_states, anchors.repeat_interleave(frames, dim=0)], dim=1)
        return self.stock(attn, hidden_states, encoder_hidden_states=context)


def scheduler(comp, sampler):
    """diffusers' own scheduler for `sampler`, set to STEPS steps (the oracle)."""
    if sampler == "euler-a":
        sched = EulerAncestralDiscreteScheduler.from_config(comp.scheduler.config, steps_offset=1)
    else:
        sched = DDIMScheduler.from_config(comp.scheduler.config, clip_sample=False, steps_offset=1)
    sched.set_timesteps(STEPS)
    return sched


def reference_edit(comp, frames, num_frames, sampler):
    """The edit built by hand from stock diffusers parts; returns {frame index: (h, w, 3) uint8}."""
    exp = EXPECTED[num_frames]
    emb = comp.encode_prompt([INSTR, NEG])  # (2, 77, D)
    ctl = {"anchors": {}, "mode": "record", "step": 0}
    out = {}

    def make(name, proc):
        return Reference(name, ctl) if is_self_attention(name) else AttnProcessor2_0()

    with torch.no_grad(), install_processors(comp.unet, make):
        for mode, idx in [("record", exp["anchors"])] + [("attend", c) for c in exp["chunks"]]:
            n = len(idx)
            ctl["mode"] = mode
            sched = scheduler(comp, sampler)
            gens = [frame_generator(SEED, i) for i in idx]  # one generator per frame, as a list
            pixels = F.frames_to_tensor([F.resize(frames[i], (64, 48)) for i in idx])
            z0 = unscaled_latents(comp, pixels)  # (n, 4, 6, 8)
            x = torch.cat([torch.randn((1, *z0.shape[1:]), generator=g) for g in gens]) * sched.init_noise_sigma
            text = torch.cat([emb[0:1].expand(n, -1, -1), emb[1:2].expand(2 * n, -1, -1)])
            for k, t in enumerate(sched.timesteps):
                ctl["step"] = k
                x_in = sched.scale_model_input(torch.cat([x] * 3), t)
                x_in = torch.cat([x_in, torch.cat([z0, z0, torch.zeros_like(z0)])], dim=1)
                e_ti, e_i, e_0 = comp.unet(x_in, t, encoder_hidden_states=text).sample.chunk(3)
                # InstructPix2Pix eq. 3: e(z,0,0) + s_I (e(z,I,0) - e(z,0,0)) + s_T (e(z,I,T) - e(z,I,0))
                eps = e_0 + G_IMAGE * (e_i - e_0) + G_TEXT * (e_ti - e_i)
                x = sched.step(eps, t, x, generator=gens).prev_sample
            out.update(zip(idx, F.tensor_to_frames(comp.decode_latents(x))))
    return out, emb


def traced_edit(comp, frames, sampler):
    """Our edit with every UNet call and every anchor-attention call logged."""
    config = FairyConfig(instruction=INSTR, negative_prompt=NEG, anchors=K, chunk_size=CHUNK, steps=STEPS,
                         guidance=G_TEXT, image_guidance=G_IMAGE, seed=SEED, size=64, sampler=sampler,
                         noise="per-frame")
    calls, attn = [], []
    with FairyPipeline(comp, config) as pipe:
        assert pipe.config.sampler == sampler and pipe.num_branches == 3

        def pre_hook(module, args, kwargs):
            sample = args[0] if args else kwargs["sample"]
            t = args[1] if len(args) > 1 else kwargs["timestep"]
            calls.append(dict(sample=sample.clone(), t=torch.as_tensor(t).clone(),
                              text=kwargs["encoder_hidden_states"].clone(), attn_from=len(attn)))

        handle = comp.unet.register_forward_pre_hook(pre_hook, with_kwargs=True)
        try:
            spies = lambda name, p: Spy(name, p.state, attn) if isinstance(p, AnchorAttnProcessor) else None  # noqa: E731
            with install_processors(comp.unet, spies):
                out = list(pipe.edit(frames))
        finally:
            handle.remove()
    for i, c in enumerate(calls):
        c["attn"] = attn[c["attn_from"]: calls[i + 1]["attn_from"] if i + 1 < len(calls) else len(attn)]
    return out, calls


@pytest.mark.parametrize("num_frames, sampler", [(7, "euler-a"), (8, "euler-a"), (8, "ddim")],
                         ids=["7-euler-a", "8-euler-a", "8-ddim"])
def test_a_whole_edit_step_by_step(sharp, num_frames, sampler):
    comp, exp = sharp, EXPECTED[num_frames]
    frames = make_frames(num_frames, seed=num_frames)
    ours, calls = traced_edit(comp, frames, sampler)
    ref, emb = reference_edit(comp, frames, num_frames, sampler)
    oracle = scheduler(comp, sampler)
    pixels = F.frames_to_tensor([F.resize(f, (64, 48)) for f in frames])
    z0 = unscaled_latents(comp, pixels)  # (N, 4, 6, 8): each frame's image conditioning

    def frames_of(image_rows):
        """Which clip frames these rows' image channels are: each row is one frame's latent up
        to the last bits (the VAE encoded it in a batch of another size, and CPU kernels
        may round differently by batch shape) and far from every other frame's."""
        found = []
        for row in image_rows:
            dist = torch.stack([(row - z0[j]).abs().max() for j in range(num_frames)])  # (N,)
            j = int(dist.argmin())
            # measured here: at most 1.4e-6 from its frame, at least 0.33 from any other
            assert dist[j] < 1e-4 and torch.cat([dist[:j], dist[j + 1:]]).min() > 1e-2, dist
            found.append(j)
        return tuple(found)

    # 1. The calls: the anchors at every step, then each chunk at every step, in order.
    batches = [("record", exp["anchors"])] + [("attend", c) for c in exp["chunks"]]
    expected_calls = [(mode, idx, k) for mode, idx in batches for k in range(STEPS)]
    assert len(calls) == len(expected_calls)
    anchor_tokens = {}  # (layer, step) -> (3, K*HW, d*heads) of the anchor rows' own keys, per branch
    for call, (mode, idx, k) in zip(calls, expected_calls):
        n = len(idx)
        sample, text = call["sample"], call["text"]
        assert sample.shape[0] == 3 * n  # three branches, branch-major
        # which frames, and InstructPix2Pix's image rows: (image, image, zeros)
        assert frames_of(sample[:n, 4:]) == idx and frames_of(sample[n:2 * n, 4:]) == idx
        assert torch.count_nonzero(sample[2 * n:, 4:]) == 0
        # the same latent in every branch; the timestep of step k
        assert torch.equal(sample[:n, :4], sample[n:2 * n, :4]) and torch.equal(sample[:n, :4], sample[2 * n:, :4])
        assert torch.equal(call["t"].float().reshape(-1)[0], oracle.timesteps[k])
        # text rows: instruction for branch 0, the negative prompt for branches 1 and 2
        assert all(torch.equal(r, emb[0]) for r in text[:n]) and all(torch.equal(r, emb[1]) for r in text[n:])
        # 2. every self-attention layer is told this call's mode and step
        assert call["attn"] and all(a["mode"] == mode and a["step"] == k for a in call["attn"])
        for a in call["attn"]:
            own, keys, own_v, values = a["own"], a["keys"], a["own_v"], a["values"]  # (3n, heads, L, d)
            length = own.shape[2]
            if mode == "record":
                # 3. each anchor attends over all anchors of its own branch, in anchor order
                for b in range(3):
                    group = own[b * n:(b + 1) * n]  # (K, heads, HW, d)
                    tokens = torch.cat(list(group), dim=1)  # (heads, K*HW, d)
                    tokens_v = torch.cat(list(own_v[b * n:(b + 1) * n]), dim=1)
                    for r in range(b * n, (b + 1) * n):
                        assert torch.equal(keys[r], tokens) and torch.equal(values[r], tokens_v)
                    anchor_tokens[(a["layer"], k, b)] = (tokens, tokens_v)
            else:
                # 4. an ordinary frame attends over its own tokens, then the anchors' tokens of
                # this very step and of its own branch
                for r in range(3 * n):
                    tokens, tokens_v = anchor_tokens[(a["layer"], k, r // n)]
                    assert torch.equal(keys[r, :, :length], own[r]) and torch.equal(keys[r, :, length:], tokens)
                    assert torch.equal(values[r, :, :length], own_v[r]) and torch.equal(values[r, :, length:], tokens_v)

    # 5. one output per frame, in order, equal to the hand-built edit (float rounding of
    # the reordered guidance sum: at most one grey level)
    assert len(ours) == num_frames
    diff = np.stack([np.abs(ours[i].astype(int) - ref[i].astype(int)) for i in range(num_frames)])
    assert diff.max() <= 1, diff.max()
    # the property is visible: without anchors (or with DDIM) the frames are far from these
    with FairyPipeline(comp, FairyConfig(instruction=INSTR, negative_prompt=NEG, anchors=0, steps=STEPS, sampler=sampler,
                                         guidance=G_TEXT, image_guidance=G_IMAGE, seed=SEED, size=64,
                                         noise="per-frame")) as pipe:
        independent = list(pipe.edit(frames))
    ordinary = [i for c in exp["chunks"] for i in c]
    assert min(np.abs(ours[i].astype(int) - independent[i].astype(int)).max() for i in ordinary) > 4
