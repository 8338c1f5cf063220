"""NacosSource against FakeNacos (a Nacos speaking the real gRPC protocol), through the real nacos-sdk-python."""
from __future__ import annotations

import asyncio
import gc
import logging
import pathlib
import socket

import time

import pytest

from fake_nacos import FakeNacos
from im_backend import ConfigError, NacosSource

NS, GROUP, DATA_ID = "im", "dev", "app"


def boot_for(fake: FakeNacos) -> dict:
    return {"ipaddr": "127.0.0.1", "port": fake.port, "namespaceid": NS, "group": GROUP, "dataid": DATA_ID}


class Changes:
    """Collects on_change calls; wait_for() polls with a bounded deadline."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    async def __call__(self, text: str) -> None:
        self.texts.append(text)

    async def wait_for(self, text: str, timeout: float = 15.0) -> float:
        start = time.monotonic()
        for _ in range(int(timeout / 0.05)):
            if text in self.texts:
                return time.monotonic() - start
            await asyncio.sleep(0.05)
        raise AssertionError(f"on_change({text!r}) not called within {timeout}s; got {self.texts!r}")


@pytest.fixture
async def fake():
    server = FakeNacos()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def sources():
    """Factory for NacosSource objects that are always stopped at the end of the test."""
    made: list[NacosSource] = []

    def make(fake: FakeNacos, last_good: pathlib.Path, **kw) -> NacosSource:
        src = NacosSource(boot_for(fake), last_good, **kw)
        made.append(src)
        return src

    yield make
    for src in made:
        await src.stop()


@pytest.mark.asyncio
async def test_initial_load_and_runtime_change(fake, sources, tmp_path):
    await fake.start()
    fake.publish(DATA_ID, GROUP, "svc: [v1]", tenant=NS)
    changes = Changes()
    src = sources(fake, tmp_path / "last_good.yaml")
    assert await asyncio.wait_for(src.start(changes), 10) == "svc: [v1]"
    assert "ConfigQueryRequest" in fake.requests_seen and "ConnectionSetupRequest" in fake.requests_seen

    fake.publish(DATA_ID, GROUP, "svc: [v2]", tenant=NS)
    await changes.wait_for("svc: [v2]", timeout=8)
    fake.publish(DATA_ID, GROUP, "svc: [v3]", tenant=NS)
    await changes.wait_for("svc: [v3]", timeout=8)
    assert changes.texts == ["svc: [v2]", "svc: [v3]"]
    assert "ConfigChangeNotifyRequest" not in fake.requests_seen  # server->client pushes are not requests
    assert "NotifySubscriberResponse" in fake.requests_seen       # the SDK acked the push on the bi-stream
    assert fake.listeners(DATA_ID, GROUP, NS) == 1
    fake.detect_clients()  # server-initiated request on the bi-stream; the SDK must answer it
    for _ in range(100):
        if "ClientDetectionResponse" in fake.requests_seen:
            break
        await asyncio.sleep(0.05)
    assert "ClientDetectionResponse" in fake.requests_seen

    tmp_dir = pathlib.Path(src._tmp_dir)
    assert tmp_dir.is_dir()
    await src.stop()
    assert not tmp_dir.exists()  # SDK cache and log files are cleaned up
    for _ in range(40):  # the server notices the closed stream
        if not fake.conns:
            break
        await asyncio.sleep(0.05)
    assert fake.conns == {}
    await fake.stop()
    await asyncio.sleep(0.1)
    leftovers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]
    assert leftovers == []  # the SDK client left nothing running


@pytest.mark.asyncio
async def test_unchanged_republish_and_handler_errors(fake, sources, tmp_path, caplog):
    caplog.set_level(logging.ERROR, logger="im_backend")
    await fake.start()
    fake.publish(DATA_ID, GROUP, "a", tenant=NS)
    calls: list[str] = []

    async def on_change(text: str) -> None:
        calls.append(text)
        if text == "bad":
            raise ValueError("rejected")

    src = sources(fake, tmp_path / "lg.yaml")
    assert await src.start(on_change) == "a"
    fake.publish(DATA_ID, GROUP, "a", tenant=NS)  # same content: no call
    fake.publish(DATA_ID, GROUP, "bad", tenant=NS)  # handler raises: logged, source keeps working
    for _ in range(200):  # (published at once after "bad", "good" could replace it before it is pushed)
        if "bad" in calls:
            break
        await asyncio.sleep(0.05)
    fake.publish(DATA_ID, GROUP, "good", tenant=NS)
    for _ in range(200):
        if "good" in calls:
            break
        await asyncio.sleep(0.05)
    assert calls[-1] == "good" and "a" not in calls
    # the handler's error was caught and logged here, with its traceback (the SDK would swallow it silently)
    failures = [r for r in caplog.records if "configuration change handler failed" in r.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info[1].args == ("rejected",)


@pytest.mark.asyncio
async def test_an_untested_sdk_version_is_refused_at_start_up(fake, sources, tmp_path, monkeypatch):
    import importlib.metadata

    import im_backend

    installed = importlib.metadata.version("nacos-sdk-python")
    assert installed in im_backend.NACOS_SDK_TESTED  # requirements-runtime.txt pins a tested version
    monkeypatch.setattr(im_backend, "NACOS_SDK_TESTED", ("0.0.1",))
    src = sources(fake, tmp_path / "lg.yaml")
    with pytest.raises(ConfigError, match=f"nacos-sdk-python {installed} is installed, but the Nacos adapter was "
                                          "tested with 0.0.1 only"):
        await src.start(Changes())
    assert src._client is None and fake.requests_seen == []  # refused before the SDK was even used


@pytest.mark.asyncio
async def test_down_at_startup_uses_last_good(fake, sources, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="im_backend")
    last_good = tmp_path / "last_good.yaml"
    src = sources(fake, last_good, startup_timeout=1.0)
    src.save_last_good("svc: [saved]")
    assert last_good.read_text() == "svc: [saved]"
    assert [p.name for p in tmp_path.iterdir()] == ["last_good.yaml"]  # no temp file left behind
    started = time.monotonic()
    assert await src.start(Changes()) == "svc: [saved]"
    assert time.monotonic() - started < 5
    assert any("last-good" in r.getMessage() and fake.address in r.getMessage() for r in caplog.records)


@pytest.mark.asyncio
async def test_down_at_startup_without_last_good_raises(fake, sources, tmp_path):
    src = sources(fake, tmp_path / "missing.yaml", startup_timeout=1.0)
    started = time.monotonic()
    with pytest.raises(ConfigError, match=f"127.0.0.1:{fake.port}"):
        await src.start(Changes())
    assert time.monotonic() - started < 5
    assert src._client is None and src._tmp_dir is None  # start() cleaned up after itself


@pytest.mark.asyncio
async def test_missing_data_id_uses_last_good_then_picks_it_up(fake, sources, tmp_path):
    await fake.start()
    src = sources(fake, tmp_path / "lg.yaml", startup_timeout=3.0)
    src.save_last_good("saved")
    changes = Changes()
    assert await src.start(changes) == "saved"
    fake.publish(DATA_ID, GROUP, "created", tenant=NS)
    await changes.wait_for("created", timeout=8)


@pytest.mark.asyncio
async def test_nacos_restart_on_same_port(fake, sources, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    await fake.start()
    fake.publish(DATA_ID, GROUP, "v1", tenant=NS)
    changes = Changes()
    src = sources(fake, tmp_path / "lg.yaml")
    assert await src.start(changes) == "v1"
    fake.publish(DATA_ID, GROUP, "v2", tenant=NS)
    await changes.wait_for("v2", timeout=8)

    port = fake.port
    await fake.stop()
    for p in (fake.port, fake.grpc_port):  # both ports really closed
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", p), timeout=1).close()
    fake.publish(DATA_ID, GROUP, "v3-while-down", tenant=NS)  # stored; nobody is connected to be told
    await asyncio.sleep(4)  # long enough for at least one failed SDK reconnect attempt (3 s connect timeout)
    await fake.start()
    assert fake.port == port
    await changes.wait_for("v3-while-down", timeout=15)  # md5 check when the SDK re-listens after reconnect
    fake.publish(DATA_ID, GROUP, "v4", tenant=NS)
    await changes.wait_for("v4", timeout=8)
    assert changes.texts == ["v2", "v3-while-down", "v4"]
    assert fake.requests_seen.count("ConnectionSetupRequest") >= 2
    # the SDK's own chatter stays out of the application's logs: its "config" logger does not propagate, and
    # the reconnect errors it logs on the root logger are filtered out (pytest itself hooks "config" too)
    assert logging.getLogger("config").propagate is False
    assert [r for r in caplog.records if r.name == "root" and "/v2/nacos/" in r.pathname] == []

    await src.stop()
    await fake.stop()
    await asyncio.sleep(0.1)
    leftovers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]
    assert leftovers == []  # includes gRPC's feeder task of the stream the restart broke


@pytest.mark.asyncio
async def test_down_at_startup_then_nacos_comes_up(fake, sources, tmp_path):
    src = sources(fake, tmp_path / "lg.yaml", startup_timeout=1.0)
    src.save_last_good("saved")
    changes = Changes()
    assert await src.start(changes) == "saved"
    fake.publish(DATA_ID, GROUP, "from-nacos", tenant=NS)
    await fake.start()  # while the SDK is still in its start-up connect attempts
    await changes.wait_for("from-nacos", timeout=15)
    fake.publish(DATA_ID, GROUP, "later", tenant=NS)
    await changes.wait_for("later", timeout=8)
    assert changes.texts == ["from-nacos", "later"]


@pytest.mark.asyncio
async def test_long_outage_at_startup_then_nacos_comes_up(fake, sources, tmp_path):
    """Nacos comes up only after the SDK gave up its start-up attempts (~9 s) and went to background reconnect."""
    src = sources(fake, tmp_path / "lg.yaml", startup_timeout=1.0)
    src.save_last_good("saved")
    changes = Changes()
    assert await src.start(changes) == "saved"
    for _ in range(300):  # until our connect task is past the SDK's start-up retries
        if src._task.done():
            break
        await asyncio.sleep(0.05)
    assert src._task.done() and src._task.result() is None
    fake.publish(DATA_ID, GROUP, "from-nacos", tenant=NS)
    await fake.start()
    await changes.wait_for("from-nacos", timeout=15)
    fake.publish(DATA_ID, GROUP, "later", tenant=NS)
    await changes.wait_for("later", timeout=8)
    assert changes.texts == ["from-nacos", "later"]


@pytest.mark.asyncio
async def test_login_when_username_and_password_are_set(tmp_path, caplog):
    """With credentials the SDK logs in over HTTP on the Nacos port (not +1000); here Nacos is down at first."""
    caplog.set_level(logging.WARNING)
    fake = FakeNacos(username="nacos", password="s3cret")
    src = NacosSource(dict(boot_for(fake), username="nacos", password="s3cret"), tmp_path / "lg.yaml",
                      startup_timeout=1.0)
    src.save_last_good("saved")
    changes = Changes()
    try:
        assert await src.start(changes) == "saved"
        fake.publish(DATA_ID, GROUP, "v1", tenant=NS)
        await fake.start()
        await changes.wait_for("v1", timeout=15)
        fake.publish(DATA_ID, GROUP, "v2", tenant=NS)
        await changes.wait_for("v2", timeout=8)
    finally:
        await src.stop()
        await fake.stop()
    assert "HTTP POST /nacos/v1/auth/users/login" in fake.requests_seen
    gc.collect()
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]


@pytest.mark.asyncio
async def test_wrong_password_is_refused(tmp_path):
    fake = FakeNacos(username="nacos", password="s3cret")
    await fake.start()
    fake.publish(DATA_ID, GROUP, "v1", tenant=NS)
    src = NacosSource(dict(boot_for(fake), username="nacos", password="wrong"), tmp_path / "lg.yaml",
                      startup_timeout=2.0)
    try:
        with pytest.raises(ConfigError, match="no last-good"):
            await src.start(Changes())
    finally:
        await src.stop()
        await fake.stop()
    assert "ConfigQueryRequest" not in fake.requests_seen  # the SDK does not even ask without a token
