"""The contracts as documents, without a server: the OpenAPI document is valid OpenAPI 3.1
and describes exactly the routes the gateway serves; the AsyncAPI document is valid
against the official AsyncAPI 3.0.0 JSON Schema; the Idempotency-Key schema accepts
exactly what the server accepts; every 405 carries ``Allow``.

``asyncapi-3.0.0.schema.json.gz`` is ``schemas/3.0.0-without-$id.json`` of the
``@asyncapi/specs`` package 6.11.1 (Apache-2.0), the AsyncAPI Initiative's own JSON
Schema of the 3.0.0 document, gzipped.
"""

from __future__ import annotations

import copy
import functools
import gzip
import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from jsonschema import Draft7Validator, Draft202012Validator
from openapi_spec_validator import validate
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute

from deployments.gateway import Gateway, close_codes
from deployments.gateway.attachments_api import AttachmentsApi
from deployments.gateway.chats_api import ChatsApi
from deployments.http import ApiError, query_int, storable
from deployments.middleware import EXCEPTION_HANDLERS, wrap
from deployments.notifications.api import NotificationApi
from deployments.notifications.idempotency import valid_idempotency_key
from serve_app.asyncapi import CLIENT_TO_SERVER, asyncapi_document, message_for
from serve_app.openapi import docs_routes, document
from serve_app.web import web_client_routes
from settings import Settings
from stages.notifications import validate_item

HERE = Path(__file__).parent
METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}


def official_asyncapi_schema() -> dict[str, Any]:
    with gzip.open(HERE / "asyncapi-3.0.0.schema.json.gz", "rt", encoding="utf-8") as f:
        return dict(json.load(f))


def gateway_routes(tmp_path: Path) -> list[Any]:
    """The gateway's own route list (``Gateway._routes``), over inert collaborators."""
    settings = Settings(data_dir=tmp_path)
    services = SimpleNamespace(
        uploads=None, attachments=None, hub=None, outbox=None, chats=None,
        routes=[*docs_routes(settings), *web_client_routes(settings, object())])  # type: ignore[arg-type]
    fake = SimpleNamespace(
        services=services, checks={}, soft_checks={}, metrics=None,
        ws_endpoint=lambda ws: None,
        chats_api=ChatsApi(None, None, None, None),  # type: ignore[arg-type]
        attachments_api=AttachmentsApi(None, None, None, None, None, None, "r"),  # type: ignore[arg-type]
        notifications=NotificationApi(settings, None, None, None))  # type: ignore[arg-type]
    return list(Gateway.func_or_class._routes(fake))


def openapi_path(starlette_path: str) -> str:
    """``/v1/uploads/{key:path}`` → ``/v1/uploads/{key}``; parameter names are the
    document's camelCase ones."""
    path = re.sub(r"\{(\w+)(:\w+)?\}", r"{\1}", starlette_path)
    renames = {"{chat_id}": "{chatId}", "{attachment_id}": "{attachmentId}",
               "{notification_id}": "{id}"}
    for old, new in renames.items():
        path = path.replace(old, new)
    return path


def test_openapi_document_is_valid_openapi_3_1() -> None:
    doc = document()
    validate(doc)
    assert doc["openapi"] == "3.1.0"


def test_every_route_the_gateway_serves_is_documented_and_nothing_else(tmp_path: Path) -> None:
    served: set[tuple[str, str]] = set()
    sockets = []
    for route in gateway_routes(tmp_path):
        if isinstance(route, WebSocketRoute):
            sockets.append(route.path)
            continue
        assert isinstance(route, Route)
        for method in route.methods or ():
            if method != "HEAD":  # Starlette answers HEAD wherever GET is served
                served.add((openapi_path(route.path), method.lower()))
    doc = document()
    documented = {(path, method) for path, item in doc["paths"].items()
                  for method in item if method in METHODS}
    assert served == documented
    # The socket is AsyncAPI's: its channel has the route's address.
    assert sockets == [asyncapi_document()["channels"]["socket"]["address"]]


