"""Token shards: documents tokenised once into flat, memory-mapped token files.

A shard is two files:

* ``NAME.bin``: every document's tokens followed by EOS, as one flat little-endian array
  (uint16 when the vocabulary fits, else uint32);
* ``NAME.json``: the sidecar (format version, dtype, token/document/byte counts, tokenizer
  fingerprint). It is written last, so a shard without a valid sidecar is incomplete.

:func:`prepare_data` keeps the train and validation shards of a data source in a cache folder
keyed by everything that determines their content, so later runs map them without tokenising.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moeforge.data.corpus import plan_split
from moeforge.data.tokenizer import Tokenizer
from moeforge.errors import MoeforgeError

FORMAT_VERSION = 1
# Documents per encode_batch call, and a cap on characters so huge documents bound memory.
_BATCH_DOCS = 256
_BATCH_CHARS = 16 * 1024 * 1024


def default_cache_dir() -> Path:
    """$MOEFORGE_CACHE if set, else ~/.cache/moeforge."""
    env = os.environ.get("MOEFORGE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "moeforge"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def sidecar_path(path: str | Path) -> Path:
    return Path(path).with_suffix(".json")


def _batches(documents: Iterable[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    chars = 0
    for doc in documents:
        batch.append(doc)
        chars += len(doc)
        if len(batch) >= _BATCH_DOCS or chars >= _BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _temp_in(directory: Path, name: str) -> tuple[int, str]:
    # A unique temp name per writer: concurrent builders of one shard never clobber each other.
    return tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")


def _replace_durably(fd_file: Any, tmp: str, dest: Path) -> None:
    fd_file.flush()
    os.fsync(fd_file.fileno())
    fd_file.close()
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; a shared cache should be readable by others
    os.replace(tmp, dest)


def build_shard(documents: Iterable[str], tokenizer: Tokenizer, out_path: str | Path) -> dict:
    """Tokenise ``documents`` into the shard ``out_path`` (+ sidecar); returns the sidecar."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    side = sidecar_path(out_path)
    # Drop an old sidecar first: between replacing the .bin and writing the new sidecar,
    # the shard must not look complete.
    side.unlink(missing_ok=True)

    dtype = token_dtype(tokenizer.vocab_size)
    n_tokens = n_docs = n_bytes = 0
    fd, tmp = _temp_in(out_path.parent, out_path.name)
    try:
        with os.fdopen(fd, "wb") as f:
            for batch in _batches(documents):
                encoded = tokenizer.encode_batch(batch)
                lengths = np.fromiter((len(ids) + 1 for ids in encoded), dtype=np.int64)
                chunk = np.empty(int(lengths.sum()), dtype=dtype)
                ends = np.cumsum(lengths)
                for ids, end, length in zip(encoded, ends, lengths):
                    chunk[end - length : end - 1] = ids
                chunk[ends - 1] = tokenizer.eos_id
                chunk.tofile(f)
                n_tokens += chunk.size
                n_docs += len(batch)
                n_bytes += sum(len(d.encode("utf-8")) for d in batch)
            _replace_durably(f, tmp, out_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

    meta = {
        "format_version": FORMAT_VERSION,
        "dtype": dtype.name,
        "num_tokens": n_tokens,
        "num_documents": n_docs,
        "num_bytes": n_bytes,
        "tokenizer_fingerprint": tokenizer.fingerprint,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
    }
    fd, tmp = _temp_in(out_path.parent, side.name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
            _replace_durably(f, tmp, side)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return meta


def read_shard_meta(path: str | Path) -> dict:
    """The validated sidecar of the shard at ``path``."""
    path = Path(path)
    corrupt = MoeforgeError(
        f"token shard '{path}' is incomplete or corrupt; delete it to rebuild"
    )
    try:
        meta = json.loads(sidecar_path(path).read_text(encoding="utf-8"))
        dtype = np.dtype(meta["dtype"])
        n_tokens = int(meta["num_tokens"])
        size = path.stat().st_size
    except (OSError, ValueError, KeyError, TypeError):
        raise corrupt from None
    if (
        meta.get("format_version") != FORMAT_VERSION
        or dtype not in (np.dtype(np.uint16), np.dtype(np.uint32))
        or size != n_tokens * dtype.itemsize
    ):
        raise corrupt
    return meta


def open_shard(path: str | Path) -> np.memmap:
    """Map a shard read-only after checking it against its sidecar."""
    meta = read_shard_meta(path)
    dtype = np.dtype(meta["dtype"])
    if meta["num_tokens"] == 0:
        # mmap cannot map an empty file; an empty array behaves the same for every reader.
        return np.zeros(0, dtype=dtype)  # type: ignore[return-value]
    return np.memmap(path, dtype=dtype, mode="r", shape=(meta["num_tokens"],))


@dataclass
class DataBundle:
    """Train and validation token streams of one data source, plus their sidecars."""

    train: np.memmap
    val: np.memmap
    train_meta: dict
    val_meta: dict
    description: str
    cache_path: Path


def _cache_key(signature: list, rule: str, tokenizer: Tokenizer) -> str:
    payload = json.dumps(
        {
            "format_version": FORMAT_VERSION,
            "tokenizer": tokenizer.fingerprint,
            "files": sorted(signature),
            "split": rule,
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _try_open(folder: Path) -> tuple[np.memmap, dict, np.memmap, dict] | None:
    """Both shards of a cache folder, or None if either is missing or incomplete."""
    try:
        train, val = folder / "train.bin", folder / "val.bin"
        return open_shard(train), read_shard_meta(train), open_shard(val), read_shard_meta(val)
    except MoeforgeError:
        return None


@contextlib.contextmanager
def _exclusive(path: Path):
    """Hold an exclusive lock on `path` (created if missing) for the block: POSIX flock, which the
    OS releases if the holder dies. Where fcntl does not exist (Windows) the block runs unlocked."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def prepare_data(
    data_path: str | Path | None, tokenizer: Tokenizer, cache_dir: str | Path
) -> DataBundle:
    """Train/val token shards for ``data_path`` (None: the default corpus), cached.

    The cache folder is ``cache_dir / key[:16]`` where the key hashes the format version, the
    tokenizer fingerprint, (relative path, size, mtime_ns) of every source file and the split
    rule; any change to those tokenises again into a new folder. Prints nothing.

    Shards are replaced atomically. Processes that find the cache incomplete at the same time (the
    ranks of a multi-process run) build it one at a time, holding a lock file in the folder: the
    first builds, the others wait and then open what it built. Without the lock a late builder
    would remove the sidecar of a shard an earlier one had just finished, under its reader.
    """
    split = plan_split(data_path)
    key = _cache_key(split.file_signature(), split.rule, tokenizer)
    folder = Path(cache_dir) / key[:16]

    opened = _try_open(folder)
    if opened is None:
        folder.mkdir(parents=True, exist_ok=True)
        with _exclusive(folder / ".lock"):
            opened = _try_open(folder)  # built by another process while this one waited
            if opened is None:
                build_shard(split.train_documents(), tokenizer, folder / "train.bin")
                build_shard(split.val_documents(), tokenizer, folder / "val.bin")
                opened = _try_open(folder)
        if opened is None:  # only if something deleted the files under us
            raise MoeforgeError(f"token shards in '{folder}' vanished while being written")
    train, train_meta, val, val_meta = opened
    for name, meta in (("train", train_meta), ("validation", val_meta)):
        if meta["num_documents"] == 0:
            raise MoeforgeError(f"the {name} split of {split.description} has no documents")
    description = (
        f"{split.description}: {train_meta['num_tokens']:,} train tokens "
        f"({train_meta['num_bytes']:,} bytes), {val_meta['num_tokens']:,} validation tokens "
        f"({val_meta['num_bytes']:,} bytes)"
    )
    return DataBundle(train, val, train_meta, val_meta, description, folder)
