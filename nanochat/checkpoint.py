"""Checkpoints (docs/training.md, "Checkpoints and resume"): save (atomic, per-rank optimizer shards, keep the last K),
find the latest, load for resuming and for inference.

Layout, the same as the original nanochat project's, so each reads the other's runs:
    base_dir/{base,chatsft,chatrl}_checkpoints/<model_tag>/
        model_{step:06d}.pt            state dict (rank 0)
        meta_{step:06d}.json           model_config, user_config, loop state ... (rank 0, written last)
        optim_{step:06d}_rank{r}.pt    optimizer shard of rank r
        state_{step:06d}_rank{r}.pt    rank r's dataloader position and RNG states (exact resume)
A step counts as saved once its meta file exists: every other file is written before it.
"""

import glob
import json
import os
import random
import re

import torch
import torch.distributed as dist

from nanochat.common import NanochatError, atomic_path, dist_rank_world, get_base_dir, logger

PHASE_DIRS = {"base": "base_checkpoints", "sft": "chatsft_checkpoints", "rl": "chatrl_checkpoints"}


def _barrier():
    if dist_rank_world()[1] > 1:
        dist.barrier()


def get_checkpoints_root(source):
    if source not in PHASE_DIRS:
        raise NanochatError(f"unknown checkpoint source {source!r}; use one of {', '.join(PHASE_DIRS)}.")
    return os.path.join(get_base_dir(), PHASE_DIRS[source])


def _torch_save(obj, path):
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def save_checkpoint(checkpoint_dir, step, model_data, optimizer_data, meta_data, rank=0, extra_state=None, keep_last=-1):
    """Every rank calls this. Rank 0 writes the model; every rank writes its optimizer shard and
    extra state; after a barrier rank 0 writes the meta, which marks the step complete.
    keep_last > 0 removes older steps (each rank its own shards)."""
    os.makedirs(checkpoint_dir, exist_ok=True)
    if rank == 0:
        _torch_save(model_data, os.path.join(checkpoint_dir, f"model_{step:06d}.pt"))
    if optimizer_data is not None:
        _torch_save(optimizer_data, os.path.join(checkpoint_dir, f"optim_{step:06d}_rank{rank}.pt"))
    if extra_state is not None:
        _torch_save(extra_state, os.path.join(checkpoint_dir, f"state_{step:06d}_rank{rank}.pt"))
    _barrier()
    if rank == 0:
        with atomic_path(os.path.join(checkpoint_dir, f"meta_{step:06d}.json")) as tmp, open(tmp, "w") as f:
            json.dump(meta_data, f, indent=2)
        logger.info(f"Saved checkpoint step {step} to {checkpoint_dir}")
    if keep_last > 0:
        # every rank lists the steps while all metas still exist, then they delete: otherwise a
        # slow rank could list after rank 0 removed an old meta and leave its own shard behind
        _barrier()
        old_steps = sorted(list_steps(checkpoint_dir))[:-keep_last]
        _barrier()
        for old in old_steps:
            own = [f"optim_{old:06d}_rank{rank}.pt", f"state_{old:06d}_rank{rank}.pt"]
            if rank == 0:  # the meta goes first so a half-deleted step never looks complete
                own = [f"meta_{old:06d}.json", f"model_{old:06d}.pt"] + own
            for name in own:
                path = os.path.join(checkpoint_dir, name)
                if os.path.exists(path):
                    os.remove(path)


def list_steps(checkpoint_dir):
    """Steps with both a model file and a meta file (a meta is written last)."""
    steps = []
    for path in glob.glob(os.path.join(checkpoint_dir, "model_*.pt")):
        m = re.search(r"model_(\d+)\.pt$", path)
        if m and os.path.exists(os.path.join(checkpoint_dir, f"meta_{int(m.group(1)):06d}.json")):
            steps.append(int(m.group(1)))
    return steps


def find_last_step(checkpoint_dir):
    steps = list_steps(checkpoint_dir)
    if not steps:
        raise NanochatError(f"no complete checkpoint in {checkpoint_dir}; train one first or check --model-tag.")
    return max(steps)


