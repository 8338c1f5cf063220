"""Reactions: kinds besides the like, `like` being the like itself, unique mode, exact per-kind counts under
concurrency over two server processes, reaction fields on reads, who reacted, events, hot reload.
Real PostgreSQL and Redis, real HTTP servers."""
from __future__ import annotations

import asyncio
import json
import random

import httpx
import pytest
import pytest_asyncio

import im_backend
from conftest import SECRET, Api, entries_config, eventually, stored_count, svc_name

BIND = "bind param failed"
MANY, ONE, PLAIN = (svc_name(n) for n in ("rmany", "rone", "rplain"))
KINDS = ["like", "love", "wow"]


def reactions_config(backing: dict) -> dict:
    return entries_config(backing, [
        {"name": MANY, "secret": SECRET, "reactions": {"kinds": ["love", "wow"]}},
        {"name": ONE, "secret": SECRET, "reactions": {"kinds": ["love", "wow"], "unique": True}},
        {"name": PLAIN, "secret": SECRET}])


@pytest.fixture(scope="module")
def servers(workdir, backing):
    """Two server processes on one database."""
    from conftest import Server
    started = [Server(workdir / name, reactions_config(backing)).start() for name in ("react-a", "react-b")]
    yield started
    for srv in started:
        srv.stop()


@pytest_asyncio.fixture
async def clients(servers):
    async with httpx.AsyncClient(base_url=servers[0].url, timeout=60) as a, \
            httpx.AsyncClient(base_url=servers[1].url, timeout=60) as b:
        yield a, b


def apis(clients, svc: str) -> tuple[Api, Api]:
    return Api(clients[0], svc, SECRET), Api(clients[1], svc, SECRET)


async def react(api: Api, post_id: int, user: str, kind: str, on: bool = True, comment_id: int | None = None):
    params = {"post_id": post_id, "user_id": user, **({"comment_id": comment_id} if comment_id else {})}
    return await api.call("PUT", "/react", params, json={"kind": kind, "on": on})


async def ok_react(api: Api, post_id: int, user: str, kind: str, on: bool = True, comment_id: int | None = None):
    status, body = await react(api, post_id, user, kind, on, comment_id)
    assert (status, body) == (200, {"code": 200, "msg": "success", "data": None}), body


async def post_of(api: Api, post_id: int, viewer: str | None = None) -> dict:
    params = {"post_id": post_id, "counts": 1, **({"viewer": viewer} if viewer else {})}
    return (await api.ok("GET", "/getinfo", params))["post"]


async def events(db, svc: str, types: tuple[str, ...], post_id: int) -> list[tuple[str, dict]]:
    rows = await db.fetch(f'SELECT type, data FROM "{svc}_events" WHERE type = ANY($1::text[]) AND post_id = $2 '
                          "ORDER BY id", list(types), post_id)
    return [(row["type"], json.loads(row["data"]) if isinstance(row["data"], str) else row["data"])
            for row in rows]


def test_configuration_validated():
    base = "db: {host: x}\nsvc: [{name: s1, secret: W7K8pJ3aQv2LcXgH%s}]\n"
    assert im_backend.parse_app_config(base % "").tenants["s1"].reactions is None
    cfg = im_backend.parse_app_config(base % ", reactions: {kinds: [love]}")
    assert cfg.tenants["s1"].reactions == im_backend.ReactionsConfig(("like", "love"), False)
    top = im_backend.parse_app_config("reactions: {kinds: [wow], unique: true}\n" + base % "")
    assert top.tenants["s1"].reactions == im_backend.ReactionsConfig(("like", "wow"), True)
    for bad in ("{kinds: [Love]}", "{kinds: [%s]}" % ",".join(f"k{i}" for i in range(16)), "{unique: maybe}",
                "{kinds: love}", "[like]"):
        with pytest.raises(im_backend.ConfigError):
            im_backend.parse_app_config(base % f", reactions: {bad}")
    assert im_backend.parse_app_config(
        base % ", reactions: {kinds: [%s]}" % ",".join(f"k{i}" for i in range(15))).tenants["s1"].reactions


