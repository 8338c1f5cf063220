"""The server as operators run it: configuration, hot reload, start-up errors, health, limits, Redis outages,
tables made by the Go version, embedding under a path prefix, OpenAPI."""
import asyncio
import os
import signal
import subprocess
import sys
import time

import asyncpg
import httpx
import pytest

import im_backend
from conftest import (ROOT, SECRET, Api, RedisProcess, Server, app_config, authenticates, eventually, expect, negate,
                      svc_name)


async def api_for(server: Server, client: httpx.AsyncClient, svc: str) -> Api:
    return Api(client, svc, server.services.get(svc, SECRET))


# --- health, readiness, OpenAPI --------------------------------------------------------------------------------

async def test_health_and_readiness(client):
    response = await client.get("/healthz")
    assert response.status_code == 200 and response.json()["code"] == 200
    ready = await client.get("/readyz")
    data = ready.json()["data"]
    assert ready.status_code == 200 and data["postgres"] == "ok" and data["redis"] == "ok"
    assert all(isinstance(depth, int) for depth in data["cleanup_queue"].values())


async def test_openapi_describes_every_route(client):
    doc = (await client.get("/openapi.json")).json()
    assert doc["openapi"].startswith("3.")
    declared = {(path, method.upper()) for path, ops in doc["paths"].items() for method in ops
                if path.startswith("/api/")}
    served = {(path, method) for path, methods in im_backend.ROUTE_TABLE.items() for method in methods}
    # 14 of v1 + getbatch + events + report, the 6 of moderation/ (queue, decide, log, ban PUT/DELETE, bans),
    # revisions and users/export, react and reactions
    assert declared == served and len(served) == 27
    reply = doc["paths"]["/api/v1/posts/comments/reply"]["post"]
    assert {p["name"] for p in reply["parameters"]} == {"svc", "appKey", "post_id", "root_comment_id",
                                                        "father_comment_id", "user_id", "ids"}  # ids: any route
    body = reply["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert body["required"] == ["content"] and set(body["properties"]) == {"content", "extra"}
    like = doc["paths"]["/api/v1/posts/like"]["put"]["requestBody"]["content"]
    assert list(like) == ["application/json"] and like["application/json"]["schema"]["required"] == ["like"]


# --- hot reload --------------------------------------------------------------------------------------------------

@pytest.fixture
def reload_server(make_server, backing):
    return make_server("reload", app_config(backing, {svc_name("r1"): SECRET}))


async def test_hot_reload_adds_and_removes_services(reload_server, backing):
    srv, first, added = reload_server, svc_name("r1"), svc_name("r2")
    async with httpx.AsyncClient(base_url=srv.url, timeout=10) as client:
        assert await authenticates(client, first) and not await authenticates(client, added)
        srv.write_config(app_config(backing, {first: SECRET, added: SECRET}))
        assert await eventually(lambda: authenticates(client, added), timeout=10)
        api = await api_for(srv, client, added)
        post_id = await api.publish("new", "tables were created for the new service")
        assert (await api.ok("GET", "/getinfo", {"post_id": post_id}))["post"]["author"] == "new"
        srv.write_config(app_config(backing, {added: SECRET}))
        assert await eventually(lambda: negate(authenticates(client, first)), timeout=10)
        assert await authenticates(client, added)
    assert "configuration reloaded" in srv.log()


@pytest.mark.parametrize("bad_text", ["svc: [\n  - name: x", "svc:\n  - name: 'Bad-Name'\n    secret: W7K8pJ3aQv2LcXgH\n",
                                      "svc:\n  - name: ok\n    secret: short\n", "just a string",
                                      "svc: []\ndb: {port: notanumber}\n"])
async def test_invalid_reload_keeps_the_old_configuration(reload_server, bad_text):
    srv, first = reload_server, svc_name("r1")
    srv.write_config(bad_text)
    async with httpx.AsyncClient(base_url=srv.url, timeout=10) as client:
        assert await eventually(lambda: "rejected the new configuration" in srv.log(), timeout=10)
        assert await authenticates(client, first)


# --- start-up errors -----------------------------------------------------------------------------------------------

def run_cli(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "im_backend.py"), *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, **(env or {})), stdin=subprocess.DEVNULL)


