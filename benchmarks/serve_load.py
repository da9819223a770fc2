"""Load test of the live demo server: N WebSocket clients streaming frames at once.

Starts `python -m diffstream.commands.serve` on 127.0.0.1 with the given model (default:
the tiny random model) unless --url names a running local server, connects --clients
clients that each send a moving pattern as JPEG frames at --fps for --seconds, and
reports per client: output fps, latency (client-measured, from sending a frame to
receiving its restyled output: network, waiting, the stream batch and inference),
frames the server dropped as stale, and whether the client was refused as busy; plus
the server's resident memory before the clients, at its highest and after them.

    python benchmarks/serve_load.py --clients 8 --seconds 60 --json

Prints a table, then with --json one JSON object as the last line. Traffic goes only to
a loopback address; every loop is bounded by --seconds plus fixed timeouts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

SERVER_START_TIMEOUT = 300.0
DRAIN_TIMEOUT = 60.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (default: 8)")
    p.add_argument("--seconds", type=float, default=60.0, help="how long each client streams (default: 60)")
    p.add_argument("--fps", type=float, default=15.0, help="frames each client sends per second (default: 15)")
    p.add_argument("--frame-size", default="320x240", help="WxH of the frames sent (default: 320x240)")
    p.add_argument("--url", default=None,
                   help="a running server on this machine, e.g. http://127.0.0.1:7860 (default: start one)")
    p.add_argument("--model", default="tiny", help="model of the started server (default: tiny)")
    p.add_argument("--size", type=int, default=128, help="processing size of the started server (default: 128)")
    p.add_argument("--max-clients", type=int, default=None,
                   help="--max-clients of the started server (default: --clients, so all are served)")
    p.add_argument("--threads", type=int, default=1,
                   help="--threads (torch CPU threads) of the started server; 0 leaves torch's default. "
                        "Default 1: on a 2-core machine the other core runs the event loop and these clients")
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


def check_local(url: str) -> str:
    """The URL if it points at this machine; this tool never loads anything else."""
    from diffstream.server.protocol import is_loopback

    host = urlsplit(url).hostname or ""
    if not is_loopback(host):
        raise SystemExit(f"serve_load: refusing to load {url!r}: only loopback servers (127.0.0.1, localhost) are tested")
    return url.rstrip("/")


def start_server(args, log_path: Path, extra: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str]:
    """Launch the server on a free loopback port, with `extra` options (webrtc_load.py
    adds --webrtc); returns (process, base URL)."""
    cmd = [
        sys.executable, "-m", "diffstream.commands.serve", *extra, "--model", args.model, "--host", "127.0.0.1",
        "--port", "0", "--size", str(args.size),
        "--max-clients", str(getattr(args, "max_clients", None) or args.clients),
    ]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.no_stream_batch:
        cmd.append("--no-stream-batch")
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if "serving the live demo at " in line:
            url = line.split("serving the live demo at ", 1)[1].split()[0]
            return proc, url
    stop_server(proc)
    raise SystemExit(f"{Path(sys.argv[0]).stem}: the server did not start; its log:\n{log_path.read_text()}")


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if it does not stop in 30 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def server_info(base_url: str) -> dict:
    import httpx

    return httpx.get(f"{base_url}/api/info", timeout=10).json()


def make_payloads(size: tuple[int, int], count: int = 48) -> list[bytes]:
    from diffstream.frames import encode_jpeg
    from diffstream.testing import make_frames

    w, h = size
    return [encode_jpeg(f, 80) for f in make_frames(count, height=h, width=w, seed=1)]


def _pct(values, q):
    from diffstream.metrics.timing import percentile

    v = percentile(values, q)
    return round(v * 1000, 1) if v is not None else None


async def run_client(index: int, ws_url: str, payloads: list[bytes], args, start_at: float) -> dict:
    """One client: stream for --seconds, then a ping barrier to collect the server's counters."""
    import websockets

    from diffstream.server.protocol import unpack_output

    result = {"client": index, "busy": False, "sent": 0, "outputs": 0, "errors": 0}
    latencies: list[float] = []
    out_times: list[float] = []
    sent_at: dict[int, float] = {}
    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, start_at - loop.time()))
    async with websockets.connect(ws_url, max_size=None, compression=None, open_timeout=30) as ws:
        first = json.loads(await asyncio.wait_for(ws.recv(), 30))
        if first["type"] == "busy":
            result["busy"] = True
            return result
        await ws.send(json.dumps({"type": "params", "prompt": f"client {index}: a watercolor painting"}))
        period = 1.0 / args.fps
        # Stagger the clients within one frame period, as independent cameras would be.
        begin = loop.time() + period * index / args.clients
        end = begin + args.seconds
        server_stats: dict = {}

        async def receive():
            async for message in ws:
                now = time.perf_counter()
                if isinstance(message, bytes):
                    frame_id, _ = unpack_output(message)
                    sent = sent_at.pop(frame_id, None)
                    if sent is not None:
                        latencies.append(now - sent)
                    out_times.append(now)
                    continue
                event = json.loads(message)
                if event["type"] == "pong":
                    server_stats.update(event["stats"])
                    return
                if event["type"] == "error":
                    result["errors"] += 1

        receiver = asyncio.create_task(receive())
        seq = 0
        t0 = time.perf_counter()
        while loop.time() < end and not receiver.done():
            await ws.send(payloads[seq % len(payloads)])
            sent_at[seq] = time.perf_counter()
            seq += 1
            await asyncio.sleep(max(0.0, begin + seq * period - loop.time()))
        elapsed = time.perf_counter() - t0
        await ws.send(json.dumps({"type": "ping", "t": 0}))
        await asyncio.wait_for(receiver, DRAIN_TIMEOUT)
    result.update(
        sent=seq,
        outputs=len(out_times),
        fps=round(len(out_times) / elapsed, 2) if elapsed > 0 else None,
        latency_p50_ms=_pct(latencies, 50),
        latency_p95_ms=_pct(latencies, 95),
        dropped=server_stats.get("dropped"),
        processed=server_stats.get("processed"),
        skipped=server_stats.get("skipped"),
        rejected=server_stats.get("rejected"),
    )
    return result


