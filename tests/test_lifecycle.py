"""Content lifecycle: tombstones for deleted comments with replies, the edit window and edit history, a user's data
exported as NDJSON, and erasure of a user in the background. Real PostgreSQL, Redis and server processes."""
from __future__ import annotations

import asyncio
import json
import signal
import time

import httpx
import pytest
import pytest_asyncio

import im_backend
from conftest import SECRET, Api, app_config, eventually, expect, stored_count, svc_name

CASCADE, TOMB, EDIT, HIST = (svc_name(n) for n in ("lcasc", "ltomb", "ledit", "lhist"))
EARLY = "1949-10-01T00:00:00"


def lifecycle_config(backing: dict) -> dict:
    config = app_config(backing, {CASCADE: SECRET, TOMB: SECRET, EDIT: SECRET, HIST: SECRET})
    config["delete"] = {"mode": "tombstone"}  # the default of every service...
    entries = {CASCADE: {"delete": {"mode": "cascade"}},  # ...overridden per service
               EDIT: {"edit": {"window_seconds": 2}},
               HIST: {"delete": {"mode": "cascade"}, "edit": {"history": True}}}
    for entry in config["svc"]:
        entry.update(entries.get(entry["name"], {}))
    return config


@pytest.fixture(scope="module")
def server(workdir, backing):
    from conftest import Server
    srv = Server(workdir / "lifecycle", lifecycle_config(backing)).start()
    yield srv
    srv.stop()


@pytest_asyncio.fixture
async def client(server):
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        yield http


def api_of(client, svc: str) -> Api:
    return Api(client, svc, SECRET)


async def roots(api: Api, post_id: int) -> list[dict]:
    return (await api.ok("GET", "/comments/getinfo", {"post_id": post_id, "root_comment_id": 0,
                                                      "cursor": EARLY}))["comments"]


async def replies(api: Api, post_id: int, root: int) -> list[dict]:
    return (await api.ok("GET", "/comments/getinfo", {"post_id": post_id, "root_comment_id": root,
                                                      "cursor": EARLY}))["comments"]


async def comment_count(api: Api, post_id: int) -> int:
    return (await api.ok("GET", "/getinfo", {"post_id": post_id, "counts": 1}))["post"]["comment_count"]


async def delete(api: Api, comment_id: int, user_id: str) -> None:
    await api.ok("DELETE", "/comments/delete", {"comment_id": comment_id, "user_id": user_id})


async def events_of(db, svc: str, kind: str) -> list[dict]:
    return [json.loads(r[0]) if isinstance(r[0], str) else r[0]
            for r in await db.fetch(f'SELECT data FROM "{svc}_events" WHERE type = $1 ORDER BY id', kind)]


# --- configuration -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, problem", [
    ("delete: {mode: soft}", "'delete.mode' must be cascade or tombstone"),
    ("delete: tombstone", "'delete' must be a mapping"),
    ("edit: {window_seconds: -5}", "'edit.window_seconds' must be a whole number"),
    ("edit: {window_seconds: 1.5}", "'edit.window_seconds' must be a whole number"),
    ("edit: {history: 'yes'}", "'edit.history' must be true or false"),
    ("svc: [{name: s1, secret: W7K8pJ3aQv2LcXgH, edit: {history: 2}}]", "service 's1': 'edit.history'"),
    ("svc: [{name: s1, secret: W7K8pJ3aQv2LcXgH, delete: [tombstone]}]", "service 's1': 'delete' must be a mapping"),
])
def test_bad_lifecycle_configuration_is_rejected(text, problem):
    with pytest.raises(im_backend.ConfigError, match=problem.replace("(", r"\(").replace("[", r"\[")):
        im_backend.parse_app_config(text)


def test_service_keys_override_the_top_level_key_by_key():
    config = im_backend.parse_app_config(
        "delete: {mode: tombstone}\nedit: {window_seconds: 60, history: true}\n"
        "svc: [{name: s1, secret: W7K8pJ3aQv2LcXgH, edit: {history: false}}, {name: s2, secret: W7K8pJ3aQv2LcXgH}]")
    assert config.tenants["s1"].lifecycle == im_backend.LifecycleConfig("tombstone", 60, False)
    assert config.tenants["s2"].lifecycle == im_backend.LifecycleConfig("tombstone", 60, True)
    plain = im_backend.parse_app_config("svc: [{name: s1, secret: W7K8pJ3aQv2LcXgH}]")
    assert plain.tenants["s1"].lifecycle == im_backend.LifecycleConfig()


