"""MuonAdamW: the one optimizer nanochat trains with, on 1 or N ranks (docs/training.md,
"Optimizer" and "Data parallelism", walks the math).

This module owns the update math and the gradient synchronisation, nothing else:
- AdamW for embeddings, lm_head and scalars, one fused step per parameter;
- Muon for the transformer matrices, one fused step per group of same-shaped
  matrices stacked into a (K, rows, cols) tensor: Nesterov momentum, MuonEq, Polar Express,
  Muon+, NorMuon, cautious weight decay;
- ZeRO-2 style data parallelism: when torch.distributed is initialised with more
  than one rank, the optimizer averages the gradients itself (models are never wrapped in
  DDP), each rank updates and keeps optimizer state for its own slice only, and the updated
  slices are gathered back into the full parameters. `state_dict()` is therefore one shard
  per rank, and a resume needs the same world size.

Param groups are plain dicts tagged with `kind`:
  {'kind': 'adamw', 'params': [...], 'lr', 'betas', 'eps', 'weight_decay'}
  {'kind': 'muon',  'params': [...same shape...], 'lr', 'momentum', 'ns_steps', 'beta2', 'weight_decay'}
Hyperparameters are read from the group on every step, so a training loop may rewrite
`lr`, `momentum` and `weight_decay` in place (the schedules at the end of this file); extra keys such as `initial_lr`
are kept and checkpointed with the group.

The two step kernels are plain tensor functions. They take their hyperparameters as 0-D CPU
float32 tensors, so that a `torch.compile(dynamic=False, fullgraph=True)` build of them does
not recompile when a value changes, and so that the eager and the compiled kernels compute
with the very same float32 scalars. Whether to compile is decided per device (see
`_use_compile`): on CUDA and CPU (measured, see below), not on MPS, and
`NANOCHAT_COMPILE_OPTIM=1|0` forces it either way.
"""

import math
import os

import torch
import torch.distributed as dist
from torch import Tensor

from nanochat.common import COMPUTE_DTYPE, NanochatError, dist_rank_world, print0

# -----------------------------------------------------------------------------
# Constants

# Polar Express coefficients (a, b, c) per iteration, arXiv 2505.16932 with num_iters=5,
# safety factor 2e-2, cushion 2. Exact values matter; do not round.
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)

# AdamW params with fewer elements than this are all-reduced and updated whole on every rank;
# larger ones are reduce-scattered along dim 0 and sharded. Below this size a reduce-scatter plus
# an all-gather costs more in launches than the memory a shard saves.
SMALL_PARAM_NUMEL = 1024

ADAMW_DEFAULTS = {"betas": (0.8, 0.95), "eps": 1e-10, "weight_decay": 0.0}
MUON_DEFAULTS = {"momentum": 0.95, "ns_steps": 5, "beta2": 0.9, "weight_decay": 0.0}


# -----------------------------------------------------------------------------
# Step kernels. Pure tensor code: identical math eager or compiled.


def adamw_kernel(p: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step_t: Tensor, lr_t: Tensor,
                 beta1_t: Tensor, beta2_t: Tensor, eps_t: Tensor, wd_t: Tensor) -> None:
    """One AdamW step on `p` (or a row-slice view of it), in place.

    Math is done in fp32 and copied back, because wte/VE are stored in bf16 and `1 - beta2`
    has no precision left in bf16 (0.005 rounds to a coarse step there). For fp32 tensors `.float()` is the
    tensor itself and the copy-backs are skipped."""
    p32, m32, v32, g32 = p.float(), exp_avg.float(), exp_avg_sq.float(), grad.float()
    p32.mul_(1 - lr_t * wd_t)  # decoupled weight decay, applied before the moments: it shrinks the old weights only
    m32.lerp_(g32, 1 - beta1_t)
    v32.lerp_(g32.square(), 1 - beta2_t)
    bias1 = 1 - beta1_t ** step_t
    bias2 = 1 - beta2_t ** step_t
    denom = (v32 / bias2).sqrt() + eps_t
    p32.sub_((lr_t / bias1) * (m32 / denom))
    for dst, src in ((p, p32), (exp_avg, m32), (exp_avg_sq, v32)):
        if dst.dtype != src.dtype:
            dst.copy_(src)


