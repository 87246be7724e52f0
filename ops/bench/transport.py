"""Transport round trip: vlmq vs a FastAPI + base64-PNG JSON server (placeholder)."""


def add_args(p) -> None:
    pass


def run(args) -> int:
    return 0
