"""`diffstream serve`: run the live web demo with uvicorn.

    diffstream serve --model tiny --size 256          # then open the printed URL

It also runs on its own (the load test uses that): `python -m diffstream.commands.serve --model tiny`.
"""

from __future__ import annotations

import argparse
import errno
import signal
import socket
import sys

from diffstream.commands import common
from diffstream.errors import ConfigError, DiffstreamError
from diffstream.server.protocol import is_loopback

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The server's options (the model options come from `common.add_model_options`)."""
    g = parser.add_argument_group("server")
    g.add_argument("--host", default=DEFAULT_HOST,
                   help=f"address to listen on (default: {DEFAULT_HOST}, this machine only; "
                        f"other addresses expose the demo, unauthenticated, to the network)")
    g.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"TCP port; 0 picks a free one (default: {DEFAULT_PORT})")
    g.add_argument("--max-clients", type=int, default=4,
                   help="streams served at once; further clients are told the server is busy (default: 4)")
    g.add_argument("--size", type=int, default=512,
                   help="longer side of the processing size for every client (default: 512)")
    g.add_argument("--jpeg-quality", type=int, default=80, help="quality of the output JPEGs, 1-100 (default: 80)")
    g.add_argument("--max-frame-bytes", type=int, default=2_000_000,
                   help="largest accepted input frame message in bytes (default: 2000000)")
    g.add_argument("--max-frame-side", type=int, default=2048,
                   help="largest accepted input frame width or height in pixels (default: 2048)")
    g.add_argument("--no-stream-batch", action="store_true",
                   help="denoise each frame to completion instead of batching the steps of consecutive "
                        "frames: lower latency when several clients share the model (each client's "
                        "stream batch otherwise fills at that client's share of the frame rate)")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads for inference (torch.set_num_threads); default: torch's choice. "
                        "On a small CPU-only machine, 1 leaves a core for the network and JPEG work")
    g.add_argument("--idle-timeout", type=float, default=60.0,
                   help="free a client's session after this many seconds without a message from it, telling "
                        "the client why; 0 never (default: 60)")
    g.add_argument("--webrtc", action="store_true",
                   help="also take WebRTC streams: WHIP ingest at /whip (OBS can publish to it) and WHEP "
                        "playback of each stream at /whep/<id>; ICE uses the --host address only "
                        "(needs aiortc: pip install 'diffstream[webrtc]')")
    g.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="also accept WebSocket connections from pages of this origin "
                        "(e.g. https://demo.example.org behind a reverse proxy); repeatable")
    common.add_osc_options(parser, "serve")


def host_warning(host: str) -> str | None:
    """The warning for listening on `host`, or None when it is this machine only."""
    if is_loopback(host):
        return None
    return (
        f"listening on {host}: anyone who can reach this machine can use the demo and its GPU, "
        f"without authentication; use --host 127.0.0.1 unless you mean it "
        f"(browsers also allow the camera only on https or localhost pages)"
    )


def check_server_libraries() -> None:
    """Fail early, in one line, when the server's libraries are missing.

    uvicorn serves plain HTTP without a WebSocket library but refuses every WebSocket
    upgrade, which would leave the page unable to connect and give no hint why.
    """
    import importlib.util

    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if not any(importlib.util.find_spec(name) for name in ("websockets", "wsproto")):
        missing.append("websockets")
    if missing:
        raise ConfigError(
            f"diffstream serve needs {', '.join(missing)}: pip install {' '.join(missing)} "
            f"(or pip install 'diffstream[server]')"
        )