async def test_react_is_idempotent_counted_and_evented(clients, db):
    a, b = apis(clients, MANY)
    post_id = await a.publish(author="ann")
    await ok_react(a, post_id, "u1", "love")
    await ok_react(b, post_id, "u1", "love")  # twice: one reaction
    await ok_react(a, post_id, "u2", "love")
    await ok_react(a, post_id, "u2", "wow")
    await ok_react(b, post_id, "u3", "wow", on=False)  # taking back what is not there: success, nothing
    assert (await post_of(a, post_id))["reactions"] == {"love": 2, "wow": 1}
    viewed = await post_of(a, post_id, viewer="u2")
    assert viewed["my_reactions"] == ["love", "wow"] and viewed["liked"] is False
    await ok_react(a, post_id, "u2", "love", on=False)
    await ok_react(b, post_id, "u2", "love", on=False)
    assert (await post_of(b, post_id))["reactions"] == {"love": 1, "wow": 1}
    assert await stored_count(db, MANY, "rpost:love", post_id) is None  # slots only: no base is needed
    assert await db.fetchval(f'SELECT sum(n) FROM "{MANY}_counter_slots" WHERE kind = $1 AND target_id = $2',
                             "rpost:love", post_id) == 1
    got = await events(db, MANY, ("post.reacted", "post.unreacted"), post_id)
    assert [(t, d["user_id"], d["kind"]) for t, d in got] == [
        ("post.reacted", "u1", "love"), ("post.reacted", "u2", "love"), ("post.reacted", "u2", "wow"),
        ("post.unreacted", "u2", "love")]
    assert got[0][1] == {"id": post_id, "post_id": post_id, "user_id": "u1", "kind": "love"}


async def test_unconfigured_kind_and_bad_input(clients, db):
    a, _ = apis(clients, MANY)
    plain, _ = apis(clients, PLAIN)
    post_id = await a.publish(author="ann")
    for api, kind in ((a, "angry"), (plain, "love"), (a, "Love"), (a, 7), (a, "x" * 33)):
        status, body = await react(api, post_id, "u1", kind)
        assert (status, body) == (400, {"code": 400, "msg": BIND, "data": None}), (kind, body)
    status, body = await a.call("PUT", "/react", {"post_id": post_id, "user_id": "u1"}, json={"kind": "love"})
    assert (status, body["msg"]) == (400, BIND)
    assert await db.fetchval(f'SELECT count(*) FROM "{MANY}_reactions" WHERE target_kind = \'post\' AND target_id = $1',
                             post_id) == 0
    status, body = await react(a, 12345, "u1", "love")  # no such post
    assert body["code"] == 10006
    other = await a.publish(author="ann")
    comment = await a.comment(post_id)
    assert (await react(a, other, "u1", "love", comment_id=comment))[1]["code"] == 400  # not on that post
    assert await db.fetchval(f'SELECT count(*) FROM "{MANY}_reactions" WHERE target_kind = \'comment\' AND target_id = $1',
                             comment) == 0


