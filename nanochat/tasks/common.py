"""The task framework: `Task` (a sliceable view over a dataset of conversations),
`TaskMixture` (shuffled union, for SFT), `TaskSequence` (concatenation, for curricula),
`render_mc` (the multiple-choice prompt), and where task data lives on disk."""

import math
import operator
import os
import random

from nanochat.common import NanochatError

TASK_DATA_ENV = "NANOCHAT_TASK_DATA_DIR"


class TaskDataMissing(NanochatError):
    """A task's data is neither in the local task data dir nor downloadable (offline). SFT
    catches it to skip one mixture component with a warning; everything else lets it exit."""


def get_task_data_dir(data_dir=None):
    """The local task data dir: `data_dir` when given, else $NANOCHAT_TASK_DATA_DIR, else None
    (no local copies; data comes from the Hugging Face cache or download)."""
    if data_dir:
        return os.path.expanduser(str(data_dir))
    env = os.environ.get(TASK_DATA_ENV)
    return os.path.expanduser(env) if env else None


class Task:
    """A lightweight view `[start:stop:step]` over a dataset of conversations.

    Subclasses implement `eval_type` ('generative' | 'categorical'), `num_examples()`,
    `get_example(index)` -> {"messages": [...], ...} and `evaluate(conversation, response)`;
    `reward` defaults to float(evaluate). `stop` beyond the dataset is clamped to its size."""

    def __init__(self, start=0, stop=None, step=1):
        if start < 0 or (stop is not None and stop < start) or step < 1:
            raise ValueError(f"bad task slice start={start} stop={stop} step={step}")
        self.start, self.stop, self.step = start, stop, step

    @property
    def eval_type(self):
        raise NotImplementedError

    def num_examples(self):
        raise NotImplementedError

    def get_example(self, index):
        raise NotImplementedError

    def evaluate(self, conversation, response):
        raise NotImplementedError

    def reward(self, conversation, response):
        return float(self.evaluate(conversation, response))

    def __len__(self):
        n = self.num_examples()
        stop = n if self.stop is None else min(self.stop, n)
        return max(0, math.ceil((stop - self.start) / self.step))

    def __getitem__(self, i):
        i = operator.index(i)  # ints and numpy integers; slices and floats raise TypeError
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for a task of {n} examples")
        return self.get_example(self.start + i * self.step)

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]


class TaskMixture(Task):
    """Every example of every task, shuffled once with random.Random(42). Passing a task
    twice includes each of its examples twice (oversampling)."""

    def __init__(self, tasks, **kwargs):
        super().__init__(**kwargs)
        self.tasks = list(tasks)
        self.index_map = [(t, i) for t, task in enumerate(self.tasks) for i in range(len(task))]
        random.Random(42).shuffle(self.index_map)

    def num_examples(self):
        return len(self.index_map)

    def get_example(self, index):
        t, i = self.index_map[index]
        return self.tasks[t][i]


class TaskSequence(Task):
    """The tasks one after another, unshuffled (a curriculum)."""

    def __init__(self, tasks, **kwargs):
        super().__init__(**kwargs)
        self.tasks = list(tasks)
        self.lengths = [len(task) for task in self.tasks]

    def num_examples(self):
        return sum(self.lengths)

    def get_example(self, index):
        for task, n in zip(self.tasks, self.lengths):
            if index < n:
                return task[index]
            index -= n
        raise IndexError(f"index out of range for a sequence of {self.num_examples()} examples")


def render_mc(question, letters, choices):
    """The multiple-choice prompt. Each choice is followed by "=" and its letter with no space:
    the model answers with the bare letter token (no leading space), which then matches the
    token it saw in the prompt."""
    if len(letters) != len(choices):
        raise ValueError(f"{len(letters)} letters for {len(choices)} choices")
    lines = [f"Multiple Choice question: {question}\n"]
    lines += [f"- {choice}={letter}\n" for letter, choice in zip(letters, choices)]
    lines.append("\nRespond only with the letter of the correct answer.")
    return "".join(lines)


def last_text(content):
    """The text of an assistant message's final part (or the message itself when a string)."""
    if isinstance(content, str):
        return content
    return content[-1]["text"]
