"""SmolTalk (HuggingFaceTB/smol-smoltalk): general chat conversations for SFT (SPEC §8.2).
No evaluation; conversations are used as they are."""

from nanochat.tasks.common import Task
from nanochat.tasks.hub import load_task_rows

SPLITS = ("train", "test")


def check_messages(messages, where):
    """A conversation's messages: an optional leading system message, then at least two
    messages alternating user, assistant, ... with string contents. Returns an error string
    (naming `where`) or None."""
    if not isinstance(messages, list):
        return f"{where}: messages must be a list, not {type(messages).__name__}"
    body = messages[1:] if messages and isinstance(messages[0], dict) and messages[0].get("role") == "system" else messages
    if len(body) < 2:
        return f"{where}: a conversation needs at least 2 user/assistant messages, found {len(body)}"
    for i, message in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if not isinstance(message, dict) or message.get("role") != expected:
            got = message.get("role") if isinstance(message, dict) else type(message).__name__
            return f"{where}: message {i + 1} should have role {expected!r}, found {got!r}"
        if not isinstance(message.get("content"), str):
            return f"{where}: message {i + 1} has no string content"
    return None


class SmolTalk(Task):

    def __init__(self, split="train", data_dir=None, **kwargs):
        super().__init__(**kwargs)
        if split not in SPLITS:
            raise ValueError(f"SmolTalk split must be one of {SPLITS}, not {split!r}")
        self.split = split
        self.ds = load_task_rows("SmolTalk", [f"smoltalk/{split}"], "HuggingFaceTB/smol-smoltalk", "default", split,
                                 data_dir).shuffle(42)

    @property
    def eval_type(self):
        return None  # training data only

    def num_examples(self):
        return len(self.ds)

    def get_example(self, index):
        messages = self.ds[index]["messages"]
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        error = check_messages(messages, f"SmolTalk {self.split} row {index}")
        if error:
            raise ValueError(error)
        return {"messages": messages}