# --- tombstones ------------------------------------------------------------------------------------------------

async def test_cascade_deletes_a_root_with_its_replies(client):
    api = api_of(client, CASCADE)
    post = await api.publish()
    root = await api.comment(post, "ann")
    await api.reply(post, root, root, "bob")
    await delete(api, root, "ann")
    assert await roots(api, post) == []
    assert await comment_count(api, post) == 0


async def test_tombstone_keeps_a_placeholder_while_replies_remain(client, db):
    api = api_of(client, TOMB)
    post = await api.publish()
    root = await api.comment(post, "ann", "original words")
    other = await api.comment(post, "cat", "stays")
    r1 = await api.reply(post, root, root, "bob")
    r2 = await api.reply(post, root, r1, "dan")
    await api.ok("PUT", "/comments/like", {"post_id": post, "comment_id": root, "user_id": "fan"}, json={"like": True})
    before = (await roots(api, post))[0]
    assert await comment_count(api, post) == 4
    await delete(api, root, "ann")
    page = await roots(api, post)
    assert [c["id"] for c in page] == [root, other]  # same position
    placeholder = page[0]
    assert placeholder["deleted"] is True and "deleted" not in page[1]
    assert {k: placeholder[k] for k in ("content", "extra", "user_id", "time", "child_num", "like_count")} == {
        "content": "", "extra": None, "user_id": "", "time": before["time"], "child_num": 2, "like_count": 0}
    assert await comment_count(api, post) == 3  # the placeholder left it at once; its replies stay counted
    assert [c["id"] for c in await replies(api, post, root)] == [r1, r2]
    # a placeholder takes no like, no update (it has no owner any more), no second delete
    status, body = await api.call("PUT", "/comments/like", {"post_id": post, "comment_id": root, "user_id": "fan2"},
                                  json={"like": True})
    assert body["code"] == 10006, body
    status, body = await api.call("PUT", "/comments/update", {"comment_id": root, "user_id": "ann"},
                                  data={"content": "back"})
    assert body["code"] == 10014, body
    deleted = (await events_of(db, TOMB, "comment.deleted"))[-1]
    assert deleted["deleted_ids"] == [root] and deleted["tombstoned_ids"] == [root]
    # the replies go one by one: the placeholder goes with the last
    await delete(api, r2, "dan")
    assert [c["id"] for c in await roots(api, post)] == [root, other]
    await delete(api, r1, "bob")
    assert [c["id"] for c in await roots(api, post)] == [other]
    assert await comment_count(api, post) == 1
    assert await db.fetchval(f'SELECT count(*) FROM "{TOMB}_post_comment_info" WHERE id = $1', root) == 0
    assert (await events_of(db, TOMB, "comment.deleted"))[-1]["deleted_ids"] == [r1, root]


async def test_a_reply_placeholder_and_the_chain_above_it(client):
    api = api_of(client, TOMB)
    post = await api.publish()
    root = await api.comment(post, "ann")
    a = await api.reply(post, root, root, "bob")
    b = await api.reply(post, root, a, "cat")
    c = await api.reply(post, root, b, "dan")
    sibling = await api.reply(post, root, root, "eve")
    await delete(api, a, "bob")  # has a reply: a placeholder, out of child_num and comment_count
    await delete(api, b, "cat")  # likewise
    thread = await replies(api, post, root)
    assert [(x["id"], x.get("deleted", False)) for x in thread] == [(a, True), (b, True), (c, False),
                                                                     (sibling, False)]
    assert (await roots(api, post))[0]["child_num"] == 2 and await comment_count(api, post) == 3
    await delete(api, c, "dan")  # the last reply below both placeholders: the chain goes up to the root
    assert [x["id"] for x in await replies(api, post, root)] == [sibling]
    assert (await roots(api, post))[0]["child_num"] == 1 and await comment_count(api, post) == 2
    # without replies a delete is as in cascade mode
    await delete(api, sibling, "eve")
    await delete(api, root, "ann")
    assert await roots(api, post) == [] and await comment_count(api, post) == 0


async def test_reply_to_a_placeholder_keeps_it_and_its_counts_stay_exact(client, db):
    api = api_of(client, TOMB)
    post = await api.publish()
    root = await api.comment(post, "ann")
    r1 = await api.reply(post, root, root, "bob")
    await delete(api, root, "ann")
    r2 = await api.reply(post, root, r1, "cat")  # the thread goes on under the placeholder
    await delete(api, r1, "bob")  # r1 has a reply now: a placeholder too
    await delete(api, r2, "cat")  # the last one: r1 and the root go with it
    assert await roots(api, post) == []
    assert await comment_count(api, post) == 0
    assert await stored_count(db, TOMB, "comments", post) == 0


