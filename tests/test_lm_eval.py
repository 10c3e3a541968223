"""lm-evaluation-harness (nanochat/lm_harness.py, scripts/lm_eval.py) on local task YAMLs over
local JSONL files (50 multiple-choice and 50 generative rows): our `LM` wrapper and the harness's
own `hf` backend on the export give the same answer on every item, and the multiple-choice
answers are the ones our CORE code gives for the same items and prompt format."""

import json
import os
import random
import sys
from types import SimpleNamespace

import pytest
import torch
from hf_helpers import MODEL_TAG, make_tiny_export

pytest.importorskip("transformers")
pytest.importorskip("lm_eval")
datasets = pytest.importorskip("datasets")

from nanochat.lm_harness import NanochatLM, run, summarize  # noqa: E402

MC_TASK, GEN_TASK = "nanochat_tiny_mc", "nanochat_tiny_gen"
WORDS = [" the", " cat", " dog", " moon", " sea", " star", " king", " door", " town", " bird", " hill", " sister",
         " river", " apple", " letter", " ship", " teacher", " night", " today", " again"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("lm_eval_base")
    model, tokenizer = make_tiny_export(str(base), base / "export")
    tasks = base / "tasks"
    tasks.mkdir()
    rng = random.Random(0)
    single = [w for w in WORDS if len(tokenizer.encode(w)) == 1]  # one-token answers: CORE's mean = lm-eval's sum
    assert len(single) >= 4, single
    mc, gen = [], []
    for i in range(50):
        subject, obj = rng.choice(["the cat", "a dog", "the old king", "my sister"]), rng.choice(single).strip()
        choices = rng.sample(single, 4)
        mc.append({"query": f"Question {i}: {subject} sees the{rng.choice(single)}. What?\nAnswer:",
                   "choices": [c.strip() for c in choices], "gold": rng.randrange(4)})
        gen.append({"context": f"{subject.capitalize()} finds the {obj} and", "target": " the moon"})
    for name, rows in (("mc", mc), ("gen", gen)):
        with open(tasks / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    common = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {path}\ntest_split: test\n"
    (tasks / "mc.yaml").write_text(
        f"task: {MC_TASK}\n" + common.format(path=tasks / "mc.jsonl") +
        "output_type: multiple_choice\ndoc_to_text: query\ndoc_to_choice: choices\ndoc_to_target: gold\n"
        "metric_list:\n  - metric: acc\n")
    (tasks / "gen.yaml").write_text(
        f"task: {GEN_TASK}\n" + common.format(path=tasks / "gen.jsonl") +
        "output_type: generate_until\ndoc_to_text: context\ndoc_to_target: target\ntarget_delimiter: ''\n"
        "generation_kwargs:\n  until: ['.']\n  max_gen_toks: 8\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    return {"base": str(base), "dir": str(base / "export"), "tasks": str(tasks), "model": model,
            "tokenizer": tokenizer, "mc": mc}


@pytest.fixture(autouse=True)
def _offline(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", tiny["base"])
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets"), raising=False)


def per_item(results, task, key):
    return {s["doc_id"]: s[key] for s in results["samples"][task]}


@pytest.fixture(scope="module")
def both_paths(tiny, tmp_path_factory):
    """(ours, hf) lm_eval results on both tasks, with every sample logged."""
    import datasets.config as dconfig
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    old = {k: getattr(dconfig, k, None) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "HF_DATASETS_CACHE")}
    os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"
    dconfig.HF_DATASETS_OFFLINE = dconfig.HF_HUB_OFFLINE = True
    dconfig.HF_DATASETS_CACHE = str(tmp_path_factory.mktemp("datasets"))
    try:
        lm = NanochatLM(tiny["model"], tiny["tokenizer"], batch_size=8)
        ours = run(lm, [MC_TASK, GEN_TASK], include_path=tiny["tasks"], log_samples=True)
        hf = simple_evaluate(model="hf", model_args={"pretrained": tiny["dir"], "trust_remote_code": True,
                                                     "dtype": "float32", "device": "cpu"},
                             tasks=[MC_TASK, GEN_TASK], batch_size=8, log_samples=True, bootstrap_iters=0,
                             task_manager=TaskManager(include_path=tiny["tasks"], include_defaults=False))
    finally:
        for k, v in old.items():
            setattr(dconfig, k, v)
        os.environ.pop("HF_DATASETS_OFFLINE", None)
        os.environ.pop("HF_HUB_OFFLINE", None)
    return ours, hf


def test_wrapper_and_hf_backend_agree_on_every_item(both_paths):
    ours, hf = both_paths
    for task, key in ((MC_TASK, "acc"), (GEN_TASK, "filtered_resps")):
        a, b = per_item(ours, task, key), per_item(hf, task, key)
        assert len(a) == 50 and a == b, task
    a, b = summarize(ours), summarize(hf)
    print(f"lm-eval accuracies, ours vs hf backend: {MC_TASK} acc {a[MC_TASK]['acc']:.2f} vs {b[MC_TASK]['acc']:.2f}; "
          f"{GEN_TASK} exact_match {a[GEN_TASK]['exact_match']:.2f} vs {b[GEN_TASK]['exact_match']:.2f}")
    assert a == b
    # not a degenerate model: it gets some items right and some wrong, and writes varied text
    assert 0 < a[MC_TASK]["acc"] < 1
    assert len({tuple(r) for r in per_item(ours, GEN_TASK, "filtered_resps").values()}) > 5


def test_chat_template_path_agrees_with_hf_backend(tiny):
    """A chat model's requests (--apply_chat_template): our rendering and the exported Jinja
    template give the same prompts, so the same answers."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    lm = NanochatLM(tiny["model"], tiny["tokenizer"], batch_size=8)
    ours = run(lm, [MC_TASK], include_path=tiny["tasks"], limit=20, chat=True, log_samples=True)
    hf = simple_evaluate(model="hf", model_args={"pretrained": tiny["dir"], "trust_remote_code": True,
                                                 "dtype": "float32", "device": "cpu"},
                         tasks=[MC_TASK], batch_size=8, limit=20, log_samples=True, bootstrap_iters=0,
                         apply_chat_template=True, fewshot_as_multiturn=True,
                         task_manager=TaskManager(include_path=tiny["tasks"], include_defaults=False))
    prompts = {s["doc_id"]: s["arguments"] for s in ours["samples"][MC_TASK]}
    assert "<|assistant_start|>" in json.dumps(prompts[0])
    assert prompts == {s["doc_id"]: s["arguments"] for s in hf["samples"][MC_TASK]}
    assert per_item(ours, MC_TASK, "acc") == per_item(hf, MC_TASK, "acc")


def test_multiple_choice_matches_core(tiny, both_paths):
    from nanochat.core_eval import evaluate_task

    ours, _ = both_paths
    acc, details = evaluate_task(tiny["model"], tiny["tokenizer"], tiny["mc"], "cpu", "multiple_choice",
                                 num_fewshot=0, delimiter=" ", return_details=True)
    lm_eval_items = per_item(ours, MC_TASK, "acc")
    assert {i: float(ok) for i, (ok, _) in details.items()} == lm_eval_items
    assert acc == pytest.approx(summarize(ours)[MC_TASK]["acc"], abs=1e-6)  # CORE averages in fp32


def test_loglikelihood_rolling_is_the_models_text_logprob(tiny):
    model, tokenizer = tiny["model"], tiny["tokenizer"]
    lm = NanochatLM(model, tokenizer, batch_size=4)
    short = "The cat sees the moon."
    long_text = " ".join(f"The old king {i} paints the cold sea at night." for i in range(6))
    got = lm.loglikelihood_rolling([SimpleNamespace(args=(short,)), SimpleNamespace(args=(long_text,))],
                                   disable_tqdm=True)
    for text, value in zip((short, long_text), got):
        ids = tokenizer.encode(text)
        assert len(ids) > 64 or text == short
        # disjoint windows of 64 predicted tokens; the first after <|bos|>, the others read the 64
        # tokens before their last one (the last, partial window has more than one token of context)
        expected = 0.0
        for s in range(0, len(ids), 64):
            n = len(ids[s:s + 64])
            if s == 0:
                inputs, targets = [tokenizer.get_bos_token_id()] + ids[:n - 1], ids[:n]
            else:
                inputs, targets = ids[s + n - 65:s + n - 1], [-1] * (64 - n) + ids[s:s + n]
            with torch.no_grad():
                loss = model(torch.tensor([inputs]), targets=torch.tensor([targets]), loss_reduction="sum")
            expected -= loss.item()
        assert value == pytest.approx(expected, rel=1e-5)


def test_chat_rendering_is_ours(tiny):
    tokenizer = tiny["tokenizer"]
    lm = NanochatLM(tiny["model"], tokenizer)
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
               {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"}]
    text = lm.apply_chat_template(history)
    conv = {"messages": history + [{"role": "assistant", "content": ""}]}
    assert lm.tok_encode(text) == tokenizer.render_for_completion(conv)  # <|bos|> not doubled
    assert lm.apply_chat_template(history + [{"role": "assistant", "content": "The answer"}],
                                  add_generation_prompt=False) == text + "The answer"


def test_script_writes_results_and_report(tiny):
    from scripts import lm_eval as script

    summary = script.main(["-i", "base", "-g", MODEL_TAG, "--tasks", MC_TASK, "--include-path", tiny["tasks"],
                           "--limit", "10", "--device-type", "cpu"])
    with open(summary["output"]) as f:
        record = json.load(f)
    assert summary["output"].startswith(os.path.join(tiny["base"], "lm_eval"))
    assert record["scores"][MC_TASK]["acc"] == summary["scores"][MC_TASK]["acc"]
    assert record["model"]["step"] == 7 and record["settings"]["chat_template"] is False
    report = open(os.path.join(tiny["base"], "report", "lm-eval-base.md")).read()
    assert MC_TASK in report


def test_missing_extra_says_what_to_install(monkeypatch):
    from nanochat.common import NanochatError
    from scripts import lm_eval as script

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    with pytest.raises(NanochatError, match=r"pip install -e '\.\[eval\]'"):
        script.main(["--tasks", "hellaswag"])
