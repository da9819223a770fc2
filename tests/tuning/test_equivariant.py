"""Fairy's equivariant fine-tuning (issue #15) on the tiny models: the augmentation moves
points where a hand computation says and gives input and edit the same transform, the loss
is InstructPix2Pix's written out by hand (epsilon and v), conditioning dropout drops what
Brooks et al. drop, every malformed dataset fails in one line naming the file before
anything trains, a short run lowers the loss, and what it saves (a diffusers folder or a
LoRA file) is what `diffstream edit --method fairy` runs."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from diffstream import frames as F
from diffstream.errors import InputError
from diffstream.testing import make_frames
from diffstream.tuning.equivariant import (LORA_FILE, Affine, AffineRanges, EquivariantConfig, EquivariantTask,
                                           apply_affine, instruct_from_text_model, load_base, load_triplets,
                                           random_affine)
from diffstream.tuning.loop import TuneConfig, tune

INSTR = "swap red and blue"
SIZE = 32  # the training crop; the tiny model's multiple is 16


def swap(image):
    return np.ascontiguousarray(image[:, :, ::-1])


def write_folder(root: Path, count=3, h=40, w=48) -> Path:
    """input/i.png, edited/i.png (R and B swapped), one instruction.txt for all."""
    (root / "input").mkdir(parents=True)
    (root / "edited").mkdir()
    for i, frame in enumerate(make_frames(count, h, w, seed=3)):
        F.save_image(root / "input" / f"{i}.png", frame)
        F.save_image(root / "edited" / f"{i}.png", swap(frame))
    (root / "instruction.txt").write_text(INSTR + "\n")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("triplets"))


@pytest.fixture(scope="module")
def triplets(data):
    return load_triplets(data)


def run_cli(argv):
    from diffstream.cli import main

    return main([str(a) for a in argv])


# --- the augmentation ---------------------------------------------------------------------

def test_affine_matrix_and_warp_move_points_as_computed_by_hand():
    """A 90 degree turn about the centre (15.5, 15.5) of a 32x32 image, then a shift of a
    quarter width: p - c = (-10.5, -6.5) turns to (6.5, -10.5), + c + (8, 0) = (30, 5)."""
    affine = Affine(angle=90, tx=0.25)
    assert np.allclose(affine.matrix(32, 32) @ [5, 9, 1], [30, 5])
    source, target = np.zeros((32, 32, 3), np.uint8), np.zeros((32, 32, 3), np.uint8)
    source[9, 5] = 255  # (x, y) = (5, 9)
    target[12, 20] = 200  # (20, 12) - c = (4.5, -3.5) -> (3.5, 4.5) -> (27, 20)
    moved_source, moved_target = apply_affine(source, target, affine)
    assert np.argwhere(moved_source[..., 0]).tolist() == [[5, 30]]
    assert np.argwhere(moved_target[..., 0]).tolist() == [[20, 27]]
    assert moved_source[5, 30, 0] == 255 and moved_target[20, 27, 0] == 200


def test_random_affine_stays_in_its_ranges_and_follows_the_generator():
    ranges = AffineRanges(degrees=5, translate=0.05, scale=(0.95, 1.05), shear=5)
    draws = [random_affine(torch.Generator().manual_seed(s), ranges) for s in range(50)]
    for a in draws:
        assert abs(a.angle) <= 5 and abs(a.tx) <= 0.05 and abs(a.ty) <= 0.05 and 0.95 <= a.scale <= 1.05
        assert abs(a.shear_x) <= 5 and abs(a.shear_y) <= 5
    assert max(abs(a.angle) for a in draws) > 4 and min(a.scale for a in draws) < 0.96  # the ranges are used
    assert random_affine(torch.Generator().manual_seed(3), ranges) == draws[3]
    identity = random_affine(torch.Generator().manual_seed(0), AffineRanges(0, 0, (1.0, 1.0), 0))
    assert np.allclose(identity.matrix(48, 40), [[1, 0, 0], [0, 1, 0]])


def test_a_batch_gives_input_and_edit_the_same_crop_and_transform(triplets):
    """The edit is a per-pixel colour swap, which commutes with any warp and crop: every
    augmented target is still exactly the swap of its augmented input."""
    components, _ = load_base("tiny", "cpu")
    task = EquivariantTask(components, triplets, EquivariantConfig(size=SIZE))
    batch = task.sample_batch(0, torch.Generator().manual_seed(0), 6)
    assert batch["source"].shape == (6, 3, SIZE, SIZE) and batch["instructions"] == [INSTR] * 6
    assert torch.equal(batch["target"], batch["source"][:, [2, 1, 0]])
    again = task.sample_batch(0, torch.Generator().manual_seed(0), 6)
    assert torch.equal(again["source"], batch["source"])  # every draw comes from the generator
    # ...and the augmentation did move things: black corners from the affine border.
    assert (batch["source"] == -1).all(dim=1).any()


# --- the model and the loss --------------------------------------------------------------------

def test_widening_keeps_the_text_to_image_model():
    """Brooks et al. Sec. 3.2: the new input channels start at zero, so the widened UNet
    is the original whatever the image channels hold."""
    from diffstream.models.components import Components
    from diffstream.models.tiny import tiny_components

    components = Components(name="tiny4", **tiny_components())
    original = copy.deepcopy(components.unet)
    instruct_from_text_model(components)
    assert components.unet_in_channels == 8 and components.unet.config.in_channels == 8
    x, image = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    text = torch.randn(2, 77, 32)
    with torch.no_grad():
        expected = original(x, 10, encoder_hidden_states=text).sample
        got = components.unet(torch.cat([x, image], 1), 10, encoder_hidden_states=text).sample
    assert torch.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_loss_is_instruct_pix2pix_written_out_by_hand(triplets, prediction):
    """mse(unet([sqrt(a) x0 + sqrt(1 - a) e, mode(E(source))], t, text), e or v) with
    v = sqrt(a) e - sqrt(1 - a) x0; the draws in the documented order: posterior sample,
    noise, timesteps, dropout uniforms."""
    from diffusers import LCMScheduler

    components, _ = load_base("tiny", "cpu")
    components.scheduler = LCMScheduler.from_config(components.scheduler.config, prediction_type=prediction)
    task = EquivariantTask(components, triplets, EquivariantConfig(size=SIZE, conditioning_dropout=0.0))
    batch = task.sample_batch(0, torch.Generator().manual_seed(1), 2)
    loss = task.loss(components.unet, batch, torch.Generator().manual_seed(5))

    g = torch.Generator().manual_seed(5)
    vae, unet = components.vae, components.unet
    with torch.no_grad():
        posterior = vae.encode(batch["target"]).latent_dist
        sample = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
        x0 = sample * vae.config.scaling_factor
        eps = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (2,), generator=g)
        a = components.scheduler.alphas_cumprod[t].view(2, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * eps
        source = vae.encode(batch["source"]).latent_dist.mode()
        text = components.encode_prompt([INSTR, INSTR])
        out = unet(torch.cat([noisy, source], 1), t, encoder_hidden_states=text).sample
        wanted = eps if prediction == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0
    assert loss.item() == pytest.approx(torch.nn.functional.mse_loss(out, wanted).item(), rel=1e-4)


class Spy(torch.nn.Module):
    """Records what the loss feeds the UNet; predicts zeros."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.inputs = []

    def forward(self, sample, timestep, encoder_hidden_states, return_dict=False):
        self.inputs.append((sample.detach(), encoder_hidden_states.detach()))
        return (sample[:, :4] * 0 + self.weight,)


