"""Step-level (continuous) batching in the worker pool, prefix reuse across chat turns, top_p on
both chat routes and readiness after warm-up. Scripted engines with the Engine's session API
record which rows every step decoded, so the tests pin membership step by step; the tests at the
end run the real Engine when it has sessions."""

import threading
import time

import pytest
from fastapi.testclient import TestClient
from server_fakes import (
    MODEL,
    FakeEngine,
    FakeSession,
    FakeSessionEngine,
    byte_tokens,
    client_for,
    last_user_text,
    tiny_gpt,
    tiny_tokenizer,
)

from nanochat.server import create_app
from nanochat.server.scheduler import Job, QueueFull, WorkerPool


@pytest.fixture
def tok():
    return tiny_tokenizer()



def hello(text="hello there", **extra):
    return {"messages": [{"role": "user", "content": text}], **extra}


def wait_for(condition, timeout=10.0):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out waiting"
        time.sleep(0.005)


def prompt(tok, text):
    ids, _ = tok.render_conversation({"messages": [{"role": "user", "content": text}]})
    return ids + [tok.encode_special("<|assistant_start|>")]


# -----------------------------------------------------------------------------
# Joining and leaving a running batch


def test_request_joins_the_running_batch_at_the_next_step(tok):
    permits = threading.Semaphore(0)  # one per step: the test decides when the engine steps
    engine = FakeSessionEngine(tok, gate=permits)
    long_text, short_text = "a much longer message for the first request of all", "hi"
    with client_for(engine, tok, max_batch=4) as c:
        results = {}

        def post(name, text):
            results[name] = c.post("/v1/chat/completions", json=hello(text)).json()

        first = threading.Thread(target=post, args=("long", long_text))
        first.start()
        permits.release(3)
        wait_for(lambda: len(engine.step_rows) == 3 and engine.entered == 4)  # step 4 is waiting for its permit
        second = threading.Thread(target=post, args=("short", short_text))
        second.start()
        wait_for(lambda: c.get("/health").json()["queue_depth"] == 1)
        permits.release(10_000)
        first.join(10)
        second.join(10)
        stats = c.get("/stats").json()
    short_len = len(tok.encode("You said: " + short_text)) + 1  # + <|assistant_end|>
    long_len = len(tok.encode("You said: " + long_text)) + 1
    assert long_len > 4 + short_len
    # row 0 alone for 4 steps (the 4th was in flight when "short" arrived), row 1 joins at step 5,
    # decodes its reply and leaves; row 0 goes on alone
    assert engine.step_rows == [[0]] * 4 + [[0, 1]] * short_len + [[0]] * (long_len - 4 - short_len)
    for name, text in (("long", long_text), ("short", short_text)):
        assert results[name]["choices"][0]["message"]["content"] == "You said: " + text
        assert results[name]["choices"][0]["finish_reason"] == "stop"
    assert stats["batching_mode"] == "step" and stats["workers"][0]["max_batch_rows"] == 2
    assert stats["requests_completed"] == 2 and stats["busy_workers"] == 0
    assert len(engine.sessions) == 1  # one session served both


def test_cancelled_row_is_freed_at_the_next_step(tok):
    permits = threading.Semaphore(0)
    engine = FakeSessionEngine(tok, gate=permits, reply=lambda p, r, call: tok.encode("the cat sees the moon " * 20))
    pool = WorkerPool([engine], tok, max_batch=4)
    try:
        a = Job(prompt(tok, "a"), max_tokens=500, temperature=1.0, top_k=None)
        b = Job(prompt(tok, "b"), max_tokens=500, temperature=1.0, top_k=None)
        with pool.cond:  # both queued before the worker looks
            pool.submit(a)
            pool.submit(b)
        permits.release(2)
        wait_for(lambda: len(engine.step_rows) == 2 and engine.entered == 3)
        b.stop()  # b's client leaves while step 3 is in flight
        permits.release(3)
        wait_for(lambda: len(engine.step_rows) == 5)
        assert engine.step_rows == [[0, 1]] * 3 + [[0]] * 2
        assert engine.cancelled == [1]
        assert b.completion_tokens == 2 and a.completion_tokens >= 4  # nothing counted once b stopped
        wait_for(lambda: pool.stats()["requests_completed"] == 1)
    finally:
        a.stop()
        permits.release(10_000)
        pool.close()


