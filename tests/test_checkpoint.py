"""nanochat/checkpoint.py: save/load round trips with per-rank shards, finding the
latest step, keep-last pruning, clear errors for damaged or mismatched checkpoints, the
conversions inference loading does (bf16 -> fp32 on CPU, `_orig_mod.`, patched old fields),
and loading a checkpoint written in the original nanochat's layout with plain torch.save/json."""

import json
import os
import random

import pytest
import torch
from helpers import make_tokenizer, synthetic_texts

from nanochat import checkpoint
from nanochat.checkpoint import (
    build_model,
    find_largest_model,
    find_last_step,
    list_steps,
    load_checkpoint,
    load_model,
    load_optimizer_state,
    save_checkpoint,
)
from nanochat.common import NanochatError
from nanochat.gpt import GPT, GPTConfig

VOCAB = 300
CONFIG = {"sequence_len": 32, "vocab_size": VOCAB, "n_layer": 2, "n_head": 2, "n_kv_head": 2, "n_embd": 64,
          "window_pattern": "L"}


def base_dir():
    return os.environ["NANOCHAT_BASE_DIR"]


def ckpt_root():
    return os.path.join(base_dir(), "base_checkpoints")


@pytest.fixture
def tokenizer():
    return make_tokenizer(base_dir(), vocab_size=VOCAB)


def make_model(seed=0, **overrides):
    config = GPTConfig(**{**CONFIG, **overrides})
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    model.init_weights()
    with torch.no_grad():  # the zero-initialized projections and lambdas would hide mix-ups
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def meta_for(model, step, **extra):
    return {"step": step, "model_config": dict(model.config.__dict__), **extra}


def tokens(n=2, T=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, T), generator=g)


def write_step(directory, step, with_meta=True):
    """Placeholder model (and meta) files for the step-finding tests."""
    os.makedirs(directory, exist_ok=True)
    open(os.path.join(directory, f"model_{step:06d}.pt"), "wb").close()
    if with_meta:
        with open(os.path.join(directory, f"meta_{step:06d}.json"), "w") as f:
            json.dump({"step": step, "model_config": CONFIG}, f)


def assert_one_sentence(error, *fragments):
    msg = str(error.value)
    assert "\n" not in msg and "Traceback" not in msg, msg
    for fragment in fragments:
        assert fragment in msg, msg


# ---------------------------------------------------------------------------------------------
# save / load


def test_round_trip_with_optimizer_shards_per_rank_meta_and_extra_state(tmp_path):
    model = make_model()
    directory = str(tmp_path / "ck")
    meta = meta_for(model, 7, val_bpb=1.25, user_config={"depth": 2}, loop_state={"min_val_bpb": 1.25})
    shards = {r: {"state": {0: {"exp_avg": torch.randn(3, 4), "step": r + 1}},
                  "param_groups": [{"lr": 0.1 * (r + 1), "params": [0]}]} for r in (0, 1)}
    extras = {r: {"loader": {"pq_idx": r, "buffer": [[1, 0, r, [3, 4]]]}, "rng": checkpoint.rng_state(torch.device("cpu"))}
              for r in (0, 1)}
    for r in (1, 0):  # what two ranks of one job write (no process group: no barrier needed)
        save_checkpoint(directory, 7, model.state_dict(), shards[r], meta, rank=r, extra_state=extras[r])
    assert sorted(os.listdir(directory)) == ["meta_000007.json", "model_000007.pt", "optim_000007_rank0.pt",
                                             "optim_000007_rank1.pt", "state_000007_rank0.pt", "state_000007_rank1.pt"]
    with open(os.path.join(directory, "meta_000007.json")) as f:
        assert f.read().startswith('{\n  "step": 7')  # indent 2, as the original nanochat writes it

    for r in (0, 1):
        model_data, optim_data, loaded_meta, extra = load_checkpoint(directory, 7, "cpu", load_optimizer=True, rank=r,
                                                                     load_state=True)
        assert loaded_meta == meta
        assert model_data.keys() == model.state_dict().keys()
        assert all(torch.equal(model_data[k], v) for k, v in model.state_dict().items())
        assert torch.equal(optim_data["state"][0]["exp_avg"], shards[r]["state"][0]["exp_avg"])
        assert optim_data["param_groups"] == shards[r]["param_groups"]
        assert extra["loader"] == extras[r]["loader"]
    # without the optional parts
    model_data, optim_data, loaded_meta = load_checkpoint(directory, 7, "cpu")
    assert optim_data is None and loaded_meta["step"] == 7


