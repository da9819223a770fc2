"""FateZero editing on the tiny model: inversion, fusion, windows, store modes."""

import json

import numpy as np
import pytest
import torch

from diffstream.attention.fatezero import ATTENTION_KINDS, FateZeroConfig
from diffstream.errors import ConfigError, InputError
from diffstream.pipelines.fatezero import (
    FateZeroEditConfig,
    FateZeroEditor,
    edit_frames,
    plan_windows,
)
from diffstream.pipelines.prompt_align import align_prompts, reweighting, word_positions
from diffstream.testing import make_frames

SWAN = "a black swan swimming in a river"
DUCK = "a white duck swimming in a river"


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def unit_latents(rows, seed=0, hw=(4, 4)):
    """Unit-variance latents, the scale of real SD latents (the tiny VAE's are ~0.03)."""
    return torch.randn(rows, 4, *hw, generator=torch.Generator().manual_seed(seed))


def editor(tiny, prompt=SWAN, hw=(4, 4), **kw):
    fz = {k: kw.pop(k) for k in list(kw) if k in FateZeroConfig.__dataclass_fields__}
    config = FateZeroEditConfig(source_prompt=SWAN, prompt=prompt, fatezero=FateZeroConfig(**fz), **kw)
    return FateZeroEditor(tiny, config, hw)


# --- word alignment (real CLIP tokenizer) --------------------------------------------------
def test_alignment_of_identical_prompts_is_the_identity(tiny):
    assert align_prompts(tiny.tokenizer, SWAN, SWAN) == list(range(77))


def test_alignment_of_a_replaced_word(tiny):
    # [BOS a black swan ...] -> [BOS a white swan ...]: "white" has no source map
    mapper = align_prompts(tiny.tokenizer, SWAN, "a white swan swimming in a river")
    assert mapper == [0, 1, -1] + list(range(3, 77))
    # two replaced words of a different object
    assert align_prompts(tiny.tokenizer, SWAN, DUCK) == [0, 1, -1, -1] + list(range(4, 77))


def test_alignment_of_an_inserted_word_shifts_the_rest_and_the_padding(tiny):
    mapper = align_prompts(tiny.tokenizer, "a cat sitting on a mat", "a fat cat sitting on a mat")
    # BOS a | fat | cat sitting on a mat EOS pad...: the k-th padding reads the k-th padding
    assert mapper[:3] == [0, 1, -1]
    assert mapper[3:] == list(range(2, 76))


def test_alignment_of_a_removed_word(tiny):
    mapper = align_prompts(tiny.tokenizer, "a fat cat sitting on a mat", "a cat sitting on a mat")
    assert mapper[:2] == [0, 1]
    assert mapper[2:76] == list(range(3, 77))  # "fat" (source 2) is never read
    assert mapper[76] == -1  # the source ran out of padding


def test_alignment_of_prompts_of_different_length_with_a_multi_token_word(tiny):
    source = "a black swan swimming in a river"
    target = "a swarovski crystal swan swimming in a beautiful river"
    ids = tiny.tokenizer(target).input_ids
    mapper = align_prompts(tiny.tokenizer, source, target)
    assert [mapper[i] for i in range(len(ids))] == [0, 1, -1, -1, 3, 4, 5, 6, -1, 7, 8]
    assert word_positions(tiny.tokenizer, target, "swarovski crystal") == [2, 3]


def test_word_positions_and_reweighting(tiny):
    prompt = "a swan, a river and a swan"
    assert word_positions(tiny.tokenizer, prompt, "swan") == [2, 8]
    assert word_positions(tiny.tokenizer, prompt, "Swan") == [2, 8]  # CLIP lower-cases
    with pytest.raises(ConfigError, match="duck"):
        word_positions(tiny.tokenizer, prompt, "duck")
    weights = reweighting(tiny.tokenizer, "watercolor painting of a jeep", [("watercolor", 5.0)])
    assert weights[1] == 5.0 and weights.count(1.0) == 76


