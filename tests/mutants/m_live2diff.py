"""Mutants of Live2Diff (issue #20): the warmup mask, the window and its positions, the
per-(layer, step, branch) KV cache rings, and the depth prior's rows. Their proofs are in
tests/attention/test_causal_temporal_proofs.py: processor level on sharpened attention
(the tiny motion modules attend almost uniformly, so end to end none of these shows)."""

from mutation import Patch, mutant

MOD = "diffstream.attention.causal_temporal"
PROC = f"{MOD}:CausalTemporalAttnProcessor"
STATE = f"{MOD}:CausalTemporalState"
MECH = f"{MOD}:CausalTemporal"

PROOFS = "tests/attention/test_causal_temporal_proofs.py"
FIG1D = f"{PROOFS}::test_stream_equals_fig1d_masked_attention"  # all four params
FIG1D_FULL = f"{FIG1D}[no-bias-full]"
FIG1D_INIT = f"{FIG1D}[no-bias-initialize]"
FIG1D_BIAS = f"{FIG1D}[bias-full]"
BRANCHES = f"{PROOFS}::test_branches_do_not_share_caches"
STEPS = f"{PROOFS}::test_steps_do_not_share_caches"
WARMUP = f"{PROOFS}::test_warmup_is_bidirectional_diffusers_attention"
DEPTH_ROWS = f"{PROOFS}::test_call_unet_adds_each_rows_own_depth_residual"
ENGINE_DEPTH = f"{PROOFS}::test_engine_gives_every_row_its_own_frames_depth"

