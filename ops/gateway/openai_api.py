"""OpenAI-compatible chat completions: `POST /v1/chat/completions`, `GET /v1/models`.

A chat completion is a `text_action` request: the messages go through (image parts as data
URLs, OpenAI's `image_url` or Qwen's `image` form, as vLLM and OpenAI clients send them)
and the reply's text is the assistant message. Every OpenAI and vLLM request field is
either honoured or refused with a 400 that names it (`param`); none is silently ignored
(docs/GATEWAY.md has the list):
- `response_format` json_object / json_schema, vLLM's `guided_json`, `guided_regex`,
  `guided_choice`, `guided_grammar` (and `structured_outputs`) become the request's
  `constraint`: the worker decodes under it, token by token;
- `tools` with `tool_choice` none / auto / required / a named function: the tools are
  described to the model in a system message and the answer is decoded under a schema of
  the tool calls (auto: a call or plain text); a call comes back as `tool_calls`;
- `n`, `logprobs` / `top_logprobs`, `stream` (true token streaming: partial replies as
  server-sent events, `stream_options.include_usage`);
- vlmq extensions in the body (the SDK's `extra_body`): `admissible_commands` (the reply
  then names the best-scoring command) and `latest_only`.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, AsyncIterator, Dict, List, Optional, Tuple, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ops.gateway.bodies import read_json
from ops.gateway.errors import GatewayError, handle_errors
from ops.gateway.service import Gateway
from schemas.messages import Partial, Reply, TextActionRequest, describe_validation_error

_PART_TYPES = ("text", "image_url", "image")
TOOL_PROMPT = (
    "You can call these functions (JSON Schema of each one's arguments):\n{tools}\n"
    'To call one, reply with only a JSON object: {{"name": <function name>, "arguments": <its arguments>}}.'
)


class ChatCompletionBody(BaseModel):
    """Every field of OpenAI's and vLLM's chat completion request vlmq knows; an unknown one
    is refused, so that nothing is ignored."""

    model_config = ConfigDict(extra="forbid")

    model: str
    messages: List[Dict[str, Any]] = Field(min_length=1)
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    stop: Optional[Union[str, List[str]]] = None
    seed: Optional[int] = None
    n: Optional[int] = None
    stream: Optional[bool] = False
    stream_options: Optional[Dict[str, Any]] = None
    tools: Optional[List[Dict[str, Any]]] = None
    tool_choice: Optional[Union[str, Dict[str, Any]]] = None
    parallel_tool_calls: Optional[bool] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    response_format: Optional[Dict[str, Any]] = None
    # refused unless they ask for the default behaviour
    frequency_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    logit_bias: Optional[Dict[str, float]] = None
    modalities: Optional[List[str]] = None
    audio: Optional[Dict[str, Any]] = None
    prediction: Optional[Dict[str, Any]] = None
    reasoning_effort: Optional[str] = None
    web_search_options: Optional[Dict[str, Any]] = None
    functions: Optional[List[Any]] = None
    function_call: Optional[Any] = None
    # accepted, with no effect on the answer (identifiers and bookkeeping)
    user: Optional[str] = None
    metadata: Optional[Dict[str, Any]] = None
    store: Optional[bool] = None
    service_tier: Optional[str] = None
    # vLLM's extensions (extra_body)
    guided_json: Optional[Union[Dict[str, Any], str]] = None
    guided_regex: Optional[str] = None
    guided_choice: Optional[List[str]] = None
    guided_grammar: Optional[str] = None
    guided_decoding_backend: Optional[str] = None
    guided_whitespace_pattern: Optional[str] = None
    structured_outputs: Optional[Dict[str, Any]] = None
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    min_tokens: Optional[int] = None
    ignore_eos: Optional[bool] = None
    skip_special_tokens: Optional[bool] = None
    spaces_between_special_tokens: Optional[bool] = None
    include_stop_str_in_output: Optional[bool] = None
    echo: Optional[bool] = None
    add_generation_prompt: Optional[bool] = None
    continue_final_message: Optional[bool] = None
    # vlmq extensions
    admissible_commands: Optional[List[str]] = None
    latest_only: bool = False


# field -> the values that mean "what vlmq does anyway" (anything else is refused)
_DEFAULT_ONLY: Dict[str, Tuple[Any, ...]] = {
    "frequency_penalty": (0, 0.0),
    "presence_penalty": (0, 0.0),
    "logit_bias": ({},),
    "modalities": (["text"],),
    "top_k": (-1, 0),
    "min_p": (0, 0.0),
    "repetition_penalty": (1, 1.0),
    "min_tokens": (0,),
    "ignore_eos": (False,),
    "skip_special_tokens": (True,),
    "spaces_between_special_tokens": (True,),
    "include_stop_str_in_output": (False,),
    "echo": (False,),
    "add_generation_prompt": (True,),
    "continue_final_message": (False,),
    "guided_decoding_backend": ("xgrammar", "auto"),
    "store": (False,),
}
_UNSUPPORTED = ("audio", "prediction", "reasoning_effort", "web_search_options", "guided_whitespace_pattern")


def _refuse(message: str, param: str) -> GatewayError:
    return GatewayError(400, message, "unsupported", param=param)


def _check_supported(body: ChatCompletionBody) -> None:
    for name, allowed in _DEFAULT_ONLY.items():
        value = getattr(body, name)
        if value is not None and value not in allowed:
            raise _refuse(f"{name}={value!r} is not supported (only {allowed[0]!r})", name)
    for name in _UNSUPPORTED:
        if getattr(body, name) is not None:
            raise _refuse(f"{name} is not supported", name)
    if body.functions is not None or body.function_call is not None:
        raise _refuse(
            "functions / function_call are the deprecated form: send tools and tool_choice", "functions"
        )
    if body.service_tier not in (None, "auto", "default"):
        raise _refuse(f"service_tier={body.service_tier!r} is not supported", "service_tier")
    if body.top_logprobs is not None and not body.logprobs:
        raise GatewayError(400, "top_logprobs needs logprobs: true", "invalid", param="top_logprobs")
    if body.stream_options is not None and set(body.stream_options) - {"include_usage"}:
        raise _refuse(f"stream_options {sorted(body.stream_options)}: only include_usage", "stream_options")
    if body.stream_options is not None and not body.stream:
        raise GatewayError(400, "stream_options needs stream: true", "invalid", param="stream_options")


# ----------------------------------------------------------------------------- constraints


def _schema_of(value: Any, param: str) -> Dict[str, Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise GatewayError(400, f"{param} is not valid JSON: {exc}", "invalid", param=param) from None
    if not isinstance(value, dict):
        raise GatewayError(400, f"{param} must be a JSON schema object", "invalid", param=param)
    return value


def _constraint(body: ChatCompletionBody) -> Optional[Dict[str, Any]]:
    """The request's `constraint` from response_format, vLLM's guided_* or structured_outputs
    (at most one of them)."""
    found: List[Tuple[str, Dict[str, Any]]] = []
    rf = body.response_format
    if rf is not None:
        kind = rf.get("type")
        if kind == "json_object":
            found.append(("response_format", {"type": "json_object"}))
        elif kind == "json_schema":
            spec = rf.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
                raise GatewayError(
                    400, "response_format.json_schema.schema is required", "invalid", param="response_format"
                )
            found.append(("response_format", {"type": "json_schema", "json_schema": spec["schema"]}))
        elif kind != "text":
            raise _refuse(
                f"response_format type {kind!r}: text, json_object or json_schema", "response_format"
            )
    if body.guided_json is not None:
        found.append(
            (
                "guided_json",
                {"type": "json_schema", "json_schema": _schema_of(body.guided_json, "guided_json")},
            )
        )
    if body.guided_regex is not None:
        found.append(("guided_regex", {"type": "regex", "pattern": body.guided_regex}))
    if body.guided_choice is not None:
        found.append(("guided_choice", {"type": "choice", "choices": body.guided_choice}))
    if body.guided_grammar is not None:
        found.append(("guided_grammar", {"type": "grammar", "grammar": body.guided_grammar}))
    so = body.structured_outputs
    if so is not None:
        keys = {
            "json": ("json_schema", "json_schema"),
            "regex": ("regex", "pattern"),
            "choice": ("choice", "choices"),
        }
        keys["grammar"] = ("grammar", "grammar")
        given = [k for k in so if so[k] is not None]
        if len(given) != 1 or given[0] not in keys:
            raise _refuse(
                "structured_outputs: give exactly one of json, regex, choice, grammar", "structured_outputs"
            )
        kind, field = keys[given[0]]
        value = _schema_of(so["json"], "structured_outputs.json") if kind == "json_schema" else so[given[0]]
        found.append(("structured_outputs", {"type": kind, field: value}))
    if len(found) > 1:
        names = " and ".join(n for n, _ in found)
        raise GatewayError(400, f"{names}: give one constraint", "invalid", param=found[1][0])
    return found[0][1] if found else None


# ----------------------------------------------------------------------------- tools


def _tools(body: ChatCompletionBody) -> Tuple[List[Dict[str, Any]], Optional[str]]:
    """(the functions offered, the tool choice: None (no tools), "auto", "required" or a
    function's name)."""
    choice = body.tool_choice
    if not body.tools:
        if choice not in (None, "none"):
            raise GatewayError(400, "tool_choice needs tools", "invalid", param="tool_choice")
        return [], None
    functions = []
    for i, t in enumerate(body.tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if t.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise GatewayError(400, f"tools.{i}: a function tool with a name", "invalid", param=f"tools.{i}")
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        functions.append({"name": fn["name"], "description": fn.get("description", ""), "parameters": params})
    if choice is None or choice == "auto":
        return functions, "auto"
    if choice == "none":
        return [], None
    if choice == "required":
        return functions, "required"
    name = (choice.get("function") or {}).get("name") if isinstance(choice, dict) else None
    if name not in {f["name"] for f in functions}:
        raise GatewayError(
            400, f"tool_choice names {name!r}, which is not in tools", "invalid", param="tool_choice"
        )
    return [f for f in functions if f["name"] == name], name


def _call_schema(functions: List[Dict[str, Any]]) -> Dict[str, Any]:
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": f["name"]}, "arguments": f["parameters"]},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for f in functions
    ]
    return calls[0] if len(calls) == 1 else {"anyOf": calls}


def _tool_calls(text: str, functions: List[Dict[str, Any]]) -> Optional[List[Dict[str, Any]]]:
    """The answer as OpenAI tool calls, if it is a call of one of `functions`."""
    if not functions or not text.lstrip().startswith("{"):
        return None
    try:
        call = json.loads(text)
    except ValueError:
        return None
    names = {f["name"] for f in functions}
    if not isinstance(call, dict) or call.get("name") not in names or "arguments" not in call:
        return None
    return [
        {
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(call["arguments"])},
        }
    ]


