"""The row groups of the routed experts' contiguous per-expert layout, as the grouped FP8 GEMMs and
the per-expert 1x128 quantisers read them: cumulative row counts, and each group's tiles of block_m
rows counted cumulatively, on the device (no host sync)."""

from __future__ import annotations

import torch


class Groups:
    """The row groups of the contiguous per-expert layout (group g: rows [offsets[g-1], offsets[g]))
    and, per tile height, the groups' tiles counted cumulatively (see group_layout), computed on the
    device once: a MoE layer's grouped GEMMs and per-expert quantisers, forward and backward, share
    one instead of each counting the tiles again (six times a layer, eight small kernels each)."""

    def __init__(self, offsets: torch.Tensor, counts: torch.Tensor | None = None):
        self.offsets = offsets.to(torch.int32).contiguous()  # [G] cumulative row counts
        self._counts, self._tiles = counts, {}

    @classmethod
    def of(cls, offsets: "torch.Tensor | Groups") -> "Groups":
        """offsets' Groups: itself when it is one already, else built from the cumulative row counts."""
        return offsets if isinstance(offsets, Groups) else cls(offsets)

    @classmethod
    def from_counts(cls, counts: torch.Tensor, block_m: int = 128) -> "Groups":
        """From the rows of each group [G]: the offsets and block_m's tiles in one cumulative sum."""
        both = torch.stack((counts, (counts + block_m - 1) // block_m)).cumsum(1, dtype=torch.int32)
        groups = cls(both[0], counts)
        groups._tiles[block_m] = both[1]
        return groups

    def tiles(self, block_m: int) -> torch.Tensor:
        """tiles_cum int32 [G]: the tiles of block_m rows of groups 0..g, restarting at each group."""
        tiles = self._tiles.get(block_m)
        if tiles is None:
            counts = self._counts
            if counts is None:
                counts = torch.diff(self.offsets, prepend=self.offsets.new_zeros(1))
            tiles = self._tiles[block_m] = torch.cumsum((counts + block_m - 1) // block_m, 0, dtype=torch.int32)
        return tiles


def group_layout(offsets: "torch.Tensor | Groups", block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """offsets [G] (cumulative row counts, or their Groups) -> (tiles_cum int32 [G], offsets int32 [G]):
    the tiles of block_m rows of every group, restarting at each group, counted on the device (no host
    sync; the static bound on the number of tiles is ceil(rows / block_m) + G)."""
    groups = Groups.of(offsets)
    return groups.tiles(block_m), groups.offsets
