"""Rate limits: GCRA in Redis shared by every process, writes per (service, user), 429 with
Retry-After / RateLimit-Policy / RateLimit, nothing written when refused, local limiting while Redis is down,
limits changed by hot reload; and the validation of the new configuration keys."""
from __future__ import annotations

import asyncio
import math

import http_sf
import httpx
import pytest

import im_backend
from conftest import (Api, RedisProcess, Server, entries_config, eventually, redis_client, svc_name,
                      table_counts)

SECRET = "W7K8pJ3aQv2LcXgH"
SLOW = {"requests_per_second": 0.02, "burst": 5}  # 5 at once, then one per 50 s: no refill during a test


def entry(label: str, **limits) -> dict:
    return {"name": svc_name(label), "secret": SECRET, **({"limits": limits} if limits else {})}


def tenants() -> list[dict]:
    return [entry("rl_burst", **SLOW), entry("rl_shared", **SLOW), entry("rl_users", writes_per_user_per_minute=3),
            entry("rl_free"), entry("rl_reload")]


@pytest.fixture(scope="module")
def servers(workdir, backing):
    first = Server(workdir / "rl-1", entries_config(backing, tenants())).start()
    second = Server(workdir / "rl-2", entries_config(backing, tenants())).start()
    yield first, second
    first.stop()
    second.stop()


async def call(url: str, label: str, method: str, path: str, params: dict | None = None, **kwargs) -> httpx.Response:
    query = {"svc": svc_name(label), "appKey": im_backend.encrypt_appkey(SECRET), **(params or {})}
    async with httpx.AsyncClient(timeout=30) as client:
        return await client.request(method, url + "/api/v1/posts" + path, params=query, **kwargs)


def assert_limited(response: httpx.Response, policy: str, quota: int, window: int) -> None:
    assert response.status_code == 429, (response.status_code, response.text)
    assert response.json() == {"code": 429, "msg": "too many requests", "data": None}
    retry = int(response.headers["retry-after"])
    assert retry >= 1
    policies = http_sf.parse(response.headers["ratelimit-policy"].encode(), tltype="list")
    assert policies == [(policy, {"q": quota, "w": window})], policies
    state = http_sf.parse(response.headers["ratelimit"].encode(), tltype="list")
    assert state == [(policy, {"r": 0, "t": retry})], state


async def test_a_burst_over_the_limit_gets_429_and_writes_nothing(servers, db):
    url, svc = servers[0].url, svc_name("rl_burst")
    statuses = []
    for i in range(9):
        response = await call(url, "rl_burst", "POST", "/publish", data={"author": f"a{i}", "content": "burst"})
        statuses.append(response.status_code)
        if response.status_code == 429:
            assert_limited(response, "svc", 5, 250)
    assert statuses == [200] * 5 + [429] * 4, statuses
    assert (await table_counts(db, svc))["post_info"] == 5
    assert (await call(url, "rl_burst", "GET", "/getlist")).status_code == 429  # reads count too
    async with httpx.AsyncClient(timeout=30) as client:  # each 429 counted once, for its service
        metrics = (await client.get(url + "/metrics")).text
    assert f'im_ratelimited_total{{svc="{svc}"}} 5.0' in metrics, metrics


async def test_two_processes_share_one_limit(servers):
    statuses = []
    for i in range(10):
        response = await call(servers[i % 2].url, "rl_shared", "GET", "/getlist")
        statuses.append(response.status_code)
    assert sorted(statuses) == [200] * 5 + [429] * 5, statuses
    assert statuses[:5] == [200] * 5


# --- leases: a service's tokens taken from the shared bucket several at a time --------------------------------
# A lease holds at most LEASE_SECONDS of the rate, so with the real constants leases of more than one token need a
# rate of 100/s or more, which refills faster than a test can count. The two servers below run the module's code
# with LEASE_SECONDS scaled (tests/scaled_leases_app.py): one token per 50 s, burst 100, leases of 5 tokens. No
# token comes back during the test, so every count is exact.
LEASED = {"requests_per_second": 0.02, "burst": 100}
LEASE = 5  # min(burst // LEASE_SHARE, int(requests_per_second * 250)): the rate's term binds


