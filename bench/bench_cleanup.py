"""Delete latency and background clean-up time for a large post (issue: durable clean-up queue).

    .venv/bin/python bench/bench_cleanup.py [--comments 20000] [--likes 20000] [--batches 30,500]

For each batch size: start an embedded PostgreSQL + Redis and one server process, load a post with N comments,
N post likes and N comment likes (COPY), then time the DELETE request and the clean-up until every related row
and queue entry is gone. Prints the timings; asserts nothing about them.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time

import asyncpg
import httpx

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

import embedded  # noqa: E402
import im_backend  # noqa: E402

SVC, SECRET = "bench", "W7K8pJ3aQv2LcXgH"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def measure(work: pathlib.Path, db_cfg: dict, redis_addr: str, n_comments: int, n_likes: int,
                  batch: int) -> dict:
    run_dir = work / f"batch{batch}"
    run_dir.mkdir()
    boot = embedded.write_config(run_dir, db_cfg, redis_addr, {SVC: SECRET})
    app_yaml = (run_dir / "app.yaml").read_text().replace(
        "commentbatch: 30\n  postlikebatch: 30\n  commentlikebatch: 30",
        f"commentbatch: {batch}\n  postlikebatch: {batch}\n  commentlikebatch: {batch}")
    (run_dir / "app.yaml").write_text(app_yaml)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "uvicorn", "im_backend:app", "--port", str(port),
                               "--log-level", "warning", "--no-access-log"], cwd=ROOT,
                              env=dict(os.environ, IM_CONF=str(boot), IM_LOG_LEVEL="warning"))
    conn = await asyncpg.connect(host=db_cfg["host"], port=db_cfg["port"], user=db_cfg["user"],
                                 database=db_cfg["dbname"])
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            for _ in range(300):
                try:
                    if (await client.get("/readyz")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.1)

            def auth(**params):
                return {"svc": SVC, "appKey": im_backend.encrypt_appkey(SECRET), **params}

            post_id = (await client.post("/api/v1/posts/publish", params=auth(),
                                         data={"author": "owner", "content": "big"})).json()["data"]["post_id"]
            base = (post_id >> 32 << 32) | 0x80000000
            comment_ids = [base + i for i in range(n_comments)]
            started = time.perf_counter()
            await conn.copy_records_to_table(f"{SVC}_post_comment_info", columns=["id", "user_id", "post_id", "content"],
                                             records=[(cid, f"u{i}", post_id, "c") for i, cid in enumerate(comment_ids)])
            await conn.copy_records_to_table(f"{SVC}_post_like", columns=["post_id", "user_id"],
                                             records=[(post_id, f"fan{i}") for i in range(n_likes)])
            await conn.copy_records_to_table(f"{SVC}_comment_like", columns=["comment_id", "user_id", "post_id"],
                                             records=[(comment_ids[i % n_comments], f"fan{i}", post_id)
                                                      for i in range(n_likes)])
            load_s = time.perf_counter() - started

            started = time.perf_counter()
            response = await client.delete("/api/v1/posts/delete", params=auth(post_id=post_id, user_id="owner"))
            delete_ms = (time.perf_counter() - started) * 1000
            assert response.json()["code"] == 200, response.text
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                left = await conn.fetchval(
                    f'SELECT (SELECT count(*) FROM "{SVC}_post_comment_info" WHERE post_id = $1)'
                    f' + (SELECT count(*) FROM "{SVC}_post_like" WHERE post_id = $1)'
                    f' + (SELECT count(*) FROM "{SVC}_comment_like" WHERE post_id = $1)'
                    f' + (SELECT count(*) FROM "{SVC}_cleanup_queue")', post_id)
                if left == 0:
                    break
                await asyncio.sleep(0.05)
            clean_s = time.perf_counter() - started
        return {"batch": batch, "load_s": load_s, "delete_ms": delete_ms, "clean_s": clean_s, "left": left}
    finally:
        await conn.execute(f'DROP TABLE IF EXISTS "{SVC}_post_info", "{SVC}_post_comment_info", "{SVC}_post_like",'
                           f' "{SVC}_comment_like", "{SVC}_cleanup_queue"')
        await conn.close()
        server.terminate()
        server.wait(20)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comments", type=int, default=20000)
    parser.add_argument("--likes", type=int, default=20000)
    parser.add_argument("--batches", default="30,500")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="im_bench_cleanup_") as tmp:
        work = pathlib.Path(tmp)
        pg, db_cfg = embedded.start_postgres(work / "data", keep_data=False)
        redis_server, redis_addr = embedded.start_redis(work / "data")
        print(f"post with {args.comments} comments, {args.likes} post likes, {args.likes} comment likes")
        print(f"{'batch':>6} {'load (COPY)':>12} {'DELETE answered':>16} {'clean-up done':>14}")
        for batch in (int(b) for b in args.batches.split(",")):
            r = await measure(work, db_cfg, redis_addr, args.comments, args.likes, batch)
            print(f"{r['batch']:>6} {r['load_s']:>11.2f}s {r['delete_ms']:>14.1f}ms {r['clean_s']:>13.2f}s"
                  + ("" if r["left"] == 0 else f"  ({r['left']} rows left!)"), flush=True)
        del pg, redis_server


if __name__ == "__main__":
    asyncio.run(main())
