"""Outgrowing one PostgreSQL, against real servers started here: a service on its own PostgreSQL (everything of it
there, events and clean-up included; that database stopped and restarted under load, or down at start-up, hurting
only its service; moved by a reload without moving data), and uncached reads on a real streaming standby
(pg_basebackup -R): used while fresh, the primary while it is paused and stale, stopped, and used again once back."""
import asyncio
import contextlib
import json
import re

import asyncpg
import httpx
import httpx_sse
import pytest

import im_backend
from conftest import SECRET, Api, Server, entries_config, eventually, svc_name

DB_ERRORS = {10003, 10004, 10005, 10006, 10007}  # what a request answers when its database fails


def own_db(cluster) -> dict:
    """A `svc[].db` naming only the server: user, password and dbname come from the top-level db."""
    return {"host": "127.0.0.1", "port": cluster.port}


async def table_exists(conn: asyncpg.Connection, table: str) -> bool:
    return await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", f'"{table}"')


async def readyz(url: str) -> tuple[int, dict]:
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(url + "/readyz")
        return response.status_code, response.json()["data"]


async def metrics(url: str) -> str:
    async with httpx.AsyncClient(timeout=10) as client:
        return (await client.get(url + "/metrics")).text


def sample(text: str, name: str, **labels: str) -> float | None:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    match = re.search(rf"^{name}{{{re.escape(wanted)}}} (\S+)$", text, re.M)
    return None if match is None else float(match.group(1))


class StreamReader:
    """The event stream of one service at one server, read into a list in the background."""

    def __init__(self, url: str, svc: str) -> None:
        self.url, self.svc, self.events, self.task = url, svc, [], None

    async def __aenter__(self) -> "StreamReader":
        self.open = asyncio.Event()
        self.task = asyncio.ensure_future(self._read())
        await asyncio.wait_for(self.open.wait(), 15)
        return self

    async def _read(self) -> None:
        params = {"svc": self.svc, "appKey": im_backend.encrypt_appkey(SECRET)}
        async with httpx.AsyncClient(timeout=httpx.Timeout(30, read=120)) as client:
            async with httpx_sse.aconnect_sse(client, "GET", self.url + "/api/v1/posts/events", params=params) as src:
                src.response.raise_for_status()
                self.open.set()
                async for event in src.aiter_sse():
                    self.events.append(json.loads(event.data))

    async def __aexit__(self, *exc) -> None:
        self.task.cancel()
        with contextlib.suppress(BaseException):
            await self.task


# --- a service on its own PostgreSQL -----------------------------------------------------------------------------

async def test_a_service_on_its_own_database_keeps_everything_there(make_server, backing, tenant_pg, db):
    main, own = svc_name("s24main"), svc_name("s24own")
    config = entries_config(backing, [{"name": main, "secret": SECRET},
                                      {"name": own, "secret": SECRET, "db": own_db(tenant_pg)}],
                            events={"poll_interval": 30}, clean={"interval": 30})
    servers = [make_server("own-db-1", config), make_server("own-db-2", config)]
    tenant = await tenant_pg.connect()
    try:
        async with httpx.AsyncClient(base_url=servers[0].url, timeout=30) as client:
            main_post = await Api(client, main, SECRET).publish(content="on the top-level database")
        async with httpx.AsyncClient(base_url=servers[0].url, timeout=30) as client, \
                StreamReader(servers[1].url, own) as stream:
            api = Api(client, own, SECRET)
            await asyncio.sleep(1.5)  # both processes LISTENing on both databases
            post = await api.publish(content="on its own database")
            root = await api.comment(post, "u1", "c")
            await api.reply(post, root, root, "u2", "r")
            await api.ok("PUT", "/like", {"post_id": post, "user_id": "u3"}, json={"like": True})
            # every table of the service is in its own database, none in the top-level one; and the reverse
            for table in ("post_info", "post_comment_info", "post_like", "events", "cleanup_queue", "like_counts"):
                assert await table_exists(tenant, f"{own}_{table}"), table
                assert not await table_exists(db, f"{own}_{table}"), table
                assert await table_exists(db, f"{main}_{table}") and not await table_exists(tenant, f"{main}_{table}")
            assert await tenant.fetchval(f'SELECT count(*) FROM "{own}_post_info" WHERE id = $1', post) == 1
            assert await db.fetchval(f'SELECT count(*) FROM "{main}_post_info" WHERE id = $1', main_post) == 1
            page = await api.ok("GET", "/comments/getinfo", {"post_id": post, "root_comment_id": 0})
            assert [(c["id"], c["child_num"]) for c in page["comments"]] == [(root, 1)]
            assert (await api.ok("GET", "/getinfo", {"post_id": post, "counts": 1}))["post"]["comment_count"] == 2
            # the other process's stream heard of the commits at once (NOTIFY on that database; its poll is 30 s)
            assert await eventually(lambda: len(stream.events) >= 4, timeout=10), stream.events
            assert [e["type"] for e in stream.events[:4]] == [
                "post.published", "comment.published", "comment.replied", "post.liked"]
            # clean-up of a deleted post runs on that database, woken at once
            await api.ok("DELETE", "/delete", {"post_id": post, "user_id": "alice"})
            assert await eventually(lambda: tenant.fetchval(
                f'SELECT count(*) = 0 FROM "{own}_post_comment_info" WHERE post_id = $1', post), timeout=15)
            assert await eventually(lambda: tenant.fetchval(f'SELECT count(*) = 0 FROM "{own}_cleanup_queue"'))
            status, ready = await readyz(servers[0].url)
            assert status == 200
            assert [(d["port"], d["services"], d["state"]) for d in ready["databases"]] == [
                (tenant_pg.port, [own], "ok")]
            assert own in ready["cleanup_queue"] and own in ready["events"]
    finally:
        await tenant.close()


