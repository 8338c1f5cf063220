"""Likes of posts and comments: idempotent set/unset, counts, caching rules, concurrency."""
import asyncio

from conftest import expect, redis_client, stored_count, table_counts


async def test_like_post_idempotent(api):
    post_id = await api.publish()
    assert (await api.ok("GET", "/getlike", {"post_id": post_id}))["like"] == 0
    for _ in range(2):  # liking twice is success (the Go version answered 10003)
        await api.ok("PUT", "/like", {"post_id": post_id, "user_id": "u1"}, json={"like": True})
    await api.ok("PUT", "/like", {"post_id": post_id, "user_id": "u2"}, json={"like": True})
    assert (await api.ok("GET", "/getlike", {"post_id": post_id}))["like"] == 2
    for _ in range(2):  # un-liking what is not liked is success (the Go version answered 10005)
        await api.ok("PUT", "/like", {"post_id": post_id, "user_id": "u1"}, json={"like": False})
    assert (await api.ok("GET", "/getlike", {"post_id": post_id}))["like"] == 1


async def test_like_json_sent_as_form_content_type(api, client):
    """curl -d '{"like":true}' labels the body urlencoded; the Go version bound it as JSON anyway."""
    post_id = await api.publish()
    await api.ok("PUT", "/like", {"post_id": post_id, "user_id": "u1"}, content=b'{"like":true}',
                 headers={"content-type": "application/x-www-form-urlencoded"})
    assert (await api.ok("GET", "/getlike", {"post_id": post_id}))["like"] == 1


async def test_like_unknown_post_writes_nothing(api, db):
    before = await table_counts(db, api.svc)
    expect(await api.call("PUT", "/like", {"post_id": 31337, "user_id": "u1"}, json={"like": True}), 10006)
    expect(await api.call("PUT", "/like", {"post_id": 31337, "user_id": "u1"}, json={"like": False}), 10006)
    assert await table_counts(db, api.svc) == before
    assert (await api.ok("GET", "/getlike", {"post_id": 31337}))["like"] == 0


async def test_like_body_errors(api):
    post_id = await api.publish()
    params = {"post_id": post_id, "user_id": "u1"}
    for body in ({"like": "true"}, {"like": 1}, {}, {"liked": True}):
        expect(await api.call("PUT", "/like", params, json=body), 400, "bind param failed")
    expect(await api.call("PUT", "/like", params, content=b'{"like":tru', headers={"content-type": "application/json"}),
           400, "bind param failed")
    expect(await api.call("PUT", "/like", params, json=[True]), 400, "bind param failed")


async def test_comment_likes(api, db):
    post_id = await api.publish()
    c1, c2 = await api.comment(post_id), await api.comment(post_id)
    for user in ("u1", "u2", "u3"):
        await api.ok("PUT", "/comments/like", {"post_id": post_id, "comment_id": c1, "user_id": user},
                     json={"like": True})
    await api.ok("PUT", "/comments/like", {"post_id": post_id, "comment_id": c2, "user_id": "u1"}, json={"like": True})
    await api.ok("PUT", "/comments/like", {"post_id": post_id, "comment_id": c2, "user_id": "u1"}, json={"like": True})
    data = await api.ok("GET", "/comments/getlike", content=f'{{"comment_ids":[{c2},{c1},777]}}'.encode(),
                        headers={"content-type": "application/json"})
    assert data == {"likes": [1, 3, 0]}
    await api.ok("PUT", "/comments/like", {"post_id": post_id, "comment_id": c1, "user_id": "u3"},
                 json={"like": False})
    # query-parameter extension, comma-separated and repeated
    assert (await api.ok("GET", "/comments/getlike", {"comment_ids": f"{c1},{c2}"}))["likes"] == [2, 1]
    assert (await api.ok("GET", "/comments/getlike", [("comment_ids", c1), ("comment_ids", c1)]))["likes"] == [2, 2]
    stored = await db.fetchval(f'SELECT post_id FROM "{api.svc}_comment_like" WHERE comment_id = $1', c2)
    assert stored == post_id


async def test_comment_getlike_empty_is_null(api):
    assert await api.ok("GET", "/comments/getlike") is None
    assert await api.ok("GET", "/comments/getlike", json={"comment_ids": []}) is None