async def sample_rss(base_url: str, stop: asyncio.Event, peak: list[int]) -> None:
    """Track the server's highest RSS once a second while the clients run."""
    import httpx

    async with httpx.AsyncClient(timeout=10) as http:
        while not stop.is_set():
            try:
                rss = (await http.get(f"{base_url}/api/info")).json().get("rss_bytes")
                if rss:
                    peak[0] = max(peak[0], rss)
            except httpx.HTTPError:
                pass
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except asyncio.TimeoutError:
                pass


async def run_all(base_url: str, args) -> tuple[list[dict], int]:
    ws_url = "ws" + base_url[len("http"):] + "/ws"
    payloads = make_payloads(args.frame_wh)
    loop = asyncio.get_running_loop()
    start_at = loop.time() + 0.5
    stop, peak = asyncio.Event(), [0]
    sampler = asyncio.create_task(sample_rss(base_url, stop, peak))
    results = await asyncio.gather(
        *(run_client(i, ws_url, payloads, args, start_at + 0.05 * i) for i in range(args.clients)),
        return_exceptions=True,
    )
    stop.set()
    await sampler
    out = []
    for i, r in enumerate(results):
        out.append(r if isinstance(r, dict) else {"client": i, "failed": f"{type(r).__name__}: {r}"})
    return out, peak[0]


def main(argv=None) -> int:
    args = parse_args(argv)
    proc = None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            if args.url:
                base_url = check_local(args.url)
            else:
                proc, base_url = start_server(args, Path(tmp) / "server.log")
                base_url = check_local(base_url)
            info = server_info(base_url)
            rss_start = info["rss_bytes"]
            clients, rss_peak = asyncio.run(run_all(base_url, args))
            info_end = server_info(base_url)
            rss_end = info_end["rss_bytes"]
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
        "server_threads": (args.threads or None) if not args.url else None,
        "stream_batch": None if args.url else not args.no_stream_batch,
        "total_output_fps": round(sum(c["fps"] for c in served), 2) if served else 0.0,
        "min_client_fps": min((c["fps"] for c in served), default=None),
        "max_client_fps": max((c["fps"] for c in served), default=None),
        "max_latency_p95_ms": max((c["latency_p95_ms"] for c in served if c["latency_p95_ms"]), default=None),
        "dropped_total": sum(c["dropped"] or 0 for c in served),
        "sent_total": sum(c["sent"] for c in served),
        "server_rss_start_mb": mb(rss_start),
        "server_rss_peak_mb": mb(max(rss_peak, rss_start or 0, rss_end or 0)),
        "server_rss_end_mb": mb(rss_end),
        "per_client": clients,
    }
    print(f"{'client':>6} {'sent':>6} {'out':>6} {'fps':>6} {'p50 ms':>8} {'p95 ms':>8} {'dropped':>8}  note")
    for c in clients:
        if "failed" in c or c.get("busy"):
            print(f"{c['client']:>6} {'':>6} {'':>6} {'':>6} {'':>8} {'':>8} {'':>8}  {c.get('failed', 'busy')}")
            continue
        print(f"{c['client']:>6} {c['sent']:>6} {c['outputs']:>6} {c['fps']:>6} {c['latency_p50_ms']!s:>8} "
              f"{c['latency_p95_ms']!s:>8} {c['dropped']!s:>8}")
    print(f"total {summary['total_output_fps']} fps over {summary['served']} clients "
          f"({summary['busy']} busy, {summary['failed']} failed); server RSS "
          f"{summary['server_rss_start_mb']} MB at start, {summary['server_rss_peak_mb']} MB peak, "
          f"{summary['server_rss_end_mb']} MB at end")
    if args.json:
        print(json.dumps(summary))
    return 0 if not summary["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
