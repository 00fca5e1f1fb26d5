"""Which records of a bucket notification name an upload: only ``s3:ObjectCreated:*``
records with a string key; anything else is ignored rather than failing the request."""

from __future__ import annotations

from typing import Any

import pytest

from deployments.gateway.attachments_api import created_key


def rec(name: Any = "s3:ObjectCreated:Put", key: Any = "chat%2Fid%2Fcat+1.png") -> dict[str, Any]:
    return {"eventName": name, "s3": {"object": {"key": key}}}


def test_a_created_object_names_its_url_decoded_key() -> None:
    assert created_key(rec()) == "chat/id/cat 1.png"
    assert created_key(rec("s3:ObjectCreated:CompleteMultipartUpload")) == "chat/id/cat 1.png"


@pytest.mark.parametrize("record", [
    rec("s3:ObjectRemoved:Delete"), rec("s3:ObjectAccessed:Get"), rec(5), rec(None),
    rec(key=7), rec(key=None), rec(key=""), rec(key=["a"]), {"eventName": "s3:ObjectCreated:Put"},
    {"eventName": "s3:ObjectCreated:Put", "s3": None}, {"eventName": "s3:ObjectCreated:Put",
                                                        "s3": {"object": "key"}},
    "Records", 42, None, [rec()],
])
def test_anything_else_names_no_upload(record: Any) -> None:
    assert created_key(record) is None
