"""The BPE tokenizer: training, encoding/decoding, the special tokens, the chat format (its
check and its rendering with loss masks), and interoperability (the pickle every nanochat
checkout reads, Hugging Face's tokenizer.json).

Training uses rustbpe and encoding uses tiktoken: bench/tokenizer.py measures the
alternatives (HF `tokenizers` for training) on the same text. The trained merges become a
tiktoken Encoding, pickled to base_dir/tokenizer/tokenizer.pkl beside token_bytes.pt: the
layout other nanochat checkouts read and write, so a tokenizer trained by one works in the other.
"""

import io
import json
import logging
import os
import pickle
from functools import lru_cache

import tiktoken

from nanochat.common import NanochatError, atomic_path, get_base_dir

# GPT-4's (cl100k) split pattern with one change: numbers split in runs of 1-2 digits, not
# 1-3 (3-digit chunks would spend ~1000 slots of a small vocabulary on numbers). Training and encoding both use this constant.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)

# The special (control) tokens, appended after the merges in this order: at vocab 32768 they are
# ids 32759..32767.
CONTROL_TOKENS = [
    "<|bos|>",  # every document begins with it
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",  # the assistant calls the python tool
    "<|output_start|>", "<|output_end|>",  # the tool answers
]

DEFAULT_VOCAB_SIZE = 32768
MIN_VOCAB_SIZE = 256 + len(CONTROL_TOKENS)


PART_TYPES = ("text", "python", "python_output")  # what an assistant message's parts may be


class ConversationError(NanochatError, ValueError):
    """A conversation that is not in the chat format; the message says what is wrong."""


def check_conversation(messages, where=None, reply_needed=False):
    """Raise ConversationError unless `messages` is a chat: an optional system message, then
    messages alternating user, assistant, user, ...; a user's content is a string, an assistant's
    a string or a list of {"type": text|python|python_output, "text": str} parts. reply_needed: at
    least one assistant message (data to train on). `where` (a file and line) prefixes the error."""

    def bad(problem):
        raise ConversationError(f"{where}: {problem}" if where else problem)

    if not isinstance(messages, list):
        bad(f"expected a JSON array of messages, found a {type(messages).__name__}.")
    system = 1 if messages and isinstance(messages[0], dict) and messages[0].get("role") == "system" else 0
    if len(messages) - system < (2 if reply_needed else 1):
        bad("a conversation needs at least a user and an assistant message." if reply_needed else
            "the conversation has no user message.")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            bad(f"message {i} must be an object with \"role\" and \"content\".")
        expected = "system" if i < system else ("user" if (i - system) % 2 == 0 else "assistant")
        if m["role"] != expected:
            bad("a system message must be followed by a user message." if system and i == 1 else
                f"message {i} has role {m['role']!r} but {expected!r} was expected; roles must alternate user, "
                f"assistant, user, ... after an optional system message.")
        content = m["content"]
        if isinstance(content, str):
            continue
        if expected != "assistant":
            bad(f"message {i} ({expected}) must have string content.")
        if not isinstance(content, list) or not all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in content):
            bad(f"message {i} (assistant) must be a string or a list of {{\"type\", \"text\"}} parts.")
        unknown = [p.get("type") for p in content if p.get("type") not in PART_TYPES]
        if unknown:
            bad(f"message {i} has an unknown assistant content part type {unknown[0]!r}; "
                f"the types are {', '.join(PART_TYPES)}.")


class _EncodingUnpickler(pickle.Unpickler):
    """Unpickles a tiktoken Encoding and nothing else: a tokenizer file from the internet
    must not be able to run code."""

    def find_class(self, module, name):
        if (module, name) == ("tiktoken.core", "Encoding"):
            return tiktoken.Encoding
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


