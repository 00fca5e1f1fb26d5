"""The ``conveyor token`` command, run as the installed console script, as the README and
the wire protocol tell people to use it: one line on stdout, a token the application's
own verifier accepts (or refuses, when asked for an expired one)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from adapters.auth import AuthError, JwtVerifier
from serve_app.cli import DEFAULT_ROLES
from settings import Settings


def conveyor(data_dir: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("conveyor") or str(Path(sys.executable).with_name("conveyor"))
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    environ.update(CONVEYOR_DATA_DIR=str(data_dir), **env)
    return subprocess.run([exe, *args], capture_output=True, text=True, env=environ, timeout=60)


def verifier(data_dir: Path) -> JwtVerifier:
    from serve_app.bootstrap import verifier

    return verifier(Settings(data_dir=data_dir))


async def test_token_prints_one_line_the_app_accepts_with_every_default_role(tmp_path: Path) -> None:
    out = conveyor(tmp_path, "token", "alice")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 1 and lines[0].count(".") == 2
    principal = await verifier(tmp_path).verify(lines[0])
    assert principal.user_id == "alice"
    assert principal.roles == frozenset(DEFAULT_ROLES)
    # The dev key was created on first use and is reused: a second token verifies too.
    again = conveyor(tmp_path, "token", "bob").stdout.strip()
    assert (await verifier(tmp_path).verify(again)).user_id == "bob"


async def test_role_flags_give_exactly_those_roles(tmp_path: Path) -> None:
    out = conveyor(tmp_path, "token", "carol", "--role", "auditor", "--role", "user")
    assert out.returncode == 0, out.stderr
    principal = await verifier(tmp_path).verify(out.stdout.strip())
    assert principal.roles == frozenset({"auditor", "user"})
    with pytest.raises(AuthError) as err:
        principal.require("notifications:send")
    assert err.value.status == 403


async def test_negative_ttl_gives_an_expired_token(tmp_path: Path) -> None:
    out = conveyor(tmp_path, "token", "dave", "--ttl", "-120")
    assert out.returncode == 0, out.stderr
    with pytest.raises(AuthError) as err:
        await verifier(tmp_path).verify(out.stdout.strip())
    assert err.value.status == 401


def test_token_is_refused_when_a_real_issuer_is_configured(tmp_path: Path) -> None:
    out = conveyor(tmp_path, "token", "erin", CONVEYOR_JWKS_URL="http://127.0.0.1:9/jwks")
    assert out.returncode == 2
    assert out.stdout == ""
    assert "JWKS" in out.stderr
