"""The web chat and the OpenAI-compatible API (SPEC §11.2): a FastAPI app over a pool of
generation workers.

    app = create_app(engines, tokenizer, model_name="nanochat-sft-d20-step000800")
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes
    GET  /                      the chat page (nanochat/ui/index.html); /static/* and /logo.svg beside it
    POST /chat/completions      upstream's SSE stream: data: {"token": "...", "gpu": 0} ... data: {"done": true}
    POST /v1/chat/completions   OpenAI chat completions (JSON or SSE chunks ending in data: [DONE])
    GET  /v1/models             the one served model
    GET  /health                liveness + readiness, never behind the API key (load balancers probe it)
    GET  /stats                 worker, queue and token counters

With an API key every route except the page, its static files and /health needs
`Authorization: Bearer <key>`. Errors are OpenAI-style JSON {"error": {message, type, param, code}}.

Concurrency: one worker thread per engine (one engine per GPU, one on CPU/MPS). Requests wait in
one bounded FIFO queue shared by the workers (full -> 429 + Retry-After). A worker runs the engine's
generator off the event loop and hands text to the request's asyncio.Queue through
loop.call_soon_threadsafe. Every generated token it checks the request's cancel flag, which is set
when the client disconnects or the request outlives --request-timeout, so a dropped client frees
its worker at once. When the engine has `generate_multi` (batched decode of different prompts) and
max_batch > 1, a worker that becomes free takes up to max_batch waiting rows with the same sampling
settings and decodes them together (dynamic batching); otherwise it serves one request at a time.

Text: tokens are decoded incrementally and a chunk is only emitted once its decoded text does not
end in U+FFFD, so multi-byte characters split across tokens are never sent half-formed (SPEC §11.2).
<|assistant_end|> and <|bos|> end a row and are never emitted. Tool calls: on /chat/completions the
tokens inside <|python_start|>..<|python_end|> and <|output_start|>..<|output_end|> are sent as
events with "part": "python" / "python_output" (the markers themselves are not sent); on /v1 the
content keeps the markers as text so the tool call stays visible to API clients.

Sampling: temperature and top_k as the engine (top_k 0 = off, temperature 0 = greedy). top_p is
passed to the engine when its generate() takes a top_p argument; otherwise only top_p = 1 is
accepted (anything else is a 400 saying so).
"""

import asyncio
import inspect
import json
import logging
import math
import os
import secrets
import threading
import time
from collections import deque
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("nanochat.server")

UI_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ui")

# Request limits (SPEC §11.2); violations are 400s with a message naming the limit.
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
KEEPALIVE_S = 15.0  # an SSE comment while a stream waits (queued), so proxies do not drop the connection

TERMINAL_TOKENS = ("<|assistant_end|>", "<|bos|>")
# special token -> (part it opens, part it closes)
TOOL_MARKERS = {"<|python_start|>": "python", "<|python_end|>": "text",
                "<|output_start|>": "python_output", "<|output_end|>": "text"}


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


class QueueFull(Exception):
    pass


# -----------------------------------------------------------------------------
# Tokens -> text


class StopMatcher:
    """Cuts a text stream at the first occurrence of any stop string. Text that could still be
    the start of a stop string is held back until the next chunk decides it."""

    def __init__(self, stops):
        self.stops = [s for s in stops if s]
        self.held = ""

    def push(self, text):
        """-> (text safe to emit, stopped)."""
        buf = self.held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return buf[:min(hits)], True
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:k]):
                    keep = k
                    break
        self.held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], False

    def flush(self):
        text, self.held = self.held, ""
        return text


