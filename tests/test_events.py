"""Events: one outbox row per committed change, signed webhooks delivered at least once with back-off,
and the live stream with resume. Receivers are real HTTP servers on 127.0.0.1 (conftest.Receiver)."""
import asyncio
import contextlib
import json
import signal

import httpx
import httpx_sse
import pytest
import pytest_asyncio

import im_backend
from conftest import (Api, Receiver, RedisProcess, Server, app_config, eventually, expect, stored_count, svc_name,
                      table_counts, webhook_secret)

SECRET = "W7K8pJ3aQv2LcXgH"
# a test-sized schedule; lease above timeout, so a slow answer on a busy machine is not sent twice
FAST = {"retry_schedule": [0.3, 0.6], "max_age": 4, "lease": 6, "timeout": 5, "poll_interval": 0.2,
        "keepalive": 1, "max_streams": 50}


def tenant(name: str, receiver_url: str | None = None, secret: str | None = None, events=None) -> dict:
    entry = {"name": name, "secret": SECRET}
    if receiver_url:
        entry["webhook"] = {"url": receiver_url, "secret": secret}
        if events:
            entry["webhook"]["events"] = events
    return entry


async def outbox(db, svc: str) -> list:
    rows = await db.fetch(f'SELECT id, type, data FROM "{svc}_events" ORDER BY id')
    return [(row["type"], json.loads(row["data"])) for row in rows]


async def stored(db, svc: str, column: str = "*"):
    return await db.fetch(f'SELECT * FROM "{svc}_events" ORDER BY id')


@pytest.fixture(scope="module")
def hooks(workdir, backing):
    """One server, several services, each with a receiver of its own behaviour. The answer timeout is longer
    than any wait here, so the server is still waiting on the hanging endpoint whenever a test looks."""
    secret = webhook_secret()
    hang = Receiver(secret, default=None)
    receivers = {
        "ev": Receiver(secret),
        "retry": Receiver(secret, plan=[500, 500, 200]),
        "hang": hang,
        "fast": Receiver(secret, observe=hang.hanging_open),  # each arrival notes the hanging requests in flight
    }
    names = {label: svc_name("e" + label) for label in ("ev", "retry", "hang", "fast", "dead", "nohook")}
    entries = [tenant(names[label], r.url, secret) for label, r in receivers.items()]
    entries.append(tenant(names["dead"], "http://127.0.0.1:9/closed", secret))  # nothing listens there
    entries.append(tenant(names["nohook"]))
    config = app_config(backing, {}, events=dict(FAST, timeout=40, lease=50))
    config["svc"] = entries
    srv = Server(workdir / "events-server", config).start()
    yield srv, names, receivers
    srv.stop()
    for receiver in receivers.values():
        receiver.stop()


@pytest_asyncio.fixture
async def hook_client(hooks):
    srv = hooks[0]
    async with httpx.AsyncClient(base_url=srv.url, timeout=30) as http:
        yield http


def api_for(client, hooks, label) -> Api:
    return Api(client, hooks[1][label], SECRET)


