"""What a request may contain: the request models, the limits and their validation, the
OpenAI-style error shape, and the prompt a valid conversation renders to."""

from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from nanochat.tokenizer import ConversationError, check_conversation

# Request limits (docs/security.md#the-server); violations are 400s with a message naming the limit.
MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 8000
MAX_TOTAL_CHARS = 32000
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.0, 2.0
MIN_TOP_K, MAX_TOP_K = 0, 200  # 0 = no top-k
MIN_MAX_TOKENS, MAX_MAX_TOKENS = 1, 4096
MIN_SEED, MAX_SEED = -2**63, 2**63 - 1  # int64, as OpenAI; row i of a request samples from seed + i
MAX_N = 8  # choices per /v1 request
MAX_STOP = 4  # stop strings per request, as OpenAI
MAX_STOP_CHARS = 200


# -----------------------------------------------------------------------------
# Errors


class APIError(Exception):
    """An error answered as OpenAI-style JSON with an HTTP status."""

    def __init__(self, status, message, type_="invalid_request_error", param=None, code=None, headers=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers


def error_body(message, type_="invalid_request_error", param=None, code=None):
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(err):
    return JSONResponse(error_body(err.message, err.type, err.param, err.code), status_code=err.status, headers=err.headers)


# -----------------------------------------------------------------------------
# Request schemas
#
# Strict types: a string is never taken for a bool or a number ("stream": "yes" and "max_tokens": "3"
# are 422s, not a stream and 3), a float never for an int; an int is still a valid float
# (temperature 1). NaN and infinities are refused. Unknown fields are ignored, as OpenAI does.

STRICT = ConfigDict(strict=True, allow_inf_nan=False)


class ContentPart(BaseModel):
    model_config = ConfigDict(**STRICT, extra="allow")
    type: str = "text"
    text: str = ""


class Message(BaseModel):
    model_config = ConfigDict(**STRICT, extra="allow")
    role: str
    content: str | list[ContentPart] | None = None


class ChatRequest(BaseModel):
    """POST /chat/completions (the protocol of the bundled web page, nanochat/ui)."""
    model_config = ConfigDict(**STRICT, extra="ignore")
    messages: list[Message]
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    seed: int | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(**STRICT, extra="ignore")
    include_usage: bool = False


class OpenAIChatRequest(BaseModel):
    """POST /v1/chat/completions. Unknown fields are ignored as OpenAI does; the ones that would
    change the answer and cannot be honoured (tools, logprobs, penalties) are rejected."""
    model_config = ConfigDict(**STRICT, extra="ignore")
    model: str | None = None
    messages: list[Message]
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # not OpenAI's, but clients can send it (extra_body)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: bool | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None


# -----------------------------------------------------------------------------
# Response schemas: they document the API (GET /openapi.json) and the fuzz test checks every
# response against them; the routes build plain dicts.


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    ready: bool
    model: str
    num_gpus: int
    available_workers: int
    queue_depth: int
    auth: bool


class WorkerStats(BaseModel):
    gpu_id: int
    device: str
    busy: bool
    requests_served: int
    tokens_generated: int
    batches: int
    max_batch_rows: int


class Stats(BaseModel):
    model: str
    total_workers: int
    available_workers: int
    busy_workers: int
    queue_depth: int
    max_queue: int
    max_batch: int
    batching: bool
    batching_mode: Literal["step", "admission", "off"]
    requests_total: int
    requests_completed: int
    requests_rejected: int
    requests_by_status: dict[str, int]
    tokens_generated: int
    uptime_s: float
    workers: list[WorkerStats]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None
    finish_reason: Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: None
    choices: list[Choice]
    usage: Usage


ERROR_STATUSES = {400: "Invalid request, or a Host the server does not answer to", 401: "Missing or wrong API key",
                  404: "No such model", 408: "The body came too slowly", 413: "The body is too large",
                  422: "Malformed body: bad JSON, a missing field or a value of the wrong type",
                  429: "The queue is full (see Retry-After)", 500: "Internal error (details in the server log)",
                  504: "The request outlived the server's request timeout"}


def documented(model, *errors, stream=False):
    """The `responses` of a route for its OpenAPI entry: 200 with `model` (and/or an SSE stream),
    the listed error statuses and 400/500 (which any request can get) as ErrorResponse."""
    ok = {"description": "Success"}
    if model is not None:
        ok["model"] = model
    if stream:
        ok["content"] = {"text/event-stream": {"schema": {"type": "string"}}}
    out = {200: ok}
    for status in sorted({400, 500, *errors}):
        out[status] = {"model": ErrorResponse, "description": ERROR_STATUSES[status]}
    return out


# -----------------------------------------------------------------------------
# Validation and prompt building


def _content_text(message, index, allow_parts):
    """A message's content as a string, or (assistant on /chat/completions) a list of tool parts."""
    content = message.content
    if content is None:
        raise APIError(400, f"messages[{index}] has no content.", param=f"messages[{index}].content")
    if isinstance(content, str):
        return content, len(content)
    parts = []
    for part in content:
        if part.type == "text" or (allow_parts and part.type in ("python", "python_output")):
            parts.append({"type": part.type, "text": part.text})
        else:
            raise APIError(400, f"messages[{index}] has a content part of type {part.type!r}; only text is supported.",
                           param=f"messages[{index}].content")
    chars = sum(len(p["text"]) for p in parts)
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts), chars
    return parts, chars


