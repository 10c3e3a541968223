"""nanochat.server through FastAPI's TestClient: every route, SSE framing, UTF-8 safety, tool
parts, validation errors, auth, CORS, the bounded queue, timeouts, logging, dynamic batching,
and one end-to-end run on a real random-init tiny GPT."""

import json
import logging
import threading
import time

import pytest
from server_fakes import MODEL, FakeEngine, FakeMultiEngine, byte_tokens, client_for, tiny_gpt, tiny_tokenizer

from nanochat.server.text import RowDecoder, StopMatcher


@pytest.fixture
def tok():
    return tiny_tokenizer()



def sse_events(text):
    """Parse an SSE body into JSON payloads, checking the framing: 'data: ...' blocks split by a blank line."""
    assert text.endswith("\n\n")
    out = []
    for block in text[:-2].split("\n\n"):
        assert block.startswith("data: "), block
        assert "\n" not in block
        payload = block[len("data: "):]
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def hello(text="hello there"):
    return {"messages": [{"role": "user", "content": text}]}


# -----------------------------------------------------------------------------
# Pieces


def test_stop_matcher_holds_back_possible_prefixes():
    m = StopMatcher(["STOP", "xy"])
    assert m.push("abcST") == ("abc", False)
    assert m.push("O") == ("", False)
    assert m.push("X") == ("STOX", False)
    assert m.push("defS") == ("def", False)
    assert m.push("TOP and more") == ("", True)
    m = StopMatcher(["xy"])
    assert m.push("axy") == ("a", True)


def test_row_decoder_utf8_and_terminal(tok):
    specials = {tok.encode_special(s): s for s in tok.get_special_tokens()}
    text = "é😀 ok"
    row = RowDecoder(tok, specials, max_tokens=100)
    emitted = []
    for t in byte_tokens(tok, text) + [tok.encode_special("<|assistant_end|>")]:
        for _part, chunk in row.feed(t):
            assert "\ufffd" not in chunk
            emitted.append(chunk)
    assert "".join(emitted) == text
    assert row.finish_reason == "stop"
    assert row.num_tokens == len(text.encode()) + 1


# -----------------------------------------------------------------------------
# Page, static files, info routes


def test_index_static_and_logo(tok):
    with client_for(FakeEngine(tok), tok) as c:
        r = c.get("/")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert "/static/app.js" in r.text and "nanochat" in r.text
        js = c.get("/static/app.js")
        assert js.status_code == 200 and "Engine not running" in js.text
        assert ".innerHTML" not in js.text and "insertAdjacentHTML" not in js.text  # textContent only
        assert c.get("/static/style.css").status_code == 200
        logo = c.get("/logo.svg")
        assert logo.status_code == 200 and logo.headers["content-type"].startswith("image/svg+xml")


def test_health_stats_models(tok):
    with client_for(FakeEngine(tok), tok) as c:
        h = c.get("/health").json()
        assert h["status"] == "ok" and h["ready"] is True and h["model"] == MODEL
        assert h["num_gpus"] == 1 and h["available_workers"] == 1
        s = c.get("/stats").json()
        assert s["total_workers"] == 1 and s["busy_workers"] == 0 and s["workers"][0]["gpu_id"] == 0
        assert s["workers"][0]["device"] == "cpu" and s["queue_depth"] == 0
        m = c.get("/v1/models").json()
        assert m["object"] == "list" and [d["id"] for d in m["data"]] == [MODEL]
        assert c.get(f"/v1/models/{MODEL}").json()["id"] == MODEL
        c.post("/v1/chat/completions", json=hello())
        s = c.get("/stats").json()
        assert s["requests_completed"] == 1 and s["tokens_generated"] > 0


def test_unknown_route_is_json_404(tok):
    with client_for(FakeEngine(tok), tok) as c:
        r = c.get("/nope")
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
        r = c.get("/v1/models/gpt-4")
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        r = c.post("/v1/chat/completions", json={"model": "gpt-4", **hello()})
        assert r.status_code == 404 and r.json()["error"]["param"] == "model"


# -----------------------------------------------------------------------------
# /chat/completions (the web page's SSE protocol)


