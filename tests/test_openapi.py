"""/openapi.json says exactly what the server accepts: every example and every boundary value the document
allows is accepted (never 400 bind param failed); ids, names, cursors and bodies are constrained as the parser
constrains them; a mounted app's document names its mount path in `servers`."""
import json

import httpx
import pytest

import im_backend
from conftest import svc_name

BIND = "bind param failed"


@pytest.fixture(scope="module")
def doc() -> dict:
    return im_backend.openapi_document()


def operations(doc: dict):
    for path, ops in doc["paths"].items():
        if path.startswith("/api/"):
            for method, op in ops.items():
                yield path, method.upper(), op


def walk(node, trail=()):
    """Every (trail, schema-or-parameter mapping) in the document."""
    if isinstance(node, dict):
        yield trail, node
        for key, value in node.items():
            yield from walk(value, trail + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from walk(value, trail + (i,))


def test_every_parameter_and_body_property_is_described_and_constrained(doc):
    for path, method, op in operations(doc):
        assert op["summary"] and op["operationId"]
        for param in op["parameters"]:
            assert param["description"] and "example" in param, (path, param["name"])
            schema = param["schema"]
            if schema.get("type") == "integer" and param["name"] != "limit":  # an id
                assert (schema["minimum"], schema["maximum"]) in ((0, im_backend.MAX_ID), (1, im_backend.MAX_ID))
        for media, content in op.get("requestBody", {}).get("content", {}).items():
            for name, prop in content["schema"]["properties"].items():
                assert prop["description"], (path, media, name)
                if media != "application/json":  # every form value is a string
                    assert prop.get("type") == "string", (path, media, name)
    requests = [(op["parameters"], op.get("requestBody")) for _, _, op in operations(doc)]
    for trail, node in walk(requests):
        if node.get("name") in ("user_id", "author", "title") or trail[-1:] in (("author",), ("title",)):
            schema = node.get("schema", node)
            assert schema["maxLength"] == 255 and schema["minLength"] == 1, trail


def test_route_specific_meanings(doc):
    paths = doc["paths"]

    def param(path, method, name):
        return next(p for p in paths[im_backend.PREFIX + path][method]["parameters"] if p["name"] == name)
    assert param("/comments/reply", "post", "root_comment_id")["schema"]["minimum"] == 1
    assert param("/comments/reply", "post", "father_comment_id")["schema"]["minimum"] == 1
    assert param("/comments/getinfo", "get", "root_comment_id")["schema"]["minimum"] == 0
    getlike = paths[im_backend.PREFIX + "/comments/getlike"]["get"]["requestBody"]["content"]
    assert getlike["application/json"]["schema"]["properties"]["comment_ids"]["type"] == "array"
    assert getlike["multipart/form-data"]["schema"]["properties"]["comment_ids"]["type"] == "string"
    extra = paths[im_backend.PREFIX + "/publish"]["post"]["requestBody"]["content"]
    assert [s["type"] for s in extra["application/json"]["schema"]["properties"]["extra"]["anyOf"]] == [
        "object", "string"]
    assert extra["application/x-www-form-urlencoded"]["schema"]["properties"]["extra"]["type"] == "string"
    assert set(paths["/healthz"]["get"]["responses"]) == {"200"}  # it never answers 503
    assert set(paths["/readyz"]["get"]["responses"]) == {"200", "503"}
    for name in ("/getlist", "/comments/getinfo"):
        data = paths[im_backend.PREFIX + name]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
        page = data["allOf"][1]["properties"]["data"]
        assert "next_cursor" in page["required"] and page["properties"]["next_cursor"]["type"] == ["string", "null"]


# --- requests generated from the document ------------------------------------------------------------------------

def boundary_values(schema: dict, example):
    """Values the schema allows, at its edges (plus its example)."""
    values = [example]
    if schema.get("type") == "integer":
        values += [schema.get("minimum", 0), schema.get("maximum", 1)]
    elif schema.get("type") == "string" and "maxLength" in schema and "format" not in schema:
        values += ["x" * schema.get("minLength", 1), "é" * schema["maxLength"]]
    elif schema.get("type") == "array":
        values += [[schema["items"]["maximum"]], [schema["items"]["minimum"]] * schema["maxItems"]]
    elif schema.get("type") == "boolean":
        values += [True, False]
    return values


def query_value(value):
    return ",".join(map(str, value)) if isinstance(value, list) else value


def requests_of(path: str, method: str, op: dict, svc: str, secret: str):
    """(query, body kwargs) pairs: the examples, then each parameter at each of its edges."""
    query_params = [p for p in op["parameters"] if p["in"] == "query"]  # (headers: the signed test sends them)
    examples = {p["name"]: p["example"] for p in query_params}
    schemas = {p["name"]: p["schema"] for p in query_params}
    bodies = [(media, content["example"], content["schema"])
              for media, content in op.get("requestBody", {}).get("content", {}).items()] or [(None, None, None)]

    def query(**override):
        values = dict(examples, **override)
        values.update(svc=svc, appKey=im_backend.encrypt_appkey(secret))
        return [(k, query_value(v)) for k, v in values.items()]

    def body(media, value):
        if media is None:
            return {}
        if media == "application/json":
            return {"content": json.dumps(value)}
        if media == "multipart/form-data":
            return {"files": {k: (None, v) for k, v in value.items()}}
        return {"data": value}

    for media, example, schema in bodies:
        yield query(), body(media, example)
        for name, param_schema in schemas.items():
            if name not in ("svc", "appKey"):
                for value in boundary_values(param_schema, examples[name]):
                    yield query(**{name: value}), body(media, example)
        for name, prop in (schema or {}).get("properties", {}).items():
            values = [v for s in prop.get("anyOf", [prop]) for v in boundary_values(s, example[name])]
            if media == "application/json" and "anyOf" in prop:
                values.append(json.dumps(example[name]))  # extra: the text of an object
            for value in values:
                if media != "application/json" and not isinstance(value, str):
                    continue
                yield query(), body(media, dict(example, **{name: value}))


async def test_every_example_and_edge_of_the_document_is_accepted(server, client):
    doc = (await client.get("/openapi.json")).json()
    svc = svc_name("a")
    sent = 0
    for path, method, op in operations(doc):
        for params, kwargs in requests_of(path, method, op, svc, server.services[svc]):
            async with client.stream(method, path, params=params, **kwargs) as response:
                if response.headers["content-type"].startswith("text/event-stream"):  # (the event stream)
                    assert response.status_code == 200 and "text/event-stream" in op["responses"]["200"]["content"]
                    sent += 1
                    continue
                await response.aread()
            body = response.json()
            assert (response.status_code, body["msg"]) != (400, BIND), (method, path, params, kwargs, body)
            assert body["msg"] != "bind authentication", body
            sent += 1
    assert sent > 150


async def test_the_document_names_the_mount_path(server):
    inner = im_backend.create_app(server.boot)

    async def host(scope, receive, send):  # mounts inner at /im, as a framework's Mount does
        await inner(dict(scope, path=scope["path"].removeprefix("/im"), root_path="/im"), receive, send)
    async with inner.lifespan():
        for app, url, server_url in ((host, "/im/openapi.json", "/im"), (inner, "/openapi.json", "/")):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
                assert (await client.get(url)).json()["servers"] == [{"url": server_url,
                                                                      "description": "where this app is served"}]
