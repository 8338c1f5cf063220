"""Feed-ready reads: counts kept in the write's transaction, `liked` per viewer, getbatch,
getlist expand=1 / author=, comments sort=top, ids=string; against real PostgreSQL and Redis over HTTP."""
import asyncio
import datetime as dt
import json
import random
import signal

import httpx
import pytest
import pytest_asyncio

import im_backend

from conftest import Api, Server, app_config, expect, stored_count, svc_name
from test_server import GO_DDL

SECRET = "W7K8pJ3aQv2LcXgH"
T0 = dt.datetime(2024, 5, 1, 12, 0, 0, tzinfo=dt.timezone.utc)
NEAR_TTL = im_backend.CacheConfig.near_ttl  # seconds another process may serve a feed page from its memory


@pytest.fixture(scope="module")
def server2(workdir, server):
    """A second process serving the same services, database and Redis as the shared server."""
    srv = Server(workdir / "feed-second-server", server.config).start()
    yield srv
    srv.stop()


@pytest_asyncio.fixture
async def api2(server2, api):
    async with httpx.AsyncClient(base_url=server2.url, timeout=30) as http:
        yield Api(http, api.svc, api.secret)


async def like(api: Api, post_id: int, user: str, value: bool = True, comment_id: int | None = None) -> None:
    if comment_id is None:
        await api.ok("PUT", "/like", {"post_id": post_id, "user_id": user}, json={"like": value})
    else:
        await api.ok("PUT", "/comments/like", {"post_id": post_id, "comment_id": comment_id, "user_id": user},
                     json={"like": value})


async def page(api: Api, post_id: int, root: int = 0, **params) -> dict:
    return await api.ok("GET", "/comments/getinfo", {"post_id": post_id, "root_comment_id": root, **params})


# --- liked, like_count, counts ------------------------------------------------------------------------------------

async def test_liked_per_viewer_across_two_processes(api, api2):
    post_id = await api.publish()
    cid = await api.comment(post_id)

    async def seen(reader: Api, viewer: str) -> tuple:
        info = (await reader.ok("GET", "/getinfo", {"post_id": post_id, "viewer": viewer}))["post"]
        batch = (await reader.ok("GET", "/getbatch", {"post_ids": str(post_id), "viewer": viewer}))["posts"][0]
        listed = await reader.ok("GET", "/getlist", {"expand": 1, "viewer": viewer, "limit": 100})
        in_list = [p for p in listed["posts"] if p["id"] == post_id][0]
        comment = (await page(reader, post_id, viewer=viewer))["comments"][0]
        return info["liked"], batch["liked"], in_list["liked"], comment["liked"], info["like_count"], \
            comment["like_count"]

    assert await seen(api2, "fan") == (False, False, False, False, 0, 0)  # now in process 2's near cache
    await like(api, post_id, "fan")
    await like(api, post_id, "fan", comment_id=cid)
    assert await seen(api, "fan") == (True, True, True, True, 1, 1)  # the writing process: at once
    await asyncio.sleep(NEAR_TTL + 0.1)  # the other process: within the near cache's bound
    assert await seen(api2, "fan") == (True, True, True, True, 1, 1)
    assert await seen(api2, "somebody-else") == (False, False, False, False, 1, 1)  # a viewer with no likes
    assert await seen(api2, "never-heard-of") == (False, False, False, False, 1, 1)
    await like(api2, post_id, "fan", False)
    await like(api2, post_id, "fan", False, comment_id=cid)
    assert await seen(api2, "fan") == (False, False, False, False, 0, 0)
    await asyncio.sleep(NEAR_TTL + 0.1)
    assert await seen(api, "fan") == (False, False, False, False, 0, 0)
    # no viewer: no liked field; plain getinfo stays as in version 1
    plain = (await api.ok("GET", "/getinfo", {"post_id": post_id}))["post"]
    assert set(plain) == {"id", "title", "content", "author", "time", "svc", "extra"}
    counted = (await api.ok("GET", "/getinfo", {"post_id": post_id, "counts": 1}))["post"]
    assert set(counted) == set(plain) | {"like_count", "comment_count"}
    assert "liked" not in (await page(api, post_id))["comments"][0]


