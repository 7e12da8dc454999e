"""The process layout: world = pp x dp x ep ranks, as a DeviceMesh with dims ("pp", "dp", "ep").

Rank r sits at mesh coordinate (pp_rank, dp_rank, ep_rank) with r = (pp_rank * dp + dp_rank) * ep + ep_rank,
so the ranks of one expert-parallel group are consecutive (on GPUs: inside one node, where the
all-to-all is fastest). Groups a step uses:
  ep      the ep ranks that together hold one copy of every routed expert (token all-to-all);
  dp      the dp ranks that hold the same slice of experts (expert gradients are summed here);
  dp_ep   all dp x ep ranks of a pipeline stage: data parallel for everything but the routed experts
          (their gradients, the routing-bias counts and the logged losses are reduced here);
  pp      the pipeline stages (used by the pipeline schedules).

`init_distributed` returns None for a single process (WORLD_SIZE unset or 1): nothing is set up and
the trainer runs exactly as without this module.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ..config import ParallelConfig
from ..errors import MoeforgeError


@dataclass
class ParallelContext:
    """Where this process sits in the layout, and the process groups to talk to the others."""

    mesh: DeviceMesh  # dims ("pp", "dp", "ep")
    pp: int
    dp: int
    ep: int
    rank: int
    world_size: int
    device: torch.device
    sharding: str = "none"  # parallel.sharding: none | zero2 | full
    dispatch_fp8: bool = False
    overlap_dispatch: bool = True
    _checkpoint_group: dist.ProcessGroup | None = field(default=None, repr=False)

    # ---- coordinates ----
    @property
    def pp_rank(self) -> int:
        return self.mesh.get_local_rank("pp")

    @property
    def dp_rank(self) -> int:
        return self.mesh.get_local_rank("dp")

    @property
    def ep_rank(self) -> int:
        return self.mesh.get_local_rank("ep")

    @property
    def data_ranks(self) -> int:
        """Ranks that split each batch between them: dp x ep."""
        return self.dp * self.ep

    @property
    def data_rank(self) -> int:
        """This rank's index among the dp x ep data ranks of its stage (its share of each batch)."""
        return self.dp_rank * self.ep + self.ep_rank

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes logs, metrics and checkpoints."""
        return self.rank == 0

    # ---- groups ----
    @property
    def ep_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group("ep")

    @property
    def dp_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group("dp")

    @property
    def pp_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group("pp")

    @property
    def dp_ep_mesh(self) -> DeviceMesh:
        """The 1-D mesh of the dp x ep ranks of this stage (non-expert data parallelism, FSDP)."""
        return self.mesh["dp", "ep"]._flatten("dp_ep")  # cached by DeviceMesh after the first call

    @property
    def dp_ep_group(self) -> dist.ProcessGroup:
        return self.dp_ep_mesh.get_group()

    def checkpoint_group(self) -> dist.ProcessGroup:
        """A gloo group of all ranks for checkpoints written in the background: DCP's asynchronous save
        talks over it from its own thread, apart from the training's collectives (a group must not
        carry two threads' collectives at once). Created at the first call, which every rank makes
        at the same point (their first background save)."""
        if self._checkpoint_group is None:
            self._checkpoint_group = dist.new_group(backend="gloo")
        return self._checkpoint_group

    # ---- reductions the trainer needs ----
    def all_reduce_sum_dp_ep(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the dp x ep ranks of this stage (returns a new tensor). Used for the routing-bias
        counts: every rank counts its own tokens' routes to all E experts, so the sum is global."""
        t = t.clone()
        if self.data_ranks > 1:
            dist.all_reduce(t, group=self.dp_ep_group)
        return t

    def all_reduce_mean_dp_ep(self, t: torch.Tensor) -> torch.Tensor:
        return self.all_reduce_sum_dp_ep(t) / self.data_ranks

    def barrier(self) -> None:
        dist.barrier()

    def destroy(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def resolve_layout(pcfg: ParallelConfig, world_size: int) -> tuple[int, int, int]:
    """(pp, dp, ep) for this world size, dp = world / (pp x ep) when 0; MoeforgeError when impossible."""
    pp, ep, dp = pcfg.pp, pcfg.ep, pcfg.dp
    if dp == 0:
        if world_size % (pp * ep):
            raise MoeforgeError(f"parallel.pp x parallel.ep = {pp} x {ep} = {pp * ep} does not divide the "
                                f"world size {world_size}")
        dp = world_size // (pp * ep)
    if pp * dp * ep != world_size:
        raise MoeforgeError(f"parallel.pp x parallel.dp x parallel.ep = {pp} x {dp} x {ep} = {pp * dp * ep} "
                            f"does not equal the world size {world_size}")
    return pp, dp, ep


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or "1")


def init_distributed(pcfg: ParallelConfig, device: str = "auto") -> ParallelContext | None:
    """Join the process group torchrun set up (env://) and build the mesh; None for one process.

    gloo on CPU, nccl on CUDA (device cuda:LOCAL_RANK). `device` is train.device (auto|cpu|cuda).
    The layout is checked before any process group exists, so a bad layout fails fast on every rank.
    A default process group that already exists (e.g. made by a test harness) is reused.
    """
    world = world_size_from_env()
    if world <= 1:  # one process: the parallel.* layout does not apply (the trainer says so in its log)
        return None
    pp, dp, ep = resolve_layout(pcfg, world)
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise MoeforgeError("train.device: cuda was asked for but no CUDA device is available")
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    if dist.get_world_size() != world:
        raise MoeforgeError(f"WORLD_SIZE={world} but the process group has {dist.get_world_size()} ranks")
    mesh = init_device_mesh(dev.type, (pp, dp, ep), mesh_dim_names=("pp", "dp", "ep"))
    ctx = ParallelContext(mesh, pp, dp, ep, dist.get_rank(), world, dev, pcfg.sharding, pcfg.dispatch_fp8,
                          pcfg.overlap_dispatch)
    ctx.dp_ep_mesh  # create the flattened group now, on every rank in the same order
    return ctx
