"""Chat tasks: one file per dataset, each a `Task` that turns rows into conversations and
grades answers. Used by SFT (training mixtures), RL (GSM8K rewards) and chat
evaluation (ARC, MMLU, GSM8K, HumanEval, SpellingBee).

Where the data comes from, in this order (one resolver: `nanochat.tasks.common.get_task_data_dir`):

1. a local copy under the task data dir: the `data_dir` argument of every task, else the
   environment variable NANOCHAT_TASK_DATA_DIR (scripts pass their `--data-dir`);
2. the Hugging Face parquet export, downloaded once into
   `base_dir/task_data/{owner--name}/{subset}/{split}/00000.parquet ...` with a `manifest.json`
   written last (`nanochat.tasks.hub.load_hub_dataset`); HF_HUB_OFFLINE=1 skips the network;
3. neither: `TaskDataMissing` (a NanochatError) says which task and where to put the file.

Layout of the task data dir. A split is one of `{split}.jsonl`, `{split}.jsonl.gz`,
`{split}.parquet`, or a folder `{split}/` of `*.parquet` shards read in name order; rows are the
Hugging Face rows (same column names), in the dataset's original order (every task shuffles
them with seed 42 after loading, exactly as the hub copy is shuffled):

    gsm8k/{train,test}.jsonl                      {question, answer}     (subset "main")
    gsm8k/socratic/{train,test}.jsonl                                    (subset "socratic")
    humaneval/HumanEval.jsonl.gz                  {task_id, prompt, canonical_solution, test, entry_point}
                                                  (the original OpenAI file; humaneval/test.* also works)
    arc/{ARC-Easy,ARC-Challenge}/{train,validation,test}.*   {id, question, choices: {text, label}, answerKey}
    mmlu/all/{auxiliary_train,validation,dev,test}.*         {question, subject, choices, answer (0-3)}
    mmlu/auxiliary_train/train.*                             same, or nested under a "train" column as on the hub
    smoltalk/{train,test}.*                       {messages: [{role, content}, ...]}
    spellingbee/words_alpha.txt                   one word per line (SpellingBee, SimpleSpelling)

CustomJSON reads the file it is given (e.g. base_dir/identity_conversations.jsonl).
"""

from nanochat.tasks.common import Task, TaskDataMissing, TaskMixture, TaskSequence, get_task_data_dir, render_mc

__all__ = ["Task", "TaskDataMissing", "TaskMixture", "TaskSequence", "get_task_data_dir", "render_mc"]
