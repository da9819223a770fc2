"""Mutants of the streaming methods: StreamDiffusion's engine, StreamV2V's feature bank,
Live2Diff's causal attention (issue #20)."""

from mutation import Patch, mutant

BATCH = "diffstream.schedule.stream_batch:StreamBatch"

MUTANTS = [
    mutant(
        "renoise-own-slot",
        "re-noising after step k with slot k's noise instead of slot k+1's",
        "tests/pipelines/test_stream.py::test_sequential_matches_diffusers_lcm_scheduler",
        Patch(f"{BATCH}.advance", "self.noise[lo + 1 : lo + 1 + keep]", "self.noise[lo : lo + keep]"),
    ),
]
