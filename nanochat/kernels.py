"""Hand-written autograd kernels for the model's hot spots, used in eager mode (under
torch.compile the model falls back to plain ops, which inductor fuses by itself):

    apply_rotary_emb       RoPE without temporaries; backward is the opposite rotation
    relu_squared           relu(x)^2 in one pass, backward without autograd's intermediates
    softcap_cross_entropy  lm_head matmul + logit softcap + cross-entropy, chunked over rows so
                           the (N, V) logits are never materialized

Each computes exactly what its plain-op formula in the docstring says; tests check them
against those formulas.
"""

import torch
import torch.nn.functional as F


def apply_rotary_emb(x, cos, sin):
    """Half-split RoPE on (B, T, H, D); cos/sin are (1, T, 1, D/2). Note the sign: this rotates
    by -theta (y1 = x1 cos + x2 sin, y2 = x2 cos - x1 sin); existing checkpoints were trained
    with this convention, so it stays."""
    if torch.compiler.is_compiling():  # inductor fuses the plain ops; the hand-fused version is for eager
        d = x.size(3) // 2
        x1, x2 = x[..., :d], x[..., d:]
        return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=3)
    if not (x.requires_grad and torch.is_grad_enabled()):  # inference: skip the autograd.Function's overhead
        if cos.dtype != x.dtype:
            cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        return _rotate(x, cos, sin, 1.0)
    return _Rotary.apply(x, cos, sin)


def relu_squared(x):
    """ReLU^2 activation."""
    if torch.compiler.is_compiling():
        return F.relu(x).square()
    if not (x.requires_grad and torch.is_grad_enabled()):
        return F.relu(x).square_()
    return _ReluSquared.apply(x)


def _rotate(x, cos, sin, sign):
    """Write the rotation of x by sign*(-theta) into a fresh tensor, half by half with fused
    multiply-adds (no concatenation, no temporaries)."""
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    y = torch.empty_like(x)
    y1, y2 = y[..., :d], y[..., d:]
    torch.mul(x1, cos, out=y1).addcmul_(x2, sin, value=sign)
    torch.mul(x2, cos, out=y2).addcmul_(x1, sin, value=-sign)
    return y


class _Rotary(torch.autograd.Function):
    # RoPE is an orthogonal map per position, so its backward is the opposite rotation.
    @staticmethod
    def forward(ctx, x, cos, sin):
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, 1.0)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, sin, -1.0), None, None


class _ReluSquared(torch.autograd.Function):
    # relu(x)^2 in one pass forward; backward 2*relu(x)*g without autograd's intermediates.
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return F.relu(x).square_()

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return x.relu().mul_(2.0).mul_(grad)


class SoftcapCrossEntropy(torch.autograd.Function):
    """Fused lm_head matmul + softcap + cross-entropy, chunked over rows so the (N, V) logits
    are never materialized: each chunk's logits stay in cache while they are capped, reduced
    and turned into gradients. Same math as
        F.cross_entropy(softcap * tanh((h @ W.T).float() / softcap), targets, ignore_index=-1)
    For 'mean'/'sum' the upstream gradient is a scalar, so the gradients are computed in the
    forward pass (one sweep instead of two); for 'none' they are recomputed in backward."""

    @staticmethod
    def forward(ctx, h, weight, targets, softcap, reduction, chunk_rows, grad_enabled):
        N = h.size(0)
        chunks = _LossChunks(h, weight, targets, softcap, chunk_rows)
        losses = torch.empty(N, dtype=torch.float32, device=h.device)
        need_grad = grad_enabled and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        precompute = need_grad and reduction != "none"
        if precompute:
            grad_h = torch.empty_like(h)
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device)
        for s in range(0, N, chunk_rows):
            e = min(s + chunk_rows, N)
            sig, sumexp = chunks.forward(s, e)
            # loss = logsumexp(capped) - capped[target]; the two -softcap offsets cancel
            picked = sig.gather(1, chunks.targets[s:e]).squeeze(1) * (2.0 * softcap)
            losses[s:e] = torch.where(chunks.valid[s:e], sumexp.log() - picked, 0.0)
            if precompute:
                chunks.backward(s, e, sumexp, None, grad_h, grad_w)
        if reduction == "none":
            out, scale = losses, None
        elif reduction == "sum":
            out, scale = losses.sum(), 1.0
        elif reduction == "mean":
            count = chunks.valid.sum()
            out, scale = losses.sum() / count, 1.0 / count  # all ignored -> nan, like F.cross_entropy
        else:
            raise ValueError(f"unknown loss_reduction {reduction!r}; use 'mean', 'sum' or 'none'")
        ctx.softcap, ctx.chunk_rows, ctx.scale, ctx.weight_dtype = softcap, chunk_rows, scale, weight.dtype
        ctx.precompute = precompute
        if precompute:
            ctx.save_for_backward(grad_h, grad_w)
        elif need_grad:
            ctx.save_for_backward(h, weight, targets)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.precompute:
            grad_h, grad_w = ctx.saved_tensors
            g = grad_out * ctx.scale
            return grad_h * g.to(grad_h.dtype), (grad_w * g).to(ctx.weight_dtype), None, None, None, None, None
        h, weight, targets = ctx.saved_tensors
        chunks = _LossChunks(h, weight, targets, ctx.softcap, ctx.chunk_rows)
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device)
        for s in range(0, h.size(0), ctx.chunk_rows):
            e = min(s + ctx.chunk_rows, h.size(0))
            _, sumexp = chunks.forward(s, e)
            chunks.backward(s, e, sumexp, grad_out[s:e], grad_h, grad_w)
        return grad_h, grad_w.to(weight.dtype), None, None, None, None, None


