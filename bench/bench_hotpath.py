"""Where a cached getinfo spends its time: microseconds per request by stage, in-process and reproducible.

    .venv/bin/python bench/bench_hotpath.py [--requests 20000] [--rounds 5] [--app-dir DIR] [--vs-app-dir DIR]

No sockets and no wrk: uvicorn's own HTTP protocol (httptools, the one `uvicorn im_backend:app` runs) is fed
raw request bytes through a fake transport on uvloop, and each request task is awaited. That costs what the
server side costs per request minus the kernel (syscalls, loopback), so it is steadier on a busy machine than
wrk figures (and it counts this process's CPU time, not wall time). It measures, in paired rounds (each
configuration once per round, order reversed every other round; the median of the rounds):

  - `ceiling`: bench/ceiling.py through uvicorn's protocol — parse, scope, task, two sends; the floor.
  - `getinfo`: IM-Backend's cached getinfo (near-cache hit) through the same protocol.
  - the stages of IM-Backend's work, each timed alone in a loop with the same inputs: the ASGI receive() and a
    response without content-length (both as variants of the ceiling app), routing, query parsing, the appKey
    check, parameter extraction, the near cache read in Posts.get_post, the envelope, the request deadline.
    What getinfo costs beyond the ceiling and the listed stages is "glue" (coroutine calls, try blocks...).

--app-dir measures the im_backend.py of another directory; --vs-app-dir adds a second version's getinfo to the
same rounds and prints the per-round difference (the A/B of a change).
An embedded PostgreSQL and Redis are started in a temporary directory (the app needs them to start; the
measured requests are served from the near cache) and stopped at the end.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.util
import pathlib
import shutil
import statistics
import sys
import tempfile
import time

import uvloop
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

import bench  # noqa: E402  (puts the repository root and scripts/ on sys.path)
import ceiling  # noqa: E402
import embedded  # noqa: E402


# CPU time of this process, not wall time: time the machine gives to other processes is not counted, so the
# figures hold on a busy machine (PostgreSQL and Redis are not involved: every request is a near-cache hit).
CLOCK = time.process_time


class Transport(asyncio.Transport):
    """Collects what uvicorn writes; pretends to be a TCP connection on 127.0.0.1."""

    def __init__(self) -> None:
        super().__init__()
        self.written = 0
        self.last = b""

    def get_extra_info(self, name: str, default=None):
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(name, default)

    def write(self, data: bytes) -> None:
        self.written += len(data)
        self.last = data

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def ceiling_with_receive(scope, receive, send):
    """The ceiling plus one `await receive()` (what reading a GET's empty body costs)."""
    await receive()
    await send(ceiling.START)
    await send(ceiling.RESPONSE)


CHUNKED_START = {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]}


async def ceiling_chunked(scope, receive, send):
    """The ceiling without content-length: uvicorn then frames the body with chunked transfer encoding."""
    await send(CHUNKED_START)
    await send(ceiling.RESPONSE)


def protocol_for(app) -> tuple[HttpToolsProtocol, ServerState, Transport]:
    config = Config(app=app, lifespan="off", access_log=False, log_level="warning", http="httptools")
    config.load()
    state = ServerState()
    state.default_headers = [(b"date", b"Wed, 25 Nov 2026 12:00:00 GMT")] + config.encoded_headers
    proto = HttpToolsProtocol(config=config, server_state=state, app_state={}, _loop=asyncio.get_running_loop())
    transport = Transport()
    proto.connection_made(transport)
    return proto, state, transport


async def per_request_us(app, request: bytes, n: int) -> tuple[float, bytes]:
    """µs per request of `app` behind uvicorn's protocol, one keep-alive connection, requests one after another."""
    proto, state, transport = protocol_for(app)
    for _ in range(200):  # warm-up
        proto.data_received(request)
        for task in list(state.tasks):
            await task
    t0 = CLOCK()
    for _ in range(n):
        proto.data_received(request)
        for task in list(state.tasks):
            await task
    elapsed = CLOCK() - t0
    proto.connection_lost(None)
    return elapsed / n * 1e6, transport.last


