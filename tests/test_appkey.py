"""The appKey: real crypto-js vectors, and every malformed key answered 400 bind authentication."""
import asyncio
import json
import pathlib
import time

import pytest

import im_backend
from conftest import expect

# appKeys made by the crypto-js client (README, "The appKey"), with the secret and time each holds.
VECTORS = json.loads((pathlib.Path(__file__).parent / "appkey_vectors.json").read_text())["vectors"]


@pytest.mark.parametrize("vector", VECTORS, ids=lambda v: f"{len(v['secret'])}-{v['timestamp']}")
def test_crypto_js_vectors_decrypt(vector):
    assert im_backend.decrypt_appkey(vector["secret"], vector["appKey"]) == int(vector["timestamp"])


def test_wrong_secret_does_not_decrypt_to_a_timestamp():
    vector = VECTORS[0]
    assert im_backend.decrypt_appkey("X" * 16, vector["appKey"]) != int(vector["timestamp"])


@pytest.mark.parametrize("secret", ["W7K8pJ3aQv2LcXgH", "Ab9xQ2mZ7kLp4sT1uV6wY3e8", "0123456789abcdef0123456789abcdef"])
def test_round_trip(secret):
    assert im_backend.decrypt_appkey(secret, im_backend.encrypt_appkey(secret, 1739000000)) == 1739000000


def bad_keys(secret: str) -> dict[str, str]:
    now = int(time.time())
    fresh = im_backend.encrypt_appkey(secret)
    return {
        "empty": "",
        "non-hex": "zz" * 20,
        "odd length": fresh[:-1],
        "shorter than 17 bytes": fresh[:32],
        "exactly the IV": fresh[:32],
        "one byte of ciphertext, not an integer": "00" * 16 + "ff",
        "expired": im_backend.encrypt_appkey(secret, now - 60),
        "from the future": im_backend.encrypt_appkey(secret, now + 60),
        "wrong secret": im_backend.encrypt_appkey("Q" * 16),
        "huge": "ab" * 5000,
        "unicode": "é" * 40,
        "crypto-js vector from 2023": VECTORS[0]["appKey"],
    }


@pytest.mark.parametrize("case", list(bad_keys("W7K8pJ3aQv2LcXgH")))
async def test_bad_appkeys_are_400(api, client, case):
    key = bad_keys(api.secret)[case]
    response = await client.get("/api/v1/posts/getlist", params={"svc": api.svc, "appKey": key})
    assert response.status_code == 400
    assert response.json() == {"code": 400, "msg": "bind authentication", "data": None}


async def test_missing_or_unknown_service(api, client):
    key = im_backend.encrypt_appkey(api.secret)
    for params in ({"appKey": key}, {"svc": api.svc}, {"svc": "nosuchsvc", "appKey": key}, {}):
        response = await client.get("/api/v1/posts/getlist", params=params)
        assert response.status_code == 400 and response.json()["msg"] == "bind authentication"


async def test_a_tenant_key_does_not_open_another_tenant(api, api_b, client):
    key = im_backend.encrypt_appkey(api.secret)
    response = await client.get("/api/v1/posts/getlist", params={"svc": api_b.svc, "appKey": key})
    assert response.json()["msg"] == "bind authentication"


async def test_auth_runs_before_parameter_checks(api, client):
    response = await client.get("/api/v1/posts/getinfo", params={"svc": api.svc, "appKey": "00", "post_id": "x"})
    assert response.json()["msg"] == "bind authentication"


async def test_window_is_checked_on_every_request(api, client):
    """A key remembered from an earlier request is still refused once it is out of the window."""
    key = im_backend.encrypt_appkey(api.secret, int(time.time()) - 9)
    first = await client.get("/api/v1/posts/getlist", params={"svc": api.svc, "appKey": key})
    assert first.json()["code"] == 200
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        later = await client.get("/api/v1/posts/getlist", params={"svc": api.svc, "appKey": key})
        if later.json()["code"] == 400:
            break
        await asyncio.sleep(0.25)
    expect((later.status_code, later.json()), 400, "bind authentication")


def test_a_remembered_appkey_counts_only_while_its_secret_is_accepted():
    """The checker remembers decryptions (the hot path skips AES on a repeated appKey): a remembered appKey made
    with a secret that rotation has since removed is refused, one made with a previous secret still counts."""
    checker = im_backend.AppKeyChecker()
    old, new = "0123456789abcdef", "fedcba9876543210"
    appkey = im_backend.encrypt_appkey(old)
    checker.check(im_backend.Tenant("svc", old), appkey)  # decrypted and remembered
    checker.check(im_backend.Tenant("svc", new, previous_secrets=(old,)), appkey)  # rotating: still accepted
    with pytest.raises(im_backend.AuthFailure) as refused:
        checker.check(im_backend.Tenant("svc", new), appkey)  # rotation done: the old secret is gone
    assert refused.value.reason == "bad-appkey"
