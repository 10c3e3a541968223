"""Hugging Face model folders: write one from a nanochat checkpoint, and load one back as a
nanochat GPT.

    export_model(model, tokenizer, meta, "out/d20", dtype="bfloat16", source="sft", model_tag="d20")
    model, tokenizer, meta = load_export("out/d20", "cuda", "eval")     # checkpoint.build_model does this

A folder holds:
    model.safetensors            nanochat's state dict, names unchanged (tables padded to 64 rows)
    config.json                  model_type "nanochat", auto_map, every GPTConfig field, nanochat's meta
    configuration_nanochat.py    \\ the network for transformers (trust_remote_code=True); copied
    modeling_nanochat.py         /  from nanochat/hf/, they import nothing from nanochat
    generation_config.json       stops on <|assistant_end|> and <|bos|>, as the Engine does
    tokenizer.json, tokenizer_config.json, special_tokens_map.json
                                 the BPE (encoding adds <|bos|>), and the chat template
    README.md                    a model card

Writing needs `safetensors` (the [hf] extra), not transformers. The folder is built beside its
destination and renamed into place, so a failed export leaves nothing half-written.
"""

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, fields

import torch

from nanochat.common import NanochatError, get_base_dir, logger, require

HF_DIR = os.path.join(os.path.dirname(__file__), "hf")
CODE_FILES = ("configuration_nanochat.py", "modeling_nanochat.py")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# checkpoint meta entries carried into config.json (the rest is resume state)
META_KEYS = ("step", "val_bpb", "user_config", "total_batch_size", "max_seq_len", "world_size", "base")


def chat_template():
    with open(os.path.join(HF_DIR, "chat_template.jinja"), encoding="utf-8") as f:
        return f.read()


def is_export(path):
    """True when `path` is a folder holding a nanochat model export."""
    config_path = os.path.join(str(path), "config.json")
    if not os.path.isfile(config_path):
        return False
    try:
        with open(config_path, encoding="utf-8") as f:
            return json.load(f).get("model_type") == "nanochat"
    except (OSError, ValueError, AttributeError):
        return False


def _json_safe(value):
    """Keep what json can write (numbers, strings, lists, dicts); drop the rest."""
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return None


# -----------------------------------------------------------------------------
# Export


def export_model(model, tokenizer, meta, out_dir, dtype="float32", source=None, model_tag=None):
    """Write the model folder `out_dir` (replacing an earlier export there; any other non-empty
    folder is refused). dtype: the weights' dtype in model.safetensors."""
    save_file = require("safetensors.torch", "hf", "exporting a model").save_file
    if dtype not in DTYPES:
        raise NanochatError(f"--dtype={dtype} is not supported; use float32 or bfloat16.")
    out_dir = os.path.abspath(out_dir)
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not is_export(out_dir):
        raise NanochatError(f"{out_dir} exists and holds something else than a nanochat export; choose an empty "
                            f"or new folder.")
    config = model.config
    specials = {name: tokenizer.encode_special(name) for name in ("<|bos|>", "<|assistant_end|>")}
    bos, assistant_end = specials["<|bos|>"], specials["<|assistant_end|>"]
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out_dir)}.", suffix=".tmp")
    try:
        state = {k: v.detach().to("cpu", DTYPES[dtype]).contiguous() for k, v in model.state_dict().items()}
        save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        nanochat_meta = {"source": source, "model_tag": model_tag}
        nanochat_meta.update({k: _json_safe(meta[k]) for k in META_KEYS if k in meta})
        hf_config = {
            "model_type": "nanochat",
            "architectures": ["NanochatForCausalLM"],
            "auto_map": {"AutoConfig": "configuration_nanochat.NanochatConfig",
                         "AutoModelForCausalLM": "modeling_nanochat.NanochatForCausalLM"},
            **asdict(config),
            "padded_vocab_size": model.padded_vocab_size,
            "bos_token_id": bos,
            "eos_token_id": [assistant_end, bos],
            "pad_token_id": bos,
            "use_cache": True,
            "tie_word_embeddings": False,
            "dtype": dtype,
            "torch_dtype": dtype,  # the name transformers 4.x reads
            "nanochat": nanochat_meta,
        }
        _write_json(os.path.join(tmp, "config.json"), hf_config)
        # the Engine stops on both: <|bos|> starts the next document
        _write_json(os.path.join(tmp, "generation_config.json"), {
            "bos_token_id": bos, "eos_token_id": [assistant_end, bos], "pad_token_id": bos})
        for name in CODE_FILES:
            shutil.copyfile(os.path.join(HF_DIR, name), os.path.join(tmp, name))
        _write_tokenizer(tokenizer, tmp, config.sequence_len)
        with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
            f.write(model_card(model, meta, source, model_tag, dtype))
        if os.path.isdir(out_dir):
            old = out_dir + f".old-{os.getpid()}"
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info(f"Exported the model to {out_dir}")
    return out_dir


