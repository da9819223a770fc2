"""Mutants of the stream engine shared by all streaming methods (StreamDiffusion's
schedule, stream batch, guidance, noise, updates; issue #20). The feature bank's and
Live2Diff's own mutants are in m_feature_bank.py and m_live2diff.py."""

from mutation import Patch, mutant

BATCH = "diffstream.schedule.stream_batch:StreamBatch"
PIPE = "diffstream.pipelines.stream:StreamPipeline"
STEPS = "diffstream.schedule.timesteps"
GUIDE = "diffstream.schedule.guidance"
NOISE = "diffstream.schedule.noise"
BANK_STATE = "diffstream.attention.feature_bank:FeatureBankState"

RCFG = "tests/pipelines/test_rcfg_proofs.py::test_multi_step_guidance_follows_the_equations_for_every_frame"
ONE_STEP = "tests/pipelines/test_stream.py::test_guidance_one_step_by_hand"
LCM_ORACLE = "tests/pipelines/test_stream.py::test_sequential_matches_diffusers_lcm_scheduler"
T_TABLE = "tests/schedule/test_timesteps.py::test_t_indices_equal_streamv2v_reference_table"
METHODS = "tests/pipelines/test_stream_methods.py"
UPDATES = f"{METHODS}::test_every_update_field_works_for_every_method"
PER_FRAME = f"{METHODS}::test_per_frame_noise_is_drawn_from_seed_frame_and_step"
RENOISE = f"{METHODS}::test_per_frame_noise_renoises_each_row_with_its_own_frame_and_step"

