"""Signed requests: RFC 9421 signatures made by an independent client library
(http-message-signatures), auth modes, secret rotation, IM-Auth-Error reasons, and no secret in any log line."""
from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import secrets
import subprocess
import sys
import time

import http_sf
import httpx
import pytest
from http_message_signatures import HTTPMessageSigner, HTTPSignatureKeyResolver, algorithms
from hypothesis import HealthCheck, given, settings, strategies as st

import im_backend
from conftest import ROOT, RedisProcess, Server, entries_config, eventually, free_port, svc_name, table_counts

SECRET = {"any": "W7K8pJ3aQv2LcXgH", "appkey": "Ab9xQ2mZ7kLp4sT1uV6wY3e8", "signed": "0123456789abcdef0123456789abcdef",
          "rot": "NEWsecret0123456", "rot_old": "OLDsecret0123456"}
REASONS = {"missing", "unknown-service", "malformed", "expired", "bad-appkey", "bad-signature", "digest-mismatch",
           "replayed", "appkey-not-accepted"}


def tenants() -> list[dict]:
    return [{"name": svc_name("s_any"), "secret": SECRET["any"]},
            {"name": svc_name("s_appkey"), "secret": SECRET["appkey"], "auth": "appkey"},
            {"name": svc_name("s_signed"), "secret": SECRET["signed"], "auth": "signed"},
            {"name": svc_name("s_rot"), "secret": SECRET["rot"], "previous_secrets": [SECRET["rot_old"]]}]


@pytest.fixture(scope="module")
def servers(workdir, backing):
    """Two processes on one configuration (the second for nonces shared across processes)."""
    first = Server(workdir / "sig-1", entries_config(backing, tenants())).start()
    second = Server(workdir / "sig-2", entries_config(backing, tenants())).start()
    yield first, second
    first.stop()
    second.stop()


class Keys(HTTPSignatureKeyResolver):
    def __init__(self, secret: str) -> None:
        self.secret = secret.encode()

    def resolve_private_key(self, key_id: str) -> bytes:
        return self.secret


def build(url: str, method: str, path: str, query: list | None = None, svc: str | None = None,
          **kwargs) -> httpx.Request:
    params = ([("svc", svc)] if svc else []) + list(query or [])
    return httpx.Request(method, url + "/api/v1/posts" + path, params=params, **kwargs)


def sign(request: httpx.Request, secret: str, key_id: str, *, nonce: str | None = None, created: float | None = None,
         digest: bool = True, covered: tuple = ("@method", "@path", "@query")) -> httpx.Request:
    """Sign with the http-message-signatures library (not the server's code)."""
    body = request.read()
    signer = HTTPMessageSigner(signature_algorithm=algorithms.HMAC_SHA256, key_resolver=Keys(secret))
    when = None if created is None else __import__("datetime").datetime.fromtimestamp(
        created, __import__("datetime").timezone.utc)
    signer.sign(request, key_id=key_id, nonce=nonce or secrets.token_hex(16), created=when, label="im",
                covered_component_ids=covered, body=body if body and digest else None)
    return request


def resend(request: httpx.Request, method: str | None = None, url: str | None = None, content: bytes | None = None,
           drop: tuple[str, ...] = (), set_headers: dict | None = None) -> httpx.Request:
    """The same request with one thing changed after signing."""
    headers = [(k, v) for k, v in request.headers.multi_items() if k.lower() not in drop and k.lower() != "content-length"]
    headers += list((set_headers or {}).items())
    return httpx.Request(method or request.method, url or str(request.url), headers=headers,
                         content=request.read() if content is None else content)


def send(request: httpx.Request) -> httpx.Response:
    with httpx.Client(timeout=30) as client:
        return client.send(request)


def refused(response: httpx.Response, reason: str) -> None:
    assert response.status_code == 400, (response.status_code, response.text)
    assert response.json() == {"code": 400, "msg": "bind authentication", "data": None}
    assert response.headers.get("im-auth-error") == reason, (response.headers.get("im-auth-error"), reason)


def ok(response: httpx.Response) -> dict:
    assert response.status_code == 200, (response.status_code, response.text, response.headers.get("im-auth-error"))
    assert response.json()["code"] == 200
    assert "im-auth-error" not in response.headers
    return response.json()["data"]