class RowDecoder:
    """Turns one row's generated tokens into text deltas: (part, text) with part "text",
    "python", "python_output", or "marker" for a tool special token's own text. UTF-8 safe:
    pending tokens are decoded together and only released once the text is not cut mid-character."""

    def __init__(self, tokenizer, specials, max_tokens, stops=()):
        self.tok = tokenizer
        self.specials = specials  # id -> special token string
        self.max_tokens = max_tokens
        self.part = "text"
        self.pending = []
        self.stop = StopMatcher(stops) if stops else None
        self.num_tokens = 0
        self.finish_reason = None  # "stop" | "length" once finished

    @property
    def done(self):
        return self.finish_reason is not None

    def _emit(self, part, text, out):
        if not text:
            return
        if self.stop is not None:
            text, stopped = self.stop.push(text)
            if text:
                out.append((part, text))
            if stopped:
                self.finish_reason = "stop"
            return
        out.append((part, text))

    def _flush(self, out):
        """Release everything held back: pending tokens (even if cut mid-character) and text
        held for the stop matcher. Called before a part changes and when the row ends."""
        if self.pending:
            # pending tokens end mid-character (else feed() would have released them): the row
            # stops or switches part here, so the incomplete bytes can never complete; drop them
            text = self.tok.decode(self.pending).rstrip("\ufffd")
            self.pending = []
            self._emit(self.part, text, out)
        if self.stop is not None and self.stop.held and not self.done:
            out.append((self.part, self.stop.flush()))

    def feed(self, token):
        """Append one token; returns the list of deltas it releases (possibly empty)."""
        out = []
        if self.done:
            return out
        self.num_tokens += 1
        special = self.specials.get(token)
        if special in TERMINAL_TOKENS:
            self._finish("stop", out)
            return out
        if special is not None:
            if special in TOOL_MARKERS:
                self._flush(out)
                if not self.done:
                    self._emit("marker", special, out)
                    self.part = TOOL_MARKERS[special]
            # other specials (<|user_start|> ...) are not text the reply should carry
        else:
            self.pending.append(token)
            text = self.tok.decode(self.pending)
            if not text.endswith("\ufffd"):
                self.pending = []
                self._emit(self.part, text, out)
        if not self.done and self.num_tokens >= self.max_tokens:
            self._finish("length", out)
        return out

    def _finish(self, reason, out):
        self._flush(out)
        if not self.done:
            self.finish_reason = reason


# -----------------------------------------------------------------------------
# Jobs and the worker pool


class Job:
    """One request: n rows sampled from one prompt. The worker thread reports through push();
    the request's coroutine reads the asyncio.Queue. Events:
    ("start", worker_id) ("delta", row, part, text) ("finish", row, reason) ("end", usage) ("error", message)."""

    def __init__(self, prompt, *, n=1, max_tokens, temperature, top_k, top_p=1.0, seed=None, stops=(),
                 timeout=None, request_id=None):
        self.id = request_id or "chatcmpl-" + secrets.token_hex(12)
        self.prompt = list(prompt)
        self.n = n
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p
        self.seed = secrets.randbelow(2**31) if seed is None else seed
        self.stops = list(stops)
        self.created = time.monotonic()
        self.deadline = None if not timeout else self.created + timeout
        self.cancel = threading.Event()
        self.worker_id = None
        self.started = None
        self.completion_tokens = 0
        try:
            self.loop = asyncio.get_running_loop()
        except RuntimeError:
            self.loop = None
        self.events = asyncio.Queue() if self.loop else None

    def push(self, *event):
        if self.loop is None or self.cancel.is_set() and event[0] != "end":
            return
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is gone (shutdown)
            pass

    def batch_key(self):
        return (self.temperature, self.top_k, self.top_p)


class Worker:
    def __init__(self, worker_id, engine, device):
        self.id = worker_id
        self.engine = engine
        self.device = str(device)
        self.busy = False
        self.requests_served = 0
        self.tokens_generated = 0
        self.batches = 0
        self.max_rows_seen = 0
        params = inspect.signature(engine.generate).parameters
        self.has_top_p = "top_p" in params
        self.multi = getattr(engine, "generate_multi", None)
        self.multi_params = inspect.signature(self.multi).parameters if self.multi else {}


