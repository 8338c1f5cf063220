"""The live event stream: Server-Sent Events read with httpx-sse, from two replicas; resume with
Last-Event-ID without gap or duplicate (also past a late commit); filters; the cap; bad input; shut-down."""
import asyncio
import contextlib
import json
import signal

import asyncpg
import httpx
import httpx_sse
import pytest
import pytest_asyncio

import im_backend
from conftest import Api, Receiver, Server, app_config, eventually, expect, svc_name, webhook_secret

SECRET = "W7K8pJ3aQv2LcXgH"
FAST = {"retry_schedule": [0.3, 0.6], "max_age": 60, "lease": 30, "timeout": 10, "poll_interval": 0.2,
        "keepalive": 1}


@pytest.fixture(scope="module")
def pair(workdir, backing):
    """Two replicas of one configuration (one service with a webhook), as behind a load balancer."""
    secret = webhook_secret()
    receiver = Receiver(secret)
    svc = svc_name("sse")
    config = app_config(backing, {}, events=FAST)
    config["svc"] = [{"name": svc, "secret": SECRET, "webhook": {"url": receiver.url, "secret": secret}}]
    servers = [Server(workdir / f"sse-replica-{i}", config).start() for i in range(2)]
    yield servers, svc, receiver
    for srv in servers:
        srv.stop()
    receiver.stop()


@pytest_asyncio.fixture
async def apis(pair):
    servers, svc, _ = pair
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(httpx.AsyncClient(base_url=s.url, timeout=30)) for s in servers]
        yield [Api(c, svc, SECRET) for c in clients]


class Stream:
    """An open event stream read with httpx-sse."""

    def __init__(self, base_url: str, svc: str, params: dict | None = None, headers: dict | None = None) -> None:
        self.url = base_url + "/api/v1/posts/events"
        self.params = dict(params or {}, svc=svc, appKey=im_backend.encrypt_appkey(SECRET))
        self.headers = headers or {}

    async def __aenter__(self) -> "Stream":
        self.stack = contextlib.AsyncExitStack()
        client = await self.stack.enter_async_context(httpx.AsyncClient(timeout=httpx.Timeout(30, read=60)))
        self.source = await self.stack.enter_async_context(
            httpx_sse.aconnect_sse(client, "GET", self.url, params=self.params, headers=self.headers))
        self.source.response.raise_for_status()
        self.events = self.source.aiter_sse()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stack.aclose()

    async def take(self, n: int, timeout: float = 20) -> list:
        got = []
        async with asyncio.timeout(timeout):
            while len(got) < n:
                got.append(await anext(self.events))
        return got


def summary(events) -> list:
    return [(e.event, json.loads(e.data)["data"].get("comment_id") or json.loads(e.data)["data"]["post_id"])
            for e in events]


async def test_live_events_from_both_replicas_with_filters(pair, apis):
    servers, svc, _ = pair
    a, b = apis
    post = await a.publish()
    async with Stream(servers[0].url, svc) as every, \
            Stream(servers[0].url, svc, {"post_id": post}) as of_post, \
            Stream(servers[1].url, svc, {"types": "comment.published,post.published"}) as typed:
        comment = await b.comment(post)
        await a.ok("PUT", "/like", {"post_id": post, "user_id": "u"}, json={"like": True})
        other = await b.publish()
        other_comment = await a.comment(other)
        got = await every.take(4)
        assert summary(got) == [("comment.published", comment), ("post.liked", post), ("post.published", other),
                                ("comment.published", other_comment)]
        event = json.loads(got[0].data)
        assert event["id"] == got[0].id and event["svc"] == svc and event["type"] == got[0].event
        assert summary(await of_post.take(2)) == [("comment.published", comment), ("post.liked", post)]
        assert summary(await typed.take(3)) == [("comment.published", comment), ("post.published", other),
                                                ("comment.published", other_comment)]


async def test_ids_as_strings_on_the_stream(pair, apis):
    """ids=string applies to the stream too: each event's data carries its ids as decimal strings (on replay
    and live), while a stream without it sends numbers."""
    servers, svc, _ = pair
    a, _ = apis
    post = await a.publish()
    async with Stream(servers[0].url, svc, {"ids": "string"}) as strings, Stream(servers[1].url, svc) as numbers:
        comment = await a.comment(post)
        as_strings, as_numbers = (await strings.take(1))[0], (await numbers.take(1))[0]
    data = json.loads(as_strings.data)["data"]
    assert data["post_id"] == str(post) and data["comment_id"] == str(comment), data
    assert json.loads(as_numbers.data)["data"]["comment_id"] == comment
    assert as_strings.id == as_numbers.id and as_strings.event == as_numbers.event == "comment.published"
    async with Stream(servers[1].url, svc, {"ids": "string", "last_event_id": int(as_strings.id) - 1}) as replay:
        replayed = (await replay.take(1))[0]
    assert replayed.id == as_strings.id and json.loads(replayed.data)["data"]["comment_id"] == str(comment)


