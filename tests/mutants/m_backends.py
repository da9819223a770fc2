"""Mutants of the execution backends (issue #16): what keeps a compiled model correct and
fast with stateful mechanisms, and what refuses the combinations that cannot work."""

from pathlib import Path

from mutation import Patch, mutant


def _cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic (where OpenVINO's CPU plugin defaults to it)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags

TESTS = "tests/models/test_backends.py"
REUSE = f"{TESTS}::test_graphs_are_reused_while_state_fills"
OPAQUE = "@compiler_opaque  # stateful: the compiled graphs stop here (attention.base)"

MUTANTS = [
    mutant("bank-traced-into-graphs", "the feature bank's processor is traced by dynamo: graphs guard on the "
           "bank's fill counts and are rebuilt as it fills (or fall back to eager at the recompile limit)",
           f"{REUSE}[streamv2v]",
           Patch("diffstream.attention.feature_bank:FeatureBankAttnProcessor.__call__", OPAQUE, "")),
    mutant("kv-cache-traced-into-graphs", "Live2Diff's causal temporal processor is traced by dynamo: graphs "
           "guard on the KV cache's fill and are rebuilt frame after frame while the window rolls",
           f"{REUSE}[live2diff]",
           Patch("diffstream.attention.causal_temporal:CausalTemporalAttnProcessor.__call__", OPAQUE, "")),
    mutant("openvino-runs-stateful-processors", "a stateful mechanism attaches to an OpenVINO-compiled UNet, whose "
           "executor reuses output buffers across graph pieces",
           f"{TESTS}::test_backend_option_and_its_refusals",
           Patch("diffstream.attention.base:check_backend",
                 'if installed and getattr(unet, BACKEND_ATTRIBUTE, "eager") == "openvino":', "if False:")),
    mutant("openvino-fallback-untold", "the UNet falls back to compile without telling the stream's user",
           f"{TESTS}::test_a_fallback_notice_reaches_the_stream_once",
           Patch("diffstream.pipelines.stream:StreamPipeline._own_unet", "if notice is not None:", "if False:")),
    mutant("openvino-runs-fp32-as-bf16", "OpenVINO keeps its CPU default, bf16 arithmetic on CPUs with bf16 "
           "units, for an fp32 model (6 grey levels off eager here)",
           f"{TESTS}::test_openvino_equals_eager_for_the_baseline",
           Patch("diffstream.models.backends:apply_backend", '"config": {"INFERENCE_PRECISION_HINT": precision}', ""),
           harmless=None if _cpu_has_bf16() else "this CPU has no bf16 units: OpenVINO computes in fp32 anyway"),
]

# --- telling the user a compiled model builds graphs -------------------------------------------
NOTICE = f"{TESTS}::test_a_compiled_model_tells_when_it_builds_graphs_for_new_shapes"
NOTICES = "diffstream.pipelines.stream:StreamPipeline._notice_compiles"
MUTANTS += [
    mutant("compile-notice-per-shape", "a notice for every new batch shape (a line per row count while the "
           "stream batch fills) instead of one per schedule", NOTICE,
           Patch(NOTICES, "self._compile_noticed = True", "pass")),
    mutant("compile-notice-shapes-forgotten", "shapes already run are not remembered: a second stream (or a "
           "return to the old steps) is told of graph building that does not happen", NOTICE,
           Patch(NOTICES, "seen.add(key)", "pass")),
    mutant("compile-notice-once-per-stream", "after the first notice a steps change that brings new shapes "
           "is not told", NOTICE,
           Patch("diffstream.pipelines.stream:StreamPipeline._apply_pending",
                 "self._compile_noticed = False  # new shapes may follow: say so once more", "pass")),
]

MUTANTS += [
    mutant("compile-wan-not-applied", "--backend compile accepted for a Wan model but the transformer left eager",
           f"{TESTS}::test_inductor_equals_eager_for_causal_video",
           Patch("diffstream.models.loading:load_wan_components",
                 "apply_backend(components, config.backend)  # the transformer", "pass  #")),
]