def test_rows_beyond_max_batch_wait_for_a_free_row(tok):
    permits = threading.Semaphore(0)
    replies = {"a": "aaa aaa aaa aaa", "b": "b", "c": "c c"}
    engine = FakeSessionEngine(tok, gate=permits,
                               reply=lambda p, r, call: tok.encode(replies[last_user_text(tok, p)]))
    pool = WorkerPool([engine], tok, max_batch=2)
    try:
        jobs = [Job(prompt(tok, name), max_tokens=100, temperature=1.0, top_k=None) for name in "abc"]
        with pool.cond:
            for job in jobs:
                pool.submit(job)
        permits.release(10_000)
        wait_for(lambda: pool.stats()["requests_completed"] == 3)
    finally:
        pool.close()
    a, b, c = (len(tok.encode(replies[k])) + 1 for k in "abc")
    # a and b start together; c takes b's row the step after b finished
    assert engine.step_rows[:b] == [[0, 1]] * b
    assert engine.step_rows[b] == [0, 2]
    assert max(len(rows) for rows in engine.step_rows) == 2
    assert sum(0 in rows for rows in engine.step_rows) == a and sum(2 in rows for rows in engine.step_rows) == c


def test_stop_string_cancels_the_row(tok):
    reply = tok.encode("the cat sees the moon " * 20)
    engine = FakeSessionEngine(tok, reply=lambda p, r, call: reply)
    with client_for(engine, tok) as c:
        r = c.post("/v1/chat/completions", json=hello(stop="moon")).json()
    assert r["choices"][0]["message"]["content"] == "the cat sees the " and r["choices"][0]["finish_reason"] == "stop"
    upto_stop = next(k for k in range(len(reply)) if "moon" in tok.decode(reply[:k]))
    assert engine.cancelled == [0] and len(engine.step_rows) == upto_stop  # no step after the stop string


def test_admission_mode_only_fills_a_starting_batch(tok):
    permits = threading.Semaphore(0)
    engine = FakeSessionEngine(tok, gate=permits)
    pool = WorkerPool([engine], tok, max_batch=4, batching="admission")
    try:
        a = Job(prompt(tok, "first"), max_tokens=100, temperature=1.0, top_k=None)
        pool.submit(a)
        permits.release(1)
        wait_for(lambda: len(engine.step_rows) == 1 and engine.entered == 2)
        b = Job(prompt(tok, "second"), max_tokens=100, temperature=1.0, top_k=None)
        pool.submit(b)
        permits.release(10_000)
        wait_for(lambda: pool.stats()["requests_completed"] == 2)
    finally:
        pool.close()
    assert pool.batching_mode == "admission"
    assert all(len(rows) == 1 for rows in engine.step_rows)  # b waited for a's batch to drain
    assert engine.step_rows[-1] == [1]


def test_queue_limit_counts_the_free_rows_of_a_running_batch(tok):
    permits = threading.Semaphore(0)
    engine = FakeSessionEngine(tok, gate=permits)
    pool = WorkerPool([engine], tok, max_batch=2, max_queue=1)
    job = lambda name: Job(prompt(tok, name), max_tokens=100, temperature=1.0, top_k=None)  # noqa: E731
    try:
        pool.submit(job("a"))
        permits.release(1)
        wait_for(lambda: len(engine.step_rows) == 1 and engine.entered == 2)  # one row decoding, one free
        pool.submit(job("b"))  # will take the free row at the next step
        pool.submit(job("c"))  # the one queue slot
        with pytest.raises(QueueFull):
            pool.submit(job("d"))
    finally:
        permits.release(10_000)
        pool.close()
    assert pool.requests_rejected == 1


