import platform

import pytest

from moeforge import host_memory


def test_user_malloc_tunables_are_left_alone(monkeypatch):
    """With glibc's own MALLOC_* tunables in the environment the command line changes nothing."""
    calls = []
    monkeypatch.setattr(host_memory.ctypes, "CDLL", lambda *a, **k: calls.append(a))
    for name in ("MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"):
        monkeypatch.setenv(name, "1")
        assert host_memory.keep_freed_host_memory() is False
        monkeypatch.delenv(name)
    assert calls == []


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_thresholds_are_set_on_glibc(monkeypatch):
    """On Linux with glibc the three mallopt calls are made with the documented values and succeed."""
    for name in host_memory._USER_TUNABLES:
        monkeypatch.delenv(name, raising=False)
    real = host_memory.ctypes.CDLL
    seen = []

    class Recording:
        def __init__(self, *a, **k):
            self.lib = real(*a, **k)

        def mallopt(self, param, value):
            seen.append((param, value))
            return self.lib.mallopt(param, value)

    monkeypatch.setattr(host_memory.ctypes, "CDLL", Recording)
    assert host_memory.keep_freed_host_memory() is True
    assert seen == [(-3, 32 << 20), (-1, 1 << 30), (-2, 64 << 20)]
