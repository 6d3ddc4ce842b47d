"""Hand freed heap memory back to the operating system (glibc's ``malloc_trim``).

glibc returns freed memory to the kernel only from the top of its heap. Quantizing a model
layer by layer leaves the heap full of holes: each layer's full-precision temporaries are freed,
but the small packed weights allocated after them keep those pages mapped. Loading SmolLM2-135M
in 4 bits left ~430 MB of such freed-but-resident memory (docs/qlora.md); ``malloc_trim(0)``
releases the free pages anywhere in the heap. Elsewhere than glibc this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from functools import lru_cache
from typing import Any


@lru_cache(maxsize=1)
def _malloc_trim() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # musl and other libcs have no malloc_trim
        return None


def trim_heap() -> bool:
    """Release free heap pages to the OS; True when glibc's ``malloc_trim`` ran."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
