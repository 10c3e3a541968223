"""HumanEval: 164 Python functions to complete, graded by running their unit tests against the
completion's function in the sandbox (execution.check_function). Generative."""

import re

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


def build_program(conversation, completion):
    """The untrusted program: the prompt's imports + the completion's code. The tests are not in
    it: they run in a separate trusted process (HumanEval.evaluate)."""
    prompt = conversation["messages"][0]["content"]
    return extract_imports(prompt) + "\n\n" + extract_program(completion) + "\n"


def build_check(conversation):
    """The trusted side: the prompt (for helpers the tests use, like `poly`) + the unit tests,
    which define check(candidate)."""
    return conversation["messages"][0]["content"] + "\n\n" + conversation["test"] + "\n"


class HumanEval(Task):
    executes_code = True  # its grading runs model code: scripts check the sandbox before starting

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
        """1 when the completion's function passes the problem's tests. The tests run in a trusted
        process that calls the function in the sandbox and sees only its return values as plain
        data, so nothing the program prints, patches, exits with or kills can make it pass."""
        from nanochat.execution import check_function

        result = check_function(build_program(conversation, response), conversation["entry_point"],
                                build_check(conversation), timeout=self.timeout)
        if (result.execution.error or "").startswith("sandbox failed to start"):
            logger.warning(f"HumanEval {conversation.get('task_id', '')}: {result.execution.error}")
        return int(result.passed)
