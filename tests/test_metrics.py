"""GET /metrics (counters that move by exactly what was done, histograms that add up, labels from
fixed tables only, a bearer token, several workers in one scrape), X-Request-ID, JSON logs."""
import asyncio
import os
import pathlib
import signal
import subprocess
import sys
import time

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

import im_backend
from conftest import ROOT, Server, app_config, eventually, free_port, redis_client, svc_name

SECRET = "W7K8pJ3aQv2LcXgH"
TOKEN = "scrape-token-0123456789"
PREFIX = "/api/v1/posts"


def parse(text: str) -> dict[tuple, float]:
    """Every sample of a scrape: (sample name, sorted labels) -> value, read by prometheus-client's parser."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def scrape(client: httpx.AsyncClient, token: str = TOKEN) -> dict[tuple, float]:
    response = await client.get("/metrics", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(response.text)


def delta(after: dict, before: dict, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


@pytest.fixture(scope="module")
def metrics_server(workdir, backing):
    """Its own server (no other test's traffic), a bearer token, a near cache that keeps entries for a while."""
    svc = svc_name("m")
    config = app_config(backing, {svc: SECRET}, metrics={"token": TOKEN}, cache={"near_ttl": 30})
    srv = Server(workdir / "metrics-server", config).start()
    yield srv
    srv.stop()


@pytest.fixture
async def mclient(metrics_server):
    async with httpx.AsyncClient(base_url=metrics_server.url, timeout=30) as http:
        yield http


def auth(svc: str = svc_name("m"), secret: str = SECRET, **more) -> dict:
    return {"svc": svc, "appKey": im_backend.encrypt_appkey(secret), **more}


# --- the counters -------------------------------------------------------------------------------------------------

async def test_counters_move_by_exactly_the_requests_made(mclient, metrics_server, backing):
    svc = svc_name("m")
    before = await scrape(mclient)
    post_id = (await mclient.post(PREFIX + "/publish", params=auth(),
                                  data={"author": "a", "content": "c"})).json()["data"]["post_id"]
    for _ in range(2):  # from PostgreSQL (a miss), then from this process's memory
        assert (await mclient.get(PREFIX + "/getinfo", params=auth(post_id=post_id))).json()["code"] == 200
    redis = redis_client(backing["cache"])
    await redis.set(im_backend.post_like_key(svc, post_id), 7)  # in Redis only: a Redis hit
    await redis.aclose()
    assert (await mclient.get(PREFIX + "/getlike", params=auth(post_id=post_id))).json()["data"] == {"like": 7}
    assert (await mclient.get(PREFIX + "/getinfo", params=auth(post_id=post_id + 1))).json()["code"] == 10006
    assert (await mclient.get(PREFIX + "/getinfo", params=auth(post_id="abc"))).status_code == 400
    assert (await mclient.get(PREFIX + f"/no/such/{post_id}")).status_code == 404
    assert (await mclient.delete(PREFIX + "/getinfo")).status_code == 405
    # authentication failures, one of each reason
    expired = im_backend.encrypt_appkey(SECRET, int(time.time()) - 100)
    for params in ({"svc": svc}, {"svc": "nosuch", "appKey": "00" * 20}, {"svc": "../../etc", "appKey": "00" * 20},
                   {"svc": svc, "appKey": "00" * 20}, {"svc": svc, "appKey": expired}):
        assert (await mclient.get(PREFIX + "/getlist", params=params)).json()["code"] == 400
    after = await scrape(mclient)

    requests = "im_requests_total"
    assert delta(after, before, requests, svc=svc, route=PREFIX + "/publish", code="200") == 1
    assert delta(after, before, requests, svc=svc, route=PREFIX + "/getinfo", code="200") == 2
    assert delta(after, before, requests, svc=svc, route=PREFIX + "/getinfo", code="10006") == 1
    assert delta(after, before, requests, svc=svc, route=PREFIX + "/getinfo", code="400") == 1
    assert delta(after, before, requests, svc=svc, route=PREFIX + "/getlike", code="200") == 1
    assert delta(after, before, requests, svc="none", route="unmatched", code="404") == 1
    assert delta(after, before, requests, svc="none", route=PREFIX + "/getinfo", code="405") == 1
    assert delta(after, before, requests, svc=svc, route=PREFIX + "/getlist", code="400") == 3
    assert delta(after, before, requests, svc="unknown", route=PREFIX + "/getlist", code="400") == 2
    assert delta(after, before, requests, svc="none", route="/metrics", code="200") == 1  # the first scrape

    reads = "im_cache_reads_total"
    assert delta(after, before, reads, tier="db") == 2  # the first getinfo, the unknown post
    assert delta(after, before, reads, tier="near") == 1
    assert delta(after, before, reads, tier="redis") == 1

    failures = "im_auth_failures_total"
    assert delta(after, before, failures, svc=svc, reason="missing") == 1
    assert delta(after, before, failures, svc="unknown", reason="unknown-service") == 2
    assert delta(after, before, failures, svc=svc, reason="bad-appkey") == 1
    assert delta(after, before, failures, svc=svc, reason="expired") == 1

    duration = "http_server_request_duration_seconds_count"
    assert delta(after, before, duration, method="GET", route=PREFIX + "/getinfo", status="200") == 2
    assert delta(after, before, duration, method="GET", route=PREFIX + "/getinfo", status="500") == 1
    assert delta(after, before, duration, method="DELETE", route=PREFIX + "/getinfo", status="405") == 1
    assert delta(after, before, duration, method="GET", route="unmatched", status="404") == 1
    # 429 (rate limits) is not built yet: im_ratelimited_total is declared, see test_producers_for_other_sections


async def test_histogram_buckets_add_up_and_labels_come_from_fixed_tables(mclient, metrics_server):
    await mclient.get(PREFIX + "/getlist", params=auth())
    text = (await mclient.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    histogram = families["http_server_request_duration_seconds"]
    assert histogram.type == "histogram"
    series: dict[tuple, dict] = {}
    for sample in histogram.samples:
        labels = {k: v for k, v in sample.labels.items() if k != "le"}
        entry = series.setdefault(tuple(sorted(labels.items())), {"buckets": []})
        if sample.name.endswith("_bucket"):
            entry["buckets"].append((float(sample.labels["le"]), sample.value))
        else:
            entry[sample.name.rsplit("_", 1)[1]] = sample.value
    assert len(series) >= 2
    for labels, entry in series.items():
        buckets = sorted(entry["buckets"])
        counts = [count for _, count in buckets]
        assert counts == sorted(counts), labels  # cumulative
        assert buckets[-1][0] == float("inf") and counts[-1] == entry["count"] > 0, labels
        assert 0 < entry["sum"] < 60 * entry["count"], labels
        assert len(buckets) == len(im_backend.DURATION_BUCKETS) + 1
    routes, svcs = set(im_backend.ROUTE_LABELS) | {"unmatched"}, {svc_name("m"), "unknown", "none"}
    for family in families.values():
        for sample in family.samples:
            assert sample.labels.get("route", PREFIX + "/getlist") in routes, sample
            assert sample.labels.get("svc", "none") in svcs, sample
    for name in ("im_requests", "im_cache_reads", "im_auth_failures", "im_ratelimited", "im_webhook_deliveries",
                 "im_config_reloads", "im_events_pending", "im_cleanup_queue_depth", "im_db_pool_connections"):
        assert name in families, name  # declared, with HELP and TYPE
    assert families["im_requests"].type == "counter" and families["im_db_pool_connections"].type == "gauge"
    pool = {s.labels["state"]: s.value for s in families["im_db_pool_connections"].samples}
    assert set(pool) == {"idle", "used"} and pool["idle"] + pool["used"] >= 1
    depths = {s.labels["svc"]: s.value for s in families["im_cleanup_queue_depth"].samples}
    assert depths == {svc_name("m"): 0}


async def test_cleanup_queue_depth_counts_waiting_jobs(mclient, metrics_server, db):
    svc = svc_name("m")
    queue = lambda statement: im_backend.sql(svc, statement)  # noqa: E731
    ids = [r["id"] for r in await db.fetch(queue("INSERT INTO {cleanup} (kind, target_id) VALUES ('comment', 0), "
                                                 "('comment', 0) RETURNING id"))]
    try:
        async with db.transaction():  # held, so the clean-up task (SKIP LOCKED) leaves them queued meanwhile
            await db.execute(queue("SELECT id FROM {cleanup} WHERE id = ANY($1::bigint[]) FOR UPDATE"), ids)
            assert value(await scrape(mclient), "im_cleanup_queue_depth", svc=svc) == 2
    finally:
        await db.execute(queue("DELETE FROM {cleanup} WHERE id = ANY($1::bigint[])"), ids)
    assert value(await scrape(mclient), "im_cleanup_queue_depth", svc=svc) == 0


async def test_metrics_need_the_bearer_token(mclient):
    for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": TOKEN},
                    {"Authorization": f"Basic {TOKEN}"}):
        response = await mclient.get("/metrics", headers=headers)
        assert response.status_code == 401, headers
        assert response.json() == {"code": 401, "msg": "unauthorized", "data": None}
        assert response.headers["www-authenticate"].startswith("Bearer")
    assert (await mclient.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})).status_code == 200