async def test_each_change_makes_exactly_one_event(hooks, hook_client, db):
    api, svc = api_for(hook_client, hooks, "ev"), hooks[1]["ev"]
    receiver = hooks[2]["ev"]
    post = await api.publish("alice", "hello", title="t", extra='{"k": 1}')
    await api.ok("PUT", "/update", {"post_id": post, "user_id": "alice"}, data={"content": "new"})
    for like in (True, True, False, False):  # twice each: only real changes make events
        await api.ok("PUT", "/like", {"post_id": post, "user_id": "bob"}, json={"like": like})
    root = await api.comment(post, "carol", "c1")
    reply = await api.reply(post, root, root, "dave", "r1")
    await api.ok("PUT", "/comments/update", {"comment_id": reply, "user_id": "dave"}, data={"extra": '{"e": 2}'})
    for like in (True, True, False):
        await api.ok("PUT", "/comments/like", {"post_id": post, "comment_id": root, "user_id": "erin"},
                     json={"like": like})
    # refused changes make no event
    expect(await api.call("PUT", "/update", {"post_id": post, "user_id": "mallory"}, data={"content": "x"}), 10014)
    expect(await api.call("PUT", "/update", {"post_id": post, "user_id": "alice"}), 10016)
    expect(await api.call("PUT", "/like", {"post_id": 999, "user_id": "bob"}, json={"like": True}), 10006)
    expect(await api.call("PUT", "/comments/like", {"post_id": 999, "comment_id": root, "user_id": "bob"},
                          json={"like": True}), 400)
    expect(await api.call("DELETE", "/comments/delete", {"comment_id": root, "user_id": "mallory"}), 10014)
    await api.ok("DELETE", "/comments/delete", {"comment_id": root, "user_id": "carol"})
    await api.ok("DELETE", "/delete", {"post_id": post, "user_id": "alice"})

    expected = [
        ("post.published", {"post_id": post, "author": "alice", "title": "t", "content": "hello", "extra": {"k": 1}}),
        ("post.updated", {"post_id": post, "user_id": "alice", "content": "new"}),
        ("post.liked", {"post_id": post, "user_id": "bob"}),
        ("post.unliked", {"post_id": post, "user_id": "bob"}),
        ("comment.published", {"comment_id": root, "post_id": post, "user_id": "carol", "content": "c1",
                               "extra": None}),
        ("comment.replied", {"comment_id": reply, "post_id": post, "root_id": root, "father_id": root,
                             "user_id": "dave", "target_user_id": "carol", "content": "r1", "extra": None}),
        ("comment.updated", {"comment_id": reply, "post_id": post, "user_id": "dave", "extra": {"e": 2}}),
        ("comment.liked", {"comment_id": root, "post_id": post, "user_id": "erin"}),
        ("comment.unliked", {"comment_id": root, "post_id": post, "user_id": "erin"}),
        ("comment.deleted", {"comment_id": root, "post_id": post, "user_id": "carol", "deleted_ids": [root, reply]}),
        ("post.deleted", {"post_id": post, "user_id": "alice"}),
    ]
    assert await outbox(db, svc) == expected
    # ... and each reaches the webhook once, signed (verified by the receiver with standardwebhooks)
    assert await eventually(lambda: _ready(len({e["id"] for e in receiver.delivered()}) >= len(expected)), timeout=20)
    once = {e["id"]: e for e in receiver.delivered()}  # at least once: a retry after a lost answer may repeat one
    got = sorted(once.values(), key=lambda e: int(e["id"]))  # sent concurrently: any arrival order
    assert [(e["type"], e["data"]) for e in got] == expected
    assert receiver.unverified == 0
    rows = await stored(db, svc)
    assert [e["id"] for e in got] == [str(row["id"]) for row in rows]
    assert all(e["svc"] == svc and e["time"].endswith("Z") for e in got)
    assert {r["id"] for r in receiver.requests} == {f"{svc}_{row['id']}" for row in rows}

    async def recorded():  # the sender records the 2xx answers right after it got them
        return all(row["delivered_at"] is not None and row["next_attempt_at"] is None
                   for row in await stored(db, svc))
    assert await eventually(recorded, timeout=20)


async def _ready(value):
    return value


async def _all_recorded(db, svc):
    return all(row["delivered_at"] is not None for row in await stored(db, svc))


async def _delivered_row(db, svc):
    return (await stored(db, svc))[0]["delivered_at"] is not None