def test_conditioning_dropout_drops_text_image_and_both(triplets):
    """Brooks et al. Sec. 3.2 (and diffusers' train_instruct_pix2pix): q of the samples lose
    the text only, q the image only, q both; the others see the instruction and the
    unscaled posterior mode of their input."""
    components, _ = load_base("tiny", "cpu")
    q, n = 0.2, 200
    task = EquivariantTask(components, triplets, EquivariantConfig(size=16, crop_ratio=1.0, conditioning_dropout=q))
    batch = task.sample_batch(0, torch.Generator().manual_seed(2), n)
    spy = Spy()
    task.loss(spy, batch, torch.Generator().manual_seed(3))
    (sample, text), = spy.inputs
    # The uniforms p come after the posterior sample, the noise and the timesteps.
    g = torch.Generator().manual_seed(3)
    shape = (n, 4, 2, 2)  # 16 px through the 8x VAE
    torch.randn(shape, generator=g), torch.randn(shape, generator=g), torch.randint(0, 1000, (n,), generator=g)
    p = torch.rand(n, generator=g)
    null, instruction = components.encode_prompt(["", INSTR])
    no_image = (sample[:, 4:] == 0).flatten(1).all(1)
    no_text = (text == null).flatten(1).all(1)
    assert torch.equal(no_text, p < 2 * q) and torch.equal(no_image, (p >= q) & (p < 3 * q))
    assert (text[~no_text] == instruction).all()
    for fraction in ((no_text & ~no_image), (no_image & ~no_text), (no_text & no_image)):
        assert abs(fraction.float().mean().item() - q) < 0.1  # q each, 3q in all
    with torch.no_grad():
        source = components.vae.encode(batch["source"]).latent_dist.mode()
    assert torch.equal(sample[~no_image, 4:], source[~no_image])


