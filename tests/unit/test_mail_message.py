"""The e-mail a notification becomes: a Message-ID that a resend repeats."""

from __future__ import annotations

from email.utils import parseaddr

from adapters.mail import build_email
from stages.notifications import Delivery


def test_a_resent_mail_carries_the_same_message_id_and_another_contact_another() -> None:
    d = Delivery("5f0c7a3e-0000-4000-8000-000000000001", 1, "user@example.com", "Привет!")
    first = build_email(d, "Conveyor <noreply@conveyor.example>", "Notification")
    again = build_email(d, "Conveyor <noreply@conveyor.example>", "Notification")
    other = build_email(Delivery(d.notification_id, 2, "b@example.com", "x"),
                        "noreply@conveyor.example", "Notification")
    assert first["Message-ID"] == again["Message-ID"] == (
        "<5f0c7a3e-0000-4000-8000-000000000001.1@conveyor.example>")
    assert other["Message-ID"] != first["Message-ID"]
    assert parseaddr(first["Message-ID"].strip("<>"))[1]  # an addr-spec, as RFC 5322 wants
    assert first["X-Notification-Id"] == d.notification_id
