"""`tune video`'s task on the tiny model: the DDPM loss with sparse-causal attention, the
reconstruction of the clip improving with tuning, what is saved, one-line errors."""

import pytest
import torch

from diffstream.attention.fatezero import FateZeroAttnProcessor
from diffstream.errors import ConfigError, InputError
from diffstream.models.video_unet import is_tuned, load_video_model
from diffstream.testing import make_frames
from diffstream.tuning.loop import TuneConfig, tune
from diffstream.tuning.video import VideoTuneConfig, VideoTuneTask, read_clip

SWAN = "a black swan swimming in a river"


def make_task(tiny, frames=4, **kw):
    return VideoTuneTask(tiny, VideoTuneConfig(source_prompt=SWAN, **kw), frames=make_frames(frames, 32, 32, seed=3))


class Recorder(torch.nn.Module):
    """Stands in for the (wrapped) UNet in `loss`: records its inputs and what the task's
    video UNet has installed at that moment; returns zeros."""

    def __init__(self, task):
        super().__init__()
        self.task, self.calls = task, []

    def forward(self, sample, timestep, encoder_hidden_states=None, return_dict=True):
        processors = self.task.unet.attn_processors
        self.calls.append(dict(sample=sample.clone(), t=timestep.clone(), text=encoder_hidden_states.clone(),
                               processors=dict(processors)))
        return (torch.zeros_like(sample),)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_loss_is_the_ddpm_mse_of_a_clip_under_sparse_causal_attention(tiny, prediction):
    task = make_task(tiny)
    task.prediction_type = prediction
    try:
        g = torch.Generator().manual_seed(4)
        x0 = task.sample_batch(0, g, 2)  # (B, F, C, h, w) posterior samples
        assert x0.shape == (2, 4, 4, 4, 4)
        recorder = Recorder(task)
        loss = task.loss(recorder, x0, g)
        call = recorder.calls[0]
        sample, t = call["sample"], call["t"]
        assert sample.shape == (2, 4, 4, 4, 4) and t.shape == (2,)  # (B, C, F, h, w), one timestep per clip
        assert call["text"].shape == (8, 77, 32)  # the source prompt once per frame
        assert torch.equal(call["text"], task.text.expand(8, -1, -1))
        abar = tiny.alphas_cumprod[t].float().view(2, 1, 1, 1, 1)
        noisy = sample.transpose(1, 2)  # back to (B, F, C, h, w): frame f of clip b is x0[b, f] noised
        noise = (noisy - abar.sqrt() * x0) / (1 - abar).sqrt()
        assert noise.std() > 0.5  # unit Gaussian noise (the latents themselves are ~0.05)
        target = noise if prediction == "epsilon" else abar.sqrt() * noise - (1 - abar).sqrt() * x0
        torch.testing.assert_close(loss, target.square().mean(), rtol=1e-4, atol=1e-6)

        # the attention the forward pass ran with: sparse-causal (previous + first frame)
        # in every spatial self-attention layer, the motion modules' own processors untouched
        procs = call["processors"]
        spatial = [n for n in procs if ".motion_modules." not in n and ".attn1." in n]
        assert spatial and all(isinstance(procs[n], FateZeroAttnProcessor) and procs[n].cross_frame for n in spatial)
        state = procs[spatial[0]].state
        assert state.config.frame_attention == "previous+first" and state.call.groups == 2
        assert state.call.sources.tolist() == [[0, 0, 1, 2], [0, 0, 0, 0]]
        motion = [n for n in procs if ".motion_modules." in n]
        assert motion and all(type(procs[n]).__name__ == "AttnProcessor2_0" for n in motion)
    finally:
        task.close()
    assert not any(isinstance(p, FateZeroAttnProcessor) for p in task.unet.attn_processors.values())