class WorkerPool:
    """Worker threads over one FIFO queue of Jobs."""

    def __init__(self, engines, tokenizer, devices=None, max_batch=1, max_queue=64):
        if not engines:
            raise ValueError("the worker pool needs at least one engine")
        devices = devices or ["cpu"] * len(engines)
        self.workers = [Worker(i, e, d) for i, (e, d) in enumerate(zip(engines, devices))]
        self.tokenizer = tokenizer
        self.specials = {tokenizer.encode_special(s): s for s in tokenizer.get_special_tokens()}
        self.max_batch = max(1, max_batch)
        self.max_queue = max_queue
        self.waiting = deque()
        self.running = set()  # jobs being generated, so close() can stop them
        self.cond = threading.Condition()
        self.closed = False
        self.requests_total = 0
        self.requests_rejected = 0
        self.requests_completed = 0
        self.service_time_ewma = None  # seconds per request, for Retry-After
        self.started_at = time.time()
        self.threads = [threading.Thread(target=self._run, args=(w,), name=f"nanochat-worker-{w.id}", daemon=True)
                        for w in self.workers]
        for t in self.threads:
            t.start()

    @property
    def supports_top_p(self):
        return all(w.has_top_p for w in self.workers)

    @property
    def batching(self):
        return self.max_batch > 1 and all(w.multi for w in self.workers)

    # --- the request side (event loop) ---------------------------------------------------

    def submit(self, job):
        with self.cond:
            if self.closed:
                raise QueueFull("the server is shutting down")
            self.requests_total += 1
            self._drop_cancelled()
            idle = sum(not w.busy for w in self.workers)  # a job for an idle worker waits only a moment
            if len(self.waiting) >= self.max_queue + idle:
                self.requests_rejected += 1
                raise QueueFull(f"the request queue is full ({self.max_queue} waiting)")
            self.waiting.append(job)
            self.cond.notify()

    def _drop_cancelled(self):
        """Forget queued jobs whose client left or timed out (call with self.cond held), so they
        hold no queue slot while the workers are busy."""
        if any(job.cancel.is_set() for job in self.waiting):
            self.waiting = deque(job for job in self.waiting if not job.cancel.is_set())

    def retry_after(self):
        """Seconds until a slot is likely free: queue length x recent service time / workers."""
        per = self.service_time_ewma or 1.0
        return max(1, min(60, math.ceil(per * (len(self.waiting) + 1) / len(self.workers))))

    def close(self):
        with self.cond:
            self.closed = True
            for job in list(self.waiting) + list(self.running):
                job.cancel.set()
            self.waiting.clear()
            self.cond.notify_all()
        for t in self.threads:
            t.join(timeout=5)  # each worker notices the cancel flag within one token

    def stats(self):
        with self.cond:
            self._drop_cancelled()
        busy = sum(w.busy for w in self.workers)
        return {
            "total_workers": len(self.workers),
            "available_workers": len(self.workers) - busy,
            "busy_workers": busy,
            "queue_depth": len(self.waiting),
            "max_queue": self.max_queue,
            "max_batch": self.max_batch,
            "batching": self.batching,
            "requests_total": self.requests_total,
            "requests_completed": self.requests_completed,
            "requests_rejected": self.requests_rejected,
            "tokens_generated": sum(w.tokens_generated for w in self.workers),
            "uptime_s": round(time.time() - self.started_at, 1),
            "workers": [{"gpu_id": w.id, "device": w.device, "busy": w.busy, "requests_served": w.requests_served,
                         "tokens_generated": w.tokens_generated, "batches": w.batches, "max_batch_rows": w.max_rows_seen}
                        for w in self.workers],
        }

    # --- the worker side (threads) --------------------------------------------------------

    def _take(self, worker):
        """Block until there is work; -> list of jobs (one, or several to decode together)."""
        with self.cond:
            while True:
                self._drop_cancelled()  # the client left while queued
                if self.waiting or self.closed:
                    break
                self.cond.wait()
            if self.closed:
                return None
            first = self.waiting.popleft()
            jobs = [first]
            if worker.multi and self.max_batch > 1:
                rows = first.n
                for job in list(self.waiting):
                    if rows >= self.max_batch:
                        break
                    if job.cancel.is_set() or job.batch_key() != first.batch_key() or rows + job.n > self.max_batch:
                        continue
                    self.waiting.remove(job)
                    jobs.append(job)
                    rows += job.n
            worker.busy = True
            self.running.update(jobs)
            return jobs

    def _run(self, worker):
        while True:
            jobs = self._take(worker)
            if jobs is None:
                return
            try:
                now = time.monotonic()
                for job in jobs:
                    job.worker_id = worker.id
                    job.started = now
                    job.push("start", worker.id)
                # with batching on, a job of n > 1 rows goes through generate_multi even alone: its
                # rows then sample from seed + i whether or not other jobs joined it (same seed, same text)
                if len(jobs) == 1 and (jobs[0].n == 1 or not (worker.multi and self.max_batch > 1)):
                    self._serve_one(worker, jobs[0])
                else:
                    self._serve_many(worker, jobs)
            except Exception as e:  # the engine failed: tell every client of this batch, keep serving
                logger.exception("generation failed")
                for job in jobs:
                    job.push("error", f"generation failed: {type(e).__name__}: {e}")
            finally:
                worker.requests_served += len(jobs)
                with self.cond:
                    worker.busy = False
                    self.running.difference_update(jobs)
                    self.requests_completed += len(jobs)
                    took = time.monotonic() - jobs[0].started
                    self.service_time_ewma = took if self.service_time_ewma is None else 0.8 * self.service_time_ewma + 0.2 * took

    def _rows(self, job):
        return [RowDecoder(self.tokenizer, self.specials, job.max_tokens, job.stops) for _ in range(job.n)]

    @staticmethod
    def _expired(job):
        return job.cancel.is_set() or (job.deadline is not None and time.monotonic() > job.deadline)

    def _deliver(self, job, rows, i, token):
        row = rows[i]
        if row.done:
            return
        for part, text in row.feed(token):
            job.push("delta", i, part, text)
        if row.done:
            job.push("finish", i, row.finish_reason)

    def _end(self, worker, job, rows):
        for i, row in enumerate(rows):
            if not row.done:
                out = []
                row._finish("length", out)
                for part, text in out:
                    job.push("delta", i, part, text)
                job.push("finish", i, row.finish_reason)
        completion = sum(r.num_tokens for r in rows)
        job.completion_tokens = completion
        worker.tokens_generated += completion
        job.push("end", {"prompt_tokens": len(job.prompt), "completion_tokens": completion,
                         "total_tokens": len(job.prompt) + completion})

    def _serve_one(self, worker, job):
        if self._expired(job):
            return
        rows = self._rows(job)
        kwargs = dict(num_samples=job.n, max_tokens=job.max_tokens, temperature=job.temperature,
                      top_k=job.top_k or None, seed=job.seed)
        if worker.has_top_p:
            kwargs["top_p"] = job.top_p
        worker.batches += 1
        worker.max_rows_seen = max(worker.max_rows_seen, job.n)
        gen = worker.engine.generate(job.prompt, **kwargs)
        try:
            for column, _masks in gen:
                if self._expired(job):
                    return
                for i, token in enumerate(column[:job.n]):
                    self._deliver(job, rows, i, token)
                if all(r.done for r in rows):
                    break
        finally:
            gen.close()
        self._end(worker, job, rows)

    def _serve_many(self, worker, jobs):
        """Dynamic batching: every row of every job in one generate_multi call."""
        prompts, owners, seeds = [], [], []
        rows = {}
        for job in jobs:
            if self._expired(job):
                continue
            rows[job.id] = self._rows(job)
            for i in range(job.n):
                prompts.append(job.prompt)
                owners.append((job, i))
                seeds.append(job.seed + i)
        if not prompts:
            return
        first = jobs[0]
        kwargs = dict(max_tokens=max(job.max_tokens for job, _ in owners), temperature=first.temperature,
                      top_k=first.top_k or None, seeds=seeds)
        if "top_p" in worker.multi_params:
            kwargs["top_p"] = first.top_p
        worker.batches += 1
        worker.max_rows_seen = max(worker.max_rows_seen, len(prompts))
        live = {job.id: job for job, _ in owners}
        gen = worker.multi(prompts, **kwargs)
        try:
            for column, _masks in gen:
                for r, token in enumerate(column):
                    job, i = owners[r]
                    if token is None or job.id not in live:
                        continue
                    if self._expired(job):
                        del live[job.id]
                        continue
                    self._deliver(job, rows[job.id], i, token)
                for job_id in [j for j, job in live.items() if all(r.done for r in rows[j])]:
                    self._end(worker, live.pop(job_id), rows[job_id])
                if not live:
                    break
        finally:
            gen.close()
        for job_id, job in live.items():
            self._end(worker, job, rows[job_id])


