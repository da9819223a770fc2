import json

import numpy as np
import pytest
import torch

torch.set_num_threads(1)

from diffstream.errors import ModelLoadError  # noqa: E402
from diffstream.metrics.clip import ClipMeter, ClipScorer  # noqa: E402

_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _write_tiny_tokenizer(directory):
    """A CLIP BPE tokenizer over single letters (no merges), written as vocab.json + merges.txt."""
    vocab = {}
    for c in _LETTERS:
        vocab[c] = len(vocab)
    for c in _LETTERS:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return len(vocab)


def _tiny_parts(tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    tok_dir = tmp_path / "tok"
    vocab_size = _write_tiny_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), pad_token="<|endoftext|>")
    config = CLIPConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=32,
            bos_token_id=vocab_size - 2,
            eos_token_id=vocab_size - 1,
            pad_token_id=vocab_size - 1,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    return model, processor, tokenizer


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    model, processor, tokenizer = _tiny_parts(tmp_path_factory.mktemp("clip"))
    return ClipScorer.from_components(model, processor, tokenizer, device="cpu")


def _frames(n, seed=0, size=(40, 48)):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size[0], size[1], 3), dtype=np.uint8) for _ in range(n)]


def test_embeddings_are_normalised(scorer):
    img = scorer.image_embeddings(_frames(5), batch_size=2)
    assert img.shape == (5, 16) and img.dtype == torch.float32
    assert torch.allclose(img.norm(dim=-1), torch.ones(5), atol=1e-5)
    txt = scorer.text_embeddings(["a cat", "a dog on a skateboard"])
    assert txt.shape == (2, 16)
    assert torch.allclose(txt.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(scorer.text_embeddings("a cat")[0], txt[0], atol=1e-5)


def test_batching_does_not_change_embeddings(scorer):
    frames = _frames(5, seed=1)
    a = scorer.image_embeddings(frames, batch_size=16)
    b = scorer.image_embeddings(iter(frames), batch_size=2)
    assert torch.allclose(a, b, atol=1e-5)


def test_identical_frames_are_perfectly_consistent(scorer):
    frame = _frames(1, seed=2)[0]
    value = scorer.temporal_consistency([frame] * 7, batch_size=3)
    assert value == pytest.approx(1.0, abs=1e-5)


def test_temporal_consistency_matches_definition(scorer):
    frames = _frames(6, seed=3)
    emb = scorer.image_embeddings(frames)
    expected = float((emb[:-1] * emb[1:]).sum(-1).mean())
    assert scorer.temporal_consistency(frames, batch_size=4) == pytest.approx(expected, abs=1e-5)
    assert np.isnan(scorer.temporal_consistency(frames[:1]))


def test_text_score_matches_definition(scorer):
    frames = _frames(4, seed=4)
    emb = scorer.image_embeddings(frames)
    txt = scorer.text_embeddings("a cat")[0]
    expected = float((emb @ txt).mean())
    assert scorer.text_score(frames, "a cat") == pytest.approx(expected, abs=1e-5)


def test_frame_accuracy_counts_frames_closer_to_target(scorer, monkeypatch):
    target = torch.tensor([1.0, 0.0, 0.0])
    source = torch.tensor([0.0, 1.0, 0.0])
    # Frame k is identified by its first pixel; frames 0, 2, 4 lean to the target,
    # 1, 3, 5 to the source, frame 6 is exactly in between (a tie counts as a miss).
    table = {
        0: [0.9, 0.1, 0.0],
        1: [0.2, 0.8, 0.0],
        2: [0.7, 0.3, 0.1],
        3: [0.0, 1.0, 0.0],
        4: [1.0, 0.0, 0.0],
        5: [0.4, 0.6, 0.0],
        6: [0.5, 0.5, 0.0],
    }

    def fake_images(frames, batch_size=16):
        rows = [torch.tensor(table[int(f[0, 0, 0])]) for f in frames]
        return torch.nn.functional.normalize(torch.stack(rows), dim=-1)

    def fake_text(prompts):
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return torch.stack([target if p == "target" else source for p in prompts])

    monkeypatch.setattr(scorer, "image_embeddings", fake_images)
    monkeypatch.setattr(scorer, "text_embeddings", fake_text)
    frames = [np.full((8, 8, 3), k, dtype=np.uint8) for k in range(7)]
    assert scorer.frame_accuracy(frames, "target", "source", batch_size=3) == 3 / 7
    assert scorer.frame_accuracy(frames[:6], "target", "source") == 0.5
    assert scorer.frame_accuracy(frames[:6], "source", "target") == 0.5
    result = scorer.evaluate(frames[:4], "target", "source", batch_size=2)
    assert result.frames == 4 and result.frame_accuracy == 0.5


def test_meter_streams_and_reports_both_scales(scorer):
    frames = _frames(5, seed=5)
    meter = ClipMeter(scorer, "a cat", "a dog", batch_size=2)
    for f in frames:
        meter.update(f)
    res = meter.result()
    assert res.frames == 5
    assert res.temporal_consistency == pytest.approx(scorer.temporal_consistency(frames), abs=1e-5)
    assert res.text_score == pytest.approx(scorer.text_score(frames, "a cat"), abs=1e-5)
    assert res.temporal_consistency_100 == pytest.approx(100 * res.temporal_consistency)
    assert 0.0 <= res.frame_accuracy <= 1.0
    d = res.to_dict()
    json.dumps(d)
    assert d["clip_frame_accuracy"] == res.frame_accuracy


def test_roundtrip_through_a_local_folder(tmp_path):
    model, processor, tokenizer = _tiny_parts(tmp_path)
    folder = tmp_path / "tiny-clip"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    loaded = ClipScorer(str(folder), device="cpu", local_files_only=True)
    reference = ClipScorer.from_components(model, processor, tokenizer, device="cpu")
    frames = _frames(2, seed=6)
    assert torch.allclose(
        loaded.image_embeddings(frames), reference.image_embeddings(frames), atol=1e-5
    )
    assert torch.allclose(
        loaded.text_embeddings("a cat"), reference.text_embeddings("a cat"), atol=1e-5
    )


@pytest.mark.parametrize("kind", ["missing_folder", "empty_folder"])
def test_unloadable_model_is_a_one_line_model_load_error(tmp_path, kind):
    if kind == "missing_folder":
        path = tmp_path / "no-such-clip"
    else:
        path = tmp_path / "empty"
        path.mkdir()
    with pytest.raises(ModelLoadError) as info:
        ClipScorer(str(path), device="cpu", local_files_only=True)
    message = str(info.value)
    assert "\n" not in message
    assert "--clip-model PATH" in message
