"""`vlmq acl`: write the Redis ACL file for a prefix and a list of tenants."""

from __future__ import annotations

import argparse
import os
import re
import sys

from broker.commands import Command
from broker.settings import flag
from ops.acl.rules import render, users


def password_env(user: str) -> str:
    return "VLMQ_ACL_PASSWORD_" + re.sub(r"[^A-Za-z0-9]", "_", user).upper()


def run(args: argparse.Namespace) -> int:
    tenants = [t for t in args.tenant for t in t.split(",") if t]
    passwords = {}
    for u in users(args.prefix, tenants):
        pw = os.environ.get(password_env(u.name))
        if pw:
            passwords[u.name] = pw
        else:
            print(
                f"vlmq acl: {u.name} has no password ({password_env(u.name)}): written 'off'", file=sys.stderr
            )
    text = render(args.prefix, tenants, passwords)
    if args.out == "-":
        sys.stdout.write(text)
    else:
        with open(args.out, "w") as f:
            f.write(text)
        os.chmod(args.out, 0o600)
    return 0


def add_args(p: argparse.ArgumentParser) -> None:
    flag(p, "--prefix", var="PREFIX", default="vlmq", help="key prefix")
    p.add_argument(
        "--tenant",
        action="append",
        default=[],
        metavar="NAME",
        help="a tenant (repeatable, or comma-separated): adds the user agent-NAME",
    )
    p.add_argument("--out", default="-", help="file to write, mode 600; '-' for stdout (%(default)s)")


COMMAND = Command(
    "acl",
    help="write the Redis ACL file (worker, agents per tenant, observer, gateway, admin)",
    description="Render the users of docs/RELIABILITY.md ('ACL') for redis-server --aclfile. "
    "Passwords come from VLMQ_ACL_PASSWORD_<USER> (e.g. VLMQ_ACL_PASSWORD_AGENT_ACME) and are "
    "stored as SHA-256 hashes; a user without one is written 'off'. Tenant T's agents must "
    "use session ids that start with 'T.'.",
    add_args=add_args,
    run=run,
)
