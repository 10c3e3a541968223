"""Synthetic spelling tasks: SpellingBee ("how many r are in strawberry?", answered
by spelling the word out, counting, and checking with the python tool) and SimpleSpelling
("Spell the word: cat" -> "cat:c,a,t"). Small models cannot see letters inside tokens; these
teach them to spell and to count with the tool. Examples are a pure function of the index.

The word list, in this order: `words_path` when given; `spellingbee/words_alpha.txt` in the
task data dir; base_dir/words_alpha.txt when already downloaded; else words_alpha.txt
downloaded from dwyl/english-words into base_dir; when that fails (offline), a stand-in with a
warning that says so: base_dir/words_corpus.txt (the words of your own pretraining text, made by
`python -m nanochat.tasks.spellingbee --words-from-data DIR`), else /usr/share/dict/words if the
system has one. Only lowercase a-z words are kept."""

import os
import random
import re
import string

from nanochat.common import NanochatError, get_base_dir, logger
from nanochat.tasks.common import Task, TaskDataMissing, get_task_data_dir
from nanochat.tasks.gsm8k import grade_final_answer

CORPUS_WORDS = "words_corpus.txt"  # in base_dir: words gathered from the local pretraining shards
WORDS_URL = "https://raw.githubusercontent.com/dwyl/english-words/refs/heads/master/words_alpha.txt"
SYSTEM_WORDS = "/usr/share/dict/words"
TEST_SEED_OFFSET = 10_000_000  # test examples use Random(10_000_000 + index), train Random(index)
WORD_RE = re.compile(r"^[a-z]+$")

# {letter} and {word} are filled in (possibly quoted); 30% of prompts are lowercased and 50% get a "?".
TEMPLATES = [
    "How many {letter} are in the word {word}",
    "How many {letter} are in {word}",
    "How many times does the letter {letter} appear in {word}",
    "How many times does {letter} appear in the word {word}",
    "Count the number of {letter} in {word}",
    "Count how many {letter} there are in the word {word}",
    "How many {letter}s are in {word}",
    "How many {letter}s does {word} have",
    "How many letter {letter} are in the word {word}",
    "In the word {word}, how many {letter} are there",
    "In {word}, how many times does {letter} occur",
    "What is the number of {letter} in {word}",
    "What is the count of the letter {letter} in the word {word}",
    "Tell me how many {letter} are in {word}",
    "Can you count the {letter} in {word}",
    "Please count the letter {letter} in the word {word}",
    "How often does the letter {letter} occur in {word}",
    "Number of {letter} in {word}",
    "How many occurrences of {letter} are in {word}",
    "Find the number of times {letter} appears in {word}",
    "Does {word} contain the letter {letter}, and how many times",
    "If you spell {word}, how many {letter} do you write",
    "How many {letter} would I count in {word}",
    "Count the letter {letter} in {word}",
    "How many {letter} can you find in the word {word}",
    "Give me the count of {letter} in {word}",
    "I want to know how many {letter} are in {word}",
    "Quick question: how many {letter} in {word}",
    "How many {letter} does the word {word} contain",
    "What's the number of {letter} in the word {word}",
    # Spanish
    "¿Cuántas {letter} hay en la palabra {word}",
    "¿Cuántas veces aparece la letra {letter} en {word}",
    "Cuenta las letras {letter} en {word}",
    # French
    "Combien de {letter} y a-t-il dans le mot {word}",
    "Combien de fois la lettre {letter} apparaît-elle dans {word}",
    "Compte les {letter} dans {word}",
    # German
    "Wie viele {letter} sind im Wort {word}",
    "Wie oft kommt der Buchstabe {letter} in {word} vor",
    "Zähle die {letter} in {word}",
    # Chinese
    "单词 {word} 中有几个 {letter}",
    "{word} 这个词里有多少个字母 {letter}",
    "请数一数 {word} 中 {letter} 出现了几次",
    # Japanese
    "{word} という単語には {letter} がいくつありますか",
    "{word} に {letter} は何回出てきますか",
    # Korean
    "{word} 라는 단어에 {letter} 가 몇 개 있나요",
    "{word} 에서 {letter} 는 몇 번 나오나요",
    # Italian and Portuguese
    "Quante {letter} ci sono nella parola {word}",
    "Quantas letras {letter} há na palavra {word}",
]
QUOTES = ["", "'", '"']


def _read_words(path):
    with open(path, encoding="utf-8", errors="ignore") as f:
        words = [w for w in (line.strip() for line in f) if WORD_RE.match(w)]
    if not words:
        raise NanochatError(f"the word list {path} has no lowercase a-z words; give a list with one word per line.")
    return words


