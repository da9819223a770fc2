"""DDIM sampling and inversion maths against diffusers' DDIMScheduler / DDIMInverseScheduler."""

import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler

from diffstream.models.tiny import sd_scheduler
from diffstream.schedule.ddim import (
    ddim_inversion_step,
    ddim_schedule,
    ddim_schedule_from_config,
    ddim_step,
    ddim_timesteps,
    ddim_transfer,
)
from diffstream.schedule.timesteps import model_output_to_eps

# Stable Diffusion 1.x's scheduler_config.json fields that matter for DDIM.
SD15 = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            steps_offset=1, set_alpha_to_one=False, clip_sample=False, timestep_spacing="leading")


def tensors(seed, shape=(2, 4, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


@pytest.mark.parametrize("spacing,offset", [("leading", 0), ("leading", 1), ("trailing", 0), ("linspace", 0)])
@pytest.mark.parametrize("steps", [1, 7, 50])
def test_timesteps_match_diffusers(spacing, offset, steps):
    ref = DDIMScheduler(**{**SD15, "timestep_spacing": spacing, "steps_offset": offset})
    ref.set_timesteps(steps)
    assert ddim_timesteps(steps, 1000, spacing, offset).tolist() == ref.timesteps.tolist()


@pytest.mark.parametrize("set_alpha_to_one", [False, True])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_denoising_step_equals_ddim_scheduler_bit_for_bit(spacing, set_alpha_to_one):
    config = {**SD15, "timestep_spacing": spacing, "set_alpha_to_one": set_alpha_to_one}
    ref = DDIMScheduler(**config)
    ref.set_timesteps(10)
    schedule = ddim_schedule_from_config(config, ref.alphas_cumprod, 10)
    assert schedule.timesteps.tolist() == ref.timesteps.tolist()
    for k, t in enumerate(ref.timesteps):
        x, eps = tensors(k)
        expected = ref.step(eps, t, x, eta=0.0).prev_sample
        assert torch.equal(ddim_step(x, eps, schedule, k), expected)


@pytest.mark.parametrize("set_alpha_to_one", [False, True])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_inversion_step_equals_ddim_inverse_scheduler(spacing, set_alpha_to_one):
    config = {**SD15, "timestep_spacing": spacing, "set_alpha_to_one": set_alpha_to_one}
    inv = DDIMInverseScheduler(**config)
    inv.set_timesteps(10)
    schedule = ddim_schedule_from_config(config, inv.alphas_cumprod, 10)
    # diffusers inverts in ascending timesteps; our step k is its step n-1-k.
    assert inv.timesteps.tolist() == schedule.timesteps.flip(0).tolist()
    for i, t in enumerate(inv.timesteps):
        k = schedule.num_steps - 1 - i
        x, eps = tensors(100 + i)
        expected = inv.step(eps, t, x).prev_sample
        torch.testing.assert_close(ddim_inversion_step(x, eps, schedule, k), expected, rtol=1e-6, atol=1e-6)


def test_v_prediction_through_eps_equals_diffusers():
    config = {**SD15, "prediction_type": "v_prediction"}
    ref = DDIMScheduler(**config)
    ref.set_timesteps(5)
    schedule = ddim_schedule_from_config(config, ref.alphas_cumprod, 5)
    for k, t in enumerate(ref.timesteps):
        x, v = tensors(200 + k)
        a = schedule.abar[k]
        eps = model_output_to_eps(v, x, a.sqrt(), (1 - a).sqrt(), "v_prediction")
        torch.testing.assert_close(ddim_step(x, eps, schedule, k), ref.step(v, t, x).prev_sample,
                                   rtol=1e-5, atol=1e-5)


def test_inversion_and_sampling_are_inverse_maps_for_the_same_eps():
    schedule = ddim_schedule(sd_scheduler().alphas_cumprod, 20)
    for k in range(20):
        x, eps = tensors(300 + k)
        back = ddim_step(ddim_inversion_step(x, eps, schedule, k), eps, schedule, k)
        torch.testing.assert_close(back, x, rtol=1e-5, atol=1e-5)


def test_oracle_denoiser_inverts_and_reconstructs_exactly():
    """With the ideal eps of a known x0, inversion lands on the forward-process latent of
    every level and sampling walks back to x0: the two loops mirror each other."""
    schedule = ddim_schedule(sd_scheduler().alphas_cumprod, 25, steps_offset=1)
    x0, noise = tensors(7)
    x0 = x0.double()
    noise = noise.double()
    # A fixed direction: eps(x) = (x - sqrt(a) x0) / sqrt(1 - a) is the noise of x at level a.
    oracle = lambda x, a: (x - a.double().sqrt() * x0) / (1 - a.double()).sqrt()  # noqa: E731
    x = x0 * schedule.abar_prev[-1].double().sqrt() + noise * (1 - schedule.abar_prev[-1].double()).sqrt()
    start = x
    abar, abar_prev = schedule.abar.double(), schedule.abar_prev.double()
    for k in reversed(range(schedule.num_steps)):
        x = ddim_transfer(x, oracle(x, abar_prev[k]), abar_prev[k], abar[k])
        expected = abar[k].sqrt() * x0 + (1 - abar[k]).sqrt() * noise
        torch.testing.assert_close(x, expected)
    for k in range(schedule.num_steps):
        x = ddim_transfer(x, oracle(x, abar[k]), abar[k], abar_prev[k])
    torch.testing.assert_close(x, start)


def test_schedule_reads_a_diffusers_config_object():
    sched = sd_scheduler()  # the tiny model's LCMScheduler: leading, no offset, alpha_to_one
    schedule = ddim_schedule_from_config(sched.config, sched.alphas_cumprod, 4)
    assert schedule.timesteps.tolist() == [750, 500, 250, 0]
    assert schedule.abar_prev[-1].item() == 1.0
    assert schedule.abar_prev[0] == sched.alphas_cumprod[500]


def test_bad_step_count_is_rejected():
    with pytest.raises(ValueError):
        ddim_timesteps(0)
    with pytest.raises(ValueError):
        ddim_timesteps(1001)