# ----------------------------------------------------------------------------- messages


def _message(m: Dict[str, Any], i: int) -> Dict[str, Any]:
    role = m.get("role")
    role = "system" if role == "developer" else role
    content = m.get("content")
    if role == "tool":  # a tool's result, told to the model as the user's next turn
        who = m.get("tool_call_id") or "a call"
        text = content if isinstance(content, str) else json.dumps(content)
        return {"role": "user", "content": f"Result of {who}: {text}"}
    if role == "assistant" and m.get("tool_calls"):
        calls = [
            {"name": c["function"]["name"], "arguments": json.loads(c["function"].get("arguments") or "{}")}
            for c in m["tool_calls"]
        ]
        return {"role": "assistant", "content": "\n".join(json.dumps(c) for c in calls)}
    if role not in ("system", "user", "assistant"):
        raise GatewayError(
            400, f"messages.{i}.role {role!r} is not supported", "invalid", param=f"messages.{i}.role"
        )
    if content is None:
        raise GatewayError(400, f"messages.{i}.content is required", "invalid", param=f"messages.{i}.content")
    if isinstance(content, list):
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in _PART_TYPES:
                raise GatewayError(
                    400,
                    f"messages.{i}.content.{j}: part type {kind!r} is not one of {_PART_TYPES}",
                    "invalid",
                    param=f"messages.{i}.content.{j}",
                )
        # Keep what the schema knows: `detail` of image_url, `name` of a message, ... go.
        content = [
            {"type": "text", "text": p.get("text")}
            if p["type"] == "text"
            else {"type": p["type"], p["type"]: p.get(p["type"])}
            for p in content
        ]
    return {"role": role, "content": content}


