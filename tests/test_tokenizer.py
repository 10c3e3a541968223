"""Tokenizer: training, round trips, specials, token_bytes, save/load, pickles written by other
nanochat checkouts, Hugging Face export, the chat format and its rendering masks."""

import os
import pickle

import pytest
import regex
import tiktoken
import torch

from nanochat.common import NanochatError
from nanochat.tokenizer import (
    CONTROL_TOKENS,
    MIN_VOCAB_SIZE,
    SPLIT_PATTERN,
    ConversationError,
    Tokenizer,
    check_conversation,
)

SHARED_TEXT = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "text")

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "In 1984, 12345 people paid $67.89 each; by 2024 that was 3141592653 in total.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
    "Bonjour le monde, ça va très bien. Übermäßig schöne Grüße aus Köln!",
    "안녕하세요 세계. 日本語のテキストです。 Привет, мир! 🎉🚀 emoji time 😀",
    "It's what they'd've wanted, isn't it? We'll see; you're right, I'm sure.",
] * 20


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train_from_iterator(iter(CORPUS), vocab_size=512)


ROUND_TRIPS = [
    "hello world",
    "",
    " leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n\n\nmany",
    "Ünïcödé façade naïve",
    "中文字符和日本語と한국어",
    "emoji 🎉👩‍👩‍👧‍👦🏳️‍🌈 and flags",
    "12345678901234567890 and 3.14159 and -42",
    "\x00\x01 control \x7f bytes",
    "a" * 1000,
    "<|bos|><|user_start|>not special<|assistant_end|>",
]


@pytest.mark.parametrize("text", ROUND_TRIPS)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    # concatenating the raw bytes of each token rebuilds the text, even where a token
    # is a fragment of a multi-byte character that is not valid UTF-8 on its own
    assert b"".join(tok.decode_single_token_bytes(i) for i in ids) == text.encode("utf-8")


def test_partial_utf8_tokens_round_trip(tok):
    # a byte-level vocabulary has tokens for single bytes >= 0x80, which are not UTF-8 alone
    ids = tok.encode("é€😀")
    raw = [tok.decode_single_token_bytes(i) for i in ids]
    assert any(len(r) == 1 and r[0] >= 0x80 for r in raw) or len(ids) <= 3
    assert tok.decode(ids) == "é€😀"


def test_vocab_and_special_ids(tok):
    assert tok.get_vocab_size() == 512
    ids = [tok.encode_special(s) for s in CONTROL_TOKENS]
    assert ids == list(range(512 - 9, 512))  # the last 9, in order
    assert tok.get_bos_token_id() == 512 - 9
    assert tok.get_special_tokens() == set(CONTROL_TOKENS)


def test_default_vocab_layout_at_32768():
    # at 32768 the mergeable ranks end at 32758 and bos is 32759 (the specials come last)
    ranks = {bytes([i]): i for i in range(256)}
    # synthesise merges so the layout arithmetic can be checked without a long training run
    for r in range(256, 32768 - 9):
        ranks[b"\xff" + r.to_bytes(2, "big")] = r  # distinct byte strings, never hit by encoding
    from nanochat.tokenizer import _make_encoding
    t = Tokenizer(_make_encoding(ranks))
    assert t.get_vocab_size() == 32768
    assert t.get_bos_token_id() == 32759 and t.encode_special("<|output_end|>") == 32767


def test_special_strings_in_text_are_plain_text(tok):
    text = "<|bos|> and <|assistant_end|>"
    ids = tok.encode(text)
    specials = {tok.encode_special(s) for s in CONTROL_TOKENS}
    assert not specials & set(ids)
    assert len(ids) > 2
    assert tok.encode([text])[0] == ids


def test_prepend_append_and_batch(tok):
    bos = tok.get_bos_token_id()
    end = tok.encode_special("<|assistant_end|>")
    assert tok.encode("hi there", prepend=bos, append="<|assistant_end|>") == [bos, *tok.encode("hi there"), end]
    assert tok.encode("x", prepend="<|bos|>")[0] == bos
    texts = ["one", "two three", "", "émoji 🎉"]
    assert tok.encode(texts, prepend=bos) == [[bos] + tok.encode(t) for t in texts]
    assert tok(texts) == [tok.encode(t) for t in texts]


def test_digits_split_in_runs_of_at_most_two(tok):
    # the split pattern used to train is the one used to encode
    assert tok.enc._pat_str == SPLIT_PATTERN
    digit_runs = [b for b in (tok.decode_single_token_bytes(i) for i in range(256, 512 - 9)) if b.isdigit()]
    assert digit_runs, "the corpus is full of numbers: some digit pairs must have been merged"
    assert max(len(b) for b in digit_runs) == 2
    for i in tok.encode("1234567 99999"):
        piece = tok.decode_single_token_bytes(i)
        assert not (piece.isdigit() and len(piece) > 2)
    # the pattern itself: 1-2 digit runs
    assert regex.findall(SPLIT_PATTERN, "12345") == ["12", "34", "5"]


