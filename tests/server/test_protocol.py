"""Validation of the live demo's messages (no model, no server)."""

import io
import json
import re

import numpy as np
import pytest

from diffstream.config import METHODS, StreamConfig
from diffstream.frames import encode_jpeg
from diffstream.server.protocol import (
    MAX_SEED,
    RANDOM_SEED,
    PARAM_FIELDS,
    Limits,
    ProtocolError,
    apply_params,
    check_frame,
    is_loopback,
    origin_allowed,
    pack_output,
    parse_control,
    public_params,
    resolve_seed,
    unpack_output,
)

LIMITS = Limits()


def png_bytes(width, height):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height)).save(buf, format="PNG")
    return buf.getvalue()


def test_check_frame_accepts_jpeg_png_webp():
    from PIL import Image

    frame = np.zeros((48, 64, 3), np.uint8)
    assert check_frame(encode_jpeg(frame), LIMITS) == (64, 48)
    assert check_frame(png_bytes(30, 20), LIMITS) == (30, 20)
    buf = io.BytesIO()
    Image.new("RGB", (16, 8)).save(buf, format="WEBP")
    assert check_frame(buf.getvalue(), LIMITS) == (16, 8)


@pytest.mark.parametrize(
    "data, fragment",
    [
        (b"", "empty frame"),
        (b"\x00" * 100, "not a decodable image"),
        (b"GIF89a" + b"\x00" * 40, "not a decodable image"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 30, "not a decodable image"),  # a JPEG start, no header
    ],
)
def test_check_frame_rejects_garbage(data, fragment):
    with pytest.raises(ProtocolError, match=fragment):
        check_frame(data, LIMITS)


def test_check_frame_rejects_unsupported_format():
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="GIF")
    with pytest.raises(ProtocolError, match="unsupported frame format GIF"):
        check_frame(buf.getvalue(), LIMITS)


def test_check_frame_limits_bytes_and_pixels_from_the_header():
    data = png_bytes(3000, 10)  # a few hundred bytes that would decode to 3000 px wide
    assert len(data) < 1000
    with pytest.raises(ProtocolError, match="3000x10: each side must be between 1 and 2048"):
        check_frame(data, LIMITS)
    with pytest.raises(ProtocolError, match="frame too large: .* the limit is 100"):
        check_frame(encode_jpeg(np.full((64, 64, 3), 128, np.uint8)), Limits(max_frame_bytes=100))


def test_output_header_round_trips():
    message = pack_output(123456, b"\xff\xd8jpeg")
    assert message[:4] == (123456).to_bytes(4, "big")
    assert unpack_output(message) == (123456, b"\xff\xd8jpeg")
    with pytest.raises(ProtocolError):
        unpack_output(b"\x00")


def test_parse_control_accepts_each_message_type():
    assert parse_control('{"type": "reset"}', LIMITS) == {"type": "reset"}
    assert parse_control('{"type": "ping", "t": 1.5}', LIMITS) == {"type": "ping", "t": 1.5}
    assert parse_control('{"type": "ping"}', LIMITS) == {"type": "ping", "t": None}
    message = parse_control(
        json.dumps(
            {
                "type": "params",
                "prompt": "a fox",
                "method": METHODS[-1],
                "strength": 1,
                "seed": 7,
                "similarity_threshold": None,
                "t_index_list": [20, 40],
                "cfg_type": None,
            }
        ),
        LIMITS,
    )
    assert message == {
        "type": "params",
        "changes": {
            "prompt": "a fox",
            "method": METHODS[-1],
            "strength": 1.0,
            "seed": 7,
            "similarity_threshold": None,
            "t_index_list": (20, 40),
            "cfg_type": None,
        },
    }


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"prompt": "x"}', "unknown message type None"),
        ('{"type": "explode"}', "unknown message type 'explode'"),
        ('{"type": 3}', "unknown message type 3"),
        ('{"type": "reset", "hard": true}', "unknown field 'hard' in reset message"),
        ('{"type": "ping", "t": "now"}', "'t' must be a number"),
        ('{"type": "params"}', "changes nothing"),
        ('{"type": "params", "colour": "red"}', "unknown field 'colour' in params message"),
        ('{"type": "params", "size": 1024}', "size is fixed by the server"),
        ('{"type": "params", "strength": "high"}', "strength must be a number, got a string"),
        ('{"type": "params", "strength": true}', "strength must be a number, got a boolean"),
        ('{"type": "params", "strength": NaN}', "NaN is not allowed"),
        ('{"type": "params", "strength": Infinity}', "Infinity is not allowed"),
        ('{"type": "params", "seed": 1.5}', "seed must be an integer, got a number"),
        ('{"type": "params", "seed": -2}', "seed must be -1 (a random seed) or between 0 and"),
        (json.dumps({"type": "params", "seed": MAX_SEED + 1}), "seed must be -1 (a random seed) or between 0 and"),
        ('{"type": "params", "prompt": 5}', "prompt must be a string, got a number"),
        ('{"type": "params", "method": "magic"}', "unknown method 'magic'"),
        ('{"type": "params", "cfg_type": "double"}', "cfg_type must be one of"),
        ('{"type": "params", "t_index_list": []}', "t_index_list must be a non-empty list"),
        ('{"type": "params", "t_index_list": [1, "2"]}', "t_index_list must be a non-empty list"),
        ('{"type": "params", "max_skip": null}', "max_skip must be an integer, got null"),
        pytest.param("[" * 4000 + "]" * 4000, "not valid JSON", id="deeply-nested"),
    ],
)
def test_parse_control_rejects_with_one_line(text, fragment):
    with pytest.raises(ProtocolError) as info:
        parse_control(text, LIMITS)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_parse_control_limits_text_and_prompt_length():
    with pytest.raises(ProtocolError, match="control message too long"):
        parse_control(json.dumps({"type": "params", "prompt": "x" * 9000}), LIMITS)
    with pytest.raises(ProtocolError, match="prompt is 1001 characters long"):
        parse_control(json.dumps({"type": "params", "prompt": "x" * 1001}), LIMITS)


