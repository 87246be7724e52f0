"""Coverage-guided fuzzing of request decoding with atheris (libFuzzer), when it is installed.

Run longer by hand:  python tests/test_fuzz_atheris.py -runs=1000000 -max_len=8192
The pytest test runs a short campaign in a subprocess (libFuzzer owns the process and
exits it) seeded with valid requests of every kind; any exception that is not a
ProtocolError is a crash and fails the test with the input that caused it. msgpack runs
its pure-Python unpacker there (MSGPACK_PUREPYTHON=1) so that atheris sees coverage inside
the parser too; the hypothesis tests (test_fuzz_codec.py) cover the C unpacker.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

RUNS = int(os.environ.get("VLMQ_FUZZ_RUNS", "10000"))


def _seed_corpus(directory: str) -> None:
    import numpy as np

    from schemas.codec import packb
    from schemas.messages import (
        ActionChunkRequest,
        ChatMessage,
        PreferenceRequest,
        StructuredActionRequest,
        TextActionRequest,
    )

    frame = np.zeros((4, 4, 3), np.uint8)
    reqs = [
        ActionChunkRequest(session_id="s", image=frame, state=np.zeros(3, np.float32), deadline=1.0),
        PreferenceRequest(session_id="s", image_a=frame, image_b=frame, task="t"),
        TextActionRequest(session_id="s", messages=[ChatMessage(role="user", content="x")], latest_only=True),
        StructuredActionRequest(session_id="s", image=frame),
    ]
    for i, r in enumerate(reqs):
        with open(os.path.join(directory, f"seed{i}"), "wb") as f:
            f.write(packb(r.to_wire()))


def main() -> None:
    import atheris

    with atheris.instrument_imports(include=["schemas", "msgpack"]):
        from schemas.errors import ProtocolError
        from schemas.limits import Limits
        from schemas.messages import decode_reply, decode_request

    limits = Limits(max_message_bytes=16384, max_frame_bytes=4096, max_image_side=64)

    def one_input(data: bytes) -> None:
        for decode in (decode_request, decode_reply):
            try:
                decode(data, limits)
            except ProtocolError:
                pass

    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


def test_atheris_campaign(tmp_path) -> None:
    pytest.importorskip("atheris")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    _seed_corpus(str(corpus))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, __file__, f"-runs={RUNS}", "-max_len=4096", "-seed=1", str(corpus)],
        cwd=str(tmp_path),
        env={
            **os.environ,
            "MSGPACK_PUREPYTHON": "1",
            "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""),
        },
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"Done {RUNS} runs" in proc.stderr, proc.stderr[-2000:]


if __name__ == "__main__":
    main()
