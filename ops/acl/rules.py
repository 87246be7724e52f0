"""The ACL users of a vlmq deployment, as Redis ACL file lines (docs/RELIABILITY.md, "ACL").

Roles, for key prefix P:
  admin      everything (operators; `redis-cli`, migrations).
  worker     reads and acks request streams, writes replies and dead letters, heartbeats,
             counts runs of suspects, copies to a recorder's tap.
  observer   read-only: `vlmq inspect/top/tail/record`, the Prometheus sampler; it may
             write only the tap keys (P:tap:*), which `vlmq record` holds and trims.
  gateway    an agent for every session (the HTTP gateway), plus worker heartbeats; it
             publishes to the shared request streams.
  agent-T    tenant T: adds to T's own request streams (P:req:...:{p<n>}:T; write-only: it
             cannot read anyone's requests, only ask whether its entries are still waiting
             or pending: XINFO GROUPS, XPENDING) and reads only the reply streams of
             sessions named "T.<anything>", and the epoch tokens (lost-data detection).

Tenants map to session-id prefixes: tenant "acme" owns sessions "acme.robot-7", "acme.0", ...
The reply stream of session S is P:reply:{p<n>}:S; session ids cannot contain "{" or "}",
so the pattern P:reply:{p*}:acme.* matches exactly the sessions that start with "acme.",
whatever the partition count. A worker started with `--tenants acme` serves acme's streams
and answers an entry there only if its session is "acme.<name>": a tenant cannot cause a
reply in another tenant's stream. The default user is switched off: every client logs in.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from broker.keys import TENANT_PATTERN

_GLOB = re.compile(r"[*?\[\]\\\s]")

# Commands each role needs, beyond AUTH (always allowed). redis-py pings as a health check;
# the CLIENT SETINFO it sends on connect may be refused (it ignores the error), and naming
# it here would stop Redis < 7.2 from loading the file.
_CONNECTION = "+ping"
# Redis 7 checks the commands a Lua script calls against the caller's rights too.
WORKER_COMMANDS = (
    f"{_CONNECTION} +xreadgroup +xgroup|create +xautoclaim +xclaim +xpending +xack +xdel +xadd "
    "+xlen +xrange +expire +hset +hsetnx +hgetall +hincrby +hmget +hdel +exists +del +set +get "
    "+evalsha +script|load"
)
AGENT_COMMANDS = f"{_CONNECTION} +xadd +xlen +xread +xrevrange +hgetall +get"
GATEWAY_COMMANDS = f"{AGENT_COMMANDS} +scan"
OBSERVER_COMMANDS = (
    f"{_CONNECTION} +@read -@dangerous +info +scan +xinfo +xpending +time +set +expire +xtrim +del"
)
# What a client may ask about its own request streams (broker/recovery.py): bookkeeping only.
_PRESENCE = "+xinfo|groups +xpending"


@dataclass(frozen=True)
class User:
    name: str
    keys: str  # ACL key patterns
    commands: str
    selector: str = ""  # an ACL selector "(keys commands)": rights on other keys

    def line(self, password: Optional[str]) -> str:
        # Passwords are stored hashed; a user without one is written "off" (cannot log in).
        auth = f"on #{hashlib.sha256(password.encode()).hexdigest()}" if password else "off"
        line = f"user {self.name} {auth} resetkeys resetchannels {self.keys} -@all {self.commands}"
        return f"{line} {self.selector}" if self.selector else line


def check_name(kind: str, value: str) -> str:
    if _GLOB.search(value) or not value:
        raise ValueError(f"{kind} {value!r} must not be empty or hold glob characters (* ? [ ] \\) or spaces")
    return value


def users(prefix: str = "vlmq", tenants: Sequence[str] = ()) -> List[User]:
    p = check_name("prefix", prefix)
    out = [
        User("vlmq-admin", "~* &*", "+@all"),
        User(
            "vlmq-worker",
            f"~{p}:req:* ~{p}:reply:* ~{p}:part:* ~{p}:dlq:* ~{p}:epoch:* ~{p}:worker:* ~{p}:meta ~{p}:suspects:* "
            f"~{p}:tap:*",
            WORKER_COMMANDS,
        ),
        User("vlmq-observer", f"%R~{p}:* ~{p}:tap:*", OBSERVER_COMMANDS),
        User(
            "vlmq-gateway",
            f"%W~{p}:req:* %R~{p}:reply:* %R~{p}:part:* %R~{p}:meta %R~{p}:epoch:* %R~{p}:worker:*",
            GATEWAY_COMMANDS,
            f"(%R~{p}:req:* {_PRESENCE})",
        ),
    ]
    for t in tenants:
        if not TENANT_PATTERN.match(t):
            raise ValueError(f"tenant {t!r} must match {TENANT_PATTERN.pattern}")
        own = f"{p}:req:*:{{p*}}:{t}"
        out.append(
            User(
                f"agent-{t}",
                f"%W~{own} %R~{p}:reply:{{p*}}:{t}.* %R~{p}:part:{{p*}}:{t}.* %R~{p}:meta %R~{p}:epoch:*",
                AGENT_COMMANDS,
                f"(%R~{own} {_PRESENCE})",
            )
        )
    return out


def render(
    prefix: str = "vlmq", tenants: Sequence[str] = (), passwords: Optional[Dict[str, str]] = None
) -> str:
    """The ACL file: the default user off, then one line per user."""
    passwords = passwords or {}
    lines = ["user default off resetkeys resetchannels -@all"]
    lines += [u.line(passwords.get(u.name)) for u in users(prefix, tenants)]
    return "\n".join(lines) + "\n"


def session_prefix(tenant: str) -> str:
    """Sessions of this tenant must start with this (the agent-<tenant> user reads only those)."""
    return f"{tenant}."
