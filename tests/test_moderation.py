"""Moderation: statuses, the word filter, the hook, reports, the queue, decisions and their audit log, bans.
Real PostgreSQL and Redis; the hook is a real HTTP server on 127.0.0.1 that checks every call's signature with the
`standardwebhooks` library."""
from __future__ import annotations

import asyncio
import datetime as dt
import http.server
import json
import threading
import time

import httpx
import pytest
import pytest_asyncio
import standardwebhooks

import im_backend
from conftest import SECRET, Api, app_config, eventually, svc_name, webhook_secret

BIND = "bind param failed"
OFF, POST, REJ, PRE, HOOK = (svc_name(n) for n in ("moff", "mpost", "mrej", "mpre", "mhook"))


class HookServer:
    """The moderation hook: answers each call by `self.answer` ("accept", "hold", "reject", "slow", "500",
    "garbage", "huge": an answer of 100 kB; "chunked": hold, chunked; "close": hold, then the connection closes;
    "drop": hold, then the connection closes without saying so), verifying the signature as a receiver would."""

    def __init__(self, secret: str) -> None:
        self.webhook_secret = secret
        self.webhook = standardwebhooks.Webhook(secret)
        self.answer, self.calls, self.unverified = "accept", [], 0
        hook = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                try:
                    check = hook.webhook.verify(body, dict(self.headers.items()))
                except Exception:
                    check, hook.unverified = None, hook.unverified + 1
                hook.calls.append(check)
                answer = hook.answer
                if answer == "slow":
                    time.sleep(1.0)
                status, payload = 200, json.dumps({"decision": answer, "reason": "classifier said so"}).encode()
                if answer == "500":
                    status = 500
                elif answer == "garbage":
                    payload = b"<html>not json"
                elif answer == "huge":
                    payload = json.dumps({"decision": "accept", "reason": "x" * 100_000}).encode()
                elif answer in ("chunked", "close", "drop"):
                    payload = json.dumps({"decision": "hold", "reason": answer}).encode()
                try:
                    self.send_response(status)
                    if answer == "chunked":
                        self.send_header("transfer-encoding", "chunked")
                        self.end_headers()
                        for i in range(0, len(payload), 7):
                            self.wfile.write(b"%x\r\n%s\r\n" % (len(payload[i:i + 7]), payload[i:i + 7]))
                        self.wfile.write(b"0\r\n\r\n")
                        return
                    self.send_header("content-length", str(len(payload)))
                    if answer == "close":
                        self.send_header("connection", "close")
                    self.end_headers()
                    self.wfile.write(payload)
                    if answer in ("close", "drop"):
                        self.close_connection = True
                except OSError:
                    pass

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/check"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def hook():
    server = HookServer(webhook_secret())
    yield server
    server.stop()


def moderated_config(backing: dict, hook: HookServer) -> dict:
    config = app_config(backing, {OFF: SECRET, POST: SECRET, REJ: SECRET, PRE: SECRET, HOOK: SECRET})
    config["moderation"] = {"words": ["bad", "坏词"], "report_threshold": 2}  # the default of every service
    entries = {POST: {"mode": "post"}, REJ: {"mode": "post", "on_word": "reject"}, PRE: {"mode": "pre"},
               HOOK: {"mode": "post", "words": [], "hook": {"url": hook.url, "secret": hook.webhook_secret,
                                                            "timeout_ms": 300, "on_error": "hold"}}}
    for entry in config["svc"]:
        if entry["name"] in entries:
            entry["moderation"] = entries[entry["name"]]
    return config


@pytest.fixture(scope="module")
def servers(workdir, backing, hook):
    """Two server processes on one database: A and B."""
    from conftest import Server
    started = []
    for name in ("mod-a", "mod-b"):
        started.append(Server(workdir / name, moderated_config(backing, hook)).start())
    yield started
    for srv in started:
        srv.stop()


@pytest_asyncio.fixture
async def clients(servers):
    async with httpx.AsyncClient(base_url=servers[0].url, timeout=30) as a, \
            httpx.AsyncClient(base_url=servers[1].url, timeout=30) as b:
        yield a, b


def apis(clients, svc: str) -> tuple[Api, Api]:
    return Api(clients[0], svc, SECRET), Api(clients[1], svc, SECRET)


async def post_counts(api: Api, post_id: int, viewer: str | None = None) -> dict:
    params = {"post_id": post_id, "counts": 1, **({"viewer": viewer} if viewer else {})}
    return (await api.ok("GET", "/getinfo", params))["post"]


async def roots(api: Api, post_id: int, **params) -> list[dict]:
    page = await api.ok("GET", "/comments/getinfo", {"post_id": post_id, "root_comment_id": 0, **params})
    return page["comments"]


async def decide(api: Api, kind: str, item_id: int, decision: str, moderator: str = "mod") -> list:
    return (await api.ok("PUT", "/moderation/decide", json={"items": [{"kind": kind, "id": item_id}],
                                                           "decision": decision, "moderator": moderator}))["results"]


