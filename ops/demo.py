"""`vlmq demo` (placeholder until the demo lands)."""


def register(sub) -> None:
    p = sub.add_parser("demo", help="embedded Redis + a worker + N agents, end to end")
    p.set_defaults(func=lambda args: 0)
