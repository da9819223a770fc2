"""Mutants of SDXL conditioning in the stream (issue #17). Proofs: tests/pipelines/test_sdxl.py
(against diffusers' StableDiffusionXLImg2ImgPipeline)."""

from mutation import Patch, mutant

COMP = "diffstream.models.components:Components"
PIPE = "diffstream.pipelines.stream:StreamPipeline"
DIFFUSERS = "tests/pipelines/test_sdxl.py::test_one_frame_equals_diffusers_sdxl_img2img"

MUTANTS = [
    mutant("sdxl-last-hidden-layer", "SDXL conditioned on the text encoders' last hidden layer, not the penultimate",
           DIFFUSERS, Patch(f"{COMP}.encode_text", "hidden.append(out.hidden_states[-2])",
                            "hidden.append(out.hidden_states[-1])")),
    mutant("sdxl-size-ids-width-first", "the size ids give (width, height) instead of (height, width)", DIFFUSERS,
           Patch(f"{COMP}.time_ids", "[[height, width, 0, 0, height, width]]", "[[width, height, 0, 0, width, height]]")),
    mutant("sdxl-uncond-rows-cond-pooled", "the unconditional rows get the prompt's pooled embedding", DIFFUSERS,
           Patch(f"{PIPE}._sdxl_rows", "torch.cat([pooled_u.expand(u, -1)", "torch.cat([pooled_c.expand(u, -1)")),
    mutant("sdxl-empty-negative-encoded", "an empty negative prompt encoded as \"\" instead of zeros",
           f"{DIFFUSERS}[empty-negative-is-zeros]",
           Patch(f"{PIPE}._apply_pending", "if not c.negative_prompt and self.components.force_zeros_for_empty_prompt:",
                 "if False:")),
]
