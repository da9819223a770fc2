"""Mutants of Fairy (issue #13): the anchor cache, anchor selection, InstructPix2Pix's
three-branch guidance, chunking and segments, per-frame noise and the Euler ancestral
sampler. FateZero's mutants are in their own list."""

from mutation import Patch, mutant

PIPE = "diffstream.pipelines.fairy:FairyPipeline"
PLAN = "diffstream.pipelines.fairy:EditPlan"
ANCHOR = "diffstream.attention.anchor"
EA = "diffstream.schedule.euler_ancestral"

PROOFS = "tests/pipelines/test_fairy_proofs.py"
WHOLE = [f"{PROOFS}::test_a_whole_edit_step_by_step[{case}]" for case in ("7-euler-a", "8-euler-a", "8-ddim")]
FAIRY = "tests/pipelines/test_fairy.py"
OFF_EA = f"{FAIRY}::test_mechanism_off_equals_diffusers_instruct_pix2pix[euler-a]"
PLAN_TEST = f"{FAIRY}::test_plan_chunks_and_segments"
EA_STEP = "tests/schedule/test_euler_ancestral.py::test_every_step_equals_diffusers_for_the_same_output_and_noise"

MUTANTS = [
    # --- the anchor cache (the three bugs named in the issue) -----------------------------
    mutant("fairy-cache-step-0", "the anchor cache told step 0 at every step (ordinary frames read the "
           "last step's anchors)", WHOLE,
           Patch(f"{ANCHOR}:AnchorState.begin_call", "self.step = int(layout.step)", "self.step = 0")),
    mutant("fairy-anchors-first-step-only", "anchor attention only at the first denoising step "
           "(plain self-attention afterwards)", WHOLE,
           Patch(f"{PIPE}._denoise", "layout = self._layout(mode, step, n)",
                 'layout = self._layout(mode if step == 0 else "off", step, n)')),
    mutant("fairy-only-text-branch-attends", "only the (text, image) branch attends to the anchors; the "
           "image-only and unconditional branches attend to their own tokens", WHOLE,
           Patch(f"{ANCHOR}:AnchorAttnProcessor.keys_values", "    return keys, values",
                 "    copies = 1 + anchor_keys.shape[2] // length  # own tokens repeated: plain attention\n"
                 "    keys = torch.cat([keys[:frames], torch.cat([inputs.key[frames:]] * copies, dim=2)])\n"
                 "    values = torch.cat([values[:frames], torch.cat([inputs.value[frames:]] * copies, dim=2)])\n"
                 "    return keys, values")),
    mutant("fairy-anchor-kv-wrong-branch", "ordinary frames read the cached anchor K/V of another guidance "
           "branch (branch order reversed)", WHOLE,
           Patch(f"{ANCHOR}:AnchorAttnProcessor.keys_values", "anchor_keys, anchor_values = state.fetch(self.name)",
                 "anchor_keys, anchor_values = (t.flip(0) for t in state.fetch(self.name))")),
    mutant("fairy-anchors-attend-to-themselves", "anchors attend only to their own tokens, not across all anchors "
           "(the cache is still filled)", WHOLE,
           Patch(f"{ANCHOR}:AnchorAttnProcessor.keys_values",
                 "return _broadcast_frames(keys, frames), _broadcast_frames(values, frames)",
                 "return inputs.key, inputs.value")),
    mutant("fairy-anchor-tokens-branch-mixed", "the anchors' token sequence built as if rows were frame-major "
           "(branches and anchors mixed)", WHOLE,
           Patch(f"{ANCHOR}:_frames_to_tokens", "x = x.view(branches, frames, heads, length, d).transpose(1, 2)",
                 "x = x.view(frames, branches, heads, length, d).transpose(0, 1).transpose(1, 2)")),
    # --- anchor selection ---------------------------------------------------------------
    mutant("fairy-anchors-off-by-one", "anchor selection one frame late", WHOLE + [
           "tests/attention/test_anchor.py::test_anchor_indices_are_even_and_distinct"],
           Patch(f"{ANCHOR}:anchor_indices", "((2 * i + 1) * num_frames) // (2 * num_anchors)",
                 "((2 * i + 1) * num_frames) // (2 * num_anchors) + 1")),
    mutant("fairy-anchors-left-edges", "anchors at the left edges of the K parts (frame 0 first), not their centres",
           WHOLE, Patch(f"{ANCHOR}:anchor_indices", "((2 * i + 1) * num_frames) // (2 * num_anchors)",
                        "(i * num_frames) // num_anchors")),
    # --- InstructPix2Pix's three branches -------------------------------------------------
    mutant("fairy-guidance-scales-swapped", "text and image guidance scales swapped", WHOLE,
           Patch(f"{PIPE}._guide", "return uncond + c.guidance * (text - image) + c.image_guidance * (image - uncond)",
                 "return uncond + c.image_guidance * (text - image) + c.guidance * (image - uncond)")),
    mutant("fairy-guidance-text-from-uncond", "text guidance measured from the unconditional branch, "
           "s_T (e(I,T) - e(0,0)) instead of s_T (e(I,T) - e(I,0))", WHOLE,
           Patch(f"{PIPE}._guide", "c.guidance * (text - image)", "c.guidance * (text - uncond)")),
    mutant("fairy-uncond-sees-image", "the unconditional branch is conditioned on the image (no zero image)",
           WHOLE + [OFF_EA], Patch(f"{PIPE}._denoise", "torch.cat([z0, z0, torch.zeros_like(z0)][:branches])",
                                   "torch.cat([z0, z0, z0][:branches])")),
    mutant("fairy-image-branch-gets-instruction", "the image-only branch gets the instruction text",
           WHOLE + [OFF_EA], Patch(f"{PIPE}._embeddings", "rows = [self._text] + [self._negative] * (self.num_branches - 1)",
                                   "rows = [self._text] * 2 + [self._negative] * (self.num_branches - 2)")),
    # --- chunks, segments, order ------------------------------------------------------------
    mutant("fairy-chunk-boundary-off-by-one", "chunks closed one ordinary frame early ([0], [2, 4], ...)",
           WHOLE + [PLAN_TEST], Patch(f"{PLAN}.closes_chunk", "(r + 1) % self.chunk_size == 0", "r % self.chunk_size == 0")),
    mutant("fairy-anchor-emitted-early", "an anchor is emitted as soon as it is met, ahead of the pending "
           "ordinary frames before it (frames reordered and one lost)", WHOLE,
           Patch(f"{PIPE}.edit_range", "            done[index] = self._anchor_outputs[index]",
                 "            yield self._anchor_outputs[index]\n            next_out = index + 1")),
    mutant("fairy-rank-skips-anchor", "index_of_rank counts only anchors strictly before the candidate "
           "(a rank can land on an anchor: segments split wrongly)", [PLAN_TEST],
           Patch(f"{PLAN}.index_of_rank", "if anchor <= index:", "if anchor < index:")),
    mutant("fairy-segment-mid-chunk", "segments start one frame before a chunk boundary (workers' batches "
           "differ from one process)", [PLAN_TEST],
           Patch(f"{PLAN}.segments", "self.index_of_rank(s * step * self.chunk_size)",
                 "self.index_of_rank(s * step * self.chunk_size) - 1")),
    mutant("fairy-worker-segment-reversed", "the driver writes each worker's segment last frame first "
           "(Ray workers; the slow proof, ~20 s)",
           "tests/pipelines/test_fairy_ray.py::test_two_workers_equal_one_process[recompute]",
           Patch("diffstream.pipelines.distributed:DistributedEdit.__iter__",
                 "for frame in results.pop(written):", "for frame in reversed(results.pop(written)):")),
    # --- noise and the Euler ancestral sampler --------------------------------------------------
    mutant("fairy-noise-by-batch-position", "noise seeded by the frame's position in its batch, not its index",
           WHOLE, Patch(f"{PIPE}._denoise", "frame_noise(c.seed, i if per_frame else 0, self.noise_count, shape) for i in indices",
                        "frame_noise(c.seed, j if per_frame else 0, self.noise_count, shape) for j, i in enumerate(indices)")),
    mutant("fairy-no-lease-without-anchors", "with 0 anchors the edit skips the UNet lease (nothing to install), so "
           "an open stream's feature bank stays on the shared model",
           "tests/pipelines/test_shared_model.py::test_fairy_after_an_open_stream_equals_fairy_alone",
           Patch(f"{PIPE}._own_unet", "    ProcessorLease.acquire(",
                 "    if self.config.anchors:\n        ProcessorLease.acquire("),
           raises=True),  # the leaked feature bank may crash on the edit's batch layout
    mutant("fairy-fixed-noise-ignored", "noise=\"fixed\" still draws each frame's own noise",
           f"{FAIRY}::test_mechanism_off_equals_diffusers_img2img[ddim-fixed]",
           Patch(f"{PIPE}._denoise", "i if per_frame else 0", "i")),
    mutant("fairy-ancestral-noise-reused", "every ancestral step re-injects the initial noise",
           WHOLE + [OFF_EA], Patch(f"{PIPE}._denoise", "noise[step + 1], comp.prediction_type",
                                   "noise[0], comp.prediction_type")),
    mutant("fairy-euler-scale-next-sigma", "the UNet input scaled with the next step's sigma",
           WHOLE + [OFF_EA], Patch(f"{PIPE}._denoise", "EA.scale_model_input(x_in, self.euler.sigmas[step])",
                                   "EA.scale_model_input(x_in, self.euler.sigmas[step + 1])")),
    mutant("euler-a-no-ancestral-split", "the Euler step goes all the way to sigma' and still adds sigma_up noise",
           [EA_STEP, OFF_EA], Patch(f"{EA}:euler_ancestral_step", "derivative * (sigma_down - sigma)",
                                    "derivative * (sigma_next - sigma)")),
    mutant("euler-a-sigma-up-formula", "sigma_up without the division by sigma^2",
           [EA_STEP, OFF_EA], Patch(f"{EA}:euler_ancestral_step",
                                    "(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5",
                                    "(sigma_next**2 * (sigma**2 - sigma_next**2)) ** 0.5")),
]