async def test_like_is_the_like_both_ways(clients, db):
    a, b = apis(clients, MANY)
    post_id = await a.publish(author="ann")
    await ok_react(a, post_id, "u1", "like")
    assert await a.ok("GET", "/getlike", {"post_id": post_id}) == {"like": 1}
    assert await db.fetchval(f'SELECT count(*) FROM "{MANY}_post_like" WHERE post_id = $1', post_id) == 1
    await b.ok("PUT", "/like", {"post_id": post_id, "user_id": "u2"}, json={"like": True})
    post = await post_of(a, post_id, viewer="u2")
    assert (post["like_count"], post["reactions"], post["my_reactions"]) == (2, {"like": 2}, ["like"])
    await ok_react(b, post_id, "u2", "like", on=False)
    assert await a.ok("GET", "/getlike", {"post_id": post_id}) == {"like": 1}
    got = await events(db, MANY, ("post.liked", "post.unliked", "post.reacted"), post_id)
    assert [t for t, _ in got] == ["post.liked", "post.liked", "post.unliked"]
    # comments: the same
    comment = await a.comment(post_id)
    await ok_react(a, post_id, "u1", "like", comment_id=comment)
    await ok_react(a, post_id, "u1", "wow", comment_id=comment)
    assert await a.ok("GET", "/comments/getlike", {"comment_ids": str(comment)}) == {"likes": [1]}
    page = await a.ok("GET", "/comments/getinfo", {"post_id": post_id, "root_comment_id": 0, "viewer": "u1"})
    [c] = page["comments"]
    assert (c["like_count"], c["reactions"], c["my_reactions"]) == (1, {"like": 1, "wow": 1}, ["like", "wow"])
    got = await events(db, MANY, ("comment.reacted",), post_id)
    assert [d for _, d in got] == [{"id": comment, "post_id": post_id, "user_id": "u1", "kind": "wow"}]


async def test_unique_switches_in_one_transaction(clients, db):
    a, b = apis(clients, ONE)
    post_id = await a.publish(author="ann")
    await ok_react(a, post_id, "u1", "like")
    await ok_react(b, post_id, "u1", "love")  # replaces the like
    post = await post_of(a, post_id, viewer="u1")
    assert (post["like_count"], post["reactions"], post["my_reactions"]) == (0, {"love": 1}, ["love"])
    assert await a.ok("GET", "/getlike", {"post_id": post_id}) == {"like": 0}
    await ok_react(a, post_id, "u1", "wow")
    await ok_react(a, post_id, "u1", "wow")  # again: no change, no event
    await ok_react(a, post_id, "u1", "like")
    post = await post_of(b, post_id, viewer="u1")
    assert (post["like_count"], post.get("reactions"), post["my_reactions"]) == (1, {"like": 1}, ["like"])
    got = await events(db, ONE, ("post.liked", "post.unliked", "post.reacted", "post.unreacted"), post_id)
    assert [(t, d.get("kind")) for t, d in got] == [
        ("post.liked", None), ("post.unliked", None), ("post.reacted", "love"), ("post.unreacted", "love"),
        ("post.reacted", "wow"), ("post.unreacted", "wow"), ("post.liked", None)]
    # concurrent switches by one user: never two kinds at once
    await asyncio.gather(*(ok_react((a, b)[i % 2], post_id, "u9", KINDS[i % 3]) for i in range(30)))
    held = await db.fetchval(f'SELECT count(*) FROM "{ONE}_reactions" WHERE target_kind = \'post\' AND target_id = $1 '
                             "AND user_id = $2",
                             post_id, "u9")
    liked = await db.fetchval(f'SELECT count(*) FROM "{ONE}_post_like" WHERE post_id = $1 AND user_id = $2',
                              post_id, "u9")
    assert held + liked == 1


async def test_concurrent_reactions_count_exactly(clients, db):
    a, b = apis(clients, MANY)
    post_id = await a.publish(author="ann")
    rng = random.Random(22)
    calls = [((a, b)[i % 2], f"user{rng.randrange(50)}", rng.choice(KINDS), rng.random() < 0.7) for i in range(200)]
    await asyncio.gather(*(ok_react(api, post_id, user, kind, on) for api, user, kind, on in calls))
    rows = dict(await db.fetch(f'SELECT kind, count(*) FROM "{MANY}_reactions" WHERE target_kind = \'post\' '
                               "AND target_id = $1 GROUP BY kind", post_id))
    rows["like"] = await db.fetchval(f'SELECT count(*) FROM "{MANY}_post_like" WHERE post_id = $1', post_id)
    post = await post_of(b, post_id)
    assert post["reactions"] == {k: n for k, n in rows.items() if n}
    assert post["like_count"] == rows["like"]


