"""Mutants of FateZero (issue #13): inversion, CFG editing, fusion, Prompt-to-Prompt, blend, Eq. 8."""

from mutation import Patch, mutant

ED = "diffstream.pipelines.fatezero:FateZeroEditor"
PROC = "diffstream.attention.fatezero:FateZeroAttnProcessor"
CALLS = "tests/pipelines/test_fatezero_calls.py::test_every_unet_call_of_an_edit_is_the_papers"
STYLE2, STYLE3, SWAP2, SWAP3 = (f"{CALLS}[{c}-{f}]" for c in ("style", "swap") for f in (2, 3))
ALL = (STYLE2, STYLE3, SWAP2, SWAP3)
RECOMPUTE = "tests/pipelines/test_fatezero.py::test_recompute_gives_the_same_edit_as_the_store"

MUTANTS = [
    mutant("fz-invert-target-prompt", "DDIM inversion under the target prompt instead of the source", ALL,
           Patch(f"{ED}.invert", "text = self.source_text.expand(z0.shape[0], -1, -1)",
                 "text = self.target_text.expand(z0.shape[0], -1, -1)")),
    mutant("fz-recompute-target-prompt", "recompute-mode fusion re-runs the source branch under the target prompt",
           RECOMPUTE,
           Patch(f"{ED}.edit", "source_text = self.source_text.expand(rows, -1, -1)",
                 "source_text = self.target_text.expand(rows, -1, -1)")),
    mutant("fz-source-maps-target-text", "source cross-attention maps rebuilt with the target text's keys", ALL,
           Patch(f"{PROC}._fused", "src_q, src_k = src.query, src.key", "src_q, src_k = src.query, key[rows]")),
    mutant("fz-ignore-guidance", "editing ignores the guidance scale (steps along gamma = 1)", ALL,
           Patch(f"{ED}.edit", "eps = cfg(eps_c, eps_u, float(self.config.guidance))", "eps = cfg(eps_c, eps_u, 1.0)")),
    mutant("fz-fuse-uncond-rows", "the unconditional CFG rows are fused instead of the conditional ones", ALL,
           Patch(f"{ED}._layout", 'fused_group=len(branches) - 1 if phase == "fuse" else None',
                 'fused_group=0 if phase == "fuse" else None')),
    mutant("fz-cfg-rows-swapped", "the editing batch carries [target; uncond] while CFG reads [uncond; cond]", ALL,
           Patch(f"{ED}.edit", "text = torch.cat([self.uncond_text.expand(rows, -1, -1), text])",
                 "text = torch.cat([text, self.uncond_text.expand(rows, -1, -1)])")),
    mutant("fz-read-next-inversion-step", "editing step k fuses the inputs stored at inversion step k+1 (clamped "
           "to the window)", ALL,
           Patch(f"{PROC}._fused", "src_hidden = state.source.get(key_id, device=device, dtype=dtype)",
                 "src_hidden = state.source.get((*key_id[:2], min(key_id[2] + 1, max(state.plan.self_steps if "
                 "self.is_self else state.plan.cross_steps))), device=device, dtype=dtype)")),
    mutant("fz-recompute-next-latent", "recompute mode re-runs the source branch on the latent one step noisier",
           RECOMPUTE,
           Patch(f"{ED}.edit", 'x_src = store.get(("latent", "z", n - 1 - k)', 'x_src = store.get(("latent", "z", n - k)')),
    mutant("fz-invert-at-cleaner-timestep", "inversion step k evaluates the UNet at the next step's timestep", ALL,
           Patch(f"{ED}.invert", "eps = self._eps(x, k, text, sched.abar_prev[k])",
                 "eps = self._eps(x, min(k + 1, n - 1), text, sched.abar_prev[k])")),
    mutant("fz-blend-global-norm", "blend maps normalised by the peak over all frames instead of per frame",
           "tests/pipelines/test_fatezero_calls.py::test_blend_mask_is_normalised_per_frame",
           Patch("diffstream.attention.fatezero:blend_mask", "resized.amax(dim=(-2, -1), keepdim=True)",
                 "resized.amax(dim=(0, -2, -1), keepdim=True)")),
    mutant("fz-blend-threshold-flipped", "Heaviside of Eq. 6 flipped: the edit kept where the source word is weak",
           (SWAP2, SWAP3, "tests/pipelines/test_fatezero_calls.py::test_blend_mask_is_normalised_per_frame"),
           Patch("diffstream.attention.fatezero:blend_mask", "(resized / peak > threshold)",
                 "(resized / peak <= threshold)")),
    mutant("fz-eq7-swapped", "Eq. 7's weights swapped: M s_src + (1 - M) s_edit", (SWAP2, SWAP3),
           Patch(f"{PROC}._fused", "fused = m * attention_probs(q_e[c], k_e[c]) + (1 - m) * source",
                 "fused = (1 - m) * attention_probs(q_e[c], k_e[c]) + m * source")),
    mutant("fz-blend-no-pool", "the blend map stored without the 3x3 max pooling", (SWAP2, SWAP3),
           Patch(f"{PROC}._collect_blend_map", "pooled = F.max_pool2d(mean, kernel_size=3, stride=1, padding=1)",
                 "pooled = mean")),
    mutant("fz-refine-off-by-one", "refinement mapper points one source token too early", (STYLE2, STYLE3),
           Patch("diffstream.pipelines.prompt_align:align_tokens", "mapper[j] = i\n", "mapper[j] = max(i - 1, 0)\n")),
    mutant("fz-refine-alphas-inverted", "refinement keeps the edit's maps of shared words and the source's of new "
           "ones", ALL,
           Patch(f"{PROC}._fused", "fused = source.index_select(-1, mapper) * alphas + edit * (1 - alphas)",
                 "fused = source.index_select(-1, mapper) * (1 - alphas) + edit * alphas")),
    mutant("fz-reweight-ignored", "Prompt-to-Prompt re-weighting factors never applied",
           "tests/attention/test_fatezero.py::test_cross_attention_fusion_is_prompt_to_prompt_refinement",
           Patch(f"{PROC}._fused", "fused = fused * weights", "fused = fused + 0 * weights")),
    mutant("fz-window-one-step-long", "fusion windows one step longer than int(T * fraction), the reference's bound",
           ALL,
           Patch("diffstream.attention.fatezero:FateZeroConfig._steps_of", "int(self.steps * float(fraction) + 1e-9)",
                 "int(self.steps * float(fraction) + 1e-9) + 1")),
    mutant("fz-source-maps-first-reference", "source self-attention maps rebuilt with frame 0 as Eq. 8's reference",
           (STYLE3, SWAP3),
           Patch(f"{PROC}._fused", 'single = CallLayout("plain", call.step, r, 1, call.ref_rows)',
                 'single = CallLayout("plain", call.step, r, 1, call.ref_rows * 0)')),
    mutant("fz-middle-rounds-up", "the middle reference frame n // 2 instead of the reference's (n - 1) // 2",
           ["tests/pipelines/test_fatezero_calls.py::test_middle_reference_of_even_and_odd_clips"],
           Patch("diffstream.pipelines.fatezero:reference_index", "return (num_frames - 1) // 2",
                 "return num_frames // 2")),
    mutant("fz-eq8-no-reference", "Eq. 8 dropped: self-attention of the edit sees only its own frame", ALL,
           Patch("diffstream.attention.fatezero:spatial_temporal", "torch.cat([grouped, ref], dim=3)",
                 "torch.cat([grouped, grouped], dim=3)")),
]
