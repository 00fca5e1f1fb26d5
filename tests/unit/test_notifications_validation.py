"""Per-item validation of the notification contract (no Ray, no database)."""

from __future__ import annotations

from typing import Any

import pytest

from stages.model import Envelope, Verdict
from stages.notifications import (
    STRATEGIES,
    Limits,
    PersistNotification,
    RouteNotification,
    ValidateNotification,
    rfc3339_ms,
    validate_item,
)
from stages.resolver import StageRegistry, StageSpec
from tests.fakes import FakeKick, FakeNotificationStore


def codes(issues: list[dict[str, Any]]) -> list[tuple[str, list[Any]]]:
    return [(i["code"], i["path"]) for i in issues]


def test_seed_example_is_valid_and_normalised() -> None:
    item = {"contacts": [{"type": "email", "value": "user@company.com"},
                         {"type": "bitrix", "value": 12345}],
            "message": "Ваш заказ №12345 готов к выдаче", "isImmediate": True,
            "strategy": "send_to_first_available"}
    n, issues = validate_item(item)
    assert issues == []
    assert n == item


def test_defaults_are_first_available_and_not_immediate() -> None:
    n, _ = validate_item({"contacts": [{"type": "bitrix", "value": 1}], "message": "x"})
    assert n is not None
    assert n["strategy"] == "send_to_first_available"
    assert n["isImmediate"] is False


def test_empty_contacts_gives_the_seed_error() -> None:
    n, issues = validate_item({"contacts": [], "message": "Hi"})
    assert n is None
    # exactly the seed's {code, message, path}: no extra keys
    assert issues == [{"code": "too_small", "message": "List must contain at least 1 element(s)",
                       "path": ["contacts"]}]


def test_seed_failure_item_reports_contacts_and_message() -> None:
    _, issues = validate_item({"contacts": [], "message": ""})
    assert codes(issues) == [("too_small", ["contacts"]), ("too_small", ["message"])]
    assert issues[1]["message"] == "String must contain at least 1 character(s)"


@pytest.mark.parametrize("key", ["id", "subject", "extra"])
def test_server_fields_and_unknown_keys_are_unrecognized(key: str) -> None:
    _, issues = validate_item({"contacts": [{"type": "email", "value": "a@b.co"}], "message": "m",
                               key: "x"})
    assert codes(issues) == [("unrecognized_keys", [])]
    assert issues[0] == {"code": "unrecognized_keys", "path": [],
                         "message": f"Unrecognized key(s) in object: '{key}'"}


@pytest.mark.parametrize("value", ["not-an-email", "a@b", "a..b@c.com", "@c.com", "a b@c.com",
                                   "x@y.com\r\nBcc: z@w.com"])
def test_email_values_must_be_emails(value: str) -> None:
    _, issues = validate_item({"contacts": [{"type": "email", "value": value}], "message": "m"})
    assert issues == [{"code": "invalid_string", "message": "Invalid email",
                       "path": ["contacts", 0, "value"]}]


@pytest.mark.parametrize("value, code", [(0, "too_small"), (-5, "too_small"), (1.5, "invalid_type"),
                                         ("123", "invalid_type"), (True, "invalid_type"),
                                         (None, "invalid_type")])
def test_bitrix_values_are_positive_integers(value: Any, code: str) -> None:
    _, issues = validate_item({"contacts": [{"type": "bitrix", "value": value}], "message": "m"})
    assert codes(issues) == [(code, ["contacts", 0, "value"])]


def test_bitrix_integral_float_is_accepted_as_integer() -> None:
    n, _ = validate_item({"contacts": [{"type": "bitrix", "value": 7.0}], "message": "m"})
    assert n is not None and n["contacts"][0]["value"] == 7 and isinstance(n["contacts"][0]["value"], int)


def test_unknown_contact_type_and_strategy_are_enum_errors() -> None:
    _, issues = validate_item({"contacts": [{"type": "sms", "value": "1"}], "message": "m",
                               "strategy": "send_to_some"})
    assert codes(issues) == [("invalid_enum_value", ["contacts", 0, "type"]),
                             ("invalid_enum_value", ["strategy"])]
    assert issues[0]["message"] == "Invalid enum value. Expected 'email' | 'bitrix', received 'sms'"
    assert issues[1]["message"] == ("Invalid enum value. Expected "
                                    + " | ".join(f"'{s}'" for s in STRATEGIES) + ", received 'send_to_some'")


def test_types_are_checked() -> None:
    _, issues = validate_item({"contacts": "a@b.co", "message": 5, "isImmediate": "yes"})
    assert codes(issues) == [("invalid_type", ["contacts"]), ("invalid_type", ["message"]),
                             ("invalid_type", ["isImmediate"])]
    assert issues[0]["message"] == "Expected array, received string"
    assert issues[1]["message"] == "Expected string, received number"


def test_missing_fields_are_required() -> None:
    _, issues = validate_item({})
    assert [(i["code"], i["message"], i["path"]) for i in issues] == [
        ("invalid_type", "Required", ["contacts"]), ("invalid_type", "Required", ["message"])]


