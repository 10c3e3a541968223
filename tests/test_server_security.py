"""The server against hostile or broken clients, in-process (FastAPI's TestClient): the body
limit, the API key and the Host allow-list answered before any body is read or parsed, security
headers on every response, generic 500s, strict request types, and token accounting for
requests that end early. Connection-level limits under a real uvicorn are in
test_server_limits.py; property-based fuzzing in test_server_fuzz.py."""

import asyncio
import json
import logging
import re
import threading
import time

import pytest
from fastapi.testclient import TestClient
from server_fakes import FakeEngine, tiny_tokenizer

from nanochat.server import create_app
from nanochat.server.security import CONTENT_SECURITY_POLICY, LOOPBACK_HOSTS, MAX_BODY_BYTES, host_name

MODEL = "nanochat-sec"


@pytest.fixture
def tok():
    return tiny_tokenizer()


def client(engine, tok, host="localhost", **kwargs):
    return TestClient(create_app([engine], tok, model_name=MODEL, **kwargs), base_url=f"http://{host}")


def hello(text="hello there", **extra):
    return {"messages": [{"role": "user", "content": text}], **extra}


def assert_error(r, status, code=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code, err
    return err


# -----------------------------------------------------------------------------
# Body size: 413 before anything parses it


def test_body_limit_from_content_length_before_parsing(tok):
    engine = FakeEngine(tok)
    with client(engine, tok, max_body_bytes=4096) as c:
        ok = json.dumps(hello("x" * 3000)).encode()
        r = c.post("/v1/chat/completions", content=ok, headers={"Content-Type": "application/json"})
        assert len(ok) <= 4096 and r.status_code == 200
        # not even JSON: a parser would say 422; the limit answers first
        for body in (b"{" * 4097, json.dumps(hello("x" * 5000)).encode()):
            r = c.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
            err = assert_error(r, 413, "request_too_large")
            assert "4096" in err["message"] and r.headers["connection"] == "close"
        assert_error(c.post("/chat/completions", content=b"[" * 5000), 413, "request_too_large")
    assert len(engine.calls) == 1


def test_malformed_content_length_is_400(tok):
    app = create_app([FakeEngine(tok)], tok, model_name=MODEL)
    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        raise AssertionError("the body must not be read")

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": [
        (b"host", b"localhost"), (b"content-length", b"12abc")], "query_string": b"", "state": {}}
    asyncio.run(app(scope, receive, send))  # straight to the app: HTTP clients will not send such a header
    assert sent[0]["status"] == 400 and json.loads(sent[1]["body"])["error"]["code"] == "invalid_content_length"


def test_body_limit_counts_chunked_bodies(tok):
    """A chunked body announces no length: the bytes that arrive are counted."""
    def chunks(n):
        for _ in range(n):
            yield b" " * 1000

    with client(FakeEngine(tok), tok, max_body_bytes=4096) as c:
        r = c.post("/v1/chat/completions", content=chunks(10), headers={"Content-Type": "application/json"})
        assert "content-length" not in r.request.headers and r.request.headers["transfer-encoding"] == "chunked"
        assert_error(r, 413, "request_too_large")
        small = json.dumps(hello()).encode()
        r = c.post("/v1/chat/completions", content=iter([small[:10], small[10:]]),
                   headers={"Content-Type": "application/json"})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "You said: hello there"


def test_default_body_limit_is_one_megabyte(tok):
    assert MAX_BODY_BYTES == 2**20
    with client(FakeEngine(tok), tok) as c:
        assert_error(c.post("/v1/chat/completions", content=b" " * (2**20 + 1)), 413)
        # the largest conversation the validation allows fits easily
        body = {"messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": "é" * 6401} for i in range(5)]}
        assert len(json.dumps(body).encode()) < 2**20
        assert_error(c.post("/v1/chat/completions", json=body), 400)  # 32,000 characters is the 400, not the 413


# -----------------------------------------------------------------------------
# API key: checked before the body


