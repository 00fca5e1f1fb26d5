"""The web client's routes in-process (Starlette's test client, no Ray): the page and its
modules, the sign-in configuration, dev tokens only when a dev issuer is given, typed
errors, and nothing of the server imported by the package."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from webclient import web_routes
from webclient.routes import STATIC

OIDC = {"issuer": "https://sso.example.test/realms/acme", "clientId": "conveyor-web",
        "authorizationEndpoint": "https://sso.example.test/realms/acme/protocol/openid-connect/auth",
        "tokenEndpoint": "https://sso.example.test/realms/acme/protocol/openid-connect/token"}


def client(**kw: object) -> TestClient:
    kw.setdefault("dev_token", None)
    kw.setdefault("oidc", None)
    return TestClient(Starlette(routes=web_routes(**kw)))  # type: ignore[arg-type]


def test_page_and_modules_are_served_with_a_same_origin_policy() -> None:
    c = client()
    r = c.get("/app", follow_redirects=False)
    assert r.status_code == 308 and r.headers["location"] == "app/"
    page = c.get("/app/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp
    js = c.get("/app/main.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert c.get("/app/app.css").headers["content-type"].startswith("text/css")
    for bad in ("/app/nope.js", "/app/%2e%2e/routes.py", "/app/..%2Froutes.py", "/app/__init__.py"):
        r = c.get(bad)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", bad


def test_static_files_reference_nothing_outside_the_origin() -> None:
    for f in STATIC.iterdir():
        text = f.read_text()
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", ""), f.name
        assert "https://" not in text, f.name
        assert "@import" not in text and "fonts." not in text, f.name


def test_config_names_the_sign_in_mode() -> None:
    assert client(dev_token=lambda u: "t").get("/app/config.json").json() == {"auth": {"mode": "dev"}}
    assert client().get("/app/config.json").json() == {"auth": {"mode": "token"}}
    got = client(oidc=OIDC).get("/app/config.json").json()["auth"]
    assert got["mode"] == "oidc" and got["scope"] == "openid"
    assert {k: got[k] for k in OIDC} == OIDC
    # The page may call the issuer's token endpoint (and nothing else outside).
    csp = client(oidc=OIDC).get("/app/").headers["content-security-policy"]
    assert "connect-src 'self' https://sso.example.test;" in csp


def test_oidc_config_must_be_complete() -> None:
    with pytest.raises(ValueError, match="tokenEndpoint"):
        web_routes(dev_token=None, oidc={k: v for k, v in OIDC.items() if k != "tokenEndpoint"})


def test_dev_token_exists_only_with_a_dev_issuer_and_validates_the_user() -> None:
    off = client().post("/app/dev-token", json={"userId": "alice"})
    assert off.status_code == 404 and off.json()["error"]["code"] == "not_found"
    issued: list[str] = []
    c = client(dev_token=lambda u: issued.append(u) or f"token-for-{u}")
    ok = c.post("/app/dev-token", json={"userId": "alice.b@x"})
    assert ok.status_code == 200 and ok.json()["token"] == "token-for-alice.b@x"
    assert ok.headers["cache-control"] == "no-store"
    for body in ({"userId": ""}, {"userId": "-x"}, {"userId": "a b"}, {"userId": "x" * 65},
                 {"userId": 7}, {}, ["alice"]):
        r = c.post("/app/dev-token", json=body)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid", body
    r = c.post("/app/dev-token", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid"
    assert issued == ["alice.b@x"]


def test_webclient_imports_nothing_of_the_server() -> None:
    forbidden = {"serve_app", "deployments", "cluster", "adapters", "stages"}
    for f in Path(STATIC.parent).glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not {n.split(".")[0] for n in names} & forbidden, (f.name, names)