async def test_resume_after_disconnect_gives_exactly_the_missed_events(pair, apis, db):
    servers, svc, _ = pair
    a, b = apis
    async with Stream(servers[0].url, svc) as stream:
        await a.publish()
        last = (await stream.take(1))[0].id
    made = []
    for i in range(50):  # while nobody listens, through both replicas
        made.append(await (a if i % 2 else b).publish(f"w{i}"))
    async with Stream(servers[1].url, svc, headers={"Last-Event-ID": last}) as stream:
        got = await stream.take(50)
        assert [json.loads(e.data)["data"]["post_id"] for e in got] == made
        ids = [int(e.id) for e in got]
        assert ids == sorted(ids) and ids[0] > int(last)
        live = await a.publish("live")
        assert summary(await stream.take(1)) == [("post.published", live)]
    async with Stream(servers[0].url, svc, {"last_event_id": got[47].id}) as stream:  # the query form
        assert [e.id for e in await stream.take(3)] == [got[48].id, got[49].id, str(ids[-1] + 1)]


async def test_a_late_commit_is_neither_skipped_nor_out_of_order(pair, apis, db):
    """Event ids are taken at insert: a transaction holding a lower id may commit after a higher one. The stream
    must wait for it, else a client resuming from the higher id would never see it."""
    servers, svc, _ = pair
    a, _ = apis
    async with Stream(servers[0].url, svc) as stream:
        slow = db.transaction()
        await slow.start()
        late_id = await db.fetchval(f"""INSERT INTO "{svc}_events" (type, post_id, data)
                                        VALUES ('post.updated', 1, '{{"post_id": 1}}') RETURNING id""")
        published = await a.publish("after")
        reading = asyncio.ensure_future(stream.take(2))
        done, _ = await asyncio.wait({reading}, timeout=1.5)
        assert not done  # held back while the older transaction is in flight
        await slow.commit()
        got = await reading
        assert [int(e.id) for e in got][0] == late_id
        assert summary(got) == [("post.updated", 1), ("post.published", published)]


async def test_replicas_deliver_every_event_once(pair, apis):
    servers, svc, receiver = pair
    a, b = apis
    before = len(receiver.delivered())
    made = await asyncio.gather(*((a if i % 2 else b).publish(f"r{i}") for i in range(100)))

    async def all_there():
        got = {e["data"]["post_id"] for e in receiver.delivered() if e["type"] == "post.published"}
        return set(made) <= got
    assert await eventually(all_there, timeout=30)
    delivered = receiver.delivered()[before:]
    ids = [e["id"] for e in delivered]
    duplicates = len(ids) - len(set(ids))
    print(f"two replicas: {len(set(ids))} events delivered, {duplicates} duplicates")
    assert duplicates == 0
    assert receiver.unverified == 0


async def test_cap_bad_input_and_clean_close_on_shutdown(workdir, backing):
    svc = svc_name("ssecap")
    srv = Server(workdir / "sse-cap", app_config(backing, {svc: SECRET}, events=dict(FAST, max_streams=2))).start()
    try:
        async with httpx.AsyncClient(base_url=srv.url, timeout=30) as client:
            api = Api(client, svc, SECRET)
            expect(await api.call("GET", "/events", headers={"Last-Event-ID": "abc"}), 400, "bind param failed")
            expect(await api.call("GET", "/events", {"last_event_id": "-1"}), 400, "bind param failed")
            expect(await api.call("GET", "/events", {"types": "post.exploded"}), 400, "bind param failed")
            expect(await api.call("GET", "/events", {"post_id": "x"}), 400, "bind param failed")
            response = await client.get("/api/v1/posts/events", params={"svc": svc, "appKey": "00" * 20})
            assert response.json() == {"code": 400, "msg": "bind authentication", "data": None}
            async with Stream(srv.url, svc) as first, Stream(srv.url, svc):
                async with asyncio.timeout(10):  # (a stream opened past the cap would never end)
                    expect(await api.call("GET", "/events"), 503, "service unavailable")
                await api.publish()
                assert len(await first.take(1)) == 1
                srv.process.send_signal(signal.SIGTERM)  # open streams must not hold the shut-down
                async with asyncio.timeout(20):
                    rest = [event async for event in first.events]
                assert rest == []
                # uvicorn re-raises the signal once shut down; a stream holding the shut-down would time out here
                assert await asyncio.to_thread(srv.process.wait, 20) in (0, -signal.SIGTERM)
                assert "im_backend stopped" in srv.log()
    finally:
        srv.stop()


HOST_APP = """
import os, sys
import uvicorn
sys.path.insert(0, os.environ["ROOT"])
import im_backend

inner = im_backend.create_app(os.environ["BOOT"])

async def host(scope, receive, send):  # mounts IM-Backend under /im, as Starlette's Mount does
    if scope["type"] == "http" and scope["path"].startswith("/im/"):
        scope = dict(scope, path=scope["path"][3:], root_path="/im")
    elif scope["type"] == "http":
        await send({"type": "http.response.start", "status": 404, "headers": []})
        return await send({"type": "http.response.body", "body": b"host"})
    await inner(scope, receive, send)

uvicorn.run(host, host="127.0.0.1", port=int(os.environ["PORT"]), log_level="warning")
"""


