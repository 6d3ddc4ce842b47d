"""peft's public names that peftlab does not provide, each with what to use instead.

``peftlab.VeraConfig`` (or ``from peftlab import VeraConfig``) then fails with a sentence that
names the method and the nearest thing peftlab has, rather than a bare "no attribute". The table
is checked against peft's ``__all__`` by tests/test_peft_surface.py, and docs/peft_api.md lists
it; a name peftlab implements must not stay here (the same test checks).
"""

from __future__ import annotations

import dis
import sys

_LORA_FAMILY = "LoRA (LoraConfig; use_dora=True for DoRA, use_rslora=True), LoHa (LoHaConfig) or LoKr (LoKrConfig)"
_ALL_METHODS = ("LoRA/DoRA/rsLoRA, IA3, LoHa, LoKr, AdaLoRA, prompt tuning, prefix tuning, P-tuning, "
                "bottleneck adapters and selective tuning")

# method stem (peft's class names start with it) -> (what it is, what to use instead)
_METHODS: dict[str, tuple[str, str]] = {
    "Adamss": ("AdaMSS", _LORA_FAMILY),
    "AdaptionPrompt": ("adaption prompts (LLaMA-Adapter)", "PrefixTuningConfig (virtual keys/values in every layer)"),
    "Arrow": ("Arrow routing over LoRA experts", "several LoRA adapters with a mixed batch (adapter_names=[...])"),
    "BOFT": ("BOFT", "LoKrConfig (a structured multiplicative-style update) or LoraConfig"),
    "BdLora": ("block-diagonal LoRA", "LoraConfig"),
    "Beft": ("BEFT", _LORA_FAMILY),
    "C3A": ("C3A", _LORA_FAMILY),
    "CPT": ("context-aware prompt tuning", "PromptTuningConfig"),
    "Cartridge": ("cartridges (trained KV prefixes)", "PrefixTuningConfig"),
    "Deft": ("DEFT", _LORA_FAMILY),
    "Delora": ("DeLoRA", "LoraConfig(use_dora=True)"),
    "Eva": ("EVA initialisation", "LoraConfig(init_lora_weights='pissa', 'olora', 'orthogonal', 'gaussian' or True)"),
    "FourierFT": ("FourierFT", _LORA_FAMILY),
    "Frod": ("FRoD", _LORA_FAMILY),
    "Glora": ("GLoRA", "LoraConfig"),
    "Gralora": ("GraLoRA", "LoraConfig"),
    "HRA": ("HRA (Householder reflections)", _LORA_FAMILY),
    "Hira": ("HiRA", "LoHaConfig (a Hadamard-product update)"),
    "Kasa": ("KaSA", "LoraConfig or AdaLoraConfig (SVD-based, with rank allocation)"),
    "LNTuning": ("LayerNorm tuning", "SelectiveConfig (trains chosen norm weights and biases in place)"),
    "Lily": ("Lily", _LORA_FAMILY),
    "LoftQ": ("LoftQ initialisation", "prepare_model_for_kbit_training + LoraConfig on the 4-bit base (QLoRA)"),
    "LoraGA": ("LoRA-GA initialisation", "LoraConfig(init_lora_weights='pissa', 'olora', 'orthogonal', 'gaussian' or True)"),
    "LoraRuntime": ("LoRA runtime options (ephemeral GPU offload)", "LoraConfig; adapters are built on the base layer's device"),
    "Miss": ("MiSS", _LORA_FAMILY),
    "Monteclora": ("MonteCLoRA", "LoraConfig"),
    "MultitaskPromptTuning": ("multitask prompt tuning", "one PromptTuningConfig adapter per task (add_adapter)"),
    "OSF": ("OSF", _LORA_FAMILY),
    "Paca": ("PaCA", "LoraConfig"),
    "Peanut": ("PEANuT", _LORA_FAMILY),
    "Poly": ("Polytropon", "several LoRA adapters (add_adapter, set_adapter([...]))"),
    "Psoft": ("PSOFT", _LORA_FAMILY),
    "Pvera": ("PVeRA", "LoraConfig with a small r"),
    "RandLora": ("RandLoRA", "LoraConfig"),
    "Road": ("RoAd", "IA3Config (scales activations) or LoraConfig"),
    "Shadow": ("Shadow", _LORA_FAMILY),
    "Shira": ("SHiRA", "SelectiveConfig (trains chosen weights sparsely in place)"),
    "Supertuning": ("supertuning", _LORA_FAMILY),
    "TinyLora": ("TinyLoRA", "LoraConfig with a small r"),
    "UniLora": ("Uni-LoRA", "LoraConfig with a small r"),
    "VBLoRA": ("VB-LoRA", "LoraConfig with a small r"),
    "Velora": ("VeLoRA", "activation checkpointing (model.gradient_checkpointing_enable()) to save activation memory"),
    "WaveFT": ("WaveFT", _LORA_FAMILY),
    "XLora": ("X-LoRA (a mixture of LoRA experts)", "several LoRA adapters with set_adapter([...]) or mixed batches"),
}
_SUFFIXES = ("Config", "Model", "Encoder", "Embedding", "Init")

