"""CustomJSON: conversations from a local JSONL file, one JSON array of messages per line
(SPEC §8.2): at least two, alternating user/assistant (an optional leading system message is
merged into the first user turn when rendered), e.g. the identity conversations that teach the model who it is.

    [{"role": "user", "content": "who are you?"}, {"role": "assistant", "content": "..."}]

The whole file is validated on load; a bad line is reported as `file:line: what is wrong`."""

import json
import os

from nanochat.common import NanochatError
from nanochat.tasks.common import Task, TaskDataMissing
from nanochat.tasks.smoltalk import check_messages

IDENTITY_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/identity_conversations.jsonl"


class CustomJSON(Task):

    def __init__(self, filepath, **kwargs):
        super().__init__(**kwargs)
        self.filepath = os.path.expanduser(str(filepath))
        if not os.path.isfile(self.filepath):
            raise TaskDataMissing(f"CustomJSON file {self.filepath} does not exist; create it (one JSON array of "
                                  f"messages per line) or, for the identity conversations, "
                                  f"`curl -L -o {self.filepath} {IDENTITY_URL}`.")
        self.conversations = []
        with open(self.filepath, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{self.filepath}:{lineno}"
                try:
                    messages = json.loads(line)
                except json.JSONDecodeError as e:
                    raise NanochatError(f"{where}: not valid JSON ({e.msg} at column {e.colno}).") from None
                if not isinstance(messages, list):
                    raise NanochatError(f"{where}: expected a JSON array of messages, found a "
                                        f"{type(messages).__name__}.")
                error = check_messages(messages, where)
                if error:
                    raise NanochatError(error + ".")
                self.conversations.append([{"role": m["role"], "content": m["content"]} for m in messages])

    @property
    def eval_type(self):
        return None  # training data only

    def num_examples(self):
        return len(self.conversations)

    def get_example(self, index):
        return {"messages": self.conversations[index]}
