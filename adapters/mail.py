"""Building the e-mail of a notification (shared by the SMTP and .eml channels)."""

from __future__ import annotations

from email.message import EmailMessage
from email.utils import formatdate, parseaddr

from stages.notifications import Delivery


def build_email(d: Delivery, mail_from: str, subject: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = mail_from
    msg["To"] = str(d.address)
    msg["Subject"] = subject
    msg["Date"] = formatdate(usegmt=True)
    # One Message-ID per notification and contact, the same on every send: a dispatcher
    # that dies between the server's acceptance and recording the outcome sends the mail
    # again on the next claim, and the receiving side can tell it is the same message.
    msg["Message-ID"] = message_id(d, mail_from)
    # Lets a receiving system (and our tests) tie the mail to the notification.
    msg["X-Notification-Id"] = d.notification_id
    msg.set_content(d.message)
    return msg


def message_id(d: Delivery, mail_from: str) -> str:
    """``<notification-id.contact-index@sender's domain>``: stable across resends."""
    domain = parseaddr(mail_from)[1].rpartition("@")[2] or "localhost"
    return f"<{d.notification_id}.{d.contact_index}@{domain}>"
