"""Bits per byte (SPEC §7.1): a loss that does not depend on the tokenizer's vocabulary, so
models with different tokenizers can be compared."""

import math

import torch
import torch.distributed as dist
from tqdm import tqdm


def one_pass(batches, pass_done):
    """The (inputs, targets, state) batches of an endless loader up to and including the one
    after which `pass_done(state)` holds: an evaluation budget never cycles a small split."""
    for batch in batches:
        yield batch
        if pass_done(batch[2]):
            return


@torch.no_grad()
def evaluate_bpb(model, batches, steps, token_bytes, desc="val bpb"):
    """Sum the per-token loss (nats) and the UTF-8 bytes of the target tokens over at most `steps`
    batches of (inputs, targets[, ...]) (fewer when `batches` ends first) and return
    nats / (ln 2 * bytes), summed over ranks. Special tokens have 0 bytes in token_bytes and
    targets < 0 are ignored: neither counts. Rank 0 shows a progress bar."""
    device = token_bytes.device
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    for _, batch in tqdm(zip(range(steps), batches), total=steps, desc=desc, leave=False, disable=rank != 0):
        x, y = batch[:2]
        loss = model(x, y, loss_reduction="none").view(-1).to(torch.float64)
        y = y.reshape(-1)
        valid = y >= 0
        num_bytes = torch.where(valid, token_bytes[y.clamp(min=0)], torch.zeros_like(y, dtype=token_bytes.dtype))
        counted = num_bytes > 0
        total_nats += torch.where(counted, loss, 0.0).sum().to(device)  # where, not *: 0 * nan is nan
        total_bytes += num_bytes.sum().to(device, torch.int64)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total_nats, op=dist.ReduceOp.SUM)
        dist.all_reduce(total_bytes, op=dist.ReduceOp.SUM)
    total_bytes = total_bytes.item()
    if total_bytes == 0:
        return float("inf")
    return total_nats.item() / (math.log(2) * total_bytes)
