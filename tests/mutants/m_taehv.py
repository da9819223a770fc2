"""Mutants of TAEHV for Wan 2.1 (issue #18): the MemBlock memories and TPool buffers of the
streamed encoder / decoder, the parallel path's shifted memory, the blocks' time order
(TPool, TGrow, MemBlock's concatenation), the clamps, the first frames' trim, the pixel
and latent conversions to Wan's, reset and strict loading. Their proofs are in
tests/models/test_taehv.py (streamed == whole clip, and the whole clip == a frame-by-frame
oracle of the reference's blocks on the bare state dict)."""

from mutation import Patch, mutant

MOD = "diffstream.models.taehv"
SEQ = f"{MOD}:SequentialStream"
STREAM = f"{MOD}:TAEHVStream"

PROOFS = "tests/models/test_taehv.py"
ONE_SHOT = f"{PROOFS}::test_one_shot_is_the_references_arithmetic"
ENCODE = f"{PROOFS}::test_streamed_encode_equals_one_shot"
DECODE = f"{PROOFS}::test_streamed_decode_equals_one_shot"
RANGES = f"{PROOFS}::test_output_shapes_and_ranges"
SPACE = f"{PROOFS}::test_wan_vae_latent_space"
RESET = f"{PROOFS}::test_reset_starts_a_new_stream"
BAD_FILES = f"{PROOFS}::test_bad_files_give_one_line_errors"

