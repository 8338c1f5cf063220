"""Where one write spends its time: every database and Redis round trip of the request, in µs, in-process.

    .venv/bin/python bench/bench_write_stages.py [--write comment-publish] [--requests 2000] [--rounds 3]
                                                 [--app-dir DIR] [--vs-app-dir DIR]

Requests are sent one after another (concurrency 1) straight to the ASGI app, on uvloop, against an embedded
PostgreSQL and Redis loaded like bench.py's w1000 service (with the pools of the writes that use rows up). While a
request runs, every awaited call on an asyncpg connection (execute/fetch/fetchrow/fetchval, BEGIN and COMMIT of a
transaction), every pool acquire and every Redis command or pipeline is timed and named; what is left of the
request's wall time is Python (routing, parameters, the appKey check, the envelope, the drivers' own work). It
prints, per stage, the calls per request and the median µs per request, the wall time and the CPU time (this
process) per request; --vs-app-dir does the same for a second version in the same rounds. At concurrency 1 a
round trip costs its latency, so the table is the profile of one write, not throughput (bench.py measures that).
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import pathlib
import shutil
import statistics
import sys
import tempfile
import time

import asyncpg
import redis.asyncio as aioredis
import uvloop

import bench  # noqa: E402  (puts the repository root and scripts/ on sys.path)
import embedded  # noqa: E402
from bench_hotpath import load_module  # noqa: E402

WRITES = ("publish", "update", "delete", "like", "unlike", "comment-publish", "reply", "comment-update",
          "comment-delete", "comment-like")


class Recorder:
    """Times the awaited driver calls of the request in flight: stage name -> [µs per request]."""

    def __init__(self) -> None:
        self.task: asyncio.Task | None = None  # the request being measured (background tasks are not counted)
        self.depth = 0  # a call inside a timed call (BEGIN is an execute) counts for the outer one only
        self.current: collections.Counter = collections.Counter()
        self.calls: collections.Counter = collections.Counter()

    @contextlib.contextmanager
    def stage(self, name: str):
        if self.task is None or asyncio.current_task() is not self.task or self.depth:
            yield
            return
        self.depth += 1
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.depth -= 1
            self.current[name] += (time.perf_counter() - t0) * 1e6
            self.calls[name] += 1


REC = Recorder()


def _label(query: str) -> str:
    words = " ".join(query.split())
    if words.upper().startswith("WITH"):
        return "SQL " + words[:60]
    return "SQL " + words[:48]


def instrument() -> None:
    """Wrap the drivers' awaited calls once (every version under test shares the same asyncpg and redis)."""
    conn_cls = asyncpg.connection.Connection
    for meth in ("execute", "fetch", "fetchrow", "fetchval"):
        orig = getattr(conn_cls, meth)

        async def wrapped(self, query, *args, _orig=orig, **kw):
            with REC.stage(_label(query)):
                return await _orig(self, query, *args, **kw)
        setattr(conn_cls, meth, wrapped)
    tx = asyncpg.transaction.Transaction
    for meth, name in (("start", "SQL BEGIN"), ("_Transaction__commit", "SQL COMMIT"),
                       ("_Transaction__rollback", "SQL ROLLBACK")):
        orig = getattr(tx, meth)

        async def wrapped_tx(self, *a, _orig=orig, _name=name, **kw):
            with REC.stage(_name):
                return await _orig(self, *a, **kw)
        setattr(tx, meth, wrapped_tx)
    pool_cls = asyncpg.pool.Pool
    orig_acquire = pool_cls._acquire

    async def acquire(self, *a, **kw):
        with REC.stage("pool acquire"):
            return await orig_acquire(self, *a, **kw)
    pool_cls._acquire = acquire
    orig_release = pool_cls.release

    async def release(self, *a, **kw):
        with REC.stage("pool release"):
            return await orig_release(self, *a, **kw)
    pool_cls.release = release
    orig_cmd = aioredis.Redis.execute_command

    async def command(self, *args, **kw):
        with REC.stage(f"Redis {args[0]}"):
            return await orig_cmd(self, *args, **kw)
    aioredis.Redis.execute_command = command
    orig_pipe = aioredis.client.Pipeline.execute

    async def pipe_execute(self, *a, **kw):
        names = "+".join(sorted({str(c[0][0]) for c in self.command_stack})) or "empty"
        with REC.stage(f"Redis pipeline {names}"):
            return await orig_pipe(self, *a, **kw)
    aioredis.client.Pipeline.execute = pipe_execute