async def test_who_reacted_pages_newest_first(clients):
    a, _ = apis(clients, MANY)
    post_id = await a.publish(author="ann")
    order = [("u1", "love"), ("u2", "like"), ("u3", "wow"), ("u4", "love"), ("u5", "love")]
    for user, kind in order:
        await ok_react(a, post_id, user, kind)
    seen, cursor = [], None
    for _ in range(10):  # (a cursor that does not move on would loop for ever)
        page = await a.ok("GET", "/reactions", {"post_id": post_id, "limit": 2, **({"cursor": cursor} if cursor else {})})
        seen += [(u["user_id"], u["kind"]) for u in page["users"]]
        cursor = page["next_cursor"]
        if not page["users"]:
            break
    assert seen == order[::-1]
    loves = await a.ok("GET", "/reactions", {"post_id": post_id, "kind": "love"})
    assert [u["user_id"] for u in loves["users"]] == ["u5", "u4", "u1"]
    status, body = await a.call("GET", "/reactions", {"post_id": post_id, "cursor": "garbage"})
    assert (status, body["msg"]) == (400, BIND)


async def test_a_service_without_reactions_answers_as_before(clients):
    plain, _ = apis(clients, PLAIN)
    post_id = await plain.publish(author="ann")
    await plain.ok("PUT", "/like", {"post_id": post_id, "user_id": "u1"}, json={"like": True})
    await ok_react(plain, post_id, "u2", "like")  # without the key, like is still the one kind: the like
    assert await plain.ok("GET", "/getlike", {"post_id": post_id}) == {"like": 2}
    post = await post_of(plain, post_id, viewer="u1")
    assert "reactions" not in post and "my_reactions" not in post
    await plain.comment(post_id)
    page = await plain.ok("GET", "/comments/getinfo", {"post_id": post_id, "root_comment_id": 0, "viewer": "u1"})
    assert all("reactions" not in c and "my_reactions" not in c for c in page["comments"])


async def test_hot_reload_adds_a_kind(make_server, backing):
    svc = svc_name("rhot")
    config = entries_config(backing, [{"name": svc, "secret": SECRET, "reactions": {"kinds": ["love"]}}])
    srv = make_server("react-hot", config)
    async with httpx.AsyncClient(base_url=srv.url, timeout=30) as http:
        api = Api(http, svc, SECRET)
        post_id = await api.publish(author="ann")
        assert (await react(api, post_id, "u1", "wow"))[0] == 400
        config["svc"][0]["reactions"]["kinds"] = ["love", "wow"]
        srv.write_config(config)

        async def accepted() -> bool:
            return (await react(api, post_id, "u1", "wow"))[0] == 200

        assert await eventually(accepted)
        assert (await post_of(api, post_id))["reactions"] == {"wow": 1}


async def test_deleted_items_lose_their_reactions_in_the_background(clients, db):
    a, _ = apis(clients, MANY)
    post_id = await a.publish(author="ann")
    comment = await a.comment(post_id, user_id="cat")
    other = await a.comment(post_id, user_id="dan")
    for user in ("u1", "u2"):
        await ok_react(a, post_id, user, "love")
        await ok_react(a, post_id, user, "wow", comment_id=comment)
        await ok_react(a, post_id, user, "wow", comment_id=other)
    await a.ok("DELETE", "/comments/delete", {"comment_id": comment, "user_id": "cat"})

    async def rows(target_kind: str, target_id: int) -> int:
        return await db.fetchval(f'SELECT count(*) FROM "{MANY}_reactions" WHERE target_kind = $1 AND target_id = $2',
                                 target_kind, target_id)

    assert await eventually(lambda: negate_rows(rows("comment", comment)))
    assert await rows("comment", other) == 2 and await rows("post", post_id) == 2  # only what was deleted
    await a.ok("DELETE", "/delete", {"post_id": post_id, "user_id": "ann"})
    assert await eventually(lambda: negate_rows(rows("post", post_id)))
    assert await eventually(lambda: negate_rows(rows("comment", other)))


async def negate_rows(count) -> bool:
    return await count == 0