async def test_webhook_retried_with_backoff_until_delivered(hooks, hook_client, db):
    api, svc, receiver = api_for(hook_client, hooks, "retry"), hooks[1]["retry"], hooks[2]["retry"]
    await api.publish()
    assert await eventually(lambda: _ready(len(receiver.delivered()) == 1), timeout=20)
    attempts = receiver.requests
    assert [r["status"] for r in attempts] == [500, 500, 200]
    assert len({r["id"] for r in attempts}) == 1  # the same message each time
    gaps = [b["time"] - a["time"] for a, b in zip(attempts, attempts[1:])]
    assert gaps[0] >= 0.25 and gaps[1] >= 0.5  # the back-off of the schedule (0.3 s, 0.6 s) was waited
    assert await eventually(lambda: _delivered_row(db, svc), timeout=20)
    row = (await stored(db, svc))[0]
    assert row["attempts"] == 3 and row["delivered_at"] is not None and row["failed_at"] is None
    scrape = (await hook_client.get("/metrics")).text  # each attempt counted by its result
    for result, count in (("delivered", 1), ("retrying", 2)):
        assert f'im_webhook_deliveries_total{{result="{result}",svc="{svc}"}} {count}.0' in scrape, scrape[-3000:]
    assert f'im_webhook_deliveries_total{{result="failed",svc="{svc}"}}' not in scrape  # failed: given up only


async def test_dead_endpoint_fails_after_max_age_and_is_counted(hooks, hook_client, db):
    api, svc = api_for(hook_client, hooks, "dead"), hooks[1]["dead"]
    await api.publish()

    async def failed():
        rows = await stored(db, svc)
        return rows and rows[0]["failed_at"] is not None
    assert await eventually(failed, timeout=20)
    row = (await stored(db, svc))[0]
    assert row["next_attempt_at"] is None and row["attempts"] >= 2 and "Connect" in row["last_error"]
    ready = (await hook_client.get("/readyz")).json()["data"]
    assert ready["events"][svc] == {"backlog": 0, "failed": 1}
    assert ready["events"][hooks[1]["nohook"]] == {"backlog": 0, "failed": 0}
    scrape = (await hook_client.get("/metrics")).text  # metrics' failed means what /readyz's does: given up
    assert f'im_webhook_deliveries_total{{result="failed",svc="{svc}"}} 1.0' in scrape, scrape[-3000:]
    assert f'im_webhook_deliveries_total{{result="retrying",svc="{svc}"}} {row["attempts"] - 1}.0' in scrape
    assert f'im_webhook_deliveries_total{{result="delivered",svc="{svc}"}}' not in scrape


async def test_hanging_endpoint_does_not_delay_other_services(hooks, hook_client):
    hang, fast = hooks[2]["hang"], hooks[2]["fast"]
    for _ in range(3):
        await api_for(hook_client, hooks, "hang").publish()
    assert await eventually(lambda: _ready(len(hang.requests) >= 1), timeout=20)
    assert hang.hanging_open() >= 1  # the server waits on it (its answer timeout outlasts the test)
    for _ in range(5):
        await api_for(hook_client, hooks, "fast").publish()
    assert await eventually(lambda: _ready(len(fast.delivered()) == 5), timeout=20)
    # each of fast's deliveries arrived while the server was still waiting on the hanging endpoint: observed as
    # each arrived, not after the fact (the hanging requests are answered only when the receiver stops)
    observed = [r["observed"] for r in fast.requests]
    assert len(observed) == 5 and min(observed) >= 1, observed
    assert hang.hanging_open() == len(hang.requests) and not any(r["answered"] for r in hang.requests)


async def test_service_without_webhook_records_events_without_delivery(hooks, hook_client, db):
    api, svc = api_for(hook_client, hooks, "nohook"), hooks[1]["nohook"]
    await api.publish()
    rows = await stored(db, svc)
    assert [row["type"] for row in rows] == ["post.published"]
    assert rows[0]["next_attempt_at"] is None and rows[0]["delivered_at"] is None