async def test_its_database_stopped_under_load_fails_only_that_service_and_it_recovers(make_server, backing,
                                                                                      tenant_pg):
    main, own = svc_name("s24ldmain"), svc_name("s24ldown")
    config = entries_config(backing, [{"name": main, "secret": SECRET},
                                      {"name": own, "secret": SECRET, "db": own_db(tenant_pg)}],
                            server={"timeout": 30},  # a hang would answer 504 after 30 s: none may
                            cache={"near_ttl": 0})  # (no page answered from memory while the database is down)
    srv = make_server("own-db-load", config)
    results = {main: [], own: []}  # (phase, code) of every request
    phase = ["up"]

    async with httpx.AsyncClient(base_url=srv.url, timeout=25) as client:
        apis = {svc: Api(client, svc, SECRET) for svc in (main, own)}
        posts = {svc: await apis[svc].publish(content="before") for svc in (main, own)}

        async def load(svc: str) -> None:
            api = apis[svc]
            for i in range(100000):
                if phase[0] == "done":
                    return
                now = phase[0]
                if i % 2:
                    _, body = await api.call("POST", "/publish", data={"author": "a", "content": f"load {i}"})
                else:
                    _, body = await api.call("GET", "/comments/getinfo",
                                             {"post_id": posts[svc], "root_comment_id": 0})
                results[svc].append((now, phase[0], body["code"]))
                await asyncio.sleep(0.02)

        workers = [asyncio.ensure_future(load(svc)) for svc in (main, own) for _ in range(2)]
        try:
            await asyncio.sleep(1)
            await asyncio.to_thread(tenant_pg.stop, "fast")
            phase[0] = "down"
            await asyncio.sleep(3)
            phase[0] = "starting"
            await asyncio.to_thread(tenant_pg.start)
            phase[0] = "back"
            assert await eventually(lambda: any(p == q == "back" and c == 200 for p, q, c in results[own]),
                                    timeout=20)
            await asyncio.sleep(0.5)
        finally:
            phase[0] = "done"
            await asyncio.wait_for(asyncio.gather(*workers), 30)
        assert (await apis[own].ok("GET", "/getinfo", {"post_id": posts[own]}))["post"]["content"] == "before"
    assert results[main] and all(code == 200 for _, _, code in results[main]), results[main]
    down = [code for started, ended, code in results[own] if started == ended == "down"]
    assert down and set(down) <= DB_ERRORS, down  # quickly, the documented envelope: never a 504, never a hang
    assert sum(1 for _, _, code in results[own] if code == 200) > 2
    assert "Traceback" not in srv.log(), srv.log()[srv.log().index("Traceback") - 300:][:3000]


