"""A nanochat GPT as a Hugging Face `transformers` causal LM, for `trust_remote_code=True`.

Shipped inside an export by nanochat's `python -m scripts.export`; it needs torch and
transformers (tested with 4.57 and 5.24) and nothing from nanochat. The parameter names are
nanochat's own, so model.safetensors is nanochat's state dict. The math is nanochat's gpt.py,
in the same order, so fp32 logits agree with nanochat's to float rounding:

    token embedding -> RMSNorm -> smear (mix in the previous token's embedding) -> x0
    per layer i:  x = resid_lambdas[i] * x + x0_lambdas[i] * x0
                  x += attn(norm(x))   q,k,v projections; a gated value embedding added to v on
                                       alternate layers; RoPE (base 1e5); QK RMSNorm; q,k x 1.2;
                                       causal attention within the layer's window
                  x += mlp(norm(x))    ReLU^2
    backout (subtract backout_lambda x the output of layer n_layer // 2) -> RMSNorm -> lm_head
    -> slice to the real vocabulary -> fp32 -> softcap 15 * tanh(logits / 15)

The KV cache is the library's DynamicCache, so generate(), pipelines and lm-eval's `hf` backend
work as with any model. Padded batches (a 2D attention_mask, left padding for generation) are
supported: padding is never attended to and never smeared into a real token.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_nanochat import NanochatConfig

try:  # transformers 5: these skip tensors already loaded from a checkpoint
    from transformers import initialization as init
except ImportError:
    from torch.nn import init

ROPE_BASE = 100_000
QK_SCALE = 1.2  # q and k are scaled after their RMSNorm
VE_GATE_CHANNELS = 12  # the value-embedding gate reads the first 12 channels of the block input
SMEAR_CHANNELS = 24  # the smear gate reads the first 24 channels of the embedding
SOFTCAP = 15.0
# transformers 5 names the KV cache `cache` (argument and output field); 4.x named it `past_key_values`
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def norm(x):
    """RMSNorm over the last dim, no learnable weight."""
    return F.rms_norm(x, (x.size(-1),))


def has_value_embedding(layer_idx, n_layer):
    """Alternate layers, the last one always included."""
    return layer_idx % 2 == (n_layer - 1) % 2


def window_sizes(config):
    """Per layer, how many earlier tokens a query may see (besides itself): L = sequence_len,
    S = a quarter of it rounded up to a multiple of 128; the pattern is tiled and the last layer
    is L. The windows hold past sequence_len too (L is a window, not unlimited)."""
    long_window = config.sequence_len
    short_window = -(-config.sequence_len // (4 * 128)) * 128
    pattern = config.window_pattern.upper()
    sizes = [long_window if pattern[i % len(pattern)] == "L" else short_window for i in range(config.n_layer)]
    sizes[-1] = long_window
    return sizes


def rotary(positions, head_dim, dtype):
    """cos, sin of shape (B, T, 1, head_dim/2) for integer positions (B, T); angles in fp32."""
    channel = torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device)
    inv_freq = 1.0 / (ROPE_BASE ** (channel / head_dim))
    angles = positions.float()[..., None] * inv_freq
    return angles.cos().to(dtype)[:, :, None, :], angles.sin().to(dtype)[:, :, None, :]


def apply_rotary(x, cos, sin):
    """Half-split RoPE on (B, T, H, D) with nanochat's sign: it rotates by -theta."""
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


def attention_masks(windows, T, S, key_valid, device):
    """{window: mask} for T queries that are the last T of S positions. A mask is None for plain
    causal attention (no cache, no padding, the window covers the sequence), else a boolean
    (B|1, 1, T, S): key j is visible to query i iff j <= i, i - j <= window, and j is not padding.
    A query always sees itself, so that rows of padding stay finite."""
    delta = torch.arange(S - T, S, device=device)[:, None] - torch.arange(S, device=device)[None, :]
    masks = {}
    for w in set(windows):
        if key_valid is None and T == S and w >= T - 1:
            masks[w] = None
            continue
        mask = ((delta >= 0) & (delta <= w))[None, None]
        if key_valid is not None:
            mask = (mask & key_valid[:, None, None, :]) | (delta == 0)
        masks[w] = mask
    return masks


class NanochatAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        d, hd = config.n_embd, self.head_dim
        self.c_q = nn.Linear(d, self.n_head * hd, bias=False)
        self.c_k = nn.Linear(d, self.n_kv_head * hd, bias=False)
        self.c_v = nn.Linear(d, self.n_kv_head * hd, bias=False)
        self.c_proj = nn.Linear(d, d, bias=False)
        self.ve_gate = None
        if has_value_embedding(layer_idx, config.n_layer):
            self.ve_gate = nn.Linear(VE_GATE_CHANNELS, self.n_kv_head, bias=False)

    def forward(self, x, ve, cos, sin, mask, cache):
        B, T, C = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        q = self.c_q(x).view(B, T, H, D)
        k = self.c_k(x).view(B, T, Hkv, D)
        v = self.c_v(x).view(B, T, Hkv, D)
        if ve is not None:
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))  # (B, T, Hkv) in (0, 3)
            v = v + gate.unsqueeze(-1) * ve.view(B, T, Hkv, D)
        q = norm(apply_rotary(q, cos, sin)) * QK_SCALE  # RoPE first, then QK-norm
        k = norm(apply_rotary(k, cos, sin)) * QK_SCALE
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=H != Hkv)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class NanochatMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class NanochatBlock(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = NanochatAttention(config, layer_idx)
        self.mlp = NanochatMLP(config)

    def forward(self, x, ve, cos, sin, mask, cache):
        x = x + self.attn(norm(x), ve, cos, sin, mask, cache)
        return x + self.mlp(norm(x))


class NanochatPreTrainedModel(PreTrainedModel):
    config_class = NanochatConfig
    base_model_prefix = "model"
    _no_split_modules = ["NanochatBlock"]
    _supports_sdpa = True
    _supports_cache_class = True
    _supports_static_cache = False  # the smear reads the previous token's id, which a static cache does not keep

    def _init_weights(self, module):
        """For a fresh model (from_config): transformers' usual normal(0.02) tables and matrices and
        neutral scalars (plain residual stream, no x0 mixing, no smear, no backout). An export loads
        every tensor from model.safetensors instead."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, NanochatForCausalLM):
            init.ones_(module.resid_lambdas)
            init.zeros_(module.x0_lambdas)
            init.zeros_(module.smear_lambda)
            init.zeros_(module.backout_lambda)


class NanochatForCausalLM(NanochatPreTrainedModel, GenerationMixin):
    def __init__(self, config):
        super().__init__(config)
        V, d = config.padded_vocab_size, config.n_embd
        kv_dim = config.n_kv_head * (d // config.n_head)
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(V, d),
            "h": nn.ModuleList([NanochatBlock(config, i) for i in range(config.n_layer)]),
        })
        self.lm_head = nn.Linear(d, V, bias=False)  # not tied to wte
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        self.smear_gate = nn.Linear(SMEAR_CHANNELS, 1, bias=False)
        self.smear_lambda = nn.Parameter(torch.zeros(1))
        self.backout_lambda = nn.Parameter(torch.zeros(1))
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(V, kv_dim) for i in range(config.n_layer)
                                           if has_value_embedding(i, config.n_layer)})
        self.windows = window_sizes(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer.wte

    def set_input_embeddings(self, value):
        self.transformer.wte = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def prepare_inputs_for_generation(self, input_ids, *args, **kwargs):
        """The library's inputs, plus the token before the new ones: the smear of the first new
        token mixes in that token's embedding, which the KV cache does not hold."""
        inputs = super().prepare_inputs_for_generation(input_ids, *args, **kwargs)
        new = inputs.get("input_ids")
        if new is not None and 0 < new.size(1) < input_ids.size(1):
            inputs["prev_token_ids"] = input_ids[:, -new.size(1) - 1:-new.size(1)]
        return inputs

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, prev_token_ids=None, **kwargs):
        """input_ids (B, T); attention_mask (B, past + T), 1 = token, 0 = padding; a cache continues
        a sequence (generate() manages it). prev_token_ids (B, 1): the token before input_ids when a
        cache is given (generate() passes it; else the last token of the previous call is used).
        labels (B, T), -100 = ignored, are shifted inside, as for every transformers causal LM."""
        if inputs_embeds is not None or input_ids is None:
            raise ValueError("nanochat needs input_ids: its value embeddings and smear read the token ids")
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache()
        B, T = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        S = past + T
        device = input_ids.device

        key_valid = None  # (B, S) bool: which positions hold tokens (None: all of them)
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.size(1) < S:
                raise ValueError(f"attention_mask must be 2D (batch, past + new tokens = {S}), "
                                 f"got {tuple(attention_mask.shape)}")
            key_valid = attention_mask[:, -S:].bool()
            if bool(key_valid.all()):
                key_valid = None
        if position_ids is None:  # positions count tokens, not padding
            if key_valid is None:
                position_ids = torch.arange(past, S, device=device).expand(B, T)
            else:
                position_ids = (key_valid.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
        head_dim = self.config.n_embd // self.config.n_head
        wte = self.transformer.wte
        cos, sin = rotary(position_ids, head_dim, wte.weight.dtype)

        # smear: each token mixes in the previous token's (pre-smear) embedding, through a gate;
        # the first token of a sequence, and a token after padding, have no previous token
        x = norm(wte(input_ids))
        if past > 0:
            if prev_token_ids is None:
                prev_token_ids = getattr(cache, "nanochat_last_token_ids", None)
            if prev_token_ids is None:
                raise ValueError("continuing from a cache needs prev_token_ids (the token before input_ids)")
            prev = norm(wte(prev_token_ids.to(device).view(B, 1)))
        else:
            prev = torch.zeros_like(x[:, :1])
        shifted = torch.cat((prev, x[:, :-1]), dim=1)
        gate = self.smear_lambda * torch.sigmoid(self.smear_gate(x[..., :SMEAR_CHANNELS]))
        if key_valid is None:
            has_prev = (torch.arange(past, S, device=device) >= 1)[None, :]
        else:
            has_prev = torch.cat((key_valid.new_zeros(B, 1), key_valid), dim=1)[:, past:S]
        x = torch.where(has_prev[..., None], x + gate * shifted, x)
        if cache is not None:
            cache.nanochat_last_token_ids = input_ids[:, -1:]
        x0 = x

        masks = attention_masks(self.windows, T, S, key_valid, device)
        backout_at = self.config.n_layer // 2
        x_mid = None
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](input_ids) if str(i) in self.value_embeds else None
            x = block(x, ve, cos, sin, masks[self.windows[i]], cache)
            if i == backout_at:
                x_mid = x
        x = norm(x - self.backout_lambda * x_mid)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = F.linear(x, self.lm_head.weight[:self.config.vocab_size]).float()
        logits = SOFTCAP * torch.tanh(logits / SOFTCAP)

        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1).to(device),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache if use_cache else None})