def request_for(im, write: str, level: dict, secret: str, i: int) -> tuple[dict, bytes]:
    """An ASGI scope and body for request i of a write (pools: row i of the pool; likes: a new user)."""
    tpl = bench.write_templates(level)[write][0]
    path, _, qs = tpl["path"].partition("?")
    qs += f"&appKey={im.encrypt_appkey(secret)}"
    pick = tpl.get("pick")
    if pick:
        qs += f"&{pick['param']}={pick['prefix']}{pick['base'] + i % pick['size']}"
    if tpl.get("user"):
        qs += f"&user_id=stage{write}{i}x{time.monotonic_ns()}"
    headers = [(b"host", b"127.0.0.1:8000")] + [(k.lower().encode(), v.encode())
                                                for k, v in tpl.get("headers", {}).items()]
    body = tpl.get("body", "").encode()
    if body:
        headers.append((b"content-length", str(len(body)).encode()))
    scope = {"type": "http", "method": tpl["method"], "path": path, "root_path": "", "raw_path": path.encode(),
             "query_string": qs.encode(), "headers": headers, "http_version": "1.1", "scheme": "http",
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000), "asgi": {"version": "3.0"}}
    return scope, body


async def one(app, scope: dict, body: bytes) -> bytes:
    out: list[bytes] = []
    sent = False

    async def receive():
        nonlocal sent
        if sent:
            await asyncio.sleep(3600)
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        if message["type"] == "http.response.body":
            out.append(message.get("body", b""))
    await app(scope, receive, send)
    return b"".join(out)


async def run_version(im, app, write: str, level: dict, secret: str, n: int, start: int) -> dict:
    """n requests one after another: per-request stage µs (median), wall and CPU µs per request."""
    per_stage: dict[str, list[float]] = collections.defaultdict(list)
    calls: collections.Counter = collections.Counter()
    walls, cpu0 = [], time.process_time()
    for i in range(start, start + n):
        scope, body = request_for(im, write, level, secret, i)
        REC.current = collections.Counter()
        t0 = time.perf_counter()
        REC.task = asyncio.ensure_future(one(app, scope, body))
        answer = await REC.task
        walls.append((time.perf_counter() - t0) * 1e6)
        REC.task = None
        assert answer.startswith(b'{"code":200'), answer[:200]
        for name in set(per_stage) | set(REC.current):
            per_stage[name].append(REC.current.get(name, 0.0))
        calls.update(REC.calls)
        REC.calls = collections.Counter()
    cpu = (time.process_time() - cpu0) / n * 1e6
    await asyncio.sleep(bench_delay(im))  # let the delayed second deletes of this batch go out
    stages = {name: statistics.mean(v) for name, v in per_stage.items()}
    return {"wall": statistics.median(walls), "wall_mean": statistics.mean(walls), "cpu": cpu, "stages": stages,
            "calls": {k: v / n for k, v in calls.items()}}


