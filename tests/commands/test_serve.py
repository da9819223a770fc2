"""`diffstream serve`: options, host warning, one-line errors before anything is served."""

import pytest

from diffstream.errors import ConfigError, ModelLoadError
from diffstream.server.protocol import is_loopback


# --- serve ------------------------------------------------------------------------------
def test_loopback_detection_and_host_warning():
    from diffstream.commands.serve import host_warning

    for host in ("127.0.0.1", "127.3.2.1", "localhost", "::1", "[::1]"):
        assert is_loopback(host) and host_warning(host) is None
    for host in ("0.0.0.0", "192.168.1.10", "::", "example.org"):
        assert not is_loopback(host)
        assert "without authentication" in host_warning(host)


def test_serve_says_which_server_library_is_missing(monkeypatch):
    import importlib.util

    from diffstream.commands import serve

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in ("websockets", "wsproto") else real(name, *a)
    )
    with pytest.raises(ConfigError, match=r"needs websockets: pip install websockets \(or pip install 'diffstream\[server\]'\)"):
        serve.command(serve.build_parser().parse_args(["--model", "tiny", "--port", "0"]))


def test_serve_arguments_and_one_line_errors(capsys):
    import socket

    from diffstream.commands.serve import bind_socket, build_parser, command

    args = build_parser().parse_args(["--model", "tiny"])
    assert (args.host, args.port, args.max_clients, args.size) == ("127.0.0.1", 7860, 4, 512)
    assert (args.no_stream_batch, args.threads, args.allow_origin) == (False, None, [])
    with pytest.raises(ConfigError, match="--max-clients must be >= 1"):
        command(build_parser().parse_args(["--max-clients", "0"]))
    with pytest.raises(ConfigError, match="--port must be between"):
        command(build_parser().parse_args(["--port", "70000"]))
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}: .*choose another --port"):
            bind_socket("127.0.0.1", port)
    finally:
        taken.close()
    # A model that cannot load fails with its one line before anything is served.
    with pytest.raises(ModelLoadError):
        command(build_parser().parse_args(["--model", "/nonexistent/model", "--port", "0"]))
    assert "serving" not in capsys.readouterr().out
