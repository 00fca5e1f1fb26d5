"""Building the e-mail of a notification (shared by the SMTP and .eml channels)."""

from __future__ import annotations

from email.message import EmailMessage
from email.utils import formatdate, make_msgid

from stages.notifications import Delivery


def build_email(d: Delivery, mail_from: str, subject: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = mail_from
    msg["To"] = str(d.address)
    msg["Subject"] = subject
    msg["Date"] = formatdate(usegmt=True)
    msg["Message-ID"] = make_msgid(idstring=f"{d.notification_id}.{d.contact_index}",
                                   domain=mail_from.rpartition("@")[2] or "localhost")
    # Lets a receiving system (and our tests) tie the mail to the notification.
    msg["X-Notification-Id"] = d.notification_id
    msg.set_content(d.message)
    return msg
