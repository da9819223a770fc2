"""The live demo's WebSocket protocol: message formats and their validation.

Client -> server:
- binary message: one video frame, a JPEG, PNG or WebP image. The server numbers the
  binary messages of a connection 0, 1, 2, ... in arrival order (the frame id), whether
  it keeps, drops or rejects them, so a client knows each frame's id by counting.
- text message: one JSON object with a "type":
    {"type": "params", <field>: <value>, ...}  change settings from the next frame on
        (fields: see PARAM_FIELDS; at least one; unknown fields are rejected; a seed of
        -1 asks for a random one, and the "params" answer says which);
    {"type": "reset"}                          start the stream over (drops temporal state);
    {"type": "ping", "t": <number>}            answered with a "pong" once every frame
        sent before the ping has been processed (a barrier; also measures round trips).

Server -> client:
- binary message: one output frame: a 4-byte big-endian unsigned frame id (the id of the
  input frame it restyles), then JPEG bytes (see `pack_output` / `unpack_output`).
- text message: one JSON object with a "type": "ready" (first message: session id,
  current params, methods, limits), "params" (settings applied, echoing them all),
  "reset", "pong", "stats" (periodic counters and the output rate), "status" (model
  state), "error" (a message was rejected; the connection stays open), "busy" (no free
  session; the server then closes with code 1013, "try again later"), "idle" (no message
  came for the server's idle timeout; the server then closes with code 1000 and the
  session is free for another client).

Every check here runs before anything touches the model, and every failure is a
`ProtocolError` with one line that says what to send instead. Who may connect at all is
decided here too: `is_loopback` (the serve command warns about other hosts) and
`origin_allowed` (the browser page's origin check).
"""

from __future__ import annotations

import base64
import io
import ipaddress
import json
import math
import re
import secrets
import struct
from dataclasses import dataclass
from urllib.parse import urlsplit

from diffstream.config import CFG_TYPES, METHODS, NOISE_MODES, VAE_ENCODINGS, StreamConfig
from diffstream.errors import ConfigError

PROTOCOL_VERSION = 1
# Output frame header: the input frame id, so clients can pair outputs with inputs.
_OUTPUT_HEADER = struct.Struct(">I")
MAX_FRAME_ID = 2**32 - 1
# Image formats a browser can produce with canvas.toBlob and OpenCV decodes.
FRAME_FORMATS = ("JPEG", "PNG", "WEBP")
# Seeds stay below 2**32 so that JavaScript numbers hold them exactly.
MAX_SEED = 2**32 - 1
# A "params" seed of -1 asks for a random seed (as `--seed -1` does on the command line);
# the server picks one and echoes it in the "params" event, so a good result can be kept.
RANDOM_SEED = -1

# What a "params" message may change, and the kind of value each field takes. Size is
# not here: the server fixes the processing size (it bounds the cost of every frame).
PARAM_FIELDS: dict[str, str] = {
    "prompt": "text",
    "negative_prompt": "text",
    "method": "method",
    "strength": "number",
    "guidance": "number_or_null",  # null: the method's paper setting
    "delta": "number",
    "seed": "seed",
    "steps": "int_or_null",
    "t_index_list": "int_list_or_null",
    "cfg_type": "cfg_type_or_null",
    "noise": "noise_or_null",
    "vae_encode": "vae_encode",
    "similarity_threshold": "number_or_null",
    "max_skip": "int",
    "control_scales": "number_list_or_null",  # one per loaded ControlNet; null: 1.0 each
    # The IP-Adapter's weight. Its image is fixed when the server starts: a page never
    # names a file or URL for the server to read.
    "ip_adapter_scale": "number",
    "prompt_blend": "pairs_text_or_null",  # [[prompt, weight], ...] instead of prompt
    "blend": "blend",
    "seed_blend": "pairs_int_or_null",  # [[seed, weight], ...] instead of seed's noise
}
MESSAGE_TYPES = ("params", "reset", "ping", "image_prompt")


class ProtocolError(ValueError):
    """A rejected client message; `str(error)` is the one-line reason sent back."""


