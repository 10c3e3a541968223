"""Bits per byte (docs/evaluation.md): a loss that does not depend on the tokenizer's vocabulary, so
models with different tokenizers can be compared."""

import math

import torch
import torch.distributed as dist
from tqdm import tqdm

from nanochat.common import dist_rank_world


def one_pass(batches, pass_done):
    """The (inputs, targets, state) batches of an endless loader up to and including the one
    after which `pass_done(state)` holds: an evaluation budget never cycles a small split."""
    for batch in batches:
        yield batch
        if pass_done(batch[2]):
            return

NATS_UNIT = 2.0**30  # fixed-point scale of the loss sum (see evaluate_bpb)


@torch.no_grad()
def evaluate_bpb(model, batches, steps, token_bytes, desc="val bpb"):
    """Sum the per-token loss (nats) and the UTF-8 bytes of the target tokens over at most `steps`
    batches of (inputs, targets[, ...]) (fewer when `batches` ends first) and return
    nats / (ln 2 * bytes), summed over ranks. Special tokens have 0 bytes in token_bytes and
    targets < 0 are ignored: neither counts. Rank 0 shows a progress bar."""
    device = token_bytes.device
    # The nats are summed in fixed point, int64 units of 2^-30 nats: integer sums are exact and
    # independent of order, so one process and N ranks give the same bits, and no float64 is
    # needed (Apple's MPS has none). fp32 losses above 2^-7 nats are exact multiples of 2^-30.
    total_nats = torch.zeros((), dtype=torch.int64, device=device)
    nonfinite = torch.zeros((), dtype=torch.int64, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    rank, world = dist_rank_world()
    for _, batch in tqdm(zip(range(steps), batches), total=steps, desc=desc, leave=False, disable=rank != 0):
        x, y = batch[:2]
        loss = model(x, y, loss_reduction="none").view(-1).float()
        y = y.reshape(-1)
        valid = y >= 0
        num_bytes = torch.where(valid, token_bytes[y.clamp(min=0)], torch.zeros_like(y, dtype=token_bytes.dtype))
        counted = torch.where(num_bytes > 0, loss, 0.0).to(device)  # where, not *: 0 * nan is nan
        finite = torch.isfinite(counted)
        nonfinite += (~finite).sum()
        total_nats += (torch.where(finite, counted, 0.0) * NATS_UNIT).to(torch.int64).sum()
        total_bytes += num_bytes.sum().to(device, torch.int64)
    if world > 1:
        for t in (total_nats, nonfinite, total_bytes):
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
    total_bytes = total_bytes.item()
    if total_bytes == 0:
        return float("inf")
    if nonfinite.item():
        return float("nan")
    return total_nats.item() / NATS_UNIT / (math.log(2) * total_bytes)