# Names that are not a method's classes.
_OTHERS: dict[str, str] = {
    "PEFT_TYPE_TO_MIXED_MODEL_MAPPING": "peftlab has no mixed models (one method per model); see PEFT_TYPE_TO_TUNER_MAPPING.",
    "TRANSFORMERS_MODELS_TO_PREFIX_TUNING_POSTPROCESS_MAPPING": "peftlab's prefix tuning builds each architecture's cache itself; nothing to post-process.",
    "bloom_model_postprocess_past_key_value": "peftlab's prefix tuning builds each architecture's cache itself; nothing to post-process.",
    "compose_cartridge_adapters": "peftlab has no cartridges; use PrefixTuningConfig adapters.",
    "convert_to_lora": "peftlab converts no other method into LoRA; train a LoraConfig adapter.",
    "save_as_lora": "peftlab converts no other method into LoRA; train a LoraConfig adapter.",
    "create_arrow_model": "peftlab has no Arrow routing; load several LoRA adapters and use a mixed batch (adapter_names=[...]).",
    "find_kappa_target_modules": "peftlab has no kappa-based target search; see `peftlab inspect MODEL` for what can be targeted.",
    "get_eva_state_dict": "peftlab has no EVA initialisation; LoraConfig(init_lora_weights='pissa', 'olora', 'orthogonal', 'gaussian' or True).",
    "initialize_lora_eva_weights": "peftlab has no EVA initialisation; LoraConfig(init_lora_weights='pissa', 'olora', 'orthogonal', 'gaussian' or True).",
    "initialize_kv_prefix_from_past_key_values": "peftlab does not initialise prefixes from a cache; PrefixTuningConfig trains them from scratch.",
    "initialize_kv_prefix_from_text": "peftlab does not initialise prefixes from text; PromptTuningConfig(prompt_tuning_init='TEXT') does so for prompt tuning.",
    "prompt_embeddings_from_past_key_values": "peftlab does not convert caches into prompts; use PromptTuningConfig or PrefixTuningConfig.",
    "preprocess_loraga": "peftlab has no LoRA-GA initialisation; LoraConfig(init_lora_weights='pissa', 'olora', 'orthogonal', 'gaussian' or True).",
    "replace_lora_weights_loftq": "peftlab has no LoftQ; train LoRA on the 4-bit base (prepare_model_for_kbit_training + LoraConfig).",
    "replace_lora_weights_pissa": "PiSSA is an init here: LoraConfig(init_lora_weights='pissa' or 'pissa_niter_K') when the adapter is created.",
}


def method_stem(name: str) -> str | None:
    for suffix in _SUFFIXES:
        if name.endswith(suffix) and name[: -len(suffix)] in _METHODS:
            return name[: -len(suffix)]
    return None


def refusal(name: str) -> str | None:
    """Why peftlab has no ``name`` and what to use instead, or None if ``name`` is not one of peft's names it lacks."""
    if name in _OTHERS:
        return f"peftlab has no {name} (a peft name): {_OTHERS[name]}"
    stem = method_stem(name)
    if stem is None:
        return None
    what, instead = _METHODS[stem]
    return f"peftlab does not implement {what} (peft's {name}); use {instead}. peftlab's methods: {_ALL_METHODS}."


def refused_names(candidates: list[str]) -> dict[str, str]:
    """The refusal sentence of each name in ``candidates`` that this table covers."""
    return {n: msg for n in candidates if (msg := refusal(n)) is not None}


_IMPORT_FROM = dis.opmap["IMPORT_FROM"]