async def test_replies_racing_deletes_of_their_thread(client, db):
    """Replies arrive while their root (and the replies they answer) are being deleted: every reply either lands
    in a thread that still shows (under a placeholder) or is refused; counts stay exact."""
    api = api_of(client, TOMB)
    for _ in range(3):
        post = await api.publish()
        root = await api.comment(post, "ann")
        first = await api.reply(post, root, root, "bob")

        async def reply_to(father: int, user: str) -> tuple[int, dict]:
            return await api.call("POST", "/comments/reply", {"post_id": post, "root_comment_id": root,
                                                              "father_comment_id": father, "user_id": user},
                                  data={"content": "late"})

        results = await asyncio.gather(delete(api, first, "bob"), delete(api, root, "ann"),
                                       *(reply_to(first if i % 2 else root, f"r{i}") for i in range(8)))
        for status, body in results[2:]:
            assert body["code"] in (200, 10006), body
        rows = await db.fetch(f'SELECT id, father_id, deleted FROM "{TOMB}_post_comment_info" WHERE post_id = $1',
                              post)
        ids = {r["id"] for r in rows}
        assert all(r["father_id"] in ids for r in rows if r["father_id"]), rows  # no reply under a missing father
        live = [r for r in rows if not r["deleted"]]
        assert await comment_count(api, post) == len(live)
        page = await roots(api, post)
        if page:
            assert page[0]["child_num"] == len([r for r in live if r["id"] != root])
        # and once every reply goes, nothing is left
        for r in sorted(live, key=lambda r: -r["id"]):
            if r["id"] != root:
                user = (await db.fetchval(f'SELECT user_id FROM "{TOMB}_post_comment_info" WHERE id = $1', r["id"]))
                await delete(api, r["id"], user)
        if any(r["id"] == root for r in live):
            await delete(api, root, "ann")
        assert await db.fetchval(f'SELECT count(*) FROM "{TOMB}_post_comment_info" WHERE post_id = $1', post) == 0
        assert await comment_count(api, post) == 0


# --- the edit window and edit history ------------------------------------------------------------------------

async def test_edit_window_closes_updates_after_it(client, db):
    api = api_of(client, EDIT)
    post = await api.publish("ann", "v1")
    comment = await api.comment(post, "bob", "c1")
    await api.ok("PUT", "/update", {"post_id": post, "user_id": "ann"}, data={"content": "v2"})
    await api.ok("PUT", "/comments/update", {"comment_id": comment, "user_id": "bob"}, data={"content": "c2"})
    # another user is still told it is not theirs, whatever the time
    status, body = await api.call("PUT", "/update", {"post_id": post, "user_id": "eve"}, data={"content": "x"})
    assert body["code"] == 10014
    await asyncio.sleep(2.3)
    for path, params in (("/update", {"post_id": post, "user_id": "ann"}),
                         ("/comments/update", {"comment_id": comment, "user_id": "bob"})):
        status, body = await api.call("PUT", path, params, data={"content": "too late"})
        assert (status, body) == (403, {"code": 403, "msg": "edit window has closed", "data": None})
    assert (await api.ok("GET", "/getinfo", {"post_id": post}))["post"]["content"] == "v2"
    assert (await roots(api, post))[0]["content"] == "c2"
    assert "edited_at" not in (await api.ok("GET", "/getinfo", {"post_id": post}))["post"]  # no history here
    assert len([e for e in await events_of(db, EDIT, "post.updated") if e["post_id"] == post]) == 1
    # deleting stays allowed
    await delete(api, comment, "bob")
    await api.ok("DELETE", "/delete", {"post_id": post, "user_id": "ann"})


