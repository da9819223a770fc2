"""OSC control of a running stream (`diffstream run --osc PORT`) or of every stream a
server serves (`diffstream serve --osc PORT`).

Open Sound Control over UDP is what live-performance tools speak (TouchOSC, Max, Pure
Data, TouchDesigner, a DAW's controller surfaces), so a fader or a text field there can
steer the stream. One message changes one setting, from the next frame on:

    /prompt s   /negative_prompt s   /strength f   /steps i   /seed i   /guidance f
    /delta f    /similarity_threshold f   /reset

Each is checked by the web demo's rules, not rules of its own: `protocol.parse_params`
takes the types (a float /steps is refused, an int /strength is read as a float) and
`protocol.apply_params` the ranges, against the settings as they will be once every
change accepted before it is applied, so consecutive changes compose as they were sent.
A nil argument is the web protocol's null (/guidance: the method's default,
/similarity_threshold: the filter off); /seed -1 picks a random seed and says which.
A rejected message prints one line saying what to send instead and changes nothing.

/method s is taken only when the methods to choose from are given (`start(methods=...)`:
`diffstream serve`, whose engine closes a session's pipeline and builds another); a
running `diffstream run` refuses it, since its one pipeline cannot change mechanism.

Threads: a `BlockingOSCUDPServer` on a daemon thread handles one datagram at a time in
arrival order, validates it and puts the accepted change on a bounded queue; the
stream's loop takes everything queued with `poll()` between two frames (non-blocking
gets, nothing else) and hands it to `StreamPipeline.update` / `reset`. A server, which
has no loop between frames of its own, passes `notify` to `start`: called on the OSC
thread after each accepted change, it wakes the event loop that polls
(`diffstream.server.app`).

Anyone who can send a UDP datagram to the port can change the stream: OSC has no
authentication, so the port listens on 127.0.0.1 unless told otherwise (`host_warning`).
"""

from __future__ import annotations

import errno
import math
import queue
import struct
import sys
import threading
from dataclasses import dataclass, field
from typing import Callable

from diffstream.config import StreamConfig
from diffstream.errors import ConfigError
from diffstream.server.protocol import Limits, ProtocolError, apply_params, is_loopback, parse_params, resolve_seed

DEFAULT_HOST = "127.0.0.1"
RESET = "/reset"
METHOD = "/method"
# Address -> (the "params" field it sets, what to send it). Only fields that
# `StreamPipeline.update` changes in place; method and size are not among them.
ADDRESSES: dict[str, tuple[str, str]] = {
    "/prompt": ("prompt", 'one string, e.g. /prompt "a watercolor painting"'),
    "/negative_prompt": ("negative_prompt", 'one string, e.g. /negative_prompt "blurry"'),
    "/strength": ("strength", "one float in (0, 1], e.g. /strength 0.4"),
    "/steps": ("steps", "one int, e.g. /steps 4"),
    "/seed": ("seed", "one int from 0 to 4294967295, or -1 for a random seed, e.g. /seed 42"),
    "/guidance": ("guidance", "one float >= 0 (nil: the method's default), e.g. /guidance 1.2"),
    "/delta": ("delta", "one float, e.g. /delta 1.0"),
    "/similarity_threshold": ("similarity_threshold",
                              "one float in [0, 1) (nil: filter off), e.g. /similarity_threshold 0.98"),
}
# Changes accepted but not yet taken by the stream; past it messages are refused, so a
# flood of datagrams while a frame takes long cannot grow memory without bound.
MAX_PENDING = 256
# How often the server thread checks for close(): the longest close() waits.
_POLL_INTERVAL = 0.05
_MISSING = "OSC control needs python-osc: pip install 'diffstream[osc]'"


@dataclass(frozen=True)
class Control:
    """One accepted OSC message, for the stream's loop.

    Attributes:
        changes: keyword arguments for `StreamPipeline.update` (empty for a reset).
        reset: start the stream over (`StreamPipeline.reset`).
    """

    changes: dict = field(default_factory=dict)
    reset: bool = False


def host_warning(host: str) -> str | None:
    """The warning for an OSC port on `host`, or None when it is this machine only."""
    if is_loopback(host):
        return None
    return (f"OSC control listening on {host}: anyone who can reach this machine can change this run's prompt "
            f"and settings, without authentication; use --osc-host 127.0.0.1 unless you mean it")


def _print_line(line: str) -> None:
    print(f"diffstream: {line}", file=sys.stderr, flush=True)