def test_startup_errors_are_clear(workdir, backing):
    missing = run_cli("-conf", str(workdir / "nope.yaml"))
    assert missing.returncode == 3 and "cannot read bootstrap file" in missing.stderr
    bad_dir = workdir / "bad-start"
    bad_dir.mkdir(exist_ok=True)
    (bad_dir / "boot.yaml").write_text("app_conf: app.yaml\n")
    (bad_dir / "app.yaml").write_text("svc:\n  - name: 'has space'\n    secret: W7K8pJ3aQv2LcXgH\n")
    bad_name = run_cli("--conf", str(bad_dir / "boot.yaml"))
    assert bad_name.returncode == 3 and "must match" in bad_name.stderr
    (bad_dir / "boot.yaml").write_text("ipaddr: 127.0.0.1\n")
    incomplete = run_cli("--conf", str(bad_dir / "boot.yaml"))
    assert incomplete.returncode == 3 and "'port'" in incomplete.stderr


def test_unreachable_database_fails_start_up_with_a_clear_message(make_server, backing):
    config = app_config(backing, {svc_name("x"): SECRET}, server={"startup_wait": 2})
    config["db"].update(host="127.0.0.1", port=1)
    srv = make_server("no-db", config, wait=False)
    assert srv.process.wait(60) != 0
    assert "waiting up to 2 s for PostgreSQL at 127.0.0.1:1" in srv.log()  # retried while it might be starting
    assert "cannot connect to PostgreSQL at 127.0.0.1:1" in srv.log()
    config = app_config(backing, {svc_name("x"): SECRET})
    config["db"].update(dbname="no_such_database")
    srv = make_server("no-database", config, wait=False)
    assert srv.process.wait(60) != 0  # a refusal is final at once
    assert 'database "no_such_database" does not exist' in srv.log()


def test_appkey_command(server):
    svc = svc_name("a")
    printed = run_cli("appkey", "--svc", svc, "-conf", str(server.boot))
    assert printed.returncode == 0
    assert abs(im_backend.decrypt_appkey(server.services[svc], printed.stdout.strip()) - time.time()) < 5
    with_secret = run_cli("appkey", "--secret", "testsecret666666")
    assert im_backend.decrypt_appkey("testsecret666666", with_secret.stdout.strip()) is not None
    unknown = run_cli("appkey", "--svc", "nobody", "-conf", str(server.boot))
    assert unknown.returncode == 2 and "no service" in unknown.stderr


def test_python_im_backend_serves_and_shuts_down_gracefully(make_server, backing):
    """`python im_backend.py -conf PATH --port P` as the Go binary; SIGTERM stops it cleanly."""
    srv = make_server("cli-run", app_config(backing, {svc_name("cli"): SECRET}), start=False)
    srv.start_cli(cwd=srv.directory)
    assert httpx.get(srv.url + "/readyz").status_code == 200
    assert srv.stop(signal.SIGTERM) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after shutting down
    assert "im_backend stopped" in srv.log() and "Traceback" not in srv.log()


# --- limits: timeout --------------------------------------------------------------------------------------------

async def test_slow_request_answers_504_and_writes_nothing(make_server, backing, db):
    svc = svc_name("slow")
    srv = make_server("slow", app_config(backing, {svc: SECRET}, server={"timeout": 1}))
    async with httpx.AsyncClient(base_url=srv.url, timeout=10) as client:
        api = await api_for(srv, client, svc)
        post_id = await api.publish("alice", "before")
        async with db.transaction():  # hold the row so the update has to wait
            await db.execute(f'SELECT 1 FROM "{svc}_post_info" WHERE id = $1 FOR UPDATE', post_id)
            started = time.monotonic()
            result = await api.call("PUT", "/update", {"post_id": post_id, "user_id": "alice"},
                                    data={"content": "after"})
            assert time.monotonic() - started < 5
        expect(result, 504, "Request timeout")
        await asyncio.sleep(0.2)
        assert await db.fetchval(f'SELECT content FROM "{svc}_post_info" WHERE id = $1', post_id) == "before"