async def test_every_refused_write_leaves_rows_counts_and_outbox_as_they_were(api, db):
    """A write whose owner or target check fails writes nothing: no row, no count, no clean-up job, no event."""
    post, other = await api.publish("alice"), await api.publish("alice")
    root, other_root = await api.comment(post, "carol"), await api.comment(other, "carol")
    reply = await api.reply(post, root, root, "dave")
    await api.ok("PUT", "/comments/like", {"post_id": post, "comment_id": reply, "user_id": "erin"}, json={"like": True})
    await api.ok("PUT", "/like", {"post_id": post, "user_id": "erin"}, json={"like": True})
    svc = api.svc
    for kind, ids in (("comments", [post, other]), ("children", [root, other_root]), ("comment", [reply]),
                      ("post", [post])):  # counted from here on
        await db.execute(im_backend.sql(svc, im_backend.COUNTER_INIT[kind]), ids)

    async def state() -> dict:
        return {"rows": await table_counts(db, svc), "outbox": await outbox(db, svc),
                "queue": await db.fetchval(f'SELECT count(*) FROM "{svc}_cleanup_queue"'),
                "contents": await db.fetch(f'SELECT id, content, extra FROM "{svc}_post_comment_info" ORDER BY id'),
                "posts": await db.fetch(f'SELECT id, content, title FROM "{svc}_post_info" ORDER BY id'),
                "counts": [await stored_count(db, svc, kind, target) for kind, target in (
                    ("comments", post), ("comments", other), ("children", root), ("children", other_root),
                    ("comment", reply), ("post", post))]}

    before = await state()
    assert before["counts"] == [2, 1, 1, 0, 1, 1]
    reply_to = {"post_id": post, "user_id": "u9"}
    for method, path, query, body, code in [
        ("PUT", "/update", {"post_id": post, "user_id": "mallory"}, {"data": {"title": "x"}}, 10014),
        ("PUT", "/update", {"post_id": 4242, "user_id": "alice"}, {"data": {"content": "x"}}, 10006),
        ("DELETE", "/delete", {"post_id": post, "user_id": "mallory"}, {}, 10014),
        ("DELETE", "/delete", {"post_id": 4242, "user_id": "alice"}, {}, 10006),
        ("PUT", "/comments/update", {"comment_id": reply, "user_id": "mallory"}, {"data": {"content": "x"}}, 10014),
        ("PUT", "/comments/update", {"comment_id": 4242, "user_id": "dave"}, {"data": {"content": "x"}}, 10006),
        ("DELETE", "/comments/delete", {"comment_id": reply, "user_id": "mallory"}, {}, 10014),
        ("DELETE", "/comments/delete", {"comment_id": root, "user_id": "dave"}, {}, 10014),  # the thread's root
        ("DELETE", "/comments/delete", {"comment_id": 4242, "user_id": "dave"}, {}, 10006),
        ("POST", "/comments/reply", {**reply_to, "post_id": other, "root_comment_id": root,
                                     "father_comment_id": reply}, {"data": {"content": "x"}}, 400),  # other post
        ("POST", "/comments/reply", {**reply_to, "root_comment_id": other_root, "father_comment_id": reply},
         {"data": {"content": "x"}}, 400),  # a father of another thread
        ("POST", "/comments/reply", {**reply_to, "root_comment_id": reply, "father_comment_id": reply},
         {"data": {"content": "x"}}, 400),  # a reply is no thread's root
        ("POST", "/comments/reply", {**reply_to, "root_comment_id": root, "father_comment_id": 4242},
         {"data": {"content": "x"}}, 10006),
        ("PUT", "/comments/like", {"post_id": other, "comment_id": reply, "user_id": "erin"},
         {"json": {"like": False}}, 400),  # a like that is there, taken back naming another post
        ("PUT", "/comments/like", {"post_id": other, "comment_id": reply, "user_id": "fred"},
         {"json": {"like": True}}, 400),
        ("PUT", "/comments/like", {"post_id": post, "comment_id": 4242, "user_id": "fred"},
         {"json": {"like": True}}, 10006),
    ]:
        expect(await api.call(method, path, query, **body), code)
        assert await state() == before, (method, path, query)


async def test_refused_change_with_redis_down_makes_no_event(workdir, backing, db):
    redis_server = RedisProcess(workdir / "events-redis")
    svc = svc_name("eredis")
    config = app_config(dict(backing, cache={"addr": redis_server.addr}), {svc: SECRET}, events=FAST)
    srv = Server(workdir / "events-redis-server", config).start()
    try:
        async with httpx.AsyncClient(base_url=srv.url, timeout=30) as client:
            api = Api(client, svc, SECRET)
            post = await api.publish("alice")
            redis_server.stop()
            expect(await api.call("PUT", "/update", {"post_id": post, "user_id": "alice"}, data={"content": "x"}),
                   10018)
            expect(await api.call("PUT", "/like", {"post_id": post, "user_id": "b"}, json={"like": True}), 10018)
            expect(await api.call("DELETE", "/delete", {"post_id": post, "user_id": "alice"}), 10018)
            expect(await api.call("POST", "/publish", data={"author": "a", "content": "c"}), 10017)
        assert [kind for kind, _ in await outbox(db, svc)] == ["post.published"]
    finally:
        srv.stop()
        redis_server.stop()


