"""Mutants of ControlNet in the stream (issue #17): the residuals, their scales and sums,
the maps that travel with their frames, the canny preprocessor, live scale changes.
Their proofs are in tests/pipelines/test_control.py."""

from mutation import Patch, mutant

STACK = "diffstream.pipelines.control:ControlStack"
PIPE = "diffstream.pipelines.stream:StreamPipeline"
PROOFS = "tests/pipelines/test_control.py"
DIFFUSERS = f"{PROOFS}::test_one_frame_equals_diffusers_controlnet_img2img"
ROWS = f"{PROOFS}::test_stream_batch_rows_get_their_own_frames_maps"
NEXT = f"{PROOFS}::test_scale_change_applies_from_the_next_frame"
BANK = f"{PROOFS}::test_scale_change_keeps_the_feature_bank"

MUTANTS = [
    mutant("control-newest-frames-maps", "every stream-batch row given the newest frame's condition images", ROWS,
           Patch(f"{STACK}.residuals", "controlnet_cond=maps[:, k]", "controlnet_cond=maps[:1, k].expand_as(maps[:, k])")),
    mutant("control-maps-stay-with-oldest", "after a step the stream batch keeps the oldest frames' conditioning",
           ROWS, Patch("diffstream.schedule.stream_batch:StreamBatch.advance",
                       "self.cond = map_rows(lambda c: c[:keep], self.cond)",
                       "self.cond = map_rows(lambda c: c[-keep:], self.cond)")),
    mutant("control-uncond-rows-oldest-maps", "the unconditional rows take the oldest rows' maps instead of their "
           "conditional twins'", f"{ROWS}[initialize]",
           Patch(f"{PIPE}._guided_eps", "cond = map_rows(lambda c: torch.cat([c[:u], c]), cond)",
                 "cond = map_rows(lambda c: torch.cat([c[-u:], c]), cond)")),
    mutant("control-scale-ignored", "the residuals added at full strength whatever the scale", DIFFUSERS,
           Patch(f"{STACK}.residuals", "conditioning_scale=scale", "conditioning_scale=1.0")),
    mutant("control-last-net-wins", "with several ControlNets only the last one's residuals reach the UNet",
           f"{DIFFUSERS}[canny+depth]",
           Patch(f"{STACK}.residuals", "down = [a + b for a, b in zip(down, d)]\n            mid = mid + m",
                 "down = list(d)\n            mid = m")),
    mutant("control-mid-residual-lost", "the middle block's residual never reaches the UNet", DIFFUSERS,
           Patch(f"{STACK}.residuals", '"mid_block_additional_residual": mid}', '"mid_block_additional_residual": 0 * mid}')),
    mutant("control-maps-nets-swapped", "each ControlNet given the other one's condition images",
           f"{DIFFUSERS}[canny+depth]",
           Patch(f"{STACK}.residuals", "controlnet_cond=maps[:, k]", "controlnet_cond=maps[:, -1 - k]")),
    mutant("control-canny-on-bgr", "canny run on the frame read as BGR (OpenCV's default order) instead of RGB",
           DIFFUSERS, Patch("diffstream.models.controlnet:canny_map", "cv2.COLOR_RGB2GRAY", "cv2.COLOR_BGR2GRAY")),
    mutant("control-scales-stale", "a scale change not picked up until the schedule changes", NEXT,
           Patch(f"{PIPE}._apply_pending",
                 "self._control_scales = check_scales(c.control_scales, len(self.controls))",
                 "self._control_scales = getattr(self, '_control_scales', None) or check_scales("
                 "c.control_scales, len(self.controls))")),
    mutant("control-scale-change-resets-state", "a scale change restarts the temporal state (the bank forgets)",
           BANK, Patch(f"{PIPE}._apply_pending",
                       "self._control_scales = check_scales(c.control_scales, len(self.controls))",
                       "self._control_scales = check_scales(c.control_scales, len(self.controls))\n"
                       "    if getattr(self, '_frames_seen_scales', None) not in (None, self._control_scales):\n"
                       "        self.mechanism.reset()\n"
                       "    self._frames_seen_scales = self._control_scales")),
]
