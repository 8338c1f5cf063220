"""Feed-ready reads, measured the paired way: each scenario alternates with its baseline in rounds.

    .venv/bin/python bench/bench_feed.py [--rounds 5] [--duration 3] [--big 100000] [--only comments,like,...]

Pairs (the ratio is scenario / baseline, per round; the report gives the median and min-max):
  comments   comments/getinfo first page (20 roots with child_num, like_count, viewer)  vs  ceiling
             (also "-nocache": a server with cache.near_ttl 0, every read from PostgreSQL)
  expand     getlist&expand=1&viewer (one call: 20 posts with counts and liked)        vs  ceiling
  feed41     getlist&expand=1&viewer, pages/s                                           vs  the 41 calls it replaces
             (getlist + 20 getinfo + 20 getlike on the version-1 server), pages/s = req/s / 41
  like       PUT like of one hot post, a new user each request                          vs  the same on version 1
  *@big      comments / expand / getbatch at --big rows                                 vs  the same at 1,000 rows
and pgbench running the like statement of each version at the same concurrency (-c 64), the database's own limit.

Version 1 = im_backend.py of `git merge-base HEAD main` (the code before this branch), served from a temporary
directory on tables of its own (same data). Data: bench.py's load_level (N posts; N comments on the hot post,
N/10 of them roots; N likes on it). Servers on CPU 0, wrk and pgbench on CPU 1 (taskset), as bench.py does.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import pathlib
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile

BENCH = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import asyncpg  # noqa: E402
import yaml  # noqa: E402

import bench  # noqa: E402
from bench import PREFIX, Runner, Server, embedded, im, load_level, log, pin_tree  # noqa: E402

VIEWER = "user7"  # likes the hot post in the loaded data (likes are user0..userN-1)


async def newest_posts(db: dict, svc: str, n: int = 20) -> list[int]:
    conn = await asyncpg.connect(host=db["host"], port=db["port"], user=db["user"], database=db["dbname"])
    try:
        rows = await conn.fetch(f'SELECT id FROM "{svc}_post_info" ORDER BY created_at DESC, id DESC LIMIT $1', n)
        return [r["id"] for r in rows]
    finally:
        await conn.close()


def get(path: str, weight: int = 1) -> dict:
    return {"method": "GET", "path": PREFIX + path, "weight": weight}


def feed_templates(svc: str, hot: int, newest: list[int]) -> dict[str, list[dict]]:
    q = f"?svc={svc}"
    like = {"method": "PUT", "path": PREFIX + f"/like{q}&post_id={hot}", "user": True,
            "headers": {"Content-Type": "application/json"}, "body": '{"like":true}'}
    return {
        "comments": [get(f"/comments/getinfo{q}&post_id={hot}&root_comment_id=0&cursor=1949-10-01T00:00:00"
                         f"&limit=20&viewer={VIEWER}")],
        "comments_plain": [get(f"/comments/getinfo{q}&post_id={hot}&root_comment_id=0&cursor=1949-10-01T00:00:00"
                               f"&limit=20")],
        "expand": [get(f"/getlist{q}&limit=20&expand=1&viewer={VIEWER}")],
        "getbatch": [get(f"/getbatch{q}&post_ids={','.join(map(str, newest))}&viewer={VIEWER}")],
        # the 41 calls of one feed page on version 1, in proportion: 1 getlist, 20 getinfo, 20 getlike
        "feed41": [get(f"/getlist{q}&limit=20")] + [get(f"/getinfo{q}&post_id={p}") for p in newest]
                  + [get(f"/getlike{q}&post_id={p}") for p in newest],
        "like": [like],
        "getinfo": [get(f"/getinfo{q}&post_id={hot}")],
    }


def pgbench_like(db: dict, statement: str, hot: int, seconds: int, clients: int, pin: bool) -> dict:
    """pgbench running a like statement ($1 post, $2 a new user each time, $3 a random slot) at -c clients."""
    script = pathlib.Path(tempfile.mkdtemp(prefix="im-pgbench-")) / "like.sql"
    statement = statement.replace("$1", str(hot)).replace("$2", "'pgb' || :client_id || '_' || :i").replace(
        "$3", ":slot")
    script.write_text(f"\\set i random(1, 1000000000)\n\\set slot random(0, {im.COUNTER_SLOTS - 1})\n"
                      + " ".join(statement.split()) + ";\n")
    pgbench = shutil.which("pgbench", path=str(pathlib.Path(im.__file__).parent / ".venv/lib/python3.11/site-packages"
                                                                                   "/pgserver/pginstall/bin")) \
        or shutil.which("pgbench")
    argv = [pgbench, "-n", "-c", str(clients), "-j", "1", "-T", str(seconds), "-f", str(script),
            "-h", db["host"], "-p", str(db["port"]), "-U", db["user"], db["dbname"]]
    if pin:
        argv = ["taskset", "-c", "1"] + argv
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 120)
    tps = [line for line in out.stdout.splitlines() if line.startswith("tps")]
    shutil.rmtree(script.parent, ignore_errors=True)
    if out.returncode != 0 or not tps:
        raise RuntimeError(f"pgbench failed: {out.stdout[-1000:]} {out.stderr[-1000:]}")
    return {"tps": float(tps[0].split("=")[1].split()[0]), "clients": clients}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=int, default=3, help="seconds per measured run")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--big", type=int, default=100000, help="rows of the large data set (0: none)")
    parser.add_argument("--only", default="", help="comma-separated pairs: comments,expand,feed41,like,big,pgbench")
    parser.add_argument("--output", type=pathlib.Path, default=BENCH / "results-feed.json")
    args = parser.parse_args()
    only = set(filter(None, args.only.split(",")))
    want = lambda name: not only or name in only  # noqa: E731
    pin = shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="im-bench-feed-"))
    v1_dir = workdir / "v1"
    v1_dir.mkdir()
    base = subprocess.run(["git", "merge-base", "HEAD", "main"], cwd=bench.ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()
    (v1_dir / "im_backend_v1.py").write_text(subprocess.run(["git", "show", f"{base}:im_backend.py"], cwd=bench.ROOT,
                                                         capture_output=True, text=True, check=True).stdout)
    servers: list[Server] = []
    pg = redis_server = None
    results: dict = {"rounds": {}, "settings": vars(args) | {"output": str(args.output)}, "v1_commit": base}
    try:
        pg, db = embedded.start_postgres(workdir, keep_data=False)
        redis_server, redis_addr = embedded.start_redis(workdir)
        sizes = {"v2": args.small, "v1": args.small} | ({"v2big": args.big} if args.big and want("big") else {})
        services = {name: f"f{name}" for name in sizes}
        secrets_ = {svc: secrets.token_hex(8) for svc in services.values()}
        boot = embedded.write_config(workdir, db, redis_addr, secrets_, "server:\n  timeout: 30\n")
        levels = {}
        for name, n in sizes.items():
            log(f"loading {services[name]}: {n:,} rows ...")
            levels[name] = asyncio.run(load_level(db, services[name], n))
            levels[name]["newest"] = asyncio.run(newest_posts(db, services[name]))
            log(f"  loaded in {levels[name]['load_and_vacuum_s']} s")
        server_side = [pg.get_pid(), redis_server.pid]
        if pin:
            pin_tree(server_side, [0])
        cpus = "0" if pin else None
        env = dict(os.environ, IM_CONF=str(boot), IM_LOG_LEVEL="warning")
        nocache_dir = workdir / "nocache"  # the same, with the near cache off: every read goes to the databases
        nocache_dir.mkdir()
        nocache_boot = embedded.write_config(nocache_dir, db, redis_addr, secrets_, "server:\n  timeout: 30\n")
        app_yaml = yaml.safe_load((nocache_dir / "app.yaml").read_text())
        app_yaml["cache"]["near_ttl"] = 0
        (nocache_dir / "app.yaml").write_text(yaml.safe_dump(app_yaml))
        ceiling = Server("ceiling", "ceiling:app", BENCH, env, workdir, cpus, ready_path="/").start()
        servers.append(ceiling)
        v2 = Server("v2", "im_backend:app", bench.ROOT, env, workdir, cpus, ready_path="/readyz").start()
        servers.append(v2)
        v2nc = Server("v2-nocache", "im_backend:app", bench.ROOT, dict(env, IM_CONF=str(nocache_boot)), workdir, cpus,
                      ready_path="/readyz").start()
        servers.append(v2nc)
        v1 = Server("v1", "im_backend_v1:app", v1_dir, env, workdir, cpus, ready_path="/readyz").start()
        servers.append(v1)
        runner = Runner(argparse.Namespace(threads=args.threads, connections=args.connections, warmup=args.warmup,
                                           duration=args.duration), workdir, pin)
        runner.own_roots = server_side
        tpl = {name: feed_templates(services[name], lv["hot_post"], lv["newest"]) for name, lv in levels.items()}
        sec = {name: secrets_[services[name]] for name in levels}
        # both versions make the like counter of the hot post before their like runs (version 1 only updates it
        # once it exists): one getlike each
        for name, srv in (("v2", v2), ("v1", v1)):
            hot = levels[name]["hot_post"]
            bench.sanity(srv.port, sec[name], [get(f"/getlike?svc={services[name]}&post_id={hot}")])
        pairs = []  # (label, (server, level, template), (server, level, template), per-request divisor of baseline)
        if want("comments"):
            pairs.append(("comments/ceiling", (v2, "v2", "comments"), (ceiling, "v2", "getinfo"), 1))
            pairs.append(("comments-nocache/ceiling", (v2nc, "v2", "comments"), (ceiling, "v2", "getinfo"), 1))
            pairs.append(("comments-v1plain/ceiling", (v1, "v1", "comments_plain"), (ceiling, "v2", "getinfo"), 1))
        if want("expand"):
            pairs.append(("expand/ceiling", (v2, "v2", "expand"), (ceiling, "v2", "getinfo"), 1))
            pairs.append(("expand-nocache/ceiling", (v2nc, "v2", "expand"), (ceiling, "v2", "getinfo"), 1))
        if want("feed41"):
            pairs.append(("expand-pages/feed41-pages", (v2, "v2", "expand"), (v1, "v1", "feed41"), 41))
            pairs.append(("expand-nocache-pages/feed41-pages", (v2nc, "v2", "expand"), (v1, "v1", "feed41"), 41))
        if want("like"):
            pairs.append(("like/like-v1", (v2, "v2", "like"), (v1, "v1", "like"), 1))
        if "v2big" in levels:
            for name in ("comments", "expand", "getbatch"):
                pairs.append((f"{name}@{args.big}/{name}@{args.small}", (v2, "v2big", name), (v2, "v2", name), 1))
                pairs.append((f"{name}-nocache@{args.big}/@{args.small}", (v2nc, "v2big", name), (v2nc, "v2", name),
                              1))
        for r in range(args.rounds):
            log(f"round {r + 1}/{args.rounds}")
            for label, (s_srv, s_lv, s_t), (b_srv, b_lv, b_t), divisor in pairs:
                safe = label.replace("/", "_vs_").replace("@", "_")
                a = runner.scenario(f"{safe}-a", s_srv, sec[s_lv], tpl[s_lv][s_t], pinned=pin)["rps"]
                b = runner.scenario(f"{safe}-b", b_srv, sec[b_lv], tpl[b_lv][b_t], pinned=pin)["rps"] / divisor
                results["rounds"].setdefault(label, []).append({"scenario": a, "baseline": b, "ratio": a / b})
        if want("pgbench"):
            sys.path.insert(0, str(v1_dir))
            v1_module = importlib.import_module("im_backend_v1")
            statements = {"v2": im.sql(services["v2"], im.POST_LIKE_SET),
                          "v1": v1_module.sql(services["v1"], v1_module.POST_LIKE_SET)}
            for r in range(args.rounds):
                for name in ("v2", "v1"):
                    log(f"pgbench round {r + 1}: the {name} like statement, -c {args.connections} -j 1")
                    result = pgbench_like(db, statements[name], levels[name]["hot_post"], args.duration,
                                          args.connections, pin)
                    results.setdefault("pgbench_like", {}).setdefault(name, []).append(result["tps"])
        print()
        print(f"paired rounds: {args.rounds} x wrk -t{args.threads} -c{args.connections} -d{args.duration}s "
              f"(warm-up {args.warmup}s); {'pinned' if pin else 'not pinned'}; the machine is shared, so noisy")
        print(f"{'pair':<36} {'scenario req/s':>15} {'baseline req/s':>15} {'ratio median':>13} {'min-max':>14}")
        summary = {}
        for label, rounds in results["rounds"].items():
            ratios = [x["ratio"] for x in rounds]
            summary[label] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
                              "scenario_rps": statistics.median(x["scenario"] for x in rounds),
                              "baseline_rps": statistics.median(x["baseline"] for x in rounds)}
            s = summary[label]
            print(f"{label:<36} {s['scenario_rps']:>15.0f} {s['baseline_rps']:>15.1f} {s['median']:>13.3f} "
                  f"{s['min']:>6.3f}-{s['max']:<7.3f}")
        if "pgbench_like" in results:
            tps = results["pgbench_like"]
            ratios = [a / b for a, b in zip(tps["v2"], tps["v1"], strict=True)]
            summary["pgbench-like/pgbench-like-v1"] = {"median": statistics.median(ratios), "min": min(ratios),
                                                      "max": max(ratios), "scenario_rps": statistics.median(tps["v2"]),
                                                      "baseline_rps": statistics.median(tps["v1"])}
            print(f"{'pgbench like v2 / v1 (tps)':<36} {statistics.median(tps['v2']):>15.0f} "
                  f"{statistics.median(tps['v1']):>15.1f} {statistics.median(ratios):>13.3f} "
                  f"{min(ratios):>6.3f}-{max(ratios):<7.3f}")
        results["summary"] = summary
        results["levels"] = levels
        args.output.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"results written to {args.output}")
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        bench.teardown(servers, redis_server, pg, workdir)


if __name__ == "__main__":
    sys.exit(main())