def test_producers_for_other_sections():
    """The functions other sections call (rate limits, webhooks, events) reach the scrape, labels bounded."""
    metrics = im_backend.Metrics()
    config = im_backend.parse_app_config(f"svc: [{{name: s1, secret: {SECRET}}}]\n")
    metrics.configure(config)
    metrics.ratelimited("s1")
    metrics.ratelimited("s1")
    metrics.ratelimited("made-up-by-a-caller")
    metrics.webhook_delivery("s1", "delivered")
    metrics.webhook_delivery("s1", "an arbitrary string")
    metrics.events_pending("s1", 5)
    metrics.config_reload("ok")
    metrics.cache_reads[im_backend.TIER_REDIS] += 3
    metrics.flush(None)
    metrics.cache_reads[im_backend.TIER_REDIS] += 1
    metrics.flush(None)
    samples = parse(im_backend.prom.generate_latest(metrics.registry).decode())
    assert value(samples, "im_ratelimited_total", svc="s1") == 2
    assert value(samples, "im_ratelimited_total", svc="unknown") == 1
    assert value(samples, "im_webhook_deliveries_total", svc="s1", result="delivered") == 1
    assert value(samples, "im_webhook_deliveries_total", svc="s1", result="other") == 1
    assert value(samples, "im_events_pending", svc="s1") == 5
    assert value(samples, "im_config_reloads_total", result="ok") == 1
    assert value(samples, "im_cache_reads_total", tier="redis") == 4
    assert value(samples, "im_cache_reads_total", tier="db") == 0


