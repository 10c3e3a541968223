"""The chat page in headless Chromium (Playwright): send a message and watch it stream, regenerate,
edit and resend, slash commands, code blocks and tool parts, new conversation, the health banner.
Skips when Playwright or /usr/bin/chromium is missing."""

import os
import re

import pytest
from server_fakes import FakeEngine, last_user_text, tiny_tokenizer

from nanochat.server import BackgroundServer, create_app

CHROMIUM = os.environ.get("NANOCHAT_CHROMIUM", "/usr/bin/chromium")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
if not os.path.exists(CHROMIUM):
    pytest.skip(f"no Chromium at {CHROMIUM} (install chromium or set NANOCHAT_CHROMIUM)", allow_module_level=True)

MODEL = "nanochat-ui-test"


def make_engine(tok):
    s = tok.encode_special

    def reply(prompt, row, call):
        user = last_user_text(tok, prompt)
        if "code" in user:
            return tok.encode("Here:\n```python\nprint(1)\n```\ndone")
        if "tool" in user:
            return (tok.encode("Computing") + [s("<|python_start|>")] + tok.encode("6*7") + [s("<|python_end|>"),
                    s("<|output_start|>")] + tok.encode("42") + [s("<|output_end|>")] + tok.encode(" so 42"))
        if "<b>" in user:
            return tok.encode("<b>not bold</b>")
        return tok.encode(f"You said: {user} (take {call})")

    return FakeEngine(tok, reply=reply, delay=0.01)


def idle(page):
    """Wait until no reply is streaming (clicks and sends are ignored while one is)."""
    sync_api.expect(page.locator(".message.assistant.streaming")).to_have_count(0)


def send(page, text):
    """Type a message and press Enter once the previous reply has finished streaming."""
    idle(page)
    page.fill("#input", text)
    page.keyboard.press("Enter")


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


def test_chat_page_flow(browser):
    tok = tiny_tokenizer()
    engine = make_engine(tok)
    app = create_app([engine], tok, model_name=MODEL)
    expect = sync_api.expect
    with BackgroundServer(app) as server:
        page = browser.new_page()
        console = []
        page.on("console", lambda message: console.append(message.text))
        response = page.goto(server.url + "/")
        # the page works under its own Content-Security-Policy: nothing inline, nothing from elsewhere
        assert "script-src 'self'" in response.headers["content-security-policy"]
        expect(page.locator("#model-name")).to_have_text(MODEL)
        expect(page.locator("#banner")).to_be_hidden()

        # send: streamed reply appears
        send(page, "hello there")
        assistant = page.locator(".message.assistant")
        expect(assistant).to_have_text("You said: hello there (take 0)")
        expect(page.locator(".message.user")).to_have_text("hello there")
        expect(page.locator("#send")).to_be_disabled()  # empty input

        # regenerate: click the reply
        idle(page)
        assistant.click()
        expect(assistant).to_have_text("You said: hello there (take 1)")
        expect(page.locator(".message")).to_have_count(2)

        # edit: click the user message, its text returns to the input and the turn is removed
        idle(page)
        page.locator(".message.user").click()
        expect(page.locator(".message")).to_have_count(0)
        expect(page.locator("#input")).to_have_value("hello there")
        page.fill("#input", "bye now")
        page.click("#send")
        expect(assistant).to_have_text("You said: bye now (take 2)")

        # slash command: not sent, shown as a console note, applied to the next request
        send(page, "/temperature 0.3")
        expect(page.locator(".message.console")).to_contain_text("temperature set to 0.3")
        send(page, "second turn")
        expect(page.locator(".message.assistant").nth(1)).to_have_text("You said: second turn (take 3)")
        assert engine.calls[-1]["temperature"] == 0.3 and len(engine.calls) == 4
        assert last_user_text(tok, engine.calls[-1]["tokens"]) == "second turn"
        assert "bye now" in tok.decode(engine.calls[-1]["tokens"])  # the history was sent
        send(page, "/help")
        expect(page.locator(".message.console").last).to_contain_text("/topk")

        # fenced code and tool call/result render as their own elements; model output is never HTML
        idle(page)
        page.keyboard.press("Control+Shift+N")
        expect(page.locator(".message")).to_have_count(0)
        send(page, "show code")
        expect(page.locator(".message.assistant pre code")).to_have_text("print(1)\n")
        expect(page.locator(".message.assistant .code-lang")).to_have_text("python")
        send(page, "use the tool")
        expect(page.locator(".tool-call code")).to_have_text("6*7")
        expect(page.locator(".tool-result code")).to_have_text("42")
        expect(page.locator(".message.assistant").last).to_contain_text("so 42")
        assert engine.calls[-1]["tokens"].count(tok.encode_special("<|python_start|>")) == 0
        send(page, "one more <b>")
        expect(page.locator(".message.assistant").last).to_have_text("<b>not bold</b>")
        assert page.locator(".message.assistant b").count() == 0
        # the tool reply went back to the server as parts, rendered with the tool tokens
        assert engine.calls[-1]["tokens"].count(tok.encode_special("<|python_start|>")) == 1

        # new conversation button
        idle(page)
        page.click("#new-chat")
        expect(page.locator(".message")).to_have_count(0)

        assert not [m for m in console if "Content Security Policy" in m], console

        # health banner when the engine is unreachable
        page.route("**/health", lambda route: route.abort())
        page.reload()
        expect(page.locator("#banner")).to_have_text(re.compile("Engine not running"))
        page.close()


def test_api_key_prompt_in_page(browser):
    tok = tiny_tokenizer()
    app = create_app([make_engine(tok)], tok, model_name=MODEL, api_key="pw")
    expect = sync_api.expect
    with BackgroundServer(app) as server:
        page = browser.new_page()
        page.goto(server.url + "/")
        send(page, "hello")
        expect(page.locator(".message.error")).to_contain_text("/key")
        expect(page.locator(".message.user")).to_have_count(0)  # the unanswered turn is back in the input
        expect(page.locator("#input")).to_have_value("hello")
        send(page, "/key pw")
        send(page, "hello")
        expect(page.locator(".message.assistant")).to_have_text(re.compile("You said: hello"))
        page.close()
