"""ARC (AI2 Reasoning Challenge), Easy and Challenge: grade-school science multiple choice.
Categorical: the model answers with one letter."""

from nanochat.tasks.common import Task, render_mc
from nanochat.tasks.hub import load_task_rows

SUBSETS = ("ARC-Easy", "ARC-Challenge")
SPLITS = ("train", "validation", "test")


class ARC(Task):

    def __init__(self, subset, split, data_dir=None, **kwargs):
        super().__init__(**kwargs)
        if subset not in SUBSETS:
            raise ValueError(f"ARC subset must be one of {SUBSETS}, not {subset!r}")
        if split not in SPLITS:
            raise ValueError(f"ARC split must be one of {SPLITS}, not {split!r}")
        self.subset, self.split = subset, split
        self.ds = load_task_rows(subset, [f"arc/{subset}/{split}"], "allenai/ai2_arc", subset, split,
                                 data_dir).shuffle(42)

    @property
    def eval_type(self):
        return "categorical"

    def num_examples(self):
        return len(self.ds)

    def get_example(self, index):
        row = self.ds[index]
        labels, texts = row["choices"]["label"], row["choices"]["text"]
        answer = row["answerKey"]
        if answer not in labels:
            raise ValueError(f"ARC row {row.get('id')}: answer {answer!r} is not among the labels {labels}")
        return {
            "messages": [
                {"role": "user", "content": render_mc(row["question"], labels, texts)},
                {"role": "assistant", "content": answer},
            ],
            "letters": list(labels),
        }

    def evaluate(self, conversation, response):
        if response not in conversation["letters"]:
            raise ValueError(f"ARC answer {response!r} is not one of the letters {conversation['letters']}")
        return int(response == conversation["messages"][-1]["content"])
