"""A child-process environment with networking forbidden, for tests that nothing asks the network.

``no_network_env(folder)`` writes a ``sitecustomize.py`` that makes every DNS lookup and every
non-local socket connect fail at once and appends each attempt to ``folder/attempts.log``; the
environment puts it first on PYTHONPATH and drops HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, so a
library that would go online tries (and retries) as it would on a machine without a network.
"""

from __future__ import annotations

import os
from pathlib import Path

SITECUSTOMIZE = '''
import os
import socket

_LOG = os.environ["PEFTLAB_TEST_NETWORK_LOG"]
_connect = socket.socket.connect


def _record(what):
    with open(_LOG, "a", encoding="utf-8") as fh:
        fh.write(f"{os.getpid()} {what}\\n")
        if os.environ.get("PEFTLAB_TEST_NETWORK_STACK"):
            import traceback; traceback.print_stack(file=fh)
    raise OSError(101, "network is unreachable (forbidden by the test)")


def _getaddrinfo(host, *args, **kwargs):
    _record(f"getaddrinfo {host!r}")


def _guarded_connect(self, address):
    if self.family == getattr(socket, "AF_UNIX", None):
        return _connect(self, address)
    _record(f"connect {address!r}")


socket.getaddrinfo = _getaddrinfo
socket.socket.connect = _guarded_connect
socket.socket.connect_ex = _guarded_connect
'''


def no_network_env(folder: Path, src: Path) -> tuple[dict[str, str], Path]:
    """(environment for a child process with ``src`` importable and no network, the attempts log)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE, encoding="utf-8")
    log = folder / "attempts.log"
    log.write_text("", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")}
    env.update({"PYTHONPATH": os.pathsep.join([str(folder), str(src)]), "PEFTLAB_TEST_NETWORK_LOG": str(log),
                "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    return env, log


def fake_hub_cache(cache: Path, repo_id: str, folder: Path) -> Path:
    """Lay ``folder``'s files out as the hub cache (``HF_HUB_CACHE``) holds a downloaded ``repo_id``
    (links to the files, as the cache links its snapshots to blobs)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    snapshot = repo / "snapshots" / commit
    for path in folder.rglob("*"):
        if path.is_file():
            target = snapshot / path.relative_to(folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(path.resolve())
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit, encoding="utf-8")
    return snapshot