def test_engine_failure_in_a_step_is_500_and_the_worker_goes_on(tok, caplog):
    engine = FakeSessionEngine(tok)
    broken = {"step": True, "add": False}
    step, add = engine._step, FakeSession.add

    def failing_step():
        if broken["step"]:
            raise RuntimeError("/secret/path exploded")
        step()

    def failing_add(session, *args, **kwargs):
        if broken["add"]:
            raise RuntimeError("/secret/path exploded")
        return add(session, *args, **kwargs)

    engine._step = failing_step
    with client_for(engine, tok) as c, pytest.MonkeyPatch.context() as mp:
        mp.setattr(FakeSession, "add", failing_add)
        for what in ("step", "add"):
            broken.update(step=what == "step", add=what == "add")
            r = c.post("/v1/chat/completions", json=hello())
            assert r.status_code == 500 and r.json()["error"]["code"] == "generation_failed"
            assert "secret" not in r.text
        broken.update(step=False, add=False)
        assert c.post("/v1/chat/completions", json=hello()).json()["choices"][0]["message"]["content"] == "You said: hello there"
        assert c.get("/stats").json()["busy_workers"] == 0
    assert len(engine.sessions) == 3  # each failure closed its session (nothing else ran in it); a new one followed


# -----------------------------------------------------------------------------
# Prefix reuse, top_p, readiness


def test_follow_up_turn_reuses_the_conversation_prefix(tok):
    engine = FakeSessionEngine(tok)
    with client_for(engine, tok) as c:
        first = c.post("/v1/chat/completions", json=hello("hello there")).json()
        reply = first["choices"][0]["message"]["content"]
        turn2 = {"messages": [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": reply},
                              {"role": "user", "content": "and again"}]}
        second = c.post("/v1/chat/completions", json=turn2).json()
        c.post("/v1/chat/completions", json={**hello("other"), "n": 2})
    assert second["choices"][0]["message"]["content"] == "You said: and again"
    turn1 = engine.calls[0]
    assert turn1["keep"] is True and turn1["reused"] == 0
    # the second turn's prompt starts with turn 1's prompt and reply, all held in the prefix store
    assert engine.calls[1]["reused"] == len(turn1["tokens"]) + len(tok.encode(reply))
    assert engine.calls[2]["keep"] is False  # n > 1: no single continuation to keep


def test_reply_tokens_render_a_reply_as_it_was_generated(tok):
    from nanochat.server.schemas import build_prompt
    from nanochat.server.text import ReplyTokens

    replies = ReplyTokens(tok, max_entries=2)
    end, user_start = tok.encode_special("<|assistant_end|>"), tok.encode_special("<|user_start|>")
    generated = byte_tokens(tok, "the cat sees")  # one token per byte: not how encode() spells it
    assert tok.encode("the cat sees") != generated
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the cat sees"},
            {"role": "user", "content": "and?"}]
    plain = build_prompt(tok, chat)
    assert replies.render(plain) == plain  # nothing remembered yet
    replies.remember("the cat sees", generated + [end])
    rendered = replies.render(plain)
    start = plain.index(tok.encode_special("<|assistant_start|>"))
    n = len(tok.encode("the cat sees"))
    assert rendered == plain[:start + 1] + generated + plain[start + 1 + n:]
    assert tok.decode(rendered) == tok.decode(plain)  # the same text
    replies.remember("the dog", byte_tokens(tok, "the") + [user_start] + byte_tokens(tok, " dog"))  # text lacks it
    replies.remember("a b", tok.encode("a b"))  # encode() spells it the same: nothing to keep
    assert list(replies.entries) == ["the cat sees"]
    for text in ("the moon", "the sun"):
        assert tok.encode(text) != byte_tokens(tok, text)
        replies.remember(text, byte_tokens(tok, text))
    assert list(replies.entries) == ["the moon", "the sun"]  # least recently used dropped first