def test_save_and_load_trainable_round_trip(triplets, tmp_path):
    for rank in (None, 2):
        components, _ = load_base("tiny", "cpu")
        task = EquivariantTask(components, triplets, EquivariantConfig(size=SIZE, lora_rank=rank), base="tiny")
        module = task.module()
        trainable = [p for p in module.parameters() if p.requires_grad]
        assert (rank is None) == (len(trainable) == len(list(module.parameters())))
        with torch.no_grad():
            for p in trainable:
                p.add_(0.01)
        saved = {k: v.clone() for k, v in module.state_dict().items()}
        folder = tmp_path / f"rank{rank}"
        folder.mkdir()
        task.save(module, folder)
        with torch.no_grad():
            for p in trainable:
                p.zero_()
        task.load_trainable(module, folder)
        assert all(torch.equal(v, saved[k]) for k, v in module.state_dict().items())


# --- malformed data ----------------------------------------------------------------------------

def _break(root: Path, how: str) -> str:
    """Damage a valid triplet folder; returns the path the error must name."""
    if how == "missing edited":
        (root / "edited" / "1.png").unlink()
        return str(root / "edited" / "1.png")
    if how == "unreadable":
        (root / "input" / "2.png").write_bytes(b"not a png at all")
        return str(root / "input" / "2.png")
    if how == "empty instruction":
        (root / "instructions").mkdir()
        (root / "instructions" / "0.txt").write_text("  \n")
        return str(root / "instructions" / "0.txt")
    if how == "size mismatch":
        F.save_image(root / "edited" / "1.png", make_frames(1, 40, 40)[0])
        return str(root / "edited" / "1.png")
    if how == "no instruction":
        (root / "instruction.txt").unlink()
        return str(root / "instructions" / "0.txt")
    if how == "edit without input":
        F.save_image(root / "edited" / "9.png", make_frames(1, 40, 48)[0])
        return str(root / "edited" / "9.png")
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["missing edited", "unreadable", "empty instruction", "size mismatch",
                                 "no instruction", "edit without input"])
