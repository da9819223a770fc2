"""Mutants of OSC control (`diffstream run --osc`, issue #19): the checks of each message,
the queue between the OSC thread and the run loop, and the run loop's resets."""

from mutation import Patch, mutant

CONTROL = "diffstream.server.osc:OSCControl"
APPLY = "diffstream.commands.run:apply_controls"
TESTS = "tests/io/test_osc.py"
INVALID = f"{TESTS}::test_an_invalid_message_prints_one_line_and_changes_nothing"
VALID = f"{TESTS}::test_valid_messages_arrive_typed_as_the_web_protocol_types_them"
BURST = f"{TESTS}::test_a_burst_is_polled_at_once_in_order_and_reset_arrives_as_a_reset"
COMPOSE = f"{TESTS}::test_changes_are_checked_against_the_settings_as_they_will_be"
RUN = f"{TESTS}::test_run_applies_an_osc_change_from_the_next_frame"
RESET = f"{TESTS}::test_run_osc_reset_starts_a_new_stream_and_keeps_every_frame"

MUTANTS = [
    # --- the checks of one message ----------------------------------------------------
    mutant("osc-type-checks-skipped", "OSC arguments reach the settings without the web protocol's type checks "
           "(a float /steps 4.0 is accepted)", [INVALID, RUN],
           Patch(f"{CONTROL}._check", "changes = parse_params({name: _osc_value(args[0])}, self.limits, self._methods)",
                 "changes = {name: _osc_value(args[0])}")),
    mutant("osc-range-unchecked", "an out-of-range value (/strength 2.0) is queued and applied: the range "
           "check against the stream's settings is skipped", INVALID,
           Patch(f"{CONTROL}._check", "new = apply_params(self._requested, changes, self._turbo)",
                 "new = self._requested")),
    mutant("osc-extra-arguments-ignored", "a message with extra arguments (/strength 0.5 0.6) is taken by its first",
           INVALID, Patch(f"{CONTROL}._check", "if len(args) != 1:", "if not args:")),
    mutant("osc-rejections-silent", "a rejected message is dropped without a line saying what to send", INVALID,
           Patch(f"{CONTROL}._reject", 'self._say(f"OSC {address}{_shown(args)} ignored: {reason}")', "pass")),
    mutant("osc-float32-binary-value", "an OSC float is taken at its 32-bit binary value (/strength 0.4 becomes "
           "0.4000000059604645 and the schedule starts at index 29, not 30)", VALID,
           Patch("diffstream.server.osc:_osc_value", "return decimal", "return value")),
    mutant("osc-seed-minus-one-passed-on", "/seed -1 reaches the pipeline as seed -1 instead of a picked seed",
           f"{TESTS}::test_seed_minus_one_picks_a_random_seed_and_says_which",
           Patch(f"{CONTROL}._check", 'changes["seed"] = chosen', "pass")),
    # --- consecutive messages and the queue --------------------------------------------
    mutant("osc-changes-not-composed", "each change is checked against the settings the stream started with, "
           "not those the earlier accepted changes lead to (/strength 0.1 then /steps 8 is accepted)", COMPOSE,
           Patch(f"{CONTROL}._handle", "self._requested = new", "pass")),
    mutant("osc-refused-change-counts", "a change the full queue refused still moves the settings later "
           "changes are checked against",
           f"{TESTS}::test_changes_beyond_the_pending_limit_are_refused_without_counting",
           Patch(f"{CONTROL}._handle", "self._queue.put_nowait(control)",
                 "self._requested = new or self._requested\n        self._queue.put_nowait(control)")),
    mutant("osc-poll-one-per-frame", "the run loop takes one queued change per frame, so a burst of changes "
           "sent together reaches the stream over several frames", [BURST, RUN],
           Patch(f"{CONTROL}.poll", "items.append(self._queue.get_nowait())", "return [self._queue.get_nowait()]")),
    # --- the run loop ------------------------------------------------------------------
    mutant("osc-reset-without-flush", "/reset drops the frames in flight instead of finishing them (the output "
           "loses frames)", RESET, Patch(APPLY, "write(pipe.flush())", "pass")),
    mutant("osc-reset-not-applied", "/reset is taken off the queue but the stream goes on", RESET,
           Patch(APPLY, "pipe.reset()", "pass")),
    mutant("osc-reset-forgets-skips", "the closing line counts only the similarity-filter skips since the last "
           "/reset", RESET, Patch(APPLY, "ended += pipe.skipped", "pass")),
]

# --- diffstream serve --osc: one controller, every session ---------------------------------
SERVE = "tests/server/test_osc_serve.py"
EVERY = f"{SERVE}::test_a_change_reaches_every_session_from_its_next_frame_and_new_sessions_start_with_it"
BROADCAST = "diffstream.server.engine:Engine.broadcast"
MUTANTS += [
    mutant("osc-serve-first-session-only", "a server's OSC change reaches the oldest session only", EVERY,
           Patch(BROADCAST, "for session in self.sessions:", "for session in self.sessions[:1]:")),
    mutant("osc-serve-new-sessions-on-old-settings", "a session opened after an OSC change starts on the "
           "settings the server started with", EVERY,
           Patch(BROADCAST, "self.base_config = base", "pass")),
    mutant("osc-serve-method-refused", "a server refuses /method as a run must (its methods are not given to "
           "the control)", f"{SERVE}::test_method_and_reset_reach_every_session_and_a_bad_method_is_one_line",
           Patch("diffstream.server.app:_start_osc", "methods=engine.methods, ", "")),
    mutant("osc-serve-refusal-unseen", "a session that cannot take a controller's change is not told (no "
           "error event, nothing counted)",
           f"{SERVE}::test_a_change_one_session_cannot_take_is_refused_for_it_alone",
           Patch(BROADCAST, 'session.deliver({"type": "error", "message": f"a controller\'s change was not applied: {err}"})',
                 "pass")),
]