async def events_of(db, svc: str, kind: str, key: str, item_id: int) -> int:
    return await db.fetchval(f'SELECT count(*) FROM "{svc}_events" WHERE type = $1 AND (data->>$2)::bigint = $3',
                             kind, key, item_id)


# --- configuration and the word filter (no server) -----------------------------------------------------------

def test_configuration_defaults_overrides_and_errors(tmp_path):
    base = f"svc: [{{name: s1, secret: {SECRET}}}, {{name: s2, secret: {SECRET}, moderation: {{mode: pre}}}}]\n"
    config = im_backend.parse_app_config(base + "moderation: {mode: off, words: [x], report_threshold: 5}\n", tmp_path)
    assert config.tenants["s1"].moderation.mode == "off"  # unquoted off reads as YAML false
    assert (config.tenants["s2"].moderation.mode, config.tenants["s2"].moderation.words,
            config.tenants["s2"].moderation.report_threshold) == ("pre", ("x",), 5)  # key by key
    assert im_backend.parse_app_config(base).tenants["s1"].moderation == im_backend.ModerationConfig()
    config = im_backend.parse_app_config(base + "moderation: {words_file: words.txt}\n", tmp_path)
    assert config.tenants["s1"].moderation.words_file == str(tmp_path / "words.txt")
    for bad, named in [("{mode: on}", "'mode'"), ("{mode: later}", "'mode'"), ("{on_word: delete}", "'on_word'"),
                       ("{report_threshold: -1}", "'report_threshold'"), ("{words: bad}", "'words'"),
                       ("{hook: {url: 'ftp://x', secret: whsec_AAAA}}", "'hook.url'"),
                       ("{hook: {url: 'http://x', secret: nope}}", "'hook.secret'"),
                       (f"{{hook: {{url: 'http://x', secret: {webhook_secret()}, timeout_ms: 0}}}}", "'hook.timeout_ms'"),
                       (f"{{hook: {{url: 'http://x', secret: {webhook_secret()}, on_error: maybe}}}}", "'hook.on_error'")]:
        text = f"svc: [{{name: s1, secret: {SECRET}, moderation: {bad}}}]\n"
        with pytest.raises(im_backend.ConfigError, match="service 's1'.*" + named.replace(".", r"\.")):
            im_backend.parse_app_config(text)


@pytest.mark.parametrize("text", ["b a d", "ｂａｄ", "B\u200bA\u200dD", "BaD!", "this is b-a-d news", "坏\u200b词",
                                  "坏 词", "ＢＡＤ"])
def test_the_word_filter_sees_through_evasions(text):
    assert im_backend.WordFilter(["bad", "坏词"]).match([text]) in ("bad", "坏词")


def test_the_word_filter_passes_clean_text_and_scales():
    words = [f"w{n}x" for n in range(10_000)] + ["bad"]
    word_filter = im_backend.WordFilter(words)
    assert word_filter.match(["a good day", "badminton? no: ba d"]) == "bad"  # substring of a word counts
    assert word_filter.match(["a good day", "w12y"]) is None
    assert im_backend.WordFilter(["  ", "!!"]).match(["!!"]) is None  # words that normalise to nothing are dropped


# --- statuses, visibility and counts -------------------------------------------------------------------------

async def test_a_service_without_moderation_answers_as_before(clients):
    off, _ = apis(clients, OFF)
    post = await off.publish(content="bad words are fine here")
    got = await off.ok("GET", "/getinfo", {"post_id": post})
    assert "status" not in got["post"] and got["post"]["content"] == "bad words are fine here"
    assert "status" not in (await post_counts(off, post))


async def test_word_hold_and_reject(clients, db):
    post_api, _ = apis(clients, POST)
    held = await post_api.publish(author="wally", content="so ｂ ａ d")
    assert (await post_api.ok("GET", "/getinfo", {"post_id": held, "viewer": "wally"}))["post"]["status"] == "pending"
    rej, _ = apis(clients, REJ)
    before = await db.fetchval(f'SELECT count(*) FROM "{REJ}_post_info"')
    status, body = await rej.call("POST", "/publish", data={"author": "wally", "content": "坏\u200b词"})
    assert (status, body) == (422, {"code": 422, "msg": "content rejected", "data": {"reason": "word", "detail": "坏词"}})
    status, body = await rej.call("POST", "/publish", data={"author": "wally", "content": "ok", "title": "BAD"})
    assert status == 422 and body["data"]["reason"] == "word"
    assert await db.fetchval(f'SELECT count(*) FROM "{REJ}_post_info"') == before  # nothing written
    visible = await rej.publish(author="wally", content="fine")
    status, body = await rej.call("PUT", "/update", {"post_id": visible, "user_id": "wally"}, data={"content": "bad"})
    assert status == 422
    assert (await rej.ok("GET", "/getinfo", {"post_id": visible}))["post"]["content"] == "fine"


