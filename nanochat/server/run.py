"""Running the app: load_engines (checkpoints -> one Engine per device, for scripts/chat_web.py),
uvicorn_config (uvicorn with the connection limits a public server needs; chat_web and
BackgroundServer both use it) and BackgroundServer (uvicorn in a thread, for tests, benchmarks
and notebooks).

Connection limits. A client that opens a connection and sends its request head slowly, or never,
costs the server a file descriptor; uvicorn has no deadline for the head (its keep-alive timeout
only runs between requests, and any byte received cancels it), and its limit_concurrency answers
503 only once a head has arrived, so it frees nothing. Enough such connections exhaust the
descriptors, accept() fails, and uvicorn stops accepting (the health probe included). So:
  - header_timeout: GuardedH11Protocol closes a connection whose request head is not complete
    this many seconds after the connection opened or the previous response ended;
  - max_connections: the same protocol refuses (503, closed at once) a connection beyond the cap,
    which is also uvicorn's limit_concurrency, and the cap is lowered to fit the process's
    open-file limit;
  - keep_alive_timeout: uvicorn's own timeout_keep_alive for idle connections between requests;
  - a request head still incomplete after MAX_HEADER_BYTES is a 400 (h11's incomplete-event limit, set
    explicitly; it bounds what a slow head can make the server buffer);
  - the body's size and read time are checked by the app itself (security.RequestGate).
"""

import os
import resource
import threading
import time

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_TIMEOUT_S = 10.0  # generous for any real client: a browser sends its whole head in one packet
KEEP_ALIVE_S = 5  # uvicorn's default
MAX_CONNECTIONS = 1000
MAX_HEADER_BYTES = 16 * 1024
FD_RESERVE = 100  # descriptors kept for everything else (model files, logs, pipes, the listening socket)

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
# uvicorn with connection limits


class GuardedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol plus a deadline for each request head and a refusal at
    connect time beyond the connection cap (see the module docstring)."""

    _BUSY = b"The server has too many connections; retry later."
    REFUSED = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
               b"content-length: %d\r\n\r\n%s" % (len(_BUSY), _BUSY))

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self.header_timeout = getattr(config, "header_timeout", HEADER_TIMEOUT_S)
        self.head_timer = None

    def connection_made(self, transport):
        super().connection_made(transport)
        # uvicorn's own check (len(connections) >= limit_concurrency -> 503) made at connect time,
        # so the descriptor is freed now rather than when the client gets round to a request
        if self.limit_concurrency is not None and len(self.connections) >= self.limit_concurrency:
            transport.write(self.REFUSED)
            transport.close()
            return
        self._await_head()

    def _await_head(self):
        self._stop_head_timer()
        self.head_timer = self.loop.call_later(self.header_timeout, self._head_too_slow)

    def _stop_head_timer(self):
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def _head_too_slow(self):
        self.head_timer = None
        if not self.transport.is_closing():
            self.transport.close()

    def handle_events(self):
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a complete request head arrived: the app's limits take over
            self._stop_head_timer()

    def on_response_complete(self):
        self._await_head()  # the next request's head (a pipelined one, started below, stops the timer)
        super().on_response_complete()

    def connection_lost(self, exc):
        self._stop_head_timer()
        super().connection_lost(exc)


def connection_limit(max_connections):
    """max_connections, lowered to fit the open-file limit (each connection is a descriptor)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return max_connections
    return max(1, min(max_connections, soft - FD_RESERVE))


def uvicorn_config(app, host="127.0.0.1", port=8000, *, max_connections=MAX_CONNECTIONS,
                   header_timeout=HEADER_TIMEOUT_S, keep_alive_timeout=KEEP_ALIVE_S, **kwargs):
    """A uvicorn.Config for `app` with the connection limits above; kwargs go to uvicorn.Config."""
    config = uvicorn.Config(app, host=host, port=port, http=GuardedH11Protocol,
                            limit_concurrency=connection_limit(max_connections), timeout_keep_alive=keep_alive_timeout,
                            h11_max_incomplete_event_size=MAX_HEADER_BYTES, **kwargs)
    config.header_timeout = header_timeout  # read by GuardedH11Protocol (uvicorn hands each protocol its config)
    return config


# -----------------------------------------------------------------------------
# Serving in the background (tests, benchmarks, notebooks)


class BackgroundServer:
    """`with BackgroundServer(app) as s:` serves `app` under uvicorn on a free loopback port
    (s.url) from a daemon thread, and shuts it down on exit. limits: max_connections,
    header_timeout, keep_alive_timeout (see uvicorn_config)."""

    def __init__(self, app, start_timeout=20.0, **limits):
        import socket

        self.start_timeout = start_timeout
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn_config(app, "127.0.0.1", self.port, log_level="warning", lifespan="on",
                                timeout_graceful_shutdown=2, **limits)
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