def forge_appkey(captured: str, old_ts: int, new_ts: int) -> str:
    """The legacy weakness: AES-CFB has no integrity, so XOR-ing the known plaintext away turns one captured appKey
    into a valid one for another second, without the secret."""
    raw = bytes.fromhex(captured)
    old, new = str(old_ts).encode(), str(new_ts).encode()
    assert len(old) == len(new)
    return (raw[:16] + bytes(c ^ o ^ n for c, o, n in zip(raw[16:], old, new, strict=True))).hex()


# --- the forgery, and what `auth` accepts ------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["any", "appkey"])
def test_a_forged_appkey_is_accepted_by_legacy_modes(servers, mode):
    """Documents the weakness that `auth: signed` closes: an hour-old appKey, XOR-ed, opens the service."""
    url, svc = servers[0].url, svc_name(f"s_{mode}")
    old = int(time.time()) - 3600
    captured = im_backend.encrypt_appkey(SECRET[mode], old)
    refused(send(build(url, "GET", "/getlist", [("appKey", captured)], svc)), "expired")
    forged = forge_appkey(captured, old, int(time.time()))
    ok(send(build(url, "GET", "/getlist", [("appKey", forged)], svc)))


def test_signed_mode_refuses_any_appkey(servers):
    url, svc = servers[0].url, svc_name("s_signed")
    old = int(time.time()) - 3600
    forged = forge_appkey(im_backend.encrypt_appkey(SECRET["signed"], old), old, int(time.time()))
    refused(send(build(url, "GET", "/getlist", [("appKey", forged)], svc)), "appkey-not-accepted")
    fresh = im_backend.encrypt_appkey(SECRET["signed"])
    refused(send(build(url, "GET", "/getlist", [("appKey", fresh)], svc)), "appkey-not-accepted")
    refused(send(build(url, "GET", "/getlist", [], svc)), "missing")
    ok(send(sign(build(url, "GET", "/getlist", [], svc), SECRET["signed"], svc)))


def test_appkey_mode_ignores_signatures(servers):
    url, svc = servers[0].url, svc_name("s_appkey")
    refused(send(sign(build(url, "GET", "/getlist", [], svc), SECRET["appkey"], svc)), "missing")
    key = im_backend.encrypt_appkey(SECRET["appkey"])
    ok(send(sign(build(url, "GET", "/getlist", [("appKey", key)], svc), "X" * 16, svc)))


@pytest.mark.parametrize("mode", ["any", "signed"])
def test_signed_requests_of_every_kind_are_accepted(servers, mode):
    """GET, form POST, multipart POST and JSON PUT, each signed by the library; the writes really happen."""
    url, svc, secret = servers[0].url, svc_name(f"s_{mode}"), SECRET[mode]
    post_id = ok(send(sign(build(url, "POST", "/publish", [], svc, data={"author": "ann", "content": "form"}),
                           secret, svc)))["post_id"]
    multipart = build(url, "POST", "/comments/publish", [("post_id", post_id), ("user_id", "bob")], svc,
                      files={"content": (None, "multipart comment")})
    assert multipart.headers["content-type"].startswith("multipart/form-data")
    ok(send(sign(multipart, secret, svc)))
    ok(send(sign(build(url, "PUT", "/like", [("post_id", post_id), ("user_id", "bob")], svc, json={"like": True}),
                 secret, svc)))
    post = ok(send(sign(build(url, "GET", "/getinfo", [("post_id", post_id)], svc), secret, svc)))["post"]
    assert post["content"] == "form"
    assert ok(send(sign(build(url, "GET", "/getlike", [("post_id", post_id)], svc), secret, svc)))["like"] == 1


# --- each tampering refused with its reason -----------------------------------------------------------------