async def test_pending_is_invisible_in_every_read_and_count_but_to_its_author(clients, db):
    pre, _ = apis(clients, PRE)
    post = await pre.publish(author="paula", content="hello")  # mode pre: pending
    for params in ({"post_id": post}, {"post_id": post, "counts": 1}, {"post_id": post, "viewer": "other"}):
        status, body = await pre.call("GET", "/getinfo", params)
        assert body["code"] == 10006, params
    own = (await pre.ok("GET", "/getinfo", {"post_id": post, "viewer": "paula"}))["post"]
    assert own["status"] == "pending" and own["content"] == "hello"
    assert (await pre.ok("GET", "/getbatch", {"post_ids": str(post)}))["posts"] == [None]
    assert (await pre.ok("GET", "/getbatch", {"post_ids": str(post), "viewer": "paula"}))["posts"][0]["id"] == post
    assert post not in (await pre.ok("GET", "/getlist", {"limit": 100}))["post_list"]
    assert post not in (await pre.ok("GET", "/getlist", {"limit": 100, "author": "paula"}))["post_list"]
    assert post not in (await pre.ok("GET", "/getlist", {"limit": 100, "expand": 1, "viewer": "other"}))["post_list"]
    mine = await pre.ok("GET", "/getlist", {"limit": 100, "expand": 1, "viewer": "paula"})  # the author's own feed
    assert post in mine["post_list"] and mine["posts"][mine["post_list"].index(post)]["status"] == "pending"
    assert post in (await pre.ok("GET", "/getlist", {"limit": 100, "author": "paula", "viewer": "paula"}))["post_list"]
    assert (await pre.call("PUT", "/like", {"post_id": post, "user_id": "fan"}, json={"like": True}))[1]["code"] == 10006
    assert (await pre.call("PUT", "/update", {"post_id": post, "user_id": "other"}, data={"content": "x"}))[1][
        "code"] == 10006
    assert await decide(pre, "post", post, "approve") == [{"kind": "post", "id": post, "status": "visible"}]
    assert (await pre.ok("GET", "/getinfo", {"post_id": post}))["post"]["status"] == "visible"
    assert post in (await pre.ok("GET", "/getlist", {"limit": 100}))["post_list"]

    # a pending comment: not read, not counted, not likeable; its author sees it
    comment = await pre.comment(post, "cora", "a comment")
    assert await roots(pre, post) == []
    assert [c["id"] for c in await roots(pre, post, viewer="cora")] == [comment]
    assert (await roots(pre, post, viewer="cora"))[0]["status"] == "pending"
    assert (await roots(pre, post, viewer="cora", sort="top"))[0]["id"] == comment
    assert (await post_counts(pre, post))["comment_count"] == 0
    assert (await pre.ok("GET", "/comments/getlike", {"comment_ids": str(comment)}))["likes"] == [0]
    status, body = await pre.call("PUT", "/comments/like", {"post_id": post, "comment_id": comment, "user_id": "fan"},
                                  json={"like": True})
    assert body["code"] == 10006
    status, body = await pre.call("POST", "/comments/reply", {"post_id": post, "root_comment_id": comment,
                                                              "father_comment_id": comment, "user_id": "fan"},
                                  data={"content": "re"})
    assert body["code"] == 10006
    assert await decide(pre, "comment", comment, "approve") == [{"kind": "comment", "id": comment,
                                                                 "status": "visible"}]
    assert (await post_counts(pre, post))["comment_count"] == 1
    assert [c["id"] for c in await roots(pre, post)] == [comment]


