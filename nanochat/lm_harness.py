"""A nanochat model behind EleutherAI lm-evaluation-harness's `LM` interface, and a runner.

    from nanochat.lm_harness import NanochatLM, run, summarize
    lm = NanochatLM(model, tokenizer, batch_size=8)
    results = run(lm, ["hellaswag", "arc_easy"], num_fewshot=0, limit=100, chat=False)

Every request is tokenized as the exported model's Hugging Face tokenizer does (<|bos|> first,
special tokens in the text are special), so this and the harness's `hf` backend on an export
(`lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True`) score the same tokens:
- loglikelihood: batched forwards over right-padded rows, longest first; a context longer than
  the model's window is cropped from the left, keeping the continuation (as the `hf` backend).
- loglikelihood_rolling: the text in disjoint windows of the context length, each after
  <|bos|> (the `hf` backend also scores the <|bos|> its tokenizer prepends; this does not).
- generate_until: the Engine (KV cache, greedy unless the task samples), one request at a time;
  the context is cropped to leave room for max_gen_toks; stops at a stop string, <|bos|> or
  <|assistant_end|>. The Engine runs the Python tool when a chat model calls it, as in chat_eval;
  the `hf` backend cannot.
- chat models: `chat=True` renders each request with nanochat's chat format
  (render_conversation; the exported chat template renders the same).
Needs the [eval] extra (lm-eval).
"""

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from tqdm import tqdm

from nanochat.common import NanochatError


