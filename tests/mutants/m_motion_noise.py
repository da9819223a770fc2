"""Mutants of the motion-aware noise strength (issue #18, StreamDiffusionV2's rule): the
motion measure (RMS per frame, max over the chunk, normalised and clamped), the EMA and
its start, the frame kept for the next chunk, reset, set_init, the host sync and the
floor at 0. Their proofs are in tests/schedule/test_motion_noise.py (a numpy hand
computation of the formula over a stream of chunks)."""

from mutation import Patch, mutant

MOD = "diffstream.schedule.motion_noise"
STEP = f"{MOD}:MotionNoise.step"
RESET_ = f"{MOD}:MotionNoise.reset"
SET_INIT = f"{MOD}:MotionNoise.set_init"

PROOFS = "tests/schedule/test_motion_noise.py"
STREAM = f"{PROOFS}::test_sigmas_equal_the_hand_computation_over_a_stream"
OTHER = f"{PROOFS}::test_sigmas_with_other_constants_and_a_changed_strength"
STATIC = f"{PROOFS}::test_static_frames_keep_sigma_at_init_exactly"
MONOTONE = f"{PROOFS}::test_more_motion_less_noise_never_below_init_minus_max_drop"
NON_NEGATIVE = f"{PROOFS}::test_sigma_is_never_negative"
RESET = f"{PROOFS}::test_reset_forgets_the_previous_frame_and_sigma"
NO_SYNC = f"{PROOFS}::test_step_never_reads_a_value_on_the_host"

EMA = ("drop = d * ((1.0 - c.momentum) * c.max_drop)  # ()\n"
       "    if self._sigma is None:  # sigma_{-1} = init: the EMA term vanishes\n"
       "        sigma = self.init - drop\n"
       "    else:\n"
       "        sigma = self.init - drop + c.momentum * (self._sigma - self.init)")

MUTANTS = [
    # --- the motion measure --------------------------------------------------------------
    mutant("mn-mean-over-frames", "the chunk's motion is the mean of its frames' RMS differences, not the max",
           STREAM,
           Patch(STEP, "rms.max()", "rms.mean()")),
    mutant("mn-no-sqrt", "the mean squared difference used as the motion (no square root)", STREAM,
           Patch(STEP, ".mean(dim=(1, 2, 3)).sqrt()", ".mean(dim=(1, 2, 3))")),
    mutant("mn-no-clamp", "the normalised motion not clamped to [0, 1]: fast motion drops sigma without bound",
           [STREAM, MONOTONE],
           Patch(STEP, "(rms.max() / c.reference_motion).clamp(0.0, 1.0)", "(rms.max() / c.reference_motion)")),
    mutant("mn-host-sync", "the motion read on the host (StreamDiffusionV2's .item()): a GPU sync per chunk",
           NO_SYNC,
           Patch(STEP, "d = (rms.max() / c.reference_motion).clamp(0.0, 1.0)",
                 "d = x.new_tensor(min(max(float(rms.max()) / c.reference_motion, 0.0), 1.0))")),
    # --- the frame before the chunk -----------------------------------------------------
    mutant("mn-previous-frame-ignored", "the differences taken within the chunk only, the previous chunk's last "
           "frame never compared with the chunk's first", STREAM,
           Patch(STEP, "if self._has_previous:", "if False:")),
    mutant("mn-previous-is-first-frame", "the chunk's first frame kept as the next chunk's x_0 instead of its last",
           STREAM,
           Patch(STEP, "self._previous.copy_(x[-1])", "self._previous.copy_(x[0])")),
    # --- the EMA --------------------------------------------------------------------------
    mutant("mn-momentum-swapped", "the EMA's weights swapped: the new value weighted by momentum, the previous "
           "sigma by 1 - momentum", [STREAM, OTHER],
           Patch(STEP, EMA, EMA.replace("(1.0 - c.momentum) * c.max_drop", "c.momentum * c.max_drop")
                 .replace("c.momentum * (self._sigma - self.init)", "(1.0 - c.momentum) * (self._sigma - self.init)"))),
    mutant("mn-drop-not-weighted", "the motion's drop not weighted by 1 - momentum in the rearranged EMA "
           "(init - max_drop d + momentum (previous - init))", STREAM,
           Patch(STEP, "drop = d * ((1.0 - c.momentum) * c.max_drop)", "drop = d * c.max_drop")),
    mutant("mn-ema-starts-at-zero", "the stream's first chunk averaged with a previous sigma of 0 instead of init",
           [STREAM, STATIC],
           Patch(STEP, "        sigma = self.init - drop\n", "        sigma = self.init - drop - c.momentum * self.init\n")),
    mutant("mn-no-floor", "sigma not floored at 0: a low strength with fast motion gives a negative sigma",
           NON_NEGATIVE,
           Patch(STEP, "sigma = sigma.clamp_min(0.0)", "sigma = sigma")),
    # --- reset, set_init ------------------------------------------------------------------
    mutant("mn-ema-not-reset", "reset keeps the previous sigma: a new stream starts from the old stream's EMA",
           RESET,
           Patch(RESET_, "self._sigma = None", "pass")),
    mutant("mn-previous-not-forgotten", "reset keeps the previous frame: a new stream's first chunk is compared "
           "with the old stream's last frame", RESET,
           Patch(RESET_, "self._has_previous = False", "pass")),
    mutant("mn-set-init-restarts-ema", "a strength change restarts the EMA (from the new init) instead of "
           "continuing it", OTHER,
           Patch(SET_INIT, "self.init = _check_init(init_sigma)",
                 "self.init = _check_init(init_sigma)\n    self._sigma = None")),
]
