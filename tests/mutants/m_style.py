"""Mutants of the toy style metric (issue #14)."""

from mutation import Patch, mutant

STYLE = "diffstream.metrics.style"
TESTS = "tests/metrics/test_style.py"

MUTANTS = [
    mutant("style-farthest-target", "the frame is classified as the style whose target is farthest", [
        f"{TESTS}::test_every_exact_target_is_nearest_to_its_own_style"],
        Patch(f"{STYLE}:nearest_style", "np.argmin(", "np.argmax(")),
    mutant("style-source-not-resized", "the source is compared at its own size, cropped to the output's",
           [f"{TESTS}::test_accuracy_counts_frames_of_the_prompted_style_at_the_output_size"],
           Patch(f"{STYLE}:style_distances", "else resize(input_frame, (w, h))", "else input_frame[:h, :w]")),
    mutant("style-sepia-bgr", "the sepia matrix applied to BGR-ordered pixels",
           [f"{TESTS}::test_the_filters_are_the_issue_formulas"],
           Patch("diffstream.models.toy:sepia", "frame.astype(np.float32) @", "frame[..., ::-1].astype(np.float32) @")),
]