class Call:
    """One chat completion call: its request and what the reply needs to be read back."""

    def __init__(
        self, req: TextActionRequest, body: ChatCompletionBody, functions: List[Dict[str, Any]]
    ) -> None:
        self.req = req
        self.body = body
        self.functions = functions


def to_request(gw: Gateway, data: Dict[str, Any]) -> Call:
    try:
        body = ChatCompletionBody.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        param = ".".join(str(x) for x in errors[0]["loc"]) if errors and errors[0]["loc"] else None
        unknown = [e for e in errors if e["type"] == "extra_forbidden"]
        if unknown:
            name = ".".join(str(x) for x in unknown[0]["loc"])
            raise _refuse(f"{name} is not a parameter vlmq supports (docs/GATEWAY.md)", name) from None
        raise GatewayError(400, describe_validation_error(exc), "invalid", param=param) from None
    _check_supported(body)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if max_tokens is not None and max_tokens < 1:
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        raise GatewayError(400, f"{param} must be at least 1, got {max_tokens}", "invalid", param=param)
    if max_tokens is None:  # the rest of the context: the worker stops at the end of its decode slot
        max_tokens = gw.settings.default_max_tokens or gw.settings.limits.max_new_tokens
    messages = [_message(m, i) for i, m in enumerate(body.messages)]
    constraint = _constraint(body)
    functions, choice = _tools(body)
    if functions:
        if constraint is not None:
            raise GatewayError(400, "tools and a response format: give one", "invalid", param="tools")
        described = json.dumps(functions)
        messages.insert(0, {"role": "system", "content": TOOL_PROMPT.format(tools=described)})
        schema = _call_schema(functions)
        constraint = {"type": "json_schema", "json_schema": schema, "or_text": choice == "auto"}
    fields: Dict[str, Any] = {
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "stop": [body.stop] if isinstance(body.stop, str) else body.stop,
        "seed": body.seed,
        "n": body.n,
        "logprobs": body.logprobs,
        "top_logprobs": body.top_logprobs,
        "stream": bool(body.stream),
        "constraint": constraint,
        "admissible_commands": body.admissible_commands,
        "latest_only": body.latest_only,
        "model": gw.route(body.model),
    }
    req = gw.build(TextActionRequest, {k: v for k, v in fields.items() if v is not None})
    return Call(req, body, functions)


