"""Mutants of the Tune-A-Video-style video UNet (issue #15): inflation, the tuned set, one-shot
tuning's loss and attention, its folder, and FateZero's use of it (`edit --video-model`)."""

from mutation import Patch, mutant

VU = "diffstream.models.video_unet"
TASK = "diffstream.tuning.video:VideoTuneTask"
ED = "diffstream.pipelines.fatezero:FateZeroEditor"
MODELS = "tests/models/test_video_unet.py::"
TUNING = "tests/tuning/test_video.py::"
EDIT = "tests/commands/test_edit_fatezero.py::"
EXACT = MODELS + "test_inflated_unet_equals_the_image_unet_on_every_frame"
TRAINABLE = MODELS + "test_the_trainable_set_is_tune_a_videos"
LOSS = TUNING + "test_loss_is_the_ddpm_mse_of_a_clip_under_sparse_causal_attention"
E2E = EDIT + "test_video_model_edit_end_to_end_and_its_inversion_is_refused_by_the_image_model"
CALLS = EDIT + "test_every_unet_call_of_a_shape_edit_runs_the_video_model"
LIKE_IMAGE = EDIT + "test_an_inflated_model_edits_like_the_image_model"
DEFAULTS = EDIT + "test_a_video_model_makes_the_shape_edit_schedule_the_default"

MUTANTS = [
    # --- inflation ----------------------------------------------------------------------
    mutant("vu-proj-out-bias-kept", "motion modules' proj_out bias left at its random init (Tune-A-Video zeroes "
           "only to_out[0].weight): the inflated model is not the image model", EXACT,
           Patch(f"{VU}:inflate", "                module.bias.zero_()\n", "")),
    mutant("vu-positions-kept", "diffusers' sinusoidal frame positions kept: the temporal layers are not "
           "position-free like Tune-A-Video's", MODELS + "test_temporal_layers_see_the_clip_as_a_set[False]",
           Patch(f"{VU}:inflate", "if not positions and name.endswith(\"pos_embed\"):",
                 "if False and name.endswith(\"pos_embed\"):")),
    # --- the tuned set ------------------------------------------------------------------
    mutant("vu-trainable-no-cross-queries", "only the self-attention queries are tuned, not the cross-attention's",
           TRAINABLE,
           Patch(f"{VU}:is_tuned", "module.endswith(TUNED_MODULES[1:])", "module.endswith(TUNED_MODULES[1])")),
    mutant("vu-trainable-whole-attention", "every spatial attention projection tuned (to_k, to_v, to_out too)",
           TRAINABLE,
           Patch(f"{VU}:is_tuned", "module.endswith(TUNED_MODULES[1:])", "(\".attn1.\" in module or \".attn2.\" "
                 "in module)")),
    mutant("vu-resume-restores-nothing", "resuming reads the saved model but leaves the tuned tensors as they are",
           MODELS + "test_save_load_round_trip_and_resume",
           Patch(f"{VU}:load_tuned_weights", "param.copy_(saved)", "param.copy_(param)")),
    # --- one-shot tuning ----------------------------------------------------------------
    mutant("vu-tuning-without-sparse-causal", "tuning runs the spatial self-attention per frame, not "
           "sparse-causally as the model is edited", LOSS + "[epsilon]",
           Patch(f"{TASK}.__init__", "self._attached.enter_context(self.mechanism.attach(self.unet))", "pass")),
    mutant("vu-loss-target-latents", "the epsilon model regressed onto the clean latents instead of the noise",
           LOSS + "[epsilon]",
           Patch(f"{TASK}._ddpm_loss", "target = noise\n", "target = x0\n")),
    mutant("vu-loss-frames-shuffled", "the clip's frames reach the UNet in reverse order while the target keeps "
           "theirs", LOSS + "[epsilon]",
           Patch(f"{TASK}._ddpm_loss", "clips = noisy.transpose(1, 2).contiguous().to(device)",
                 "clips = noisy.flip(1).transpose(1, 2).contiguous().to(device)")),
    # --- FateZero with the video model --------------------------------------------------
    mutant("vu-fold-rows-strided", "the editor folds rows into clips frame-major (frame r of clip g is row "
           "r*G + g): with CFG a clip mixes the unconditional and conditional rows", (LIKE_IMAGE,),
           Patch(f"{ED}._unet",
                 "clips = x.view(groups, rows, c, h, w).transpose(1, 2)  # (G, C, R, h, w)\n"
                 "    out = unet(clips, t, encoder_hidden_states=text).sample  # (G, C, R, h, w)\n"
                 "    return out.transpose(1, 2).reshape(b, c, h, w)",
                 "clips = x.view(rows, groups, c, h, w).permute(1, 2, 0, 3, 4)\n"
                 "    out = unet(clips, t, encoder_hidden_states=text).sample\n"
                 "    return out.permute(2, 0, 1, 3, 4).reshape(b, c, h, w)")),
    mutant("vu-fold-frames-reversed", "each clip's frames folded in reverse order (and unfolded back)",
           (LIKE_IMAGE,),
           Patch(f"{ED}._unet",
                 "clips = x.view(groups, rows, c, h, w).transpose(1, 2)  # (G, C, R, h, w)\n"
                 "    out = unet(clips, t, encoder_hidden_states=text).sample  # (G, C, R, h, w)\n"
                 "    return out.transpose(1, 2).reshape(b, c, h, w)",
                 "clips = x.view(groups, rows, c, h, w).flip(1).transpose(1, 2)\n"
                 "    out = unet(clips, t, encoder_hidden_states=text).sample\n"
                 "    return out.transpose(1, 2).flip(1).reshape(b, c, h, w)")),
    mutant("vu-editor-ignores-video-model", "edit --video-model loads the base model and never puts the video "
           "UNet in place", (E2E, CALLS),
           Patch("diffstream.models.loading:load_components",
                 'modules["unet"] = load_video_model(config.video_model, dtype, device)', "pass")),
    mutant("vu-fingerprint-without-video-model", "a saved inversion's fingerprint leaves out the video model: "
           "the image model edits from the video model's inversion", E2E,
           Patch("diffstream.pipelines.fatezero:model_fingerprint",
                 'fingerprint["video_model"] = video_model_id(unet) or "unsaved"', "pass")),
    mutant("vu-shape-schedule-not-default", "--video-model keeps the style/attribute schedule (0.8/0.8, middle "
           "reference, per-frame finest layers)", (DEFAULTS, CALLS),
           Patch("diffstream.commands.edit_fatezero:edit_config", "defaults.update(SHAPE_EDIT)", "pass")),
    mutant("vu-motion-processors-replaced", "FateZero's attach puts plain attention on every layer it does not "
           "use, the motion modules' included", CALLS,
           Patch("diffstream.attention.fatezero:FateZero.attach",
                 'if layer is None or (layer.kind == "cross" and name not in wanted):\n            return None',
                 'if layer is None or (layer.kind == "cross" and name not in wanted):\n'
                 '            return SDPAAttnProcessor()')),
]
