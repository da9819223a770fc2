"""Guidance over several steps and frames, written out by hand (StreamDiffusion Sec. 3.3).

The one-step formulas are pinned in test_stream.py; these follow whole frames through
3 steps of the stream batch, in latent space (uint8 frames hide most of it), against a
denoising loop written here from the paper's equations with the UNet called directly:

    eps'_k   = (x_k - alpha_k x0_ref) / beta_k                      (virtual residual noise)
    eps_k    = delta eps'_k + gamma (eps_c(x_k) - delta eps'_k)       (RCFG)
    eps_k    = eps_u(x_k) + gamma (eps_c(x_k) - eps_u(x_k))           (full CFG)
    x0_ref   = z0 (self)  or  (x_0 - beta_0 eps_u(x_0)) / alpha_0 (onetime, from step 0 on)
    den_k    = c_skip_k x_k + c_out_k (x_k - beta_k eps_k) / alpha_k
    x_{k+1}  = alpha_{k+1} den_k + beta_{k+1} n_{k+1}                (slot k+1's fixed noise)
"""

import pytest
import torch

from diffstream import frames as F
from diffstream.config import StreamConfig
from diffstream.pipelines.stream import StreamPipeline
from diffstream.schedule.timesteps import lcm_boundary_scalings, lcm_timestep_table
from diffstream.testing import make_frames

GAMMA, DELTA, SEED = 2.0, 0.6, 11


def pipeline_latents(tiny, cfg, clip):
    """Each frame's final latent (1, 4, h, w) as the pipeline hands it to the decoder."""
    captured = {}
    with StreamPipeline(tiny, cfg) as pipe:
        emit = pipe._emit

        def spy(finished):
            if finished is not None:
                captured[finished[0]] = finished[1].clone()
            emit(finished)

        pipe._emit = spy
        for f in clip:
            pipe.push(f)
        pipe.flush()
    return [captured[i] for i in range(len(clip))]


def by_hand(tiny, cfg_type, indices, frame, prompt="a castle", negative="blurry", gamma=GAMMA, delta=DELTA):
    """One frame through every step of the schedule, from the equations above."""
    steps = len(indices)
    ts = [lcm_timestep_table()[i] for i in indices]
    abar = [tiny.alphas_cumprod[t].double() for t in ts]
    alpha = [a.sqrt().float() for a in abar]
    beta = [(1 - a).sqrt().float() for a in abar]
    noise = torch.randn((steps, 4, 6, 8), generator=torch.Generator().manual_seed(SEED))  # slot noise
    cond, uncond = tiny.encode_prompt([prompt]), tiny.encode_prompt([negative])
    z0 = tiny.encode_image(F.frames_to_tensor(F.resize(frame, (64, 48))))
    x = alpha[0] * z0 + beta[0] * noise[0:1]
    ref = z0
    with torch.no_grad():
        for k, t in enumerate(ts):
            eps_c = tiny.unet(x, t, encoder_hidden_states=cond).sample
            if cfg_type == "full":
                eps_u = tiny.unet(x, t, encoder_hidden_states=uncond).sample
                eps = eps_u + gamma * (eps_c - eps_u)
            else:
                if cfg_type == "initialize" and k == 0:
                    eps_u = tiny.unet(x, t, encoder_hidden_states=uncond).sample
                    ref = (x - beta[0] * eps_u) / alpha[0]
                residual = (x - alpha[k] * ref) / beta[k]
                eps = delta * residual + gamma * (eps_c - delta * residual)
            c_skip, c_out = (c.float() for c in lcm_boundary_scalings(torch.tensor(t)))
            den = c_skip * x + c_out * (x - beta[k] * eps) / alpha[k]
            x = alpha[k + 1] * den + beta[k + 1] * noise[k + 1 : k + 2] if k + 1 < steps else den
    return x


@pytest.mark.parametrize("cfg_type", ["self", "initialize", "full"])
def test_multi_step_guidance_follows_the_equations_for_every_frame(tiny, cfg_type):
    """3 steps, 4 frames in the stream batch: every frame's latent equals the hand-written loop."""
    clip = make_frames(4)
    cfg = StreamConfig(prompt="a castle", negative_prompt="blurry", size=64, t_index_list=(15, 28, 40),
                       cfg_type=cfg_type, guidance=GAMMA, delta=DELTA, seed=SEED)
    ours = pipeline_latents(tiny, cfg, clip)
    for i, frame in enumerate(clip):
        expected = by_hand(tiny, cfg_type, (15, 28, 40), frame)
        torch.testing.assert_close(ours[i], expected, atol=2e-4, rtol=1e-4, msg=f"frame {i}")


def test_the_guidance_types_really_differ(tiny):
    """The proof above would be weak if the types agreed: at these settings they differ a lot."""
    frame = make_frames(1)[0]
    got = {c: by_hand(tiny, c, (15, 28, 40), frame) for c in ("self", "initialize", "full")}
    none = by_hand(tiny, "self", (15, 28, 40), frame, gamma=1.0, delta=1.0)  # gamma 1: eps = eps_c
    for a, b in (("self", "initialize"), ("self", "full"), ("initialize", "full")):
        assert (got[a] - got[b]).abs().max() > 0.05, (a, b)
    assert all((got[c] - none).abs().max() > 0.05 for c in got)


def test_one_step_self_rcfg_does_not_drift_over_frames(tiny):
    """One-step RCFG self over 10 frames: every frame is the closed form with the SDEdit
    noise as eps' (Sec. 3.3's virtual residual noise), frame 10 as exactly as frame 1. The
    reference's stock-noise recursion instead carries eps' from frame to frame with gain
    gamma * beta / alpha > 1 here, so it drifts; we deliberately do not follow it."""
    clip = make_frames(10)
    cfg = StreamConfig(prompt="a castle", size=64, t_index_list=(20,), cfg_type="self",
                       guidance=GAMMA, delta=DELTA, seed=SEED)
    ours = pipeline_latents(tiny, cfg, clip)
    t = lcm_timestep_table()[20]
    abar = tiny.alphas_cumprod[t].double()
    assert GAMMA * (1 - abar).sqrt() / abar.sqrt() > 1  # the reference's recursion would diverge
    for i, frame in enumerate(clip):
        torch.testing.assert_close(ours[i], by_hand(tiny, "self", (20,), frame), atol=1e-4, rtol=1e-4,
                                   msg=f"frame {i}")
