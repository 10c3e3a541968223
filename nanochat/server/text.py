"""Generated tokens -> text deltas for one row: tokens are decoded incrementally and a chunk is
only emitted once its decoded text does not end in U+FFFD, so multi-byte characters split across
tokens are never sent half-formed. <|assistant_end|> and <|bos|> end a row and are
never emitted. Tool calls: the tokens inside <|python_start|>..<|python_end|> and
<|output_start|>..<|output_end|> come out as parts "python" / "python_output", and the markers
themselves as part "marker" (the routes decide whether a client sees them). Stop strings cut the
text at their first occurrence.

ReplyTokens goes the other way for a chat's next turn: the reply comes back as text, and it is
rendered as the tokens it was generated as.
"""

import threading
from collections import OrderedDict

TERMINAL_TOKENS = ("<|assistant_end|>", "<|bos|>")
# special token -> (part it opens, part it closes)
TOOL_MARKERS = {"<|python_start|>": "python", "<|python_end|>": "text",
                "<|output_start|>": "python_output", "<|output_end|>": "text"}


class StopMatcher:
    """Cuts a text stream at the first occurrence of any stop string. Text that could still be
    the start of a stop string is held back until the next chunk decides it."""

    def __init__(self, stops):
        self.stops = [s for s in stops if s]
        self.held = ""

    def push(self, text):
        """-> (text safe to emit, stopped)."""
        buf = self.held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return buf[:min(hits)], True
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:k]):
                    keep = k
                    break
        self.held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], False

    def flush(self):
        text, self.held = self.held, ""
        return text


class RowDecoder:
    """Turns one row's generated tokens into text deltas: (part, text) with part "text",
    "python", "python_output", or "marker" for a tool special token's own text. UTF-8 safe:
    pending tokens are decoded together and only released once the text is not cut mid-character."""

    def __init__(self, tokenizer, specials, max_tokens, stops=()):
        self.tok = tokenizer
        self.specials = specials  # id -> special token string
        self.max_tokens = max_tokens
        self.part = "text"
        self.pending = []
        self.tokens = []  # every token fed, as generated
        self.sent = []  # the text of every delta released (markers included)
        self.stop = StopMatcher(stops) if stops else None
        self.finish_reason = None  # "stop" | "length" once finished

    @property
    def done(self):
        return self.finish_reason is not None

    @property
    def num_tokens(self):
        return len(self.tokens)

    def _out(self, part, text, out):
        out.append((part, text))
        self.sent.append(text)

    def _emit(self, part, text, out):
        if not text:
            return
        if self.stop is not None:
            text, stopped = self.stop.push(text)
            if text:
                self._out(part, text, out)
            if stopped:
                self.finish_reason = "stop"
            return
        self._out(part, text, out)

    def _flush(self, out):
        """Release everything held back: pending tokens (even if cut mid-character) and text
        held for the stop matcher. Called before a part changes and when the row ends."""
        if self.pending:
            # pending tokens end mid-character (else feed() would have released them): the row
            # stops or switches part here, so the incomplete bytes can never complete; drop them
            text = self.tok.decode(self.pending).rstrip("\ufffd")
            self.pending = []
            self._emit(self.part, text, out)
        if self.stop is not None and self.stop.held and not self.done:
            self._out(self.part, self.stop.flush(), out)

    def feed(self, token):
        """Append one token; returns the list of deltas it releases (possibly empty)."""
        out = []
        if self.done:
            return out
        self.tokens.append(token)
        special = self.specials.get(token)
        if special in TERMINAL_TOKENS:
            self._finish("stop", out)
            return out
        if special is not None:
            if special in TOOL_MARKERS:
                self._flush(out)
                if not self.done:
                    self._emit("marker", special, out)
                    self.part = TOOL_MARKERS[special]
            # other specials (<|user_start|> ...) are not text the reply should carry
        else:
            self.pending.append(token)
            text = self.tok.decode(self.pending)
            if not text.endswith("\ufffd"):
                self.pending = []
                self._emit(self.part, text, out)
        if not self.done and self.num_tokens >= self.max_tokens:
            self._finish("length", out)
        return out

    def _finish(self, reason, out):
        self._flush(out)
        if not self.done:
            self.finish_reason = reason


class ReplyTokens:
    """The tokens recent replies were generated as, by their text (LRU, at most max_entries).

    A client sends the conversation back as text. BPE can spell one text with many token
    sequences and the model does not always pick the one encode() gives, so re-encoding a reply
    can change its tokens: the model would then read something other than what it wrote, and the
    follow-up prompt would no longer start with the tokens whose KV cache the engine kept
    (prefix reuse). render() swaps each assistant message that is a remembered reply back to its
    generated tokens; the text is the same either way."""

    def __init__(self, tokenizer, max_entries=4096):
        self.tok = tokenizer
        self.max_entries = max_entries
        self.entries = OrderedDict()  # reply text -> its generated tokens
        self.lock = threading.Lock()  # workers remember, request handlers render
        special = tokenizer.encode_special
        self.start, self.end = special("<|assistant_start|>"), special("<|assistant_end|>")
        self.terminal = {special(s) for s in TERMINAL_TOKENS}
        self.specials = {special(s) for s in tokenizer.get_special_tokens()}
        # specials a reply's text shows (tool markers, as text on /v1); the others are dropped from it
        self.unseen = self.specials - {special(s) for s in TOOL_MARKERS}

    def remember(self, text, tokens):
        """A finished reply: the text its client got and the tokens it was generated as (a
        terminal token at the end is dropped). Replies whose text leaves out a special token they
        hold, and ones encode() spells the same way, are not kept."""
        tokens = list(tokens)
        while tokens and tokens[-1] in self.terminal:
            tokens.pop()
        if not text or not tokens or any(t in self.unseen for t in tokens) or self.tok.encode(text) == tokens:
            return
        with self.lock:
            self.entries[text] = tokens
            self.entries.move_to_end(text)
            while len(self.entries) > self.max_entries:
                self.entries.popitem(last=False)

    def render(self, ids):
        """A rendered prompt with every remembered reply (the tokens between <|assistant_start|>
        and <|assistant_end|>) spelled as it was generated."""
        if not self.entries:
            return ids
        out, i = [], 0
        while i < len(ids):
            out.append(ids[i])
            if ids[i] == self.start and self.end in ids[i + 1:]:
                j = ids.index(self.end, i + 1)
                body = ids[i + 1:j]
                with self.lock:
                    generated = None if any(t in self.specials for t in body) else self.entries.get(self.tok.decode(body))
                out.extend(generated if generated is not None else body)
                i = j
                continue
            i += 1
        return out
