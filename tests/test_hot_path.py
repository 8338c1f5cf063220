"""The cached-read hot path cuts keep HTTP right: a body-less GET skips receive(), yet a GET that
carries a body (Content-Length or chunked) is still read; every answer carries Content-Length, so no answer is
chunked — not even to an HTTP/1.0 client, which could not read that."""
import asyncio
import json
import time

import pytest

import im_backend
from conftest import SECRET, svc_name

PREFIX = "/api/v1/posts"


async def raw_request(port: int, request: bytes, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes on a new connection and read the whole answer (the request asks to close); returns
    (status, headers with lower-case names, body as sent on the wire)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    try:
        writer.write(request)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(-1), timeout)  # until the server closes: bounded by timeout
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


def target(server, path: str, **params) -> str:
    svc = svc_name("a")
    query = "&".join(f"{k}={v}" for k, v in
                     {"svc": svc, "appKey": im_backend.encrypt_appkey(server.services[svc]), **params}.items())
    return f"{PREFIX}{path}?{query}"


async def liked_comments(api) -> tuple[int, int]:
    """A post with two comments liked once and twice."""
    post_id = await api.publish()
    c1, c2 = await api.comment(post_id), await api.comment(post_id)
    for comment, users in ((c1, ("u1",)), (c2, ("u1", "u2"))):
        for user in users:
            await api.ok("PUT", "/comments/like", {"post_id": post_id, "comment_id": comment, "user_id": user},
                         json={"like": True})
    return c1, c2


async def test_get_with_content_length_body_is_read(api, server):
    c1, c2 = await liked_comments(api)
    body = json.dumps({"comment_ids": [c2, c1]}).encode()
    status, headers, answer = await raw_request(server.port, (
        f"GET {target(server, '/comments/getlike')} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body)
    assert status == 200 and int(headers["content-length"]) == len(answer)
    assert json.loads(answer)["data"] == {"likes": [2, 1]}


async def test_chunked_get_body_is_read(api, server):
    """No Content-Length, but Transfer-Encoding: chunked: the body must still be read (in two chunks here)."""
    c1, c2 = await liked_comments(api)
    body = json.dumps({"comment_ids": [c1, c2]}).encode()
    half = len(body) // 2
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:half], body[half:])) + b"0\r\n\r\n"
    status, headers, answer = await raw_request(server.port, (
        f"GET {target(server, '/comments/getlike')} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").encode() + chunked)
    assert status == 200, answer
    assert json.loads(answer)["data"] == {"likes": [1, 2]}


