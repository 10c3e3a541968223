"""Bits per byte (SPEC §7.1): a loss that does not depend on the tokenizer's vocabulary, so
models with different tokenizers can be compared."""

import math

import torch
import torch.distributed as dist


@torch.no_grad()
def evaluate_bpb(model, batches, steps, token_bytes):
    """Sum the per-token loss (nats) and the UTF-8 bytes of the target tokens over `steps`
    batches of (inputs, targets[, ...]) and return nats / (ln 2 * bytes), summed over ranks.
    Special tokens have 0 bytes in token_bytes and targets < 0 are ignored: neither counts."""
    device = token_bytes.device
    # Per-batch loss sums in fp32 on the device, added up exactly on the host at the end:
    # precise without float64, which Apple's MPS does not have, and without a sync per batch.
    batch_nats = []
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    batch_iter = iter(batches)
    for _ in range(steps):
        x, y = next(batch_iter)[:2]
        loss = model(x, y, loss_reduction="none").view(-1).float()
        y = y.reshape(-1)
        valid = y >= 0
        num_bytes = torch.where(valid, token_bytes[y.clamp(min=0)], torch.zeros_like(y, dtype=token_bytes.dtype))
        counted = num_bytes > 0
        batch_nats.append(torch.where(counted, loss, 0.0).sum().to(device))  # where, not *: 0 * nan is nan
        total_bytes += num_bytes.sum().to(device, torch.int64)
    batch_nats = torch.stack(batch_nats) if batch_nats else torch.zeros(0, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(batch_nats, op=dist.ReduceOp.SUM)
        dist.all_reduce(total_bytes, op=dist.ReduceOp.SUM)
    total_bytes = total_bytes.item()
    if total_bytes == 0:
        return float("inf")
    return math.fsum(batch_nats.tolist()) / (math.log(2) * total_bytes)
