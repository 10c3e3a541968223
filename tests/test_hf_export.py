"""The Hugging Face export (nanochat/hf_export.py, nanochat/hf/, scripts/export.py): the folder
loads with transformers (trust_remote_code) and computes nanochat's logits and greedy tokens, its
tokenizer encodes and renders chats as ours does, a pipeline answers, and nanochat loads it back
with bit-identical logits (checkpoint.load_model, --hf-path)."""

import contextlib
import io
import json
import os
import re
import sys
from dataclasses import fields

import pytest
import torch
from hf_helpers import MODEL_TAG, STEP, make_tiny_export

from nanochat.common import NanochatError, run_main
from nanochat.gpt import GPTConfig

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("hf_base")
    export_dir = base / "export"
    model, tokenizer = make_tiny_export(str(base), export_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(export_dir), trust_remote_code=True).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(export_dir))
    return {"base": str(base), "dir": str(export_dir), "model": model, "tokenizer": tokenizer, "hf": hf,
            "hf_tok": hf_tok}


@pytest.fixture(autouse=True)
def _base_dir(tiny, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", tiny["base"])


def texts(tokenizer):
    """Three texts, the last longer than both attention windows (128 and 64 tokens)."""
    long_text = " ".join(f"The old king {i} paints the cold sea at night." for i in range(20))
    out = ["The cat", "A small bird remembers the green hill. def f(x): return x * 2", long_text]
    ids = [tokenizer.encode(t, prepend=tokenizer.get_bos_token_id()) for t in out]
    assert 200 < len(ids[2]) < 640  # past both windows, within the rotary table
    return ids


# -----------------------------------------------------------------------------
# the model in transformers


def test_config_has_every_gpt_field_and_auto_map(tiny):
    with open(os.path.join(tiny["dir"], "config.json")) as f:
        config = json.load(f)
    for field in fields(GPTConfig):
        assert config[field.name] == getattr(tiny["model"].config, field.name)
    assert config["model_type"] == "nanochat" and config["architectures"] == ["NanochatForCausalLM"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_nanochat.NanochatForCausalLM"
    assert config["nanochat"]["step"] == STEP and config["nanochat"]["model_tag"] == MODEL_TAG
    for name in ("modeling_nanochat.py", "configuration_nanochat.py"):  # loadable without nanochat installed
        source = open(os.path.join(tiny["dir"], name)).read()
        assert not re.search(r"^\s*(from|import)\s+nanochat", source, re.M)


def test_logits_match_ours(tiny):
    worst = 0.0
    for ids in texts(tiny["tokenizer"]):
        x = torch.tensor([ids])
        with torch.no_grad():
            ours, theirs = tiny["model"](x), tiny["hf"](x).logits
        assert theirs.dtype == torch.float32 and theirs.shape == ours.shape
        worst = max(worst, (ours - theirs).abs().max().item())
    print(f"max |logit difference| export vs nanochat: {worst:.2e}")
    assert worst < 1e-4


def test_loss_and_manual_cache_steps(tiny):
    """labels give nanochat's loss (shifted inside, as every transformers causal LM); a hand-written
    decode loop over the returned cache gives the full forward's logits."""
    from hf_helpers import SEQ_LEN

    hf, model = tiny["hf"], tiny["model"]
    ids = torch.tensor([texts(tiny["tokenizer"])[2][:SEQ_LEN]])
    with torch.no_grad():
        loss = hf(ids, labels=ids).loss
        ours = model(ids[:, :-1], targets=ids[:, 1:])
        assert abs(loss.item() - ours.item()) < 1e-5
        full = hf(ids).logits
        out = hf(ids[:, :40], use_cache=True)
        steps = [out.logits]
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        for t in range(40, ids.size(1)):
            kwargs = {"cache" if hasattr(out, "cache") else "past_key_values": cache}
            steps.append(hf(ids[:, t:t + 1], use_cache=True, **kwargs).logits)
        assert (torch.cat(steps, dim=1) - full).abs().max().item() < 1e-4


def test_padded_batch_logits_match_each_row(tiny):
    """Left padding (as generate uses) and right padding change no real token's logits."""
    rows = texts(tiny["tokenizer"])[:2]
    T = max(len(r) for r in rows)
    for side in ("left", "right"):
        ids = torch.zeros(2, T, dtype=torch.long)
        mask = torch.zeros(2, T, dtype=torch.long)
        for b, r in enumerate(rows):
            span = slice(T - len(r), T) if side == "left" else slice(0, len(r))
            ids[b, span], mask[b, span] = torch.tensor(r), 1
        with torch.no_grad():
            batched = tiny["hf"](ids, attention_mask=mask).logits
            for b, r in enumerate(rows):
                single = tiny["model"](torch.tensor([r]))[0]
                span = slice(T - len(r), T) if side == "left" else slice(0, len(r))
                assert (batched[b, span] - single).abs().max().item() < 1e-4


def engine_greedy(tiny, prompt, max_tokens):
    from nanochat.engine import Engine

    results, masks = Engine(tiny["model"], tiny["tokenizer"]).generate_batch(prompt, max_tokens=max_tokens,
                                                                             temperature=0)
    assert all(masks[0][len(prompt):]), "the Python tool forced tokens: pick another prompt"
    return results[0][len(prompt):]


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_generate_matches_engine(tiny, use_cache):
    stops = set(tiny["hf"].generation_config.eos_token_id)
    for ids in texts(tiny["tokenizer"])[:2]:
        prompt = ids[:20]
        ours = engine_greedy(tiny, prompt, 32)
        out = tiny["hf"].generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, use_cache=use_cache)
        theirs = [t for t in out[0, len(prompt):].tolist() if t not in stops]
        assert len(ours) == 32 or len(theirs) < 32  # both stop at the same terminal token
        assert theirs == ours


def test_left_padded_batch_generate_equals_single(tiny):
    tok = tiny["hf_tok"]
    tok.padding_side = "left"
    prompts = ["The cat", "A small bird remembers the green hill and", "Hi"]
    enc = tok(prompts, return_tensors="pt", padding=True)
    batch = tiny["hf"].generate(**enc, max_new_tokens=12, do_sample=False)[:, enc.input_ids.size(1):]
    stops = set(tiny["hf"].generation_config.eos_token_id)

    def until_stop(tokens):  # a finished row is padded after its stop token
        return tokens[:next((i + 1 for i, t in enumerate(tokens) if t in stops), len(tokens))]

    for i, p in enumerate(prompts):
        ids = tok(p, return_tensors="pt").input_ids
        single = tiny["hf"].generate(ids, max_new_tokens=12, do_sample=False)[0, ids.size(1):]
        assert until_stop(batch[i].tolist()) == until_stop(single.tolist())


# -----------------------------------------------------------------------------
# the tokenizer


def corpus():
    """100 strings: English, other scripts, emoji, code, whitespace runs, numbers."""
    base = ["hello world", "The cat sees the moon.", "Zürich, naïve café, façade", "Привет, как дела?",
            "日本語のテキストです。", "中文字符和标点，测试。", "مرحبا بالعالم", "שלום עולם", "γειά σου κόσμε",
            "हिन्दी पाठ", "🙂🚀🔥 emoji 👩‍👩‍👧", "def f(x):\n    return x**2  # square\n", "for (int i = 0; i < n; ++i) {}",
            "  leading and trailing  ", "\n\n\ttabs\tand\nnewlines\r\n", "1234567890 3.14159 1e-9 -42",
            "<div class=\"a\">html</div>", "SELECT * FROM t WHERE x = 'y';", "a" * 50, "mixed 混合 text 🙂 ok"]
    out = []
    for i in range(5):
        out += [s if i == 0 else f"{s} {i}" if i % 2 else f"{i}:{s}" for s in base]
    assert len(out) == 100
    return out


def test_tokenizer_encodes_as_ours(tiny):
    ours, theirs = tiny["tokenizer"], tiny["hf_tok"]
    bos = ours.get_bos_token_id()
    for s in corpus():
        ids = ours.encode(s)
        assert theirs.encode(s, add_special_tokens=False) == ids
        assert theirs(s).input_ids == [bos] + ids  # like every nanochat document, <|bos|> first
        assert theirs.decode(ids) == s
    assert theirs.bos_token == "<|bos|>" and theirs.eos_token == "<|assistant_end|>"
    assert theirs.pad_token_id == bos


def conversations():
    """20 conversations: plain, with a system message, multi-turn, with tool calls and outputs."""
    tool = [{"type": "text", "text": "Let me compute that. "}, {"type": "python", "text": "12*34"},
            {"type": "python_output", "text": "408"}, {"type": "text", "text": " So it is 408."}]
    convs = []
    for i in range(20):
        messages = []
        if i % 3 == 0:
            messages.append({"role": "system", "content": f"You are helpful #{i}. Réponds en français."})
        for turn in range(1 + i % 4):
            messages.append({"role": "user", "content": f"Question {i}.{turn}: what is 12*34? 🙂\nThanks"})
            content = tool if (i + turn) % 2 else f"Answer {turn}: it's 408 — \"quoted\"\n  indented"
            messages.append({"role": "assistant", "content": content})
        convs.append({"messages": messages})
    return convs


def as_ids(rendered):
    return rendered["input_ids"] if hasattr(rendered, "keys") else rendered


def test_chat_template_renders_as_ours(tiny):
    ours, theirs = tiny["tokenizer"], tiny["hf_tok"]
    agree = 0
    for conv in conversations():
        prompt = as_ids(theirs.apply_chat_template(conv["messages"][:-1], add_generation_prompt=True))
        full = as_ids(theirs.apply_chat_template(conv["messages"]))
        agree += prompt == ours.render_for_completion(conv) and full == ours.render_conversation(conv)[0]
    print(f"chat template agreement: {agree}/20")
    assert agree == 20


def test_chat_template_refuses_what_ours_refuses(tiny):
    theirs = tiny["hf_tok"]
    for messages in ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
                     [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]):
        with pytest.raises(ValueError):
            tiny["tokenizer"].render_conversation({"messages": messages})
        with pytest.raises(Exception, match="alternate|followed by a user"):
            theirs.apply_chat_template(messages)