def test_tampered_requests_are_refused(servers):
    url, svc, secret = servers[0].url, svc_name("s_signed"), SECRET["signed"]
    query = [("post_id", "1"), ("post_id", "2"), ("user_id", "u")]

    def get() -> httpx.Request:
        return sign(build(url, "GET", "/getlist", query, svc), secret, svc)

    ok(send(get()))  # untouched, it is accepted
    target = str(get().url)
    cases = {
        "changed method": resend(sign(build(url, "POST", "/getlist", query, svc), secret, svc), method="GET"),
        "changed path": resend(get(), url=target.replace("/getlist", "/getlike")),
        "query parameter added": resend(get(), url=target + "&limit=5"),
        "query parameter removed": resend(get(), url=target.replace("&user_id=u", "")),
        "query values reordered": resend(get(), url=target.replace("post_id=1&post_id=2", "post_id=2&post_id=1")),
        "query value changed": resend(get(), url=target.replace("user_id=u", "user_id=v")),
        "svc changed": resend(get(), url=target.replace(f"svc={svc}", f"svc={svc_name('s_any')}")),
        "signature altered": resend(get(), set_headers={"signature": "im=:" + base64.b64encode(b"x" * 32).decode() + ":"}),
        "wrong secret": sign(build(url, "GET", "/getlist", query, svc), SECRET["any"], svc),
    }
    for name, request in cases.items():
        response = send(request)
        assert response.headers.get("im-auth-error") == "bad-signature", name
        refused(response, "bad-signature")


def test_tampered_bodies_are_refused(servers):
    url, svc, secret = servers[0].url, svc_name("s_signed"), SECRET["signed"]

    def post() -> httpx.Request:
        return sign(build(url, "POST", "/publish", [], svc, data={"author": "eve", "content": "original"}), secret, svc)

    ok(send(post()))  # untouched, it is accepted
    body = post().read()
    other = body.replace(b"original", b"origimal")
    other_digest = "sha-256=:" + base64.b64encode(hashlib.sha256(other).digest()).decode() + ":"
    cases = {
        "a body byte changed": (resend(post(), content=other), "digest-mismatch"),
        "content-digest removed": (resend(post(), drop=("content-digest",)), "digest-mismatch"),
        "content-digest altered": (resend(post(), drop=("content-digest",),
                                          set_headers={"content-digest": other_digest}), "digest-mismatch"),
        "body and digest changed together": (resend(post(), content=other, drop=("content-digest",),
                                                    set_headers={"content-digest": other_digest}), "bad-signature"),
        "body not covered": (sign(build(url, "POST", "/publish", [], svc, data={"author": "e", "content": "c"}),
                                  secret, svc, digest=False), "digest-mismatch"),
        "json body of a PUT changed": (resend(sign(build(url, "PUT", "/like", [("post_id", 1), ("user_id", "u")], svc,
                                                         json={"like": True}), secret, svc),
                                              content=b'{"like":false}'), "digest-mismatch"),
    }
    for name, (request, reason) in cases.items():
        response = send(request)
        assert response.headers.get("im-auth-error") == reason, name
        refused(response, reason)


async def test_nothing_is_written_by_a_refused_write(servers, db):
    url, svc, secret = servers[0].url, svc_name("s_signed"), SECRET["signed"]
    ok(send(sign(build(url, "GET", "/getlist", [], svc), secret, svc)))  # tables exist
    before = await table_counts(db, svc)
    request = sign(build(url, "POST", "/publish", [], svc, data={"author": "eve", "content": "x"}), secret, svc)
    refused(send(resend(request, content=request.read().replace(b"x", b"y"))), "digest-mismatch")
    assert await table_counts(db, svc) == before


def test_created_outside_the_window_is_expired(servers):
    url, svc, secret = servers[0].url, svc_name("s_signed"), SECRET["signed"]
    for offset in (-120, 120, -3600):
        request = sign(build(url, "GET", "/getlist", [], svc), secret, svc, created=time.time() + offset)
        refused(send(request), "expired")
    ok(send(sign(build(url, "GET", "/getlist", [], svc), secret, svc, created=time.time() - 30)))


def test_a_nonce_is_single_use_across_processes(servers):
    first, second = servers
    svc, secret = svc_name("s_signed"), SECRET["signed"]
    request = sign(build(first.url, "GET", "/getlist", [], svc), secret, svc)
    ok(send(request))
    refused(send(resend(request)), "replayed")
    refused(send(resend(request, url=str(request.url).replace(first.url, second.url))), "replayed")
    nonce = secrets.token_hex(16)  # the same nonce in another, valid, request is a replay too
    ok(send(sign(build(second.url, "GET", "/getlist", [], svc), secret, svc, nonce=nonce)))
    refused(send(sign(build(first.url, "GET", "/getlist", [("limit", "3")], svc), secret, svc, nonce=nonce)),
            "replayed")