class OSCControl:
    """An OSC/UDP port whose messages change a stream's settings.

    Lifecycle: constructing binds the port (so a taken port fails before a model loads,
    and `port` is known; datagrams that arrive before `start` wait in the socket's
    buffer); `start(config, turbo)` starts the server thread, checking changes against
    `config`; `poll()` takes the accepted changes; `close()` (or leaving a `with` block)
    stops the thread and frees the port.

    Args:
        port (int): UDP port, 0 for a free one (read the bound one from `port`).
        host (str): address to listen on (default 127.0.0.1: this machine only).
        say (Callable[[str], None] | None): called with each one-line report (a rejected
            message, a picked seed) on the server thread; default: printed on stderr.
        limits (Limits | None): the web protocol's limits (the longest prompt).
        max_pending (int): accepted changes the stream may leave untaken.
    Raises:
        ConfigError: python-osc is not installed, or the address cannot be bound.
    Attributes:
        accepted (int), rejected (int): messages handled so far, written by the server
            thread only (a datagram that is not OSC counts as rejected).
    """

    def __init__(self, port: int, host: str = DEFAULT_HOST, *, say: Callable[[str], None] | None = None,
                 limits: Limits | None = None, max_pending: int = MAX_PENDING):
        if not 0 <= int(port) <= 65535:
            raise ConfigError(f"--osc must be a UDP port from 0 to 65535 (0 picks a free one), got {port}")
        try:
            from pythonosc.dispatcher import Dispatcher
        except ImportError:
            raise ConfigError(_MISSING) from None
        self.host = host
        self.limits = limits or Limits()
        self.max_pending = int(max_pending)
        self.accepted = 0
        self.rejected = 0
        self._say = say or _print_line
        self._queue: queue.Queue[Control] = queue.Queue(maxsize=self.max_pending)
        self._requested: StreamConfig | None = None
        self._turbo = False
        self._methods: tuple[str, ...] | None = None
        self._notify: Callable[[], None] | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        # One handler for every address, not one mapped per address: a message then
        # reaches exactly one check, an unknown address included, and an address
        # pattern (/s*) is refused instead of setting every field it matches.
        # strict_timing=False: a bundle's future timetag must not park the thread
        # (nor close()) until then; its messages apply from the next frame like any.
        dispatcher = Dispatcher(strict_timing=False)
        dispatcher.set_default_handler(self._handle)
        try:
            self._server = _server_class()((host.strip("[]"), int(port)), dispatcher, control=self)
        except OSError as err:
            hint = ("choose another --osc port (or 0 for a free one)" if err.errno == errno.EADDRINUSE
                    else "check --osc-host and --osc")
            raise ConfigError(f"cannot listen for OSC on {host}:{port}: {err.strerror or err}; {hint}") from None

    # --- lifecycle -------------------------------------------------------------------
    @property
    def port(self) -> int:
        """The bound UDP port (the free one picked for port 0)."""
        return self._server.server_address[1]

    @property
    def requested(self) -> StreamConfig | None:
        """The settings once every accepted change is applied (None before `start`)."""
        return self._requested

    @property
    def addresses(self) -> list[str]:
        """The addresses taken (/method only once `start` gave the methods)."""
        return [*ADDRESSES, *((METHOD,) if self._methods is not None else ()), RESET]

    @property
    def received(self) -> int:
        """Messages handled so far, accepted or rejected."""
        return self.accepted + self.rejected

    def start(self, config: StreamConfig, turbo: bool = False, *, methods: tuple[str, ...] | None = None,
              notify: Callable[[], None] | None = None) -> None:
        """Start taking messages on a daemon thread.

        Args:
            config (StreamConfig): the stream's settings now; each change is checked
                against them plus the changes accepted before it.
            turbo (bool): the model is a turbo model (one step by default;
                `Components.turbo`), which the steps-vs-strength check needs.
            methods (tuple[str, ...] | None): the methods /method may choose from; None
                refuses /method (a run's pipeline cannot change mechanism).
            notify (Callable[[], None] | None): called on the OSC thread after each
                accepted change is queued (a server wakes its polling loop with it).
        """
        if self._closed or self._thread is not None:
            raise RuntimeError("OSCControl.start: already started or closed")
        self._requested, self._turbo = config, bool(turbo)
        self._methods = None if methods is None else tuple(methods)
        self._notify = notify
        self._thread = threading.Thread(target=self._server.serve_forever, args=(_POLL_INTERVAL,),
                                        name="diffstream-osc", daemon=True)
        self._thread.start()

    def poll(self) -> list[Control]:
        """Every accepted change not taken yet, oldest first; never blocks."""
        items = []
        while True:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                return items

    def say(self, line: str) -> None:
        """Report one line the way this control reports rejected messages."""
        self._say(line)

    def close(self) -> None:
        """Stop the server thread and free the port (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self._server.shutdown()  # returns once serve_forever has left its loop
            self._thread.join()
        self._server.server_close()

    def __enter__(self) -> "OSCControl":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- the server thread -------------------------------------------------------------
    def _handle(self, address: str, *args) -> None:
        """The dispatcher's handler: check one message, queue it or say why not."""
        try:
            control, new, note = self._check(address, args)
            self._queue.put_nowait(control)
        except ProtocolError as err:
            self._reject(address, args, str(err))
            return
        except queue.Full:
            self._reject(address, args, f"{self.max_pending} changes already wait for the next frame; "
                                        f"send fewer messages per frame")
            return
        except Exception as err:  # a bug here must cost one message, never the OSC thread
            self._reject(address, args, f"internal error: {type(err).__name__}: {err}")
            return
        # Only now: a change that did not make it into the queue must not count.
        if new is not None:
            self._requested = new
        self.accepted += 1
        if note:
            self._say(note)
        if self._notify is not None:
            self._notify()

    def _check(self, address: str, args: tuple) -> tuple[Control, StreamConfig | None, str | None]:
        """(the change, the settings after it, a note to print) for a valid message.

        Raises:
            ProtocolError: one line: what is wrong and what to send instead.
        """
        if address == RESET:
            if args:
                raise ProtocolError(f"{RESET} takes no arguments; send {RESET} alone")
            return Control(reset=True), None, None
        entry = ADDRESSES.get(address)
        if address == METHOD:
            if self._methods is None:
                raise ProtocolError("the method cannot change during a run (it needs a new pipeline); "
                                    "restart diffstream run with --method")
            entry = ("method", f"one of {', '.join(self._methods)}, e.g. /method {self._methods[-1]}")
        if entry is None:
            raise ProtocolError(f"unknown address; send one of {', '.join(self.addresses)}")
        name, usage = entry
        try:
            if len(args) != 1:
                raise ProtocolError(f"{address} takes one argument, got {len(args)}")
            changes = parse_params({name: _osc_value(args[0])}, self.limits, self._methods)
            note = None
            if "seed" in changes:
                chosen = resolve_seed(changes["seed"])
                if chosen != changes["seed"]:
                    note = f"OSC /seed {changes['seed']}: using seed {chosen}"
                changes["seed"] = chosen
            new = apply_params(self._requested, changes, self._turbo)
        except ProtocolError as err:
            raise ProtocolError(f"{err}; send {address} with {usage}") from None
        return Control(changes), new, note

    def _reject(self, address: str, args: tuple, reason: str) -> None:
        self._say(f"OSC {address}{_shown(args)} ignored: {reason}")
        self.rejected += 1  # after the line: a count read elsewhere comes with its line said