def test_parse_control_reads_methods_at_call_time():
    text = json.dumps({"type": "params", "method": "newmethod"})
    with pytest.raises(ProtocolError, match="unknown method"):
        parse_control(text, LIMITS)
    assert parse_control(text, LIMITS, methods=("newmethod",))["changes"] == {"method": "newmethod"}


def test_apply_params_checks_ranges_in_field_names():
    config = StreamConfig()
    assert apply_params(config, {"strength": 0.8, "prompt": "p"}).strength == 0.8
    with pytest.raises(ProtocolError, match=r"^strength must be in \(0, 1\], got 2"):
        apply_params(config, {"strength": 2.0})
    with pytest.raises(ProtocolError, match=r"^similarity_threshold must be in \[0, 1\)"):
        apply_params(config, {"similarity_threshold": 1.5})
    with pytest.raises(ProtocolError, match="^max_skip must be >= 0"):
        apply_params(config, {"max_skip": -1})
    with pytest.raises(ProtocolError, match="too many for strength"):
        apply_params(config.replace(strength=0.1), {"steps": 10})


def test_noise_vae_and_default_guidance_fields():
    text = json.dumps({"type": "params", "noise": "per-frame", "vae_encode": "sample", "guidance": None})
    assert parse_control(text, LIMITS)["changes"] == {"noise": "per-frame", "vae_encode": "sample", "guidance": None}
    for bad in ({"noise": "pink"}, {"vae_encode": "mode"}, {"noise": 3}):
        with pytest.raises(ProtocolError, match="must be one of"):
            parse_control(json.dumps({"type": "params", **bad}), LIMITS)
    shown = public_params(StreamConfig(method="live2diff"))
    assert shown["guidance"] == 1.0 and shown["noise"] == "per-frame" and shown["vae_encode"] == "mean"


def test_public_params_is_json_and_covers_every_field():
    params = public_params(StreamConfig(prompt="p", t_index_list=(10, 20)))
    assert json.loads(json.dumps(params)) == params
    assert set(PARAM_FIELDS) <= set(params)
    assert params["t_index_list"] == [10, 20]


def test_loopback_hosts_and_allowed_origins():
    for host in ("127.0.0.1", "127.3.2.1", "localhost", "::1", "[::1]"):
        assert is_loopback(host)
    for host in ("0.0.0.0", "192.168.1.10", "::", "example.org"):
        assert not is_loopback(host)
    assert origin_allowed({"host": "127.0.0.1:7860"}, ())  # no Origin: not a browser
    assert origin_allowed({"origin": "http://127.0.0.1:7860", "host": "127.0.0.1:7860"}, ())
    assert not origin_allowed({"origin": "http://evil.example", "host": "127.0.0.1:7860"}, ())
    assert origin_allowed({"origin": "https://demo.example", "host": "127.0.0.1:7860"}, ("https://demo.example",))