def bench_delay(im) -> float:
    return getattr(im, "DOUBLE_DELETE_DELAY", 1.0) + 0.3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", default="comment-publish", choices=WRITES)
    parser.add_argument("--requests", type=int, default=1000, help="requests per round and version")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--app-dir", type=pathlib.Path, default=bench.ROOT)
    parser.add_argument("--vs-app-dir", type=pathlib.Path, default=None)
    parser.add_argument("--cprofile", action="store_true", help="print cProfile's top functions of one more round")
    args = parser.parse_args()
    instrument()
    mods = {"this": load_module("im_backend_under_test", args.app_dir)}
    if args.vs_app_dir:
        mods["vs"] = load_module("im_backend_vs", args.vs_app_dir)
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="im-wstages-"))
    pg = redis = None
    try:
        pg, db = embedded.start_postgres(workdir, keep_data=False)
        redis, redis_addr = embedded.start_redis(workdir)
        secret = "0123456789abcdef"
        svcs = {name: f"w1000{'_vs' if name == 'vs' else ''}" for name in mods}
        boot = {}
        for name, svc in svcs.items():
            sub = workdir / name
            sub.mkdir()
            boot[name] = embedded.write_config(sub, db, redis_addr, {svc: secret}, "")
        levels = {}
        pool = bench.POOLS.get(args.write) and args.write
        need = (2 + args.rounds) * args.requests + 200
        for name, svc in svcs.items():
            levels[name] = asyncio.run(bench.load_level(db, svc, 1000))
            if pool:
                levels[name]["picks"] = asyncio.run(bench.load_pools(db, levels[name], {pool: need}))
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            versions = {name: (im, im.App(boot[name])) for name, im in mods.items()}
            res = runner.run(measure_each(versions, args.write, levels, secret, args.requests, args.rounds,
                                          args.cprofile))
    finally:
        if redis is not None:
            bench.stop_redis(redis)
        if pg is not None:
            pg.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
    for name, rounds in res.items():
        where = args.app_dir if name == "this" else args.vs_app_dir
        print(f"\n{args.write}, {where / 'im_backend.py'}: {args.rounds} rounds of {args.requests} requests, "
              f"one at a time (µs per request, median over rounds)")
        stages = sorted({s for r in rounds for s in r["stages"]})
        rows = []
        for s in stages:
            us = statistics.median(r["stages"].get(s, 0.0) for r in rounds)
            calls = statistics.median(r["calls"].get(s, 0.0) for r in rounds)
            rows.append((us, s, calls))
        total = 0.0
        for us, s, calls in sorted(rows, reverse=True):
            total += us
            print(f"  {s:<72} {calls:4.1f}x {us:8.1f}")
        wall = statistics.median(r["wall_mean"] for r in rounds)
        print(f"  {'round trips and waits, summed':<72}       {total:8.1f}")
        print(f"  {'Python (wall - the above)':<72}       {wall - total:8.1f}")
        print(f"  {'wall per request (mean; median of requests)':<72}       {wall:8.1f}"
              f"  ({statistics.median(r['wall'] for r in rounds):.1f})")
        print(f"  {'CPU of this process per request':<72}       "
              f"{statistics.median(r['cpu'] for r in rounds):8.1f}")
    return 0


async def measure_each(versions: dict, write: str, levels: dict, secret: str, n: int, rounds: int,
                       cprofile: bool = False) -> dict:
    for im, app in versions.values():
        await app.startup()
    try:
        results: dict[str, list[dict]] = {name: [] for name in versions}
        used = {name: 0 for name in versions}
        for name, (im, app) in versions.items():  # warm-up: caches, prepared statements, pool connections
            for _ in range(2):
                await run_version(im, app, write, levels[name], secret, 50, used[name])
                used[name] += 50
        for rnd in range(rounds):
            order = list(versions.items()) if rnd % 2 == 0 else list(versions.items())[::-1]
            for name, (im, app) in order:
                results[name].append(await run_version(im, app, write, levels[name], secret, n, used[name]))
                used[name] += n
        if cprofile:
            import cProfile
            import pstats
            for name, (im, app) in versions.items():
                prof = cProfile.Profile()
                prof.enable()
                await run_version(im, app, write, levels[name], secret, n, used[name])
                prof.disable()
                used[name] += n
                print(f"\ncProfile of {name}, {n} requests (tottime, s):")
                pstats.Stats(prof).sort_stats("tottime").print_stats(30)
                pstats.Stats(prof).print_callers("_do_execute|writelines")
        return results
    finally:
        for im, app in versions.values():
            await app.shutdown()


if __name__ == "__main__":
    sys.exit(main())