def test_lease_size_from_the_real_constants():
    size = im_backend._lease_size
    assert size(im_backend.Limits(0.02, 5)) == 1  # the limits of every other test here: one token per round trip
    assert size(im_backend.Limits(1000.0, 2000)) == 20  # 20 ms of the rate
    assert size(im_backend.Limits(1000.0, 50)) == 5  # at most a tenth of the burst
    assert size(im_backend.Limits(100.0, 1000)) == 2
    assert size(im_backend.Limits(**LEASED)) == 1  # hence the scaled constants of the test below


@pytest.fixture(scope="module")
def leased_servers(workdir, backing):
    config = entries_config(backing, [entry("rl_leased", **LEASED)])
    scaled = {"app": "scaled_leases_app:app", "IM_TEST_LEASE_SECONDS": "250", "IM_TEST_LEASE_LIFE": "600"}
    first = Server(workdir / "rl-lease-1", config).start(**scaled)
    second = Server(workdir / "rl-lease-2", config).start(**scaled)
    yield first, second
    first.stop()
    second.stop()


async def test_leases_across_two_processes_admit_exactly_the_burst(leased_servers, backing):
    """Requests alternate between two processes. Each takes its tokens from the shared bucket one lease (5) at a
    time, so after every request the bucket has given out exactly the leases the two processes fetched; 100
    tokens are 20 leases, 10 per process: 50 requests admitted by each, then every further one refused."""
    svc = svc_name("rl_leased")
    interval = 1e6 / LEASED["requests_per_second"]  # µs per token
    redis = redis_client(backing["cache"])
    key = im_backend.rate_key(svc)

    async def taken_from_bucket() -> int:
        """Tokens the bucket has given out (its theoretical arrival time ahead of now, in tokens)."""
        tat, (seconds, micros) = await redis.get(key), await redis.time()
        return 0 if tat is None else math.ceil((int(tat) - (seconds * 1e6 + micros)) / interval)

    admitted, statuses = [0, 0], []
    try:
        for i in range(120):
            which = i % 2
            response = await call(leased_servers[which].url, "rl_leased", "GET", "/getlist")
            statuses.append(response.status_code)
            if response.status_code == 200:
                admitted[which] += 1
            else:
                assert_limited(response, "svc", LEASED["burst"], 5000)
            leases = math.ceil(admitted[0] / LEASE) + math.ceil(admitted[1] / LEASE)
            assert await taken_from_bucket() == LEASE * leases, (i, admitted, statuses[-3:])
    finally:
        await redis.aclose()
    assert admitted == [50, 50], admitted
    assert statuses == [200] * 100 + [429] * 20, statuses


async def test_writes_are_limited_per_user(servers, db):
    first, second = servers
    svc = svc_name("rl_users")
    ok = await call(first.url, "rl_users", "POST", "/publish", data={"author": "setup", "content": "x"})
    post_id = ok.json()["data"]["post_id"]
    for i in range(2):  # u1: 3 writes in a minute, on two processes and two kinds of write
        response = await call(servers[i].url, "rl_users", "POST", "/comments/publish",
                              {"post_id": post_id, "user_id": "u1"}, data={"content": "c"})
        assert response.status_code == 200, response.text
    assert (await call(second.url, "rl_users", "PUT", "/like", {"post_id": post_id, "user_id": "u1"},
                       json={"like": True})).status_code == 200
    before = await table_counts(db, svc)
    refused = await call(first.url, "rl_users", "POST", "/comments/publish", {"post_id": post_id, "user_id": "u1"},
                         data={"content": "c"})
    assert_limited(refused, "user-writes", 3, 60)
    assert_limited(await call(second.url, "rl_users", "POST", "/publish", data={"author": "u1", "content": "x"}),
                   "user-writes", 3, 60)
    assert await table_counts(db, svc) == before  # nothing written
    for user in ("u2", "u3"):  # other users are not affected
        assert (await call(first.url, "rl_users", "POST", "/comments/publish", {"post_id": post_id, "user_id": user},
                           data={"content": "c"})).status_code == 200
    assert (await call(first.url, "rl_users", "GET", "/getinfo", {"post_id": post_id})).status_code == 200  # reads