async def test_writes_sent_together_with_redis_down_all_fail_and_make_no_event(workdir, backing, db):
    """Commands of writes arriving together share one Redis pipeline: when Redis is down each write still gets its
    own refusal (10017 without an id, 10018 without the invalidation) and nothing is written."""
    redis_server = RedisProcess(workdir / "events-redis-batch")
    svc = svc_name("ebatch")
    config = app_config(dict(backing, cache={"addr": redis_server.addr}), {svc: SECRET}, events=FAST)
    srv = Server(workdir / "events-redis-batch-server", config).start()
    try:
        async with httpx.AsyncClient(base_url=srv.url, timeout=30) as client:
            api = Api(client, svc, SECRET)
            post = await api.publish("alice")
            root = await api.comment(post, "carol")
            before = await table_counts(db, svc)
            redis_server.stop()
            calls = [api.call("POST", "/publish", data={"author": "a", "content": "c"}) for _ in range(10)]
            calls += [api.call("POST", "/comments/publish", {"post_id": post, "user_id": "u"},
                               data={"content": "c"}) for _ in range(10)]
            calls += [api.call("PUT", "/like", {"post_id": post, "user_id": f"b{i}"}, json={"like": True})
                      for i in range(10)]
            calls += [api.call("PUT", "/comments/update", {"comment_id": root, "user_id": "carol"},
                               data={"content": "x"}) for _ in range(10)]
            answers = await asyncio.gather(*calls)
        codes = [envelope["code"] for _, envelope in answers]
        assert codes == [10017] * 20 + [10018] * 20
        assert await table_counts(db, svc) == before
        assert [kind for kind, _ in await outbox(db, svc)] == ["post.published", "comment.published"]
    finally:
        srv.stop()
        redis_server.stop()


async def test_sigkill_with_200_pending_events_loses_none(workdir, backing, db):
    secret = webhook_secret()
    receiver = Receiver(secret, default=None)  # hangs: deliveries are in flight when the server dies
    svc = svc_name("ekill")
    config = app_config(backing, {}, events=dict(FAST, max_age=600, lease=3, timeout=2))  # none may fail here
    config["svc"] = [tenant(svc, receiver.url, secret)]
    srv = Server(workdir / "events-kill-server", config).start()
    try:
        async with httpx.AsyncClient(base_url=srv.url, timeout=30) as client:
            api = Api(client, svc, SECRET)
            await asyncio.gather(*(api.publish(f"a{i}") for i in range(200)))
            assert await eventually(lambda: _ready(len(receiver.requests) >= 1), timeout=20)
            srv.stop(signal.SIGKILL)
            receiver.default = 200
            receiver.release.set()  # the requests of the dead server get 503: they count as not delivered
            srv.start()
            ids = {f"{svc}_{row['id']}" for row in await stored(db, svc)}
            assert len(ids) == 200

            async def all_delivered():
                got = {r["id"] for r in receiver.requests if r["status"] == 200}
                return got == ids
            assert await eventually(all_delivered, timeout=60, interval=0.5)
            duplicates = sum(r["status"] == 200 for r in receiver.requests) - len(ids)
            print(f"SIGKILL with 200 pending: all 200 delivered, {duplicates} duplicates")
            assert await eventually(lambda: _all_recorded(db, svc), timeout=20)
    finally:
        srv.stop()
        receiver.stop()