async def test_counts_follow_comments_replies_and_deletes(api, db):
    post_id = await api.publish()
    root = await api.comment(post_id, "u1")
    other_root = await api.comment(post_id, "u1")
    r1 = await api.reply(post_id, root, root)
    r2 = await api.reply(post_id, root, r1)  # a reply with a reply under r1
    await api.reply(post_id, root, r2)
    await api.reply(post_id, other_root, other_root)
    await like(api, post_id, "a", comment_id=r2)
    for kind, ids in (("comments", [post_id]), ("children", [root, other_root])):  # counted from here on
        await db.execute(im_backend.sql(api.svc, im_backend.COUNTER_INIT[kind]), ids)

    async def check(comments: int, children: dict) -> None:
        post = (await api.ok("GET", "/getbatch", {"post_ids": str(post_id)}))["posts"][0]
        assert post["comment_count"] == comments == await db.fetchval(
            f'SELECT count(*) FROM "{api.svc}_post_comment_info" WHERE post_id = $1', post_id)
        roots = {c["id"]: c["child_num"] for c in (await page(api, post_id))["comments"]}
        assert roots == children == {r: await stored_count(db, api.svc, "children", r) for r in children}

    await check(6, {root: 3, other_root: 1})
    await api.ok("DELETE", "/comments/delete", {"comment_id": r1, "user_id": "u2"})  # r1, r2 and r2's reply
    await check(3, {root: 0, other_root: 1})
    await api.ok("DELETE", "/comments/delete", {"comment_id": other_root, "user_id": "u1"})  # a root with a reply
    await check(1, {root: 0})
    assert await stored_count(db, api.svc, "children", other_root) is None  # its counter went with it
    assert await stored_count(db, api.svc, "comment", r2) is None


# --- a storm from two processes, then SIGKILL -----------------------------------------------------------------------

async def truth(db, svc: str, post_id: int) -> dict:
    """What the counts must be: count(*) of the rows."""
    comments = await db.fetchval(f'SELECT count(*) FROM "{svc}_post_comment_info" WHERE post_id = $1', post_id)
    likes = await db.fetchval(f'SELECT count(*) FROM "{svc}_post_like" WHERE post_id = $1', post_id)
    roots = dict(await db.fetch(
        f'''SELECT c.id, (SELECT count(*) FROM "{svc}_post_comment_info" r WHERE r.root_id = c.id)
            FROM "{svc}_post_comment_info" c WHERE c.post_id = $1 AND c.root_id = 0''', post_id))
    comment_likes = dict(await db.fetch(  # of the comments a reader reaches: roots, and replies of live roots
        f'''SELECT c.id, (SELECT count(*) FROM "{svc}_comment_like" l WHERE l.comment_id = c.id)
            FROM "{svc}_post_comment_info" c WHERE c.post_id = $1 AND (c.root_id = 0 OR EXISTS
                (SELECT 1 FROM "{svc}_post_comment_info" r WHERE r.id = c.root_id))''', post_id))
    return {"comments": comments, "likes": likes, "roots": roots, "comment_likes": comment_likes}


async def answered(api: Api, post_id: int) -> dict:
    """The same, as the API answers it."""
    post = (await api.ok("GET", "/getbatch", {"post_ids": str(post_id)}))["posts"][0]
    roots = (await page(api, post_id, limit=100))["comments"]
    comment_likes = {c["id"]: c["like_count"] for c in roots}
    for root in roots:
        for reply in (await page(api, post_id, root["id"], limit=100))["comments"]:
            comment_likes[reply["id"]] = reply["like_count"]
    return {"comments": post["comment_count"], "likes": post["like_count"],
            "roots": {c["id"]: c["child_num"] for c in roots}, "comment_likes": comment_likes}


