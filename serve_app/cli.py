"""The ``conveyor`` command.

``conveyor token USER [--role R ...] [--ttl SECONDS]`` prints a token signed with the
embedded default's dev key (one line, nothing else on stdout).
"""

from __future__ import annotations

import argparse
import sys

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
    args = parser.parse_args(argv)

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


if __name__ == "__main__":
    raise SystemExit(main())