def test_wrong_key_is_401_before_the_body_is_read(tok):
    """A wrong key with a large body is answered from the headers: the body is never read."""
    app = create_app([FakeEngine(tok)], tok, model_name=MODEL, api_key="s3cret")
    received = []

    async def counting_app(scope, receive, send):  # the server side of the connection, watched
        async def counted():
            message = await receive()
            received.append(message["type"])
            return message
        await app(scope, counted if scope["type"] == "http" else receive, send)

    with TestClient(counting_app, base_url="http://localhost") as c:
        r = c.post("/v1/chat/completions", content=b"x" * (3 * 2**20), headers={"Authorization": "Bearer nope"})
        err = assert_error(r, 401, "invalid_api_key")
        assert err["type"] == "authentication_error" and r.headers["www-authenticate"] == "Bearer"
        assert received == []  # not one receive() call
        r = c.post("/v1/chat/completions", json=hello(), headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200 and received  # the right key: the body is read


def test_key_comparison_and_public_paths(tok):
    with client(FakeEngine(tok), tok, api_key="k3y") as c:
        for header in ("Bearer k3", "Bearer k3y0", "Basic k3y", "k3y", "Bearer  k3y x", ""):
            assert_error(c.get("/v1/models", headers={"Authorization": header}), 401)
        assert c.get("/v1/models", headers={"Authorization": "bearer k3y"}).status_code == 200
        for path in ("/openapi.json", "/stats", "/nope"):  # unknown paths do not reveal what exists
            assert c.get(path).status_code == 401
        for path in ("/", "/static/app.js", "/logo.svg", "/health"):
            assert c.get(path).status_code == 200


# -----------------------------------------------------------------------------
# Host allow-list (DNS rebinding)


def test_host_name_parsing():
    assert host_name("LocalHost:8000") == "localhost" and host_name("127.0.0.1") == "127.0.0.1"
    assert host_name("[::1]:8000") == "[::1]" and host_name("[::1]") == "[::1]"
    assert host_name("evil.example:80") == "evil.example" and host_name("") == ""


def test_host_allow_list_default_is_loopback(tok):
    engine = FakeEngine(tok)
    app = create_app([engine], tok, model_name=MODEL)
    for host in ("localhost:8000", "127.0.0.1:1234", "[::1]:80", "LOCALHOST"):
        with TestClient(app, base_url="http://localhost") as c:
            assert c.get("/health", headers={"Host": host}).status_code == 200, host
    with TestClient(app, base_url="http://evil.example") as c:
        for path in ("/", "/health", "/static/app.js"):
            err = assert_error(c.get(path), 400, "host_not_allowed")
            assert "--allowed-host evil.example" in err["message"]
        assert_error(c.post("/v1/chat/completions", json=hello()), 400, "host_not_allowed")
        assert_error(c.get("/health", headers={"Host": "127.0.0.1.evil.example"}), 400)
    assert engine.calls == []
    assert set(LOOPBACK_HOSTS) == {"localhost", "127.0.0.1", "[::1]"}


def test_allowed_hosts_extra_and_any(tok):
    with client(FakeEngine(tok), tok, host="chat.example:8000", allowed_hosts=[*LOOPBACK_HOSTS, "chat.example"]) as c:
        assert c.get("/health").status_code == 200
        assert c.get("/health", headers={"Host": "other.example"}).status_code == 400
    for any_host in (None, ["*"]):
        with client(FakeEngine(tok), tok, host="whatever.example", allowed_hosts=any_host) as c:
            assert c.get("/health").status_code == 200


def test_chat_web_host_and_limit_flags():
    from scripts.chat_web import allowed_hosts, parse_args

    args = parse_args([])
    assert args.allowed_host == [] and args.max_body_bytes == 2**20
    assert args.header_timeout > 0 and args.body_timeout > 0 and args.max_connections >= 100
    assert allowed_hosts("127.0.0.1", []) == list(LOOPBACK_HOSTS)
    assert allowed_hosts("localhost", ["my.box"]) == [*LOOPBACK_HOSTS, "my.box"]
    assert allowed_hosts("0.0.0.0", []) is None  # the names people use to reach it are unknown
    assert allowed_hosts("0.0.0.0", ["Chat.Example"]) == [*LOOPBACK_HOSTS, "chat.example"]
    assert allowed_hosts("127.0.0.1", ["*"]) is None
    a = parse_args(["--allowed-host", "a.example", "--allowed-host", "b.example", "--max-body-bytes", "5000",
                    "--header-timeout", "3", "--body-timeout", "4", "--max-connections", "50", "--keep-alive-timeout", "2"])
    assert a.allowed_host == ["a.example", "b.example"] and a.max_body_bytes == 5000
    assert (a.header_timeout, a.body_timeout, a.max_connections, a.keep_alive_timeout) == (3, 4, 50, 2)


# -----------------------------------------------------------------------------
# Security headers on every response


def assert_security_headers(r):
    assert r.headers["x-content-type-options"] == "nosniff", r.url
    assert r.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert r.headers["referrer-policy"] == "no-referrer" and r.headers["x-frame-options"] == "DENY"


def test_security_headers_everywhere(tok):
    csp = dict(part.strip().split(" ", 1) for part in CONTENT_SECURITY_POLICY.split(";"))
    assert csp["frame-ancestors"] == "'none'" and csp["script-src"] == "'self'" and csp["style-src"] == "'self'"
    assert csp["default-src"] == "'none'" and "unsafe" not in CONTENT_SECURITY_POLICY
    with client(FakeEngine(tok), tok, api_key="k", cors_origins=["http://ok.example"]) as c:
        key = {"Authorization": "Bearer k"}
        responses = [c.get("/"), c.get("/static/app.js"), c.get("/static/style.css"), c.get("/logo.svg"),
                     c.get("/health"), c.get("/stats", headers=key), c.get("/v1/models", headers=key),
                     c.get("/openapi.json", headers=key), c.get("/nope", headers=key), c.get("/static/nope.js"),
                     c.get("/v1/models"), c.post("/v1/chat/completions", json=hello(), headers=key),
                     c.post("/v1/chat/completions", json=hello(stream=True), headers=key),
                     c.post("/chat/completions", json=hello(), headers=key),
                     c.post("/v1/chat/completions", json={"messages": "x"}, headers=key),
                     c.post("/v1/chat/completions", content=b" " * (2**20 + 1), headers=key),
                     c.get("/health", headers={"Host": "evil.example"}),
                     c.delete("/health"),
                     c.options("/v1/chat/completions", headers={"Origin": "http://ok.example",
                                                                "Access-Control-Request-Method": "POST"})]
        assert [r.status_code for r in responses] == [200, 200, 200, 200, 200, 200, 200, 200, 404, 404, 401, 200,
                                                      200, 200, 422, 413, 400, 405, 200]
        for r in responses:
            assert_security_headers(r)


def test_page_has_no_inline_script_or_style():
    """The CSP allows only the page's own files, so the page must not need anything inline."""
    import os

    from nanochat.server.app import UI_DIR

    html = open(os.path.join(UI_DIR, "index.html")).read()
    assert re.findall(r"<script\b[^>]*>", html) == ['<script src="/static/app.js">']
    assert not re.search(r"<style\b|\sstyle=|\son[a-z]+=|javascript:", html, flags=re.I)
    js = open(os.path.join(UI_DIR, "app.js")).read()
    # no string evaluation (blocked by script-src 'self') and no style attributes (blocked by style-src)
    assert not re.search(r"\beval\(|new Function\(|setTimeout\(\s*[\"'`]|setAttribute\(\s*[\"']style|cssText", js)


# -----------------------------------------------------------------------------
# 500s: a generic message and a request id; the details only in the log


class ExplodingTokenizer:
    """The real tokenizer, except that rendering a conversation raises an unexpected error."""

    def __init__(self, tok):
        self.tok = tok

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def render_conversation(self, *args, **kwargs):
        raise KeyError("/home/secret/.cache/nanochat/tokenizer.pkl is broken")


def test_unexpected_exception_is_a_generic_500(tok, caplog):
    app = create_app([FakeEngine(tok)], ExplodingTokenizer(tok), model_name=MODEL)
    with caplog.at_level(logging.ERROR, logger="nanochat.server"):
        with TestClient(app, base_url="http://localhost") as c:
            for route in ("/v1/chat/completions", "/chat/completions"):
                r = c.post(route, json=hello())
                err = assert_error(r, 500, "internal_error")
                assert err["type"] == "api_error" and "secret" not in r.text and "KeyError" not in r.text
                assert_security_headers(r)
                request_id = re.search(r"request id (req-[0-9a-f]+)", err["message"]).group(1)
                record = [rec for rec in caplog.records if request_id in rec.getMessage()]
                assert len(record) == 1 and "tokenizer.pkl is broken" in str(record[0].exc_info[1])
            assert c.get("/health").json()["status"] == "ok"  # the server carries on


# -----------------------------------------------------------------------------
# Strict request types


STRING_NOT_BOOL_OR_INT = [
    {"stream": "yes"}, {"stream": "true"}, {"stream": 1}, {"max_tokens": "3"}, {"max_tokens": 3.0},
    {"max_tokens": True}, {"n": "2"}, {"seed": "1"}, {"top_k": "5"}, {"temperature": "1"}, {"top_p": "0.5"},
    {"logprobs": "false"}, {"stream_options": {"include_usage": "yes"}}, {"max_completion_tokens": "4"},
    {"temperature": True}, {"messages": [{"role": "user", "content": 5}]}, {"stop": 3},
]


@pytest.mark.parametrize("extra", STRING_NOT_BOOL_OR_INT, ids=[json.dumps(e) for e in STRING_NOT_BOOL_OR_INT])
def test_strict_types(tok, extra):
    engine = FakeEngine(tok)
    with client(engine, tok) as c:
        for route in ("/v1/chat/completions", "/chat/completions"):
            if route == "/chat/completions" and not {"max_tokens", "seed", "top_k", "temperature", "messages"} & set(extra):
                continue  # a field /chat/completions does not have is ignored there
            r = c.post(route, json={**hello(), **extra})
            err = assert_error(r, 422, "invalid_value")
            assert err["type"] == "invalid_request_error" and err["param"].split(".")[0] == next(iter(extra))
    assert engine.calls == []


def test_ints_are_valid_floats(tok):
    engine = FakeEngine(tok)
    with client(engine, tok) as c:
        r = c.post("/v1/chat/completions", json=hello(temperature=1, top_p=1, presence_penalty=0, max_tokens=3))
        assert r.status_code == 200, r.text
        assert c.post("/chat/completions", json=hello(temperature=0)).status_code == 200
    assert engine.calls[0]["temperature"] == 1.0 and engine.calls[1]["temperature"] == 0.0


def test_nan_and_infinity_are_refused(tok):
    with client(FakeEngine(tok), tok) as c:
        for value in (b"NaN", b"Infinity", b"-Infinity"):
            body = b'{"messages": [{"role": "user", "content": "hi"}], "temperature": ' + value + b"}"
            assert_error(c.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"}), 422)


# -----------------------------------------------------------------------------
# Token accounting for requests that end early


SENT_TEXT = re.compile(r'"(content|token)": "[^"]')  # an SSE chunk that carries text


def log_lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "nanochat.server" and " status=" in r.getMessage()]


def tokens_out(line):
    return int(re.search(r"tokens_out=(\d+)", line).group(1))


def test_timed_out_requests_count_their_tokens(tok, caplog):
    engine = FakeEngine(tok, delay=0.05, reply=lambda p, r, c: tok.encode("the cat sees the moon " * 20))
    with caplog.at_level(logging.INFO, logger="nanochat.server"):
        with client(engine, tok, request_timeout=0.5) as c:
            assert_error(c.post("/v1/chat/completions", json=hello()), 504, "request_timeout")
            events = c.post("/chat/completions", json=hello()).text
            assert "took longer" in events
            deadline = time.time() + 10
            while engine.closed_early < 2 and time.time() < deadline:
                time.sleep(0.01)
            stats = c.get("/stats").json()
    lines = log_lines(caplog)
    assert [re.search(r"status=(\w+)", line).group(1) for line in lines] == ["timeout", "timeout"]
    counts = [tokens_out(line) for line in lines]
    assert all(n >= 3 for n in counts)  # ~10 tokens in 0.5 s at 0.05 s each
    assert stats["tokens_generated"] == sum(counts)  # nothing generated after the log line went uncounted
    assert stats["requests_by_status"] == {"timeout": 2}


def test_disconnected_stream_counts_what_was_sent(tok, caplog):
    """The client reads a few chunks and leaves; the log line and /stats count every token
    generated for it, which is at least every token whose text it received."""
    engine = FakeEngine(tok, delay=0.01, reply=lambda p, r, c: tok.encode("the cat sees the moon " * 100))
    with caplog.at_level(logging.INFO, logger="nanochat.server"):
        with client(engine, tok) as c:
            received = []
            for route in ("/v1/chat/completions", "/chat/completions"):
                with c.stream("POST", route, json=hello(stream=True)) as r:
                    chunks = 0
                    for line in r.iter_lines():
                        chunks += SENT_TEXT.search(line) is not None
                        if chunks >= 8:
                            break
                received.append(chunks)
            deadline = time.time() + 10
            while (engine.closed_early < 2 or len(log_lines(caplog)) < 2) and time.time() < deadline:
                time.sleep(0.01)
            stats = c.get("/stats").json()
    lines = log_lines(caplog)
    assert len(lines) == 2 and all("status=disconnected" in line for line in lines), lines
    counts = [tokens_out(line) for line in lines]
    assert all(n >= k for n, k in zip(counts, received)) and all(n < 400 for n in counts)
    assert stats["tokens_generated"] == sum(counts)
    assert stats["requests_by_status"] == {"disconnected": 2}


def test_many_dropped_streams_are_all_counted(tok, caplog):
    """Streams dropped at different points, while others run: the log lines add up to /stats."""
    import httpx

    from nanochat.server import BackgroundServer

    engine = FakeEngine(tok, delay=0.002, reply=lambda p, r, c: tok.encode("the cat sees the moon " * 50))
    app = create_app([engine], tok, model_name=MODEL)
    received = {}

    def drop_after(i, server_url):
        with httpx.Client(base_url=server_url, timeout=30) as h:
            with h.stream("POST", "/v1/chat/completions", json=hello(f"req {i}", stream=True)) as r:
                n = 0
                for line in r.iter_lines():
                    n += SENT_TEXT.search(line) is not None
                    if n >= 3 + i:
                        break
        received[i] = n

    with caplog.at_level(logging.INFO, logger="nanochat.server"):
        with BackgroundServer(app) as server:
            threads = [threading.Thread(target=drop_after, args=(i, server.url)) for i in range(12)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            deadline = time.time() + 20
            while len(log_lines(caplog)) < 12 and time.time() < deadline:
                time.sleep(0.05)
            stats = httpx.get(server.url + "/stats", timeout=10).json()
    lines = log_lines(caplog)
    assert len(lines) == 12 and len(received) == 12
    assert all("status=disconnected" in line for line in lines)
    counts = [tokens_out(line) for line in lines]
    assert all(n > 0 for n in counts) and sum(counts) >= sum(received.values())
    assert stats["tokens_generated"] == sum(counts)
    assert stats["requests_by_status"] == {"disconnected": 12}