def test_new_configuration_keys_are_validated():
    base = f"svc: [{{name: s1, secret: {SECRET}}}]\n"
    config = im_backend.parse_app_config(base)
    assert (config.log.format, config.metrics.enabled, config.metrics.token) == ("text", True, "")
    config = im_backend.parse_app_config(base + f"log: {{format: json}}\nmetrics: {{enabled: false, token: {TOKEN}}}\n")
    assert (config.log.format, config.metrics.enabled, config.metrics.token) == ("json", False, TOKEN)
    for bad in ("log: {format: xml}", "metrics: {token: short}", "metrics: {token: 'has a space in it 0123'}",
                "metrics: {enabled: maybe}", "metrics: [1]"):
        with pytest.raises(im_backend.ConfigError):
            im_backend.parse_app_config(base + bad + "\n")


async def test_metrics_switch_and_token_reload(workdir, backing):
    svc = svc_name("ms")
    srv = Server(workdir / "metrics-switch", app_config(backing, {svc: SECRET})).start()
    try:
        async with httpx.AsyncClient(base_url=srv.url, timeout=10) as client:
            assert (await client.get("/metrics")).status_code == 200  # no token configured: open
            srv.write_config("metrics: {token: short}\n" + _yaml(app_config(backing, {svc: SECRET})))
            rejected = lambda: _scraped(client, "im_config_reloads_total", result="rejected")  # noqa: E731
            assert await eventually(rejected, timeout=10)
            srv.write_config(app_config(backing, {svc: SECRET}, metrics={"token": TOKEN}))
            assert await eventually(lambda: _status(client, "/metrics", 401), timeout=10)
            samples = await scrape(client)
            assert value(samples, "im_config_reloads_total", result="ok") == 1
            assert value(samples, "im_config_reloads_total", result="rejected") == 1
            srv.write_config(app_config(backing, {svc: SECRET}, metrics={"enabled": False}, log={"format": "json"}))
            assert await eventually(lambda: _status(client, "/metrics", 404), timeout=10)
            assert (await client.get("/healthz")).status_code == 200
        reloaded = [line for line in srv.log().splitlines() if "configuration reloaded" in line]
        assert len(reloaded) == 2 and not reloaded[0].startswith("{")  # text until log.format changed to json
        assert orjson.loads(reloaded[-1])["logger"] == "im_backend"
    finally:
        srv.stop()