def _osc_value(value):
    """An OSC argument as the web protocol's JSON value would be.

    OSC floats ('f') are 32-bit: /strength 0.4 arrives as 0.4000000059604645, which
    starts the schedule at index 29 where --strength 0.4 starts it at 30. The shortest
    decimal with the same 32-bit value is the number the sender meant, so that is taken.
    A value that is not exactly a 32-bit float came as a double ('d') and is kept.
    """
    if not isinstance(value, float) or not math.isfinite(value):
        return value  # NaN and infinities are for parse_params to refuse
    try:
        single = struct.pack(">f", value)
    except OverflowError:  # a double beyond float32's range
        return value
    if struct.unpack(">f", single)[0] != value:
        return value
    for digits in range(1, 10):  # 9 significant digits always round-trip a float32
        decimal = float(f"{value:.{digits}g}")
        if struct.pack(">f", decimal) == single:
            return decimal
    return value


def _shown(args: tuple, limit: int = 60) -> str:
    """The arguments of a message as a short suffix (a long prompt is cut)."""
    text = " ".join(repr(_osc_value(a)) for a in args)
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return f" {text}" if text else ""


def _server_class():
    """python-osc's blocking UDP server, reporting what it would drop without a word.

    Built on first use so this module imports without python-osc installed.
    """
    from pythonosc import osc_packet, osc_server

    class _Server(osc_server.BlockingOSCUDPServer):
        def __init__(self, address, dispatcher, control: OSCControl):
            self._control = control
            super().__init__(address, dispatcher)

        def verify_request(self, request, client_address) -> bool:
            # The dispatcher skips datagrams that do not parse in silence; say so once
            # here (parsing twice costs microseconds, on this thread only).
            try:
                osc_packet.OscPacket(request[0])
            except osc_packet.ParseError:
                self._control._reject("(datagram)", (), f"{len(request[0])} bytes from {client_address[0]} are "
                                                        f"not an OSC message; send OSC 1.0 messages such as "
                                                        f'/prompt "a watercolor painting"')
                return False
            return True

        def handle_error(self, request, client_address) -> None:
            # socketserver prints a traceback; one line is the rule here.
            err = sys.exc_info()[1]
            self._control._reject("(datagram)", (), f"internal error: {type(err).__name__}: {err}")

    return _Server