async def test_unlimited_service_never_refused(servers):
    results = await asyncio.gather(*(call(servers[i % 2].url, "rl_free", "GET", "/getlist") for i in range(30)))
    assert {r.status_code for r in results} == {200}


async def test_limits_change_by_hot_reload(servers):
    first = servers[0]
    for _ in range(8):
        assert (await call(first.url, "rl_reload", "GET", "/getlist")).status_code == 200
    entries = tenants()
    entries[4] = entry("rl_reload", requests_per_second=0.02, burst=2)
    first.write_config(dict(first.config, svc=entries))

    async def limited() -> bool:
        return (await call(first.url, "rl_reload", "GET", "/getlist")).status_code == 429

    assert await eventually(limited, timeout=15)
    entries[4] = entry("rl_reload")
    first.write_config(dict(first.config, svc=entries))

    async def free() -> bool:
        return (await call(first.url, "rl_reload", "GET", "/getlist")).status_code == 200

    assert await eventually(free, timeout=15)


async def test_redis_down_each_process_limits_on_its_own(workdir, backing):
    redis_server = RedisProcess(workdir / "rl-redis", password="rl-secret")
    cache = {"addr": redis_server.addr, "password": redis_server.password}
    server = Server(workdir / "rl-redis-down", entries_config(dict(backing, cache=cache),
                                                      [entry("rl_down", requests_per_second=0.02, burst=3)])).start()
    try:
        api = Api(httpx.AsyncClient(base_url=server.url, timeout=30), svc_name("rl_down"), SECRET)
        redis_server.stop()
        statuses = [(await api.call("GET", "/getlist"))[0] for _ in range(6)]
        assert statuses == [200] * 3 + [429] * 3, statuses
        await api.client.aclose()
        log = server.log()
        assert log.count("each process applies the rate limits on its own") == 1, log
        assert "Traceback" not in log
    finally:
        server.stop()
        redis_server.stop()


# --- configuration ------------------------------------------------------------------------------------------

BASE = "svc:\n  - {name: a, secret: W7K8pJ3aQv2LcXgH%s}\n"


def parse(svc_extra: str = "", top: str = "") -> im_backend.AppConfig:
    return im_backend.parse_app_config(BASE % svc_extra + top)


def test_limits_default_and_override():
    config = parse(", limits: {burst: 7}", "limits: {requests_per_second: 10, writes_per_user_per_minute: 4}\n")
    assert config.tenants["a"].limits == im_backend.Limits(10.0, 7, 4)
    assert parse("", "limits: {requests_per_second: 2.5}\n").tenants["a"].limits.burst == 3  # default: the rate
    assert parse().tenants["a"].limits == im_backend.Limits()
    assert parse().tenants["a"].auth == "any"
    rotated = parse(", auth: signed, previous_secrets: [Ab9xQ2mZ7kLp4sT1uV6wY3e8]")
    assert (rotated.tenants["a"].auth, rotated.tenants["a"].previous_secrets) == ("signed", ("Ab9xQ2mZ7kLp4sT1uV6wY3e8",))


@pytest.mark.parametrize("svc_extra, top", [
    (", auth: sometimes", ""),
    (", auth: [signed]", ""),
    (", previous_secrets: short", ""),
    (", previous_secrets: [tooshort]", ""),
    (", limits: {burst: -1}", ""),
    (", limits: {requests_per_second: fast}", ""),
    (", limits: [1, 2]", ""),
    ("", "limits: {writes_per_user_per_minute: 99999999}\n"),
    ("", "limits: 5\n"),
    ("", "server: {auth_window: 0}\n"),
    ("", "server: {auth_window: 100000}\n"),
])
def test_bad_auth_and_limit_values_reject_the_configuration(svc_extra, top):
    with pytest.raises(im_backend.ConfigError):
        parse(svc_extra, top)
