"""The GPT model (docs/model.md walks it with every constant's reason): config, modules, initialization, forward with an optional KV
cache, FLOP and parameter accounting, optimizer parameter groups, and a naive sampler.

Shape of the network, in forward order:
    token embedding -> RMSNorm -> smear -> x0
    per layer i: x = resid_lambdas[i]*x + x0_lambdas[i]*x0; x += attn(norm(x)); x += mlp(norm(x))
    backout (subtract a mid-network snapshot) -> RMSNorm -> lm_head -> softcap 15 (fp32) -> loss

The model is built on the meta device by its callers, then materialized:

    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()

Parameter names are those of the original nanochat project's state dict, so its checkpoints
load as they are.
Precision is explicit (no autocast): Linear weights are fp32 masters cast to the activation
dtype in forward; embeddings are stored in COMPUTE_DTYPE (fp32 when that is fp16).
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from nanochat.attention import decode_attention, decode_mask, flash_attn_func, flash_attn_with_kvcache
from nanochat.common import COMPUTE_DTYPE, NanochatError
from nanochat.kernels import apply_rotary_emb, relu_squared, softcap_cross_entropy


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6  # query heads
    n_kv_head: int = 6  # key/value heads (GQA when fewer than n_head)
    n_embd: int = 768
    window_pattern: str = "SSSL"  # tiled over layers; the last layer is always L (see compute_window_sizes)

    @classmethod
    def from_depth(cls, depth, aspect_ratio=64, head_dim=128, **kwargs):
        """The shape --depth stands for: width depth*aspect_ratio rounded up to whole
        heads of head_dim, as many kv heads as query heads. kwargs: the other fields."""
        n_embd = -(-depth * aspect_ratio // head_dim) * head_dim
        n_head = n_embd // head_dim
        return cls(n_layer=depth, n_head=n_head, n_kv_head=n_head, n_embd=n_embd, **kwargs)


ROPE_BASE = 100_000  # not the usual 1e4: the slowest channels still tell positions apart at 2048+
QK_SCALE = 1.2  # q and k are each multiplied by 1.2 after QK-norm: sharper attention than unit norms allow
VE_GATE_CHANNELS = 12  # the value-embedding gate reads the first 12 channels: enough to decide, nearly free
SMEAR_CHANNELS = 24  # the smear gate reads the first 24 channels, for the same reason
SOFTCAP = 15.0  # logits bounded to +-15: steadier early training, and the fused loss needs no max-subtraction


def norm(x):
    """RMSNorm over the last dim with no learnable weight (the residual scalars do the scaling)."""
    return F.rms_norm(x, (x.size(-1),))


def has_ve(layer_idx, n_layer):
    """Value embeddings on alternating layers, the last one always included."""
    return layer_idx % 2 == (n_layer - 1) % 2


class Linear(nn.Linear):
    """A bias-free Linear whose fp32 master weight is cast to the input's dtype (replaces autocast)."""

    def __init__(self, in_features, out_features, bias=False, device=None, dtype=None):
        assert not bias, "nanochat has no biases"
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)

    def forward(self, x):
        w = self.weight
        return F.linear(x, w if w.dtype == x.dtype else w.to(dtype=x.dtype))  # a no-op .to still costs a call


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        d, hd = config.n_embd, self.head_dim
        self.c_q = Linear(d, self.n_head * hd)
        self.c_k = Linear(d, self.n_kv_head * hd)
        self.c_v = Linear(d, self.n_kv_head * hd)
        self.c_proj = Linear(d, d)
        self.ve_gate = Linear(VE_GATE_CHANNELS, self.n_kv_head) if has_ve(layer_idx, config.n_layer) else None

    def forward(self, x, ve, cos, sin, window_size, kv_cache):
        B, T, C = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        # project; add the gated value embedding; RoPE; QK-norm; x1.2; attend; project (docs/model.md)
        fused = kv_cache.weights.qkv[self.layer_idx] if isinstance(kv_cache, DecodeStep) and kv_cache.weights else None
        if fused is not None:  # one matmul for q, k and v; q and k rotated and normed together
            qkv = F.linear(x, fused)
            qk = qkv[..., :(H + Hkv) * D].view(B, T, H + Hkv, D)
            v = qkv[..., (H + Hkv) * D:].view(B, T, Hkv, D)
        else:
            q = self.c_q(x).view(B, T, H, D)
            k = self.c_k(x).view(B, T, Hkv, D)
            v = self.c_v(x).view(B, T, Hkv, D)
        if ve is not None:
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))  # (B, T, Hkv) in (0, 3)
            v = v + gate.unsqueeze(-1) * ve.view(B, T, Hkv, D)
        if fused is not None:
            q, k = (norm(apply_rotary_emb(qk, cos, sin)) * QK_SCALE).split((H, Hkv), dim=2)
        else:
            q = norm(apply_rotary_emb(q, cos, sin)) * QK_SCALE
            k = norm(apply_rotary_emb(k, cos, sin)) * QK_SCALE
        if kv_cache is None:
            y = flash_attn_func(q, k, v, causal=True, window_size=window_size)
        elif isinstance(kv_cache, DecodeStep):  # one token per row, rows at their own positions
            y = decode_attention(q, k, v, kv_cache.k_cache, kv_cache.v_cache, self.layer_idx, kv_cache.pos,
                                 kv_cache.mask(window_size[0]), enable_gqa=H != Hkv, slots=kv_cache.slots)
        else:
            k_cache, v_cache = kv_cache.get_layer_cache(self.layer_idx)
            y = flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=kv_cache.cache_seqlens,
                                        causal=True, window_size=window_size)
        return self.c_proj(y.reshape(B, T, C))


