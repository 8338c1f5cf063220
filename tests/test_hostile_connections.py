"""Hostile connections: header limits, read timeouts, the connection cap, pools that wait instead of
failing, and request smuggling shapes. Black-box: raw sockets on 127.0.0.1 against real server processes
started with `--http im_backend:GuardedHttpProtocol`, configured with short timeouts so the suite stays fast."""
from __future__ import annotations

import asyncio
import json
import os
import re
import resource
import signal
import subprocess
import sys

import psutil
import pytest

import im_backend
from conftest import ROOT, Server, app_config, eventually, free_port, svc_name

SECRET = "W7K8pJ3aQv2LcXgH"
SVC = svc_name("hostile")
REQUEST_TIMEOUT = 10.0  # seconds any single exchange in these tests may take at most (a bound, not a measure)
END = b"\r\n0\r\n\r\n"  # the end of a chunked answer


def _raise_fd_limit(want: int = 8192) -> None:
    """Bursts of 1,000 connections need more descriptors than a 1,024 soft limit (servers started from here
    inherit it, so their default connection cap is sized from it too)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


_raise_fd_limit()


# --- raw HTTP/1.1 -------------------------------------------------------------------------------------------------

def parse_answer(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one answer read to EOF (content-length or chunked)."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                break
            body, rest = body + rest[:size], rest[size + 2:]
        return status, headers, body
    return status, headers, rest[:int(headers.get("content-length", len(rest)))]


async def read_one_answer(reader: asyncio.StreamReader) -> bytes:
    """One whole answer on a kept-alive connection: by Content-Length (the app sends one), else chunked."""
    head = await reader.readuntil(b"\r\n\r\n")
    for line in head.decode("latin-1").split("\r\n")[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            return head + await reader.readexactly(int(value))
    return head + await reader.readuntil(END)


async def read_to_eof(reader: asyncio.StreamReader, timeout: float = REQUEST_TIMEOUT) -> tuple[bytes, bool]:
    """Everything the server sends until it closes; (bytes, closed) — closed False when it kept it open."""
    data = b""
    try:
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(65536):
                data += chunk
    except TimeoutError:
        return data, False
    except (ConnectionResetError, BrokenPipeError):
        pass
    return data, True


async def exchange(port: int, request: bytes, timeout: float = REQUEST_TIMEOUT) -> tuple[bytes, bool]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        return await read_to_eof(reader, timeout)
    finally:
        writer.close()


def get(path: str, *extra_headers: str, close: bool = True) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1", *extra_headers] + (["Connection: close"] if close else [])
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def api_path(route: str, **params: object) -> str:
    query = "&".join(f"{k}={v}" for k, v in {"svc": SVC, "appKey": im_backend.encrypt_appkey(SECRET),
                                                **params}.items())
    return f"/api/v1/posts{route}?{query}"


def envelope(raw: bytes) -> tuple[int, dict[str, str], dict]:
    status, headers, body = parse_answer(raw)
    return status, headers, json.loads(body)


async def publish(port: int, content: str = "hello") -> int:
    body = f"author=alice&content={content}".encode()
    request = (f"POST {api_path('/publish')} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
               f"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    status, _, answer = envelope((await exchange(port, request))[0])
    assert status == 200, answer
    return answer["data"]["post_id"]


def server_rss(server: Server) -> int:
    return psutil.Process(server.process.pid).memory_info().rss


# --- servers ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def guarded(workdir, backing):
    """Short timeouts; no near cache and a Redis pool of 4 connections, so that a burst must queue for Redis."""
    config = app_config(backing, {SVC: SECRET}, server={"header_timeout": 1, "body_timeout": 1},
                        cache={"near_ttl": 0, "pool_size": 4})
    srv = Server(workdir / "hostile-guarded", config).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def tight(workdir, backing):
    """A cap of 20 connections, a 2 s request timeout, one PostgreSQL connection that is waited for 0.3 s."""
    config = app_config(backing, {SVC: SECRET},
                        server={"max_connections": 20, "timeout": 2, "header_timeout": 5, "body_timeout": 5},
                        db={"min_conns": 1, "max_conns": 1, "pool_wait": 0.3})
    srv = Server(workdir / "hostile-tight", config).start()
    yield srv
    srv.stop()


# --- header limits ------------------------------------------------------------------------------------------------

async def test_a_head_within_the_limits_is_served(guarded):
    headers = [f"X-Filler-{i}: {'v' * 150}" for i in range(90)]  # 90 fields, ~15 KiB in all
    raw, closed = await exchange(guarded.port, get("/healthz", *headers))
    assert closed and len(get("/healthz", *headers)) > 14_000
    assert envelope(raw)[0] == 200


async def test_an_oversized_header_is_answered_431_and_closed(guarded):
    raw, closed = await exchange(guarded.port, get("/healthz", "X-Big: " + "a" * 17_000, close=False))
    status, headers, body = envelope(raw)
    assert closed and status == 431 and body == {"code": 431, "msg": "request header fields too large", "data": None}
    assert headers["connection"] == "close"


async def test_too_many_headers_are_answered_431_and_closed(guarded):
    raw, closed = await exchange(guarded.port, get("/healthz", *[f"X-H{i}: v" for i in range(150)], close=False))
    status, _, body = envelope(raw)
    assert closed and status == 431 and body["code"] == 431


async def test_endless_headers_do_not_grow_the_server(guarded):
    """Ten connections each try to stream a 50 MiB header: each is cut after the limit, memory stays flat."""
    await exchange(guarded.port, get("/healthz", "X-Big: " + "a" * 17_000))  # warm the code path up
    before = server_rss(guarded)
    chunk, total = b"a" * 65536, 50 << 20

    async def attack() -> tuple[int, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", guarded.port)
        sent = 0
        try:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
            while sent < total:
                writer.write(chunk)
                await writer.drain()
                sent += len(chunk)
        except (ConnectionResetError, BrokenPipeError):
            pass
        answer, _ = await read_to_eof(reader)
        writer.close()
        return sent, answer

    peak = before

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, server_rss(guarded))
            await asyncio.sleep(0.02)

    sampler = asyncio.ensure_future(sample())
    try:
        results = await asyncio.wait_for(asyncio.gather(*(attack() for _ in range(10))), 60)
    finally:
        sampler.cancel()
    growth = max(peak, server_rss(guarded)) - before
    assert all(sent < total for sent, _ in results), "the server read a whole 50 MiB header"
    assert all(answer == b"" or answer.startswith(b"HTTP/1.1 431") for _, answer in results)
    assert growth < 5 << 20, f"server memory grew by {growth / 2**20:.1f} MiB (at its peak)"
    assert envelope((await exchange(guarded.port, get("/healthz")))[0])[0] == 200


# --- read timeouts ----------------------------------------------------------------------------------------------

async def test_slowloris_is_cut_after_the_header_timeout_while_others_are_served(guarded):
    post_id = await publish(guarded.port)
    port = guarded.port

    async def slowloris() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        try:
            for _ in range(200):  # a byte every 0.2 s, for 40 s at most
                if reader.at_eof() or writer.is_closing():
                    break
                writer.write(b"a")
                await writer.drain()
                try:
                    return (await asyncio.wait_for(reader.read(65536), 0.2)) + (await read_to_eof(reader, 5))[0]
                except TimeoutError:
                    continue
        except (ConnectionResetError, BrokenPipeError):
            return b""
        finally:
            writer.close()
        return b"still open"

    async def silent() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            data, closed = await read_to_eof(reader, 40)
            return data if closed else b"still open"
        finally:
            writer.close()

    async def canary() -> list[int]:
        statuses = []
        for _ in range(20):  # a fresh connection every 0.1 s while the attack runs
            raw, closed = await exchange(port, get(api_path("/getinfo", post_id=post_id)), timeout=REQUEST_TIMEOUT)
            statuses.append(envelope(raw)[0] if closed and raw else 0)
            await asyncio.sleep(0.1)
        return statuses

    attackers = [asyncio.ensure_future(slowloris()) for _ in range(500)]
    quiet = [asyncio.ensure_future(silent()) for _ in range(200)]
    statuses = await canary()
    slow_answers = await asyncio.wait_for(asyncio.gather(*attackers), 60)
    silent_answers = await asyncio.wait_for(asyncio.gather(*quiet), 60)
    assert statuses == [200] * 20
    assert b"still open" not in slow_answers and b"still open" not in silent_answers
    assert all(a == b"" or a.startswith(b"HTTP/1.1 408") for a in slow_answers)
    assert any(a.startswith(b"HTTP/1.1 408") for a in slow_answers)
    status, _, body = envelope(next(a for a in slow_answers if a))
    assert body == {"code": 408, "msg": "request header timeout", "data": None}
    assert silent_answers == [b""] * 200


async def test_keep_alive_requests_and_pipelining_still_work(guarded):
    reader, writer = await asyncio.open_connection("127.0.0.1", guarded.port)
    try:
        for _ in range(3):  # one connection, pauses shorter than the header timeout
            writer.write(get("/healthz", close=False))
            await writer.drain()
            assert (await asyncio.wait_for(read_one_answer(reader), REQUEST_TIMEOUT)).startswith(b"HTTP/1.1 200")
            await asyncio.sleep(0.6)
        writer.write(get("/healthz", close=False) + get("/healthz", close=False) + get("/healthz"))
        await writer.drain()
        answers, closed = await read_to_eof(reader)
        assert closed and answers.count(b"HTTP/1.1 200") == 3
    finally:
        writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", guarded.port)
    try:  # an idle keep-alive connection is closed without a word once the next head is overdue
        writer.write(get("/healthz", close=False))
        await writer.drain()
        data, closed = await read_to_eof(reader)
        assert closed and data.startswith(b"HTTP/1.1 200") and data.count(b"HTTP/1.1") == 1
    finally:
        writer.close()


async def test_a_stalled_body_is_answered_408_and_closed(guarded):
    head = (f"POST {api_path('/publish')} HTTP/1.1\r\nHost: x\r\n"
            "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 1000\r\n\r\nauthor=a").encode()
    raw, closed = await exchange(guarded.port, head)
    status, headers, body = envelope(raw)
    assert closed and status == 408 and headers["connection"] == "close"
    assert body == {"code": 408, "msg": "request body timeout", "data": None}


async def test_an_answer_before_the_body_is_in_closes_the_connection(guarded, tight):
    head = (f"POST {api_path('/publish')} HTTP/1.1\r\nHost: x\r\n"
            "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\nauthor=a")
    # 413 as soon as Content-Length says too much
    raw, closed = await exchange(guarded.port, head.format(10 << 20).encode())
    status, headers, _ = envelope(raw)
    assert closed and status == 413 and headers["connection"] == "close"
    # a client that sends its whole body before reading (most do) still gets the 413: the server reads and drops
    # the rest for a moment instead of resetting the connection under it
    reader, writer = await asyncio.open_connection("127.0.0.1", guarded.port)
    try:
        writer.write(head.format(4 << 20).encode())
        for _ in range(64):
            writer.write(b"x" * 65536)
            await writer.drain()
        raw, closed = await read_to_eof(reader)
    finally:
        writer.close()
    assert closed and envelope(raw)[0] == 413
    # 504: the request timeout (2 s) strikes while the body is still arriving (body_timeout 5 s)
    raw, closed = await exchange(tight.port, head.format(1000).encode())
    status, headers, body = envelope(raw)
    assert closed and status == 504 and headers["connection"] == "close" and body["code"] == 504


# --- the connection cap and pools that wait ----------------------------------------------------------------------

async def test_beyond_the_connection_cap_a_new_connection_gets_503(tight):
    held = []
    try:
        for _ in range(20):  # fill the cap with served, idle keep-alive connections
            reader, writer = await asyncio.open_connection("127.0.0.1", tight.port)
            writer.write(get("/healthz", close=False))
            await writer.drain()
            await asyncio.wait_for(read_one_answer(reader), REQUEST_TIMEOUT)
            held.append(writer)
        raw, closed = await exchange(tight.port, get("/healthz", close=False))
        status, headers, body = envelope(raw)
        assert closed and status == 503 and headers["retry-after"] == "1" and headers["connection"] == "close"
        assert body == {"code": 503, "msg": "service unavailable", "data": None}
    finally:
        for writer in held:
            writer.close()

    async def served() -> bool:
        return envelope((await exchange(tight.port, get("/healthz")))[0])[0] == 200
    assert await eventually(served, timeout=REQUEST_TIMEOUT)


async def test_a_burst_of_1000_connections_gets_answers_not_pool_errors(guarded):
    """1,000 connections at once (90 % reads, 10 % writes) against a Redis pool of 4: requests wait for a
    connection, so every answer is a success (or the capacity 503) and "Too many connections" is never seen."""
    post_id = await publish(guarded.port)
    log_start = len(guarded.log())

    async def one(i: int) -> tuple[int, dict]:
        if i % 10:
            request = get(api_path("/getinfo", post_id=post_id))
        else:
            body = f"author=burst&content=c{i}".encode()
            request = (f"POST {api_path('/publish')} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                       f"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {len(body)}\r\n\r\n"
                       ).encode() + body
        raw, closed = await exchange(guarded.port, request, timeout=30)
        if not raw:
            return 0, {"no answer; closed by the server": closed}
        status, headers, answer = envelope(raw)
        if status == 503:
            assert headers["retry-after"] == "1"
        return status, answer

    async def canary() -> list[int]:  # fresh connections while the burst is on
        statuses = []
        for _ in range(10):
            await asyncio.sleep(0.05)
            statuses.append(envelope((await exchange(guarded.port, get(api_path("/getinfo", post_id=post_id))))[0])[0])
        return statuses

    burst = asyncio.gather(*(one(i) for i in range(1000)))
    statuses = await asyncio.wait_for(canary(), 10 * REQUEST_TIMEOUT)
    answers = await asyncio.wait_for(burst, 90)
    bad = [a for s, a in answers if not (s == 200 and a.get("code") == 200 or s == 503 and a.get("code") == 503)]
    assert bad == [] and statuses == [200] * 10, (bad[:5], len(bad), statuses, guarded.log()[log_start:][-2000:])
    assert sum(s == 200 for s, _ in answers) > 900
    assert "Too many connections" not in guarded.log()[log_start:]


async def test_new_connections_are_accepted_in_batches(tight):
    """A burst waiting in the kernel's accept queue is taken in one batch: every connection of it is open in the
    server before any of them is answered, so the connection cap (20) sees the whole burst at once and refuses
    exactly the connections beyond it. Accepted one per turn of the loop instead, each short request would be
    answered and closed while the next ones were still being accepted, and the cap would hardly refuse any.
    The burst is made deterministic by stopping the server (SIGSTOP) while the clients connect and send; the
    kernel completes their handshakes and keeps the requests; then the server continues (SIGCONT)."""
    cap, burst = 20, 60
    raw, _ = await exchange(tight.port, get("/healthz"))  # the first connection of a process installs the Acceptor
    assert envelope(raw)[0] == 200
    connections = []
    tight.process.send_signal(signal.SIGSTOP)
    try:
        for _ in range(burst):
            reader, writer = await asyncio.open_connection("127.0.0.1", tight.port)
            writer.write(get("/healthz"))  # Connection: close: each served connection ends with its answer
            await writer.drain()
            connections.append((reader, writer))
    finally:
        tight.process.send_signal(signal.SIGCONT)
    try:
        answers = await asyncio.wait_for(asyncio.gather(*(read_to_eof(reader) for reader, _ in connections)),
                                         3 * REQUEST_TIMEOUT)
    finally:
        for _, writer in connections:
            writer.close()
    statuses = [envelope(raw)[0] for raw, _ in answers]
    served, refused = statuses.count(200), statuses.count(503)
    assert (served, refused) == (cap, burst - cap), f"{served} served, {refused} refused: {statuses}"


def test_the_acceptor_reads_a_duplicate_of_the_listening_socket(guarded):
    """uvloop accepts one connection per turn of its loop; the Acceptor reads a duplicate of the listening socket
    to take many at once (what that changes is tested above)."""
    pid = guarded.process.pid
    [listener] = [c for c in psutil.Process(pid).net_connections("tcp")
                  if c.status == psutil.CONN_LISTEN and c.laddr.port == guarded.port]
    inode = os.readlink(f"/proc/{pid}/fd/{listener.fd}")  # socket:[N]
    descriptors = [fd for fd in os.listdir(f"/proc/{pid}/fd") if _readlink(f"/proc/{pid}/fd/{fd}") == inode]
    assert len(descriptors) == 2, descriptors  # uvicorn's and the Acceptor's


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:  # closed meanwhile
        return ""


async def test_a_busy_database_pool_is_waited_for_a_bounded_time(tight, db):
    """The only PostgreSQL connection is held (an update waits on a row lock we hold): a read waits 0.3 s for
    it and answers its own error code, rather than queueing until the request timeout."""
    held, other = await publish(tight.port, "held"), await publish(tight.port, "other")
    update = (f"PUT {api_path('/update', post_id=held, user_id='alice')} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
              "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 9\r\n\r\ncontent=x").encode()
    async with db.transaction():
        await db.execute(f'SELECT id FROM "{SVC}_post_info" WHERE id = $1 FOR UPDATE', held)
        blocked = asyncio.ensure_future(exchange(tight.port, update))

        async def waiting() -> bool:
            return bool(await db.fetchval("SELECT count(*) FROM pg_locks WHERE NOT granted"))  # live, unlike
        assert await eventually(waiting, timeout=REQUEST_TIMEOUT, interval=0.05)  # pg_stat_activity in a transaction
        raw, _ = await exchange(tight.port, get(api_path("/getinfo", post_id=other)))
        status, _, body = envelope(raw)
    assert (status, body["code"]) == (500, 10006), body
    await blocked


# --- request smuggling shapes ------------------------------------------------------------------------------------

@pytest.mark.parametrize("headers", [
    "Content-Length: 5\r\nTransfer-Encoding: chunked",
    "Content-Length: 5\r\nContent-Length: 6",
    "Transfer-Encoding: xchunked",
], ids=["CL+TE", "two CLs", "xchunked"])
async def test_smuggling_shapes_are_rejected(guarded, headers):
    request = f"POST /healthz HTTP/1.1\r\nHost: x\r\n{headers}\r\n\r\n0\r\n\r\nGET /healthz HTTP/1.1\r\n\r\n"
    raw, closed = await exchange(guarded.port, request.encode())
    assert closed and raw.startswith(b"HTTP/1.1 400") and raw.count(b"HTTP/1.1") == 1


# --- how it is started -------------------------------------------------------------------------------------------

# --- fairness: newcomers are not stuck behind greedy connections (in-process: the protocol on fake transports) ------

class _FakeTransport(asyncio.Transport):
    """What the protocol writes goes nowhere; enough of a TCP connection on 127.0.0.1 for uvicorn."""

    def __init__(self) -> None:
        super().__init__()
        self.closing = False

    def get_extra_info(self, name, default=None):
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(name, default)

    def write(self, data: bytes) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def test_a_new_connections_request_starts_ahead_of_back_to_back_requests():
    """Connections that send their next request right after an answer take turns, FAIR_BUDGET per turn of the
    event loop; the request of a new connection starts at once, however many of them wait; a waiting request
    whose client went away never starts. (Started = the app is called; recorded in order, no clock involved.)"""
    from uvicorn.config import Config
    from uvicorn.server import ServerState

    started: list[str] = []

    async def app(scope, receive, send):
        started.append(scope["query_string"].decode())
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    config = Config(app=app, lifespan="off", access_log=False, log_level="warning", http="httptools")
    config.load()
    state, loop = ServerState(), asyncio.get_running_loop()
    opened = []

    def connect() -> im_backend.GuardedHttpProtocol:
        proto = im_backend.GuardedHttpProtocol(config=config, server_state=state, app_state={}, _loop=loop)
        proto.connection_made(_FakeTransport())
        opened.append(proto)
        return proto

    async def until_started(n: int) -> None:
        for _ in range(10_000):  # turns of the loop, bounded
            if len(started) >= n:
                return
            await asyncio.sleep(0)
        raise AssertionError(f"{len(started)} of {n} requests started")

    def request(tag: str) -> bytes:
        return f"GET /healthz?{tag} HTTP/1.1\r\nHost: x\r\n\r\n".encode()

    greedy = [connect() for _ in range(3 * im_backend.FAIR_BUDGET)]
    try:
        for i, proto in enumerate(greedy):  # a first request each: answered
            proto.data_received(request(f"first{i}"))
        await until_started(len(greedy))
        started.clear()
        for i, proto in enumerate(greedy):  # each sends its next one right away: back to back
            proto.data_received(request(f"again{i}"))
        greedy[-1].connection_lost(None)  # one of them gives up while it waits
        connect().data_received(request("fresh"))  # a newcomer, behind all of them
        await until_started(len(greedy))
        for _ in range(10):
            await asyncio.sleep(0)
        assert started.index("fresh") <= im_backend.FAIR_BUDGET  # in the first turn, not behind the 383 others
        assert [tag for tag in started if tag != "fresh"] == [f"again{i}" for i in range(len(greedy) - 1)]
    finally:
        for proto in opened:
            proto.connection_lost(None)


def test_the_seam_matches_the_pinned_uvicorn():
    pins = (ROOT / "requirements-runtime.txt").read_text()
    assert re.search(rf"^uvicorn=={re.escape(im_backend.UVICORN_SEAM_VERSION)}$", pins, re.M)


def test_the_uvicorn_seam_refuses_an_untested_uvicorn(monkeypatch):
    real = im_backend.importlib.metadata.version
    monkeypatch.setattr(im_backend.importlib.metadata, "version",
                        lambda dist: "0.99.0" if dist == "uvicorn" else real(dist))
    with pytest.raises(im_backend.UntestedVersion, match=r"^uvicorn 0\.99\.0 is installed, but UvicornSeam .*"
                                                         rf"{re.escape(im_backend.UVICORN_SEAM_VERSION)} only"):
        im_backend.UvicornSeam.check_version()
    monkeypatch.undo()
    im_backend.UvicornSeam.check_version()  # the pinned version passes


async def test_python_im_backend_py_serves_with_the_guarded_protocol(workdir, backing):
    srv = Server(workdir / "hostile-cli", app_config(backing, {SVC: SECRET}))
    port = free_port()
    with open(srv.log_path, "ab") as log_file:
        srv.process = subprocess.Popen(
            [sys.executable, "im_backend.py", "--conf", str(srv.boot), "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT, env=dict(os.environ), stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    srv.url, srv.port = f"http://127.0.0.1:{port}", port
    try:
        await srv.wait_ready_async()
        raw, closed = await exchange(port, get("/healthz", "X-Big: " + "a" * 17_000))
        assert closed and raw.startswith(b"HTTP/1.1 431")
    finally:
        srv.stop(signal.SIGTERM)