# --- inversion and reconstruction ----------------------------------------------------------
def test_ddim_inversion_then_reconstruction_returns_the_input(tiny):
    """Tolerance: relative L2 error below 15% at 100 steps, and first-order convergence
    (doubling the steps at least ~halves it). The random tiny UNet is no denoiser, so its
    eps changes more between neighbouring latents than a trained model's; the error is
    the DDIM discretisation the paper discusses (Sec. 3.2), not a loss in the code."""
    z0 = unit_latents(1)
    errors = {}
    for steps in (50, 100):
        ed = editor(tiny, steps=steps)
        store = ed.new_store()
        z_T = ed.invert(z0, [0], store)
        errors[steps] = rel(ed.reconstruct(z_T, [0]), z0)
        assert torch.equal(store.get(("latent", "z", steps)), z_T)
    assert errors[100] < 0.15, errors
    assert errors[100] < 0.65 * errors[50], errors


def test_edit_with_the_source_prompt_and_no_fusion_is_exactly_the_reconstruction(tiny):
    ed = editor(tiny, steps=10, guidance=1.0, cross_replace=0.0, self_replace=0.0)
    store = ed.new_store()
    z_T = ed.invert(unit_latents(2), [0, 0], store)
    assert torch.equal(ed.edit(store, [0, 0]), ed.reconstruct(z_T, [0, 0]))


def test_edit_with_the_source_prompt_and_full_fusion_reproduces_the_reconstruction(tiny):
    """Every map of every layer and step comes from the inversion; the edit then differs
    from the reconstruction only through the maps' one-step lag (inversion evaluates the
    UNet at z_{t-1}), which vanishes with the step size: < 5% at 20 steps and less than
    half of that at 80 (it is ~12x smaller than the reconstruction error itself)."""
    z0 = unit_latents(2, seed=1)
    diffs = []
    for steps in (20, 80):
        ed = editor(tiny, steps=steps, guidance=1.0, cross_replace=1.0, self_replace=1.0, fuse_min_downsample=1,
                    store_dtype="fp32")
        store = ed.new_store()
        z_T = ed.invert(z0, [0, 0], store)
        recon = ed.reconstruct(z_T, [0, 0])
        diffs.append(rel(ed.edit(store, [0, 0]), recon))
        assert diffs[-1] < 0.4 * rel(recon, z0)  # far closer to the reconstruction than to noise
    assert diffs[0] < 0.05 and diffs[1] < 0.5 * diffs[0], diffs


def test_measured_store_matches_the_plan(tiny):
    ed = editor(tiny, DUCK, steps=10, blend_words=("swan", "duck"), cross_replace=0.5, self_replace=0.7)
    store = ed.new_store()
    ed.invert(unit_latents(3), [1, 1, 1], store)
    assert store.nbytes_of(ATTENTION_KINDS) == ed.store_bytes(3) > 0
    assert {k for k in store.keys()} == ed.required_keys()


# --- store modes ---------------------------------------------------------------------------
def edit_once(tiny, **kw):
    ed = editor(tiny, DUCK, steps=6, blend_words=("swan", "duck"), **kw)
    store = ed.new_store()
    ed.invert(unit_latents(3, seed=2), [1, 1, 1], store)
    out = ed.edit(store, [1, 1, 1])
    return out, store


def test_recompute_gives_the_same_edit_as_the_store(tiny):
    stored, s1 = edit_once(tiny)
    recomputed, s2 = edit_once(tiny, fusion_source="recompute")
    assert s2.nbytes_of(ATTENTION_KINDS) == 0 and s1.nbytes_of(ATTENTION_KINDS) > 0
    assert torch.equal(stored, recomputed)


def test_spill_to_disk_gives_the_same_edit_as_in_memory(tiny):
    in_ram, s1 = edit_once(tiny, store_budget=None)
    on_disk, s2 = edit_once(tiny, store_budget=0)
    assert s1.disk_bytes == 0 and s2.ram_bytes == 0 and s2.disk_bytes == s1.ram_bytes
    assert torch.equal(in_ram, on_disk)


def test_fusion_changes_the_edit(tiny):
    fused, _ = edit_once(tiny)
    free, _ = edit_once(tiny, cross_replace=0.0, self_replace=0.0)
    assert not torch.allclose(fused, free)


