"""Bad input of every kind: the documented envelope, never a 500, and nothing written."""
import pytest

from conftest import expect, table_counts

BIND = "bind param failed"
BAD_IDS = ["abc", "-1", "1.5", " 1", "1e3", "0x10", "１２３", str(2**63), str(2**64), "9" * 30, "1;DROP TABLE x"]
BAD_CURSORS = ["yesterday", "2024-13-01T00:00:00", "2024-01-01T25:00:00", "9999999999", "' OR 1=1 --", "x" * 500,
               "2024-01-01T00:00:00+99:00"]
BAD_LIMITS = ["-1", "abc", "1.5", "9" * 30, "1e2"]


@pytest.fixture
async def written(api, db):
    """Asserts after the test that the tables of the service hold exactly what they held before."""
    before = await table_counts(db, api.svc)
    yield
    assert await table_counts(db, api.svc) == before


@pytest.mark.parametrize("bad", BAD_IDS)
async def test_bad_ids_everywhere(api, written, bad):
    calls = [
        ("GET", "/getinfo", {"post_id": bad}, {}),
        ("PUT", "/update", {"post_id": bad, "user_id": "u"}, {"data": {"content": "x"}}),
        ("DELETE", "/delete", {"post_id": bad, "user_id": "u"}, {}),
        ("PUT", "/like", {"post_id": bad, "user_id": "u"}, {"json": {"like": True}}),
        ("GET", "/getlike", {"post_id": bad}, {}),
        ("POST", "/comments/publish", {"post_id": bad, "user_id": "u"}, {"data": {"content": "x"}}),
        ("POST", "/comments/reply", {"post_id": 1, "root_comment_id": bad, "father_comment_id": 1, "user_id": "u"},
         {"data": {"content": "x"}}),
        ("PUT", "/comments/update", {"comment_id": bad, "user_id": "u"}, {"data": {"content": "x"}}),
        ("DELETE", "/comments/delete", {"comment_id": bad, "user_id": "u"}, {}),
        ("GET", "/comments/getinfo", {"post_id": bad, "root_comment_id": 0}, {}),
        ("PUT", "/comments/like", {"post_id": 1, "comment_id": bad, "user_id": "u"}, {"json": {"like": True}}),
        ("GET", "/comments/getlike", {"comment_ids": f"1,{bad}" if bad.strip() != "1" else "1,,x"}, {}),
    ]
    for method, path, params, body in calls:
        expect(await api.call(method, path, params, **body), 400, BIND)


async def test_missing_required_query_parameters(api, written):
    expect(await api.call("GET", "/getinfo"), 400, BIND)
    expect(await api.call("DELETE", "/delete", {"post_id": 1}), 400, BIND)
    expect(await api.call("POST", "/comments/publish", {"user_id": "u"}, data={"content": "x"}), 400, BIND)
    expect(await api.call("GET", "/comments/getinfo", {"post_id": 1}), 400, BIND)
    expect(await api.call("POST", "/comments/reply", {"post_id": 1, "root_comment_id": 1, "user_id": "u"},
                          data={"content": "x"}), 400, BIND)


@pytest.mark.parametrize("cursor", BAD_CURSORS)
async def test_bad_cursors(api, cursor):
    expect(await api.call("GET", "/getlist", {"cursor": cursor}), 400, BIND)
    expect(await api.call("GET", "/comments/getinfo", {"post_id": 1, "root_comment_id": 0, "cursor": cursor}), 400, BIND)


@pytest.mark.parametrize("limit", BAD_LIMITS)
async def test_bad_limits(api, limit):
    expect(await api.call("GET", "/getlist", {"limit": limit}), 400, BIND)
    expect(await api.call("GET", "/comments/getinfo", {"post_id": 1, "root_comment_id": 0, "limit": limit}), 400, BIND)


@pytest.mark.parametrize("body,content_type", [
    (b'{"author":', "application/json"),
    (b"[1,2]", "application/json"),
    (b'"just a string"', "application/json"),
    (b'{"author": 1, "content": "x"}', "application/json"),
    (b'{"author": "a", "content": ["x"]}', "application/json"),
    (b'{"author": "a", "content": "x", "extra": [1]}', "application/json"),
    (b'{"author": "a", "content": "x", "extra": "not json"}', "application/json"),
    (b'{"author": "a", "content": "\\u0000"}', "application/json"),
    (b'{"author": "a", "content": "\\ud800"}', "application/json"),
    (b"<post><author>a</author><content>x</content></post>", "text/xml"),
    (b"author=a&content=%FF%FE", "application/x-www-form-urlencoded"),
    (b"author=a", "application/x-www-form-urlencoded"),
    (b"author=a&content=", "application/x-www-form-urlencoded"),
    (b"--XYZ\r\nContent-Disposition: form-data; name=\"author\"\r\n\r\na\r\n--XYZ\r\nContent-Dispo",
     "multipart/form-data; boundary=XYZ"),
    (b"--XYZ\r\nContent-Disposition: form-data; name=\"author\"\r\n\r\na\r\n--XYZ--\r\n", "multipart/form-data"),
    (b"garbage without any boundary", "multipart/form-data; boundary=XYZ"),
    (b"--XYZ\r\nContent-Disposition: form-data; name=\"content\"\r\n\r\n\xff\xfe\r\n--XYZ--\r\n",
     "multipart/form-data; boundary=XYZ"),
    (b"\x00\x01\x02", "application/octet-stream"),
])
async def test_bad_publish_bodies(api, written, body, content_type):
    expect(await api.call("POST", "/publish", content=body, headers={"content-type": content_type}), 400, BIND)


