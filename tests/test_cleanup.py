"""The durable clean-up queue: deletes answer at once, garbage goes in the background, nothing is lost."""
import asyncio
import collections
import contextlib
import itertools
import re
import signal
import time

import asyncpg
import httpx

from conftest import SECRET, Api, app_config, eventually, svc_name

BULK_IDS = itertools.count()


async def garbage(db: asyncpg.Connection, svc: str, post_id: int, comment_ids: list[int]) -> dict[str, int]:
    """What is left of a deleted post: its comments, its likes, the likes of its comments, queued work."""
    return {
        "comments": await db.fetchval(f'SELECT count(*) FROM "{svc}_post_comment_info" WHERE post_id = $1', post_id),
        "post_likes": await db.fetchval(f'SELECT count(*) FROM "{svc}_post_like" WHERE post_id = $1', post_id),
        "comment_likes": await db.fetchval(f'SELECT count(*) FROM "{svc}_comment_like" WHERE comment_id = ANY($1)',
                                           comment_ids),
        "queue": await db.fetchval(f'SELECT count(*) FROM "{svc}_cleanup_queue"'),
    }


async def all_gone(db, svc, post_id, comment_ids):
    return not any((await garbage(db, svc, post_id, comment_ids)).values())


async def populate(api: Api, db: asyncpg.Connection, comments: int, likes: int, replies: int = 0) -> tuple[int, list]:
    """A post with comments, replies, post likes and comment likes (likes written with COPY for speed)."""
    post_id = await api.publish("owner", "doomed")
    ids = [await api.comment(post_id, f"u{i}") for i in range(min(comments, 5))]
    root = ids[0]
    ids += [await api.reply(post_id, root, root) for _ in range(replies)]
    svc = api.svc
    if comments > 5:  # the rest straight into the table, as many as asked
        base = (int(time.time()) << 32) | 0xF0000000  # above any id the Redis counter will reach here
        extra = [(base + next(BULK_IDS), f"bulk{i}", post_id, "bulk") for i in range(comments - 5)]
        await db.copy_records_to_table(f"{svc}_post_comment_info", records=extra,
                                       columns=["id", "user_id", "post_id", "content"])
        ids += [row[0] for row in extra]
    await db.copy_records_to_table(f"{svc}_post_like", records=[(post_id, f"fan{i}") for i in range(likes)],
                                   columns=["post_id", "user_id"])
    await db.copy_records_to_table(f"{svc}_comment_like",
                                   records=[(ids[i % len(ids)], f"fan{i}", post_id) for i in range(likes)],
                                   columns=["comment_id", "user_id", "post_id"])
    return post_id, ids


async def test_delete_post_cleans_everything_and_nothing_else(api, api_b, db):
    svc = api.svc
    post_id, comment_ids = await populate(api, db, comments=40, likes=70, replies=3)
    await api.ok("PUT", "/like", {"post_id": post_id, "user_id": "via-api"}, json={"like": True})
    await api.ok("GET", "/getlike", {"post_id": post_id})  # cached count must go too
    # what must survive: another post with its comment and likes, comments on an external id, another tenant
    keep_post = await api.publish()
    keep_comment = await api.comment(keep_post)
    await api.ok("PUT", "/like", {"post_id": keep_post, "user_id": "x"}, json={"like": True})
    await api.ok("PUT", "/comments/like", {"post_id": keep_post, "comment_id": keep_comment, "user_id": "x"},
                 json={"like": True})
    external = await api.comment(4242424242)
    other_tenant_post = await api_b.publish()
    await api_b.comment(other_tenant_post)

    before = await garbage(db, svc, post_id, comment_ids)
    assert (before["comments"], before["post_likes"], before["comment_likes"]) == (len(comment_ids), 71, 70), before
    # The answer comes before the clean-up: with the three tables the clean-up deletes from locked against
    # writes (SHARE) by this connection, the delete still answers (it writes none of them), while every comment and
    # like is still there and its job waits in the queue; a delete that cleaned up itself would wait for the lock
    # (and time out).
    tables = [f"{svc}_post_comment_info", f"{svc}_post_like", f"{svc}_comment_like"]
    async with db.transaction():
        await db.execute("LOCK TABLE " + ", ".join(f'"{table}"' for table in tables) + " IN SHARE MODE")
        delete = asyncio.ensure_future(api.ok("DELETE", "/delete", {"post_id": post_id, "user_id": "owner"}))
        done, _ = await asyncio.wait([delete], timeout=30)
        if not done:
            delete.cancel()
            with contextlib.suppress(BaseException):
                await delete
        assert done, "the delete did not answer while the comments and likes could not be deleted"
        delete.result()
        during = await garbage(db, svc, post_id, comment_ids)
        assert {k: during[k] for k in ("comments", "post_likes", "comment_likes")} == \
            {k: before[k] for k in ("comments", "post_likes", "comment_likes")}, (before, during)
        assert await db.fetchval(f'SELECT count(*) FROM "{svc}_cleanup_queue" WHERE kind = $1 AND target_id = $2',
                                 "post", post_id) == 1

        async def clean_up_waits_for_the_lock() -> bool:  # the background clean-up has started on this post
            return await db.fetchval("SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = ANY("
                                     "SELECT oid FROM pg_class WHERE relname = ANY($1))", tables) > 0
        assert await eventually(clean_up_waits_for_the_lock, timeout=20)
    assert await eventually(lambda: all_gone(db, svc, post_id, comment_ids), timeout=20), \
        await garbage(db, svc, post_id, comment_ids)
    assert (await api.ok("GET", "/getlike", {"post_id": post_id}))["like"] == 0
    assert (await api.ok("GET", "/getlike", {"post_id": keep_post}))["like"] == 1
    assert (await api.ok("GET", "/comments/getlike", {"comment_ids": str(keep_comment)}))["likes"] == [1]
    left = (await api.ok("GET", "/comments/getinfo", {"post_id": 4242424242, "root_comment_id": 0}))["comments"]
    assert [c["id"] for c in left] == [external]
    assert len((await api_b.ok("GET", "/comments/getinfo", {"post_id": other_tenant_post, "root_comment_id": 0}))
               ["comments"]) == 1