async def test_history_keeps_every_previous_version(client, db):
    api = api_of(client, HIST)
    post = await api.publish("ann", "v1", title="t1", extra=json.dumps({"n": 1}))
    comment = await api.comment(post, "bob", "c1")
    plain = (await api.ok("GET", "/getinfo", {"post_id": post}))["post"]
    assert plain["edited_at"] is None
    assert (await roots(api, post))[0]["edited_at"] is None
    assert (await api.ok("GET", "/revisions", {"post_id": post})) == {"revisions": []}
    await api.ok("PUT", "/update", {"post_id": post, "user_id": "ann"}, data={"content": "v2", "title": "t2"})
    await api.ok("PUT", "/update", {"post_id": post, "user_id": "ann"}, data={"extra": json.dumps({"n": 3})})
    await api.ok("PUT", "/comments/update", {"comment_id": comment, "user_id": "bob"}, data={"content": "c2"})
    revisions = (await api.ok("GET", "/revisions", {"post_id": post}))["revisions"]
    assert [(r["rev"], r["title"], r["content"], r["extra"]) for r in revisions] == [
        (1, "t1", "v1", {"n": 1}), (2, "t2", "v2", {"n": 1})]
    assert revisions[0]["time"] == plain["time"] and revisions[1]["time"] >= revisions[0]["time"]
    now = (await api.ok("GET", "/getinfo", {"post_id": post}))["post"]
    assert (now["content"], now["extra"]) == ("v2", {"n": 3}) and now["edited_at"] >= plain["time"]
    batch = (await api.ok("GET", "/getbatch", {"post_ids": str(post)}))["posts"][0]
    assert batch["edited_at"] == now["edited_at"]
    page = await roots(api, post)
    assert page[0]["edited_at"] is not None
    assert (await api.ok("GET", "/revisions", {"comment_id": comment})) == {"revisions": [
        {"rev": 1, "content": "c1", "extra": None, "time": page[0]["time"]}]}
    # an update refused is no revision; a deleted comment's revisions go with it
    status, body = await api.call("PUT", "/update", {"post_id": post, "user_id": "eve"}, data={"content": "x"})
    assert body["code"] == 10014
    assert len((await api.ok("GET", "/revisions", {"post_id": post}))["revisions"]) == 2
    await delete(api, comment, "bob")
    expect(await api.call("GET", "/revisions", {"comment_id": comment}), 10006)
    assert await db.fetchval(f'SELECT count(*) FROM "{HIST}_revisions" WHERE kind = $1 AND id = $2',
                             "comment", comment) == 0
    expect(await api.call("GET", "/revisions", {}), 400, "bind param failed")


async def test_services_without_lifecycle_keys_answer_as_before(client):
    """No edited_at, no placeholders, no window: a service that configures nothing sees the version-2 answers."""
    api = api_of(client, CASCADE)
    post = await api.publish("ann", "v1")
    comment = await api.comment(post, "bob")
    await api.ok("PUT", "/update", {"post_id": post, "user_id": "ann"}, data={"content": "v2"})
    await api.ok("PUT", "/comments/update", {"comment_id": comment, "user_id": "bob"}, data={"content": "c2"})
    assert set((await api.ok("GET", "/getinfo", {"post_id": post}))["post"]) == {
        "id", "title", "content", "author", "time", "svc", "extra"}
    assert set((await roots(api, post))[0]) == {"id", "user_id", "content", "root_id", "father_id", "target_user_id",
                                                "post_id", "time", "svc", "child_num", "extra", "like_count"}


# --- export ----------------------------------------------------------------------------------------------------

async def export_lines(client, svc: str, user_id: str, **params) -> tuple[httpx.Response, list[dict]]:
    query = {"svc": svc, "appKey": im_backend.encrypt_appkey(SECRET), "user_id": user_id, **params}
    response = await client.get("/api/v1/posts/users/export", params=query)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/x-ndjson"
    return response, [json.loads(line) for line in response.text.splitlines()]