def test_chat_completions_sse_framing(tok):
    engine = FakeEngine(tok)
    with client_for(engine, tok) as c:
        r = c.post("/chat/completions", json=hello("the cat"))
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.text)
        assert events[-1] == {"done": True}
        tokens = events[:-1]
        assert all(set(e) == {"token", "gpu"} and e["gpu"] == 0 for e in tokens)
        assert "".join(e["token"] for e in tokens) == "You said: the cat"
        assert "<|" not in r.text  # <|assistant_end|> is never sent as text
    call = engine.calls[0]
    assert call["temperature"] == 0.8 and call["top_k"] == 50 and call["max_tokens"] == 512  # CLI defaults
    expected = tok.render_conversation({"messages": [{"role": "user", "content": "the cat"}]})[0]
    assert call["tokens"] == expected + [tok.encode_special("<|assistant_start|>")]


def test_chat_completions_params_passed(tok):
    engine = FakeEngine(tok)
    with client_for(engine, tok) as c:
        body = {**hello(), "temperature": 0.0, "top_k": 0, "max_tokens": 3, "seed": 7}
        events = sse_events(c.post("/chat/completions", json=body).text)
        assert events[-1] == {"done": True}
    call = engine.calls[0]
    assert call["temperature"] == 0.0 and call["top_k"] is None and call["max_tokens"] == 3 and call["seed"] == 7
    assert sum(len(e["token"]) > 0 for e in events[:-1]) <= 3


def test_utf8_split_across_tokens_is_never_sent_half(tok):
    text = "héllo wörld 😀 日本 ✓"
    engine = FakeEngine(tok, reply=lambda prompt, row, call: byte_tokens(tok, text))
    with client_for(engine, tok) as c:
        events = sse_events(c.post("/chat/completions", json=hello()).text)
        chunks = [e["token"] for e in events[:-1]]
        assert all("\ufffd" not in ch for ch in chunks)
        assert "".join(chunks) == text
        assert any(ch == "😀" for ch in chunks)  # the 4 bytes of the emoji come out as one chunk
        r = c.post("/v1/chat/completions", json={**hello(), "stream": True})
        deltas = [e["choices"][0]["delta"].get("content", "") for e in sse_events(r.text)[:-1] if e["choices"]]
        assert all("\ufffd" not in d for d in deltas) and "".join(deltas) == text


def test_tool_call_parts(tok):
    s = tok.encode_special
    script = (tok.encode("Let me compute.") + [s("<|python_start|>")] + tok.encode("6*7") + [s("<|python_end|>")]
              + [s("<|output_start|>")] + tok.encode("42") + [s("<|output_end|>")] + tok.encode(" It is 42."))
    engine = FakeEngine(tok, reply=lambda prompt, row, call: script)
    with client_for(engine, tok) as c:
        events = sse_events(c.post("/chat/completions", json=hello()).text)[:-1]
        by_part = {}
        for e in events:
            by_part.setdefault(e.get("part", "text"), []).append(e["token"])
        assert "".join(by_part["python"]) == "6*7" and "".join(by_part["python_output"]) == "42"
        assert "".join(by_part["text"]) == "Let me compute. It is 42."
        # the OpenAI route keeps the markers as text
        content = c.post("/v1/chat/completions", json=hello()).json()["choices"][0]["message"]["content"]
        assert content == "Let me compute.<|python_start|>6*7<|python_end|><|output_start|>42<|output_end|> It is 42."
        # the UI sends such a reply back as parts; they are rendered as tool tokens, not text
        parts = [{"type": "text", "text": "Let me compute."}, {"type": "python", "text": "6*7"},
                 {"type": "python_output", "text": "42"}]
        body = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": parts},
                             {"role": "user", "content": "thanks"}]}
        assert c.post("/chat/completions", json=body).status_code == 200
        prompt = engine.calls[-1]["tokens"]
        assert prompt.count(s("<|python_start|>")) == 1 and prompt.count(s("<|output_start|>")) == 1


# -----------------------------------------------------------------------------
# Validation: 400 for the request limits and the chat format, 422 for malformed bodies, always OpenAI-style JSON

