"""Euler ancestral against diffusers' EulerAncestralDiscreteScheduler, the independent oracle:
the same timesteps, sigmas and initial sigma, and every step equal bit for bit (fp32) for
the same model output and the same noise (diffusers draws it from a generator; we pass it in)."""

import pytest
import torch
from diffusers import EulerAncestralDiscreteScheduler

from diffstream.schedule.euler_ancestral import (
    add_noise,
    euler_ancestral_schedule,
    euler_ancestral_step,
    scale_model_input,
)


def oracle(spacing, prediction_type="epsilon"):
    return EulerAncestralDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                           timestep_spacing=spacing, steps_offset=1, prediction_type=prediction_type)


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("steps", [1, 3, 10])
def test_schedule_equals_diffusers(spacing, steps):
    ref = oracle(spacing)
    ref.set_timesteps(steps)
    ours = euler_ancestral_schedule(ref.alphas_cumprod, steps, spacing=spacing, steps_offset=1)
    assert torch.equal(ours.timesteps, ref.timesteps)
    assert torch.equal(ours.sigmas, ref.sigmas)
    assert torch.equal(ours.init_noise_sigma, ref.init_noise_sigma)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", ["leading", "linspace"])
def test_every_step_equals_diffusers_for_the_same_output_and_noise(prediction_type, spacing):
    steps, shape = 10, (2, 4, 6, 8)
    ref = oracle(spacing, prediction_type)
    ref.set_timesteps(steps)
    ours = euler_ancestral_schedule(ref.alphas_cumprod, steps, spacing=spacing, steps_offset=1)
    g = torch.Generator().manual_seed(0)
    x_ref = torch.randn(shape, generator=g) * ref.init_noise_sigma
    x = x_ref.clone()
    for k, t in enumerate(ref.timesteps):
        scaled_ref = ref.scale_model_input(x_ref, t)
        scaled = scale_model_input(x, ours.sigmas[k])
        assert torch.equal(scaled, scaled_ref)
        out = torch.tanh(scaled_ref) * 1.3 + 0.1 * k  # a stand-in model output, the same for both
        seed = 100 + k
        # diffusers draws the step's noise from the generator; the same draw is ours
        x_ref = ref.step(out, t, x_ref, generator=torch.Generator().manual_seed(seed)).prev_sample
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        x = euler_ancestral_step(out, x, ours.sigmas[k], ours.sigmas[k + 1], noise, prediction_type)
        assert torch.equal(x, x_ref), k
    # the noise matters: another draw gives another result (the step is really ancestral)
    other = euler_ancestral_step(out, x, ours.sigmas[0], ours.sigmas[1], noise + 1, prediction_type)
    assert not torch.equal(other, euler_ancestral_step(out, x, ours.sigmas[0], ours.sigmas[1], noise,
                                                       prediction_type))


def test_add_noise_equals_diffusers_at_a_start_part_way_down():
    ref = oracle("leading")
    ref.set_timesteps(10)
    ours = euler_ancestral_schedule(ref.alphas_cumprod, 10, spacing="leading", steps_offset=1).tail(5)
    ref.set_begin_index(5)
    x0, noise = torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 8)
    expected = ref.add_noise(x0, noise, ref.timesteps[5:6].repeat(2))
    assert torch.equal(add_noise(x0, noise, ours.sigmas[0]), expected)
    assert ours.num_steps == 5 and torch.equal(ours.timesteps, ref.timesteps[5:])


def test_bad_arguments():
    abar = oracle("leading").alphas_cumprod
    with pytest.raises(ValueError, match="spacing"):
        euler_ancestral_schedule(abar, 10, spacing="karras")
    with pytest.raises(ValueError, match="steps"):
        euler_ancestral_schedule(abar, 0)
    with pytest.raises(ValueError, match="sample"):
        s = euler_ancestral_schedule(abar, 2)
        euler_ancestral_step(torch.zeros(1), torch.zeros(1), s.sigmas[0], s.sigmas[1], torch.zeros(1), "sample")
