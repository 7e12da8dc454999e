"""Tokenizers: the shipped byte-level BPE, foreign ``tokenizer.json`` files, and training.

The default tokenizer (``tokenizer.json`` next to this module) is a byte-level BPE with 8192
tokens trained on the training split of the default corpus (the Python standard library).
Reproduce it with::

    PYTHONPATH=src python -m moeforge.data.tokenizer --out src/moeforge/data/tokenizer.json

Special tokens: ``<|endoftext|>`` ends every document; ``<|fim_begin|>``, ``<|fim_hole|>`` and
``<|fim_end|>`` are the fill-in-the-middle sentinels (PSM order: begin, prefix, hole, suffix,
end, middle). Text passed to :meth:`Tokenizer.encode` never produces special tokens, even when
it contains their spelling, so data cannot inject control tokens; the pipeline inserts them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from functools import cached_property
from pathlib import Path

import torch
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from moeforge.data.corpus import iter_file_documents, plan_split
from moeforge.errors import MoeforgeError

EOS_TOKEN = "<|endoftext|>"
FIM_TOKENS = ("<|fim_begin|>", "<|fim_hole|>", "<|fim_end|>")
SPECIAL_TOKENS = (EOS_TOKEN, *FIM_TOKENS)

# Candidates for foreign tokenizers, tried in order.
_EOS_CANDIDATES = (
    EOS_TOKEN,
    "<｜end▁of▁sentence｜>",  # DeepSeek-V3
    "</s>",
    "<|end_of_text|>",
    "<eos>",
)
_FIM_CANDIDATES = (
    FIM_TOKENS,
    ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"),  # DeepSeek-V3
)

DEFAULT_TOKENIZER_PATH = Path(__file__).with_name("tokenizer.json")
DEFAULT_VOCAB_SIZE = 8192


def bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 byte -> printable character table used by byte-level BPE vocabularies.

    Printable Latin-1 bytes map to themselves; the rest (control bytes, space, ...) map to
    code points from 256 upward so that every token is a visible string.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += range(ord("®"), 256)
    table = {b: chr(b) for b in keep}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


_UNICODE_TO_BYTE = {c: b for b, c in bytes_to_unicode().items()}


def _is_byte_level(config: dict) -> bool:
    decoder = config.get("decoder") or {}
    parts = decoder.get("decoders", []) if decoder.get("type") == "Sequence" else [decoder]
    return any(isinstance(d, dict) and d.get("type") == "ByteLevel" for d in parts)


class Tokenizer:
    """A ``tokenizers.Tokenizer`` plus what training needs: EOS, FIM ids, bytes per token."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            raise MoeforgeError(f"tokenizer file '{self.path}' does not exist") from None
        except OSError as e:
            raise MoeforgeError(f"tokenizer file '{self.path}' cannot be read: {e}") from None
        try:
            self._config = json.loads(raw)
            self._tok = _HFTokenizer.from_str(raw.decode("utf-8"))
        except Exception as e:  # the library raises a bare Exception on bad input
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise MoeforgeError(f"tokenizer file '{self.path}' does not parse: {reason}") from None
        # Document text is data, not markup: never turn "<|endoftext|>" in text into EOS.
        self._tok.encode_special_tokens = True
        self.fingerprint: str = hashlib.sha256(raw).hexdigest()[:16]
        self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)

        eos = next((t for t in _EOS_CANDIDATES if self._tok.token_to_id(t) is not None), None)
        if eos is None:
            raise MoeforgeError(
                f"tokenizer file '{self.path}' has no end-of-text token "
                f"(tried {', '.join(_EOS_CANDIDATES)})"
            )
        self.eos_token: str = eos
        self.eos_id: int = self._tok.token_to_id(eos)
        self.fim_ids: tuple[int, int, int] | None = None
        for names in _FIM_CANDIDATES:
            ids = [self._tok.token_to_id(t) for t in names]
            if all(i is not None for i in ids):
                self.fim_ids = (ids[0], ids[1], ids[2])
                break

    def token_id(self, token: str) -> int | None:
        """The id of a token of the vocabulary given as written there (a special token too), or None."""
        return self._tok.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # The library encodes a batch on all cores; the "fast" variant skips offset tracking.
        encodings = self._tok.encode_batch_fast(list(texts), add_special_tokens=False)
        return [e.ids for e in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    @cached_property
    def token_bytes(self) -> torch.Tensor:
        """int64 [vocab_size]: UTF-8 bytes each token stands for (0 for special tokens).

        Used to turn a loss in nats per token into bits per byte, which is comparable across
        tokenizers.
        """
        counts = [0] * self.vocab_size
        added = self._tok.get_added_tokens_decoder()
        special_ids = {i for i, t in added.items() if t.special}
        byte_level = _is_byte_level(self._config)
        for token, idx in self._tok.get_vocab(with_added_tokens=True).items():
            if idx >= self.vocab_size or idx in special_ids:
                continue
            if idx in added:
                # Non-special added tokens are matched verbatim in text: their bytes are literal.
                n = len(added[idx].content.encode("utf-8"))
            elif byte_level:
                # Each character is one byte; characters outside the table count as themselves.
                n = sum(1 if c in _UNICODE_TO_BYTE else len(c.encode("utf-8")) for c in token)
            else:
                n = len(self._tok.decode([idx], skip_special_tokens=False).encode("utf-8"))
            counts[idx] = n
        return torch.tensor(counts, dtype=torch.int64)

    def __repr__(self) -> str:
        return (
            f"Tokenizer(path='{self.path}', vocab_size={self.vocab_size}, "
            f"fingerprint={self.fingerprint})"
        )


def load_tokenizer(path: str | Path | None = None) -> Tokenizer:
    """Load a ``tokenizer.json``; None loads the default tokenizer shipped with moeforge."""
    return Tokenizer(DEFAULT_TOKENIZER_PATH if path is None else path)


def atomic_write_text(path: Path, text: str) -> None:
    """Write `path` whole or not at all: a temporary file beside it, fsynced, then renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the file is meant to be shared/shipped
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def train_bpe(
    files: Iterable[str | Path] | None,
    vocab_size: int,
    out_path: str | Path,
    documents: Iterable[str] | None = None,
) -> Path:
    """Train a byte-level BPE on ``files`` (or on ``documents``) and write ``out_path`` atomically.

    Files are read whole, so a document keeps its newlines and indentation.
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise MoeforgeError(
            f"vocab_size {vocab_size} is too small for a byte-level BPE "
            f"(needs at least {256 + len(SPECIAL_TOKENS)})"
        )
    if documents is None:
        if files is None:
            raise MoeforgeError("train_bpe needs files or documents")
        def _docs() -> Iterator[str]:
            for f in files:
                yield from iter_file_documents(Path(f))

        documents = _docs()
    tok = _HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(documents, trainer=trainer)
    out_path = Path(out_path)
    atomic_write_text(out_path, tok.to_str())
    return out_path


def bytes_per_token(tokenizer: Tokenizer, documents: Iterable[str], batch: int = 256) -> float:
    """Average UTF-8 bytes per token over ``documents`` (higher means better compression)."""
    n_bytes = n_tokens = 0
    chunk: list[str] = []
    for doc in documents:
        chunk.append(doc)
        if len(chunk) == batch:
            n_bytes += sum(len(d.encode("utf-8")) for d in chunk)
            n_tokens += sum(len(ids) for ids in tokenizer.encode_batch(chunk))
            chunk = []
    if chunk:
        n_bytes += sum(len(d.encode("utf-8")) for d in chunk)
        n_tokens += sum(len(ids) for ids in tokenizer.encode_batch(chunk))
    return n_bytes / max(n_tokens, 1)


def main(argv: Sequence[str] | None = None) -> None:
    """Train the default tokenizer on the default corpus's training split."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--out", type=Path, default=DEFAULT_TOKENIZER_PATH)
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    args = parser.parse_args(argv)

    split = plan_split(None)
    start = time.perf_counter()
    train_bpe(None, args.vocab_size, args.out, documents=split.train_documents())
    elapsed = time.perf_counter() - start
    tok = load_tokenizer(args.out)
    bpt = bytes_per_token(tok, split.val_documents())
    size_kb = args.out.stat().st_size / 1024
    print(
        f"wrote {args.out} ({size_kb:.0f} KiB, vocab {tok.vocab_size}, "
        f"fingerprint {tok.fingerprint}) in {elapsed:.1f}s; "
        f"validation split: {bpt:.3f} bytes/token"
    )


if __name__ == "__main__":
    main()
