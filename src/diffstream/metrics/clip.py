"""CLIP-based video metrics: temporal consistency, text score and frame accuracy.

Definitions (all with L2-normalised CLIP embeddings, so a dot product is a cosine):

- **Temporal consistency** -- mean cosine similarity of the image embeddings of every
  pair of consecutive frames. FateZero §4.3 calls it "Tem-Con" ("the cosine similarity
  between all pairs of consecutive frames") and reports it on the [0, 1] scale (e.g.
  0.965); StreamV2V §5.3.1 ("CLIP score": "the mean cosine similarity across all
  sequential frame pairs") and Live2Diff §4.1 ("CLIP score ... cosine similarity of the
  CLIP embeddings of pairs of adjacent frames") report the same quantity x100 (e.g.
  96.58, 95.77). Identical frames give exactly 1.
- **Text score** -- mean cosine similarity between each frame and the (target) prompt
  (the "CLIP score" of text-to-image work). None of the three papers tabulates it; it
  is given on the raw cosine scale and x100, the usual way CLIP-T scores are printed.
- **Frame accuracy** -- FateZero §4.3 "Fram-Acc": "the percentage of frames where the
  edited image has a higher CLIP similarity to the target prompt than the source
  prompt". Returned as a fraction in [0, 1] (FateZero prints it so, e.g. 0.903); ties
  count as misses.

The methods return raw cosines / fractions; `ClipResult` carries both conventions.
Embeddings are computed in batches; `ClipMeter` consumes frames one at a time and keeps
only running sums and one batch of frames, so long videos never sit in memory.
The papers use OpenAI's CLIP ViT-L/14 (FateZero, StreamV2V follow [9, 20]), which is
the default model here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np

from diffstream.frames import Frame

__all__ = ["DEFAULT_CLIP_MODEL", "ClipScorer", "ClipMeter", "ClipResult"]

DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"


def _features(output):
    """Projected embeddings from `get_*_features`, across transformers versions.

    transformers 4.x returns a tensor; 5.x returns a model output whose
    `pooler_output` holds the projected embedding.
    """
    import torch

    if isinstance(output, torch.Tensor):
        return output
    for name in ("pooler_output", "image_embeds", "text_embeds"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot read embeddings from {type(output).__name__}")


def _normalise(x):
    import torch

    x = x.float()
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-12)


class ClipScorer:
    """CLIP image/text embeddings and the metrics built on them.

    Args:
        clip_model: hub id or local folder with a CLIP checkpoint (model weights,
            preprocessor_config.json and tokenizer files), default
            "openai/clip-vit-large-patch14".
        device: torch device; default "cuda" when available, else "cpu".
        dtype: torch dtype of the model; default float32 (embeddings are always
            returned as float32). `from_components` keeps the model's dtype by default.
        local_files_only: passed to `from_pretrained` when not None (None lets the
            HF_HUB_OFFLINE environment decide).
    Raises:
        ModelLoadError: (one line, naming --clip-model PATH) if the checkpoint cannot
            be loaded: no network, missing folder, incomplete files.
    """

    def __init__(
        self,
        clip_model: str = DEFAULT_CLIP_MODEL,
        device=None,
        dtype=None,
        *,
        local_files_only: Optional[bool] = None,
    ):
        import torch

        model, image_processor, tokenizer = _load_clip(str(clip_model), local_files_only)
        self._setup(model, image_processor, tokenizer, device, dtype or torch.float32)
        self.name = str(clip_model)

    @classmethod
    def from_components(
        cls, model, image_processor, tokenizer=None, device=None, dtype=None
    ) -> "ClipScorer":
        """Build from already constructed objects (tests, or a model the caller loaded).

        Args:
            model: a `transformers.CLIPModel` (anything with get_image_features /
                get_text_features).
            image_processor: a CLIPImageProcessor, or a CLIPProcessor (then `tokenizer`
                may be omitted and is taken from it).
            tokenizer: a CLIP tokenizer (callable returning input_ids/attention_mask).
        """
        if tokenizer is None:
            tokenizer = getattr(image_processor, "tokenizer", None)
            image_processor = getattr(image_processor, "image_processor", image_processor)
        if tokenizer is None:
            raise ValueError("a tokenizer is required (or pass a CLIPProcessor)")
        self = cls.__new__(cls)
        self._setup(model, image_processor, tokenizer, device, dtype)
        self.name = getattr(getattr(model, "config", None), "_name_or_path", "") or "<custom>"
        return self

    def _setup(self, model, image_processor, tokenizer, device, dtype) -> None:
        import torch

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if dtype is None:
            dtype = next(model.parameters()).dtype
        self.dtype = dtype
        self.model = model.to(device=self.device, dtype=dtype).eval()
        self.image_processor = image_processor
        self.tokenizer = tokenizer

    # ------------------------------------------------------------------ embeddings

    def image_embeddings(self, frames: Iterable[Frame], batch_size: int = 16):
        """L2-normalised CLIP image embeddings.

        Args:
            frames: RGB uint8 frames (H, W, 3); any sizes (the processor resizes and
                centre-crops each to the model's input size). An iterable is consumed
                `batch_size` frames at a time.
        Returns:
            (N, D) float32 tensor on the CPU, rows of unit length.
        """
        import torch

        chunks, batch = [], []
        for frame in frames:
            batch.append(np.ascontiguousarray(frame))
            if len(batch) >= batch_size:
                chunks.append(self._embed_images(batch))
                batch = []
        if batch:
            chunks.append(self._embed_images(batch))
        if not chunks:
            dim = int(getattr(self.model.config, "projection_dim", 0))
            return torch.zeros((0, dim), dtype=torch.float32)
        return torch.cat(chunks, dim=0)

    def _embed_images(self, frames: list):
        import torch

        try:
            inputs = self.image_processor(
                images=frames, return_tensors="pt", input_data_format="channels_last"
            )
        except (TypeError, ValueError):  # processors without input_data_format
            inputs = self.image_processor(images=frames, return_tensors="pt")
        pixels = inputs["pixel_values"].to(device=self.device, dtype=self.dtype)
        with torch.inference_mode():
            out = self.model.get_image_features(pixel_values=pixels)
        return _normalise(_features(out)).cpu()

    def text_embeddings(self, prompts: str | Sequence[str]):
        """L2-normalised CLIP text embeddings, (P, D) float32 on the CPU."""
        import torch

        if isinstance(prompts, str):
            prompts = [prompts]
        max_length = getattr(
            getattr(self.model.config, "text_config", None), "max_position_embeddings", 77
        )
        tok_max = getattr(self.tokenizer, "model_max_length", max_length) or max_length
        tokens = self.tokenizer(
            list(prompts),
            padding=True,
            truncation=True,
            max_length=min(int(max_length), int(tok_max)),
            return_tensors="pt",
        )
        kwargs = {"input_ids": tokens["input_ids"].to(self.device)}
        if "attention_mask" in tokens:
            kwargs["attention_mask"] = tokens["attention_mask"].to(self.device)
        with torch.inference_mode():
            out = self.model.get_text_features(**kwargs)
        return _normalise(_features(out)).cpu()

    # --------------------------------------------------------------------- metrics

    def meter(
        self,
        target_prompt: Optional[str] = None,
        source_prompt: Optional[str] = None,
        batch_size: int = 16,
    ) -> "ClipMeter":
        """A streaming accumulator bound to this scorer (see `ClipMeter`)."""
        return ClipMeter(self, target_prompt, source_prompt, batch_size=batch_size)

    def evaluate(
        self,
        frames: Iterable[Frame],
        target_prompt: Optional[str] = None,
        source_prompt: Optional[str] = None,
        batch_size: int = 16,
    ) -> "ClipResult":
        """All CLIP metrics in one pass over `frames` (embedded once)."""
        meter = self.meter(target_prompt, source_prompt, batch_size)
        for frame in frames:
            meter.update(frame)
        return meter.result()

    def temporal_consistency(self, frames: Iterable[Frame], batch_size: int = 16) -> float:
        """Mean cosine similarity of consecutive frame embeddings, in [-1, 1] (x1 scale).

        FateZero's Tem-Con; StreamV2V's and Live2Diff's "CLIP score" is this x100.
        NaN for fewer than two frames.
        """
        return self.evaluate(frames, batch_size=batch_size).temporal_consistency

    def text_score(self, frames: Iterable[Frame], prompt: str, batch_size: int = 16) -> float:
        """Mean cosine similarity between each frame and `prompt` (x1 scale; NaN if empty)."""
        return self.evaluate(frames, prompt, batch_size=batch_size).text_score

    def frame_accuracy(
        self,
        frames: Iterable[Frame],
        target_prompt: str,
        source_prompt: str,
        batch_size: int = 16,
    ) -> float:
        """Share of frames closer to `target_prompt` than to `source_prompt` (FateZero)."""
        return self.evaluate(frames, target_prompt, source_prompt, batch_size).frame_accuracy


@dataclass(frozen=True)
class ClipResult:
    """CLIP metrics of one video; raw cosines / fractions, with x100 properties.

    Attributes:
        frames: number of frames scored.
        temporal_consistency: mean consecutive-frame cosine (NaN for < 2 frames).
        text_score: mean frame-to-target-prompt cosine (None without a target prompt).
        frame_accuracy: share of frames with sim(target) > sim(source), in [0, 1]
            (None without both prompts).
    """

    frames: int
    temporal_consistency: float
    text_score: Optional[float] = None
    frame_accuracy: Optional[float] = None

    @property
    def temporal_consistency_100(self) -> float:
        """The StreamV2V / Live2Diff "CLIP score" convention."""
        return 100.0 * self.temporal_consistency

    @property
    def text_score_100(self) -> Optional[float]:
        return None if self.text_score is None else 100.0 * self.text_score

    def to_dict(self) -> dict:
        """JSON-friendly summary (NaN becomes None)."""

        def clean(x):
            return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)

        return {
            "frames": self.frames,
            "clip_temporal_consistency": clean(self.temporal_consistency),
            "clip_temporal_consistency_x100": clean(self.temporal_consistency_100),
            "clip_text_score": clean(self.text_score),
            "clip_text_score_x100": clean(self.text_score_100),
            "clip_frame_accuracy": clean(self.frame_accuracy),
        }


class ClipMeter:
    """Streaming CLIP metrics: `update(frame)` per output frame, then `result()`.

    Frames are embedded `batch_size` at a time; only the running sums, the last
    embedding and at most one pending batch are kept.
    """

    def __init__(
        self,
        scorer: ClipScorer,
        target_prompt: Optional[str] = None,
        source_prompt: Optional[str] = None,
        batch_size: int = 16,
    ):
        if source_prompt is not None and target_prompt is None:
            raise ValueError("frame accuracy needs a target prompt as well as the source prompt")
        self.scorer = scorer
        self.batch_size = max(1, int(batch_size))
        self._target = self._source = None
        if target_prompt is not None:
            prompts = [target_prompt] + ([source_prompt] if source_prompt is not None else [])
            text = scorer.text_embeddings(prompts)
            self._target = text[0]
            self._source = text[1] if source_prompt is not None else None
        self._pending: list = []
        self._last = None
        self._frames = 0
        self._pairs = 0
        self._sum_consecutive = 0.0
        self._sum_text = 0.0
        self._hits = 0

    def update(self, frame: Frame) -> None:
        """Add one frame (embedded when a batch is full)."""
        self._pending.append(np.ascontiguousarray(frame))
        if len(self._pending) >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        """Embed the pending frames now."""
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        self.add_embeddings(self.scorer.image_embeddings(batch, batch_size=len(batch)))

    def add_embeddings(self, embeddings) -> None:
        """Add frames by their (already L2-normalised) image embeddings, (N, D)."""
        import torch

        emb = torch.as_tensor(embeddings).float().cpu()
        if emb.ndim == 1:
            emb = emb[None]
        if emb.shape[0] == 0:
            return
        chain = emb if self._last is None else torch.cat([self._last[None], emb], dim=0)
        if chain.shape[0] >= 2:
            cos = (chain[:-1] * chain[1:]).sum(dim=-1)
            self._sum_consecutive += float(cos.double().sum())
            self._pairs += int(cos.shape[0])
        self._last = emb[-1].clone()
        self._frames += int(emb.shape[0])
        if self._target is not None:
            sim_t = emb @ self._target
            self._sum_text += float(sim_t.double().sum())
            if self._source is not None:
                sim_s = emb @ self._source
                self._hits += int((sim_t > sim_s).sum())

    def result(self) -> ClipResult:
        self.flush()
        n = self._frames
        tc = self._sum_consecutive / self._pairs if self._pairs else float("nan")
        text = None
        acc = None
        if self._target is not None:
            text = self._sum_text / n if n else float("nan")
            if self._source is not None:
                acc = self._hits / n if n else float("nan")
        return ClipResult(frames=n, temporal_consistency=tc, text_score=text, frame_accuracy=acc)


def _load_clip(name: str, local_files_only: Optional[bool]):
    """(model, image_processor, tokenizer) from a hub id or folder, or ModelLoadError."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    from diffstream.models.hub import load_pretrained_parts

    return load_pretrained_parts(name, (CLIPModel, AutoImageProcessor, AutoTokenizer), "CLIP model",
                                 "--clip-model", local_files_only)