def _write_json(path, data):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")


def _write_tokenizer(tokenizer, folder, sequence_len):
    tokenizer.to_huggingface_json(os.path.join(folder, "tokenizer.json"), add_bos=True)
    specials = sorted(tokenizer.get_special_tokens(), key=tokenizer.encode_special)
    named = {"bos_token": "<|bos|>", "eos_token": "<|assistant_end|>", "pad_token": "<|bos|>"}
    _write_json(os.path.join(folder, "special_tokens_map.json"), {
        **named, "additional_special_tokens": [t for t in specials if t not in named.values()]})
    _write_json(os.path.join(folder, "tokenizer_config.json"), {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **named,
        "additional_special_tokens": [t for t in specials if t not in named.values()],
        "add_bos_token": True,
        "model_input_names": ["input_ids", "attention_mask"],  # no token_type_ids: generate() would refuse them
        "model_max_length": sequence_len,
        "clean_up_tokenization_spaces": False,  # decoding must give back the exact text
        "chat_template": chat_template(),
    })


def _report_figures(source):
    """CORE and ChatCORE as the run's report logged them (base_dir/report), when present."""
    from nanochat.report import parse_kv_lines

    figures = {}
    report_dir = os.path.join(get_base_dir(), "report")
    for name, prefix in (("base-model-evaluation.md", "CORE"), (f"chat-evaluation-{source}.md", "ChatCORE")):
        path = os.path.join(report_dir, name)
        if not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8") as f:
            for key, value in parse_kv_lines(f.read()).items():
                if key.split(" ")[0] == prefix or key.startswith(prefix + " metric"):
                    figures[key] = value
    return figures


