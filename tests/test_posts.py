"""Posts: publish, getinfo, update, delete, getlist — over HTTP against the real servers."""
import asyncio
import datetime as dt
import re
import time

import pytest

from conftest import expect, redis_client


async def test_publish_urlencoded_and_read_back(api):
    post_id = await api.publish("alice", "hello world", title="T1", extra='{"image":"x.png"}')
    data = await api.ok("GET", "/getinfo", {"post_id": post_id})
    post = data["post"]
    assert post["id"] == post_id and post["content"] == "hello world" and post["author"] == "alice"
    assert post["title"] == "T1" and post["svc"] == api.svc and post["extra"] == {"image": "x.png"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", post["time"])
    assert set(post) == {"id", "title", "content", "author", "time", "svc", "extra"}


async def test_publish_multipart_and_json(api):
    multi = await api.ok("POST", "/publish", files={"author": (None, "bob"), "content": (None, "multi 中文")})
    as_json = await api.ok("POST", "/publish", json={"author": "carol", "content": "j", "extra": {"k": [1, 2]}})
    as_json_string_extra = await api.ok("POST", "/publish", json={"author": "d", "content": "j", "extra": '{"k":1}'})
    assert (await api.ok("GET", "/getinfo", {"post_id": multi["post_id"]}))["post"]["content"] == "multi 中文"
    assert (await api.ok("GET", "/getinfo", {"post_id": as_json["post_id"]}))["post"]["extra"] == {"k": [1, 2]}
    post = (await api.ok("GET", "/getinfo", {"post_id": as_json_string_extra["post_id"]}))["post"]
    assert post["extra"] == {"k": 1} and post["title"] == ""


async def test_time_is_in_shanghai(api, db):
    post_id = await api.publish()
    created = await db.fetchval(f'SELECT created_at FROM "{api.svc}_post_info" WHERE id = $1', post_id)
    post = (await api.ok("GET", "/getinfo", {"post_id": post_id}))["post"]
    shanghai = created.astimezone(dt.timezone(dt.timedelta(hours=8))).strftime("%Y-%m-%dT%H:%M:%S")
    assert post["time"] == shanghai


async def test_ids_follow_the_go_scheme_and_counter(api, server, backing):
    before = int(time.time())
    post_id = await api.publish()
    assert before - 2 <= post_id >> 32 <= before + 2
    client = redis_client(backing["cache"])
    counter = int(await client.get(f"post_id:{api.svc}"))
    await client.aclose()
    assert post_id & 0xFFFFFFFF == counter & 0xFFFFFFFF


async def test_writes_sent_together_each_take_one_incr_of_the_counter(api, backing):
    """Ids of writes that arrive together (their INCRs go to Redis in one pipeline) are distinct and take the
    counter's values one by one: as many INCRs as ids, none lost, none shared."""
    post = await api.publish()
    root = await api.comment(post)
    client = redis_client(backing["cache"])
    try:
        before = int(await client.get(f"comment_id:{api.svc}"))
        ids = await asyncio.gather(*(api.comment(post, f"u{i}") for i in range(40)),
                                   *(api.reply(post, root, root, f"r{i}") for i in range(40)))
        after = int(await client.get(f"comment_id:{api.svc}"))
    finally:
        await client.aclose()
    assert after - before == 80
    assert sorted(i & 0xFFFFFFFF for i in ids) == list(range(before + 1, after + 1))


async def test_getinfo_unknown_post(api):
    expect(await api.call("GET", "/getinfo", {"post_id": 12345}), 10006, "find data failed")


async def test_update_post(api):
    post_id = await api.publish("alice", "v1", extra='{"a":1}')
    await api.ok("GET", "/getinfo", {"post_id": post_id})  # fill the cache
    await api.ok("PUT", "/update", {"post_id": post_id, "user_id": "alice"}, data={"content": "v2"})
    post = (await api.ok("GET", "/getinfo", {"post_id": post_id}))["post"]
    assert post["content"] == "v2" and post["extra"] == {"a": 1}  # only the given field changed
    await api.ok("PUT", "/update", {"post_id": post_id, "user_id": "alice"}, data={"extra": '{"b":2}'})
    post = (await api.ok("GET", "/getinfo", {"post_id": post_id}))["post"]
    assert post["content"] == "v2" and post["extra"] == {"b": 2}
    await api.ok("PUT", "/update", {"post_id": post_id, "user_id": "alice"}, json={"title": "new title"})
    assert (await api.ok("GET", "/getinfo", {"post_id": post_id}))["post"]["title"] == "new title"


async def test_update_errors(api):
    post_id = await api.publish("alice", "v1")
    expect(await api.call("PUT", "/update", {"post_id": post_id, "user_id": "mallory"}, data={"content": "x"}),
           10014, "no right record found")
    expect(await api.call("PUT", "/update", {"post_id": post_id, "user_id": "alice"}), 10016, "update query is empty")
    expect(await api.call("PUT", "/update", {"post_id": 999, "user_id": "alice"}, data={"content": "x"}), 10006)
    expect(await api.call("PUT", "/update", {"post_id": post_id}, data={"content": "x"}), 400, "bind param failed")
    assert (await api.ok("GET", "/getinfo", {"post_id": post_id}))["post"]["content"] == "v1"


async def test_delete_post(api):
    post_id = await api.publish("alice")
    await api.ok("GET", "/getinfo", {"post_id": post_id})
    expect(await api.call("DELETE", "/delete", {"post_id": post_id, "user_id": "bob"}), 10014)
    await api.ok("GET", "/getinfo", {"post_id": post_id})
    await api.ok("PUT", "/like", {"post_id": post_id, "user_id": "fan"}, json={"like": True})
    assert (await api.ok("GET", "/getlike", {"post_id": post_id}))["like"] == 1  # now cached
    assert await api.ok("DELETE", "/delete", {"post_id": post_id, "user_id": "alice"}) is None
    expect(await api.call("GET", "/getinfo", {"post_id": post_id}), 10006)
    assert (await api.ok("GET", "/getlike", {"post_id": post_id}))["like"] == 0  # at once, before the clean-up
    expect(await api.call("DELETE", "/delete", {"post_id": post_id, "user_id": "alice"}), 10006)


async def test_getlist_newest_first_with_cursor_and_limit(api_b):
    api = api_b
    ids = []
    for i in range(5):
        ids.append(await api.publish(content=f"p{i}"))
        await asyncio.sleep(0.01)
    newest = (await api.ok("GET", "/getlist", {"limit": 3}))["post_list"]
    assert newest == ids[::-1][:3]
    everything = (await api.ok("GET", "/getlist", {"limit": 100}))["post_list"]
    assert everything[:5] == ids[::-1]
    future = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%S")
    assert (await api.ok("GET", "/getlist", {"cursor": future, "limit": 2}))["post_list"] == ids[::-1][:2]
    assert (await api.ok("GET", "/getlist", {"cursor": "1949-10-01T00:00:00"}))["post_list"] == []
    default_limit = (await api.ok("GET", "/getlist", {"limit": 0}))["post_list"]
    assert len(default_limit) == min(20, len(everything))


async def test_getlist_limit_is_capped(api, db):
    # more posts than the cap (server.max_limit, 100 by default), written directly and an hour old so that
    # they stay out of the way of the other tests' newest-first pages
    await db.executemany(f'INSERT INTO "{api.svc}_post_info" (id, content, title, author, created_at) '
                         "VALUES ($1, 'bulk', '', 'bulk', now() - interval '1 hour')",
                         [(1_000_000 + i,) for i in range(105)])
    for limit in (101, 1000000):
        assert len((await api.ok("GET", "/getlist", {"limit": limit}))["post_list"]) == 100


async def test_getlist_next_cursor_pages_through_everything(api_b):
    api = api_b
    ids = [await api.publish(content=f"n{i}") for i in range(5)]
    first = await api.ok("GET", "/getlist", {"limit": 3})
    assert first["post_list"] == ids[::-1][:3]
    second = await api.ok("GET", "/getlist", {"limit": 3, "cursor": first["next_cursor"]})
    assert second["post_list"][:2] == ids[::-1][3:]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", second["next_cursor"])
    empty = await api.ok("GET", "/getlist", {"cursor": "1949-10-01T00:00:00"})
    assert empty == {"post_list": [], "next_cursor": None}


@pytest.mark.parametrize("cursor", ["2030-01-01T00:00:00", "2030-01-01T00:00:00Z", "2030-01-01T00:00:00.123456Z",
                                    "2030-01-01T08:00:00+08:00", "2030-01-01 00:00:00"])
async def test_getlist_cursor_formats(api, cursor):
    await api.publish()
    assert len((await api.ok("GET", "/getlist", {"cursor": cursor, "limit": 1}))["post_list"]) == 1


async def test_tenants_are_isolated(api, api_b):
    post_a = await api.publish("alice", "only in a")
    expect(await api_b.call("GET", "/getinfo", {"post_id": post_a}), 10006)
    assert post_a not in (await api_b.ok("GET", "/getlist", {"limit": 100}))["post_list"]
    expect(await api_b.call("DELETE", "/delete", {"post_id": post_a, "user_id": "alice"}), 10006)
    assert (await api.ok("GET", "/getinfo", {"post_id": post_a}))["post"]["content"] == "only in a"


async def test_concurrent_publishes_get_distinct_ids(api):
    ids = await asyncio.gather(*(api.publish(content=f"c{i}") for i in range(60)))
    assert len(set(ids)) == 60