class DecodeStep:
    """The cache for a decode step: one new token per row, each row at its own position. Holds the
    whole cache tensors (n_layer, R, T_max, Hkv, D) and the previous embeddings (R, 1, n_embd) of
    R >= B rows (the step uses the first B), per-row positions pos (B,) int64, and kv_len, how
    many cache slots attention reads (> max(pos); a bucket, so that few shapes occur). Every
    tensor is written in place, so the step has static shapes and no host syncs: torch.compile
    and CUDA graphs can capture it whole. `weights` (DecodeWeights, optional) makes an eager step
    leaner: fused q/k/v matrices and the per-layer scalars as Python numbers."""

    def __init__(self, k_cache, v_cache, prev_embedding, pos, kv_len, weights=None):
        self.k_cache, self.v_cache, self.prev_embedding = k_cache, v_cache, prev_embedding
        self.pos, self.kv_len, self.weights = pos, kv_len, weights
        self.masks = {}
        self.slots = None
        if weights is not None:  # flat index of each row's new slot in one layer's cache, made once per step
            self.slots = torch.arange(pos.size(0), device=pos.device) * k_cache.size(2) + pos

    def mask(self, left):
        """(B, kv_len) visibility of the cache slots for a layer whose window reaches `left` back.
        An eager step turns it into additive form (0 seen, -inf hidden) once here, which attention
        would otherwise redo from the boolean form in every layer; the scores are the same."""
        if isinstance(self.kv_len, int) and left >= self.kv_len - 1:
            left = -1  # no slot read is further back than the window: the plain causal mask
            # (an exported step's kv_len is symbolic and keeps the window: this test would pin its range)
        if left not in self.masks:
            mask = decode_mask(self.pos, self.kv_len, left)
            if self.weights is not None:
                mask = torch.zeros(mask.shape, dtype=self.k_cache.dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
            self.masks[left] = mask
        return self.masks[left]


class DecodeWeights:
    """What an eager decode step reads instead of the parameters, built once per weight update:
    each layer's q, k and v matrices stacked into one (fewer, larger matmuls) and the scalars as
    Python floats (no tensor indexing per layer). The same numbers as the parameters."""

    @torch.no_grad()
    def __init__(self, model, dtype):
        self.qkv = [torch.cat((b.attn.c_q.weight, b.attn.c_k.weight, b.attn.c_v.weight)).to(dtype)
                    for b in model.transformer.h]
        self.resid = model.resid_lambdas.tolist()
        self.x0 = model.x0_lambdas.tolist()


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x):
        return self.c_proj(relu_squared(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos, sin, window_size, kv_cache):
        x = x + self.attn(norm(x), ve, cos, sin, window_size, kv_cache)
        x = x + self.mlp(norm(x))
        return x


def _check_config(config):
    if config.n_embd % config.n_head != 0:
        raise NanochatError(f"n_embd={config.n_embd} is not a multiple of n_head={config.n_head}; pick a width divisible by the head count.")
    if config.n_head % config.n_kv_head != 0:
        raise NanochatError(f"n_head={config.n_head} is not a multiple of n_kv_head={config.n_kv_head}; GQA needs whole groups.")
    if (config.n_embd // config.n_head) % 2 != 0:
        raise NanochatError(f"head dim {config.n_embd // config.n_head} is odd; RoPE needs an even head dim.")
    if not config.window_pattern or any(c not in "SL" for c in config.window_pattern.upper()):
        raise NanochatError(f"window pattern {config.window_pattern!r} must be made of the letters S and L, e.g. SSSL or L.")


def compute_window_sizes(config):
    """Per-layer (left, right) windows: L = sequence_len (not unlimited), S = a quarter
    of it rounded up to a multiple of 128; the pattern is tiled and the last layer forced to L."""
    long_window = config.sequence_len
    short_window = -(-config.sequence_len // (4 * 128)) * 128  # ceil(seq/4/128)*128: 2048 -> 512
    pattern = config.window_pattern.upper()
    sizes = [((long_window if pattern[i % len(pattern)] == "L" else short_window), 0) for i in range(config.n_layer)]
    sizes[-1] = (long_window, 0)
    return sizes


class GPT(nn.Module):
    def __init__(self, config, pad_vocab_size_to=64):
        super().__init__()
        _check_config(config)
        self.config = config
        # vocab padded to a multiple of 64 for wte, lm_head and the VE tables (matmul-friendly shapes);
        # logits are sliced back
        padded_vocab = -(-config.vocab_size // pad_vocab_size_to) * pad_vocab_size_to
        self.padded_vocab_size = padded_vocab
        head_dim = config.n_embd // config.n_head
        kv_dim = config.n_kv_head * head_dim
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(padded_vocab, config.n_embd),
            "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        })
        self.lm_head = Linear(config.n_embd, padded_vocab)  # untied from wte
        # per-layer residual scalars; placeholder values, real ones in init_weights()
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        # smear (cheap bigram mixing) and backout; shape (1,), not 0-D, to match the checkpoint format
        self.smear_gate = Linear(SMEAR_CHANNELS, 1)
        self.smear_lambda = nn.Parameter(torch.zeros(1))
        self.backout_lambda = nn.Parameter(torch.full((1,), 0.2))
        self.value_embeds = nn.ModuleDict({
            str(i): nn.Embedding(padded_vocab, kv_dim) for i in range(config.n_layer) if has_ve(i, config.n_layer)
        })
        self.window_sizes = compute_window_sizes(config)
        # RoPE tables for 10x the training length, so generation can run past it; not saved in checkpoints
        self.rotary_seq_len = 10 * config.sequence_len
        cos, sin = self._precompute_rotary(self.rotary_seq_len, head_dim)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        # trade compute for memory: recompute each block in backward (set by the training script)
        self.activation_checkpointing = False
        # loss head: True = chunked fused softcap+CE (fast on CPU, no (N, V) logits in memory);
        # False = plain ops (what torch.compile fuses well on CUDA); None = fused except on CUDA
        self.fused_loss = None

    def _precompute_rotary(self, seq_len, head_dim, base=ROPE_BASE, device=None):
        """cos/sin of position * base^(-2i/head_dim), computed in fp32, stored in COMPUTE_DTYPE,
        shaped (1, seq_len, 1, head_dim/2) to broadcast over (B, T, H, D/2)."""
        channel = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
        inv_freq = 1.0 / (base ** (channel / head_dim))
        t = torch.arange(seq_len, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq)
        cos, sin = freqs.cos().to(COMPUTE_DTYPE), freqs.sin().to(COMPUTE_DTYPE)
        return cos[None, :, None, :], sin[None, :, None, :]

    @torch.no_grad()
    def init_weights(self):
        """Real initialization after to_empty(). The random draws come in a fixed order (wte,
        lm_head, each block's c_q, c_k, c_v, c_fc, the smear gate, the value-embedding tables,
        the value-embedding gates) so that one seed gives the same weights as the original
        nanochat project, and bench/reference_lockstep.py can compare runs step for step."""
        cfg = self.config
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=0.8)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        s = 3**0.5 * cfg.n_embd**-0.5  # uniform(-s, s) has std 1/sqrt(d)
        for block in self.transformer.h:
            nn.init.uniform_(block.attn.c_q.weight, -s, s)
            nn.init.uniform_(block.attn.c_k.weight, -s, s)
            nn.init.uniform_(block.attn.c_v.weight, -s, s)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.uniform_(block.mlp.c_fc.weight, -0.4 * s, 0.4 * s)
            nn.init.zeros_(block.mlp.c_proj.weight)
        # residual scalars ramp linearly over depth; computed in Python floats (double), then rounded once
        last = max(cfg.n_layer - 1, 1)
        self.resid_lambdas.copy_(torch.tensor([1.15 - 0.10 * i / last for i in range(cfg.n_layer)]))
        self.x0_lambdas.copy_(torch.tensor([0.20 - 0.15 * i / last for i in range(cfg.n_layer)]))
        self.smear_lambda.fill_(0.0)
        self.backout_lambda.fill_(0.2)
        nn.init.uniform_(self.smear_gate.weight, 0.0, 0.02)
        for table in self.value_embeds.values():  # layer order
            nn.init.uniform_(table.weight, -s, s)
        for block in self.transformer.h:
            if block.attn.ve_gate is not None:
                nn.init.uniform_(block.attn.ve_gate.weight, 0.0, 0.02)
        device = self.transformer.wte.weight.device
        cos, sin = self._precompute_rotary(self.rotary_seq_len, cfg.n_embd // cfg.n_head, device=device)
        self.cos, self.sin = cos, sin
        # embeddings live in the compute dtype to save memory, except fp16 (GradScaler can't unscale fp16 grads)
        if COMPUTE_DTYPE != torch.float16:
            self.transformer.wte.to(dtype=COMPUTE_DTYPE)
            for table in self.value_embeds.values():
                table.to(dtype=COMPUTE_DTYPE)

    def get_device(self):
        return self.transformer.wte.weight.device

    # -------------------------------------------------------------------------
    # forward

    def _smear(self, x, prev):
        """x_t += smear_lambda * sigmoid(smear_gate(x_t[:24])) * x_{t-1}. `prev` is the embedding
        before this chunk (KV-cache decode); without it position 0 is left unchanged."""
        lam = self.smear_lambda.to(x.dtype)
        if prev is None:
            if x.size(1) == 1:
                return x
            gate = lam * torch.sigmoid(self.smear_gate(x[:, 1:, :SMEAR_CHANNELS]))
            return torch.cat((x[:, :1], x[:, 1:] + gate * x[:, :-1]), dim=1)
        shifted = prev.to(x.dtype) if x.size(1) == 1 else torch.cat((prev.to(x.dtype), x[:, :-1]), dim=1)
        gate = lam * torch.sigmoid(self.smear_gate(x[..., :SMEAR_CHANNELS]))
        return x + gate * shifted

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean", last_only=False):
        """idx (B, T) token ids. Without targets: fp32 softcapped logits (B, T, vocab_size). With
        targets (-1 = ignore): the cross-entropy, reduced by 'mean' | 'sum' | 'none' (per token,
        flattened to (B*T,)).

        kv_cache: None (training, evaluation); a KVCache, whose rows all sit at one position:
        positions continue from it, the new keys/values are written into it and it is advanced
        by T at the end (prefill); or a DecodeStep: T = 1, each row at its own position, the
        cache and the previous embeddings updated in place (the Engine's decode step).

        last_only=True (without targets): logits of the last position only, (B, 1, vocab_size); a
        prefill samples from nothing else, and the other positions' lm_head is most of its cost."""
        B, T = idx.shape
        step = kv_cache if isinstance(kv_cache, DecodeStep) else None
        if step is not None:
            cos = self.cos[0, step.pos].unsqueeze(1)  # (B, 1, 1, D/2): per-row rotary positions
            sin = self.sin[0, step.pos].unsqueeze(1)
        else:
            pos = 0 if kv_cache is None else kv_cache.get_pos()
            assert pos + T <= self.cos.size(1), f"sequence of {pos + T} exceeds the rotary cache of {self.cos.size(1)}"
            cos, sin = self.cos[:, pos:pos + T], self.sin[:, pos:pos + T]

        x = norm(self.transformer.wte(idx).to(COMPUTE_DTYPE))
        # smear mixes in the previous position's *pre-smear* embedding, which a cache carries over
        if kv_cache is None:
            x = self._smear(x, None)
        elif step is not None:  # decode positions are >= 1: there always is a previous embedding
            prev = step.prev_embedding[:B]
            smeared = self._smear(x, prev)
            prev.copy_(x)
            x = smeared
        else:
            prev = kv_cache.prev_embedding
            kv_cache.prev_embedding = x[:, -1:].clone()
            x = self._smear(x, prev)
        x0 = x  # captured after smear

        checkpointing = self.activation_checkpointing and kv_cache is None and torch.is_grad_enabled()
        backout_at = self.config.n_layer // 2
        x_mid = None
        fast = step.weights if step is not None and step.weights else None
        resid, x0_lambdas = (fast.resid, fast.x0) if fast else (self.resid_lambdas, self.x0_lambdas)
        for i, block in enumerate(self.transformer.h):
            x = resid[i] * x + x0_lambdas[i] * x0  # before every block, block 0 included
            key = str(i)
            ve = self.value_embeds[key](idx).to(x.dtype) if key in self.value_embeds else None
            if checkpointing:
                x = checkpoint(block, x, ve, cos, sin, self.window_sizes[i], None, use_reentrant=False)
            else:
                x = block(x, ve, cos, sin, self.window_sizes[i], kv_cache)
            if i == backout_at:
                x_mid = x
        if kv_cache is not None and step is None:
            kv_cache.advance(T)  # only after the last layer has written its keys/values
        if last_only:
            x, x_mid = x[:, -1:], x_mid[:, -1:]
        x = x - self.backout_lambda.to(x.dtype) * x_mid
        x = norm(x)

        # lm_head -> slice off the vocab padding -> fp32 -> softcap 15; slicing the
        # weight instead of the logits skips the padded rows' matmul, same numbers
        weight = self.lm_head.weight[:self.config.vocab_size]
        use_fused = self.fused_loss if self.fused_loss is not None else not x.is_cuda
        if targets is not None and use_fused:
            return softcap_cross_entropy(x.reshape(-1, x.size(-1)), weight, targets.reshape(-1), SOFTCAP, loss_reduction)
        logits = F.linear(x, weight.to(x.dtype)).float()
        if logits.requires_grad:
            logits = SOFTCAP * torch.tanh(logits / SOFTCAP)
        else:  # the same ops in place (inference): no fresh (B, T, V) tensors
            logits = logits.div_(SOFTCAP).tanh_().mul_(SOFTCAP)
        if targets is None:
            return logits
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                               reduction=loss_reduction)

    # -------------------------------------------------------------------------
    # accounting (docs/model.md, "Accounting")

    def _matmul_params(self):
        """N_matmul: weights of every Linear (smear_gate included)."""
        return sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))

    def _attn_width(self):
        return self.config.n_head * (self.config.n_embd // self.config.n_head)

    def estimate_flops(self):
        """Training FLOPs per token (forward + backward): 6*N_matmul plus attention's
        12*H*hd*min(window, T) per layer, T = sequence_len."""
        T = self.config.sequence_len
        attn = sum(12 * self._attn_width() * min(w if w >= 0 else T, T) for w, _ in self.window_sizes)
        return 6 * self._matmul_params() + attn

    def num_scaling_params(self):
        """Parameter counts by role. The scaling-law count is transformer_matrices + lm_head."""
        counts = {
            "wte": self.transformer.wte.weight.numel(),
            "value_embeds": sum(p.numel() for p in self.value_embeds.parameters()),
            "lm_head": self.lm_head.weight.numel(),
            "transformer_matrices": sum(p.numel() for p in self.transformer.h.parameters()),
            "scalars": (self.resid_lambdas.numel() + self.x0_lambdas.numel() + self.smear_gate.weight.numel()
                        + self.smear_lambda.numel() + self.backout_lambda.numel()),
        }
        counts["total"] = sum(p.numel() for p in self.parameters())
        assert counts["total"] == sum(v for k, v in counts.items() if k != "total"), "parameter accounting is incomplete"
        return counts

    def decode_flops(self, context):
        """FLOPs to decode one token at `context` cached positions: 2*N_matmul + 4*H*hd*min(ctx, window) per layer."""
        attn = sum(4 * self._attn_width() * min(context, w if w >= 0 else context) for w, _ in self.window_sizes)
        return 2 * self._matmul_params() + attn

    def prefill_flops(self, num_tokens):
        """FLOPs to prefill `num_tokens` from an empty cache: token t attends to min(t, window) keys."""
        attn = 0
        for w, _ in self.window_sizes:
            w = num_tokens if w < 0 else w
            m = min(num_tokens, w)  # ramp 1..m, then flat at w
            keys = m * (m + 1) // 2 + (num_tokens - m) * w
            attn += 4 * self._attn_width() * keys
        return 2 * self._matmul_params() * num_tokens + attn

    def kv_bytes_per_token(self, dtype=COMPUTE_DTYPE):
        """Bytes of KV cache one token occupies: n_layer * 2 * n_kv_head * hd * itemsize."""
        hd = self.config.n_embd // self.config.n_head
        return self.config.n_layer * 2 * self.config.n_kv_head * hd * torch.empty((), dtype=dtype).element_size()

    def kv_bytes_read(self, context, dtype=COMPUTE_DTYPE):
        """KV cache bytes one decode step reads at `context` cached positions (windows respected)."""
        per_pos = self.kv_bytes_per_token(dtype) // self.config.n_layer
        return sum(per_pos * min(context, w if w >= 0 else context) for w, _ in self.window_sizes)

    # -------------------------------------------------------------------------
    # optimizer parameter groups (docs/model.md, "Parameter groups")

    def param_groups(self, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.0, scalar_lr=0.5):
        """The MuonAdamW parameter groups, each a dict tagged kind='adamw' or 'muon'."""
        dscale = (self.config.n_embd / 768) ** -0.5  # only on the three embedding-like AdamW groups

        def adamw(params, lr, betas, wd):
            return {"kind": "adamw", "params": params, "lr": lr, "betas": betas, "eps": 1e-10, "weight_decay": wd}

        groups = [
            adamw([self.lm_head.weight], unembedding_lr * dscale, (0.8, 0.96), 0.01),
            adamw([self.transformer.wte.weight], embedding_lr * dscale, (0.8, 0.995), 0.001),
            adamw(list(self.value_embeds.parameters()), embedding_lr * dscale * 0.5, (0.8, 0.995), 0.01),
            adamw([self.resid_lambdas], scalar_lr * 0.01, (0.8, 0.95), 0.05),
            adamw([self.x0_lambdas], scalar_lr, (0.96, 0.95), 0.0),
            # fixed LR 0.2, deliberately not scaled by anything the caller passes
            adamw([self.smear_gate.weight, self.smear_lambda, self.backout_lambda], 0.2, (0.8, 0.95), 0.0),
        ]
        # every matrix under the blocks (ve_gate included) goes to Muon, one group per shape, shapes sorted
        matrices = list(self.transformer.h.parameters())
        for shape in sorted({tuple(p.shape) for p in matrices}):
            groups.append({"kind": "muon", "params": [p for p in matrices if tuple(p.shape) == shape],
                           "lr": matrix_lr, "momentum": 0.95, "ns_steps": 5, "beta2": 0.9,
                           "weight_decay": weight_decay})
        grouped = [p for g in groups for p in g["params"]]
        assert len(grouped) == len(list(self.parameters())) and len({id(p) for p in grouped}) == len(grouped)
        for g in groups:
            g["initial_lr"] = g["lr"]  # schedules multiply initial_lr
        return groups

    def setup_optimizer(self, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.0, scalar_lr=0.5):
        from nanochat.optim import MuonAdamW
        return MuonAdamW(self.param_groups(unembedding_lr, embedding_lr, matrix_lr, weight_decay, scalar_lr))

    # -------------------------------------------------------------------------
    # naive sampler: the Engine's cross-check

    @torch.inference_mode()
    def generate(self, tokens, max_tokens, temperature=1.0, top_k=None, seed=42):
        """Naive batch-1 sampling without a KV cache (re-runs the whole sequence each step);
        yields token ids. Only used to cross-check the Engine."""
        assert isinstance(tokens, list)
        device = self.get_device()
        rng = None
        if temperature > 0:
            rng = torch.Generator(device=device)
            rng.manual_seed(seed)
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        for _ in range(max_tokens):
            logits = self.forward(ids)[:, -1, :]
            if top_k is not None and top_k > 0:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            if temperature > 0:
                probs = F.softmax(logits / temperature, dim=-1)
                next_id = torch.multinomial(probs, num_samples=1, generator=rng)
            else:
                next_id = torch.argmax(logits, dim=-1, keepdim=True)
            ids = torch.cat((ids, next_id), dim=1)
            yield next_id.item()

