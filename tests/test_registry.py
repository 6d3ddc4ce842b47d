"""The registry is the one place a method is declared: PeftType, tuner kinds and workbench tables follow it."""

from __future__ import annotations

import dataclasses
import importlib

import pytest

import peftlab
from peftlab import registry
from peftlab.config import PeftType
from peftlab.errors import PeftConfigError, QuantizationError
from peftlab.quantization import QuantConfig, quantize_model
from peftlab.methods.vera import VeraTuner
from peftlab.tuners import LayerTuner, PromptTuner, SelectiveTuner, tuner_for
from conftest import tiny_llama


def test_peft_type_lists_exactly_the_registered_methods():
    assert {t.value for t in PeftType} == set(registry.registered_methods())
    for key, spec in registry.registered_specs().items():
        assert spec.config_cls.peft_type == PeftType(key)


@pytest.mark.parametrize("key", registry.registered_methods())
def test_each_method_lives_in_a_family_package_the_registry_imports(key):
    """A method's config sits in ``peftlab.methods.<family>.<module>``; the family package is one
    the registry imports, and its ``__init__`` exports the config (and every name it lists)."""
    config_cls = registry.method_for(key).config_cls
    family = config_cls.__module__.rpartition(".")[0]
    assert family.rpartition(".")[0] == "peftlab.methods" and family in registry._BUILTIN_MODULES
    package = importlib.import_module(family)
    assert config_cls.__name__ in package.__all__ and getattr(package, config_cls.__name__) is config_cls
    assert all(hasattr(package, name) for name in package.__all__)


@pytest.mark.parametrize("key", registry.registered_methods())
def test_make_tuner_builds_the_tuner_kind(key):
    spec = registry.method_for(key)
    tuner = tuner_for(tiny_llama(), spec)
    # methods with their own tuner name its kind here (VeRA: layer surgery plus shared projections)
    custom = {"SELECTIVE": SelectiveTuner, "VERA": VeraTuner}
    expected = PromptTuner if spec.make_model_adapter else LayerTuner if spec.make_adapter else custom[key]
    assert type(tuner) is expected


def test_spec_options_must_name_config_fields():
    spec = registry.method_for("LORA")
    with pytest.raises(PeftConfigError, match="name no config field: \\['rank'\\]"):
        dataclasses.replace(spec, run_defaults={"rank": 4})
    with pytest.raises(PeftConfigError, match="exactly one of"):
        registry.MethodSpec(spec.config_cls)


def test_method_without_quantized_support_is_refused_before_any_change(monkeypatch):
    pytest.importorskip("bitsandbytes")
    spec = registry.method_for("LORA")
    monkeypatch.setitem(registry._METHODS, "LORA", dataclasses.replace(spec, supports_quantized=False))
    base = quantize_model(tiny_llama(), QuantConfig())
    names = [n for n, _ in base.named_modules()]
    with pytest.raises(QuantizationError, match="does not work on a 4-/8-bit quantized base"):
        peftlab.get_peft_model(base, peftlab.LoraConfig(target_modules=["q_proj"]))
    assert [n for n, _ in base.named_modules()] == names
