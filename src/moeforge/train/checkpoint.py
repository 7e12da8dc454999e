"""Training checkpoints: OUT/checkpoints/step_N/, written atomically, the last N kept.

A checkpoint is a folder with model.pt, optimizer.pt, state.pt (step, tokens, data-loader
position, RNG states), config.toml (the resolved config) and manifest.json (sizes and SHA-256 of
the other files). A distributed run writes dcp/ instead of model.pt and optimizer.pt: the
torch.distributed.checkpoint files of all ranks (parallel/dcp.py), loadable under any layout. It is written under a temporary name, every file fsynced, then renamed: a crash
mid-write leaves only a `.tmp-*` folder, never a folder that looks complete. The manifest lets a
load detect truncation or corruption before torch.load sees the bytes.

A single-process run writes its checkpoints in the background (`train.async_checkpoint`): the
weights and optimizer state are copied to CPU memory of their own (`cpu_snapshot`), and a thread
serialises, hashes, fsyncs and renames them (`BackgroundSaves`) while the next steps train. One such
save is in flight at a time; a failed one is reported at the next save or at the end of the run.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import threading
from pathlib import Path

import torch
from torch.utils._pytree import tree_leaves, tree_map_only

from ..config import Config, config_from_dict, tomllib
from ..errors import MoeforgeError

STEP_RE = re.compile(r"^step_(\d+)$")
FILES = ("model.pt", "optimizer.pt", "state.pt")
# model.pt and optimizer.pt hold only tensors and plain containers: they are read with torch's
# restricted unpickler, so a checkpoint from elsewhere cannot run code in `generate`/`eval`/
# `convert`. state.pt holds the numpy/python RNG states, which need the full unpickler; it is
# only read to resume one's own run.
FULL_PICKLE = ("state.pt",)


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_sha256(path: str | Path) -> str:
    """The file's SHA-256, read in 16 MiB pieces (checkpoint files can be many GB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(16 << 20):
            h.update(piece)
    return h.hexdigest()