async def test_export_has_every_kind_of_a_users_data(client, db):
    api = api_of(client, CASCADE)
    post = await api.publish("exp1", "mine", title="t")
    other = await api.publish("someone", "theirs")
    comment = await api.comment(other, "exp1", "my comment")
    reply = await api.reply(other, comment, comment, "exp1", "my reply")
    await api.comment(other, "someone", "not mine")
    await api.ok("PUT", "/like", {"post_id": other, "user_id": "exp1"}, json={"like": True})
    await api.ok("PUT", "/comments/like", {"post_id": other, "comment_id": comment, "user_id": "exp1"},
                 json={"like": True})
    await api.ok("POST", "/report", {"post_id": other, "user_id": "exp1"}, data={"reason": "spam", "note": "n"})
    await api.ok("PUT", "/moderation/ban", json={"user_id": "exp1", "mode": "premod", "reason": "r",
                                                 "moderator": "m", "until": "2031-01-01T00:00:00Z"})
    _, lines = await export_lines(client, CASCADE, "exp1")
    by_type = {}
    for line in lines:
        by_type.setdefault(line["type"], []).append(line)
    assert set(by_type) == {"post", "comment", "post_like", "comment_like", "report", "ban"}
    assert [(p["id"], p["content"], p["title"], p["author"]) for p in by_type["post"]] == [(post, "mine", "t", "exp1")]
    assert sorted(c["id"] for c in by_type["comment"]) == [comment, reply]
    assert {c["user_id"] for c in by_type["comment"]} == {"exp1"}
    assert by_type["post_like"][0]["post_id"] == other
    assert (by_type["comment_like"][0]["comment_id"], by_type["comment_like"][0]["post_id"]) == (comment, other)
    assert (by_type["report"][0]["kind"], by_type["report"][0]["id"], by_type["report"][0]["reason"]) == (
        "post", other, "spam")
    assert (by_type["ban"][0]["mode"], by_type["ban"][0]["until"]) == ("premod", "2031-01-01T00:00:00Z")
    await api.ok("DELETE", "/moderation/ban", {"user_id": "exp1"})
    # ids as strings, like every other answer with ids=string
    _, lines = await export_lines(client, CASCADE, "exp1", ids="string")
    assert {line["id"] for line in lines if line["type"] == "post"} == {str(post)}
    # nobody's data: an empty answer
    response, lines = await export_lines(client, CASCADE, "nobody-at-all")
    assert lines == [] and response.content == b""


def peak_memory(pid: int) -> int:
    """The process's peak resident memory (VmHWM), bytes."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


async def test_export_of_thousands_of_rows_is_streamed(server, client, db):
    """30,000 comments of 2 kB (60 MB): the first lines arrive while the server is still reading its cursor
    (its transaction stays open as long as the client does not read on), every row arrives once, and the server's
    peak memory grows by far less than the answer's size."""
    svc, user, rows = CASCADE, "bulk-exporter", 30000
    post = await api_of(client, svc).publish("someone", "big thread")
    base = (int(time.time()) << 32) | 0xE0000000
    await db.copy_records_to_table(f"{svc}_post_comment_info",
                                   records=[(base + i, user, post, "x" * 2000) for i in range(rows)],
                                   columns=["id", "user_id", "post_id", "content"])
    query = {"svc": svc, "appKey": im_backend.encrypt_appkey(SECRET), "user_id": user}
    peak = peak_memory(server.process.pid)
    async with client.stream("GET", "/api/v1/posts/users/export", params=query) as response:
        assert response.status_code == 200 and "content-length" not in response.headers
        lines = response.aiter_lines()
        first = json.loads(await anext(lines))
        assert first["type"] == "comment" and first["user_id"] == user
        await asyncio.sleep(0.5)  # not reading: the server waits with its cursor open
        reading = await db.fetchval("""SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%'
                                       AND query LIKE '%post_comment_info%user_id = $1%'""")
        assert reading == 1
        ids = {first["id"]}
        async for line in lines:
            ids.add(json.loads(line)["id"])
    assert ids == {base + i for i in range(rows)}
    assert peak_memory(server.process.pid) - peak < 20 << 20  # (the whole answer in memory: 60 MB and more)
    await asyncio.sleep(0.2)
    assert await db.fetchval("""SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%'
                                AND query LIKE '%post_comment_info%user_id = $1%'""") == 0
    await db.execute(f'DELETE FROM "{svc}_post_comment_info" WHERE user_id = $1', user)


async def test_an_export_left_half_read_frees_its_connection(client, db):
    svc, user = CASCADE, "quitter"
    post = await api_of(client, svc).publish("someone", "thread")
    base = (int(time.time()) << 32) | 0xD0000000
    await db.copy_records_to_table(f"{svc}_post_comment_info",
                                   records=[(base + i, user, post, "y" * 500) for i in range(20000)],
                                   columns=["id", "user_id", "post_id", "content"])
    query = {"svc": svc, "appKey": im_backend.encrypt_appkey(SECRET), "user_id": user}
    async with httpx.AsyncClient(base_url=str(client.base_url), timeout=30) as own:
        async with own.stream("GET", "/api/v1/posts/users/export", params=query) as response:
            await anext(response.aiter_lines())
    gone = await eventually(lambda: db.fetchval(
        """SELECT count(*) = 0 FROM pg_stat_activity WHERE query LIKE '%post_comment_info%user_id = $1%'
           AND state LIKE 'idle in transaction%'"""), timeout=10)
    assert gone
    await db.execute(f'DELETE FROM "{svc}_post_comment_info" WHERE user_id = $1', user)
