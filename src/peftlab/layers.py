"""The two wrappers that model surgery puts into a model.

* :class:`AdaptedLayer` wraps one base layer (Linear, Conv1D, Embedding, Conv2d, ...) and
  holds that layer's adapters, one small module per adapter name, in one ``nn.ModuleDict``.
* :class:`ModulesToSave` wraps a module that is trained in full (e.g. a classifier head):
  the original stays frozen, each adapter name gets its own trainable copy.

An adapter module subclasses :class:`LayerAdapter` and overrides the hooks it needs: an
additive method (LoRA) only touches the output, IA3 scales the input or the output.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from peftlab.errors import AdapterStateError
from peftlab.kernels import mixed_lora_forward

BASE_ROW = "__base__"  # row name in mixed batches that selects the bare base model


class LayerAdapter(nn.Module):
    """One adapter on one base layer.

    The wrapped layer computes ``adapt_output(x, base(adapt_input(x)))`` for each active,
    unmerged adapter, in activation order. Subclasses keep only their own parameters.
    """

    #: True when ``adapt_input`` is not the identity (mixed batches then run per group).
    transforms_input: bool = False

    def adapt_input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def adapt_output(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out

    def fused_forward(self, base_layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """Base layer and adapter in one fast computation, or None to take the readable path.

        Must equal ``adapt_output(x, base_layer(adapt_input(x)))`` (see :mod:`peftlab.kernels`).
        """
        return None

    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """(A, B, s) when this adapter's output is exactly ``out + s * B A x`` right now, else None.

        Lets mixed batches stack the adapters of one layer (see :func:`peftlab.kernels.mixed_lora_forward`).
        """
        return None

    def merge_into(self, base_layer: nn.Module) -> None:
        """Fold this adapter into ``base_layer``'s weights (in place)."""
        raise AdapterStateError(f"{type(self).__name__} cannot be merged into the base weights.")

    def unmerge_from(self, base_layer: nn.Module) -> None:
        """Undo :meth:`merge_into`."""
        raise AdapterStateError(f"{type(self).__name__} cannot be unmerged from the base weights.")


class AdaptedLayer(nn.Module):
    """A base layer plus its adapters; forwards through the active, unmerged ones."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        # Per-row adapter names for one mixed-batch forward; set by PeftModel, else None.
        self.row_adapters: Sequence[str] | None = None

    def add(self, name: str, adapter: LayerAdapter) -> None:
        self.adapters[name] = adapter

    def remove(self, name: str) -> None:
        if name in self.merged_adapters:
            raise AdapterStateError(f"adapter {name!r} is merged; call unmerge_adapter() before deleting it.")
        del self.adapters[name]
        self.active_adapters = [n for n in self.active_adapters if n != name]

    # ----- merging --------------------------------------------------------------------------
    def merge(self, names: Sequence[str]) -> None:
        for name in names:
            if name in self.adapters and name not in self.merged_adapters:
                self.adapters[name].merge_into(self.base_layer)
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        # Undo in reverse order: multiplicative methods (IA3) do not commute with additive ones.
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            self.adapters[name].unmerge_from(self.base_layer)

    # ----- forward ----------------------------------------------------------------------------
    def _live(self, names: Sequence[str]) -> list[LayerAdapter]:
        return [self.adapters[n] for n in names if n in self.adapters and n not in self.merged_adapters]

    def _forward_with(self, adapters: list[LayerAdapter], x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        x_in = x
        for adapter in adapters:
            x_in = adapter.adapt_input(x_in)
        out = self.base_layer(x_in, *args, **kwargs)
        for adapter in adapters:
            out = adapter.adapt_output(x, out)
        return out

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disabled:
            return self.base_layer(x, *args, **kwargs)
        if self.row_adapters is not None:
            return self._mixed_forward(x, *args, **kwargs)
        live = self._live(self.active_adapters)
        if len(live) == 1 and not args and not kwargs:
            fused = live[0].fused_forward(self.base_layer, x)
            if fused is not None:
                return fused
        return self._forward_with(live, x, *args, **kwargs)

    def _mixed_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Each row of the batch goes through the adapter named for it (or none)."""
        rows = self.row_adapters
        assert rows is not None
        if len(rows) != x.shape[0]:
            raise AdapterStateError(
                f"adapter_names has {len(rows)} entries but the batch has {x.shape[0]} rows; give one name per row."
            )
        adapters = {n: self.adapters[n] for n in dict.fromkeys(rows) if n in self.adapters}
        if not args and not kwargs:
            factors = {n: a.low_rank_factors() for n, a in adapters.items()}
            if all(f is not None for f in factors.values()):
                fused = mixed_lora_forward(self.base_layer, x, rows, factors)  # type: ignore[arg-type]
                if fused is not None:
                    return fused
        groups = _group_rows(rows, x.device)
        if not any(a.transforms_input for a in adapters.values()):
            # Output-only adapters: run the base layer once on the whole batch.
            out = self.base_layer(x, *args, **kwargs)
            result = out.clone()
            for name, index in groups.items():
                if name in adapters:
                    result[index] = adapters[name].adapt_output(x[index], out[index])
            return result
        parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        for name, index in groups.items():
            chosen = [adapters[name]] if name in adapters else []
            parts.append((index, self._forward_with(chosen, x[index], *args, **kwargs)))
        first = parts[0][1]
        result = first.new_empty((x.shape[0], *first.shape[1:]))
        for index, part in parts:
            result[index] = part
        return result

    def __getattr__(self, name: str):
        # Code that reads e.g. ``layer.weight`` or ``layer.in_features`` keeps working.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)


class ModulesToSave(nn.Module):
    """A module trained in full: frozen original plus one trainable copy per adapter name."""

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.copies = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.disabled = False
        self.row_adapters: Sequence[str] | None = None

    def add(self, name: str) -> None:
        clone = copy.deepcopy(self.original_module)
        for p in clone.parameters():
            p.requires_grad_(True)
        self.copies[name] = clone

    def remove(self, name: str) -> None:
        del self.copies[name]
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "original_module":
                raise
            return getattr(self.original_module, name)

    def _module_for(self, names: Sequence[str]) -> nn.Module:
        for name in names:
            if name in self.copies:
                return self.copies[name]
        return self.original_module

    def forward(self, x: torch.Tensor, *args, **kwargs):
        if self.disabled:
            return self.original_module(x, *args, **kwargs)
        if self.row_adapters is None:
            return self._module_for(self.active_adapters)(x, *args, **kwargs)
        groups = _group_rows(self.row_adapters, x.device)
        parts = [(index, self._module_for([name])(x[index], *args, **kwargs)) for name, index in groups.items()]
        first = parts[0][1]
        result = first.new_empty((x.shape[0], *first.shape[1:]))
        for index, part in parts:
            result[index] = part
        return result


def _group_rows(rows: Sequence[str], device: torch.device) -> dict[str, torch.Tensor]:
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(rows):
        groups.setdefault(name, []).append(i)
    return {name: torch.tensor(idx, device=device, dtype=torch.long) for name, idx in groups.items()}


def iter_wrappers(model: nn.Module) -> Iterator[tuple[str, AdaptedLayer | ModulesToSave]]:
    """All (module path, wrapper) pairs in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, (AdaptedLayer, ModulesToSave)):
            yield name, module