def test_the_engine_needs_no_web_framework():
    """server/engine.py is transport-free: FastAPI and Starlette stay in server/app.py."""
    import ast
    from pathlib import Path

    import diffstream.server.engine as engine

    tree = ast.parse(Path(engine.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert not {name for name in imported if name.split(".")[0] in ("fastapi", "starlette", "uvicorn")}


def test_seed_minus_one_means_a_random_seed():
    """As on the command line, -1 asks for a random seed; the server picks one and says which."""
    assert RANDOM_SEED == -1
    assert parse_control('{"type": "params", "seed": -1}', LIMITS) == {"type": "params", "changes": {"seed": -1}}
    picked = {resolve_seed(-1) for _ in range(8)}
    assert all(0 <= seed <= MAX_SEED for seed in picked) and len(picked) > 1
    assert resolve_seed(0) == 0 and resolve_seed(MAX_SEED) == MAX_SEED


def test_control_scales_field():
    text = json.dumps({"type": "params", "control_scales": [0.5, 1]})
    assert parse_control(text, LIMITS)["changes"] == {"control_scales": (0.5, 1.0)}
    assert parse_control(json.dumps({"type": "params", "control_scales": None}), LIMITS)["changes"] == {
        "control_scales": None}
    for bad in ("high", [0.5, "1"], [True], {"canny": 1}):
        with pytest.raises(ProtocolError, match="control_scales must be a list of numbers or null"):
            parse_control(json.dumps({"type": "params", "control_scales": bad}), LIMITS)
    with pytest.raises(ProtocolError, match=r"scale must be a number in \[0, 5\], got -1.0"):
        apply_params(StreamConfig(), {"control_scales": (-1.0,)})
    assert public_params(StreamConfig(control_scales=(0.5,)))["control_scales"] == [0.5]


def test_blend_fields():
    text = json.dumps({"type": "params", "prompt_blend": [["a cat", 1], ["a dog", 0.5]], "blend": "slerp",
                       "seed_blend": [[3, 1], [4, 2]]})
    assert parse_control(text, LIMITS)["changes"] == {
        "prompt_blend": (("a cat", 1.0), ("a dog", 0.5)), "blend": "slerp", "seed_blend": ((3, 1.0), (4, 2.0))}
    for bad, needle in ((dict(prompt_blend=[["a cat"]]), "prompt_blend must be a list of [prompt, weight] pairs"),
                        (dict(prompt_blend=[[1, 1]]), "prompt_blend must be a list of [prompt, weight] pairs"),
                        (dict(seed_blend=[[1.5, 1]]), "seed_blend must be a list of [seed, weight] pairs"),
                        (dict(blend="cubic"), "blend must be linear or slerp")):
        with pytest.raises(ProtocolError, match=re.escape(needle)):
            parse_control(json.dumps({"type": "params", **bad}), LIMITS)
    with pytest.raises(ProtocolError, match="prompt_blend weights must be numbers >= 0"):
        apply_params(StreamConfig(), {"prompt_blend": (("a", -1.0),)})
    shown = public_params(StreamConfig(prompt_blend=(("a", 1.0),), seed_blend=((2, 1.0),)))
    assert shown["prompt_blend"] == [["a", 1.0]] and shown["seed_blend"] == [[2, 1.0]] and shown["blend"] == "linear"


def test_image_prompt_message_takes_only_image_data_uris():
    import base64

    from diffstream.frames import encode_jpeg

    uri = "data:image/jpeg;base64," + base64.b64encode(encode_jpeg(np.full((32, 32, 3), 90, np.uint8))).decode()
    message = parse_control(json.dumps({"type": "image_prompt", "data": uri}), LIMITS)
    assert message == {"type": "params", "changes": {"ip_adapter_image": uri}}
    assert parse_control('{"type": "image_prompt", "data": null}', LIMITS)["changes"] == {"ip_adapter_image": None}
    for data, needle in (("/etc/passwd", "must be a base64 image data: URI"),
                         ("https://example.com/a.jpg", "must be a base64 image data: URI"),
                         ("data:image/png;base64,@@@@", "not valid base64"),
                         ("data:image/png;base64," + base64.b64encode(b"not an image").decode(), "image_prompt rejected")):
        with pytest.raises(ProtocolError, match=re.escape(needle)):
            parse_control(json.dumps({"type": "image_prompt", "data": data}), LIMITS)
    # Larger than a text message may be, but no larger than a frame may be.
    big = "data:image/jpeg;base64," + "A" * (LIMITS.max_frame_bytes * 2)
    with pytest.raises(ProtocolError, match="control message too long"):
        parse_control(json.dumps({"type": "image_prompt", "data": big}), LIMITS)
    with pytest.raises(ProtocolError, match="control message too long"):
        parse_control(json.dumps({"type": "params", "prompt": "x" * 20000}), LIMITS)
    assert public_params(StreamConfig(ip_adapter_image=uri))["image_prompt"] is True


def test_oversized_text_that_is_not_an_image_prompt_is_too_long():
    for text in ("x" * 9000, json.dumps(["x" * 9000]), json.dumps({"type": "reset", "pad": "x" * 9000})):
        with pytest.raises(ProtocolError, match="control message too long"):
            parse_control(text, LIMITS)
