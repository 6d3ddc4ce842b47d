"""The two wrappers that model surgery puts into a model.

* :class:`LayerWrapper` wraps one base layer (Linear, Conv1D, Embedding, Conv2d, ...) kept as
  ``base_layer``, and holds each method's tensors in containers keyed by adapter name, named
  as Hugging Face peft names them: ``lora_A.<adapter>.weight``, ``ia3_l.<adapter>``, ...
* :class:`ModulesToSave` wraps a module that is trained in full (e.g. a classifier head):
  the frozen ``original_module`` beside one trainable copy per adapter in ``modules_to_save``.

A method's logic stays in one small class anyway: it subclasses :class:`AdapterView`, declares
its tensors as plain attributes (``self.lora_A = nn.Linear(...)``) and overrides the hooks it
needs (an additive method only touches the output, IA3 scales the input or the output). When the
adapter is added to a layer, each of its direct parameters and submodules moves into the layer's
container of the same name, and the adapter object becomes a *view*: ``adapter.lora_A`` reads
``layer.lora_A[<adapter name>]`` at access time. Nothing is aliased between two modules, so
``.to()``, ``load_state_dict(assign=True)`` and FSDP, which replace Parameter objects inside the
containers, never leave the view holding a stale tensor.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from peftlab.errors import AdapterStateError
from peftlab.kernels import mixed_lora_forward
from peftlab.mixed_batch import group_rows

BASE_ROW = "__base__"  # row name in mixed batches that selects the bare base model


def read_through(wrapper: nn.Module, name: str, inner: str) -> Any:
    """``wrapper.<name>`` for a wrapper's ``__getattr__``: its own parameters, buffers and
    submodules first (nn.Module's lookup), then the wrapped module ``wrapper.<inner>``.

    This is how code written for the bare module keeps working on its wrapper, as in peft
    (``layer.weight``, ``layer.in_features``, ``peft_model.config``, ``tuner.generate``).
    """
    try:
        return nn.Module.__getattr__(wrapper, name)
    except AttributeError:
        if name == inner:  # the wrapped module itself is missing (mid-__init__, or deleted): no recursion
            raise
        return getattr(getattr(wrapper, inner), name)


class AdapterView(nn.Module):
    """One adapter on one base layer: its hooks, and a view of its tensors held by the :class:`LayerWrapper`.

    The wrapped layer computes ``adapt_output(x, base(adapt_input(x)))`` for each active,
    unmerged adapter, in activation order. Subclasses declare only their own tensors, as plain
    attributes named as peft names them; once :meth:`attach`-ed the object is a view over the
    layer's containers (its own ``parameters()`` are then empty: the layer owns them).
    """

    #: True when ``adapt_input`` is not the identity (mixed batches then run per group).
    transforms_input: bool = False
    #: Tensors the layer holds but adapter files leave out (AdaLoRA's ``ranknum``, as in peft).
    unsaved: ClassVar[tuple[str, ...]] = ()
    #: In-memory key -> on-disk key, where peft's file names differ from its module tree (DoRA).
    disk_keys: ClassVar[dict[str, str]] = {}
    #: Plain attributes the layer shows as ``{adapter name: value}``, as peft's layers keep them
    #: (``layer.scaling["default"]``, ``layer.r["default"]``).
    per_adapter: ClassVar[tuple[str, ...]] = ()
    #: Merging into a weight another module shares would change that module too, so the layer gets its
    #: own copy first; False for adapters whose merge is right for every sharer (trainable token rows).
    merge_unties_shared_weight: ClassVar[bool] = True

    # ----- the view: tensors live in the layer's containers once attached --------------------
    def attach(self, layer: nn.Module, adapter_name: str) -> None:
        """Move this adapter's parameters and submodules into ``layer``'s containers.

        Afterwards the adapter owns no tensors; ``self.<attr>`` resolves to
        ``layer.<attr>[adapter_name]`` (see the module docstring).
        """
        if any(b is not None for b in self._buffers.values()):
            raise TypeError(f"{type(self).__name__}: keep adapter tensors as parameters or submodules, not buffers.")
        held: dict[str, bool] = {}
        for attr, param in self._parameters.items():
            if param is not None:
                layer.container(attr, nn.ParameterDict)[adapter_name] = param
                held[attr] = True
        for attr, module in self._modules.items():
            if module is not None:
                layer.container(attr, nn.ModuleDict)[adapter_name] = module
                held[attr] = False
        self._parameters.clear()
        self._modules.clear()
        state = self.__dict__
        state["_training"] = state.get("_training", True)
        state["_layer"] = layer
        state["_adapter_name"] = adapter_name
        state["_held"] = held

    def __getattr__(self, attr: str) -> Any:
        # Called only when normal lookup fails: held tensors are read from the layer every time.
        state = self.__dict__
        held = state.get("_held")
        if held is not None and attr in held:
            container = state["_layer"]._modules[attr]
            if held[attr]:
                return container._parameters[state["_adapter_name"]]
            return container._modules[state["_adapter_name"]]
        return super().__getattr__(attr)

    def __setattr__(self, attr: str, value: Any) -> None:
        held = self.__dict__.get("_held")
        if held is not None and attr in held:
            self.__dict__["_layer"]._modules[attr][self.__dict__["_adapter_name"]] = value
            return
        super().__setattr__(attr, value)

    @property
    def training(self) -> bool:  # type: ignore[override]
        """An attached adapter follows its layer's train/eval mode (it is not a submodule)."""
        layer = self.__dict__.get("_layer")
        return layer.training if layer is not None else self.__dict__.get("_training", True)

    @training.setter
    def training(self, mode: bool) -> None:
        self.__dict__["_training"] = mode

    def held_tensors(self) -> dict[str, torch.Tensor]:
        """This adapter's live tensors, keyed as in its checkpoint (``lora_A.weight``, ``ia3_l``)."""
        out: dict[str, torch.Tensor] = {}
        for attr, is_param in self.__dict__.get("_held", {}).items():
            if attr in self.unsaved:
                continue
            value = getattr(self, attr)
            if is_param:
                out[attr] = value
            else:
                out.update({f"{attr}.{k}": v for k, v in value.state_dict(keep_vars=True).items()})
        return {self.disk_keys.get(k, k): v for k, v in out.items()}

    def held_parameters(self) -> list[nn.Parameter]:
        """Every parameter this adapter holds in its layer (``unsaved`` ones included)."""
        out: list[nn.Parameter] = []
        for attr, is_param in self.__dict__.get("_held", {}).items():
            value = getattr(self, attr)
            out.extend([value] if is_param else value.parameters())
        return out

    def detach_from(self, layer: nn.Module) -> None:
        """Drop this adapter's entries from ``layer``'s containers (empty containers go too)."""
        name = self.__dict__["_adapter_name"]
        for attr in self.__dict__["_held"]:
            container = layer._modules[attr]
            del container[name]
            if len(container) == 0:
                del layer._modules[attr]

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

    def on_installed(self, base_layer: nn.Module) -> None:
        """Called once every adapter of an add is built and this one sits in its layer.

        An init that moves part of the base weight into the adapter (PiSSA, OLoRA) writes the
        base's new weight here, so a layer refused while building leaves the model untouched.
        """

    def on_discarded(self, base_layer: nn.Module) -> None:
        """Undo :meth:`on_installed` when a failed add is rolled back (not on a plain delete, as in peft)."""

    def check_merge(self, base_layer: nn.Module) -> None:
        """Raise if :meth:`merge_into` cannot work on ``base_layer``; asked of every layer before any merges."""

    def merge_into(self, base_layer: nn.Module) -> None:
        """Fold this adapter into ``base_layer``'s weights (in place)."""
        raise AdapterStateError(f"{type(self).__name__} cannot be merged into the base weights.")

    def unmerge_from(self, base_layer: nn.Module) -> None:
        """Undo :meth:`merge_into`."""
        raise AdapterStateError(f"{type(self).__name__} cannot be unmerged from the base weights.")


class LayerWrapper(nn.Module):
    """What surgery puts in place of a base layer: the layer (``base_layer``) plus every adapter's tensors.

    Its forward runs the base layer through the hooks of the active, unmerged adapters (their
    :class:`AdapterView` objects). peft calls the same module a tuner layer (e.g. ``lora.Linear``).
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        # Adapter name -> view of that adapter (see AdapterView); its tensors are in the containers.
        self.adapters: dict[str, AdapterView] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        # Per-row adapter names for one mixed-batch forward; set by PeftModel, else None.
        self.row_adapters: Sequence[str] | None = None

    def container(self, attr: str, kind: type[nn.ModuleDict] | type[nn.ParameterDict]) -> nn.Module:
        """The name-keyed container ``attr`` (``lora_A``, ``ia3_l``, ...), created on first use."""
        existing = self._modules.get(attr)
        if existing is None:
            existing = kind()
            self.add_module(attr, existing)
        elif not isinstance(existing, kind):
            raise AdapterStateError(
                f"{attr} on this layer is a {type(existing).__name__} but the new adapter puts a "
                f"{'parameter' if kind is nn.ParameterDict else 'module'} there; adapters of different methods cannot share a layer."
            )
        return existing

    def add(self, name: str, adapter: AdapterView) -> None:
        adapter.attach(self, name)
        self.adapters[name] = adapter

    def remove(self, name: str, undo_install: bool = False) -> None:
        """Drop adapter ``name``; ``undo_install`` also gives the base back what the adapter's init took (a rollback)."""
        if name in self.merged_adapters:
            raise AdapterStateError(f"adapter {name!r} is merged; call unmerge_adapter() before deleting it.")
        adapter = self.adapters.pop(name)
        if undo_install:
            adapter.on_discarded(self.base_layer)
        adapter.detach_from(self)
        self.active_adapters = [n for n in self.active_adapters if n != name]

    # ----- merging --------------------------------------------------------------------------
    def merge_adapters(self, names: Sequence[str]) -> None:
        """Fold ``names`` (those not merged yet) into the base layer, in order."""
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
    def _live(self, names: Sequence[str]) -> list[AdapterView]:
        return [self.adapters[n] for n in names if n in self.adapters and n not in self.merged_adapters]

    def _forward_with(self, adapters: list[AdapterView], x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
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
        groups = group_rows(rows, x.device)
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

    # ----- peft's tuner-layer surface (code written for peft's lora.Linear & co. reads these) ---
    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def disable_adapters(self) -> bool:
        return self.disabled

    @property
    def active_adapter(self) -> list[str]:
        """The active adapters' names (peft's layers answer with the list too)."""
        return list(self.active_adapters)

    @property
    def fan_in_fan_out(self) -> bool:
        """Whether the base layer stores its weight as (in, out), as GPT-2's Conv1D does."""
        from peftlab.base_layer import is_transposed

        return is_transposed(self.base_layer)

    def set_adapter(self, adapter_names: str | Sequence[str]) -> None:
        """Make ``adapter_names`` the active adapters of this layer (their parameters trainable, as peft)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in self.adapters:
            self.set_requires_grad(name, name in names)
        self.active_adapters = names

    def enable_adapters(self, enabled: bool) -> None:
        self.disabled = not enabled

    def get_base_layer(self) -> nn.Module:
        return self.base_layer

    def delete_adapter(self, adapter_name: str) -> None:
        self.remove(adapter_name)

    def merge(self, safe_merge: bool = False, adapter_names: Sequence[str] | None = None) -> None:
        """peft's layer-level merge: fold ``adapter_names`` (default: the active ones) into the base layer."""
        names = list(adapter_names) if adapter_names is not None else list(self.active_adapters)
        if safe_merge:
            for name in names:
                adapter = self.adapters.get(name)
                delta = adapter.delta_weight() if adapter is not None and hasattr(adapter, "delta_weight") else None
                if delta is not None and not torch.isfinite(delta).all():
                    raise AdapterStateError(f"adapter {name!r} would write NaN/inf into this layer; nothing was merged.")
        self.merge_adapters(names)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """The weight update adapter ``adapter`` adds (what merging folds in), in the base weight's layout."""
        view = self.adapters[adapter]
        if not hasattr(view, "delta_weight"):
            raise AdapterStateError(f"{type(view).__name__} is not a weight update; it has no delta weight.")
        return view.delta_weight()

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        """Training of these adapters' tensors in this layer on or off (not the unsaved bookkeeping ones, e.g. AdaLoRA's ranknum)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in names:
            for tensor in self.adapters[name].held_tensors().values():
                if isinstance(tensor, nn.Parameter):
                    tensor.requires_grad_(requires_grad)

    def _scaled_views(self, names: Sequence[str]) -> list[AdapterView]:
        views = [self.adapters[n] for n in names if n in self.adapters]
        for view in views:
            if not all(hasattr(view, a) for a in ("r", "lora_alpha", "use_rslora")):
                raise AdapterStateError(f"{type(view).__name__} has no LoRA scale to change.")
        return views

    def set_scale(self, adapter: str, scale: float) -> None:
        """LoRA: ``scaling = scale * alpha / r`` (``/ sqrt(r)`` with rsLoRA), as peft's ``set_scale``."""
        from peftlab.functional import lora_scaling

        for view in self._scaled_views([adapter]):
            view.scaling = scale * lora_scaling(view.r, view.lora_alpha, view.use_rslora)

    def scale_layer(self, scale: float) -> None:
        """Multiply the active LoRA adapters' scaling by ``scale`` (undo with :meth:`unscale_layer`)."""
        for view in self._scaled_views(self.active_adapters):
            view.scaling *= scale

    def unscale_layer(self, scale: float | None = None) -> None:
        """Divide the active adapters' scaling by ``scale``, or (None) restore it to ``alpha / r``."""
        from peftlab.functional import lora_scaling

        for view in self._scaled_views(self.active_adapters):
            view.scaling = lora_scaling(view.r, view.lora_alpha, view.use_rslora) if scale is None else view.scaling / scale

    def __getattr__(self, name: str) -> Any:
        # read_through's order with the per-adapter values in between (and nn.Module's lookup tried once).
        try:
            return nn.Module.__getattr__(self, name)
        except AttributeError:
            if name == "base_layer":  # missing mid-__init__: no recursion
                raise
        adapters = self.__dict__.get("adapters", {})
        values = {n: a.__dict__[name] for n, a in adapters.items() if name in type(a).per_adapter and name in a.__dict__}
        if values:
            return values
        return getattr(self.base_layer, name)  # layer.weight, layer.in_features, ...


class ModulesToSave(nn.Module):
    """A module trained in full: frozen original plus one trainable copy per adapter name."""

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()  # adapter name -> trainable copy (peft's name)
        self.active_adapters: list[str] = []
        self.disabled = False
        self.row_adapters: Sequence[str] | None = None

    def add(self, name: str) -> None:
        clone = copy.deepcopy(self.original_module)
        for p in clone.parameters():
            p.requires_grad_(True)
        self.modules_to_save[name] = clone

    def remove(self, name: str) -> None:
        del self.modules_to_save[name]
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def __getattr__(self, name: str) -> Any:
        return read_through(self, name, "original_module")

    def _module_for(self, names: Sequence[str]) -> nn.Module:
        for name in names:
            if name in self.modules_to_save:
                return self.modules_to_save[name]
        return self.original_module

    def forward(self, x: torch.Tensor, *args, **kwargs):
        if self.disabled:
            return self.original_module(x, *args, **kwargs)
        if self.row_adapters is None:
            return self._module_for(self.active_adapters)(x, *args, **kwargs)
        groups = group_rows(self.row_adapters, x.device)
        parts = [(index, self._module_for([name])(x[index], *args, **kwargs)) for name, index in groups.items()]
        first = parts[0][1]
        result = first.new_empty((x.shape[0], *first.shape[1:]))
        for index, part in parts:
            result[index] = part
        return result


def iter_wrappers(model: nn.Module) -> Iterator[tuple[str, LayerWrapper | ModulesToSave]]:
    """All (module path, wrapper) pairs in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, (LayerWrapper, ModulesToSave)):
            yield name, module