def muon_kernel(grads: Tensor, params: Tensor, momentum_buffer: Tensor, second_buffer: Tensor, momentum_t: Tensor,
                lr_t: Tensor, wd_t: Tensor, beta2_t: Tensor, ns_steps: int, use_bf16: bool) -> None:
    """One Muon step on a stack of K same-shaped matrices, in place (the steps are listed in
    docs/training.md, "Optimizer").

    grads (K, rows, cols) is consumed (overwritten); params (K, rows, cols) is updated;
    momentum_buffer has the params' shape; second_buffer is the factored second moment,
    (K, rows, 1) when rows >= cols else (K, 1, cols). Every reduction is per matrix, so
    updating any subset of the K matrices gives the same numbers (the sharded path relies on it).
    `lr_t` is already the effective lr, lr * sqrt(max(1, rows/cols)) (step 8)."""
    rows, cols = grads.shape[-2], grads.shape[-1]
    # 1. Nesterov momentum as two lerps: buf <- mu*buf + (1-mu)*g ; g <- (1-mu)*g + mu*buf
    momentum_buffer.lerp_(grads, 1 - momentum_t)
    g = grads.lerp_(momentum_buffer, momentum_t)
    # 2. Orthogonalise in bf16 when the run computes in bf16 (never fp16: too little exponent range).
    X = g.bfloat16() if use_bf16 else g
    # 3. MuonEq: every row rescaled to the RMS row norm (norms taken in fp32).
    Xf = X.float()
    rms_row_norm = Xf.norm(dim=(-2, -1), keepdim=True) / math.sqrt(rows)
    X = X * (rms_row_norm / Xf.norm(dim=-1, keepdim=True).clamp_min(1e-6)).to(X.dtype)
    # 4. Bring the spectrum inside [0, 1]; the 1.01 is the Polar Express safety margin.
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-6)
    # 5. Polar Express; iterate on the small Gram matrix (rows x rows if wide, cols x cols if tall).
    for a, b, c in POLAR_EXPRESS_COEFFS[:ns_steps]:
        if rows > cols:
            A = X.mT @ X
            X = a * X + X @ (b * A + c * (A @ A))
        else:
            A = X @ X.mT
            X = a * X + (b * A + c * (A @ A)) @ X
    g = X.to(params.dtype)
    # 6. Muon+: snap the Frobenius norm to sqrt(min(rows, cols)), that of an exact semi-orthogonal matrix.
    g = g * (math.sqrt(min(rows, cols)) / g.float().norm(dim=(-2, -1), keepdim=True).clamp_min(1e-6)).to(g.dtype)
    # 7. NorMuon: per-row (rows >= cols) or per-column adaptive scale from a factored second
    #    moment, then renormalised so the matrix keeps its total norm.
    red_dim = -1 if rows >= cols else -2
    red_size = g.shape[red_dim]
    v_mean = g.float().square().mean(dim=red_dim, keepdim=True)
    v_norm = (v_mean.sum(dim=(-2, -1), keepdim=True) * red_size).sqrt()
    second_buffer.lerp_(v_mean.to(second_buffer.dtype), 1 - beta2_t)
    scale = second_buffer.clamp_min(1e-10).rsqrt()
    v_norm_new = (v_mean * red_size * scale.float().square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    g = g * (scale * (v_norm / v_norm_new.clamp_min(1e-10))).to(g.dtype)
    # 9. Cautious weight decay, coupled to lr, only where update and param agree in sign.
    mask = (g * params) >= 0
    params.sub_(lr_t * g + lr_t * wd_t * params * mask)


# -----------------------------------------------------------------------------
# Compile or not
#
# Measured on this project's 2 shared CPU cores (torch 2.13, best of N calls, eager -> compiled;
# the machine was shared, so only the ratios mean anything):
#   AdamW (8,) 0.025 -> 0.019 ms ; (64, 64) 0.035 -> 0.024 ms ; (384, 1536) 0.58 -> 0.29 ms ;
#   AdamW (32768, 384) fp32 85-180 -> 6-14 ms ; bf16 144-320 -> 5-16 ms (eager materialises ~10 temporaries)
#   Muon 4x(64, 64) 0.5 -> 0.3 ms ; 4x(384, 384) 34 -> 32 ms ; 4x(384, 1536) 124 -> 106 ms ; 4x(1536, 384) 132 -> 104 ms
# Compiling never lost, and wins 10x+ on the embedding-sized AdamW tables, so CPU compiles too.
# Cost: ~15 s for the first kernel in a cold process (inductor's on-disk cache makes later runs
# ~1 s) and ~1-5 s per further shape. CUDA compiles (one fused kernel instead of ~20 launches).
# MPS stays eager by default: inductor's MPS backend is young and unmeasured here.
# NANOCHAT_COMPILE_OPTIM=1|0 overrides (tests use 0 for speed; the math is the same).

_COMPILED = {}


def _use_compile(device: torch.device) -> bool:
    env = os.environ.get("NANOCHAT_COMPILE_OPTIM", "").strip()
    if env in ("0", "1"):
        return env == "1"
    if env:
        raise NanochatError(f"NANOCHAT_COMPILE_OPTIM={env!r} is not understood; use 1 (compile) or 0 (eager).")
    return device.type in ("cuda", "cpu")


def _kernel(fn, device: torch.device):
    if not _use_compile(device):
        return fn
    if fn not in _COMPILED:
        # One graph per distinct (shape, dtype); a model has a handful of AdamW shapes plus one
        # per Muon group (and per shard size when distributed): above dynamo's default of 8.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        _COMPILED[fn] = torch.compile(fn, dynamic=False, fullgraph=True)
    return _COMPILED[fn]


# -----------------------------------------------------------------------------
# Collectives. NCCL averages in the collective (ReduceOp.AVG); other backends (gloo on CPU)
# sum and we divide, which works on every torch version we support.

_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _check_group(group: dict, index: int) -> dict:
    group = dict(group)
    kind = group.get("kind")
    if kind not in ("adamw", "muon"):
        raise NanochatError(f"optimizer param group {index} has kind={kind!r}; it must be 'adamw' or 'muon'.")
    if "lr" not in group:
        raise NanochatError(f"optimizer param group {index} ({kind}) has no 'lr'.")
    for key, value in (ADAMW_DEFAULTS if kind == "adamw" else MUON_DEFAULTS).items():
        group.setdefault(key, value)
    params = list(group["params"])
    group["params"] = params
    if kind == "muon" and params:
        shape = params[0].shape
        if len(shape) != 2 or any(p.shape != shape for p in params):
            raise NanochatError(f"Muon param group {index} must hold 2-D matrices of one shape; "
                                f"got {sorted({tuple(p.shape) for p in params})}.")
        if not 1 <= int(group["ns_steps"]) <= len(POLAR_EXPRESS_COEFFS):
            raise NanochatError(f"Muon ns_steps must be between 1 and {len(POLAR_EXPRESS_COEFFS)}; "
                                f"got {group['ns_steps']}.")
    return group


class MuonAdamW(torch.optim.Optimizer):
    """Combined AdamW + Muon optimizer over `kind`-tagged param groups, for 1 or N ranks.

    With torch.distributed initialised and world size W > 1 (decided at construction), call
    `step()` right after `backward()` on un-synchronised local gradients: the optimizer
    averages them across ranks. All ranks must hold the same param groups in the
    same order, and every parameter must have a gradient on every rank. After a distributed
    step the contents of `p.grad` are unspecified (reductions may run in place on them).

    Layout of the per-rank state (what `state_dict()` saves):
    - AdamW param: `step` (int), `exp_avg`, `exp_avg_sq`, in the param's dtype, shaped like the
      param, or like this rank's row-slice (shape[0] // W rows) for sharded params;
    - Muon group: on the group's first param, `momentum_buffer` (n, rows, cols) and
      `second_momentum_buffer` (n, rows, 1) or (n, 1, cols), where n is the number of the
      group's matrices this rank owns (K on one rank). A rank that owns none has no state.
    Sharding choices: an AdamW param with >= 1024 elements whose shape[0] is not divisible by W
    is all-reduced and kept replicated instead (same math, more memory/traffic). Muon
    matrices are dealt out in contiguous chunks of ceil(K/W): rank r owns [r*c, (r+1)*c) ∩ [0, K).
    """

    def __init__(self, param_groups):
        groups = [_check_group(g, i) for i, g in enumerate(param_groups)]
        super().__init__(groups, defaults={})
        # 0-D CPU float32 hyperparameters, refilled before every kernel call: a changed value is new
        # data, not a new constant, so the compiled kernels do not recompile.
        self._adamw_hp = {k: torch.tensor(0.0) for k in ("step", "lr", "beta1", "beta2", "eps", "wd")}
        self._muon_hp = {k: torch.tensor(0.0) for k in ("momentum", "lr", "wd", "beta2")}
        self.rank, self.world_size = dist_rank_world()
        self._avg_op = None
        if self.world_size > 1:
            self._avg_op = dist.ReduceOp.AVG if dist.get_backend() == "nccl" else dist.ReduceOp.SUM

    # --- bookkeeping ---------------------------------------------------------

    def _is_sharded(self, p: Tensor) -> bool:
        """Large AdamW params are reduce-scattered along dim 0 when the rows divide evenly."""
        return self.world_size > 1 and p.numel() >= SMALL_PARAM_NUMEL and p.shape[0] % self.world_size == 0

    def _muon_owned(self, num: int) -> tuple[int, int, int]:
        """(chunk, start, n): matrices [start, start + n) of a K=num group belong to this rank."""
        chunk = -(-num // self.world_size)
        start = min(self.rank * chunk, num)
        return chunk, start, min(chunk, num - start)

    def _grad(self, p: Tensor) -> Tensor:
        if p.grad is None:
            raise NanochatError(f"a parameter of shape {tuple(p.shape)} has no gradient; every parameter given to "
                                f"MuonAdamW must take part in the loss (gradients are synchronised by the optimizer).")
        return p.grad

    def _scalars(self, hp: dict, device: torch.device) -> dict:
        # CUDA kernels and inductor take 0-D CPU tensors as scalars; other eager backends (MPS)
        # may not, so hand them device copies (same float32 values, so the same math).
        if device.type in ("cpu", "cuda") or _use_compile(device):
            return hp
        return {k: v.to(device) for k, v in hp.items()}

    def _finish_reduce(self, work, grad: Tensor) -> Tensor:
        if work is not None:
            work.wait()
            if self._avg_op == dist.ReduceOp.SUM:
                grad.div_(self.world_size)
        return grad

    # --- AdamW ---------------------------------------------------------------

    def _adamw_launch(self, group: dict) -> list:
        """Phase 1 for an AdamW group: start the gradient reductions. Returns pending updates."""
        pending = []
        for p in group["params"]:
            if self.world_size == 1:
                if p.grad is not None:  # single rank: an unused param is simply skipped
                    pending.append((p, p.grad, None, None))
                continue
            grad = self._grad(p)
            if self._is_sharded(p):
                rows = p.shape[0] // self.world_size
                shard = torch.empty_like(grad[:rows])
                work = _reduce_scatter(shard, grad.contiguous(), op=self._avg_op, async_op=True)
                pending.append((p, shard, slice(self.rank * rows, (self.rank + 1) * rows), work))
            else:
                work = dist.all_reduce(grad, op=self._avg_op, async_op=True)
                pending.append((p, grad, None, work))
        return pending

    def _adamw_update(self, group: dict, pending: list, gathers: list) -> None:
        """Phase 2 for an AdamW group: wait, update the owned slice, start the gather."""
        hp = self._adamw_hp
        hp["lr"].fill_(group["lr"])
        hp["beta1"].fill_(group["betas"][0])
        hp["beta2"].fill_(group["betas"][1])
        hp["eps"].fill_(group["eps"])
        hp["wd"].fill_(group["weight_decay"])
        for p, grad, rows, work in pending:
            grad = self._finish_reduce(work, grad)
            owned = p if rows is None else p[rows]
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(owned)
                state["exp_avg_sq"] = torch.zeros_like(owned)
            state["step"] += 1
            hp["step"].fill_(state["step"])
            s = self._scalars(hp, p.device)
            _kernel(adamw_kernel, p.device)(owned, grad, state["exp_avg"], state["exp_avg_sq"], s["step"], s["lr"],
                                            s["beta1"], s["beta2"], s["eps"], s["wd"])
            if rows is not None:
                # In-place all-gather: this rank's input is already its slot of the output.
                gathers.append((_all_gather(p, owned, async_op=True), None))

    # --- Muon ----------------------------------------------------------------

    def _muon_launch(self, group: dict):
        """Phase 1 for a Muon group: stack grads (zero-padded to a multiple of W) and reduce-scatter."""
        params = group["params"]
        if not params:
            return None
        if self.world_size == 1:
            grads = [p.grad for p in params]
            if all(g is None for g in grads):
                return None
            return torch.stack([self._grad(p) for p in params]), None, None
        chunk, _, _ = self._muon_owned(len(params))
        p0 = params[0]
        buffer = torch.zeros((chunk * self.world_size, *p0.shape), dtype=p0.dtype, device=p0.device)
        torch._foreach_copy_(list(buffer[:len(params)].unbind(0)), [self._grad(p) for p in params])
        owned_grads = torch.empty_like(buffer[:chunk])
        work = _reduce_scatter(owned_grads, buffer, op=self._avg_op, async_op=True)
        return owned_grads, buffer, work

    def _muon_update(self, group: dict, launched, gathers: list) -> None:
        """Phase 2 for a Muon group: wait, run the kernel on the owned matrices, start the gather."""
        if launched is None:
            return
        grads, buffer, work = launched
        grads = self._finish_reduce(work, grads)
        params = group["params"]
        num, (rows, cols) = len(params), params[0].shape
        chunk, start, n = self._muon_owned(num)
        if self.world_size == 1:
            owned = torch.stack(params)
        else:
            owned = torch.empty_like(grads)  # (chunk, rows, cols); the padding tail is zeroed
            owned[n:].zero_()
            if n:
                torch._foreach_copy_(list(owned[:n].unbind(0)), params[start:start + n])
        if n:
            state = self.state[params[0]]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(owned[:n])
                factored = (n, rows, 1) if rows >= cols else (n, 1, cols)
                state["second_momentum_buffer"] = owned.new_zeros(factored)
            hp = self._muon_hp
            hp["momentum"].fill_(group["momentum"])
            hp["lr"].fill_(group["lr"] * math.sqrt(max(1.0, rows / cols)))  # tall matrices get a larger lr (step 8)
            hp["wd"].fill_(group["weight_decay"])
            hp["beta2"].fill_(group["beta2"])
            s = self._scalars(hp, owned.device)
            _kernel(muon_kernel, owned.device)(
                grads[:n], owned[:n], state["momentum_buffer"], state["second_momentum_buffer"], s["momentum"],
                s["lr"], s["wd"], s["beta2"], int(group["ns_steps"]), COMPUTE_DTYPE == torch.bfloat16)
        if self.world_size == 1:
            torch._foreach_copy_(params, list(owned.unbind(0)))
        else:
            # The stacked-grad buffer is free again: reuse it as the gather output.
            gathers.append((_all_gather(buffer, owned, async_op=True), (params, buffer)))

    # --- step ------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Phase 1: launch every reduction, so communication overlaps the updates below.
        launched = [self._adamw_launch(g) if g["kind"] == "adamw" else self._muon_launch(g) for g in self.param_groups]
        # Phase 2: group by group, wait for its gradients, update the owned part, launch its gather.
        gathers = []
        for group, item in zip(self.param_groups, launched):
            if group["kind"] == "adamw":
                self._adamw_update(group, item, gathers)
            else:
                self._muon_update(group, item, gathers)
        # Phase 3: wait for the gathers; Muon copies the matrices back (the padding is dropped).
        for work, muon in gathers:
            work.wait()
            if muon is not None:
                params, buffer = muon
                torch._foreach_copy_(params, list(buffer[:len(params)].unbind(0)))
        return loss

    # --- checkpoints -------------------------------------------------------------

    def load_state_dict(self, state_dict):
        """torch's loader, plus a check that every state tensor has the shape this rank's layout
        gives it. Muon state may also come in the reference implementation's layout, where every
        rank keeps a full chunk of ceil(K/W) matrices (padding included, even on a rank that
        owns none): it is trimmed to the matrices this rank owns."""
        super().load_state_dict(self._trim_muon_chunks(state_dict))
        for group in self.param_groups:
            params = group["params"]
            if group["kind"] == "muon" and params:
                _, _, n = self._muon_owned(len(params))
                checks = [(params[0], {"momentum_buffer": (n, *params[0].shape)})]
            else:
                checks = [(p, {k: ((p.shape[0] // self.world_size, *p.shape[1:]) if self._is_sharded(p)
                                   else tuple(p.shape)) for k in ("exp_avg", "exp_avg_sq")}) for p in params]
            for p, expected in checks:
                for key, shape in expected.items():
                    value = self.state.get(p, {}).get(key)
                    if value is not None and tuple(value.shape) != tuple(shape):
                        raise NanochatError(
                            f"optimizer state {key} of a {tuple(p.shape)} parameter has shape {tuple(value.shape)}, "
                            f"but rank {self.rank} of {self.world_size} expects {tuple(shape)}: the shard was written "
                            f"for other parameter groups or another rank layout.")

    def _trim_muon_chunks(self, state_dict):
        """A copy of state_dict whose Muon state keeps only the matrices this rank owns."""
        saved_groups, state = state_dict.get("param_groups", []), dict(state_dict.get("state", {}))
        for group, saved in zip(self.param_groups, saved_groups):
            if group["kind"] != "muon" or not group["params"] or not saved.get("params"):
                continue
            chunk, _, n = self._muon_owned(len(group["params"]))
            first = saved["params"][0]
            entry = state.get(first)
            if not entry or n == chunk or getattr(entry.get("momentum_buffer"), "shape", (n,))[0] != chunk:
                continue
            if n == 0:
                del state[first]  # a rank that owns none of the group's matrices keeps no state
            else:
                state[first] = {k: v[:n] if torch.is_tensor(v) and v.dim() == 3 else v for k, v in entry.items()}
        return {**state_dict, "state": state}


# -----------------------------------------------------------------------------
# Loss scaling for fp16 activations


def grad_scaler(device):
    """A GradScaler when the activations are fp16 (small gradients underflow there unless the
    loss is scaled up first), else None. Pair with optimizer_step()."""
    return torch.amp.GradScaler(device.type) if COMPUTE_DTYPE == torch.float16 else None


def scale_loss(loss, scaler):
    return scaler.scale(loss) if scaler is not None else loss


def optimizer_step(optimizer, scaler, step):
    """optimizer.step(); with a GradScaler: unscale the gradients, agree across ranks whether any
    rank's are inf/NaN (the optimizer's collectives need every rank to skip the same steps),
    step only if none are, and update the scale. A skipped step is said (rank 0) and returns False."""
    if scaler is None:
        optimizer.step()
        return True
    scaler.unscale_(optimizer)
    found = scaler._found_inf_per_device(optimizer)
    if dist_rank_world()[1] > 1:
        for found_inf in found.values():
            dist.all_reduce(found_inf, op=dist.ReduceOp.MAX)
    skipped = any(v.item() for v in found.values())
    scaler.step(optimizer)
    scaler.update()
    if skipped:
        print0(f"step {step:05d}: inf/NaN gradients under fp16, step skipped (loss scale now {scaler.get_scale():g})")
    return not skipped


# -----------------------------------------------------------------------------
# Schedules: the multipliers and values a loop writes into the groups before each step. The
# three loops share these (docs/training.md, "Schedules", has each stage's settings).


def lr_multiplier(it, num_iterations, warmup_steps, warmdown_ratio, final_lr_frac):
    """By step (pretraining): linear warmup over warmup_steps ((it+1)/warmup, so the first step
    already moves), flat at 1, then a linear warmdown over the last round(warmdown_ratio * N)
    steps that ends at final_lr_frac."""
    warmdown_steps = round(warmdown_ratio * num_iterations)
    if it < warmup_steps:
        return (it + 1) / warmup_steps
    if it <= num_iterations - warmdown_steps:
        return 1.0
    progress = (num_iterations - it) / warmdown_steps
    return progress + (1 - progress) * final_lr_frac


def lr_multiplier_by_progress(progress, warmup_ratio, warmdown_ratio, final_lr_frac):
    """By the fraction of the run done, in [0, 1] (SFT measures it in conversations consumed,
    since an epoch's step count is unknown up front; RL in steps): linear warmup over the first
    warmup_ratio, flat at 1, linear over the last warmdown_ratio down to final_lr_frac."""
    if progress < warmup_ratio:
        return (progress + 1e-8) / warmup_ratio
    if progress <= 1.0 - warmdown_ratio:
        return 1.0
    decay = min(1.0, (progress - (1.0 - warmdown_ratio)) / warmdown_ratio)
    return (1.0 - decay) + decay * final_lr_frac


def muon_momentum(it, num_iterations=0, warmdown_ratio=0.0, warmup=400, start=0.85, peak=0.97, end=0.90):
    """start -> peak over the first `warmup` steps, flat, then peak -> end during the warmdown
    (none when warmdown_ratio is 0). A low momentum early lets the fresh weights turn quickly;
    easing it off during the warmdown lets the last, small steps settle."""
    warmdown_steps = round(warmdown_ratio * num_iterations)
    warmdown_start = num_iterations - warmdown_steps
    if it < warmup:
        return start + (peak - start) * it / warmup
    if it <= warmdown_start or warmdown_steps == 0:
        return peak
    progress = (it - warmdown_start) / warmdown_steps
    return peak + (end - peak) * progress


def muon_weight_decay(it, num_iterations, weight_decay):
    """Cosine from weight_decay to 0 over the run."""
    return weight_decay * 0.5 * (1 + math.cos(math.pi * it / num_iterations))
