import platform
import sys

import pytest

from tether.training import memory


def test_keep_freed_memory_respects_the_opt_out(monkeypatch):
    monkeypatch.setattr(memory, "_MALLOC_TUNED", False)
    monkeypatch.setenv("TETHER_CPU_MALLOC", "0")
    assert memory.keep_freed_memory() is False
    assert memory._MALLOC_TUNED is False


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="mallopt is glibc's")
def test_keep_freed_memory_applies_on_glibc(monkeypatch):
    monkeypatch.setattr(memory, "_MALLOC_TUNED", False)
    monkeypatch.delenv("TETHER_CPU_MALLOC", raising=False)
    assert memory.keep_freed_memory() is True
    assert memory._MALLOC_TUNED is True
