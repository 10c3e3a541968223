"""Compression ratio (UTF-8 bytes per token) of our tokenizer on a few kinds of text, next to
GPT-2's and GPT-4's when tiktoken can load them.

    python -m scripts.tok_eval [--tokenizer-dir DIR] [--data-dir SHARDS]
"""

import argparse
import json

from nanochat.common import print0, run_main
from nanochat.report import get_report
from nanochat.tokenizer import Tokenizer, get_tokenizer

NEWS = """The city council voted on Tuesday to expand the bicycle lane network along the river, a
decision that supporters say will ease traffic and critics warn could hurt small businesses
that rely on street parking. The plan, which will cost an estimated $4.2 million over three
years, passed by a vote of 7 to 2 after a four-hour public hearing. "We heard every side of
this," the council president said afterwards. Construction is expected to begin next spring."""

KOREAN = """한국의 전통 음식은 지역마다 다양한 특색을 가지고 있습니다. 김치는 배추와 무를 소금에
절인 뒤 고춧가루, 마늘, 생강 등의 양념으로 버무려 발효시킨 음식으로, 계절과 지역에 따라
수백 가지의 종류가 있습니다. 겨울이 오기 전 가족과 이웃이 함께 모여 김치를 담그는 풍습을
김장이라고 부르며, 이는 유네스코 인류무형문화유산으로 등재되었습니다."""

CODE = '''class LRUCache:
    """A least-recently-used cache with a fixed capacity."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.items = {}

    def get(self, key):
        if key not in self.items:
            return None
        value = self.items.pop(key)
        self.items[key] = value  # move to the end: most recently used
        return value

    def put(self, key, value):
        self.items.pop(key, None)
        if len(self.items) >= self.capacity:
            self.items.pop(next(iter(self.items)))
        self.items[key] = value
'''

MATH = r"""\begin{theorem}[Cauchy--Schwarz]
For all vectors $u, v$ in an inner product space $V$,
\[ |\langle u, v \rangle|^2 \le \langle u, u \rangle \cdot \langle v, v \rangle . \]
\end{theorem}
\begin{proof}
If $v = 0$ both sides vanish. Otherwise let $\lambda = \langle u, v \rangle / \langle v, v \rangle$ and
expand $0 \le \| u - \lambda v \|^2 = \|u\|^2 - \frac{|\langle u, v\rangle|^2}{\|v\|^2}$.
\end{proof}"""

SCIENCE = """Photosynthesis converts light energy into chemical energy stored in glucose. In the light
reactions, chlorophyll in the thylakoid membranes absorbs photons at wavelengths near 430 nm and
662 nm, splitting water (2H2O -> 4H+ + 4e- + O2) and producing ATP and NADPH. The Calvin cycle
then fixes CO2 using the enzyme RuBisCO, which is thought to be the most abundant protein on Earth."""


def shard_samples(data_dir):
    """The first train row group and the first val row group, joined with newlines."""
    from nanochat.dataset import parquets_iter_batched

    out = {}
    for split in ("train", "val"):
        out[f"shards-{split}"] = "\n".join(next(iter(parquets_iter_batched(split, data_dir=data_dir))))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer-dir", default=None, help="default: base_dir/tokenizer")
    parser.add_argument("--data-dir", default=None, help="parquet shards for the train/val samples (default: the pretraining data)")
    args = parser.parse_args()

    ours = get_tokenizer(args.tokenizer_dir)
    texts = {"news": NEWS, "korean": KOREAN, "code": CODE, "math": MATH, "science": SCIENCE}
    try:
        texts.update(shard_samples(args.data_dir))
    except Exception as e:  # no shards yet: the fixed samples still say a lot
        print0(f"note: no pretraining shards to sample ({e}); showing the fixed texts only")

    tokenizers = {"ours": ours}
    for label, name in (("gpt2", "gpt2"), ("gpt4", "cl100k_base")):
        try:
            tokenizers[label] = Tokenizer.from_pretrained(name)
        except Exception as e:  # tiktoken downloads these on first use
            print0(f"note: {label} ({name}) could not be loaded ({type(e).__name__}); its column is left out")

    results = {}
    for label, tok in tokenizers.items():
        results[label] = {}
        for name, text in texts.items():
            ids = tok.encode(text)
            if tok.decode(ids) != text:
                raise AssertionError(f"{label} does not round-trip the {name} text")
            results[label][name] = (len(text.encode("utf-8")), len(ids))

    print0("\nvocab sizes: " + ", ".join(f"{k} {t.get_vocab_size():,}" for k, t in tokenizers.items()))
    header = f"{'text':14s} {'bytes':>9s}" + "".join(f" {k + ' tok':>10s} {k + ' b/t':>9s}" for k in tokenizers)
    others = [k for k in tokenizers if k != "ours"]
    header += "".join(f" {'vs ' + k:>9s}" for k in others)
    print0(header)
    for name in texts:
        nbytes = results["ours"][name][0]
        line = f"{name:14s} {nbytes:9,d}"
        for k in tokenizers:
            n = results[k][name][1]
            line += f" {n:10,d} {nbytes / n:9.2f}"
        for k in others:
            base = results[k][name][1]
            line += f" {100 * (base - results['ours'][name][1]) / base:+8.1f}%"
        print0(line)
    print0("(vs X: how many fewer tokens ours needs than X; positive is better)")
    ratios = {k: {n: round(b / t, 4) for n, (b, t) in v.items()} for k, v in results.items()}
    get_report().log(section="Tokenizer evaluation", data=[
        f"Bytes per token on each text (higher is better):\n\n| text | {' | '.join(tokenizers)} |\n"
        f"|---|{'---|' * len(tokenizers)}\n"
        + "".join(f"| {name} | {' | '.join(f'{ratios[k][name]:.2f}' for k in tokenizers)} |\n" for name in texts)])
    print0(json.dumps({"tok_eval": ratios}))


if __name__ == "__main__":
    run_main(main)