def test_rng_state_round_trip():
    device = torch.device("cpu")
    state = checkpoint.rng_state(device)
    a = (random.random(), torch.rand(3))
    checkpoint.set_rng_state(state, device)
    b = (random.random(), torch.rand(3))
    assert a[0] == b[0] and torch.equal(a[1], b[1])


def test_train_log_append_and_truncate(tmp_path):
    path = str(tmp_path / "new_dir" / "train_log.jsonl")  # the folder is created on first write
    for step in range(5):
        checkpoint.append_log(path, {"step": step, "loss": 1.0 / (step + 1)})
    checkpoint.append_log(path, {"step": 3, "val_bpb": 2.0})
    with open(path, "a") as f:
        f.write('{"step": 4, "lo')  # a line cut short by a crash
    checkpoint.truncate_log(path, 3)
    with open(path) as f:
        assert [json.loads(line)["step"] for line in f] == [0, 1, 2]
    assert os.listdir(tmp_path / "new_dir") == ["train_log.jsonl"]  # no temp file left


def test_find_last_step_uses_integer_max_and_ignores_malformed_or_incomplete_names(tmp_path):
    d = str(tmp_path)
    with pytest.raises(NanochatError) as e:
        find_last_step(d)
    assert_one_sentence(e, "no complete checkpoint")
    for step in (100, 99999, 999999):
        write_step(d, step)
    assert find_last_step(d) == 999999
    # a step past the 6-digit padding: a string comparison would pick 999999
    open(os.path.join(d, "model_1000000.pt"), "wb").close()
    json.dump({"step": 1000000, "model_config": CONFIG}, open(os.path.join(d, "meta_1000000.json"), "w"))
    assert find_last_step(d) == 1000000
    # malformed names, temp files and a model without its meta (a save that crashed) never count
    for name in ("model_abc.pt", "model_2000000.pt.tmp", "model_.pt", "model_3000000.ptx", "xmodel_4000000.pt",
                 "model_5e6.pt"):
        open(os.path.join(d, name), "wb").close()
    write_step(d, 6000000, with_meta=False)
    assert find_last_step(d) == 1000000
    assert sorted(list_steps(d)) == [100, 99999, 999999, 1000000]


def test_keep_last_removes_older_steps_of_every_kind(tmp_path):
    model = make_model()
    d = str(tmp_path)
    for step in range(1, 6):
        save_checkpoint(d, step, model.state_dict(), {"state": {}, "param_groups": []}, meta_for(model, step),
                        rank=0, extra_state={"loader": None}, keep_last=2)
    checkpoint.append_log(os.path.join(d, "train_log.jsonl"), {"step": 5})
    assert sorted(os.listdir(d)) == sorted([f"{kind}_{s:06d}{ext}" for s in (4, 5) for kind, ext in
                                            (("meta", ".json"), ("model", ".pt"), ("optim", "_rank0.pt"),
                                             ("state", "_rank0.pt"))] + ["train_log.jsonl"])
    assert find_last_step(d) == 5


def test_find_largest_model_prefers_the_deepest_d_tag(tmp_path):
    root = str(tmp_path / "base_checkpoints")
    with pytest.raises(NanochatError):
        find_largest_model(root)
    for tag in ("d2", "d10", "d9", "zzz"):
        os.makedirs(os.path.join(root, tag))
    assert find_largest_model(root) == "d10"  # integer, not string, comparison
    root2 = str(tmp_path / "other")
    for i, tag in enumerate(("b", "a", "c")):
        os.makedirs(os.path.join(root2, tag))
        os.utime(os.path.join(root2, tag), (1000 + i, 1000 + i))
    assert find_largest_model(root2) == "c"  # the most recently modified


