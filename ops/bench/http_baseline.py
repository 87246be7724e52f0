"""The baseline of the transport benchmark: a one-request-at-a-time FastAPI server in the
style of the seeds' MineRL policy server (base64 PNG in JSON, JSON out), calling the same
no-op handler the vlmq worker calls. Run with `uvicorn ops.bench.http_baseline:app`."""

from __future__ import annotations

import base64
import io

import numpy as np
from fastapi import FastAPI
from PIL import Image
from pydantic import BaseModel

from inference_worker.handlers.synthetic import SyntheticHandler
from schemas.messages import ActionChunkRequest

app = FastAPI()
handler = SyntheticHandler("action_chunk")


class ImageData(BaseModel):
    data: str


class ActionRequest(BaseModel):
    task_name: str = ""
    image: ImageData
    step: int = 0


@app.post("/get_action")
def get_action(body: ActionRequest) -> dict:
    frame = np.asarray(Image.open(io.BytesIO(base64.b64decode(body.image.data))).convert("RGB"))
    out = handler.run([ActionChunkRequest(session_id="http", image=frame, step=body.step)])
    return {"chunk": out.results[0].chunk.tolist(), "step": body.step}
