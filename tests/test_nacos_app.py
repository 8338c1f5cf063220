"""The server with its configuration in Nacos: a fake Nacos speaking the real gRPC protocol to the real SDK."""
import asyncio
import time

import httpx
import yaml

import im_backend
from conftest import Server, app_config, svc_name
from fake_nacos import FakeNacos

SECRET = "W7K8pJ3aQv2LcXgH"
NAMESPACE, GROUP, DATA_ID = "im", "dev", "app"


async def authenticates(url: str, svc: str) -> bool:
    async with httpx.AsyncClient(timeout=5) as client:
        response = await client.get(url + "/api/v1/posts/getlist",
                                    params={"svc": svc, "appKey": im_backend.encrypt_appkey(SECRET)})
        return response.json()["code"] == 200


async def wait_until(check, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return True
        await asyncio.sleep(0.2)
    return False


def nacos_server(directory, fake: FakeNacos) -> Server:
    srv = Server(directory, {"svc": []})
    srv.boot.write_text(yaml.safe_dump({"ipaddr": "127.0.0.1", "port": fake.port, "namespaceid": NAMESPACE,
                                        "group": GROUP, "dataid": DATA_ID}))
    return srv


async def test_configuration_from_nacos_with_run_time_changes(workdir, backing):
    first, added = svc_name("n1"), svc_name("n2")
    fake = FakeNacos()
    await fake.start()
    fake.publish(DATA_ID, GROUP, yaml.safe_dump(app_config(backing, {first: SECRET})), tenant=NAMESPACE)
    srv = nacos_server(workdir / "nacos-run", fake)
    srv.start(wait=False, IM_STATE_DIR=str(workdir / "nacos-state"))
    try:
        await srv.wait_ready_async()
        assert await authenticates(srv.url, first)
        assert "ConfigQueryRequest" in fake.requests_seen
        # a new service pushed at run time authenticates (and gets its tables)
        fake.publish(DATA_ID, GROUP, yaml.safe_dump(app_config(backing, {first: SECRET, added: SECRET})),
                     tenant=NAMESPACE)
        assert await wait_until(lambda: authenticates(srv.url, added))
        async with httpx.AsyncClient(timeout=5) as client:
            response = await client.post(srv.url + "/api/v1/posts/publish", data={"author": "a", "content": "b"},
                                         params={"svc": added, "appKey": im_backend.encrypt_appkey(SECRET)})
            assert response.json()["code"] == 200
        # an invalid change is rejected, the old configuration stays
        fake.publish(DATA_ID, GROUP, "svc:\n  - name: 'NOT VALID'\n    secret: x\n", tenant=NAMESPACE)
        assert await wait_until(lambda: _async("rejected the new configuration" in srv.log()))
        assert await authenticates(srv.url, added)
        # a removed service stops authenticating
        fake.publish(DATA_ID, GROUP, yaml.safe_dump(app_config(backing, {added: SECRET})), tenant=NAMESPACE)
        assert await wait_until(lambda: _not(authenticates(srv.url, first)))
        # Nacos restarts: later changes still arrive
        await fake.stop()
        await asyncio.sleep(1)
        await fake.start()
        fake.publish(DATA_ID, GROUP, yaml.safe_dump(app_config(backing, {first: SECRET, added: SECRET})),
                     tenant=NAMESPACE)
        assert await wait_until(lambda: authenticates(srv.url, first), timeout=30)
    finally:
        srv.stop()
        await fake.stop()
    assert (workdir / "nacos-state" / f".{DATA_ID}.last-good.yaml").exists()


async def test_nacos_down_at_start_up_uses_the_last_good_configuration(workdir, backing):
    svc, later = svc_name("n3"), svc_name("n4")
    state = workdir / "nacos-state-2"
    state.mkdir()
    (state / f".{DATA_ID}.last-good.yaml").write_text(yaml.safe_dump(app_config(backing, {svc: SECRET})))
    fake = FakeNacos()  # not started: Nacos is down
    srv = nacos_server(workdir / "nacos-down", fake)
    srv.start(wait=False, IM_STATE_DIR=str(state))
    try:
        await srv.wait_ready_async()
        assert await authenticates(srv.url, svc)
        assert "last-good configuration" in srv.log()
        await fake.start()  # Nacos comes up with a newer configuration: the server picks it up
        fake.publish(DATA_ID, GROUP, yaml.safe_dump(app_config(backing, {svc: SECRET, later: SECRET})),
                     tenant=NAMESPACE)
        assert await wait_until(lambda: authenticates(srv.url, later), timeout=40)
    finally:
        srv.stop()
        await fake.stop()


async def test_nacos_down_and_no_saved_configuration_fails_clearly(workdir, backing):
    fake = FakeNacos()
    srv = nacos_server(workdir / "nacos-none", fake)
    srv.start(wait=False, IM_STATE_DIR=str(workdir / "nacos-empty-state"))
    try:
        deadline = time.monotonic() + 60
        while srv.process.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert srv.process.returncode not in (None, 0)
        assert f"cannot load configuration data id '{DATA_ID}'" in srv.log()
        assert f"127.0.0.1:{fake.port}" in srv.log()
    finally:
        srv.stop()


async def _async(value):
    return value


async def _not(awaitable):
    return not await awaitable
