"""Finding, reading and splitting raw text.

Two sources of text:

* the default corpus: every ``*.py`` file of the running interpreter's standard library
  (about 30 MB of real text that is always present, so nothing has to be downloaded);
* a user data path: one file or a folder searched recursively for ``.txt`` (one document per
  file), ``.jsonl`` (one document per line, its ``"text"`` field) and ``.parquet`` (its
  ``"text"`` column).

The train/validation split is deterministic and needs no stored state:

* several files: split by file with :func:`split_files` (a file is validation iff a hash of its
  path relative to the root falls under ``val_fraction``), so adding a file never moves others;
* a single file: split by document; document ``i`` (0-based, counting non-empty documents) is
  validation iff ``i % 100 == 99``, and when that selects nothing (fewer than 100 documents)
  the last document is validation instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from moeforge.errors import MoeforgeError

DATA_SUFFIXES = (".txt", ".jsonl", ".parquet")
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}
# Documents per row batch when reading parquet: bounds memory on files with huge row groups.
_PARQUET_BATCH_ROWS = 1024
SINGLE_FILE_VAL_EVERY = 100


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def default_corpus_files() -> list[Path]:
    """Every ``*.py`` file of the standard library, sorted by path relative to its root."""
    root = stdlib_root()
    files = []
    # os.walk with pruning: site-packages can be far larger than the stdlib itself.
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS]
        files += [Path(dirpath, f) for f in filenames if f.endswith(".py")]
    files = [p for p in files if p.is_file()]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _relative_key(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _path_hash(rel: str) -> int:
    return int(hashlib.sha256(rel.encode("utf-8")).hexdigest(), 16)


def split_files(
    paths: Sequence[Path], root: Path, val_fraction: float = 0.01
) -> tuple[list[Path], list[Path]]:
    """Split files into (train, val) by a hash of their path relative to ``root``.

    Both lists keep the input order and are never empty.
    """
    if len(paths) < 2:
        raise MoeforgeError(
            f"need at least 2 files to split into train and validation, got {len(paths)}"
        )
    if not 0.0 <= val_fraction < 1.0:
        raise MoeforgeError(f"val_fraction must be in [0, 1), got {val_fraction}")
    threshold = val_fraction * 10_000
    hashes = {p: _path_hash(_relative_key(Path(p), Path(root))) for p in paths}
    is_val = {p: hashes[p] % 10_000 < threshold for p in paths}
    by_hash = sorted(paths, key=lambda p: hashes[p])
    # Tiny folders or extreme fractions can leave a side empty; fix that deterministically.
    if not any(is_val.values()):
        is_val[by_hash[0]] = True
    if all(is_val.values()):
        is_val[by_hash[-1]] = False
    train = [p for p in paths if not is_val[p]]
    val = [p for p in paths if is_val[p]]
    return train, val


def find_data_files(path: str | Path) -> list[Path]:
    """The non-empty ``.txt``/``.jsonl``/``.parquet`` files at ``path`` (a file or a folder)."""
    path = Path(path)
    if not path.exists():
        raise MoeforgeError(f"data path '{path}' does not exist")
    if path.is_file():
        if path.suffix.lower() not in DATA_SUFFIXES:
            raise MoeforgeError(
                f"data file '{path}' is not a .txt, .jsonl or .parquet file"
            )
        files = [path]
    else:
        files = sorted(
            (p for p in path.rglob("*") if p.suffix.lower() in DATA_SUFFIXES and p.is_file()),
            key=lambda p: p.relative_to(path).as_posix(),
        )
        if not files:
            raise MoeforgeError(f"no .txt/.jsonl/.parquet files under '{path}'")
    non_empty = [p for p in files if p.stat().st_size > 0]
    if not non_empty:
        raise MoeforgeError(f"all data files under '{path}' are empty")
    return non_empty


def _read_text(path: Path) -> str:
    # errors="replace": one bad byte in a large corpus should not stop training.
    return path.read_text(encoding="utf-8", errors="replace")


def _iter_jsonl(path: Path) -> Iterator[str]:
    with path.open("r", encoding="utf-8", errors="replace") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise MoeforgeError(
                    f"'{path}' line {line_no} is not valid JSON: {e.msg}"
                ) from None
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise MoeforgeError(f"'{path}' line {line_no} has no string \"text\" field")
            if text:
                yield text


def _iter_parquet(path: Path) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise MoeforgeError(f"parquet file '{path}' cannot be read: {e}") from None
    if "text" not in pf.schema_arrow.names:
        raise MoeforgeError(f"parquet file '{path}' has no \"text\" column")
    column_type = pf.schema_arrow.field("text").type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise MoeforgeError(
            f"parquet file '{path}' column \"text\" has type {column_type}, expected string"
        )
    try:
        for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=["text"]):
            for text in batch.column(0).to_pylist():
                if text:
                    yield text
    except pa.ArrowException as e:
        raise MoeforgeError(f"parquet file '{path}' cannot be read: {e}") from None


def iter_file_documents(path: Path) -> Iterator[str]:
    """The non-empty documents of one file; any suffix other than .jsonl/.parquet is text."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _iter_jsonl(path)
    elif suffix == ".parquet":
        yield from _iter_parquet(path)
    else:
        text = _read_text(path)
        if text:
            yield text


