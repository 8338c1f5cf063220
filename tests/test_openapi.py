"""/openapi.json says exactly what the server accepts: every example and every boundary value the document
allows is accepted (never 400 bind param failed); ids, names, cursors and bodies are constrained as the parser
constrains them; a mounted app's document names its mount path in `servers`. It is valid OpenAPI (checked by an
independent validator), every example in it matches its own schema, its security schemes let a client call a
service that accepts signed requests only, and the error answers it lists are the ones the server gives."""
import copy
import json
import secrets
import shutil
import subprocess

import httpx
import jsonschema
import openapi_spec_validator
import pytest
from http_message_signatures import HTTPMessageSigner, HTTPSignatureKeyResolver, algorithms

import im_backend
from conftest import SECRET, entries_config, svc_name

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
    # it never answers 503 (405: a method other than GET, as on every path)
    assert set(paths["/healthz"]["get"]["responses"]) == {"200", "405"}
    assert set(paths["/readyz"]["get"]["responses"]) == {"200", "503", "405"}
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
                streamed = response.headers["content-type"].split(";")[0]
                if streamed in ("text/event-stream", "application/x-ndjson"):  # (the event stream, an export)
                    assert response.status_code == 200 and streamed in op["responses"]["200"]["content"]
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


# --- the document as independent tools read it --------------------------------------------------------------------

SPEC_VALIDATORS = {"3.0": openapi_spec_validator.OpenAPIV30SpecValidator,
                   "3.1": openapi_spec_validator.OpenAPIV31SpecValidator,
                   "3.2": openapi_spec_validator.OpenAPIV32SpecValidator}


def validate_spec(document: dict) -> None:
    """openapi-spec-validator's validator for the document's own `openapi` version; raises when invalid."""
    version = ".".join(document["openapi"].split(".")[:2])
    openapi_spec_validator.validate(document, cls=SPEC_VALIDATORS[version])


async def test_the_served_document_is_valid_openapi(client):
    document = (await client.get("/openapi.json")).json()
    assert document["openapi"].startswith("3.1")
    validate_spec(document)
    broken = copy.deepcopy(document)  # the validator does reject what is wrong
    del broken["paths"][im_backend.PREFIX + "/getinfo"]["get"]["parameters"][0]["in"]
    with pytest.raises(openapi_spec_validator.validation.exceptions.OpenAPIValidationError):
        validate_spec(broken)


def examples_of(document: dict):
    """(trail, value, schema) for every example in the document: of parameters, headers and media types (`example`,
    or the `value` of each of their `examples`), and of schemas (`example`, `examples`)."""
    for trail, node in walk(document):
        if trail[-1:] in (("properties",), ("examples",), ("headers",), ("securitySchemes",)):
            continue  # a mapping of names, not an object that has examples
        if "example" not in node and not isinstance(node.get("examples"), (dict, list)):
            continue
        holder = "in" in node or trail[-2:-1] in (("content",), ("headers",))  # a parameter, media type or header
        if holder:
            assert "schema" in node, ("an example without a schema", trail)
            if "example" in node:
                yield trail + ("example",), node["example"], node["schema"]
            for name, example in node.get("examples", {}).items():
                yield trail + ("examples", name), example["value"], node["schema"]
        else:  # a schema object
            if "example" in node:
                yield trail + ("example",), node["example"], node
            for i, example in enumerate(node.get("examples", [])):
                yield trail + ("examples", i), example, node


