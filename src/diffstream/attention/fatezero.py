"""FateZero's attention control: store during inversion, fuse during editing.

Qi et al., "FateZero: Fusing Attentions for Zero-shot Text-based Video Editing"
(ICCV 2023), Sec. 3.2:

- Spatial-temporal self-attention (Eq. 8): frame i attends to its own tokens and to a
  reference frame's, K = W^K [z^i; z^w], V = W^V [z^i; z^w], with the pretrained
  weights unchanged. z^w is the middle frame (the paper), the first, or the previous.
  The reference code's layouts are options too (`FRAME_ATTENTION`, default: its style
  configs' middle frame only, per-frame at the finest layers); the chosen layout is the
  model's attention in every call (inversion, editing, recomputation).
- Inversion attention fusion (Eqs. 4-5): DDIM inversion under the source prompt keeps,
  per step, what its attention saw; the editing pass under the target prompt then
  replaces its own maps by the inversion's during the fusion interval (Sec. 4.1:
  t in [0.2 T, T], i.e. the first 80% of the editing steps):
    * cross-attention: maps of target tokens aligned with a source token are the source
      maps (Prompt-to-Prompt refinement), optionally re-weighted per word;
    * self-attention: replaced by the source maps, or blended with the mask
      M_t = Heaviside(source cross-attention of the blend words, tau) as
      M s_edit + (1 - M) s_src (Eqs. 6-7).
  Only the conditional rows of a classifier-free-guidance batch are fused (as in the
  reference code); the unconditional rows keep their own maps.

What is stored is not the maps. A self-attention map of frame i is softmax(Q K^T)
with Q = W^Q h_i and K = W^K [h_i; h_w], so the layer's input tokens h (frames x HW x C)
determine it completely; a cross-attention map is fixed by h and the source prompt.
Storing h instead of the (HW x 2HW) map per head is 2 HW heads / C times smaller
(51x at the 32x32 layers of SD 1.5 at 512 px) and the map is recomputed exactly when
fusion reads it. The blend mask needs only the blend words' columns of the source
cross-attention, reduced over heads and layers: that one (frames x h x w) map per step
is what is stored for it. Only layers and steps that the fusion schedule reads are
stored (`FusionPlan`), in the store's dtype (the model's by default), in a store that spills to disk
(`diffstream.attention.store`). Every layer and step that is not fused runs the fast
SDPA path; explicit maps exist only for the fused rows, a few frames at a time.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from diffstream.attention.base import (
    compiler_opaque,
    FATEZERO_PHASES,
    BatchLayout,
    Mechanism,
    SDPAAttnProcessor,
    attend,
    attention_inputs,
    attention_output,
    install_processors,
)
# Planning lives in its own file; its names are part of this module's API too.
from diffstream.attention.fatezero_plan import BLEND_KEY, AttnLayer, FusionPlan, probe_layers  # noqa: F401
from diffstream.errors import ConfigError

REFERENCE_FRAMES = ("middle", "first", "previous")
# Which frames' tokens a self-attention row attends to (keys and values):
# "own+reference": the paper's Eq. 8, [z^i; z^w];
# "reference": z^w only, no own tokens: the reference code's configs
#     (SparseCausalAttention_index ['mid'] with the middle frame);
# "previous+first": [z^{i-1}; z^0] (frame 0: itself twice): the reference code's default
#     SparseCausalAttention_index [-1, 'first'], with --reference-frame previous.
FRAME_ATTENTION = ("own+reference", "reference", "previous+first")
# Store key (kind, name) of the per-step blend map (the reduced blend-word columns).
# Kinds of store entries that hold attention data (the rest are latents).
ATTENTION_KINDS = ("self", "cross", "blend")
# Largest number of attention-map elements materialised at once in the fused path
# (2^26 fp32 values = 256 MiB per map); rows are processed in chunks below this.
_MAP_CHUNK_ELEMENTS = 2**26


@dataclass(frozen=True)
class FateZeroConfig:
    """Settings of FateZero's attention fusion.

    Attributes:
        steps: DDIM steps of inversion and editing (Sec. 4.1: 50).
        cross_replace: fraction of the editing steps, counted from the noisiest, whose
            cross-attention maps of shared words come from the inversion. Sec. 4.1 fuses
            t in [0.2 T, T] for style and attribute edits: 0.8 (shape edits: 0.5).
        self_replace: the same for self-attention maps (0.8).
        blend_threshold: tau of Eq. 6 (0.3) on the max-normalised source cross-attention
            of the blend words.
        reference_frame: Eq. 8's z^w: "middle" (round(n/2), the paper), "first" or
            "previous" (frame i-1; frame 0 uses itself).
        frame_attention: the frames each self-attention row attends to (`FRAME_ATTENTION`).
        cross_frame_min_downsample: self-attention layers whose token grid is at least
            this many times coarser than the latent attend across frames; finer ones
            attend within their own frame. 1: every layer (the paper); 2: plain per-frame
            attention at SD 1.5's 64x64 layers at 512 px, which is the reference's
            least_sc_channel 640 (its style configs: only layers of >= 640 channels are
            sparse-causal); 4 is its least_sc_channel 1280 (the Swarovski swan config).
        fuse_min_downsample: store and fuse only the attention layers whose token grid
            is at least this many times smaller per side than the latent. 2 is the
            reference implementation's rule (maps with <= 32x32 queries at 512 px: the
            full-resolution layers keep their own maps); 1 fuses every layer.
    """

    steps: int = 50
    cross_replace: float = 0.8
    self_replace: float = 0.8
    blend_threshold: float = 0.3
    reference_frame: str = "middle"
    fuse_min_downsample: int = 2
    # Defaults: the reference's style configs (config/style/*.yaml: SparseCausalAttention_index
    # ['mid'], least_sc_channel 640), which it also uses for attribute edits.
    frame_attention: str = "reference"
    cross_frame_min_downsample: int = 2

    def __post_init__(self):
        if not 1 <= int(self.steps) <= 1000:
            raise ConfigError(f"--fz-steps must be between 1 and 1000, got {self.steps}")
        for name, value in (("--cross-replace", self.cross_replace), ("--self-replace", self.self_replace)):
            if not 0.0 <= float(value) <= 1.0:
                raise ConfigError(f"{name} must be a fraction of the steps in [0, 1], got {value}")
        if not 0.0 <= float(self.blend_threshold) < 1.0:
            raise ConfigError(f"--blend-threshold must be in [0, 1), got {self.blend_threshold}")
        if self.reference_frame not in REFERENCE_FRAMES:
            raise ConfigError(
                f"--reference-frame must be one of {', '.join(REFERENCE_FRAMES)}, got {self.reference_frame!r}"
            )
        if self.frame_attention not in FRAME_ATTENTION:
            raise ConfigError(f"--frame-attention must be one of {', '.join(FRAME_ATTENTION)}, "
                              f"got {self.frame_attention!r}")
        if self.frame_attention == "previous+first" and self.reference_frame != "previous":
            raise ConfigError("--frame-attention previous+first attends to the previous frame: "
                              "use it with --reference-frame previous")
        if int(self.cross_frame_min_downsample) < 1:
            raise ConfigError(f"--cross-frame-min-downsample must be >= 1, got {self.cross_frame_min_downsample}")
        if int(self.fuse_min_downsample) < 1:
            raise ConfigError(f"--fz-fuse-min-downsample must be >= 1, got {self.fuse_min_downsample}")

    def _steps_of(self, fraction: float) -> range:
        # int(n * f) as the reference does, guarded against 0.29 * 100 = 28.999...
        return range(int(self.steps * float(fraction) + 1e-9))

    @property
    def cross_steps(self) -> range:
        """Editing steps (0 = noisiest) with cross-attention fusion."""
        return self._steps_of(self.cross_replace)

    @property
    def self_steps(self) -> range:
        """Editing steps with self-attention fusion (and blending)."""
        return self._steps_of(self.self_replace)


@dataclass(frozen=True)
class TokenFusion:
    """What cross-attention fusion and blending need to know about the two prompts.

    Attributes:
        mapper: for each target token position (77), the source position whose map it
            takes, or -1 to keep the edit's own map (`prompt_align.align_prompts`).
        weights: per target position, the re-weighting factor (empty: all ones).
        blend_columns: source token positions of the blend words (empty: no blending,
            self-attention maps are replaced outright).
        word_steps: per target position, how many editing steps (from the noisiest) its
            cross-attention map is fused: Prompt-to-Prompt's per-word
            `cross_replace_steps` (empty: every token for `FateZeroConfig.cross_steps`).
    """

    mapper: tuple[int, ...]
    weights: tuple[float, ...] = ()
    blend_columns: tuple[int, ...] = ()
    word_steps: tuple[int, ...] = ()

    @staticmethod
    def identity(length: int = 77) -> "TokenFusion":
        """Every target token reads the same source position (target == source)."""
        return TokenFusion(mapper=tuple(range(length)))


def attention_probs(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) in fp32, the map SDPA computes implicitly.

    Args:
        query: (B, heads, L_q, d); key: (B, heads, L_kv, d).
    Returns:
        (B, heads, L_q, L_kv) float32.
    """
    scores = query.float() @ key.float().transpose(-1, -2)
    return torch.softmax(scores * query.shape[-1] ** -0.5, dim=-1)


