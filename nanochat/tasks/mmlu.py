"""MMLU: multiple choice over 57 subjects. Categorical; letters A-D.
Subset "all" has splits auxiliary_train / validation / dev / test; subset "auxiliary_train"
(split "train") is the same auxiliary set with each row nested under a "train" column."""

from nanochat.tasks.common import Task, render_mc
from nanochat.tasks.hub import load_task_rows

LETTERS = ("A", "B", "C", "D")
SPLITS = {"all": ("auxiliary_train", "validation", "dev", "test"), "auxiliary_train": ("train",)}


class MMLU(Task):
    letters = LETTERS

    def __init__(self, subset, split, data_dir=None, **kwargs):
        super().__init__(**kwargs)
        if subset not in SPLITS or split not in SPLITS[subset]:
            raise ValueError(f"MMLU has subsets/splits {SPLITS}, not {subset!r}/{split!r}")
        self.subset, self.split = subset, split
        self.ds = load_task_rows(f"MMLU {subset}", [f"mmlu/{subset}/{split}"], "cais/mmlu", subset, split,
                                 data_dir).shuffle(42)

    @property
    def eval_type(self):
        return "categorical"

    def num_examples(self):
        return len(self.ds)

    def get_example(self, index):
        row = self.ds[index]
        if "question" not in row and isinstance(row.get("train"), dict):
            row = row["train"]  # the hub's auxiliary_train subset nests each row
        choices, answer = row["choices"], int(row["answer"])
        if len(choices) != len(LETTERS) or not 0 <= answer < len(LETTERS):
            raise ValueError(f"MMLU row {index} has {len(choices)} choices and answer {answer}; expected 4 and 0-3")
        return {
            "messages": [
                {"role": "user", "content": render_mc(row["question"], LETTERS, choices)},
                {"role": "assistant", "content": LETTERS[answer]},
            ],
            "subject": row.get("subject", ""),
            "letters": list(LETTERS),
        }

    def evaluate(self, conversation, response):
        if response not in LETTERS:
            raise ValueError(f"MMLU answer {response!r} is not one of {LETTERS}")
        return int(response == conversation["messages"][-1]["content"])