def bad_examples(document: dict) -> tuple[list, int]:
    """The examples that do not match their schema (with why), and how many were checked."""
    bad, checked = [], 0
    for trail, value, schema in examples_of(document):
        validator = jsonschema.Draft202012Validator(dict(schema, components=document["components"]),
                                                    format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
        bad += [(trail, error.message) for error in validator.iter_errors(value)]
        checked += 1
    return bad, checked


async def test_every_example_matches_its_schema(client):
    document = (await client.get("/openapi.json")).json()
    bad, checked = bad_examples(document)
    assert bad == []
    assert checked > 300  # parameters, bodies, error envelopes and headers of 16 operations
    # what it checks: a planted bad example of each kind is found
    planted = copy.deepcopy(document)
    events = planted["paths"][im_backend.PREFIX + "/events"]["get"]
    next(p for p in events["parameters"] if p["name"] == "last_event_id")["example"] = None  # typed string
    publish = planted["paths"][im_backend.PREFIX + "/publish"]["post"]
    publish["requestBody"]["content"]["application/json"]["example"]["author"] = 7
    publish["responses"]["413"]["content"]["application/json"]["examples"]["413-body-too-large"]["value"]["code"] = "x"
    publish["responses"]["400"]["headers"]["IM-Auth-Error"]["example"] = "no-such-reason"
    planted["components"]["schemas"]["Post"]["properties"]["id"]["examples"] = [-1.5]
    assert {trail[1:3] for trail, _ in bad_examples(planted)[0]} == {
        (im_backend.PREFIX + "/events", "get"), (im_backend.PREFIX + "/publish", "post"), ("schemas", "Post")}
    assert len(bad_examples(planted)[0]) == 5


def test_security_and_headers_are_declared(doc):
    schemes = doc["components"]["securitySchemes"]
    for name, where, header in (("appKey", "query", "appKey"), ("signature", "header", "Signature"),
                                ("signatureInput", "header", "Signature-Input"),
                                ("contentDigest", "header", "Content-Digest")):
        assert (schemes[name]["type"], schemes[name]["in"], schemes[name]["name"]) == ("apiKey", where, header)
        assert schemes[name]["description"]
    for word in ("Signature-Input", "Content-Digest", "@method", "@path", "@query", "content-digest", "keyid",
                 "hmac-sha256", "nonce", "created"):
        assert word in schemes["signature"]["description"], word
    assert f"{im_backend.APPKEY_WINDOW} s" in schemes["appKey"]["description"]
    assert "AES" in schemes["appKey"]["description"]
    for path, method, op in operations(doc):
        signed = [{"signature": [], "signatureInput": []} | ({"contentDigest": []} if "requestBody" in op else {})]
        assert op["security"] == [{"appKey": []}] + signed, (method, path)  # alternatives: either one
        auth_error = op["responses"]["400"]["headers"]["IM-Auth-Error"]["schema"]["enum"]
        assert set(auth_error) == {reason.value for reason in im_backend.AuthReason}
        assert ("413" in op["responses"]) == ("requestBody" in op), (method, path)
        for status, answer in op["responses"].items():
            if status not in ("408", "431"):  # (answered by the HTTP protocol, before the application)
                assert "X-Request-ID" in answer["headers"], (method, path, status)
        assert set(op["responses"]["429"]["headers"]) >= {"Retry-After", "RateLimit-Policy", "RateLimit"}
    events = doc["paths"][im_backend.PREFIX + "/events"]["get"]["parameters"]
    assert {("Last-Event-ID", "header"), ("last_event_id", "query")} <= {(p["name"], p["in"]) for p in events}
    for system in ("/healthz", "/readyz", "/openapi.json"):
        assert doc["paths"][system]["get"]["security"] == []
    assert doc["paths"]["/metrics"]["get"]["security"] == [{}, {"metricsToken": []}]  # a token when configured
    assert (schemes["metricsToken"]["type"], schemes["metricsToken"]["scheme"]) == ("http", "bearer")


async def test_an_oversized_body_is_answered_as_documented(server, client):
    """Every operation with a body lists the 413 the server answers for one over server.body_limit."""
    doc = (await client.get("/openapi.json")).json()
    svc = svc_name("a")
    too_large = b'{"content": "' + b"x" * im_backend.ServerConfig.body_limit + b'"}'
    answered = 0
    for path, method, op in operations(doc):
        if "requestBody" in op:
            params = {"svc": svc, "appKey": im_backend.encrypt_appkey(server.services[svc])}
            response = await client.request(method, path, params=params, content=too_large,
                                            headers={"content-type": "application/json"})
            documented = op["responses"][str(response.status_code)]
            examples = documented["content"]["application/json"]["examples"].values()
            assert response.status_code == 413 and response.json() in [e["value"] for e in examples], path
            assert {name.lower() for name in documented["headers"]} <= set(response.headers.keys()), path
            answered += 1
    # publish, update, like, getbatch, comments/ publish, reply, update, like, getlike; report, moderation/ decide, ban;
    # react
    assert answered == 13


# --- a client generated from the document calls a service that accepts signed requests only --------------------

class Keys(HTTPSignatureKeyResolver):
    def __init__(self, secret: str) -> None:
        self.secret = secret.encode()

    def resolve_private_key(self, key_id: str) -> bytes:
        return self.secret


async def test_a_signed_only_service_is_callable_with_the_documents_security(make_server, backing):
    """What a client generated from the document sends: for each operation, its examples, authenticated by one of
    the operation's security alternatives, in the headers the document names. Signed by an independent RFC 9421
    implementation; the appKey alternative is refused with a reason the document lists."""
    svc = svc_name("signed")
    srv = make_server("openapi-signed", entries_config(backing, [{"name": svc, "secret": SECRET, "auth": "signed"}]))
    signer = HTTPMessageSigner(signature_algorithm=algorithms.HMAC_SHA256, key_resolver=Keys(SECRET))
    async with httpx.AsyncClient(base_url=srv.url, timeout=30) as client:
        doc = (await client.get("/openapi.json")).json()
        schemes = doc["components"]["securitySchemes"]
        sent = 0
        for path, method, op in operations(doc):
            # the alternative that is all headers: what a signed request sends
            signed = next(r for r in op["security"] if r and all(schemes[n]["in"] == "header" for n in r))
            assert "signature" in signed, (method, path)
            headers = {schemes[name]["name"].lower() for name in signed}
            query = [(p["name"], svc if p["name"] == "svc" else query_value(p["example"]))
                     for p in op["parameters"] if p["in"] == "query" and p["name"] != "appKey"]
            media = op.get("requestBody", {}).get("content", {}).get("application/json")
            body = json.dumps(media["example"]).encode() if media else b""
            request = client.build_request(method, path, params=query, content=body,
                                           headers={"content-type": "application/json"} if body else {})
            before = set(request.headers.keys())
            signer.sign(request, key_id=svc, nonce=secrets.token_hex(16), label="sig1",
                        covered_component_ids=("@method", "@path", "@query"), body=body or None)
            assert set(request.headers.keys()) - before == headers, (method, path, headers)
            response = await client.send(request, stream=True)
            try:
                if response.headers["content-type"].startswith(("text/event-stream", "application/x-ndjson")):
                    assert response.status_code == 200, path
                else:
                    await response.aread()
                    assert response.json()["msg"] not in ("bind authentication", BIND), (
                        method, path, response.json(), response.headers.get("im-auth-error"))
                    assert str(response.status_code) in op["responses"], (method, path, response.status_code)
            finally:
                await response.aclose()
            appkey = next(schemes[n] for r in op["security"] for n in r if schemes[n]["in"] == "query")
            refused = await client.request(method, path, params=query + [
                (appkey["name"], im_backend.encrypt_appkey(SECRET))], content=body)
            reasons = op["responses"]["400"]["headers"]["IM-Auth-Error"]["schema"]["enum"]
            assert refused.status_code == 400 and refused.headers["im-auth-error"] in reasons
            assert refused.headers["im-auth-error"] == "appkey-not-accepted"
            sent += 1
    assert sent == len(im_backend.ROUTES)


REDOCLY = "@redocly/cli@2.77.0"  # an independent linter (Redocly's recommended rules), the version checked against


def test_an_independent_linter_finds_no_problem(doc, tmp_path):
    """Redocly's linter (errors and warnings alike, e.g. an operation without any 4XX answer) over the document."""
    if shutil.which("npm") is None:
        pytest.skip("npm is not installed: the Redocly linter cannot be had")
    try:
        installed = subprocess.run(["npm", "install", "--no-save", "--no-audit", "--no-fund", "--prefix",
                                    str(tmp_path), REDOCLY], capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.skip("the npm registry did not answer within 240 s: the Redocly linter is not run")
    if installed.returncode != 0:
        pytest.skip(f"npm could not install {REDOCLY} (is the npm registry reachable?): {installed.stderr[-300:]}")
    (tmp_path / "openapi.json").write_text(json.dumps(doc))
    lint = subprocess.run([str(tmp_path / "node_modules" / ".bin" / "redocly"), "lint", "openapi.json",
                           "--format", "json"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    report = json.loads(lint.stdout[lint.stdout.index("{"):])
    problems = [(p["ruleId"], p["severity"], [loc.get("pointer") for loc in p.get("location", [])])
                for p in report.get("problems", [])]
    assert lint.returncode == 0 and problems == [], problems