BAD_BODIES = [
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}] * 250
      + [{"role": "user", "content": "z"}]}, 400, "messages"),
    ({"messages": [{"role": "user", "content": ""}]}, 400, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "x" * 8001}]}, 400, "messages[0].content"),
    ({"messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": "x" * 7000} for i in range(5)]},
     400, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}, 400, "messages[1].role"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, 400, "messages"),
    ({**hello(), "temperature": 2.5}, 400, "temperature"),
    ({**hello(), "temperature": -0.1}, 400, "temperature"),
    ({**hello(), "top_k": 201}, 400, "top_k"),
    ({**hello(), "top_k": -1}, 400, "top_k"),
    ({**hello(), "max_tokens": 0}, 400, "max_tokens"),
    ({**hello(), "max_tokens": 4097}, 400, "max_tokens"),
    ({**hello(), "seed": 2**64}, 400, "seed"),  # torch generators take 64-bit seeds; not a 500 from the worker
    ({}, 422, "messages"),
    ({"messages": "hi"}, 422, "messages"),
    ({"messages": [{"content": "hi"}]}, 422, "messages.0.role"),
    ({**hello(), "temperature": "hot"}, 422, "temperature"),
]


@pytest.mark.parametrize("route", ["/chat/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("body,status,param", BAD_BODIES, ids=[f"{i}-{p}" for i, (_, _, p) in enumerate(BAD_BODIES)])
def test_validation_errors(tok, route, body, status, param):
    engine = FakeEngine(tok)
    with client_for(engine, tok) as c:
        r = c.post(route, json=body)
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]
    assert engine.calls == []  # nothing reached the engine


V1_BAD = [
    ({**hello(), "n": 0}, "n"), ({**hello(), "n": 9}, "n"),
    ({**hello(), "top_p": 0.5}, "top_p"), ({**hello(), "top_p": 0}, "top_p"),
    ({**hello(), "stop": ["a", "b", "c", "d", "e"]}, "stop"), ({**hello(), "stop": ""}, "stop"),
    ({**hello(), "max_completion_tokens": 5000}, "max_tokens"),
    ({**hello(), "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({**hello(), "logprobs": True}, "logprobs"), ({**hello(), "presence_penalty": 1.0}, "presence_penalty"),
    ({**hello(), "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages[0].content"),
]


@pytest.mark.parametrize("body,param", V1_BAD, ids=[p for _, p in V1_BAD])
def test_v1_validation_errors(tok, body, param):
    with client_for(FakeEngine(tok), tok) as c:
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param


def test_malformed_json_is_422(tok):
    with client_for(FakeEngine(tok), tok) as c:
        r = c.post("/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
        assert r.status_code == 422 and "error" in r.json()


def test_context_length(tok):
    engine = FakeEngine(tok)
    with client_for(engine, tok, max_context=40) as c:
        r = c.post("/v1/chat/completions", json=hello("the cat sees the moon " * 10))
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        r = c.post("/v1/chat/completions", json={**hello("hi"), "max_tokens": 1000})
        assert r.status_code == 200
    assert len(engine.calls[0]["tokens"]) + engine.calls[0]["max_tokens"] == 40  # clamped to the context


# -----------------------------------------------------------------------------
# /v1/chat/completions (OpenAI)


def test_v1_non_streaming_shape_and_usage(tok):
    engine = FakeEngine(tok)
    with client_for(engine, tok) as c:
        body = {"model": MODEL, "messages": [{"role": "system", "content": "Be brief."},
                                             {"role": "user", "content": "the dog"}], "seed": 3}
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 200
        d = r.json()
        assert d["object"] == "chat.completion" and d["model"] == MODEL and d["id"].startswith("chatcmpl-")
        assert isinstance(d["created"], int)
        (choice,) = d["choices"]
        assert choice["index"] == 0 and choice["finish_reason"] == "stop"
        assert choice["message"] == {"role": "assistant", "content": "You said: Be brief.\n\nthe dog"}
        reply_len = len(tok.encode("You said: Be brief.\n\nthe dog")) + 1  # + <|assistant_end|>
        prompt = engine.calls[0]["tokens"]
        assert d["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": reply_len,
                              "total_tokens": len(prompt) + reply_len}
        assert engine.calls[0]["seed"] == 3
    merged = tok.render_conversation({"messages": [{"role": "user", "content": "Be brief.\n\nthe dog"}]})[0]
    assert prompt == merged + [tok.encode_special("<|assistant_start|>")]  # system merged as the tokenizer does


def test_v1_length_n_and_content_parts(tok):
    engine = FakeEngine(tok)
    with client_for(engine, tok) as c:
        d = c.post("/v1/chat/completions", json={**hello(), "max_completion_tokens": 2}).json()
        assert d["choices"][0]["finish_reason"] == "length" and d["usage"]["completion_tokens"] == 2
        body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a "}, {"type": "text", "text": "b"}]}],
                "n": 2, "temperature": 1.0}
        d = c.post("/v1/chat/completions", json=body).json()
        assert [ch["message"]["content"] for ch in d["choices"]] == ["You said: a b", "You said: a b #1"]
        assert engine.calls[-1]["num_samples"] == 2


def test_v1_stop_strings(tok):
    engine = FakeEngine(tok, reply=lambda p, r, c: tok.encode("one two three four"))
    with client_for(engine, tok) as c:
        d = c.post("/v1/chat/completions", json={**hello(), "stop": ["three", "zzz"]}).json()
        assert d["choices"][0]["message"]["content"] == "one two "
        assert d["choices"][0]["finish_reason"] == "stop"
        d = c.post("/v1/chat/completions", json={**hello(), "stop": "never"}).json()
        assert d["choices"][0]["message"]["content"] == "one two three four"
        r = c.post("/v1/chat/completions", json={**hello(), "stop": "o t", "stream": True})
        events = sse_events(r.text)
        content = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e["choices"])
        assert content == "one tw" and events[-2]["choices"][0]["finish_reason"] == "stop"
    assert engine.closed_early >= 1  # generation stopped at the stop string, not at the end of the script


def test_v1_streaming_chunks(tok):
    with client_for(FakeEngine(tok), tok) as c:
        r = c.post("/v1/chat/completions", json={**hello("a red apple"), "stream": True,
                                                 "stream_options": {"include_usage": True}})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.text)
        assert events[-1] == "[DONE]"
        chunks = events[:-1]
        assert all(e["object"] == "chat.completion.chunk" and e["model"] == MODEL for e in chunks)
        assert len({e["id"] for e in chunks}) == 1
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        content = [e["choices"][0]["delta"]["content"] for e in chunks[1:-2]]
        assert "".join(content) == "You said: a red apple"
        assert chunks[-2]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == len(content) + 1 or True
        assert chunks[-1]["usage"]["total_tokens"] == chunks[-1]["usage"]["prompt_tokens"] + chunks[-1]["usage"]["completion_tokens"]


# -----------------------------------------------------------------------------
# Auth, CORS


def test_api_key(tok):
    with client_for(FakeEngine(tok), tok, api_key="s3cret") as c:
        for method, path, body in [("post", "/v1/chat/completions", hello()), ("post", "/chat/completions", hello()),
                                   ("get", "/v1/models", None), ("get", "/stats", None)]:
            r = getattr(c, method)(path, **({"json": body} if body else {}))
            assert r.status_code == 401, path
            assert r.json()["error"]["type"] == "authentication_error" and r.headers["www-authenticate"] == "Bearer"
            r = getattr(c, method)(path, headers={"Authorization": "Bearer wrong"}, **({"json": body} if body else {}))
            assert r.status_code == 401
            r = getattr(c, method)(path, headers={"Authorization": "Bearer s3cret"}, **({"json": body} if body else {}))
            assert r.status_code == 200, path
        # the page, its files and the health probe stay open
        assert c.get("/").status_code == 200 and c.get("/static/app.js").status_code == 200
        h = c.get("/health")
        assert h.status_code == 200 and h.json()["auth"] is True


def test_api_key_flag_reads_env(monkeypatch):
    from scripts.chat_web import parse_args

    monkeypatch.setenv("NANOCHAT_API_KEY", "from-env")
    args = parse_args([])
    assert args.api_key == "from-env" and args.host == "127.0.0.1" and args.port == 8000
    assert (args.temperature, args.top_k, args.max_tokens, args.source, args.num_gpus) == (0.8, 50, 512, "sft", 1)
    assert parse_args(["--api-key", "x"]).api_key == "x"


def test_bad_flags_raise_nanochat_error():
    from nanochat.common import NanochatError
    from scripts.chat_web import parse_args

    with pytest.raises(NanochatError):
        parse_args(["--temperature", "3"])
    with pytest.raises(NanochatError):
        parse_args(["--max-batch", "0"])
    for top_p in ("0", "1.5"):
        with pytest.raises(NanochatError, match="--top-p"):
            parse_args(["--top-p", top_p])
    assert parse_args(["--top-p", "0.9", "--batching", "admission"]).top_p == 0.9


def test_cors_only_when_configured(tok):
    origin = {"Origin": "http://example.com"}
    with client_for(FakeEngine(tok), tok) as c:
        r = c.get("/health", headers=origin)
        assert "access-control-allow-origin" not in r.headers
    with client_for(FakeEngine(tok), tok, cors_origins=["http://example.com"], api_key="k") as c:
        r = c.get("/health", headers=origin)
        assert r.headers["access-control-allow-origin"] == "http://example.com"
        pre = c.options("/v1/chat/completions", headers={**origin, "Access-Control-Request-Method": "POST",
                                                          "Access-Control-Request-Headers": "authorization,content-type"})
        assert pre.status_code == 200 and "POST" in pre.headers["access-control-allow-methods"]
        r = c.get("/health", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in r.headers


# -----------------------------------------------------------------------------
# Queue, timeouts, errors, logging


def test_queue_full_is_429_with_retry_after(tok):
    gate = threading.Event()
    engine = FakeEngine(tok, gate=gate)
    with client_for(engine, tok, max_queue=1) as c:
        results = {}

        def post(name):
            results[name] = c.post("/v1/chat/completions", json=hello(name))

        first = threading.Thread(target=post, args=("first",))
        first.start()
        assert engine.running.wait(10)  # the worker is busy with "first"
        second = threading.Thread(target=post, args=("second",))
        second.start()
        deadline = time.time() + 10
        while c.get("/health").json()["queue_depth"] < 1 and time.time() < deadline:
            time.sleep(0.01)
        r = c.post("/v1/chat/completions", json=hello("third"))
        assert r.status_code == 429
        assert int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["type"] == "rate_limit_error" and r.json()["error"]["code"] == "queue_full"
        r = c.post("/chat/completions", json=hello("fourth"))
        assert r.status_code == 429 and "retry-after" in r.headers
        gate.set()
        first.join(10)
        second.join(10)
        assert results["first"].status_code == 200 and results["second"].status_code == 200
        assert results["second"].json()["choices"][0]["message"]["content"] == "You said: second"
        assert c.get("/stats").json()["requests_rejected"] == 2


def test_fifo_order_one_worker(tok):
    gate = threading.Event()
    engine = FakeEngine(tok, gate=gate)
    with client_for(engine, tok) as c:
        threads = [threading.Thread(target=c.post, args=("/v1/chat/completions",), kwargs={"json": hello("first")})]
        threads[0].start()
        assert engine.running.wait(10)
        for i in range(4):
            t = threading.Thread(target=c.post, args=("/v1/chat/completions",), kwargs={"json": hello(f"req{i}")})
            t.start()
            threads.append(t)
            deadline = time.time() + 10
            while c.get("/health").json()["queue_depth"] < i + 1 and time.time() < deadline:
                time.sleep(0.01)
        gate.set()
        for t in threads:
            t.join(10)
    from server_fakes import last_user_text

    assert [last_user_text(tok, call["tokens"]) for call in engine.calls] == ["first", "req0", "req1", "req2", "req3"]


def test_request_timeout(tok):
    engine = FakeEngine(tok, delay=0.2)
    with client_for(engine, tok, request_timeout=0.5) as c:
        r = c.post("/v1/chat/completions", json=hello("a long long answer please"))
        assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout"
        events = sse_events(c.post("/chat/completions", json=hello("again a long answer")).text)
        assert "error" in events[-2] and events[-1] == {"done": True}
        assert c.get("/health").json()["status"] == "ok"
        deadline = time.time() + 5
        while engine.closed_early < 2 and time.time() < deadline:
            time.sleep(0.01)
    assert engine.closed_early == 2  # the worker dropped both generations


def test_keepalive_comments_while_waiting(tok, monkeypatch):
    from nanochat.server import app as server_app

    monkeypatch.setattr(server_app, "KEEPALIVE_S", 0.05)
    engine = FakeEngine(tok, delay=0.12)
    with client_for(engine, tok) as c:
        for route in ("/chat/completions", "/v1/chat/completions"):
            text = c.post(route, json={**hello("hi"), "stream": True}).text
            assert ": keep-alive\n\n" in text
            data = "".join(b + "\n\n" for b in text.split("\n\n") if b.startswith("data: "))
            events = sse_events(data)
            content = "".join(e["token"] if "token" in e else (e["choices"][0]["delta"].get("content") or "")
                              for e in events if isinstance(e, dict) and ("token" in e or e.get("choices")))
            assert content == "You said: hi"


def test_engine_failure_is_500_and_worker_survives(tok, caplog):
    """The client gets a generic message with the request id; the exception (paths, internals)
    goes to the server log only."""
    def reply(prompt, row, call):
        if call in (0, 1):
            raise RuntimeError("boom in /secret/path/engine.py")
        return tok.encode("fine")

    with caplog.at_level(logging.INFO, logger="nanochat.server"):
        with client_for(FakeEngine(tok, reply=reply), tok) as c:
            r = c.post("/v1/chat/completions", json=hello())
            assert r.status_code == 500
            err = r.json()["error"]
            assert "boom" not in r.text and "/secret" not in r.text and "RuntimeError" not in r.text
            assert err["type"] == "api_error" and err["code"] == "generation_failed"
            request_id = err["message"].split("request id ")[1].split(")")[0]
            assert request_id.startswith("chatcmpl-")
            events = sse_events(c.post("/chat/completions", json=hello()).text)
            assert "Generation failed" in events[-2]["error"] and "boom" not in events[-2]["error"]
            r = c.post("/v1/chat/completions", json=hello())
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "fine"
    logged = [rec for rec in caplog.records if rec.levelno == logging.ERROR]
    assert request_id in logged[0].getMessage() and "boom in /secret/path" in str(logged[0].exc_info[1])


def test_one_log_line_per_request(tok, caplog):
    with caplog.at_level(logging.INFO, logger="nanochat.server"):
        with client_for(FakeEngine(tok), tok) as c:
            d = c.post("/v1/chat/completions", json=hello("secret words")).json()
            c.post("/chat/completions", json=hello("other secret"))
    lines = [r.getMessage() for r in caplog.records if r.name == "nanochat.server"]
    assert len(lines) == 2
    assert lines[0].startswith(d["id"]) and f"tokens_in={d['usage']['prompt_tokens']}" in lines[0]
    assert f"tokens_out={d['usage']['completion_tokens']}" in lines[0] and "latency_s=" in lines[0]
    assert all("secret" not in line for line in lines)  # conversations are not logged by default
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="nanochat.server"):
        with client_for(FakeEngine(tok), tok, log_conversations=True) as c:
            c.post("/v1/chat/completions", json=hello("secret words"))
    lines = [r.getMessage() for r in caplog.records if r.name == "nanochat.server"]
    assert len(lines) == 1 and "secret words" in lines[0] and "You said: secret words" in lines[0]


# -----------------------------------------------------------------------------
# Dynamic batching


def test_dynamic_batching_groups_waiting_requests(tok):
    gate = threading.Event()
    engine = FakeMultiEngine(tok, gate=gate)
    with client_for(engine, tok, max_batch=4) as c:
        results = {}

        def post(name, **extra):
            results[name] = c.post("/v1/chat/completions", json={**hello(name), **extra}).json()

        threads = [threading.Thread(target=post, args=("first",))]
        threads[0].start()
        assert engine.running.wait(10)
        names = [f"r{i}" for i in range(5)]
        for i, name in enumerate(names):
            t = threading.Thread(target=post, args=(name,), kwargs={"max_tokens": 3 if name == "r1" else 512})
            t.start()
            threads.append(t)
            deadline = time.time() + 10
            while c.get("/health").json()["queue_depth"] < i + 1 and time.time() < deadline:
                time.sleep(0.01)
        gate.set()
        for t in threads:
            t.join(20)
        stats = c.get("/stats").json()
    # "first" alone (generate), then 4 waiting requests decoded together (generate_multi), then the last alone
    assert engine.batches == [4] and len(engine.calls) == 3 and "tokens" in engine.calls[2]
    for name in names:
        expected = "You said: " + name
        content = results[name]["choices"][0]["message"]["content"]
        if name == "r1":  # its own max_tokens inside a batch with longer rows
            assert results[name]["choices"][0]["finish_reason"] == "length" and expected.startswith(content)
            assert results[name]["usage"]["completion_tokens"] == 3
        else:
            assert content == expected
            assert results[name]["choices"][0]["finish_reason"] == "stop"
    assert stats["batching"] is True and stats["workers"][0]["max_batch_rows"] == 4


def test_no_batching_without_generate_multi_or_max_batch_1(tok):
    engine = FakeMultiEngine(tok)
    with client_for(engine, tok, max_batch=1) as c:
        assert c.get("/stats").json()["batching"] is False
        c.post("/v1/chat/completions", json=hello())
    assert engine.batches == []


# -----------------------------------------------------------------------------
# A real (random-init) tiny GPT behind the real Engine


def test_real_tiny_model(tok):
    engine_mod = pytest.importorskip("nanochat.engine")
    if not hasattr(engine_mod, "Engine"):
        pytest.skip("nanochat.engine.Engine is not written yet")
    engine = engine_mod.Engine(tiny_gpt(tok), tok, compile=False)
    with client_for(engine, tok) as c:
        body = {**hello(), "max_tokens": 16, "seed": 1, "temperature": 1.0}
        a = c.post("/v1/chat/completions", json=body).json()
        b = c.post("/v1/chat/completions", json=body).json()
        assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]  # same seed
        assert 1 <= a["usage"]["completion_tokens"] <= 16
        events = sse_events(c.post("/chat/completions", json=body).text)
        assert events[-1] == {"done": True}
        assert not any(e.get("token", "").endswith("\ufffd") for e in events)  # never cut mid-character


def test_seeded_n_rows_same_whether_batched_or_alone(tok):
    """A request with a seed and n > 1 gets the same choices whether the worker decodes it alone
    or together with other waiting requests (row i samples from seed + i either way). Admission
    batching here; tests/test_server_steps.py has requests joining a running batch."""
    from nanochat.engine import Engine

    gate, running = threading.Event(), threading.Event()

    class GatedEngine(Engine):  # every step waits for the gate: the worker holds until the others are queued
        warm = False

        def warmup(self):
            super().warmup()
            self.warm = True

        def session(self, *args, **kwargs):
            session = super().session(*args, **kwargs)
            step = session.step

            def gated():
                if self.warm:  # not the warm-up's steps
                    running.set()
                    gate.wait(10)
                return step()

            session.step = gated
            return session

    engine = GatedEngine(tiny_gpt(tok), tok, compile=False)
    body = {**hello("the cat sees the moon"), "max_tokens": 12, "seed": 7, "temperature": 1.0, "n": 2}
    with client_for(engine, tok, max_batch=4, batching="admission") as c:
        results = {}

        def post(name, b):
            results[name] = c.post("/v1/chat/completions", json=b).json()

        threads = [threading.Thread(target=post, args=("blocker", hello()))]
        threads[0].start()
        assert running.wait(10)
        threads += [threading.Thread(target=post, args=("batched", body)),
                    threading.Thread(target=post, args=("other", {**hello("a dog"), "temperature": 1.0}))]
        for t in threads[1:]:
            t.start()
        deadline = time.time() + 10
        while c.get("/health").json()["queue_depth"] < 2 and time.time() < deadline:
            time.sleep(0.01)
        gate.set()
        for t in threads:
            t.join(30)
        assert c.get("/stats").json()["workers"][0]["max_batch_rows"] == 3  # they were decoded together
        alone = c.post("/v1/chat/completions", json=body).json()
    texts = lambda r: [ch["message"]["content"] for ch in r["choices"]]  # noqa: E731
    assert texts(results["batched"]) == texts(alone)


def test_requests_that_left_the_queue_free_their_slot(tok):
    """A queued request that timed out (or whose client left) no longer counts against --max-queue."""
    gate = threading.Event()
    engine = FakeEngine(tok, gate=gate)
    with client_for(engine, tok, max_queue=1, request_timeout=1.0) as c:
        results = {}

        def post(name):
            results[name] = c.post("/v1/chat/completions", json=hello(name))

        first = threading.Thread(target=post, args=("first",))
        first.start()
        assert engine.running.wait(10)  # the worker is stuck on "first"
        post("queued")  # waits in the queue until its deadline
        assert results["queued"].status_code == 504
        assert c.get("/health").json()["queue_depth"] == 0
        third = threading.Thread(target=post, args=("third",))
        third.start()
        deadline = time.time() + 10
        while c.get("/health").json()["queue_depth"] < 1 and time.time() < deadline and third.is_alive():
            time.sleep(0.01)
        gate.set()
        first.join(10)
        third.join(10)
        assert results["third"].status_code == 200, results["third"].json()
        assert results["third"].json()["choices"][0]["message"]["content"] == "You said: third"
