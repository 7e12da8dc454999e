"""gpu_state: nvidia-smi's samples parsed and summarised, and the monitor's background process, run
against a stand-in for nvidia-smi (a Python script printing the same CSV lines)."""

import sys
import textwrap
import time

import pytest
import torch

from moeforge.bench import BenchResult, format_result
from moeforge.gpu_state import GPUMonitor, describe, parse_sample, summarize


def test_parse_sample():
    s = parse_sample("1755, 1980, 688.42, 700.00, 0x0000000000000004, 61\n")
    assert s == {"sm_mhz": 1755.0, "sm_max_mhz": 1980.0, "power_w": 688.42, "power_limit_w": 700.0,
                 "reasons": 4, "temperature_c": 61.0}
    s = parse_sample("1980, 1980, [N/A], [Not Supported], [N/A], 40")
    assert s["power_w"] is None and s["power_limit_w"] is None and s["reasons"] is None and s["sm_mhz"] == 1980
    assert parse_sample("") is None and parse_sample("No devices were found") is None


def test_summarize_and_describe():
    lines = ["1500, 1980, 690, 700, 0x4, 60", "1980, 1980, 400, 700, 0x0, 58", "1700, 1980, 699, 700, 0x4, 63",
             "1980, 1980, 80, 700, 0x1, 50"]
    st = summarize([parse_sample(x) for x in lines])
    assert st["samples"] == 4 and st["sm_mhz"] == (1500, 1840, 1980) and st["sm_max_mhz"] == 1980
    assert st["power_w"] == 545 and st["power_limit_w"] == 700 and st["temperature_c"] == 63
    assert st["held_by"] == {"power cap": 0.5}  # "idle" is not a reason the clock was held down
    line = describe(st)
    assert "SM clock 1,500-1,980 MHz (median 1,840" in line and "power cap in 50% of samples" in line
    assert "700 W limit" in line and "(4 samples, nvidia-smi)" in line
    calm = summarize([parse_sample("1980, 1980, 300, 700, 0x0, 40")])
    assert "clock not held down" in describe(calm)
    assert describe(summarize([])).startswith("no samples")
    assert describe({"error": "nvidia-smi not found"}) == "not sampled (nvidia-smi not found)"
    assert describe(None) == "not sampled"


FAKE = textwrap.dedent('''
    import sys, time
    args = " ".join(sys.argv[1:])
    if "clocks_event_reasons" in args:  # an older nvidia-smi: only the throttle name
        print('Field "clocks_event_reasons.active" is not a valid field to query.')
        sys.exit(2)
    if "--loop-ms" not in args:
        print("1980, 1980, 75.0, 700.00, 0x0000000000000001, 35")
        sys.exit(0)
    i = 0
    while True:
        print(f"{1500 + 100 * (i % 2)}, 1980, 695.5, 700.00, {'0x4' if i % 2 else '0x0'}, 60", flush=True)
        i += 1
        time.sleep(0.01)
''')


def test_monitor_samples_in_the_background(tmp_path):
    script = tmp_path / "fake_smi.py"
    script.write_text(FAKE)
    with GPUMonitor(torch.device("cuda", 0), interval_ms=10, command=[sys.executable, str(script)]) as m:
        assert m.samples, "the monitor returns once the first sample is in"
        n0, t0 = len(m.samples), time.monotonic()
        while len(m.samples) < n0 + 4 and time.monotonic() - t0 < 30:
            time.sleep(0.01)
    n = len(m.samples)
    st = m.state()
    assert st["samples"] >= 5 and st["sm_mhz"][0] == 1500 and st["sm_mhz"][2] == 1600
    assert 0 < st["held_by"]["power cap"] < 1 and st["power_limit_w"] == 700
    assert m.proc.poll() is not None and len(m.samples) == n  # stopped on leaving the block


def test_monitor_reports_why_it_has_no_samples(tmp_path):
    script = tmp_path / "broken_smi.py"
    script.write_text("import sys; print('NVIDIA-SMI has failed because it could not communicate'); sys.exit(9)")
    with GPUMonitor(torch.device("cuda", 0), command=[sys.executable, str(script)]) as m:
        pass
    st = m.state()
    assert st == {"error": "nvidia-smi refused the query: NVIDIA-SMI has failed because it could not communicate"}
    with GPUMonitor(torch.device("cpu")) as m:
        pass
    assert m.state() is None and m.proc is None


@pytest.mark.parametrize("state, shown", [(None, False), ({"error": "nvidia-smi not found"}, True)])
def test_bench_result_shows_the_gpu_state(state, shown):
    r = BenchResult("moeforge", 1000.0, 10.0, 1.0, None, None, gpu_state=state)
    assert ("GPU during the timed steps: not sampled (nvidia-smi not found)" in format_result(r)) == shown