# --- Redis outage --------------------------------------------------------------------------------------------------

async def test_reads_survive_redis_down_and_writes_refuse(make_server, workdir, backing):
    redis_server = RedisProcess(workdir / "redis-outage", password="outage-secret")
    svc = svc_name("rdown")
    config = app_config(backing, {svc: SECRET})
    config["cache"].update(addr=redis_server.addr, password=redis_server.password)
    try:
        srv = make_server("redis-outage-app", config)
        async with httpx.AsyncClient(base_url=srv.url, timeout=15) as client:
            api = await api_for(srv, client, svc)
            post_id = await api.publish("alice", "cached")
            cid = await api.comment(post_id)
            await api.ok("PUT", "/like", {"post_id": post_id, "user_id": "u1"}, json={"like": True})
            await api.ok("GET", "/getinfo", {"post_id": post_id})
            redis_server.stop()
            await asyncio.sleep(0.5)
            post = (await api.ok("GET", "/getinfo", {"post_id": post_id}))["post"]
            assert post["content"] == "cached"
            assert (await api.ok("GET", "/getlike", {"post_id": post_id}))["like"] == 1
            assert (await api.ok("GET", "/comments/getlike", {"comment_ids": str(cid)}))["likes"] == [0]
            assert post_id in (await api.ok("GET", "/getlist"))["post_list"]
            expect(await api.call("POST", "/publish", data={"author": "a", "content": "x"}), 10017,
                   "generate id failed")
            expect(await api.call("PUT", "/update", {"post_id": post_id, "user_id": "alice"},
                                  data={"content": "stale?"}), 10018, "del k-v in cache failed")
            expect(await api.call("PUT", "/like", {"post_id": post_id, "user_id": "u2"}, json={"like": True}), 10018)
            expect(await api.call("DELETE", "/delete", {"post_id": post_id, "user_id": "alice"}), 10018)
            assert (await api.ok("GET", "/getinfo", {"post_id": post_id}))["post"]["content"] == "cached"
            assert (await client.get("/readyz")).status_code == 503
    finally:
        redis_server.stop()


# --- tables created by the Go version ---------------------------------------------------------------------------

GO_DDL = """
CREATE TABLE "{s}_post_info" ("id" bigint,"content" text,"title" varchar(255),"author" varchar(255),"extra" jsonb,
    "created_at" timestamptz,"updated_at" timestamptz,PRIMARY KEY ("id"));
CREATE INDEX "idx_created_at_{s}" ON "{s}_post_info" ("created_at");
CREATE TABLE "{s}_post_comment_info" ("id" bigint,"user_id" varchar(255),"root_id" bigint DEFAULT 0,
    "father_id" bigint DEFAULT 0,"target_user_id" varchar(255) DEFAULT NULL,"post_id" bigint,"content" text,
    "extra" jsonb,"created_at" timestamptz DEFAULT now(),"updated_at" timestamptz DEFAULT now(),PRIMARY KEY ("id"));
CREATE INDEX "idx_post_id_{s}" ON "{s}_post_comment_info" ("post_id");
CREATE TABLE "{s}_post_like" ("post_id" bigint,"user_id" varchar(255),"created_at" timestamptz DEFAULT now(),
    PRIMARY KEY ("post_id","user_id"));
CREATE TABLE "{s}_comment_like" ("comment_id" bigint,"user_id" varchar(255),"post_id" bigint,
    "created_at" timestamptz DEFAULT now(),PRIMARY KEY ("comment_id","user_id"));
"""


