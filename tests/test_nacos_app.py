"""The server with its configuration in Nacos: a fake Nacos speaking the real gRPC protocol to the real SDK."""
import asyncio

import httpx
import yaml

import im_backend
from conftest import SECRET, Server, ServerFactory, app_config, authenticates, eventually, negate, svc_name
from fake_nacos import FakeNacos

NAMESPACE, GROUP, DATA_ID = "im", "dev", "app"


def nacos_server(make_server: ServerFactory, name: str, fake: FakeNacos) -> Server:
    """A server (not started yet) whose bootstrap file names the fake Nacos."""
    srv = make_server(name, {"svc": []}, start=False)
    srv.boot.write_text(yaml.safe_dump({"ipaddr": "127.0.0.1", "port": fake.port, "namespaceid": NAMESPACE,
                                        "group": GROUP, "dataid": DATA_ID}))
    return srv


async def test_configuration_from_nacos_with_run_time_changes(make_server, workdir, backing):
    first, added = svc_name("n1"), svc_name("n2")
    fake = FakeNacos()
    await fake.start()
    fake.publish(DATA_ID, GROUP, yaml.safe_dump(app_config(backing, {first: SECRET})), tenant=NAMESPACE)
    srv = nacos_server(make_server, "nacos-run", fake)
    srv.start(wait=False, IM_STATE_DIR=str(workdir / "nacos-state"))
    try:
        await srv.wait_ready_async()
        assert await authenticates(srv.url, first)
        assert "ConfigQueryRequest" in fake.requests_seen
        # a new service pushed at run time authenticates (and gets its tables)
        fake.publish(DATA_ID, GROUP, yaml.safe_dump(app_config(backing, {first: SECRET, added: SECRET})),
                     tenant=NAMESPACE)
        assert await eventually(lambda: authenticates(srv.url, added), timeout=20)
        async with httpx.AsyncClient(timeout=5) as client:
            response = await client.post(srv.url + "/api/v1/posts/publish", data={"author": "a", "content": "b"},
                                         params={"svc": added, "appKey": im_backend.encrypt_appkey(SECRET)})
            assert response.json()["code"] == 200
        # an invalid change is rejected, the old configuration stays
        fake.publish(DATA_ID, GROUP, "svc:\n  - name: 'NOT VALID'\n    secret: x\n", tenant=NAMESPACE)
        assert await eventually(lambda: "rejected the new configuration" in srv.log(), timeout=20)
        assert await authenticates(srv.url, added)
        # a removed service stops authenticating
        fake.publish(DATA_ID, GROUP, yaml.safe_dump(app_config(backing, {added: SECRET})), tenant=NAMESPACE)
        assert await eventually(lambda: negate(authenticates(srv.url, first)), timeout=20)
        # Nacos restarts: later changes still arrive
        await fake.stop()
        await asyncio.sleep(1)
        await fake.start()
        fake.publish(DATA_ID, GROUP, yaml.safe_dump(app_config(backing, {first: SECRET, added: SECRET})),
                     tenant=NAMESPACE)
        assert await eventually(lambda: authenticates(srv.url, first), timeout=30)
    finally:
        srv.stop()
        await fake.stop()
    assert (workdir / "nacos-state" / f".{DATA_ID}.last-good.yaml").exists()


async def test_nacos_down_at_start_up_uses_the_last_good_configuration(make_server, workdir, backing):
    svc, later = svc_name("n3"), svc_name("n4")
    state = workdir / "nacos-state-2"
    state.mkdir()
    (state / f".{DATA_ID}.last-good.yaml").write_text(yaml.safe_dump(app_config(backing, {svc: SECRET})))
    fake = FakeNacos()  # not started: Nacos is down
    srv = nacos_server(make_server, "nacos-down", fake)
    srv.start(wait=False, IM_STATE_DIR=str(state))
    try:
        await srv.wait_ready_async()
        assert await authenticates(srv.url, svc)
        assert "last-good configuration" in srv.log()
        await fake.start()  # Nacos comes up with a newer configuration: the server picks it up
        fake.publish(DATA_ID, GROUP, yaml.safe_dump(app_config(backing, {svc: SECRET, later: SECRET})),
                     tenant=NAMESPACE)
        assert await eventually(lambda: authenticates(srv.url, later), timeout=40)
    finally:
        srv.stop()
        await fake.stop()


async def test_nacos_down_and_no_saved_configuration_fails_clearly(make_server, workdir, backing):
    fake = FakeNacos()
    srv = nacos_server(make_server, "nacos-none", fake)
    srv.start(wait=False, IM_STATE_DIR=str(workdir / "nacos-empty-state"))
    assert await eventually(lambda: srv.process.poll() is not None, timeout=60)
    assert srv.process.returncode != 0
    assert f"cannot load configuration data id '{DATA_ID}'" in srv.log()
    assert f"127.0.0.1:{fake.port}" in srv.log()
