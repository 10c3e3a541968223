"""The pretraining data loader: reads this rank's share of the shards, tokenizes
documents with BOS prepended, packs them into rows with BOS-aligned best-fit, and yields
(inputs, targets, state_dict) forever, where the state resumes the stream *exactly*.

Reading order. Rank r of W reads row groups r, r+W, r+2W, ... of every file of the split in
order, epoch after epoch (epoch counts from 1), in chunks of `tokenizer_batch_size` documents
that are tokenized together.

Packing. Each row holds T+1 tokens. Before each placement the buffer is refilled (one chunk
at a time) to at least `buffer_size` documents; then the largest buffered document that fits
entirely in the rest of the row is placed (the earliest among equals); when none fits, the
shortest (the earliest among equals) is cropped to fill the row and its rest is discarded.
Every row starts with BOS and has no padding. inputs = row[:-1], targets = row[1:], both int64.

Resume state (JSON-serialisable, a few KB). Yielded with each batch, it describes the loader
right after that batch:
    pq_idx, rg_idx, epoch  file index, row-group index and epoch of the last chunk read
                           (the keys other nanochat checkouts save too, so their checkpoints resume)
    next_row               rows of that row group already read: the next chunk starts there
    buffer                 the documents waiting in the buffer, in buffer order, grouped by row
                           group: [[epoch, pq_idx, rg_idx, [row, ...]], ...]
    rank, world_size       whose stream this is
Buffered documents are always whole (a cropped one is dropped), so re-reading and re-tokenizing
them restores the buffer exactly and a loader built with `resume_state_dict=state` yields the
very batches the uninterrupted loader would have yielded next, given the same split, data,
tokenizer, B, T, buffer_size and tokenizer_batch_size. A state holding only pq_idx/rg_idx/epoch
(another checkout's), or one written by another rank or world size, resumes approximately: at
the next row-group round of file pq_idx, with an empty buffer, so no document is seen twice.
"""

import bisect
import sys

import torch

from nanochat.common import NanochatError, get_dist_info, logger
from nanochat.dataset import open_parquet, read_row_group_texts, split_parquet_files


def _document_chunks(paths, rank, world_size, chunk_size, epoch, pq_idx, rg_idx, row):
    """Yield (texts, (epoch, pq_idx, rg_idx, first_row)) forever, starting at row `row` of row
    group `rg_idx` of file `pq_idx` in epoch `epoch`; rank r reads row groups r, r+W, ..."""
    while True:
        full_pass, yielded = (pq_idx, rg_idx, row) == (0, rank, 0), False
        while pq_idx < len(paths):
            pf = open_parquet(paths[pq_idx])
            while rg_idx < pf.num_row_groups:
                texts = read_row_group_texts(pf, paths[pq_idx], rg_idx)
                for start in range(row, len(texts), chunk_size):
                    yielded = True
                    yield texts[start:start + chunk_size], (epoch, pq_idx, rg_idx, start)
                rg_idx, row = rg_idx + world_size, 0
            pq_idx, rg_idx, row = pq_idx + 1, rank, 0
        if full_pass and not yielded:  # otherwise we would spin forever
            raise NanochatError(f"rank {rank} of {world_size} gets no documents from {len(paths)} file(s) starting with "
                                f"{paths[0]}: it has fewer row groups (with rows) than ranks; use fewer ranks or more data.")
        epoch, pq_idx, rg_idx, row = epoch + 1, 0, rank, 0


class DocBuffer:
    """Tokenized documents waiting to be packed, in arrival order, indexed by length so best-fit
    is a bisection rather than a scan. Each document carries its key (epoch, pq_idx, rg_idx, row);
    arrival order is read order, which is key order."""

    def __init__(self):
        self.docs = {}  # seq -> (key, tokens); dicts keep insertion order through deletions
        self.by_len = []  # sorted (len, seq)
        self.next_seq = 0

    def __len__(self):
        return len(self.docs)

    def add(self, key, tokens):
        self.docs[self.next_seq] = (key, tokens)
        bisect.insort(self.by_len, (len(tokens), self.next_seq))
        self.next_seq += 1

    def take(self, space):
        """Best fit: remove and return the largest document that fits in `space` tokens (the
        earliest among equal lengths); if none fits, the shortest (the earliest among equals),
        cropped to `space`, which throws away the fewest tokens."""
        i = bisect.bisect_right(self.by_len, (space, sys.maxsize))  # by_len[:i] all fit
        j = bisect.bisect_left(self.by_len, (self.by_len[i - 1][0], -1)) if i > 0 else 0
        _, seq = self.by_len.pop(j)
        _, tokens = self.docs.pop(seq)
        return tokens if i > 0 else tokens[:space]

    def keys(self):
        return [key for key, _ in self.docs.values()]