MUTANTS = [
    mutant("skips-forgotten-at-filter-change", "a new similarity threshold or max_skip restarts the skip count "
           "(the closing line then under-reports)",
           "tests/pipelines/test_stream.py::test_skipped_counts_since_the_reset_across_filter_changes",
           Patch(f"{PIPE}._apply_pending", "self._skipped_earlier += self._filter.skipped", "pass")),
    # --- schedule -----------------------------------------------------------------
    mutant("renoise-own-slot", "re-noising after step k with slot k's noise instead of slot k+1's",
           [LCM_ORACLE, RCFG],
           Patch(f"{BATCH}.advance", "self.noise[lo + 1 : lo + 1 + keep]", "self.noise[lo : lo + keep]")),
    mutant("t-index-rounded-start", "the SDEdit start rounded instead of truncated as the reference does",
           T_TABLE, Patch(f"{STEPS}:_start_index", "int(TIMESTEP_TABLE_SIZE * (1 - float(strength)))",
                          "int(round(TIMESTEP_TABLE_SIZE * (1 - float(strength))))")),
    mutant("t-index-spread-stride", "steps spread by (i * span) // steps (the old drift) instead of a fixed stride",
           T_TABLE, Patch(f"{STEPS}:t_indices", "start + i * stride for i in range(steps)",
                          "start + (i * int(TIMESTEP_TABLE_SIZE * float(strength))) // steps for i in range(steps)")),
    mutant("boundary-scalings-swapped", "the consistency step mixes c_out x_t + c_skip x0 (scalings swapped)",
           [LCM_ORACLE, RCFG], Patch(f"{STEPS}:denoise", "rows.c_skip * x_t + rows.c_out * x0",
                                     "rows.c_out * x_t + rows.c_skip * x0")),
    mutant("lcm-timestep-scaling", "LCM's boundary scalings without the timestep scaling of 10",
           ["tests/schedule/test_timesteps.py::test_boundary_scalings_match_diffusers", LCM_ORACLE],
           Patch(f"{STEPS}:lcm_boundary_scalings", "scaled = timesteps.double() * timestep_scaling",
                 "scaled = timesteps.double()")),
    mutant("new-frame-appended-last", "the stream batch puts a new frame after the in-flight ones (rows out of step order)",
           ["tests/pipelines/test_stream.py::test_stream_batch_equals_sequential", RCFG],
           Patch(f"{BATCH}.admit", "self.x = torch.cat([x_new, self.x], dim=0)", "self.x = torch.cat([self.x, x_new], dim=0)")),
    # --- guidance -------------------------------------------------------------------
    mutant("onetime-ref-only-at-step-0", "onetime-negative RCFG keeps the real x0 reference only at step 0 "
           "(later steps fall back to the input latent)", RCFG,
           Patch(f"{PIPE}._step", "batch.set_newest_ref(new_ref)", "pass")),
    mutant("self-rcfg-fixed-noise", "self RCFG uses slot 0's fixed noise as eps' at every step (stock noise never updated)",
           RCFG, Patch(f"{PIPE}._guided_eps", "residual = G.virtual_residual_noise(x, ref, a, b)",
                       "residual = self._batch.noise[0:1].expand_as(x)")),
    mutant("rcfg-delta-ignored", "RCFG without the delta moderation of the residual noise", [RCFG, ONE_STEP],
           Patch(f"{GUIDE}:residual_cfg", "return cfg(eps_cond, delta * eps_residual, guidance)",
                 "return cfg(eps_cond, eps_residual, guidance)")),
    mutant("cfg-formula-from-cond", "CFG extrapolates from eps_c instead of eps_u", [RCFG, ONE_STEP],
           Patch(f"{GUIDE}:cfg", "return eps_uncond + guidance * (eps_cond - eps_uncond)",
                 "return eps_cond + guidance * (eps_cond - eps_uncond)")),
    mutant("full-cfg-reads-uncond-rows", "full CFG takes the conditional prediction from the unconditional rows",
           [RCFG, ONE_STEP], Patch(f"{PIPE}._guided_eps", "eps = model_output_to_eps(out[u:], x, a, b, ptype)",
                                   "eps = model_output_to_eps(out[:m], x, a, b, ptype)")),
    mutant("prompts-swapped", "the conditional and negative prompt embeddings swapped", [RCFG, ONE_STEP],
           Patch(f"{PIPE}._apply_pending", "self._uncond = emb[-1:]", "self._uncond = emb[:1]\n"
                 "        emb = emb.flip(0)")),
    mutant("onetime-uncond-every-row", "onetime-negative RCFG runs the unconditional pass for every row, not just step 0",
           ["tests/pipelines/test_stream.py::test_unconditional_work_per_guidance_type", RCFG],
           Patch(f"{PIPE}._guided_eps", 'u = first if cfg == "initialize"', 'u = m if cfg == "initialize"')),
    mutant("rcfg-ref-is-noisy-latent", "self RCFG's reference is the noisy latent, not the input's clean latent",
           RCFG, Patch(f"{BATCH}.admit", "self.ref = torch.cat([z0, self.ref], dim=0)",
                       "self.ref = torch.cat([x_new, self.ref], dim=0)")),
    mutant("guidance-default-ignores-method", "every method defaults to StreamDiffusion's guidance 1.2",
           f"{METHODS}::test_method_defaults_are_their_papers",
           Patch("diffstream.config:StreamConfig.resolved_guidance",
                 'METHOD_DEFAULTS[self.method]["guidance"]', 'METHOD_DEFAULTS["streamdiffusion"]["guidance"]')),
    # --- noise ------------------------------------------------------------------------
    mutant("frame-noise-same-every-frame", "per-frame noise seeded by the seed alone: every frame the same",
           PER_FRAME, Patch(f"{NOISE}:frame_noise", "mix_seed(seed, frame)", "mix_seed(seed, 0)")),
    mutant("frame-renoise-same-step", "per-frame re-noise after step k with the frame's step-k noise (not k+1)",
           RENOISE, Patch(f"{BATCH}.advance", "self.frame_noise[r][lo + 1 + r]", "self.frame_noise[r][lo + r]")),
    mutant("frame-renoise-newest-frame", "per-frame re-noise gives every row the newest frame's noise",
           RENOISE, Patch(f"{BATCH}.advance", "self.frame_noise[r][lo + 1 + r]", "self.frame_noise[0][lo + 1 + r]")),
    mutant("warmup-renoise-same-step", "Live2Diff's warmup re-noises after step k with step k's noise",
           "tests/attention/test_causal_temporal.py::test_kv_cached_stream_equals_masked_full_attention",
           Patch(f"{PIPE}._warmup", "x = add_noise(x, noise[k + 1], nxt.alpha_sqrt, nxt.beta_sqrt)",
                 "x = add_noise(x, noise[k], nxt.alpha_sqrt, nxt.beta_sqrt)")),
    mutant("vae-sample-ignored", "--vae-encode sample still encodes the posterior mean",
           f"{METHODS}::test_vae_sample_is_a_reproducible_posterior_sample",
           Patch("diffstream.models.components:Components.encode_image", "elif generator is None:", "elif True:")),
    # --- updates --------------------------------------------------------------------------
    mutant("no-rewarm-on-cfg-change", "Live2Diff's update(cfg_type=initialize) after warmup keeps the unwarmed "
           "unconditional caches (the bug that raised)", f"{UPDATES}[cfg_type=initialize-live2diff]",
           Patch(f"{PIPE}._apply_pending", "and uncond > getattr(self, \"_warm_uncond\", 0))",
                 "and uncond > 99)"), raises=True),
    mutant("seed-update-keeps-noise", "update(seed=...) keeps the old fixed noise", f"{UPDATES}[seed=9-streamdiffusion]",
           Patch(f"{PIPE}._apply_pending", "self._batch.noise = self._slot_noise(tuple(self._batch.noise.shape[-2:]))",
                 "pass")),
    mutant("negative-prompt-ignored", "the negative prompt never encoded (empty text instead)",
           f"{UPDATES}[negative_prompt=blurry, grey-streamdiffusion]",
           Patch(f"{PIPE}._apply_pending", "self.components.encode_text([*prompts, c.negative_prompt])",
                 'self.components.encode_text([*prompts, ""])')),
    mutant("noise-mode-change-ignored", "update(noise=...) keeps the batch built for the old noise mode",
           f"{UPDATES}[noise=per-frame-streamdiffusion]",
           Patch(f"{PIPE}._apply_pending", "schedule_key = (c.t_indices(turbo), c.size, c.resolved_noise)",
                 "schedule_key = (c.t_indices(turbo), c.size, 'fixed')"), raises=True),
    # --- the feature bank's interval (bug 1 of issue #20) ----------------------------------
    mutant("bank-interval-counts-calls", "the bank update interval counts UNet calls, not frames",
           [f"{METHODS}::test_bank_update_frames_follow_frame_plus_step",
            f"{METHODS}::test_streamv2v_without_stream_batch_banks_the_same_frames_at_every_step"],
           Patch(f"{BANK_STATE}.begin_call",
                 "self.update_now = (self.frames - 1 + min(layout.steps)) % self.config.interval == 0",
                 "self.update_now = self.calls % self.config.interval == 0")),
    mutant("bank-kept-across-step-counts", "a new step count keeps the banks of the old steps (features of "
           "other noise levels)", "tests/attention/test_feature_bank_proofs.py::test_a_new_step_count_starts_with_empty_banks",
           Patch(f"{BANK_STATE}.begin_call", "self.layers.clear()", "pass")),
    mutant("dyme-split-one-stream", "DyMe splits drawn from one generator per update, whatever the row's slot and frame",
           "tests/attention/test_feature_bank.py::test_dyme_splits_are_drawn_once_per_update_per_row_seeded_by_slot_and_frame",
           Patch(f"{BANK_STATE}.split_generator", "% (2**63)", "* 0 % (2**63)")),
]
