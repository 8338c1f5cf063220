"""Moderation: what the feature costs when it is off, with 10,000 blocked words, and with a 5 ms hook.

    .venv/bin/python bench/bench_moderation.py [--rounds 5] [--duration 3] [--words 10000] [--hook-ms 5]

One server (one uvicorn worker), five services on it, alike but for their `moderation` key:
  plain   no moderation key at all (what a version-2 configuration is)
  off     moderation: {mode: off}
  post    moderation: {mode: post} (no words, no hook)
  words   moderation: {mode: post, words_file: <10,000 random words>} (none of them in the texts sent)
  hooked  moderation: {mode: post, hook: a local classifier answering accept after 5 ms}
wrk -t1 -c64 runs each comparison in paired rounds (bench.paired_rounds: order alternating); the figure is the
median of the per-round ratios with min-max:
  1. off / plain       for publish, comment publish, getinfo and a comment page of 20 (the feature unused)
  2. words / off       for publish and the comment page (the word filter's cost), and publish words / post and
                       post / off (the filter alone; mode post alone)
  3. hooked / post     for publish (the wait for the hook must not hold a database connection or serialise)
The server side (uvicorn, PostgreSQL, Redis) is pinned to CPU 0; wrk and the hook to CPU 1.
Prints figures and writes bench/results-moderation.json; asserts nothing about them.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import pathlib
import random
import re
import secrets
import shutil
import sys
import tempfile
import urllib.request

BENCH = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent), str(BENCH.parent / "scripts")]

import bench  # noqa: E402
from bench import PREFIX, Runner, Server, Subject, embedded, im, log, pin_tree  # noqa: E402

HOOK_DELAY_S = float(os.environ.get("BENCH_HOOK_MS", "5")) / 1000
SERVICES = ("plain", "off", "post", "words", "hooked")
POST_TEXT = "z" * 100  # the texts sent: no blocked word is in them (checked when the words are made)
COMMENT_TEXT = "k" * 60


async def hook_app(scope, receive, send):
    """The classifier: reads the check, waits HOOK_DELAY_S (an external API's latency), answers accept."""
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    if scope["method"] == "POST":
        await asyncio.sleep(HOOK_DELAY_S)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b'{"decision":"accept"}'})


def blocked_words(n: int, texts: list[str]) -> list[str]:
    """n distinct random words (Latin and CJK, 3-12 characters), none found in the texts sent."""
    rng = random.Random(20261203)
    alphabet = "abcdefghijklmnopqrstuvwxy" + "".join(chr(c) for c in range(0x4E00, 0x4E00 + 200))
    words: set[str] = set()
    while len(words) < n:
        word = "".join(rng.choice(alphabet) for _ in range(rng.randint(3, 12)))
        if not any(word in t for t in texts):
            words.add(word)
    return sorted(words)


def call(port: int, method: str, path: str, secret: str, body: bytes | None = None) -> dict:
    url = f"http://127.0.0.1:{port}{path}&appKey={im.encrypt_appkey(secret)}"
    req = urllib.request.Request(url, data=body, method=method,
                                 headers={"Content-Type": "application/x-www-form-urlencoded"} if body else {})
    with urllib.request.urlopen(req, timeout=30) as r:
        answer = json.loads(r.read())
    if answer.get("code") != 200:
        raise RuntimeError(f"{method} {path}: {answer}")
    return answer


def seed(port: int, svc: str, secret: str, comments: int = 30) -> int:
    """A post with `comments` root comments on it; its id."""
    post = call(port, "POST", f"{PREFIX}/publish?svc={svc}", secret,
                f"author=bench_author&content={POST_TEXT}".encode())["data"]["post_id"]
    for i in range(comments):
        call(port, "POST", f"{PREFIX}/comments/publish?svc={svc}&post_id={post}&user_id=u{i}", secret,
             f"content={COMMENT_TEXT}".encode())
    return post