# --- windows -------------------------------------------------------------------------------
def test_window_plan():
    w = plan_windows(5, 2, "middle")
    assert [x.rows for x in w] == [(0, 1, 2), (2, 3), (4, 2)]
    assert [x.ref_rows for x in w] == [(2, 2, 2), (0, 0), (1, 1)]
    assert [x.frames for x in w] == [(0, 1), (2, 3), (4,)]
    assert [x.rows for x in plan_windows(5, 2, "first")] == [(0, 1), (2, 3, 0), (4, 0)]
    p = plan_windows(5, 2, "previous")
    assert [x.rows for x in p] == [(0, 1), (1, 2, 3), (3, 4)]
    assert [x.ref_rows for x in p] == [(0, 0), (0, 0, 1), (0, 0)]
    assert [x.frames for x in p] == [(0, 1), (2, 3), (4,)]
    assert [x.rows for x in plan_windows(1, 8, "middle")] == [(0,)]


@pytest.mark.parametrize("reference", ["middle", "first"])
def test_windows_sharing_the_reference_frame_equal_the_whole_clip(tiny, reference):
    frames = make_frames(5, 32, 32, seed=3)
    config = FateZeroEditConfig(source_prompt=SWAN, prompt=DUCK, blend_words=("swan", "duck"), window=5,
                                fatezero=FateZeroConfig(steps=4, reference_frame=reference))
    whole = dict(edit_frames(tiny, frames, config))
    windowed = dict(edit_frames(tiny, frames, config.replace(window=2)))
    assert sorted(whole) == sorted(windowed) == list(range(5))
    for i in range(5):
        diff = np.abs(whole[i].astype(int) - windowed[i].astype(int)).max()
        assert diff <= 1, (i, diff)  # the same maths; batch size may move a float by an ulp


def test_previous_frame_windows_cover_the_clip_in_order(tiny):
    frames = make_frames(3, 32, 32)
    config = FateZeroEditConfig(source_prompt=SWAN, prompt=DUCK, window=2,
                                fatezero=FateZeroConfig(steps=2, reference_frame="previous"))
    out = list(edit_frames(tiny, frames, config))
    assert [i for i, _ in out] == [0, 1, 2] and out[0][1].shape == (32, 32, 3)


# --- saved inversions ----------------------------------------------------------------------
def test_a_saved_inversion_edits_like_a_fresh_one(tiny, tmp_path):
    frames = make_frames(3, 32, 32, seed=4)
    config = FateZeroEditConfig(source_prompt=SWAN, prompt=DUCK, window=2, store_budget=0,
                                fatezero=FateZeroConfig(steps=4))
    fresh = list(edit_frames(tiny, frames, config, save_inversion=tmp_path / "inv"))
    loaded = list(edit_frames(tiny, frames, config, load_inversion=tmp_path / "inv"))
    assert [i for i, _ in fresh] == [i for i, _ in loaded]
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(fresh, loaded))
    # another target prompt reuses the inversion
    other = list(edit_frames(tiny, frames, config.replace(prompt="a black goose swimming in a river"),
                             load_inversion=tmp_path / "inv"))
    assert len(other) == 3
    with pytest.raises(InputError, match="other frames"):
        list(edit_frames(tiny, make_frames(3, 32, 32, seed=5), config, load_inversion=tmp_path / "inv"))
    with pytest.raises(ConfigError, match="--steps"):
        list(edit_frames(tiny, frames, config.replace(fatezero=FateZeroConfig(steps=5)),
                         load_inversion=tmp_path / "inv"))
    with pytest.raises(ConfigError, match="blend"):
        list(edit_frames(tiny, frames, config.replace(blend_words=("swan", "duck")), load_inversion=tmp_path / "inv"))
    # an interrupted save holds fewer windows than the clip needs
    meta = json.loads((tmp_path / "inv" / "meta.json").read_text())
    (tmp_path / "inv" / "meta.json").write_text(json.dumps({**meta, "windows_done": 1}))
    with pytest.raises(InputError, match="1 of 2 windows"):
        list(edit_frames(tiny, frames, config, load_inversion=tmp_path / "inv"))
