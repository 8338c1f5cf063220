"""Hostile connections: what GuardedHttpProtocol and the waiting pools cost and what they buy.

    .venv/bin/python bench/bench_conn.py [--rounds 5] [--duration 3] [--burst 10] [--only getinfo,burst,header]

Servers (one uvicorn worker each, pinned to CPU 0 with PostgreSQL and Redis; wrk and this script on CPU 1):
  before   im_backend.py of git revision --before (default main), plain `uvicorn im_backend:app` (uvicorn's
           httptools protocol); pick a revision from before this work once it is merged
  before-guarded  the same revision with `--http im_backend:GuardedHttpProtocol` (for --burst-servers)
  plain    this branch, plain `uvicorn im_backend:app`
  guarded  this branch, `uvicorn im_backend:app --http im_backend:GuardedHttpProtocol` (what the README says)
Scenarios:
  getinfo  wrk -t1 -c64 on the cached getinfo, the servers alternating in rounds; per round the ratios
           guarded/plain (the protocol's cost) and guarded/before (the whole branch); median (min-max)
  burst    wrk -t1 -c1000 on getinfo for --burst seconds while a canary opens a fresh connection every 0.1 s
           for one getinfo: canary p50/p99/max, its failures, "Too many connections" lines in the server log and
           the server's RSS (peak growth during the burst); --burst-rounds N runs before and guarded alternately
           N times and adds the medians [min-max] of the canary's p50 and p99
  header   10 connections each streaming a 50 MiB header: the server's RSS growth (peak and after)
Figures are printed and written to bench/results-conn.json. Nothing is asserted.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pathlib
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

BENCH = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import bench  # noqa: E402  (also puts the project root and scripts/ on sys.path)
from bench import PREFIX, Server, embedded, im, load_level, log, make_lua, pin_tree  # noqa: E402
import psutil  # noqa: E402

GUARDED = "im_backend:GuardedHttpProtocol"


def wrk(port: int, script: pathlib.Path, seconds: int, connections: int, pin: bool) -> dict:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "--timeout", "10s", "-s", str(script),
            f"http://127.0.0.1:{port}"]
    if pin:
        argv = ["taskset", "-c", "1"] + argv
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    match = re.search(r"^BENCHJSON (\{.*\})$", out.stdout, re.M)
    if not match:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stdout[-1500:]} {out.stderr[-1500:]}")
    r = json.loads(match.group(1))
    r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
    r["errors"] = r["status"] + r["connect"] + r["read"] + r["write"] + r["timeout"]
    return r


def measured(server: Server, script: pathlib.Path, seconds: int, pin: bool) -> tuple[float, float]:
    """(requests/s, server CPU microseconds per request) of one wrk -c64 run. CPU per request hardly depends on
    what else the machine runs; requests/s does (this machine is shared)."""
    proc = psutil.Process(server.proc.pid)
    before = sum(proc.cpu_times()[:2])
    r = wrk(server.port, script, seconds, 64, pin)
    return r["rps"], (sum(proc.cpu_times()[:2]) - before) * 1e6 / max(1, r["requests"])


async def canary(port: int, svc: str, secret: str, post_id: int, seconds: float) -> dict:
    """A fresh connection every 0.1 s for one getinfo; latencies of those answering 200, and the failures."""
    latencies, failures, connects = [], 0, []
    tasks = []

    async def one() -> None:
        nonlocal failures
        path = f"{PREFIX}/getinfo?svc={svc}&post_id={post_id}&appKey={im.encrypt_appkey(secret)}"
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(30):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                connects.append(time.perf_counter() - t0)
                writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
                data = await reader.read()
                writer.close()
            if data.startswith(b"HTTP/1.1 200") and b'"code":200' in data:
                latencies.append(time.perf_counter() - t0)
            else:
                failures += 1
        except (OSError, TimeoutError):
            failures += 1

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        tasks.append(asyncio.ensure_future(one()))
        await asyncio.sleep(0.1)
    await asyncio.gather(*tasks)
    latencies.sort()
    pct = lambda q: round(latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000, 1) if latencies else None  # noqa: E731
    return {"requests": len(tasks), "ok": len(latencies), "failures": failures, "p50_ms": pct(0.5),
            "p99_ms": pct(0.99), "max_ms": round(latencies[-1] * 1000, 1) if latencies else None,
            "connect_p50_ms": round(statistics.median(connects) * 1000, 1) if connects else None,
            "connect_max_ms": round(max(connects) * 1000, 1) if connects else None}


async def header_attack(port: int, pid: int, seconds: float = 30) -> dict:
    """10 connections each streaming a 50 MiB header (for at most `seconds`); the server's RSS meanwhile."""
    proc = psutil.Process(pid)
    before = peak = proc.memory_info().rss
    chunk, total = b"a" * 65536, 50 << 20
    sent_total = 0

    async def attack() -> None:
        nonlocal sent_total
        with contextlib.suppress(OSError):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
            sent = 0
            with contextlib.suppress(OSError):
                while sent < total:
                    writer.write(chunk)
                    await writer.drain()
                    sent += len(chunk)
            sent_total += sent
            writer.close()

    async def sample() -> None:
        nonlocal peak
        while True:
            with contextlib.suppress(psutil.Error):
                peak = max(peak, proc.memory_info().rss)
            await asyncio.sleep(0.05)

    sampler = asyncio.ensure_future(sample())
    t0 = time.monotonic()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*(attack() for _ in range(10))), seconds)
    elapsed = time.monotonic() - t0
    await asyncio.sleep(0.5)
    sampler.cancel()
    after = proc.memory_info().rss
    mb = lambda n: round(n / 2**20, 1)  # noqa: E731
    return {"rss_before_mb": mb(before), "peak_growth_mb": mb(peak - before), "growth_after_mb": mb(after - before),
            "client_sent_mb": mb(sent_total), "seconds": round(elapsed, 1)}


