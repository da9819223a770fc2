"""Load test of the WebRTC transport: N WHIP publishers, each watched by one WHEP viewer.

Starts `python -m diffstream.commands.serve --webrtc` on 127.0.0.1 with the given model
(default: the tiny random model), then runs --clients aiortc publishers that each send a
moving pattern at --fps for --seconds over WHIP (with a data channel for the protocol's
messages), and one WHEP viewer per publisher that counts the restyled frames it gets.
Reports per client: frames sent, frames the server received / processed / dropped as
stale, output fps as the viewer received it, the server's latency (a frame's arrival,
decoded, to its output: waiting, the stream batch and inference; `stats.latency_ms`),
the data-channel ping round trip, and the server's resident memory before, at its
highest and after.

    python benchmarks/webrtc_load.py --clients 4 --seconds 60 --json

Prints a table, then with --json one JSON object as the last line. Every address is
loopback (the server listens on 127.0.0.1, its ICE candidates and ours are 127.0.0.1, no
STUN server); every loop is bounded by --seconds plus fixed timeouts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

# The server side (start, stop, RSS sampling, percentiles) is the WebSocket benchmark's.
from serve_load import _pct, sample_rss, start_server, stop_server  # noqa: E402  (same folder)

DRAIN_TIMEOUT = 60.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=4, help="publishers, each with one viewer (default: 4)")
    p.add_argument("--seconds", type=float, default=60.0, help="how long each publisher streams (default: 60)")
    p.add_argument("--fps", type=float, default=15.0, help="frames each publisher sends per second (default: 15)")
    p.add_argument("--frame-size", default="320x240", help="WxH of the frames sent (default: 320x240)")
    p.add_argument("--model", default="tiny", help="model of the server (default: tiny)")
    p.add_argument("--size", type=int, default=128, help="processing size of the server (default: 128)")
    p.add_argument("--threads", type=int, default=1, help="--threads of the server (default: 1)")
    p.add_argument("--no-stream-batch", action="store_true", help="start the server with --no-stream-batch")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = p.parse_args(argv)
    try:
        w, h = (int(v) for v in args.frame_size.lower().split("x"))
    except ValueError:
        p.error(f"--frame-size must look like 320x240, got {args.frame_size!r}")
    args.frame_wh = (w, h)
    if args.clients < 1 or args.seconds <= 0 or args.fps <= 0:
        p.error("--clients, --seconds and --fps must be positive")
    return args


def make_images(size: tuple[int, int], count: int = 48):
    from diffstream.testing import make_frames

    w, h = size
    return make_frames(count, height=h, width=w, seed=1)


async def run_client(index: int, base_url: str, images, args, start_at: float) -> dict:
    """One publisher and its viewer: stream for --seconds, then a ping barrier for the counters."""
    import av
    import httpx
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
    from aiortc.mediastreams import MediaStreamTrack

    period = 1.0 / args.fps

    class Camera(MediaStreamTrack):
        kind = "video"

        def __init__(self):
            super().__init__()
            self.sent = 0
            self.begin = None

        async def recv(self):
            loop = asyncio.get_running_loop()
            if self.begin is None:
                self.begin = loop.time()
            await asyncio.sleep(max(0.0, self.begin + self.sent * period - loop.time()))
            frame = av.VideoFrame.from_ndarray(images[self.sent % len(images)], format="rgb24")
            frame.pts, frame.time_base = int(self.sent * period * 90000), Fraction(1, 90000)
            self.sent += 1
            return frame

    result = {"client": index, "busy": False, "sent": 0, "outputs": 0, "errors": 0}
    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, start_at - loop.time()))
    config = RTCConfiguration(iceServers=[])
    publisher, viewer = RTCPeerConnection(config), RTCPeerConnection(config)
    camera = Camera()
    events: asyncio.Queue = asyncio.Queue()
    out_times: list[float] = []
    try:
        publisher.addTransceiver(camera, direction="sendonly")
        channel = publisher.createDataChannel("diffstream")
        rtts: list[float] = []

        def on_message(message):
            event = json.loads(message)
            if event["type"] == "pong" and event["t"] != -1:
                rtts.append(time.perf_counter() - event["t"])  # timed on arrival, not when read
            else:
                events.put_nowait(event)

        channel.on("message", on_message)
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
            await publisher.setLocalDescription(await publisher.createOffer())
            response = await http.post("/whip", content=publisher.localDescription.sdp,
                                       headers={"Content-Type": "application/sdp"})
            if response.status_code == 503:
                result["busy"] = True
                return result
            response.raise_for_status()
            token = response.headers["location"].rsplit("/", 1)[1]
            await publisher.setRemoteDescription(RTCSessionDescription(sdp=response.text, type="answer"))

            viewer.addTransceiver("video", direction="recvonly")

            async def watch(track):
                try:
                    while True:
                        await track.recv()
                        out_times.append(time.perf_counter())
                except Exception:
                    return

            viewer.on("track", lambda track: asyncio.ensure_future(watch(track)))
            await viewer.setLocalDescription(await viewer.createOffer())
            response = await http.post(f"/whep/{token}", content=viewer.localDescription.sdp,
                                       headers={"Content-Type": "application/sdp"})
            response.raise_for_status()
            await viewer.setRemoteDescription(RTCSessionDescription(sdp=response.text, type="answer"))

            while channel.readyState != "open":
                await asyncio.sleep(0.05)
            channel.send(json.dumps({"type": "params", "prompt": f"client {index}: a watercolor painting"}))
            t0 = time.perf_counter()
            server_stats: dict = {}
            deadline = loop.time() + args.seconds
            # Pings once a second while streaming: the data channel's round trip.
            while loop.time() < deadline:
                await asyncio.sleep(1.0)
                sent_at = time.perf_counter()
                channel.send(json.dumps({"type": "ping", "t": sent_at}))
            elapsed = time.perf_counter() - t0
            sent_before_stop = camera.sent
            camera.stop()
            channel.send(json.dumps({"type": "ping", "t": -1}))
            end = loop.time() + DRAIN_TIMEOUT
            while loop.time() < end:
                event = await asyncio.wait_for(events.get(), max(0.1, end - loop.time()))
                if event["type"] == "pong":
                    server_stats = event["stats"]
                    break
                if event["type"] == "error":
                    result["errors"] += 1
            await http.delete(f"/whip/{token}")
    finally:
        await publisher.close()
        await viewer.close()
    in_window = [t for t in out_times if t0 <= t <= t0 + elapsed]
    result.update(
        sent=sent_before_stop,
        outputs=len(out_times),
        fps=round(len(in_window) / elapsed, 2) if elapsed > 0 else None,
        received=server_stats.get("received"),
        processed=server_stats.get("processed"),
        dropped=server_stats.get("dropped"),
        server_outputs=server_stats.get("outputs"),
        latency_p50_ms=server_stats.get("latency_ms"),
        latency_p95_ms=server_stats.get("latency_p95_ms"),
        ping_p50_ms=_pct(rtts, 50),
        ping_p95_ms=_pct(rtts, 95),
    )
    return result


async def run_all(base_url: str, args) -> tuple[list[dict], int]:
    from diffstream.server.webrtc import _use_ice_addresses

    # Our peers gather on 127.0.0.1 only, as the server does (aioice leaves loopback out).
    restore = _use_ice_addresses(["127.0.0.1"])
    images = make_images(args.frame_wh)
    loop = asyncio.get_running_loop()
    start_at = loop.time() + 0.5
    stop, peak = asyncio.Event(), [0]
    sampler = asyncio.create_task(sample_rss(base_url, stop, peak))
    try:
        results = await asyncio.gather(
            *(run_client(i, base_url, images, args, start_at + 0.1 * i) for i in range(args.clients)),
            return_exceptions=True,
        )
    finally:
        stop.set()
        await sampler
        restore()
    out = []
    for i, r in enumerate(results):
        out.append(r if isinstance(r, dict) else {"client": i, "failed": f"{type(r).__name__}: {r}"})
    return out, peak[0]


def main(argv=None) -> int:
    import httpx

    args = parse_args(argv)
    proc = None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            proc, base_url = start_server(args, Path(tmp) / "server.log", extra=("--webrtc",))
            info = httpx.get(f"{base_url}/api/info", timeout=10).json()
            clients, rss_peak = asyncio.run(run_all(base_url, args))
            time.sleep(1.0)  # the sessions' ends reach the engine thread
            info_end = httpx.get(f"{base_url}/api/info", timeout=10).json()
        finally:
            if proc is not None:
                stop_server(proc)
    served = [c for c in clients if not c.get("busy") and "failed" not in c]
    mb = lambda b: round(b / 2**20, 1) if b else None  # noqa: E731
    summary = {
        "clients": args.clients,
        "served": len(served),
        "busy": sum(1 for c in clients if c.get("busy")),
        "failed": sum(1 for c in clients if "failed" in c),
        "seconds": args.seconds,
        "send_fps_per_client": args.fps,
        "frame_size": list(args.frame_wh),
        "model": info.get("model"),
        "processing_size": info.get("size"),
        "cpu_count": os.cpu_count(),
        "server_threads": args.threads or None,
        "stream_batch": not args.no_stream_batch,
        "total_output_fps": round(sum(c["fps"] for c in served), 2) if served else 0.0,
        "min_client_fps": min((c["fps"] for c in served), default=None),
        "max_client_fps": max((c["fps"] for c in served), default=None),
        "max_latency_p95_ms": max((c["latency_p95_ms"] for c in served if c["latency_p95_ms"]), default=None),
        "max_ping_p95_ms": max((c["ping_p95_ms"] for c in served if c["ping_p95_ms"]), default=None),
        "dropped_total": sum(c["dropped"] or 0 for c in served),
        "received_total": sum(c["received"] or 0 for c in served),
        "sent_total": sum(c["sent"] for c in served),
        "sessions_left_open": info_end["clients"],
        "server_rss_start_mb": mb(info["rss_bytes"]),
        "server_rss_peak_mb": mb(max(rss_peak, info["rss_bytes"] or 0, info_end["rss_bytes"] or 0)),
        "server_rss_end_mb": mb(info_end["rss_bytes"]),
        "per_client": clients,
    }
    print(f"{'client':>6} {'sent':>6} {'recv':>6} {'proc':>6} {'drop':>6} {'out':>6} {'fps':>6} "
          f"{'p50 ms':>8} {'p95 ms':>8} {'ping95':>8}  note")
    for c in clients:
        if "failed" in c or c.get("busy"):
            print(f"{c['client']:>6} {'':>60}  {c.get('failed', 'busy')}")
            continue
        print(f"{c['client']:>6} {c['sent']:>6} {c['received']!s:>6} {c['processed']!s:>6} {c['dropped']!s:>6} "
              f"{c['outputs']:>6} {c['fps']!s:>6} {c['latency_p50_ms']!s:>8} {c['latency_p95_ms']!s:>8} "
              f"{c['ping_p95_ms']!s:>8}")
    print(f"total {summary['total_output_fps']} fps over {summary['served']} clients "
          f"({summary['busy']} busy, {summary['failed']} failed); sessions left open {summary['sessions_left_open']}; "
          f"server RSS {summary['server_rss_start_mb']} MB at start, {summary['server_rss_peak_mb']} MB peak, "
          f"{summary['server_rss_end_mb']} MB at end")
    if args.json:
        print(json.dumps(summary))
    return 0 if not summary["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