def test_pipeline_answers_a_chat_message(tiny):
    pipe = transformers.pipeline("text-generation", model=tiny["dir"], trust_remote_code=True)
    messages = [{"role": "user", "content": "Why is the sky blue?"}]
    out = pipe(messages, max_new_tokens=16, do_sample=False)
    reply = out[0]["generated_text"][-1]
    assert reply["role"] == "assistant" and isinstance(reply["content"], str) and reply["content"]
    prompt = tiny["tokenizer"].render_for_completion({"messages": messages + [{"role": "assistant", "content": ""}]})
    specials = {tiny["tokenizer"].encode_special(t) for t in tiny["tokenizer"].get_special_tokens()}
    ours = tiny["tokenizer"].decode([t for t in engine_greedy(tiny, prompt, 16) if t not in specials])
    assert reply["content"] == ours


# -----------------------------------------------------------------------------
# back into nanochat


def test_round_trip_logits_are_identical(tiny):
    from nanochat.checkpoint import load_model

    model, tokenizer, meta = load_model("base", "cpu", "eval", model_tag=tiny["dir"])
    assert meta["step"] == STEP and meta["hf_export"] == tiny["dir"]
    assert tokenizer.enc._mergeable_ranks == tiny["tokenizer"].enc._mergeable_ranks
    assert tokenizer.enc._pat_str == tiny["tokenizer"].enc._pat_str
    assert tokenizer.enc._special_tokens == tiny["tokenizer"].enc._special_tokens
    for ids in texts(tokenizer):
        x = torch.tensor([ids])
        with torch.no_grad():
            assert torch.equal(model(x), tiny["model"](x))