def run_burst(s: Server, script: pathlib.Path, seconds: int, pin: bool, svc: str, secret: str, hot: int,
              connections: int = 1000) -> dict:
    """One -c<connections> burst on server s with the canary; wrk's figures, the canary's, the server's RSS growth."""
    log_start = s.logpath.stat().st_size
    proc = psutil.Process(s.proc.pid)
    rss0 = peak = proc.memory_info().rss

    async def sample() -> None:
        nonlocal peak
        while True:
            with contextlib.suppress(psutil.Error):
                peak = max(peak, proc.memory_info().rss)
            await asyncio.sleep(0.1)

    async def burst() -> tuple[dict, dict]:
        sampler = asyncio.ensure_future(sample())
        load = asyncio.ensure_future(asyncio.to_thread(wrk, s.port, script, seconds, connections, pin))
        await asyncio.sleep(1)  # the burst is on
        probe = await canary(s.port, svc, secret, hot, seconds - 2)
        result = await load
        sampler.cancel()
        return result, probe

    load, probe = asyncio.run(burst())
    with open(s.logpath, "rb") as f:
        f.seek(log_start)
        too_many = f.read().count(b"Too many connections")
    return {"connections": connections, "wrk_rps": round(load["rps"]), "wrk_p50_ms": load["p50_us"] / 1000,
            "wrk_p99_ms": load["p99_us"] / 1000, "wrk_errors": load["errors"],
            "wrk_timeouts": load["timeout"], "canary": probe, "too_many_connections_log_lines": too_many,
            "rss_before_mb": round(rss0 / 2**20, 1), "rss_peak_growth_mb": round((peak - rss0) / 2**20, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=int, default=3, help="seconds per getinfo run")
    parser.add_argument("--burst", type=int, default=10, help="seconds of the -c1000 burst")
    parser.add_argument("--burst-rounds", type=int, default=1, help="bursts per server, alternating")
    parser.add_argument("--burst-connections", type=lambda v: [int(c) for c in v.split(",") if c], default=[],
                        help="also burst with these numbers of connections (e.g. 250,2000), same canary")
    parser.add_argument("--burst-servers", default="before,guarded",
                        help="servers of burst and header (before, before-guarded: --before with the guarded "
                             "protocol, plain, guarded)")
    parser.add_argument("--only", default="getinfo,burst,header")
    parser.add_argument("--before", default="main", help="git revision whose im_backend.py is 'before'")
    parser.add_argument("--output", type=pathlib.Path, default=BENCH / "results-conn.json")
    args = parser.parse_args()
    only = set(args.only.split(","))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # wrk -c1000 and the servers need descriptors
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 65536, hard))
    pin = (os.cpu_count() or 1) >= 2
    if pin:
        os.sched_setaffinity(0, {1})
    work = pathlib.Path(tempfile.mkdtemp(prefix="im-bench-conn-"))
    (work / "main").mkdir()
    (work / "main" / "im_backend.py").write_bytes(
        subprocess.run(["git", "show", f"{args.before}:im_backend.py"], cwd=bench.ROOT, capture_output=True, check=True).stdout)
    results: dict = {"rounds": args.rounds, "duration": args.duration, "pinned": pin, "before": args.before}
    servers: list[Server] = []
    pg = redis_server = None
    try:
        pg, db = embedded.start_postgres(work, keep_data=False)
        redis_server, redis_addr = embedded.start_redis(work)
        svc, secret = "conn", "W7K8pJ3aQv2LcXgH"
        boot = embedded.write_config(work, db, redis_addr, {svc: secret}, "server:\n  timeout: 10\n")
        hot = asyncio.run(load_level(db, svc, 1000))["hot_post"]
        if pin:
            pin_tree([pg.get_pid(), redis_server.pid], [0])
        env = dict(os.environ, IM_CONF=str(boot), IM_LOG_LEVEL="warning")
        cpus = "0" if pin else None

        def server(name: str, app_dir: pathlib.Path, http: str | None) -> Server:
            s = Server(name, "im_backend:app", app_dir, env, work, cpus, ready_path="/readyz")
            if http:
                s.argv += ["--http", http]
            servers.append(s)
            return s.start()

        kinds = {"before": (work / "main", None), "plain": (bench.ROOT, None), "guarded": (bench.ROOT, GUARDED),
                 "before-guarded": (work / "main", GUARDED)}
        script = work / "getinfo.lua"
        tpl = [{"method": "GET", "path": f"{PREFIX}/getinfo?svc={svc}&post_id={hot}"}]
        script.write_text(make_lua(secret, tpl, 3600))

        if "getinfo" in only:
            running = {name: server(name, *where) for name, where in kinds.items()}
            for s in running.values():
                wrk(s.port, script, 1, 64, pin)  # warm-up
            rounds = []
            for i in range(args.rounds):
                order = list(running) if i % 2 == 0 else list(reversed(running))
                rps, cpu = {}, {}
                for name in order:
                    rps[name], cpu[name] = measured(running[name], script, args.duration, pin)
                rounds.append({"rps": rps, "cpu_us_per_request": cpu})
                log(f"round {i + 1}: " + "  ".join(f"{n} {rps[n]:.0f}/s {cpu[n]:.0f}us" for n in order))
            for num, den in (("guarded", "plain"), ("guarded", "before"), ("plain", "before")):
                for what in ("rps", "cpu_us_per_request"):
                    ratios = [r[what][num] / r[what][den] for r in rounds]
                    results[f"getinfo_{what}_{num}_over_{den}"] = {
                        "median": round(statistics.median(ratios), 3), "min": round(min(ratios), 3),
                        "max": round(max(ratios), 3)}
                    log(f"getinfo {what} {num}/{den}: median {statistics.median(ratios):.3f} "
                        f"(min {min(ratios):.3f}, max {max(ratios):.3f})")
            results["getinfo_rounds"] = rounds
            for s in list(running.values()):
                s.stop()
                servers.remove(s)

        for scenario in ("burst", "header"):
            if scenario not in only:
                continue
            rounds = args.burst_rounds if scenario == "burst" else 1
            for i in range(rounds):
                names = args.burst_servers.split(",")
                for name in names if i % 2 == 0 else names[::-1]:
                    s = server(name, *kinds[name])
                    if scenario == "burst":
                        out = run_burst(s, script, args.burst, pin, svc, secret, hot)
                        for extra in args.burst_connections:  # the same canary beside other numbers of greedy ones
                            results[f"burst_{name}_c{extra}_{i + 1}"] = other = run_burst(
                                s, script, args.burst, pin, svc, secret, hot, extra)
                            log(f"burst {name} -c{extra}: {json.dumps(other)}")
                    else:
                        out = asyncio.run(header_attack(s.port, s.proc.pid))
                    key = f"{scenario}_{name}" if rounds == 1 else f"{scenario}_{name}_{i + 1}"
                    results[key] = out
                    log(f"{scenario} {name}: {json.dumps(out)}")
                    s.stop()
                    servers.remove(s)
            if scenario == "burst" and rounds > 1:
                for name in args.burst_servers.split(","):
                    runs = [results[f"burst_{name}_{i + 1}"] for i in range(rounds)]
                    for what in ("p50_ms", "p99_ms", "max_ms"):
                        vals = [r["canary"][what] for r in runs if r["canary"][what] is not None]
                        results[f"burst_{name}_canary_{what}"] = {
                            "median": statistics.median(vals), "min": min(vals), "max": max(vals)}
                    growth = [r["rss_peak_growth_mb"] for r in runs]
                    results[f"burst_{name}_rss_peak_growth_mb"] = {"median": statistics.median(growth),
                                                                   "min": min(growth), "max": max(growth)}
                    log(f"burst {name}, {rounds} rounds: canary p50 {results[f'burst_{name}_canary_p50_ms']}, "
                        f"p99 {results[f'burst_{name}_canary_p99_ms']}, "
                        f"RSS peak growth {results[f'burst_{name}_rss_peak_growth_mb']} MB")
    finally:
        bench.teardown(servers, redis_server, pg, work)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    log(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