def test_follow_up_turn_over_http_hits_the_prefix_store_real_engine(tok):
    engine = real_engine(tok)
    app = create_app([engine], tok, model_name=MODEL)
    remembered = 0
    with TestClient(app, base_url="http://localhost") as c:
        for trial in range(4):
            chat = [{"role": "user", "content": f"hello number {trial}"}]
            r = c.post("/v1/chat/completions", json={"messages": chat, "max_tokens": 20, "seed": trial}).json()
            reply = r["choices"][0]["message"]["content"]
            chat += [{"role": "assistant", "content": reply}, {"role": "user", "content": "more"}]
            kept = reply in app.state.pool.replies.entries  # spelled otherwise than encode() would
            before = engine.prefix_store.hits
            assert c.post("/v1/chat/completions", json={"messages": chat, "max_tokens": 5}).status_code == 200
            if kept:  # rendered as generated, the follow-up starts with the cached conversation
                assert engine.prefix_store.hits == before + 1
            remembered += kept
    assert remembered >= 1


@pytest.mark.parametrize("route", ["/chat/completions", "/v1/chat/completions"])
def test_top_p_reaches_the_engine_on_both_routes(tok, route):
    engine = FakeSessionEngine(tok)
    with client_for(engine, tok) as c:
        assert c.post(route, json=hello(top_p=0.5)).status_code == 200
        assert c.post(route, json=hello()).status_code == 200
        for bad in (0.0, -0.1, 1.5):
            r = c.post(route, json=hello(top_p=bad))
            assert r.status_code == 400 and r.json()["error"]["param"] == "top_p"
            assert r.json()["error"]["message"] == f"top_p must be more than 0 and at most 1 (1 = off), got {bad}."
        r = c.post(route, json=hello(top_p="0.5"))
        assert r.status_code == 422 and "top_p" in r.json()["error"]["message"]
    assert [call["top_p"] for call in engine.calls] == [0.5, 1.0]


def test_default_top_p_from_the_server(tok):
    engine = FakeSessionEngine(tok)
    with client_for(engine, tok, top_p=0.9) as c:
        c.post("/chat/completions", json=hello())
        c.post("/v1/chat/completions", json=hello(top_p=0.3))
    assert [call["top_p"] for call in engine.calls] == [0.9, 0.3]
    with pytest.raises(ValueError, match="top_p"):
        create_app([FakeEngine(tok)], tok, top_p=0.9)


def test_top_p_below_one_refused_by_an_engine_without_it(tok):
    with client_for(FakeEngine(tok), tok) as c:
        for route in ("/chat/completions", "/v1/chat/completions"):
            r = c.post(route, json=hello(top_p=0.5))
            assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_value"


def test_health_is_ready_only_after_warmup(tok):
    gate = threading.Event()
    engine = FakeSessionEngine(tok, warm_gate=gate)
    with client_for(engine, tok) as c:
        h = c.get("/health").json()
        assert h["status"] == "ok" and h["ready"] is False and not engine.warmed.is_set()
        gate.set()
        wait_for(lambda: c.get("/health").json()["ready"])
        assert engine.warmed.is_set()
        assert c.post("/v1/chat/completions", json=hello()).json()["choices"][0]["message"]["content"] == "You said: hello there"


# -----------------------------------------------------------------------------
# The real Engine's sessions


class RecordingEngine:
    """Wraps a real Engine: its sessions step only on a permit, and every row's tokens are kept
    (tokens[k] = rows of the k-th add, in row order)."""

    def __init__(self, engine, permits=None):
        self.engine, self.permits = engine, permits
        self.tokens, self.step_rows = [], []

    def warmup(self):
        getattr(self.engine, "warmup", lambda: None)()

    def session(self, max_rows=None):
        rec, inner = self, self.engine.session(max_rows=max_rows)
        owner = {}

        class Session:
            def add(self, tokens, n=1, **kwargs):
                ids = inner.add(tokens, n=n, **kwargs)
                rec.tokens.append([[] for _ in ids])
                owner.update({row_id: (len(rec.tokens) - 1, i) for i, row_id in enumerate(ids)})
                return ids

            def step(self):
                if rec.permits is not None:
                    rec.permits.acquire(timeout=30)
                events = inner.step()
                rec.step_rows.append(sorted(row_id for row_id, *_ in events))
                for row_id, token, _mask, _finished in events:
                    k, i = owner[row_id]
                    rec.tokens[k][i].append(token)
                return events

            def cancel(self, row_id):
                inner.cancel(row_id)

            def close(self):
                inner.close()

        return Session()