def test_keyid_must_be_the_service(servers):
    url, svc = servers[0].url, svc_name("s_signed")
    other = svc_name("s_any")
    refused(send(sign(build(url, "GET", "/getlist", [], svc), SECRET["any"], other)), "bad-signature")
    refused(send(sign(build(url, "GET", "/getlist", [], svc), SECRET["signed"], other)), "bad-signature")


def test_unknown_and_missing_service(servers):
    url = servers[0].url
    refused(send(sign(build(url, "GET", "/getlist", [], "nosuchsvc"), SECRET["any"], "nosuchsvc")), "unknown-service")
    refused(send(sign(build(url, "GET", "/getlist", []), SECRET["any"], "x")), "missing")
    refused(send(build(url, "GET", "/getlist", [("appKey", im_backend.encrypt_appkey(SECRET["any"]))])), "missing")


def test_appkey_failures_carry_their_reason(servers):
    url, svc = servers[0].url, svc_name("s_any")
    now = int(time.time())
    cases = {
        "missing": [],
        "malformed": [("appKey", "zz" * 20)],
        "bad-appkey": [("appKey", im_backend.encrypt_appkey("Q" * 16))],
        "expired": [("appKey", im_backend.encrypt_appkey(SECRET["any"], now - 60))],
    }
    for reason, query in cases.items():
        refused(send(build(url, "GET", "/getlist", query, svc)), reason)
    refused(send(build(url, "GET", "/getlist", [("appKey", "00" * 16)], svc)), "malformed")
    refused(send(build(url, "GET", "/getlist", [("appKey", im_backend.encrypt_appkey(SECRET["any"]))],
                       "nosuchsvc")), "unknown-service")


# --- malformed headers: always 400 with a reason, never a 500 ---------------------------------------------

def malformed_cases(svc: str) -> list[dict[str, str]]:
    now = int(time.time())
    nonce = secrets.token_hex(16)
    good = f'im=("@method" "@path" "@query");created={now};nonce="{nonce}";keyid="{svc}";alg="hmac-sha256"'
    sig = "im=:" + base64.b64encode(b"x" * 32).decode() + ":"
    return [
        {"signature-input": good},  # no Signature
        {"signature": sig},  # no Signature-Input
        {"signature-input": "(((", "signature": sig},
        {"signature-input": good, "signature": "im=notbytes"},
        {"signature-input": good, "signature": "other=:" + base64.b64encode(b"x").decode() + ":"},
        {"signature-input": good.replace('"@query"', ""), "signature": sig},  # @query not covered
        {"signature-input": good.replace('"@method" ', ""), "signature": sig},
        {"signature-input": good.replace('"@path"', '"@path" "@path"'), "signature": sig},
        {"signature-input": good.replace('"@path"', '"@path";req'), "signature": sig},
        {"signature-input": good.replace('"@path"', '"@target-uri"'), "signature": sig},
        {"signature-input": good.replace('"@query"', '"@query" "x-not-sent"'), "signature": sig},
        {"signature-input": good.replace('"@query"', '"@query" "X-Upper"'), "signature": sig},
        {"signature-input": good.replace(f"created={now}", 'created="now"'), "signature": sig},
        {"signature-input": good.replace(f"created={now};", ""), "signature": sig},
        {"signature-input": good.replace(f'nonce="{nonce}"', 'nonce="short"'), "signature": sig},
        {"signature-input": good.replace(f'nonce="{nonce}";', ""), "signature": sig},
        {"signature-input": good.replace(f'nonce="{nonce}"', "nonce=" + "a" * 80), "signature": sig},
        {"signature-input": good.replace("hmac-sha256", "rsa-pss-sha512"), "signature": sig},
        {"signature-input": good.replace(f'keyid="{svc}"', "keyid=1"), "signature": sig},
        {"signature-input": good.replace(f"created={now}", f"created={now};expires=soon"), "signature": sig},
        {"signature-input": "im=" + "(" * 5000, "signature": sig},
        {"signature-input": good + "," * 3, "signature": sig},
        {"signature-input": "im=?1", "signature": sig},
        {"signature-input": good, "signature": "im=(1 2)"},
        {"signature-input": good, "signature": sig + ", im=:AAAA:"},
        {"signature-input": "é" + good, "signature": sig},
        {"signature-input": "", "signature": ""},
    ]


