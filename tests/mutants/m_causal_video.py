"""Mutants of the causal-video pipeline (issue #18): what is recorded in the KV cache and
when, the flow-matching SDEdit and denoising steps, the latents' normalisation, the order
frames leave a chunk, the flushed tail, reset and update timing. Their proofs are in
tests/pipelines/test_causal_video.py (the pipeline against a reference written from the
formulas on the stock transformer under the block mask)."""

from mutation import Patch, mutant

PIPE = "diffstream.pipelines.causal_video:CausalVideoPipeline"

PROOFS = "tests/pipelines/test_causal_video.py"
EXACT = f"{PROOFS}::test_stream_equals_reference[chunk1]"
EXACT2 = f"{PROOFS}::test_stream_equals_reference[chunk2]"
ONE_TO_ONE = f"{PROOFS}::test_frames_one_to_one_in_order_with_a_partial_last_chunk"
FLUSH = f"{PROOFS}::test_flush_pads_and_the_padding_never_shows"
RESET = f"{PROOFS}::test_reset_gives_a_fresh_stream"
UPDATE = f"{PROOFS}::test_update_prompt_applies_from_the_next_chunk"
RECACHE = f"{PROOFS}::test_recache_equals_a_fresh_stream_over_the_cached_chunks"
RECACHE_EARLY = f"{PROOFS}::test_recache_before_the_window_rolls_equals_fresh_record_calls"

