"""CustomJSON: conversations from a local JSONL file, one JSON array of messages per line in
the chat format (`nanochat.tokenizer.check_conversation`; an optional leading system message is
merged into the first user turn when rendered), e.g. the identity conversations that teach the model who it is.

    [{"role": "user", "content": "who are you?"}, {"role": "assistant", "content": "..."}]

The whole file is validated on load; a bad line is reported as `file:line: what is wrong`."""

import os

from nanochat.common import iter_jsonl
from nanochat.tasks.common import Task, TaskDataMissing
from nanochat.tokenizer import check_conversation

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
        for lineno, messages in iter_jsonl(self.filepath):
            check_conversation(messages, f"{self.filepath}:{lineno}", reply_needed=True)
            self.conversations.append([{"role": m["role"], "content": m["content"]} for m in messages])

    @property
    def eval_type(self):
        return None  # training data only

    def num_examples(self):
        return len(self.conversations)

    def get_example(self, index):
        return {"messages": self.conversations[index]}
