"""Run a callback on modules of chosen packages right after they are imported.

Trainer support rebinds names inside transformers, accelerate and trl modules (their "is this a
peft model?" predicates, the peft classes trl tests configs against). Rebinding the modules that
are already imported is not enough: ``from trl import DPOTrainer`` after the opt-in imports a
module that binds peft's originals at import time. This finder sits first on ``sys.meta_path``,
lets the other finders find the module, and wraps its loader so the callback sees the module as
soon as its code has run. Nothing else about the import changes.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any


class _CallbackLoader(importlib.abc.Loader):
    """The found module's own loader, then the callback."""

    def __init__(self, loader: Any, callback: Callable[[ModuleType], None]) -> None:
        self._loader = loader
        self._callback = callback

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        self._callback(module)

    def __getattr__(self, name: str) -> Any:  # get_source, get_code, is_package, ... of the real loader
        return getattr(self._loader, name)


class AfterImport(importlib.abc.MetaPathFinder):
    """Calls ``callback(module)`` after each module whose name starts with one of ``prefixes`` is imported."""

    def __init__(self, prefixes: tuple[str, ...], callback: Callable[[ModuleType], None]) -> None:
        self.prefixes = prefixes
        self.callback = callback
        self._finding = threading.local()

    def wanted(self, fullname: str) -> bool:
        """A module this hook watches: a package named by a prefix, or a module inside it."""
        return any(fullname == p.rstrip(".") or fullname.startswith(p) for p in self.prefixes)

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if not self.wanted(fullname) or getattr(self._finding, "name", None) == fullname:
            return None
        self._finding.name = fullname
        try:
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
            else:
                return None
        finally:
            self._finding.name = None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _CallbackLoader(spec.loader, self.callback)
        return spec

    def install(self) -> None:
        if self not in sys.meta_path:
            sys.meta_path.insert(0, self)

    def uninstall(self) -> None:
        while self in sys.meta_path:
            sys.meta_path.remove(self)