def test_bfloat16_export_round_trip(tiny, tmp_path):
    from nanochat.checkpoint import load_model
    from scripts import export

    out = tmp_path / "bf16"
    export.main(["-i", "base", "-g", MODEL_TAG, "-o", str(out), "--dtype", "bfloat16"])
    size32 = os.path.getsize(os.path.join(tiny["dir"], "model.safetensors"))
    assert os.path.getsize(out / "model.safetensors") < 0.55 * size32
    model, _, _ = load_model("base", "cpu", "eval", model_tag=str(out))
    for name, p in model.state_dict().items():  # the weights are ours rounded to bf16, computed in fp32
        assert p.dtype == torch.float32 and torch.equal(p, tiny["model"].state_dict()[name].bfloat16().float()), name
    x = torch.tensor([texts(tiny["tokenizer"])[2]])
    with torch.no_grad():
        diff = (model(x) - tiny["model"](x)).abs().max().item()
    print(f"bf16 export: max |logit difference| vs fp32 = {diff:.3f}")
    assert 0 < diff < 1.0


def test_step_and_paths_are_checked(tiny, tmp_path):
    from nanochat.checkpoint import load_model

    with pytest.raises(NanochatError, match="holds step 7"):
        load_model("base", "cpu", "eval", model_tag=tiny["dir"], step=3)
    with pytest.raises(NanochatError, match="not a nanochat model export"):
        load_model("base", "cpu", "eval", model_tag=str(tmp_path))