def blend_mask_source(maps: list[torch.Tensor], grids: list[tuple[int, int]], columns, pool: bool = True):
    """The pre-threshold blend map from source cross-attention (Eq. 6, before Heaviside).

    As the reference: attention of the blend-word tokens summed over the words,
    averaged over heads and layers, max-pooled 3x3 to close small holes.

    Args:
        maps: per mask layer, (R, heads, L, T) cross-attention maps (same grid for all).
        grids: per layer, the (h, w) of its L tokens.
        columns: source token positions of the blend words.
        pool: apply the 3x3 max pooling (False: the plain mean, for accumulating).
    Returns:
        (R, 1, h, w) float32.
    """
    cols = torch.as_tensor(list(columns), device=maps[0].device)
    per_layer = []
    for m, (gh, gw) in zip(maps, grids):
        words = m.index_select(-1, cols).sum(-1).mean(1)  # (R, L): sum over words, mean over heads
        per_layer.append(words.reshape(m.shape[0], 1, gh, gw))  # (R, 1, h, w)
    mean = torch.stack(per_layer).mean(0)
    return F.max_pool2d(mean, kernel_size=3, stride=1, padding=1) if pool else mean


def blend_mask(source: torch.Tensor, grid: tuple[int, int], threshold: float) -> torch.Tensor:
    """M_t of Eq. 6 at one self-attention layer's resolution.

    Args:
        source: (R, 1, h, w) from `blend_mask_source`.
        grid: (h', w') of the layer's token grid.
        threshold: tau.
    Returns:
        (R, h' w') float: 1 where the edit's own self-attention is kept, 0 where the
        source map replaces it.
    """
    resized = F.interpolate(source, size=grid)  # nearest, as the reference
    peak = resized.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
    return (resized / peak > threshold).float().flatten(1)