class Tokenizer:
    """Byte-level BPE over tiktoken, with the method names that nanochat code calls everywhere."""

    def __init__(self, enc, bos_token="<|bos|>"):
        self.enc = enc
        self.bos_token_id = self.encode_special(bos_token)

    # --- construction -----------------------------------------------------------------

    @classmethod
    def train_from_iterator(cls, text_iterator, vocab_size=DEFAULT_VOCAB_SIZE, pattern=SPLIT_PATTERN):
        """Learn vocab_size - 9 byte-level BPE ranks from an iterator of strings (streamed:
        rustbpe buffers a bounded number of documents at a time), then append the specials."""
        import rustbpe

        if vocab_size < MIN_VOCAB_SIZE:
            raise NanochatError(f"--vocab-size={vocab_size} is too small: it must be at least {MIN_VOCAB_SIZE} "
                                f"(256 byte tokens + {len(CONTROL_TOKENS)} special tokens).")
        counted = _CountingIterator(text_iterator)
        logging.getLogger("rustbpe").setLevel(logging.WARNING)  # one line per 1% of merges is too chatty
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(counted, vocab_size - len(CONTROL_TOKENS), pattern=pattern)
        if counted.chars == 0:
            raise NanochatError("the training corpus is empty; point the tokenizer trainer at some text.")
        ranks = {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}
        if len(ranks) < vocab_size - len(CONTROL_TOKENS):
            raise NanochatError(f"the corpus ({counted.chars:,} characters) only supports "
                                f"{len(ranks) + len(CONTROL_TOKENS)} tokens, fewer than --vocab-size={vocab_size}; "
                                f"use more text or a smaller vocabulary.")
        return cls(_make_encoding(ranks, pattern))

    @classmethod
    def from_directory(cls, tokenizer_dir):
        """Load tokenizer.pkl (a pickled tiktoken Encoding, as every nanochat checkout writes it)."""
        path = os.path.join(tokenizer_dir, "tokenizer.pkl")
        if not os.path.exists(path):
            raise NanochatError(f"no tokenizer at {path}; train one with `python -m scripts.tok_train` "
                                f"or set NANOCHAT_BASE_DIR to where yours lives.")
        try:
            with open(path, "rb") as f:
                enc = _EncodingUnpickler(io.BytesIO(f.read())).load()
        except Exception as e:
            raise NanochatError(f"{path} is not a readable tokenizer pickle ({type(e).__name__}: {e}); "
                                f"delete it and train again with `python -m scripts.tok_train`.") from None
        if not isinstance(enc, tiktoken.Encoding):
            raise NanochatError(f"{path} does not hold a tiktoken Encoding; retrain the tokenizer.")
        missing = [t for t in CONTROL_TOKENS if t not in enc._special_tokens]
        if missing:
            raise NanochatError(f"{path} lacks the special tokens {missing}; it is not a nanochat tokenizer.")
        return cls(enc)

    @classmethod
    def from_pretrained(cls, tiktoken_name):
        """tiktoken's gpt2 / cl100k_base (downloads on first use); BOS is <|endoftext|>."""
        return cls(tiktoken.get_encoding(tiktoken_name), bos_token="<|endoftext|>")

    def save(self, tokenizer_dir):
        """Write tokenizer.pkl and token_bytes.pt atomically into tokenizer_dir."""
        import torch

        os.makedirs(tokenizer_dir, exist_ok=True)
        with atomic_path(os.path.join(tokenizer_dir, "tokenizer.pkl")) as tmp, open(tmp, "wb") as f:
            pickle.dump(self.enc, f)
        with atomic_path(os.path.join(tokenizer_dir, "token_bytes.pt")) as tmp:
            torch.save(self.token_bytes(), tmp)

    # --- vocabulary -------------------------------------------------------------------

    def get_vocab_size(self):
        return self.enc.n_vocab

    def get_special_tokens(self):
        return set(self.enc._special_tokens)

    @lru_cache(maxsize=64)  # noqa: B019 (a tokenizer lives as long as the process)
    def encode_special(self, text):
        return self.enc.encode_single_token(text)

    def get_bos_token_id(self):
        return self.bos_token_id

    def id_to_token(self, token_id):
        return self.enc.decode([token_id])

    def decode_single_token_bytes(self, token_id):
        return self.enc.decode_single_token_bytes(token_id)

    def token_bytes(self):
        """int32 tensor (vocab,): UTF-8 byte length of every token from its raw bytes (decoding a
        lone byte of a multi-byte character would count U+FFFD's 3), 0 for special tokens so
        bits-per-byte ignores them."""
        import torch

        special = set(self.enc._special_tokens.values())
        lengths = [0 if i in special else len(self.enc.decode_single_token_bytes(i)) for i in range(self.get_vocab_size())]
        return torch.tensor(lengths, dtype=torch.int32)

    # --- encoding ---------------------------------------------------------------------

    def _special_id(self, token):
        return token if isinstance(token, int) else self.encode_special(token)

    def encode(self, text, prepend=None, append=None, num_threads=8):
        """Encode a string (-> list of ids) or a list of strings (-> list of lists, in parallel).
        Special-token strings inside text are plain text, never specials. prepend/append take
        an id or a special token's string."""
        pre = None if prepend is None else self._special_id(prepend)
        post = None if append is None else self._special_id(append)
        if isinstance(text, str):
            ids = self.enc.encode_ordinary(text)
            if pre is not None:
                ids.insert(0, pre)
            if post is not None:
                ids.append(post)
            return ids
        if isinstance(text, list):
            batch = self.enc.encode_ordinary_batch(text, num_threads=num_threads)
            if pre is not None:
                for ids in batch:
                    ids.insert(0, pre)
            if post is not None:
                for ids in batch:
                    ids.append(post)
            return batch
        raise TypeError(f"encode takes a str or a list of str, not {type(text).__name__}")

    __call__ = encode

    def decode(self, ids):
        return self.enc.decode(ids)

    # --- chat -------------------------------------------------------------------------

    def render_message(self, message):
        """Tokens and loss mask of one user or assistant message of a valid conversation: the
        one place a chat message becomes tokens. Only what the assistant writes is trained on:
        its text, its python calls and <|assistant_end|>; never <|assistant_start|>, user turns
        or tool outputs (the tool writes those at inference time, not the model)."""
        s, content = self.encode_special, message["content"]
        if message["role"] == "user":
            ids = [s("<|user_start|>"), *self.encode(content), s("<|user_end|>")]
            return ids, [0] * len(ids)
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        ids, mask = [s("<|assistant_start|>")], [0]
        for part in parts:
            text = self.encode(part["text"])
            if part["type"] == "python":
                text = [s("<|python_start|>"), *text, s("<|python_end|>")]
            elif part["type"] == "python_output":
                text = [s("<|output_start|>"), *text, s("<|output_end|>")]
            ids += text
            mask += [int(part["type"] != "python_output")] * len(text)
        return ids + [s("<|assistant_end|>")], mask + [1]

    def render_conversation(self, conversation, max_tokens=2048):
        """Tokens and loss mask (1 = trained on) of a conversation {"messages": [...]}, cropped to
        max_tokens: <|bos|>, then each message. A leading system message is merged into the first
        user message (the format has no system role)."""
        messages = conversation["messages"]
        check_conversation(messages)
        if messages[0]["role"] == "system":
            messages = [{**messages[1], "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}, *messages[2:]]
        ids, mask = [self.get_bos_token_id()], [0]
        for message in messages:
            message_ids, message_mask = self.render_message(message)
            ids += message_ids
            mask += message_mask
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation):
        """Prompt for the model to answer: the conversation minus its final assistant message,
        ending in <|assistant_start|> (used by RL and chat evaluation)."""
        messages = conversation["messages"]
        if not messages or messages[-1]["role"] != "assistant":
            raise ConversationError("render_for_completion needs a conversation ending with an assistant message.")
        ids, _ = self.render_conversation({"messages": messages[:-1]})
        return ids + [self.encode_special("<|assistant_start|>")]

    def visualize_tokenization(self, ids, mask, with_token_id=False):
        """Debug view: supervised tokens green, the rest red, tokens separated by '|'."""
        green, red, reset = "\033[92m", "\033[91m", "\033[0m"
        out = []
        for token_id, m in zip(ids, mask):
            text = self.decode([token_id]) + (f"({token_id})" if with_token_id else "")
            out.append(f"{green if m else red}{text}{reset}")
        return "|".join(out)

    # --- interoperability ----------------------------------------------------------------

    def to_huggingface_json(self, path, add_bos=False):
        """Export as a Hugging Face tokenizer.json (byte-level BPE with our split pattern and
        the specials as added tokens) that `tokenizers.Tokenizer.from_file` encodes identically.
        add_bos: encoding with special tokens on (the default in transformers) prepends <|bos|>,
        as a model export wants: nanochat models read every document from a <|bos|>."""
        data = _huggingface_json(self.enc)
        if add_bos:
            bos = self.id_to_token(self.bos_token_id)
            data["post_processor"] = {
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"Sequence": {"id": "B", "type_id": 0}}],
                "special_tokens": {bos: {"id": bos, "ids": [self.bos_token_id], "tokens": [bos]}},
            }
        with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False)

    @classmethod
    def from_huggingface_json(cls, path):
        """The inverse of to_huggingface_json: the same tiktoken Encoding (ranks, split pattern,
        special tokens) from a tokenizer.json that nanochat wrote (a model export carries one)."""
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            model, pre = data["model"], data["pre_tokenizer"]["pretokenizers"][0]
            if model["type"] != "BPE" or pre["type"] != "Split":
                raise ValueError("not a byte-level BPE with a split pattern")
            char_to_byte = {c: b for b, c in _bytes_to_unicode().items()}
            ranks = {bytes(char_to_byte[c] for c in token): rank for token, rank in model["vocab"].items()}
            pattern = pre["pattern"]["Regex"]
            special = {t["content"]: t["id"] for t in data["added_tokens"] if t.get("special")}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, IndexError, TypeError, ValueError) as e:
            raise NanochatError(f"{path} is not a tokenizer.json written by nanochat ({type(e).__name__}: {e}); "
                                f"export the model again with `python -m scripts.export`.") from None
        missing = [t for t in CONTROL_TOKENS if t not in special]
        if missing:
            raise NanochatError(f"{path} lacks the special tokens {missing}; it is not a nanochat tokenizer.")
        return cls(tiktoken.Encoding(name="nanochat", pat_str=pattern, mergeable_ranks=ranks, special_tokens=special))