def test_malformed_signature_headers(servers):
    url, svc = servers[0].url, svc_name("s_signed")
    with httpx.Client(timeout=30) as client:
        for i, headers in enumerate(malformed_cases(svc)):
            encoded = [(k.encode(), v.encode("utf-8")) for k, v in headers.items()]
            response = client.get(url + "/api/v1/posts/getlist", params={"svc": svc}, headers=encoded)
            assert response.status_code == 400, (i, headers, response.text)
            assert response.json()["msg"] == "bind authentication"
            reason = response.headers.get("im-auth-error")
            # the last one: a label given twice is the last value (RFC 8941), here a wrong signature
            assert reason == ("bad-signature" if headers.get("signature", "").endswith("im=:AAAA:") else "malformed"), (
                i, headers, reason)


VISIBLE = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
FUZZ_CLIENT = httpx.Client(timeout=30)


@settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzzed_signature_headers_never_500(servers, data):
    """Mutations of a valid signature (and plain noise): a 400 with a known reason, never anything else."""
    url, svc, secret = servers[0].url, svc_name("s_signed"), SECRET["signed"]
    request = sign(build(url, "GET", "/getlist", [], svc), secret, svc)
    headers = {"signature-input": request.headers["signature-input"], "signature": request.headers["signature"]}
    name = data.draw(st.sampled_from(sorted(headers)))
    value = headers[name]
    how = data.draw(st.sampled_from(["replace", "insert", "delete", "noise"]))
    if how == "noise":
        value = data.draw(st.text(VISIBLE, max_size=300))
    else:
        at = data.draw(st.integers(0, len(value) - 1))
        piece = data.draw(st.text(VISIBLE, min_size=1, max_size=8))
        value = {"replace": value[:at] + piece + value[at + 1:], "insert": value[:at] + piece + value[at:],
                 "delete": value[:at] + value[at + 1:]}[how]
    headers[name] = value.strip(" ")  # a field value never starts or ends with a space (RFC 9110 5.5)
    response = FUZZ_CLIENT.get(str(request.url), headers=headers)
    assert response.status_code in (200, 400), (headers, response.status_code, response.text)
    if response.status_code == 400:
        assert response.json()["msg"] == "bind authentication"
        assert response.headers.get("im-auth-error") in REASONS, headers


# --- the canonical fast path reads exactly what http-sf reads ------------------------------------------------
# The fast path must be TAKEN for every canonical field (else it is dead code and the test below would prove
# nothing), agree with http-sf whenever it is taken, and decline everything else. "Canonical" is decided here
# independently of the server's regular expressions: http-sf parses the text to one member of the expected shape
# and serialises it back to exactly the same text.

def sf_parse(text: str):
    try:
        return http_sf.parse(text.encode(), tltype="dictionary")
    except Exception:
        return None


def _plain_string(value) -> bool:
    return isinstance(value, str) and '"' not in value and "\\" not in value


def _short_key(key) -> bool:
    return isinstance(key, str) and len(key) <= 64


def is_canonical_input(text: str) -> bool:
    parsed = sf_parse(text)
    if not isinstance(parsed, dict) or len(parsed) != 1:
        return False
    (label, member), = parsed.items()
    if not (_short_key(label) and isinstance(member, tuple) and isinstance(member[0], list)):
        return False
    items, params = member
    return (all(_plain_string(name) and item_params == {} for name, item_params in items)
            and all(_short_key(key) and (_plain_string(value) or (type(value) is int and abs(value) < 10 ** 15))
                    for key, value in params.items())
            and http_sf.ser(parsed) == text)


