"""nanochat.dataloader: BOS-aligned best-fit packing (checked against a plain re-statement of
the algorithm), rank striding, exact resume at every batch (across files and epochs), resume
from a position-only state, corrupt shards, and the real shards in ../shared/data."""

import itertools
import json
import logging
import os
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanochat import dataloader
from nanochat.common import NanochatError
from nanochat.dataloader import DocBuffer
from nanochat.dataloader import tokenizing_distributed_data_loader_with_state_bos_bestfit as make_loader

REPO = Path(__file__).resolve().parents[1]
SHARED_SHARDS = REPO.parent / "shared" / "data" / "shards"
BOS = 256


class ByteTokenizer:
    """The loader's tokenizer interface, byte-level: ids are the UTF-8 bytes, BOS is 256."""

    def get_bos_token_id(self):
        return BOS

    def encode(self, texts, prepend=None, num_threads=1):
        assert isinstance(texts, list)
        return [([prepend] if prepend is not None else []) + list(t.encode()) for t in texts]


TOK = ByteTokenizer()


def make_corpus(root, sizes=(21, 30, 13), row_group_size=8, seed=0):
    """Parquet files of documents 'f.i:' + 0..45 random letters (so 5..55 tokens with BOS)."""
    rng = random.Random(seed)
    os.makedirs(root, exist_ok=True)
    docs = {}
    for f, n in enumerate(sizes):
        texts = [f"{f}.{i}:" + "".join(rng.choice("abcdefgh ") for _ in range(rng.randrange(46))) for i in range(n)]
        pq.write_table(pa.table({"text": texts}), os.path.join(root, f"shard_{f:05d}.parquet"), row_group_size=row_group_size)
        docs[f] = texts
    return str(root), docs


def take(loader, n):
    return [(x.clone(), y.clone(), s) for x, y, s in itertools.islice(loader, n)]


def reference_batches(paths, B, T, buffer_size, chunk_size, n, rank=0, world_size=1):
    """The loader's algorithm restated plainly: list scans, no index, no state."""
    def chunks():
        while True:
            for path in paths:
                pf = pq.ParquetFile(path)
                for g in range(rank, pf.num_row_groups, world_size):
                    texts = pf.read_row_group(g).column("text").to_pylist()
                    for i in range(0, len(texts), chunk_size):
                        yield texts[i:i + chunk_size]

    source, buffer, out = chunks(), [], []
    for _ in range(n):
        rows = []
        for _ in range(B):
            row = []
            while len(row) < T + 1:
                while len(buffer) < buffer_size:
                    buffer.extend(TOK.encode(next(source), prepend=BOS))
                remaining = T + 1 - len(row)
                best, best_len = -1, 0
                for i, doc in enumerate(buffer):
                    if best_len < len(doc) <= remaining:
                        best, best_len = i, len(doc)
                if best >= 0:
                    row += buffer.pop(best)
                else:
                    shortest = min(range(len(buffer)), key=lambda i: len(buffer[i]))
                    row += buffer.pop(shortest)[:remaining]
            rows.append(row)
        t = torch.tensor(rows)
        out.append((t[:, :-1], t[:, 1:]))
    return out


# -----------------------------------------------------------------------------
# packing


def test_best_fit_choice_hand_built():
    buf = DocBuffer()
    for key, n in enumerate([3, 7, 5, 12, 2, 7]):
        buf.add(key, [key] * n)
    assert buf.take(10) == [1] * 7  # largest that fits; the earlier of the two 7s
    assert buf.take(3) == [0] * 3
    assert buf.take(10) == [5] * 7
    assert buf.take(3) == [4] * 2
    assert buf.take(1) == [2]  # nothing fits: the shortest (5) is cropped
    assert buf.keys() == [3]
    assert buf.take(4) == [3] * 4 and len(buf) == 0


def test_rows_are_bos_aligned_full_and_shifted(tmp_path):
    d, docs = make_corpus(tmp_path / "d")
    all_docs = {t.encode() for texts in docs.values() for t in texts}
    for x, y, _ in take(make_loader(TOK, 3, 16, "train", buffer_size=8, tokenizer_batch_size=5, data_dir=d), 40):
        assert x.shape == y.shape == (3, 16) and x.dtype == y.dtype == torch.int64
        assert (x[:, 0] == BOS).all()
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row in torch.cat([x, y[:, -1:]], dim=1).tolist():  # every position holds a document token
            segments = bytes(t if t != BOS else 0 for t in row[1:]).split(b"\0")
            assert all(s in all_docs for s in segments[:-1])  # whole documents, then one possibly cropped
            assert any(doc.startswith(segments[-1]) for doc in all_docs)


@pytest.mark.parametrize("rank,world_size", [(0, 1), (1, 2)])
def test_matches_plain_algorithm(tmp_path, rank, world_size):
    d, _ = make_corpus(tmp_path / "d")
    paths = sorted(str(p) for p in Path(d).glob("*.parquet"))[:-1]
    got = take(make_loader(TOK, 2, 16, "train", buffer_size=6, tokenizer_batch_size=3, data_dir=d,
                           rank=rank, world_size=world_size), 60)
    want = reference_batches(paths, 2, 16, 6, 3, 60, rank, world_size)
    for (x, y, _), (wx, wy) in zip(got, want):
        assert torch.equal(x, wx) and torch.equal(y, wy)


