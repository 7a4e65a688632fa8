"""API keys: with --api-key (here from $SGLORA_API_KEY) every endpoint but /health needs
`Authorization: Bearer`; with --admin-api-key the admin endpoints (adapter load/unload, cache
flush, abort_all) need that key instead. Each refusal: its exact status, code and OpenAI body;
keys never show in /get_server_info."""

from __future__ import annotations

import httpx
import openai
import pytest

from sglora.server.auth import APIKeys
from tests.server.conftest import ADMIN_KEY, MODEL, USER_KEY

GEN = {"text": "Hello", "sampling_params": {"max_new_tokens": 2}}
MISSING = (401, "missing_api_key")
INVALID = (401, "invalid_api_key")
DENIED = (403, "permission_denied")

# (method, path, json, Authorization header, (status, code) or status of success)
CASES = [
    ("GET", "/health", None, None, 200),
    ("GET", "/health", None, "Bearer wrong", 200),
    ("GET", "/v1/models", None, None, MISSING),
    ("GET", "/v1/models", None, "Bearer wrong", INVALID),
    ("GET", "/v1/models", None, f"Basic {USER_KEY}", MISSING),
    ("GET", "/v1/models", None, f"Bearer {USER_KEY}x", INVALID),
    ("GET", "/v1/models", None, f"bearer {USER_KEY}", 200),
    ("GET", "/v1/models", None, f"Bearer {ADMIN_KEY}", 200),
    ("POST", "/generate", GEN, None, MISSING),
    ("POST", "/generate", GEN, f"Bearer {USER_KEY}", 200),
    ("GET", "/metrics", None, None, MISSING),
    ("GET", "/get_server_info", None, "Bearer nope", INVALID),
    ("GET", "/openapi.json", None, None, MISSING),
    ("GET", "/no/such/route", None, None, MISSING),  # no route discovery without a key
    ("POST", "/flush_cache", None, None, MISSING),
    ("POST", "/flush_cache", None, f"Bearer {USER_KEY}", DENIED),
    ("POST", "/flush_cache", None, f"Bearer {ADMIN_KEY}", 200),
    ("POST", "/unload_lora_adapter", {"lora_name": "x"}, f"Bearer {USER_KEY}", DENIED),
    ("POST", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/"}, "Bearer a", INVALID),
    ("POST", "/unload_lora_adapter", {"lora_name": "nope"}, f"Bearer {ADMIN_KEY}", 404),
    ("POST", "/abort_request", {"abort_all": True}, f"Bearer {USER_KEY}", DENIED),
    ("POST", "/abort_request", {"abort_all": True}, f"Bearer {ADMIN_KEY}", 200),
]


@pytest.mark.parametrize("method,path,body,auth,expect", CASES)
def test_api_key_decides_each_endpoint(secure_server, method, path, body, auth, expect):
    headers = {"Authorization": auth} if auth else {}
    r = httpx.request(method, secure_server.url + path, json=body, headers=headers, timeout=60)
    if isinstance(expect, int):
        assert r.status_code == expect, r.text
        return
    status, code = expect
    assert r.status_code == status, r.text
    assert r.json() == {
        "error": {
            "message": r.json()["error"]["message"],
            "type": "invalid_request_error",
            "param": "abort_all" if path == "/abort_request" else None,
            "code": code,
        }
    }
    assert r.json()["error"]["message"]
    if status == 401:
        assert r.headers["www-authenticate"] == "Bearer"
    assert USER_KEY not in r.text and ADMIN_KEY not in r.text


def test_openai_client_with_and_without_the_key(secure_server):
    good = openai.OpenAI(base_url=secure_server.url + "/v1", api_key=USER_KEY, max_retries=0)
    out = good.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    assert out.choices[0].finish_reason in ("stop", "length")
    bad = openai.OpenAI(base_url=secure_server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"


def test_server_info_hides_the_keys(secure_http):
    r = secure_http.get("/get_server_info")
    assert r.status_code == 200
    info = r.json()
    assert info["api_key"] == "<set>" and info["admin_api_key"] == "<set>"
    assert USER_KEY not in r.text and ADMIN_KEY not in r.text


@pytest.mark.parametrize(
    "api,admin,path,token,allowed",
    [
        (None, None, "/v1/models", None, True),
        (None, "A", "/v1/models", None, True),  # only an admin key: user endpoints stay open
        (None, "A", "/flush_cache", None, False),
        (None, "A", "/flush_cache", b"A", True),
        ("U", None, "/flush_cache", b"U", True),  # no admin key: the user key is enough
        ("U", "A", "/health", None, True),
        ("U", "A", "/v1/models", b"A", True),
    ],
)
def test_key_rules_without_a_server(api, admin, path, token, allowed):
    assert (APIKeys(api, admin).check(path, token) is None) == allowed