def _yaml(config: dict) -> str:
    import yaml

    return yaml.safe_dump(config)


async def _status(client: httpx.AsyncClient, path: str, status: int) -> bool:
    return (await client.get(path)).status_code == status


async def _scraped(client: httpx.AsyncClient, name: str, **labels: str) -> float:
    response = await client.get("/metrics")
    return response.status_code == 200 and value(parse(response.text), name, **labels)


# --- request ids --------------------------------------------------------------------------------------------------

async def test_request_ids_echoed_generated_and_logged(mclient, metrics_server):
    given = "trace-0A.b_c:d-" + "x" * 100
    post_id = (await mclient.post(PREFIX + "/publish", params=auth(), data={"author": "a", "content": "c"},
                                  headers={"X-Request-ID": "publish-1"})).json()["data"]["post_id"]
    response = await mclient.delete(PREFIX + "/delete", params=auth(post_id=post_id, user_id="a"),
                                    headers={"X-Request-ID": given})
    assert response.json()["code"] == 200 and response.headers["x-request-id"] == given
    line = next(line for line in metrics_server.log().splitlines() if f"deleted post {svc_name('m')}/{post_id}" in line)
    assert line.endswith(f"request_id={given}")
    # every response carries one, new ones are unique; errors too
    ids = set()
    for path in ("/healthz", "/nope", PREFIX + "/getinfo", "/openapi.json", "/metrics"):
        ids.add((await mclient.get(path)).headers["x-request-id"])
    assert len(ids) == 5 and all(im_backend.SANE_REQUEST_ID.fullmatch(rid.encode()) for rid in ids)
    # hostile ones are replaced
    for hostile in ("x" * 129, "a b", "quote\"", "semi;colon", "<script>", "tab\there", "é"):
        rid = (await mclient.get("/healthz", headers={"X-Request-ID": hostile.encode("utf-8")})).headers["x-request-id"]
        assert rid != hostile and im_backend.SANE_REQUEST_ID.fullmatch(rid.encode()), hostile


def test_request_id_checks_what_reaches_the_application():
    sane = b"Abc-123_x.y:z"
    assert im_backend.request_id({"headers": [(b"x-request-id", sane)]}) == sane
    assert im_backend.request_id({"headers": [(b"x-request-id", b"x" * 128)]}) == b"x" * 128
    new_ids = {im_backend.request_id({"headers": [(b"x-request-id", hostile)]})
               for hostile in (b"x" * 129, b"", b"abc\x00", b"abc\x01def", b"abc\x7f", b"\x1b[31mred", b"a\r\nb",
                               b"caf\xc3\xa9", b"a/b", b"a b")}
    new_ids.add(im_backend.request_id({"headers": []}))
    assert len(new_ids) == 11 and all(im_backend.SANE_REQUEST_ID.fullmatch(rid) for rid in new_ids)


async def test_control_characters_in_request_ids_are_replaced(metrics_server):
    """Raw bytes, as no well-behaved client would send them (uvicorn's parser may refuse them first: 400)."""
    for hostile in (b"abc\x01def", b"abc\x7f", b"\x1b[31mred"):
        reader, writer = await asyncio.open_connection("127.0.0.1", metrics_server.port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Request-ID: " + hostile + b"\r\nConnection: close\r\n\r\n")
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(65536), 10)
        writer.close()
        head = answer.split(b"\r\n\r\n", 1)[0].lower()
        if not head.startswith(b"http/1.1 200"):  # refused by the HTTP parser before reaching the application
            assert head.startswith(b"http/1.1 400"), head
            continue
        rid = next(line.split(b": ", 1)[1] for line in head.split(b"\r\n") if line.startswith(b"x-request-id:"))
        assert hostile.lower() not in rid and im_backend.SANE_REQUEST_ID.fullmatch(rid), head


# --- JSON logs ----------------------------------------------------------------------------------------------------