def find_largest_model(checkpoints_root):
    """The tag to load when none is given: the largest d<N>, else the most recently modified."""
    if not os.path.isdir(checkpoints_root):
        raise NanochatError(f"no checkpoints in {checkpoints_root}; train a model first.")
    tags = [t for t in os.listdir(checkpoints_root) if os.path.isdir(os.path.join(checkpoints_root, t))]
    if not tags:
        raise NanochatError(f"no checkpoints in {checkpoints_root}; train a model first.")
    depth_tags = [(int(m.group(1)), t) for t in tags if (m := re.fullmatch(r"d(\d+)", t))]
    if depth_tags:
        return max(depth_tags)[1]
    return max(tags, key=lambda t: os.path.getmtime(os.path.join(checkpoints_root, t)))


def _load(path, device):
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise NanochatError(f"{path} is missing, so that checkpoint is incomplete; resume or load another step.") from None
    except torch.OutOfMemoryError:  # not the file's fault
        raise
    except Exception as e:
        raise NanochatError(f"{path} is unreadable or truncated ({type(e).__name__}); delete that step or resume from another.") from None


def _load_meta(path):
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NanochatError(f"{path} is unreadable or not valid JSON ({type(e).__name__}); delete that step or "
                            f"resume from another.") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model_config"), dict):
        raise NanochatError(f"{path} has no model_config; it is not a nanochat checkpoint meta file.")
    return meta


def load_checkpoint(checkpoint_dir, step, device, load_optimizer=False, rank=0, load_state=False):
    """(model_data, optimizer_data or None, meta[, extra_state or None])."""
    meta_path = os.path.join(checkpoint_dir, f"meta_{step:06d}.json")
    if not os.path.exists(meta_path):
        raise NanochatError(f"no checkpoint for step {step} in {checkpoint_dir} (no {os.path.basename(meta_path)}).")
    meta = _load_meta(meta_path)
    model_data = _load(os.path.join(checkpoint_dir, f"model_{step:06d}.pt"), device)
    optimizer_data = None
    if load_optimizer:
        optimizer_data = _load(os.path.join(checkpoint_dir, f"optim_{step:06d}_rank{rank}.pt"), device)
    if load_state:
        path = os.path.join(checkpoint_dir, f"state_{step:06d}_rank{rank}.pt")
        extra = _load(path, "cpu") if os.path.exists(path) else None
        return model_data, optimizer_data, meta, extra
    return model_data, optimizer_data, meta


def patch_model_config(config):
    """The GPTConfig fields of a checkpoint's model_config; older checkpoints predate
    window_pattern, which then means full attention everywhere (they were trained that way)."""
    from dataclasses import fields

    from nanochat.gpt import GPTConfig

    config = dict(config)
    config.setdefault("window_pattern", "L")
    unknown = sorted(set(config) - {f.name for f in fields(GPTConfig)})
    if unknown:
        raise NanochatError(f"the checkpoint's model_config has fields this version does not know ({', '.join(unknown)}); "
                            f"load it with the nanochat version that wrote it.")
    return config


def _patch_state_dict(model_data, model):
    """Strip torch.compile's prefix; fill parameters older checkpoints lack with their neutral values."""
    model_data = {k.removeprefix("_orig_mod."): v for k, v in model_data.items()}
    n_layer = model.config.n_layer
    defaults = {
        "resid_lambdas": lambda: torch.ones(n_layer),
        "x0_lambdas": lambda: torch.zeros(n_layer),
    }
    for key, make in defaults.items():
        if key not in model_data and key in model.state_dict():
            model_data[key] = make()
    return model_data