async def whole_answer(app, request: bytes) -> bytes:
    """Everything uvicorn writes for one request (status line, headers, body)."""
    proto, state, transport = protocol_for(app)
    out: list[bytes] = []
    transport.write = out.append
    proto.data_received(request)
    for task in list(state.tasks):
        await task
    proto.connection_lost(None)
    return b"".join(out)


async def awaits_receive_without_body(im) -> bool:
    """Does this version's read_body await receive() for a body-less HTTP/1.1 GET?"""
    calls = []

    async def receive():
        calls.append(1)
        return {"type": "http.request", "body": b"", "more_body": False}
    await im.read_body({"http_version": "1.1", "headers": [(b"host", b"x")]}, receive, 1 << 20)
    return bool(calls)


async def loop_us(fn, n: int) -> float:
    """µs per call of a coroutine function (awaited) or a plain function."""
    is_coro = asyncio.iscoroutinefunction(fn)
    for _ in range(100):
        if is_coro:
            await fn()
        else:
            fn()
    t0 = CLOCK()
    if is_coro:
        for _ in range(n):
            await fn()
    else:
        for _ in range(n):
            fn()
    return (CLOCK() - t0) / n * 1e6


async def measure(im, app, svc: str, secret: str, post_id: int, n: int, rounds: int, cprofile: bool = False,
                  vs_app=None) -> dict:
    await app.startup()
    if vs_app is not None:
        await vs_app.startup()
    try:
        service = app.service
        path = f"{im.PREFIX}/getinfo"
        route = im.ROUTE_TABLE[path]["GET"]
        cur: dict = {}

        def refresh() -> None:
            """A fresh appKey (valid for ±10 s) before each measurement; the first use decrypts, the rest hit."""
            qs = f"svc={svc}&post_id={post_id}&appKey={im.encrypt_appkey(secret)}"
            cur["request"] = f"GET {path}?{qs} HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n\r\n".encode()
            cur["scope"] = {"type": "http", "method": "GET", "path": path, "root_path": "",
                            "query_string": qs.encode(), "headers": [(b"host", b"127.0.0.1:8000")],
                            "http_version": "1.1"}
            cur["req"] = im.Request(cur["scope"], b"")
            cur["key"] = cur["req"].arg("appKey")
            if hasattr(im, "PARSED_QUERIES"):  # what the first request with this query string leaves kept
                im.PARSED_QUERIES.keep(route, cur["scope"]["query_string"], cur["req"].query, svc,
                                       im.extract(cur["req"], route.params), None)

        refresh()
        message = {"type": "http.request", "body": b"", "more_body": False}

        async def receive():
            return message

        services = service.config.services
        posts = getattr(service, "posts", service)  # the part that holds get_post (the Service itself before)
        data = await posts.get_post(svc, post_id)

        def routing():
            p, root = cur["scope"]["path"], cur["scope"].get("root_path", "")
            if root and p.startswith(root):
                p = p[len(root):]
            im.ROUTE_TABLE.get(p).get("GET")

        def deadline():
            t = asyncio.current_task()
            app.deadlines.start(t, service.config.server.timeout)
            app.deadlines.finish(t)

        kept = getattr(im, "PARSED_QUERIES", None)  # in newer versions: the parse of a repeated query string is kept

        def kept_parse():
            parsed = kept.get(route, cur["scope"]["query_string"])
            return im.Request(cur["scope"], b"", parsed[0]), parsed

        stages = {
            "receive(): await the empty GET body (uvicorn)": None,  # filled from the ceiling variant
            "response without content-length (chunked)": None,
            # bodiless() (a plain function) in newer versions; read_body() (a coroutine) before
            "body: header scan (bodiless / read_body)":
                (lambda: im.bodiless(cur["scope"], service.config.server.body_limit)) if hasattr(im, "bodiless")
                else (lambda: im.read_body(cur["scope"], receive, service.config.server.body_limit)),
            "routing (path, route table, method)": routing,
            "query parsing (Request + parse_query)": lambda: im.Request(cur["scope"], b""),
            "kept parse (ParsedQueries.get + Request)": kept_parse if kept is not None else None,
            # App.auth.identify (plain) in newer versions, App.auth.check (a coroutine) since signed requests,
            # App.appkeys.check before
            "appKey check (decryption cached)": (lambda: app.auth.identify(cur["req"], service, svc))
            if hasattr(app.auth if hasattr(app, "auth") else None, "identify")
            else (lambda: app.auth.check(cur["req"], service, route)) if hasattr(app, "auth")
            else (lambda: app.appkeys.check(services, svc, cur["key"])),
            "parameters (extract)": lambda: im.extract(cur["req"], route.params),
            "near cache (Posts.get_post, hit)": lambda: posts.get_post(svc, post_id),
            "envelope (prefix + data + })": lambda: im.SUCCESS_PREFIX + data + b"}",
            "deadline (current_task, start, finish)": deadline,
        }
        wrapped = {}
        for name, fn in stages.items():
            if fn is None:
                continue
            probe = fn()  # a plain function, or one that returns a coroutine (to be awaited per call)?
            if asyncio.iscoroutine(probe):
                probe.close()

                async def call(fn=fn):
                    return await fn()
                wrapped[name] = call
            else:
                wrapped[name] = fn
        whole = {"ceiling": ceiling.app, "ceiling+receive": ceiling_with_receive, "ceiling-chunked": ceiling_chunked,
                 "getinfo": app}
        if vs_app is not None:
            whole["getinfo~vs"] = vs_app
        refresh()
        not_on_path = {}  # stages this version does not run on a repeated cached getinfo -> why
        if b"transfer-encoding: chunked" not in await whole_answer(app, cur["request"]):
            not_on_path["response without content-length (chunked)"] = "not on this version's path"
        if not await awaits_receive_without_body(im):
            not_on_path["receive(): await the empty GET body (uvicorn)"] = "not on this version's path"
        if kept is not None:  # done once per query string, not per request
            for name in ("query parsing (Request + parse_query)", "parameters (extract)"):
                not_on_path[name] = "only for the first request with a query string"
        samples: dict[str, list[float]] = {k: [] for k in list(whole) + list(wrapped)}
        for rnd in range(rounds):
            order = list(whole.items()) if rnd % 2 == 0 else list(whole.items())[::-1]
            for name, a in order:
                refresh()
                us, last = await per_request_us(a, cur["request"], n)
                assert b'"code":200' in last, last[:300]  # IM-Backend answered the post (not an error)
                samples[name].append(us)
            for name, fn in wrapped.items():
                refresh()
                samples[name].append(await loop_us(fn, n))
        if cprofile:
            import cProfile
            import pstats
            prof = cProfile.Profile()
            prof.enable()
            refresh()
            await per_request_us(app, cur["request"], n)
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        med = {k: statistics.median(v) for k, v in samples.items()}
        med["receive(): await the empty GET body (uvicorn)"] = med["ceiling+receive"] - med["ceiling"]
        med["response without content-length (chunked)"] = med["ceiling-chunked"] - med["ceiling"]
        ratio = [c / g for c, g in zip(samples["ceiling"], samples["getinfo"])]
        out = {"samples": samples, "median": med, "stages": list(stages), "not_on_path": not_on_path,
               "getinfo_over_ceiling_time": statistics.median(ratio)}
        if vs_app is not None:
            diffs = [a - b for a, b in zip(samples["getinfo"], samples["getinfo~vs"])]
            out["vs_diff"] = (statistics.median(diffs), min(diffs), max(diffs))
            out["vs_ratio"] = statistics.median(c / g for c, g in zip(samples["ceiling"], samples["getinfo~vs"]))
        return out
    finally:
        await app.shutdown()
        if vs_app is not None:
            await vs_app.shutdown()