async def test_delete_comment_cleans_the_likes_of_its_subtree(api, db):
    post_id = await api.publish()
    root = await api.comment(post_id)
    reply = await api.reply(post_id, root, root)
    keep = await api.comment(post_id)
    for cid in (root, reply, keep):
        for user in ("a", "b"):
            await api.ok("PUT", "/comments/like", {"post_id": post_id, "comment_id": cid, "user_id": user},
                         json={"like": True})
    assert (await api.ok("GET", "/comments/getlike", {"comment_ids": f"{root},{reply}"}))["likes"] == [2, 2]
    await api.ok("DELETE", "/comments/delete", {"comment_id": root, "user_id": "u1"})

    async def likes_gone():
        return await db.fetchval(f'SELECT count(*) FROM "{api.svc}_comment_like" WHERE comment_id = ANY($1)',
                                 [root, reply]) == 0
    assert await eventually(likes_gone)
    counts = await eventually(lambda: _likes_are(api, f"{root},{reply},{keep}", [0, 0, 2]))
    assert counts


async def _likes_are(api, ids, expected):
    return (await api.ok("GET", "/comments/getlike", {"comment_ids": ids}))["likes"] == expected


def clean_config(backing, svc, batch):
    return app_config(backing, {svc: SECRET}, clean={"commentbatch": batch, "postlikebatch": batch,
                                                     "commentlikebatch": batch, "interval": 1})


async def test_clean_up_survives_sigkill(make_server, backing, db):
    svc = svc_name("crash")
    srv = make_server("crash", clean_config(backing, svc, batch=1))
    async with httpx.AsyncClient(base_url=srv.url, timeout=10) as client:
        api = Api(client, svc, SECRET)
        post_id, comment_ids = await populate(api, db, comments=400, likes=400)
        await api.ok("DELETE", "/delete", {"post_id": post_id, "user_id": "owner"})
        srv.stop(signal.SIGKILL)
    left = await garbage(db, svc, post_id, comment_ids)
    assert left["queue"] > 0 and left["comments"] > 0, left  # killed before it could finish (batches of 1)
    srv.write_config(clean_config(backing, svc, batch=50))
    srv.start()
    assert await eventually(lambda: all_gone(db, svc, post_id, comment_ids), timeout=30), \
        await garbage(db, svc, post_id, comment_ids)


async def test_two_processes_share_the_queue_each_row_once(make_server, backing, db):
    svc = svc_name("pair")
    servers = [make_server(f"pair{i}", clean_config(backing, svc, batch=7)) for i in range(2)]
    apis = [Api(httpx.AsyncClient(base_url=s.url, timeout=10), svc, SECRET) for s in servers]
    try:
        posts = {}
        for i in range(6):
            post_id, comment_ids = await populate(apis[i % 2], db, comments=60, likes=50)
            posts[post_id] = comment_ids
        await asyncio.gather(*(apis[i % 2].ok("DELETE", "/delete", {"post_id": p, "user_id": "owner"})
                               for i, p in enumerate(posts)))
        for post_id, comment_ids in posts.items():
            assert await eventually(lambda p=post_id, c=comment_ids: all_gone(db, svc, p, c), timeout=30)
    finally:
        for a in apis:
            await a.client.aclose()
        for s in servers:
            s.stop()
    # every comment and post like was removed exactly once, by one process or the other
    removed = collections.Counter()
    pattern = re.compile(rf"clean-up {svc}: post (\d+) lost (\d+) comments and (\d+) likes")
    for s in servers:
        for post_id, comments, likes in pattern.findall(s.log()):
            removed[int(post_id)] += int(comments) + int(likes)
    assert removed == {post_id: 60 + 50 for post_id in posts}