def _encode_state(cursor, buffer, rank, world_size):
    epoch, pq_idx, rg_idx, next_row = cursor
    groups = []
    for e, p, g, r in buffer.keys():
        if groups and groups[-1][:3] == [e, p, g]:
            groups[-1][3].append(r)
        else:
            groups.append([e, p, g, [r]])
    return {"pq_idx": pq_idx, "rg_idx": rg_idx, "epoch": epoch, "next_row": next_row, "buffer": groups,
            "rank": rank, "world_size": world_size}


def split_batches(tokenizer, B, T, split, limit, data_dir=None, rank=None, world_size=None, threads=4):
    """How many (B, T) batches this rank's share of `split` fills in one pass, at most `limit`:
    the documents are tokenized (with their BOS) until they fill `limit` batches or run out. An
    evaluation of `limit` batches on a smaller split would cycle it; this is its one-pass budget."""
    if rank is None or world_size is None:
        _, rank, _, world_size = get_dist_info()
    bos, tokens, needed = tokenizer.get_bos_token_id(), 0, limit * B * (T + 1)
    for path in split_parquet_files(split, data_dir):
        pf = open_parquet(path)
        for rg_idx in range(rank, pf.num_row_groups, world_size):
            texts = read_row_group_texts(pf, path, rg_idx)
            tokens += sum(map(len, tokenizer.encode(texts, prepend=bos, num_threads=threads)))
            if tokens >= needed:
                return limit
    return max(1, tokens // (B * (T + 1)))


def estimate_split_tokens(tokenizer, split, data_dir=None, sample_docs=256):
    """About how many tokens (with each document's BOS) the split holds, in a second: the text
    bytes from the parquet footers divided by the bytes per token of a sample of its documents."""
    paths = split_parquet_files(split, data_dir)
    total_bytes, docs = 0, 0
    for path in paths:
        meta = open_parquet(path).metadata
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            names = [group.column(k).path_in_schema for k in range(group.num_columns)]
            total_bytes += group.column(names.index("text")).total_uncompressed_size
            docs += group.num_rows
    if docs == 0:
        return 0
    total_bytes -= 4 * docs  # the footer counts each value's 4-byte length prefix (plain encoding)
    sample = read_row_group_texts(open_parquet(paths[0]), paths[0], 0)[:sample_docs]
    sample_bytes = sum(len(t.encode("utf-8")) for t in sample)
    sample_tokens = sum(map(len, tokenizer.encode(sample)))
    if sample_tokens == 0:
        return docs
    return int(max(total_bytes, 0) * sample_tokens / max(sample_bytes, 1)) + docs


def _decode_state(state, paths, rank, world_size):
    """(cursor, buffer keys) to resume from; see the module docstring for the two kinds of state."""
    try:
        pq_idx, epoch = int(state["pq_idx"]), int(state.get("epoch", 1))
        rg_idx = state.get("rg_idx")
        rg_idx = None if rg_idx is None else int(rg_idx)
    except (TypeError, KeyError, ValueError, AttributeError) as e:
        raise NanochatError(f"the dataloader resume state {str(state)[:200]} lacks a valid pq_idx/rg_idx/epoch ({e}); "
                            f"resume from a checkpoint written by nanochat.") from e
    if not 0 <= pq_idx < len(paths):
        raise NanochatError(f"the dataloader resume state points at file {pq_idx} but this split has {len(paths)} "
                            f"file(s); resume with the data the checkpoint was trained on.")
    exact = "buffer" in state and "next_row" in state
    if exact and (state.get("rank"), state.get("world_size")) != (rank, world_size):
        logger.warning(f"the dataloader state was written by rank {state.get('rank')} of {state.get('world_size')}, "
                       f"this is rank {rank} of {world_size}: resuming approximately, at the next row-group round")
        exact = False
    if exact:
        try:
            keys = [(int(e), int(p), int(g), int(r)) for e, p, g, rows in state["buffer"] for r in rows]
            cursor = (epoch, pq_idx, int(rg_idx), int(state["next_row"]))
        except (TypeError, ValueError) as e:
            raise NanochatError(f"the dataloader resume state has a malformed buffer or next_row ({e}); "
                                f"resume from a checkpoint written by nanochat.") from e
        return cursor, keys
    # approximate resume: skip to the next round of row groups of file
    # pq_idx so nothing repeats; the chunk generator moves to the next file if that is past the end
    rounds = 0 if rg_idx is None else rg_idx // world_size + 1
    return (epoch, pq_idx, rounds * world_size + rank, 0), []


def _restore_buffer(buffer, keys, paths, tokenizer, bos, threads):
    """Re-read and re-tokenize the buffered documents of a resume state, in their order."""
    wanted = {}
    for _, p, g, r in keys:
        wanted.setdefault((p, g), set()).add(r)
    texts, pfs = {}, {}
    for (p, g), rows in sorted(wanted.items()):  # each row group read once, even across epochs
        if not 0 <= p < len(paths):
            raise NanochatError(f"the dataloader resume state refers to file {p} but the split has {len(paths)}; "
                                f"resume with the data the checkpoint was trained on.")
        if p not in pfs:
            pfs[p] = open_parquet(paths[p])
        pf = pfs[p]
        if not 0 <= g < pf.num_row_groups:
            raise NanochatError(f"the dataloader resume state refers to row group {g} of {paths[p]}, which has "
                                f"{pf.num_row_groups}; resume with the data the checkpoint was trained on.")
        rg_texts = read_row_group_texts(pf, paths[p], g)
        for r in rows:
            if not 0 <= r < len(rg_texts):
                raise NanochatError(f"the dataloader resume state refers to row {r} of row group {g} of {paths[p]}, "
                                    f"which has {len(rg_texts)}; resume with the data the checkpoint was trained on.")
            texts[(p, g, r)] = rg_texts[r]
    if keys:
        token_lists = tokenizer.encode([texts[k[1:]] for k in keys], prepend=bos, num_threads=threads)
        for key, tokens in zip(keys, token_lists):
            buffer.add(key, tokens)


def tokenizing_distributed_data_loader_with_state_bos_bestfit(
        tokenizer, B, T, split, tokenizer_threads=4, tokenizer_batch_size=128, device="cpu",
        resume_state_dict=None, buffer_size=1000, data_dir=None, rank=None, world_size=None):
    """Infinite iterator of (inputs (B, T) int64, targets (B, T) int64, state_dict) on `device`.

    `tokenizer` needs get_bos_token_id() and encode(list_of_str, prepend=id, num_threads=k).
    rank/world_size default to the torchrun environment (get_dist_info). On CUDA the batch goes
    through one pinned staging buffer into one persistent device buffer, and the yielded tensors
    are views of it that the next batch overwrites (no allocation per step; copy a batch to keep
    it); elsewhere each batch is fresh.
    Arguments, files and the resume state are checked here, before the first batch."""
    if rank is None or world_size is None:
        _, env_rank, _, env_world = get_dist_info()
        rank = env_rank if rank is None else rank
        world_size = env_world if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    if min(B, T, buffer_size, tokenizer_batch_size) < 1:
        raise ValueError(f"B, T, buffer_size and tokenizer_batch_size must be positive (got {B}, {T}, {buffer_size}, "
                         f"{tokenizer_batch_size})")
    paths = split_parquet_files(split, data_dir, warn_on_legacy=(rank == 0 and split == "train"))
    bos = tokenizer.get_bos_token_id()
    buffer = DocBuffer()
    cursor = (1, 0, rank, 0)  # (epoch, pq_idx, rg_idx, next_row): nothing read yet
    if resume_state_dict is not None:
        cursor, keys = _decode_state(resume_state_dict, paths, rank, world_size)
        _restore_buffer(buffer, keys, paths, tokenizer, bos, tokenizer_threads)
    return _generate(tokenizer, B, T, paths, rank, world_size, tokenizer_threads, tokenizer_batch_size,
                     torch.device(device), buffer_size, bos, buffer, cursor)


def _generate(tokenizer, B, T, paths, rank, world_size, threads, chunk_size, device, buffer_size, bos, buffer, cursor):
    chunks = _document_chunks(paths, rank, world_size, chunk_size, *cursor)
    capacity = T + 1  # a row is T inputs plus the one extra target

    def refill():
        nonlocal cursor
        texts, (epoch, pq_idx, rg_idx, start) = next(chunks)
        token_lists = tokenizer.encode(texts, prepend=bos, num_threads=threads)  # BOS first, no EOS: the next BOS ends a document
        for i, tokens in enumerate(token_lists):
            buffer.add((epoch, pq_idx, rg_idx, start + i), tokens)
        cursor = (epoch, pq_idx, rg_idx, start + len(texts))

    use_cuda = device.type == "cuda"
    if use_cuda:
        staging = torch.empty(2, B, T, dtype=torch.long, pin_memory=True)
        on_device = torch.empty(2, B, T, dtype=torch.long, device=device)
        copied = None  # event marking the end of the last host-to-device copy out of `staging`

    while True:
        flat = []
        for _ in range(B):
            space = capacity
            while space > 0:
                while len(buffer) < buffer_size:  # refill before every placement: best fit always chooses among buffer_size documents
                    refill()
                tokens = buffer.take(space)
                flat.extend(tokens)
                space -= len(tokens)
        rows = torch.tensor(flat, dtype=torch.long).view(B, capacity)
        state = _encode_state(cursor, buffer, rank, world_size)
        if use_cuda:
            if copied is not None:
                copied.synchronize()  # the previous async copy must have read `staging` before we overwrite it
            staging[0].copy_(rows[:, :-1])
            staging[1].copy_(rows[:, 1:])
            on_device.copy_(staging, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(torch.cuda.current_stream(device))
            yield on_device[0], on_device[1], state
        else:
            yield rows[:, :-1].contiguous().to(device), rows[:, 1:].contiguous().to(device), state


def tokenizing_distributed_data_loader_bos_bestfit(*args, **kwargs):
    """The same stream without the state: yields (inputs, targets)."""
    loader = tokenizing_distributed_data_loader_with_state_bos_bestfit(*args, **kwargs)
    return ((inputs, targets) for inputs, targets, _ in loader)
