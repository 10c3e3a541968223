"""SmolTalk (HuggingFaceTB/smol-smoltalk): general chat conversations for SFT.
No evaluation; conversations are used as they are."""

from nanochat.tasks.common import Task
from nanochat.tasks.hub import load_task_rows
from nanochat.tokenizer import check_conversation

SPLITS = ("train", "test")


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
        check_conversation(messages, f"SmolTalk {self.split} row {index}", reply_needed=True)
        return {"messages": messages}