async def test_decisions_move_counts_and_write_the_audit_log(clients, db):
    mod, _ = apis(clients, POST)
    post = await mod.publish(author="olga")
    root = await mod.comment(post, "u1", "root")
    replies = [await mod.reply(post, root, root, f"r{n}", "reply") for n in range(2)]
    assert (await post_counts(mod, post))["comment_count"] == 3
    assert (await roots(mod, post))[0]["child_num"] == 2

    assert (await decide(mod, "comment", root, "remove"))[0]["status"] == "removed"
    assert (await post_counts(mod, post))["comment_count"] == 0  # the root and its replies leave together
    page = await mod.ok("GET", "/comments/getinfo", {"post_id": post, "root_comment_id": root})
    assert page["comments"] == []  # replies under a hidden root are hidden with it
    assert (await decide(mod, "comment", root, "remove"))[0]["status"] == "removed"  # idempotent
    assert (await decide(mod, "comment", root, "approve"))[0]["status"] == "removed"  # not from removed
    assert (await decide(mod, "comment", root, "restore"))[0]["status"] == "visible"
    assert (await post_counts(mod, post))["comment_count"] == 3

    assert (await decide(mod, "comment", replies[0], "remove"))[0]["status"] == "removed"
    assert (await post_counts(mod, post))["comment_count"] == 2
    assert (await roots(mod, post))[0]["child_num"] == 1
    results = (await mod.ok("PUT", "/moderation/decide", json={
        "items": [{"kind": "comment", "id": replies[0]}, {"kind": "post", "id": 12345}], "decision": "restore",
        "moderator": "mod", "note": "on appeal"}))["results"]
    assert results == [{"kind": "comment", "id": replies[0], "status": "visible"}, None]
    assert (await post_counts(mod, post))["comment_count"] == 3
    assert (await roots(mod, post))[0]["child_num"] == 2

    entries = (await mod.ok("GET", "/moderation/log", {"kind": "comment", "id": root}))["entries"]
    assert [(e["from"], e["to"], e["moderator"]) for e in entries] == [("visible", "removed", "mod"),
                                                                        ("removed", "visible", "mod")]
    entries = (await mod.ok("GET", "/moderation/log", {"kind": "comment", "id": replies[0]}))["entries"]
    assert [(e["from"], e["to"], e["note"]) for e in entries] == [("visible", "removed", None),
                                                                   ("removed", "visible", "on appeal")]

    # the counts stored are the counts of the rows (a base made again from the rows agrees)
    await db.execute(f'DELETE FROM "{POST}_like_counts" WHERE kind = \'comments\' AND target_id = $1', post)
    await db.execute(f'DELETE FROM "{POST}_counter_slots" WHERE kind = \'comments\' AND target_id = $1', post)
    await decide(mod, "comment", replies[1], "remove")
    await asyncio.sleep(0.6)  # the near cache of the page
    assert (await post_counts(mod, post))["comment_count"] == 2

    # reject: pending -> rejected, and a rejected item is out of reach
    held = await mod.comment(post, "u9", "bad")
    assert (await decide(mod, "comment", held, "reject"))[0]["status"] == "rejected"
    assert (await post_counts(mod, post))["comment_count"] == 2
    assert [c["id"] for c in await roots(mod, post, viewer="u9")] == [root]  # a rejected one is not shown



async def test_a_reply_deleted_while_its_root_is_removed_leaves_the_count_once(clients, backing, db):
    """A decision removing a root and its author deleting a reply, at the same moment: the reply leaves
    comment_count once (with its root, or by its delete), never twice."""
    mod, _ = apis(clients, POST)
    post = await mod.publish(author="rhea")
    root = await mod.comment(post, "rob", "root")
    reply = await mod.reply(post, root, root, "rex", "reply")
    assert (await post_counts(mod, post))["comment_count"] == 2
    # Stall the decision inside its transaction, after it has counted the root's visible replies: hold the
    # moderation row it is about to write (an uncommitted insert of the same key).
    stall = await asyncpg_connect(backing)
    try:
        holding = stall.transaction()
        await holding.start()
        await stall.execute(f'INSERT INTO "{POST}_moderation" (kind, id, post_id, status, reasons) '
                            "VALUES ('comment', $1, $2, 'visible', '{}')", root, post)
        decision = asyncio.ensure_future(decide(mod, "comment", root, "remove"))
        assert await eventually(lambda: waiting_on_a_lock(db, "_moderation"), timeout=10)
        delete = asyncio.ensure_future(mod.ok("DELETE", "/comments/delete", {"comment_id": reply,
                                                                               "user_id": "rex"}))
        await asyncio.sleep(0.5)  # the delete waits for the decision (it holds the root), or would run now
        await holding.rollback()
        assert await decision == [{"kind": "comment", "id": root, "status": "removed"}]
        await delete
    finally:
        await stall.close()
    assert (await post_counts(mod, post))["comment_count"] == 0
    assert await decide(mod, "comment", root, "restore") == [{"kind": "comment", "id": root, "status": "visible"}]
    assert (await post_counts(mod, post))["comment_count"] == 1


async def test_a_reply_made_while_its_root_is_removed_is_counted_with_it(clients, backing, db):
    """A reply that passed its checks while the root was visible, written as a decision removes the root: it
    waits for the decision, is not counted in comment_count nor announced, and comes back with its root."""
    mod, _ = apis(clients, POST)
    post = await mod.publish(author="rhea")
    root = await mod.comment(post, "rob", "root")
    assert (await post_counts(mod, post))["comment_count"] == 1
    assert (await roots(mod, post))[0]["child_num"] == 0  # (the root cached visible; both counts have a base)
    stall = await asyncpg_connect(backing)
    try:
        holding = stall.transaction()
        await holding.start()
        await stall.execute(f'INSERT INTO "{POST}_moderation" (kind, id, post_id, status, reasons) '
                            "VALUES ('comment', $1, $2, 'visible', '{}')", root, post)
        decision = asyncio.ensure_future(decide(mod, "comment", root, "remove"))
        assert await eventually(lambda: waiting_on_a_lock(db, "_moderation"), timeout=10)
        reply = asyncio.ensure_future(mod.reply(post, root, root, "rex", "reply"))
        await asyncio.sleep(0.5)  # the reply waits for the decision (it holds the root)
        await holding.rollback()
        assert await decision == [{"kind": "comment", "id": root, "status": "removed"}]
        reply = await reply
    finally:
        await stall.close()
    assert (await post_counts(mod, post))["comment_count"] == 0
    assert await events_of(db, POST, "comment.replied", "comment_id", reply) == 0
    assert await decide(mod, "comment", root, "restore") == [{"kind": "comment", "id": root, "status": "visible"}]
    assert (await post_counts(mod, post))["comment_count"] == 2
    assert (await roots(mod, post))[0]["child_num"] == 1