async def test_counts_exact_after_a_storm_from_two_processes_and_after_sigkill(workdir, backing, db):
    svc = svc_name("storm")
    config = app_config(backing, {svc: SECRET})
    servers = [Server(workdir / f"storm-{i}", config).start() for i in range(2)]
    clients = [httpx.AsyncClient(base_url=s.url, timeout=60) for s in servers]
    apis = [Api(c, svc, SECRET) for c in clients]
    rng = random.Random(7)
    try:
        post_id = await apis[0].publish("owner")
        roots = [await apis[i % 2].comment(post_id, "u1") for i in range(6)]
        chains = {}
        for root in roots:  # root <- a <- b under each root
            a = await apis[0].reply(post_id, root, root, "u2")
            chains[root] = (a, await apis[1].reply(post_id, root, a, "u3"))
        # bases for every counter (as a first read makes them for targets with many rows), so the storm's changes
        # must be counted in the slots; comments made during the storm have none and are counted from their rows
        everything = roots + [c for chain in chains.values() for c in chain]
        for kind, ids in (("post", [post_id]), ("comments", [post_id]), ("children", roots), ("comment", everything)):
            await db.execute(im_backend.sql(svc, im_backend.COUNTER_INIT[kind]), ids)
        ops = []
        for i in range(120):
            api, kind = apis[i % 2], rng.random()
            if kind < 0.2:
                ops.append(api.call("POST", "/comments/publish", {"post_id": post_id, "user_id": "u1"},
                                    data={"content": "storm"}))
            elif kind < 0.4:
                root = rng.choice(roots)
                ops.append(api.call("POST", "/comments/reply", {"post_id": post_id, "root_comment_id": root,
                                                                "father_comment_id": chains[root][1], "user_id": "u4"},
                                    data={"content": "storm reply"}))
            elif kind < 0.7:
                ops.append(api.call("PUT", "/like", {"post_id": post_id, "user_id": f"f{rng.randrange(15)}"},
                                    json={"like": rng.random() < 0.7}))
            else:
                target = rng.choice(roots + [c for chain in chains.values() for c in chain])
                ops.append(api.call("PUT", "/comments/like", {"post_id": post_id, "comment_id": target,
                                                              "user_id": f"f{rng.randrange(15)}"},
                                    json={"like": rng.random() < 0.7}))
        # deletes in the middle of it: two roots with their replies, and two replies that have replies
        ops[30:30] = [apis[0].call("DELETE", "/comments/delete", {"comment_id": roots[0], "user_id": "u1"}),
                      apis[1].call("DELETE", "/comments/delete", {"comment_id": roots[1], "user_id": "u1"}),
                      apis[0].call("DELETE", "/comments/delete", {"comment_id": chains[roots[2]][0], "user_id": "u2"}),
                      apis[1].call("DELETE", "/comments/delete", {"comment_id": chains[roots[3]][0], "user_id": "u2"})]
        results = await asyncio.gather(*ops)
        codes = {body["code"] for _, body in results}
        assert codes <= {200, 10006, 400}, codes  # a like/reply may find its comment deleted meanwhile
        assert sum(body["code"] == 200 for _, body in results) > 100
        expected = await truth(db, svc, post_id)
        assert expected["comments"] > 10 and expected["likes"] > 0
        stored = {"comments": await stored_count(db, svc, "comments", post_id),
                  "likes": await stored_count(db, svc, "post", post_id),
                  "roots": {r: await stored_count(db, svc, "children", r) for r in expected["roots"] if r in roots},
                  "comment_likes": {c: await stored_count(db, svc, "comment", c)
                                    for c in expected["comment_likes"] if c in everything}}
        assert stored == {"comments": expected["comments"], "likes": expected["likes"],
                          "roots": {r: n for r, n in expected["roots"].items() if r in roots},
                          "comment_likes": {c: n for c, n in expected["comment_likes"].items() if c in everything}}
        for api in apis:
            assert await answered(api, post_id) == expected
        for srv in servers:
            srv.stop(signal.SIGKILL)
        servers[0].start()
        assert await answered(apis[0], post_id) == expected == await truth(db, svc, post_id)
    finally:
        for client in clients:
            await client.aclose()
        for srv in servers:
            srv.stop()


