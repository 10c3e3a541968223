"""HumanEval: 164 Python functions to complete, graded by running their unit tests in the
sandbox (SPEC §8.2, §10.4). Generative."""

import re
import secrets

from nanochat.common import logger
from nanochat.tasks.common import Task
from nanochat.tasks.hub import load_task_rows

CODE_BLOCK_RE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)  # nothing but the tag after an opening fence


def extract_imports(prompt):
    """The import lines at the top of a prompt (before its first other code line): the test
    program needs them when the completion is only the function."""
    imports = []
    for line in prompt.split("\n"):
        stripped = line.strip()
        if stripped.startswith(("import ", "from ")):
            imports.append(stripped)
        elif stripped and not stripped.startswith("#"):
            break
    return "\n".join(imports)


def extract_program(completion):
    """The code of a completion: its first fenced ```python (or bare ```) block, else the whole
    completion; stripped."""
    match = CODE_BLOCK_RE.search(completion)
    code = match.group(1) if match else completion
    return code.strip()


def build_program(conversation, completion, done_marker=None):
    """imports + completion code + the unit tests + `check(entry_point)` (SPEC §8.2), then, when
    given, a line printing `done_marker`."""
    prompt = conversation["messages"][0]["content"]
    program = (extract_imports(prompt) + "\n\n" + extract_program(completion) + "\n\n"
               + conversation["test"] + "\n" + f"check({conversation['entry_point']})\n")
    if done_marker is not None:
        program += f"print({done_marker!r})\n"
    return program


class HumanEval(Task):

    def __init__(self, data_dir=None, timeout=5.0, **kwargs):
        super().__init__(**kwargs)
        self.timeout = timeout
        stems = ["humaneval/HumanEval", "humaneval/test"]
        self.ds = load_task_rows("HumanEval", stems, "openai/openai_humaneval", "openai_humaneval", "test",
                                 data_dir).shuffle(42)

    @property
    def eval_type(self):
        return "generative"

    def num_examples(self):
        return len(self.ds)

    def get_example(self, index):
        row = self.ds[index]
        return {
            "messages": [
                {"role": "user", "content": row["prompt"]},
                {"role": "assistant", "content": f"{row['prompt']}\n{row['canonical_solution']}"},
            ],
            "task_id": row.get("task_id", ""),
            "entry_point": row["entry_point"],
            "test": row["test"],
        }

    def evaluate(self, conversation, response):
        """1 when the completion's program passes the problem's tests in the sandbox. A crash,
        hang or memory blow-up of the program is just a failure."""
        from nanochat.execution import execute_code

        # A program that exits early with status 0 (sys.exit(0), os._exit(0)) never ran the tests:
        # it passes only if the random marker printed after check() shows up in its output.
        marker = f"humaneval-done-{secrets.token_hex(8)}"
        program = build_program(conversation, response, done_marker=marker)
        try:
            result = execute_code(program, timeout=self.timeout)
        except Exception as e:  # the sandbox itself failed (e.g. out of processes): count a failure, go on
            logger.warning(f"HumanEval {conversation.get('task_id', '')}: the sandbox failed ({type(e).__name__}: {e})")
            return 0
        return int(bool(result.success) and marker in (result.stdout or ""))
