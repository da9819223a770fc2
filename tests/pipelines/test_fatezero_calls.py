"""FateZero followed call by call against a hand-built expectation (issue #13).

Every UNet call of an inversion + edit is recorded (latents in, timestep, prompt
embeddings, output), and so is every attention call inside it (inputs and output).
Each is then checked against what the paper says it must be, written here by hand
from the module weights: DDIM inversion under the source prompt (Eq. 3) at guidance 1,
editing under the target prompt with classifier-free guidance (diffusers'
DDIMScheduler as the stepping oracle), Eq. 8 attention in every self-attention call,
and in the fused layers and steps only the conditional rows fused: self-attention maps
of the inversion call at the same timestep (Sec. 3.2), blended with the per-frame
thresholded mask of Eqs. 6-7 when blend words are given; cross-attention maps of the
source prompt read through the Prompt-to-Prompt refinement mapper (written out by hand
per prompt pair). Source != target, guidance 3, 2 and 3 frames, edited words at other
token positions.
"""

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler

from diffstream.attention.fatezero import FateZeroConfig
from diffstream.pipelines.fatezero import FateZeroEditConfig, FateZeroEditor


@pytest.fixture(scope="module")
def tiny():
    """A fresh tiny model for this module (not the session's shared one): these proofs
    compare exact timesteps and latents, and in the full suite some earlier test leaves
    the shared model's scheduler state changed (a DDIM timestep off by one)."""
    from diffstream.config import ModelConfig
    from diffstream.models.loading import load_components

    return load_components(ModelConfig(model="tiny", device="cpu"))

LATENT = (4, 6)  # tiny UNet: attention at 2x3 tokens
STEPS, GUIDANCE = 4, 3.0
CROSS, SELF = 0.5, 0.75  # cross steps {0, 1}, self steps {0, 1, 2}, step 3 unfused
TAU = 0.97  # the random tiny UNet's maps are flat: a high tau makes the mask take both values
SWAN = "a black swan swimming in a river"
# target prompt, refinement mapper of its first tokens (then source j - shift for the
# rest), blend words. Written by hand from the CLIP tokens:
#   swan:  BOS a black swan swimming in a river EOS
#   style: BOS watercolor painting of a black swan swimming in a river EOS (3 inserted)
#   duck:  BOS a white duck swimming in a river EOS (2 replaced, same positions)
# and the Prompt-to-Prompt mode: "auto" picks word swap for equal token counts, where
# every target token (the swapped ones too) reads the source map at its own position.
CASES = {
    "style": ("watercolor painting of a black swan swimming in a river", [0, -1, -1, -1], 3, None, "auto"),
    "swap": ("a white duck swimming in a river", [0, 1, -1, -1], 0, ("swan", "duck"), "refine"),
    "replace": ("a white duck swimming in a river", [0, 1, 2, 3], 0, None, "auto"),
}


def hand_mapper(head, shift):
    return head + [j - shift for j in range(len(head), 77)]


class Recorder:
    """Forward hooks on the UNet and on every attention module (hooks observe; nothing is replaced)."""

    def __init__(self, unet):
        self.unet_calls, self.attn_calls = [], []
        self.handles = [unet.register_forward_pre_hook(self._pre, with_kwargs=True),
                        unet.register_forward_hook(self._post, with_kwargs=True)]
        for name, module in unet.named_modules():
            if name.endswith(".attn1") or name.endswith(".attn2"):
                self.handles.append(module.register_forward_hook(self._attn(name), with_kwargs=True))

    def _pre(self, module, args, kwargs):
        self.unet_calls.append(dict(x=args[0].clone(), t=int(args[1]), text=kwargs["encoder_hidden_states"].clone()))

    def _post(self, module, args, kwargs, out):
        self.unet_calls[-1]["eps"] = out.sample.clone()

    def _attn(self, name):
        def hook(module, args, kwargs, out):
            ctx = kwargs.get("encoder_hidden_states")
            self.attn_calls.append(dict(call=len(self.unet_calls) - 1, name=name, module=module, h=args[0].clone(),
                                        ctx=None if ctx is None else ctx.clone(), out=out.clone()))
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def split(x, attn):  # (B, L, heads*d) -> (B, heads, L, d)
    return x.view(x.shape[0], x.shape[1], attn.heads, -1).transpose(1, 2)


def probs(q, k, attn):
    return torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1)


def finish(attn, p, v):  # the output projection of p @ v
    return attn.to_out[1](attn.to_out[0]((p @ v).transpose(1, 2).flatten(2)))


def eq8(attn, h, ref):
    """q, [own; reference-frame] keys and values of R rows h (R, L, C), reference row `ref`."""
    q, k, v = split(attn.to_q(h), attn), split(attn.to_k(h), attn), split(attn.to_v(h), attn)
    r = h.shape[0]
    return q, torch.cat([k, k[[ref] * r]], dim=2), torch.cat([v, v[[ref] * r]], dim=2)


