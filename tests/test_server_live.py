"""The server under a real uvicorn on loopback: the official `openai` client (streaming,
non-streaming, n=2, errors, auth), a 32-stream load test, and disconnects freeing the worker."""

import asyncio
import json
import time

import httpx
import pytest
import torch
from server_fakes import FakeEngine, last_user_text, tiny_tokenizer

from nanochat.server import BackgroundServer, create_app

openai = pytest.importorskip("openai")
MODEL = "nanochat-live"


def tiny_engine(tok):
    from nanochat import engine as engine_mod

    if not hasattr(engine_mod, "Engine"):
        pytest.skip("nanochat.engine.Engine is not written yet")
    from nanochat.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=256, vocab_size=tok.get_vocab_size(), n_layer=1, n_head=1, n_kv_head=1,
                          n_embd=64, window_pattern="L"))
    model.init_weights()
    model.eval()
    return engine_mod.Engine(model, tok, compile=False)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_openai_client_against_tiny_model(tok):
    app = create_app([tiny_engine(tok)], tok, model_name=MODEL, max_batch=4)
    with BackgroundServer(app) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list()] == [MODEL]
        messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "the cat sees"}]
        r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, seed=5, temperature=1.0)
        assert r.object == "chat.completion" and r.model == MODEL and len(r.choices) == 1
        assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason in ("stop", "length")
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        assert 1 <= r.usage.completion_tokens <= 12

        # streaming with the same seed gives the same text
        stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, seed=5,
                                                temperature=1.0, stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == r.choices[0].message.content
        finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finals == [r.choices[0].finish_reason]
        assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens

        r2 = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, n=2, temperature=1.0)
        assert [c.index for c in r2.choices] == [0, 1]

        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=messages, temperature=3.0)
        assert e.value.status_code == 400 and "temperature" in str(e.value)
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="gpt-4o", messages=messages)


def test_openai_client_auth(tok):
    app = create_app([FakeEngine(tok)], tok, model_name=MODEL, api_key="k3y")
    with BackgroundServer(app) as server:
        bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
        good = openai.OpenAI(base_url=server.url + "/v1", api_key="k3y", max_retries=0)
        r = good.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
        assert r.choices[0].message.content == "You said: hi"


def test_32_concurrent_streams_all_complete(tok):
    """Load: 32 simultaneous streams through 1 worker with dynamic batching; every one ends with
    [DONE], /health answers fast throughout, and the queue bound is never hit."""
    app = create_app([tiny_engine(tok)], tok, model_name=MODEL, max_batch=8, max_queue=64)

    async def run(url):
        health_times = []
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            async def one(i):
                body = {"messages": [{"role": "user", "content": f"request {i}"}], "stream": True,
                        "max_tokens": 12, "seed": i}
                async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                    assert r.status_code == 200
                    lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
                return lines

            async def probe(stop):
                while not stop.is_set():
                    t = time.perf_counter()
                    h = await client.get("/health")
                    health_times.append(time.perf_counter() - t)
                    assert h.status_code == 200 and h.json()["status"] == "ok"
                    await asyncio.sleep(0.05)

            stop = asyncio.Event()
            prober = asyncio.create_task(probe(stop))
            results = await asyncio.gather(*(one(i) for i in range(32)))
            stop.set()
            await prober
            stats = (await client.get("/stats")).json()
        return results, health_times, stats

    with BackgroundServer(app) as server:
        results, health_times, stats = asyncio.run(run(server.url))
    assert len(results) == 32
    for lines in results:
        assert lines[-1] == "data: [DONE]"
        finals = [json.loads(x[6:])["choices"][0]["finish_reason"] for x in lines[:-1]]
        assert finals[-1] in ("stop", "length")
    assert stats["requests_completed"] == 32 and stats["requests_rejected"] == 0
    assert stats["workers"][0]["max_batch_rows"] > 1  # requests that arrived together were decoded together
    assert health_times and max(health_times) < 2.0  # the event loop is never blocked by generation


def test_disconnect_mid_stream_frees_worker(tok):
    long_reply = tok.encode("the cat sees the moon " * 200)
    engine = FakeEngine(tok, reply=lambda prompt, row, call: long_reply if "long" in last_user_text(tok, prompt)
                        else tok.encode("short"), delay=0.02)
    app = create_app([engine], tok, model_name=MODEL)
    with BackgroundServer(app) as server:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            for route in ("/chat/completions", "/v1/chat/completions"):
                before = engine.closed_early
                body = {"messages": [{"role": "user", "content": "long please"}], "stream": True}
                with client.stream("POST", route, json=body) as r:
                    seen = 0
                    for line in r.iter_lines():
                        seen += line.startswith("data: ")
                        if seen >= 5:
                            break  # leave mid-stream: the response is closed
                t = time.perf_counter()
                r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "next"}]})
                waited = time.perf_counter() - t
                assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "short"
                assert waited < 2.0, f"the next request waited {waited:.2f}s: the worker was not freed"
                assert engine.closed_early == before + 1
                assert engine.steps < 400 * (1 + (route == "/v1/chat/completions"))  # far from the 1000-token reply