class _LossChunks:
    """Buffers and per-chunk math for SoftcapCrossEntropy. The buffers are allocated once per
    call and reused by every chunk (fresh large tensors cost page faults on CPU).

    softcap*tanh(z/softcap) is computed as 2*softcap*sig - softcap with sig = sigmoid(2z/softcap)
    (torch's CPU sigmoid is several times faster than its tanh). The capped logits are bounded
    by the softcap, so exp needs no max-subtraction: logsumexp(capped) = log(sum exp(2*softcap*sig)) - softcap."""

    def __init__(self, h, weight, targets, softcap, rows):
        rows = min(rows, h.size(0))
        V, device = weight.size(0), h.device
        self.h, self.w, self.softcap = h, weight.to(h.dtype), softcap
        self.valid = targets != -1
        self.targets = targets.clamp(min=0).unsqueeze(1)
        self.sig = torch.empty(rows, V, device=device)  # fp32 whatever the activations: the softcapped logits and their softmax keep full precision
        self.exp = torch.empty(rows, V, device=device)
        self.low = h.dtype != torch.float32  # bf16/fp16 activations: matmuls in that dtype
        if self.low:
            # dz of several chunks is gathered in low precision so that grad_w is accumulated
            # into fp32 once per group of rows (~16 MB of dz) rather than once per chunk
            self.group_rows = max(1, (16 << 20) // (2 * V) // rows) * rows
            self.dz_low = torch.empty(self.group_rows, V, dtype=h.dtype, device=device)
            self.gw_low = torch.empty(weight.shape, dtype=h.dtype, device=device)
            self.z_low = torch.empty(rows, V, dtype=h.dtype, device=device)

    def forward(self, s, e):
        """sig = sigmoid(2z/softcap) into self.sig, exp(2*softcap*sig) into self.exp; returns (sig, row sums)."""
        n = e - s
        sig, ex = self.sig[:n], self.exp[:n]
        if self.low:
            torch.mm(self.h[s:e], self.w.t(), out=self.z_low[:n])
            torch.mul(self.z_low[:n], 2.0 / self.softcap, out=sig)
        else:
            torch.addmm(sig, self.h[s:e], self.w.t(), beta=0, alpha=2.0 / self.softcap, out=sig)  # scaled in the GEMM
        sig.sigmoid_()
        torch.mul(sig, 2.0 * self.softcap, out=ex).exp_()
        return sig, ex.sum(dim=1)

    def backward(self, s, e, sumexp, row_grad, grad_h, grad_w):
        """dz = (softmax - onehot) * (1 - tanh^2) [* row_grad], with 1 - tanh^2 = 4 sig (1 - sig);
        then grad_h[s:e] = dz @ W and grad_w += dz^T @ h. Consumes the chunk's buffers."""
        n = e - s
        sig, valid = self.sig[:n], self.valid[s:e]
        row_scale = valid / sumexp
        if row_grad is not None:
            row_scale = row_scale * row_grad
        dz = self.exp[:n].mul_(row_scale.unsqueeze(1))  # softmax (x row_grad); ignored rows become 0
        dz.scatter_add_(1, self.targets[s:e], -(valid * (1.0 if row_grad is None else row_grad)).to(dz.dtype).unsqueeze(1))
        sig.addcmul_(sig, sig, value=-1.0)  # sig - sig^2
        dz.mul_(sig).mul_(4.0)
        if self.low:
            g0 = s - s % self.group_rows  # first row of this chunk's group
            dz = self.dz_low[s - g0:e - g0].copy_(dz)
            if e - g0 == self.group_rows or e == self.h.size(0):  # group complete: fold it into grad_w
                torch.mm(self.dz_low[:e - g0].t(), self.h[g0:e], out=self.gw_low)
                grad_w += self.gw_low
        else:
            grad_w.addmm_(dz.t(), self.h[s:e])
        torch.mm(dz, self.w, out=grad_h[s:e])


LOSS_CHUNK_ELEMENTS = 1 << 20  # logits per chunk (4 MB in fp32: stays in cache)


@torch.compiler.disable  # eager by design: a loop of cache-sized chunks, not a graph to fuse
def softcap_cross_entropy(h, weight, targets, softcap, reduction="mean"):
    """Cross-entropy (ignore_index=-1) of softcap*tanh((h @ weight.T)/softcap) without
    materializing the logits. h (N, d), weight (V, d) already sliced to the real vocab, targets (N,)."""
    chunk_rows = max(1, LOSS_CHUNK_ELEMENTS // weight.size(0))
    # forward always runs with grad mode off, so the caller's mode is passed in: under no_grad the
    # inputs may still require grad, but nobody will call backward, so no gradient work is done
    return SoftcapCrossEntropy.apply(h, weight, targets, softcap, reduction, chunk_rows, torch.is_grad_enabled())
