"""Fairy's anchor-based cross-frame attention (Wu et al., CVPR 2024, Sec. 4 and Fig. 4).

Fairy reads cross-frame attention as correspondence estimation: a token of one frame
attends most to the tokens of other frames that show the same content, so attending
across frames propagates features and keeps an edit consistent over time (Fig. 3).
Attending to *every* frame costs memory quadratic in the video length, so Fairy picks
K anchor frames and

1. generates the anchors together, each anchor's self-attention running over the
   tokens of all K anchors (Fig. 4a), and caches every self-attention layer's anchor
   keys K_anc and values V_anc, for every denoising step and every guidance branch;
2. generates every other frame with its self-attention replaced by attention over its
   own tokens plus the cached anchor tokens (Fig. 4b):

       Attn(Q, [K, K_anc], [V, V_anc]) = softmax(Q [K, K_anc]^T / sqrt(d)) [V, V_anc].

Step 2 needs nothing but the cache, so any frame can be generated at any time, in any
chunk, on any worker: memory depends on the chunk size and K, never on the video length.

Layout of a UNet batch while the mechanism is on (published by the pipeline through
`AnchorAttention.before_unet(layout)` before each UNet call, phases "record", "attend"
and "off" of `BatchLayout`): rows are branch-major, `(num_branches * frames)`, i.e. all
frames of guidance branch 0, then all frames of branch 1, and so on. Each branch has
its own cache entry, because the three InstructPix2Pix branches (text+image, image
only, neither) see different features.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from diffstream.attention.base import (
    compiler_opaque,
    ANCHOR_PHASES,
    AttentionInputs,
    BatchLayout,
    Mechanism,
    SDPAAttnProcessor,
    install_processors,
    is_self_attention,
)

MODES = ANCHOR_PHASES  # ("off", "record", "attend")


@dataclass(frozen=True)
class AnchorConfig:
    """Anchor-based attention settings.

    Attributes:
        num_anchors: K, the anchor frames sampled evenly over the clip. Fairy uses a
            handful (its ablation: 1 anchor restricts the global features too much, more
            than 7 loses detail); 0 turns the mechanism off (independent per-frame edits).
    """

    num_anchors: int = 3

    def __post_init__(self):
        if int(self.num_anchors) < 0:
            raise ValueError(f"num_anchors must be >= 0, got {self.num_anchors}")

    @property
    def enabled(self) -> bool:
        return self.num_anchors > 0


def anchor_indices(num_frames: int, num_anchors: int) -> tuple[int, ...]:
    """K anchor frame indices spread evenly over a clip of `num_frames` frames.

    Anchor i sits at the centre of the i-th of K equal parts of the clip, so one anchor
    is the middle frame and K >= num_frames makes every frame an anchor.

    Returns:
        sorted, distinct indices in [0, num_frames).
    """
    if num_frames <= 0 or num_anchors <= 0:
        return ()
    if num_anchors >= num_frames:
        return tuple(range(num_frames))
    return tuple(((2 * i + 1) * num_frames) // (2 * num_anchors) for i in range(num_anchors))


class AnchorState:
    """The anchor key/value cache of one clip and the mode of the next UNet call.

    Attributes:
        mode: "off" (plain self-attention), "record" (the batch is the anchors: attend
            across them and cache their keys/values) or "attend" (the batch is ordinary
            frames: attend to own + cached anchor keys/values).
        step: denoising-step index of the next UNet call (all rows share it).
        num_branches: guidance branches in the next UNet call (rows are branch-major).
        cache: (layer name, step) -> (keys, values), each (num_branches, heads, K*HW, d).
    """

    def __init__(self, config: AnchorConfig | None = None):
        self.config = config or AnchorConfig()
        self.reset()

    def reset(self) -> None:
        """Forget the cache (a new clip)."""
        self.mode = "off"
        self.step = 0
        self.num_branches = 1
        self.cache: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def begin_call(self, layout: BatchLayout) -> None:
        """Take the mode, step and branches of the next UNet call from its layout:
        "record" generates the anchors, "attend" ordinary frames against the cache, and
        every other phase uses plain self-attention."""
        if layout.phase in ("record", "attend"):
            self.mode = layout.phase
            self.step = int(layout.step)
            self.num_branches = layout.num_branches
        else:
            self.mode = "off"

    def end_call(self) -> None:
        """The call is over: later calls use plain self-attention until the next layout."""
        self.mode = "off"

    @property
    def nbytes(self) -> int:
        """Memory held by the cache in bytes."""
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.cache.values())

    def export(self) -> dict:
        """The cache as CPU tensors (to ship to another process, e.g. through Ray's object store)."""
        return {key: (k.cpu(), v.cpu()) for key, (k, v) in self.cache.items()}

    def load(self, cache: dict, device=None) -> None:
        """Install a cache made by `export` (on this process's `device`)."""
        self.cache = {key: (k.to(device), v.to(device)) for key, (k, v) in cache.items()}

    def store(self, name: str, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Cache one layer's anchor keys/values for the current step."""
        self.cache[(name, self.step)] = (keys, values)

    def fetch(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's cached anchor keys/values for the current step."""
        try:
            return self.cache[(name, self.step)]
        except KeyError:
            raise RuntimeError(
                f"no anchor cache for layer {name} at step {self.step}: generate the anchors first"
            ) from None


class AnchorAttnProcessor(SDPAAttnProcessor):
    """Self-attention over the anchors' tokens (Fairy Fig. 4); plain SDPA when the state is off.

    Args:
        name: the processor's name in the UNet (the cache key).
        state: the clip's shared `AnchorState`.
    """

    def __init__(self, name: str, state: AnchorState):
        self.name = name
        self.state = state

    @compiler_opaque  # stateful: the compiled graphs stop here (attention.base)
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)

    def keys_values(self, attn, inputs: AttentionInputs):
        state = self.state
        if state.mode == "off":
            return inputs.key, inputs.value
        branches = state.num_branches
        rows, heads, length, d = inputs.key.shape  # (branches*F, heads, HW, d)
        if rows % branches:
            raise RuntimeError(f"batch of {rows} rows does not split into {branches} guidance branches")
        frames = rows // branches
        if state.mode == "record":
            # Fig. 4a: each anchor attends to the tokens of all anchors of its branch.
            # (branches*F, heads, HW, d) -> (branches, heads, F*HW, d), frame-major tokens.
            keys = _frames_to_tokens(inputs.key, branches)
            values = _frames_to_tokens(inputs.value, branches)
            state.store(self.name, keys, values)
            return _broadcast_frames(keys, frames), _broadcast_frames(values, frames)
        # Fig. 4b: own tokens first, then the cached anchor tokens of the same branch.
        anchor_keys, anchor_values = state.fetch(self.name)  # (branches, heads, K*HW, d)
        if anchor_keys.shape[0] != branches:
            raise RuntimeError(
                f"anchor cache has {anchor_keys.shape[0]} guidance branches, the batch has {branches}"
            )
        keys = torch.cat([inputs.key, _broadcast_frames(anchor_keys, frames)], dim=2)  # (rows, heads, (1+K)*HW, d)
        values = torch.cat([inputs.value, _broadcast_frames(anchor_values, frames)], dim=2)
        return keys, values


def _frames_to_tokens(x: torch.Tensor, branches: int) -> torch.Tensor:
    """(branches*F, heads, L, d) -> (branches, heads, F*L, d): one token sequence per branch."""
    rows, heads, length, d = x.shape
    frames = rows // branches
    x = x.view(branches, frames, heads, length, d).transpose(1, 2)  # (branches, heads, F, L, d)
    return x.reshape(branches, heads, frames * length, d)


def _broadcast_frames(x: torch.Tensor, frames: int) -> torch.Tensor:
    """(branches, heads, L, d) -> (branches*frames, heads, L, d): the same tokens for every frame of a branch."""
    branches, heads, length, d = x.shape
    return x.unsqueeze(1).expand(branches, frames, heads, length, d).reshape(branches * frames, heads, length, d)


class AnchorAttention(Mechanism):
    """Fairy's anchor attention as a mechanism, owning the clip's `AnchorState`.

    Usage::

        fairy = AnchorAttention(AnchorConfig(num_anchors=3))
        with fairy.attach(unet):
            fairy.before_unet(BatchLayout.branch_major("record", step, branches, K, num_steps))
            unet(...)  # the anchors; then phase "attend" for ordinary frames, "off" for neither

    Args:
        config: the anchor settings; with 0 anchors `attach` installs nothing.
    """

    name = "fairy"

    def __init__(self, config: AnchorConfig | None = None):
        self.config = config or AnchorConfig()
        self.state = AnchorState(self.config)

    def attach(self, unet) -> contextlib.AbstractContextManager:
        """AnchorAttnProcessor on every self-attention layer of `unet`.

        Cross-attention (the text/instruction) keeps its processor. Yields the installed
        processors by name; the originals come back on exit.
        """
        if not self.config.enabled:
            return contextlib.nullcontext({})
        state = self.state
        return install_processors(
            unet, lambda name, proc: AnchorAttnProcessor(name, state) if is_self_attention(name) else None
        )

    def reset(self) -> None:
        """Forget the anchor cache (a new clip)."""
        self.state.reset()

    def before_unet(self, layout: BatchLayout) -> None:
        self.state.begin_call(layout)

    def after_unet(self, layout: BatchLayout) -> None:
        self.state.end_call()
