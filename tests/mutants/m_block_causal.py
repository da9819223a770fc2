"""Mutants of block-causal attention (issue #18): the sink slots, the window ring and its
length, absolute rotary positions, what a call records, per-row caches, reset, the
adaptive sink policy; and the streaming Wan VAE. Their proofs are in
tests/attention/test_block_causal.py (the tiny Wan transformer chunk by chunk against the
stock model on the whole video under the block mask) and tests/models/test_wan_vae_stream.py."""

from mutation import Patch, mutant

MOD = "diffstream.attention.block_causal"
PROC = f"{MOD}:BlockCausalAttnProcessor"
STATE = f"{MOD}:BlockCausalState"
ADAPT = f"{MOD}:AdaptiveSink.commit"
VAE = "diffstream.models.wan:WanVAEStream"

PROOFS = "tests/attention/test_block_causal.py"
FULL = f"{PROOFS}::test_stream_equals_full_sequence_with_block_mask"
ROLLING = f"{FULL}[chunk1-sink1-window2]"
NO_SINK = f"{FULL}[chunk1-sink0-window3]"
TWO_SINKS = f"{FULL}[chunk1-sink2-window1]"
TWO_FRAMES = f"{FULL}[chunk2-sink1-window1]"
PROTOCOL = f"{PROOFS}::test_attend_calls_leave_the_cache_and_record_commits"
LONG = f"{PROOFS}::test_long_stream_memory_is_constant_and_positions_stay_absolute"
RESET = f"{PROOFS}::test_reset_starts_a_new_stream"
ADAPTIVE = f"{PROOFS}::test_adaptive_sink_replaces_the_drifted_sink"
ADAPTIVE_1 = f"{ADAPTIVE}[sink1-window2]"
ADAPTIVE_2 = f"{ADAPTIVE}[sink2-window1]"
NO_DRIFT = f"{PROOFS}::test_adaptive_sink_without_drift_is_the_fixed_policy"
RERECORD_SAME = f"{PROOFS}::test_rerecord_with_the_same_inputs_is_bitwise_the_cache"
RERECORD_WRAPPED = f"{PROOFS}::test_rerecord_after_the_ring_wrapped_attends_the_cached_chunks"
ROWS = f"{PROOFS}::test_row_calls_equal_independent_streams"
ROWS_1 = f"{ROWS}[chunk1-sink1-window2]"
ROWS_2 = f"{ROWS}[chunk2-sink1-window1]"
ROWS_ORDER = f"{PROOFS}::test_row_calls_check_each_rows_order_and_policy"

VAE_PROOFS = "tests/models/test_wan_vae_stream.py"
VAE_ENCODE = f"{VAE_PROOFS}::test_streamed_encode_equals_one_shot"
VAE_DECODE = f"{VAE_PROOFS}::test_streamed_decode_equals_one_shot"


def _config(sinks: str = "config.sink_chunks", window: str = "config.window_chunks") -> Patch:
    """The state built with another cache policy than the one it was given."""
    return Patch(f"{STATE}.__init__", "self.config = config",
                 f"self.config = type(config)(config.chunk_frames, {sinks}, {window})")


