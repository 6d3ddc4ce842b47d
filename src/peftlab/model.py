"""PeftModel: the user-facing wrapper around a model with adapters.

It owns the adapter configs, decides which parameters train, and routes merge, disable,
mixed-batch and save/load requests to the wrapped layers. The forward pass is the base
model's own; the adapters live inside its layers.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import types
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from peftlab import activation_checkpointing, causal_loss, checkpoint, quantization, regroup, surgery, targeting
from peftlab.config import CLASSIFIER_HEAD_NAMES, PeftConfig
from peftlab.errors import AdapterStateError, PeftConfigError, TargetModuleError
from peftlab.layers import BASE_ROW, AdaptedLayer, ModulesToSave, iter_wrappers
from peftlab.registry import ModelTuner, method_for


class PeftModel(nn.Module):
    """A model whose chosen layers carry adapters.

    Build one with :func:`peftlab.get_peft_model` or :meth:`PeftModel.from_pretrained`.
    Attribute access falls through to the wrapped model (``config``, ``generate``, ...).
    """

    #: In training mode with ``labels``, supported causal LMs compute the loss in chunks without
    #: full-vocabulary logits (``outputs.logits`` is then None); False gives the stock output.
    #: See :mod:`peftlab.causal_loss`.
    chunked_causal_loss: bool = True

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default") -> None:
        super().__init__()
        self.base_model = model
        self.peft_config: dict[str, PeftConfig] = {}
        self.active_adapter: str = adapter_name
        # Model-level adapters of prompt methods (virtual tokens), by adapter name; empty otherwise.
        self.prompt_encoder = nn.ModuleDict()
        self._prompts_disabled = False
        # Whole-model state of a method that does no surgery (selective tuning); else None.
        self._tuner: ModelTuner | None = None
        self._add(adapter_name, peft_config)
        self._mark_trainable()
        self._expose_base_signature()

    # ----- construction -----------------------------------------------------------------------
    def _resolved(self, config: PeftConfig) -> PeftConfig:
        """A copy of ``config`` with model-dependent defaults filled in."""
        spec = method_for(config.peft_type)
        config = copy.deepcopy(config)
        if getattr(config, "target_modules", "") is None and spec.default_targets_for is not None:
            config.target_modules = spec.default_targets_for(config, self.base_model)
        elif getattr(config, "target_modules", "") is None:
            config.target_modules = targeting.default_target_modules(
                self.base_model, spec.default_targets, type(config).__name__
            )
        if spec.resolve_config is not None:
            config = spec.resolve_config(config, self.base_model)
        heads = [h for h in CLASSIFIER_HEAD_NAMES.get(config.task_type, ()) if _has_module(self.base_model, h)]
        if heads:
            config.modules_to_save = list(dict.fromkeys([*(config.modules_to_save or []), *heads]))
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = getattr(getattr(self.base_model, "config", None), "_name_or_path", None) or None
        return config

    def _add(self, adapter_name: str, config: PeftConfig) -> None:
        if not isinstance(config, PeftConfig):
            raise PeftConfigError(f"expected a peftlab config (e.g. LoraConfig), got {type(config).__name__}.")
        if not adapter_name or "." in adapter_name or adapter_name == BASE_ROW:
            raise AdapterStateError(f"invalid adapter name {adapter_name!r}: use a non-empty name without dots, not {BASE_ROW!r}.")
        if adapter_name in self.peft_config:
            raise AdapterStateError(f"an adapter named {adapter_name!r} exists already; pick another name or delete it first.")
        if any(not isinstance(c, type(config)) and not isinstance(config, type(c)) for c in self.peft_config.values()):
            raise AdapterStateError(
                f"this model holds {type(next(iter(self.peft_config.values()))).__name__} adapters; "
                f"adapters of different methods cannot share one PeftModel."
            )
        spec = method_for(config.peft_type)
        config = self._resolved(config)
        if spec.make_tuner is not None:  # no surgery: the tuner only records and swaps tensor values
            tuner = self._tuner if self._tuner is not None else spec.make_tuner(self.base_model)
            tuner.add(adapter_name, config)
            self._tuner = tuner
            self.peft_config[adapter_name] = config
            return
        names = [] if spec.make_model_adapter is not None else targeting.find_targets(
            self.base_model,
            config.target_modules,
            exclude_modules=config.exclude_modules,
            layers_to_transform=config.layers_to_transform,
            layers_pattern=config.layers_pattern,
            skip=config.modules_to_save or (),
            method=type(config).__name__,
        )
        user_heads = [
            h
            for h in (config.modules_to_save or [])
            if h not in CLASSIFIER_HEAD_NAMES.get(config.task_type, ()) and not _has_module(self.base_model, h)
        ]
        if user_heads:
            raise TargetModuleError(
                f"modules_to_save {user_heads} match no module in {type(self.base_model).__name__}; "
                f"top-level modules are: {[n for n, _ in self.base_model.named_children()]}."
            )
        if spec.make_model_adapter is not None:
            self.prompt_encoder[adapter_name] = spec.make_model_adapter(self.base_model, config)
        else:
            surgery.inject_adapter(
                self.base_model, names, adapter_name, lambda base, name: spec.make_adapter(base, config, adapter_name, name)
            )
        if config.modules_to_save:
            surgery.wrap_modules_to_save(self.base_model, config.modules_to_save, adapter_name)
        self.peft_config[adapter_name] = config
        # A wrapper created for the new adapter must still follow the model's active adapter.
        for _, wrapper in iter_wrappers(self.base_model):
            wrapper.active_adapters = [self.active_adapter]

    def _expose_base_signature(self) -> None:
        """Make ``inspect.signature(self.forward)`` show the base model's arguments.

        The HF Trainer drops dataset columns that the model's forward does not name; with a
        bare ``*args, **kwargs`` signature it would drop them all.
        """
        base_forward = getattr(type(self.base_model), "forward", None)
        if base_forward is None:
            return

        def forward(self: PeftModel, *args: Any, **kwargs: Any) -> Any:
            return PeftModel.forward(self, *args, **kwargs)

        functools.update_wrapper(forward, base_forward)
        self.forward = types.MethodType(forward, self)

    # ----- trainable parameters -------------------------------------------------------------
    def _mark_trainable(self) -> None:
        """Freeze everything, then unfreeze the active adapter (unless loaded for inference)."""
        for param in [*self.base_model.parameters(), *self.prompt_encoder.parameters()]:
            param.requires_grad_(False)
        config = self.peft_config[self.active_adapter]
        if config.inference_mode:
            return
        if self.active_adapter in self.prompt_encoder:
            self.prompt_encoder[self.active_adapter].requires_grad_(True)
        for tensor in checkpoint.adapter_tensors(self.base_model, config, self.active_adapter).values():
            if isinstance(tensor, nn.Parameter) and tensor.is_floating_point():
                tensor.requires_grad_(True)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts; 4-bit packed weights count as two values per byte."""
        trainable = total = 0
        for param in self.parameters():
            n = param.numel()
            if param.__class__.__name__ == "Params4bit":
                n *= 2
            total += n
            if param.requires_grad:
                trainable += n
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # ----- forward / generate -----------------------------------------------------------------
    def forward(self, *args: Any, labels: Any = None, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """Run the base model; ``adapter_names`` (one per row, ``"__base__"`` for none) mixes adapters."""
        if labels is not None:
            kwargs["labels"] = labels
        prompt = self._active_prompt(adapter_names)
        if prompt is not None:
            return self.base_model(**prompt.forward_kwargs(self.base_model, _named_inputs(self.base_model, args, kwargs)))
        if adapter_names is None:
            if labels is not None and self.chunked_causal_loss and causal_loss.applies(self.get_base_model(), labels, kwargs):
                del kwargs["labels"]
                return causal_loss.chunked_forward(self.get_base_model(), labels, args, kwargs, call=self.base_model)
            return self.base_model(*args, **kwargs)
        names = list(adapter_names)
        order = regroup.grouping_order(names)
        permuted = None
        if order is not None and regroup.safe_to_reorder(self.base_model, kwargs):
            permuted = regroup.permute_inputs(args, kwargs, order, len(names))
        if permuted is not None:
            # Rows interleaved across adapters: run them grouped by adapter (each layer then works
            # on one contiguous slice per adapter) and hand the outputs back in the caller's order.
            sorted_args, sorted_kwargs = permuted
            with self._rows_routed([names[i] for i in order]):
                output = self.base_model(*sorted_args, **sorted_kwargs)
            restored = regroup.restore_output(output, order)
            if restored is not None:
                return restored
            # Something in the output is not a batch-first tensor: run again in the caller's order.
        with self._rows_routed(names):
            return self.base_model(*args, **kwargs)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict[str, Any] | None = None,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        """Recompute the base model's blocks (and their adapters) in backward; see :mod:`peftlab.activation_checkpointing`."""
        activation_checkpointing.enable(self.get_base_model(), activation_checkpointing_kwargs, every_n_layers, offload)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        """The older name of :meth:`activation_checkpointing_enable` (transformers and peft still call it)."""
        activation_checkpointing.enable(self.get_base_model(), gradient_checkpointing_kwargs, **kwargs)

    def generate(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        prompt = self._active_prompt(adapter_names)
        if prompt is not None:
            if len(args) > 1:
                raise AdapterStateError("generate() takes one positional input (input_ids); pass the rest by name.")
            named = {"input_ids": args[0], **kwargs} if args else dict(kwargs)
            return self.base_model.generate(**prompt.generate_kwargs(self.base_model, named))
        if adapter_names is None:
            return self.base_model.generate(*args, **kwargs)
        # generate() repeats each row for beams / returned sequences; repeat the names alike.
        beams = int(kwargs.get("num_beams") or 1)
        repeat = beams if beams > 1 else int(kwargs.get("num_return_sequences") or 1)
        rows = [name for name in adapter_names for _ in range(repeat)]
        with self._rows_routed(rows):
            return self.base_model.generate(*args, **kwargs)

    def _active_prompt(self, adapter_names: Sequence[str] | None) -> nn.Module | None:
        """The active prompt method's module, or None (layer methods, or inside disable_adapter())."""
        if self.active_adapter not in self.prompt_encoder or self._prompts_disabled:
            return None
        if adapter_names is not None:
            raise AdapterStateError("mixed-batch adapter_names is not supported for prompt methods; run one adapter per batch.")
        return self.prompt_encoder[self.active_adapter]

    @contextlib.contextmanager
    def _rows_routed(self, adapter_names: Sequence[str]) -> Iterator[None]:
        names = list(adapter_names)
        unknown = sorted({n for n in names if n != BASE_ROW and n not in self.peft_config})
        if unknown:
            raise AdapterStateError(f"adapter_names mentions unknown adapters {unknown}; known: {sorted(self.peft_config)} and {BASE_ROW!r}.")
        if any(isinstance(w, AdaptedLayer) and w.merged_adapters for _, w in iter_wrappers(self.base_model)):
            raise AdapterStateError("mixed-batch inference needs unmerged adapters; call unmerge_adapter() first.")
        if self._tuner is not None:
            raise AdapterStateError(
                f"{type(self.peft_config[self.active_adapter]).__name__} changes the model's own weights, so one "
                f"forward pass can use only one adapter; run each adapter's rows separately after set_adapter()."
            )
        wrappers = [w for _, w in iter_wrappers(self.base_model)]
        for wrapper in wrappers:
            wrapper.row_adapters = names
        try:
            yield
        finally:
            for wrapper in wrappers:
                wrapper.row_adapters = None

    # ----- adapter management -----------------------------------------------------------------
    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter]

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig) -> None:
        """Add another adapter (not active until :meth:`set_adapter`)."""
        self._add(adapter_name, peft_config)
        self._mark_trainable()

    def set_adapter(self, adapter_name: str) -> None:
        """Make ``adapter_name`` the one used in forward and trained."""
        if adapter_name not in self.peft_config:
            raise AdapterStateError(f"no adapter named {adapter_name!r}; known: {sorted(self.peft_config)}.")
        for _, wrapper in iter_wrappers(self.base_model):
            wrapper.active_adapters = [adapter_name]
        if self._tuner is not None:
            self._tuner.activate(adapter_name)
        self.active_adapter = adapter_name
        self._mark_trainable()

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise AdapterStateError(f"no adapter named {adapter_name!r}; known: {sorted(self.peft_config)}.")
        if len(self.peft_config) == 1:
            raise AdapterStateError("cannot delete the only adapter; use unload() to get the base model back.")
        surgery.remove_adapter(self.base_model, adapter_name)
        if adapter_name in self.prompt_encoder:
            del self.prompt_encoder[adapter_name]
        if self._tuner is not None:
            self._tuner.remove(adapter_name)
        del self.peft_config[adapter_name]
        if self.active_adapter == adapter_name:
            self.set_adapter(next(iter(self.peft_config)))

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Inside the block the model behaves as the base model."""
        if any(isinstance(w, AdaptedLayer) and w.merged_adapters for _, w in iter_wrappers(self.base_model)):
            raise AdapterStateError("adapters are merged into the base weights; call unmerge_adapter() before disable_adapter().")
        wrappers = [w for _, w in iter_wrappers(self.base_model)]
        for wrapper in wrappers:
            wrapper.disabled = True
        self._prompts_disabled = True
        try:
            with self._tuner.disabled() if self._tuner is not None else contextlib.nullcontext():
                yield
        finally:
            self._prompts_disabled = False
            for wrapper in wrappers:
                wrapper.disabled = False

    # ----- merging ----------------------------------------------------------------------------
    def _check_names(self, adapter_names: Sequence[str] | None) -> list[str]:
        names = list(adapter_names) if adapter_names is not None else self.active_adapters
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise AdapterStateError(f"unknown adapters {unknown}; known: {sorted(self.peft_config)}.")
        return names

    def merge_adapter(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        """Fold adapters into the base weights (undo with :meth:`unmerge_adapter`)."""
        names = self._check_names(adapter_names)
        prompts = [n for n in names if n in self.prompt_encoder]
        if prompts:
            raise AdapterStateError(
                f"adapters {prompts} use {type(self.peft_config[prompts[0]]).__name__}, a prompt method: its virtual "
                f"tokens are extra inputs, not a weight update, so they cannot be merged. Keep the PeftModel for inference."
            )
        layers = [w for _, w in iter_wrappers(self.base_model) if isinstance(w, AdaptedLayer)]
        if safe_merge:
            _check_merge_is_finite(layers, names)
        _untie_merged_weights(self.base_model, [l for l in layers if any(n in l.adapters for n in names)])
        for layer in layers:
            layer.merge(names)

    def unmerge_adapter(self) -> None:
        for _, wrapper in iter_wrappers(self.base_model):
            if isinstance(wrapper, AdaptedLayer):
                wrapper.unmerge()

    def merge_and_unload(
        self, safe_merge: bool = False, adapter_names: Sequence[str] | None = None, requantize: bool = False
    ) -> nn.Module:
        """Merge the adapters into the base weights and return the plain base model.

        A 4-/8-bit base comes back dequantized (fp32, exact merge) unless ``requantize=True``
        (lossy; see :func:`peftlab.quantization.merge_and_unload_quantized`).
        """
        names = self._check_names(adapter_names)
        if quantization.is_quantized_model(self.base_model):
            return quantization.merge_and_unload_quantized(self, names, safe_merge, requantize)
        self.merge_adapter(names, safe_merge=safe_merge)
        if self._tuner is not None:
            if len(names) != 1:
                raise AdapterStateError(
                    f"{type(self.peft_config[names[0]]).__name__} adapters replace weight values, so they cannot be "
                    f"combined; merge exactly one adapter (got {names})."
                )
            self._tuner.finish(keep=names[0])
            self._tuner = None
        return surgery.unload(self.base_model, merge=True, adapter_names=names)

    def unload(self) -> nn.Module:
        """Return the base model without adapters and with its original weights."""
        self.unmerge_adapter()
        if self._tuner is not None:
            self._tuner.finish(keep=None)
            self._tuner = None
        return surgery.unload(self.base_model, merge=False)

    def get_base_model(self) -> nn.Module:
        return self.base_model

    # ----- save / load ------------------------------------------------------------------------
    def save_pretrained(
        self, save_directory: str | os.PathLike, selected_adapters: Sequence[str] | None = None, **_: Any
    ) -> None:
        """Write each adapter as peft does: "default" in the folder, others in sub-folders."""
        if os.path.isfile(save_directory):
            raise AdapterStateError(f"{save_directory} is a file; save_pretrained needs a folder path.")
        names = self._check_names(selected_adapters if selected_adapters is not None else list(self.peft_config))
        for name in names:
            folder = os.path.join(os.fspath(save_directory), name) if name != "default" else os.fspath(save_directory)
            config = copy.deepcopy(self.peft_config[name])
            config.inference_mode = True
            checkpoint.save_adapter_weights(folder, get_peft_model_state_dict(self, adapter_name=name))
            config.save_pretrained(folder)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        subfolder: str | None = None,
        allow_pickle: bool = False,
    ) -> "PeftModel":
        """Wrap ``model`` and load a saved adapter; the model is left untouched on any error."""
        config = copy.deepcopy(config) if config is not None else PeftConfig.from_pretrained(model_id, subfolder=subfolder)
        config.inference_mode = not is_trainable
        weights = checkpoint.load_adapter_weights(model_id, subfolder=subfolder, allow_pickle=allow_pickle)
        flags = {p: p.requires_grad for p in model.parameters()}
        peft_model = None
        try:
            peft_model = cls(model, config, adapter_name)
            set_peft_model_state_dict(peft_model, weights, adapter_name)
        except Exception:
            if peft_model is not None and peft_model._tuner is not None:
                peft_model._tuner.finish(keep=None)
            surgery.unload(model, merge=False)
            for param, flag in flags.items():
                param.requires_grad_(flag)
            raise
        return peft_model

    def load_adapter(
        self,
        model_id: str | os.PathLike,
        adapter_name: str,
        is_trainable: bool = False,
        subfolder: str | None = None,
        allow_pickle: bool = False,
    ) -> None:
        """Load a saved adapter next to the existing ones under ``adapter_name``."""
        config = PeftConfig.from_pretrained(model_id, subfolder=subfolder)
        config.inference_mode = not is_trainable
        weights = checkpoint.load_adapter_weights(model_id, subfolder=subfolder, allow_pickle=allow_pickle)
        self._add(adapter_name, config)
        try:
            set_peft_model_state_dict(self, weights, adapter_name)
        except Exception:
            surgery.remove_adapter(self.base_model, adapter_name)
            if adapter_name in self.prompt_encoder:
                del self.prompt_encoder[adapter_name]
            if self._tuner is not None:
                self._tuner.remove(adapter_name)
            del self.peft_config[adapter_name]
            raise
        self._mark_trainable()

    # ----- attribute fall-through ---------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)


def _named_inputs(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Positional inputs given names from the base model's forward signature (prompt methods rewrite them by name)."""
    if not args:
        return dict(kwargs)
    import inspect

    params = [p for p in inspect.signature(model.forward).parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(args) > len(params):
        raise AdapterStateError(f"{len(args)} positional inputs but {type(model).__name__}.forward names only {len(params)}; pass them by name.")
    return {**dict(zip((p.name for p in params), args)), **kwargs}


def _has_module(model: nn.Module, name: str) -> bool:
    return any(n == name or n.endswith("." + name) for n, _ in model.named_modules())


def _untie_merged_weights(model: nn.Module, layers: list[AdaptedLayer]) -> None:
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
                stacklevel=3,
            )
            layer.base_layer.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)


def _check_merge_is_finite(layers: list[AdaptedLayer], names: Sequence[str]) -> None:
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


def get_peft_model_state_dict(model: PeftModel, state_dict: Any = None, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    return checkpoint.get_peft_model_state_dict(model, state_dict, adapter_name)


def set_peft_model_state_dict(model: PeftModel, peft_model_state_dict: Any, adapter_name: str = "default") -> None:
    checkpoint.set_peft_model_state_dict(model, peft_model_state_dict, adapter_name)


def get_peft_model(model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default") -> PeftModel:
    """Wrap ``model`` with a new adapter built from ``peft_config``; the base weights are frozen."""
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        return PeftModel(model, peft_config, adapter_name)
    except Exception:
        surgery.unload(model, merge=False)
        for param, flag in flags.items():
            param.requires_grad_(flag)
        raise