@dataclass
class CallLayout:
    """What the rows of the next UNet call are.

    The batch is `groups` branch groups of `rows` frames each (inversion: one group;
    editing with CFG: unconditional then conditional).

    Attributes:
        phase: "plain" (Eq. 8 attention only), "store" (also put the plan's entries for
            `step` into `sink`) or "fuse" (fuse the `fused_group` rows with `source`).
        step: editing-step index of the call (0 = noisiest); inversion step k runs the
            UNet at the timestep of editing step k.
        rows: frames per group.
        groups: branch groups in the batch.
        ref_rows: (rows,) long, Eq. 8 reference row of each row within its group, on the
            UNet's device (copied there once per layout, not per attention call).
        fused_group: the group whose maps are fused (the conditional one), or None.
        sources: (S, rows) long: the rows whose keys/values row i attends to, in order
            (`FRAME_ATTENTION`; None: [own; ref_rows], Eq. 8).
    """

    phase: str
    step: int
    rows: int
    groups: int
    ref_rows: torch.Tensor
    fused_group: int | None = None
    sources: torch.Tensor | None = None

    def __post_init__(self):
        if self.sources is None:
            own = torch.arange(self.rows, device=self.ref_rows.device)
            self.sources = torch.stack([own, self.ref_rows])  # (2, rows): Eq. 8

    @staticmethod
    def of(layout: BatchLayout, device=None, frame_attention: str = "own+reference") -> "CallLayout":
        """The processors' view of a FateZero phase of `BatchLayout` ("plain", "store",
        "fuse"); a "fuse" call without `fused_group` fuses the last group. `device`: where
        the UNet runs (None: the CPU)."""
        if layout.phase not in FATEZERO_PHASES:
            raise ValueError(f"FateZero has no phase {layout.phase!r}; one of {', '.join(FATEZERO_PHASES)}")
        groups = layout.num_branches
        fused_group = None
        if layout.phase == "fuse":
            fused_group = groups - 1 if layout.fused_group is None else layout.fused_group
        ref_rows = torch.as_tensor(layout.refs, dtype=torch.long, device=device)  # (rows,)
        if frame_attention == "reference":
            sources = ref_rows[None]  # (1, rows)
        elif frame_attention == "previous+first":
            # ref_rows are the previous frames; row 0 of every window is clip frame 0
            sources = torch.stack([ref_rows, torch.zeros_like(ref_rows)])  # (2, rows)
        else:
            sources = None  # Eq. 8
        return CallLayout(layout.phase, layout.step, len(layout.refs), groups, ref_rows, fused_group, sources)