def is_canonical_signature(text: str) -> bool:
    parsed = sf_parse(text)
    if not isinstance(parsed, dict) or len(parsed) != 1:
        return False
    (label, member), = parsed.items()
    return (_short_key(label) and isinstance(member, tuple) and isinstance(member[0], bytes) and member[1] == {}
            and http_sf.ser(parsed) == text)


def check_canonical_input(text: str) -> bool:
    """The fast path agrees with http-sf when it answers, and answers for every canonical text; True if it did."""
    fast = im_backend.canonical_signature_input(text)
    if is_canonical_input(text):
        assert fast is not None, f"fast path declined a canonical Signature-Input: {text!r}"
    if fast is not None:
        assert fast == sf_parse(text), text
        assert http_sf.ser(fast) == text, text  # so the raw text is the serialised signature parameters
    return fast is not None


def check_canonical_signature(text: str) -> bool:
    fast = im_backend.canonical_signature(text)
    if is_canonical_signature(text):
        assert fast is not None, f"fast path declined a canonical Signature: {text!r}"
    if fast is not None:
        assert fast == sf_parse(text), text
    return fast is not None


def _repeats_a_parameter(text: str) -> bool:
    keys = re.findall(r';([a-z*][a-z0-9_.*-]*)=', text.partition(")")[2])
    return len(keys) != len(set(keys))


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.from_regex(im_backend._CANONICAL_INPUT, fullmatch=True))
def test_canonical_signature_input_matches_http_sf(text):
    # every text of the canonical shape is read by the fast path, except a repeated parameter (left to http-sf)
    assert check_canonical_input(text) is not _repeats_a_parameter(text), text


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.text(st.sampled_from('sig1=()"@methodpath;created=0123456789-nonce keyid\\,:*'), max_size=60))
def test_near_canonical_signature_input_matches_http_sf(text):
    check_canonical_input(text)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.one_of(st.from_regex(im_backend._CANONICAL_SIGNATURE, fullmatch=True),
                 st.text(st.sampled_from("sig1=:AQab+/= ,;"), max_size=30)))
def test_canonical_signature_matches_http_sf(text):
    check_canonical_signature(text)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(st.binary(max_size=48), st.from_regex(r"[a-z][a-z0-9_-]{0,10}", fullmatch=True))
def test_canonical_signature_taken_for_any_value(value, label):
    text = f"{label}=:{base64.b64encode(value).decode()}:"
    assert check_canonical_signature(text), text


FAST_INPUT_TAKEN = [
    'sig1=("@method" "@path" "@query");created=1700000000;keyid="s_signed";nonce="0f3a"',
    'im=("@method" "@authority" "@path" "@query" "content-digest");created=1;keyid="k";alg="hmac-sha256"',
    'sig1=();created=0',
    'sig1=("@path")',
    'a.b*c=("x");n=-123456789012345',
]
FAST_INPUT_DECLINED = [
    'sig1=("@path");created=1;created=2',            # repeated parameter: http-sf keeps the last
    'sig1=("@path"), sig2=("@query")',               # two signatures
    'sig1=(@path)',                                  # a token, not a string
    'sig1=("@path";sf)',                             # a parameter on a component
    'sig1=("a\\"b")',                                # an escaped string
    'sig1=("@path");created=01',                     # not a canonical integer
    'sig1=("@path");created=1.5',                    # a decimal
    'sig1=("@path");flag',                           # a boolean parameter
    'sig1=("@path") ',                               # trailing space
    'sig1=("@path"  "@query")',                      # two spaces
    'Sig1=("@path")',                                # not a key
    'sig1=("@path"',                                 # unparsable
]
FAST_SIGNATURE_TAKEN = ['sig1=:AQ==:', 'im=:' + base64.b64encode(bytes(range(32))).decode() + ':', 'x=::']
FAST_SIGNATURE_DECLINED = ['sig1=:AQ==:, sig2=:AQ==:', 'sig1=:AQ==:;p=1', 'sig1=:AQ=:', 'sig1="AQ=="', 'sig1=:AQ==: ',
                           'sig1=:-_8=:']


def test_canonical_fast_path_taken_and_declined():
    for text in FAST_INPUT_TAKEN:
        assert check_canonical_input(text), text
    for text in FAST_INPUT_DECLINED:
        assert im_backend.canonical_signature_input(text) is None, text
    for text in FAST_SIGNATURE_TAKEN:
        assert check_canonical_signature(text), text
    for text in FAST_SIGNATURE_DECLINED:
        assert im_backend.canonical_signature(text) is None, text