def test_disconnect_while_queued_is_skipped(tok):
    engine = FakeEngine(tok, delay=0.05, reply=lambda prompt, row, call: tok.encode("the cat sees the moon " * 4))
    app = create_app([engine], tok, model_name=MODEL)

    async def run(url):
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            first = asyncio.create_task(client.post("/v1/chat/completions",
                                                    json={"messages": [{"role": "user", "content": "first"}]}))
            while not engine.running.is_set():
                await asyncio.sleep(0.01)

            async def queued():
                body = {"messages": [{"role": "user", "content": "queued"}], "stream": True}
                async with client.stream("POST", "/chat/completions", json=body) as r:
                    async for _ in r.aiter_lines():
                        pass

            task = asyncio.create_task(queued())
            while (await client.get("/health")).json()["queue_depth"] < 1:
                await asyncio.sleep(0.01)
            task.cancel()  # the client gives up while its request waits
            await asyncio.gather(task, return_exceptions=True)
            assert (await first).status_code == 200
            await asyncio.sleep(0.2)

    with BackgroundServer(app) as server:
        asyncio.run(run(server.url))
    assert [last_user_text(tok, c["tokens"]) for c in engine.calls] == ["first"]


def test_non_streaming_disconnect_frees_worker(tok):
    long_reply = tok.encode("the cat sees the moon " * 200)
    engine = FakeEngine(tok, reply=lambda prompt, row, call: long_reply if "long" in last_user_text(tok, prompt)
                        else tok.encode("short"), delay=0.02)
    app = create_app([engine], tok, model_name=MODEL)
    with BackgroundServer(app) as server:
        with httpx.Client(base_url=server.url, timeout=0.5) as client:
            with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
                client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "long"}]})
        with httpx.Client(base_url=server.url, timeout=30) as client:
            t = time.perf_counter()
            r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "next"}]})
            waited = time.perf_counter() - t
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "short"
    assert waited < 2.0 and engine.closed_early == 1


def test_chat_web_cli_serves_a_checkpoint(tmp_path):
    """python -m scripts.chat_web on a tiny trained base checkpoint: flags, loading, serving."""
    import os
    import socket
    import subprocess
    import sys

    from helpers import REPO, make_tiny_base_checkpoint, subprocess_env

    info = make_tiny_base_checkpoint(os.environ["NANOCHAT_BASE_DIR"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = subprocess_env(info["base_dir"], NANOCHAT_ENGINE_COMPILE=0, NANOCHAT_API_KEY="cli-key")
    proc = subprocess.Popen([sys.executable, "-m", "scripts.chat_web", "-i", "base", "-g", info["model_tag"],
                             "-p", str(port), "--device-type", "cpu", "-m", "8", "--log-conversations"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while True:
            try:
                health = httpx.get(url + "/health", timeout=1).json()
                break
            except httpx.HTTPError:
                if proc.poll() is not None or time.time() > deadline:
                    raise AssertionError("server did not start:\n" + proc.communicate(timeout=5)[0][-3000:]) from None
                time.sleep(0.2)
        assert health["status"] == "ok" and health["auth"] is True
        assert health["model"] == f"nanochat-base-{info['model_tag']}-step{info['step']:06d}"
        client = openai.OpenAI(base_url=url + "/v1", api_key="cli-key", max_retries=0)
        r = client.chat.completions.create(model=health["model"], messages=[{"role": "user", "content": "hi"}], seed=1)
        assert 1 <= r.usage.completion_tokens <= 8  # -m 8 is the default max_tokens
        assert httpx.get(url + "/stats", timeout=5).status_code == 401
    finally:
        proc.terminate()
        out = proc.communicate(timeout=20)[0]
    assert "tokens_in=" in out and "messages=" in out  # --log-conversations


def test_chat_web_cli_bad_flag_exits_2():
    import subprocess
    import sys

    from helpers import REPO

    r = subprocess.run([sys.executable, "-m", "scripts.chat_web", "--top-k", "500"], cwd=REPO, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: --top-k")


def test_batched_replies_equal_one_at_a_time(tok):
    """Dynamic batching changes throughput, not text: each request's seed gives the same reply
    whether it was decoded alone or together with others (each row samples from its own generator)."""
    engine = tiny_engine(tok)
    bodies = [{"messages": [{"role": "user", "content": f"the cat {'sees ' * i}the moon"}], "max_tokens": 24,
               "seed": 100 + i, "temperature": 1.0, "top_k": 20} for i in range(8)]

    async def run(url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            rs = await asyncio.gather(*(client.post("/v1/chat/completions", json=b) for b in bodies))
            stats = (await client.get("/stats")).json()
        return [r.json()["choices"][0]["message"]["content"] for r in rs], stats

    with BackgroundServer(create_app([engine], tok, model_name=MODEL, max_batch=8)) as server:
        batched, stats = asyncio.run(run(server.url))
    assert stats["workers"][0]["max_batch_rows"] > 1
    with BackgroundServer(create_app([engine], tok, model_name=MODEL, max_batch=1)) as server:
        single, stats = asyncio.run(run(server.url))
    assert stats["workers"][0]["max_batch_rows"] == 1
    assert batched == single
