"""Method lookup goes through the registry: every registered method is selectable by name."""

from __future__ import annotations

import dataclasses
import sys
import types
import warnings

import pytest

from peftlab.config import TaskType
from peftlab.errors import WorkbenchError
from peftlab.lab import methods
from peftlab import registry
from peftlab.registry import config_class_for, method_for, registered_methods


@pytest.mark.parametrize("key", registered_methods())
def test_every_registered_method_builds_from_its_name(key):
    for spelling in (key, key.lower(), key.lower().replace("_", "-")):
        config = methods.build_config(spelling, {})
        assert type(config) is config_class_for(key)
        if hasattr(config, "task_type"):
            assert config.task_type == TaskType.SEQ_CLS
    assert key.lower() in methods.available_methods()


def test_full_and_options():
    assert methods.build_config("full", {}) is None
    config = methods.build_config("lora", {"r": 3, "lora_alpha": 6, "target_modules": ["query"]})
    assert (config.r, config.lora_alpha, config.target_modules) == (3, 6, ["query"])
    with pytest.raises(WorkbenchError, match="takes no options"):
        methods.build_config("full", {"r": 2})


def test_unknown_method_and_option_list_the_choices():
    with pytest.raises(WorkbenchError, match="unknown method 'lorra'.*full, .*lora"):
        methods.build_config("lorra", {})
    with pytest.raises(WorkbenchError, match=r"unknown options \['rank'\].*lora_alpha"):
        methods.build_config("lora", {"rank": 8})
    with pytest.raises(WorkbenchError, match="'r'"):
        methods.build_config("lora", {"r": "eight"})


def test_trainer_callbacks_hook(monkeypatch):
    """A method's declared callbacks are built (with the model when they ask for it); missing ones are skipped."""
    module = types.ModuleType("fake_callbacks_mod")

    class NeedsModel:
        def __init__(self, model):
            self.model = model

    class NoArgs:
        pass

    module.NeedsModel, module.NoArgs = NeedsModel, NoArgs
    monkeypatch.setitem(sys.modules, "fake_callbacks_mod", module)
    config = methods.build_config("lora", {})
    names = ("fake_callbacks_mod:NeedsModel", "fake_callbacks_mod:NoArgs", "no_such_module_xyz:Callback")
    monkeypatch.setitem(registry._METHODS, "LORA", dataclasses.replace(method_for("LORA"), trainer_callbacks=names))
    with pytest.warns(UserWarning, match="no_such_module_xyz:Callback is not available"):
        built = methods.trainer_callbacks(config, model="M")
    assert [type(c) for c in built] == [NeedsModel, NoArgs] and built[0].model == "M"
    assert methods.trainer_callbacks(None, model="M") == []


def test_adalora_callback_is_declared():
    assert method_for("ADALORA").trainer_callbacks == ("peftlab.methods.adalora.callback:AdaLoraCallback",)
    fields = methods.config_fields(config_class_for("LORA"))
    assert "r" in fields and "peft_type" not in fields and all(isinstance(f, str) for f in fields)
    assert dataclasses.is_dataclass(config_class_for("IA3"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        methods.build_config("ia3", {"target_modules": ["key"], "feedforward_modules": []})


def test_required_options_get_run_defaults():
    assert methods.build_config("prompt-tuning", {}).num_virtual_tokens == 20
    assert methods.build_config("prefix_tuning", {"num_virtual_tokens": 5}).num_virtual_tokens == 5
    assert methods.build_config("selective", {}).bitfit is True
    assert methods.build_config("adalora", {}, total_steps=40).total_step == 40
    assert methods.build_config("adalora", {"total_step": 7, "tinit": 1, "tfinal": 2}, total_steps=40).total_step == 7


@pytest.mark.parametrize(
    ("epochs", "max_steps", "batch", "accumulate", "rows", "expected"),
    [(1.0, -1, 16, 1, 2000, 125), (2.0, -1, 16, 1, 100, 14), (1.0, -1, 8, 4, 100, 3), (1.0, 9, 16, 1, 2000, 9), (0.5, -1, 10, 1, 95, 5)],
)
def test_optimizer_steps_match_the_trainer(epochs, max_steps, batch, accumulate, rows, expected):
    from peftlab.lab.experiment import TrainConfig
    from peftlab.lab.setup import optimizer_steps

    train = TrainConfig(epochs=epochs, max_steps=max_steps, batch_size=batch, gradient_accumulation_steps=accumulate)
    assert optimizer_steps(train, rows) == expected