@dataclass
class FateZeroState:
    """Per-clip state of the processors: the call layout, the store, caches.

    Attributes:
        config, plan: the fusion settings and the layers/steps they cover.
        fusion: the prompts' token alignment, weights and blend columns.
        source_text: (1, T, D) source-prompt embedding (keys of source cross-attention).
        call: layout of the next UNet call (None: behave like stock attention).
        sink: store that a "store" call writes into (`FateZero.use_stores`).
        source: store that a "fuse" call reads from (`FateZero.use_stores`).
    """

    config: FateZeroConfig
    plan: FusionPlan
    fusion: TokenFusion | None = None
    source_text: torch.Tensor | None = None
    call: CallLayout | None = None
    sink: object | None = None
    source: object | None = None
    _mask_source: torch.Tensor | None = field(default=None, repr=False)
    _masks: dict = field(default_factory=dict, repr=False)
    _blend_maps: list = field(default_factory=list, repr=False)
    _token_tensors: dict = field(default_factory=dict, repr=False)
    _plan_keys: dict = field(default_factory=dict, repr=False)

    def plan_keys(self, step: int) -> frozenset:
        """The (kind, layer) entries that editing step `step` reads (cached)."""
        keys = self._plan_keys.get(step)
        if keys is None:
            keys = self._plan_keys[step] = frozenset(self.plan.keys_at(step))
        return keys

    def reset(self) -> None:
        """Forget the call, the stores and every cache (a new clip or window)."""
        self.call = None
        self.sink = None
        self.source = None
        self._mask_source = None
        self._masks = {}
        self._blend_maps = []
        self._token_tensors = {}

    def tokens(self, device, step: int = 0):
        """(mapper clamped >= 0, alphas, weights or None, per-word step alphas or None) as
        tensors on `device`, each (T,), at editing step `step` (cached per step)."""
        cached = self._token_tensors.get((device, step))
        if cached is None:
            mapper = torch.tensor(self.fusion.mapper, device=device)
            alphas = (mapper >= 0).float()
            weights = torch.tensor(self.fusion.weights, device=device) if self.fusion.weights else None
            words = None
            if self.fusion.word_steps:  # 1 while the word's own schedule still fuses it
                words = (torch.tensor(self.fusion.word_steps, device=device) > step).float()
            cached = self._token_tensors[(device, step)] = (mapper.clamp_min(0), alphas, weights, words)
        return cached

    def mask(self, grid: tuple[int, int]) -> torch.Tensor | None:
        """Blend mask (R, h w) of this step at a layer grid, or None when not blending."""
        if self._mask_source is None:
            return None
        mask = self._masks.get(grid)
        if mask is None:
            mask = self._masks[grid] = blend_mask(self._mask_source, grid, self.config.blend_threshold)
        return mask


def spatial_temporal(tensor: torch.Tensor, call: CallLayout) -> torch.Tensor:
    """Eq. 8 (or another `FRAME_ATTENTION` layout): each row's keys/values are the tokens
    of the rows `call.sources` names, concatenated ([own; reference] for Eq. 8).

    Args:
        tensor: (groups*R, heads, L, d) keys or values.
    Returns:
        (groups*R, heads, S*L, d).
    """
    b, heads, length, d = tensor.shape
    grouped = tensor.view(call.groups, call.rows, heads, length, d)  # (G, R, heads, L, d)
    # no copy: sources live on the UNet's device
    parts = [grouped.index_select(1, rows) for rows in call.sources.to(tensor.device)]
    return torch.cat(parts, dim=3).view(b, heads, len(parts) * length, d)


