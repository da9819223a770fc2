"""Schedule maths against diffusers' own LCM scheduler."""

import pytest
import torch

from diffstream.config import StreamConfig
from diffstream.errors import ConfigError
from diffstream.models.tiny import sd_scheduler
from diffstream.schedule import guidance as G
from diffstream.schedule.timesteps import (
    add_noise,
    eps_to_x0,
    lcm_timestep_table,
    make_step_table,
    max_steps,
    model_output_to_eps,
    t_indices,
)


def test_lcm_table_matches_diffusers():
    sched = sd_scheduler()
    sched.set_timesteps(num_inference_steps=50, original_inference_steps=50)
    assert lcm_timestep_table() == sched.timesteps.tolist()


def test_boundary_scalings_match_diffusers():
    sched = sd_scheduler()
    table = make_step_table(sched.alphas_cumprod, (30, 35, 40, 45))
    assert table.timesteps.tolist() == [399, 299, 199, 99]
    for k, t in enumerate(table.timesteps.tolist()):
        c_skip, c_out = sched.get_scalings_for_boundary_condition_discrete(t)
        assert table.c_skip[k].item() == pytest.approx(float(c_skip), rel=1e-6)
        assert table.c_out[k].item() == pytest.approx(float(c_out), rel=1e-6)
        assert table.alpha_sqrt[k].item() == pytest.approx(sched.alphas_cumprod[t].sqrt().item(), rel=1e-6)


def test_strength_and_steps_to_indices():
    assert StreamConfig(strength=0.4, steps=4).t_indices() == (30, 35, 40, 45)
    assert StreamConfig(strength=1.0, steps=2).t_indices() == (0, 25)
    assert StreamConfig(strength=0.5).t_indices(turbo=True) == (25,)
    assert StreamConfig(t_index_list=(32, 45)).t_indices() == (32, 45)


def test_t_indices_is_a_pure_schedule_function():
    """The schedule maths without a config: StreamConfig.t_indices is this function."""
    assert t_indices(0.4, 4) == (30, 35, 40, 45)
    assert t_indices(0.5, turbo=True) == (25,) and t_indices(0.5) == (25, 31, 37, 43)
    assert t_indices(0.9, 3, t_index_list=(32, 45)) == (32, 45)  # explicit indices win
    assert max_steps(0.4) == 20 and max_steps(1.0) == 50 and max_steps(1e-6) == 1
    with pytest.raises(ConfigError, match="too many for strength 0.2"):
        t_indices(0.2, 11)
    for strength in (0.1, 0.35, 0.4, 0.77, 1.0):
        for steps in (None, 1, 2, 4):
            assert StreamConfig(strength=strength).replace(steps=steps).t_indices() == t_indices(strength, steps)


def streamv2v_t_index_list(noise_strength, diffusion_steps):
    """The reference, as StreamV2V's vid2vid/main.py writes it (an independent oracle)."""
    init_step = int(50 * (1 - noise_strength))
    interval = int(50 * noise_strength) // diffusion_steps
    return [init_step + i * interval for i in range(diffusion_steps)]


STRENGTHS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]  # as a user types them


@pytest.mark.parametrize("strength", STRENGTHS)
def test_t_indices_equal_streamv2v_reference_table(strength):
    """Strength x steps -> t_index_list exactly as the reference computes it, 1..8 steps."""
    for steps in range(1, 9):
        if steps > int(50 * strength):  # the reference would repeat an index: we refuse
            with pytest.raises(ConfigError, match="too many"):
                t_indices(strength, steps)
            continue
        assert list(t_indices(strength, steps)) == streamv2v_t_index_list(strength, steps), (strength, steps)


def test_t_indices_reference_spot_values():
    """Values the issue names, and the reference's float truncation (50 * 0.1 = 4.999...)."""
    assert t_indices(0.4, 3) == (30, 36, 42)  # not (30, 36, 43): the stride is truncated once
    assert t_indices(0.9, 1) == (4,)  # int(50 * (1 - 0.9)) = int(4.999...) = 4
    assert t_indices(0.45, 2) == (27, 38)  # .5 starts truncate: int(27.5) = 27
    assert t_indices(0.01, 1) == (49,)  # a single step always fits


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(strength=0.0),
        dict(strength=1.5),
        dict(t_index_list=(50,)),
        dict(t_index_list=(10, 5)),
        dict(steps=30, strength=0.2),
        dict(size=32),
        dict(method="nope"),
        dict(cfg_type="half"),
        dict(similarity_threshold=1.0),
    ],
)
def test_invalid_options_raise_one_line(kwargs):
    with pytest.raises(ConfigError) as info:
        StreamConfig(**kwargs)
    assert "\n" not in str(info.value) and str(info.value)


def test_prediction_type_conversions_round_trip():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    a, b = torch.tensor(0.6), torch.tensor(0.8)
    x_t = add_noise(x0, eps, a, b)
    v = a * eps - b * x0
    assert torch.allclose(model_output_to_eps(v, x_t, a, b, "v_prediction"), eps, atol=1e-5)
    assert torch.allclose(model_output_to_eps(x0, x_t, a, b, "sample"), eps, atol=1e-5)
    assert torch.allclose(eps_to_x0(eps, x_t, a, b), x0, atol=1e-5)


def test_rcfg_formulas():
    g = torch.Generator().manual_seed(1)
    x0, noise, eps_c = (torch.randn(1, 4, 2, 2, generator=g) for _ in range(3))
    a, b = torch.tensor(0.3), torch.tensor(0.95)
    x_t = add_noise(x0, noise, a, b)
    # Self-negative RCFG at the first step: the virtual residual noise is the added noise.
    residual = G.virtual_residual_noise(x_t, x0, a, b)
    assert torch.allclose(residual, noise, atol=1e-5)
    # delta eps' + gamma (eps_c - delta eps')
    out = G.residual_cfg(eps_c, residual, guidance=1.7, delta=0.5)
    assert torch.allclose(out, 0.5 * noise + 1.7 * (eps_c - 0.5 * noise), atol=1e-6)
    # gamma = 1 gives the conditional prediction, whatever delta is.
    assert torch.allclose(G.residual_cfg(eps_c, residual, 1.0, 0.3), eps_c, atol=1e-6)
    assert torch.allclose(G.cfg(eps_c, noise, 3.0), noise + 3.0 * (eps_c - noise))


def test_guidance_below_one_needs_no_unconditional_work():
    assert StreamConfig(guidance=1.0, cfg_type="full").resolved_cfg_type() == "none"
    assert StreamConfig(guidance=1.5, cfg_type="full").resolved_cfg_type(turbo=True) == "none"
    assert StreamConfig(guidance=1.5).resolved_cfg_type() == "self"