def test_default_buffer_matches_plain_algorithm(tmp_path):
    d, _ = make_corpus(tmp_path / "d", sizes=(300, 200, 10), row_group_size=32)
    paths = sorted(str(p) for p in Path(d).glob("*.parquet"))[:-1]
    got = take(make_loader(TOK, 4, 64, "train", data_dir=d), 8)  # buffer_size=1000, chunks of 128: two epochs buffered
    for (x, y, _), (wx, wy) in zip(got, reference_batches(paths, 4, 64, 1000, 128, 8)):
        assert torch.equal(x, wx) and torch.equal(y, wy)


def test_cpu_batches_are_not_overwritten(tmp_path):
    d, _ = make_corpus(tmp_path / "d")
    loader = make_loader(TOK, 2, 16, "train", buffer_size=4, data_dir=d)
    x0, y0, _ = next(loader)
    saved = x0.clone(), y0.clone()
    next(loader)
    assert torch.equal(x0, saved[0]) and torch.equal(y0, saved[1])


# -----------------------------------------------------------------------------
# distribution


def test_rank_striding_disjoint_and_complete(tmp_path):
    d, _ = make_corpus(tmp_path / "d", sizes=(21, 30, 40, 13))
    paths = sorted(str(p) for p in Path(d).glob("*.parquet"))[:-1]
    seen = {}
    for rank in range(2):
        chunks = dataloader._document_chunks(paths, rank, 2, 5, 1, 0, rank, 0)
        seen[rank] = {(p, g) for _, (e, p, g, _) in itertools.takewhile(lambda c: c[1][0] == 1, chunks)}
        assert all(g % 2 == rank for _, g in seen[rank])
    everything = {(p, g) for p, path in enumerate(paths) for g in range(pq.ParquetFile(path).num_row_groups)}
    assert seen[0] & seen[1] == set() and seen[0] | seen[1] == everything
    # through the loader: rank 1 only ever buffers documents of odd row groups
    for _, _, state in take(make_loader(TOK, 2, 16, "train", buffer_size=6, data_dir=d, rank=1, world_size=2), 20):
        assert all(g % 2 == 1 for _, _, g, _ in state["buffer"]) and state["rg_idx"] % 2 == 1


def test_rank_without_row_groups_fails_clearly(tmp_path):
    d, _ = make_corpus(tmp_path / "d", sizes=(5, 5))  # val: one row group
    loader = make_loader(TOK, 1, 8, "val", data_dir=d, rank=1, world_size=2)
    with pytest.raises(NanochatError, match="fewer row groups"):
        next(loader)


def test_world_from_environment(tmp_path, monkeypatch):
    d, _ = make_corpus(tmp_path / "d")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    _, _, state = next(make_loader(TOK, 1, 8, "train", buffer_size=4, data_dir=d))
    assert (state["rank"], state["world_size"]) == (1, 3) and state["rg_idx"] % 3 == 1


# -----------------------------------------------------------------------------
# resume


@pytest.mark.parametrize("rank,world_size", [(0, 1), (1, 2)])
def test_exact_resume_at_every_batch(tmp_path, rank, world_size):
    d, _ = make_corpus(tmp_path / "d")
    kwargs = dict(B=2, T=16, split="train", buffer_size=6, tokenizer_batch_size=3, data_dir=d, rank=rank, world_size=world_size)
    n = 70
    stream = take(make_loader(TOK, **kwargs), n)
    states = [s for _, _, s in stream]
    crossings = {"file": 0, "epoch": 0}
    for k in range(n - 1):
        state = json.loads(json.dumps(states[k]))  # it must survive a checkpoint's JSON
        assert state == states[k]
        crossings["file"] += states[k + 1]["pq_idx"] != state["pq_idx"]
        crossings["epoch"] += states[k + 1]["epoch"] != state["epoch"]
        resumed = take(make_loader(TOK, **kwargs, resume_state_dict=state), min(6, n - 1 - k))
        for (x, y, s), (ux, uy, us) in zip(resumed, stream[k + 1:]):
            assert torch.equal(x, ux) and torch.equal(y, uy) and s == us
    assert crossings["file"] >= 3 and crossings["epoch"] >= 2  # the resume points cover both boundaries


def test_state_format(tmp_path):
    d, _ = make_corpus(tmp_path / "d")
    _, _, state = next(make_loader(TOK, 2, 16, "train", buffer_size=6, tokenizer_batch_size=3, data_dir=d))
    assert set(state) == {"pq_idx", "rg_idx", "epoch", "next_row", "buffer", "rank", "world_size"}
    keys = [(e, p, g, r) for e, p, g, rows in state["buffer"] for r in rows]
    assert len(keys) >= 5 and keys == sorted(keys)  # buffer order is read order
    assert (state["epoch"], state["pq_idx"], state["rg_idx"], state["next_row"]) > keys[-1]