def cross_qkv(attn, h, ctx):
    return split(attn.to_q(h), attn), split(attn.to_k(ctx), attn), split(attn.to_v(ctx), attn)


def hand_mask(src_calls, columns, grid, tau, rows):
    """Eq. 6 by hand: blend-word source cross-attention, summed over words, mean over
    heads and the mask layers, 3x3 max-pooled, normalised per frame, > tau."""
    per_layer = []
    for c in src_calls:
        q, k, _ = cross_qkv(c["module"], c["h"], c["ctx"])
        m = probs(q, k, c["module"])[..., columns].sum(-1).mean(1)  # (R, L)
        per_layer.append(m.reshape(rows, 1, *grid))
    pooled = F.max_pool2d(torch.stack(per_layer).mean(0), 3, 1, 1)
    peak = pooled.flatten(1).max(dim=1).values.view(rows, 1, 1, 1)  # one peak per frame
    return (pooled / peak > tau).float().flatten(1)  # (R, L)


def run_edit(tiny, case, frames, tau=TAU):
    prompt, head, shift, blend, p2p = CASES[case]
    config = FateZeroEditConfig(
        source_prompt=SWAN, prompt=prompt, guidance=GUIDANCE, negative_prompt="blurry", blend_words=blend, p2p=p2p,
        store_dtype="fp32", fatezero=FateZeroConfig(steps=STEPS, cross_replace=CROSS, self_replace=SELF,
                                                   blend_threshold=tau, frame_attention="own+reference"),
    )
    ed = FateZeroEditor(tiny, config, LATENT)
    ref = (frames - 1) // 2  # the middle frame, round(n/2) of 1..n
    z0 = torch.randn(frames, 4, *LATENT, generator=torch.Generator().manual_seed(frames))
    rec = Recorder(tiny.unet)
    try:
        with torch.no_grad():
            store = ed.new_store()
            ed.invert(z0, [ref] * frames, store)
            first = len(rec.unet_calls)
            out = ed.edit(store, [ref] * frames)
    finally:
        rec.close()
    return rec, first, out, z0, ref, hand_mapper(head, shift), blend, prompt


@pytest.mark.parametrize("frames", [2, 3])
@pytest.mark.parametrize("case", ["style", "swap", "replace"])
def test_every_unet_call_of_an_edit_is_the_papers(tiny, case, frames):
    rec, first, out, z0, ref, mapper, blend, prompt = run_edit(tiny, case, frames)
    src, tgt, neg = tiny.encode_prompt([SWAN, prompt, "blurry"])
    sched = DDIMScheduler.from_config(tiny.scheduler.config, clip_sample=False)  # SD 1.x: no clipping
    sched.set_timesteps(STEPS)
    ts = [int(t) for t in sched.timesteps]  # noisiest first
    abar = tiny.alphas_cumprod.float()
    level = lambda t: abar[t] if t >= 0 else torch.tensor(1.0)  # noqa: E731
    gap = 1000 // STEPS
    calls = rec.unet_calls[first - STEPS :]
    assert len(calls) == 2 * STEPS

    # Inversion (Eq. 3): cleanest timestep first, the source prompt on every row, no guidance.
    x = z0
    for i, c in enumerate(calls[:STEPS]):
        t = ts[STEPS - 1 - i]
        assert c["t"] == t
        assert c["x"].shape[0] == frames and torch.equal(c["text"], src.expand(frames, -1, -1))
        torch.testing.assert_close(c["x"], x, rtol=1e-5, atol=1e-5)
        a_from, a_to = level(t - gap), level(t)
        x = a_to.sqrt() * (x - (1 - a_from).sqrt() * c["eps"]) / a_from.sqrt() + (1 - a_to).sqrt() * c["eps"]
    # Editing: z_T, noisiest first, [uncond; target] rows, CFG at the given scale, DDIM steps.
    for j, c in enumerate(calls[STEPS:]):
        assert c["t"] == ts[j]
        assert torch.equal(c["text"], torch.cat([neg.expand(frames, -1, -1), tgt.expand(frames, -1, -1)]))
        torch.testing.assert_close(c["x"], torch.cat([x, x]), rtol=1e-5, atol=1e-5, msg=f"edit step {j}")
        eps_u, eps_c = c["eps"].chunk(2)
        x = sched.step(eps_u + GUIDANCE * (eps_c - eps_u), ts[j], x, eta=0.0).prev_sample
    torch.testing.assert_close(out, x, rtol=1e-5, atol=1e-5)

    # Attention of every editing call against the inversion call of the same timestep.
    inv_index = {c["t"]: first - STEPS + i for i, c in enumerate(calls[:STEPS])}
    attn = {}
    for a in rec.attn_calls:
        attn.setdefault(a["call"], {})[a["name"]] = a
    cols = [3] if blend else None  # "swan" is token 3 of the source
    mask_layers = [n for n in attn[first] if n.endswith("attn2") and not n.startswith("mid_block")]
    blended = 0
    for j in range(STEPS):
        call, src_call = attn[first + j], attn[inv_index[ts[j]]]
        for name, a in call.items():
            m, h, ctx = a["module"], a["h"], a["ctx"]
            s = src_call[name]
            if name.endswith("attn1"):
                q, k, v = eq8(m, h[:frames], ref)
                uncond = finish(m, probs(q, k, m), v)
                q, k, v = eq8(m, h[frames:], ref)
                own = probs(q, k, m)
                if j < int(STEPS * SELF):
                    sq, sk, _ = eq8(m, s["h"], ref)
                    source = probs(sq, sk, m)
                    if blend:
                        mask = hand_mask([src_call[n] for n in mask_layers], cols, (2, 3), TAU, frames)
                        blended += int(0 < mask.mean() < 1)
                        mask = mask[:, None, :, None]
                        own = mask * own + (1 - mask) * source  # Eq. 7
                    else:
                        own = source
                expected = torch.cat([uncond, finish(m, own, v)])
            else:
                assert s["ctx"] is not None and torch.equal(s["ctx"], src.expand(frames, -1, -1))
                q, k, v = cross_qkv(m, h, ctx)
                maps = probs(q, k, m)
                if j < int(STEPS * CROSS):
                    sq, sk, _ = cross_qkv(m, s["h"], s["ctx"])  # the source prompt's keys
                    source = probs(sq, sk, m)
                    alpha = torch.tensor([float(i >= 0) for i in mapper])
                    picked = source[..., [max(i, 0) for i in mapper]]
                    maps = torch.cat([maps[:frames], picked * alpha + maps[frames:] * (1 - alpha)])
                expected = finish(m, maps, v)
            torch.testing.assert_close(a["out"], expected, rtol=1e-4, atol=1e-5, msg=f"step {j} {name}")
    if blend:
        assert blended > 0  # the mask had both values somewhere: Eq. 7 was visible