def iter_documents(path: str | Path) -> Iterator[str]:
    """The non-empty documents at ``path`` (a data file or a folder of them), in file order."""
    for file in find_data_files(path):
        yield from iter_file_documents(file)


def _iter_files(files: Sequence[Path]) -> Iterator[str]:
    for file in files:
        yield from iter_file_documents(file)


def _single_file_split(path: Path, want_val: bool) -> Iterator[str]:
    """One side of the by-document split of a single file (see the module docstring)."""
    every = SINGLE_FILE_VAL_EVERY

    def is_val(index: int, count: int) -> bool:
        is_last = index == count - 1
        return index % every == every - 1 or (is_last and count < every)

    # Hold one document back: only at the end do we know whether it was the last one, and
    # the last one is validation when the file has fewer than `every` documents.
    held: str | None = None
    count = 0
    for doc in iter_file_documents(path):
        # `held` (index count - 1) is now known not to be the last of >= count + 1 documents.
        if held is not None and is_val(count - 1, count + 1) == want_val:
            yield held
        held = doc
        count += 1
    if count < 2:
        raise MoeforgeError(
            f"data file '{path}' has {count} documents; need at least 2 to split "
            "into train and validation"
        )
    if is_val(count - 1, count) == want_val:
        yield held


@dataclass(frozen=True)
class CorpusSplit:
    """Where the train and validation documents of a data source come from."""

    description: str
    root: Path
    files: list[Path]  # every source file, for the cache key
    rule: str  # names the split rule, for the cache key
    train_documents: Callable[[], Iterator[str]]
    val_documents: Callable[[], Iterator[str]]

    def file_signature(self) -> list[tuple[str, int, int]]:
        """(relative path, size, mtime_ns) of every source file: changes when the data does."""
        out = []
        for p in self.files:
            st = p.stat()
            out.append((_relative_key(p, self.root), st.st_size, st.st_mtime_ns))
        return out


def plan_split(data_path: str | Path | None, val_fraction: float = 0.01) -> CorpusSplit:
    """How to split ``data_path`` (None: the default corpus) into train and validation."""
    if data_path is None:
        root = stdlib_root()
        files = default_corpus_files()
        train, val = split_files(files, root, val_fraction)
        return CorpusSplit(
            description=(
                f"default corpus: Python standard library at '{root}' "
                f"({len(train)} train / {len(val)} validation files)"
            ),
            root=root,
            files=files,
            rule=f"default-stdlib-by-file:{val_fraction}",
            train_documents=lambda: _iter_files(train),
            val_documents=lambda: _iter_files(val),
        )
    path = Path(data_path)
    files = find_data_files(path)
    root = path if path.is_dir() else path.parent
    if len(files) == 1:
        single = files[0]
        return CorpusSplit(
            description=(
                f"data '{path}' (1 file; every {SINGLE_FILE_VAL_EVERY}th document is validation)"
            ),
            root=root,
            files=files,
            rule=f"single-file-by-document:{SINGLE_FILE_VAL_EVERY}",
            train_documents=lambda: _single_file_split(single, want_val=False),
            val_documents=lambda: _single_file_split(single, want_val=True),
        )
    train, val = split_files(files, root, val_fraction)
    return CorpusSplit(
        description=f"data '{path}' ({len(train)} train / {len(val)} validation files)",
        root=root,
        files=files,
        rule=f"by-file:{val_fraction}",
        train_documents=lambda: _iter_files(train),
        val_documents=lambda: _iter_files(val),
    )