async def test_serves_tables_created_by_the_go_version(make_server, backing, db):
    svc = svc_name("go")
    await db.execute(GO_DDL.format(s=svc))
    old_id = (1700000000 << 32) | 7
    await db.execute(f'INSERT INTO "{svc}_post_info" VALUES ($1, $2, $3, $4, $5, $6, $6)', old_id, "from go", "",
                     "gopher", '{"image": "a.png"}', __import__("datetime").datetime(2023, 11, 14, 22, 13, 20,
                                                                                        tzinfo=__import__("datetime").timezone.utc))
    await db.execute(f'INSERT INTO "{svc}_post_comment_info" (id, user_id, post_id, content) VALUES (1, $1, $2, $3)',
                     "u1", old_id, "old comment")
    await db.execute(f'INSERT INTO "{svc}_post_like" (post_id, user_id) VALUES ($1, $2)', old_id, "fan")
    srv = make_server("go-tables", app_config(backing, {svc: SECRET}))
    async with httpx.AsyncClient(base_url=srv.url, timeout=10) as client:
        api = await api_for(srv, client, svc)
        post = (await api.ok("GET", "/getinfo", {"post_id": old_id}))["post"]
        assert (post["content"], post["author"], post["time"], post["extra"]) == (
            "from go", "gopher", "2023-11-15T06:13:20", {"image": "a.png"})
        assert (await api.ok("GET", "/getlike", {"post_id": old_id}))["like"] == 1
        comments = (await api.ok("GET", "/comments/getinfo", {"post_id": old_id, "root_comment_id": 0}))["comments"]
        assert [c["content"] for c in comments] == ["old comment"]
        await api.reply(old_id, 1, 1)
        new_id = await api.publish()
        assert new_id > old_id


# --- embedding under a path prefix --------------------------------------------------------------------------------

def prefix_app(prefix: str, inner, strip_path: bool):
    """A host ASGI app mounting `inner` under `prefix`, as Starlette's Mount does (both path conventions)."""
    async def host(scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith(prefix + "/"):
            path = scope["path"][len(prefix):] if strip_path else scope["path"]
            await inner(dict(scope, path=path, root_path=scope.get("root_path", "") + prefix), receive, send)
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"host app"})
    return host


@pytest.mark.parametrize("strip_path", [False, True])
async def test_mounted_under_a_prefix(server, strip_path):
    inner = im_backend.create_app(server.boot)
    host = prefix_app("/im", inner, strip_path)
    svc = svc_name("a")
    async with inner.lifespan():
        transport = httpx.ASGITransport(app=host)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            assert (await client.get("/other")).text == "host app"
            key = im_backend.encrypt_appkey(server.services[svc])
            response = await client.post("/im/api/v1/posts/publish", params={"svc": svc, "appKey": key},
                                         data={"author": "mounted", "content": "x"})
            post_id = response.json()["data"]["post_id"]
            response = await client.get("/im/api/v1/posts/getinfo", params={"svc": svc, "appKey": key,
                                                                            "post_id": post_id})
            assert response.json()["data"]["post"]["author"] == "mounted"
            assert (await client.get("/im/healthz")).status_code == 200
    assert inner.service is None  # the lifespan closed the pools


async def test_starts_on_first_request_without_lifespan(server):
    inner = im_backend.create_app(server.boot)
    try:
        transport = httpx.ASGITransport(app=inner)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            assert (await client.get("/readyz")).status_code == 200
    finally:
        await inner.shutdown()


# --- unexpected errors ---------------------------------------------------------------------------------------------

async def test_unexpected_error_is_a_500_envelope_with_details_only_in_the_log(server, monkeypatch, caplog):
    inner = im_backend.create_app(server.boot)

    async def broken(self, svc, post_id):
        raise RuntimeError("secret detail")

    svc = svc_name("a")
    async with inner.lifespan():
        route = im_backend.ROUTE_TABLE["/api/v1/posts/getinfo"]["GET"]
        monkeypatch.setitem(im_backend.ROUTE_TABLE["/api/v1/posts/getinfo"], "GET",
                            im_backend.dataclasses.replace(route, operation=broken))
        transport = httpx.ASGITransport(app=inner)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.get("/api/v1/posts/getinfo", params={
                "svc": svc, "appKey": im_backend.encrypt_appkey(server.services[svc]), "post_id": 1})
    assert response.status_code == 500
    assert response.json() == {"code": 500, "msg": "internal server error", "data": None}
    assert "secret detail" not in response.text
    assert "secret detail" in caplog.text and "Traceback" in caplog.text