def test_tuning_improves_the_reconstruction_of_the_clip(tiny, tmp_path):
    """One-shot tuning (60 steps, lr 1e-3 on the tiny random model) makes DDIM inversion
    + reconstruction of the clip under its source prompt better: the reconstructed
    latents come closer to the clip's (measured 7.9 -> 2.3 relative L2, latent PSNR
    +10.9 dB: the random UNet is no denoiser, tuning makes it one for this clip). The
    pixel PSNRs are not asserted: the tiny random VAE decodes latents 200% off into
    frames only ~1 dB apart. Only Tune-A-Video's parameters move."""
    task = make_task(tiny, validation_steps=10)
    before = {n: p.detach().clone() for n, p in task.unet.named_parameters()}
    try:
        result = tune(task, TuneConfig(output_dir=str(tmp_path / "run"), steps=60, learning_rate=1e-3,
                                       checkpoint_every=0, validate_every=0, device="cpu", progress=False))
    finally:
        task.close()
    first, last = result.metrics[0], result.metrics[60]
    assert last["latent_error"] < 0.5 * first["latent_error"], result.metrics
    assert last["psnr_latent"] > first["psnr_latent"] + 6.0, result.metrics
    assert sorted(p.name for p in (tmp_path / "run" / "validation" / "step-000060").iterdir()) == [
        f"frame_{i:04d}.png" for i in range(4)]

    tuned = load_video_model(result.final_dir)  # the saved result loads and is the tuned model
    moved = {n for n, p in tuned.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(is_tuned(n) for n in moved)
    assert any(".attn2.to_q" in n for n in moved) and any(".motion_modules." in n and "proj_out" in n for n in moved)


def test_bad_settings_and_inputs_fail_in_one_line(tiny, tmp_path):
    with pytest.raises(ConfigError, match="--source-prompt"):
        VideoTuneConfig(source_prompt=" ")
    with pytest.raises(ConfigError, match="--max-frames"):
        VideoTuneConfig(source_prompt=SWAN, max_frames=0)
    with pytest.raises(InputError, match="not found"):
        read_clip(str(tmp_path / "missing.mp4"), 8, 64, 16)
    frames = make_frames(2, 32, 32) + make_frames(1, 48, 32)
    with pytest.raises(InputError, match="multiples of 16"):
        VideoTuneTask(tiny, VideoTuneConfig(source_prompt=SWAN), frames=frames)


def tune_command(argv):
    """`diffstream tune video ...` (the parser and entry point of the command, errors raised)."""
    from diffstream import cli
    from diffstream.commands import tune as tune_cmd

    return tune_cmd.command(cli.build_parser().parse_args(["tune", "video", *argv]))


def test_tune_video_then_edit_with_the_result(tmp_path, monkeypatch, capsys):
    """The loading round trip: `tune video` writes final/, `edit --video-model final/`
    loads it (its base model from the folder) and edits the clip end to end."""
    from diffstream import cli
    from diffstream.testing import write_video

    clip = write_video(tmp_path / "in.mp4", make_frames(4, 32, 32, seed=6), fps=10)
    argv = [clip, "-o", str(tmp_path / "run"), "--source-prompt", SWAN, "--model", "tiny", "--device", "cpu",
            "--size", "32", "--max-frames", "4", "--steps", "2", "--learning-rate", "1e-3", "--validate-every", "0",
            "--checkpoint-every", "1", "--validation-steps", "2", "--no-progress"]
    assert cli.main(["tune", "video", *argv]) == 0
    out = capsys.readouterr()
    final = tmp_path / "run" / "final"
    assert f"--video-model {final}" in out.out and "reconstruction PSNR" in out.err
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-000001", "step-000002"]
    edited = tmp_path / "edited"
    assert cli.main(["edit", clip, "-o", str(edited), "--method", "fatezero", "--video-model", str(final),
                     "--device", "cpu", "--size", "32", "--source-prompt", SWAN, "--prompt",
                     "a white duck swimming in a river", "--steps", "2", "--no-progress"]) == 0
    assert len(list(edited.glob("*.png"))) == 4


def test_tune_video_refuses_a_bad_clip_before_the_model_loads(tmp_path, monkeypatch):
    def no_model(*a, **kw):
        raise AssertionError("the model must not load")

    monkeypatch.setattr("diffstream.models.loading.load_components", no_model)
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    for clip, error in ((tmp_path / "missing.mp4", "not found"), (tmp_path / "broken.mp4", "broken.mp4")):
        with pytest.raises(InputError, match=error) as info:
            tune_command([str(clip), "-o", str(tmp_path / "run"), "--source-prompt", SWAN, "--model", "tiny",
                          "--device", "cpu"])
        assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="fp32"):
        tune_command([str(tmp_path / "missing.mp4"), "-o", str(tmp_path / "run"), "--source-prompt", SWAN,
                      "--dtype", "fp16"])


def test_ctrl_c_during_tune_video_leaves_a_checkpoint_that_edit_loads_and_tune_resumes(tmp_path):
    """SIGINT to a real `diffstream tune video` process: exit 130 naming the checkpoint;
    that checkpoint's model/ is a video model `edit` runs, and `--resume latest` finishes."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    from diffstream import cli
    from diffstream.testing import write_video
    from diffstream.tuning.loop import list_checkpoints

    clip = write_video(tmp_path / "in.mp4", make_frames(4, 32, 32, seed=6), fps=10)
    run = tmp_path / "run"
    argv = ["tune", "video", clip, "-o", str(run), "--source-prompt", SWAN, "--model", "tiny", "--device", "cpu",
            "--size", "32", "--max-frames", "4", "--learning-rate", "1e-3", "--validate-every", "0",
            "--checkpoint-every", "3", "--validation-steps", "2", "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-m", "diffstream", *argv, "--steps", "100000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while not list_checkpoints(run) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert list_checkpoints(run), proc.communicate()
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    last = list_checkpoints(run)[-1]
    step = json.loads((last / "state.json").read_text())["step"]
    assert f"interrupted at step {step}/100000" in stderr and "--resume latest" in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    edited = tmp_path / "edited"
    assert cli.main(["edit", clip, "-o", str(edited), "--method", "fatezero", "--video-model", str(last / "model"),
                     "--device", "cpu", "--size", "32", "--source-prompt", SWAN, "--prompt",
                     "a white duck swimming in a river", "--steps", "2", "--no-progress"]) == 0
    assert len(list(edited.glob("*.png"))) == 4
    assert cli.main([*argv, "--steps", str(step + 1), "--resume", "latest"]) == 0
    state = json.loads((list_checkpoints(run)[-1] / "state.json").read_text())
    assert state["step"] == step + 1 and len(state["losses"]) == step + 1
    assert (run / "final" / "video_model.json").is_file()