def refusal_error(message: str, name: str) -> Exception:
    """AttributeError for ``peftlab.X`` and ``hasattr``; ImportError with the same sentence for ``from peftlab import X``.

    Python turns an AttributeError raised during ``from m import X`` into its own "cannot import
    name" ImportError and drops the message, so the import statement (the usual way to meet a
    missing peft name after switching imports) gets the ImportError directly.
    """
    frame = sys._getframe(2)  # refusal_error <- peftlab.__getattr__ <- the code that asked
    code = frame.f_code.co_code
    if 0 <= frame.f_lasti < len(code) and code[frame.f_lasti] == _IMPORT_FROM:
        return ImportError(message, name=name, path=None)
    return AttributeError(message)


# Public attributes of peft's PeftModel, LoraModel (``base_model``) and LoRA layer that peftlab's
# objects lack, with why and what to use; docs/peft_api.md lists them (tools/peft_api_doc.py).
_INIT = "peft's per-init layer methods; peftlab runs the init when the adapter is built (init_lora_weights: True, False, 'gaussian', 'pissa', 'pissa_niter_K', 'olora', 'orthogonal')"
_LAYER_INTERNALS = "peft's layer bookkeeping; a peftlab layer keeps each adapter as an object in layer.adapters"
MISSING_ATTRIBUTES: dict[str, dict[str, str]] = {
    "PeftModel": {
        "base_model_prepare_inputs_for_generation": "peft's saved copy of the base method; peftlab never replaces prepare_inputs_for_generation, so it is model.get_base_model().prepare_inputs_for_generation",
        "healthcheck": "peft's diagnostics; use get_model_status() / get_layer_status()",
        "print_healthcheck": "peft's diagnostics; use get_model_status() / get_layer_status()",
        "supports_lora_conversion": "peftlab converts no method into LoRA",
    },
    "LoraModel": {
        "inject_adapter": "use add_adapter() on the PeftModel, or inject_adapter_in_model()",
        "subtract_mutated_init": "PiSSA/OLoRA conversion runs inside save_pretrained(path_initial_model_for_weight_conversion=...)",
        "supports_lora_conversion": "peftlab converts no method into LoRA",
        "target_module_mapping": "default targets per architecture live in peftlab.targeting; `peftlab inspect MODEL` lists them",
        "targeted_parameter_names": "peftlab has no target_parameters (LoRA on bare nn.Parameters)",
        "tuner_layer_cls": "every method's adapted layer is peftlab.layers.LayerWrapper",
        "uses_shared_state": "peftlab has no method with state shared across layers (VeRA, VB-LoRA)",
    },
    "LoraLayer": {
        **{name: _INIT for name in ("astra_init", "corda_init", "loftq_init", "lora_ga_init", "mica_init", "nora_init",
                                    "olora_init", "orthogonal_init", "pissa_init")},
        **{name: _LAYER_INTERNALS for name in ("adapter_layer_names", "other_param_names", "kwargs", "frozen_peft_weight_names",
                                                "update_layer", "reset_lora_parameters", "set_training")},
        "cast_input_dtype_enabled": "inputs are cast to the adapter's dtype always",
        "ephemeral_gpu_offload": "adapters are built on the base layer's device; no offload option",
        "get_additive_delta": "use get_delta_weight(adapter) (the update merging folds in)",
        "get_base_weight": "use get_base_layer().weight",
        "set_base_weight": "merging writes the base weight; use merge_adapter() / unmerge_adapter()",
        "is_target_conv_1d_layer": "use fan_in_fan_out (True for GPT-2's Conv1D)",
        "lora_embedding_A": "present on adapted nn.Embedding layers only",
        "lora_embedding_B": "present on adapted nn.Embedding layers only",
        "lora_magnitude_vector": "present on DoRA layers only",
        "lora_variant": "peft's variant strategy objects; peftlab builds the adapter class (LoraLinear, DoraLinear) at injection",
        "lora_variants": "peft's variant strategy objects; peftlab builds the adapter class (LoraLinear, DoraLinear) at injection",
        "resolve_lora_variant": "peft's variant strategy objects; peftlab builds the adapter class (LoraLinear, DoraLinear) at injection",
        "quantization_backend": "4-/8-bit base layers are read through peftlab.base_layer",
        "supports_lora_conversion": "peftlab converts no method into LoRA",
    },
}