def _check_args(args) -> None:
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be between 0 and 65535, got {args.port}")
    if args.max_clients < 1:
        raise ConfigError(f"--max-clients must be >= 1, got {args.max_clients}")
    if args.size < 64:
        raise ConfigError(f"--size must be at least 64, got {args.size}")
    if not 1 <= args.jpeg_quality <= 100:
        raise ConfigError(f"--jpeg-quality must be between 1 and 100, got {args.jpeg_quality}")
    if args.max_frame_bytes < 1 or args.max_frame_side < 1:
        raise ConfigError("--max-frame-bytes and --max-frame-side must be >= 1")
    if args.idle_timeout < 0:
        raise ConfigError(f"--idle-timeout must be >= 0 (0: never), got {args.idle_timeout}")
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {args.threads}")


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port), so the port is known (and taken) before the
    model loads.

    Raises:
        ConfigError: the address cannot be used (port taken, unknown host, no permission).
    """
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise ConfigError(f"cannot listen on {host!r}: {err.strerror}; pass an IP address such as 127.0.0.1") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        hint = "choose another --port (or 0 for a free one)" if err.errno == errno.EADDRINUSE else "check --host and --port"
        raise ConfigError(f"cannot listen on {host}:{port}: {err.strerror}; {hint}") from None
    sock.set_inheritable(True)
    return sock


def _url(host: str, port: int) -> str:
    shown = host if host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    return f"http://{shown}:{port}"


def command(args) -> int:
    """Run `diffstream serve` with parsed `args` (model options + `add_arguments`).

    Returns:
        0 once the server has shut down (Ctrl-C or SIGTERM are how a server is stopped).
    Raises:
        DiffstreamError: bad option, unusable address or model that fails to load (one line).
    """
    _check_args(args)
    check_server_libraries()
    if args.webrtc:
        from diffstream.server.webrtc import check_available

        check_available()  # before the port is bound and the model loads
    from diffstream.server.protocol import Limits

    limits = Limits(max_frame_bytes=args.max_frame_bytes, max_frame_side=args.max_frame_side)
    osc_address = common.osc_address(args)
    warning = host_warning(args.host)
    if warning:
        print(f"diffstream: warning: {warning}", file=sys.stderr)
    sock = bind_socket(args.host, args.port)
    osc = None
    try:
        if osc_address is not None:
            from diffstream.server.osc import ADDRESSES, METHOD, RESET

            # Bound before the model loads, like the TCP port; the app starts and closes it.
            osc = common.open_osc(*osc_address, addresses=[*ADDRESSES, METHOD, RESET])
        import uvicorn

        from diffstream.config import StreamConfig
        from diffstream.models.loading import load_components
        from diffstream.server.app import create_app

        config = common.model_config(args)
        # Built before the model loads, so a bad option or image prompt costs no loading.
        base_config = StreamConfig(stream_batch=not args.no_stream_batch, control_scales=common.control_scales(args),
                                   ip_adapter_image=common.image_prompt(args), ip_adapter_scale=args.ip_adapter_scale,
                                   video=common.video_config(args))
        common.quiet_libraries()
        if args.threads is not None:
            import torch

            torch.set_num_threads(args.threads)
        if check_memory(args, config, base_config):
            return 0  # --vram-estimate: printed, nothing loaded
        common.say(common.loading_message(config))
        components = load_components(config)
        if getattr(components, "is_wan", False):  # a Wan video model runs causal-video only
            base_config = base_config.replace(method="causal-video")
        app = create_app(components, size=args.size, max_clients=args.max_clients, limits=limits,
                         idle_timeout=args.idle_timeout or None,
                         jpeg_quality=args.jpeg_quality, allowed_origins=tuple(args.allow_origin),
                         base_config=base_config,
                         webrtc=args.webrtc, host=args.host, osc=osc)
        server = uvicorn.Server(
            uvicorn.Config(
                app,
                log_level="warning",
                # Frames a little over the limit get an "error" event; far larger messages
                # are refused by the WebSocket layer (close 1009) before being buffered.
                ws_max_size=max(2 * limits.max_frame_bytes, 1 << 20),
                # JPEG does not deflate; compressing it again only costs CPU.
                ws_per_message_deflate=False,
                lifespan="on",
            )
        )
        port = sock.getsockname()[1]
        print(
            f"diffstream: serving the live demo at {_url(args.host, port)} "
            f"(model {config.model}, size {args.size}, at most {args.max_clients} clients); Ctrl-C stops",
            flush=True,
        )
        if args.webrtc:
            print(f"diffstream: WebRTC: WHIP ingest at {_url(args.host, port)}/whip, "
                  f"WHEP playback at {_url(args.host, port)}/whep/<id>", flush=True)
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass  # uvicorn has shut down gracefully; the signal reached us afterwards
    finally:
        if osc is not None:
            osc.close()  # idempotent: the app's shutdown closed it unless loading failed
        sock.close()
    print("diffstream: server stopped", file=sys.stderr)
    return 0


def check_memory(args, config, stream) -> bool:
    """A Wan model's GPU memory for `--max-clients` streams at `--size` (square: a client's
    aspect is not known before it connects, and a square is the largest frame of a given
    longer side), with the chunk and cache options given (`common.check_memory`).

    Args:
        stream: the sessions' base StreamConfig (its `video` and cache rows per stream).
    Returns:
        True with `--vram-estimate` (the estimate is printed; nothing loads).
    """
    rows = stream.video_cache_rows
    more = ({f"--max-clients {args.max_clients // 2}": {"rows": rows * (args.max_clients // 2)}}
            if args.max_clients > 1 else None)
    return common.check_memory(config, args.size, args.size, stream.video.block_causal, rows=rows * args.max_clients,
                               flags=("--text-encoder-offload", "--int8", "--size"), more=more,
                               estimate_only=getattr(args, "vram_estimate", False),
                               check=not getattr(args, "no_vram_check", False))


def build_parser() -> argparse.ArgumentParser:
    """The stand-alone parser: model options plus the server's."""
    parser = common.Parser(prog="diffstream serve",
                           description="Serve the live web demo (webcam restyled in real time).")
    common.add_model_options(parser)
    common.add_memory_options(parser)
    common.add_video_options(parser)
    common.add_control_options(parser)
    add_arguments(parser)
    return parser


def main(argv=None) -> int:
    """Entry point of `python -m diffstream.commands.serve`."""
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, common.raise_interrupt)
    try:
        return command(args)
    except DiffstreamError as err:
        print(f"diffstream: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:  # Ctrl-C while the model was still loading
        print("diffstream: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
