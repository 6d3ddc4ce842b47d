"""Layer surgery: methods whose adapters live inside the model's layers (LoRA, IA3, LoHa, ...).

The tuner is ``PeftModel.base_model``; its ``model`` is the user's model with some layers
replaced by :class:`~peftlab.layers.LayerWrapper` and heads by
:class:`~peftlab.layers.ModulesToSave`. Mixed batches (one adapter per row) are routed here.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from peftlab import limits, mixed_batch, quantization, surgery, targeting
from peftlab.errors import AdapterStateError, caller_stacklevel
from peftlab.layers import BASE_ROW, AdapterView, LayerWrapper, iter_wrappers
from peftlab.tuners.base import Tuner, check_modules_to_save, follow_active, wrapper_tensors, wrappers_disabled

if TYPE_CHECKING:
    from peftlab.config import PeftConfig
    from peftlab.registry import MethodSpec


class LayerTuner(Tuner):
    """Adapters injected into target layers, plus trained copies of heads (modules_to_save)."""

    def __init__(self, model: nn.Module, spec: MethodSpec) -> None:
        super().__init__(model)
        self.__dict__["_spec"] = spec  # plain attribute: a spec is data, not a module

    def add(self, adapter_name: str, config: "PeftConfig", active: str) -> None:
        with limits.regex_budget():  # targets, rank/alpha patterns, feedforward_modules: one time bound
            self._add(adapter_name, config, active)

    def _add(self, adapter_name: str, config: "PeftConfig", active: str) -> None:
        spec = self.__dict__["_spec"]
        names = targeting.find_targets(
            self.model,
            config.target_modules,
            exclude_modules=config.exclude_modules,
            layers_to_transform=config.layers_to_transform,
            layers_pattern=config.layers_pattern,
            skip=config.modules_to_save or (),
            method=type(config).__name__,
        )
        check_modules_to_save(self.model, config)
        surgery.inject_adapter(self.model, names, adapter_name, self.adapter_factory(config, adapter_name, names))
        if config.modules_to_save:
            surgery.wrap_modules_to_save(self.model, config.modules_to_save, adapter_name)
        if spec.after_add is not None:
            spec.after_add(self.model, config, adapter_name)
        # A wrapper created for the new adapter must still follow the model's active adapter.
        follow_active(self.model, active)

    def adapter_factory(self, config: "PeftConfig", adapter_name: str, names: list[str]) -> Callable[[nn.Module, str], AdapterView]:
        """(base layer, module path) -> the new adapter for it; a subclass may first build state all
        the adapter's layers share (VeRA's projections)."""
        spec = self.__dict__["_spec"]
        return lambda base, name: spec.make_adapter(base, config, adapter_name, name)

    def remove(self, adapter_name: str) -> None:
        surgery.remove_adapter(self.model, adapter_name)

    several_active = True

    def discard(self, adapter_name: str) -> None:
        surgery.remove_adapter(self.model, adapter_name, undo_install=True)

    def activate(self, adapter_name: str | Sequence[str]) -> None:
        follow_active(self.model, adapter_name)

    def _merged(self) -> bool:
        return any(isinstance(w, LayerWrapper) and w.merged_adapters for _, w in iter_wrappers(self.model))

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        if self._merged():
            raise AdapterStateError("adapters are merged into the base weights; call unmerge_adapter() before disable_adapter().")
        with wrappers_disabled(self.model):
            yield

    # ----- tensors ------------------------------------------------------------------------------
    def adapter_tensors(self, adapter_name: str, config: "PeftConfig") -> dict[str, torch.Tensor]:
        out = wrapper_tensors(self.model, adapter_name)
        extra = self.__dict__["_spec"].extra_tensors  # LoRA's trained biases
        if extra is not None:
            out.update(extra(self.model, config, adapter_name))
        return out

    # ----- merging ------------------------------------------------------------------------------
    def _layers(self) -> list[LayerWrapper]:
        return [w for _, w in iter_wrappers(self.model) if isinstance(w, LayerWrapper)]

    def merge(self, names: Sequence[str], configs: dict[str, "PeftConfig"], safe_merge: bool) -> None:
        layers = self._layers()
        for layer in layers:  # a refusal leaves every layer unmerged
            for name in names:
                if name in layer.adapters and name not in layer.merged_adapters:
                    layer.adapters[name].check_merge(layer.base_layer)
        if safe_merge:
            _check_merge_is_finite(layers, names)
        _untie_merged_weights(self.model, [l for l in layers if any(n in l.adapters and l.adapters[n].merge_unties_shared_weight for n in names)])
        for layer in layers:
            layer.merge_adapters(names)

    def unmerge(self) -> None:
        for layer in self._layers():
            layer.unmerge()

    def unload(self, merge: bool, names: Sequence[str], configs: dict[str, "PeftConfig"], safe_merge: bool = False) -> nn.Module:
        if merge:
            self.merge(names, configs, safe_merge)
        return surgery.unload(self.model, merge=merge, adapter_names=names if merge else None)

    # ----- mixed batches ------------------------------------------------------------------------
    def forward(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        if adapter_names is None:
            return self.model(*args, **kwargs)
        names = list(adapter_names)
        order = mixed_batch.grouping_order(names)
        permuted = None
        if order is not None and mixed_batch.safe_to_reorder(self.model, kwargs):
            permuted = mixed_batch.permute_inputs(args, kwargs, order, len(names))
        if permuted is not None:
            # Rows interleaved across adapters: run them grouped by adapter (each layer then works
            # on one contiguous slice per adapter) and hand the outputs back in the caller's order.
            sorted_args, sorted_kwargs = permuted
            with self.rows_routed([names[i] for i in order]):
                output = self.model(*sorted_args, **sorted_kwargs)
            restored = mixed_batch.restore_output(output, order)
            if restored is not None:
                return restored
            # Something in the output is not a batch-first tensor: run again in the caller's order.
        with self.rows_routed(names):
            return self.model(*args, **kwargs)

    def generate(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        if adapter_names is None:
            return self.model.generate(*args, **kwargs)
        # generate() repeats each row for beams / returned sequences; repeat the names alike.
        beams = int(kwargs.get("num_beams") or 1)
        repeat = beams if beams > 1 else int(kwargs.get("num_return_sequences") or 1)
        rows = [name for name in adapter_names for _ in range(repeat)]
        with self.rows_routed(rows):
            return self.model.generate(*args, **kwargs)

    @contextlib.contextmanager
    def rows_routed(self, names: list[str]) -> Iterator[None]:
        """Each wrapper sends row i through adapter ``names[i]`` (``__base__``: none) inside the block."""
        if self._merged():
            raise AdapterStateError("mixed-batch inference needs unmerged adapters; call unmerge_adapter() first.")
        wrappers = [w for _, w in iter_wrappers(self.model)]
        for wrapper in wrappers:
            wrapper.row_adapters = names
        try:
            yield
        finally:
            for wrapper in wrappers:
                wrapper.row_adapters = None


def known_rows(names: Sequence[str], known: Sequence[str]) -> None:
    """Refuse adapter_names entries that name no adapter."""
    unknown = sorted({n for n in names if n != BASE_ROW and n not in known})
    if unknown:
        raise AdapterStateError(f"adapter_names mentions unknown adapters {unknown}; known: {sorted(known)} and {BASE_ROW!r}.")


def _untie_merged_weights(model: nn.Module, layers: list[LayerWrapper]) -> None:
    """Give a layer its own weight before merging when the weight is shared (tied embeddings).

    Merging into a weight tied to the output head would change the head too, which the
    unmerged adapter never did.
    """
    counts: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        counts[id(param)] = counts.get(id(param), 0) + 1
    for layer in layers:
        weight = getattr(layer.base_layer, "weight", None)
        if isinstance(weight, nn.Parameter) and counts.get(id(weight), 0) > 1:
            warnings.warn(
                f"{type(layer.base_layer).__name__} weight is tied to another module; giving it its own copy "
                f"before merging so the tied module keeps its weights.",
                stacklevel=caller_stacklevel(),
            )
            layer.base_layer.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)


def _check_merge_is_finite(layers: list[LayerWrapper], names: Sequence[str]) -> None:
    """Merge into copies first and refuse if any resulting weight is NaN or inf."""
    for layer in layers:
        live = [n for n in names if n in layer.adapters and n not in layer.merged_adapters]
        if not live:
            continue
        trial = copy.deepcopy(layer.base_layer)
        for name in live:
            layer.adapters[name].merge_into(trial)
        if any(not torch.isfinite(p).all() for p in trial.parameters() if p.is_floating_point()):
            raise AdapterStateError(
                f"merging adapters {live} would write NaN/inf into {type(layer.base_layer).__name__} weights; "
                f"the adapter is broken (diverged training?). Nothing was merged."
            )


def merge_and_unload_quantized(peft_model: Any, names: list[str], safe_merge: bool, requantize_after: bool) -> nn.Module:
    """``PeftModel.merge_and_unload`` for a quantized base.

    Default: every quantized layer becomes fp32, the adapters are merged exactly, and a
    plain full-precision model comes back. With ``requantize_after`` the merged layers are
    packed again; this is lossy and can erase a small adapter (its update is often smaller
    than one step of the 4-bit grid), so a warning reports how much of the update survived.
    """
    base = peft_model.get_base_model()
    if not requantize_after:
        quantization.dequantize_model(base)
        peft_model.merge_adapter(names, safe_merge=safe_merge)
        return surgery.unload(base, merge=True, adapter_names=names)
    adapted = {n: w for n, w in iter_wrappers(base) if isinstance(w, LayerWrapper) and quantization.is_quantized_linear(w.base_layer)}
    before = {n: quantization.dequantize_weight(w.base_layer) for n, w in adapted.items()}
    specs = {f"{n}.base_layer": quantization.spec_of(w.base_layer) for n, w in adapted.items()}
    for wrapper in adapted.values():
        wrapper.base_layer = quantization.dequantize_linear(wrapper.base_layer)
    peft_model.merge_adapter(names, safe_merge=safe_merge)
    merged = {n: w.base_layer.weight.detach().clone() for n, w in adapted.items()}
    quantization.requantize(base, specs)
    kept = _update_kept(base, adapted, before, merged)
    model = surgery.unload(base, merge=True, adapter_names=names)
    if kept:
        warnings.warn(
            f"merge_and_unload(requantize=True): re-quantizing the merged weights changes the adapter's update "
            f"by {100 * max(kept.values()):.0f}% at worst and {100 * sum(kept.values()) / len(kept):.0f}% on average "
            f"(||Q(W+dW) - Q(W) - dW|| / ||dW|| over {len(kept)} layers); merge without requantize to keep it exact.",
            stacklevel=3,
        )
    model.peftlab_requantize_error = kept  # type: ignore[assignment]
    return model


def _update_kept(base: nn.Module, adapted: dict[str, Any], before: dict[str, torch.Tensor], merged: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per layer: how far the update the requantized model applies is from the adapter's update."""
    errors: dict[str, float] = {}
    for name, wrapper in adapted.items():
        delta = merged[name] - before[name]
        norm = float(delta.norm())
        if norm == 0.0 or not math.isfinite(norm):
            continue
        applied = quantization.dequantize_weight(wrapper.base_layer) - before[name]
        errors[name] = float((applied - delta).norm()) / norm
    return errors