def test_training_respects_digit_pattern_with_number_heavy_corpus():
    numbers = [" ".join(str(i * 7919) for i in range(j, j + 200)) for j in range(0, 4000, 200)]
    t = Tokenizer.train_from_iterator(iter(numbers), vocab_size=340)
    learned = [t.decode_single_token_bytes(i) for i in range(256, 340 - 9)]
    with_digits = [b for b in learned if any(chr(c).isdigit() for c in b)]
    assert len(with_digits) > 50
    # the pattern isolates digits in runs of 1-2 (no leading space), so every learned token
    # with a digit is a pure run of exactly two digits
    assert all(b.isdigit() and len(b) == 2 for b in with_digits)


def test_token_bytes(tok, tmp_path):
    tb = tok.token_bytes()
    assert tb.dtype == torch.int32 and tb.shape == (512,)
    specials = {tok.encode_special(s) for s in CONTROL_TOKENS}
    for i in range(512):
        expected = 0 if i in specials else len(tok.decode_single_token_bytes(i))
        assert tb[i].item() == expected
    # single high bytes are 1 byte, not the 3 bytes of the U+FFFD their decoding gives
    assert tb[0xE9].item() == 1
    tok.save(str(tmp_path))
    from nanochat.tokenizer import get_token_bytes
    assert torch.equal(get_token_bytes(tokenizer_dir=str(tmp_path)), tb)


def test_save_load_round_trip(tok, tmp_path):
    tok.save(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["token_bytes.pt", "tokenizer.pkl"]  # no temp files left
    loaded = Tokenizer.from_directory(str(tmp_path))
    for text in ROUND_TRIPS:
        assert loaded.encode(text) == tok.encode(text)
    assert loaded.get_bos_token_id() == tok.get_bos_token_id()


def test_loads_another_checkouts_pickle(tmp_path):
    # other nanochat checkouts pickle a tiktoken.Encoding named "rustbpe" built from rustbpe's ranks
    import rustbpe
    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(iter(CORPUS), 300 - 9, pattern=SPLIT_PATTERN)
    ranks = {bytes(k): v for k, v in trainer.get_mergeable_ranks()}
    special = {name: len(ranks) + i for i, name in enumerate(CONTROL_TOKENS)}
    enc = tiktoken.Encoding(name="rustbpe", pat_str=trainer.get_pattern(), mergeable_ranks=ranks, special_tokens=special)
    with open(tmp_path / "tokenizer.pkl", "wb") as f:
        pickle.dump(enc, f)
    tok = Tokenizer.from_directory(str(tmp_path))
    for text in ROUND_TRIPS:
        assert tok.encode(text) == enc.encode_ordinary(text)
        assert tok.decode(tok.encode(text)) == text
    assert tok.get_bos_token_id() == 291
    assert tok.render_conversation({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})


def test_missing_and_corrupt_tokenizer(tmp_path):
    with pytest.raises(NanochatError, match="no tokenizer"):
        Tokenizer.from_directory(str(tmp_path / "nope"))
    (tmp_path / "tokenizer.pkl").write_bytes(b"definitely not a pickle")
    with pytest.raises(NanochatError, match="not a readable tokenizer pickle"):
        Tokenizer.from_directory(str(tmp_path))
    # a pickle that would run code when loaded is refused
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    (tmp_path / "tokenizer.pkl").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(NanochatError, match="refusing to unpickle"):
        Tokenizer.from_directory(str(tmp_path))


def test_bad_training_input():
    with pytest.raises(NanochatError, match="at least 265"):
        Tokenizer.train_from_iterator(iter(CORPUS), vocab_size=MIN_VOCAB_SIZE - 1)
    with pytest.raises(NanochatError, match="empty"):
        Tokenizer.train_from_iterator(iter([]), vocab_size=300)
    with pytest.raises(NanochatError, match="only supports"):
        Tokenizer.train_from_iterator(iter(["abc abc"]), vocab_size=1000)


def _hf_matches(tok, path, text):
    from tokenizers import Tokenizer as HFTokenizer
    tok.to_huggingface_json(str(path))
    hf = HFTokenizer.from_file(str(path))
    assert hf.encode(text).ids == tok.encode(text)
    assert hf.decode(tok.encode(text)) == text
    for name in CONTROL_TOKENS:
        assert hf.token_to_id(name) == tok.encode_special(name)
        assert hf.encode(name).ids == [tok.encode_special(name)]


def test_huggingface_export_encodes_identically(tok, tmp_path):
    _hf_matches(tok, tmp_path / "tokenizer.json", "\n".join(ROUND_TRIPS[:-1] + CORPUS[:6]))


@pytest.mark.skipif(not os.path.isdir(SHARED_TEXT), reason="../shared/data/text is absent")
def test_huggingface_export_on_real_text(tmp_path):
    with open(os.path.join(SHARED_TEXT, "wikitext2_valid.txt"), encoding="utf-8") as f:
        text = f.read()
    docs = [text[i:i + 4000] for i in range(0, len(text), 4000)]
    tok = Tokenizer.train_from_iterator(iter(docs), vocab_size=2048)
    with open(os.path.join(SHARED_TEXT, "tinyshakespeare.txt"), encoding="utf-8") as f:
        sample = f.read()[:300_000]
    _hf_matches(tok, tmp_path / "tokenizer.json", sample)


# ---------------------------------------------------------------------------------------
# The chat format and its rendering


def test_conversation_mask_token_by_token(tok):
    s = tok.encode_special
    conv = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me check."},
            {"type": "python", "text": "2+2"},
            {"type": "python_output", "text": "4"},
            {"type": "text", "text": "It is 4."},
        ]},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You're welcome."},
    ]}
    ids, mask = tok.render_conversation(conv)
    e = tok.encode
    expected = [
        (s("<|bos|>"), 0), (s("<|user_start|>"), 0), *[(t, 0) for t in e("Be brief.\n\nWhat is 2+2?")], (s("<|user_end|>"), 0),
        (s("<|assistant_start|>"), 0), *[(t, 1) for t in e("Let me check.")],
        (s("<|python_start|>"), 1), *[(t, 1) for t in e("2+2")], (s("<|python_end|>"), 1),
        (s("<|output_start|>"), 0), *[(t, 0) for t in e("4")], (s("<|output_end|>"), 0),
        *[(t, 1) for t in e("It is 4.")], (s("<|assistant_end|>"), 1),
        (s("<|user_start|>"), 0), *[(t, 0) for t in e("Thanks")], (s("<|user_end|>"), 0),
        (s("<|assistant_start|>"), 0), *[(t, 1) for t in e("You're welcome.")], (s("<|assistant_end|>"), 1),
    ]
    assert ids == [t for t, _ in expected]
    assert mask == [m for _, m in expected]