# ----------------------------------------------------------------------------- responses


def _usage(reply: Reply) -> Dict[str, int]:
    p, c = reply.result.prompt_tokens, reply.result.completion_tokens
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _extension(reply: Reply) -> Dict[str, Any]:
    r = reply.result
    out: Dict[str, Any] = {
        "request_id": reply.request_id,
        "session_id": reply.session_id,
        "worker": reply.worker,
        "batch_size": reply.batch_size,
        "timings": reply.timings,
    }
    if r.choice is not None:
        out.update(choice=r.choice, choice_index=r.choice_index, scores=r.scores)
    return out


def _logprobs(entries: Optional[List[Any]]) -> Optional[Dict[str, Any]]:
    if entries is None:
        return None
    content = []
    for e in entries:
        d = e if isinstance(e, dict) else e.model_dump()
        content.append(
            {
                "token": d["token"],
                "logprob": d["logprob"],
                "bytes": d.get("bytes") or [],
                "top_logprobs": [
                    {"token": t["token"], "logprob": t["logprob"], "bytes": t.get("bytes") or []}
                    for t in d.get("top_logprobs") or []
                ],
            }
        )
    return {"content": content}


def _answers(reply: Reply) -> List[Tuple[str, str, Optional[List[Any]]]]:
    """(text, finish_reason, logprobs) of each answer, in order."""
    r = reply.result
    if r.choices:
        return [(c.text, c.finish_reason, c.logprobs) for c in r.choices]
    return [(r.text, r.finish_reason, r.logprobs)]


def completion(reply: Reply, call: Call) -> Dict[str, Any]:
    choices = []
    for i, (text, finish, logprobs) in enumerate(_answers(reply)):
        calls = _tool_calls(text, call.functions) if finish == "stop" else None
        message: Dict[str, Any] = {"role": "assistant", "content": None if calls else text}
        if calls:
            message["tool_calls"] = calls
        choices.append(
            {
                "index": i,
                "message": message,
                "finish_reason": "tool_calls" if calls else finish,
                "logprobs": _logprobs(logprobs) if call.body.logprobs else None,
            }
        )
    return {
        "id": f"chatcmpl-{reply.request_id}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": call.body.model,
        "choices": choices,
        "usage": _usage(reply),
        "vlmq": _extension(reply),
    }