@pytest.mark.parametrize("webhook, events, error", [
    ({"url": "ftp://x", "secret": "whsec_" + "A" * 32}, None, "http(s) URL"),
    ({"url": "http://127.0.0.1/h", "secret": "A" * 32}, None, "whsec_"),
    ({"url": "http://127.0.0.1/h", "secret": "whsec_!!notbase64!!"}, None, "whsec_"),
    ({"url": "http://127.0.0.1/h", "secret": "whsec_" + "A" * 32, "events": ["post.exploded"]}, None, "events"),
    ({"url": "http://127.0.0.1/h", "secret": "whsec_" + "A" * 32, "events": []}, None, "events"),
    ({"url": "http://127.0.0.1/h", "secret": "whsec_" + "A" * 32, "ids": "bigint"}, None,
     "webhook ids of service 'x' must be number or string"),
    ({"url": "http://127.0.0.1/h", "secret": "whsec_" + "A" * 32, "ids": True}, None, "webhook ids of service 'x'"),
    (None, {"retry_schedule": [5, -1]}, "retry_schedule"),
    (None, {"retry_schedule": "soon"}, "retry_schedule"),
    (None, {"max_streams": 0}, "max_streams"),
    (None, {"keepalive": "x"}, "keepalive"),
])
def test_bad_webhook_or_events_configuration_is_rejected(webhook, events, error):
    import yaml

    import im_backend

    raw = {"svc": [{"name": "x", "secret": SECRET, **({"webhook": webhook} if webhook else {})}]}
    if events:
        raw["events"] = events
    with pytest.raises(im_backend.ConfigError, match=error.replace("(", r"\(").replace(")", r"\)")):
        im_backend.parse_app_config(yaml.safe_dump(raw))
    good = im_backend.parse_app_config(yaml.safe_dump({"svc": [{"name": "x", "secret": SECRET, "webhook": {
        "url": "https://example.test/h", "secret": "whsec_" + "A" * 32, "events": ["post.liked"]}}]}))
    assert good.tenants["x"].webhook.events == {"post.liked"} and good.events.max_streams == 1000


async def test_retention_removes_old_events_but_not_pending_ones(workdir, backing, db):
    plain, pending = svc_name("eretain"), svc_name("eretainp")
    events = dict(FAST, retention_hours=0.0005, cleanup_interval=0.3, retry_schedule=[3600], max_age=86400)
    config = app_config(backing, {}, events=events)
    config["svc"] = [tenant(plain), tenant(pending, "http://127.0.0.1:9/closed", webhook_secret())]
    srv = Server(workdir / "events-retention", config).start()
    try:
        async with httpx.AsyncClient(base_url=srv.url, timeout=30) as client:
            await Api(client, plain, SECRET).publish()
            await Api(client, pending, SECRET).publish()
            assert len(await stored(db, plain)) == 1

            async def plain_gone():
                return not await stored(db, plain)
            assert await eventually(plain_gone, timeout=20)  # 1.8 s old: removed
            rows = await stored(db, pending)
            assert len(rows) == 1 and rows[0]["next_attempt_at"] is not None  # still to be delivered: kept
    finally:
        srv.stop()