async def test_a_reply_to_a_root_being_deleted_is_refused_not_orphaned(clients, backing, db):
    """A reply that found its root, written while the root's delete commits: it waits for the delete, then
    answers 10006 and writes nothing (no reply without its thread, nothing counted)."""
    api, _ = apis(clients, OFF)
    post = await api.publish(author="rhea")
    root = await api.comment(post, "rob", "root")
    assert (await post_counts(api, post))["comment_count"] == 1
    assert (await roots(api, post))[0]["like_count"] == 0  # (the root's like count has a base row now)
    stall = await asyncpg_connect(backing)
    try:
        holding = stall.transaction()
        await holding.start()  # the delete, after it has locked and deleted the root, waits for this row
        await stall.execute(f'SELECT 1 FROM "{OFF}_like_counts" WHERE kind = \'comment\' AND target_id = $1 '
                            "FOR UPDATE", root)
        delete = asyncio.ensure_future(api.ok("DELETE", "/comments/delete", {"comment_id": root, "user_id": "rob"}))
        assert await eventually(lambda: waiting_on_a_lock(db, "_like_counts"), timeout=10)
        reply = asyncio.ensure_future(api.call("POST", "/comments/reply", {
            "post_id": post, "root_comment_id": root, "father_comment_id": root, "user_id": "rex"},
            data={"content": "re"}))
        assert await eventually(lambda: waiting_on_a_lock(db, "FOR KEY SHARE"), timeout=10)
        await holding.rollback()
        await delete
        status, body = await reply
    finally:
        await stall.close()
    assert body["code"] == 10006, body
    assert await db.fetchval(f'SELECT count(*) FROM "{OFF}_post_comment_info" WHERE post_id = $1', post) == 0
    assert (await post_counts(api, post))["comment_count"] == 0
    assert await db.fetchval(f'SELECT count(*) FROM "{OFF}_events" WHERE type = \'comment.replied\' '
                             "AND post_id = $1", post) == 0


async def asyncpg_connect(backing: dict):
    import asyncpg
    cfg = backing["db"]
    return await asyncpg.connect(host=cfg["host"], port=cfg["port"], user=cfg["user"],
                                 password=cfg["password"] or None, database=cfg["dbname"])