def _torch_bytes(obj) -> memoryview:
    """torch.save's bytes, as a view of its buffer (getvalue would copy them: another model's worth
    of host memory for a large checkpoint)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getbuffer()


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints (with a manifest), oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := STEP_RE.match(p.name)) and (p / "manifest.json").is_file()]
    return [p for _, p in sorted(found)]


def staging_dir(root: Path, step: int) -> Path:
    """Where every rank of a distributed save writes its DCP files before rank 0 completes the
    checkpoint (the same path on every rank)."""
    return root / f".tmp-step_{step:07d}-dcp"


def prepare_staging(root: Path, step: int) -> Path:
    """Rank 0, before a distributed save: an empty staging folder."""
    tmp = staging_dir(root, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def checkpoint_path(root: Path, step: int) -> Path:
    return root / f"step_{step:07d}"


def save_checkpoint(root: Path, step: int, cfg: Config, model_state: dict | None, optim_state: dict | None,
                    state: dict, keep: int, staged: Path | None = None) -> Path:
    """Write the checkpoint of `step` and keep the newest `keep`. staged: a staging folder that
    already holds the model and optimizer as DCP files (then model_state and optim_state are None)."""
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(root, step)
    if staged is None:
        tmp = root / f".tmp-step_{step:07d}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        pieces = {"model.pt": model_state, "optimizer.pt": optim_state}
    else:
        tmp, pieces = staged, {}
    manifest = {"step": step, "files": {}}
    for f in sorted(p for p in tmp.rglob("*") if p.is_file()):  # the DCP files, fsynced here
        with open(f, "rb+") as fh:
            os.fsync(fh.fileno())
        manifest["files"][f.relative_to(tmp).as_posix()] = {"bytes": f.stat().st_size, "sha256": file_sha256(f)}
    pieces.update({"state.pt": state, "config.toml": cfg.to_toml().encode()})
    for name, obj in pieces.items():  # serialised one at a time: one file's bytes in memory at once
        data = obj if isinstance(obj, bytes) else _torch_bytes(obj)
        _fsync_write(tmp / name, data)
        manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        del data
    for d in [p for p in tmp.rglob("*") if p.is_dir()]:
        _fsync_dir(d)
    _fsync_write(tmp / "manifest.json", json.dumps(manifest, indent=1).encode())
    _fsync_dir(tmp)
    if final.exists():  # the same step saved again (e.g. end of a run that just saved): replace it
        old = root / f".old-{final.name}-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    _fsync_dir(root)
    for stale in list_checkpoints(root)[:-keep]:
        shutil.rmtree(stale)
    return final


def cpu_snapshot(obj):
    """A copy of a (nested) state dict whose tensors are CPU tensors of their own: what a background
    save writes while the training goes on updating the originals in place. A CUDA tensor's copy
    waits for the work queued before it. Numbers, strings and None are kept as they are."""
    return tree_map_only(torch.Tensor, lambda t: t.detach().to("cpu", copy=True), obj)


def _tensor_bytes(obj) -> int:
    return sum(t.numel() * t.element_size() for t in tree_leaves(obj) if isinstance(t, torch.Tensor))


HOST_MEMORY_SHARE = 0.8  # of the host's available memory that a background save may take


def save_in_background(saves: "BackgroundSaves", root: Path, step: int, cfg: Config, model_state: dict,
                       optim_state: dict, state: dict, keep: int, free: int | None) -> Path:
    """save_checkpoint's checkpoint of `step`, written by `saves` from CPU snapshots of the states.
    When the snapshots and the largest file's serialised bytes would take more than HOST_MEMORY_SHARE
    of `free` (the host's available bytes; None: unknown), it is written here instead, after the
    save in flight: a model too large for a second copy in host memory is saved as before, not lost
    to the host running out of memory."""
    pieces = (model_state, optim_state, state)
    sizes = [_tensor_bytes(p) for p in pieces]
    if free is not None and sum(sizes) + max(sizes) > HOST_MEMORY_SHARE * free:
        saves.wait()
        return save_checkpoint(root, step, cfg, model_state, optim_state, state, keep)
    saves.start(step, save_checkpoint, root, step, cfg, *cpu_snapshot(pieces), keep)
    return checkpoint_path(root, step)


class BackgroundSaves:
    """Checkpoints written by a thread, one at a time: `start` waits for the save before it, `wait`
    for the last one; either raises MoeforgeError, naming the step, for a save that failed (the
    checkpoint is then missing, never half-written: save_checkpoint renames a complete folder only).
    The thread is not a daemon, so an interpreter that exits lets the save finish first."""

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._step: int | None = None
        self._error: BaseException | None = None

    def start(self, step: int, save, *args) -> None:
        self.wait()

        def run():
            try:
                save(*args)
            except BaseException as e:  # noqa: BLE001 - reported to the training thread by wait()
                self._error = e

        self._step = step
        self._thread = threading.Thread(target=run, name=f"moeforge-checkpoint-{step}")
        self._thread.start()

    def wait(self, report: bool = True) -> None:
        """report False: on a path that is already raising, the save's own failure is dropped."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            e, self._error = self._error, None
            if not report:
                return
            raise MoeforgeError(f"the checkpoint of step {self._step} could not be written: "
                                f"{str(e).strip() or type(e).__name__}") from e


def save_distributed(root: Path, step: int, cfg: Config, model, optimizer, pctx, state: dict | None, keep: int,
                     owned: set[str] | None = None, saves: "BackgroundSaves | None" = None) -> Path:
    """The checkpoint of `step` of a model that lives on many ranks (collective: every rank calls it).
    Every rank writes its own pieces with torch.distributed.checkpoint into the staging folder
    (parallel/dcp.py: loadable under any layout, or in one process), then rank 0 completes the
    checkpoint with `state` (rank 0's; the others may pass None) and the config. owned: the
    state-dict names of this rank's pipeline stages (None: the whole model is this rank's).

    saves None: returns once the checkpoint exists for every rank. saves given (train.async_checkpoint
    true): every rank's pieces are copied to CPU memory here and written by DCP's thread while the
    training goes on, and `saves` (each rank's own) waits for them; rank 0's then completes the
    checkpoint. A save waits for the one before it on every rank first, so at most one is in flight."""
    from ..parallel import dcp

    if saves is not None:
        saves.wait()
    if pctx.is_main:
        prepare_staging(root, step)
    pctx.barrier()
    staged = staging_dir(root, step)
    final = checkpoint_path(root, step)
    if saves is not None:
        written = dcp.async_save(staged / "dcp", model, optimizer, pctx, pctx.checkpoint_group(), owned)
        saves.start(step, _complete_distributed, written, root, step, cfg,
                    cpu_snapshot(state) if pctx.is_main else None, keep, staged, pctx.is_main)
        return final
    dcp.save(staged / "dcp", model, optimizer, pctx, owned)
    pctx.barrier()
    if pctx.is_main:
        final = save_checkpoint(root, step, cfg, None, None, state, keep, staged=staged)
    pctx.barrier()
    return final


def _complete_distributed(written, root: Path, step: int, cfg: Config, state: dict | None, keep: int, staged: Path,
                          is_main: bool) -> None:
    """A background distributed save's last part: wait until every rank's pieces are written (DCP's
    future, which raises what failed on any rank), then rank 0 completes the checkpoint."""
    written.result()
    if is_main:
        save_checkpoint(root, step, cfg, None, None, state, keep, staged=staged)


def read_manifest_checked(path: Path) -> dict:
    """Verify every file against the manifest; raise MoeforgeError naming the first problem."""
    if not path.is_dir():
        raise MoeforgeError(f"checkpoint '{path}' does not exist")
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        raise MoeforgeError(f"checkpoint '{path}' has no valid manifest.json (incomplete or not a moeforge checkpoint)") from None
    for name, info in files.items():
        f = path / name
        if not f.is_file():
            raise MoeforgeError(f"checkpoint '{path}' is incomplete: {name} is missing")
        if f.stat().st_size != info["bytes"]:
            raise MoeforgeError(f"checkpoint '{path}' is corrupt: {name} has {f.stat().st_size} bytes, expected {info['bytes']}")
        if file_sha256(f) != info["sha256"]:
            raise MoeforgeError(f"checkpoint '{path}' is corrupt: {name} fails its checksum")
    return manifest


def load_checkpoint_config(path: Path) -> Config:
    read_manifest_checked(path)
    try:
        return config_from_dict(tomllib.loads((path / "config.toml").read_text()))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise MoeforgeError(f"checkpoint '{path}' has an unreadable config.toml: {e}") from None


def is_distributed(path: Path) -> bool:
    """A checkpoint written by a distributed run (DCP files in dcp/, no model.pt / optimizer.pt)."""
    return (path / "dcp").is_dir()


def load_checkpoint(path: Path, parts: tuple[str, ...] = FILES, map_location="cpu") -> dict:
    """Verified load of the named parts: {'model.pt': state_dict, ...}. A distributed checkpoint has
    state.pt only; its model and optimizer load with parallel.dcp.load."""
    read_manifest_checked(path)
    if is_distributed(path):
        parts = tuple(p for p in parts if p not in ("model.pt", "optimizer.pt"))
    out = {}
    for name in parts:
        try:
            out[name] = torch.load(path / name, map_location=map_location, weights_only=name not in FULL_PICKLE)
        except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
            raise MoeforgeError(f"checkpoint '{path}': cannot read {name}: {_load_error(e)}") from None
    return out


def load_into(path: Path, parts: dict, model, optimizer, pctx, weights: bool = True, optimizer_kind: str = "adamw",
              owned: set[str] | None = None) -> None:
    """Fill this rank's `model` and `optimizer` (None: no optimizer) from the checkpoint `path`, whatever
    layout wrote it, in the layout of `model` (pctx: its ParallelContext; None: one process): a
    distributed checkpoint's pieces resharded by DCP, a single-process checkpoint's tensors sliced
    over ep and cut into FSDP shards on the way in.

    parts: load_checkpoint(path, ...)'s result (model.pt, and optimizer.pt with an optimizer, unless
    the checkpoint is distributed). weights=False: the optimizer's state alone. optimizer_kind: the
    train.optimizer of `optimizer` (the order of a single-process state's parameters). owned: the
    state-dict names of this rank's pipeline stages (None: all)."""
    from .. import parallel
    from ..parallel import dcp

    if is_distributed(path):  # pieces of any layout, resharded into this one
        try:
            dcp.load(path / "dcp", model, optimizer, pctx, owned, weights=weights)
        except Exception as e:  # noqa: BLE001 - a DCP failure means files that do not fit this model
            raise MoeforgeError(f"checkpoint '{path}': cannot read its distributed state: "
                                f"{(str(e).strip().splitlines() or [type(e).__name__])[0]}") from None
        return
    if weights:
        if pctx is None:
            model.load_state_dict(parts["model.pt"])
        else:  # a single-process checkpoint, sliced / sharded for this rank (pipeline: the stages reference them)
            parallel.load_full_state_dict(model, parts["model.pt"], pctx, owned=owned)
    if optimizer is None:
        return
    if pctx is None:
        try:
            optimizer.load_state_dict(parts["optimizer.pt"])
        except (ValueError, KeyError) as e:  # another train.optimizer's groups
            raise MoeforgeError(f"checkpoint '{path}': its optimizer state does not fit "
                                f"train.optimizer={optimizer_kind} ({str(e).strip()})") from None
    else:
        from .step import optimizer_groups

        parallel.load_full_optimizer_state_dict(model, optimizer, parts["optimizer.pt"], pctx,
                                                sum(optimizer_groups(model, None, optimizer_kind), []))


def _load_error(e: Exception) -> str:
    """One line for a torch.load failure (the restricted unpickler's message runs over many lines)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    if not lines[0].startswith("Weights only load failed"):
        return lines[0]
    detail = next((line for line in lines[1:] if "GLOBAL" in line), "")
    detail = detail.removeprefix("WeightsUnpickler error:").strip().split(" was not an allowed global")[0]
    return "it holds objects other than tensors; refused to unpickle them" + (f" ({detail})" if detail else "")


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder / its checkpoints folder (then its newest checkpoint)."""
    p = Path(path)
    if (p / "manifest.json").is_file():
        return p
    for root in (p / "checkpoints", p):
        found = list_checkpoints(root)
        if found:
            return found[-1]
    if not p.exists():
        raise MoeforgeError(f"checkpoint '{p}' does not exist")
    raise MoeforgeError(f"'{p}' holds no complete checkpoint (no step_N folder with a manifest.json)")


def config_differences(a: Config, b: Config) -> list[str]:
    da, db = a.to_dict()["model"], b.to_dict()["model"]
    return [f"model.{k}: {da[k]!r} vs {db[k]!r}" for k in da if da[k] != db.get(k)]


def load_trained_model(path: str | Path, device: str | None = None, ema: bool = False):
    """(model in eval mode, config) from a checkpoint folder or a run folder. ema: the parameters
    are the run's exponential moving average (train.ema_decay) instead of its last weights."""
    from ..model import build_model
    from .step import resolve_device

    p = resolve_checkpoint(path)
    cfg = load_checkpoint_config(p)
    dev = resolve_device(device or "auto")
    model = build_model(cfg.model, dev, init=False)
    if is_distributed(p):  # one process reads the pieces of every rank (no process group needed)
        from ..parallel import dcp

        read_manifest_checked(p)
        try:
            dcp.load(p / "dcp", model, None, None)
        except Exception as e:  # noqa: BLE001 - any DCP failure means files that do not fit
            raise MoeforgeError(f"checkpoint '{p}': cannot read its distributed weights: "
                                f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
        if ema:
            _load_ema(p, model)
        return model.eval(), cfg
    state = load_checkpoint(p, ("model.pt",), map_location=dev)["model.pt"]
    if not isinstance(state, dict):
        raise MoeforgeError(f"checkpoint '{p}': model.pt holds a {type(state).__name__}, not a state dict")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise MoeforgeError(f"checkpoint '{p}': weights do not match its config: {str(e).splitlines()[0]}") from None
    if ema:
        _load_ema(p, model)
    return model.eval(), cfg


@torch.no_grad()
def _load_ema(path: Path, model) -> None:
    """Replace the model's parameters by the EMA saved in the checkpoint's state (buffers, such as
    the routing biases, stay the trained ones)."""
    saved = load_checkpoint(path, ("state.pt",))["state.pt"].get("ema")
    if not saved:
        raise MoeforgeError(f"checkpoint '{path}' holds no parameter EMA (train with train.ema_decay > 0)")
    params = dict(model.named_parameters())
    if set(saved) != set(params):
        raise MoeforgeError(f"checkpoint '{path}': its EMA does not match the model's parameters")
    for name, p in params.items():
        p.copy_(saved[name])