def check_state_dict_fits(model_data, model, what):
    """NanochatError naming the first few missing, unexpected and mis-shaped tensors, if any."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in model_data]
    unexpected = [k for k in model_data if k not in expected]
    mis_shaped = [f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in model_data.items()
                  if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    problems = [f"{label}: {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}"
                for label, items in (("missing", missing), ("unexpected", unexpected), ("shape (saved vs model)", mis_shaped))
                if items]
    if problems:
        raise NanochatError(f"{what} does not fit its model config ({'; '.join(problems)}); "
                            f"it was written by a different model or nanochat version.")


def build_model(checkpoint_dir, step, device, phase, tokenizer=None):
    """Rebuild the model of a checkpoint: (model, tokenizer, meta). phase is "train" or "eval"."""
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.tokenizer import get_tokenizer

    if phase not in ("train", "eval"):
        raise ValueError(f"phase must be 'train' or 'eval', not {phase!r}")
    from nanochat import hf_export
    if hf_export.is_export(checkpoint_dir):  # a Hugging Face model folder from scripts/export.py
        return hf_export.load_export(checkpoint_dir, device, phase, tokenizer)
    device = torch.device(device)
    model_data, _, meta = load_checkpoint(checkpoint_dir, step, device)
    config = GPTConfig(**patch_model_config(meta["model_config"]))
    tokenizer = tokenizer or get_tokenizer()
    if tokenizer.get_vocab_size() != config.vocab_size:
        raise NanochatError(f"the tokenizer has {tokenizer.get_vocab_size()} tokens but the model in {checkpoint_dir} "
                            f"expects {config.vocab_size}; use the tokenizer the model was trained with.")
    if device.type in ("cpu", "mps"):  # bf16 weights from a GPU run: compute in fp32 here
        model_data = {k: v.float() if v.dtype == torch.bfloat16 else v for k, v in model_data.items()}
    try:
        with torch.device("meta"):
            model = GPT(config)  # an impossible config (heads not dividing the width ...) raises NanochatError
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise NanochatError(f"the model_config in {checkpoint_dir} step {step} is invalid ({e}); "
                            f"the meta file is damaged or not from nanochat.") from None
    model.to_empty(device=device)
    model.init_weights()  # rotary buffers are not in the state dict
    model_data = _patch_state_dict(model_data, model)
    check_state_dict_fits(model_data, model, f"the checkpoint in {checkpoint_dir} step {step}")
    model.load_state_dict(model_data, strict=True, assign=True)
    model.train() if phase == "train" else model.eval()
    return model, tokenizer, meta


def resolve_checkpoint(source, model_tag=None, step=None):
    """(checkpoint_dir, step) for a source, defaulting to the largest tag and its last step.
    A model_tag that is a path (it has a slash, or starts with . or ~) names an exported model
    folder instead: it resolves to that folder and the step it was exported at; build_model then
    loads it."""
    if model_tag and ("/" in model_tag or os.sep in model_tag or model_tag.startswith((".", "~"))):
        from nanochat import hf_export
        path = os.path.abspath(os.path.expanduser(model_tag))
        if not hf_export.is_export(path):
            raise NanochatError(f"{model_tag} is not a nanochat model export (no config.json with model_type "
                                f"nanochat); write one with `python -m scripts.export` or pass a model tag.")
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            exported_step = (json.load(f).get("nanochat") or {}).get("step")
        if step is not None and step >= 0 and exported_step is not None and step != exported_step:
            raise NanochatError(f"{path} holds step {exported_step}, not step {step}; drop --step to load it.")
        return path, exported_step if exported_step is not None else 0
    root = get_checkpoints_root(source)
    model_tag = model_tag or find_largest_model(root)
    checkpoint_dir = os.path.join(root, model_tag)
    if not os.path.isdir(checkpoint_dir):
        raise NanochatError(f"no checkpoints for model tag {model_tag!r} in {root}.")
    if step is None or step < 0:
        step = find_last_step(checkpoint_dir)
    return checkpoint_dir, step


def load_model(source, device, phase, model_tag=None, step=None):
    """(model, tokenizer, meta) for source in {base, sft, rl}."""
    checkpoint_dir, step = resolve_checkpoint(source, model_tag, step)
    logger.info(f"Loading {source} model from {checkpoint_dir} at step {step}")
    return build_model(checkpoint_dir, step, device, phase)


def load_optimizer_state(source, device, rank, model_tag=None, step=None):
    """This rank's optimizer shard, or None (with a log line) when the file is missing."""
    checkpoint_dir, step = resolve_checkpoint(source, model_tag, step)
    path = os.path.join(checkpoint_dir, f"optim_{step:06d}_rank{rank}.pt")
    if not os.path.exists(path):
        logger.info(f"no optimizer state at {path}; starting the optimizer fresh")
        return None
    return _load(path, device)


# ---- resume helpers shared by the training scripts ----

def rng_state(device):
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def append_log(path, record):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_log(path, before_step):
    """On resume, forget log lines of the steps about to be redone."""
    if not os.path.exists(path):
        return
    def keep(line):
        try:
            return json.loads(line).get("step", 0) < before_step
        except (json.JSONDecodeError, AttributeError):  # a line cut short by a crash
            return False

    with open(path) as f:
        lines = [ln if ln.endswith("\n") else ln + "\n" for ln in f if ln.strip() and keep(ln)]
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.writelines(lines)
