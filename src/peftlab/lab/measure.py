"""What a run measures about itself: memory peaks, wall time, file sizes, environment.

CPU memory is the process's peak resident set size (``getrusage``), which is why ``compare``
runs every method in its own process: the peak then belongs to that method alone.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from typing import Any

import torch


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def cuda_peak_mb() -> float | None:
    """Largest CUDA allocation of this process in MiB, or None without a GPU."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated() / (1024 * 1024)


def folder_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


class Stopwatch:
    """Wall-clock seconds since creation (monotonic)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self.start


def git_commit(path: str | None = None) -> str | None:
    """The commit of the repository holding ``path`` (default: peftlab's source), if any."""
    folder = path or os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=folder, capture_output=True, text=True)
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def environment() -> dict[str, Any]:
    """Versions and hardware that the numbers depend on."""
    import transformers

    import peftlab

    versions = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
                "peftlab": peftlab.__version__}
    try:
        import accelerate

        versions["accelerate"] = accelerate.__version__
    except ImportError:
        pass
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {
        "versions": versions,
        "git_commit": git_commit(),
        "platform": platform.platform(),
        "device": device,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
