"""How temporal mechanisms plug into the UNet: attention processors with their own state.

Every mechanism (feature bank, causal KV cache, anchor attention, inversion fusion) is
one file with an `XConfig` (frozen dataclass), an `XState` (per-stream tensors, `reset()`)
and an `XAttnProcessor`. This module gives them what they share:

- `install_processors(unet, make)`: a context manager that swaps processors in through
  `set_attn_processor` and restores the originals on exit (never patches `.forward`);
- `attention_inputs` / `attention_output`: the two halves of diffusers' SDPA attention,
  so a processor only writes what it changes (extra keys/values, fused outputs) and,
  with nothing changed, computes exactly what `AttnProcessor2_0` computes;
- `BatchLayout`: what each row of the next UNet batch is (denoising step, guidance
  branch, phase), published before every UNet call so a processor can keep one state
  per step slot (StreamV2V's per-slot bank, Live2Diff's per-step KV cache) or know
  Fairy's record/attend and FateZero's store/fuse calls;
- `Mechanism`: the one protocol of every mechanism: `attach(unet)` (a context that
  installs and restores) and `before_unet(layout)` (the only per-call channel);
- `ProcessorLease`: which owner's processors sit on a shared UNet, kept on the UNet.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from diffstream.errors import ConfigError


# Phases of a UNet call (see BatchLayout): the stream engine's, Fairy's, FateZero's.
STREAM_PHASES = ("stream", "warmup")
ANCHOR_PHASES = ("off", "record", "attend")
FATEZERO_PHASES = ("plain", "store", "fuse")
PHASES = STREAM_PHASES + ANCHOR_PHASES + FATEZERO_PHASES


@dataclass(frozen=True)
class BatchLayout:
    """The rows of one UNet call, published through `Mechanism.before_unet` before it.

    Phases of the stream engine (`pipelines.stream`):

    - "stream": each row is one frame of the stream at its own denoising step
      (stream batch); the unconditional rows of guidance come first.
    - "warmup": the rows of each branch are the frames of one clip, all at one step,
      denoised together (Live2Diff's warmup).

    The offline phases describe branch-major batches: all frames of branch 0, then all
    frames of branch 1, ..., every row at the same step `steps[0]` (`branch_major`
    builds them; `num_branches` and `frames` read them back).

    - Fairy (`attention.anchor`): "off" (plain per-frame self-attention), "record" (the
      frames are the anchors: attend across them and cache their keys/values for this
      step, per branch) and "attend" (ordinary frames: attend to their own tokens plus
      the cached anchor tokens of this step and branch).
    - FateZero (`attention.fatezero`): every branch group holds the same `len(refs)`
      frames, and each frame's Eq. 8 reference is row `refs[i]` of its group. "plain"
      (spatial-temporal attention only), "store" (inversion: also keep the fusion plan's
      entries of editing step `steps[0]` in the sink) and "fuse" (editing step
      `steps[0]`: fuse the maps of group `fused_group` with the source's).

    Attributes:
        steps: denoising-step index of each row (0 = the noisiest step of the schedule).
        branches: guidance branch of each row: "cond" or "uncond" in the stream engine;
            offline, one name per branch group (e.g. Fairy's "cond", "image", "uncond").
        num_steps: steps in the schedule (number of stream-batch slots).
        phase: one of `PHASES`, as above.
        refs: FateZero only: the reference row of each frame within its group.
        fused_group: FateZero "fuse" only: the group (index into the branch order) whose
            maps are fused; None: the last group (the conditional one).
    """

    steps: tuple[int, ...]
    branches: tuple[str, ...]
    num_steps: int
    phase: str = "stream"
    refs: tuple[int, ...] | None = None
    fused_group: int | None = None

    def __post_init__(self):
        if self.phase not in PHASES:
            raise ValueError(f"unknown UNet call phase {self.phase!r}; one of {', '.join(PHASES)}")
        if len(self.steps) != len(self.branches):
            raise ValueError(f"{len(self.steps)} steps for {len(self.branches)} branch rows")
        if self.phase in ANCHOR_PHASES + FATEZERO_PHASES:
            names, frames = self.branch_names, self.frames
            if self.branches != tuple(b for b in names for _ in range(frames)) or len(set(self.steps)) > 1:
                raise ValueError(f"phase {self.phase!r} needs branch-major rows at one step, got {self}")
        if self.phase in FATEZERO_PHASES:
            if self.refs is None or len(self.refs) != self.frames:
                raise ValueError(f"phase {self.phase!r} needs one reference row per frame ({self.frames}), got {self.refs}")
            if self.fused_group is not None and not 0 <= self.fused_group < self.num_branches:
                raise ValueError(f"fused group {self.fused_group} of {self.num_branches} groups")

    @classmethod
    def branch_major(cls, phase: str, step: int, branches, frames: int, num_steps: int,
                     refs=None, fused_group: int | None = None) -> "BatchLayout":
        """An offline call: `frames` frames per branch, branches in the given order, all at `step`."""
        branches = tuple(branches)
        rows = len(branches) * int(frames)
        return cls(
            steps=(int(step),) * rows,
            branches=tuple(b for b in branches for _ in range(int(frames))),
            num_steps=int(num_steps),
            phase=phase,
            refs=None if refs is None else tuple(int(r) for r in refs),
            fused_group=fused_group,
        )

    @property
    def batch_size(self) -> int:
        return len(self.steps)

    @functools.cached_property
    def branch_names(self) -> tuple[str, ...]:
        """The distinct branches in order of first appearance (the branch groups, offline)."""
        return tuple(dict.fromkeys(self.branches))

    @property
    def num_branches(self) -> int:
        return len(self.branch_names)

    @property
    def frames(self) -> int:
        """Rows per branch of a branch-major (offline) call."""
        return self.batch_size // max(1, self.num_branches)

    @property
    def step(self) -> int:
        """The step of an offline call (every row shares it)."""
        return self.steps[0]

    # --- the stream engine's slot map, computed once per layout (the engine caches layouts)
    @functools.cached_property
    def slots(self) -> tuple[int, ...]:
        """Stream slot of each row: `step` for "cond" rows, `num_steps + step` for "uncond"
        ones (2 * num_steps slots, one per denoising step and guidance branch)."""
        return tuple((b == "uncond") * self.num_steps + s for s, b in zip(self.steps, self.branches))

    @functools.cached_property
    def slot_slice(self) -> slice | None:
        """`slots` as a slice when they are consecutive (the usual stream batch), else None."""
        lo = self.slots[0]
        return slice(lo, lo + len(self.slots)) if self.slots == tuple(range(lo, lo + len(self.slots))) else None

    def slot_index(self, device) -> torch.Tensor:
        """`slots` as a (B,) long tensor on `device`: one host-to-device copy per layout and device."""
        cache = self.__dict__.setdefault("_slot_index", {})  # frozen dataclass: cache like cached_property
        index = cache.get(device)
        if index is None:
            index = cache[device] = torch.tensor(self.slots, dtype=torch.long, device=device)
        return index


class Mechanism:
    """A temporal-consistency method as a pipeline sees it.

    One protocol for every method (feature bank, causal KV cache, Fairy's anchors,
    FateZero's fusion), in the manner of diffusers' hooks: `attach(unet)` installs the
    processors for the life of a context and restores the originals on exit, and
    `before_unet(layout)` is the only per-call channel, saying what the rows of the next
    UNet call are (a `BatchLayout`, whose phase covers streaming and offline editing).

    The base class is the identity: StreamDiffusion's per-frame baseline.
    """

    name = "streamdiffusion"
    # Frames denoised together before streaming starts (Live2Diff's warmup); 0: none.
    warmup_frames = 0

    def condition(self, pixels: torch.Tensor) -> torch.Tensor | None:
        """Per-frame conditioning computed once when a frame enters (e.g. a depth latent).

        Args:
            pixels: (1, 3, H, W) the frame in [-1, 1] at processing size, on the model's
                device and dtype (the tensor the engine VAE-encodes).
        Returns:
            a (1, ...) tensor that travels with the frame through the stream batch, or None.
        """
        return None

    def call_unet(self, unet, sample, timesteps, encoder_hidden_states, layout: BatchLayout, cond=None,
                  **unet_kwargs):
        """Run the UNet on one batch of rows.

        Args:
            sample: (B, C, h, w) latents; timesteps: (B,); encoder_hidden_states: (B, 77, D).
            cond: (B, ...) the rows' conditioning from `condition`, or None.
            unet_kwargs: passed to the UNet as they are, rows in `sample`'s order (e.g.
                ControlNet residuals, `pipelines.control`).
        Returns:
            (B, C, h, w) model output. Video UNets override this to add the frame axis.
        """
        check_unet_batch(sample, timesteps, encoder_hidden_states, layout, cond)
        return unet(sample, timesteps, encoder_hidden_states=encoder_hidden_states, return_dict=False,
                    **unet_kwargs)[0]

    def attach(self, unet) -> contextlib.AbstractContextManager:
        """Install this mechanism's processors on `unet` for the life of the context.

        Built on `install_processors`: leaving the context (also through an exception)
        puts back exactly the processor objects that were there before.
        """
        return contextlib.nullcontext({})

    def reset(self) -> None:
        """Forget all temporal state (a new stream)."""

    def before_unet(self, layout: BatchLayout) -> None:
        """Called before every UNet call with the rows' layout (the only per-call channel)."""

    def after_unet(self, layout: BatchLayout) -> None:
        """Called after every UNet call (e.g. to update banks or caches)."""


def check_unet_batch(sample, timesteps, encoder_hidden_states, layout: BatchLayout, cond=None) -> None:
    """Shape checks of `Mechanism.call_unet`'s arguments (host-side metadata only, no sync)."""
    assert sample.ndim == 4, f"{sample.shape=}"
    rows = sample.shape[0]
    assert rows == layout.batch_size, f"{sample.shape=} {layout.batch_size=}"
    assert timesteps.shape == (rows,), f"{timesteps.shape=} {sample.shape=}"
    assert encoder_hidden_states.ndim == 3 and encoder_hidden_states.shape[0] == rows, (
        f"{encoder_hidden_states.shape=} {sample.shape=}")
    assert cond is None or cond.shape[0] == rows, f"{cond.shape=} {sample.shape=}"


def is_self_attention(name: str) -> bool:
    """Processor names of a UNet: `...transformer_blocks.N.attn1.processor` is self-attention."""
    return ".attn1." in name


def block_of(name: str) -> str:
    """`up_blocks.1.attentions.0...` -> `up_blocks.1`; `mid_block...` -> `mid_block`."""
    parts = name.split(".")
    return parts[0] if parts[0] == "mid_block" else ".".join(parts[:2])


def compiler_opaque(fn):
    """Mark a stateful processor's `__call__` as opaque to `torch.compile` (issue #16).

    Dynamo breaks the graph at the call and runs it eagerly, so the compiled graphs around
    it never specialise on a stream's Python state (fill counts, update flags), which
    would recompile them as a bank fills, or fall back to eager at the recompile limit.
    Outside a compiled model it is a plain call.
    """
    return torch.compiler.disable(fn, recursive=True)


# Set on a UNet by `models.backends.apply_backend` (a lower floor cannot import it).
BACKEND_ATTRIBUTE = "_diffstream_backend"


# Set by `models.backends.apply_backend` on an OpenVINO-compiled UNet: a callable that
# recompiles it with inductor and returns the notice saying so (this floor cannot import
# that one); after a fall-back the notice waits under NOTICE_ATTRIBUTE for the pipeline.
FALLBACK_ATTRIBUTE = "_diffstream_backend_fallback"
NOTICE_ATTRIBUTE = "_diffstream_backend_notice"


def check_backend(unet, installed: dict) -> None:
    """Stateful processors on an OpenVINO-compiled UNet: fall back to `compile`, with a notice.

    OpenVINO's partitioned executor hands back tensors that share its inference requests'
    output buffers; with the graph broken at every stateful processor, one compiled piece
    runs several times per UNet call and overwrites outputs still in use (measured: the
    feature bank came out 19 grey levels off eager). So a stateful mechanism does not run
    there: the UNet is recompiled with inductor (`compile`, which runs them between its
    graphs), the VAE stays on OpenVINO, and the one-line notice is left on the UNet
    (`take_backend_notice`) for the pipeline to tell its user (issue #16: never silently
    slower). A UNet compiled for OpenVINO some other way (no fall-back set) is refused
    in one line (ConfigError).
    """
    if installed and getattr(unet, BACKEND_ATTRIBUTE, "eager") == "openvino":
        kind = type(next(iter(installed.values()))).__name__
        fallback = getattr(unet, FALLBACK_ATTRIBUTE, None)
        if fallback is None:
            raise ConfigError(f"--backend openvino runs the per-frame baseline (streamdiffusion) only; {kind} keeps "
                              f"state in the attention layers: use --backend compile or eager")
        setattr(unet, NOTICE_ATTRIBUTE, fallback(kind))


def take_backend_notice(unet) -> str | None:
    """The notice of a backend fall-back made while processors were installed, once (else None)."""
    return unet.__dict__.pop(NOTICE_ATTRIBUTE, None)


@contextlib.contextmanager
def install_processors(unet, make: Callable[[str, object], object | None]):
    """Swap attention processors in for the duration of the context.

    Args:
        unet: a diffusers model with `attn_processors` / `set_attn_processor`.
        make: called with (processor name, current processor); returns the processor to
            install there, or None to keep the current one.
    Yields:
        dict name -> installed processor (only the replaced ones).
    Raises:
        ConfigError: stateful processors on a backend that cannot run them (`check_backend`).
    """
    original = dict(unet.attn_processors)
    installed = {}
    new = {}
    for name, proc in original.items():
        replacement = make(name, proc)
        new[name] = proc if replacement is None else replacement
        if replacement is not None:
            installed[name] = replacement
    check_backend(unet, installed)
    unet.set_attn_processor(new)
    try:
        yield installed
    finally:
        unet.set_attn_processor(original)


_LEASE_ATTRIBUTE = "_diffstream_processor_lease"


class ProcessorLease:
    """Whose processors are installed on a shared UNet, recorded on the UNet itself.

    Several owners (streams) may share one loaded model; the web server's sessions do.
    Each installs its mechanism's processors when it runs, and `acquire` first restores
    the originals under the previous holder, so no owner ever runs another's processors.
    The record is an attribute of the UNet module, holding the owner weakly and the
    installed context strongly: it lives and dies with the model (no module global), and
    an owner dropped without closing still has its processors removed by the next
    `acquire` or by `release(unet)`.
    """

    __slots__ = ("_owner", "_context")

    def __init__(self, owner, context: contextlib.ExitStack):
        self._owner = weakref.ref(owner)
        self._context = context

    @staticmethod
    def holder(unet):
        """The owner whose processors are installed on `unet`, or None."""
        lease = vars(unet).get(_LEASE_ATTRIBUTE)
        return None if lease is None else lease._owner()

    @staticmethod
    def acquire(unet, owner, enter: Callable[[object], contextlib.AbstractContextManager]) -> bool:
        """Make `owner`'s processors the ones installed on `unet`.

        Args:
            enter: called with `unet` when `owner` does not hold the lease yet; returns the
                context that installs the processors (e.g. `mechanism.attach`).
        Returns:
            True if the processors were installed now, False if `owner` held the lease.
        """
        lease = vars(unet).get(_LEASE_ATTRIBUTE)
        if lease is not None:
            if lease._owner() is owner:
                return False
            ProcessorLease.release(unet)
        context = contextlib.ExitStack()
        context.enter_context(enter(unet))  # if it raises, nothing is installed or recorded
        setattr(unet, _LEASE_ATTRIBUTE, ProcessorLease(owner, context))
        return True

    @staticmethod
    def release(unet, owner=None) -> bool:
        """Restore `unet`'s original processors if `owner` (None: whoever) holds the lease.

        Returns:
            True if processors were removed.
        """
        lease = vars(unet).get(_LEASE_ATTRIBUTE)
        if lease is None or (owner is not None and lease._owner() is not owner):
            return False
        delattr(unet, _LEASE_ATTRIBUTE)
        lease._context.close()
        return True


@dataclass
class AttentionInputs:
    """Projected query/key/value of one attention call, split into heads.

    Attributes:
        query: (B, heads, L_q, d); key, value: (B, heads, L_kv, d).
        residual: the block input for the residual connection.
        input_shape: (B, C, H, W) when the block input was a 4-D feature map, else None.
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    residual: torch.Tensor
    input_shape: tuple | None


# Adapted from diffusers/src/diffusers/models/attention_processor.py (AttnProcessor2_0.__call__,
# diffusers 0.42.1): `attention_inputs`, `attend` and `attention_output` are its three parts
# in order, and `SDPAAttnProcessor.__call__` reassembles them; tests/attention/test_base.py
# pins the result bit for bit against AttnProcessor2_0. Deviations on purpose: the split
# itself (a mechanism overrides only the part it changes: extra keys/values, fused outputs);
# the attention mask is prepared after the projections, from the key length (diffusers'
# sequence length); the deprecated `scale` argument is ignored without a warning.
def attention_inputs(attn, hidden_states, encoder_hidden_states=None, temb=None) -> AttentionInputs:
    """First half of diffusers' attention: norms and q/k/v projections, split into heads.

    Args:
        attn: a diffusers `Attention` module.
        hidden_states: (B, L, C) tokens or (B, C, H, W) feature map.
        encoder_hidden_states: (B, L_kv, C_kv) for cross-attention, None for self-attention.
    """
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    input_shape = None
    if hidden_states.ndim == 4:
        input_shape = tuple(hidden_states.shape)
        b, c, h, w = input_shape
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)  # (B, HW, C)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    batch_size = hidden_states.shape[0]

    query = attn.to_q(hidden_states)
    if encoder_hidden_states is None:
        encoder_hidden_states = hidden_states
    elif attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    key = attn.to_k(encoder_hidden_states)
    value = attn.to_v(encoder_hidden_states)

    head_dim = key.shape[-1] // attn.heads
    # (B, L, heads*d) -> (B, heads, L, d)
    query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return AttentionInputs(query, key, value, residual, input_shape)


def attend(query, key, value, attn_mask=None) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d) + mask) V with PyTorch SDPA. (B, heads, L_q, d) -> (B, L_q, heads*d)."""
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=0.0)
    b, heads, length, d = out.shape
    return out.transpose(1, 2).reshape(b, length, heads * d).to(query.dtype)


def attention_output(attn, hidden_states, inputs: AttentionInputs) -> torch.Tensor:
    """Second half: output projection, back to the input layout, residual, rescale.

    Args:
        hidden_states: (B, L_q, heads*d) attention result.
    """
    hidden_states = attn.to_out[0](hidden_states)
    hidden_states = attn.to_out[1](hidden_states)  # dropout (identity at inference)
    if inputs.input_shape is not None:
        b, c, h, w = inputs.input_shape
        hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, h, w)
    if attn.residual_connection:
        hidden_states = hidden_states + inputs.residual
    return hidden_states / attn.rescale_output_factor


class SDPAAttnProcessor:
    """Plain attention built from the shared halves; equals diffusers' AttnProcessor2_0.

    Mechanisms subclass it and override `keys_values` (e.g. to concatenate banked keys)
    or `post_attention`; the test suite checks the unmodified class against diffusers.
    """

    def keys_values(self, attn, inputs: AttentionInputs):
        """Keys and values to attend over: (B, heads, L_kv, d) each."""
        return inputs.key, inputs.value

    def post_attention(self, attn, hidden_states: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        """Hook on the attention result (B, L_q, heads*d) before the output projection."""
        return hidden_states

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        inputs = attention_inputs(attn, hidden_states, encoder_hidden_states, temb)
        mask = None
        if attention_mask is not None:
            batch_size, length = inputs.query.shape[0], inputs.key.shape[2]
            mask = attn.prepare_attention_mask(attention_mask, length, batch_size)
            mask = mask.view(batch_size, attn.heads, -1, mask.shape[-1])
        key, value = self.keys_values(attn, inputs)
        out = attend(inputs.query, key, value, mask)
        out = self.post_attention(attn, out, inputs)
        return attention_output(attn, out, inputs)