def load_module(name: str, app_dir: pathlib.Path):
    spec = importlib.util.spec_from_file_location(name, app_dir / "im_backend.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20000, help="requests (or calls) per measurement")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--app-dir", type=pathlib.Path, default=bench.ROOT)
    parser.add_argument("--vs-app-dir", type=pathlib.Path, default=None,
                        help="also measure getinfo of the im_backend.py in this directory in the same rounds")
    parser.add_argument("--cprofile", action="store_true", help="also print cProfile's top functions of getinfo")
    args = parser.parse_args()
    im = load_module("im_backend_under_test", args.app_dir)
    im_vs = load_module("im_backend_vs", args.vs_app_dir) if args.vs_app_dir else None
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="im-hotpath-"))
    pg = redis = None
    try:
        pg, db = embedded.start_postgres(workdir, keep_data=False)
        redis, redis_addr = embedded.start_redis(workdir)
        svc, secret = "r1000", "0123456789abcdef"
        # a long near-cache TTL: every measured request is a near-cache hit, none goes to Redis
        boot = embedded.write_config(workdir, db, redis_addr, {svc: secret}, "")
        app_yaml = workdir / "app.yaml"
        text = app_yaml.read_text().replace("cache:\n", "cache:\n  near_ttl: 3600\n", 1)
        app_yaml.write_text(text)
        level = asyncio.run(bench.load_level(db, svc, 1000))
        app = im.App(boot)
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            res = runner.run(measure(im, app, svc, secret, level["hot_post"], args.requests, args.rounds,
                                     args.cprofile, im_vs.App(boot) if im_vs else None))
    finally:
        if redis is not None:
            bench.stop_redis(redis)
        if pg is not None:
            pg.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
    med = res["median"]
    extra = med["getinfo"] - med["ceiling"]
    print(f"\nin-process cost per request, median of {args.rounds} rounds of {args.requests:,} "
          f"({args.app_dir / 'im_backend.py'})")
    print(f"  {'ceiling (uvicorn protocol + task + 2 sends)':<52} {med['ceiling']:7.2f} µs")
    print(f"  {'getinfo, cached (near-cache hit)':<52} {med['getinfo']:7.2f} µs")
    print(f"  {'getinfo - ceiling':<52} {extra:7.2f} µs   ceiling/getinfo time ratio "
          f"{res['getinfo_over_ceiling_time']:.3f}")
    print("  stages, each timed alone:")
    total = 0.0
    for name in res["stages"]:
        if name in res["not_on_path"]:
            print(f"    {name:<50} {'-':>7}    ({res['not_on_path'][name]}; {med[name]:.2f} µs when it runs)")
            continue
        total += med[name]
        print(f"    {name:<50} {med[name]:7.2f} µs")
    print(f"    {'sum of the stages':<50} {total:7.2f} µs")
    print(f"    {'glue (getinfo - ceiling - stages)':<50} {extra - total:7.2f} µs")
    print("  (receive() and chunked are measured as ceiling variants; read_body includes one receive() of a fake "
          "receive; stages overlap a little)")
    if "vs_diff" in res:
        d = res["vs_diff"]
        print(f"\n  getinfo of {args.vs_app_dir / 'im_backend.py'} in the same rounds: {med['getinfo~vs']:.2f} µs; "
              f"this version minus that one, per round: median {d[0]:+.2f} µs [{d[1]:+.2f} … {d[2]:+.2f}]; "
              f"ceiling/getinfo time ratio {res['vs_ratio']:.3f} there")
    return 0


if __name__ == "__main__":
    sys.exit(main())
