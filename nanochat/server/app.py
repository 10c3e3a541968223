"""create_app: the FastAPI app, its routes, and how a request becomes a Job and its events a response.

Sampling: temperature, top_k and top_p (nucleus) as the engine (top_k 0 = off, top_p 1 = off,
temperature 0 = greedy), on both chat routes. Engines with session() sample top_p; an older engine
whose generate() takes no top_p accepts only top_p = 1 (anything else is a 400 saying so).

Readiness: each worker warms its engine up (engine.warmup(), when it has one) before serving;
/health says ready only once every worker has.

Tool calls: on /chat/completions the tokens inside <|python_start|>..<|python_end|> and
<|output_start|>..<|output_end|> are sent as events with "part": "python" / "python_output" (the
markers themselves are not sent); on /v1 the content keeps the markers as text so the tool call
stays visible to API clients.
"""

import asyncio
import json
import logging
import os
import time
from collections import Counter
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanochat.server.scheduler import Job, QueueFull, WorkerPool
from nanochat.server.schemas import (
    MAX_MAX_TOKENS,
    MAX_N,
    MAX_SEED,
    MAX_STOP,
    MAX_STOP_CHARS,
    MAX_TEMPERATURE,
    MAX_TOP_K,
    MIN_MAX_TOKENS,
    MIN_SEED,
    MIN_TEMPERATURE,
    MIN_TOP_K,
    APIError,
    ChatCompletion,
    ChatRequest,
    Health,
    ModelCard,
    ModelList,
    OpenAIChatRequest,
    Stats,
    build_prompt,
    check_range,
    documented,
    error_body,
    error_response,
    validate_messages,
)
from nanochat.server.security import BODY_TIMEOUT_S, LOOPBACK_HOSTS, MAX_BODY_BYTES, RequestGate, SafeResponses

logger = logging.getLogger("nanochat.server")

UI_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ui")
KEEPALIVE_S = 15.0  # an SSE comment while a stream waits (queued), so proxies do not drop the connection
CHAT_ERRORS = (400, 401, 408, 413, 422, 429, 504)  # what a chat route can answer besides 200 (and 500)


def _model_context(engine):
    """Prompt + reply must fit the model's sequence_len (the Engine refuses longer prompts and
    stops generating there); None for engines without a model (test doubles)."""
    config = getattr(getattr(engine, "model", None), "config", None)
    return getattr(config, "sequence_len", None)