def test_guidance_one_runs_one_group_and_reads_the_inversion_unguided(tiny):
    """At guidance 1 the edit runs only the conditional rows: the recorded calls carry the
    target prompt only and step exactly along the conditional prediction."""
    config = FateZeroEditConfig(source_prompt=SWAN, prompt=CASES["style"][0], guidance=1.0, store_dtype="fp32",
                                fatezero=FateZeroConfig(steps=STEPS, cross_replace=CROSS, self_replace=SELF))
    ed = FateZeroEditor(tiny, config, LATENT)
    z0 = torch.randn(2, 4, *LATENT, generator=torch.Generator().manual_seed(7))
    store = ed.new_store()
    with torch.no_grad():
        ed.invert(z0, [0, 0], store)
        rec = Recorder(tiny.unet)
        try:
            out = ed.edit(store, [0, 0])
        finally:
            rec.close()
    tgt = tiny.encode_prompt([CASES["style"][0]])
    sched = DDIMScheduler.from_config(tiny.scheduler.config, clip_sample=False)  # SD 1.x: no clipping
    sched.set_timesteps(STEPS)
    x = store.get(("latent", "z", STEPS))
    for j, c in enumerate(rec.unet_calls):
        assert torch.equal(c["text"], tgt.expand(2, -1, -1))
        x = sched.step(c["eps"], int(sched.timesteps[j]), x, eta=0.0).prev_sample
    torch.testing.assert_close(out, x, rtol=1e-5, atol=1e-5)


def test_blend_mask_is_normalised_per_frame():
    """Eq. 6 thresholds each frame's map by its own peak: a frame whose blend word
    responds weakly everywhere still gets its object mask (hand-written 1x3 maps)."""
    from diffstream.attention.fatezero import blend_mask

    source = torch.tensor([[[[0.2, 0.9, 0.1]]], [[[0.02, 0.09, 0.01]]]])  # (2 frames, 1, 1, 3): frame 1 ten times weaker
    expected = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])  # 0.2 / 0.9 < 0.3 < 0.9 / 0.9, in both frames
    assert torch.equal(blend_mask(source, (1, 3), 0.3), expected)


@pytest.mark.parametrize("frames, middle", [(2, 0), (3, 1), (4, 1), (5, 2), (8, 3)])
def test_middle_reference_of_even_and_odd_clips(frames, middle):
    """The reference code's middle frame: int(n - 1) // 2 (round(n/2) of frames 1..n)."""
    from diffstream.pipelines.fatezero import plan_windows

    (window,) = plan_windows(frames, 8, "middle")
    assert window.rows == tuple(range(frames)) and window.ref_rows == (middle,) * frames