@dataclass(frozen=True)
class Limits:
    """Bounds on what one client message may hold.

    Attributes:
        max_frame_bytes: largest accepted frame message (encoded bytes).
        max_frame_side: largest accepted frame width or height in pixels, checked from
            the image header before decoding (a small file can decode to a huge image).
        max_text_bytes: largest accepted control message.
        max_prompt_chars: longest accepted prompt (CLIP reads 77 tokens anyway).
    """

    max_frame_bytes: int = 2_000_000
    max_frame_side: int = 2048
    max_text_bytes: int = 8192
    max_prompt_chars: int = 1000

    def __post_init__(self):
        for name in ("max_frame_bytes", "max_frame_side", "max_text_bytes", "max_prompt_chars"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")

    def as_dict(self) -> dict:
        """The limits as sent to clients in the "ready" event."""
        return {
            "max_frame_bytes": self.max_frame_bytes,
            "max_frame_side": self.max_frame_side,
            "max_text_bytes": self.max_text_bytes,
            "max_prompt_chars": self.max_prompt_chars,
        }


# --- frames -----------------------------------------------------------------------
def check_frame(data: bytes, limits: Limits) -> tuple[int, int]:
    """Validate a frame message from its header only (no pixel decoding).

    Returns:
        (width, height) of the image.
    Raises:
        ProtocolError: empty, too many bytes, not a JPEG/PNG/WebP image, or too large.
    """
    size = len(data)
    if size == 0:
        raise ProtocolError("empty frame: send a JPEG, PNG or WebP image as a binary message")
    if size > limits.max_frame_bytes:
        raise ProtocolError(
            f"frame too large: {size} bytes, the limit is {limits.max_frame_bytes}; "
            f"send a smaller or more compressed image"
        )
    from PIL import Image

    try:
        # Image.open reads only the header: format and size, no pixels.
        with Image.open(io.BytesIO(data)) as img:
            fmt, (width, height) = img.format, img.size
    except Exception:  # PIL raises many types for garbage; all mean the same here
        raise ProtocolError("frame is not a decodable image: send JPEG, PNG or WebP bytes") from None
    if fmt not in FRAME_FORMATS:
        raise ProtocolError(f"unsupported frame format {fmt}: send JPEG, PNG or WebP")
    if width < 1 or height < 1 or max(width, height) > limits.max_frame_side:
        raise ProtocolError(
            f"frame is {width}x{height}: each side must be between 1 and {limits.max_frame_side} pixels"
        )
    return width, height


def pack_output(frame_id: int, jpeg: bytes) -> bytes:
    """An output frame message: the input frame id (4 bytes, big-endian), then the JPEG."""
    return _OUTPUT_HEADER.pack(frame_id & MAX_FRAME_ID) + jpeg


def unpack_output(data: bytes) -> tuple[int, bytes]:
    """Inverse of `pack_output`: (input frame id, JPEG bytes)."""
    if len(data) < _OUTPUT_HEADER.size:
        raise ProtocolError(f"output message too short: {len(data)} bytes")
    (frame_id,) = _OUTPUT_HEADER.unpack_from(data)
    return frame_id, data[_OUTPUT_HEADER.size :]


# --- control messages ---------------------------------------------------------------
def _reject_constant(name: str):
    raise ProtocolError(f"JSON value {name} is not allowed: send finite numbers")


def parse_control(text: str, limits: Limits, methods: tuple[str, ...] | None = None) -> dict:
    """Parse and type-check one JSON control message.

    Args:
        text: the text message.
        limits: size limits.
        methods: the method names the server runs (default: `config.METHODS`, read at
            call time so methods added later are accepted).
    Returns:
        {"type": "params", "changes": {...}}, {"type": "reset"} or {"type": "ping", "t": x}.
    Raises:
        ProtocolError: one line naming the problem.
    """
    # An image prompt carries an image as a base64 data: URI, as large as a frame may be;
    # every other message is held to max_text_bytes once its type is known.
    image_limit = limits.max_text_bytes + (limits.max_frame_bytes * 4) // 3 + 64
    too_long = len(text) > limits.max_text_bytes or len(text.encode("utf-8", "replace")) > limits.max_text_bytes
    if too_long and len(text) > image_limit:
        raise ProtocolError(f"control message too long: the limit is {limits.max_text_bytes} bytes")
    try:
        message = json.loads(text, parse_constant=_reject_constant)
    except ProtocolError:
        raise
    except (ValueError, RecursionError):
        if too_long:  # only an image prompt may be this long, and this is not one
            raise ProtocolError(f"control message too long: the limit is {limits.max_text_bytes} bytes") from None
        raise ProtocolError('control message is not valid JSON: send an object like {"type": "reset"}') from None
    if too_long and not (isinstance(message, dict) and message.get("type") == "image_prompt"):
        raise ProtocolError(f"control message too long: the limit is {limits.max_text_bytes} bytes")
    if not isinstance(message, dict):
        raise ProtocolError('control message must be a JSON object like {"type": "reset"}')
    kind = message.get("type")
    if not isinstance(kind, str) or kind not in MESSAGE_TYPES:
        raise ProtocolError(f"unknown message type {kind!r}: use one of {', '.join(MESSAGE_TYPES)}")
    fields = {k: v for k, v in message.items() if k != "type"}
    if kind == "image_prompt":
        _no_fields(kind, fields, ("data",))
        return {"type": "params", "changes": {"ip_adapter_image": _image_prompt(fields.get("data"), limits)}}
    if kind == "reset":
        _no_fields(kind, fields, ())
        return {"type": "reset"}
    if kind == "ping":
        _no_fields(kind, fields, ("t",))
        t = fields.get("t")
        if t is not None and not _is_number(t):
            raise ProtocolError(f"ping field 't' must be a number, got {_type_name(t)}")
        return {"type": "ping", "t": t}
    return {"type": "params", "changes": parse_params(fields, limits, methods)}


def _image_prompt(data, limits: Limits) -> str | None:
    """An "image_prompt" message's data: a base64 JPEG/PNG/WebP data: URI, checked like a
    frame (bytes, header, pixel size), or null (no image: the IP-Adapter is off). A page never
    names a file or URL: the server reads nothing a client points it to."""
    if data is None:
        return None
    if not isinstance(data, str) or not data.startswith("data:image/") or ";base64," not in data[:64]:
        raise ProtocolError("image_prompt data must be a base64 image data: URI (data:image/jpeg;base64,...) or null")
    try:
        raw = base64.b64decode(data.partition(",")[2], validate=True)
    except ValueError:
        raise ProtocolError("image_prompt data is not valid base64") from None
    try:
        check_frame(raw, limits)
    except ProtocolError as err:
        raise ProtocolError(f"image_prompt rejected: {err}") from None
    return data


def _no_fields(kind: str, fields: dict, allowed: tuple[str, ...]) -> None:
    extra = sorted(k for k in fields if k not in allowed)
    if extra:
        allowed_text = f"; allowed: {', '.join(allowed)}" if allowed else ""
        raise ProtocolError(f"unknown field {extra[0]!r} in {kind} message{allowed_text}")


def _is_number(value) -> bool:
    # bool is an int in Python but never a number in this protocol.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _type_name(value) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", str: "a string", list: "a list", dict: "an object"}.get(
        type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__
    )


