"""Events: the cost of webhooks on writes, webhook delivery rate and latency, and 1,000 live streams.

    .venv/bin/python bench/bench_events.py [--rounds 5] [--duration 3] [--streams 1000]

1. Write throughput with a webhook configured vs without: one server, two services (`hooked` has a webhook to a
   local receiver, `plain` has none; both write their outbox). wrk -t1 -c64 runs publish and like on each, in
   paired rounds (order alternating, each run starting with no webhook backlog); the median of the per-round
   ratios hooked/plain, with min-max; `*_sustained` also counts the time the server then takes to deliver the
   backlog of the hooked run (the rate it can keep up indefinitely).
2. Delivery: events/s from the outbox to the receiver during a publish burst, and commit-to-receipt latency
   p50/p99 at a low steady rate (event `time` to the receiver's clock; same machine).
3. 1,000 concurrent SSE streams on one server process: its memory per stream (RSS growth / streams) and the
   fan-out latency of one event (publish sent -> frame read on each stream), p50/p99 over streams and events.
The server side (uvicorn, PostgreSQL, Redis) is pinned to CPU 0; wrk, the receiver and the stream readers to CPU 1.
Prints figures; asserts nothing about them.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import pathlib
import secrets
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request

BENCH = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent), str(BENCH.parent / "scripts")]

import bench  # noqa: E402
from bench import PREFIX, Runner, Server, embedded, im, log, pin_tree, psutil  # noqa: E402

# --- the receiver: a raw ASGI app (served by uvicorn in its own process) recording when each event arrived -----
RECEIVED: list[tuple[float, float]] = []  # (receipt unix time, event time)


async def receiver_app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["method"] == "POST":
        event = json.loads(body)
        moment = event["time"].replace("Z", "+00:00")
        RECEIVED.append((time.time(), _unix(moment)))
        out = b""
    else:  # GET: what arrived so far, then forget it
        out = json.dumps(RECEIVED).encode()
        if scope["path"] == "/reset":
            RECEIVED.clear()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": out})


def _unix(iso: str) -> float:
    import datetime as dt
    return dt.datetime.fromisoformat(iso).timestamp()


def received(port: int, reset: bool = False) -> list:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/{'reset' if reset else 'stats'}", timeout=30) as r:
        return json.loads(r.read())


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def write_tpl(svc: str, post: int) -> dict[str, list[dict]]:
    q = f"?svc={svc}"
    return {
        "publish": [{"method": "POST", "path": PREFIX + f"/publish{q}",
                     "headers": {"Content-Type": "application/x-www-form-urlencoded"},
                     "body": "author=bench_author&title=hello&content=" + "z" * 100}],
        "like": [{"method": "PUT", "path": PREFIX + f"/like{q}&post_id={post}", "user": True,
                  "headers": {"Content-Type": "application/json"}, "body": '{"like":true}'}],
    }


def call(port: int, method: str, path: str, secret: str, body: bytes | None = None, ctype: str = "") -> dict:
    url = f"http://127.0.0.1:{port}{path}&appKey={im.encrypt_appkey(secret)}"
    req = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": ctype} if ctype else {})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def publish(port: int, svc: str, secret: str) -> int:
    return call(port, "POST", f"{PREFIX}/publish?svc={svc}", secret, b"author=a&content=c",
                "application/x-www-form-urlencoded")["data"]["post_id"]


def drain(port: int, limit: float = 600) -> float:
    """Seconds until the `hooked` service has no webhook backlog."""
    t0 = time.monotonic()
    while readyz(port)["events"]["hooked"]["backlog"] and time.monotonic() - t0 < limit:
        time.sleep(0.1)
    return time.monotonic() - t0


def readyz(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=30) as r:
        return json.loads(r.read())["data"]


async def open_stream(port: int, svc: str, secret: str):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    path = f"{PREFIX}/events?svc={svc}&appKey={im.encrypt_appkey(secret)}"
    writer.write(f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    if b" 200 " not in head.split(b"\r\n", 1)[0]:
        raise RuntimeError(f"stream refused: {head[:200]!r}")
    return reader, writer


async def next_event(reader: asyncio.StreamReader) -> float:
    """Read until an `event:` line arrives (chunked framing and keep-alives skipped); its arrival time."""
    while True:
        line = await reader.readline()
        if not line:
            raise RuntimeError("stream closed")
        if line.startswith(b"event:"):
            return time.perf_counter()


async def streams_phase(port: int, svc: str, secret: str, n: int, server_pid: int, events: int) -> dict:
    proc = psutil.Process(server_pid)
    rss0 = proc.memory_info().rss
    conns = []
    for i in range(0, n, 100):  # open in batches of 100
        conns += await asyncio.gather(*(open_stream(port, svc, secret) for _ in range(min(100, n - i))))
    await asyncio.sleep(1)
    rss1 = proc.memory_info().rss
    lat = []
    for _ in range(events):
        t0 = time.perf_counter()
        waiting = [asyncio.ensure_future(next_event(r)) for r, _ in conns]
        await asyncio.to_thread(publish, port, svc, secret)
        arrivals = await asyncio.wait_for(asyncio.gather(*waiting), 60)
        lat += [(t - t0) * 1000 for t in arrivals]
        await asyncio.sleep(0.2)
    for _, writer in conns:
        writer.close()
    return {"streams": n, "rss_before_mb": round(rss0 / 2**20, 1), "rss_after_mb": round(rss1 / 2**20, 1),
            "kb_per_stream": round((rss1 - rss0) / n / 1024, 1), "fanout_p50_ms": round(pct(lat, 0.5), 1),
            "fanout_p99_ms": round(pct(lat, 0.99), 1), "events": events}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=int, default=3, help="seconds per wrk run")
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--latency-events", type=int, default=200)
    args = parser.parse_args()
    if not shutil.which("wrk"):
        print("wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    pin = shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
    if pin:
        os.sched_setaffinity(0, {1})
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="im-bench-events-"))
    servers: list[Server] = []
    pg = redis_server = None
    results: dict = {}
    try:
        pg, db = embedded.start_postgres(workdir, keep_data=False)
        redis_server, redis_addr = embedded.start_redis(workdir)
        if pin:
            pin_tree([pg.get_pid(), redis_server.pid], [0])
        recv = Server("receiver", "bench_events:receiver_app", BENCH, dict(os.environ), workdir,
                      "1" if pin else None, ready_path="/stats")
        servers.append(recv.start())
        secret = secrets.token_hex(8)
        whsec = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
        boot = embedded.write_config(workdir, db, redis_addr, {"plain": secret, "hooked": secret},
                                     f"server:\n  timeout: 30\nevents:\n  max_streams: {args.streams}\n")
        app = (workdir / "app.yaml").read_text().replace(
            "- name: hooked\n  secret: " + secret + "\n",
            "- name: hooked\n  secret: " + secret + "\n  webhook:\n    url: http://127.0.0.1:"
            + str(recv.port) + "/hook\n    secret: " + whsec + "\n")
        (workdir / "app.yaml").write_text(app)
        env = dict(os.environ, IM_CONF=str(boot), IM_LOG_LEVEL="warning")
        srv = Server("im", "im_backend:app", BENCH.parent, env, workdir, "0" if pin else None)
        servers.append(srv.start())
        posts = {svc: publish(srv.port, svc, secret) for svc in ("plain", "hooked")}
        ns = argparse.Namespace(threads=1, connections=64, warmup=1, duration=args.duration)
        runner = Runner(ns, workdir, pin)
        runner.own_roots = [pg.get_pid(), redis_server.pid, recv.proc.pid]

        # 1. writes with a webhook vs without, paired rounds. Each run starts with no webhook backlog; after a
        # hooked run the time to deliver what it wrote is measured too: `sustained` counts it in.
        ratios: dict[str, list[float]] = {"publish": [], "like": [], "publish_sustained": [], "like_sustained": []}
        for r in range(args.rounds):
            for kind in ("publish", "like"):
                order = ("plain", "hooked") if r % 2 == 0 else ("hooked", "plain")
                rps, drained = {}, 0.0
                for svc in order:
                    drain(srv.port)
                    res = runner.scenario(f"{kind}-{svc}", srv, secret, write_tpl(svc, posts[svc])[kind], pinned=pin)
                    rps[svc] = res["rps"]
                    if svc == "hooked":
                        drained = drain(srv.port)
                        sustained = res["requests"] / (res["wrk"]["duration_us"] / 1e6 + drained)
                ratios[kind].append(rps["hooked"] / rps["plain"])
                ratios[f"{kind}_sustained"].append(sustained / rps["plain"])
                log(f"round {r + 1} {kind}: hooked/plain = {ratios[kind][-1]:.2f}; counting the {drained:.1f} s "
                    f"to deliver the backlog: {ratios[kind + '_sustained'][-1]:.2f}")
        for kind, values in ratios.items():
            results[f"{kind}_webhook_ratio"] = {"median": round(statistics.median(values), 3),
                                                "min": round(min(values), 3), "max": round(max(values), 3)}
        deadline = time.monotonic() + 300

        # 2. delivery rate during a burst, then latency at a low rate
        received(recv.port, reset=True)
        runner.scenario("publish-burst", srv, secret, write_tpl("hooked", 0)["publish"], pinned=pin)
        while readyz(srv.port)["events"]["hooked"]["backlog"] and time.monotonic() < deadline + 300:
            time.sleep(0.5)
        got = received(recv.port, reset=True)
        span = max(t for t, _ in got) - min(t for t, _ in got)
        results["delivery_events_per_s"] = round(len(got) / span, 1) if span else None
        results["burst_events"] = len(got)
        for _ in range(args.latency_events):
            publish(srv.port, "hooked", secret)
            time.sleep(0.01)
        time.sleep(2)
        got = received(recv.port, reset=True)
        lat = [(t - e) * 1000 for t, e in got]
        results["commit_to_receipt_ms"] = {"p50": round(pct(lat, 0.5), 1), "p99": round(pct(lat, 0.99), 1),
                                           "events": len(lat)}
        log(f"delivery: {results['delivery_events_per_s']} events/s; latency {results['commit_to_receipt_ms']}")

        # 3. SSE fan-out
        server_pid = next(p.pid for p in psutil.Process(srv.proc.pid).children(recursive=True) + [
            psutil.Process(srv.proc.pid)] if "uvicorn" in " ".join(p.cmdline()))
        results["sse"] = asyncio.run(streams_phase(srv.port, "plain", secret, args.streams, server_pid, 5))
        log(f"sse: {results['sse']}")
    finally:
        bench.teardown(servers, redis_server, pg, workdir)
    print(json.dumps(results, indent=2))
    print("(figures from a shared, busy machine are noisy; compare ratios, rerun on a quiet one)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
