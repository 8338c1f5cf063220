"""What metrics cost: getinfo with metrics on vs off (`metrics: {enabled: false}`), and a microbenchmark.

    .venv/bin/python bench/bench_metrics.py [--rounds 5] [--duration 5] [--warmup 1] [--micro-only]
                                            [--baseline /tmp/im_backend_main.py]

1. Microbenchmark (no server): the per-request work of section 8 of im_backend.py (request id, the timing and
   Metrics.record) next to what prometheus-client's own Histogram.observe + Counter.inc on cached children
   would cost, in one process and in multiprocess mode (each observe then writes to an mmap); and a flush.
2. Paired wrk rounds (as bench/bench.py measures: wrk -t1 -c64, servers on CPU 0, wrk on CPU 1): two servers of
   the same build, one with metrics on, one with `metrics: {enabled: false}`; each round measures both (the
   order alternates) and the figure is the median of the per-round ratios on/off, with min-max.
   X-Request-ID is always on (both servers pay for it); the microbenchmark prints its cost on its own.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import pathlib
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import timeit

BENCH = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import bench  # noqa: E402  (puts the repository and scripts/ on sys.path)
import embedded  # noqa: E402

MICRO_N = 100_000


def micro() -> dict[str, float]:
    """µs per call of each piece, in this process (multiprocess mode if $PROMETHEUS_MULTIPROC_DIR is set)."""
    import time

    import prometheus_client as prom

    import im_backend as im

    im.METRICS.configure(im.parse_app_config("svc: [{name: r1000, secret: 0123456789abcdef}]\n"))
    headers = [(b"host", b"127.0.0.1:8181"), (b"user-agent", b"wrk"), (b"accept", b"*/*")]
    scope = {"headers": headers, "method": "GET"}
    scope_with_id = {"headers": headers + [(b"x-request-id", b"caller-given-id-0123")], "method": "GET"}
    body = b'{"code":200,"msg":"success","data":{"post":{}}}'
    path = "/api/v1/posts/getinfo"

    def ours() -> None:  # what handle_http adds per request with metrics on
        started, rid = time.perf_counter(), im.request_id(scope)
        token = im.REQUEST_ID.set(rid)
        _ = im.JSON_HEADERS + [(b"x-request-id", rid)]
        if im.METRICS.enabled:
            im.METRICS.record("GET", path, 200, body, "r1000", time.perf_counter() - started)
        im.REQUEST_ID.reset(token)

    def request_id_only() -> None:  # what stays with metrics off
        rid = im.request_id(scope)
        token = im.REQUEST_ID.set(rid)
        _ = im.JSON_HEADERS + [(b"x-request-id", rid)]
        im.REQUEST_ID.reset(token)

    registry = prom.CollectorRegistry()
    hist = prom.Histogram("ref_duration_seconds", "", ("method", "route", "status"), registry=registry,
                          buckets=im.DURATION_BUCKETS).labels("GET", path, "200")
    count = prom.Counter("ref_requests_total", "", ("svc", "route", "code"), registry=registry).labels(
        "r1000", path, "200")

    def client_library() -> None:  # the same through prometheus-client per request (children cached)
        hist.observe(0.00002)
        count.inc()

    def timed(fn) -> float:
        return min(timeit.repeat(fn, number=MICRO_N, repeat=7, timer=time.process_time)) / MICRO_N * 1e6

    out = {
        "ours_per_request_us": timed(ours),
        "request_id_only_us": timed(request_id_only),
        "record_only_us": timed(lambda: im.METRICS.record("GET", path, 200, body, "r1000", 0.00002)),
        "caller_request_id_us": timed(lambda: im.request_id(scope_with_id)),
        "prometheus_client_observe_inc_us": timed(client_library),
    }
    for i in range(20):  # a flush of 20 label sets (about what one worker sees in a second)
        im.METRICS.record("GET", f"/r{i}", 200, body, "r1000", 0.001)
    started = time.perf_counter()
    im.METRICS.flush(None)
    out["flush_20_series_us"] = (time.perf_counter() - started) * 1e6
    return out


def micro_report() -> dict[str, dict[str, float]]:
    results = {"one process": micro()}
    with tempfile.TemporaryDirectory(prefix="im-bench-multiproc-") as directory:
        child = subprocess.run([sys.executable, __file__, "--micro-child"], capture_output=True, text=True,
                               env=dict(os.environ, PROMETHEUS_MULTIPROC_DIR=directory), timeout=600, check=True)
    results["multiprocess"] = eval(child.stdout.strip().splitlines()[-1])  # a dict repr from micro-child
    for mode, figures in results.items():
        bench.log(f"micro ({mode}): " + ", ".join(f"{k} {v:.3f}" for k, v in figures.items()))
    return results


async def in_process(boot: pathlib.Path, svc: str, secret: str, post_id: int, rounds: int,
                     block: int = 5_000) -> list[tuple[float, float]]:
    """CPU µs per getinfo through App.handle_http (no HTTP server, no sockets), metrics on and off in turn."""
    import time

    import im_backend as im

    app = im.App(boot)
    query = f"svc={svc}&post_id={post_id}&appKey=".encode()
    headers = [(b"host", b"127.0.0.1"), (b"user-agent", b"wrk")]

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            assert message["status"] == 200, message

    async def one_block() -> float:
        scope = {"type": "http", "method": "GET", "path": "/api/v1/posts/getinfo", "headers": headers,
                 "query_string": query + im.encrypt_appkey(secret).encode()}
        started = time.process_time()  # CPU time of this process: waiting for a busy machine's CPU is not counted
        for _ in range(block):
            await app.handle_http(dict(scope), receive, send)
        return (time.process_time() - started) / block * 1e6

    pairs = []
    async with app.lifespan():
        await one_block()  # warm-up: near cache filled
        for round_ in range(rounds * 8):  # short blocks, often alternated: less drift between the two
            us = {}
            for enabled in ((True, False) if round_ % 2 == 0 else (False, True)):
                im.METRICS.enabled = enabled
                us[enabled] = await one_block()
            pairs.append((us[True], us[False]))
    return pairs


def paired(args: argparse.Namespace) -> list[float]:
    pin = shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="im-bench-metrics-"))
    servers: list[bench.Server] = []
    pg = redis_server = None
    try:
        pg, db = embedded.start_postgres(workdir, keep_data=False)
        redis_server, redis_addr = embedded.start_redis(workdir)
        svc, secret = "r1000", secrets.token_hex(8)
        level = asyncio.run(bench.load_level(db, svc, 1000))
        if pin:
            bench.pin_tree([pg.get_pid(), redis_server.pid], [0])
        envs = {}
        for name, extra in (("on", ""), ("off", "metrics:\n  enabled: false\n")):
            directory = workdir / name
            directory.mkdir()
            boot = embedded.write_config(directory, db, redis_addr, {svc: secret}, "server:\n  timeout: 30\n" + extra)
            envs[name] = dict(os.environ, IM_CONF=str(boot), IM_LOG_LEVEL="warning")
        pairs = asyncio.run(in_process(workdir / "on" / "boot.yaml", svc, secret, level["hot_post"], args.rounds))
        extra = statistics.median(on - off for on, off in pairs)
        bench.log("in-process getinfo through App.handle_http, µs per request (on, off): "
                  + ", ".join(f"({on:.2f}, {off:.2f})" for on, off in pairs)
                  + f"; median extra cost of metrics {extra:.2f} µs")
        if args.in_process_only:
            return []
        cpus = "0" if pin else None
        on = bench.Server("metrics-on", "im_backend:app", bench.ROOT, envs["on"], workdir, cpus, ready_path="/readyz")
        off = bench.Server("metrics-off", "im_backend:app", bench.ROOT, envs["off"], workdir, cpus,
                           ready_path="/readyz")
        base = None
        if args.baseline:  # another build (e.g. before metrics and request ids), metrics keys ignored there
            base_dir = workdir / "baseline"
            base_dir.mkdir()
            shutil.copy(args.baseline, base_dir / "im_backend.py")
            base = bench.Server("baseline", "im_backend:app", base_dir, envs["off"], workdir, cpus,
                                ready_path="/readyz")
        for server in (on, off, base):
            if server is not None:
                servers.append(server.start())
        runner = bench.Runner(argparse.Namespace(threads=1, connections=64, warmup=args.warmup,
                                                 duration=args.duration), workdir, pin)
        runner.own_roots = [pg.get_pid(), redis_server.pid]
        tpl = bench.templates(svc, level["hot_post"])["getinfo"]
        ratios: list[float] = []
        base_ratios: list[tuple[float, float]] = []
        for round_ in range(args.rounds):
            order = [on, off] if round_ % 2 == 0 else [off, on]
            if base is not None:
                order.insert(round_ % 3, base)
            rps = {}
            for server in order:
                rps[server] = runner.scenario(f"getinfo-{server.name}", server, secret, tpl, pinned=pin,
                                              rows=1000)["rps"]
            ratios.append(rps[on] / rps[off])
            if base is not None:
                base_ratios.append((rps[on] / rps[base], rps[off] / rps[base]))
            bench.log(f"round {round_ + 1}: on/off = {ratios[-1]:.3f}" + (
                f", on/baseline = {base_ratios[-1][0]:.3f}, off/baseline = {base_ratios[-1][1]:.3f}" if base else ""))
        if base_ratios:
            for i, name in enumerate(("on", "off")):
                values = [pair[i] for pair in base_ratios]
                bench.log(f"getinfo, metrics {name} / baseline build: median {statistics.median(values):.3f} "
                          f"(min {min(values):.3f}, max {max(values):.3f})")
        return ratios
    finally:
        bench.teardown(servers, redis_server, pg, workdir)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=int, default=5, help="seconds per measured run")
    parser.add_argument("--warmup", type=int, default=1, help="seconds of warm-up before each run")
    parser.add_argument("--micro-only", action="store_true")
    parser.add_argument("--in-process-only", action="store_true", help="no wrk rounds")
    parser.add_argument("--baseline", type=pathlib.Path, help="an im_backend.py of another build to measure in the "
                        "same rounds (e.g. `git show main:im_backend.py > /tmp/base.py`)")
    parser.add_argument("--micro-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.micro_child:
        print(repr(micro()))
        return 0
    micro_report()
    if args.micro_only:
        return 0
    if not shutil.which("wrk") and not args.in_process_only:
        print("wrk is not installed (bash bench/run.sh installs it)", file=sys.stderr)
        return 2
    ratios = paired(args)
    if not ratios:
        return 0
    bench.log(f"getinfo, metrics on / off: median {statistics.median(ratios):.3f} "
              f"(min {min(ratios):.3f}, max {max(ratios):.3f}) over {len(ratios)} rounds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
