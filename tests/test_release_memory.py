"""trim_heap hands freed heap pages back to the OS (glibc), which quantized loading relies on."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from peftlab import release_memory

glibc_only = pytest.mark.skipif(release_memory._malloc_trim() is None, reason="needs glibc's malloc_trim")


@glibc_only
def test_trim_heap_releases_holes_left_by_freed_memory():
    # In a fresh process: 200 x 1 MB buffers, each followed by a 100 kB block that stays alive, so
    # freeing the big ones leaves holes that glibc's free() alone does not return to the OS.
    script = textwrap.dedent(
        """
        import ctypes, re
        from peftlab.release_memory import trim_heap
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc.restype = ctypes.c_void_p
        libc.malloc.argtypes = [ctypes.c_size_t]
        libc.free.argtypes = [ctypes.c_void_p]
        libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
        libc.mallopt(-3, 32 << 20)  # mmap threshold: keep 1 MB blocks on the heap
        def anon_mb():
            return int(re.search(r"RssAnon:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) / 1024
        big, small = [], []
        for _ in range(200):
            p = libc.malloc(1 << 20); libc.memset(p, 1, 1 << 20); big.append(p)
            q = libc.malloc(100_000); libc.memset(q, 1, 100_000); small.append(q)
        for p in big:
            libc.free(p)
        before = anon_mb()
        assert trim_heap()
        print(before - anon_mb())
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    released_mb = float(out.stdout.strip())
    assert released_mb > 150, out.stdout


def test_quantize_model_trims_after_every_layer(monkeypatch):
    pytest.importorskip("bitsandbytes")
    from conftest import tiny_llama
    from peftlab.quantization import QuantConfig, is_quantized_linear, quantize_model

    calls = []
    monkeypatch.setattr("peftlab.quantization.trim_heap", lambda: calls.append(1) or True)
    model = quantize_model(tiny_llama(), QuantConfig(bits=4))
    quantized = sum(is_quantized_linear(m) for m in model.modules())
    assert quantized > 0 and len(calls) == quantized