def model_card(model, meta, source, model_tag, dtype):
    """README.md: what the model is, how it was trained, what it scored, how to use it."""
    c = model.config
    counts = model.num_scaling_params()
    user = meta.get("user_config") or {}
    step, batch = meta.get("step"), meta.get("total_batch_size")
    name = f"nanochat {source or ''} {model_tag or ''}".replace("  ", " ").strip()
    lines = [
        "---", "library_name: transformers", "pipeline_tag: text-generation", "tags:", "- nanochat", "---", "",
        f"# {name}", "",
        f"A {'chat' if source in ('sft', 'rl') else 'base'} language model trained with "
        f"[nanochat](https://github.com/karpathy/nanochat) ({source} checkpoint"
        f"{f', step {step}' if step is not None else ''}). Weights in {dtype}.", "",
        "## Architecture", "",
        f"- {c.n_layer} layers, width {c.n_embd}, {c.n_head} query heads / {c.n_kv_head} key-value heads "
        f"(head dim {c.n_embd // c.n_head}), context {c.sequence_len} tokens, vocabulary {c.vocab_size}",
        f"- {counts['total']:,} parameters ({counts['transformer_matrices'] + counts['lm_head']:,} in matrices, "
        f"{counts['wte'] + counts['value_embeds']:,} in embedding tables)",
        f"- attention windows `{c.window_pattern}` tiled over the layers (S = a quarter of the context, "
        f"L = the context; last layer L), RoPE base 100000, QK-norm, ReLU² MLP, untied embeddings",
        "- value embeddings with gates on alternate layers, smear (each token mixes in the previous "
        "one's embedding), per-layer residual and x0 scalars, backout, logits softcapped at 15", "",
        "## Training", "",
    ]
    if step is not None:
        tokens = f", {step * batch:,} tokens ({batch:,} per step)" if batch else ""
        lines.append(f"- {step:,} optimizer steps{tokens}")
    if meta.get("base"):
        lines.append(f"- finetuned from the base model {meta['base']}")
    for key in ("depth", "device_batch_size", "data_dir", "num_iterations", "target_param_data_ratio"):
        if user.get(key) not in (None, ""):
            lines.append(f"- {key}: {user[key]}")
    lines += ["", "## Evaluation", ""]
    figures = {}
    if meta.get("val_bpb") is not None:
        figures["validation bits per byte"] = f"{meta['val_bpb']:.4f}"
    figures.update(_report_figures(source))
    lines += [f"- {k}: {v}" for k, v in figures.items()] or ["- no evaluation was logged for this run"]
    lines += ["", "## Use", "", "```python",
              "from transformers import AutoModelForCausalLM, AutoTokenizer",
              "tok = AutoTokenizer.from_pretrained(PATH)",
              "model = AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True)"]
    if source in ("sft", "rl"):
        lines += ["ids = tok.apply_chat_template([{'role': 'user', 'content': 'Why is the sky blue?'}],",
                  "                              add_generation_prompt=True, return_tensors='pt')",
                  "out = model.generate(ids, max_new_tokens=128, do_sample=True, temperature=0.6, top_k=50)"]
    else:
        lines += ["ids = tok('The capital of France is', return_tensors='pt').input_ids  # starts with <|bos|>",
                  "out = model.generate(ids, max_new_tokens=32)"]
    lines += ["print(tok.decode(out[0][ids.shape[1]:], skip_special_tokens=True))", "```", "",
              "With nanochat: `python -m scripts.chat_cli --hf-path PATH`, `python -m scripts.chat_web --hf-path PATH`.",
              "Evaluate: `lm_eval --model hf --model_args pretrained=PATH,trust_remote_code=True --tasks hellaswag`.",
              "", f"Exported {time.strftime('%Y-%m-%d')}.", ""]
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# Import


def load_export(path, device, phase, tokenizer=None):
    """(model, tokenizer, meta) from an export folder, as checkpoint.build_model returns them.
    The weights are used as stored, except bf16 on CPU/MPS, which is computed in fp32 there."""
    from nanochat.checkpoint import check_state_dict_fits, patch_model_config
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.tokenizer import Tokenizer

    load_file = require("safetensors.torch", "hf", "loading an exported model").load_file
    if phase not in ("train", "eval"):
        raise ValueError(f"phase must be 'train' or 'eval', not {phase!r}")
    if not is_export(path):
        raise NanochatError(f"{path} is not a nanochat model export (no config.json with model_type nanochat); "
                            f"write one with `python -m scripts.export`.")
    device = torch.device(device)
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        hf_config = json.load(f)
    gpt_fields = {f.name for f in fields(GPTConfig)}
    config = GPTConfig(**patch_model_config({k: v for k, v in hf_config.items() if k in gpt_fields}))
    tokenizer = tokenizer or Tokenizer.from_huggingface_json(os.path.join(path, "tokenizer.json"))
    if tokenizer.get_vocab_size() != config.vocab_size:
        raise NanochatError(f"the tokenizer in {path} has {tokenizer.get_vocab_size()} tokens but the model expects "
                            f"{config.vocab_size}; the export is inconsistent, export it again.")
    weights = os.path.join(path, "model.safetensors")
    if not os.path.isfile(weights):
        raise NanochatError(f"{weights} is missing; export the model again.")
    state = load_file(weights, device=str(device))
    compute_fp32 = device.type in ("cpu", "mps")
    # each tensor in its own fresh allocation: the file packs them at unaligned offsets, and CPU
    # matmul kernels round differently on unaligned data (the logits would not be bit-identical)
    state = {k: (v.float() if compute_fp32 and v.dtype == torch.bfloat16 else v).clone() for k, v in state.items()}
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()  # the rotary tables are not in the file
    check_state_dict_fits(state, model, f"the export in {path}")
    model.load_state_dict(state, strict=True, assign=True)
    model.train() if phase == "train" else model.eval()
    meta = dict(hf_config.get("nanochat") or {})
    meta["model_config"] = asdict(config)
    meta["hf_export"] = os.path.abspath(path)
    return model, tokenizer, meta