def test_a_malformed_folder_names_the_file(tmp_path, how):
    root = write_folder(tmp_path / "data")
    named = _break(root, how)
    with pytest.raises(InputError) as err:
        load_triplets(root)
    assert named in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("name,text,where", [
    ("manifest.json", '[{"input": "input/0.png", "instruction": "x", "edited": "edited/0.png"},', "not valid JSON"),
    ("manifest.json", '[{"input": "input/0.png", "instruction": "x", "edited": "edited/0.png"}, '
                      '{"input": "input/1.png", "instruction": "x"}]', "entry 2: no 'edited'"),
    ("manifest.jsonl", '{"input": "input/0.png", "instruction": "x", "edited": "edited/0.png"}\n'
                       '{"input": "input/1.png", "instruction": "x", "edited": "edited/7.png"}', "edited/7.png"),
    ("manifest.csv", "input_image,edit_prompt,edited_image\ninput/0.png,x,edited/0.png\ninput/1.png,,edited/1.png\n",
     "row 3: an empty instruction"),
    ("manifest.json", "[]", "no triplets"),
])
def test_a_malformed_manifest_names_the_file_and_entry(tmp_path, name, text, where):
    root = write_folder(tmp_path / "data")
    (root / name).write_text(text)
    with pytest.raises(InputError) as err:
        load_triplets(root)
    message = str(err.value)
    assert name in message and where in message and "\n" not in message


def test_manifests_in_every_format_read_the_same_triplets(tmp_path, data):
    rows = [dict(input=f"input/{i}.png", instruction=INSTR, edited=f"edited/{i}.png") for i in range(3)]
    root = write_folder(tmp_path / "data")
    (root / "list.json").write_text(json.dumps(rows))
    (root / "list.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (root / "list.csv").write_text("input_image,edit_prompt,edited_image\n" +
                                   "".join(f"{r['input']},{r['instruction']},{r['edited']}\n" for r in rows))
    expected = [(t.input.name, t.instruction, t.edited.name) for t in load_triplets(data)]
    for name in ("list.json", "list.jsonl", "list.csv"):
        got = [(t.input.name, t.instruction, t.edited.name) for t in load_triplets(root / name)]
        assert got == expected, name