@pytest.mark.parametrize("extra", ["not json", "[1,2]", '"string"', "123", "null", "true", '{"a":"\\u0000"}', "{",
                                   '{"n": 1' + "0" * 400 + "}", "[" * 5000 + "]" * 5000])
async def test_bad_extra(api, written, extra):
    expect(await api.call("POST", "/publish", data={"author": "a", "content": "x", "extra": extra}), 400, BIND)


async def test_length_limits(api, db):
    ok_id = await api.publish("a" * 255, "x", title="t" * 255)
    assert (await api.ok("GET", "/getinfo", {"post_id": ok_id}))["post"]["author"] == "a" * 255
    before = await table_counts(db, api.svc)
    expect(await api.call("POST", "/publish", data={"author": "a" * 256, "content": "x"}), 400, BIND)
    expect(await api.call("POST", "/publish", data={"author": "a", "content": "x", "title": "t" * 256}), 400, BIND)
    expect(await api.call("POST", "/comments/publish", {"post_id": ok_id, "user_id": "u" * 256},
                          data={"content": "x"}), 400, BIND)
    expect(await api.call("PUT", "/like", {"post_id": ok_id, "user_id": "é" * 256}, json={"like": True}), 400, BIND)
    expect(await api.call("POST", "/publish", data={"author": "a\x00b", "content": "x"}), 400, BIND)
    assert await table_counts(db, api.svc) == before


async def test_oversized_bodies_are_413(api, written):
    big = b"author=a&content=" + b"x" * (1 << 20)
    status, body = await api.call("POST", "/publish", content=big,
                                  headers={"content-type": "application/x-www-form-urlencoded"})
    assert (status, body["code"], body["data"]) == (413, 413, None)

    async def chunks():  # no Content-Length: the limit applies while reading
        yield b"author=a&content="
        for _ in range(80):
            yield b"y" * 16384

    status, body = await api.call("POST", "/publish", content=chunks(),
                                  headers={"content-type": "application/x-www-form-urlencoded"})
    assert (status, body["code"]) == (413, 413)


async def test_a_body_just_under_the_limit_is_accepted(api):
    content = "z" * ((1 << 20) - 100)
    post_id = (await api.ok("POST", "/publish", data={"author": "a", "content": content}))["post_id"]
    assert len((await api.ok("GET", "/getinfo", {"post_id": post_id}))["post"]["content"]) == len(content)


HOSTILE = ["'; DROP TABLE x; --", '" OR "1"="1', "\\x00\\", "<script>alert(1)</script>", "😀 emoji 🚀", "\u202eRTL",
           "%00%27", "{{7*7}}", "$(rm -rf /)", "\ufeffBOM", "a\r\nb\tc"]


@pytest.mark.parametrize("text", HOSTILE)
async def test_hostile_strings_are_stored_verbatim(api, text):
    post_id = await api.publish(text[:255], text, title=text[:255], extra='{"k": %s}' % __import__("json").dumps(text))
    post = (await api.ok("GET", "/getinfo", {"post_id": post_id}))["post"]
    assert (post["author"], post["content"], post["title"], post["extra"]) == (text, text, text, {"k": text})
    cid = await api.comment(post_id, text, text)
    comment = (await api.ok("GET", "/comments/getinfo", {"post_id": post_id, "root_comment_id": 0}))["comments"][0]
    assert (comment["id"], comment["user_id"], comment["content"]) == (cid, text, text)


async def test_a_wrong_method_on_a_system_path_is_405_as_on_any_route(client):
    for path in ("/healthz", "/readyz", "/openapi.json", "/metrics"):
        response = await client.delete(path)
        assert (response.status_code, response.json()["code"]) == (405, 405), path
        assert response.headers["allow"] == "GET", path


@pytest.mark.parametrize("svc", ['a"; DROP TABLE x; --', "../../etc", "A" * 40, "UPPER", "x" * 1000])
async def test_hostile_service_names(api, client, svc):
    response = await client.get("/api/v1/posts/getlist", params={"svc": svc, "appKey": "00" * 20})
    assert (response.status_code, response.json()["msg"]) == (400, "bind authentication")


async def test_unknown_paths_and_methods(client):
    response = await client.get("/api/v1/posts/nope")
    assert (response.status_code, response.json()["code"], response.json()["data"]) == (404, 404, None)
    response = await client.delete("/api/v1/posts/getinfo")
    assert (response.status_code, response.json()["code"]) == (405, 405)
    assert response.headers["allow"] == "GET"  # RFC 9110: a 405 lists the methods the resource has
    response = await client.post("/api/v1/posts/comments/getlike")
    assert (response.status_code, response.headers["allow"]) == (405, "GET")
    for path, methods in (("/api/v1/posts/publish", "POST"), ("/api/v1/posts/like", "PUT")):
        response = await client.get(path)
        assert response.status_code == 405 and response.headers["allow"] == methods
    response = await client.get("/")
    assert response.status_code == 404 and response.json()["code"] == 404