def test_export_refuses_a_foreign_folder_and_replaces_its_own(tiny, tmp_path):
    from scripts import export

    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(NanochatError, match="holds something else"):
        export.main(["-i", "base", "-g", MODEL_TAG, "-o", str(tmp_path)])
    assert os.listdir(tmp_path) == ["notes.txt"]
    out = tmp_path / "again"
    export.main(["-i", "base", "-g", MODEL_TAG, "-o", str(out)])
    export.main(["-i", "base", "-g", MODEL_TAG, "-o", str(out)])  # an earlier export is replaced
    assert sorted(os.listdir(out)) == sorted(os.listdir(tiny["dir"]))
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temporary folder left


def test_model_card(tiny):
    card = open(os.path.join(tiny["dir"], "README.md")).read()
    assert card.startswith("---\nlibrary_name: transformers")
    assert "3 layers, width 64" in card and "7 optimizer steps, 896 tokens" in card
    assert "validation bits per byte: 1.2345" in card and "trust_remote_code=True" in card


def test_missing_extra_says_what_to_install(tiny, tmp_path, monkeypatch, capsys):
    from scripts import export

    monkeypatch.setitem(sys.modules, "safetensors", None)  # import fails as if not installed
    with pytest.raises(SystemExit) as e:
        run_main(lambda: export.main(["-i", "base", "-o", str(tmp_path / "x")]))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install -e '.[hf]'" in err


def test_chat_cli_loads_an_export(tiny):
    from scripts import chat_cli

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        chat_cli.main(["--hf-path", tiny["dir"], "-p", "The cat", "-t", "0", "--max-tokens", "8",
                       "--device-type", "cpu"])
    prompt = tiny["tokenizer"].render_for_completion(
        {"messages": [{"role": "user", "content": "The cat"}, {"role": "assistant", "content": ""}]})
    expected = tiny["tokenizer"].decode(engine_greedy(tiny, prompt, 8))
    assert out.getvalue().rstrip("\n").endswith(expected.rstrip("\n"))


def test_base_eval_loads_an_export_natively(tiny):
    from scripts import base_eval

    with contextlib.redirect_stdout(io.StringIO()):
        summary = base_eval.main(["--hf-path", tiny["dir"], "--eval=sample", "--device-type=cpu"])
    assert summary["model"] == f"base/export@{STEP}" and len(summary["samples"]["greedy"]) > 0