def test_non_object_item() -> None:
    _, issues = validate_item("hello")
    assert issues[0]["code"] == "invalid_type" and issues[0]["path"] == []
    assert issues[0]["message"] == "Expected object, received string"


def test_contact_with_extra_key_and_too_many_contacts() -> None:
    _, issues = validate_item({"contacts": [{"type": "email", "value": "a@b.co", "name": "A"}],
                               "message": "m"})
    assert codes(issues) == [("unrecognized_keys", ["contacts", 0])]
    _, issues = validate_item({"contacts": [{"type": "bitrix", "value": 1}] * 21, "message": "m"})
    assert codes(issues) == [("too_big", ["contacts"])]


def test_too_long_message_is_too_big() -> None:
    _, issues = validate_item({"contacts": [{"type": "bitrix", "value": 1}], "message": "x" * 10_001})
    assert codes(issues) == [("too_big", ["message"])]


def test_every_issue_is_exactly_code_message_path() -> None:
    bad = [{"contacts": "x", "message": 5, "isImmediate": "y", "strategy": "z", "id": 1},
           {"contacts": [{"type": "sms"}, {"type": "email"}, {"type": "email", "value": "nope"},
                         {"type": "bitrix", "value": 0}, {"type": "bitrix", "value": 1, "x": 1}],
            "message": "x" * 10_001},
           {"contacts": [{"type": "bitrix", "value": 1}] * 21, "message": ""}, "str", {}]
    seen = 0
    for item in bad:
        _, issues = validate_item(item)
        for i in issues:
            seen += 1
            assert set(i) == {"code", "message", "path"}, i
    assert seen >= 14


def test_limits_are_configurable() -> None:
    limits = Limits(max_contacts=2, max_message_chars=5)
    _, issues = validate_item({"contacts": [{"type": "bitrix", "value": 1}] * 3, "message": "123456"},
                              limits)
    assert [(i["code"], i["message"]) for i in issues] == [
        ("too_big", "List must contain at most 2 element(s)"),
        ("too_big", "String must contain at most 5 character(s)")]
    n, _ = validate_item({"contacts": [{"type": "bitrix", "value": 1}] * 2, "message": "12345"}, limits)
    assert n is not None


def test_registered_validation_reads_its_limits_from_settings() -> None:
    from serve_app.bootstrap import stage_defaults
    from settings import Settings
    from stages.notifications import register_notification_stages
    from stages.ports import Ports

    reg = StageRegistry()
    register_notification_stages(reg)
    settings = Settings(notification_max_contacts=3, notification_max_message_chars=50)
    stage = reg.build(StageSpec("validate_notification"), Ports(defaults=stage_defaults(settings)))
    assert isinstance(stage, ValidateNotification) and stage.limits == Limits(3, 50)
    other = reg.build(StageSpec("validate_notification", {"max_contacts": 4}), Ports())
    assert isinstance(other, ValidateNotification) and other.limits == Limits(4)


def test_timestamp_form() -> None:
    assert rfc3339_ms(1765713600.0) == "2025-12-14T12:00:00.000Z"


async def test_stages_validate_persist_route_a_mixed_batch() -> None:
    from stages.pipeline import Pipeline

    store, kick = FakeNotificationStore(), FakeKick()
    ids = iter(["n1", "n2"])
    pipe = Pipeline([ValidateNotification(lambda: next(ids)), PersistNotification(store),
                     RouteNotification(kick)])
    items = [
        {"contacts": [{"type": "email", "value": "a@b.co"}], "message": "now", "isImmediate": True},
        {"contacts": [], "message": ""},
        {"contacts": [{"type": "bitrix", "value": 3}], "message": "later"},
    ]
    batch = [Envelope(type="notification", id=str(i), sender="u1", received_at=1765713600.0,
                      fields={"notification": it}, meta={"subject": {"id": "u1", "name": "U"}})
             for i, it in enumerate(items)]
    out = await pipe.run(batch)
    assert [o.verdict for o in out] == [Verdict.DONE, Verdict.REJECT, Verdict.DONE]
    assert out[1].envelope.meta["errors"][0]["code"] == "too_small"
    first = out[0].envelope.meta["notification"]
    assert first["id"] == "n1" and first["createdAt"] == "2025-12-14T12:00:00.000Z"
    assert first["subject"] == {"id": "u1", "name": "U"}
    assert [d.id for d in store.accepted] == ["n1", "n2"]
    assert [d.is_immediate for d in store.accepted] == [True, False]
    assert kick.kicked == ["n1"]
    assert [o.envelope.meta.get("route") for o in out] == ["immediate", None, "queued"]


def test_registration_names_the_pipeline_stages() -> None:
    from stages.notifications import register_notification_stages

    reg = StageRegistry()
    register_notification_stages(reg)
    assert {"validate_notification", "persist_notification", "route_notification"} <= set(reg.names())


def test_shipped_pipelines_yaml_has_the_notification_route() -> None:
    from serve_app.bootstrap import load_resolver
    from settings import Settings

    spec = load_resolver(Settings()).spec("notification")
    assert spec.durable and not spec.client
    assert [s.name for s in spec.stages] == ["validate_notification", "persist_notification",
                                             "route_notification"]
