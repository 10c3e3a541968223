"""What stands between a client and the routes: two pure ASGI middlewares that answer before any
route runs, so a hostile request costs the server a few header comparisons, never a parsed body.

    SafeResponses (outermost)   security headers on every response; a Host allow-list against DNS
                                rebinding; unexpected exceptions -> a generic 500 with a request id
                                (the traceback goes to the server log only)
    [CORSMiddleware]            only with --cors-origin; between the two so preflights are answered
                                and 401s carry the CORS headers a browser needs to read them
    RequestGate (innermost)     the API key, checked before the body is read; the body size limit
                                (Content-Length and bytes actually read, chunked included) and the
                                time allowed to send the body; the routes then get the body in one piece

Both are plain ASGI (not Starlette's BaseHTTPMiddleware, which would buffer streaming responses
and run each request in an extra task) and neither parses JSON. Connection-level limits (slow
headers, connection count) live with the uvicorn settings in run.py.
"""

import asyncio
import hashlib
import json
import logging
import secrets

logger = logging.getLogger("nanochat.server")

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
MAX_BODY_BYTES = 1 << 20  # 1 MiB: the largest valid conversation (32k characters) is far smaller
BODY_TIMEOUT_S = 30.0  # the whole body must arrive within this after the headers

# The page loads only its own /static/app.js, /static/style.css and /logo.svg and talks only to
# its own origin; it has no inline script or style, so nothing else needs allowing. JSON and SSE
# responses get the same header: it costs nothing and covers a browser opening them directly.
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                           "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),  # frame-ancestors for browsers that predate it
]

# Open without the API key: the page and its files (a browser cannot send a bearer token for
# them) and the health probe (load balancers do not have the key).
PUBLIC_PATHS = ("/", "/logo.svg", "/health")
PUBLIC_PREFIXES = ("/static/",)


async def send_error(send, status, message, type_, code, headers=()):
    """An OpenAI-style JSON error, sent from a middleware (no route, no exception handler)."""
    body = json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


def _header(scope, name):
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def host_name(host):
    """'Example.com:8000' -> 'example.com', '[::1]:8000' -> '[::1]' (a Host header without its port)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[:host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


# Close the connection after answering a request whose body was not read: uvicorn would otherwise
# read (and throw away) whatever the client still sends, for as long as it sends it.
CLOSE = [(b"connection", b"close")]


class SafeResponses:
    """Security headers on every response, the Host allow-list, and generic 500s.

    allowed_hosts: host names (without port) the server answers to; None or "*" in it = any.
    A page on another site that rebinds its own name to 127.0.0.1 still sends its own name as Host,
    so on a loopback bind an allow-list of loopback names is what keeps it out."""

    def __init__(self, app, allowed_hosts=LOOPBACK_HOSTS):
        self.app = app
        hosts = None if allowed_hosts is None else {h.lower() for h in allowed_hosts}
        self.allowed_hosts = None if hosts is None or "*" in hosts else hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def send_with_headers(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                present = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in SECURITY_HEADERS if k not in present]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        if self.allowed_hosts is not None:
            host = host_name(_header(scope, b"host") or "")
            if host not in self.allowed_hosts:
                return await send_error(send_with_headers, 400,
                                        f"Host {host or '(none)'!r} is not served here; start the server with "
                                        f"--allowed-host {host or 'NAME'} to allow it.",
                                        "invalid_request_error", "host_not_allowed", CLOSE)
        try:
            await self.app(scope, receive, send_with_headers)
        except Exception:
            request_id = "req-" + secrets.token_hex(8)
            logger.exception(f"{request_id} {scope.get('method')} {scope.get('path')} failed")
            if not started:  # else the response is cut off (the client sees a broken stream)
                await send_error(send_with_headers, 500,
                                 f"Internal server error (request id {request_id}); the details are in the server log.",
                                 "api_error", "internal_error")


class RequestGate:
    """The API key, then the body: at most max_body_bytes, all of it within body_timeout seconds.
    The route receives the body as one message; later receive() calls (disconnect detection) go
    to the server as usual."""

    def __init__(self, app, api_key=None, max_body_bytes=MAX_BODY_BYTES, body_timeout=BODY_TIMEOUT_S):
        self.app = app
        # compare fixed-length digests so the comparison takes the same time whatever the key's length
        self.key_digest = hashlib.sha256(api_key.encode()).digest() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout

    def needs_key(self, scope):
        path = scope["path"]
        # a CORS preflight never carries credentials; CORSMiddleware answers it (or it is a 405)
        return not (scope["method"] == "OPTIONS" or path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES))

    def key_ok(self, scope):
        scheme, _, token = (_header(scope, b"authorization") or "").partition(" ")
        digest = hashlib.sha256(token.strip().encode("utf-8", "surrogateescape")).digest()
        return scheme.lower() == "bearer" and secrets.compare_digest(digest, self.key_digest)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.key_digest is not None and self.needs_key(scope) and not self.key_ok(scope):
            return await send_error(send, 401, "Missing or wrong API key: send 'Authorization: Bearer <key>'.",
                                    "authentication_error", "invalid_api_key",
                                    [(b"www-authenticate", b"Bearer"), *CLOSE])
        length = _header(scope, b"content-length")
        if length is None and _header(scope, b"transfer-encoding") is None:
            return await self.app(scope, receive, send)  # no body (GET, HEAD, ...)
        if length is not None and not length.strip().isdigit():  # uvicorn refuses these itself; other servers may not
            return await send_error(send, 400, "The Content-Length header is not a number.", "invalid_request_error",
                                    "invalid_content_length", CLOSE)
        try:
            if length is not None and int(length) > self.max_body_bytes:
                raise BodyTooLarge
            body = await self.read_body(receive)
        except BodyTooLarge:
            return await send_error(send, 413, "The request body is larger than the server's limit of "
                                    f"{self.max_body_bytes} bytes.", "invalid_request_error", "request_too_large", CLOSE)
        except asyncio.TimeoutError:
            return await send_error(send, 408, f"The request body did not arrive within {self.body_timeout:g} s.",
                                    "invalid_request_error", "request_timeout", CLOSE)
        except ClientGone:
            return

        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def read_body(self, receive):
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout
        chunks, size = [], 0
        while True:
            message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:  # a chunked body announces no length: count what arrives
                raise BodyTooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


class BodyTooLarge(Exception):
    pass


class ClientGone(Exception):
    pass