def validate_messages(messages, allow_tool_parts=False):
    """Check the request limits and the chat format; -> messages as plain dicts (system merged
    later by the tokenizer)."""
    if not messages:
        raise APIError(400, "At least one message is required.", param="messages")
    if len(messages) > MAX_MESSAGES:
        raise APIError(400, f"Too many messages: {len(messages)} (the limit is {MAX_MESSAGES}).", param="messages")
    out, total = [], 0
    for i, m in enumerate(messages):
        role = "system" if m.role == "developer" else m.role
        if role not in ("system", "user", "assistant"):
            raise APIError(400, f"messages[{i}] has role {m.role!r}; the roles are system, user and assistant.",
                           param=f"messages[{i}].role")
        if role == "system" and i != 0:
            raise APIError(400, "A system message may only come first.", param=f"messages[{i}].role")
        content, chars = _content_text(m, i, allow_tool_parts and role == "assistant")
        if chars == 0:
            raise APIError(400, f"messages[{i}] is empty.", param=f"messages[{i}].content")
        if chars > MAX_MESSAGE_CHARS:
            raise APIError(400, f"messages[{i}] is too long: {chars} characters (the limit is {MAX_MESSAGE_CHARS}).",
                           param=f"messages[{i}].content")
        total += chars
        out.append({"role": role, "content": content})
    if total > MAX_TOTAL_CHARS:
        raise APIError(400, f"The conversation is too long: {total} characters (the limit is {MAX_TOTAL_CHARS}).",
                       param="messages")
    if out[-1]["role"] != "user":
        raise APIError(400, "The last message must be from the user.", param="messages")
    try:
        check_conversation(out)
    except ConversationError as e:
        raise APIError(400, f"The conversation is not in the chat format: {e}", param="messages") from None
    return out


def check_range(name, value, lo, hi):
    if value is not None and not (lo <= value <= hi):
        raise APIError(400, f"{name} must be between {lo} and {hi}, got {value}.", param=name)


def build_prompt(tokenizer, messages):
    """[BOS] + the conversation + <|assistant_start|>, rendered by the tokenizer (system merged into
    the first user message) without render_conversation's 2048-token training crop."""
    ids, _ = tokenizer.render_conversation({"messages": messages}, max_tokens=10**9)
    return ids + [tokenizer.encode_special("<|assistant_start|>")]