MUTANTS = [
    # --- the KV cache's record call (Self-Forcing / StreamDiffusionV2) -------------------
    mutant("cv-record-skipped", "no record call: the chunks never enter the KV cache, every chunk is "
           "denoised as if it were the first", EXACT,
           Patch(f"{PIPE}._denoise", "mech.before_unet(RECORD)  # the clean chunk joins the cache at t = 0\n"
                 "    mech.call_unet(comp.unet, x0, self._record_t, self._text, RECORD)", "pass")),
    mutant("cv-record-noisy", "the record call runs on the last step's noisy input instead of the clean "
           "prediction", EXACT,
           Patch(f"{PIPE}._denoise", "mech.call_unet(comp.unet, x0, self._record_t",
                 "mech.call_unet(comp.unet, x, self._record_t")),
    mutant("cv-record-at-last-timestep", "the clean chunk recorded at the last denoising step's timestep "
           "instead of t = 0", EXACT,
           Patch(f"{PIPE}._denoise", "self._record_t, self._text, RECORD", "self._timesteps[-1], self._text, RECORD")),
    # --- flow matching ------------------------------------------------------------------
    mutant("cv-sdedit-swapped", "SDEdit mixes latents and noise the wrong way round (sigma z0 + (1 - sigma) e)",
           EXACT,
           Patch(f"{PIPE}._denoise", "x = (1 - sigmas[0]) * z0 + sigmas[0] * noise[0]",
                 "x = sigmas[0] * z0 + (1 - sigmas[0]) * noise[0]")),
    mutant("cv-x0-sign", "the clean prediction taken as x + sigma v (the flow's sign flipped)", EXACT,
           Patch(f"{PIPE}._denoise", "x0 = x - sigma * flow", "x0 = x + sigma * flow")),
    mutant("cv-renoise-same-noise", "every re-noise reuses the first step's noise instead of fresh noise",
           EXACT,
           Patch(f"{PIPE}._denoise", "sigmas[k + 1] * noise[k + 1]", "sigmas[k + 1] * noise[0]")),
    mutant("cv-timestep-unscaled", "the transformer told sigma instead of the timestep 1000 sigma", EXACT,
           Patch(f"{PIPE}._apply_pending", "scale = float(comp.num_train_timesteps)", "scale = 1.0")),
    mutant("cv-latents-not-normalised", "the VAE's latents given to the DiT without Wan's per-channel "
           "normalisation", EXACT,
           Patch(f"{PIPE}._run_chunk", "z0 = comp.normalize_latents(torch.cat(groups, dim=2))",
                 "z0 = (torch.cat(groups, dim=2))")),
    # --- frames in and out ----------------------------------------------------------------
    mutant("cv-chunk-frames-reversed", "a chunk's frames emitted newest first", [EXACT, EXACT2],
           Patch(f"{PIPE}._run_chunk", "zip(indices, outputs)", "zip(indices, outputs[::-1])")),
    mutant("cv-first-chunk-of-four", "the stream's first chunk waits for 4 frames like the others (the VAE's "
           "first group is frame 0 alone)", [ONE_TO_ONE, EXACT],
           Patch(f"{PIPE}.frames_per_chunk", "return 1 + WAN_TEMPORAL_FACTOR * (f - 1) if chunk == 0 else",
                 "return WAN_TEMPORAL_FACTOR * f if chunk == 0 else"), raises=True),
    mutant("cv-flush-drops-partial", "flush leaves a partial last chunk unprocessed: its frames never come out",
           [ONE_TO_ONE, FLUSH],
           Patch(f"{PIPE}.flush", "if self._frames:", "if False:")),
    mutant("cv-flush-pads-with-black", "the partial chunk padded with black frames instead of its last frame",
           FLUSH,
           Patch(f"{PIPE}.flush", "self._frames.append((-1, last))", "self._frames.append((-1, last * 0))")),
    mutant("cv-flush-keeps-padded-stream", "after a padded flush the stream goes on over the padding instead of "
           "starting anew", FLUSH,
           Patch(f"{PIPE}.flush", "self._run_chunk()\n        self._new_stream()", "self._run_chunk()")),
    # --- stream state: reset, seed, update ---------------------------------------------------
    mutant("cv-noise-not-reseeded-on-reset", "reset keeps the noise generator where the old stream left it",
           RESET,
           Patch(f"{PIPE}._new_stream", "self._generator = torch.Generator().manual_seed(self.config.seed)",
                 "self._generator = getattr(self, '_generator', None) or "
                 "torch.Generator().manual_seed(self.config.seed)")),
    mutant("cv-reset-keeps-cache", "reset clears the VAE's caches but not the KV cache", RESET,
           Patch(f"{PIPE}._new_stream", "self.mechanism.reset()", "pass")),
    mutant("cv-reset-keeps-vae-cache", "reset leaves the streamed VAE's causal caches of the old stream (its "
           "next frame is then refused: the VAE wants a group of 4)", RESET,
           Patch(f"{PIPE}._new_stream", "self.vae.reset()", "pass"), raises=True),
    mutant("cv-update-mid-chunk", "an update applies at the next frame, in the middle of a chunk begun under "
           "the old settings", UPDATE,
           Patch(f"{PIPE}.push", "if not self._frames and self._pending:", "if self._pending:")),
    # --- LongLive's recache on a prompt switch -----------------------------------------------
    mutant("cv-recache-skipped", "a prompt switch keeps the old prompt's keys/values in the cache",
           [RECACHE, RECACHE_EARLY],
           Patch(f"{PIPE}._apply_pending", "self._recache_due = self.recache and", "self._recache_due = False and")),
    mutant("cv-recache-latents-by-order", "the recache feeds each re-recorded chunk the latents kept at its "
           "position in the recache order, not at its cache slot (right until the ring wraps)", RECACHE,
           Patch(f"{PIPE}._recache", "self._clean[state.slot]", "self._clean[kept.index(state.chunk)]")),
    mutant("cv-recache-noisy-latents-kept", "the latents kept for the recache are the last step's noisy input, "
           "not the recorded clean chunk", [RECACHE, RECACHE_EARLY],
           Patch(f"{PIPE}._denoise", "self._keep_clean(x0, mech.state.slot)", "self._keep_clean(x, mech.state.slot)")),
    mutant("cv-recache-sinks-skipped", "the recache rebuilds the window but not the sinks (they keep the old "
           "prompt's keys/values)", RECACHE,
           Patch(f"{PIPE}._recache", "kept = state.rerecord()",
                 "state._commit()\n    kept = state.rerecord(state.cached()[state.config.sink_chunks:])")),
]
