"""Running the app: load_engines (checkpoints -> one Engine per device, for scripts/chat_web.py)
and BackgroundServer (uvicorn in a thread, for tests, benchmarks and notebooks)."""

import os
import threading
import time

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