MUTANTS = [
    # --- the buffer: sinks, ring, length --------------------------------------------
    mutant("bc-ring-overwrites-sinks", "the window ring starts at slot 0 instead of after the sinks, so the "
           "first chunks past the sinks overwrite them", [ROLLING, TWO_SINKS],
           Patch(f"{STATE}._slot_of", "s + (n - s) % (w + 1)", "(n - s) % (w + 1)")),
    mutant("bc-sinks-roll-out", "no sink: the ring covers every slot, so the first chunks are evicted like "
           "any other", [ROLLING, TWO_SINKS],
           Patch(f"{STATE}._slot_of", "return n if n < s else s + (n - s) % (w + 1)", "return n % (s + w + 1)")),
    mutant("bc-ring-one-slot-short", "the ring has W slots instead of W + 1, so the current chunk overwrites "
           "the oldest chunk of its own window", [ROLLING, NO_SINK],
           Patch(f"{STATE}._slot_of", "s + (n - s) % (w + 1)", "s + (n - s) % w")),
    mutant("bc-ring-slot-off-by-one", "the chunk written one ring slot ahead of where it belongs",
           [ROLLING, NO_SINK],
           Patch(f"{STATE}._slot_of", "s + (n - s) % (w + 1)", "s + (n - s + 1) % (w + 1)")),
    mutant("bc-window-one-too-large", "one chunk too many kept in the window (W + 1)", [ROLLING, NO_SINK],
           _config(window="config.window_chunks + 1")),
    mutant("bc-window-one-too-small", "one chunk too few kept in the window (W - 1)", [ROLLING, NO_SINK],
           _config(window="config.window_chunks - 1")),
    mutant("bc-unfilled-slots-attended", "while the buffer fills, the chunk attends over every slot, empty "
           "(zero) ones included", [ROLLING, NO_SINK],
           Patch(f"{STATE}.length", "return min(self.chunk, self.config.sink_chunks + self.config.window_chunks) + 1",
                 "return self.config.slots")),
    mutant("bc-own-chunk-twice", "the chunk's own keys/values attended twice (from its slot and appended "
           "again)", [ROLLING],
           Patch(f"{PROC}.__call__", "F.scaled_dot_product_attention(query, kv.key[:, :, :end], kv.value[:, :, :end])",
                 "F.scaled_dot_product_attention(query, torch.cat([kv.key[:, :, :end], key], 2), "
                 "torch.cat([kv.value[:, :, :end], value], 2))")),
    mutant("bc-rows-share-a-cache", "every row writes row 0's keys/values: the streams (or guidance branches) "
           "of a call share one cache", [ROLLING],
           Patch(f"{PROC}.__call__", "kv.key[:, :, at:at + n] = key\n    kv.value[:, :, at:at + n] = value",
                 "kv.key[:, :, at:at + n] = key[:1]\n    kv.value[:, :, at:at + n] = value[:1]")),
    # --- positions (Self-Forcing's absolute frame positions) ---------------------------
    mutant("bc-positions-chunk-relative", "every chunk at frames 0..F-1 (the model's own rope for a chunk fed "
           "alone) instead of its frames in the stream", [ROLLING, TWO_FRAMES],
           Patch(f"{STATE}.rotary", "else (self.chunk,)", "else (0,)")),
    mutant("bc-positions-in-chunks", "positions counted in chunks instead of latent frames (chunk n at "
           "frame n)", TWO_FRAMES,
           Patch(f"{STATE}.rotary", "torch.arange(c * frames, (c + 1) * frames", "torch.arange(c, c + frames")),
    mutant("bc-query-chunk-relative", "the query rotated with the model's chunk-local table, the keys with the "
           "absolute one", [ROLLING],
           Patch(f"{PROC}.__call__", "query = apply_rotary(query, cos, sin)", "query = apply_rotary(query, *rotary_emb)")),
    mutant("bc-keys-cached-unrotated", "keys attended and cached without their rotary positions", [ROLLING],
           Patch(f"{PROC}.__call__", "key = apply_rotary(key, cos, sin).transpose(1, 2)", "key = key.transpose(1, 2)")),
    mutant("bc-rotary-kept-across-calls", "the absolute rotary table built once and kept, so every chunk "
           "gets the first chunk's positions", [ROLLING, LONG],
           Patch(f"{STATE}.begin_call", "    self._rotary = None\n", "")),
    # --- what is recorded (Self-Forcing: clean K/V from a record call) -----------------
    mutant("bc-attend-calls-record", "attend calls also commit their chunk: the noisy keys/values of the "
           "denoising steps enter the cache", PROTOCOL,
           Patch(f"{STATE}._commit", 'if self.mode == "record":', "if self.mode is not None:")),
    mutant("bc-record-never-commits", "a record call writes its slot but the counter never moves: every chunk "
           "is chunk 0", [ROLLING, PROTOCOL],
           Patch(f"{STATE}._commit", "self.recorded += 1", "pass")),
    mutant("bc-reset-keeps-count", "reset() keeps the chunk counter: a new stream starts mid-window at the old "
           "stream's positions", RESET,
           Patch(f"{STATE}.reset", "self.recorded = 0", "self.recorded = getattr(self, 'recorded', 0)")),
    # --- the adaptive sink (StreamDiffusionV2) ---------------------------------------
    mutant("bc-adapt-keys-only", "the drift score from the pooled keys only (StreamDiffusionV2 averages the "
           "keys' and the values' cosines)", [ADAPTIVE_1, ADAPTIVE_2],
           Patch(ADAPT, "for pooled in (kv.key, kv.value):", "for pooled in (kv.key, kv.key):")),
    mutant("bc-adapt-summed-over-layers", "the layers' cosines summed instead of averaged (the threshold then "
           "means something else for every depth)", [ADAPTIVE_1, ADAPTIVE_2],
           Patch(ADAPT, "score = score / (2 * len(state.layers))", "score = score / 2")),
    mutant("bc-adapt-first-layer-only", "the drift score from the first layer only", [ADAPTIVE_1, ADAPTIVE_2],
           Patch(ADAPT, "for kv in state.layers.values():\n        for pooled in",
                 "for kv in list(state.layers.values())[:1] * len(state.layers):\n        for pooled in")),
    mutant("bc-adapt-threshold-reversed", "a sink replaced when the chunk is *similar* to it (cosine above the "
           "threshold)", [ADAPTIVE_1, ADAPTIVE_2, NO_DRIFT],
           Patch(ADAPT, "replace = best < self.threshold", "replace = best > self.threshold")),
    mutant("bc-adapt-most-similar-sink", "the sink most similar to the chunk replaced instead of the most "
           "drifted one", ADAPTIVE_2,
           Patch(ADAPT, "worst_sink = score.argmin(dim=1)", "worst_sink = score.argmax(dim=1)")),
    mutant("bc-adapt-every-drifted-sink", "every sink below the threshold replaced by the chunk, not only the "
           "most drifted one (the chunk is then attended twice)", ADAPTIVE_2,
           Patch(ADAPT, "take = replace[:, None] & (torch.arange(s, device=score.device) == worst_sink[:, None])",
                 "take = score < self.threshold")),
    mutant("bc-adapt-rows-share-decision", "row 0's decision applied to every row (the rows are separate "
           "streams)", [ADAPTIVE_1, ADAPTIVE_2],
           Patch(ADAPT, "replace = best < self.threshold", "replace = (best < self.threshold)[:1].expand_as(best)")),
    mutant("bc-adapt-ring-advances", "the ring advances although the chunk became a sink: it stays in the "
           "window too and is attended twice", [ADAPTIVE_1, ADAPTIVE_2],
           Patch(ADAPT, "ring.copy_(torch.where(replace.view(b, 1, 1, 1, 1), ring.roll(1, dims=2), ring))",
                 "pass")),
    mutant("bc-adapt-sink-not-written", "the decision taken and the ring held, but the sink slot keeps its old "
           "chunk", [ADAPTIVE_1, ADAPTIVE_2],
           Patch(ADAPT, "sinks.copy_(torch.where(take.view(b, 1, s, 1, 1), x[:, :, r:r + 1], sinks))", "pass")),
    mutant("bc-adapt-pooled-over-heads", "keys/values averaged over heads as well as tokens (one d-vector "
           "instead of heads x d)", [ADAPTIVE_1, ADAPTIVE_2],
           Patch(ADAPT, "new = x[:, :, r].mean(2, dtype=torch.float32).flatten(1)  # (B, heads * d)\n"
                 "            sinks = x[:, :, :s].mean(3, dtype=torch.float32).transpose(1, 2).flatten(2)",
                 "new = x[:, :, r].mean((1, 2), dtype=torch.float32)\n"
                 "            sinks = x[:, :, :s].mean((1, 3), dtype=torch.float32)")),
    # --- re-recording cached chunks (LongLive's recache) ---------------------------------
    mutant("bc-rerecord-advances-counter", "a re-recorded chunk also moves the counter: the stream continues "
           "chunks later than it is", [RERECORD_SAME, RERECORD_WRAPPED],
           Patch(f"{STATE}._commit", "self._rerecord.pop(0)", "self._rerecord.pop(0); self.recorded += 1")),
    mutant("bc-rerecord-at-next-position", "a re-recorded chunk rotated to the next chunk's frame positions, "
           "not its own", [RERECORD_SAME, RERECORD_WRAPPED],
           Patch(f"{STATE}.rotary", "else (self.chunk,)", "else (self.recorded,)")),
    mutant("bc-rerecord-sees-later-chunks", "a re-recorded chunk attends to every cached chunk, later ones "
           "included", [RERECORD_SAME, RERECORD_WRAPPED],
           Patch(f"{STATE}.attended_slots", "for k in self.cached() if k <= c", "for k in self.cached()")),
    mutant("bc-rerecord-mask-dropped", "re-recording after the ring wrapped attends to the slots up to the last "
           "attended one, stale ones between included", RERECORD_WRAPPED,
           Patch(f"{PROC}.__call__", "attn_mask=keep)", "attn_mask=None)")),
    # --- the streaming VAE ------------------------------------------------------------
    mutant("wanvae-first-group-of-four", "the stream's first latent frame encoded from 4 frames, like the "
           "others, instead of frame 0 alone", VAE_ENCODE,
           Patch(f"{VAE}.frames_needed", "return 1 if self.frames_in == 0 else WAN_TEMPORAL_FACTOR",
                 "return WAN_TEMPORAL_FACTOR")),
    mutant("wanvae-every-latent-first-chunk", "every latent frame decoded with the decoder's first-chunk flag",
           VAE_DECODE,
           Patch(f"{VAE}.decode", "first_chunk=self.latents_decoded == 0", "first_chunk=True"),
           harmless="Wan 2.1's decoder ignores `first_chunk` (only the residual up-blocks of Wan 2.2's VAE read "
                    "it; their first latent frame is told by the empty feature cache), and WanVAEStream refuses "
                    "Wan 2.2's VAE (patch_size); the flag is passed as diffusers' _decode passes it"),
    mutant("wanvae-decoder-cache-dropped", "the decoder's causal feature cache dropped between latent frames",
           VAE_DECODE,
           Patch(f"{VAE}.decode", "feat_cache=self._dec_cache", "feat_cache=[None] * self._decoder_convs")),
    mutant("wanvae-encoder-cache-dropped", "the encoder's causal feature cache dropped between frame groups",
           VAE_ENCODE,
           Patch(f"{VAE}.encode", "feat_cache=self._enc_cache", "feat_cache=[None] * self._encoder_convs")),
    # --- row calls (StreamDiffusionV2's stream batch: one stream per row) --------------------
    mutant("bc-rows-no-mask", "rows attending to unequal lengths share the longest (a young row reads empty "
           "slots)", ROWS_1, Patch(f"{STATE}.row_mask", "if len(set(lengths)) == 1:", "if True:")),
    mutant("bc-rows-written-to-first-row", "every row's keys written to the call's first buffer row", ROWS_1,
           Patch(f"{PROC}._rows", "kv.key[first + i, :, at:at + n] = key[i]", "kv.key[first, :, at:at + n] = key[i]")),
    mutant("bc-rows-positions-of-row-0", "every row roped at the first row's chunk positions", ROWS_1,
           Patch(f"{STATE}.rotary", 'chunks = self._row_call[1] if self.mode == "rows" else (self.chunk,)',
                 'chunks = (self._row_call[1][0],) * len(self._row_call[1]) if self.mode == "rows" else (self.chunk,)')),
    mutant("bc-rows-slot-of-row-0", "every row's chunk written to the first row's slot", ROWS_2,
           Patch(f"{PROC}._rows", "at = state._slot_of(chunk) * n", "at = state._slot_of(chunks[0]) * n")),
    mutant("bc-rows-window-short", "a row whose window is full attends to one slot fewer", ROWS_2,
           Patch(f"{STATE}.row_lengths", "min(c, cap) + 1", "min(c, cap - 1) + 1")),
    mutant("bc-rows-order-unchecked", "a row's chunks may come out of order", ROWS_ORDER,
           Patch(f"{STATE}.begin_rows", "if chunks != expected:", "if False:")),
]