async def _chunks(events: AsyncIterator[Union[Partial, Reply]], first: Any, call: Call) -> AsyncIterator[str]:
    """Server-sent events: a chunk per partial reply (its text and logprobs), then the rest
    of each answer from the reply, its finish reason and, if asked, the usage. With tools,
    an answer is sent whole once the reply has come (a call can't be told from text before)."""
    body = call.body
    head = {"id": "", "object": "chat.completion.chunk", "created": int(time.time()), "model": body.model}
    sent: Dict[int, str] = {}  # by answer: text sent
    covered: Dict[int, int] = {}  # tokens the pieces covered
    pending: Dict[int, List[Any]] = {}  # logprobs of pieces whose text was held back
    hold = bool(call.functions)

    def chunk(index: int, delta: Dict[str, Any], finish: Optional[str] = None, logprobs=None) -> str:
        if index not in sent:
            sent[index] = ""
            delta = {"role": "assistant", **delta}
        choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
        return f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"

    event: Any = first
    while True:
        head["id"] = f"chatcmpl-{event.request_id}"
        if isinstance(event, Partial):
            i = event.index
            covered[i] = covered.get(i, 0) + len(event.token_ids)
            pending.setdefault(i, []).extend(event.logprobs or [])
            if not hold and (event.text or i not in sent):
                lp = _logprobs(pending.pop(i)) if body.logprobs else None
                out = chunk(i, {"content": event.text}, logprobs=lp)
                sent[i] += event.text
                yield out
        else:
            reply = event
            for i, (text, finish, logprobs) in enumerate(_answers(reply)):
                calls = _tool_calls(text, call.functions) if finish == "stop" else None
                if calls:
                    yield chunk(i, {"content": None, "tool_calls": [{"index": 0, **calls[0]}]})
                    yield chunk(i, {}, "tool_calls")
                    continue
                streamed = sent.get(i, "")
                rest = text[len(streamed) :] if text.startswith(streamed) else ""
                unsent = pending.pop(i, []) + list(logprobs or [])[covered.get(i, 0) :]
                lp = _logprobs(unsent) if body.logprobs and unsent else None
                if rest or lp or i not in sent:
                    yield chunk(i, {"content": rest}, logprobs=lp)
                yield chunk(i, {}, finish)
            if (body.stream_options or {}).get("include_usage"):
                yield f"data: {json.dumps({**head, 'choices': [], 'usage': _usage(reply)})}\n\n"
            break
        try:
            event = await events.__anext__()
        except GatewayError as exc:  # the reply was an error, after pieces had gone out
            yield f"data: {json.dumps(exc.openai_body())}\n\n"
            break
    yield "data: [DONE]\n\n"


async def _closing(chunks: AsyncIterator[str], events: Any) -> AsyncIterator[str]:
    """The chunks; the request's events are closed however the response ends (a client that
    goes away mid-stream included)."""
    try:
        async for c in chunks:
            yield c
    finally:
        await events.aclose()


def routes(gw: Gateway) -> List[Route]:
    started = int(time.time())

    async def chat_completions(request: Request) -> Response:
        gw.authorize(request.headers)
        data = await read_json(request, gw.settings.limits.max_message_bytes)
        call = to_request(gw, data)
        events = gw.stream(call.req, request.headers.get("x-session-id"))
        try:
            first = await events.__anext__()  # an error before any piece keeps its HTTP status
        except BaseException:
            await events.aclose()
            raise
        if call.body.stream:
            return StreamingResponse(
                _closing(_chunks(events, first, call), events), media_type="text/event-stream"
            )
        await events.aclose()
        return JSONResponse(completion(first, call))

    def model_card(name: str) -> Dict[str, Any]:
        return {"id": name, "object": "model", "created": started, "owned_by": "vlmq"}

    async def models(request: Request) -> Response:
        gw.authorize(request.headers)
        return JSONResponse({"object": "list", "data": [model_card(m) for m in gw.settings.models]})

    async def model(request: Request) -> Response:
        gw.authorize(request.headers)
        name = request.path_params["model"]
        gw.route(name)  # 404 unless served
        return JSONResponse(model_card(name))

    return [
        Route(
            "/v1/chat/completions",
            handle_errors(chat_completions, GatewayError.openai_body),
            methods=["POST"],
        ),
        Route("/v1/models", handle_errors(models, GatewayError.openai_body), methods=["GET"]),
        Route("/v1/models/{model:path}", handle_errors(model, GatewayError.openai_body), methods=["GET"]),
    ]