MUTANTS = [
    # --- the streamed path's memories and pools -----------------------------------------
    mutant("taehv-memory-not-carried", "a MemBlock's memory is not carried from one call to the next: every "
           "call starts from zeros, as if each group were a new stream", [ENCODE, DECODE],
           Patch(f"{SEQ}.step", "memory.copy_(steps[:, -1])", "memory.zero_()")),
    mutant("taehv-memory-wrong-step", "the memory kept is the call's first step instead of its last", [ENCODE, DECODE],
           Patch(f"{SEQ}.step", "memory.copy_(steps[:, -1])", "memory.copy_(steps[:, 0])")),
    mutant("taehv-streamed-past-is-present", "each step's past is the step itself, not the one before",
           [ENCODE, DECODE],
           Patch(f"{SEQ}.step", "h = block(h, past.flatten(0, 1))", "h = block(h, h)")),
    mutant("taehv-tpool-forgets-waiting", "a TPool drops the steps short of a whole group instead of keeping "
           "them for the next call (frames pushed one at a time never make a latent)", [ENCODE],
           Patch(f"{SEQ}.step", "rest = steps.shape[1] - groups * s", "rest = 0")),
    mutant("taehv-tpool-waiting-newest-first", "a TPool stacks the new steps before the waiting ones", [ENCODE],
           Patch(f"{SEQ}.step", "steps = torch.cat([pool[:, :waiting], steps], dim=1)",
                 "steps = torch.cat([steps, pool[:, :waiting]], dim=1)")),
    # --- the parallel path and the blocks ----------------------------------------------------
    mutant("taehv-parallel-past-from-future", "the parallel path's MemBlock past is the next step (shifted the "
           "wrong way)", [ONE_SHOT, ENCODE],
           Patch(f"{MOD}:apply_parallel", "F.pad(steps, (0, 0, 0, 0, 0, 0, 1, 0))[:, :-1]",
                 "F.pad(steps, (0, 0, 0, 0, 0, 0, 0, 1))[:, 1:]")),
    mutant("taehv-parallel-no-memory", "the parallel path's MemBlocks see zeros as the past", [ONE_SHOT],
           Patch(f"{MOD}:apply_parallel", "F.pad(steps, (0, 0, 0, 0, 0, 0, 1, 0))[:, :-1]",
                 "torch.zeros_like(steps)")),
    mutant("taehv-memblock-past-first", "MemBlock concatenates [past, x] instead of the reference's [x, past] "
           "(the weights' halves swapped)", [ONE_SHOT],
           Patch(f"{MOD}:MemBlock.forward", "torch.cat([x, past], dim=1)", "torch.cat([past, x], dim=1)")),
    mutant("taehv-tgrow-reversed", "TGrow emits its steps in reversed order", [ONE_SHOT],
           Patch(f"{MOD}:TGrow.forward", "return self.conv(x).reshape(m * self.stride, c, h, w)",
                 "return self.conv(x).reshape(m, self.stride, c, h, w).flip(1).reshape(m * self.stride, c, h, w)")),
    mutant("taehv-tpool-newest-first", "TPool stacks a group's steps newest first", [ONE_SHOT],
           Patch(f"{MOD}:TPool.forward", "return self.conv(x.reshape(m // self.stride, self.stride * c, h, w))",
                 "return self.conv(x.reshape(m // self.stride, self.stride, c, h, w).flip(1)"
                 ".reshape(m // self.stride, self.stride * c, h, w))")),
    mutant("taehv-pad-at-start", "encode_video pads a short clip at its start instead of its end", [ONE_SHOT, ENCODE],
           Patch(f"{MOD}:TAEHV.encode_video",
                 "frames = torch.cat([frames, frames[:, -1:].expand(-1, short, -1, -1, -1)], dim=1)",
                 "frames = torch.cat([frames[:, :1].expand(-1, short, -1, -1, -1), frames], dim=1)")),
    # --- clamps and the trim ------------------------------------------------------------------
    mutant("taehv-no-latent-soft-clamp", "the decoder's soft clamp (3 tanh(x / 3)) left out", [ONE_SHOT],
           Patch(f"{MOD}:Clamp.forward", "return torch.tanh(x / 3) * 3", "return x")),
    mutant("taehv-one-shot-no-clamp", "decode_video's frames not clamped to [0, 1]", [ONE_SHOT],
           Patch(f"{MOD}:TAEHV.decode_video", "apply_parallel(self.decoder, latents).clamp_(0, 1)",
                 "apply_parallel(self.decoder, latents)")),
    mutant("taehv-stream-no-clamp", "the streamed decoder's frames not clamped (values outside [-1, 1])", [RANGES],
           Patch(f"{STREAM}.decode", "frames = raw[:, drop:].clamp(0, 1)", "frames = raw[:, drop:]")),
    mutant("taehv-trim-off-by-one", "the stream drops 2 first frames instead of 3", [DECODE, RANGES],
           Patch(f"{STREAM}.decode", "max(self.taehv.frames_to_trim - self._decoded_raw, 0)",
                 "max(self.taehv.frames_to_trim - 1 - self._decoded_raw, 0)")),
    mutant("taehv-one-shot-trim-off-by-one", "decode_video drops 4 first frames instead of 3", [ONE_SHOT, DECODE],
           Patch(f"{MOD}:TAEHV.decode_video", "return frames[:, self.frames_to_trim:]",
                 "return frames[:, self.frames_to_trim + 1:]")),
    mutant("taehv-trim-every-latent", "every latent frame's first 3 frames dropped, not only the stream's",
           [DECODE, RANGES],
           Patch(f"{STREAM}.decode", "self._decoded_raw += raw.shape[1]", "self._decoded_raw += 0")),
    # --- Wan's pixels, grouping and latent space ----------------------------------------------
    mutant("taehv-first-group-one-frame", "the first group is Wan's single frame instead of TAEHV's 4",
           [ENCODE],
           Patch(f"{STREAM}.frames_needed", "return self.taehv.t_downscale",
                 "return 1 if self.frames_in == 0 else self.taehv.t_downscale")),
    mutant("taehv-pixels-not-unit-range", "Wan's [-1, 1] pixels fed to TAEHV as they are (it takes [0, 1])",
           [ENCODE],
           Patch(f"{STREAM}._feed", "unit = ((self._to_model(frames) + 1) / 2).clamp(0, 1)",
                 "unit = self._to_model(frames).clamp(0, 1)")),
    mutant("taehv-frames-not-to-wan-range", "decoded frames returned in TAEHV's [0, 1], not Wan's [-1, 1]",
           [DECODE],
           Patch(f"{STREAM}.decode", "return (frames * 2 - 1).transpose(1, 2)", "return frames.transpose(1, 2)")),
    mutant("taehv-raw-latents-inverted", "with the Wan VAE's statistics, encode normalises TAEHV's latents "
           "again instead of undoing the normalisation", [SPACE],
           Patch(f"{STREAM}._feed", "latents = latents * std + mean", "latents = (latents - mean) / std")),
    mutant("taehv-raw-latents-decoded-as-is", "with the Wan VAE's statistics, decode feeds the raw latents to "
           "TAEHV without normalising them", [SPACE],
           Patch(f"{STREAM}.decode", "latent = (latent - mean) / std", "latent = latent")),
    # --- reset and loading ---------------------------------------------------------------------
    mutant("taehv-reset-keeps-memory", "reset() keeps the MemBlock memories of the old stream", [RESET],
           Patch(f"{SEQ}.reset", "memory.zero_()", "pass")),
    mutant("taehv-load-not-strict", "load_taehv loads what matches and ignores missing / unexpected keys",
           [BAD_FILES],
           Patch(f"{MOD}:_mismatch", 'return ", ".join(parts)', 'return ""'),
           Patch(f"{MOD}:load_taehv", "model.load_state_dict(state, strict=True)",
                 "model.load_state_dict(state, strict=False)")),
    # --- the wiring: TAEHV decodes causal-video's stream (--tiny-vae) ----------------------
    mutant("taehv-wiring-ignored", "--tiny-vae loaded but the Wan VAE still decodes",
           "tests/pipelines/test_causal_video.py::test_tiny_vae_decodes_the_stream_as_taehv_does_in_one_shot",
           Patch("diffstream.pipelines.causal_video:CausalVideoPipeline.__init__",
                 'if getattr(components, "tiny_vae", None) is not None:', "if False:")),
    mutant("taehv-wiring-normalised-twice", "TAEHV given the DiT's latents as if they were the Wan VAE's raw ones",
           "tests/pipelines/test_causal_video.py::test_tiny_vae_decodes_the_stream_as_taehv_does_in_one_shot",
           Patch("diffstream.pipelines.causal_video:CausalVideoPipeline.__init__",
                 "TAEHVStream(components.tiny_vae, cfg.latents_mean, cfg.latents_std)",
                 "TAEHVStream(components.tiny_vae)")),
]