# --- getbatch -----------------------------------------------------------------------------------------------------

async def test_getbatch_order_duplicates_unknown_and_body(api, db):
    a, b = await api.publish("alice", "A"), await api.publish("bob", "B")
    await api.comment(b)
    await like(api, a, "x")
    posts = (await api.ok("GET", "/getbatch", {"post_ids": f"{b},{a},424242,{b}"}))["posts"]
    assert [p and p["content"] for p in posts] == ["B", "A", None, "B"]
    assert (posts[0]["comment_count"], posts[0]["like_count"], posts[1]["like_count"]) == (1, 0, 1)
    by_body = await api.ok("GET", "/getbatch", json={"post_ids": [a, str(b)]})
    assert [p["id"] for p in by_body["posts"]] == [a, b]
    repeated = await api.ok("GET", "/getbatch", [("post_ids", a), ("post_ids", b)])
    assert [p["id"] for p in repeated["posts"]] == [a, b]
    assert (await api.ok("GET", "/getbatch", {"post_ids": str(2 ** 63 - 1)}))["posts"] == [None]
    assert len((await api.ok("GET", "/getbatch", {"post_ids": ",".join([str(a)] * 100)}))["posts"]) == 100
    expect(await api.call("GET", "/getinfo", {"post_id": 424242, "counts": 1}), 10006, "find data failed")
    expect(await api.call("GET", "/getinfo", {"post_id": a, "counts": "yes"}), 400, "bind param failed")


@pytest.mark.parametrize("query, body", [
    ({}, None), ({"post_ids": ""}, None), (None, {"post_ids": []}),
    ({"post_ids": ",".join(["1"] * 101)}, None), (None, {"post_ids": list(range(1, 102))}),
    ({"post_ids": "1,x"}, None), ({"post_ids": "1,-2"}, None), ({"post_ids": str(2 ** 63)}, None),
    ({"post_ids": str(2 ** 64 + 5)}, None), (None, {"post_ids": [1.5]}), (None, {"post_ids": None}),
    (None, {"post_ids": {"a": 1}}), (None, {"post_ids": [True]}), ({"post_ids": "1", "viewer": "v" * 256}, None),
])
async def test_getbatch_bad_input_is_an_envelope(api, query, body):
    kwargs = {"json": body} if body is not None else {}
    expect(await api.call("GET", "/getbatch", query, **kwargs), 400, "bind param failed")


# --- getlist author= / expand=1 -------------------------------------------------------------------------------------

async def insert_posts(db, svc: str, rows: list[tuple[int, str, dt.datetime]]) -> None:
    await db.executemany(f'INSERT INTO "{svc}_post_info" (id, content, title, author, created_at, updated_at) '
                         f"VALUES ($1, 'c', '', $2, $3, $3)", rows)


async def walk(api: Api, params: dict, pages: int = 10) -> list[list[int]]:
    """Follow next_cursor until an empty page (at most `pages`)."""
    seen, cursor = [], None
    for _ in range(pages):
        data = await api.ok("GET", "/getlist", dict(params, **({"cursor": cursor} if cursor else {})))
        if not data["post_list"]:
            assert data["next_cursor"] is None  # every page has it; null when empty
            return seen
        seen.append(data["post_list"])
        cursor = data["next_cursor"]
    raise AssertionError("paging did not end")