def test_every_operation_has_an_id_security_and_its_error_answers() -> None:
    doc = document()
    schemes = set(doc["components"]["securitySchemes"])
    ids = []
    for path, item in doc["paths"].items():
        for method, op in item.items():
            ids.append(op["operationId"])
            statuses = set(op["responses"])
            assert "500" in statuses, (method, path)
            for requirement in op.get("security", []):
                assert set(requirement) <= schemes
            if op.get("security"):
                assert "401" in statuses, (method, path)
                shape = "Problem" if path.startswith("/v1/notifications") else "Error"
                body = op["responses"]["401"]["content"]["application/json"]["schema"]
                assert body == {"$ref": f"#/components/schemas/{shape}"}, (method, path)
            if "requestBody" in op and not path.startswith("/v1/uploads/"):
                assert "413" in statuses, (method, path)
    assert len(ids) == len(set(ids))


def test_every_documented_example_fits_its_schema() -> None:
    doc = document()
    checked = 0

    def check(schema: dict[str, Any], value: Any, where: str) -> None:
        nonlocal checked
        errors = list(Draft202012Validator({**schema, "components": doc["components"]})
                      .iter_errors(value))
        assert not errors, (where, [e.message for e in errors])
        checked += 1

    for path, item in doc["paths"].items():
        for method, op in item.items():
            bodies = [("request", op.get("requestBody", {}).get("content", {}))]
            bodies += [(status, r.get("content", {})) for status, r in op["responses"].items()]
            for where, content in bodies:
                for media in content.values():
                    examples = [media["example"]] if "example" in media else []
                    examples += [e["value"] for e in media.get("examples", {}).values()]
                    if where == "request" and path == "/v1/notifications":
                        continue  # its refused examples show what the schema refuses
                    for example in examples:
                        check(media["schema"], example, f"{method} {path} {where}")
    assert checked >= 30


def test_the_error_shapes_are_named_per_path_in_the_description() -> None:
    text = document()["info"]["description"]
    assert '{"error": {"code": "…", "message": "…"}}' in text
    assert '{"error": "HTTP 400 Bad Request"' in text


# --- Idempotency-Key: the schema's pattern is the server's rule --------------------------
# An HTTP field value is latin-1 text without CR, LF or NUL (the server's parser refuses
# those), as Starlette decodes it.
HEADER_TEXT = st.text(st.characters(min_codepoint=1, max_codepoint=255,
                                    blacklist_characters="\r\n"), max_size=300)


@functools.cache
def idempotency_schema() -> Draft202012Validator:
    op = document()["paths"]["/v1/notifications"]["post"]
    (param,) = [p for p in op["parameters"] if p["name"] == "Idempotency-Key"]
    return Draft202012Validator(param["schema"])


@hypothesis_settings(deadline=None)
@given(HEADER_TEXT)
def test_the_idempotency_key_schema_accepts_exactly_what_the_server_accepts(key: str) -> None:
    assert idempotency_schema().is_valid(key) == valid_idempotency_key(key)


@pytest.mark.parametrize("key", ["k\x7f", "k\xa0", "k\x00x", "k\tx", "é", " k", "k ", "x" * 256, ""])
def test_keys_with_non_printable_or_non_ascii_characters_are_refused_by_both(key: str) -> None:
    assert not valid_idempotency_key(key)
    assert not idempotency_schema().is_valid(key)


@pytest.mark.parametrize("key", ["k", "order-42", "a b", "~" * 255, "!\"#$%&'()*+,-./:;<=>?@[]^_`{|}"])
def test_printable_ascii_keys_are_accepted_by_both(key: str) -> None:
    assert valid_idempotency_key(key) and idempotency_schema().is_valid(key)


# --- 405 carries Allow ---------------------------------------------------------------------
async def _ok(request: Request) -> Response:
    return Response("ok")


def split_app() -> Any:
    """One route per method on each path, as the gateway declares them, and the web
    client's literal route beside its catch-all."""
    return wrap(Starlette(routes=[
        Route("/v1/chats", _ok, methods=["POST"]), Route("/v1/chats", _ok, methods=["GET"]),
        Route("/v1/notifications", _ok, methods=["POST"]),
        Route("/v1/uploads/{key:path}", _ok, methods=["PUT"]),
        Route("/v1/uploads/{key:path}", _ok, methods=["GET"]),
        *web_client_routes(Settings(), object()),  # type: ignore[arg-type]
    ], exception_handlers=EXCEPTION_HANDLERS), timeout_s=5, max_body_bytes=1000)