async def test_reload_moves_to_another_database_and_redis(make_server, workdir, backing, db):
    """A changed `db`/`cache` address takes effect by reconnecting; requests keep being answered."""
    svc = svc_name("move")
    other_db = f"im_move_{svc}"
    await db.execute(f'CREATE DATABASE "{other_db}"')
    srv = make_server("move", app_config(backing, {svc: SECRET}))
    other_redis = RedisProcess(workdir / "moved-redis", password="moved")
    # An operator moving Redis carries the id counters over; without that a probe published in the same second as
    # `before` would get `before`'s id from the fresh counter, and getinfo(before) would find the probe.
    other_redis.cli("set", f"post_id:{svc}", "1000")
    try:
        async with httpx.AsyncClient(base_url=srv.url, timeout=10) as client:
            api = await api_for(srv, client, svc)
            before = await api.publish("alice", "in the first database")
            moved = app_config(backing, {svc: SECRET})
            moved["db"]["dbname"] = other_db
            moved["cache"].update(addr=other_redis.addr, password=other_redis.password)
            srv.write_config(moved)

            seen = []

            async def moved_over():
                await api.publish("probe", "x")  # answered throughout the switch
                seen.append((await api.call("GET", "/getinfo", {"post_id": before}))[1])
                return seen[-1]["code"] == 10006
            assert await eventually(moved_over, timeout=40), (seen[-3:], srv.log()[-3000:])  # generous: a loaded machine
            after = await api.publish("bob", "in the second database")
            assert (await api.ok("GET", "/getinfo", {"post_id": after}))["post"]["author"] == "bob"
        assert int(other_redis.cli("get", f"post_id:{svc}").strip()) >= 1  # ids now come from the new Redis
        conn = await asyncpg.connect(host=backing["db"]["host"], port=backing["db"]["port"], user=backing["db"]["user"],
                                     password=backing["db"]["password"] or None, database=other_db)
        try:
            assert await conn.fetchval(f'SELECT author FROM "{svc}_post_info" WHERE id = $1', after) == "bob"
        finally:
            await conn.close()
    finally:
        srv.stop()
        other_redis.stop()
        await db.execute(f'DROP DATABASE IF EXISTS "{other_db}" WITH (FORCE)')


async def test_several_workers_start_together_on_a_new_service(make_server, backing):
    """uvicorn --workers 3: three processes create the same new tables at once (serialised by an advisory lock)."""
    svc = svc_name("workers")
    srv = make_server("workers", app_config(backing, {svc: SECRET}), start=False).start_cli("--workers", "3")
    async with httpx.AsyncClient(base_url=srv.url, timeout=10) as client:
        api = await api_for(srv, client, svc)
        ids = await asyncio.gather(*(api.publish(content=f"w{i}") for i in range(30)))
        assert len(set(ids)) == 30
    assert await eventually(lambda: srv.log().count("im_backend ready") == 3, timeout=20)
    assert "cannot create the tables" not in srv.log()


async def test_four_workers_start_on_a_fresh_service_20_times_while_publishing(make_server, backing):
    """Publishes sent while workers start: answered by the first one ready while the others still start up
    (their start-up must not lock what it has no need to create: a start-up DDL transaction share-locked the post
    table, then the events table, while a publish held the events table and waited for the post table)."""
    failures = []
    for n in range(20):
        svc = svc_name(f"fresh{n}")
        srv = make_server(f"fresh{n}", app_config(backing, {svc: SECRET}), start=False)
        srv.start_cli("--workers", "4", wait=False)
        answers = []
        async with httpx.AsyncClient(base_url=srv.url, timeout=20) as client:
            api = await api_for(srv, client, svc)

            async def publisher(k: int) -> None:
                after_start = 0
                for i in range(400):  # until every worker has started, and then 3 more
                    started = srv.log().count("im_backend ready") == 4
                    try:
                        answers.append(await api.call("POST", "/publish", data={"author": "a", "content": f"{k}.{i}"}))
                    except httpx.TransportError:  # not listening yet
                        if srv.process.poll() is not None:
                            return
                        await asyncio.sleep(0.05)
                    after_start += started
                    if after_start >= 3:
                        return
            await asyncio.gather(*(publisher(k) for k in range(8)))
        log = srv.log()
        bad = [body for _, body in answers if body["code"] != 200]
        if bad or log.count("im_backend ready") != 4 or "database error" in log or "cannot create the tables" in log:
            failures.append((n, bad[:3], [line for line in log.splitlines() if "ERROR" in line][:5]))
        srv.stop()
    assert not failures, failures


