"""The data pipeline: raw text -> tokenizer -> memory-mapped token shards -> batches.

Typical use::

    tok = load_tokenizer(None)                        # the shipped byte-level BPE
    data = prepare_data(None, tok, default_cache_dir())  # tokenises once, then cached
    loader = PackedLoader(data.train, seq_len=1024, seed=0, eos_id=tok.eos_id)
    batch = loader.next_batch(8)                     # LongTensor [8, 1025]

Names are imported lazily so that ``python -m moeforge.data.tokenizer`` runs cleanly and
importing the package does not pull in torch/pyarrow before they are needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "load_tokenizer": "tokenizer",
    "Tokenizer": "tokenizer",
    "prepare_data": "shards",
    "DataBundle": "shards",
    "default_cache_dir": "shards",
    "PackedLoader": "loader",
    "iter_eval_batches": "loader",
    "find_data_files": "corpus",
    "iter_documents": "corpus",
    "default_corpus_files": "corpus",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from moeforge.data.corpus import default_corpus_files, find_data_files, iter_documents
    from moeforge.data.loader import PackedLoader, iter_eval_batches
    from moeforge.data.shards import DataBundle, default_cache_dir, prepare_data
    from moeforge.data.tokenizer import Tokenizer, load_tokenizer


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'moeforge.data' has no attribute '{name}'")
    value = getattr(importlib.import_module(f"moeforge.data.{module}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
