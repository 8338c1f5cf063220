"""The database-side error codes: each reached by making PostgreSQL refuse one kind of statement."""
import httpx
import pytest

from conftest import SECRET, Api, app_config, expect, svc_name


@pytest.fixture
async def sabotage(make_server, backing, db):
    """A server whose service tables exist, and a way to make PostgreSQL refuse things behind its back."""
    svc = svc_name("sab")
    srv = make_server("sabotage", app_config(backing, {svc: SECRET}))
    client = httpx.AsyncClient(base_url=srv.url, timeout=10)
    yield Api(client, svc, SECRET), db
    await client.aclose()
    srv.stop()
    for table in ("post_info", "post_comment_info", "post_like", "comment_like", "like_counts", "cleanup_queue"):
        await db.execute(f'DROP TABLE IF EXISTS "{svc}_{table}" CASCADE')


REFUSE = """CREATE FUNCTION "{svc}_refuse"() RETURNS trigger LANGUAGE plpgsql AS
            $$ BEGIN RAISE EXCEPTION 'refused by the test'; END $$"""


async def test_database_refusals_map_to_their_codes(sabotage):
    api, db = sabotage
    svc = api.svc
    post_id = await api.publish("alice", "kept")
    comment_id = await api.comment(post_id)
    await db.execute(REFUSE.format(svc=svc))
    for table, event in (("post_info", "INSERT OR UPDATE OR DELETE"), ("post_comment_info", "INSERT"),
                         ("like_counts", "INSERT")):
        await db.execute(f'CREATE TRIGGER refuse BEFORE {event} ON "{svc}_{table}" '
                         f'FOR EACH ROW EXECUTE FUNCTION "{svc}_refuse"()')
    expect(await api.call("POST", "/publish", data={"author": "a", "content": "x"}), 10003, "create data failed")
    expect(await api.call("POST", "/comments/publish", {"post_id": post_id, "user_id": "u"}, data={"content": "x"}),
           10003)
    expect(await api.call("PUT", "/update", {"post_id": post_id, "user_id": "alice"}, data={"content": "y"}),
           10004, "update data failed")
    expect(await api.call("DELETE", "/delete", {"post_id": post_id, "user_id": "alice"}), 10005, "delete data failed")
    expect(await api.call("GET", "/getlike", {"post_id": post_id}), 10007, "count data failed")
    expect(await api.call("GET", "/comments/getlike", {"comment_ids": str(comment_id)}), 10007)
    post = (await api.ok("GET", "/getinfo", {"post_id": post_id}))["post"]
    assert post["content"] == "kept"  # nothing half-written


async def test_a_table_dropped_under_the_server_is_10001(sabotage):
    api, db = sabotage
    await api.publish()
    await db.execute(f'DROP TABLE "{api.svc}_post_info" CASCADE')
    expect(await api.call("GET", "/getlist"), 10001, "the table of the service has not been created")
    expect(await api.call("POST", "/publish", data={"author": "a", "content": "x"}), 10001)


async def test_tables_that_cannot_be_created_are_10002(make_server, backing, db):
    svc = svc_name("blocked")
    await db.execute(f'CREATE VIEW "{svc}_post_info" AS SELECT 1::bigint AS id')  # in the way of the table
    try:
        srv = make_server("blocked", app_config(backing, {svc: SECRET}))
        async with httpx.AsyncClient(base_url=srv.url, timeout=10) as client:
            api = Api(client, svc, SECRET)
            expect(await api.call("GET", "/getlist"), 10002, "can not create table of the service")
        assert f"cannot create the tables of service '{svc}'" in srv.log()
    finally:
        await db.execute(f'DROP VIEW "{svc}_post_info"')