class NanochatLM(TemplateLM):
    def __init__(self, model, tokenizer, batch_size=8, max_gen_toks=256):
        super().__init__()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_gen_toks = max_gen_toks
        self.max_length = model.config.sequence_len
        self._device = model.get_device()
        self.bos = tokenizer.get_bos_token_id()
        self.assistant_end = tokenizer.encode_special("<|assistant_end|>")
        self.special_ids = {tokenizer.encode_special(t) for t in tokenizer.get_special_tokens()}
        self._engine = None

    # --- tokens ----------------------------------------------------------------------

    @property
    def eot_token_id(self):
        return self.assistant_end  # the export's eos_token

    @property
    def prefix_token_id(self):
        return self.bos  # an empty context is <|bos|>

    @property
    def device(self):
        return self._device

    def tok_encode(self, string, add_special_tokens=None, left_truncate_len=None, **kwargs):
        """As the export's tokenizer with the `hf` backend: special tokens written in the text are
        special (a chat-rendered prompt), and <|bos|> goes first unless add_special_tokens is False
        or (when it is None) the text already starts with it."""
        ids = self.tokenizer.enc.encode(string, allowed_special="all")
        if add_special_tokens or (add_special_tokens is None and not string.startswith("<|bos|>")):
            ids = [self.bos] + ids
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens):
        return self.tokenizer.decode([t for t in tokens if t not in self.special_ids])

    # --- scoring ---------------------------------------------------------------------

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
        """requests: ((context, continuation), context_ids, continuation_ids) -> [(sum logprob, is greedy)]."""
        results = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][1]) + len(requests[i][2])))
        bar = tqdm(total=len(requests), desc="loglikelihood", disable=disable_tqdm)
        for s in range(0, len(order), self.batch_size):
            batch = order[s:s + self.batch_size]
            rows, conts = [], []
            for i in batch:
                _, context, continuation = requests[i]
                if not context or not continuation or len(continuation) > self.max_length:
                    raise NanochatError(f"a request has an empty context or continuation, or a continuation longer "
                                        f"than the {self.max_length}-token context; the task is malformed.")
                rows.append((context + continuation)[-(self.max_length + 1):][:-1])  # the last token is only predicted
                conts.append(continuation)
            T = max(len(r) for r in rows)
            idx = torch.full((len(rows), T), self.bos, dtype=torch.long)
            for b, r in enumerate(rows):
                idx[b, :len(r)] = torch.tensor(r)  # right padding: a causal model never looks ahead
            logits = self.model(idx.to(self.device))
            for b, (i, row, cont) in enumerate(zip(batch, rows, conts)):
                logprobs = F.log_softmax(logits[b, len(row) - len(cont):len(row)].float(), dim=-1)
                target = torch.tensor(cont, device=logprobs.device)
                greedy = bool((logprobs.argmax(dim=-1) == target).all())
                results[i] = (logprobs.gather(1, target[:, None]).sum().item(), greedy)
            bar.update(len(batch))
        bar.close()
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        from lm_eval import utils

        out = []
        for (string,) in tqdm([r.args for r in requests], desc="loglikelihood_rolling", disable=disable_tqdm):
            windows = [((None,), *utils.make_disjoint_window(w)) for w in utils.get_rolling_token_windows(
                token_list=self.tok_encode(string, add_special_tokens=False), prefix_token=self.bos,
                max_seq_len=self.max_length, context_len=1)]
            out.append(sum(logprob for logprob, _ in self._loglikelihood_tokens(windows, disable_tqdm=True)))
        return out

    # --- generation ------------------------------------------------------------------

    @property
    def engine(self):
        if self._engine is None:
            from nanochat.engine import Engine
            self._engine = Engine(self.model, self.tokenizer)
        return self._engine

    def generate_until(self, requests, disable_tqdm=False):
        eos = "<|assistant_end|>"
        out = []
        for context, kwargs in tqdm([r.args for r in requests], desc="generate_until", disable=disable_tqdm):
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            if eos not in until:
                until.append(eos)
            max_gen_toks = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            if max_gen_toks >= self.max_length:
                raise NanochatError(f"max_gen_toks={max_gen_toks} leaves no room for a context in the model's "
                                    f"{self.max_length}-token window; lower it.")
            temperature = float(kwargs.get("temperature", 0.0))
            if kwargs.get("do_sample") is False:
                temperature = 0.0
            tokens = self.tok_encode(context, left_truncate_len=self.max_length - max_gen_toks)
            generated = []
            for column, _ in self.engine.generate(tokens, num_samples=1, max_tokens=max_gen_toks,
                                                  temperature=temperature, top_k=kwargs.get("top_k"),
                                                  seed=int(kwargs.get("seed", 42))):
                token = column[0]
                if token in (self.bos, self.assistant_end):
                    break
                generated.append(token)
                if any(stop in self.tok_decode(generated) for stop in until):
                    break
            text = self.tok_decode(generated)
            for stop in until:
                text = text.split(stop)[0]
            out.append(text)
            self.cache_hook.add_partial("generate_until", (context, kwargs), text)
        return out

    # --- chat ------------------------------------------------------------------------

    @property
    def tokenizer_name(self):
        return "nanochat"

    def chat_template(self, chat_template=False):
        from nanochat.hf_export import chat_template as template
        return template()

    def apply_chat_template(self, chat_history, add_generation_prompt=True):
        """The conversation in nanochat's chat format, as text (special tokens written out). Without
        add_generation_prompt the last (assistant) message is left open, to be continued."""
        messages = [dict(m) for m in chat_history]
        prefill = ""
        if not add_generation_prompt and messages and messages[-1]["role"] == "assistant":
            prefill = messages.pop()["content"]
        ids, _ = self.tokenizer.render_conversation({"messages": messages + [{"role": "assistant", "content": ""}]},
                                                    max_tokens=1 << 30)
        return self.tokenizer.decode(ids[:-1]) + prefill  # drop <|assistant_end|>: end in <|assistant_start|>


def run(lm, tasks, num_fewshot=None, limit=None, include_path=None, chat=False, log_samples=False,
        bootstrap_iters=0):
    """lm_eval.simple_evaluate over `tasks` (names, or groups). include_path: a folder of task
    YAMLs of your own. chat: render requests with the chat format (few-shot examples as turns)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = None
    if include_path:  # indexing the harness's own ~15k task files takes half a minute: skip it when possible
        manager = TaskManager(include_path=include_path, include_defaults=False)
    if manager is None or any(not manager.match_tasks([t]) for t in tasks):
        manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        raise NanochatError(f"lm-eval does not know the task(s) {', '.join(unknown)}; list them with "
                            f"`lm_eval ls tasks`, or pass --include-path with your own task YAMLs.")
    return simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                           apply_chat_template=chat, fewshot_as_multiturn=chat, log_samples=log_samples,
                           bootstrap_iters=bootstrap_iters)


def summarize(results):
    """{task: {metric: value}} of the numbers in lm_eval's results (stderr entries dropped)."""
    out = {}
    for task, metrics in results.get("results", {}).items():
        values = {k.split(",")[0]: v for k, v in metrics.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and "stderr" not in k}
        if values:
            out[task] = values
    return out