async def waiting_on_a_lock(db, table_part: str) -> bool:
    return bool(await db.fetchval("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                  "AND query LIKE '%' || $1 || '%'", table_part))

async def test_comment_published_fires_once_at_first_visibility(clients, db):
    pre, _ = apis(clients, PRE)
    post = await pre.publish(author="evan")
    await decide(pre, "post", post, "approve")
    assert await events_of(db, PRE, "post.published", "post_id", post) == 1
    comment = await pre.comment(post, "eve", "hi")
    assert await events_of(db, PRE, "comment.published", "comment_id", comment) == 0
    assert await events_of(db, PRE, "comment.moderated", "comment_id", comment) == 1
    await decide(pre, "comment", comment, "approve")
    assert await events_of(db, PRE, "comment.published", "comment_id", comment) == 1
    await decide(pre, "comment", comment, "remove")
    await decide(pre, "comment", comment, "restore")
    assert await events_of(db, PRE, "comment.published", "comment_id", comment) == 1
    moderated = await db.fetch(f'SELECT data FROM "{PRE}_events" WHERE type = \'comment.moderated\' '
                               f"AND (data->>'comment_id')::bigint = $1 ORDER BY id", comment)
    moderated = [json.loads(m["data"]) for m in moderated]
    assert moderated[0]["reasons"] == ["pre"] and moderated[0]["moderator"] is None
    assert [(m["from"], m["to"], m["source"]) for m in moderated] == [
        (None, "pending", "moderator"), ("pending", "visible", "moderator"), ("visible", "removed", "moderator"),
        ("removed", "visible", "moderator")]
    reply = await pre.reply(post, comment, comment, "ria", "re")
    assert await events_of(db, PRE, "comment.replied", "comment_id", reply) == 0
    await decide(pre, "comment", reply, "approve")
    assert await events_of(db, PRE, "comment.replied", "comment_id", reply) == 1


# --- the hook ---------------------------------------------------------------------------------------------------

async def test_the_hook_decides_and_its_failures_follow_on_error(clients, hook, db):
    api, _ = apis(clients, HOOK)

    async def publish_status(answer: str):
        hook.answer = answer
        status, body = await api.call("POST", "/publish", data={"author": "hank", "content": "hi"})
        if body["code"] != 200:
            return body
        post = body["data"]["post_id"]
        return (await api.ok("GET", "/getinfo", {"post_id": post, "viewer": "hank"}))["post"]["status"]

    hook.calls.clear()
    assert await publish_status("accept") == "visible"
    assert await publish_status("hold") == "pending"
    assert await publish_status("reject") == {"code": 422, "msg": "content rejected",
                                              "data": {"reason": "hook", "detail": "classifier said so"}}
    assert len(hook.calls) == 3 and hook.unverified == 0
    assert hook.calls[0]["type"] == "moderation.check" and hook.calls[0]["kind"] == "post"
    assert hook.calls[0]["action"] == "publish" and hook.calls[0]["item"]["content"] == "hi"
    # the answer chunked, a connection closed after the answer (said or not): read right, the next call works
    for answer in ("chunked", "close", "drop", "drop", "accept", "close", "accept"):
        assert await publish_status(answer) == ("visible" if answer == "accept" else "pending"), answer
    assert await publish_status("huge") == "pending"  # too long an answer is a bad one: on_error (hold)
    assert await publish_status("accept") == "visible"  # (a success: the failures in a row start again)
    # on_error: hold, for a timeout (the hook answers after 1 s, timeout_ms is 300), a 500, an answer not JSON
    started = time.monotonic()
    assert await publish_status("slow") == "pending"
    assert time.monotonic() - started < 0.95  # it did not wait for the answer
    assert await publish_status("500") == "pending"
    assert await publish_status("garbage") == "pending"
    assert await publish_status("garbage") == "pending"  # 4 failures in a row
    calls = len(hook.calls)
    assert await publish_status("garbage") == "pending"  # the 5th: the breaker opens
    assert len(hook.calls) == calls + 1
    assert await publish_status("accept") == "pending"  # skipped: on_error at once, the hook not called
    assert len(hook.calls) == calls + 1
    hook.answer = "accept"


# --- reports, the queue ------------------------------------------------------------------------------------------

async def test_a_report_threshold_across_two_processes_and_the_queue(clients):
    a, b = apis(clients, POST)
    post = await a.publish(author="rita", content="clean")
    assert (await a.ok("POST", "/report", {"post_id": post, "user_id": "r1"},
                       data={"reason": "spam", "note": "buy now"})) == {"report_count": 1}
    assert (await a.ok("POST", "/report", {"post_id": post, "user_id": "r1"}, data={"reason": "abuse"})) == {
        "report_count": 1}  # again: the reason is replaced
    assert (await a.ok("GET", "/getinfo", {"post_id": post}))["post"]["status"] == "visible"
    assert (await b.ok("POST", "/report", {"post_id": post, "user_id": "r2"}, json={"reason": "spam"})) == {
        "report_count": 2}
    assert (await b.call("GET", "/getinfo", {"post_id": post}))[1]["code"] == 10006
    # the other process's near cache serves what it read for at most cache.near_ttl (0.5 s)
    assert await eventually(lambda: _code(a.call("GET", "/getinfo", {"post_id": post}), 10006), timeout=2)
    queued = await a.ok("GET", "/moderation/queue", {"status": "pending", "kind": "post", "limit": 100})
    entry = next(item for item in queued["items"] if item["id"] == post)
    assert entry["reasons"] == ["reports"] and entry["reports"] == {"abuse": 1, "spam": 1}
    assert entry["item"]["content"] == "clean" and entry["status"] == "pending"
    reported = await a.ok("GET", "/moderation/queue", {"status": "reported", "limit": 100})
    assert post in [item["id"] for item in reported["items"]]
    await decide(b, "post", post, "approve")  # closes its reports
    reported = await a.ok("GET", "/moderation/queue", {"status": "reported", "limit": 100})
    assert post not in [item["id"] for item in reported["items"]]
    entries = (await a.ok("GET", "/moderation/log", {"kind": "post", "id": post}))["entries"]
    assert [(e["from"], e["to"], e["source"]) for e in entries] == [("visible", "pending", "report"),
                                                                     ("pending", "visible", "moderator")]


async def test_the_queue_pages_oldest_first(clients):
    pre, _ = apis(clients, PRE)
    ids = [await pre.publish(author="qq", content=f"n{n}") for n in range(5)]
    seen, cursor = [], None
    for _ in range(20):
        page = await pre.ok("GET", "/moderation/queue", {"status": "pending", "kind": "post", "limit": 2,
                                                         **({"cursor": cursor} if cursor else {})})
        seen += [item["id"] for item in page["items"]]
        if not page["items"]:
            break
        cursor = page["next_cursor"]
    assert [i for i in seen if i in ids] == ids and len(seen) == len(set(seen))


# --- bans ---------------------------------------------------------------------------------------------------------

async def test_a_ban_made_on_one_process_holds_on_the_other_within_a_second_and_expires(clients, db):
    a, b = apis(clients, OFF)  # bans apply in mode off too
    post = await a.publish(author="owner")
    own = await b.publish(author="villain")
    until = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=4)
    ban = await a.ok("PUT", "/moderation/ban", json={"user_id": "villain", "until": until.isoformat(),
                                                     "reason": "spam", "moderator": "mod"})
    assert ban["ban"]["mode"] == "ban" and ban["ban"]["until"].startswith(until.strftime("%Y-%m-%dT%H:%M:%S"))
    deadline, answer = time.monotonic() + 1.0, None
    while time.monotonic() < deadline:
        answer = await b.call("PUT", "/like", {"post_id": post, "user_id": "villain"}, json={"like": True})
        if answer[0] == 403:
            break
        await asyncio.sleep(0.05)
    assert answer[0] == 403 and answer[1]["msg"] == "user is banned" and answer[1]["data"]["until"]
    likes = await db.fetchval(f'SELECT count(*) FROM "{OFF}_post_like" WHERE user_id = $1', "villain")
    for api in (a, b):
        for call in [("POST", "/publish", None, {"data": {"author": "villain", "content": "x"}}),
                     ("POST", "/comments/publish", {"post_id": post, "user_id": "villain"}, {"data": {"content": "x"}}),
                     ("PUT", "/update", {"post_id": own, "user_id": "villain"}, {"data": {"content": "x"}}),
                     ("POST", "/report", {"post_id": post, "user_id": "villain"}, {"data": {"reason": "spam"}})]:
            status, body = await api.call(call[0], call[1], call[2], **call[3])
            assert (status, body["code"]) == (403, 403), call
    assert await db.fetchval(f'SELECT count(*) FROM "{OFF}_post_like" WHERE user_id = $1', "villain") == likes
    bans = (await b.ok("GET", "/moderation/bans", {"limit": 100}))["bans"]
    assert [x["reason"] for x in bans if x["user_id"] == "villain"] == ["spam"]
    await b.ok("DELETE", "/delete", {"post_id": own, "user_id": "villain"})  # deleting their own stays allowed
    assert await eventually(lambda: _code(b.call("POST", "/publish", data={"author": "villain", "content": "back"}),
                                          200), timeout=10, interval=0.2)  # expired by itself, on both processes
    assert (await a.call("POST", "/publish", data={"author": "villain", "content": "back"}))[0] == 200
    assert "villain" not in [x["user_id"] for x in (await b.ok("GET", "/moderation/bans", {"limit": 100}))["bans"]]


async def test_premod_ban_and_lifting(clients):
    a, b = apis(clients, OFF)
    await a.ok("PUT", "/moderation/ban", json={"user_id": "newbie", "mode": "premod", "moderator": "mod"})
    held = await eventually(lambda: _status_after_publish(b, "newbie"), timeout=2, interval=0.05)
    assert held == "pending"
    assert (await a.ok("DELETE", "/moderation/ban", {"user_id": "newbie"})) == {"lifted": True}
    assert (await a.ok("DELETE", "/moderation/ban", {"user_id": "newbie"})) == {"lifted": False}
    assert await eventually(lambda: _visible_after_publish(b, "newbie"), timeout=2, interval=0.05)


async def _code(call, code: int) -> bool:
    return (await call)[1]["code"] == code


async def _status_after_publish(api: Api, author: str) -> str | None:
    post = await api.publish(author=author)
    status = (await api.ok("GET", "/getinfo", {"post_id": post, "viewer": author}))["post"].get("status", "visible")
    return status if status == "pending" else None


async def _visible_after_publish(api: Api, author: str) -> bool:
    post = await api.publish(author=author)
    return (await api.call("GET", "/getinfo", {"post_id": post}))[1]["code"] == 200


# --- bad input on every new route -----------------------------------------------------------------------------

@pytest.mark.parametrize("method,path,params,body", [
    ("POST", "/report", {"user_id": "u"}, {"data": {"reason": "spam"}}),  # neither post_id nor comment_id
    ("POST", "/report", {"post_id": "x", "user_id": "u"}, {"data": {"reason": "spam"}}),
    ("POST", "/report", {"post_id": 1, "user_id": "u"}, {"data": {"reason": "boring"}}),
    ("POST", "/report", {"post_id": 1, "user_id": "u"}, {"data": {"reason": "spam", "note": "n" * 1001}}),
    ("POST", "/report", {"post_id": 1}, {"data": {"reason": "spam"}}),
    ("GET", "/moderation/queue", {}, {}),
    ("GET", "/moderation/queue", {"status": "visible"}, {}),
    ("GET", "/moderation/queue", {"status": "pending", "kind": "reply"}, {}),
    ("GET", "/moderation/queue", {"status": "pending", "cursor": "garbage"}, {}),
    ("GET", "/moderation/queue", {"status": "pending", "limit": "-1"}, {}),
    ("PUT", "/moderation/decide", {}, {"json": {"items": [{"kind": "post", "id": 1}], "decision": "nuke",
                                                "moderator": "m"}}),
    ("PUT", "/moderation/decide", {}, {"json": {"items": [{"kind": "page", "id": 1}], "decision": "approve",
                                                "moderator": "m"}}),
    ("PUT", "/moderation/decide", {}, {"json": {"items": [], "decision": "approve", "moderator": "m"}}),
    ("PUT", "/moderation/decide", {}, {"json": {"items": [{"kind": "post", "id": n} for n in range(101)],
                                                "decision": "approve", "moderator": "m"}}),
    ("PUT", "/moderation/decide", {}, {"json": {"items": [{"kind": "post", "id": 1}], "decision": "approve"}}),
    ("PUT", "/moderation/decide", {}, {"json": {"items": "post:1", "decision": "approve", "moderator": "m"}}),
    ("PUT", "/moderation/decide", {}, {"content": b"{not json"}),
    ("GET", "/moderation/log", {"kind": "post"}, {}),
    ("GET", "/moderation/log", {"kind": "thing", "id": 1}, {}),
    ("PUT", "/moderation/ban", {}, {"json": {"user_id": "x", "until": "2001-01-01T00:00:00Z", "moderator": "m"}}),
    ("PUT", "/moderation/ban", {}, {"json": {"user_id": "x", "until": "tomorrow", "moderator": "m"}}),
    ("PUT", "/moderation/ban", {}, {"json": {"user_id": "x", "until": "2099-01-01T00:00:00", "moderator": "m"}}),
    ("PUT", "/moderation/ban", {}, {"json": {"user_id": "x", "mode": "shadow", "moderator": "m"}}),
    ("PUT", "/moderation/ban", {}, {"json": {"moderator": "m"}}),
    ("DELETE", "/moderation/ban", {}, {}),
    ("GET", "/moderation/bans", {"cursor": "nope"}, {}),
    ("GET", "/moderation/bans", {"cursor": "b!!"}, {}),
])
async def test_bad_input_on_every_new_route_gets_the_envelope(clients, method, path, params, body):
    api, _ = apis(clients, POST)
    status, answer = await api.call(method, path, params, **body)
    assert (status, answer) == (400, {"code": 400, "msg": BIND, "data": None})


# --- storage: an existing deployment is migrated -----------------------------------------------------------------

async def test_tables_of_the_previous_layout_are_migrated_on_start(make_server, backing, db):
    svc = svc_name("mold")
    previous = im_backend.DDL.split("ALTER TABLE")[0]  # the version-2 tables and indexes
    for statement in filter(str.strip, im_backend.sql(svc, previous).split(";")):
        await db.execute(statement)
    await db.execute(f'INSERT INTO "{svc}_post_info" (id, content, title, author, created_at, updated_at) '
                     "VALUES (42, 'old', '', 'gopher', now(), now())")
    srv = make_server("migrate", app_config(backing, {svc: SECRET}, moderation={"mode": "pre"}))
    async with httpx.AsyncClient(base_url=srv.url, timeout=30) as client:
        api = Api(client, svc, SECRET)
        assert (await api.ok("GET", "/getinfo", {"post_id": 42}))["post"]["status"] == "visible"  # old rows visible
        post = await api.publish(author="new")
        assert (await api.call("GET", "/getinfo", {"post_id": post}))[1]["code"] == 10006
        queue = await api.ok("GET", "/moderation/queue", {"status": "pending"})
        assert [item["id"] for item in queue["items"]] == [post]
    assert await db.fetchval("SELECT count(*) FROM information_schema.columns WHERE table_name = $1 "
                             "AND column_name = 'status'", f"{svc}_post_comment_info") == 1


# --- words_file, metrics ------------------------------------------------------------------------------------------

async def test_a_words_file_change_applies_within_five_seconds(make_server, backing):
    svc = svc_name("mfile")
    srv = make_server("words-file", app_config(backing, {svc: SECRET},
                                               moderation={"mode": "post", "words_file": "blocked.txt"}), start=False)
    (srv.directory / "blocked.txt").write_text("first\n")
    srv.start()
    async with httpx.AsyncClient(base_url=srv.url, timeout=30) as client:
        api = Api(client, svc, SECRET)
        assert await _status_after_publish_content(api, "the FIRST one") == "pending"
        assert await _status_after_publish_content(api, "a second one") == "visible"
        (srv.directory / "blocked.txt").write_text("first\nsecond\n")
        started = time.monotonic()
        held = await eventually(lambda: _held_content(api, "a second one"), timeout=5, interval=0.2)
        assert held and time.monotonic() - started <= 5.5
        metrics = (await client.get("/metrics")).text
    assert f'im_moderation_total{{decision="hold",source="word",svc="{svc}"}}' in metrics
    assert f'im_moderation_queue_depth{{svc="{svc}"}}' in metrics and "im_moderation_hook_seconds" in metrics


async def _status_after_publish_content(api: Api, content: str) -> str:
    post = await api.publish(author="w", content=content)
    return (await api.ok("GET", "/getinfo", {"post_id": post, "viewer": "w"}))["post"]["status"]


async def _held_content(api: Api, content: str) -> bool:
    return await _status_after_publish_content(api, content) == "pending"