def parse_params(fields: dict, limits: Limits, methods: tuple[str, ...] | None = None) -> dict:
    """Type-check the fields of a "params" message; values are range-checked later
    against the stream's configuration (`apply_params`).

    Returns:
        the changes, with JSON lists turned into tuples.
    Raises:
        ProtocolError: unknown field, wrong type, or no field at all.
    """
    if not fields:
        raise ProtocolError(f"params message changes nothing: give at least one of {', '.join(PARAM_FIELDS)}")
    methods = tuple(methods if methods is not None else METHODS)
    changes = {}
    for name, value in fields.items():
        kind = PARAM_FIELDS.get(name)
        if kind is None:
            if name == "size":
                raise ProtocolError("size is fixed by the server (diffstream serve --size); it cannot be changed")
            raise ProtocolError(f"unknown field {name!r} in params message; allowed: {', '.join(PARAM_FIELDS)}")
        changes[name] = _check_field(name, kind, value, limits, methods)
    return changes


def _check_field(name: str, kind: str, value, limits: Limits, methods: tuple[str, ...]):
    def wrong(expected: str):
        return ProtocolError(f"{name} must be {expected}, got {_type_name(value)}")

    if kind.endswith("_or_null"):
        if value is None:
            return None
        kind = kind[: -len("_or_null")]
    if kind == "text":
        if not isinstance(value, str):
            raise wrong("a string")
        if len(value) > limits.max_prompt_chars:
            raise ProtocolError(f"{name} is {len(value)} characters long; the limit is {limits.max_prompt_chars}")
        return value
    if kind == "method":
        if not isinstance(value, str):
            raise wrong("a string")
        if value not in methods:
            raise ProtocolError(f"unknown method {value!r}: choose from {', '.join(methods)}")
        return value
    if kind == "cfg_type":
        if not isinstance(value, str):
            raise wrong("a string or null")
        if value not in CFG_TYPES:
            raise ProtocolError(f"cfg_type must be one of {', '.join(CFG_TYPES)} or null, got {value!r}")
        return value
    if kind in ("noise", "vae_encode"):
        choices = NOISE_MODES if kind == "noise" else VAE_ENCODINGS
        if not isinstance(value, str) or value not in choices:
            raise ProtocolError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
        return value
    if kind == "number":
        if not _is_number(value):
            raise wrong("a number")
        return float(value)
    if kind == "seed":
        if not _is_int(value):
            raise wrong("an integer")
        if value != RANDOM_SEED and not 0 <= value <= MAX_SEED:
            raise ProtocolError(f"seed must be -1 (a random seed) or between 0 and {MAX_SEED}, got {value}")
        return value
    if kind == "int":
        if not _is_int(value):
            raise wrong("an integer")
        return value
    if kind == "int_list":
        if not isinstance(value, list) or not value or not all(_is_int(v) for v in value):
            raise wrong("a non-empty list of integers or null")
        return tuple(value)
    if kind in ("pairs_text", "pairs_int"):
        check = (lambda v: isinstance(v, str) and len(v) <= limits.max_prompt_chars) if kind == "pairs_text" else _is_int
        if not isinstance(value, list) or not all(
                isinstance(p, list) and len(p) == 2 and check(p[0]) and _is_number(p[1]) for p in value):
            item = "[prompt, weight]" if kind == "pairs_text" else "[seed, weight]"
            raise wrong(f"a list of {item} pairs or null")
        return tuple((p[0], float(p[1])) for p in value)
    if kind == "blend":
        if value not in ("linear", "slerp"):
            raise ProtocolError(f"blend must be linear or slerp, got {value!r}")
        return value
    if kind == "number_list":
        if not isinstance(value, list) or not all(_is_number(v) for v in value):
            raise wrong("a list of numbers or null")
        return tuple(float(v) for v in value)
    raise AssertionError(f"unhandled field kind {kind}")  # PARAM_FIELDS and this function disagree