async def test_author_paging_with_equal_timestamps_at_page_edges(api, db):
    author = f"eq-{random.randrange(10 ** 9)}"
    base = (1714564800 << 32)
    rows = [(base + i, author if i % 3 else "someone else", T0 if i < 10 else T0 - dt.timedelta(seconds=1))
            for i in range(14)]  # 10 posts share one instant, 4 the second before
    await insert_posts(db, api.svc, rows)
    mine = sorted((r for r in rows if r[1] == author), key=lambda r: (r[2], r[0]), reverse=True)
    pages = await walk(api, {"author": author, "limit": 3})
    assert [len(p) for p in pages] == [3, 3, 3]  # 9 posts of the author: edges fall inside the equal instant
    assert sum(pages, []) == [r[0] for r in mine]
    expanded = await api.ok("GET", "/getlist", {"author": author, "limit": 3, "expand": "1", "viewer": "v"})
    assert [p["id"] for p in expanded["posts"]] == expanded["post_list"] == pages[0]
    assert all(p["author"] == author and p["liked"] is False and p["comment_count"] == 0 for p in expanded["posts"])
    # the same keyset paging over everybody's posts before T0 + 1 s (no author)
    everybody = await walk(api, {"expand": 1, "limit": 4, "cursor": "2024-05-01T12:00:01Z"}, pages=1000)
    flat = sum(everybody, [])
    assert len(flat) == len(set(flat)) and {r[0] for r in rows} <= set(flat)
    expect(await api.call("GET", "/getlist", {"author": "x" * 256}), 400, "bind param failed")
    expect(await api.call("GET", "/getlist", {"expand": "yes"}), 400, "bind param failed")
    expect(await api.call("GET", "/getlist", {"author": author, "cursor": "bm90LWEtY3Vyc29y"}), 400)


async def test_plain_getlist_is_unchanged(api):
    await api.publish()
    data = await api.ok("GET", "/getlist", {"limit": 2})
    assert set(data) == {"post_list", "next_cursor"} and all(isinstance(i, int) for i in data["post_list"])
    assert data["next_cursor"][:1].isdigit()  # a time, as without this issue


# --- comments sort=top --------------------------------------------------------------------------------------------

async def test_sort_top_pages_without_repeats_or_gaps(api, db):
    post_id = await api.publish()
    roots = [await api.comment(post_id, "u1", f"c{i}") for i in range(6)]
    # two more with the very same created_at (and, below, the same count): the id breaks the tie
    twins = [(roots[-1] + 1000 + i) for i in range(2)]
    await db.executemany(f'INSERT INTO "{api.svc}_post_comment_info" (id, user_id, post_id, content, created_at) '
                         f"VALUES ($1, 'u1', $2, 'twin', $3)", [(t, post_id, T0) for t in twins])
    wanted = dict(zip(roots + twins, [3, 1, 3, 0, 1, 1, 1, 1], strict=True))
    for cid, n in wanted.items():
        for u in range(n):
            await like(api, post_id, f"u{u}", comment_id=cid)
    first = (await page(api, post_id, limit=100))["comments"]
    created = {c["id"]: (c["time"], c["id"]) for c in first}
    assert {c["id"]: c["like_count"] for c in first} == wanted
    # most liked first; ties newest first (created_at, then id)
    order = sorted(wanted, key=lambda c: (wanted[c], created[c]), reverse=True)
    got, cursor, sizes = [], None, []
    for _ in range(5):
        params = {"sort": "top", "limit": 3, "viewer": "u0", **({"cursor": cursor} if cursor else {})}
        data = await page(api, post_id, **params)
        if not data["comments"]:
            break
        sizes.append(len(data["comments"]))
        got += [c["id"] for c in data["comments"]]
        assert all(c["liked"] == (wanted[c["id"]] > 0) for c in data["comments"])
        cursor = data["next_cursor"]
    assert sizes == [3, 3, 2] and got == order
    # replies of a thread sort the same way
    r1, r2 = await api.reply(post_id, roots[0], roots[0]), await api.reply(post_id, roots[0], roots[0])
    await like(api, post_id, "z", comment_id=r1)
    replies = await page(api, post_id, roots[0], sort="top")
    assert [c["id"] for c in replies["comments"]] == [r1, r2]
    expect(await api.call("GET", "/comments/getinfo", {"post_id": post_id, "root_comment_id": 0, "sort": "best"}),
           400, "bind param failed")
    expect(await api.call("GET", "/comments/getinfo", {"post_id": post_id, "root_comment_id": 0, "sort": "top",
                                                       "cursor": "1949-10-01T00:00:00"}), 400, "bind param failed")
    expect(await api.call("GET", "/comments/getinfo", {"post_id": post_id, "root_comment_id": 0,
                                                       "cursor": data.get("next_cursor") or cursor}), 400)
    expect(await api.call("GET", "/comments/getinfo", {"post_id": post_id, "root_comment_id": 0, "sort": "top",
                                                       "cursor": "%%%"}), 400, "bind param failed")