async def test_a_worker_starts_on_existing_tables_without_locking_anything(make_server, backing, db):
    """Every table and index there: no DDL, no lock, even while other processes write and make tables."""
    svc = svc_name("nolock")
    make_server("nolock", app_config(backing, {svc: SECRET})).stop()  # made its tables
    tables = ", ".join(f'"{svc}_{table}"' for table in ("post_info", "post_comment_info", "events"))
    async with db.transaction():
        await db.execute(f"LOCK TABLE {tables} IN ROW EXCLUSIVE MODE")  # as writes in flight do
        await db.execute("SELECT pg_advisory_xact_lock(hashtext('im_backend:ddl'))")  # as a process making tables
        srv = make_server("nolock-again", app_config(backing, {svc: SECRET}), start=False).start(wait=False)
        await srv.wait_ready_async(timeout=30)
        async with httpx.AsyncClient(base_url=srv.url, timeout=10) as client:
            await (await api_for(srv, client, svc)).publish("alice", "while locked")


async def test_making_a_missing_index_does_not_deadlock_with_writes(backing, db):
    """DDL that has to run (an index missing) while another process writes: each statement commits on its own,
    so it never holds one table's lock while it waits for another's."""
    svc = svc_name("partial")
    cfg = backing["db"]
    pool = await asyncpg.create_pool(host=cfg["host"], port=cfg["port"], user=cfg["user"],
                                     password=cfg["password"] or None, database=cfg["dbname"], min_size=1, max_size=2,
                                     init=im_backend._init_connection)
    try:
        assert await im_backend.ensure_tables(pool, [svc]) == {svc}
        await db.execute(f'DROP INDEX "{svc}_events_failed_idx"')
        async with db.transaction():
            await db.execute("SET LOCAL lock_timeout = '20s'")
            await db.execute(f"""INSERT INTO "{svc}_events" (type, data) VALUES ('post.published', '{{}}')""")
            making = asyncio.ensure_future(asyncio.wait_for(im_backend.ensure_tables(pool, [svc]), 60))
            waiting = "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = to_regclass($1)"
            assert await eventually(lambda: db.fetchval(waiting, f'"{svc}_events"'), timeout=20)  # for this write
            await db.execute(f'INSERT INTO "{svc}_post_info" (id, content) VALUES (1, $1)', "written meanwhile")
        assert await making == {svc}
        assert await db.fetchval("SELECT to_regclass($1) IS NOT NULL", f'"{svc}_events_failed_idx"')
    finally:
        await pool.close()


async def test_sigterm_lets_requests_in_flight_finish(make_server, backing, db):
    svc = svc_name("drain")
    srv = make_server("drain", app_config(backing, {svc: SECRET}))
    async with httpx.AsyncClient(base_url=srv.url, timeout=20) as client:
        api = await api_for(srv, client, svc)
        post_id = await api.publish("alice", "before")
        async with db.transaction():
            await db.execute(f'SELECT 1 FROM "{svc}_post_info" WHERE id = $1 FOR UPDATE', post_id)
            pending = asyncio.ensure_future(api.call("PUT", "/update", {"post_id": post_id, "user_id": "alice"},
                                                     data={"content": "after"}))
            await asyncio.sleep(0.5)  # the update is now waiting for the row
            srv.process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)
            assert srv.process.poll() is None  # still finishing its request
        status, body = await pending
        assert (status, body["code"]) == (200, 200)
    assert srv.process.wait(20) in (0, -signal.SIGTERM)
    assert await db.fetchval(f'SELECT content FROM "{svc}_post_info" WHERE id = $1', post_id) == "after"
    assert "im_backend stopped" in srv.log()
