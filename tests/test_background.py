"""What runs beside the requests: Redis restarts (retry policy, reads back on at once), background loops that
survive unexpected errors, readiness that reports a failing check."""
import asyncio

import httpx

import im_backend
from conftest import SECRET, Api, RedisProcess, app_config, eventually, svc_name


async def test_redis_restart_costs_no_cache_misses_beyond_the_restart(workdir, backing, make_server):
    redis_dir = workdir / "restart-redis"
    redis_server = RedisProcess(redis_dir, password="pw")
    svc = svc_name("rr")
    config = app_config(backing, {svc: SECRET}, cache={"addr": redis_server.addr, "password": "pw", "near_ttl": 0})
    srv = make_server("redis-restart", config)
    try:
        async with httpx.AsyncClient(base_url=srv.url, timeout=30) as client:
            api = Api(client, svc, SECRET)
            post_ids = [await api.publish(content=f"r{i}") for i in range(3)]
            reads = [api.ok("GET", "/getinfo", {"post_id": p}) for p in post_ids for _ in range(8)]
            await asyncio.gather(*reads)  # several pooled connections, each one stale after the restart
            redis_server.stop()
            redis_server = RedisProcess(redis_dir, password="pw", port=redis_server.port)  # empty, as restarted
            reads = [api.ok("GET", "/getinfo", {"post_id": p}) for p in post_ids for _ in range(8)]
            assert [r["post"]["id"] for r in await asyncio.gather(*reads)] == [p for p in post_ids for _ in range(8)]
            for post_id in post_ids:  # the first reads after the restart filled the cache again
                assert redis_server.cli("exists", im_backend.post_info_key(svc, post_id)).strip() == "1"
        assert "redis read failed" not in srv.log()
    finally:
        srv.stop()  # before its Redis goes
        redis_server.stop()


async def test_reads_are_back_on_as_soon_as_redis_answers(workdir, backing, make_server):
    redis_dir = workdir / "outage-redis"
    redis_server = RedisProcess(redis_dir, password="pw")
    svc = svc_name("ro")
    config = app_config(backing, {svc: SECRET}, cache={"addr": redis_server.addr, "password": "pw", "near_ttl": 0})
    srv = make_server("redis-outage", config)
    try:
        async with httpx.AsyncClient(base_url=srv.url, timeout=30) as client:
            api = Api(client, svc, SECRET)
            post_id = await api.publish()
            redis_server.stop()
            assert (await api.ok("GET", "/getinfo", {"post_id": post_id}))["post"]["id"] == post_id  # from PostgreSQL
            assert "redis read failed" in srv.log()
            redis_server = RedisProcess(redis_dir, password="pw", port=redis_server.port)

            async def back_on() -> bool:
                await api.ok("GET", "/getinfo", {"post_id": post_id})
                return "redis answers again" in srv.log()
            assert await eventually(back_on, timeout=15)
            redis_server.cli("flushall")
            await api.ok("GET", "/getinfo", {"post_id": post_id})  # the next read refills the cache
            assert redis_server.cli("exists", im_backend.post_info_key(svc, post_id)).strip() == "1"
    finally:
        srv.stop()  # before its Redis goes
        redis_server.stop()


async def test_cleanup_loop_survives_an_unexpected_error(server, monkeypatch, caplog):
    calls = []
    original = im_backend.Cleanup.clean_once

    async def flaky(self, svc):
        calls.append(svc)
        if len(calls) == 1:
            raise RuntimeError("boom in the clean-up")
        return await original(self, svc)

    monkeypatch.setattr(im_backend.Cleanup, "clean_once", flaky)
    inner = im_backend.create_app(server.boot)
    async with inner.lifespan():
        assert await eventually(lambda: len(calls) >= 2, timeout=10)
        assert not inner._cleanup_task.done()
    assert "background clean-up failed unexpectedly" in caplog.text and "boom in the clean-up" in caplog.text


async def test_readiness_reports_a_failing_queue_check(server, monkeypatch):
    monkeypatch.setattr(im_backend, "CLEANUP_DEPTH", "SELECT count(no_such_column) FROM {cleanup}")
    inner = im_backend.create_app(server.boot)
    async with inner.lifespan():
        transport = httpx.ASGITransport(app=inner)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            data = (await client.get("/readyz")).json()["data"]
    assert data["postgres"] == "ok" and data["redis"] == "ok"
    depths = data["cleanup_queue"]
    assert set(depths) == set(server.services)
    assert all(depth.startswith("error: UndefinedColumnError") for depth in depths.values()), depths


async def test_a_failed_read_turns_reads_off_until_a_probe_sees_redis_answer(backing, monkeypatch):
    monkeypatch.setattr(im_backend, "REDIS_READS_OFF", 60)  # longer than this test waits: only a probe ends it
    host, port = backing["cache"]["addr"].rsplit(":", 1)
    cfg = im_backend.CacheConfig(addr=backing["cache"]["addr"], password=backing["cache"]["password"], near_ttl=0)
    cache = im_backend.open_cache(cfg)
    key = f"probe-test:{svc_name('p')}"
    try:
        await cache.client.set(key, b"v", ex=60)
        cache._read_failed(ConnectionError("as if Redis had gone away"))
        assert await cache.get(key) is None  # reads are off: a request does not wait on a Redis that failed
        await asyncio.wait_for(cache._probe, 10)  # ends at the first answer (or when the off period ends)
        assert await cache.get(key) == b"v"  # back on at once, not when the off period ends
    finally:
        await cache.client.delete(key)
        await cache.aclose()