def load_words(words_path=None, data_dir=None):
    """The word list (see the module docstring for where it comes from); downloads on first use."""
    from nanochat.common import download_file

    if words_path:
        if not os.path.isfile(words_path):
            raise NanochatError(f"word list {words_path} does not exist; give a file with one word per line.")
        return _read_words(words_path)
    root = get_task_data_dir(data_dir)
    candidates = [os.path.join(root, "spellingbee", "words_alpha.txt")] if root else []
    candidates.append(os.path.join(get_base_dir(), "words_alpha.txt"))
    for path in candidates:
        if os.path.isfile(path):
            return _read_words(path)
    dest = os.path.join(get_base_dir(), "words_alpha.txt")
    try:
        download_file(WORDS_URL, dest, desc="words_alpha.txt", attempts=2)  # offline: fail in seconds
    except NanochatError:
        corpus_words = os.path.join(get_base_dir(), CORPUS_WORDS)
        if os.path.isfile(corpus_words):  # offline only, like the system list below
            logger.warning(f"spelling tasks use the words of the local pretraining text ({corpus_words}): "
                           f"words_alpha.txt could not be downloaded (put it at {candidates[0]} for the standard English word list)")
            return _read_words(corpus_words)
        if os.path.isfile(SYSTEM_WORDS):  # offline only: a different list gives different examples and scores
            logger.warning(f"spelling tasks use the system word list {SYSTEM_WORDS}: words_alpha.txt could not be "
                           f"downloaded (put it at {candidates[0]} for the usual examples and scores)")
            return _read_words(SYSTEM_WORDS)
        raise TaskDataMissing(f"the spelling tasks need a word list and downloading it failed: put words_alpha.txt "
                              f"(from {WORDS_URL}) at {candidates[0]}, or connect to the network.") from None
    return _read_words(dest)


class SpellingBee(Task):
    """Count a letter in a word: spell it out, count by hand, check with python, answer "#### k"."""

    def __init__(self, size=1000, split="train", words_path=None, data_dir=None, **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "test"):
            raise ValueError(f"SpellingBee split must be train or test, not {split!r}")
        self.size, self.split = size, split
        self.words = load_words(words_path, data_dir)

    @property
    def eval_type(self):
        return "generative"

    def num_examples(self):
        return self.size

    def get_example(self, index):
        rng = random.Random(index if self.split == "train" else TEST_SEED_OFFSET + index)
        word = rng.choice(self.words)
        letter = rng.choice(word) if rng.random() < 0.9 else rng.choice(string.ascii_lowercase)
        count = word.count(letter)

        template = rng.choice(TEMPLATES)
        if rng.random() < 0.3:
            template = template.lower()
        letter_quote, word_quote = rng.choice(QUOTES), rng.choice(QUOTES)
        question = template.format(letter=f"{letter_quote}{letter}{letter_quote}", word=f"{word_quote}{word}{word_quote}")
        if rng.random() < 0.5:
            question += "?"

        lines, running = [], 0
        for i, ch in enumerate(word, 1):
            if ch == letter:
                running += 1
                lines.append(f"{i}:{ch} hit! count={running}")
            else:
                lines.append(f"{i}:{ch}")
        manual = (f"We are asked how many times the letter '{letter}' occurs in the word '{word}'. "
                  f"Let me spell the word out and count.\n\n"
                  f"{word}:{','.join(word)}\n\n" + "\n".join(lines) + "\n\n"
                  f"This gives us {count}.\n\nLet me double check with Python:\n\n")
        parts = [
            {"type": "text", "text": manual},
            {"type": "python", "text": f"'{word}'.count('{letter}')"},
            {"type": "python_output", "text": str(count)},
            {"type": "text", "text": f"\n\nPython gives us {count}.\n\nMy final answer is:\n\n#### {count}"},
        ]
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": parts}]}

    def evaluate(self, conversation, response):
        return grade_final_answer(conversation, response)


class SimpleSpelling(Task):
    """"Spell the word: cat" -> "cat:c,a,t" over the word list shuffled with Random(42)."""

    def __init__(self, size=1000, split="train", words_path=None, data_dir=None, **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "test"):
            raise ValueError(f"SimpleSpelling split must be train or test, not {split!r}")
        self.size, self.split = size, split
        self.words = list(load_words(words_path, data_dir))
        random.Random(42).shuffle(self.words)

    @property
    def eval_type(self):
        return "generative"

    def num_examples(self):
        return self.size

    def get_example(self, index):
        rng = random.Random(index if self.split == "train" else TEST_SEED_OFFSET + index)
        word = rng.choice(self.words)
        return {"messages": [{"role": "user", "content": f"Spell the word: {word}"},
                             {"role": "assistant", "content": f"{word}:{','.join(word)}"}]}

    def evaluate(self, conversation, response):
        return int(response.strip() == conversation["messages"][-1]["content"])


def words_from_data(data_dir, out_path, max_words=100_000, min_count=2):
    """Write the lowercase a-z words (3 to 20 letters) that occur at least `min_count` times in
    the parquet shards of `data_dir`, most frequent first, one per line: an offline word list."""
    from collections import Counter

    from nanochat.common import atomic_path
    from nanochat.dataset import list_parquet_files, open_parquet, read_row_group_texts

    counts = Counter()
    for path in list_parquet_files(data_dir):
        pf = open_parquet(path)
        for rg_idx in range(pf.num_row_groups):
            for text in read_row_group_texts(pf, path, rg_idx):
                counts.update(w for w in re.findall(r"\b[a-z]{3,20}\b", text))
    words = [w for w, k in counts.most_common(max_words) if k >= min_count]
    if not words:
        raise NanochatError(f"the shards in {data_dir} hold no repeated lowercase words; give a word list instead.")
    with atomic_path(out_path) as tmp, open(tmp, "w") as f:
        f.write("\n".join(words) + "\n")
    return len(words)


if __name__ == "__main__":
    import argparse

    from nanochat.common import run_main

    def main():
        p = argparse.ArgumentParser(description="Make the offline word list of the spelling tasks from local shards.")
        p.add_argument("--words-from-data", required=True, metavar="DIR", help="folder of parquet shards")
        args = p.parse_args()
        out = os.path.join(get_base_dir(), CORPUS_WORDS)
        print(f"{words_from_data(args.words_from_data, out):,} words from {args.words_from_data} -> {out}")

    run_main(main)