def templates(svc: str, post: int) -> dict[str, list[dict]]:
    q = f"?svc={svc}"
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    return {
        "publish": [{"method": "POST", "path": f"{PREFIX}/publish{q}", "headers": form,
                     "body": f"author=bench_author&title=hello&content={POST_TEXT}"}],
        "comment-publish": [{"method": "POST", "path": f"{PREFIX}/comments/publish{q}&post_id={post}"
                                                       "&user_id=bench_user", "headers": form,
                             "body": f"content={COMMENT_TEXT}"}],
        "getinfo": [{"method": "GET", "path": f"{PREFIX}/getinfo{q}&post_id={post}"}],
        "comment-page": [{"method": "GET", "path": f"{PREFIX}/comments/getinfo{q}&post_id={post}"
                                                    "&root_comment_id=0&limit=20"}],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=int, default=3, help="seconds per wrk run")
    parser.add_argument("--words", type=int, default=10_000)
    parser.add_argument("--only", default="off,words,hook", help="comparisons to run: off,words,hook")
    parser.add_argument("--output", default=str(BENCH / "results-moderation.json"))
    args = parser.parse_args()
    if not shutil.which("wrk"):
        print("wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    only = set(args.only.split(","))
    pin = shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
    if pin:
        os.sched_setaffinity(0, {1})
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="im-bench-moderation-"))
    servers: list[Server] = []
    pg = redis_server = None
    results: dict = {"words": args.words, "hook_ms": HOOK_DELAY_S * 1000, "rounds": args.rounds,
                     "duration_s": args.duration, "pinned": pin, "im_backend_sha256": hashlib.sha256((BENCH.parent / "im_backend.py").read_bytes()).hexdigest()}
    try:
        pg, db = embedded.start_postgres(workdir, keep_data=False)
        redis_server, redis_addr = embedded.start_redis(workdir)
        if pin:
            pin_tree([pg.get_pid(), redis_server.pid], [0])
        hook = Server("hook", "bench_moderation:hook_app", BENCH, dict(os.environ, BENCH_HOOK_MS=str(
            HOOK_DELAY_S * 1000)), workdir, "1" if pin else None, ready_path="/ready")
        servers.append(hook.start())
        secret = secrets.token_hex(8)
        boot = embedded.write_config(workdir, db, redis_addr, {svc: secret for svc in SERVICES},
                                     "server:\n  timeout: 30\n")
        words = blocked_words(args.words, [POST_TEXT, COMMENT_TEXT, "hello", "bench_author"])
        (workdir / "words.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
        import yaml
        app = yaml.safe_load((workdir / "app.yaml").read_text())
        whsec = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
        moderation = {"off": {"mode": "off"}, "post": {"mode": "post"},
                      "words": {"mode": "post", "words_file": "words.txt"},
                      "hooked": {"mode": "post", "hook": {"url": f"http://127.0.0.1:{hook.port}/check",
                                                          "secret": whsec, "timeout_ms": 2000}}}
        for entry in app["svc"]:
            if entry["name"] in moderation:
                entry["moderation"] = moderation[entry["name"]]
        (workdir / "app.yaml").write_text(yaml.safe_dump(app, sort_keys=False, allow_unicode=True))
        env = dict(os.environ, IM_CONF=str(boot), IM_LOG_LEVEL="warning")
        srv = Server("im", "im_backend:app", BENCH.parent, env, workdir, "0" if pin else None)
        servers.append(srv.start())
        posts = {svc: seed(srv.port, svc, secret) for svc in SERVICES}
        ns = argparse.Namespace(threads=1, connections=64, warmup=1, duration=args.duration)
        runner = Runner(ns, workdir, pin)
        runner.own_roots = [pg.get_pid(), redis_server.pid, hook.proc.pid]

        def subject(svc: str, kind: str) -> Subject:
            return Subject(f"{kind}@{svc}", srv, secret, templates(svc, posts[svc])[kind], pinned=pin)

        comparisons = []
        if "off" in only:
            comparisons += [("off", "plain", k) for k in ("publish", "comment-publish", "getinfo", "comment-page")]
        if "words" in only:
            comparisons += [("words", "off", k) for k in ("publish", "comment-page")]
            comparisons += [("words", "post", "publish"), ("post", "off", "publish")]  # the filter; mode post
        if "hook" in only:
            comparisons += [("hooked", "post", "publish")]
        for svc, base, kind in comparisons:
            paired = bench.paired_rounds(runner, subject(svc, kind), [subject(base, kind)], args.rounds)
            summary = paired.summary()
            ratio = summary["ratios"][f"{kind}@{svc}/{kind}@{base}"]
            results[f"{kind}: {svc}/{base}"] = {"ratio": ratio, "rps_median": summary["rps_median"]}
            log(f"{kind}: {svc}/{base} = {ratio['median']:.3f} [{ratio['min']:.3f}-{ratio['max']:.3f}]  "
                f"{summary['rps_median']}")
        if "hook" in only:  # the hook's latency as the server saw it (every call of the runs above)
            metrics = urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/metrics", timeout=30).read().decode()
            total = {m.group(1): float(m.group(2)) for m in re.finditer(
                r"^im_moderation_hook_seconds_(sum|count)\S* (\S+)$", metrics, re.M)}
            if total.get("count"):
                results["hook_seen_by_server_ms"] = round(1000 * total["sum"] / total["count"], 2)
                log(f"hook: {total['count']:.0f} calls, {results['hook_seen_by_server_ms']} ms each on average")
        results["errors"] = sum(r["errors"] for r in runner.results)
    finally:
        bench.teardown(servers, redis_server, pg, workdir)
    pathlib.Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    print("(figures from a shared, busy machine are noisy; compare the paired ratios, rerun on a quiet one)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
