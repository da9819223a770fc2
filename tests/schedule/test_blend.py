"""Prompt and seed blending maths (`schedule.blend`) against formulas written out here."""

import math

import pytest
import torch

from diffstream.schedule.blend import blend_embeddings, blend_noise, slerp


def test_linear_blend_is_the_weighted_mean():
    e = torch.randn(3, 77, 8, generator=torch.Generator().manual_seed(0))
    out = blend_embeddings(e, [1.0, 3.0, 0.0], "linear")
    assert out.shape == (1, 77, 8)
    torch.testing.assert_close(out[0], (1 * e[0] + 3 * e[1]) / 4)
    assert torch.equal(blend_embeddings(e, [2.0, 0.0, 0.0], "linear")[0], e[0])  # one prompt: itself


def test_slerp_of_orthogonal_vectors_stays_on_the_circle():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    for t in (0.0, 0.25, 0.5, 1.0):
        torch.testing.assert_close(slerp(a, b, t), torch.tensor([math.cos(t * math.pi / 2), math.sin(t * math.pi / 2)]))
    torch.testing.assert_close(slerp(a, 2 * a, 0.5), 1.5 * a)  # parallel: the linear interpolation


def test_slerp_blend_of_two_prompts_takes_the_second_ones_share():
    e = torch.randn(2, 77, 8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(blend_embeddings(e, [1.0, 3.0], "slerp")[0], slerp(e[0], e[1], 0.75))
    # Three prompts fold in one at a time: the third gets w3 / (w1 + w2 + w3).
    e3 = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(2))
    expected = slerp(slerp(e3[0], e3[1], 0.5), e3[2], 2 / 4)
    torch.testing.assert_close(blend_embeddings(e3, [1.0, 1.0, 2.0], "slerp")[0], expected)


def test_noise_blend_keeps_unit_variance():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(200_000, generator=g), torch.randn(200_000, generator=g)
    mixed = blend_noise([a, b], [0.5, 0.5])
    torch.testing.assert_close(mixed, (a + b) / math.sqrt(2))
    assert abs(float(mixed.std()) - 1) < 0.01
    assert torch.equal(blend_noise([a, b], [1.0, 0.0]), a)


@pytest.mark.parametrize("bad,needle", [
    (dict(prompt_blend=(("a", -1),)), "weights must be numbers >= 0"),
    (dict(prompt_blend=(("a", 0), ("b", 0))), "needs a weight above 0"),
    (dict(prompt_blend=((3, 1),)), "entries are (prompt, weight)"),
    (dict(seed_blend=((-1, 1),)), "entries are (seed >= 0, weight)"),
    (dict(seed_blend=tuple((i, 1) for i in range(9))), "takes 1 to 8 entries"),
    (dict(blend="cubic"), "--blend must be one of linear, slerp"),
])
def test_bad_blends_are_config_errors(bad, needle):
    from diffstream.config import StreamConfig
    from diffstream.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        StreamConfig(**bad)
    assert needle in str(info.value)
