"""The GPU's clocks, power and throttle reasons while a benchmark runs, sampled by `nvidia-smi`.

A GPU at its power cap lowers its SM clock, and the same code then runs slower: on an H200 the FP8
MoE layer moved between 1,500 and 1,965 MHz and its time by 15% within one process (docs/fp8.md).
A benchmark that prints the clock next to its numbers lets a reader tell that spread from a change
in the code. `GPUMonitor` runs `nvidia-smi --query-gpu=... --loop-ms=N` in the background while the
timed steps run (one process for the whole window: nothing is queried from the timed loop itself)
and summarises the samples. Without `nvidia-smi` (or without a GPU) it says why and samples nothing.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import threading

import torch

# the bits of nvidia-smi's clocks_event_reasons (formerly clocks_throttle_reasons), as NVML names them
REASONS = {
    0x1: "idle",
    0x2: "application clock setting",
    0x4: "power cap",
    0x8: "hardware slowdown",
    0x10: "sync boost",
    0x20: "thermal (software)",
    0x40: "thermal (hardware)",
    0x80: "power brake",
    0x100: "display clock setting",
}
_FIELDS = ("clocks.sm", "clocks.max.sm", "power.draw", "enforced.power.limit", "{reasons}", "temperature.gpu")
_REASON_FIELDS = ("clocks_event_reasons.active", "clocks_throttle_reasons.active")  # newer name first


def _number(text: str) -> float | None:
    text = text.strip()
    try:
        return float(int(text, 16)) if text.lower().startswith("0x") else float(text)
    except ValueError:  # "[N/A]", "[Not Supported]"
        return None


def parse_sample(line: str) -> dict | None:
    """One line of `--format=csv,noheader,nounits` output for _FIELDS -> a sample (None values where
    the GPU does not report a field), or None for a line that is not a sample."""
    parts = line.strip().split(",")
    if len(parts) != len(_FIELDS):
        return None
    sm, sm_max, power, limit, reasons, temp = map(_number, parts)
    return {"sm_mhz": sm, "sm_max_mhz": sm_max, "power_w": power, "power_limit_w": limit,
            "reasons": None if reasons is None else int(reasons), "temperature_c": temp}


def summarize(samples: list[dict]) -> dict:
    """Samples -> {"samples", "sm_mhz": (min, median, max), "sm_max_mhz", "power_w" (median),
    "power_limit_w", "temperature_c" (max), "held_by": {reason: share of samples}} (None where no
    sample had the field). "held_by" counts the reasons that lower the clock, not "idle"."""

    def values(key):
        return [s[key] for s in samples if s.get(key) is not None]

    sm, power, temp = values("sm_mhz"), values("power_w"), values("temperature_c")
    reasons = values("reasons")
    held = {}
    for bit, name in REASONS.items():
        if bit == 0x1 or not reasons:
            continue
        share = sum(1 for r in reasons if r & bit) / len(reasons)
        if share:
            held[name] = share
    return {
        "samples": len(samples),
        "sm_mhz": (min(sm), statistics.median(sm), max(sm)) if sm else None,
        "sm_max_mhz": max(values("sm_max_mhz"), default=None),
        "power_w": statistics.median(power) if power else None,
        "power_limit_w": max(values("power_limit_w"), default=None),
        "temperature_c": max(temp) if temp else None,
        "held_by": held if reasons else None,
    }


def describe(state: dict | None) -> str:
    """A summary (or {"error": why}) -> one line for a benchmark's output."""
    if state is None:
        return "not sampled"
    if "error" in state:
        return f"not sampled ({state['error']})"
    if not state["samples"]:
        return "no samples (nvidia-smi gave none during the timed window)"
    parts = []
    if state["sm_mhz"]:
        lo, mid, hi = state["sm_mhz"]
        top = f", the GPU's maximum {state['sm_max_mhz']:,.0f}" if state["sm_max_mhz"] else ""
        parts.append(f"SM clock {lo:,.0f}-{hi:,.0f} MHz (median {mid:,.0f}{top})")
    if state["power_w"] is not None:
        limit = f" of a {state['power_limit_w']:,.0f} W limit" if state["power_limit_w"] else ""
        parts.append(f"power {state['power_w']:,.0f} W (median){limit}")
    if state["temperature_c"] is not None:
        parts.append(f"up to {state['temperature_c']:.0f} C")
    held = state["held_by"]
    if held is not None:
        parts.append("clock held down by " + ", ".join(f"{k} in {100 * v:.0f}% of samples" for k, v in held.items())
                     if held else "clock not held down")
    return f"{', '.join(parts)} ({state['samples']} samples, nvidia-smi)"


def _device_id(device: torch.device) -> str:
    """nvidia-smi's -i for a torch device: its UUID (CUDA_VISIBLE_DEVICES renumbers the indices)."""
    uuid = str(torch.cuda.get_device_properties(device).uuid)
    return uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"


class GPUMonitor:
    """with GPUMonitor(device) as m: ...; m.state() -> summarize(...) of the samples taken inside the
    block, {"error": why} when nothing could be sampled, or None on a CPU. command: the program and
    leading arguments to run in place of nvidia-smi (tests)."""

    def __init__(self, device: torch.device, interval_ms: int = 100, command: list[str] | None = None,
                 device_id: str | None = None):
        self.device, self.interval_ms = device, interval_ms
        self.command, self.device_id = command, device_id
        self.samples: list[dict] = []
        self.error: str | None = None
        self.proc = None
        self.reader = None
        self.first = threading.Event()

    def _base(self) -> list[str] | None:
        if self.command is not None:
            return list(self.command)
        exe = shutil.which("nvidia-smi")
        if exe is None:
            self.error = "nvidia-smi not found"
            return None
        try:
            dev = self.device_id or _device_id(self.device)
        except Exception as e:  # (a torch without the UUID property)
            self.error = f"no device UUID ({e})"
            return None
        return [exe, "-i", dev]

    def _query(self, base: list[str]) -> list[str] | None:
        """The --query-gpu arguments this nvidia-smi accepts (its name for the throttle reasons)."""
        last: list[str] = []
        for name in _REASON_FIELDS:
            args = [f"--query-gpu={','.join(_FIELDS).format(reasons=name)}", "--format=csv,noheader,nounits"]
            try:
                r = subprocess.run(base + args, capture_output=True, text=True, timeout=20)
            except (OSError, subprocess.TimeoutExpired) as e:
                self.error = f"nvidia-smi failed: {e}"
                return None
            if r.returncode == 0 and parse_sample(r.stdout.splitlines()[0] if r.stdout else "") is not None:
                return args
            last = (r.stdout + r.stderr).strip().splitlines()[:1]
        self.error = f"nvidia-smi refused the query: {last[0] if last else 'no output'}"
        return None

    def __enter__(self) -> "GPUMonitor":
        if self.device.type != "cuda":
            return self
        base = self._base()
        args = self._query(base) if base is not None else None
        if args is None:
            return self
        self.proc = subprocess.Popen(base + args + [f"--loop-ms={self.interval_ms}"], stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.first.wait(timeout=10)  # the timed window starts once sampling has
        return self

    def _read(self) -> None:
        for line in self.proc.stdout:
            s = parse_sample(line)
            if s is not None:
                self.samples.append(s)
                self.first.set()
        self.first.set()

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.reader.join(timeout=10)
            self.proc.stdout.close()

    def state(self) -> dict | None:
        if self.device.type != "cuda":
            return None
        if self.error is not None:
            return {"error": self.error}
        return summarize(list(self.samples))
