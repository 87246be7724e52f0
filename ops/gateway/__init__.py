"""`vlmq gateway`: HTTP and WebSocket doors onto the request streams.

Existing clients keep working unchanged: the OpenAI SDK and vLLM-style HTTP clients
(`POST /v1/chat/completions`, `GET /v1/models`), the MineRL policy client
(`GET /`, `GET /health`, `POST /get_action`), and low-latency clients that speak vlmq's own
msgpack protocol over a WebSocket (`/v1/ws`). Every call becomes one stream message and
waits for its reply like any agent does: the gateway holds no model.
"""