def test_system_merge_equivalent_to_manual_merge(tok):
    with_system = {"messages": [{"role": "system", "content": "SYS"}, {"role": "user", "content": "U"},
                                {"role": "assistant", "content": "A"}]}
    merged = {"messages": [{"role": "user", "content": "SYS\n\nU"}, {"role": "assistant", "content": "A"}]}
    assert tok.render_conversation(with_system) == tok.render_conversation(merged)
    assert with_system["messages"][0]["role"] == "system"  # the input is not modified


def test_bad_conversations(tok):
    with pytest.raises(ValueError, match="alternate"):
        tok.render_conversation({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]})
    with pytest.raises(ValueError, match="unknown assistant content part"):
        tok.render_conversation({"messages": [{"role": "user", "content": "a"},
                                              {"role": "assistant", "content": [{"type": "image", "text": "x"}]}]})
    with pytest.raises(ValueError, match="followed by a user"):
        tok.render_conversation({"messages": [{"role": "system", "content": "a"}, {"role": "assistant", "content": "b"}]})


def test_check_conversation():
    ok = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
          {"role": "assistant", "content": [{"type": "python", "text": "1+1"}, {"type": "python_output", "text": "2"}]}]
    check_conversation(ok, reply_needed=True)
    check_conversation(ok[:2])  # a prompt needs no reply
    with pytest.raises(ConversationError, match=r"^f\.jsonl:7: a conversation needs at least a user and an assistant"):
        check_conversation(ok[:2], "f.jsonl:7", reply_needed=True)
    with pytest.raises(ConversationError, match=r"^message 1 \(user\) must have string content\.$"):
        check_conversation([ok[0], {"role": "user", "content": 5}])
    with pytest.raises(ConversationError, match=r"^expected a JSON array of messages, found a dict\.$"):
        check_conversation({"messages": ok})
    with pytest.raises(ConversationError, match="must be an object with"):
        check_conversation([{"role": "user"}])
    assert issubclass(ConversationError, NanochatError) and issubclass(ConversationError, ValueError)


def test_truncation(tok):
    conv = {"messages": [{"role": "user", "content": "word " * 500}, {"role": "assistant", "content": "ok " * 500}]}
    ids, mask = tok.render_conversation(conv, max_tokens=100)
    assert len(ids) == len(mask) == 100
    full_ids, _ = tok.render_conversation(conv, max_tokens=10**6)
    assert ids == full_ids[:100]


def test_render_for_completion(tok):
    conv = {"messages": [{"role": "user", "content": "Question?"}, {"role": "assistant", "content": "Secret answer"}]}
    ids = tok.render_for_completion(conv)
    assert ids[-1] == tok.encode_special("<|assistant_start|>")
    assert "Secret" not in tok.decode(ids)
    full, _ = tok.render_conversation(conv)
    assert full[:len(ids)] == ids
    assert len(conv["messages"]) == 2  # not modified
    with pytest.raises(ValueError):
        tok.render_for_completion({"messages": [{"role": "user", "content": "q"}]})