def start_cli(directory: pathlib.Path, config: dict, *argv: str, env: dict | None = None) -> tuple:
    """`python im_backend.py -conf ...` as the container runs it; returns (process, url, log path)."""
    srv = Server(directory, config)  # writes boot.yaml and app.yaml
    port = free_port()
    log_path = directory / "cli.log"
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen([sys.executable, "im_backend.py", "-conf", str(srv.boot), "--host", "127.0.0.1",
                                    "--port", str(port), *argv], cwd=ROOT, env=dict(os.environ, **(env or {})),
                                   stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, log_path.read_text()
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return process, url, log_path
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop(process)
    raise RuntimeError("server did not start:\n" + log_path.read_text())


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def test_json_logs_parse_line_by_line(workdir, backing):
    svc = svc_name("j")
    config = app_config(backing, {svc: SECRET}, log={"format": "json"})
    process, url, log_path = start_cli(workdir / "json-logs", config)  # with the access log
    try:
        post_id = httpx.post(url + PREFIX + "/publish", params=auth(svc), data={"author": "a", "content": "c"},
                             timeout=10).json()["data"]["post_id"]
        httpx.delete(url + PREFIX + "/delete", params=auth(svc, post_id=post_id, user_id="a"),
                     headers={"X-Request-ID": "json-delete-1"}, timeout=10)
        httpx.get(url + "/nope", headers={"X-Request-ID": "json-404"}, timeout=10)
    finally:
        stop(process)
    lines = log_path.read_text().splitlines()
    entries = [orjson.loads(line) for line in lines]  # every line, from the first to the last
    assert all({"time", "level", "logger", "message"} <= set(entry) for entry in entries)
    deleted = [e for e in entries if f"deleted post {svc}/{post_id}" in e["message"]]
    assert len(deleted) == 1 and deleted[0]["request_id"] == "json-delete-1"
    access = [e for e in entries if e["logger"] == "uvicorn.access" and "/nope" in e["message"]]
    assert len(access) == 1 and access[0]["request_id"] == "json-404"
    assert any(e["message"].startswith("im_backend ready") for e in entries)


# --- several workers ----------------------------------------------------------------------------------------------

def test_two_workers_one_scrape_shows_the_total(workdir, backing):
    svc = svc_name("w")
    metrics_dir = workdir / "multiproc"
    metrics_dir.mkdir()
    (metrics_dir / "counter_999999.db").write_bytes(b"left by an earlier run")
    process, url, _ = start_cli(workdir / "two-workers", app_config(backing, {svc: SECRET}), "--workers", "2",
                                "--no-access-log", env={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)})
    try:
        assert not (metrics_dir / "counter_999999.db").exists()  # a fresh directory at each start
        workers, sent = set(), 0
        deadline = time.monotonic() + 30
        while (len(workers) < 2 or sent < 40) and time.monotonic() < deadline:
            with httpx.Client(base_url=url, timeout=10) as client:  # a new connection: any worker may take it
                response = client.get(PREFIX + "/getlist", params=auth(svc))
            assert response.json()["code"] == 200
            workers.add(response.headers["x-request-id"].split("-")[0])  # generated ids start with the process's
            sent += 1
        assert len(workers) == 2, "the requests all went to one worker"

        def total(scraper: httpx.Client) -> dict:
            samples = parse(scraper.get("/metrics").text)
            return samples if value(samples, "im_requests_total", svc=svc, route=PREFIX + "/getlist",
                                    code="200") == sent else {}
        # one connection, so one worker answers every scrape: the other one's counts come through its files
        with httpx.Client(base_url=url, timeout=10) as scraper:
            deadline = time.monotonic() + 10
            while not (samples := total(scraper)) and time.monotonic() < deadline:
                time.sleep(0.3)
        assert samples, f"one scrape never showed all {sent} requests"
        assert value(samples, "http_server_request_duration_seconds_count", method="GET",
                     route=PREFIX + "/getlist", status="200") == sent
        pool = value(samples, "im_db_pool_connections", state="idle") + value(samples, "im_db_pool_connections",
                                                                              state="used")
        assert pool == 2 * im_backend.DbConfig.min_conns  # both workers' pools (sequential requests: no growth)

        # a worker killed outright: uvicorn starts another; the dead one's pool leaves the sum, its counts stay
        killed = int(next(metrics_dir.glob("gauge_livesum_*.db")).stem.rsplit("_", 1)[1])
        os.kill(killed, signal.SIGKILL)
        with httpx.Client(base_url=url, timeout=10) as scraper:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                samples = parse(scraper.get("/metrics").text)
                pools = value(samples, "im_db_pool_connections", state="idle") + value(
                    samples, "im_db_pool_connections", state="used")
                live = {int(p.stem.rsplit("_", 1)[1]) for p in metrics_dir.glob("gauge_livesum_*.db")}
                if killed not in live and len(live) == 2 and pools == 2 * im_backend.DbConfig.min_conns:
                    break
                time.sleep(0.3)
            else:
                raise AssertionError(f"pool sum {pools}, workers with gauges {live}, killed {killed}")
        assert value(samples, "im_requests_total", svc=svc, route=PREFIX + "/getlist", code="200") == sent
    finally:
        stop(process)


