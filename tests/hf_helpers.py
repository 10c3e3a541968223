"""A tiny nanochat model for the Hugging Face export and lm-eval tests, and its export.

The weights are random draws, not an init or a short training run: every path of the network
(smear, backout, value embeddings and their gates, per-layer scalars) then contributes, and the
logits are spread enough that greedy choices are never near ties. Three layers with windows "SL"
and sequence_len 64 give a short window of 128 and a long one of 64, so a text of 200 tokens
crosses both; two query heads share one key/value head (GQA).
"""

import os

import torch
from helpers import make_tokenizer, synthetic_texts

from nanochat.checkpoint import save_checkpoint
from nanochat.gpt import GPT, GPTConfig

SEQ_LEN = 64
MODEL_TAG = "tiny"
STEP = 7


def random_model(vocab_size, seed=0):
    config = GPTConfig(sequence_len=SEQ_LEN, vocab_size=vocab_size, n_layer=3, n_head=2, n_kv_head=1, n_embd=64,
                       window_pattern="SL")
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            std = p.shape[-1] ** -0.5 if p.ndim == 2 else 0.1
            p.copy_(torch.randn(p.shape, generator=g) * std)
        model.resid_lambdas.add_(1.0)
        model.smear_lambda.fill_(0.5)
        model.backout_lambda.fill_(0.3)
        model.lm_head.weight.mul_(4.0)  # spread logits: no near-ties in greedy choices
    return model.eval()


def make_tiny_export(base_dir, export_dir, dtype="float32"):
    """Tokenizer + a random base checkpoint (tag 'tiny', step 7) under base_dir, exported to
    export_dir with scripts/export.py. Returns (model, tokenizer)."""
    from helpers import _env

    from scripts import export

    # 400 tokens: most words of the synthetic grammar are then single tokens (one-token answers)
    tokenizer = make_tokenizer(base_dir, synthetic_texts(200, seed=123) + ["def f(x):\n    return x + 1\n"] * 20,
                               vocab_size=400)
    model = random_model(tokenizer.get_vocab_size())
    with _env(NANOCHAT_BASE_DIR=base_dir):
        save_checkpoint(os.path.join(base_dir, "base_checkpoints", MODEL_TAG), STEP, model.state_dict(), None,
                        {"step": STEP, "val_bpb": 1.2345, "model_config": model.config.__dict__,
                         "user_config": {"depth": 3}, "total_batch_size": 128})
        export.main(["-i", "base", "-g", MODEL_TAG, "-o", str(export_dir), "--dtype", dtype])
    return model, tokenizer
