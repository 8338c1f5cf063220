"""Paired benchmark: comment-page throughput with the reads on a streaming standby vs on the primary, while the
primary takes a publish load.

    .venv/bin/python bench/bench_replica.py [--rounds 5] [--duration 5] [--connections 32]

It starts a PostgreSQL primary and a streaming standby of it (pg_basebackup -R, the embedded PostgreSQL's binaries),
a Redis, and two IM-Backend processes on the same primary: one with `db.replicas: [standby]`, one without. Each
round runs, against one server and then the other (alternating which goes first), two wrk processes at once for
--duration seconds: uncached `comments/getinfo` pages (cache.near_ttl 0) and `publish`. It prints the median of the
per-round ratios (standby / primary) with their range, for the pages and for the publishes.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile
import time

BENCH = pathlib.Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path[:0] = [str(BENCH), str(ROOT / "tests"), str(ROOT)]

import httpx  # noqa: E402

import bench  # noqa: E402
from conftest import SECRET, Api, PgCluster, RedisProcess, Server, entries_config  # noqa: E402


def wrk(port: int, script: pathlib.Path, seconds: float, connections: int, label: str) -> subprocess.Popen:
    return subprocess.Popen(["wrk", "-t1", f"-c{connections}", f"-d{int(seconds)}s", "--timeout", "5s", "-s", str(script),
                             f"http://127.0.0.1:{port}", "--", label, "1", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def result(process: subprocess.Popen, seconds: float) -> dict:
    out, err = process.communicate(timeout=seconds + 60)
    match = re.search(r"^BENCHJSON (\{.*\})$", out, re.M)
    if process.returncode != 0 or not match:
        raise RuntimeError(f"wrk failed: {out[-1000:]} {err[-1000:]}")
    r = json.loads(match.group(1))
    r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
    return r


async def seed(url: str, svc: str, comments: int) -> int:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        api = Api(client, svc, SECRET)
        post = await api.publish(content="bench")
        for i in range(comments):
            await api.comment(post, f"u{i}", f"comment {i}")
        return post


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="im-bench-replica-") as tmp:
        work = pathlib.Path(tmp)
        primary = PgCluster(work / "primary").start()
        standby = PgCluster(work / "standby", primary=primary).start()
        redis_server = RedisProcess(work / "redis", password="bench")
        servers: dict[str, Server] = {}
        try:
            backing = {"db": primary.db, "cache": {"addr": redis_server.addr, "password": "bench"}}
            svc = "bench_replica"
            for name, replicas in (("standby", [{"host": "127.0.0.1", "port": standby.port}]), ("primary", [])):
                config = entries_config(backing, [{"name": svc, "secret": SECRET}], cache={"near_ttl": 0},
                                        server={"timeout": 30})
                config["db"] = dict(primary.db, replicas=replicas, max_replica_lag_ms=1000, max_conns=20)
                servers[name] = Server(work / name, config).start()
            post = asyncio.run(seed(servers["primary"].url, svc, 200))
            tpl = bench.templates(svc, post)
            seconds = int(args.duration * 2 * args.rounds + 120)
            scripts = {}
            for kind in ("comments", "publish"):
                scripts[kind] = work / f"{kind}.lua"
            time.sleep(2)  # the standby fresh
            ratios: dict[str, list[float]] = {"comments": [], "publish": []}
            for round_no in range(args.rounds):
                for kind in scripts:  # appKeys valid from now on for the rest of the run
                    scripts[kind].write_text(bench.make_lua(SECRET, tpl[kind], seconds))
                order = ["standby", "primary"] if round_no % 2 == 0 else ["primary", "standby"]
                rps: dict[str, dict[str, float]] = {}
                for name in order:
                    port = servers[name].port
                    runs = {kind: wrk(port, scripts[kind], args.duration, args.connections, f"{name}{round_no}{kind}")
                            for kind in scripts}
                    done = {kind: result(p, args.duration) for kind, p in runs.items()}
                    rps[name] = {kind: r["rps"] for kind, r in done.items()}
                    failed = {kind: r["status"] + r["timeout"] + r["bad"] for kind, r in done.items()}
                    if any(failed.values()):
                        print(f"  {name}: failed requests {failed}", flush=True)
                for kind in ratios:
                    ratios[kind].append(rps["standby"][kind] / rps["primary"][kind])
                print(f"round {round_no + 1}: " + ", ".join(
                    f"{kind} {rps['standby'][kind]:.0f}/{rps['primary'][kind]:.0f} req/s" for kind in ratios),
                    flush=True)
            reads = re.search(r'^im_db_replica_reads_total\{replica="[^"]+",result="ok"\} (\S+)$',
                              httpx.get(servers["standby"].url + "/metrics").text, re.M)
            print(f"\nreads on the standby / on the primary, median of {args.rounds} paired rounds (min-max):")
            for kind, values in ratios.items():
                print(f"  {kind:10} {statistics.median(values):.3f}  ({min(values):.3f}-{max(values):.3f})")
            print(f"  (page reads served by the standby: {reads.group(1) if reads else 'none'})")
        finally:
            for srv in servers.values():
                srv.stop()
            redis_server.stop()
            standby.stop("immediate")
            primary.stop("immediate")
    return 0


if __name__ == "__main__":
    sys.exit(main())