def test_fast_path_taken_for_the_independent_signers_headers():
    """What a real RFC 9421 library sends is canonical: the fast path reads it (and agrees with http-sf)."""
    request = sign(httpx.Request("POST", "http://127.0.0.1:1/api/v1/posts/add?svc=s", content=b'{"a": 1}'),
                   SECRET["signed"], "s", covered=("@method", "@path", "@query", "content-digest"))
    assert check_canonical_input(request.headers["signature-input"]), request.headers["signature-input"]
    assert check_canonical_signature(request.headers["signature"]), request.headers["signature"]
    assert check_canonical_signature(request.headers["content-digest"]), request.headers["content-digest"]


# --- Redis down: nonces in the process's memory -------------------------------------------------------------

def test_redis_down_nonces_kept_in_memory(workdir, backing):
    redis_server = RedisProcess(workdir / "sig-redis", password="sig-secret")
    cache = {"addr": redis_server.addr, "password": redis_server.password}
    server = Server(workdir / "sig-redis-down", entries_config(dict(backing, cache=cache), tenants())).start()
    try:
        url, svc, secret = server.url, svc_name("s_signed"), SECRET["signed"]
        ok(send(sign(build(url, "GET", "/getlist", [], svc), secret, svc)))
        redis_server.stop()
        for _ in range(2):
            request = sign(build(url, "GET", "/getlist", [], svc), secret, svc)
            ok(send(request))
            refused(send(resend(request)), "replayed")
        log = server.log()
        assert log.count("signature nonces are kept in this process's memory") == 1, log
        assert "Traceback" not in log
    finally:
        server.stop()
        redis_server.stop()


def test_on_a_redis_cluster_nonces_and_limits_work(workdir, backing, redis_cluster):
    """On a cluster nonces are claimed with a pipeline of single-key SETs, and the GCRA script is single-key."""
    entries = tenants() + [{"name": svc_name("s_cl_lim"), "secret": SECRET["any"],
                            "limits": {"requests_per_second": 0.02, "burst": 2}}]
    server = Server(workdir / "sig-cluster", entries_config(dict(backing, cache=dict(backing["cache"], **redis_cluster)),
                                                    entries)).start()
    try:
        url, svc, secret = server.url, svc_name("s_signed"), SECRET["signed"]
        requests = [sign(build(url, "GET", "/getlist", [("limit", str(i))], svc), secret, svc) for i in range(6)]
        for request in requests:
            ok(send(request))
        for request in requests:
            refused(send(resend(request)), "replayed")
        limited = svc_name("s_cl_lim")
        statuses = [send(build(url, "GET", "/getlist", [("appKey", im_backend.encrypt_appkey(SECRET["any"]))],
                               limited)).status_code for _ in range(4)]
        assert statuses == [200, 200, 429, 429], statuses
        assert "Redis unreachable" not in server.log()
    finally:
        server.stop()


# --- rotation -----------------------------------------------------------------------------------------------

async def test_rotation_previous_secret_until_removed_by_reload(workdir, backing):
    svc = svc_name("s_rot")
    entries = tenants()
    server = Server(workdir / "sig-rotation", entries_config(backing, entries)).start()
    try:
        url = server.url
        for secret in (SECRET["rot"], SECRET["rot_old"]):
            ok(send(sign(build(url, "GET", "/getlist", [], svc), secret, svc)))
            ok(send(build(url, "GET", "/getlist", [("appKey", im_backend.encrypt_appkey(secret))], svc)))
        entries[3] = {"name": svc, "secret": SECRET["rot"]}  # the old secret removed
        server.write_config(entries_config(backing, entries))

        async def old_refused() -> bool:
            response = send(sign(build(url, "GET", "/getlist", [], svc), SECRET["rot_old"], svc))
            return response.status_code == 400

        assert await eventually(old_refused, timeout=15)
        refused(send(sign(build(url, "GET", "/getlist", [], svc), SECRET["rot_old"], svc)), "bad-signature")
        refused(send(build(url, "GET", "/getlist", [("appKey", im_backend.encrypt_appkey(SECRET["rot_old"]))], svc)),
                "bad-appkey")
        ok(send(sign(build(url, "GET", "/getlist", [], svc), SECRET["rot"], svc)))
        server.write_config(dict(entries_config(backing, entries), svc=[dict(entries[3], auth="sometimes")]))
        await asyncio.sleep(2.5)  # a bad configuration is rejected: the last good one stays
        ok(send(sign(build(url, "GET", "/getlist", [], svc), SECRET["rot"], svc)))
        assert "rejected the new configuration" in server.log()
    finally:
        server.stop()


