"""nanochat.dataset: split rule, reading, the verified parallel downloader (against a local HTTP
server on 127.0.0.1), the text-folder converter, and the real shards in ../shared/data."""

import collections
import http.server
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat import dataset
from nanochat.common import NanochatError

REPO = Path(__file__).resolve().parents[1]
SHARED_SHARDS = REPO.parent / "shared" / "data" / "shards"


def write_parquet(path, texts, row_group_size=8):
    pq.write_table(pa.table({"text": texts}), path, row_group_size=row_group_size)


def make_dir(root, sizes, row_group_size=8):
    os.makedirs(root, exist_ok=True)
    for f, n in enumerate(sizes):
        write_parquet(os.path.join(root, dataset.shard_filename(f)), [f"file{f} doc{i}" for i in range(n)], row_group_size)
    return str(root)


# -----------------------------------------------------------------------------
# listing and reading


def test_split_rule_last_file_is_val(tmp_path):
    d = make_dir(tmp_path / "d", [10, 20, 5])
    (tmp_path / "d" / "shard_00009.parquet.abc.tmp").write_bytes(b"partial")  # a download in flight
    (tmp_path / "d" / "notes.txt").write_text("not a shard")
    files = dataset.list_parquet_files(d)
    assert [os.path.basename(f) for f in files] == [dataset.shard_filename(i) for i in range(3)]
    assert dataset.split_parquet_files("train", d) == files[:2]
    assert dataset.split_parquet_files("val", d) == files[2:]
    with pytest.raises(ValueError):
        dataset.split_parquet_files("test", d)


def test_iter_batched_row_groups_with_start_and_step(tmp_path):
    d = make_dir(tmp_path / "d", [20, 10, 5])  # row groups of 8: train file 0 -> 8,8,4; file 1 -> 8,2
    batches = list(dataset.parquets_iter_batched("train", data_dir=d))
    assert [len(b) for b in batches] == [8, 8, 4, 8, 2]
    assert batches[0][0] == "file0 doc0" and batches[3][0] == "file1 doc0"
    assert [b[0] for b in dataset.parquets_iter_batched("train", start=1, step=2, data_dir=d)] == ["file0 doc8", "file1 doc8"]
    assert list(dataset.parquets_iter_batched("val", data_dir=d)) == [[f"file2 doc{i}" for i in range(5)]]


def test_data_dir_errors_and_env(tmp_path, monkeypatch):
    with pytest.raises(NanochatError, match="does not exist"):
        dataset.list_parquet_files(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(NanochatError, match="no .parquet files"):
        dataset.list_parquet_files(str(tmp_path / "empty"))
    one = make_dir(tmp_path / "one", [4])
    with pytest.raises(NanochatError, match="at least 2"):
        dataset.split_parquet_files("train", one)
    two = make_dir(tmp_path / "two", [4, 3])
    monkeypatch.setenv("NANOCHAT_DATA_DIR", two)
    assert dataset.split_parquet_files("val") == [os.path.join(two, "shard_00001.parquet")]
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(tmp_path / "nope"))
    with pytest.raises(NanochatError, match="NANOCHAT_DATA_DIR"):
        dataset.list_parquet_files()


def test_default_dirs_and_legacy_fallback(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("NANOCHAT_DATA_DIR", raising=False)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(NanochatError, match="python -m nanochat.dataset"):
        dataset.list_parquet_files()
    legacy = make_dir(tmp_path / "base_data", [3, 3])
    assert dataset.list_parquet_files(warn_on_legacy=True)[0].startswith(legacy)
    assert "legacy" in capsys.readouterr().out
    climbmix = make_dir(tmp_path / "base_data_climbmix", [3, 3])
    assert dataset.list_parquet_files()[0].startswith(climbmix)


def test_corrupt_or_textless_shard_is_named(tmp_path):
    d = make_dir(tmp_path / "d", [10, 10])
    bad = tmp_path / "d" / "shard_00000.parquet"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(NanochatError, match="shard_00000.parquet"):
        list(dataset.parquets_iter_batched("train", data_dir=d))
    pq.write_table(pa.table({"content": ["x"]}), bad)
    with pytest.raises(NanochatError, match="no 'text' column"):
        list(dataset.parquets_iter_batched("train", data_dir=d))


# -----------------------------------------------------------------------------
# downloader


@pytest.fixture
def shard_server(tmp_path):
    """A local HTTP server (127.0.0.1 only) serving shards 0..2 and the val shard 6542. Paths in
    `corrupt` are answered with garbage the given number of times first. `hits` counts requests."""
    root = tmp_path / "served"
    root.mkdir()
    for i in (0, 1, 2, dataset.MAX_SHARD):
        write_parquet(root / dataset.shard_filename(i), [f"shard {i} doc {j}" for j in range(12)])
    hits, corrupt = collections.Counter(), {}

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args):
            pass

        def do_GET(self):
            hits[self.path] += 1
            if corrupt.get(self.path, 0) > 0:
                corrupt[self.path] -= 1
                body = b"PAR1 this is not a parquet file PAR1"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            super().do_GET()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield {"url": f"http://127.0.0.1:{server.server_address[1]}", "hits": hits, "corrupt": corrupt, "root": root}
    server.shutdown()
    server.server_close()


