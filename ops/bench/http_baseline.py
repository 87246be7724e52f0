"""The HTTP servers the transport benchmark measures vlmq against, each calling the same
no-op handler the vlmq worker calls, one uvicorn process each:

- `raw_app`: the fair baseline, the strongest plain-HTTP alternative. A bare ASGI app:
  the POST body is the raw uint8 frame (shape in an `X-Shape` header), the reply body the
  raw float32 chunk. The same bytes vlmq moves, no encoding on either side.
- `png_app`: a FastAPI server like the MineRL policy server: base64
  PNG inside JSON in, JSON out.

Run with `uvicorn ops.bench.http_baseline:raw_app` (or `:png_app`).
"""

from __future__ import annotations

import base64
import io
from typing import Any, Awaitable, Callable, Dict

import numpy as np
from fastapi import FastAPI
from PIL import Image
from pydantic import BaseModel

from inference_worker.handlers.synthetic import SyntheticHandler
from schemas.messages import ActionChunkRequest

handler = SyntheticHandler("action_chunk")


def _chunk(frame: np.ndarray, step: int) -> np.ndarray:
    out = handler.run([ActionChunkRequest(session_id="http", image=frame, step=step)])
    return np.ascontiguousarray(out.results[0].chunk, dtype=np.float32)


# ----------------------------------------------------------------------------- raw bytes

Receive = Callable[[], Awaitable[Dict[str, Any]]]
Send = Callable[[Dict[str, Any]], Awaitable[None]]


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def raw_app(scope: Dict[str, Any], receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    parts = []
    while True:
        message = await receive()
        parts.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    headers = dict(scope["headers"])
    try:
        shape = tuple(int(x) for x in headers[b"x-shape"].split(b","))
        frame = np.frombuffer(b"".join(parts), np.uint8).reshape(shape)
        chunk = _chunk(frame, int(headers.get(b"x-step", b"0")))
    except (KeyError, ValueError) as exc:
        body = f"bad request: {exc}".encode()
        await send(
            {
                "type": "http.response.start",
                "status": 400,
                "headers": [(b"content-length", b"%d" % len(body))],
            }
        )
        await send({"type": "http.response.body", "body": body})
        return
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/octet-stream"),
                (b"content-length", b"%d" % chunk.nbytes),
                (b"x-shape", ",".join(map(str, chunk.shape)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": chunk.tobytes()})


# ----------------------------------------------------------------------------- base64 PNG in JSON

png_app = FastAPI()


class ImageData(BaseModel):
    data: str


class ActionRequest(BaseModel):
    task_name: str = ""
    image: ImageData
    step: int = 0


@png_app.post("/get_action")
def get_action(body: ActionRequest) -> dict:
    frame = np.asarray(Image.open(io.BytesIO(base64.b64decode(body.image.data))).convert("RGB"))
    return {"chunk": _chunk(frame, body.step).tolist(), "step": body.step}
