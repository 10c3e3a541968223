"""Hugging Face configuration of a nanochat GPT: every field of nanochat's GPTConfig under its own
name, plus the names transformers and its tools look up (hidden_size, num_hidden_layers,
max_position_embeddings ...). Shipped inside an export; needs transformers only."""

from transformers import PretrainedConfig


class NanochatConfig(PretrainedConfig):
    model_type = "nanochat"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]
    # the common names, as aliases of nanochat's: tools (lm-eval's context length, pipelines) read these
    attribute_map = {
        "hidden_size": "n_embd",
        "num_hidden_layers": "n_layer",
        "num_attention_heads": "n_head",
        "num_key_value_heads": "n_kv_head",
        "max_position_embeddings": "sequence_len",
    }

    def __init__(self, sequence_len=2048, vocab_size=32768, n_layer=12, n_head=6, n_kv_head=6, n_embd=768,
                 window_pattern="SSSL", padded_vocab_size=None, use_cache=True, **kwargs):
        self.sequence_len = sequence_len  # the training context; also the long attention window
        self.vocab_size = vocab_size  # the tokenizer's; logits are sliced to it
        self.n_layer = n_layer
        self.n_head = n_head
        self.n_kv_head = n_kv_head
        self.n_embd = n_embd
        self.window_pattern = window_pattern  # S/L per layer, tiled; the last layer is always L
        # the embedding and lm_head tables are padded to a multiple of 64 rows
        self.padded_vocab_size = padded_vocab_size or -(-vocab_size // 64) * 64
        self.use_cache = use_cache
        kwargs["tie_word_embeddings"] = False  # wte and lm_head are separate tables
        super().__init__(**kwargs)