MUTANTS = [
    # --- the window: order and length (Fig. 1 (d)) ----------------------------------
    mutant("l2d-recent-newest-first", "the recent frames placed newest first in the window once the ring wraps",
           FIG1D_FULL,
           Patch(f"{STATE}.begin_call", "tuple(warm + (at + 1 + i) % size for i in range(size))",
                 "tuple(warm + (at - 1 - i) % size for i in range(size - 1)) + (warm + at,)")),
    mutant("l2d-ring-from-write-index", "the wrapped ring read from the write index (the current frame first) "
           "instead of the entry after it", FIG1D_FULL,
           Patch(f"{STATE}.begin_call", "(at + 1 + i) % size", "(at + i) % size")),
    mutant("l2d-window-one-too-long", "one recent frame too many kept (recent = window - W instead of window - W - 1)",
           FIG1D_FULL,
           Patch(f"{STATE}.__init__", "self.config = config",
                 "self.config = type(config)(config.warmup_frames, config.window + 1, config.depth, "
                 "config.depth_model)")),
    mutant("l2d-window-one-too-short", "one recent frame too few kept (recent = window - W - 2)", FIG1D_FULL,
           Patch(f"{STATE}.__init__", "self.config = config",
                 "self.config = type(config)(config.warmup_frames, config.window - 1, config.depth, "
                 "config.depth_model)")),
    mutant("l2d-unfilled-entries-attended", "while the rings fill, rows attend over the whole ring, "
           "empty (zero) entries included", FIG1D_FULL,
           Patch(f"{STATE}.begin_call", "lengths.append(warm + min(filled + 1, size))",
                 "lengths.append(warm + size)")),
    mutant("l2d-warmup-causal", "warmup frames attend causally (Fig. 1 (c)) instead of bidirectionally (Fig. 1 (d))",
           WARMUP,
           Patch(f"{PROC}.__call__", "self._attend(attn, query, key, value, attn.heads)",
                 "self._attend(attn, query, key, value, attn.heads, "
                 "mask=torch.ones(frames, frames, dtype=torch.bool, device=query.device).tril())")),
    # --- positions (Appendix A.2) ----------------------------------------------------
    mutant("l2d-positions-follow-buffer-slot", "positions added per buffer entry before the ring is put in time "
           "order: a frame keeps the position it was written at (as if added at write time) after the window rolls",
           FIG1D_FULL,
           Patch(f"{PROC}._stream",
                 "keys = torch.gather(keys, 2, index).add_(k_pos[:length])\n"
                 "        values = torch.gather(values, 2, index).add_(v_pos[:length])",
                 "keys = torch.gather(keys + k_pos[:length], 2, index)\n"
                 "        values = torch.gather(values + v_pos[:length], 2, index)")),
    mutant("l2d-query-at-position-0", "the current frame's query kept at the block's position 0 instead of S - 1",
           FIG1D_FULL,
           Patch(f"{PROC}._stream", "query = query + (q_pos[length - 1] - q_pos[0])", "query = query")),
    mutant("l2d-filling-query-at-longest-position", "while the rings fill, every row's query takes the longest "
           "window's last position instead of its own window's", FIG1D_FULL,
           Patch(f"{PROC}._stream", "+ (q_pos[n - 1] - q_pos[0])", "+ (q_pos[length - 1] - q_pos[0])")),
    mutant("l2d-kv-cached-with-positions", "keys/values cached with the block's position term still in "
           "(P[0..W-1] in warmup, P[0] while streaming), so read-time positions are added on top",
           FIG1D_FULL,
           Patch(f"{PROC}.__call__", "key_free, value_free = key - k_pos[:frames], value - v_pos[:frames]",
                 "key_free, value_free = key, value")),
    mutant("l2d-values-without-positions", "once the ring wraps, values are read without their position term "
           "(V = W_v x instead of W_v (x + P))", FIG1D_FULL,
           Patch(f"{PROC}._stream", "values = torch.gather(values, 2, index).add_(v_pos[:length])",
                 "values = torch.gather(values, 2, index)")),
    mutant("l2d-position-terms-with-bias", "the position terms computed with the projection's bias "
           "(W P + b instead of W P), so the bias is counted twice", FIG1D_BIAS,
           Patch(f"{PROC}._position_terms", "F.linear(pe, lin.weight)", "lin(pe)"),
           harmless="equivalent: a position term only enters as a difference (the query's P[S-1] - P[0]) or is "
                    "subtracted at write and added back at read (keys, values), so a bias in it cancels exactly; "
                    "the bias-parametrised Fig. 1 (d) proof passes under it"),
    # --- the KV cache (Sec. 3.4): one per (layer, step, branch), written before read ------
    mutant("l2d-kv-shared-by-branches", "one KV cache per step shared by the cond and uncond rows",
           [BRANCHES, FIG1D_FULL],
           Patch(f"{STATE}.begin_call", "slots = tuple(self.slots[sb] for sb in zip(layout.steps, layout.branches))",
                 "slots = tuple(self.slots[(s, 'cond')] for s in layout.steps)")),
    mutant("l2d-warmup-cache-shared-by-branches", "the warmup keys/values cached per (layer, step) only: "
           "the uncond branch reads the cond clip's", [BRANCHES, FIG1D_FULL],
           Patch(f"{STATE}.cache", "key = (layer, step, branch)", "key = (layer, step, 'cond')")),
    mutant("l2d-warmup-cache-shared-by-steps", "the warmup keys/values cached per (layer, branch) only: "
           "every step reads the last step's", [STEPS, FIG1D_FULL],
           Patch(f"{STATE}.cache", "key = (layer, step, branch)", "key = (layer, 0, branch)")),
    mutant("l2d-one-ring-per-layer", "streamed rows of every step read and write step 0's ring (one cache per "
           "layer, not per layer and step)", [STEPS, FIG1D_FULL],
           Patch(f"{STATE}.begin_call", "slots = tuple(self.slots[sb] for sb in zip(layout.steps, layout.branches))",
                 "slots = tuple(self.slots[(0, b)] for b in layout.branches)")),
    mutant("l2d-uncond-write-index-stuck", "the ring write index is not advanced for unconditional slots "
           "(each uncond frame overwrites the last)", FIG1D_FULL,
           Patch(f"{STATE}._advance", "for slot in self.plan.slots:",
                 "for slot in [s for s, b in zip(self.plan.slots, self.layout.branches) if b == 'cond']:")),
    mutant("l2d-write-misses-warmup-offset", "the ring write index lacks the warmup offset: streamed frames "
           "overwrite the warmup entries (the warmup frames drop out of the window)", FIG1D_FULL,
           Patch(f"{STATE}.begin_call", "write.append(warm + at)", "write.append(at)")),
    mutant("l2d-new-warmup-keeps-rings", "a warmup after streaming (a new stream) keeps the old rings: the new "
           "stream reads the old stream's warmup keys/values", f"{PROOFS}::test_a_new_warmup_starts_new_caches",
           Patch(f"{STATE}.begin_call", "self.reset()\n", "pass\n")),
    mutant("l2d-read-before-write", "the window read before the current frame is written: it attends to the stale "
           "entry (zeros, or the frame R + 1 back) in its own place", FIG1D_FULL,
           Patch(f"{PROC}._stream",
                 "ring.key[plan.slot_index, :, plan.write_index] = key_free.view(rows, tokens, channels)\n"
                 "    ring.value[plan.slot_index, :, plan.write_index] = value_free.view(rows, tokens, channels)",
                 "stale = LayerRing.__new__(LayerRing)\n"
                 "    stale.key, stale.value = ring.key.clone(), ring.value.clone()\n"
                 "    ring.key[plan.slot_index, :, plan.write_index] = key_free.view(rows, tokens, channels)\n"
                 "    ring.value[plan.slot_index, :, plan.write_index] = value_free.view(rows, tokens, channels)\n"
                 "    ring = stale")),
    # --- the depth prior (Sec. 3.2) ----------------------------------------------------
    mutant("l2d-depth-newest-frame-every-row", "every stream-batch row given the newest frame's depth residual",
           DEPTH_ROWS,
           Patch(f"{MECH}.call_unet", "self.depth_prior(cond) if", "self.depth_prior(cond[:1].expand_as(cond)) if")),
    mutant("l2d-depth-frame-major-warmup", "the depth residual of a warmup call laid out frame-major while the "
           "UNet folds rows (video, frame): rows get other frames' or the other branch's depth", DEPTH_ROWS,
           Patch(f"{MECH}.call_unet", "self.depth_prior(cond) if",
                 "self.depth_prior(cond.view(frames, videos, *cond.shape[1:]).transpose(0, 1)"
                 ".reshape(cond.shape)) if")),
    mutant("l2d-depth-uncond-rows-oldest", "the unconditional rows take the oldest in-flight frames' depth "
           "instead of their conditional twins'", f"{ENGINE_DEPTH}[initialize]",
           Patch("diffstream.pipelines.stream:StreamPipeline._guided_eps",
                 "cond = map_rows(lambda c: torch.cat([c[:u], c]), cond)",
                 "cond = map_rows(lambda c: torch.cat([c[-u:], c]), cond)")),
    mutant("l2d-stream-batch-keeps-oldest-depth", "after a step the stream batch keeps the oldest frames' depth "
           "latents (the finished frame's stays) instead of the newest", f"{ENGINE_DEPTH}[full]",
           Patch("diffstream.schedule.stream_batch:StreamBatch.advance",
                 "self.cond = map_rows(lambda c: c[:keep], self.cond)",
                 "self.cond = map_rows(lambda c: c[-keep:], self.cond)")),
]