def real_engine(tok):
    from nanochat.engine import Engine

    if not hasattr(Engine, "session"):
        pytest.skip("the Engine has no session() yet")
    return Engine(tiny_gpt(tok), tok, compile=False)


def run_jobs(pool, jobs):
    with pool.cond:
        for job in jobs:
            pool.submit(job)


def test_seeded_rows_same_text_batched_or_alone_real_engine(tok):
    engine = real_engine(tok)
    texts = ["the cat sees the moon", "a dog", "hello there, how are you today"]
    make = lambda: [Job(prompt(tok, t), n=1 + (k == 1), max_tokens=20, temperature=1.0, top_k=None, top_p=0.9,  # noqa: E731
                        seed=100 + k) for k, t in enumerate(texts)]

    permits = threading.Semaphore(0)
    batched = RecordingEngine(engine, permits)
    pool = WorkerPool([batched], tok, max_batch=8)
    try:
        first, *later = make()
        run_jobs(pool, [first])
        permits.release(3)
        wait_for(lambda: len(batched.step_rows) == 3)
        run_jobs(pool, later)  # they join the running batch
        permits.release(10_000)
        wait_for(lambda: pool.stats()["requests_completed"] == 3, 60)
    finally:
        pool.close()
    assert max(len(rows) for rows in batched.step_rows) >= 3

    alone = RecordingEngine(engine)
    pool = WorkerPool([alone], tok, max_batch=1)
    try:
        for k, job in enumerate(make()):
            run_jobs(pool, [job])
            wait_for(lambda done=k + 1: pool.stats()["requests_completed"] == done, 60)
    finally:
        pool.close()
    assert max(len(rows) for rows in alone.step_rows) <= 2  # the n=2 request's two rows
    assert batched.tokens == alone.tokens


def test_prefix_reuse_gives_the_tokens_of_a_fresh_prefill_real_engine(tok):
    from nanochat.engine import Engine

    engine = real_engine(tok)
    turn1 = prompt(tok, "the cat sees the moon")
    reused = RecordingEngine(engine)
    pool = WorkerPool([reused], tok, max_batch=4)
    try:  # turn 1 leaves its cache in the engine's prefix store; turn 2 starts from it
        run_jobs(pool, [Job(turn1, max_tokens=12, temperature=0.0, top_k=None)])
        wait_for(lambda: pool.stats()["requests_completed"] == 1, 60)
        turn2 = second_turn(tok, turn1, reused.tokens[0][0])
        run_jobs(pool, [Job(turn2, max_tokens=12, temperature=1.0, top_k=None, seed=5)])
        wait_for(lambda: pool.stats()["requests_completed"] == 2, 60)
    finally:
        pool.close()
    fresh = RecordingEngine(Engine(engine.model, tok, compile=False))  # an empty prefix store
    pool = WorkerPool([fresh], tok, max_batch=4)
    try:
        run_jobs(pool, [Job(turn2, max_tokens=12, temperature=1.0, top_k=None, seed=5)])
        wait_for(lambda: pool.stats()["requests_completed"] == 1, 60)
    finally:
        pool.close()
    assert engine.prefix_store.hits == 1 and fresh.engine.prefix_store.hits == 0
    assert reused.tokens[1] == fresh.tokens[0]


def second_turn(tok, turn1, reply):
    """turn 1's prompt, its reply (ending in <|assistant_end|>), then a new user message."""
    end = tok.encode_special("<|assistant_end|>")
    reply = reply if reply and reply[-1] == end else reply + [end]
    return (turn1 + reply + [tok.encode_special("<|user_start|>")] + tok.encode("and then?")
            + [tok.encode_special("<|user_end|>"), tok.encode_special("<|assistant_start|>")])