@pytest.fixture
def no_sleep(monkeypatch):
    import nanochat.common as common
    monkeypatch.setattr(common.time, "sleep", lambda s: None)


def _names(d):
    return sorted(f for f in os.listdir(d) if not f.endswith(".lock"))


def test_download_retries_corrupt_then_resumes(shard_server, tmp_path, no_sleep):
    out = tmp_path / "out"
    shard_server["corrupt"]["/shard_00001.parquet"] = 1
    assert dataset.download_shards(2, num_workers=3, base_url=shard_server["url"], data_dir=str(out)) == (3, 3)
    assert _names(out) == ["shard_00000.parquet", "shard_00001.parquet", "shard_06542.parquet"]  # no .tmp left
    assert shard_server["hits"]["/shard_00001.parquet"] == 2 and shard_server["hits"]["/shard_00000.parquet"] == 1
    for name in _names(out):
        dataset.verify_parquet(str(out / name))
    assert dataset.split_parquet_files("val", str(out)) == [str(out / "shard_06542.parquet")]

    # resume: present files are skipped, only the missing ones are fetched
    os.remove(out / "shard_00000.parquet")
    shard_server["hits"].clear()
    assert dataset.download_shards(3, num_workers=2, base_url=shard_server["url"], data_dir=str(out)) == (4, 4)
    assert set(shard_server["hits"]) == {"/shard_00000.parquet", "/shard_00002.parquet"}


def test_download_always_corrupt_is_never_left(shard_server, tmp_path, no_sleep):
    out = tmp_path / "out"
    shard_server["corrupt"]["/shard_00000.parquet"] = 99
    with pytest.raises(NanochatError, match="shard_00000.parquet"):
        dataset.download_shards(1, num_workers=2, base_url=shard_server["url"], data_dir=str(out))
    assert shard_server["hits"]["/shard_00000.parquet"] == 5  # 5 attempts (waits of 2/4/8/16 s, patched out here)
    assert _names(out) == ["shard_06542.parquet"]


def test_download_404_fails_at_once_with_clear_error(shard_server, tmp_path, no_sleep):
    out = tmp_path / "out"
    with pytest.raises(NanochatError, match="404") as info:
        dataset.download_shards(5, num_workers=2, base_url=shard_server["url"], data_dir=str(out))
    assert "2 of 6 shards" in str(info.value) and "run the same command again" in str(info.value)
    assert shard_server["hits"]["/shard_00003.parquet"] == 1  # a wrong URL is not retried
    assert _names(out) == [dataset.shard_filename(i) for i in (0, 1, 2, dataset.MAX_SHARD)]


def test_download_from_local_folder_and_max_shard(shard_server, tmp_path):
    out = tmp_path / "out"
    assert dataset.download_shards(1, base_url=str(shard_server["root"]), data_dir=str(out), max_shard=2) == (2, 2)
    assert _names(out) == ["shard_00000.parquet", "shard_00002.parquet"]


