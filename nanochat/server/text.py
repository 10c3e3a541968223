"""Generated tokens -> text deltas for one row: tokens are decoded incrementally and a chunk is
only emitted once its decoded text does not end in U+FFFD, so multi-byte characters split across
tokens are never sent half-formed. <|assistant_end|> and <|bos|> end a row and are
never emitted. Tool calls: the tokens inside <|python_start|>..<|python_end|> and
<|output_start|>..<|output_end|> come out as parts "python" / "python_output", and the markers
themselves as part "marker" (the routes decide whether a client sees them). Stop strings cut the
text at their first occurrence.
"""

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
        self.stop = StopMatcher(stops) if stops else None
        self.num_tokens = 0
        self.finish_reason = None  # "stop" | "length" once finished

    @property
    def done(self):
        return self.finish_reason is not None

    def _emit(self, part, text, out):
        if not text:
            return
        if self.stop is not None:
            text, stopped = self.stop.push(text)
            if text:
                out.append((part, text))
            if stopped:
                self.finish_reason = "stop"
            return
        out.append((part, text))

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
            out.append((self.part, self.stop.flush()))

    def feed(self, token):
        """Append one token; returns the list of deltas it releases (possibly empty)."""
        out = []
        if self.done:
            return out
        self.num_tokens += 1
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
