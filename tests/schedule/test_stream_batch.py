"""StreamBatch == sequential denoising, with a pure-maths stand-in for the UNet."""

import torch

from diffstream.schedule.stream_batch import StreamBatch
from diffstream.schedule.timesteps import add_noise, denoise, make_step_table, model_output_to_eps
from diffstream.models.tiny import sd_scheduler


def fake_unet(x, timesteps):
    """Any deterministic per-row function of (x, t) will do: rows must not interact."""
    return torch.tanh(x * 0.7 + timesteps.view(-1, 1, 1, 1).float() / 1000.0)


def run(batch, z0s, stream):
    outputs = {}
    for i, z0 in enumerate(z0s):
        batch.admit(z0, i)
        while True:
            rows = batch.rows()
            eps = model_output_to_eps(fake_unet(batch.x, rows.timesteps), batch.x, rows.alpha_sqrt, rows.beta_sqrt, "epsilon")
            done = batch.advance(denoise(eps, batch.x, rows))
            if done is not None:
                outputs[done[0]] = done[1]
            if stream or not batch.in_flight:
                break
    while batch.in_flight:  # drain the tail
        rows = batch.rows()
        done = batch.advance(denoise(fake_unet(batch.x, rows.timesteps), batch.x, rows))
        if done is not None:
            outputs[done[0]] = done[1]
    return outputs


def test_stream_batch_equals_sequential_exactly():
    table = make_step_table(sd_scheduler().alphas_cumprod, (20, 30, 40))
    noise = torch.randn(3, 4, 5, 6, generator=torch.Generator().manual_seed(0))
    z0s = [torch.randn(1, 4, 5, 6, generator=torch.Generator().manual_seed(10 + i)) for i in range(7)]
    streamed = run(StreamBatch(table, noise), z0s, stream=True)
    sequential = run(StreamBatch(table, noise), z0s, stream=False)
    assert sorted(streamed) == list(range(7)) == sorted(sequential)
    for i in range(7):
        # Rows never interact, so batching changes nothing, bit for bit.
        assert torch.equal(streamed[i], sequential[i]), i


def test_first_step_noise_and_refs():
    table = make_step_table(sd_scheduler().alphas_cumprod, (10, 40))
    noise = torch.randn(2, 4, 2, 2, generator=torch.Generator().manual_seed(3))
    batch = StreamBatch(table, noise)
    z0 = torch.ones(1, 4, 2, 2)
    batch.admit(z0, "a")
    rows = batch.rows()
    assert torch.allclose(batch.x, add_noise(z0, noise[:1], rows.alpha_sqrt, rows.beta_sqrt))
    assert torch.equal(batch.ref, z0)
    assert list(batch.steps()) == [0]
    assert batch.advance(torch.zeros(1, 4, 2, 2)) is None
    assert list(batch.steps()) == [1]
    done = batch.advance(torch.full((1, 4, 2, 2), 2.0))
    assert done[0] == "a" and torch.equal(done[1], torch.full((1, 4, 2, 2), 2.0))
    assert batch.in_flight == 0
