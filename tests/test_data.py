"""Tests of the data pipeline: corpus reading/splitting, tokenizers, shards, loaders.

All tests run on small synthetic files under tmp_path; none tokenises the default corpus.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from moeforge.data import (
    PackedLoader,
    default_corpus_files,
    find_data_files,
    iter_documents,
    iter_eval_batches,
    load_tokenizer,
    prepare_data,
)
from moeforge.data import shards as shards_mod
from moeforge.data.corpus import plan_split, split_files, stdlib_root
from moeforge.data.shards import build_shard, open_shard
from moeforge.data.tokenizer import FIM_TOKENS, train_bpe
from moeforge.errors import MoeforgeError

EOS = 0
FIM = (1, 2, 3)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


def _write_docs_jsonl(path: Path, docs: list[str]) -> None:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")



def test_split_files_deterministic_disjoint_nonempty(tmp_path):
    # Compares two calls' outputs, and the split against the input: equal, disjoint, covering.
    files = [tmp_path / f"dir{i % 3}" / f"f{i}.txt" for i in range(300)]
    train1, val1 = split_files(files, tmp_path, 0.05)
    train2, val2 = split_files(list(files), tmp_path, 0.05)
    assert (train1, val1) == (train2, val2)
    assert train1 and val1
    assert not set(train1) & set(val1)
    assert sorted(train1 + val1) == sorted(files)
    assert 3 <= len(val1) <= 30  # about 5% of 300


def test_split_files_guarantees_both_sides(tmp_path):
    # With fraction 0 the hash rule picks nothing; one file must still be moved to validation.
    files = [tmp_path / "a.txt", tmp_path / "b.txt"]
    train, val = split_files(files, tmp_path, 0.0)
    assert len(train) == 1 and len(val) == 1
    train, val = split_files(files, tmp_path, 0.9999)
    assert len(train) == 1 and len(val) == 1
    with pytest.raises(MoeforgeError, match="at least 2 files"):
        split_files(files[:1], tmp_path)


def test_default_corpus_files_sorted_and_filtered():
    # Compares the listing with its own sorted order and checks the excluded folders are absent.
    files = default_corpus_files()
    root = stdlib_root()
    rel = [p.relative_to(root).as_posix() for p in files]
    assert len(files) > 100
    assert rel == sorted(rel)
    assert all(p.suffix == ".py" for p in files)
    excluded = {"site-packages", "dist-packages", "__pycache__"}
    assert not any(excluded & set(r.split("/")) for r in rel)


def test_find_data_files_errors(tmp_path):
    # Compares the error messages for a missing path, an empty folder and only-empty files.
    with pytest.raises(MoeforgeError, match="does not exist"):
        find_data_files(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("not a data file")
    with pytest.raises(MoeforgeError, match=r"no \.txt/\.jsonl/\.parquet files under"):
        find_data_files(tmp_path / "empty")
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("")
    with pytest.raises(MoeforgeError, match="empty"):
        find_data_files(tmp_path / "blank")


def test_find_data_files_recursive_sorted(tmp_path):
    # Compares the found files with the expected sorted, recursive list (empty files dropped).
    (tmp_path / "sub").mkdir()
    for name in ["b.txt", "sub/a.jsonl", "a.txt", "skip.csv"]:
        (tmp_path / name).write_text("x")
    (tmp_path / "empty.txt").write_text("")
    got = [p.relative_to(tmp_path).as_posix() for p in find_data_files(tmp_path)]
    assert got == ["a.txt", "b.txt", "sub/a.jsonl"]


def test_iter_documents_txt_jsonl_parquet(tmp_path):
    # Compares the documents read back with those written, in file order, empties skipped.
    (tmp_path / "a.txt").write_text("first document\nwith two lines\n", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"text": "j1"}) + "\n\n" + json.dumps({"text": ""}) + "\n"
        + json.dumps({"text": "j2 ünïcode", "id": 3}) + "\n",
        encoding="utf-8",
    )
    pq.write_table(pa.table({"text": ["p1", None, "", "p2"], "n": [1, 2, 3, 4]}),
                   tmp_path / "c.parquet", row_group_size=2)
    assert list(iter_documents(tmp_path)) == [
        "first document\nwith two lines\n", "j1", "j2 ünïcode", "p1", "p2"
    ]
    assert list(iter_documents(tmp_path / "b.jsonl")) == ["j1", "j2 ünïcode"]


def test_iter_documents_errors(tmp_path):
    # Compares the error messages (file and line number) for malformed inputs.
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n\n{"text": broken\n', encoding="utf-8")
    with pytest.raises(MoeforgeError, match=r"bad\.jsonl' line 3 is not valid JSON"):
        list(iter_documents(bad))
    notext = tmp_path / "notext.jsonl"
    notext.write_text('{"text": "ok"}\n{"body": "x"}\n', encoding="utf-8")
    with pytest.raises(MoeforgeError, match=r"line 2 has no string \"text\""):
        list(iter_documents(notext))
    nocol = tmp_path / "nocol.parquet"
    pq.write_table(pa.table({"body": ["x"]}), nocol)
    with pytest.raises(MoeforgeError, match=r"no \"text\" column"):
        list(iter_documents(nocol))


def test_single_file_split_by_document(tmp_path):
    # Compares the validation documents with the rule: index % 100 == 99, else the last one.
    many = tmp_path / "many.jsonl"
    _write_docs_jsonl(many, [f"doc {i}" for i in range(250)])
    split = plan_split(many)
    val = list(split.val_documents())
    train = list(split.train_documents())
    assert val == ["doc 99", "doc 199"]
    assert train == [f"doc {i}" for i in range(250) if i % 100 != 99]

    few = tmp_path / "few.jsonl"
    _write_docs_jsonl(few, [f"doc {i}" for i in range(5)])
    split = plan_split(few)
    assert list(split.val_documents()) == ["doc 4"]
    assert list(split.train_documents()) == [f"doc {i}" for i in range(4)]

    one = tmp_path / "one.txt"
    one.write_text("only document")
    with pytest.raises(MoeforgeError, match="need at least 2"):
        list(plan_split(one).val_documents())



def test_tokenizer_round_trip_and_specials(tok):
    # Compares decode(encode(s)) with s, and the special ids with the token table.
    for text in ["def f(x):\n    return x + 1\n", "héllo wörld — 你好, мир 🙂\t\r\n", ""]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == 8192
    assert tok.eos_id == tok._tok.token_to_id("<|endoftext|>")
    assert tok.fim_ids == tuple(tok._tok.token_to_id(t) for t in FIM_TOKENS)
    assert len(set((tok.eos_id, *tok.fim_ids))) == 4
    assert len(tok.fingerprint) == 16 and int(tok.fingerprint, 16) >= 0
    assert tok.path.stat().st_size < 1_000_000
    # Special-token spellings inside document text stay plain text.
    ids = tok.encode("a <|endoftext|> b <|fim_hole|>")
    assert not {tok.eos_id, *tok.fim_ids} & set(ids)
    assert tok.encode_batch(["abc", "x = 1"]) == [tok.encode("abc"), tok.encode("x = 1")]


def test_token_bytes_sum_matches_utf8_length(tok):
    # Compares the summed token_bytes of encoded text with the text's UTF-8 length.
    tb = tok.token_bytes
    assert tb.dtype == torch.int64 and tb.shape == (tok.vocab_size,)
    assert tb[tok.eos_id] == 0 and all(tb[i] == 0 for i in tok.fim_ids)
    for text in ["import os\nprint(os.getcwd())\n", "naïve café 日本語 🙂 \x00\x7f"]:
        ids = tok.encode(text)
        assert int(tb[ids].sum()) == len(text.encode("utf-8"))


def test_bad_tokenizer_files(tmp_path):
    # Compares the error messages for a missing file, invalid JSON and a non-tokenizer JSON.
    with pytest.raises(MoeforgeError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.json")
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    with pytest.raises(MoeforgeError, match=r"garbage\.json' does not parse"):
        load_tokenizer(garbage)
    wrong = tmp_path / "wrong.json"
    wrong.write_text('{"hello": 1}')
    with pytest.raises(MoeforgeError, match="does not parse"):
        load_tokenizer(wrong)


def _word_level_tokenizer(path: Path, specials: list[str]) -> Path:
    from tokenizers import Tokenizer as HF
    from tokenizers import models, pre_tokenizers

    vocab = {t: i for i, t in enumerate([*specials, "[UNK]", "hello", "world", "é"])}
    hf = HF(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.add_special_tokens(specials)
    hf.save(str(path))
    return path


def test_foreign_tokenizer_eos_fim_and_token_bytes(tmp_path):
    # Compares the detected EOS/FIM ids and the decode-based token_bytes with expectations.
    deepseek = ["<｜end▁of▁sentence｜>", "<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"]
    t = load_tokenizer(_word_level_tokenizer(tmp_path / "ds.json", deepseek))
    assert t.eos_id == 0 and t.fim_ids == (1, 2, 3)
    assert t.token_bytes.tolist() == [0, 0, 0, 0, 5, 5, 5, 2]  # [UNK] decodes to "[UNK]"

    t = load_tokenizer(_word_level_tokenizer(tmp_path / "s.json", ["</s>"]))
    assert t.eos_id == 0 and t.fim_ids is None
    with pytest.raises(MoeforgeError, match="no end-of-text token"):
        load_tokenizer(_word_level_tokenizer(tmp_path / "none.json", ["<pad>"]))


def test_train_bpe_small(tmp_path):
    # Compares a freshly trained tokenizer's round trip, specials and output directory contents.
    files = []
    for i in range(4):
        f = tmp_path / f"src{i}.txt"
        f.write_text(f"def function_{i}(value):\n    return value * {i} + 'ünï'\n" * 20)
        files.append(f)
    out = tmp_path / "out" / "tok.json"
    train_bpe(files, 300, out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["tok.json"]  # no temp files left
    t = load_tokenizer(out)
    assert t.vocab_size <= 300 and t.eos_id == 0 and t.fim_ids == (1, 2, 3)
    text = "def function_9(x):\n    return 'ünï'\n"
    assert t.decode(t.encode(text)) == text
    assert int(t.token_bytes[t.encode(text)].sum()) == len(text.encode())



def test_build_and_open_shard_exact_stream(tmp_path, tok):
    # Compares the mapped shard with the concatenation of encode(doc) + [EOS] per document.
    docs = [f"document {i}: " + "x = 'ü' * 3\n" * (i % 7) for i in range(600)]
    meta = build_shard(iter(docs), tok, tmp_path / "s.bin")
    data = open_shard(tmp_path / "s.bin")
    expected = [t for d in docs for t in (*tok.encode(d), tok.eos_id)]
    assert data.dtype == np.uint16
    assert data.tolist() == expected
    assert meta["num_tokens"] == len(expected) and meta["num_documents"] == len(docs)
    assert meta["num_bytes"] == sum(len(d.encode()) for d in docs)
    assert meta["tokenizer_fingerprint"] == tok.fingerprint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.bin", "s.json"]


class _BigVocabTokenizer:
    """A stand-in tokenizer with ids above uint16."""

    vocab_size = 100_000
    eos_id = 99_999
    fingerprint = "0" * 16

    def encode_batch(self, texts):
        return [[70_000 + len(t), ord(t[0])] for t in texts]


def test_build_shard_uint32_for_large_vocab(tmp_path):
    # Compares the stored dtype and values for a vocabulary that does not fit uint16.
    build_shard(["ab", "c"], _BigVocabTokenizer(), tmp_path / "big.bin")
    data = open_shard(tmp_path / "big.bin")
    assert data.dtype == np.uint32
    assert data.tolist() == [70_002, ord("a"), 99_999, 70_001, ord("c"), 99_999]


def test_truncated_or_unsidecarred_shard_is_rejected(tmp_path, tok):
    # Compares the error for a shard whose length disagrees with its sidecar, or has none.
    build_shard(["some text here"] * 10, tok, tmp_path / "s.bin")
    raw = (tmp_path / "s.bin").read_bytes()
    (tmp_path / "s.bin").write_bytes(raw[:-2])
    with pytest.raises(MoeforgeError, match="incomplete or corrupt; delete it to rebuild"):
        open_shard(tmp_path / "s.bin")
    (tmp_path / "s.bin").write_bytes(raw)
    open_shard(tmp_path / "s.bin")
    (tmp_path / "s.json").unlink()
    with pytest.raises(MoeforgeError, match="incomplete or corrupt"):
        open_shard(tmp_path / "s.bin")


def test_prepare_data_caches(tmp_path, tok, monkeypatch):
    # Compares a second prepare_data with the first (same tokens) while build_shard must not
    # run, then checks that changing a source file leads to a new cache folder.
    data = tmp_path / "data"
    data.mkdir()
    for i in range(12):
        (data / f"file{i:02d}.txt").write_text(f"text file number {i}\n" * (i + 1))
    cache = tmp_path / "cache"
    first = prepare_data(data, tok, cache)
    assert first.train_meta["num_documents"] + first.val_meta["num_documents"] == 12
    assert first.val_meta["num_documents"] >= 1 and first.train_meta["num_documents"] >= 1
    mtime = (first.cache_path / "train.bin").stat().st_mtime_ns

    def no_build(*args, **kwargs):
        raise AssertionError("build_shard called on a cache hit")

    monkeypatch.setattr(shards_mod, "build_shard", no_build)
    second = prepare_data(data, tok, cache)
    assert second.cache_path == first.cache_path
    assert np.array_equal(second.train, first.train) and np.array_equal(second.val, first.val)
    assert (first.cache_path / "train.bin").stat().st_mtime_ns == mtime
    monkeypatch.undo()

    (data / "file00.txt").write_text("changed content\n")
    third = prepare_data(data, tok, cache)
    assert third.cache_path != first.cache_path


def test_prepare_data_concurrent_builders_build_once(tmp_path, tok, monkeypatch):
    # Three workers (threads here, the ranks of a torchrun job in practice) find the same cache empty
    # at once: the lock lets one build both shards (2 calls, slowed down so that the others surely
    # arrive while it builds) and the others open its shards. Without the lock every worker built,
    # and one's start removed the sidecar another had just written ("vanished while being written").
    import threading
    import time

    data = tmp_path / "data"
    data.mkdir()
    for i in range(6):
        (data / f"file{i}.txt").write_text(f"document {i}\n" * 20)
    calls = []
    real = shards_mod.build_shard

    def slow_build(*args, **kwargs):
        calls.append(threading.get_ident())
        time.sleep(0.3)
        return real(*args, **kwargs)

    monkeypatch.setattr(shards_mod, "build_shard", slow_build)
    results, errors = [], []

    def worker():
        try:
            results.append(prepare_data(data, tok, tmp_path / "cache"))
        except BaseException as e:  # reported below, not lost in the thread
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(calls) == 2 and len(set(calls)) == 1  # train and val, by one worker
    assert len(results) == 3
    for r in results[1:]:
        assert np.array_equal(r.train, results[0].train) and np.array_equal(r.val, results[0].val)


def test_default_cache_dir(monkeypatch, tmp_path):
    # Compares the cache dir with $MOEFORGE_CACHE when set, else ~/.cache/moeforge.
    monkeypatch.setenv("MOEFORGE_CACHE", str(tmp_path))
    assert shards_mod.default_cache_dir() == tmp_path
    monkeypatch.delenv("MOEFORGE_CACHE")
    assert shards_mod.default_cache_dir() == Path.home() / ".cache" / "moeforge"



def _stream(n: int, seed: int = 0, doc_len: tuple[int, int] = (1, 12)) -> np.ndarray:
    """Random documents of tokens in [10, 100) separated by EOS, as uint16."""
    rng = np.random.default_rng(seed)
    out: list[int] = []
    while len(out) < n:
        out += rng.integers(10, 100, size=int(rng.integers(*doc_len))).tolist() + [EOS]
    return np.asarray(out[:n], dtype=np.uint16)


def test_loader_deterministic_and_seeded():
    # Compares batches of two loaders with one seed (equal) and with two seeds (different).
    tokens = _stream(5000)
    a, b, c = (PackedLoader(tokens, 16, seed, EOS) for seed in (1, 1, 2))
    batches_a = [a.next_batch(8) for _ in range(5)]
    batches_b = [b.next_batch(8) for _ in range(5)]
    batches_c = [c.next_batch(8) for _ in range(5)]
    assert all(torch.equal(x, y) for x, y in zip(batches_a, batches_b))
    assert not all(torch.equal(x, y) for x, y in zip(batches_a, batches_c))
    assert batches_a[0].dtype == torch.int64 and batches_a[0].shape == (8, 17)


def test_loader_epoch_serves_every_window_once():
    # Compares the windows served in one epoch with the set of all windows [i*S, i*S+S+1).
    tokens = np.arange(1000, dtype=np.uint16)  # distinct tokens identify windows
    seq_len = 7
    loader = PackedLoader(tokens, seq_len, 3, eos_id=999)
    n = (len(tokens) - 1) // seq_len
    rows = loader.next_batch(n)
    starts = sorted(int(r[0]) for r in rows)
    assert starts == [i * seq_len for i in range(n)]
    for r in rows:
        assert r.tolist() == list(range(int(r[0]), int(r[0]) + seq_len + 1))
    assert loader.state_dict() == {"epoch": 0, "position": n}
    loader.next_batch(1)
    assert loader.state_dict() == {"epoch": 1, "position": 1}


def test_loader_resume_identical_across_epoch_boundary():
    # Compares the batches of a loader restored from a state dict with the original's,
    # from a point where the next batches straddle an epoch boundary.
    tokens = _stream(700)
    original = PackedLoader(tokens, 10, 5, EOS, fim_rate=0.5, fim_ids=FIM)  # 69 windows
    for _ in range(6):
        original.next_batch(11)  # 66 windows: 3 left in epoch 0
    state = original.state_dict()
    assert state == {"epoch": 0, "position": 66}
    assert all(type(v) is int for v in state.values())
    restored = PackedLoader(tokens, 10, 5, EOS, fim_rate=0.5, fim_ids=FIM)
    restored.load_state_dict(json.loads(json.dumps(state)))
    for _ in range(15):
        assert torch.equal(original.next_batch(11), restored.next_batch(11))
    assert original.state_dict()["epoch"] >= 2
    with pytest.raises(MoeforgeError, match="does not fit"):
        restored.load_state_dict({"epoch": 0, "position": 1000})


def test_loader_too_little_data_and_missing_fim():
    # Compares the error messages for data shorter than a window and FIM without sentinels.
    with pytest.raises(MoeforgeError, match="data has 10 tokens, fewer than one sequence"):
        PackedLoader(np.zeros(10, dtype=np.uint16), 10, 0, EOS)
    with pytest.raises(MoeforgeError, match="sentinel"):
        PackedLoader(_stream(100), 8, 0, EOS, fim_rate=0.1, fim_ids=None)


def _segments(row: list[int]) -> list[list[int]]:
    out, cur = [], []
    for t in row:
        if t == EOS:
            out.append(cur)
            cur = []
        else:
            cur.append(t)
    out.append(cur)
    return out


def test_fim_rewrites_every_segment_in_psm_order():
    # Compares each rewritten segment with the original window's segment: PSM sentinel order,
    # prefix/suffix/middle reassembling the original, and equal multisets of tokens (a
    # subset for the last segment, which truncation may cut).
    tokens = _stream(20_000, seed=4, doc_len=(1, 40))
    seq_len = 64
    plain = PackedLoader(tokens, seq_len, 9, EOS)
    fim = PackedLoader(tokens, seq_len, 9, EOS, fim_rate=1.0, fim_ids=FIM)
    begin, hole, end = FIM
    checked = 0
    for _ in range(20):
        for orig_row, new_row in zip(plain.next_batch(16).tolist(), fim.next_batch(16).tolist()):
            assert len(new_row) == seq_len + 1
            orig_segs, new_segs = _segments(orig_row), _segments(new_row)
            assert len(new_segs) <= len(orig_segs)
            for k, (o, s) in enumerate(zip(orig_segs, new_segs)):
                last = k == len(new_segs) - 1
                if len(o) < 3:
                    assert s == o or last
                    continue
                if not last or len(s) == len(o) + 3:
                    assert len(s) == len(o) + 3
                    assert s[0] == begin and s.count(begin) == s.count(hole) == s.count(end) == 1
                    h, e = s.index(hole), s.index(end)
                    assert 1 < h < e
                    prefix, suffix, middle = s[1:h], s[h + 1 : e], s[e + 1 :]
                    assert prefix and suffix and middle
                    assert prefix + middle + suffix == o
                    checked += 1
                else:  # the window's last segment, cut short by truncation (maybe to nothing)
                    assert not s or s[0] == begin
                    non_sentinel = Counter(t for t in s if t not in FIM)
                    assert not non_sentinel - Counter(o)
    assert checked > 200


def test_fim_rate_zero_point_one_is_partial():
    # Compares the fraction of windows containing a FIM begin token with a 0.1 rate: some, few.
    tokens = _stream(50_000, seed=1, doc_len=(5, 30))
    loader = PackedLoader(tokens, 32, 0, EOS, fim_rate=0.1, fim_ids=FIM)
    rows = loader.next_batch(1000)
    frac = float((rows == FIM[0]).any(dim=1).float().mean())
    assert 0.05 < frac < 0.6


def test_iter_eval_batches_covers_every_target_once():
    # Compares the concatenated non-padded targets with tokens[1:] and inputs with tokens[:-1].
    tokens = np.arange(1, 104, dtype=np.uint16)  # 103 tokens: 102 targets, not a multiple of 8
    seen_inputs, seen_targets = [], []
    batches = list(iter_eval_batches(tokens, seq_len=8, batch_size=4))
    assert len(batches) == 4  # 13 windows -> batches of 4, 4, 4, 1
    for inputs, targets in batches:
        assert inputs.shape == targets.shape and inputs.shape[1] == 8
        mask = targets != -100
        seen_inputs += inputs[mask].tolist()
        seen_targets += targets[mask].tolist()
    assert seen_targets == tokens[1:].tolist()
    assert seen_inputs == tokens[:-1].tolist()
    assert batches[-1][1][0].tolist()[-2:] == [-100, -100]
    assert len(list(iter_eval_batches(tokens, 8, 4, max_batches=2))) == 2


@pytest.mark.parametrize("n_tokens", [2, 9, 10, 30, 103])
@pytest.mark.parametrize("stride", [1, 3, 5, 8, 20])
def test_iter_eval_batches_with_a_stride_scores_every_target_once_with_context(n_tokens, stride):
    """Overlapping windows: every target is scored exactly once, in order, from a window whose inputs
    are the tokens before it; after the first window each has at least seq_len - stride of them.
    A stride of seq_len or more is back-to-back windows."""
    seq_len = 8
    tokens = np.arange(1, n_tokens + 1, dtype=np.uint16)  # token value = 1 + its position
    scored = []
    for inputs, targets in iter_eval_batches(tokens, seq_len, batch_size=3, stride=stride):
        for row_in, row_t in zip(inputs.tolist(), targets.tolist()):
            for col, t in enumerate(row_t):
                if t == -100:
                    continue
                position = t - 1
                assert row_in[col] == position  # the input just before the target ...
                assert row_in[: col + 1] == list(range(position - col, position + 1))  # ... and all its context
                if position > seq_len:
                    assert col + 1 >= seq_len - min(stride, seq_len)
                scored.append(t)
    assert scored == tokens[1:].tolist()
    if stride >= seq_len:
        plain = [t.tolist() for _, t in iter_eval_batches(tokens, seq_len, 3)]
        assert [t.tolist() for _, t in iter_eval_batches(tokens, seq_len, 3, stride=stride)] == plain
