"""PeftModel: the user-facing wrapper around a model with adapters.

It owns the adapter configs and the active adapter's name, checks requests, and hands the
model-side work to its tuner (:mod:`peftlab.tuners`): layer surgery, prompt learning or
selective tuning. The module tree is peft's: for layer and selective methods ``base_model`` is
the tuner and ``base_model.model`` the user's model; for prompt methods ``base_model`` is the
user's model, beside ``prompt_encoder.<adapter>`` and ``word_embeddings``.
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

from peftlab import activation_checkpointing, adapter_folder, causal_loss, checkpoint, limits, quantization, targeting
from peftlab.config import CLASSIFIER_HEAD_NAMES, PeftConfig, TaskType
from peftlab.errors import AdapterStateError, PeftConfigError, QuantizationError, caller_stacklevel
from peftlab.integrations.trainers import enable_when_used
from peftlab.layers import BASE_ROW, LayerWrapper, read_through
from peftlab.model_surface import PeftModelSurface
from peftlab.registry import method_for
from peftlab.tuners import PromptTuner, Tuner, tuner_for
from peftlab.tuners.base import has_module
from peftlab.tuners.layer import known_rows, merge_and_unload_quantized


class PeftModel(PeftModelSurface, nn.Module):
    """A model whose chosen layers carry adapters.

    Build one with :func:`peftlab.get_peft_model` or :meth:`PeftModel.from_pretrained`.
    Attribute access falls through to the wrapped model (``config``, ``generate``, ...).
    """

    #: True asks for the chunked causal-LM loss: in training mode with ``labels``, supported causal
    #: LMs then compute the loss in chunks without full-vocabulary logits (``outputs.logits`` is
    #: None, far less memory). Off by default, so a forward returns what peft's returns (trl and
    #: user code read ``outputs.logits``); the workbench turns it on. See :mod:`peftlab.causal_loss`.
    chunked_causal_loss: bool = False

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default") -> None:
        super().__init__()
        self.peft_config: dict[str, PeftConfig] = {}
        #: Per adapter, task heads trained and saved although its config did not name them (checkpoint
        #: loading lets their tensors be absent: such a head then keeps the base model's weights).
        self.optional_heads: dict[str, list[str]] = {}
        self.active_adapter: str = adapter_name
        #: Adapters active beside ``active_adapter`` (set_adapter([...]) on a layer method; as in peft).
        self.also_active: list[str] = []
        if not isinstance(peft_config, PeftConfig):
            raise PeftConfigError(f"expected a peftlab config (e.g. LoraConfig), got {type(peft_config).__name__}.")
        tuner = tuner_for(model, method_for(peft_config.peft_type))
        self.__dict__["_tuner"] = tuner  # also registered below, under peft's names
        tuner.bind_owner(self)  # model.base_model.set_adapter(...) & co. come back here
        if isinstance(tuner, PromptTuner):
            self.base_model = model
            self.prompt_encoder = tuner.prompt_encoder
        else:
            self.base_model = tuner
        self._add_adapter(adapter_name, peft_config)
        if isinstance(tuner, PromptTuner):
            # peft registers the input embeddings here too (state_dict key ``word_embeddings.weight``).
            self.word_embeddings = model.get_input_embeddings()
        self._expose_base_signature()
        enable_when_used()  # transformers' Trainer and trl treat this model as a peft model (integrations/trainers.py)

    @property
    def tuner(self) -> Tuner:
        """The model-side half: adapters in layers, virtual tokens, or swapped tensor values."""
        return self.__dict__["_tuner"]

    # ----- construction -----------------------------------------------------------------------
    def _resolved(self, config: PeftConfig) -> tuple[PeftConfig, list[str]]:
        """A copy of ``config`` with model-dependent defaults filled in, and the task heads it added.

        Heads the config did not name (e.g. pre_classifier in an adapter saved before peft 0.22
        trained it) may be missing from a saved file: they then keep the base weights, as in peft.
        """
        model = self.get_base_model()
        spec = method_for(config.peft_type)
        if not spec.supports_quantized and quantization.is_quantized_model(model):
            raise QuantizationError(
                f"{type(config).__name__}: this method does not work on a 4-/8-bit quantized base; "
                f"load the model in full precision or use a method that does (e.g. LoRA)."
            )
        config = copy.deepcopy(config)
        if getattr(config, "target_modules", "") is None and spec.default_targets_for is not None:
            config.target_modules = spec.default_targets_for(config, model)
        elif getattr(config, "target_modules", "") is None:
            config.target_modules = targeting.default_target_modules(model, spec.default_targets, type(config).__name__)
        if spec.resolve_config is not None:
            config = spec.resolve_config(config, model)
        heads = [h for h in CLASSIFIER_HEAD_NAMES.get(config.task_type, ()) if has_module(model, h)]
        added = [h for h in heads if h not in (config.modules_to_save or [])]
        if heads:
            config.modules_to_save = list(dict.fromkeys([*(config.modules_to_save or []), *heads]))
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
        return config, added

    def _check_new(self, adapter_name: str, config: PeftConfig) -> None:
        if not isinstance(config, PeftConfig):
            raise PeftConfigError(f"expected a peftlab config (e.g. LoraConfig), got {type(config).__name__}.")
        limits.check_adapter_name(adapter_name, reserved=(BASE_ROW,))
        if adapter_name in self.peft_config:
            raise AdapterStateError(f"an adapter named {adapter_name!r} exists already; pick another name or delete it first.")
        if any(not isinstance(c, type(config)) and not isinstance(config, type(c)) for c in self.peft_config.values()):
            raise AdapterStateError(
                f"this model holds {type(next(iter(self.peft_config.values()))).__name__} adapters; "
                f"adapters of different methods cannot share one PeftModel."
            )

    def _add_adapter(self, adapter_name: str, config: PeftConfig, weights: Any = None) -> None:
        """Add an adapter (and load ``weights`` into it); on any error the model is as before.

        This is the one rollback path: the tuner removes whatever part of the adapter was built
        and every parameter gets back its ``requires_grad``.
        """
        self._check_new(adapter_name, config)
        flags = {p: p.requires_grad for p in self.get_base_model().parameters()}
        try:
            resolved, added_heads = self._resolved(config)
            self.tuner.add(adapter_name, resolved, self.active_adapter)
            if self.also_active:  # wrappers built for the new adapter follow every active adapter
                self.tuner.activate(self.active_adapters)
            self.peft_config[adapter_name] = resolved
            self.optional_heads[adapter_name] = added_heads
            if weights is not None:
                set_peft_model_state_dict(self, weights, adapter_name)
            self._mark_trainable()
            quantization.keep_portable_layout(self.get_base_model())  # 4-bit bases stay trainable after an eval
        except BaseException:
            self._rollback(adapter_name, flags)
            raise

    def _rollback(self, adapter_name: str, flags: dict[nn.Parameter, bool]) -> None:
        """Remove every part of ``adapter_name`` that exists and restore ``requires_grad`` flags."""
        self.tuner.discard(adapter_name)
        self.peft_config.pop(adapter_name, None)
        self.optional_heads.pop(adapter_name, None)
        self.also_active = [n for n in self.also_active if n in self.peft_config]
        if self.peft_config and self.active_adapter not in self.peft_config:
            self.active_adapter = next(iter(self.peft_config))
        for param, flag in flags.items():
            param.requires_grad_(flag)

    def _expose_base_signature(self) -> None:
        """Make ``inspect.signature(self.forward)`` show the base model's arguments.

        The HF Trainer drops dataset columns that the model's forward does not name; with a
        bare ``*args, **kwargs`` signature it would drop them all.
        """
        base_forward = getattr(type(self.get_base_model()), "forward", None)
        if base_forward is None:
            return

        def forward(self: PeftModel, *args: Any, **kwargs: Any) -> Any:
            return PeftModel.forward(self, *args, **kwargs)

        functools.update_wrapper(forward, base_forward)
        self.forward = types.MethodType(forward, self)

    # ----- trainable parameters -------------------------------------------------------------
    def _mark_trainable(self) -> None:
        """Freeze everything, then unfreeze the active adapters (those not loaded for inference)."""
        self.tuner.mark_trainable(self.active_adapter, self.peft_config[self.active_adapter])
        for name in self.also_active:
            if not self.peft_config[name].inference_mode:
                self.tuner.set_adapter_trainable(name, self.peft_config[name], True)

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
        if adapter_names is not None:
            known_rows(adapter_names, list(self.peft_config))
        elif (labels is not None and self.chunked_causal_loss and not isinstance(self.tuner, PromptTuner)
              and causal_loss.applies(self.get_base_model(), labels, kwargs)):
            # (prompt methods prepend virtual tokens and pad the labels to match: stock loss for them)
            del kwargs["labels"]
            return causal_loss.chunked_forward(self.get_base_model(), labels, args, kwargs, call=self.tuner)
        return self.tuner(*args, adapter_names=adapter_names, **kwargs)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict[str, Any] | None = None,
                                        every_n_layers: int = 1, offload: bool = False,
                                        keep_narrow_outputs: bool = True) -> None:
        """Recompute the base model's blocks (and their adapters) in backward; see :mod:`peftlab.activation_checkpointing`."""
        activation_checkpointing.enable(self.get_base_model(), activation_checkpointing_kwargs, every_n_layers, offload,
                                        keep_narrow_outputs)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        """The older name of :meth:`activation_checkpointing_enable` (transformers and peft still call it)."""
        activation_checkpointing.enable(self.get_base_model(), gradient_checkpointing_kwargs, **kwargs)

    def generate(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        if adapter_names is not None:
            known_rows(adapter_names, list(self.peft_config))
        return self.tuner.generate(*args, adapter_names=adapter_names, **kwargs)

    # ----- adapter management -----------------------------------------------------------------
    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter, *self.also_active]

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig) -> None:
        """Add another adapter (not active until :meth:`set_adapter`)."""
        self._add_adapter(adapter_name, peft_config)

    def set_adapter(self, adapter_name: str | Sequence[str], inference_mode: bool = False) -> None:
        """Make ``adapter_name`` the one used in forward, and trainable unless ``inference_mode`` (as peft).

        An adapter loaded with ``is_trainable=False`` becomes trainable here, as in peft. A list of
        names activates several adapters of a layer method at once: their updates add up in
        forward (as ``model.base_model.set_adapter([...])`` in peft) and all of them train.
        """
        names = [adapter_name] if isinstance(adapter_name, str) else list(dict.fromkeys(adapter_name))
        if not names:
            raise AdapterStateError("set_adapter needs at least one adapter name.")
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise AdapterStateError(f"no adapter named {unknown[0]!r}; known: {sorted(self.peft_config)}.")
        if len(names) > 1 and not self.tuner.several_active:
            raise AdapterStateError(
                f"{type(self.peft_config[names[0]]).__name__} activates one adapter at a time (got {names}); "
                f"pass adapter_names=[...] per row for a mixed batch, or use a layer method such as LoRA."
            )
        self.tuner.activate(names if len(names) > 1 else names[0])
        self.active_adapter, self.also_active = names[0], names[1:]
        for name in names:
            self.peft_config[name].inference_mode = inference_mode
        self._mark_trainable()

    def add_weighted_adapter(self, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                             combination_type: str = "svd", svd_rank: int | None = None, svd_clamp: float | None = None,
                             svd_full_matrices: bool = True, svd_driver: str | None = None, density: float | None = None,
                             majority_sign_method: str = "total") -> None:
        """A new LoRA adapter from weighted existing ones: "linear", "cat", "svd", "ties", "dare_linear", "dare_ties",
        "magnitude_prune" and their "*_svd" forms, as peft (see :mod:`peftlab.weighted`)."""
        from peftlab.weighted import add_weighted_adapter

        add_weighted_adapter(self, adapters, weights, adapter_name, combination_type, svd_rank, svd_clamp, svd_full_matrices,
                             svd_driver, density, majority_sign_method)

    def get_layer_status(self) -> list[Any]:
        """Per adapted layer: active, merged, trainable and available adapters (see :mod:`peftlab.model_status`)."""
        from peftlab.model_status import get_layer_status

        return get_layer_status(self)

    def get_model_status(self) -> Any:
        """The layer statuses summed up for the whole model (see :mod:`peftlab.model_status`)."""
        from peftlab.model_status import get_model_status

        return get_model_status(self)

    def disable_adapter_layers(self) -> None:
        """Run as the base model until :meth:`enable_adapter_layers` (``disable_adapter()`` is the scoped form)."""
        if "_layers_off" not in self.__dict__:
            switch = self.tuner.disabled()
            switch.__enter__()
            self.__dict__["_layers_off"] = switch

    def enable_adapter_layers(self) -> None:
        """Use the adapters again after :meth:`disable_adapter_layers`."""
        switch = self.__dict__.pop("_layers_off", None)
        if switch is not None:
            switch.__exit__(None, None, None)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise AdapterStateError(f"no adapter named {adapter_name!r}; known: {sorted(self.peft_config)}.")
        if len(self.peft_config) == 1:
            raise AdapterStateError("cannot delete the only adapter; use unload() to get the base model back.")
        self.tuner.remove(adapter_name)
        del self.peft_config[adapter_name]
        self.optional_heads.pop(adapter_name, None)
        if adapter_name in self.active_adapters:
            rest = [n for n in self.active_adapters if n != adapter_name]
            self.set_adapter(rest or next(iter(self.peft_config)))

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Inside the block the model behaves as the base model."""
        with self.tuner.disabled():
            yield

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
        if safe_merge:
            self._check_adapter_is_finite(names)
        self.tuner.merge(names, self.peft_config, safe_merge)

    def _check_adapter_is_finite(self, names: Sequence[str]) -> None:
        """safe_merge: refuse NaN/inf in any tensor a merge writes as it is (head copies, biases, selective tensors)."""
        for name in names:
            bad = checkpoint.non_finite(self.tuner.adapter_tensors(name, self.peft_config[name]))
            if bad:
                raise AdapterStateError(
                    f"adapter {name!r} holds NaN/inf in {bad[:3]}; merging would write them into the model "
                    f"(diverged training?). Nothing was merged."
                )

    def unmerge_adapter(self) -> None:
        self.tuner.unmerge()

    def merge_and_unload(
        self, safe_merge: bool = False, adapter_names: Sequence[str] | None = None, requantize: bool = False
    ) -> nn.Module:
        """Merge the adapters into the base weights and return the plain base model.

        A 4-/8-bit base comes back dequantized (fp32, exact merge) unless ``requantize=True``
        (lossy; see :func:`peftlab.tuners.layer.merge_and_unload_quantized`).
        """
        names = self._check_names(adapter_names)
        if safe_merge:
            self._check_adapter_is_finite(names)
        if quantization.is_quantized_model(self.get_base_model()):
            return merge_and_unload_quantized(self, names, safe_merge, requantize)
        return self.tuner.unload(merge=True, names=names, configs=self.peft_config, safe_merge=safe_merge)

    def unload(self) -> nn.Module:
        """Return the base model without adapters and with its original weights."""
        self.unmerge_adapter()
        return self.tuner.unload(merge=False, names=[], configs=self.peft_config)

    def get_base_model(self) -> nn.Module:
        """The user's model (``base_model.model`` in peft's tree; ``base_model`` for prompt methods)."""
        return self.tuner.model

    # ----- save / load ------------------------------------------------------------------------
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        selected_adapters: Sequence[str] | None = None,
        save_embedding_layers: str | bool = "auto",
        is_main_process: bool = True,
        state_dict: dict[str, torch.Tensor] | None = None,
        path_initial_model_for_weight_conversion: str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> None:
        """Write each adapter as peft does: "default" in the folder, others in sub-folders, plus a model card.

        ``path_initial_model_for_weight_conversion`` (the folder a PiSSA/OLoRA adapter was saved to right
        after its init) writes it as a plain LoRA for the original base instead
        (:mod:`peftlab.methods.lora.conversion`).

        ``safe_serialization=False`` writes ``adapter_model.bin`` (pickle) instead of safetensors;
        ``is_main_process=False`` writes nothing (the other ranks of a distributed run);
        ``state_dict`` (the model's full state dict, e.g. gathered under FSDP) is where the adapter
        tensors are read from. See :func:`peftlab.hub.check_save_kwargs` for the rest.
        """
        from peftlab import hub

        hub.check_save_kwargs(self, save_embedding_layers, kwargs)
        if os.path.isfile(save_directory):
            raise AdapterStateError(f"{save_directory} is a file; save_pretrained needs a folder path.")
        names = self._check_names(selected_adapters if selected_adapters is not None else list(self.peft_config))
        if not is_main_process:
            return

        def write(root: str) -> None:
            for name in names:
                folder = os.path.join(root, name) if name != "default" else root
                config = copy.deepcopy(self.peft_config[name])
                config.inference_mode = True
                tensors = get_peft_model_state_dict(self, state_dict=state_dict, adapter_name=name)
                if path_initial_model_for_weight_conversion is not None:  # a refusal here leaves the folder as it was
                    from peftlab.methods.lora.conversion import convert_to_plain_lora

                    config, tensors = convert_to_plain_lora(config, tensors, path_initial_model_for_weight_conversion)
                if safe_serialization:
                    checkpoint.save_adapter_weights(folder, tensors)
                else:
                    hub.save_pickled_weights(folder, tensors)
                config.save_pretrained(folder)
                hub.write_model_card(folder, config)

        # Whole-folder atomic: a reader or a kill sees the old folder or the new one, never a mix.
        adapter_folder.save_folder(save_directory, write)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> Any:
        """Upload the adapter folder (what :meth:`save_pretrained` writes) to the Hugging Face Hub, not the base model."""
        from peftlab import hub

        return hub.push_to_hub(self, repo_id, **kwargs)

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
        revision: str | None = None,
        torch_device: str | torch.device | None = None,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        **kwargs: Any,
    ) -> "PeftModel":
        """Wrap ``model`` and load a saved adapter; the model is left untouched on any error.

        As in peft: ``revision`` picks the hub revision of the adapter repo; ``torch_device`` is
        where the saved tensors are read to; ``autocast_adapter_dtype=False`` keeps adapters of a
        float16/bfloat16 base in that dtype (default: float32, as peft); ``low_cpu_mem_usage`` is
        accepted (adapters are built on the base layer's device, no meta-device stage to skip).
        Returned as the ``PeftModelFor*`` class of the config's task type when called on PeftModel.
        """
        from peftlab import hub

        hub.check_load_kwargs(kwargs)
        model_id = hub.resolve_revision(model_id, revision, subfolder)
        if config is None:
            config, weights = checkpoint.load_adapter(model_id, subfolder=subfolder, allow_pickle=allow_pickle)
        else:
            config = copy.deepcopy(config)
            weights = checkpoint.load_adapter_weights(model_id, subfolder=subfolder, allow_pickle=allow_pickle)
        config.inference_mode = not is_trainable
        if torch_device is not None:
            weights = {k: v.to(torch_device) for k, v in weights.items()}
        if cls is PeftModel:
            cls = task_model_class(config.task_type)
        flags = {p: p.requires_grad for p in model.parameters()}
        peft_model = cls(model, config, adapter_name)  # undoes itself if it fails
        try:
            set_peft_model_state_dict(peft_model, weights, adapter_name)
            if not autocast_adapter_dtype:
                hub.cast_adapter_to_base_dtype(peft_model, adapter_name)
        except BaseException:
            peft_model._rollback(adapter_name, flags)
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
        """Load a saved adapter next to the existing ones under ``adapter_name``.

        If ``adapter_name`` exists already, its weights are replaced by the saved ones (as peft
        does; the Trainer resumes and restores the best checkpoint this way).
        """
        if adapter_name in self.peft_config:
            self._reload_weights(model_id, adapter_name, subfolder, allow_pickle)
            return
        limits.check_adapter_name(adapter_name)
        config, weights = checkpoint.load_adapter(model_id, subfolder=subfolder, allow_pickle=allow_pickle)
        config.inference_mode = not is_trainable
        self._add_adapter(adapter_name, config, weights)

    def _reload_weights(self, model_id: str | os.PathLike, adapter_name: str, subfolder: str | None, allow_pickle: bool) -> None:
        """Copy a saved adapter's weights into the existing adapter ``adapter_name`` (checked first)."""
        saved = PeftConfig.from_pretrained(model_id, subfolder=subfolder)
        if saved.peft_type != self.peft_config[adapter_name].peft_type:
            raise AdapterStateError(
                f"{os.fspath(model_id)} holds a {saved.peft_type.value} adapter but adapter {adapter_name!r} is "
                f"{self.peft_config[adapter_name].peft_type.value}; load it under another name."
            )
        set_peft_model_state_dict(self, checkpoint.load_adapter_weights(model_id, subfolder=subfolder, allow_pickle=allow_pickle), adapter_name)

    # ----- attribute fall-through ---------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        return read_through(self, name, "base_model")


# peft's task-specific class names. PeftModel already serves every task (the forward is the base
# model's own), so each class only names the task: get_peft_model and PeftModel.from_pretrained
# return the class matching config.task_type as peft does, so isinstance checks against
# PeftModelForCausalLM and direct PeftModelForCausalLM(model, config) calls keep working. They live
# here, not in a module of their own, because both need the other (that was an import cycle).


class PeftModelForSequenceClassification(PeftModel):
    """A PeftModel for ``TaskType.SEQ_CLS`` (the classifier head is trained and saved)."""


class PeftModelForTokenClassification(PeftModel):
    """A PeftModel for ``TaskType.TOKEN_CLS`` (the classifier head is trained and saved)."""


class PeftModelForQuestionAnswering(PeftModel):
    """A PeftModel for ``TaskType.QUESTION_ANS`` (``qa_outputs`` is trained and saved)."""


class PeftModelForCausalLM(PeftModel):
    """A PeftModel for ``TaskType.CAUSAL_LM``."""


class PeftModelForSeq2SeqLM(PeftModel):
    """A PeftModel for ``TaskType.SEQ_2_SEQ_LM``."""


class PeftModelForFeatureExtraction(PeftModel):
    """A PeftModel for ``TaskType.FEATURE_EXTRACTION``."""


TASK_MODEL_CLASSES: dict[TaskType, type[PeftModel]] = {
    TaskType.SEQ_CLS: PeftModelForSequenceClassification,
    TaskType.TOKEN_CLS: PeftModelForTokenClassification,
    TaskType.QUESTION_ANS: PeftModelForQuestionAnswering,
    TaskType.CAUSAL_LM: PeftModelForCausalLM,
    TaskType.SEQ_2_SEQ_LM: PeftModelForSeq2SeqLM,
    TaskType.FEATURE_EXTRACTION: PeftModelForFeatureExtraction,
}


def task_model_class(task_type: TaskType | str | None) -> type[PeftModel]:
    """The ``PeftModelFor*`` class for ``task_type``; plain ``PeftModel`` when there is none."""
    return TASK_MODEL_CLASSES.get(TaskType(task_type), PeftModel) if task_type is not None else PeftModel


def get_peft_model_state_dict(model: PeftModel, state_dict: Any = None, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    return checkpoint.get_peft_model_state_dict(model, state_dict, adapter_name)


def set_peft_model_state_dict(model: PeftModel, peft_model_state_dict: Any, adapter_name: str = "default") -> None:
    checkpoint.set_peft_model_state_dict(model, peft_model_state_dict, adapter_name)


def get_peft_model(
    model: nn.Module,
    peft_config: PeftConfig,
    adapter_name: str = "default",
    mixed: bool = False,
    autocast_adapter_dtype: bool = True,
    revision: str | None = None,
    low_cpu_mem_usage: bool = False,
) -> PeftModel:
    """Wrap ``model`` with a new adapter built from ``peft_config``; the base weights are frozen.

    On any error ``model`` is left as it was (PeftModel undoes a failed adapter itself).
    Returns the ``PeftModelFor*`` class of ``peft_config.task_type`` (a PeftModel), as peft does.
    ``autocast_adapter_dtype=False`` keeps adapters of a float16/bfloat16 base in that dtype;
    ``revision`` is recorded in the config; ``low_cpu_mem_usage`` is accepted (no meta-device
    stage here). ``mixed=True`` (peft's PeftMixedModel) is refused with what to use instead.
    """
    from peftlab import hub

    if mixed:
        raise AdapterStateError(
            "peftlab has no PeftMixedModel (adapters of different methods in one model); use one method per model, "
            "or several adapters of one method with add_adapter()/set_adapter()."
        )
    if any(isinstance(module, LayerWrapper) for module in model.modules()):  # peft warns on the same condition
        warnings.warn(
            "get_peft_model: this model already has adapter layers from an earlier get_peft_model, and the new adapter is "
            "added beside them; to start over with another config, call .unload() on the earlier PeftModel first.",
            stacklevel=caller_stacklevel(),
        )
    if revision is not None and isinstance(peft_config, PeftConfig):
        peft_config = copy.deepcopy(peft_config)
        peft_config.revision = revision
    peft_model = task_model_class(getattr(peft_config, "task_type", None))(model, peft_config, adapter_name)
    if not autocast_adapter_dtype:
        hub.cast_adapter_to_base_dtype(peft_model, adapter_name)
    return peft_model
