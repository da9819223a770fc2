"""Mutants of the WebRTC transport (`diffstream serve --webrtc`, issue #19): the ingest
into the engine's slot, the data channel's checks, the ends of a session, the
outputs' way to the viewers, and what the demo page's WebRTC transport relies on."""

from mutation import Patch, mutant

GATEWAY = "diffstream.server.webrtc:WebRTCGateway"
OFFER = "diffstream.server.webrtc:_offer"
TESTS = "tests/server/test_webrtc.py"
STREAM = f"{TESTS}::test_frames_go_through_the_server_and_every_returned_frame_belongs_to_a_sent_one"
PARAMS = f"{TESTS}::test_params_over_the_data_channel_apply_from_the_next_frame_and_are_validated"
SESSIONS = f"{TESTS}::test_sessions_are_limited_freed_on_delete_and_when_the_peer_goes"
IDLE = f"{TESTS}::test_a_silent_publisher_is_told_and_freed_after_the_idle_timeout"
SLOW_VIEWER = f"{TESTS}::test_a_slow_viewer_gets_the_newest_output"
PAGE = "tests/server/test_browser.py::test_live_demo_over_webrtc_in_headless_chromium"

MUTANTS = [
    # --- frames in -------------------------------------------------------------------------
    mutant("webrtc-ingest-drops-newest", "a frame that arrives while another waits for the engine is thrown "
           "away uncounted (newest dropped) instead of replacing the waiting one (oldest dropped, counted)",
           f"{TESTS}::test_frames_arriving_faster_than_inference_drop_the_oldest_and_are_counted",
           Patch(f"{GATEWAY}._ingest", "self.engine.put_frame(pub.session, data, self.limits)",
                         "if pub.session.slot is None:\n                "
                         "self.engine.put_frame(pub.session, data, self.limits)")),
    # --- the data channel --------------------------------------------------------------------
    mutant("webrtc-params-unvalidated", "a data-channel params message reaches the engine without the web "
           "protocol's type checks (steps 2.5, size are taken)", PARAMS,
           Patch(f"{GATEWAY}._attach_channel",
                 "self.engine.put_control(pub.session, parse_control(message, self.limits))",
                 "self.engine.put_control(pub.session, {'type': 'params', 'changes': "
                 "{k: v for k, v in json.loads(message).items() if k != 'type'}} "
                 "if '\"params\"' in message else parse_control(message, self.limits))")),
    # --- the ends of a session -------------------------------------------------------------------
    mutant("webrtc-session-not-freed", "an ended publication closes its connection but keeps its engine "
           "session, so max_clients fills up with dead sessions", SESSIONS,
           Patch(f"{GATEWAY}._end", "self.engine.close_session(pub.session)", "pass")),
    mutant("webrtc-vanished-peer-kept", "a publisher whose connection closes (or whose track ends) without a "
           "DELETE keeps its session", SESSIONS,
           Patch(f"{GATEWAY}.publish", 'await self._end(pub, f"the publisher\'s connection {pc.connectionState}")',
                 "pass"),
           Patch(f"{GATEWAY}._ingest", "await self._end(pub, \"the publisher's video track ended\")", "pass")),
    mutant("webrtc-idle-never", "a publisher that stops sending keeps its session forever (the idle timeout "
           "is never reached)", IDLE, Patch(f"{GATEWAY}._idle", "if left > 0:", "if True:")),
    # --- frames out ----------------------------------------------------------------------------
    mutant("webrtc-outputs-to-every-viewer", "an output frame goes to the viewers of every publication, not "
           "only its own session's", STREAM,
           Patch(f"{GATEWAY}._pump", "for viewer in list(pub.viewers.values()):",
                 "for viewer in [v for p in self._publications.values() for v in p.viewers.values()]:")),
    mutant("webrtc-viewer-keeps-oldest", "a viewer whose encoder lags keeps the oldest waiting output and "
           "drops the newer ones (drop-newest on the way out)", SLOW_VIEWER,
           Patch(OFFER, "track._image = image", "track._image = image if track._image is None else track._image")),
    # --- what the demo page relies on --------------------------------------------------------
    mutant("webrtc-link-names-whip", "the WHIP answer's Link header names the publication's WHIP resource "
           "(/whip/<id>, the Location line's copy) instead of its WHEP playback, so a client that follows "
           "it, as the page does, gets no restyled stream", PAGE,
           Patch("diffstream.server.app:_add_webrtc_routes", """"Link": f'</whep/{token}>; rel="alternate"'""",
                 """"Link": f'</whip/{token}>; rel="alternate"'""")),
]
