"""Batches from a packed token stream: shuffled training windows and sequential evaluation.

The stream holds documents back to back with EOS separators, so a window may span several
documents (as in DeepSeek-V3 pre-training). Window ``i`` is ``tokens[i*S : i*S + S + 1]``
(``S`` = seq_len): consecutive windows share one boundary token, so every token except the
first is a target exactly once per epoch.

All randomness is a pure function of (seed, epoch[, window]), so the loader's whole state is
two integers and a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from moeforge.errors import MoeforgeError

# Mixed into the FIM generator's seed so it never coincides with the permutation generator's.
_FIM_STREAM = 0x46494D


class PackedLoader:
    """Fixed-length training windows in a fresh random order every epoch.

    ``next_batch(B)`` returns a LongTensor [B, seq_len + 1]; use ``[:, :-1]`` as inputs and
    ``[:, 1:]`` as targets. A batch may straddle an epoch boundary.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        seq_len: int,
        seed: int,
        eos_id: int,
        fim_rate: float = 0.0,
        fim_ids: Sequence[int] | None = None,
    ) -> None:
        if seq_len < 1:
            raise MoeforgeError(f"seq_len must be positive, got {seq_len}")
        if seed < 0:
            raise MoeforgeError(f"seed must be non-negative, got {seed}")
        if not 0.0 <= fim_rate <= 1.0:
            raise MoeforgeError(f"fim_rate must be in [0, 1], got {fim_rate}")
        if len(tokens) < seq_len + 1:
            raise MoeforgeError(
                f"data has {len(tokens)} tokens, fewer than one sequence of {seq_len + 1} "
                "(seq_len+1); use more data or a shorter train.seq_len"
            )
        if fim_rate > 0 and fim_ids is None:
            raise MoeforgeError(
                "fim_rate > 0 needs fill-in-the-middle sentinel tokens, which this tokenizer "
                "lacks; set fim_rate to 0 or use a tokenizer with FIM tokens"
            )
        self.tokens = tokens
        self.seq_len = seq_len
        self.seed = seed
        self.eos_id = eos_id
        self.fim_rate = fim_rate
        self.fim_ids = tuple(fim_ids) if fim_ids is not None else None
        self.num_windows = (len(tokens) - 1) // seq_len
        self.epoch = 0
        self.position = 0  # windows of the current epoch already served
        self._perm_epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    def _permutation(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            rng = np.random.default_rng((self.seed, self.epoch))
            self._perm = rng.permutation(self.num_windows)
            self._perm_epoch = self.epoch
        return self._perm

    def window(self, index: int) -> np.ndarray:
        """Window ``index`` as int64, before any FIM rewriting."""
        start = index * self.seq_len
        return np.asarray(self.tokens[start : start + self.seq_len + 1], dtype=np.int64)

    def next_batch(self, batch_size: int) -> torch.Tensor:
        rows = np.empty((batch_size, self.seq_len + 1), dtype=np.int64)
        for row in range(batch_size):
            if self.position == self.num_windows:
                self.epoch += 1
                self.position = 0
            index = int(self._permutation()[self.position])
            window = self.window(index)
            if self.fim_rate > 0:
                window = self._apply_fim(window, index)
            rows[row] = window
            self.position += 1
        return torch.from_numpy(rows)

    def _apply_fim(self, window: np.ndarray, index: int) -> np.ndarray:
        """Rewrite document segments of ``window`` in PSM order, then cut to its length.

        Segments are the runs between EOS tokens. With probability ``fim_rate`` a segment of
        length >= 3 is cut at two distinct interior points into prefix/middle/suffix and
        becomes [begin] prefix [hole] suffix [end] middle.
        """
        assert self.fim_ids is not None
        begin, hole, end = self.fim_ids
        rng = np.random.default_rng((self.seed, self.epoch, index, _FIM_STREAM))
        eos_at = np.flatnonzero(window == self.eos_id)
        bounds = np.concatenate(([-1], eos_at, [len(window)]))
        pieces: list[np.ndarray] = []
        changed = False
        for k in range(len(bounds) - 1):
            lo, hi = int(bounds[k]) + 1, int(bounds[k + 1])
            segment = window[lo:hi]
            if len(segment) >= 3 and rng.random() < self.fim_rate:
                a, b = np.sort(rng.choice(np.arange(1, len(segment)), size=2, replace=False))
                prefix, middle, suffix = segment[:a], segment[a:b], segment[b:]
                pieces += [[begin], prefix, [hole], suffix, [end], middle]
                changed = True
            else:
                pieces.append(segment)
            if hi < len(window):
                pieces.append(window[hi : hi + 1])  # the EOS itself
        if not changed:
            return window
        return np.concatenate(pieces).astype(np.int64)[: len(window)]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(self.epoch), "position": int(self.position)}

    def load_state_dict(self, state: dict) -> None:
        try:
            epoch, position = int(state["epoch"]), int(state["position"])
        except (KeyError, TypeError, ValueError):
            raise MoeforgeError(
                f"data loader state {state!r} lacks integer epoch/position"
            ) from None
        if epoch < 0 or not 0 <= position <= self.num_windows:
            raise MoeforgeError(
                f"data loader state epoch={epoch} position={position} does not fit this data "
                f"({self.num_windows} windows per epoch); was it saved with other data or "
                "seq_len?"
            )
        self.epoch, self.position = epoch, position


def iter_eval_batches(
    tokens: np.ndarray, seq_len: int, batch_size: int, max_batches: int | None = None, stride: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Sequential (inputs, targets) batches, each LongTensor [B, seq_len], over ``tokens``.

    Every token but the first is a target exactly once. stride = 0 (or >= seq_len): back-to-back
    windows, so a target sees between 0 and seq_len - 1 tokens of context. 0 < stride < seq_len:
    windows start every ``stride`` tokens and each scores only the targets the previous one did not
    reach (its last ``stride``; the first window scores all of its own), so every target after the
    first window sees at least seq_len - stride tokens of context, at seq_len / stride times the
    compute. Targets not scored are -100 (ignored by cross-entropy). The last window is kept even
    when shorter than seq_len, its inputs padded with 0 (causal attention keeps padding from
    affecting real positions), so evaluation covers the whole stream. The last batch may have fewer
    than ``batch_size`` rows.
    """
    if seq_len < 1 or batch_size < 1:
        raise MoeforgeError(f"seq_len and batch_size must be positive, got {seq_len}, {batch_size}")
    stride = seq_len if stride <= 0 else min(stride, seq_len)
    n_targets = len(tokens) - 1
    if n_targets < 1:
        raise MoeforgeError(f"evaluation data has {len(tokens)} tokens; need at least 2")
    # window w covers targets (w * stride, w * stride + seq_len] and scores those after the previous window's end
    n_windows = 1 + max(0, -(-(n_targets - seq_len) // stride))
    n_batches = -(-n_windows // batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    for b in range(n_batches):
        first = b * batch_size
        rows = min(batch_size, n_windows - first)
        inputs = np.zeros((rows, seq_len), dtype=np.int64)
        targets = np.full((rows, seq_len), -100, dtype=np.int64)
        for r in range(rows):
            w = first + r
            start = w * stride
            chunk = np.asarray(tokens[start : start + seq_len + 1], dtype=np.int64)
            n = len(chunk) - 1
            skip = 0 if w == 0 else seq_len - stride  # scored by the previous window
            inputs[r, :n] = chunk[:-1]
            targets[r, skip:n] = chunk[1 + skip:]
        yield torch.from_numpy(inputs), torch.from_numpy(targets)