class FateZeroAttnProcessor(SDPAAttnProcessor):
    """Spatial-temporal self-attention or cross-attention with FateZero's store/fuse."""

    def __init__(self, state: FateZeroState, layer: AttnLayer):
        self.state = state
        self.layer = layer
        self.is_self = layer.kind == "self"
        fused = state.plan.self_layers if self.is_self else state.plan.cross_layers
        self.fused_layer = layer.name in fused
        self.is_mask_layer = layer.name in state.plan.mask_layers
        # finer layers attend within their frame (the reference's least_sc_channel)
        self.cross_frame = self.is_self and layer.downsample >= state.config.cross_frame_min_downsample

    def _collect_blend_map(self, inputs) -> None:
        """Source cross-attention of the blend words at this mask layer (Eq. 6's input);
        after the last mask layer of the call, their reduction goes into the sink."""
        state, call = self.state, self.state.call
        maps = attention_probs(inputs.query, inputs.key)  # (R, heads, L, T)
        state._blend_maps.append(blend_mask_source([maps], [self.layer.grid], state.fusion.blend_columns, pool=False))
        if len(state._blend_maps) == len(state.plan.mask_layers):
            mean = torch.stack(state._blend_maps).mean(0)  # over layers: (R, 1, h, w)
            state._blend_maps = []
            pooled = F.max_pool2d(mean, kernel_size=3, stride=1, padding=1)
            state.sink.put((*BLEND_KEY, call.step), pooled, dtype=torch.float32)

    @compiler_opaque  # stateful: the compiled graphs stop here (attention.base)
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        state, call = self.state, self.state.call
        if call is None or (not self.is_self and call.phase == "plain"):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        if attention_mask is not None:
            raise ValueError("FateZero attention does not support attention masks")
        inputs = attention_inputs(attn, hidden_states, encoder_hidden_states, temb)
        key_id = (self.layer.kind, self.layer.name, call.step)
        if call.phase == "store":
            wanted = state.plan_keys(call.step)
            if (self.layer.kind, self.layer.name) in wanted:
                state.sink.put(key_id, hidden_states)  # (R, L, C): the map's sufficient input
            if self.is_mask_layer and BLEND_KEY in wanted:
                self._collect_blend_map(inputs)
        key, value = inputs.key, inputs.value
        if self.cross_frame:
            key, value = spatial_temporal(key, call), spatial_temporal(value, call)  # (B, heads, S*L, d)
        steps = state.plan.self_steps if self.is_self else state.plan.cross_steps
        if call.phase == "fuse" and call.fused_group is not None and self.fused_layer and call.step in steps:
            out = self._fused(attn, inputs, key, value, key_id)
        else:
            out = attend(inputs.query, key, value)
        return attention_output(attn, out, inputs)

    def _fused(self, attn, inputs, key, value, key_id) -> torch.Tensor:
        """Attention of the fused group with maps fused from the source; others via SDPA."""
        state, call = self.state, self.state.call
        r, g = call.rows, call.fused_group
        rows = slice(g * r, (g + 1) * r)
        query = inputs.query
        device, dtype = query.device, query.dtype

        # Source maps from the stored input tokens (R, L, C), through the same projections.
        src_hidden = state.source.get(key_id, device=device, dtype=dtype)
        if self.is_self:
            src = attention_inputs(attn, src_hidden)
            src_q = src.query
            single = CallLayout("plain", call.step, r, 1, call.ref_rows, sources=call.sources)
            src_k = spatial_temporal(src.key, single) if self.cross_frame else src.key  # (R, heads, S*L, d)
            mask = state.mask(self.layer.grid)  # (R, L) or None
        else:
            text = state.source_text.to(device=device, dtype=dtype).expand(r, -1, -1)
            src = attention_inputs(attn, src_hidden, text)
            src_q, src_k = src.query, src.key  # (R, heads, L, d), (R, heads, T, d)
            mapper, alphas, weights, words = state.tokens(device, call.step)

        q_e, k_e, v_e = query[rows], key[rows], value[rows]
        heads, length, kv = q_e.shape[1], q_e.shape[2], k_e.shape[2]
        chunk = max(1, _MAP_CHUNK_ELEMENTS // (heads * length * kv))
        pieces = []
        for lo in range(0, r, chunk):
            c = slice(lo, min(r, lo + chunk))
            source = attention_probs(src_q[c], src_k[c])  # (c, heads, L, L_kv)
            if self.is_self and mask is None:
                fused = source  # Sec. 3.2: self-attention replaced by the inversion's
            elif self.is_self:
                m = mask[c, None, :, None]  # (c, 1, L, 1) over query positions
                fused = m * attention_probs(q_e[c], k_e[c]) + (1 - m) * source  # Eq. 7
            else:
                # Prompt-to-Prompt refinement: aligned tokens take the source column.
                edit = attention_probs(q_e[c], k_e[c])
                fused = source.index_select(-1, mapper) * alphas + edit * (1 - alphas)
                if weights is not None:
                    fused = fused * weights
                if words is not None:  # P2P's alpha_words: past its schedule a word keeps its own map
                    fused = fused * words + edit * (1 - words)
            out = fused @ v_e[c].float()  # (c, heads, L, d)
            pieces.append(out.transpose(1, 2).reshape(out.shape[0], length, -1).to(dtype))
        fused_out = torch.cat(pieces, dim=0)  # (R, L, heads*d)

        parts = []
        if g > 0:
            parts.append(attend(query[: g * r], key[: g * r], value[: g * r]))
        parts.append(fused_out)
        if (g + 1) * r < query.shape[0]:
            parts.append(attend(query[(g + 1) * r :], key[(g + 1) * r :], value[(g + 1) * r :]))
        return torch.cat(parts, dim=0)


class FateZero(Mechanism):
    """FateZero as a mechanism: installs the processors and tells them what each call is.

    Usage::

        fz = FateZero(config, layers, fusion, source_text)
        with fz.attach(unet):
            fz.use_stores(sink=store)  # inversion of a window
            fz.before_unet(BatchLayout.branch_major("store", k, ("source",), R, n, refs)); unet(...)
            fz.use_stores(source=store)  # its editing
            fz.before_unet(BatchLayout.branch_major("fuse", k, ("uncond", "cond"), R, n, refs)); unet(...)

    The phases ("plain", "store", "fuse") and what they need are described in
    `BatchLayout`; the stores are per window, set through `use_stores`.

    Args:
        config: fusion settings.
        layers: `probe_layers(unet, latent_hw)`.
        fusion: token alignment / weights / blend columns (None: identity, no blend).
        source_text: (1, T, D) source prompt embedding.
    """

    name = "fatezero"

    def __init__(self, config: FateZeroConfig, layers, fusion: TokenFusion | None = None, source_text=None):
        fusion = fusion or TokenFusion.identity(next(l.kv_tokens for l in layers if l.kind == "cross"))
        self.layers = {l.name: l for l in layers}
        cross_steps = range(max(fusion.word_steps)) if fusion.word_steps else None
        self.plan = FusionPlan.build(layers, config, blend=bool(fusion.blend_columns), cross_steps=cross_steps)
        self.state = FateZeroState(config=config, plan=self.plan, fusion=fusion, source_text=source_text)
        self._device = None  # the attached UNet's device (where blend maps are loaded)
        self._calls: dict = {}  # (BatchLayout, device) -> CallLayout, built once per layout

    def attach(self, unet) -> contextlib.AbstractContextManager:
        """Install FateZero processors on every self-attention layer (Eq. 8 everywhere) and
        on the cross-attention layers it stores or fuses; others keep their processor."""
        wanted = set(self.plan.cross_layers) | set(self.plan.mask_layers)

        def make(name, _):
            layer = self.layers.get(name)
            if layer is None or (layer.kind == "cross" and name not in wanted):
                return None
            return FateZeroAttnProcessor(self.state, layer)

        self._device = next(unet.parameters()).device
        return install_processors(unet, make)

    def reset(self) -> None:
        """Forget the call layout, stores and caches."""
        self.state.reset()
        self._calls = {}

    def use_stores(self, sink=None, source=None) -> None:
        """The stores of the next calls (a window's): "store" calls put the plan's entries
        into `sink`, "fuse" calls read the inversion's from `source`; None: no store."""
        self.state.sink = sink
        self.state.source = source

    def before_unet(self, layout: BatchLayout) -> None:
        """Next call: "plain" (spatial-temporal attention only: reconstruction,
        recompute-mode inversion), "store" (an inversion step of one group of frames) or
        "fuse" (an editing step: fuse `fused_group`, default the last, conditional one)."""
        call = self._calls.get((layout, self._device))
        if call is None:
            call = self._calls[(layout, self._device)] = CallLayout.of(layout, self._device,
                                                                       self.state.config.frame_attention)
        state = self.state
        if call.phase == "store":
            if state.sink is None:
                raise RuntimeError("a FateZero store call needs a sink: use_stores(sink=...) first")
            state._blend_maps = []
        elif call.phase == "fuse":
            if state.source is None:
                raise RuntimeError("a FateZero fuse call needs a source: use_stores(source=...) first")
            state._masks = {}
            state._mask_source = None
            if self.plan.blend and call.step in self.plan.self_steps:
                state._mask_source = state.source.get((*BLEND_KEY, call.step), device=self._device,
                                                      dtype=torch.float32)
        state.call = call