async def test_the_server_starts_with_a_service_database_down_and_serves_it_once_up(make_server, backing,
                                                                                    tenant_pg):
    main, own = svc_name("s24stmain"), svc_name("s24stown")
    config = entries_config(backing, [{"name": main, "secret": SECRET},
                                      {"name": own, "secret": SECRET, "db": own_db(tenant_pg)}])
    tenant_pg.stop("fast")
    try:
        srv = make_server("own-db-down-at-start", config)
        async with httpx.AsyncClient(base_url=srv.url, timeout=30) as client:
            api, api_main = Api(client, own, SECRET), Api(client, main, SECRET)
            assert await api_main.publish("fine")
            status, body = await api.call("POST", "/publish", data={"author": "a", "content": "x"})
            assert (status, body["code"], body["data"]) == (500, 10003, None)
            status, body = await api.call("GET", "/getlist")
            assert body["code"] == 10006
            status, ready = await readyz(srv.url)
            assert status == 200 and ready["postgres"] == "ok"
            assert ready["databases"][0]["services"] == [own] and ready["databases"][0]["state"].startswith("error")
            tenant_pg.start()

            async def publishes() -> bool:
                return (await api.call("POST", "/publish", data={"author": "a", "content": "x"}))[1]["code"] == 200
            assert await eventually(publishes, timeout=20)  # its tables made once it answered, no restart
            assert (await readyz(srv.url))[1]["databases"][0]["state"] == "ok"
    finally:
        if not tenant_pg.running():
            tenant_pg.start()


async def test_a_reload_moving_a_service_to_another_database_moves_no_data(make_server, backing, tenant_pg):
    own = svc_name("s24mv")
    entry = {"name": own, "secret": SECRET, "db": own_db(tenant_pg)}
    srv = make_server("own-db-reload", entries_config(backing, [entry]))
    async with httpx.AsyncClient(base_url=srv.url, timeout=30) as client:
        api = Api(client, own, SECRET)
        post = await api.publish(content="kept where it was written")

        async def found() -> int:
            return (await api.call("GET", "/getinfo", {"post_id": post, "counts": 1}))[1]["code"]
        srv.write_config(entries_config(backing, [{"name": own, "secret": SECRET}]))  # now the top-level db
        assert await eventually(lambda: negate_code(found(), 200), timeout=15)
        assert await found() == 10006  # its posts stayed in the other database
        other = await api.publish(content="written in the top-level database")
        srv.write_config(entries_config(backing, [entry]))
        assert await eventually(lambda: negate_code(found(), 10006), timeout=15)
        assert await found() == 200
        assert (await api.call("GET", "/getinfo", {"post_id": other}))[1]["code"] == 10006


async def negate_code(code, unwanted: int) -> bool:
    return await code != unwanted


# --- reads on a streaming standby --------------------------------------------------------------------------------

def replica_config(backing: dict, svc: str, primary, standby, max_lag_ms: float) -> dict:
    db = dict(primary.db, replicas=[{"host": "127.0.0.1", "port": standby.port}], max_replica_lag_ms=max_lag_ms)
    config = entries_config(backing, [{"name": svc, "secret": SECRET}], cache={"near_ttl": 0})
    config["db"] = db
    return config


async def test_reads_on_a_streaming_standby_fall_back_to_the_primary(make_server, backing, replicated_pg):
    primary, standby = replicated_pg
    svc = svc_name("s24rep")
    srv = make_server("replica", replica_config(backing, svc, primary, standby, 500))
    label = f"127.0.0.1:{standby.port}"

    async def replica_state() -> dict:
        return (await readyz(srv.url))[1]["replicas"][0]

    async with httpx.AsyncClient(base_url=srv.url, timeout=30) as client:
        api = Api(client, svc, SECRET)

        async def page_ids(post_id: int) -> list[int]:
            page = await api.ok("GET", "/comments/getinfo", {"post_id": post_id, "root_comment_id": 0})
            return [c["id"] for c in page["comments"]]

        post = await api.publish("replicated")
        first = await api.comment(post, "u1", "first")
        # a standby that replayed everything of an idle primary has lag 0
        assert await eventually(lambda: replica_state_is(replica_state(), "fresh", lag_ms=0.0), timeout=20), \
            await replica_state()
        assert (await replica_state())["port"] == standby.port
        assert await eventually(lambda: are(page_ids(post), [first]), timeout=10)

        # paused until stale: pages come from the primary, with what was written since
        await standby.pause_replay()
        try:
            second = await api.comment(post, "u2", "second")  # writes go to the primary
            assert await eventually(lambda: replica_state_is(replica_state(), "stale"), timeout=20), (
                await replica_state(), await standby.sql("SELECT pg_get_wal_replay_pause_state()"))
            assert await page_ids(post) == [first, second]
            assert (await api.ok("GET", "/getlist"))["post_list"] == [post]
            text = await metrics(srv.url)
            assert sample(text, "im_db_replica_up", replica=label) == 1
            assert sample(text, "im_db_replica_lag_seconds", replica=label) > 0.5

            # a threshold it meets (hot reload): the paused standby is read again, and shows its old page; the
            # exact counts of getlike are the primary's
            srv.write_config(replica_config(backing, svc, primary, standby, 3_600_000))
            assert await eventually(lambda: replica_state_is(replica_state(), "fresh"), timeout=20)
            assert await page_ids(post) == [first]
            await api.ok("PUT", "/comments/like", {"post_id": post, "comment_id": first, "user_id": "u9"},
                         json={"like": True})
            assert (await api.ok("GET", "/comments/getlike", {"comment_ids": str(first)}))["likes"] == [1]
            page = await api.ok("GET", "/comments/getinfo", {"post_id": post, "root_comment_id": 0})
            assert page["comments"][0]["like_count"] == 0  # as old as the standby
        finally:
            await standby.resume_replay()
        assert await eventually(lambda: are(page_ids(post), [first, second]), timeout=10)
        srv.write_config(replica_config(backing, svc, primary, standby, 500))

        # stopped: every read is answered (by the primary), none fails
        await asyncio.to_thread(standby.stop, "fast")
        try:
            for _ in range(10):
                assert await page_ids(post) == [first, second]
            assert await eventually(lambda: replica_state_is(replica_state(), "down"), timeout=10)
            for _ in range(5):
                assert await page_ids(post) == [first, second]
            assert sample(await metrics(srv.url), "im_db_replica_up", replica=label) == 0
            assert (await readyz(srv.url))[0] == 200
        finally:
            await asyncio.to_thread(standby.start)
        # back: read from again
        assert await eventually(lambda: replica_state_is(replica_state(), "fresh"), timeout=20)
        before = sample(await metrics(srv.url), "im_db_replica_reads_total", replica=label, result="ok") or 0
        for _ in range(3):
            assert await page_ids(post) == [first, second]
        after = sample(await metrics(srv.url), "im_db_replica_reads_total", replica=label, result="ok")
        assert after >= before + 3
    assert "Traceback" not in srv.log()