def test_position_only_state_resumes_at_next_round(tmp_path):
    d, _ = make_corpus(tmp_path / "d")  # train: file 0 has row groups 0..2, file 1 has 0..3
    loader = make_loader(TOK, 2, 16, "train", buffer_size=6, data_dir=d, resume_state_dict={"pq_idx": 0, "rg_idx": 1, "epoch": 1})
    keys = [(e, p, g, r) for e, p, g, rows in next(loader)[2]["buffer"] for r in rows]
    assert min(keys) >= (1, 0, 2, 0)
    # the last round of a file moves on to the next file; world size 2 rounds pair row groups
    cursor, keys = dataloader._decode_state({"pq_idx": 0, "rg_idx": 2, "epoch": 3}, [d] * 2, 0, 1)
    assert cursor == (3, 0, 3, 0) and keys == []
    loader = make_loader(TOK, 2, 16, "train", buffer_size=6, data_dir=d, resume_state_dict={"pq_idx": 0, "rg_idx": 2, "epoch": 3})
    _, _, state = next(loader)
    assert (state["epoch"], state["pq_idx"]) == (3, 1)
    assert dataloader._decode_state({"pq_idx": 1, "rg_idx": 1, "epoch": 1}, [d] * 2, 1, 2)[0] == (1, 1, 3, 0)


def test_state_of_another_rank_resumes_approximately(tmp_path, caplog):
    d, _ = make_corpus(tmp_path / "d")
    _, _, state = take(make_loader(TOK, 2, 16, "train", buffer_size=6, data_dir=d, rank=0, world_size=2), 3)[-1]
    with caplog.at_level(logging.WARNING, logger="nanochat"):
        loader = make_loader(TOK, 2, 16, "train", buffer_size=6, data_dir=d, rank=1, world_size=2, resume_state_dict=state)
    assert "approximately" in caplog.text
    _, _, resumed = next(loader)
    assert resumed["rank"] == 1 and all(g % 2 == 1 for _, _, g, _ in resumed["buffer"])


def test_bad_states_fail_clearly(tmp_path):
    d, _ = make_corpus(tmp_path / "d")
    with pytest.raises(NanochatError, match="pq_idx"):
        make_loader(TOK, 2, 16, "train", data_dir=d, resume_state_dict={"step": 3})
    with pytest.raises(NanochatError, match="points at file 7"):
        make_loader(TOK, 2, 16, "train", data_dir=d, resume_state_dict={"pq_idx": 7, "rg_idx": 0, "epoch": 1})
    _, _, state = next(make_loader(TOK, 2, 16, "train", buffer_size=6, data_dir=d))
    state = {**state, "buffer": [[1, 0, 9, [0]]]}  # a row group the data does not have
    with pytest.raises(NanochatError, match="row group 9"):
        make_loader(TOK, 2, 16, "train", data_dir=d, resume_state_dict=state)


def test_corrupt_shard_is_named(tmp_path):
    d, _ = make_corpus(tmp_path / "d")
    path = Path(d) / "shard_00001.parquet"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    loader = make_loader(TOK, 2, 16, "train", buffer_size=6, data_dir=d)
    with pytest.raises(NanochatError, match="shard_00001.parquet"):
        take(loader, 50)


# -----------------------------------------------------------------------------
# the real shards


@pytest.mark.skipif(not SHARED_SHARDS.is_dir(), reason=f"real shards not present at {SHARED_SHARDS}")
def test_real_shards_pack_and_resume_exactly():
    kwargs = dict(B=4, T=1024, split="train", data_dir=str(SHARED_SHARDS))  # ~600-character documents: fits and crops
    stream = take(make_loader(TOK, **kwargs), 12)
    for x, y, _ in stream:
        assert (x[:, 0] == BOS).all() and torch.equal(x[:, 1:], y[:, :-1])
    state = stream[5][2]
    assert len(json.dumps(state)) < 20_000  # a 1000-document buffer stays a few KB in the checkpoint meta
    resumed = take(make_loader(TOK, **kwargs, resume_state_dict=json.loads(json.dumps(state))), 6)
    for (x, y, s), (ux, uy, us) in zip(resumed, stream[6:]):
        assert torch.equal(x, ux) and torch.equal(y, uy) and s == us
    x, y, _ = next(make_loader(TOK, 2, 128, "val", data_dir=str(SHARED_SHARDS)))
    assert (x[:, 0] == BOS).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batches_equal_cpu_batches(tmp_path):
    d, _ = make_corpus(tmp_path / "d")
    kwargs = dict(B=2, T=16, split="train", buffer_size=6, data_dir=d)
    cpu = take(make_loader(TOK, **kwargs), 20)
    views = []
    for (x, y, s), (cx, cy, cs) in zip(make_loader(TOK, **kwargs, device="cuda"), cpu):
        assert x.is_cuda and torch.equal(x.cpu(), cx) and torch.equal(y.cpu(), cy) and s == cs
        views.append(x.data_ptr())
    assert len(set(views)) == 1  # one persistent device buffer, reused