async def test_bodiless_get_answers_with_content_length(api, server):
    post_id = await api.publish(content="hot path")
    for extra in ("", "Content-Length: 0\r\n"):
        status, headers, answer = await raw_request(server.port, (
            f"GET {target(server, '/getinfo', post_id=post_id)} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            f"{extra}\r\n").encode())
        assert status == 200
        assert "transfer-encoding" not in headers and int(headers["content-length"]) == len(answer)
        assert json.loads(answer)["data"]["post"]["content"] == "hot path"


async def test_http10_client_gets_a_plain_body(api, server):
    """RFC 9112 section 6.1: no Transfer-Encoding to an HTTP/1.0 client; the body must be the JSON itself."""
    post_id = await api.publish(content="for an old client")
    status, headers, answer = await raw_request(server.port, (
        f"GET {target(server, '/getinfo', post_id=post_id)} HTTP/1.0\r\nHost: x\r\n\r\n").encode())
    assert status == 200
    assert "transfer-encoding" not in headers and int(headers["content-length"]) == len(answer)
    assert json.loads(answer)["data"]["post"]["content"] == "for an old client"


@pytest.mark.parametrize("method, path, status", [("GET", "/nowhere", 404), ("DELETE", f"{PREFIX}/getinfo", 405),
                                                  ("GET", f"{PREFIX}/getinfo", 400)])
async def test_error_answers_carry_content_length(server, method, path, status):
    code, headers, answer = await raw_request(server.port, (
        f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").encode())
    assert code == status
    assert "transfer-encoding" not in headers and int(headers["content-length"]) == len(answer)
    assert json.loads(answer)["data"] is None
    if status == 405:
        assert headers["allow"] == "GET"


# --- read_body on ASGI messages (what any ASGI server sends) -----------------------------------------------------

def receiver(*messages: dict):
    queue = list(messages)
    calls = []

    async def receive() -> dict:
        calls.append(1)
        return queue.pop(0)
    return receive, calls


async def test_read_body_skips_receive_only_when_http1_says_there_is_no_body():
    body = {"type": "http.request", "body": b'{"a":1}', "more_body": False}
    # HTTP/1.1 without length headers, or Content-Length: 0 — no body, receive() is not awaited
    for headers in ([(b"host", b"x")], [(b"content-length", b"0")]):
        receive, calls = receiver(body)
        assert await im_backend.read_body({"http_version": "1.1", "headers": headers}, receive, 100) == b""
        assert calls == []
    # a length, chunked, HTTP/2 (length headers optional there) or an unknown version: read
    for scope in ({"http_version": "1.1", "headers": [(b"content-length", b"7")]},
                  {"http_version": "1.1", "headers": [(b"transfer-encoding", b"chunked")]},
                  {"http_version": "1.0", "headers": [(b"content-length", b"7")]},
                  {"http_version": "2", "headers": []},
                  {"headers": []}):
        receive, calls = receiver(body)
        assert await im_backend.read_body(scope, receive, 100) == b'{"a":1}', scope
        assert calls == [1]


async def test_read_body_limit_still_applies():
    receive, calls = receiver({"type": "http.request", "body": b"x" * 10, "more_body": False})
    with pytest.raises(im_backend.ApiError) as err:
        await im_backend.read_body({"http_version": "1.1", "headers": [(b"content-length", b"10")]}, receive, 5)
    assert err.value.err is im_backend.Err.BODY_TOO_LARGE and calls == []
    receive, calls = receiver({"type": "http.request", "body": b"x" * 10, "more_body": False})
    with pytest.raises(im_backend.ApiError) as err:
        await im_backend.read_body({"http_version": "1.1", "headers": [(b"transfer-encoding", b"chunked")]},
                                   receive, 5)
    assert err.value.err is im_backend.Err.BODY_TOO_LARGE


def test_parse_query_keeps_its_meaning():
    assert im_backend.parse_query(b"a=1&b=&a=2&&c") == {"a": ["1", "2"], "b": [""], "c": [""]}
    assert im_backend.parse_query(b"n%20a=x+y&m=%E4%BD%A0") == {"n a": ["x y"], "m": ["你"]}


# --- kept parses (ParsedQueries): only the parse is kept, everything else runs for every request ----------------

async def get_raw(server, url: str) -> tuple[int, dict]:
    status, _, answer = await raw_request(server.port, (
        f"GET {url} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").encode())
    return status, json.loads(answer)


async def test_repeated_query_string_is_authenticated_every_time(api, server):
    """The same query string (so the same appKey) is accepted while the key is in its window and refused once it
    is out of it: the kept parse does not keep the authentication."""
    post_id = await api.publish(content="kept")
    svc = svc_name("a")
    stamp = int(time.time()) - im_backend.APPKEY_WINDOW + 2  # valid for about two more seconds
    url = f"{PREFIX}/getinfo?svc={svc}&post_id={post_id}&appKey={im_backend.encrypt_appkey(SECRET, stamp)}"
    for _ in range(3):
        status, envelope = await get_raw(server, url)
        assert status == 200 and envelope["data"]["post"]["content"] == "kept", envelope
    await asyncio.sleep(max(0.0, stamp + im_backend.APPKEY_WINDOW + 1.2 - time.time()))
    status, envelope = await get_raw(server, url)
    assert (status, envelope["msg"]) == (400, "bind authentication"), envelope


async def test_repeated_bad_query_is_refused_every_time(api, server):
    url = target(server, "/getinfo", post_id="not-a-number")  # one appKey: the same query string each time
    for _ in range(3):
        status, envelope = await get_raw(server, url)
        assert (status, envelope["msg"]) == (400, "bind param failed"), envelope


async def test_same_query_string_on_three_routes(api, server):
    """A kept parse belongs to its route: the same query string answers getlist, getinfo and getlike each as
    itself (getlist's parse has no post_id: handed to getinfo it would fail)."""
    post_id = await api.publish(content="two routes")
    await api.ok("PUT", "/like", {"post_id": post_id, "user_id": "u1"}, json={"like": True})
    svc = svc_name("a")
    query = f"svc={svc}&post_id={post_id}&limit=5&appKey={im_backend.encrypt_appkey(SECRET)}"
    for _ in range(2):
        for path, check in (("/getlist", lambda d: str(post_id) in map(str, d["post_list"])),
                            ("/getinfo", lambda d: d["post"]["content"] == "two routes"),
                            ("/getlike", lambda d: d == {"like": 1})):
            status, envelope = await get_raw(server, f"{PREFIX}{path}?{query}")
            assert status == 200 and check(envelope["data"]), (path, envelope)


async def test_repeated_query_sees_writes(api, server):
    """The answer of a repeated query string follows the data (only the parse is kept, not the answer)."""
    post_id = await api.publish(content="before")
    url = target(server, "/getinfo", post_id=post_id, ids="string")
    status, envelope = await get_raw(server, url)
    assert envelope["data"]["post"]["content"] == "before" and envelope["data"]["post"]["id"] == str(post_id)
    await api.ok("PUT", "/update", {"post_id": post_id, "user_id": "alice"}, data={"content": "after"})
    status, envelope = await get_raw(server, url)
    assert status == 200 and envelope["data"]["post"]["content"] == "after", envelope
    assert envelope["data"]["post"]["id"] == str(post_id)


def test_parsed_queries_rules():
    kept = im_backend.ParsedQueries()
    routes = im_backend.ROUTE_TABLE
    getinfo, getlike = routes[f"{PREFIX}/getinfo"]["GET"], routes[f"{PREFIX}/comments/getlike"]["GET"]
    assert getinfo.query_only and not getlike.query_only  # comment_ids may come in the body
    kept.keep(getinfo, b"svc=a&post_id=1", {"svc": ["a"]}, "a", {"post_id": 1}, None)
    assert kept.get(getinfo, b"svc=a&post_id=1") == ({"svc": ["a"]}, "a", {"post_id": 1}, None)
    assert kept.get(getinfo, b"svc=a&post_id=2") is None
    kept.keep(getlike, b"svc=a&comment_ids=1", {}, "a", {"comment_ids": None}, None)  # not a query-only route
    assert kept.get(getlike, b"svc=a&comment_ids=1") is None
    kept.keep(getinfo, b"svc=a&x=1", {}, "a", {"post_id": [1]}, None)  # a mutable value: never handed out twice
    assert kept.get(getinfo, b"svc=a&x=1") is None
    long = b"svc=a&post_id=1&pad=" + b"x" * im_backend.PARSED_QUERY_MAX_BYTES
    kept.keep(getinfo, long, {}, "a", {"post_id": 1}, None)
    assert kept.get(getinfo, long) is None
    for i in range(im_backend.PARSED_QUERIES_KEPT + 5):  # bounded: all dropped when full
        kept.keep(getinfo, b"svc=a&post_id=%d" % i, {}, "a", {"post_id": i}, None)
        assert len(kept._kept) <= im_backend.PARSED_QUERIES_KEPT
