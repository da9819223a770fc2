"""Mutants of prompt and seed blending (issue #17). Proofs: tests/schedule/test_blend.py
(the formulas) and tests/pipelines/test_blend_stream.py (the engine)."""

from mutation import Patch, mutant

BLEND = "diffstream.schedule.blend"
PIPE = "diffstream.pipelines.stream:StreamPipeline"
MATHS = "tests/schedule/test_blend.py"
ENGINE = "tests/pipelines/test_blend_stream.py"

MUTANTS = [
    mutant("blend-linear-unnormalised", "the linear blend divides by the number of prompts, not the weights' sum",
           [f"{MATHS}::test_linear_blend_is_the_weighted_mean", f"{ENGINE}::test_one_step_by_hand"],
           Patch(f"{BLEND}:blend_embeddings", "/ sum(weights)", "/ len(weights)")),
    mutant("blend-slerp-share-of-all", "slerp folds each prompt in with its share of the total weight "
           "instead of the weight so far", f"{MATHS}::test_slerp_blend_of_two_prompts_takes_the_second_ones_share",
           Patch(f"{BLEND}:blend_embeddings", "slerp(out, e, w / (total + w))", "slerp(out, e, w / sum(weights))")),
    mutant("blend-noise-mean", "seed blending takes the weighted mean of the noises (variance shrinks)",
           [f"{MATHS}::test_noise_blend_keeps_unit_variance", f"{ENGINE}::test_one_step_by_hand"],
           Patch(f"{BLEND}:blend_noise", "norm = sum(w * w for w in weights) ** 0.5", "norm = sum(weights)")),
    mutant("blend-prompt-change-ignored", "a new prompt blend is not re-encoded (the cache key misses it)",
           f"{ENGINE}::test_changes_apply_from_the_next_frame[prompt_blend]",
           Patch(f"{PIPE}._apply_pending", "prompt_key = (c.prompt, c.negative_prompt, c.prompt_blend, c.blend)",
                 "prompt_key = (c.prompt, c.negative_prompt)")),
    mutant("blend-mode-change-ignored", "switching linear/slerp is not re-encoded",
           f"{ENGINE}::test_changes_apply_from_the_next_frame[blend]",
           Patch(f"{PIPE}._apply_pending", "prompt_key = (c.prompt, c.negative_prompt, c.prompt_blend, c.blend)",
                 "prompt_key = (c.prompt, c.negative_prompt, c.prompt_blend)")),
    mutant("blend-seed-change-ignored", "a new seed blend does not redraw the fixed noise",
           f"{ENGINE}::test_changes_apply_from_the_next_frame[seed_blend]",
           Patch(f"{PIPE}._apply_pending", "elif (c.seed, c.seed_blend) != self._seed:", "elif c.seed != self._seed[0]:")),
]