async def test_webhook_ids_as_strings_for_javascript_receivers(workdir, backing):
    """`webhook.ids: string`: every id of the event JSON sent is a decimal string (a JavaScript receiver whose
    verify() parses the body would round ids above 2^53); signed over the body sent. Without it: numbers."""
    secret = webhook_secret()
    strings, numbers = Receiver(secret), Receiver(secret)
    as_strings, as_numbers = svc_name("eidstr"), svc_name("eidnum")
    config = app_config(backing, {}, events=FAST)
    config["svc"] = [tenant(as_strings, strings.url, secret), tenant(as_numbers, numbers.url, secret)]
    config["svc"][0]["webhook"]["ids"] = "string"
    srv = Server(workdir / "events-ids", config).start()
    try:
        async with httpx.AsyncClient(base_url=srv.url, timeout=30) as client:
            made = {}
            for svc in (as_strings, as_numbers):
                api = Api(client, svc, SECRET)
                post = await api.publish("alice", "hi", extra='{"n": 7714697476292214785}')
                root = await api.comment(post, "carol", "c1")
                reply = await api.reply(post, root, root, "dave", "r1")
                await api.ok("DELETE", "/comments/delete", {"comment_id": root, "user_id": "carol"})
                made[svc] = (post, root, reply)
            for receiver in (strings, numbers):
                assert await eventually(lambda r=receiver: _ready(len({e["id"] for e in r.delivered()}) >= 4),
                                        timeout=20)
                assert receiver.unverified == 0  # each signature verified (standardwebhooks) over the body sent
        post, root, reply = made[as_strings]
        got = {e["type"]: e for e in strings.delivered()}
        assert post > 2 ** 53 and got["post.published"]["data"]["post_id"] == str(post)
        assert got["post.published"]["data"]["extra"] == {"n": 7714697476292214785}  # the caller's own: as given
        assert got["comment.replied"]["data"] | {"content": None} == {
            "comment_id": str(reply), "post_id": str(post), "root_id": str(root), "father_id": str(root),
            "user_id": "dave", "target_user_id": "carol", "content": None, "extra": None}
        assert got["comment.deleted"]["data"]["deleted_ids"] == [str(root), str(reply)]
        assert all(e["id"].isdigit() and e["svc"] == as_strings for e in got.values())
        post, root, reply = made[as_numbers]
        got = {e["type"]: e for e in numbers.delivered()}
        assert got["post.published"]["data"]["post_id"] == post
        assert got["comment.replied"]["data"]["comment_id"] == reply
        assert got["comment.deleted"]["data"]["deleted_ids"] == [root, reply]
    finally:
        srv.stop()
        strings.stop()
        numbers.stop()


async def test_one_log_line_per_delivery_outcome_and_none_from_the_http_client(workdir, backing, db):
    """Started as `python im_backend.py` (which logs the root logger at INFO): no `HTTP Request:` line of the
    client library; ours per outcome: delivered INFO, retrying WARNING (why, and when next), given up ERROR."""
    secret = webhook_secret()
    flaky = Receiver(secret, plan=[500])
    ok, dead = svc_name("elogok"), svc_name("elogdead")
    config = app_config(backing, {}, events=dict(FAST, max_age=1))
    config["svc"] = [tenant(ok, flaky.url, secret), tenant(dead, "http://127.0.0.1:9/closed", secret)]
    srv = Server(workdir / "events-log", config).start_cli()
    try:
        async with httpx.AsyncClient(base_url=srv.url, timeout=30) as client:
            post = await Api(client, ok, SECRET).publish()
            await Api(client, dead, SECRET).publish()
            assert await eventually(lambda: _ready(len(flaky.delivered()) == 1), timeout=20)
            assert await eventually(lambda: _ready("failed for good" in srv.log()), timeout=20)
        delivered = flaky.delivered()[0]
        assert delivered["data"]["post_id"] == post
        log = srv.log()
        assert "HTTP Request:" not in log, log[-3000:]
        host = flaky.url.split("/")[2]
        lines = [line for line in log.splitlines() if "webhook of" in line]
        ours = [line for line in lines if ok in line]
        assert len(ours) == 2, lines
        assert f"WARNING im_backend: webhook of {ok}: event {delivered['id']} post.published not delivered " \
               f"(attempt 1, {host}): HTTP 500; next attempt at " in ours[0], ours
        assert ours[0].endswith(" (in 0.3s)"), ours
        assert f"INFO im_backend: webhook of {ok}: event {delivered['id']} post.published delivered " \
               f"(attempt 2, {host})" in ours[1], ours
        event = (await stored(db, dead))[0]
        gave_up = [line for line in lines if dead in line and "ERROR" in line]
        assert len(gave_up) == 1, lines
        assert f"ERROR im_backend: webhook of {dead}: event {event['id']} post.published failed for good " \
               f"(attempt {event['attempts']}, 127.0.0.1:9): ConnectError" in gave_up[0], gave_up
        retried = [line for line in lines if dead in line and line not in gave_up]
        assert len(retried) == event["attempts"] - 1 and all("WARNING" in line for line in retried), lines
    finally:
        srv.stop()
        flaky.stop()