@pytest.mark.parametrize(("method", "path", "allow", "body"), [
    ("DELETE", "/v1/chats", "GET, HEAD, POST",
     {"error": {"code": "method_not_allowed", "message": "Method Not Allowed"}}),
    ("PATCH", "/v1/uploads/a/b", "GET, HEAD, PUT",
     {"error": {"code": "method_not_allowed", "message": "Method Not Allowed"}}),
    ("OPTIONS", "/app/dev-token", "POST",
     {"error": {"code": "method_not_allowed", "message": "Method Not Allowed"}}),
    ("GET", "/app/dev-token", "POST",  # not one of the client's files
     {"error": {"code": "method_not_allowed", "message": "Method Not Allowed"}}),
    ("PUT", "/app/app.js", "GET, HEAD",
     {"error": {"code": "method_not_allowed", "message": "Method Not Allowed"}}),
    ("GET", "/v1/notifications", "POST",
     {"error": "HTTP 405 Method Not Allowed", "message": "Метод не поддерживается",
      "code": "method_not_allowed"}),
])
async def test_every_405_lists_every_method_of_the_resource(method: str, path: str, allow: str,
                                                           body: dict[str, Any]) -> None:
    transport = httpx.ASGITransport(app=split_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as c:
        r = await c.request(method, path)
    assert r.status_code == 405
    assert r.headers.get_list("allow") == [allow]
    assert r.json() == body


async def test_an_unknown_path_is_404_without_allow() -> None:
    transport = httpx.ASGITransport(app=split_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as c:
        r = await c.delete("/v1/nothing")
    assert r.status_code == 404 and "allow" not in r.headers


# --- AsyncAPI -----------------------------------------------------------------------------
def test_asyncapi_document_is_valid_against_the_official_3_0_0_schema() -> None:
    validator = Draft7Validator(official_asyncapi_schema())
    doc = asyncapi_document()
    assert [e.message for e in validator.iter_errors(doc)] == []
    # The schema is not a rubber stamp: a 2.x-style action is refused.
    broken = copy.deepcopy(doc)
    broken["operations"]["receiveChat"]["action"] = "publish"
    assert not validator.is_valid(broken)


def _resolve(doc: dict[str, Any], ref: str) -> Any:
    node: Any = doc
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


def test_every_reference_of_the_asyncapi_document_resolves() -> None:
    doc = asyncapi_document()
    refs: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                refs.append(node["$ref"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(doc)
    assert len(refs) > 40
    for ref in refs:
        _resolve(doc, ref)  # KeyError when dangling


def test_every_frame_type_of_the_protocol_has_a_message_and_its_example_fits() -> None:
    doc = asyncapi_document()
    components = doc["components"]
    client_types = {"chat", "signal", "attachment", "command", "receipt", "sync", "ping"}
    server_types = {"ack", "message", "signal", "command", "system", "sync", "error", "pong"}
    system_events = {"connected", "credits_low", "credits_exhausted", "overload", "presence",
                     "reconnect", "receipt", "attachment_rejected", "slow_consumer"}
    seen: dict[str, set[str]] = {"client-to-server": set(), "server-to-client": set()}
    events = set()
    for name, message in components["messages"].items():
        examples = message["examples"]
        assert examples, name
        if len(examples) > 1:  # several: each named, to tell them apart
            assert len({e.get("name") for e in examples}) == len(examples), name
            assert all(e.get("name") and e.get("summary") for e in examples), name
        for example in examples:
            frame = example["payload"]
            direction = message["x-direction"]
            assert message_for(doc, frame, direction) == name
            validator = Draft202012Validator({**message["payload"], "components": components})
            assert validator.is_valid(frame), (name, example.get("name"))
            seen[direction].add(frame["type"])
            if frame["type"] == "system":
                events.add(frame["event"])
    assert seen["client-to-server"] == client_types
    assert seen["server-to-client"] == server_types
    assert events == system_events
    # Client frames are received, server frames sent, by operations on the one channel.
    actions = {op["messages"][0]["$ref"].rsplit("/", 1)[-1]: op["action"]
               for op in doc["operations"].values()}
    assert {n for n, a in actions.items() if a == "receive"} == set(CLIENT_TO_SERVER)
    assert len(actions) == len(components["messages"])


# --- input PostgreSQL cannot take, integers Python's int() is too lenient about -------------
@pytest.mark.parametrize("raw", ["1_0", " 1", "+1", "\u0663", "1.0", "", "9" * 21])
def test_query_integers_are_plain_decimal(raw: str) -> None:
    scope = {"type": "http", "query_string": f"limit={raw}".encode(), "headers": []}
    with pytest.raises(ApiError) as refused:
        query_int(Request(scope), "limit", 50)
    assert (refused.value.status, refused.value.code) == (400, "invalid")


def test_query_integers_parse_and_default() -> None:
    def request(query: bytes) -> Request:
        return Request({"type": "http", "query_string": query, "headers": []})

    assert query_int(request(b"limit=-3"), "limit", 50) == -3
    assert query_int(request(b""), "limit", 50) == 50


def test_nul_is_the_one_character_postgresql_cannot_store() -> None:
    assert storable("any text: ünïcødé, emoji 👍, \x01 controls")
    assert not storable("a\x00b")


def test_every_close_code_the_gateway_uses_is_documented() -> None:
    codes = {str(v) for k, v in vars(close_codes).items() if k.isupper() and isinstance(v, int)
             and k != "MAX_REASON_BYTES"}
    documented = asyncapi_document()["channels"]["socket"]["x-close-codes"]
    assert set(documented) == codes
    assert all(code in asyncapi_document()["channels"]["socket"]["description"]
               for code in codes)


def test_a_notification_message_with_nul_is_refused_by_the_server_and_its_schema() -> None:
    item = {"contacts": [{"type": "email", "value": "a@b.co"}], "message": "a\x00b"}
    normalised, issues = validate_item(item)
    assert normalised is None
    assert issues == [{"code": "invalid_string", "message": "String must not contain U+0000",
                       "path": ["message"]}]
    doc = document()
    schema = Draft202012Validator({"$ref": "#/components/schemas/IncomingNotification",
                                   "components": doc["components"]})
    assert not schema.is_valid(item) and schema.is_valid({**item, "message": "ab"})


async def test_every_documented_path_answers_other_methods_405_with_its_documented_allow(
        tmp_path: Path) -> None:
    """On the gateway's real route list: a method the document does not give a path is
    refused before any handler runs, and ``Allow`` is exactly the documented methods."""
    app = wrap(Starlette(routes=gateway_routes(tmp_path), exception_handlers=EXCEPTION_HANDLERS),
               timeout_s=5, max_body_bytes=1000)
    transport = httpx.ASGITransport(app=app)
    checked = 0
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as c:
        for path, item in document()["paths"].items():
            concrete = re.sub(r"\{\w+\}", "x", path)
            documented_methods = {m.upper() for m in item}
            allow = documented_methods | ({"HEAD"} if "GET" in documented_methods else set())
            for method in ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
                if method in documented_methods:
                    continue
                r = await c.request(method, concrete)
                assert r.status_code == 405, (method, path, r.status_code)
                assert set(r.headers["allow"].split(", ")) == allow, (method, path)
                checked += 1
    assert checked > 80


@pytest.mark.parametrize(("value", "valid"), [
    (2**63 - 1, True), (2**63, False), (1.5e37, False), (12345.0, True)])
def test_a_bitrix_id_beyond_int64_is_refused_by_the_server_and_its_schema(
        value: float, valid: bool) -> None:
    item = {"contacts": [{"type": "bitrix", "value": value}], "message": "hi"}
    normalised, issues = validate_item(item)
    assert (normalised is not None) == valid, issues
    if not valid:
        assert issues == [{"code": "too_big", "path": ["contacts", 0, "value"],
                           "message": "Number must be less than or equal to 9223372036854775807"}]
    schema = Draft202012Validator({"$ref": "#/components/schemas/IncomingNotification",
                                   "components": document()["components"]})
    assert schema.is_valid(item) == valid
