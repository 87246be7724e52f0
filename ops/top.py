"""`vlmq top` (placeholder while it is written)."""


def register(sub) -> None:
    p = sub.add_parser("top", help="live terminal dashboard")
    p.set_defaults(func=lambda args: 0)