# -----------------------------------------------------------------------------
# Request schemas


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str = "text"
    text: str = ""


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[ContentPart] | None = None


class ChatRequest(BaseModel):
    """POST /chat/completions (upstream's web UI protocol)."""
    model_config = ConfigDict(extra="ignore")
    messages: list[Message]
    temperature: float | None = None
    top_k: int | None = None
    max_tokens: int | None = None
    seed: int | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class OpenAIChatRequest(BaseModel):
    """POST /v1/chat/completions. Unknown fields are ignored as OpenAI does; the ones that would
    change the answer and cannot be honoured (tools, logprobs, penalties) are rejected."""
    model_config = ConfigDict(extra="ignore")
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
    """Check SPEC §11.2's limits; -> messages as plain dicts (system merged later by the tokenizer)."""
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
    return out


def check_range(name, value, lo, hi):
    if value is not None and not (lo <= value <= hi):
        raise APIError(400, f"{name} must be between {lo} and {hi}, got {value}.", param=name)


def build_prompt(tokenizer, messages):
    """[BOS] + the conversation + <|assistant_start|>, rendered by the tokenizer (system merged into
    the first user message, SPEC §6.3) without render_conversation's 2048-token training crop."""
    try:
        ids, _ = tokenizer.render_conversation({"messages": messages}, max_tokens=10**9)
    except (ValueError, AssertionError) as e:
        raise APIError(400, f"Cannot render the conversation: {e}.", param="messages") from None
    ids.append(tokenizer.encode_special("<|assistant_start|>"))
    return ids


