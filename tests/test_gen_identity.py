"""gen_identity: deterministic, valid identity conversations from the knowledge file; the
paraphrase path against a local fake OpenAI-compatible server; clear errors."""

import contextlib
import io
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import helpers  # noqa: F401 (puts the checkout on sys.path, for `scripts`)
import pytest

from nanochat.common import NanochatError
from scripts import gen_identity


def _run(argv):
    with contextlib.redirect_stdout(io.StringIO()):
        return gen_identity.main(argv)


def _lines(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_default_output_is_deterministic_and_valid(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    summary = _run(["--num=300"])
    default = os.path.join(os.environ["NANOCHAT_BASE_DIR"], "identity_conversations.jsonl")
    assert summary["output"] == default and summary["conversations"] == 300 and summary["paraphrased"] == 0
    first = open(default, "rb").read()
    _run([f"--output={tmp_path / 'again.jsonl'}", "--num=300"])
    assert open(tmp_path / "again.jsonl", "rb").read() == first  # same seed, same bytes
    _run([f"--output={tmp_path / 'other.jsonl'}", "--num=300", "--seed=1"])
    assert open(tmp_path / "other.jsonl", "rb").read() != first
    _run([f"--output={tmp_path / 'short.jsonl'}", "--num=10"])
    assert _lines(tmp_path / "short.jsonl") == _lines(default)[:10]  # conversation i does not depend on --num

    convs = _lines(default)
    knowledge = gen_identity.load_knowledge(gen_identity.KNOWLEDGE_FILE)
    for messages in convs:
        assert gen_identity.is_valid_conversation(messages)
        for m in messages:
            assert "{" not in m["content"] and "}" not in m["content"]  # every placeholder was filled
    # variety: many distinct conversations, every topic used, and the facts come through
    assert len({json.dumps(c) for c in convs}) > 250
    text = json.dumps(convs)
    assert "nanochat" in text and knowledge["facts"]["creator"] in text and "MIT" in text
    assert {len(c) for c in convs} >= {2, 4, 6}

    # SFT reads it with CustomJSON and the tokenizer renders it with assistant-only masks
    from nanochat.tasks.customjson import CustomJSON
    task = CustomJSON(filepath=default)
    assert len(task) == 300 and task[0]["messages"] == convs[0]


def test_malformed_knowledge_file_names_the_line(tmp_path):
    bad = tmp_path / "k.md"
    bad.write_text("## Facts\n- name: bot\n\n## Topic: who\nQ: Who are you?\nA: I am {name} by {maker}.\n")
    with pytest.raises(NanochatError, match=r"k\.md line 6: \{maker\} is not a fact"):
        gen_identity.load_knowledge(str(bad))
    bad.write_text("## Facts\nname = bot\n")
    with pytest.raises(NanochatError, match=r"line 2: expected a fact"):
        gen_identity.load_knowledge(str(bad))
    bad.write_text("## Facts\n- name: bot\n## Topic: who\nQ: Who?\nhello\n")
    with pytest.raises(NanochatError, match=r"line 5: expected a `Q: ...` or `A: ...` line"):
        gen_identity.load_knowledge(str(bad))
    with pytest.raises(NanochatError, match="does not exist"):
        gen_identity.load_knowledge(str(tmp_path / "missing.md"))


class _FakeAPI(BaseHTTPRequestHandler):
    """/v1/chat/completions: answers with the conversation from the prompt, every content
    prefixed with "Reworded: " (or garbage when the server is told to misbehave)."""

    mode = "good"
    seen = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _FakeAPI.seen.append((self.path, self.headers.get("Authorization"), body["model"]))
        prompt = body["messages"][0]["content"]
        conversation = json.loads(prompt[prompt.index("Conversation:\n") + len("Conversation:\n"):])
        if _FakeAPI.mode == "good":
            answer = "```json\n" + json.dumps([{"role": m["role"], "content": "Reworded: " + m["content"]}
                                               for m in conversation]) + "\n```"
        else:
            answer = "Sorry, I can't do that."
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_api():
    server = HTTPServer(("127.0.0.1", 0), _FakeAPI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _FakeAPI.seen, _FakeAPI.mode = [], "good"
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_paraphrase_through_an_openai_compatible_api(tmp_path, fake_api, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    out = tmp_path / "p.jsonl"
    summary = _run([f"--output={out}", "--num=6", "--paraphrase", f"--api-base={fake_api}", "--model=m1",
                    "--workers=2"])
    assert summary["paraphrased"] == 6 and summary["template_fallbacks"] == 0
    assert {s for s in _FakeAPI.seen} == {("/v1/chat/completions", "Bearer sk-test", "m1")}
    templates = [gen_identity.make_conversation(gen_identity.load_knowledge(gen_identity.KNOWLEDGE_FILE), 0, i)
                 for i in range(6)]
    got = _lines(out)
    assert got == [[{"role": m["role"], "content": "Reworded: " + m["content"]} for m in t] for t in templates]

    # an API that does not return a conversation: retried, then the template is kept and counted
    _FakeAPI.mode, _FakeAPI.seen = "bad", []
    summary = _run([f"--output={out}", "--num=3", "--api-key=k2", f"--api-base={fake_api}", "--retries=1",
                    "--workers=1"])
    assert summary["paraphrased"] == 0 and summary["template_fallbacks"] == 3
    assert len(_FakeAPI.seen) == 6 and _lines(out) == templates[:3]


def test_paraphrase_needs_a_key(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(NanochatError, match="needs an API key"):
        _run([f"--output={tmp_path / 'x.jsonl'}", "--paraphrase"])
    assert not (tmp_path / "x.jsonl").exists()