# --- the CLI's curl command works as printed ----------------------------------------------------------------

def test_sign_command_prints_a_working_curl(servers):
    import shlex

    first = servers[0]
    url = f"{first.url}/api/v1/posts/publish?svc={svc_name('s_signed')}"
    printed = subprocess.run([sys.executable, "im_backend.py", "sign", "--secret", SECRET["signed"], url,
                              "-d", "author=cli&content=from curl"], cwd=ROOT, capture_output=True, text=True,
                             timeout=60)
    assert printed.returncode == 0, printed.stderr
    argv = shlex.split(printed.stdout)
    assert argv[0] == "curl"
    headers = [argv[i + 1] for i, arg in enumerate(argv) if arg == "-H"]
    body = argv[argv.index("--data-binary") + 1].encode()
    request = httpx.Request(argv[argv.index("-X") + 1], argv[argv.index("-X") + 2],
                            headers=[tuple(h.split(": ", 1)) for h in headers], content=body)
    assert ok(send(request))["post_id"] > 0
    refused(send(resend(request)), "replayed")


# --- no secret in any log line ------------------------------------------------------------------------------

def walk_through(url: str) -> list[str]:
    """Requests of every kind, good and bad; returns every secret value they carried."""
    carried = list(SECRET.values())
    svc_any, svc_signed = svc_name("s_any"), svc_name("s_signed")
    for query in ([("appKey", im_backend.encrypt_appkey(SECRET["any"]))],
                  [("appKey", im_backend.encrypt_appkey(SECRET["any"], int(time.time()) - 100))],
                  [("appKey", im_backend.encrypt_appkey("Q" * 16))], [("appKey", "zz" * 20)]):
        carried.append(query[0][1])
        send(build(url, "GET", "/getlist", query, svc_any))
        send(build(url, "GET", "/nosuchpath", query, svc_any))
        send(build(url, "POST", "/publish", query + [("x", "1")], svc_any, data={"author": "a", "content": "c"}))
    for secret in (SECRET["signed"], SECRET["any"]):
        request = sign(build(url, "POST", "/publish", [], svc_signed, data={"author": "a", "content": "c"}), secret,
                       svc_signed)
        nonce = re.search(r'nonce="([^"]+)"', request.headers["signature-input"])
        assert nonce is not None
        carried += [request.headers["signature"].split(":")[1], nonce.group(1)]
        send(request)
        send(resend(request))
        send(resend(request, content=b"author=b&content=c"))
    return carried


@pytest.mark.parametrize("how", ["uvicorn", "python im_backend.py"])
def test_no_appkey_signature_nonce_or_secret_in_logs(workdir, backing, how):
    directory = workdir / f"logs-{how.split()[0]}"
    server = Server(directory, entries_config(backing, tenants()))
    if how == "uvicorn":
        server.start(access_log=True, IM_LOG_LEVEL="debug")
    else:
        server.port = free_port()
        server.url = f"http://127.0.0.1:{server.port}"
        with open(server.log_path, "ab") as log_file:
            server.process = subprocess.Popen(
                [sys.executable, "im_backend.py", "-conf", str(server.boot), "--host", "127.0.0.1", "--port",
                 str(server.port), "--log-level", "debug"], cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL)
        server.wait_ready()
    try:
        carried = walk_through(server.url)
    finally:
        server.stop()
    log = server.log()
    assert "appKey=..." in log and "GET /api/v1/posts/getlist" in log  # the access log was on
    for value in carried:
        assert value and value not in log, value
    assert "im=" not in log and "sha-256=" not in log
