"""Mutants of the NDI and virtual-camera inputs and outputs (issue #19)."""

from mutation import Patch, mutant

NDI = "tests/io/test_ndi.py"
CAM = "tests/io/test_virtualcam.py"

MUTANTS = [
    mutant("ndi-input-not-live", "an NDI input is read like a file: the run waits for every frame instead of "
           "dropping the oldest when inference falls behind",
           f"{NDI}::test_run_reads_ndi_as_a_live_input_and_sends_every_output",
           Patch("diffstream.io.ndi:NDISource._connect", "self.is_live = True", "self.is_live = False")),
    mutant("ndi-channels-swapped", "an RGBA NDI frame is read as BGRA (red and blue swapped)",
           f"{NDI}::test_source_finds_by_stream_name_and_yields_rgb_frames",
           Patch("diffstream.io.ndi:NDISource._read", "return np.ascontiguousarray(pixels[..., :3])",
                 "return np.ascontiguousarray(pixels[..., 2::-1])")),
    mutant("ndi-ambiguous-name-takes-first", "a stream name found in several NDI sources connects to one of "
           "them instead of asking for the full name", f"{NDI}::test_source_errors_are_one_line",
           Patch("diffstream.io.ndi:match_source", "if len(hits) > 1:", "if False:")),
    mutant("ndi-output-unchecked-before-load", "a missing cyndilib for an ndi: output is found only after the "
           "model loaded", f"{NDI}::test_missing_cyndilib_and_bad_outputs_are_one_line",
           Patch("diffstream.io.sinks:_check_live_output", "ndi.check_available(OutputError)", "pass")),
    mutant("ndi-frame-sync-kept", "cyndilib's NDI frame-sync stays bound to the receiver and takes frames "
           "from it: frames the runtime received never come out of the input",
           f"{NDI}::test_every_frame_comes_out_though_cyndilib_binds_a_frame_sync",
           Patch("diffstream.io.ndi:NDISource._connect", "if not _detach_frame_sync(receiver):", "if False:")),
    mutant("ndi-frame-sync-slot-guessed", "a receiver whose layout is not known (the frame-sync's address in "
           "several words) has one of them overwritten",
           f"{NDI}::test_a_receiver_of_unknown_layout_is_left_alone",
           Patch("diffstream.io.ndi:_detach_frame_sync", "if len(slots) != 1:", "if not slots:")),
    mutant("ndi-receive-waits-with-the-gil", "the source waits inside cyndilib's receive, which keeps the GIL: "
           "inference and the NDI output stop while no frame is there",
           f"{NDI}::test_waiting_for_a_frame_neither_holds_the_gil_nor_spins",
           Patch("diffstream.io.ndi:NDISource._generate", "self._receiver.receive(video_flag, 0)",
                 "self._receiver.receive(video_flag, 200)")),
    mutant("ndi-busy-poll", "the source polls the receiver without pause while no frame is there (a core busy)",
           f"{NDI}::test_waiting_for_a_frame_neither_holds_the_gil_nor_spins",
           Patch("diffstream.io.ndi:NDISource._generate", "time.sleep(_POLL_S)", "pass")),
    mutant("ndi-runtime-drops-unreported", "frames the NDI runtime dropped (they came faster than they were "
           "read) are not reported", f"{NDI}::test_every_frame_comes_out_though_cyndilib_binds_a_frame_sync",
           Patch("diffstream.io.ndi:NDISource._report_runtime_drops", "if dropped > 0:", "if False:")),
    mutant("virtualcam-error-without-hint", "a missing camera device says what failed but not what to install",
           f"{CAM}::test_no_camera_device_is_one_line_naming_what_to_install",
           Patch("diffstream.io.virtualcam:_no_camera", "; {install_hint()}", "")),
    mutant("virtualcam-unchecked-before-load", "-o virtualcam is not checked before the model loads (a missing "
           "package or device costs a model load)",
           f"{CAM}::test_missing_pyvirtualcam_fails_before_the_model_loads",
           Patch("diffstream.io.sinks:_check_live_output",
                 "virtualcam.check_available(virtualcam.parse_spec(spec)[1])", "pass")),
]