# --- ids=string ---------------------------------------------------------------------------------------------------

def as_doubles(response: httpx.Response) -> dict:
    """Parse as JavaScript would: every number a double."""
    return json.loads(response.text, parse_int=float)


async def test_ids_as_strings_on_every_endpoint_that_returns_ids(api, client):
    async def raw(method: str, path: str, params: dict, **kwargs) -> dict:
        auth = {"svc": api.svc, "appKey": im_backend.encrypt_appkey(api.secret), "ids": "string"}
        body = as_doubles(await client.request(method, "/api/v1/posts" + path, params={**auth, **params}, **kwargs))
        assert body["code"] == 200, body
        return body["data"]

    post_id = int((await raw("POST", "/publish", {}, data={"author": "js", "content": "c",
                                                         "extra": '{"id": 12, "post_id": 13}'}))["post_id"])
    assert post_id > 2 ** 53 and float(post_id) != post_id  # a double would lose digits of this id
    root = int((await raw("POST", "/comments/publish", {"post_id": post_id, "user_id": "u"},
                          data={"content": "c"}))["comment_id"])
    reply = (await raw("POST", "/comments/reply", {"post_id": post_id, "root_comment_id": root,
                                                   "father_comment_id": root, "user_id": "v"},
                       data={"content": "r"}))["comment_id"]
    assert reply == str(int(reply))
    for params in ({}, {"counts": 1}, {"viewer": "u"}):
        post = (await raw("GET", "/getinfo", {"post_id": post_id, **params}))["post"]
        assert post["id"] == str(post_id) and post["extra"] == {"id": 12.0, "post_id": 13.0}  # the caller's own
    batch = (await raw("GET", "/getbatch", {"post_ids": f"{post_id},1"}))["posts"]
    assert batch[0]["id"] == str(post_id) and batch[1] is None and batch[0]["comment_count"] == 2.0
    listed = await raw("GET", "/getlist", {"limit": 100})
    assert str(post_id) in listed["post_list"] and all(isinstance(i, str) for i in listed["post_list"])
    expanded = await raw("GET", "/getlist", {"limit": 5, "expand": 1})
    assert all(isinstance(i, str) for i in expanded["post_list"]) and expanded["posts"][0]["id"] == str(post_id)
    roots = (await raw("GET", "/comments/getinfo", {"post_id": post_id, "root_comment_id": 0}))["comments"]
    assert (roots[0]["id"], roots[0]["post_id"], roots[0]["root_id"], roots[0]["father_id"]) == (
        str(root), str(post_id), "0", "0")
    assert roots[0]["child_num"] == 1.0  # counts stay numbers
    replies = (await raw("GET", "/comments/getinfo", {"post_id": post_id, "root_comment_id": root, "sort": "top"}))
    assert (replies["comments"][0]["id"], replies["comments"][0]["root_id"], replies["comments"][0]["father_id"]) == (
        reply, str(root), str(root))
    assert (await raw("GET", "/getlike", {"post_id": post_id})) == {"like": 0.0}
    # without ids=string the ids are numbers, as in version 1
    plain = await api.ok("GET", "/comments/getinfo", {"post_id": post_id, "root_comment_id": 0})
    assert plain["comments"][0]["id"] == root
    expect(await api.call("GET", "/getinfo", {"post_id": post_id, "ids": "text"}), 400, "bind param failed")


