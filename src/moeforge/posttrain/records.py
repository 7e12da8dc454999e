"""JSONL files of string records ({"prompt": ..., "response": ...} for SFT, {"prompt": ..., "answer": ...}
for a task of one's own), read with one-line errors that name the file and the line."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import MoeforgeError

__all__ = ["where", "read_records", "read_objects", "string_values"]


def where(path: Path, line: int | None = None) -> str:
    return f"data file '{path}'" + (f", line {line}" if line is not None else "")


def read_records(path: str | Path, keys: tuple[str, ...], what: str = "records") -> list[tuple[int, tuple[str, ...]]]:
    """(line number, the values of `keys`) of each record (a JSON object per non-blank line, each key a
    string; other keys are ignored); MoeforgeError naming the file and line of the first problem.
    what: the records' name in the error of an empty file."""
    return [(number, string_values(path, number, obj, keys)) for number, obj in read_objects(path, keys, what)]


def string_values(path: str | Path, number: int, obj: dict, keys: tuple[str, ...]) -> tuple[str, ...]:
    """The values of `keys` in a record, each a string; MoeforgeError naming the file and line otherwise."""
    for key in keys:
        if key not in obj:
            raise MoeforgeError(f"{where(Path(path), number)}: no \"{key}\"")
        if not isinstance(obj[key], str):
            raise MoeforgeError(f"{where(Path(path), number)}: \"{key}\" must be a string, got {type(obj[key]).__name__}")
    return tuple(obj[k] for k in keys)


def read_objects(path: str | Path, keys: tuple[str, ...], what: str = "records") -> list[tuple[int, dict]]:
    """(line number, object) of each non-blank line of a JSONL file, each a JSON object (keys: what the
    records hold, for the errors); MoeforgeError naming the file and line of the first problem."""
    path = Path(path)
    if not path.exists():
        raise MoeforgeError(f"{where(path)} does not exist")
    if not path.is_file():
        raise MoeforgeError(f"{where(path)} is not a file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise MoeforgeError(f"{where(path, line)}: not valid UTF-8") from None
    wanted = " and ".join(f'"{k}"' for k in keys)
    rows = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise MoeforgeError(f"{where(path, number)}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise MoeforgeError(f"{where(path, number)}: expected an object with {wanted}, got {type(obj).__name__}")
        rows.append((number, obj))
    if not rows:
        raise MoeforgeError(f"{where(path)} holds no {what} (one JSON object per line with {wanted})")
    return rows