def _model_context(engine):
    """Prompt + reply must fit the model's sequence_len (the Engine refuses longer prompts and
    stops generating there); None for engines without a model (test doubles)."""
    config = getattr(getattr(engine, "model", None), "config", None)
    return getattr(config, "sequence_len", None)


# -----------------------------------------------------------------------------
# The app


def _sse(obj):
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(engines, tokenizer, *, model_name="nanochat", devices=None, temperature=0.8, top_k=50,
               max_tokens=512, max_batch=8, max_queue=64, request_timeout=300.0, api_key=None,
               cors_origins=(), log_conversations=False, max_context=None):
    """The FastAPI app over `engines` (one per device; each has generate(), optionally
    generate_multi()). Defaults for sampling come from the CLI flags."""
    pool = WorkerPool(engines, tokenizer, devices, max_batch=max_batch, max_queue=max_queue)
    max_context = max_context or _model_context(engines[0])

    @asynccontextmanager
    async def lifespan(app):
        yield
        pool.close()

    app = FastAPI(title="nanochat", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.pool = pool
    app.state.model_name = model_name
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type"])

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

    @app.exception_handler(Exception)
    async def _internal_error(request, exc):
        logger.exception("unhandled error")
        return JSONResponse(error_body("Internal server error.", "api_error"), status_code=500)

    # --- auth ------------------------------------------------------------------------------

    async def require_key(request: Request):
        if not api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "Missing or wrong API key: send 'Authorization: Bearer <key>'.",
                           "authentication_error", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    auth = [Depends(require_key)]

    # --- page and static files -----------------------------------------------------------

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(os.path.join(UI_DIR, "index.html"), media_type="text/html")

    @app.get("/logo.svg", include_in_schema=False)
    async def logo():
        return FileResponse(os.path.join(UI_DIR, "logo.svg"), media_type="image/svg+xml")

    app.mount("/static", StaticFiles(directory=UI_DIR), name="static")

    # --- info ----------------------------------------------------------------------------

    @app.get("/health")
    async def health():
        s = pool.stats()
        alive = all(t.is_alive() for t in pool.threads) and not pool.closed
        return {"status": "ok" if alive else "unavailable", "ready": alive, "model": model_name,
                "num_gpus": s["total_workers"], "available_workers": s["available_workers"],
                "queue_depth": s["queue_depth"], "auth": bool(api_key)}

    @app.get("/stats", dependencies=auth)
    async def stats():
        return {"model": model_name, **pool.stats()}

    @app.get("/v1/models", dependencies=auth)
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(pool.started_at),
                                            "owned_by": "nanochat"}]}

    @app.get("/v1/models/{model_id:path}", dependencies=auth)
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
                raise APIError(400, f"top_p must be in (0, 1], got {p}.", param="top_p")
            if p < 1.0 and not pool.supports_top_p:
                raise APIError(400, "top_p < 1 is not supported by this engine; use top_k (extra_body) instead.",
                               param="top_p", code="unsupported_value")
        prompt = build_prompt(tokenizer, msgs)
        max_new = max_tokens if max_new is None else max_new
        if max_context:
            if len(prompt) >= max_context:
                raise APIError(400, f"The conversation is {len(prompt)} tokens; the model's context is {max_context}.",
                               param="messages", code="context_length_exceeded")
            max_new = min(max_new, max_context - len(prompt))
        job = Job(prompt, n=n, max_tokens=max_new, temperature=temperature if temp is None else temp,
                  top_k=top_k if k is None else k, top_p=1.0 if p is None else p, seed=seed, stops=stops,
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
                        job.cancel.set()
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
            job.cancel.set()
            if watcher is not None:
                watcher.cancel()

    def log_request(job, route, status, texts=None):
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

    # --- upstream's streaming route --------------------------------------------------------------

    @app.post("/chat/completions", dependencies=auth)
    async def chat_completions(req: ChatRequest):
        job = make_job(req.messages, temp=req.temperature, k=req.top_k, p=None, max_new=req.max_tokens,
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

    @app.post("/v1/chat/completions", dependencies=auth)
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


# -----------------------------------------------------------------------------
# Loading the engines (used by scripts/chat_web.py)


def load_engines(num_gpus=1, source="sft", device_type="", model_tag=None, step=None):
    """One model + Engine per device: cuda:0..num_gpus-1, or a single cpu/mps one.
    -> (engines, tokenizer, devices, model_name)."""
    import torch

    from nanochat.checkpoint import build_model, resolve_checkpoint
    from nanochat.common import NanochatError, autodetect_device_type
    from nanochat.engine import Engine

    device_type = device_type or autodetect_device_type()
    if device_type == "cuda":
        if not torch.cuda.is_available():
            raise NanochatError("--device-type=cuda was asked for but no CUDA device is visible; use --device-type=cpu.")
        if num_gpus > torch.cuda.device_count():
            raise NanochatError(f"--num-gpus={num_gpus} but only {torch.cuda.device_count()} CUDA devices are visible.")
        devices = [f"cuda:{i}" for i in range(num_gpus)]
    else:
        if num_gpus != 1:
            raise NanochatError(f"--num-gpus={num_gpus} needs CUDA; on {device_type} the server runs one worker.")
        devices = [device_type]
    checkpoint_dir, step = resolve_checkpoint(source, model_tag, step)
    engines, tokenizer = [], None
    for device in devices:
        model, tokenizer, _meta = build_model(checkpoint_dir, step, device, "eval", tokenizer=tokenizer)
        engines.append(Engine(model, tokenizer))
    tag = os.path.basename(os.path.normpath(checkpoint_dir))
    return engines, tokenizer, devices, f"nanochat-{source}-{tag}-step{step:06d}"


# -----------------------------------------------------------------------------
# Serving in the background (tests, benchmarks, notebooks)


class BackgroundServer:
    """`with BackgroundServer(app) as s:` serves `app` under uvicorn on a free loopback port
    (s.url) from a daemon thread, and shuts it down on exit."""

    def __init__(self, app, start_timeout=20.0):
        import socket

        import uvicorn

        self.start_timeout = start_timeout
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on",
                                timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + self.start_timeout
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()