# ---------------------------------------------------------------------------------------------
# damaged files: one clear sentence, not a pickle traceback


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_damaged_model_file_is_a_clear_error(tmp_path, tokenizer, damage):
    model = make_model()
    d = os.path.join(ckpt_root(), "d2")
    save_checkpoint(d, 3, model.state_dict(), None, meta_for(model, 3))
    path = os.path.join(d, "model_000003.pt")
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write({"truncate": data[:len(data) // 2], "garbage": b"not a checkpoint" * 10, "empty": b""}[damage])
    with pytest.raises(NanochatError) as e:
        load_model("base", "cpu", "eval")
    assert_one_sentence(e, "model_000003.pt is unreadable or truncated", "resume from another")
    with pytest.raises(NanochatError) as e:
        load_checkpoint(d, 3, "cpu")
    assert_one_sentence(e, "model_000003.pt")


def test_damaged_or_missing_meta_and_missing_files_are_clear_errors(tmp_path, tokenizer):
    model = make_model()
    d = str(tmp_path)
    save_checkpoint(d, 3, model.state_dict(), {"state": {}, "param_groups": []}, meta_for(model, 3))
    meta_path = os.path.join(d, "meta_000003.json")
    good = open(meta_path).read()
    open(meta_path, "w").write(good[:30])
    with pytest.raises(NanochatError) as e:
        load_checkpoint(d, 3, "cpu")
    assert_one_sentence(e, "meta_000003.json is unreadable or not valid JSON")
    open(meta_path, "w").write(json.dumps({"step": 3}))
    with pytest.raises(NanochatError) as e:
        load_checkpoint(d, 3, "cpu")
    assert_one_sentence(e, "has no model_config")
    open(meta_path, "w").write(good)
    with pytest.raises(NanochatError) as e:
        load_checkpoint(d, 4, "cpu")
    assert_one_sentence(e, "no checkpoint for step 4")
    with pytest.raises(NanochatError) as e:
        load_checkpoint(d, 3, "cpu", load_optimizer=True, rank=1)
    assert_one_sentence(e, "optim_000003_rank1.pt is missing")
    os.remove(os.path.join(d, "model_000003.pt"))
    with pytest.raises(NanochatError) as e:
        load_checkpoint(d, 3, "cpu")
    assert_one_sentence(e, "model_000003.pt is missing")


# ---------------------------------------------------------------------------------------------
# loading for inference


def save_and_load(model_data, meta, tag="d2", step=5):
    d = os.path.join(ckpt_root(), tag)
    os.makedirs(d, exist_ok=True)
    torch.save(model_data, os.path.join(d, f"model_{step:06d}.pt"))
    with open(os.path.join(d, f"meta_{step:06d}.json"), "w") as f:
        json.dump(meta, f)
    return load_model("base", "cpu", "eval")


def test_load_model_gives_the_saved_model(tokenizer):
    model = make_model(seed=1)
    loaded, tok, meta = save_and_load(model.state_dict(), meta_for(model, 5))
    assert not loaded.training and tok.get_vocab_size() == VOCAB and meta["step"] == 5
    x = tokens()
    assert torch.equal(loaded(x), model(x))
    loaded_train, _, _ = build_model(os.path.join(ckpt_root(), "d2"), 5, "cpu", "train")
    assert loaded_train.training


def test_bf16_checkpoint_loads_as_fp32_on_cpu(tokenizer):
    model = make_model(seed=2)
    data = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}  # e.g. written by a GPU run
    loaded, _, _ = save_and_load(data, meta_for(model, 5))
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    for name, p in loaded.state_dict().items():
        assert torch.equal(p, data[name].float()), name  # bf16 -> fp32 is exact
    reference = make_model(seed=2)
    reference.load_state_dict({k: v.float() for k, v in data.items()})
    x = tokens()
    assert torch.equal(loaded(x), reference(x))


def test_compile_prefix_is_stripped(tokenizer):
    model = make_model(seed=3)
    data = {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}
    loaded, _, _ = save_and_load(data, meta_for(model, 5))
    x = tokens()
    assert torch.equal(loaded(x), model(x))


def test_old_checkpoints_get_window_pattern_and_residual_scalars_patched(tokenizer):
    model = make_model(seed=4)
    with torch.no_grad():  # what a checkpoint without these parameters behaved as
        model.resid_lambdas.fill_(1.0)
        model.x0_lambdas.fill_(0.0)
    data = {k: v for k, v in model.state_dict().items() if k not in ("resid_lambdas", "x0_lambdas")}
    meta = meta_for(model, 5)
    del meta["model_config"]["window_pattern"]
    loaded, _, _ = save_and_load(data, meta)
    assert loaded.config.window_pattern == "L"
    assert torch.equal(loaded.resid_lambdas, torch.ones(2)) and torch.equal(loaded.x0_lambdas, torch.zeros(2))
    x = tokens()
    assert torch.equal(loaded(x), model(x))


def original_state_dict_names(n_layer):
    """The parameter names of the original nanochat's GPT, written out by hand."""
    names = ["transformer.wte.weight", "lm_head.weight", "resid_lambdas", "x0_lambdas", "smear_gate.weight",
             "smear_lambda", "backout_lambda"]
    for i in range(n_layer):
        names += [f"transformer.h.{i}.attn.c_q.weight", f"transformer.h.{i}.attn.c_k.weight",
                  f"transformer.h.{i}.attn.c_v.weight", f"transformer.h.{i}.attn.c_proj.weight",
                  f"transformer.h.{i}.mlp.c_fc.weight", f"transformer.h.{i}.mlp.c_proj.weight"]
        if i % 2 == (n_layer - 1) % 2:  # value embeddings: alternating layers, the last one included
            names += [f"transformer.h.{i}.attn.ve_gate.weight", f"value_embeds.{i}.weight"]
    return names


def test_original_layout_checkpoint_loads_and_gives_the_same_logits(tokenizer):
    """A checkpoint as the original nanochat's base_train writes it on a GPU: plain torch.save of the state
    dict under its names, embeddings in bf16, and its meta JSON."""
    n_layer, d, heads = 3, 64, 2
    model = make_model(seed=5, n_layer=n_layer, n_head=heads, n_kv_head=heads, window_pattern="SSL")
    ours = model.state_dict()
    padded = 320  # 300 rounded up to a multiple of 64
    shapes = {"transformer.wte.weight": (padded, d), "lm_head.weight": (padded, d), "resid_lambdas": (n_layer,),
              "x0_lambdas": (n_layer,), "smear_gate.weight": (1, 24), "smear_lambda": (1,), "backout_lambda": (1,)}
    for i in range(n_layer):
        h = f"transformer.h.{i}."
        shapes.update({h + "attn.c_q.weight": (d, d), h + "attn.c_k.weight": (d, d), h + "attn.c_v.weight": (d, d),
                       h + "attn.c_proj.weight": (d, d), h + "mlp.c_fc.weight": (4 * d, d),
                       h + "mlp.c_proj.weight": (d, 4 * d), h + "attn.ve_gate.weight": (heads, 12),
                       f"value_embeds.{i}.weight": (padded, d)})
    original = {}
    for name in original_state_dict_names(n_layer):
        tensor = ours[name].clone()
        assert tuple(tensor.shape) == shapes[name], name
        if name == "transformer.wte.weight" or name.startswith("value_embeds."):
            tensor = tensor.to(torch.bfloat16)  # the original keeps embedding tables in bf16 on GPU
        original[name] = tensor
    assert original.keys() == ours.keys()  # nothing of ours is left out of the original's list
    meta = {
        "step": 5,
        "val_bpb": 1.5,
        "model_config": {"sequence_len": 32, "vocab_size": VOCAB, "n_layer": n_layer, "n_head": heads,
                         "n_kv_head": heads, "n_embd": d, "window_pattern": "SSL"},
        "user_config": {"run": "dummy", "depth": n_layer, "aspect_ratio": 64, "head_dim": 32, "max_seq_len": 32},
        "device_batch_size": 2, "max_seq_len": 32, "total_batch_size": 64,
        "dataloader_state_dict": {"pq_idx": 0, "rg_idx": 3, "epoch": 1},
        "loop_state": {"min_val_bpb": 1.5, "smooth_train_loss": 3.0, "total_training_time": 12.0},
    }
    assert len(meta["model_config"]) == 7
    d_dir = os.path.join(ckpt_root(), "d3")
    os.makedirs(d_dir)
    torch.save(original, os.path.join(d_dir, "model_000005.pt"))
    with open(os.path.join(d_dir, "meta_000005.json"), "w") as f:
        json.dump(meta, f, indent=2)

    loaded, _, loaded_meta = load_model("base", "cpu", "eval")  # finds tag d3 and step 5 by itself
    assert loaded_meta["dataloader_state_dict"] == meta["dataloader_state_dict"]
    with torch.no_grad():  # the model it was made from, with its embeddings rounded as they were saved
        model.transformer.wte.weight.copy_(original["transformer.wte.weight"].float())
        for i, table in model.value_embeds.items():
            table.weight.copy_(original[f"value_embeds.{i}.weight"].float())
    x = tokens(T=32)
    assert torch.equal(loaded(x), model(x))


def test_vocab_mismatch_is_a_clear_error(tokenizer):
    model = make_model(seed=6)
    make_tokenizer(base_dir(), synthetic_texts(200, seed=9), vocab_size=VOCAB + 20)
    with pytest.raises(NanochatError) as e:
        save_and_load(model.state_dict(), meta_for(model, 5))
    assert_one_sentence(e, f"tokenizer has {VOCAB + 20} tokens", f"expects {VOCAB}")


@pytest.mark.parametrize("change", ["width", "layers", "unknown_field", "heads", "extra_tensor"])
def test_incompatible_config_is_a_clear_error(tokenizer, change):
    model = make_model(seed=7)
    data, meta = dict(model.state_dict()), meta_for(model, 5)
    expected = "does not fit its model config"
    if change == "width":
        meta["model_config"]["n_embd"] = 128
        expected = "shape (saved vs model): transformer.wte.weight (320, 64) vs (320, 128)"
    elif change == "layers":
        meta["model_config"]["n_layer"] = 3
        expected = "shape (saved vs model): resid_lambdas (2,) vs (3,)"
    elif change == "unknown_field":
        meta["model_config"]["n_experts"] = 8
        expected = "fields this version does not know (n_experts)"
    elif change == "heads":
        meta["model_config"]["n_head"] = 3
        expected = "not a multiple of n_head=3"
    elif change == "extra_tensor":
        data["transformer.h.0.attn.c_x.weight"] = torch.zeros(2)
        expected = "unexpected: transformer.h.0.attn.c_x.weight"
    with pytest.raises(NanochatError) as e:
        save_and_load(data, meta)
    assert_one_sentence(e, expected)


def test_load_optimizer_state_and_missing_sources(tokenizer):
    model = make_model()
    d = os.path.join(ckpt_root(), "d2")
    shard = {"state": {}, "param_groups": [{"lr": 0.5, "params": []}]}
    save_checkpoint(d, 2, model.state_dict(), shard, meta_for(model, 2))
    assert load_optimizer_state("base", "cpu", rank=0)["param_groups"] == shard["param_groups"]
    assert load_optimizer_state("base", "cpu", rank=1) is None  # logged, not raised
    with pytest.raises(NanochatError) as e:
        load_model("sft", "cpu", "eval")
    assert_one_sentence(e, "chatsft_checkpoints", "train a model first")
    with pytest.raises(NanochatError) as e:
        load_model("base", "cpu", "eval", model_tag="d7")
    assert_one_sentence(e, "no checkpoints for model tag 'd7'")
    with pytest.raises(NanochatError):
        load_model("nope", "cpu", "eval")
