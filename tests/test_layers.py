"""The adapter view: tensors live in the layer's name-keyed containers, the view reads them live."""

from __future__ import annotations

import torch
from torch import nn

import peftlab
from peftlab.layers import LayerWrapper


class Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x)


def lora_layer() -> tuple[peftlab.PeftModel, LayerWrapper]:
    torch.manual_seed(0)
    model = peftlab.get_peft_model(Two(), peftlab.LoraConfig(r=2, target_modules=["a"], lora_dropout=0.1, init_lora_weights=False))
    model.add_adapter("other", peftlab.LoraConfig(r=3, target_modules=["a"]))
    return model, model.get_base_model().a


def test_tensors_are_held_by_the_layer_under_peft_names():
    model, layer = lora_layer()
    assert isinstance(layer.lora_A, nn.ModuleDict) and list(layer.lora_A) == ["default", "other"]
    view = layer.adapters["default"]
    assert view.lora_A is layer.lora_A["default"] and view.lora_dropout is layer.lora_dropout["default"]
    assert list(view.parameters()) == []  # the view owns nothing: no parameter is reachable twice
    assert [n for n, _ in model.named_parameters() if n.startswith("base_model.model.a.")] == [
        "base_model.model.a.base_layer.weight", "base_model.model.a.base_layer.bias",
        "base_model.model.a.lora_A.default.weight", "base_model.model.a.lora_A.other.weight",
        "base_model.model.a.lora_B.default.weight", "base_model.model.a.lora_B.other.weight",
    ]


def test_view_follows_replaced_parameters_and_train_mode():
    model, layer = lora_layer()
    view = layer.adapters["default"]
    model.to(torch.float64)
    assert view.lora_A.weight.dtype == torch.float64
    fresh = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    model.load_state_dict(fresh, assign=True)  # new Parameter objects inside the containers
    assert view.lora_B.weight is layer.lora_B["default"].weight
    torch.testing.assert_close(view.lora_B.weight, fresh["base_model.model.a.lora_B.default.weight"], atol=0, rtol=0)
    model.eval()
    assert not view.training
    model.train()
    assert view.training


def test_delete_adapter_removes_its_entries_and_empty_containers():
    model, layer = lora_layer()
    model.delete_adapter("other")
    assert list(layer.lora_A) == ["default"] and "other" not in layer.adapters
    layer.remove("default")
    assert not any(name.startswith("lora_") for name in layer._modules)  # no empty container left
    assert [n for n, _ in layer.named_parameters()] == ["base_layer.weight", "base_layer.bias"]
