"""The web chat and the OpenAI-compatible API: a FastAPI app over a pool of
generation workers.

    from nanochat.server import create_app
    from nanochat.server.run import uvicorn_config
    app = create_app(engines, tokenizer, model_name="nanochat-sft-d20-step000800")
    uvicorn.Server(uvicorn_config(app, "127.0.0.1", 8000)).run()  # uvicorn + the connection limits

Routes
    GET  /                      the chat page (nanochat/ui/index.html); /static/* and /logo.svg beside it
    POST /chat/completions      the web UI's SSE stream (the original nanochat's format): data: {"token": "...", "gpu": 0} ... data: {"done": true}
    POST /v1/chat/completions   OpenAI chat completions (JSON or SSE chunks ending in data: [DONE])
    GET  /v1/models             the one served model
    GET  /health                liveness + readiness, never behind the API key (load balancers probe it)
    GET  /stats                 worker, queue and token counters
    GET  /openapi.json          the API's schema

With an API key every route except the page, its static files and /health needs
`Authorization: Bearer <key>`. Errors are OpenAI-style JSON {"error": {message, type, param, code}}.
Before any route runs, security.py checks the Host header, the key and the body's size and
arrival time; run.py bounds connections (slow request heads, their number).

The package, one concern per module:
    app.py        create_app: the routes, request -> job -> response
    schemas.py    request models, limits and validation, the error shape, prompt building
    scheduler.py  Job, Worker, WorkerPool, StepBatch: the queue, the generation threads, continuous batching
    text.py       RowDecoder, StopMatcher: generated tokens -> UTF-8-safe text deltas; ReplyTokens: a
                  reply sent back in the next turn rendered as the tokens it was generated as
    security.py   the ASGI middlewares in front of the routes: Host, API key, body limits, headers, 500s
    run.py        load_engines (checkpoints -> engines), uvicorn with connection limits, BackgroundServer
"""

from nanochat.server.app import create_app
from nanochat.server.run import BackgroundServer, load_engines

__all__ = ["BackgroundServer", "create_app", "load_engines"]