async def test_comment_like_errors(api, db):
    post_id, other = await api.publish(), await api.publish()
    cid = await api.comment(post_id)
    before = await table_counts(db, api.svc)
    expect(await api.call("PUT", "/comments/like", {"post_id": post_id, "comment_id": 4040, "user_id": "u"},
                          json={"like": True}), 10006)
    expect(await api.call("PUT", "/comments/like", {"post_id": other, "comment_id": cid, "user_id": "u"},
                          json={"like": True}), 400, "something of params is wrong")
    expect(await api.call("GET", "/comments/getlike", json={"comment_ids": ["x"]}), 400, "bind param failed")
    expect(await api.call("GET", "/comments/getlike", json={"comment_ids": 5}), 400, "bind param failed")
    assert await table_counts(db, api.svc) == before


async def test_concurrent_likes_give_exact_count(api):
    post_id = await api.publish()
    cid = await api.comment(post_id)
    await api.ok("GET", "/getlike", {"post_id": post_id})  # a cached count must not survive the likes
    users = [f"user{i}" for i in range(80)]
    await asyncio.gather(*(api.ok("PUT", "/like", {"post_id": post_id, "user_id": u}, json={"like": True})
                           for u in users + users[:20]))
    await asyncio.gather(*(api.ok("PUT", "/comments/like", {"post_id": post_id, "comment_id": cid, "user_id": u},
                                  json={"like": True}) for u in users))
    assert (await api.ok("GET", "/getlike", {"post_id": post_id}))["like"] == 80
    assert (await api.ok("GET", "/comments/getlike", {"comment_ids": str(cid)}))["likes"] == [80]


async def test_hot_counter_is_left_to_expire(api, server, backing):
    """A cached count >= 10000 is not invalidated by a like (it expires by itself)."""
    post_id = await api.publish()
    r = redis_client(backing["cache"])
    key = f"svc:{api.svc}:post:{post_id}:like"
    await r.set(key, 12000, ex=60)
    await api.ok("PUT", "/like", {"post_id": post_id, "user_id": "u1"}, json={"like": True})
    assert (await api.ok("GET", "/getlike", {"post_id": post_id}))["like"] == 12000
    await r.set(key, 5, ex=60)  # a cold counter is invalidated
    await api.ok("PUT", "/like", {"post_id": post_id, "user_id": "u2"}, json={"like": True})
    assert (await api.ok("GET", "/getlike", {"post_id": post_id}))["like"] == 2
    assert 300 <= await r.ttl(key) < 450  # postlike_expire 300 with jitter in [1, 1.5)
    await r.aclose()


async def test_like_counter_matches_the_rows_under_concurrent_likes_and_unlikes(api, db):
    """The counter maintained in each like's transaction equals count(*) after a concurrent storm."""
    post_id = await api.publish()
    cid = await api.comment(post_id)
    assert (await api.ok("GET", "/getlike", {"post_id": post_id}))["like"] == 0  # creates the counter
    assert (await api.ok("GET", "/comments/getlike", {"comment_ids": str(cid)}))["likes"] == [0]
    users = [f"user{i}" for i in range(40)]
    calls = []
    for i, user in enumerate(users * 2):
        like = i < len(users) or i % 3 == 0  # like everybody, then unlike two thirds of them
        calls.append(api.ok("PUT", "/like", {"post_id": post_id, "user_id": user}, json={"like": like}))
        calls.append(api.ok("PUT", "/comments/like", {"post_id": post_id, "comment_id": cid, "user_id": user},
                            json={"like": like}))
    await asyncio.gather(*calls[::2])
    await asyncio.gather(*calls[1::2])
    rows = await db.fetchval(f'SELECT count(*) FROM "{api.svc}_post_like" WHERE post_id = $1', post_id)
    counter = await stored_count(db, api.svc, "post", post_id)  # base + slots
    comment_rows = await db.fetchval(f'SELECT count(*) FROM "{api.svc}_comment_like" WHERE comment_id = $1', cid)
    comment_counter = await stored_count(db, api.svc, "comment", cid)
    assert 0 < rows == counter and 0 < comment_rows == comment_counter
    assert (await api.ok("GET", "/getlike", {"post_id": post_id}))["like"] == rows
    assert (await api.ok("GET", "/comments/getlike", {"comment_ids": str(cid)}))["likes"] == [comment_rows]


async def test_missing_counter_is_rebuilt_from_the_rows(api, db):
    """Likes written without a counter (by the Go version, or a counter lost) are counted once."""
    post_id = await api.publish()
    await db.executemany(f'INSERT INTO "{api.svc}_post_like" (post_id, user_id) VALUES ($1, $2)',
                         [(post_id, f"go{i}") for i in range(7)])
    assert (await api.ok("GET", "/getlike", {"post_id": post_id}))["like"] == 7
    await api.ok("PUT", "/like", {"post_id": post_id, "user_id": "new"}, json={"like": True})
    assert (await api.ok("GET", "/getlike", {"post_id": post_id}))["like"] == 8
