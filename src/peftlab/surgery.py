"""The only code that replaces submodules of a model: inject adapters, wrap heads, unload."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from peftlab.layers import LayerWrapper, AdapterView, ModulesToSave, iter_wrappers


def replace_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def base_of(module: nn.Module) -> nn.Module:
    """The plain layer inside a wrapper (or the module itself)."""
    return module.base_layer if isinstance(module, LayerWrapper) else module


def adapter_dtype(base_layer: nn.Module) -> torch.dtype:
    """Adapters train in fp32 when the base is half precision or quantized (stable updates)."""
    weight = getattr(base_layer, "weight", None)
    if weight is None or not weight.is_floating_point() or weight.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return weight.dtype


def adapter_device(base_layer: nn.Module) -> torch.device:
    for tensor in list(base_layer.parameters()) + list(base_layer.buffers()):
        return tensor.device
    return torch.device("cpu")


def inject_adapter(
    model: nn.Module,
    names: Sequence[str],
    adapter_name: str,
    make_adapter: Callable[[nn.Module, str], AdapterView],
) -> None:
    """Put a new adapter named ``adapter_name`` into each named module.

    All adapters are built first, so a layer that cannot be adapted raises before the model
    is touched.
    """
    built: list[tuple[str, nn.Module, AdapterView]] = []
    for name in names:
        module = model.get_submodule(name)
        base = base_of(module)
        adapter = make_adapter(base, name)
        adapter.to(device=adapter_device(base), dtype=adapter_dtype(base))
        built.append((name, module, adapter))
    for name, module, adapter in built:
        if not isinstance(module, LayerWrapper):
            module = LayerWrapper(module)
            replace_submodule(model, name, module)
        module.add(adapter_name, adapter)
        adapter.on_installed(module.base_layer)


def wrap_modules_to_save(model: nn.Module, names: Sequence[str], adapter_name: str) -> list[str]:
    """Give each module matching ``names`` (exact or dotted suffix) a trainable copy."""
    matched = [
        n
        for n, m in model.named_modules()
        if n and any(n == s or n.endswith("." + s) for s in names) and not _inside_wrapper(model, n)
    ]
    for name in matched:
        module = model.get_submodule(name)
        if not isinstance(module, ModulesToSave):
            module = ModulesToSave(module)
            replace_submodule(model, name, module)
        module.add(adapter_name)
    return matched


def _inside_wrapper(model: nn.Module, name: str) -> bool:
    parts = name.split(".")
    for i in range(1, len(parts)):
        if isinstance(model.get_submodule(".".join(parts[:i])), (LayerWrapper, ModulesToSave)):
            return True
    return False


def remove_adapter(model: nn.Module, adapter_name: str, undo_install: bool = False) -> None:
    """Delete one adapter everywhere; wrappers left with no adapter go back to plain layers.

    ``undo_install`` (a rollback) also gives base weights back what an adapter's init took (PiSSA).
    """
    for name, wrapper in list(iter_wrappers(model)):
        if isinstance(wrapper, LayerWrapper) and adapter_name in wrapper.adapters:
            wrapper.remove(adapter_name, undo_install)
            if not wrapper.adapters:
                replace_submodule(model, name, wrapper.base_layer)
        elif isinstance(wrapper, ModulesToSave) and adapter_name in wrapper.modules_to_save:
            wrapper.remove(adapter_name)
            if not wrapper.modules_to_save:
                replace_submodule(model, name, wrapper.original_module)


def unload(model: nn.Module, merge: bool, adapter_names: Sequence[str] | None = None) -> nn.Module:
    """Take every wrapper out of ``model``; with ``merge`` fold the active adapters in first."""
    for name, wrapper in list(iter_wrappers(model)):
        if isinstance(wrapper, LayerWrapper):
            if merge:
                wrapper.merge_adapters(adapter_names if adapter_names is not None else wrapper.active_adapters)
            replace_submodule(model, name, wrapper.base_layer)
        else:
            # As peft (0.22): unloading gives back the original module; merging keeps the trained copy
            # of the chosen adapter (adapter_names, else the active one), the original if it has none.
            chosen = (adapter_names if adapter_names is not None else wrapper.active_adapters) if merge else []
            keep = next((wrapper.modules_to_save[n] for n in chosen if n in wrapper.modules_to_save), None)
            replace_submodule(model, name, keep if keep is not None else wrapper.original_module)
    return model
