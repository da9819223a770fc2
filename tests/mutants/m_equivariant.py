"""Mutants of Fairy's equivariant fine-tuning (issue #15): the augmentation (one transform
for input and edit), InstructPix2Pix's loss and conditioning dropout, the saved formats,
the data checks, and the equivariance metric."""

from mutation import Patch, mutant

EQ = "diffstream.tuning.equivariant"
TASK = f"{EQ}:EquivariantTask"
METRIC = "diffstream.metrics.equivariance"

TESTS = "tests/tuning/test_equivariant.py"
PAIRS = f"{TESTS}::test_a_batch_gives_input_and_edit_the_same_crop_and_transform"
HAND = f"{TESTS}::test_affine_matrix_and_warp_move_points_as_computed_by_hand"
LOSS = [f"{TESTS}::test_loss_is_instruct_pix2pix_written_out_by_hand[{p}]" for p in ("epsilon", "v_prediction")]
DROPOUT = f"{TESTS}::test_conditioning_dropout_drops_text_image_and_both"
FOLDER = f"{TESTS}::test_the_tuned_folder_is_what_edit_runs"
LORA = f"{TESTS}::test_the_lora_file_is_what_edit_runs"
WIDEN = f"{TESTS}::test_widening_keeps_the_text_to_image_model"
SIZES = f"{TESTS}::test_a_malformed_folder_names_the_file[size mismatch]"
METRIC_TESTS = "tests/metrics/test_equivariance.py"
RAMP = f"{METRIC_TESTS}::test_a_fixed_ramp_has_the_hand_computed_error"
COLOUR = f"{METRIC_TESTS}::test_a_colour_map_is_exactly_equivariant"
MASK = f"{METRIC_TESTS}::test_inside_mask_matches_a_hand_inverse"

MUTANTS = [
    # --- the augmentation: one transform, one crop, for both images -----------------------------
    mutant("equivariant-own-transform-each", "input and edit each get their own random affine transform",
           PAIRS, Patch(f"{TASK}.sample_batch",
                        "source, target = apply_affine(source, target, random_affine(generator, c.affine))",
                        "source = apply_affine(source, source, random_affine(generator, c.affine))[0]\n"
                        "        target = apply_affine(target, target, random_affine(generator, c.affine))[0]")),
    mutant("equivariant-edit-centre-cropped", "the edit is cropped at the centre, the input at the random offset",
           PAIRS, Patch(f"{EQ}:crop_pair", "target[y:y + size, x:x + size].copy()",
                        "target[(new_h - size) // 2:(new_h - size) // 2 + size, "
                        "(new_w - size) // 2:(new_w - size) // 2 + size].copy()")),
    mutant("equivariant-rotation-about-origin", "the rotation turns about the top-left corner, not the centre",
           [HAND], Patch(f"{EQ}:Affine.matrix", "centre = np.array([(width - 1) / 2.0, (height - 1) / 2.0])",
                         "centre = np.zeros(2)")),
    mutant("equivariant-shift-in-pixels", "the translation fraction used as pixels (no scaling by the size)",
           [HAND], Patch(f"{EQ}:Affine.matrix", "shift = np.array([self.tx * width, self.ty * height])",
                         "shift = np.array([self.tx, self.ty])")),
    # --- InstructPix2Pix's loss and dropout -------------------------------------------------------
    mutant("equivariant-image-conditioning-dropped", "the source latent left out of the UNet input (zeros)",
           LOSS + [DROPOUT], Patch(f"{TASK}.loss", "torch.cat([noisy, keep_image * source_latents], dim=1)",
                                   "torch.cat([noisy, 0 * source_latents], dim=1)")),
    mutant("equivariant-source-latent-scaled", "the source conditioned on the scaled latent (InstructPix2Pix and "
           "FairyPipeline use the unscaled posterior mode)", LOSS + [DROPOUT],
           Patch(f"{TASK}.loss", "source_latents = comp.vae.encode(source).latent_dist.mode()",
                 "source_latents = comp.vae.encode(source).latent_dist.mode() * comp.vae.config.scaling_factor")),
    mutant("equivariant-epsilon-for-v", "a v-prediction model trained to predict the noise", LOSS[1:],
           Patch(f"{TASK}.loss", "wanted = self.noise_scheduler.get_velocity(latents, noise, steps)",
                 "wanted = noise")),
    mutant("equivariant-dropout-together", "the image is dropped exactly when the text is (never one alone)",
           DROPOUT, Patch(f"{TASK}.loss", "((p >= q) & (p < 3 * q))", "(p < 2 * q)")),
    mutant("equivariant-widen-random", "the widened conv_in's image channels start random, not zero", WIDEN,
           Patch(f"{EQ}:instruct_from_text_model", "new.weight.zero_()",
                 "torch.nn.init.normal_(new.weight, std=0.05)")),
    # --- what is saved ----------------------------------------------------------------------------
    mutant("equivariant-lora-old-key-names", "the LoRA saved with diffusers' old lora.down/up names (conv_in keeps "
           "peft's, so diffusers drops the attention half on load)", LORA,
           Patch(f"{EQ}:save_lora", "layers = get_peft_model_state_dict(unet)",
                 "from diffusers.utils import convert_state_dict_to_diffusers\n"
                 "    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))")),
    mutant("equivariant-scheduler-defaults-written", "the checkpoint's scheduler writes its defaulted settings "
           "explicitly (Euler a then samples with another timestep spacing)", FOLDER,
           Patch(f"{EQ}:save_pipeline", "    if defaults:", "    if False:")),
    # --- the data checks --------------------------------------------------------------------------
    mutant("equivariant-sizes-unchecked", "an edit of another size than its input is accepted", SIZES,
           Patch(f"{EQ}:_check_triplet", "if sizes[0] != sizes[1]:", "if False:")),
    # --- the metric -------------------------------------------------------------------------------
    mutant("equivariance-mask-ignored", "the metric averages over the border the warp brings in", RAMP,
           Patch(f"{METRIC}:equivariance_errors", "np.abs(a - b)[mask].mean()", "np.abs(a - b).mean()")),
    mutant("equivariance-edit-not-transformed", "T(edit(x)) taken as edit(x)", [COLOUR, RAMP],
           Patch(f"{METRIC}:equivariance_errors", "b = warp_affine(edited, matrix).astype(np.float64)",
                 "b = edited.astype(np.float64)")),
    mutant("equivariance-mask-one-pixel-wide", "the inside mask keeps sources up to W, not W - 1 (one column "
           "interpolated with the black border)", [MASK, RAMP],
           Patch(f"{METRIC}:inside_mask", "(sx <= width - 1 + eps)", "(sx <= width + eps)")),
]