async def test_request_id_does_not_outlive_the_request():
    """A host that calls the application in a task of its own does not see our id in its later log lines."""
    app, sent = im_backend.App("/nonexistent"), []

    async def send(message: dict) -> None:
        sent.append(message)

    await app.handle_http({"type": "http", "method": "GET", "path": "/healthz",
                           "headers": [(b"x-request-id", b"in-process-1")]}, None, send)
    assert dict(sent[0]["headers"])[b"x-request-id"] == b"in-process-1"
    assert im_backend.REQUEST_ID.get() is None


def test_compose_runs_prometheus_scraping_the_app():
    import yaml

    compose = yaml.safe_load((ROOT / "docker-compose.yaml").read_text())
    prometheus = compose["services"]["prometheus"]
    mount = next(v for v in prometheus["volumes"] if v.endswith(":/etc/prometheus/prometheus.yml:ro"))
    config = yaml.safe_load((ROOT / mount.split(":")[0]).read_text())
    job = next(job for job in config["scrape_configs"] if job["job_name"] == "im_backend")
    assert job["metrics_path"] == im_backend.METRICS_PATH
    app_port = compose["services"]["app"]["environment"]["IM_PORT"]
    assert job["static_configs"][0]["targets"] == [f"app:{app_port}"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]


def test_dashboard_and_readme_queries_name_real_series():
    import json
    import re

    metrics = im_backend.Metrics()
    declared = {name for collector in metrics.registry._collector_to_names for name in
                metrics.registry._collector_to_names[collector]} | {"im_cleanup_queue_depth"}
    dashboard = json.loads((ROOT / "configs" / "grafana-dashboard.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    readme = (ROOT / "README.md").read_text()
    exprs += re.findall(r"```promql\n(.*?)```", readme, re.S)
    used = {name for expr in exprs for name in re.findall(r"\b(?:im|http_server)_[a-z_]+", expr)}
    assert len(used) >= 9 and used <= declared, used - declared


def test_made_up_paths_methods_and_services_keep_memory_bounded():
    metrics = im_backend.Metrics()
    metrics.configure(im_backend.parse_app_config(f"svc: [{{name: s1, secret: {SECRET}}}]\n"))
    body = im_backend.error_envelope(im_backend.Err.NOT_FOUND)
    for i in range(500):
        metrics.record("GET", f"/x/{i}", 404, body, None, 0.001)
        metrics.record(f"M{i}", PREFIX + "/getinfo", 405, body, None, 0.001)
        metrics.record("GET", PREFIX + "/getinfo", 400, b"{}", f"svc{i}", 0.001)
        metrics.record("GET", PREFIX + "/getinfo", 200, b"{}", "s1", 0.001)
    assert len(metrics._cells) == 4 and len(metrics._raw) == 1
    assert sorted(key[-1] for key in metrics._cells) == ["none", "none", "s1", "unknown"]


def test_the_prometheus_seam_refuses_an_untested_prometheus_client(monkeypatch):
    real = im_backend.importlib.metadata.version
    monkeypatch.setattr(im_backend.importlib.metadata, "version",
                        lambda dist: "9.0.0" if dist == "prometheus-client" else real(dist))
    with pytest.raises(im_backend.UntestedVersion, match=r"^prometheus-client 9\.0\.0 is installed, but "
                                                         r"PrometheusSeam .* only"):
        im_backend.Metrics()
    monkeypatch.undo()
    im_backend.PrometheusSeam.check_version()  # the pinned version passes
