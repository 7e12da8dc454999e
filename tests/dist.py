"""Run a function in N processes of a gloo process group and collect what each rank returns.

    from dist import run_dist, run_torchrun

    def body(x):                      # module level, so the spawned processes can import it
        import torch.distributed as dist
        return dist.get_rank() * x    # anything torch.save can write

    results = run_dist(body, 2, 10)   # -> [0, 10], one entry per rank

Each rank is a fresh process forked from a `forkserver` that has imported torch and moeforge once
(importing torch costs ~3 s of CPU per process: four spawned ranks on 2 cores spent ~10 s just
importing; the server never runs torch ops, so forking it is safe, unlike forking pytest itself).
A rank gets the caller's environment (as it is at the call) plus the torchrun variables (RANK,
WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), and one intra-op thread
(CPU tests use up to 4 processes on 2 cores). `start_method="spawn"` gives fully fresh processes. With `init=True` (the default) the default process group is
initialised with gloo before `fn` runs; with `init=False` only the environment is set, for code
that initialises the group itself (e.g. `moeforge.parallel.init_distributed`).

Robustness contract:
- A rank's result counts once it has written its result file (torch.save, atomically), which it
  does *before* tearing down the process group. gloo on small machines sometimes aborts at
  teardown ("terminate called without an active exception", ~3 in 40 runs on 2 cores): a
  non-zero exit after the file was written is ignored.
- A rank that raised writes the traceback instead; the test fails with it.
- A rank that exits without writing its file (crash, abort before the end) fails the test.
- Whole run bounded by `timeout` seconds (default 100): then every rank still alive is killed and
  the test fails, so a hang (e.g. mismatched collectives) never blocks CI.

`run_torchrun(args, nproc)` runs a command under `python -m torch.distributed.run` (torchrun)
as a subprocess with the same time bound and returns the CompletedProcess (stdout/stderr text).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = ["DistError", "free_port", "run_dist", "run_torchrun", "TIMEOUT"]

TIMEOUT = 100.0  # seconds for a whole multi-process run; a hang fails well under 2 minutes
# Imported once by the fork server (missing ones are skipped by multiprocessing).
PRELOAD = ["torch", "torch.distributed", "torch.distributed.device_mesh", "torch.distributed.fsdp", "numpy",
           "moeforge.parallel", "moeforge.train.trainer"]


class DistError(AssertionError):
    """A multi-process run failed: a rank raised, died before reporting, or the run timed out."""


def free_port() -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _worker(fn: Callable, rank: int, world: int, port: int, out: str, init: bool, threads: int, env: dict,
            args: tuple, kwargs: dict) -> None:
    """Body of one rank: environment, optional gloo group, fn, result file, teardown."""
    os.environ.clear()
    os.environ.update(env)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    import torch.distributed as dist

    path = Path(out) / f"rank{rank}.pt"
    try:
        if init:
            dist.init_process_group("gloo", rank=rank, world_size=world)
        value = fn(*args, **kwargs)
        _atomic_save({"ok": True, "value": value}, path)
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test
        _atomic_save({"ok": False, "error": traceback.format_exc()}, path)
        sys.stderr.flush()
        os._exit(1)  # skip a teardown that could hang waiting for the other ranks
    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        # Leave without running interpreter finalisers: the result is on disk; gloo's background
        # threads are what occasionally abort at exit.
        os._exit(0)


def run_dist(fn: Callable, world_size: int, *args, init: bool = True, timeout: float = TIMEOUT,
             threads: int = 1, start_method: str = "forkserver", **kwargs) -> list[Any]:
    """fn(*args, **kwargs) on `world_size` gloo ranks -> list of each rank's return value (rank order).

    `fn` must be importable by a fresh process (defined at module level). Raises DistError when a
    rank raised (its traceback is in the message), exited before reporting, or the run timed out.
    The keyword names init, timeout, threads and start_method belong to run_dist, not to fn.
    """
    try:
        return _run_dist_once(fn, world_size, args, kwargs, init, timeout, threads, start_method)
    except DistError as e:
        # The free port can be taken by someone else between free_port() and the store's bind
        # (other tests on the machine open many gloo connections): one retry on a fresh port.
        if "address already in use" not in str(e).lower() and "eaddrinuse" not in str(e).lower():
            raise
        return _run_dist_once(fn, world_size, args, kwargs, init, timeout, threads, start_method)


def _run_dist_once(fn: Callable, world_size: int, args: tuple, kwargs: dict, init: bool, timeout: float,
                   threads: int, start_method: str) -> list[Any]:
    ctx = mp.get_context(start_method)
    if start_method == "forkserver":
        ctx.set_forkserver_preload(PRELOAD)  # takes effect when the server starts (first call)
    port = free_port()
    env = dict(os.environ)
    with tempfile.TemporaryDirectory(prefix="moeforge-dist-") as out:
        procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, out, init, threads, env, args, kwargs),
                             daemon=False) for r in range(world_size)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        results: dict[int, dict] = {}
        failed: str | None = None
        try:
            while True:
                for r in range(world_size):
                    f = Path(out) / f"rank{r}.pt"
                    if r not in results and f.is_file():
                        results[r] = torch.load(f, weights_only=False)
                        if not results[r]["ok"]:
                            failed = f"rank {r} raised:\n{results[r]['error']}"
                if failed:
                    break
                if len(results) == world_size:
                    break
                dead = [r for r, p in enumerate(procs)
                        if not p.is_alive() and r not in results and not (Path(out) / f"rank{r}.pt").is_file()]
                if dead:
                    r = dead[0]
                    failed = f"rank {r} exited with status {procs[r].exitcode} before reporting a result"
                    break
                if time.monotonic() > deadline:
                    missing = sorted(set(range(world_size)) - set(results))
                    failed = f"timed out after {timeout:.0f} s waiting for ranks {missing}"
                    break
                time.sleep(0.05)
        finally:
            # Give finished ranks a moment for their teardown, then kill anything left.
            grace = time.monotonic() + (5.0 if not failed else 2.0)
            for p in procs:
                p.join(timeout=max(0.0, grace - time.monotonic()))
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join(timeout=5)
        if failed:
            # Add what the other ranks reported: the first error seen may be a consequence
            # (e.g. "connection closed by peer") of another rank's real one.
            for r in range(world_size):
                f = Path(out) / f"rank{r}.pt"
                if r not in results and f.is_file():
                    try:
                        results[r] = torch.load(f, weights_only=False)
                    except Exception:  # noqa: BLE001 - diagnostics only
                        continue
                if r in results and not results[r]["ok"] and f"rank {r} raised" not in failed:
                    failed += f"\n--- rank {r} raised too:\n{results[r]['error']}"
                elif r not in results and procs[r].exitcode not in (None, -9):
                    failed += f"\n--- rank {r} exited with status {procs[r].exitcode} without a result"
            raise DistError(failed)
        return [results[r]["value"] for r in range(world_size)]


def run_torchrun(args: list[str], nproc: int, timeout: float = TIMEOUT, env: dict | None = None,
                 cwd: str | Path | None = None) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node nproc ARGS...` as a subprocess (text output captured).

    ARGS are what follows torchrun's options, e.g. ["-m", "moeforge", "train", ...]. PYTHONPATH
    includes this checkout's src/. Raises DistError on timeout; the caller checks returncode and
    output (an abort after the run's results were written shows as a non-zero code with
    "terminate called without an active exception" in stderr: check your outputs first).
    """
    src = str(Path(__file__).resolve().parents[1] / "src")
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = src + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.setdefault("OMP_NUM_THREADS", "1")
    full_env.update(env or {})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *map(str, args)]
    try:
        return subprocess.run(cmd, env=full_env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise DistError(f"torchrun timed out after {timeout:.0f} s: {' '.join(cmd)}\n{e.stderr or ''}") from None


def teardown_aborted(result: subprocess.CompletedProcess) -> bool:
    """True when a non-zero torchrun exit is gloo's known teardown abort (results already written)."""
    return result.returncode != 0 and "terminate called without an active exception" in (result.stderr or "")


# The model of the multi-process tests (test_parallel, test_pipeline_train): every part of the
# architecture (dense first layer, grouped routing, shared expert, query compression, MTP) at a size
# four gloo ranks train in seconds.
DIST_MODEL = [
    "model.hidden_size=64", "model.num_hidden_layers=3", "model.first_k_dense_replace=1",
    "model.intermediate_size=128", "model.moe_intermediate_size=32", "model.n_routed_experts=8",
    "model.n_group=2", "model.topk_group=1", "model.num_experts_per_tok=2", "model.n_shared_experts=1",
    "model.q_lora_rank=32", "model.kv_lora_rank=32", "model.qk_nope_head_dim=16", "model.qk_rope_head_dim=8",
    "model.v_head_dim=16", "model.num_attention_heads=2", "model.max_position_embeddings=64",
    "model.num_nextn_predict_layers=1",
    # the CLI tests start from the tiny preset, the in-process references from the defaults: pin
    # every field where the two differ
    "model.initializer_range=0.006", "train.optimizer=adamw", "train.beta2=0.95", "train.zero_init=none",
]


def measure_model_states(trainer) -> dict:
    """What a Trainer's rank really holds, for moeforge.plan's prediction: filled during its next
    optimizer step. params: elements of the parameters it updates (local shards under FSDP);
    weights / grads: their bytes, the gradients as the optimizer meets them; optimizer: bytes of the
    optimizer state's tensors (its 0-dim step counters left out, as the plan leaves them out)."""
    from torch.distributed.tensor import DTensor

    def local(t):
        return t.to_local() if isinstance(t, DTensor) else t

    params = list(trainer.updated.parameters())  # (a pipeline rank: its stages; shared ones once)
    out: dict = {}

    def before(optimizer, args, kwargs):
        if not out:
            out["params"] = sum(local(p).numel() for p in params)
            out["weights"] = sum(local(p).nbytes for p in params)
            out["grads"] = sum(local(p.grad).nbytes for p in params if p.grad is not None)

    def after(optimizer, args, kwargs):
        if "optimizer" not in out:
            out["optimizer"] = sum(local(v).nbytes for st in optimizer.state.values() for v in st.values()
                                   if isinstance(v, torch.Tensor) and v.ndim > 0)

    trainer.optimizer.register_step_pre_hook(before)
    trainer.optimizer.register_step_post_hook(after)
    return out


def planned_model_states(cfg_dict: dict, world_size: int) -> list[dict]:
    """moeforge.plan's prediction for every rank, in the form measure_model_states reports."""
    from moeforge.config import config_from_dict
    from moeforge.plan import model_state_memory

    return [{"params": r.params, "weights": r.weights, "grads": r.grads, "optimizer": r.optimizer}
            for r in model_state_memory(config_from_dict(cfg_dict), world_size)]