# --- tables created by the Go version -------------------------------------------------------------------------------

async def test_counts_right_on_first_read_of_go_tables(workdir, backing, db):
    svc = svc_name("gocount")
    await db.execute(GO_DDL.format(s=svc))
    post_id, quiet = (1700000000 << 32) | 1, (1700000000 << 32) | 2
    await db.executemany(f'INSERT INTO "{svc}_post_info" VALUES ($1, $2, $3, $4, NULL, $5, $5)',
                         [(post_id, "go post", "", "gopher", T0), (quiet, "quiet", "", "gopher", T0)])
    roots = [10, 11]
    comments = [(10, 0, 0), (11, 0, 0)] + [(100 + i, 10, 10) for i in range(130)] + [(300, 11, 11)]
    await db.executemany(f'INSERT INTO "{svc}_post_comment_info" (id, user_id, root_id, father_id, post_id, content, '
                         f"created_at) VALUES ($1, 'u', $2, $3, $4, 'old', $5)",
                         [(cid, root, father, post_id, T0 + dt.timedelta(seconds=cid))
                          for cid, root, father in comments])
    await db.executemany(f'INSERT INTO "{svc}_post_like" (post_id, user_id) VALUES ($1, $2)',
                         [(post_id, f"fan{i}") for i in range(150)])
    await db.executemany(f'INSERT INTO "{svc}_comment_like" (comment_id, user_id, post_id) VALUES ($1, $2, $3)',
                         [(10, f"fan{i}", post_id) for i in range(105)] + [(11, "fan1", post_id)])
    srv = Server(workdir / "go-counts", app_config(backing, {svc: SECRET})).start()
    try:
        async with httpx.AsyncClient(base_url=srv.url, timeout=30) as client:
            api = Api(client, svc, SECRET)
            posts = (await api.ok("GET", "/getbatch", {"post_ids": f"{post_id},{quiet}", "viewer": "fan3"}))["posts"]
            assert [(p["like_count"], p["comment_count"], p["liked"]) for p in posts] == [(150, 133, True),
                                                                                          (0, 0, False)]
            info = (await api.ok("GET", "/getinfo", {"post_id": post_id, "counts": 1}))["post"]
            assert (info["like_count"], info["comment_count"]) == (150, 133)
            page1 = (await page(api, post_id, viewer="fan1"))["comments"]
            assert [(c["id"], c["child_num"], c["like_count"], c["liked"]) for c in page1] == [
                (10, 130, 105, True), (11, 1, 1, True)]
            assert (await api.ok("GET", "/getlike", {"post_id": post_id}))["like"] == 150
            # that first read made the bases from the rows; from now on the counters count
            assert await stored_count(db, svc, "post", post_id) == 150
            assert await stored_count(db, svc, "comments", post_id) == 133
            assert await stored_count(db, svc, "children", 10) == 130
            assert await stored_count(db, svc, "comment", 10) == 105
            # and go on counting from there
            await like(api, post_id, "new fan")
            await api.reply(post_id, 10, 10)
            await api.ok("DELETE", "/comments/delete", {"comment_id": 11, "user_id": "u"})
            posts = (await api.ok("GET", "/getbatch", {"post_ids": str(post_id)}))["posts"]
            assert (posts[0]["like_count"], posts[0]["comment_count"]) == (151, 132)
            assert [(c["id"], c["child_num"]) for c in (await page(api, post_id))["comments"]] == [(10, 131)]
            top = (await page(api, post_id, sort="top"))["comments"]
            assert [c["id"] for c in top] == [10]
    finally:
        srv.stop()