def test_the_command_checks_the_data_before_the_model_and_keeps_checkpoints(tmp_path, capsys, cli_run):
    """Malformed data fails before any model loads (a missing --model is not reached) and
    before the output folder is touched: a run's checkpoints are left as they were."""
    root = write_folder(tmp_path / "data")
    named = _break(root, "size mismatch")
    out = tmp_path / "out"
    assert run_cli(["tune", "equivariant", root, "-o", out, "--model", tmp_path / "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert named in err and "no-such-model" not in err and not out.exists()
    run_dir, _ = cli_run
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert run_cli(["tune", "equivariant", root, "-o", run_dir, "--model", "toy", "--resume", "latest"]) == 2
    assert named in capsys.readouterr().err
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before


# --- tuning runs and what they save ---------------------------------------------------------

CONFIG = EquivariantConfig(size=SIZE, validation_steps=2, guidance=1.0, image_guidance=1.0)


def fixed_loss(task, module) -> float:
    """The loss on the same four batches, noise and timesteps, whatever the weights."""
    with torch.no_grad():
        return float(np.mean([task.loss(module, task.sample_batch(0, torch.Generator().manual_seed(100 + i), 4),
                                        torch.Generator().manual_seed(200 + i)).item() for i in range(4)]))


def _tuned(tmp_path_factory, triplets, rank, lr):
    components, _ = load_base("tiny", "cpu")
    task = EquivariantTask(components, triplets, dataclasses_replace(CONFIG, lora_rank=rank), base="tiny")
    start = fixed_loss(task, task.module())
    out = tmp_path_factory.mktemp(f"tuned{rank}")
    result = tune(task, TuneConfig(output_dir=str(out), steps=12, learning_rate=lr, batch_size=2,
                                   checkpoint_every=0, validate_every=0, device="cpu", progress=False))
    task.module().eval()
    return task, result, start


def dataclasses_replace(config, **changes):
    import dataclasses

    return dataclasses.replace(config, **changes)


@pytest.fixture(scope="module")
def tuned_full(tmp_path_factory, triplets):
    return _tuned(tmp_path_factory, triplets, None, 1e-3)


@pytest.fixture(scope="module")
def tuned_lora(tmp_path_factory, triplets):
    return _tuned(tmp_path_factory, triplets, 4, 1e-2)


def test_a_short_run_lowers_the_loss(tuned_full):
    task, result, start = tuned_full
    assert fixed_loss(task, task.module()) < 0.9 * start
    assert len(result.losses) == 12 and result.metrics[0]["equivariance_error"] >= 0
    folder = result.final_dir.parent
    assert (folder / "validation" / "step-000000" / "equivariance.png").is_file()
    assert (folder / "validation" / "step-000012" / "equivariance.png").is_file()


def _edit_with_cli(tmp_path, clip, model_args):
    out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
    code = run_cli(["edit", clip, "-o", f"{out}/", "--method", "fairy", "--instruction", INSTR, *model_args,
                    "--device", "cpu", "--steps", "2", "--size", SIZE, "--anchors", "1", "--seed", "0",
                    "--no-progress"])
    assert code == 0
    return [F.load_image(p) for p in sorted(out.iterdir())]


def _edit_in_memory(components, clip):
    from diffstream.pipelines.fairy import FairyConfig, FairyPipeline

    config = FairyConfig(instruction=INSTR, steps=2, size=SIZE, anchors=1)
    with FairyPipeline(components, config) as pipe:
        return list(pipe.edit(clip))


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    for i, frame in enumerate(make_frames(3, SIZE, SIZE, seed=9)):
        F.save_image(folder / f"{i}.png", frame)
    return folder


def test_the_tuned_folder_is_what_edit_runs(tuned_full, clip, tmp_path):
    task, result, _ = tuned_full
    written = _edit_with_cli(tmp_path, clip, ["--model", result.final_dir])
    expected = _edit_in_memory(task.components, str(clip))
    assert len(written) == 3 and all(np.array_equal(a, b) for a, b in zip(written, expected))


def test_the_lora_file_is_what_edit_runs(tuned_lora, clip, tmp_path):
    task, result, start = tuned_lora
    assert sorted(p.name for p in result.final_dir.iterdir()) == [LORA_FILE]  # the base is `tiny` itself
    written = _edit_with_cli(tmp_path, clip, ["--model", "tiny", "--lora", result.final_dir / LORA_FILE])
    expected = _edit_in_memory(task.components, str(clip))
    base = _edit_with_cli(tmp_path, clip, ["--model", "tiny"])
    diff = max(np.abs(a.astype(int) - b).max() for a, b in zip(written, expected))
    moved = np.mean([np.abs(a.astype(int) - b).mean() for a, b in zip(expected, base)])
    assert diff <= 1 and moved > 5  # fused LoRA == peft LoRA; and the LoRA matters
    assert task.usage(result.final_dir).endswith(f"--model tiny --lora {result.final_dir / LORA_FILE}")


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, data):
    """`diffstream tune equivariant` on the toy model (widened) with a LoRA: 3 steps."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("cli") / "run"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = run_cli(["tune", "equivariant", data, "-o", out, "--model", "toy", "--device", "cpu",
                        "--lora-rank", "2", "--size", SIZE, "--steps", "3", "--checkpoint-every", "2",
                        "--validate-every", "0", "--validation-steps", "1", "--no-progress"])
    assert code == 0
    return out, printed.getvalue()


def test_the_command_writes_a_lora_and_its_widened_base(cli_run, clip, tmp_path):
    out, printed = cli_run
    final = out / "final"
    assert printed.strip().endswith(f"--model {final / 'base'} --lora {final / LORA_FILE}")
    assert (final / LORA_FILE).is_file() and (final / "base" / "model_index.json").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000003"]
    assert (out / "log.jsonl").read_text().count("\n") == 3
    written = _edit_with_cli(tmp_path, clip, ["--model", final / "base", "--lora", final / LORA_FILE])
    assert len(written) == 3