async def test_stream_mounted_under_a_prefix(pair, workdir):
    import os
    import subprocess
    import sys

    from conftest import ROOT, free_port

    servers, svc, _ = pair
    port = free_port()
    env = dict(os.environ, ROOT=str(ROOT), BOOT=str(servers[0].boot), PORT=str(port))
    process = subprocess.Popen([sys.executable, "-c", HOST_APP], env=env, stdin=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}/im"
    try:
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            async def up():
                with contextlib.suppress(httpx.HTTPError):
                    return (await client.get("/healthz")).status_code == 200
            assert await eventually(up, timeout=30)
            api = Api(client, svc, SECRET)
            async with Stream(base, svc) as stream:
                post = await api.publish("mounted")
                assert summary(await stream.take(1)) == [("post.published", post)]
                process.send_signal(signal.SIGTERM)
                async with asyncio.timeout(20):
                    assert [event async for event in stream.events] == []
            assert await asyncio.to_thread(process.wait, 20) in (0, -signal.SIGTERM)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)


async def test_an_idle_stream_outlives_the_read_timeouts(workdir, backing):
    """The protocol's header and body timeouts are for requests arriving, not for a long answer going out."""
    svc = svc_name("sseidle")
    config = app_config(backing, {svc: SECRET}, events=dict(FAST, keepalive=5),
                        server={"header_timeout": 1, "body_timeout": 1})
    srv = Server(workdir / "sse-idle", config).start()
    try:
        async with httpx.AsyncClient(base_url=srv.url, timeout=30) as client, Stream(srv.url, svc) as stream:
            await asyncio.sleep(3)  # idle (no keep-alive yet) for three times the timeouts
            post = await Api(client, svc, SECRET).publish()
            assert summary(await stream.take(1)) == [("post.published", post)]
    finally:
        srv.stop()


async def test_other_replicas_are_told_at_once_not_at_their_next_poll(workdir, backing):
    """The NOTIFY is sent after the commit (coalesced), not inside the write's transaction: a stream and a webhook
    on the other replica still get the event at once — well before their poll (30 s here) would find it."""
    secret = webhook_secret()
    receiver = Receiver(secret)
    svc = svc_name("ssehint")
    config = app_config(backing, {}, events=dict(FAST, poll_interval=30))
    config["svc"] = [{"name": svc, "secret": SECRET, "webhook": {"url": receiver.url, "secret": secret}}]
    servers = [Server(workdir / f"sse-hint-{i}", config).start() for i in range(2)]
    try:
        async with httpx.AsyncClient(base_url=servers[0].url, timeout=30) as client, \
                Stream(servers[1].url, svc) as other, Stream(servers[0].url, svc) as own:
            api = Api(client, svc, SECRET)
            await asyncio.sleep(1.5)  # both replicas LISTENing
            for i in range(3):
                post = await api.publish(f"hint {i}")
                assert summary(await other.take(1, timeout=5)) == [("post.published", post)]
                assert summary(await own.take(1, timeout=5)) == [("post.published", post)]
            assert await eventually(lambda: len(receiver.delivered()) >= 3, timeout=10)
    finally:
        for srv in servers:
            srv.stop()
        receiver.stop()


async def test_a_filtered_stream_gets_its_keep_alive_while_other_events_pass_it_by(pair, apis):
    """The keep-alive counts from the last frame written to this stream: events filtered out (another post's,
    published faster than the keep-alive period) must not hold back its comment lines. Read as raw lines."""
    servers, svc, _ = pair
    a, b = apis
    watched, other = await a.publish("watched"), await a.publish("other")
    params = {"svc": svc, "appKey": im_backend.encrypt_appkey(SECRET), "post_id": watched}
    comments, frames = 0, []
    async with httpx.AsyncClient(timeout=httpx.Timeout(30, read=60)) as client, \
            client.stream("GET", servers[0].url + "/api/v1/posts/events", params=params) as response:
        assert response.status_code == 200
        lines = response.aiter_lines()
        assert await anext(lines) == ": stream"  # the stream is open: from here on, count for 5 s

        async def busy() -> None:  # events of the other post every 0.3 s (keep-alive: 1 s), for as long as we read
            for i in range(40):
                await (a if i % 2 else b).ok("PUT", "/like", {"post_id": other, "user_id": f"k{i}"},
                                             json={"like": True})
                await asyncio.sleep(0.3)
        writer = asyncio.ensure_future(busy())
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    async for line in lines:
                        if line.startswith(":"):
                            comments += 1
                        elif line.startswith("data:"):
                            frames.append(line)
        finally:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
    assert frames == []  # none of the other post's events came through the filter
    assert 3 <= comments <= 7, comments  # ~5 at a 1 s keep-alive; 0 or 1 when every filtered-out batch resets it
