"""Serve the chat page and the OpenAI-compatible API (docs/serving.md).

    python -m scripts.chat_web                       # http://127.0.0.1:8000, sft model, one worker
    python -m scripts.chat_web -n 8 --host 0.0.0.0 --api-key "$KEY" --max-batch 16

Loads one model + Engine per GPU and hands them to nanochat.server.create_app; routes, limits and
the worker pool are documented in the nanochat/server package.
"""

import argparse
import os

from nanochat.common import NanochatError, logger, run_main
from nanochat.server.run import HEADER_TIMEOUT_S, KEEP_ALIVE_S, MAX_CONNECTIONS
from nanochat.server.security import BODY_TIMEOUT_S, LOOPBACK_HOSTS, MAX_BODY_BYTES


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="nanochat web chat and OpenAI-compatible API server")
    p.add_argument("-n", "--num-gpus", type=int, default=1, help="workers: one model replica per GPU")
    p.add_argument("-i", "--source", default="sft", choices=["base", "sft", "rl"], help="which checkpoints to load")
    p.add_argument("-t", "--temperature", type=float, default=0.8, help="default sampling temperature")
    p.add_argument("-k", "--top-k", type=int, default=50, help="default top-k (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="default nucleus sampling mass (1 = off)")
    p.add_argument("-m", "--max-tokens", type=int, default=512, help="default max new tokens per reply")
    p.add_argument("-g", "--model-tag", default=None, help="model tag to load (default: the largest)")
    p.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the last)")
    p.add_argument("--hf-path", default=None, help="an exported model folder (scripts/export.py) to load instead of a checkpoint")
    p.add_argument("-p", "--port", type=int, default=8000)
    p.add_argument("--host", default="127.0.0.1", help="bind address; 0.0.0.0 exposes the server to the network")
    p.add_argument("--device-type", default="", choices=["", "cuda", "cpu", "mps"], help="default: autodetect")
    p.add_argument("--max-batch", type=int, default=8, help="rows decoded together (1 = one request at a time)")
    p.add_argument("--batching", choices=["step", "admission"], default="step",
                   help="step: a request joins the running batch at its next step; admission: only a starting batch")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before answering 429")
    p.add_argument("--request-timeout", type=float, default=300.0, help="seconds per request, queue included (0 = none)")
    p.add_argument("--api-key", default=os.environ.get("NANOCHAT_API_KEY") or None,
                   help="require 'Authorization: Bearer KEY' on the API routes (default: $NANOCHAT_API_KEY)")
    p.add_argument("--cors-origin", action="append", default=[],
                   help="allow cross-origin requests from this origin (repeatable; '*' for any); off by default")
    p.add_argument("--log-conversations", action="store_true",
                   help="also log every conversation and reply (default: one metadata line per request)")
    # limits against hostile or broken clients (nanochat/server/security.py and run.py say why each exists)
    p.add_argument("--allowed-host", action="append", default=[],
                   help="also answer requests whose Host header is this name (repeatable; '*' for any). On a "
                        "loopback bind only localhost, 127.0.0.1 and [::1] are answered, which keeps out web pages "
                        "using DNS rebinding; on other binds any Host unless this is given")
    p.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES, help="larger request bodies get 413")
    p.add_argument("--body-timeout", type=float, default=BODY_TIMEOUT_S,
                   help="seconds a client has to send the request body once its headers are in (else 408)")
    p.add_argument("--header-timeout", type=float, default=HEADER_TIMEOUT_S,
                   help="seconds a connection has to send a complete request head before it is closed")
    p.add_argument("--keep-alive-timeout", type=int, default=KEEP_ALIVE_S,
                   help="seconds an idle connection is kept open between requests")
    p.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS,
                   help="open connections at once (lowered to fit the open-file limit); more are refused with 503")
    p.add_argument("--sandbox", choices=["auto", "strict"], default=None,
                   help="strict: refuse to run model code without full isolation (default: $NANOCHAT_SANDBOX, else auto)")
    args = p.parse_args(argv)
    checks = [
        (args.num_gpus >= 1, "--num-gpus must be at least 1."),
        (0 <= args.temperature <= 2, "--temperature must be between 0 and 2."),
        (0 <= args.top_k <= 200, "--top-k must be between 0 and 200."),
        (0 < args.top_p <= 1, "--top-p must be more than 0 and at most 1 (1 = off)."),
        (1 <= args.max_tokens <= 4096, "--max-tokens must be between 1 and 4096."),
        (0 < args.port < 65536, "--port must be between 1 and 65535."),
        (args.max_batch >= 1, "--max-batch must be at least 1."),
        (args.max_queue >= 0, "--max-queue must be 0 or more."),
        (args.request_timeout >= 0, "--request-timeout must be 0 (none) or more seconds."),
        (args.max_body_bytes >= 1024, "--max-body-bytes must be at least 1024."),
        (args.body_timeout > 0, "--body-timeout must be more than 0 seconds."),
        (args.header_timeout > 0, "--header-timeout must be more than 0 seconds."),
        (args.keep_alive_timeout >= 1, "--keep-alive-timeout must be at least 1 second."),
        (args.max_connections >= 2, "--max-connections must be at least 2."),
    ]
    for ok, message in checks:
        if not ok:
            raise NanochatError(message)
    return args


def allowed_hosts(host, extra):
    """The Host names to answer: loopback names (+ extra) on a loopback bind; on any other bind the
    names people use to reach it are unknown here, so any Host unless --allowed-host lists them."""
    if "*" in extra:
        return None
    if host in LOOPBACK_HOSTS + ("::1",) or extra:
        return list(LOOPBACK_HOSTS) + [h.lower() for h in extra]
    return None


def main(argv=None):
    import uvicorn

    from nanochat.execution import check_sandbox, sandbox_mode
    from nanochat.server import create_app, load_engines
    from nanochat.server.run import uvicorn_config

    args = parse_args(argv)
    if (args.sandbox or sandbox_mode()) == "strict":  # serve only where model code would run fully isolated
        check_sandbox("strict")
    model_tag = os.path.abspath(args.hf_path) if args.hf_path else args.model_tag
    engines, tokenizer, devices, model_name = load_engines(args.num_gpus, args.source, args.device_type,
                                                           model_tag, args.step)
    app = create_app(engines, tokenizer, model_name=model_name, devices=devices, temperature=args.temperature,
                     top_k=args.top_k, top_p=args.top_p, max_tokens=args.max_tokens, max_batch=args.max_batch,
                     batching=args.batching, max_queue=args.max_queue, request_timeout=args.request_timeout or None,
                     api_key=args.api_key,
                     cors_origins=args.cors_origin, log_conversations=args.log_conversations,
                     allowed_hosts=allowed_hosts(args.host, args.allowed_host), max_body_bytes=args.max_body_bytes,
                     body_timeout=args.body_timeout)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        logger.warning(f"serving on {args.host} without --api-key: anyone who can reach this port can use the model")
    logger.info(f"serving {model_name} on {len(engines)} worker(s) at http://{args.host}:{args.port}")
    # access_log off: the server logs its own single line per request (id, tokens, latency)
    config = uvicorn_config(app, args.host, args.port, max_connections=args.max_connections,
                            header_timeout=args.header_timeout, keep_alive_timeout=args.keep_alive_timeout,
                            log_level="info", access_log=False)
    uvicorn.Server(config).run()


if __name__ == "__main__":
    run_main(main)
