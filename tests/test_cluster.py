"""Scale-out: two server processes sharing one PostgreSQL and a real 3-master Redis Cluster."""
import asyncio

import httpx
import pytest
import redis

from conftest import SECRET, Api, ServerFactory, app_config, eventually, expect, svc_name


@pytest.fixture(scope="module")
def pair(workdir, backing, redis_cluster):
    """Two replicas (as behind a load balancer) of one service, on the cluster."""
    svc = svc_name("cl")
    config = app_config(backing, {svc: SECRET})
    config["cache"].update(redis_cluster)
    make_server = ServerFactory(workdir)  # module-scoped: make_server is per test
    try:
        yield svc, [make_server(f"cluster-app{i}", config) for i in range(2)]
    finally:
        make_server.stop_all()


@pytest.fixture
async def apis(pair):
    svc, servers = pair
    clients = [httpx.AsyncClient(base_url=srv.url, timeout=15) for srv in servers]
    yield [Api(client, svc, SECRET) for client in clients]
    for client in clients:
        await client.aclose()


def cluster_keys(redis_cluster: dict, pattern: str) -> dict[str, list]:
    """Keys matching pattern on each master."""
    found = {}
    for addr in redis_cluster["addr"].split(","):
        host, port = addr.rsplit(":", 1)
        node = redis.Redis(host=host, port=int(port), password=redis_cluster["password"])
        found[addr] = node.keys(pattern)
        node.close()
    return found


async def test_ready_on_the_cluster(apis, pair):
    for srv in pair[1]:
        ready = httpx.get(srv.url + "/readyz").json()["data"]
        assert ready["redis"] == "ok" and ready["postgres"] == "ok"


async def test_replicas_share_ids_posts_and_writes(apis, pair, redis_cluster):
    a, b = apis
    ids = await asyncio.gather(*(api.publish(content=f"p{i}") for i in range(30) for api in (a, b)))
    assert len(set(ids)) == 60  # one id sequence in the cluster, whichever replica asks
    post_id = ids[0]
    assert (await b.ok("GET", "/getinfo", {"post_id": post_id}))["post"]["content"] == "p0"
    assert (await a.ok("GET", "/getinfo", {"post_id": post_id}))["post"]["content"] == "p0"
    await b.ok("PUT", "/update", {"post_id": post_id, "user_id": "alice"}, data={"content": "edited on b"})
    # at once on the replica that wrote, and within the near-cache bound on the other one
    assert (await b.ok("GET", "/getinfo", {"post_id": post_id}))["post"]["content"] == "edited on b"
    assert await eventually(lambda: _content_is(a, post_id, "edited on b"), timeout=5)
    await asyncio.gather(*(a.ok("GET", "/getinfo", {"post_id": p}) for p in ids))
    per_node = cluster_keys(redis_cluster, f"svc:{a.svc}:post:*:info")
    assert sum(1 for keys in per_node.values() if keys) >= 2  # the cache really is spread over the masters


async def _content_is(api, post_id, content):
    return (await api.ok("GET", "/getinfo", {"post_id": post_id}))["post"]["content"] == content


async def test_concurrent_likes_across_replicas_are_exact(apis):
    a, b = apis
    post_id = await a.publish()
    comment_ids = [await b.comment(post_id, f"u{i}") for i in range(6)]
    users = [f"fan{i}" for i in range(50)]
    await asyncio.gather(*((a if i % 2 else b).ok("PUT", "/like", {"post_id": post_id, "user_id": u},
                                                  json={"like": True}) for i, u in enumerate(users)))
    await asyncio.gather(*((a if i % 2 else b).ok("PUT", "/comments/like",
                                                  {"post_id": post_id, "comment_id": c, "user_id": u},
                                                  json={"like": True})
                           for i, u in enumerate(users[:10]) for c in comment_ids))
    assert (await a.ok("GET", "/getlike", {"post_id": post_id}))["like"] == 50
    assert (await b.ok("GET", "/getlike", {"post_id": post_id}))["like"] == 50
    # a multi-key read spanning hash slots on several masters
    likes = await b.ok("GET", "/comments/getlike", json={"comment_ids": comment_ids + [12345]})
    assert likes == {"likes": [10] * 6 + [0]}


async def test_comments_delete_and_clean_up_across_replicas(apis, db):
    a, b = apis
    post_id = await a.publish("owner")
    root = await a.comment(post_id)
    reply = await b.reply(post_id, root, root)
    await b.ok("PUT", "/comments/like", {"post_id": post_id, "comment_id": reply, "user_id": "x"}, json={"like": True})
    await a.ok("PUT", "/like", {"post_id": post_id, "user_id": "x"}, json={"like": True})
    await b.ok("DELETE", "/delete", {"post_id": post_id, "user_id": "owner"})
    expect(await a.call("GET", "/getinfo", {"post_id": post_id}), 10006)

    async def cleaned():
        left = await db.fetchval(
            f'SELECT (SELECT count(*) FROM "{a.svc}_post_comment_info" WHERE post_id = $1)'
            f' + (SELECT count(*) FROM "{a.svc}_post_like" WHERE post_id = $1)'
            f' + (SELECT count(*) FROM "{a.svc}_comment_like" WHERE post_id = $1)', post_id)
        return left == 0
    assert await eventually(cleaned, timeout=20)
    assert (await a.ok("GET", "/getlike", {"post_id": post_id}))["like"] == 0
