"""GSM8K: grade-school math word problems. Generative; the reference solutions'
calculator annotations `<<48/2=24>>` become python tool calls, so SFT teaches the model to use
the calculator, and answers are graded on the final "#### <number>"."""

import re

from nanochat.tasks.common import Task, last_text
from nanochat.tasks.hub import load_task_rows

SUBSETS = ("main", "socratic")
SPLITS = ("train", "test")
ANSWER_RE = re.compile(r"#### (\-?[0-9\.\,]+)")
TOOL_RE = re.compile(r"(<<[^>]*>>)")


def extract_answer(text):
    """The number after "#### " (commas removed), or None when there is none."""
    match = ANSWER_RE.search(text)
    if match is None:
        return None
    return match.group(1).strip().replace(",", "")


def grade_final_answer(conversation, response):
    """1 when the response's "#### N" equals the one ending the reference answer, else 0."""
    reference = extract_answer(last_text(conversation["messages"][-1]["content"]))
    predicted = extract_answer(response)
    return int(predicted is not None and predicted == reference)


def solution_to_parts(solution):
    """Assistant content parts of a reference solution: each <<expr=result>> becomes a python
    call `expr` and its output `result` (split at the LAST "=", so "a==b=True" keeps its "==";
    no "=" gives an empty output); the text around them becomes text parts."""
    parts = []
    for piece in TOOL_RE.split(solution):
        if not piece:
            continue
        if piece.startswith("<<") and piece.endswith(">>"):
            inner = piece[2:-2]
            expr, _, result = inner.rpartition("=") if "=" in inner else (inner, "", "")
            parts.append({"type": "python", "text": expr})
            parts.append({"type": "python_output", "text": result})
        else:
            parts.append({"type": "text", "text": piece})
    return parts


class GSM8K(Task):

    def __init__(self, subset="main", split="test", data_dir=None, **kwargs):
        super().__init__(**kwargs)
        if subset not in SUBSETS:
            raise ValueError(f"GSM8K subset must be one of {SUBSETS}, not {subset!r}")
        if split not in SPLITS:
            raise ValueError(f"GSM8K split must be one of {SPLITS}, not {split!r}")
        self.subset, self.split = subset, split
        stems = [f"gsm8k/{split}", f"gsm8k/main/{split}"] if subset == "main" else [f"gsm8k/{subset}/{split}"]
        self.ds = load_task_rows("GSM8K", stems, "openai/gsm8k", subset, split, data_dir).shuffle(42)

    @property
    def eval_type(self):
        return "generative"

    def num_examples(self):
        return len(self.ds)

    def get_example(self, index):
        row = self.ds[index]
        return {
            "messages": [
                {"role": "user", "content": row["question"]},
                {"role": "assistant", "content": solution_to_parts(row["answer"])},
            ]
        }

    def evaluate(self, conversation, response):
        """1 when the response's "#### N" equals the reference's, else 0."""
        if not isinstance(response, str):
            raise TypeError("GSM8K.evaluate takes the response text")
        return grade_final_answer(conversation, response)
