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
STEPS = f"{PROOFS}::test_steps_policy_equals_the_step_by_step_reference"
STEPS_SEQ = f"{STEPS}[chunk1-sequential]"
BATCH = f"{STEPS}[chunk1-stream-batch]"
BATCH2 = f"{STEPS}[chunk2-stream-batch]"
BATCH_SWITCH = f"{PROOFS}::test_stream_batch_equals_sequential_across_a_prompt_switch"
BATCH_SCHEDULE = f"{PROOFS}::test_a_schedule_change_finishes_the_chunks_in_flight"
BATCH_FLUSH = f"{PROOFS}::test_stream_batch_latency_and_flush"
REFUSED = f"{PROOFS}::test_policies_that_cannot_go_together_are_refused"
MOTION = f"{PROOFS}::test_motion_aware_noise_equals_the_rule_by_hand"
MOTION_BATCH = f"{PROOFS}::test_motion_aware_noise_in_the_stream_batch_equals_sequential"

MUTANTS = [
    # --- the KV cache's record call (Self-Forcing / StreamDiffusionV2) -------------------
    mutant("cv-record-skipped", "no record call: the chunks never enter the KV cache, every chunk is "
           "denoised as if it were the first", EXACT,
           Patch(f"{PIPE}._denoise", "mech.before_unet(RECORD)  # the clean chunk joins the cache at t = 0\n"
                 "        mech.call_unet(comp.unet, x0, self._record_t, self._text, RECORD)", "pass")),
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
           Patch(f"{PIPE}._decode", "zip(indices, outputs)", "zip(indices, outputs[::-1])")),
    mutant("cv-first-chunk-of-four", "the stream's first chunk waits for 4 frames like the others (the VAE's "
           "first group is frame 0 alone)", [ONE_TO_ONE, EXACT],
           Patch(f"{PIPE}.frames_per_chunk", "return 1 + WAN_TEMPORAL_FACTOR * (f - 1) if chunk == 0 else",
                 "return WAN_TEMPORAL_FACTOR * f if chunk == 0 else"), raises=True),
    mutant("cv-flush-drops-partial", "flush leaves a partial last chunk unprocessed: its frames never come out",
           [ONE_TO_ONE, FLUSH],
           Patch(f"{PIPE}.flush", "padded = bool(self._frames)", "padded = False")),
    mutant("cv-flush-pads-with-black", "the partial chunk padded with black frames instead of its last frame",
           FLUSH,
           Patch(f"{PIPE}.flush", "self._frames.append((-1, last))", "self._frames.append((-1, last * 0))")),
    mutant("cv-flush-keeps-padded-stream", "after a padded flush the stream goes on over the padding instead of "
           "starting anew", FLUSH,
           Patch(f"{PIPE}.flush", "if padded:\n        self._new_stream()", "pass")),
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
    # --- StreamDiffusionV2's per-step caches and stream batch -------------------------------
    mutant("cv-steps-record-clean", "kv_record steps ignored: the sequential loop records clean chunks", STEPS_SEQ,
           Patch(f"{PIPE}._denoise", 'steps = self.config.video.kv_record == "steps"', "steps = False")),
    mutant("cv-steps-one-cache", "every step writes the same cache (row 0) instead of its own", STEPS_SEQ,
           Patch(f"{PIPE}._denoise", "mech.before_rows([self._kv_chunk], k, len(sigmas))",
                 "mech.before_rows([self._kv_chunk * len(sigmas) + k], 0, 1)")),
    mutant("cv-batch-renoise-wrong-step", "a chunk moving to step k + 1 is re-noised with its step-k noise",
           BATCH, Patch(f"{PIPE}._batch_call", "self._row_noise[r, r + 1]", "self._row_noise[r, r]")),
    mutant("cv-batch-noise-stays", "a chunk's noise does not move with it: each row re-noises with the noise "
           "of whichever chunk entered it", BATCH,
           Patch(f"{PIPE}._batch_call", "self._row_noise[r + 1] = self._row_noise[r]", "pass")),
    mutant("cv-batch-newest-text", "every row takes the newest prompt (a switch reaches the chunks in flight)",
           BATCH_SWITCH,
           Patch(f"{PIPE}._batch_call", "texts = self._row_text[lo:hi]", "texts = [self._text] * (hi - lo)")),
    mutant("cv-batch-sigmas-from-row-0", "the rows' sigmas taken from step 0 on, whatever rows run (wrong "
           "while draining)", BATCH,
           Patch(f"{PIPE}._batch_call", "self._row_sigmas[lo:hi], self._timesteps", "self._row_sigmas[:hi - lo], self._timesteps")),
    mutant("cv-batch-one-timestep", "every row called at step 0's timestep", BATCH,
           Patch(f"{PIPE}._batch_call", "self._timesteps[lo:hi, 0]", "self._timesteps[0].expand(hi - lo)")),
    mutant("cv-batch-no-drain-on-schedule", "a schedule change applied to the chunks in flight", BATCH_SCHEDULE,
           Patch(f"{PIPE}._apply_pending", "self._drain()  # the chunks in flight finish", "pass  #")),
    mutant("cv-batch-flush-no-drain", "flush leaves the stream batch's chunks in flight: their frames are lost",
           BATCH_FLUSH, Patch(f"{PIPE}.flush", "if self._rows_busy():", "if False:")),
    mutant("cv-recache-allowed-with-steps", "the recache allowed with per-step caches (it would re-record "
           "clean latents into noisy-step caches)", REFUSED,
           Patch("diffstream.config:CausalVideoConfig.recache_available",
                 'and self.kv_record == "clean"', "")),
    # --- motion-aware noise (StreamDiffusionV2) ----------------------------------------------
    mutant("cv-motion-ignored", "--motion-noise computed but the chunk noised and denoised at the schedule's "
           "first sigma", MOTION, Patch(f"{PIPE}._run_chunk", "self._sigma0 = self._motion.step(pixels).to(comp.dtype) if",
                                        "self._sigma0 = torch.tensor(self._sigmas[0]) if")),
    mutant("cv-motion-timestep-of-schedule", "the chunk noised at its motion sigma, its first step told the "
           "schedule's timestep", MOTION,
           Patch(f"{PIPE}._denoise", "timestep = self._timesteps[k] if k or self._motion is None else",
                 "timestep = self._timesteps[k] if True else")),
    mutant("cv-motion-batch-row-0-schedule", "the stream batch's row 0 denoised at the schedule's first sigma",
           MOTION_BATCH, Patch(f"{PIPE}._batch_call", "if self._motion is not None and lo == 0:", "if False:")),
    mutant("cv-motion-not-reset", "a new stream keeps the last stream's frame and smoothed sigma", MOTION,
           Patch(f"{PIPE}._new_stream", "self._motion.reset()", "pass")),
]