RustBPETokenizer = Tokenizer  # the name scripts written for other nanochat checkouts import


class _CountingIterator:
    """Wraps the document iterator to count characters (to detect an empty corpus)."""

    def __init__(self, it):
        self.it, self.chars = iter(it), 0

    def __iter__(self):
        return self

    def __next__(self):
        doc = next(self.it)
        if not isinstance(doc, str):
            raise TypeError(f"the tokenizer trains on strings, got {type(doc).__name__}")
        self.chars += len(doc)
        return doc


def _make_encoding(mergeable_ranks, pattern=SPLIT_PATTERN):
    offset = len(mergeable_ranks)
    special = {name: offset + i for i, name in enumerate(CONTROL_TOKENS)}
    return tiktoken.Encoding(name="rustbpe", pat_str=pattern, mergeable_ranks=mergeable_ranks, special_tokens=special)


def _bytes_to_unicode():
    """GPT-2's reversible map from bytes to printable characters (HF byte-level BPE's alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


def _bpe_split(ranks, token, max_rank):
    """Run BPE on `token` using only merges of rank < max_rank: for a token of rank max_rank
    this ends in exactly the two parts whose merge made it."""
    parts = [bytes([b]) for b in token]
    while True:
        best = None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < max_rank and (best is None or rank < best[1]):
                best = (i, rank)
        if best is None:
            return parts
        i = best[0]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]


def _huggingface_json(enc):
    ranks = enc._mergeable_ranks
    byte_map = _bytes_to_unicode()

    def to_str(b):
        return "".join(byte_map[x] for x in b)

    vocab = {to_str(token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = _bpe_split(ranks, token, rank)
        if len(parts) != 2:
            raise NanochatError("the tokenizer's merges are not a valid BPE; it cannot be exported.")
        merges.append([to_str(parts[0]), to_str(parts[1])])
    added = [
        {"id": i, "content": name, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
        for name, i in sorted(enc._special_tokens.items(), key=lambda kv: kv[1])
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": enc._pat_str}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        ]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }


# -----------------------------------------------------------------------------
# The project's tokenizer


def get_tokenizer_dir():
    return os.path.join(get_base_dir(), "tokenizer")


def get_tokenizer(tokenizer_dir=None):
    return Tokenizer.from_directory(tokenizer_dir or get_tokenizer_dir())


def get_token_bytes(device="cpu", tokenizer_dir=None):
    """The token_bytes.pt written beside the tokenizer (bits-per-byte needs it)."""
    import torch

    path = os.path.join(tokenizer_dir or get_tokenizer_dir(), "token_bytes.pt")
    if not os.path.exists(path):
        raise NanochatError(f"no {path}; train the tokenizer with `python -m scripts.tok_train` first.")
    return torch.load(path, map_location=device, weights_only=True)