def _sse(obj):
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(engines, tokenizer, *, model_name="nanochat", devices=None, temperature=0.8, top_k=50, top_p=1.0,
               max_tokens=512, max_batch=8, max_queue=64, request_timeout=300.0, api_key=None,
               cors_origins=(), log_conversations=False, max_context=None, allowed_hosts=LOOPBACK_HOSTS,
               max_body_bytes=MAX_BODY_BYTES, body_timeout=BODY_TIMEOUT_S, batching="step"):
    """The FastAPI app over `engines` (one per device; each has session(), or generate() and
    optionally generate_multi()). Defaults for sampling come from the CLI flags. batching: "step"
    (requests join a running batch) or "admission" (only a starting one), see scheduler.py.
    allowed_hosts: the Host names answered (default: loopback names only; None or ["*"] = any),
    see security.py."""
    pool = WorkerPool(engines, tokenizer, devices, max_batch=max_batch, max_queue=max_queue, batching=batching)
    max_context = max_context or _model_context(engines[0])
    if top_p < 1.0 and not pool.supports_top_p:
        pool.close()
        raise ValueError("a default top_p below 1 needs an engine that samples top_p (Engine.session)")

    @asynccontextmanager
    async def lifespan(app):
        yield
        pool.close()

    # /openapi.json describes the API routes (behind the API key like them); no docs pages: they load scripts from a CDN
    app = FastAPI(title="nanochat", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.state.pool = pool
    app.state.model_name = model_name
    # added innermost first: SafeResponses -> [CORS] -> RequestGate -> the routes (see security.py)
    app.add_middleware(RequestGate, api_key=api_key, max_body_bytes=max_body_bytes, body_timeout=body_timeout)
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(SafeResponses, allowed_hosts=allowed_hosts)

    # --- errors as OpenAI JSON ---------------------------------------------------------------

    @app.exception_handler(APIError)
    async def _api_error(request, exc):
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(exc.status_code, "api_error")
        message = "Not found." if exc.status_code == 404 else str(exc.detail)
        return JSONResponse(error_body(message, kind), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc):
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        message = f"Invalid request: {first.get('msg', 'invalid value')}" + (f" (at {param})." if param else ".")
        return JSONResponse(error_body(message, "invalid_request_error", param, "invalid_value"), status_code=422)

    # any other exception becomes a generic 500 in SafeResponses (details only in the server log)

    # --- page and static files -----------------------------------------------------------

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(os.path.join(UI_DIR, "index.html"), media_type="text/html")

    @app.get("/logo.svg", include_in_schema=False)
    async def logo():
        return FileResponse(os.path.join(UI_DIR, "logo.svg"), media_type="image/svg+xml")

    app.mount("/static", StaticFiles(directory=UI_DIR), name="static")

    # --- info ----------------------------------------------------------------------------

    @app.get("/health", responses=documented(Health))
    async def health():
        s = pool.stats()
        alive = all(t.is_alive() for t in pool.threads) and not pool.closed
        return {"status": "ok" if alive else "unavailable", "ready": alive and pool.ready, "model": model_name,
                "num_gpus": s["total_workers"], "available_workers": s["available_workers"],
                "queue_depth": s["queue_depth"], "auth": bool(api_key)}

    @app.get("/stats", responses=documented(Stats, 401))
    async def stats():
        return {"model": model_name, **pool.stats(), "requests_by_status": dict(requests_by_status)}

    @app.get("/v1/models", responses=documented(ModelList, 401))
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(pool.started_at),
                                            "owned_by": "nanochat"}]}

    @app.get("/v1/models/{model_id:path}", responses=documented(ModelCard, 401, 404))
    async def model_info(model_id: str):
        if model_id not in (model_name, "nanochat"):
            raise APIError(404, f"The model {model_id!r} does not exist; this server serves {model_name!r}.",
                           param="model", code="model_not_found")
        return {"id": model_name, "object": "model", "created": int(pool.started_at), "owned_by": "nanochat"}

    # --- helpers shared by both chat routes -----------------------------------------------------

    def make_job(messages, *, temp, k, p, max_new, seed, n=1, stops=(), allow_tool_parts=False):
        msgs = validate_messages(messages, allow_tool_parts)
        check_range("temperature", temp, MIN_TEMPERATURE, MAX_TEMPERATURE)
        check_range("top_k", k, MIN_TOP_K, MAX_TOP_K)
        check_range("max_tokens", max_new, MIN_MAX_TOKENS, MAX_MAX_TOKENS)
        check_range("n", n, 1, MAX_N)
        check_range("seed", seed, MIN_SEED, MAX_SEED)
        if p is not None:
            if not (0.0 < p <= 1.0):
                raise APIError(400, f"top_p must be more than 0 and at most 1 (1 = off), got {p}.", param="top_p")
            if p < 1.0 and not pool.supports_top_p:
                raise APIError(400, "top_p < 1 is not supported by this engine; use top_k (extra_body) instead.",
                               param="top_p", code="unsupported_value")
        prompt = pool.replies.render(build_prompt(tokenizer, msgs))
        max_new = max_tokens if max_new is None else max_new
        if max_context:
            if len(prompt) >= max_context:
                raise APIError(400, f"The conversation is {len(prompt)} tokens; the model's context is {max_context}.",
                               param="messages", code="context_length_exceeded")
            max_new = min(max_new, max_context - len(prompt))
        job = Job(prompt, n=n, max_tokens=max_new, temperature=temperature if temp is None else temp,
                  top_k=top_k if k is None else k, top_p=top_p if p is None else p, seed=seed, stops=stops,
                  timeout=request_timeout)
        job.messages = msgs
        try:
            pool.submit(job)
        except QueueFull as e:
            raise APIError(429, f"The server is busy: {e}; retry later.", "rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(pool.retry_after())}) from None
        return job

    async def events(job, request=None):
        """The job's events until "end"/"error"; enforces the deadline; cancels the job if the
        consumer stops early (client gone). For non-streaming requests also watches `request`
        for a disconnect."""
        watcher = None
        if request is not None:
            async def watch():
                while not job.cancel.is_set():
                    if await request.is_disconnected():
                        job.stop()
                        job.push("end", None)  # wake the reader
                        return
                    await asyncio.sleep(0.2)
            watcher = asyncio.ensure_future(watch())
        try:
            while True:
                remaining = None if job.deadline is None else job.deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError
                try:
                    ev = await asyncio.wait_for(job.events.get(), KEEPALIVE_S if remaining is None
                                                else min(KEEPALIVE_S, remaining))
                except asyncio.TimeoutError:
                    if job.deadline is not None and time.monotonic() >= job.deadline:
                        raise TimeoutError from None
                    yield ("ping",)
                    continue
                yield ev
                if ev[0] in ("end", "error"):
                    return
        finally:
            job.stop()
            if watcher is not None:
                watcher.cancel()

    requests_by_status = Counter()  # ok / disconnected / timeout / error, for /stats

    def log_request(job, route, status, texts=None):
        """The request's one log line. tokens_out counts every token generated for it, also when it
        ended early: the job is stopped first, so no token is counted after the line is written."""
        job.stop()
        requests_by_status[status] += 1
        latency = time.monotonic() - job.created
        queued = (job.started - job.created) if job.started else latency
        line = (f"{job.id} {route} status={status} worker={job.worker_id} tokens_in={len(job.prompt)} "
                f"tokens_out={job.completion_tokens} queue_s={queued:.3f} latency_s={latency:.3f}")
        if log_conversations:
            line += f" messages={json.dumps(job.messages, ensure_ascii=False)} reply={json.dumps(texts, ensure_ascii=False)}"
        logger.info(line)

    def timeout_error():
        return APIError(504, f"The request took longer than the server's limit of {request_timeout:g} s.",
                        "timeout_error", code="request_timeout")

    # --- the web UI's streaming route (the original nanochat's SSE format) -----------------------

    @app.post("/chat/completions", responses=documented(None, *CHAT_ERRORS, stream=True))
    async def chat_completions(req: ChatRequest):
        job = make_job(req.messages, temp=req.temperature, k=req.top_k, p=req.top_p, max_new=req.max_tokens,
                       seed=req.seed, allow_tool_parts=True)

        async def stream():
            reply, status = [], "ok"
            try:
                async for ev in events(job):
                    if ev[0] == "ping":
                        yield ": keep-alive\n\n"
                    elif ev[0] == "delta" and ev[2] != "marker":
                        reply.append(ev[3])
                        out = {"token": ev[3], "gpu": job.worker_id}
                        if ev[2] != "text":
                            out["part"] = ev[2]
                        yield _sse(out)
                    elif ev[0] == "error":
                        status = "error"
                        yield _sse({"error": ev[1]})
                yield _sse({"done": True})
            except TimeoutError:
                status = "timeout"
                yield _sse({"error": timeout_error().message})
                yield _sse({"done": True})
            except asyncio.CancelledError:
                status = "disconnected"
                raise
            finally:
                log_request(job, "/chat/completions", status, "".join(reply))

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # --- OpenAI-compatible route -----------------------------------------------------------------

    @app.post("/v1/chat/completions", responses=documented(ChatCompletion, *CHAT_ERRORS, 404, stream=True))
    async def v1_chat_completions(req: OpenAIChatRequest, request: Request):
        if req.model is not None and req.model not in (model_name, "nanochat"):
            raise APIError(404, f"The model {req.model!r} does not exist; this server serves {model_name!r}.",
                           param="model", code="model_not_found")
        if req.tools or req.tool_choice not in (None, "none"):
            raise APIError(400, "Function tools are not supported (the model's only tool is its own calculator).",
                           param="tools", code="unsupported_parameter")
        if req.logprobs:
            raise APIError(400, "logprobs are not supported.", param="logprobs", code="unsupported_parameter")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(req, name) not in (None, 0, 0.0):
                raise APIError(400, f"{name} is not supported (only 0).", param=name, code="unsupported_parameter")
        if req.response_format and req.response_format.get("type", "text") != "text":
            raise APIError(400, "Only response_format type 'text' is supported.", param="response_format",
                           code="unsupported_parameter")
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > MAX_STOP or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise APIError(400, f"stop takes up to {MAX_STOP} non-empty strings of at most {MAX_STOP_CHARS} characters.",
                           param="stop")
        max_new = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        job = make_job(req.messages, temp=req.temperature, k=req.top_k, p=req.top_p, max_new=max_new, seed=req.seed,
                       n=req.n, stops=stops)
        created = int(time.time())
        base = {"id": job.id, "created": created, "model": model_name}

        if not req.stream:
            texts, reasons, usage = [""] * job.n, ["length"] * job.n, None
            try:
                async for ev in events(job, request):
                    if ev[0] == "delta":
                        texts[ev[1]] += ev[3]
                    elif ev[0] == "finish":
                        reasons[ev[1]] = ev[2]
                    elif ev[0] == "end":
                        usage = ev[1]
                    elif ev[0] == "error":
                        log_request(job, "/v1/chat/completions", "error")
                        raise APIError(500, ev[1], "api_error", code="generation_failed")
            except TimeoutError:
                log_request(job, "/v1/chat/completions", "timeout", texts)
                raise timeout_error() from None
            if usage is None:  # the client went away
                log_request(job, "/v1/chat/completions", "disconnected", texts)
                return JSONResponse(error_body("Client disconnected.", "api_error"), status_code=499)
            log_request(job, "/v1/chat/completions", "ok", texts)
            return {**base, "object": "chat.completion", "system_fingerprint": None,
                    "choices": [{"index": i, "message": {"role": "assistant", "content": texts[i]},
                                 "logprobs": None, "finish_reason": reasons[i]} for i in range(job.n)],
                    "usage": usage}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(choices, usage=None):
            out = {**base, "object": "chat.completion.chunk", "system_fingerprint": None, "choices": choices}
            if include_usage:
                out["usage"] = usage
            return _sse(out)

        async def stream():
            texts, status = [""] * job.n, "ok"
            try:
                for i in range(job.n):
                    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}])
                async for ev in events(job):
                    if ev[0] == "ping":
                        yield ": keep-alive\n\n"
                    elif ev[0] == "delta":
                        texts[ev[1]] += ev[3]
                        yield chunk([{"index": ev[1], "delta": {"content": ev[3]}, "logprobs": None,
                                      "finish_reason": None}])
                    elif ev[0] == "finish":
                        yield chunk([{"index": ev[1], "delta": {}, "logprobs": None, "finish_reason": ev[2]}])
                    elif ev[0] == "end" and include_usage:
                        yield chunk([], ev[1])
                    elif ev[0] == "error":
                        status = "error"
                        yield _sse(error_body(ev[1], "api_error", code="generation_failed"))
            except TimeoutError:
                status = "timeout"
                err = timeout_error()
                yield _sse(error_body(err.message, err.type, code=err.code))
            except asyncio.CancelledError:
                status = "disconnected"
                raise
            finally:
                log_request(job, "/v1/chat/completions", status, texts)
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app
