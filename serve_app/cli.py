"""The ``conveyor`` command.

``conveyor token USER [--role R ...] [--ttl SECONDS]`` prints a token signed with the
embedded default's dev key (one line, nothing else on stdout).

``conveyor chat --as USER [CHAT]``: the interactive terminal client (``client/terminal.py``).
``conveyor status [--url URL]``: deployments, replicas, buffers, outbox and delivery lag of
a running app (``client/status.py``). ``conveyor bench``: the one-command benchmark, JSON
on stdout (``bench/cli.py``).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from adapters.auth import DevKey
from settings import Settings

DEFAULT_ROLES = ["user", "notifications:send"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="conveyor")
    sub = parser.add_subparsers(dest="command", required=True)
    tok = sub.add_parser("token", help="print a dev JWT for a user")
    tok.add_argument("user")
    tok.add_argument("--role", action="append", dest="roles",
                     help=f"role to grant (repeatable); default: {' '.join(DEFAULT_ROLES)}")
    tok.add_argument("--ttl", type=int, default=None, help="lifetime in seconds (negative: expired)")
    tok.add_argument("--name", default=None, help="display name claim")
    sub.add_parser("migrate", help="apply pending database migrations (DATABASE_URL, or the "
                                   "embedded PostgreSQL under the data directory) and exit")
    _add_operator_commands(sub)
    args = parser.parse_args(argv)
    if args.command in ("chat", "status", "bench"):
        return int(args.run(args))

    settings = Settings()
    if args.command == "migrate":
        from serve_app.bootstrap import migrate_now

        applied = migrate_now(settings)
        print(f"applied {', '.join(applied)}" if applied else "schema is current")
        return 0
    if args.command == "token":
        if settings.jwks_url:
            print("conveyor token: a JWKS issuer is configured (CONVEYOR_JWKS_URL); "
                  "tokens come from that issuer", file=sys.stderr)
            return 2
        key = DevKey(settings.data_dir)
        print(key.issue(
            args.user,
            roles=args.roles if args.roles is not None else DEFAULT_ROLES,
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
            client_id=settings.jwt_client_id,
            ttl_s=args.ttl if args.ttl is not None else settings.dev_token_ttl_s,
            name=args.name,
        ))
    return 0


DEFAULT_URL = os.environ.get("CONVEYOR_URL", "http://127.0.0.1:8000")


def _add_operator_commands(sub: Any) -> None:
    chat = sub.add_parser("chat", help="interactive terminal chat client",
                          description="Chat in a terminal. CHAT is a chat id, a chat title, or "
                          "@user[,@user...] (the chat of exactly those members, created if "
                          "missing). Without CHAT: list your chats.")
    chat.add_argument("chat", nargs="?", default=None)
    chat.add_argument("--as", dest="user", required=True, help="your user id")
    chat.add_argument("--url", default=DEFAULT_URL, help=f"the app (default {DEFAULT_URL}, or CONVEYOR_URL)")
    chat.add_argument("--token", default=os.environ.get("CONVEYOR_TOKEN"),
                      help="a JWT (default: minted with the dev key under the data directory)")
    chat.add_argument("--history", type=int, default=20, help="events of history shown on start")
    chat.set_defaults(run=_chat)

    status = sub.add_parser("status", help="deployments, replicas, buffers, outbox and lag of a "
                            "running app")
    status.add_argument("--url", default=DEFAULT_URL, help="the app's HTTP address")
    status.add_argument("--dashboard", default=os.environ.get("RAY_DASHBOARD_URL",
                                                              "http://127.0.0.1:8265"),
                        help="the Ray dashboard (Serve's REST API); '' to skip")
    status.add_argument("--ray-address", default=None,
                        help="ask the Serve controller of this Ray cluster when the dashboard "
                             "is not reachable (e.g. auto, or 127.0.0.1:6379)")
    status.add_argument("--json", action="store_true", help="JSON on stdout")
    status.set_defaults(run=_status)

    bench = sub.add_parser("bench", help="the one-command benchmark (JSON on stdout)",
                           description="Chat msgs/s end to end, the same-run echo ceiling and "
                           "their ratio, latency percentiles, notifications accepted/s.")
    from bench.cli import add_arguments

    add_arguments(bench)
    bench.set_defaults(run=_bench)


def _chat(args: argparse.Namespace) -> int:
    from client.terminal import main as chat_main

    user = args.user

    def mint() -> str:
        s = Settings()
        return DevKey(s.data_dir).issue(user, roles=DEFAULT_ROLES, issuer=s.jwt_issuer,
                                        audience=s.jwt_audience, client_id=s.jwt_client_id,
                                        ttl_s=s.dev_token_ttl_s)

    return chat_main(args.url, user, args.chat, args.token or mint, history=args.history)


def _status(args: argparse.Namespace) -> int:
    import orjson

    from client.status import collect, render

    out = collect(args.url, args.dashboard or None, args.ray_address)
    if args.json:
        sys.stdout.write(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print(render(out))
    return 0 if out.get("ready") else 1


def _bench(args: argparse.Namespace) -> int:
    from bench.cli import run

    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