def resolve_seed(seed: int) -> int:
    """`seed`, or a random seed in [0, MAX_SEED] for `RANDOM_SEED` (-1)."""
    return secrets.randbelow(MAX_SEED + 1) if seed == RANDOM_SEED else seed


def apply_params(config: StreamConfig, changes: dict, turbo: bool = False) -> StreamConfig:
    """`config` with `changes` applied, fully validated (ranges, steps vs strength).

    Raises:
        ProtocolError: the value is out of range (the message names the field).
    """
    try:
        new = config.replace(**changes)
        new.t_indices(turbo)
    except ConfigError as err:
        raise ProtocolError(_field_names(str(err))) from None
    return new


_FLAG_TO_FIELD = {"similarity-filter": "similarity_threshold"}


def _field_names(message: str) -> str:
    """ConfigError speaks in CLI flags (--max-skip); the web protocol in field names (max_skip)."""
    return re.sub(r"--([a-z][a-z-]*)", lambda m: _FLAG_TO_FIELD.get(m.group(1), m.group(1).replace("-", "_")), message)


def public_params(config: StreamConfig) -> dict:
    """The settings a client may see and change, as JSON values."""
    return {
        "prompt": config.prompt,
        "negative_prompt": config.negative_prompt,
        "method": config.method,
        "strength": config.strength,
        "guidance": config.resolved_guidance,
        "delta": config.delta,
        "seed": config.seed,
        "steps": config.steps,
        "t_index_list": list(config.t_index_list) if config.t_index_list is not None else None,
        "cfg_type": config.cfg_type,
        "noise": config.resolved_noise,
        "vae_encode": config.vae_encode,
        "similarity_threshold": config.similarity_threshold,
        "max_skip": config.max_skip,
        "control_scales": list(config.control_scales) if config.control_scales is not None else None,
        "ip_adapter_scale": config.ip_adapter_scale,
        "image_prompt": config.ip_adapter_image is not None,  # the image itself is not echoed
        "prompt_blend": [list(p) for p in config.prompt_blend] if config.prompt_blend else None,
        "blend": config.blend,
        "seed_blend": [list(p) for p in config.seed_blend] if config.seed_blend else None,
        "size": config.size,
    }


# --- connections -----------------------------------------------------------------
def is_loopback(host: str) -> bool:
    """Whether `host` names this machine only (127.0.0.0/8, ::1, localhost)."""
    if host.strip().lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def origin_allowed(headers, allowed_origins: tuple[str, ...]) -> bool:
    """Browsers send Origin; only pages served by this server (or listed) may connect.

    WebSockets are exempt from the same-origin policy, so without this check any web page
    the user visits could open a session on the local demo. Clients that send no Origin
    (scripts, the load test) are not browsers and are allowed.
    """
    origin = headers.get("origin")
    if origin is None:
        return True
    if origin in allowed_origins:
        return True
    return urlsplit(origin).netloc.lower() == (headers.get("host") or "").lower()
