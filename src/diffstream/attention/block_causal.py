"""Block-causal self-attention with sink chunks and a rolling KV cache: causal Wan video DiTs.

Issue #18; shared/notes/field-2026-12.md Sec. 1-2. StreamDiffusionV2, Self-Forcing,
CausVid, LongLive and their kin share one recipe: Wan 2.1's video DiT made causal over
*chunks* of latent frames (Self-Forcing's `num_frame_per_block`: 3 latent frames per
chunk; StreamDiffusionV2 streams 1), each chunk denoised in 1-4 steps while attending to
the keys/values of earlier chunks, kept in a KV cache per self-attention layer. The
cache holds the first `sink_chunks` chunks for ever (the "sink", LongLive's frame sink,
StreamDiffusionV2's sink tokens) and a rolling window of the `window_chunks` most recent
ones; older chunks are evicted. Chunk n's queries attend to

    sinks {0, ..., S-1}  +  window {n-W, ..., n-1}  +  itself      (S = sink_chunks, W = window_chunks)

(each set cut to the chunks that exist and are < n; the chunk's own frames attend to one
another bidirectionally). Run on the whole video in one call with that block mask, the
stock model gives exactly what the chunk-by-chunk cache gives (the proof:
tests/attention/test_block_causal.py). In Self-Forcing's terms the cache is
`local_attn_size = (S + W + 1) * chunk_frames` frames (their cache also holds the current
chunk) with `sink_size = S * chunk_frames`.

Choices, each where it comes from:

- Positions: Wan's rotary embedding (RoPE over frame, row, column) is applied with the
  chunk's *absolute* frame indices in the stream (chunk n: frames n*F ... n*F + F - 1),
  and keys are cached *after* RoPE, as Self-Forcing's causal Wan model does
  (`causal_rope_apply(..., start_frame=current_start_frame)`, roped keys written to the
  cache) and the models built on its code (LongLive's, as Daydream Scope vendors it).
  So a cached key never needs re-rotating, the ring can be read in any slot order
  (attention sums over keys, and each key carries its position), and the stream equals
  the full-sequence block-causal model exactly. Wan's `rope` module only knows the
  frames of the current input (a chunk fed alone gets frames 0..F-1), so the processor
  replaces the time part of the rotary table it is given by the absolute one, computed
  as Wan's table is (`time_rotary`). No table bound: a stream past Wan's 1024 positions
  keeps going; like every absolute-position scheme it is then past what the model saw
  in training (Self-Forcing's users see flicker past its training length, notes Sec. 2).
- What is recorded: a call is "attend" (read the cache; the chunk's own keys/values
  only fill its slot, which no other chunk reads) or "record" (the same attention, and
  the chunk joins the cache when the call ends).
  The papers' policy (Self-Forcing's inference loop, after CausVid): denoise a chunk
  with "attend" calls, then run its *clean* denoised latents once more at timestep 0
  as a "record" call, so the cache holds clean keys/values, never noisy ones; that is
  the default the pipeline should follow. Recording on the last denoising step instead
  (saving the extra call) is the pipeline's choice too: the state only sees modes.
- Memory: per layer one preallocated buffer of S + W + 1 chunks of keys and values
  (sinks, the window ring, and the current chunk's slot, which is the slot the next
  recorded chunk evicts), allocated at the stream's first chunk and never grown or
  moved; fill counts and slots are host-side integers derived from one counter, so the
  per-chunk path has no host sync.
- Sink policy (`BlockCausalConfig.sink_policy`, pluggable: `SINK_POLICIES`), applied as
  a recorded chunk is committed. "fixed": the first S chunks are the sinks for ever
  (Self-Forcing, LongLive, StreamDiffusionV2's fast config). "adaptive":
  StreamDiffusionV2's adaptive sink (its `CausalWanSelfAttention`, `adapt_sink_thr`,
  0.2 in its configs): a new chunk whose pooled keys/values drifted from a sink takes
  that sink's place (`AdaptiveSink` says exactly how).
- Re-recording (`BlockCausalState.rerecord`, for LongLive's recache on a prompt switch):
  the next record calls rewrite given cached chunks in their own slots at their own
  positions, each attending to the cached chunks up to it; the counter does not move.

One call = one chunk: every row of a call is the same chunk (rows are streams or
guidance branches, each with its own cache), `chunk_frames` latent frames of the same
size as the stream's first chunk.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import get_1d_rotary_pos_embed

from diffstream.attention.base import (
    BatchLayout,
    Mechanism,
    compiler_opaque,
    install_processors,
    is_self_attention,
)
from diffstream.attention.cross_kv_cache import CrossKVCacheState, make_cross_processor, share_text_projection
from diffstream.errors import ConfigError

# Call modes (see BlockCausalState.begin_call): the BatchLayout phase "record" records,
# "attend" and "stream" attend.
MODES = ("attend", "record")
# Wan's rotary base (diffusers' WanRotaryPosEmbed default; WanTransformer3DModel never passes another).
WAN_ROPE_THETA = 10000.0


@dataclass(frozen=True)
class BlockCausalConfig:
    """Chunking and cache policy of block-causal attention.

    Defaults: the shape of LongLive's setting (Self-Forcing's 3-latent-frame blocks, one
    sink block, a short window); set them per checkpoint (StreamDiffusionV2 streams one
    latent frame per chunk).

    Attributes:
        chunk_frames: latent frames per chunk (Self-Forcing's `num_frame_per_block`);
            with Wan's VAE one latent frame is 4 video frames.
        sink_chunks: S, the stream's first chunks, kept in the cache for ever.
        window_chunks: W, the most recent chunks kept besides the sinks (rolling).
        sink_policy: which chunks are the sinks, a name in `SINK_POLICIES`: "fixed"
            (the stream's first S chunks) or "adaptive" (`AdaptiveSink`).
        adapt_sink_threshold: the adaptive policy's cosine threshold (StreamDiffusionV2's
            `adapt_sink_threshold`, 0.2); in [-1, 1], and -1 never replaces (a cosine
            is >= -1; 0 is not "off": pooled keys can point away from each other).
        cross_kv_cache: keep every block's cross-attention keys/values of the text per
            prompt (StreamDiffusionV2's `crossattn_cache`, `attention.cross_kv_cache`):
            exact, it only skips their projections.
    """

    chunk_frames: int = 3
    sink_chunks: int = 1
    window_chunks: int = 2
    sink_policy: str = "fixed"
    adapt_sink_threshold: float = 0.2
    cross_kv_cache: bool = True

    def __post_init__(self):
        if self.chunk_frames < 1:
            raise ConfigError(f"--chunk-frames must be >= 1, got {self.chunk_frames}")
        if self.sink_chunks < 0 or self.window_chunks < 0:
            raise ConfigError(f"--sink-chunks and --window-chunks must be >= 0, got {self.sink_chunks} "
                              f"and {self.window_chunks}")
        if self.sink_chunks + self.window_chunks < 1:
            raise ConfigError("--sink-chunks + --window-chunks must be >= 1 (a chunk needs some past to attend to)")
        if self.sink_policy not in SINK_POLICIES:
            raise ConfigError(f"--sink-policy must be one of {', '.join(SINK_POLICIES)}, got {self.sink_policy!r}")
        if not -1.0 <= self.adapt_sink_threshold <= 1.0:
            raise ConfigError(f"--adapt-sink-threshold is a cosine, in [-1, 1], got {self.adapt_sink_threshold}")
        if self.sink_policy == "adaptive" and self.sink_chunks < 1:
            raise ConfigError("--sink-policy adaptive needs --sink-chunks >= 1 (it replaces sinks)")

    @property
    def slots(self) -> int:
        """Chunks in a layer's buffer: the sinks, the window, and the current chunk."""
        return self.sink_chunks + self.window_chunks + 1


class FixedSink:
    """The stream's first S chunks are the sinks for ever (Self-Forcing, LongLive,
    StreamDiffusionV2's fast config). A policy's `commit(state)` runs as a recorded
    chunk is committed (`state.chunk` is that chunk, `state.slot` its ring slot, every
    layer has written it), before the counter moves; it may rewrite buffer contents in
    place, never reallocate them, and must leave every layer the same chunk set."""

    def commit(self, state: "BlockCausalState") -> None:
        pass


class AdaptiveSink:
    """StreamDiffusionV2's adaptive sink, with one decision per chunk for all layers.

    When chunk n is committed (once the buffer is full, n >= S + W), per row (each row
    is its own stream):

        score(s) = mean over layers l of ( cos(K_l(n), K_l(s)) + cos(V_l(n), V_l(s)) ) / 2

    for every sink slot s, where K_l(c) is chunk c's keys at layer l (after rotary, as
    cached) averaged over the chunk's tokens and laid out over heads x head dim (one
    vector of heads * d), V_l(c) its values the same way. If min_s score(s) < threshold,
    the sink with the lowest score (only that one) is replaced by chunk n: chunk n moves
    into that sink slot with its keys/values as recorded (its absolute positions kept),
    and the ring does not advance (chunk n leaves its window place, so the window keeps
    its W most recent chunks that did not become sinks). That is StreamDiffusionV2's
    rule (cosine of mean-pooled roped keys and of values, averaged; argmin sink queued
    for replacement; the replaced sink's slot is the one the new chunk is written to,
    and its ring queue is left as it was), except: it decides per layer and at every
    call, here once per recorded (clean) chunk for all layers from the layer-averaged
    score, since all layers must keep the same chunks; and it pools one frame, here a
    whole chunk. Before the buffer is full nothing is replaced (StreamDiffusionV2 too
    replaces only when it evicts).

    No host sync: the decision stays on the device and is applied with `torch.where`
    to every layer's sink slots and ring (the ring rotated one slot forward where a row
    replaced a sink, so the host-side slot of the next chunk is the one chunk n
    occupied); each commit reads the sinks and the new chunk and rewrites the sinks and
    the ring of every layer. The last commit's scores and decisions are kept on the
    state (`sink_score` (B, S), `sink_replaced` (B,): the replaced sink or -1).
    """

    def __init__(self, threshold: float):
        self.threshold = threshold

    def commit(self, state: "BlockCausalState") -> None:
        s, w = state.config.sink_chunks, state.config.window_chunks
        if state.chunk < s + w or not state.layers or self.threshold <= -1.0:
            return
        r = state.slot
        score = 0.0
        for kv in state.layers.values():
            for pooled in (kv.key, kv.value):
                b, h, _, d = pooled.shape
                x = pooled.view(b, h, -1, kv.tokens, d)  # (B, heads, slots, N, d)
                new = x[:, :, r].mean(2, dtype=torch.float32).flatten(1)  # (B, heads * d)
                sinks = x[:, :, :s].mean(3, dtype=torch.float32).transpose(1, 2).flatten(2)  # (B, S, heads * d)
                score = score + F.cosine_similarity(sinks, new[:, None], dim=-1)  # (B, S)
        score = score / (2 * len(state.layers))
        best = score.min(dim=1).values  # (B,)
        worst_sink = score.argmin(dim=1)  # (B,) the most drifted sink
        replace = best < self.threshold  # (B,)
        state.sink_score = score
        state.sink_replaced = torch.where(replace, worst_sink, -1)
        take = replace[:, None] & (torch.arange(s, device=score.device) == worst_sink[:, None])  # (B, S)
        for kv in state.layers.values():
            for buffer in (kv.key, kv.value):
                b, h, _, d = buffer.shape
                x = buffer.view(b, h, -1, kv.tokens, d)  # (B, heads, slots, N, d)
                sinks, ring = x[:, :, :s], x[:, :, s:]
                sinks.copy_(torch.where(take.view(b, 1, s, 1, 1), x[:, :, r:r + 1], sinks))
                # ring index of chunk m is (m - S) mod (W + 1): rotated forward by one, every
                # ring chunk is evicted one chunk later, and the next chunk's slot holds chunk n
                ring.copy_(torch.where(replace.view(b, 1, 1, 1, 1), ring.roll(1, dims=2), ring))


# Sink policies by name (`BlockCausalConfig.sink_policy`): each a factory of the config.
SINK_POLICIES: dict[str, Callable[["BlockCausalConfig"], object]] = {
    "fixed": lambda config: FixedSink(),
    "adaptive": lambda config: AdaptiveSink(config.adapt_sink_threshold),
}


class LayerKV:
    """The keys and values of one self-attention layer, preallocated.

    `key`, `value`: (B, heads, slots * N, d), N = tokens per chunk. Slots 0..S-1 hold the
    sink chunks, slots S..S+W a ring over the window and the current chunk (rotary
    positions already applied to the keys, so slot order is irrelevant).
    """

    def __init__(self, like: torch.Tensor, slots: int):
        b, heads, n, d = like.shape  # (B, heads, N, d)
        self.key = like.new_zeros(b, heads, slots * n, d)
        self.value = like.new_zeros(b, heads, slots * n, d)
        self.tokens = n


class BlockCausalState:
    """The caches of one stream and where its current chunk sits.

    Everything positional follows from one host-side counter, `recorded` (chunks whose
    keys/values joined the cache): the current chunk is chunk `recorded`, its frames
    start at `recorded * chunk_frames`, and its slot and the attended length are
    `slot` and `length`. The per-layer buffers (`LayerKV`) are allocated at the first
    chunk of a stream; `reset()` starts a new stream and keeps them (nothing is read
    beyond what the counter says is filled), reallocating only if the new stream's
    first chunk has another shape.
    """

    def __init__(self, config: BlockCausalConfig):
        self.config = config
        self.policy = SINK_POLICIES[config.sink_policy](config)
        self.layers: dict[str, LayerKV] = {}
        self.reset()

    def reset(self) -> None:
        """A new stream: the next chunk is chunk 0 again, with an empty cache."""
        self.recorded = 0  # chunks recorded so far = index of the current chunk (but while re-recording)
        self.mode: str | None = None  # "attend" | "record" while a call is open
        self._rotary = None  # the current call's absolute rotary table (cos, sin), built once per call
        self.sink_score: torch.Tensor | None = None  # (B, S) the adaptive policy's last scores
        self.sink_replaced: torch.Tensor | None = None  # (B,) the sink it last replaced per row, or -1
        self._rerecord: list[int] = []  # cached chunks the next record calls record again (`rerecord`)
        self.rows: int | None = None  # row calls (`begin_rows`): streams in the buffers, one per buffer row
        self._row_next: list[int] = []  # row calls: each buffer row's next chunk
        self._row_call: tuple[int, tuple[int, ...]] | None = None  # the open row call: (first row, chunks)
        self._row_mask = None  # the open row call's (R, 1, 1, keys) mask when its rows attend to unequal lengths

    def begin_call(self, mode: str) -> None:
        """Open the next model call; the only per-call channel.

        A "record" call's chunk joins the cache when the call ends, i.e. here, as the
        next call opens (every layer has written it by then).

        Args:
            mode: "attend" (attend to the cache and the chunk itself) or "record" (the
                same, and the chunk is then committed to the cache).
        """
        if mode not in MODES:
            raise ValueError(f"unknown block-causal call mode {mode!r}; one of {', '.join(MODES)}")
        self._commit()
        if self._rerecord and mode != "record":
            raise RuntimeError(f"block-causal cache: chunks {self._rerecord} are being re-recorded; record calls only")
        self.mode = mode
        self._rotary = None

    def begin_rows(self, chunks, first_row: int, rows: int) -> None:
        """Open a call whose rows are streams of their own, each at its own chunk:
        StreamDiffusionV2's stream batch over denoising steps.

        StreamDiffusionV2 (its `CausalStreamInferencePipeline.inference_stream`) runs the
        K denoising steps of K consecutive chunks as one batch: row k is chunk n - k at
        step k, each row with its own KV cache (the cache repeated over the batch) and
        its own positions (`kv_cache_starts`), and every call writes each row's keys to
        that row's cache: no clean record call, so row k's cache holds the earlier
        chunks' keys/values at step k's noise level. Here: the buffers hold `rows`
        streams; call row i is buffer row `first_row + i`, at chunk `chunks[i]` of that
        row's stream, attends to that row's sinks, window and itself, and joins that
        row's cache (slot and length follow from the chunk index alone with fixed
        sinks). Each buffer row's chunks must come in order 0, 1, 2, ... (checked on
        the host); a call may run any contiguous rows (the first and last K - 1 calls
        of a stream batch run fewer than K). The fixed sink policy only, no re-recording.

        Args:
            chunks: the chunk index of each call row, host ints.
            first_row: the buffer row of call row 0.
            rows: buffer rows (K); fixed for a stream (`reset` to change it).
        """
        chunks = tuple(int(c) for c in chunks)
        self._commit()
        if not isinstance(self.policy, FixedSink):
            raise ValueError("block-causal row calls (stream batch) need the fixed sink policy")
        if self.recorded or self._rerecord:
            raise RuntimeError("block-causal cache: a stream is either chunk calls or row calls; reset() first")
        if self.rows != rows:
            if any(self._row_next):
                raise RuntimeError(f"block-causal cache: the stream has {self.rows} rows, not {rows}; reset() first")
            self.rows, self._row_next = int(rows), [0] * int(rows)
        if first_row < 0 or not chunks or first_row + len(chunks) > rows:
            raise ValueError(f"block-causal row call: rows {first_row}..{first_row + len(chunks) - 1} of {rows}")
        expected = tuple(self._row_next[first_row:first_row + len(chunks)])
        if chunks != expected:
            raise RuntimeError(f"block-causal row call: rows {first_row}.. are at chunks {list(expected)}, "
                               f"got {list(chunks)} (each row's chunks in order)")
        for i in range(len(chunks)):
            self._row_next[first_row + i] += 1
        self.mode = "rows"
        self._row_call = (int(first_row), chunks)
        self._rotary = None
        self._row_mask = None

    @property
    def row_call(self) -> tuple[int, tuple[int, ...]]:
        """The open row call: (first buffer row, chunk of each call row)."""
        return self._row_call

    def row_lengths(self) -> list[int]:
        """Chunks each row of the open row call attends to, itself included."""
        cap = self.config.sink_chunks + self.config.window_chunks
        return [min(c, cap) + 1 for c in self._row_call[1]]

    def row_mask(self, tokens: int, device) -> torch.Tensor | None:
        """(R, 1, 1, max length * tokens) bool: row i's first `row_lengths()[i]` slots, or
        None when every row attends to the same length (built once per call)."""
        lengths = self.row_lengths()
        if len(set(lengths)) == 1:
            return None
        if self._row_mask is None:
            keys = torch.arange(max(lengths) * tokens, device=device)  # (keys,)
            ends = torch.tensor([n * tokens for n in lengths], device=device)  # (R,)
            self._row_mask = (keys[None] < ends[:, None])[:, None, None]  # (R, 1, 1, keys)
        return self._row_mask

    def _commit(self) -> None:
        """The last call was a record call: its chunk is now part of the cache (after the
        sink policy has had its say). A row call's chunks were counted as it opened."""
        if self.mode == "rows":
            self._row_call = None
        if self.mode == "record":
            if self._rerecord:  # a re-recorded chunk: its slot is rewritten, nothing else moves
                self._rerecord.pop(0)
            else:
                self.policy.commit(self)
                self.recorded += 1
        self.mode = None

    def rerecord(self, chunks=None) -> list[int]:
        """Record cached chunks again: LongLive's KV recache on a prompt switch.

        The next `len(chunks)` calls must be record calls, one per chunk in that order;
        each is chunk c: its absolute positions (frames c*F ...), its own slot rewritten,
        attending to the cached chunks up to c (sinks and window chunks <= c, with what
        they hold by then: chunks re-recorded before it have their new keys/values)
        and itself. The counter does not move: the call after the last of them is the
        stream's next chunk again. A record call still open is committed first. With
        the same inputs and no chunk evicted yet (n <= S + W) the cache comes out
        bitwise what it was; once chunks were evicted, a re-recorded chunk sees only the
        cached ones (as LongLive's recache, which re-runs the cached frames alone).

        Args:
            chunks: chunk indices, increasing, each in the cache now (a sink, or one of
                the W most recent chunks); None: every cached chunk (`cached()` once the
                open call is committed). The fixed sink policy only (the adaptive one's
                sinks are known on the device only).
        Returns:
            the chunks the next record calls are, in order.
        """
        self._commit()
        s, w, n = self.config.sink_chunks, self.config.window_chunks, self.recorded
        chunks = self.cached() if chunks is None else [int(c) for c in chunks]
        if not isinstance(self.policy, FixedSink):
            raise ValueError("rerecord() needs the fixed sink policy (the adaptive one's sinks are not host-side)")
        cached = self.cached()
        if any(c not in cached for c in chunks) or chunks != sorted(set(chunks)):
            raise ValueError(f"rerecord({chunks}): chunks must be increasing and cached ({cached}, after {n} chunks "
                             f"with {s} sinks and a window of {w})")
        self._rerecord = list(chunks)
        return chunks

    def cached(self) -> list[int]:
        """The chunks in the cache now (fixed sink policy): the sinks and the window."""
        s, w, n = self.config.sink_chunks, self.config.window_chunks, self.recorded
        return list(range(min(s, n))) + list(range(max(s, n - w), n))

    def _slot_of(self, n: int) -> int:
        """Chunk n's slot (`slot`)."""
        s, w = self.config.sink_chunks, self.config.window_chunks
        return n if n < s else s + (n - s) % (w + 1)

    def attended_slots(self) -> list[int] | None:
        """While re-recording: the slots the current chunk attends to, else None (the
        first `length` slots)."""
        if not self._rerecord:
            return None
        c = self._rerecord[0]
        return sorted(self._slot_of(k) for k in self.cached() if k <= c)

    def attend_mask(self, tokens: int, device) -> torch.Tensor | None:
        """(1, length * tokens) bool over the attended slots' keys when they are not the
        first `length` slots (re-recording after the ring wrapped), else None."""
        picks = self.attended_slots()
        if picks is None or picks == list(range(len(picks))):
            return None
        keep = torch.zeros(self.length, dtype=torch.bool)
        keep[picks] = True
        return keep.repeat_interleave(tokens)[None].to(device)  # (1, length * tokens): every query row

    @property
    def chunk(self) -> int:
        """Index of the current call's chunk in the stream (a re-recorded one's while
        re-recording)."""
        return self._rerecord[0] if self._rerecord else self.recorded

    @property
    def slot(self) -> int:
        """Buffer slot of the current chunk: its sink slot while n < S, then the ring
        slot S + (n - S) mod (W + 1), whose chunk n - W - 1 has just left the window
        (with the adaptive sink policy: whose chunk is the oldest of the ring, the ring
        being rotated whenever a chunk became a sink)."""
        return self._slot_of(self.chunk)

    @property
    def length(self) -> int:
        """Chunks the current chunk attends to, itself included: min(n, S + W) + 1. They
        are always the first `length` slots (the buffer fills in order before it wraps);
        while re-recording, the slots up to the last attended one (`attend_mask`)."""
        picks = self.attended_slots()
        if picks is not None:
            return max(picks) + 1
        return min(self.chunk, self.config.sink_chunks + self.config.window_chunks) + 1

    def layer(self, name: str, like: torch.Tensor) -> LayerKV:
        """This layer's buffers, allocated at the stream's first chunk.

        Args:
            like: (B, heads, N, d) this call's keys (shape, dtype, device); in a row call
                the buffers have `rows` rows whatever the call's B.
        """
        if self.mode == "rows":
            like = like[:1].expand(self.rows, *like.shape[1:])  # (rows, heads, N, d)
        kv = self.layers.get(name)
        fits = (kv is not None and kv.key.shape[:2] == like.shape[:2] and kv.tokens == like.shape[2]
                and kv.key.shape[3] == like.shape[3] and kv.key.dtype == like.dtype and kv.key.device == like.device)
        if not fits:
            rows = self.mode == "rows"
            started = sum(self._row_next) > len(self._row_call[1]) if rows else self.chunk > 0  # an earlier call wrote
            if kv is not None and started:
                raise RuntimeError(f"block-causal cache of {name}: chunk {self.chunk} has keys {tuple(like.shape)}, "
                                   f"the stream's first had {tuple(kv.key.shape[:2])} x {kv.tokens} tokens; "
                                   "reset() to start a stream of another size")
            kv = self.layers[name] = LayerKV(like, self.config.slots)
        return kv

    def rotary(self, rotary_emb, t_dim: int):
        """The current chunk's rotary table with absolute frame positions (built once per call).

        Args:
            rotary_emb: (cos, sin), each (1, L, 1, D), what Wan's `rope` module computed
                for this chunk alone: frames 0..F-1, then rows, then columns; the first
                `t_dim` channels of each head are the time axis.
            t_dim: rotary channels of the time axis (`rope.t_dim`).
        Returns:
            (cos, sin), each (R, L, 1, D): the time channels at frames n*F ... n*F + F - 1
            (R = 1 for a chunk call; in a row call, each row at its own chunk n).
        """
        if self._rotary is None:
            cos, sin = rotary_emb
            frames = self.config.chunk_frames
            length, dim = cos.shape[1], cos.shape[-1]
            per_frame = length // frames  # tokens per latent frame
            chunks = self._row_call[1] if self.mode == "rows" else (self.chunk,)  # one per row, or one for all
            r = len(chunks)
            # Time axis at the stream's frame indices, as WanRotaryPosEmbed builds its table.
            positions = torch.cat([torch.arange(c * frames, (c + 1) * frames, device=cos.device) for c in chunks])
            t_cos, t_sin = time_rotary(positions, t_dim)  # (R*F, t_dim)
            tables = []
            for table, time in ((cos, t_cos), (sin, t_sin)):
                table = table.view(1, frames, per_frame, dim).expand(r, -1, -1, -1)  # (R, F, N/F, D)
                time = time.to(table.dtype).view(r, frames, 1, t_dim).expand(r, frames, per_frame, t_dim)
                tables.append(torch.cat([time, table[..., t_dim:]], dim=-1).view(r, length, 1, dim))  # (R, L, 1, D)
            self._rotary = tuple(tables)
        return self._rotary

    def tensors(self) -> list[torch.Tensor]:
        """Every cache tensor (tests: their storage must never change while streaming)."""
        return [t for kv in self.layers.values() for t in (kv.key, kv.value)]

    def nbytes(self) -> int:
        """Bytes of the storage behind the caches, each distinct storage counted once, whole."""
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in self.tensors()}
        return sum(storages.values())


def time_rotary(positions: torch.Tensor, dim: int):
    """Rotary cos/sin of the given frame indices on `dim` channels, as Wan's table has them.

    diffusers' own `get_1d_rotary_pos_embed`, called as `WanRotaryPosEmbed` builds its
    table (`use_real`, `repeat_interleave_real`, angles in float64; float32 on MPS), at
    the given positions instead of 0..max_seq_len-1.

    Args:
        positions: (F,) integer frame indices.
    Returns:
        (cos, sin), each (F, dim) float32.
    """
    dtype = torch.float32 if torch.backends.mps.is_available() else torch.float64
    return get_1d_rotary_pos_embed(dim, positions, WAN_ROPE_THETA, use_real=True, repeat_interleave_real=True,
                                   freqs_dtype=dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding on interleaved channel pairs (2i, 2i+1).

    Adapted from diffusers WanAttnProcessor (0.42.1, its inner `apply_rotary_emb`).

    Args:
        x: (B, L, heads, d); cos, sin: (1, L, 1, d), each value repeated for both
            channels of its pair.
    """
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)  # (B, L, heads, d/2) each
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class BlockCausalAttnProcessor:
    """Self-attention (`attn1`) of one Wan transformer block over [sinks, window, own chunk].

    Args:
        state: the stream's caches and current call.
        name: processor name (cache key).
        t_dim: rotary channels of the time axis (the model's `rope.t_dim`).
    """

    def __init__(self, state: BlockCausalState, name: str, t_dim: int):
        self.state = state
        self.name = name
        self.t_dim = t_dim

    @compiler_opaque  # stateful: the compiled graphs stop here (attention.base)
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None,
                 **kwargs):
        """(B, L, C) the chunk's tokens (L = chunk_frames * tokens per frame) -> (B, L, C)."""
        state = self.state
        if state.mode is None:
            raise RuntimeError("block-causal attention used outside a chunk call (begin_call / before_unet first)")
        if encoder_hidden_states is not None or attention_mask is not None or rotary_emb is None:
            raise RuntimeError("BlockCausalAttnProcessor is for a Wan block's self-attention (attn1)")
        # Adapted from diffusers WanAttnProcessor (0.42.1): projections, q/k RMS norms over
        # all heads, split into heads, rotary; then attention over the cache and the output
        # projection. Image (I2V) keys never reach attn1.
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)
        # (B, L, heads * d) -> (B, L, heads, d)
        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        cos, sin = state.rotary(rotary_emb, self.t_dim)  # absolute frame positions
        query = apply_rotary(query, cos, sin).transpose(1, 2)  # (B, heads, L, d)
        key = apply_rotary(key, cos, sin).transpose(1, 2)  # (B, heads, L, d), roped: cached as is
        value = value.transpose(1, 2)  # (B, heads, L, d)

        kv = state.layer(self.name, key)
        n = kv.tokens
        if state.mode == "rows":
            return self._rows(attn, state, kv, query, key, value)
        at = state.slot * n
        # The chunk's keys/values go to its slot (the one the oldest window chunk leaves);
        # the attended chunks are then exactly the buffer's first `length` slots.
        kv.key[:, :, at:at + n] = key
        kv.value[:, :, at:at + n] = value
        end = state.length * n
        keep = state.attend_mask(n, key.device)  # None but when re-recording chunks out of slot order
        if keep is not None:
            out = F.scaled_dot_product_attention(query, kv.key[:, :, :end], kv.value[:, :, :end], attn_mask=keep)
        else:
            out = F.scaled_dot_product_attention(query, kv.key[:, :, :end], kv.value[:, :, :end])  # (B, heads, L, d)
        out = out.transpose(1, 2).flatten(2).type_as(query)  # (B, L, heads * d)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)

    @staticmethod
    def _rows(attn, state: BlockCausalState, kv: LayerKV, query, key, value):
        """A row call (`BlockCausalState.begin_rows`): each row its own stream at its own chunk.

        query, key, value: (R, heads, L, d), roped at each row's positions.
        """
        n = kv.tokens
        first, chunks = state.row_call
        for i, chunk in enumerate(chunks):  # each row's chunk to its slot in its own row of the buffers
            at = state._slot_of(chunk) * n
            kv.key[first + i, :, at:at + n] = key[i]
            kv.value[first + i, :, at:at + n] = value[i]
        rows = slice(first, first + len(chunks))
        end = max(state.row_lengths()) * n
        keep = state.row_mask(n, key.device)  # None when every row attends to the same length
        out = F.scaled_dot_product_attention(query, kv.key[rows, :, :end], kv.value[rows, :, :end],
                                             attn_mask=keep)  # (R, heads, L, d)
        out = out.transpose(1, 2).flatten(2).type_as(query)  # (R, L, heads * d)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


class BlockCausal(Mechanism):
    """Causal chunked video generation's attention as a mechanism (a Wan transformer).

    `attach(transformer)` installs a `BlockCausalAttnProcessor` on every block's
    self-attention (cross-attention stays diffusers'); `before_unet(layout)` opens each
    chunk call, `layout.phase` "record" for a record call, "attend" (or "stream") else.

    Args:
        config: chunking and cache policy.
    """

    name = "causal-video"

    def __init__(self, config: BlockCausalConfig | None = None):
        self.config = config or BlockCausalConfig()
        self.state = BlockCausalState(self.config)
        self.cross = CrossKVCacheState()  # the text keys/values per prompt (config.cross_kv_cache)

    def attach(self, transformer):
        """Install the block-causal processors on a `WanTransformer3DModel` for the context
        (and, with `cross_kv_cache`, the cross-attention cache's)."""
        rope = getattr(transformer, "rope", None)
        if rope is None or not hasattr(rope, "t_dim") or tuple(transformer.config.patch_size)[0] != 1:
            raise ConfigError("--method causal-video needs a Wan video transformer (WanTransformer3DModel, "
                              "temporal patch 1)")
        check_rope(rope)

        cross = make_cross_processor(self.cross) if self.config.cross_kv_cache else None

        def make(name, proc):
            if is_self_attention(name):
                return BlockCausalAttnProcessor(self.state, name, rope.t_dim)
            return cross(name, proc) if cross is not None else None

        return self._installed(transformer, make)

    @contextlib.contextmanager
    def _installed(self, transformer, make):
        with contextlib.ExitStack() as stack:
            installed = stack.enter_context(install_processors(transformer, make))
            if self.config.cross_kv_cache:  # one text tensor per prompt reaches attn2 (cross_kv_cache docstring)
                stack.enter_context(share_text_projection(transformer, self.cross))
            yield installed

    def reset(self) -> None:
        self.state.reset()
        self.cross.reset()

    def before_rows(self, chunks, first_row: int, rows: int) -> None:
        """Open a stream-batch call: call row i is buffer row `first_row + i` at chunk
        `chunks[i]` of its own stream (`BlockCausalState.begin_rows`)."""
        self.state.begin_rows(chunks, first_row, rows)

    def before_unet(self, layout: BatchLayout) -> None:
        if layout.phase not in ("attend", "record", "stream"):
            raise ValueError(f"block-causal calls are 'attend' or 'record', got phase {layout.phase!r}")
        self.state.begin_call("record" if layout.phase == "record" else "attend")

    def call_unet(self, unet, sample, timesteps, encoder_hidden_states, layout: BatchLayout, cond=None,
                  **unet_kwargs):
        """Run the transformer on one chunk.

        Args:
            unet: the `WanTransformer3DModel`.
            sample: (B, C, chunk_frames, h, w) latents; timesteps: (B,); encoder_hidden_states:
                (B, L, D) text embeddings; rows as in `layout`.
        Returns:
            (B, C, chunk_frames, h, w) model output.
        """
        assert sample.ndim == 5 and sample.shape[2] == self.config.chunk_frames, (
            f"{sample.shape=}, chunk of {self.config.chunk_frames} latent frames")
        rows = sample.shape[0]
        assert rows == layout.batch_size and timesteps.shape == (rows,), f"{sample.shape=} {timesteps.shape=}"
        assert encoder_hidden_states.shape[0] == rows, f"{encoder_hidden_states.shape=}"
        return unet(sample, timesteps, encoder_hidden_states=encoder_hidden_states, return_dict=False,
                    **unet_kwargs)[0]

    def cache_bytes(self) -> int:
        return self.state.nbytes() + self.cross.nbytes()


def check_rope(rope) -> None:
    """Refuse a model whose time-axis rotary table is not the one `time_rotary` computes
    (Wan's base 10000): positions would then silently differ from the model's."""
    cos, sin = time_rotary(torch.arange(4), rope.t_dim)
    ours = torch.cat([cos, sin], dim=-1)  # (4, 2 t_dim)
    theirs = torch.cat([rope.freqs_cos[:4, :rope.t_dim], rope.freqs_sin[:4, :rope.t_dim]], dim=-1).cpu()
    if not torch.allclose(ours, theirs.float(), atol=1e-6):
        raise ConfigError("the transformer's rotary embedding is not Wan's (base 10000): causal-video cannot "
                          "place chunks at their stream positions")