async def replica_state_is(state, wanted: str, lag_ms: float | None = None) -> bool:
    state = await state
    return state["state"] == wanted and (lag_ms is None or state["lag_ms"] == lag_ms)


async def are(value, wanted) -> bool:
    return await value == wanted


def test_db_entries_of_services_and_replicas_parse_and_validate():
    config = im_backend.parse_app_config(f"""
svc:
  - {{name: a, secret: {SECRET}}}
  - {{name: b, secret: {SECRET}, db: {{host: other, port: 6000}}}}
  - {{name: c, secret: {SECRET}, db: {{max_conns: 3}}}}
  - {{name: d, secret: {SECRET}, db: {{host: third, replicas: [{{host: r3}}]}}}}
db: {{host: main, user: u, password: p, dbname: d, replicas: [{{host: r1}}, {{host: r2, port: 7}}],
      max_replica_lag_ms: 250}}
""")
    R = im_backend.Replica
    assert config.db_of("a") is config.db and config.db.replicas == (R("r1", 5432), R("r2", 7))
    b = config.db_of("b")  # keys left out from the top-level db; its standbys are not this server's
    assert (b.host, b.port, b.user, b.password, b.dbname, b.replicas, b.max_replica_lag_ms) == (
        "other", 6000, "u", "p", "d", (), 250)
    c = config.db_of("c")  # the same server: its standbys too
    assert (c.host, c.max_conns, c.replicas) == ("main", 3, config.db.replicas)
    assert config.db_of("d").replicas == (R("r3", 5432),)
    for bad in ("db: {replicas: {host: x}}", "db: {replicas: [{port: 1}]}", "db: {max_replica_lag_ms: 0}",
                "db: {replicas: [{host: x}, {host: x}]}", "db: {replicas: [{host: x, port: y}]}",
                f"svc: [{{name: a, secret: {SECRET}, db: [1]}}]"):
        with pytest.raises(im_backend.ConfigError):
            im_backend.parse_app_config(bad)


def test_replay_lag_is_the_time_since_the_primary_was_at_the_replayed_position():
    database = im_backend.Database(im_backend.DbConfig(), None)
    # [first seen, last seen, WAL position] of the primary: at 100 until t=10, at 200 from 11 to 20, then 300
    database._samples.extend([[0, 10, 100], [11, 20, 200], [21, 21, 300]])
    assert database._lag(300, 300, 25) == 0  # replayed all the primary wrote: 0, however idle the primary
    assert database._lag(100, 300, 25) == 15  # the primary was last there at t=10
    assert database._lag(150, 300, 25) == 14.5  # half of the WAL written between t=10 and t=11
    assert database._lag(250, 300, 25) == 25 - 20.5
    assert database._lag(50, 300, 25) == 25  # older than anything remembered: at least since the first sample