def test_download_cli(shard_server, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "NANOCHAT_DATA_URL": shard_server["url"], "NANOCHAT_BASE_DIR": str(tmp_path / "base")}
    run = subprocess.run([sys.executable, "-m", "nanochat.dataset", "-n", "1", "-w", "2", "--data-dir", str(out)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "Done! Downloaded: 2/2" in run.stdout
    assert _names(out) == ["shard_00000.parquet", "shard_06542.parquet"]
    bad = subprocess.run([sys.executable, "-m", "nanochat.dataset", "--from-text", str(tmp_path / "missing")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error:") and "Traceback" not in bad.stderr


# -----------------------------------------------------------------------------
# converter


def test_split_document():
    assert dataset.split_document("  hello  ", 100) == ["hello"]
    assert dataset.split_document("\n\n", 100) == []
    text = "\n".join(f"line {i} " + "word " * (i % 7) for i in range(200)) + "\n" + "x" * 250 + " tail " + "y" * 90
    pieces = dataset.split_document(text, 100)
    assert all(0 < len(p) <= 100 for p in pieces)
    assert "".join("".join(p.split()) for p in pieces) == "".join(text.split())  # nothing lost
    assert dataset.split_document(text, 0) == [text.strip()]


def test_convert_round_trip(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("alpha document")
    (src / "b.md").write_text("# beta\n\nmarkdown body")
    with open(src / "sub" / "c.jsonl", "w") as f:
        for i in range(2500):
            f.write(json.dumps({"text": f"record {i}", "id": i}) + "\n")
        f.write("\n")  # blank lines are skipped
    (src / "ignored.csv").write_text("x,y")
    out = tmp_path / "out"
    stats = dataset.convert_text_dir(str(src), str(out), val_fraction=0.1, shard_rows=2000)
    docs = ["alpha document", "# beta\n\nmarkdown body"] + [f"record {i}" for i in range(2500)]
    val = [d for i, d in enumerate(docs) if (i + 1) // 10 > i // 10]  # every 10th document
    train = [d for i, d in enumerate(docs) if (i + 1) // 10 == i // 10]
    assert stats == {"train_shards": 2, "train_docs": len(train), "val_docs": len(val), "out_dir": str(out)}
    files = dataset.list_parquet_files(str(out))
    assert [os.path.basename(f) for f in files] == ["shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet"]
    assert [t for texts in dataset.parquets_iter_batched("train", data_dir=str(out)) for t in texts] == train
    assert [t for texts in dataset.parquets_iter_batched("val", data_dir=str(out)) for t in texts] == val
    meta = pq.ParquetFile(files[0]).metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [1024, 976]
    assert meta.row_group(0).column(0).compression == "ZSTD"
    assert pq.ParquetFile(files[1]).metadata.num_rows == len(train) - 2000

    # the output is deterministic, and an existing output is not silently mixed with
    with pytest.raises(NanochatError, match="--overwrite"):
        dataset.convert_text_dir(str(src), str(out))
    before = [pq.read_table(f).column("text").to_pylist() for f in files]
    dataset.convert_text_dir(str(src), str(out), val_fraction=0.1, shard_rows=2000, overwrite=True)
    assert [pq.read_table(f).column("text").to_pylist() for f in files] == before
    dataset.convert_text_dir(str(src), str(out), val_fraction=0.1, overwrite=True)  # one train shard now
    assert len(dataset.list_parquet_files(str(out))) == 2


def test_convert_doc_chars_and_small_inputs(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "one.txt").write_text("\n".join(f"sentence number {i}." for i in range(100)))
    out = tmp_path / "out"
    stats = dataset.convert_text_dir(str(src), str(out), doc_chars=200)
    texts = [t for f in dataset.list_parquet_files(str(out)) for t in pq.read_table(f).column("text").to_pylist()]
    assert stats["val_docs"] >= 1 and stats["train_docs"] >= 1 and all(len(t) <= 200 for t in texts)
    # two documents: one train, one val (the last one, since 5% of 2 picks none)
    (src / "one.txt").write_text("first")
    (src / "two.txt").write_text("second")
    stats = dataset.convert_text_dir(str(src), str(tmp_path / "o2"))
    assert (stats["train_docs"], stats["val_docs"]) == (1, 1)
    assert list(dataset.parquets_iter_batched("val", data_dir=str(tmp_path / "o2"))) == [["second"]]


def test_convert_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(NanochatError, match="no .txt, .md or .jsonl"):
        dataset.convert_text_dir(str(tmp_path / "empty"), str(tmp_path / "o"))
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("   \n")
    with pytest.raises(NanochatError, match="at least 2"):
        dataset.convert_text_dir(str(tmp_path / "blank"), str(tmp_path / "o"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(NanochatError, match=r"a.jsonl:2"):
        dataset.convert_text_dir(str(tmp_path / "bad"), str(tmp_path / "o"))
    with pytest.raises(NanochatError, match="val-fraction"):
        dataset.convert_text_dir(str(tmp_path / "bad"), str(tmp_path / "o"), val_fraction=1.0)
    assert not list((tmp_path / "o").glob("*.parquet"))


def test_convert_cli(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("\n".join(f"line {i}" for i in range(500)))
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "nanochat.dataset", "--from-text", str(src), "--out", str(out),
                          "--doc-chars", "100", "--val-fraction", "0.2"], cwd=REPO, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "NANOCHAT_BASE_DIR": str(tmp_path / "base")})
    assert run.returncode == 0, run.stderr
    assert "Done!" in run.stdout and len(dataset.list_parquet_files(str(out))) == 2


# -----------------------------------------------------------------------------
# the real shards


@pytest.mark.skipif(not SHARED_SHARDS.is_dir(), reason=f"real shards not present at {SHARED_SHARDS}")
def test_real_shards_layout():
    t0 = time.time()
    files = dataset.list_parquet_files(str(SHARED_SHARDS))
    assert len(files) >= 2
    val = list(dataset.parquets_iter_batched("val", data_dir=str(SHARED_SHARDS)))
    assert all(len(b) <= 1024 for b in val) and len(val[0]) == 1024
    assert all(isinstance(t, str) and t for b in val for t in b)
    for f in files:
        dataset.verify_parquet(f)
    assert time.time() - t0 < 30
