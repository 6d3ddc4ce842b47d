"""VeRA: vector-based random matrix adaptation (Kopiczko et al. 2024, https://arxiv.org/abs/2310.11454).

A frozen linear ``h = W x`` becomes ``h = W x + Λ_b B Λ_d A x``: ``A`` (r, in) and ``B`` (out, r) are
random and frozen, drawn once per adapter and shared by all its layers; each layer trains only two
vectors, ``λ_d`` (r,) and ``λ_b`` (out,). ``λ_b`` starts at zero, so the model is unchanged at init.
Layers smaller than the largest target use the top-left block of the shared matrices
(``A[:, :in]``, ``B[:out, :]``). The update is a plain matrix, so it merges.

As in peft, ``A`` and ``B`` are kaiming-uniform draws from a CPU generator seeded with
``projection_prng_key``, sized by the largest (out, in) among the targets; the same key gives
peft's matrices. They live on the tuner as buffers ``vera_A.<adapter>`` / ``vera_B.<adapter>``
(``base_model.vera_A.<adapter>`` in the state dict), and are saved as peft saves them,
``base_model.vera_A`` / ``base_model.vera_B`` in the adapter file, unless ``save_projection=False``
(then a load draws them again from the key).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from peftlab import base_layer as BL
from peftlab import surgery
from peftlab.config import LayerConfig, PeftConfig, PeftType
from peftlab.errors import PeftConfigError, TargetModuleError
from peftlab.layers import AdapterView
from peftlab.methods.lora import LORA_DEFAULT_TARGETS
from peftlab.registry import MethodSpec, register
from peftlab.tuners.layer import LayerTuner

if TYPE_CHECKING:
    from peftlab.registry import MethodSpec as Spec

SHARED_KEYS = ("vera_A", "vera_B")


@dataclass
class VeraConfig(LayerConfig):
    """VeRA settings (names and defaults as peft's ``VeraConfig``).

    Args:
        r: rows of the shared random projection A; far larger than a LoRA rank (the default 256), since
            a layer trains only r + out numbers.
        projection_prng_key: seed of the generator that draws A and B.
        save_projection: write A and B into the adapter file (safe across platforms); False relies on
            the key alone.
        vera_dropout: dropout on the adapter's input.
        d_initial: starting value of every entry of λ_d (small, <= 0.1, as the paper recommends).
        fan_in_fan_out: the base stores weights as (in, out); forced on for GPT-2 Conv1D.
        bias: "none" only (peft's "all" / "vera_only" are not implemented here).
        init_weights: True starts λ_b at 0 and λ_d at d_initial; False leaves λ_b = 1, λ_d ~ N(0, 1) (tests).
    """

    peft_type = PeftType.VERA
    peftlab_only_fields = ("exclude_modules",)  # peft's VeraConfig lacks it: left out of the JSON while unset

    r: int = 256
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise PeftConfigError(f"VeraConfig: r must be a positive integer, got {self.r!r}; try r=256.")
        if isinstance(self.projection_prng_key, bool) or not isinstance(self.projection_prng_key, int):
            raise PeftConfigError(f"VeraConfig: projection_prng_key must be an int seed, got {self.projection_prng_key!r}.")
        if isinstance(self.vera_dropout, bool) or not isinstance(self.vera_dropout, (int, float)) or not 0 <= self.vera_dropout < 1:
            raise PeftConfigError(f"VeraConfig: vera_dropout must be in [0, 1), got {self.vera_dropout!r}.")
        if isinstance(self.d_initial, bool) or not isinstance(self.d_initial, (int, float)) or not math.isfinite(self.d_initial):
            raise PeftConfigError(f"VeraConfig: d_initial must be a finite number, got {self.d_initial!r}.")
        if self.bias != "none":
            raise PeftConfigError(f"VeraConfig: bias={self.bias!r} is not implemented in peftlab; use bias='none'.")
        for name in ("save_projection", "fan_in_fan_out", "init_weights"):
            if not isinstance(getattr(self, name), bool):
                raise PeftConfigError(f"VeraConfig: {name} must be True or False, got {getattr(self, name)!r}.")


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """U(-b, b) with b = sqrt(6 / fan_in) (kaiming uniform, gain sqrt(2)); fan_in = shape[1]."""
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def shared_projections(r: int, out_features: int, in_features: int, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """VeRA's frozen A (r, in) and B (out, r), drawn in peft's order from a CPU generator seeded with ``key``."""
    generator = torch.Generator(device="cpu").manual_seed(key)
    vera_a = kaiming_uniform((r, in_features), generator)
    vera_b = kaiming_uniform((out_features, r), generator)
    return vera_a, vera_b


class Projections(nn.Module):
    """Buffers keyed by adapter name (one shared matrix per adapter), as peft's ``BufferDict``."""

    def get(self, adapter_name: str) -> torch.Tensor:
        return self._buffers[adapter_name]


class VeraLinear(AdapterView):
    """VeRA on a Linear / Conv1D: ``out + λ_b * (B[:out] (λ_d * (A[:, :in] dropout(x))))``.

    Shapes: x (..., in) -> A -> (..., r) -> * λ_d -> B -> (..., out) -> * λ_b.
    """

    def __init__(self, in_features: int, out_features: int, config: VeraConfig, shared: tuple[Projections, Projections],
                 adapter_name: str) -> None:
        super().__init__()
        self.vera_lambda_b = nn.Parameter(torch.ones(out_features))
        self.vera_lambda_d = nn.Parameter(torch.randn(config.r))  # drawn even when reset below, as peft does
        self.vera_dropout = nn.Dropout(config.vera_dropout) if config.vera_dropout > 0 else nn.Identity()
        # The tuner's projection stores: read at each use, never copied (they follow .to() with the model).
        self.__dict__["_shared"] = shared
        self.__dict__["_shared_name"] = adapter_name
        self.__dict__["_sizes"] = (in_features, out_features)
        if config.init_weights:
            with torch.no_grad():
                self.vera_lambda_d.fill_(config.d_initial)
                self.vera_lambda_b.zero_()

    def projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's blocks of the shared matrices: A[:, :in] (r, in), B[:out, :] (out, r)."""
        store_a, store_b = self.__dict__["_shared"]
        in_features, out_features = self.__dict__["_sizes"]
        name = self.__dict__["_shared_name"]
        return store_a.get(name)[:, :in_features], store_b.get(name)[:out_features, :]

    def adapt_output(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        vera_a, vera_b = self.projections()
        lambda_d, lambda_b = self.vera_lambda_d, self.vera_lambda_b
        x = x.to(lambda_d.dtype)
        update = lambda_b * F.linear(lambda_d * F.linear(self.vera_dropout(x), vera_a.to(x.device)), vera_b.to(x.device))
        return out + update.to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = (λ_b B) (λ_d A), shape (out, in)."""
        vera_a, vera_b = self.projections()
        return (self.vera_lambda_b.unsqueeze(-1) * vera_b) @ (self.vera_lambda_d.unsqueeze(-1) * vera_a)

    def merge_into(self, base_layer: nn.Module) -> None:
        BL.add_to_weight(base_layer, self.delta_weight())

    def unmerge_from(self, base_layer: nn.Module) -> None:
        BL.add_to_weight(base_layer, -self.delta_weight())


class VeraTuner(LayerTuner):
    """LayerTuner plus the projections each VeRA adapter's layers share (kept here as buffers)."""

    def __init__(self, model: nn.Module, spec: "Spec") -> None:
        super().__init__(model, spec)
        self.vera_A = Projections()
        self.vera_B = Projections()
        self.__dict__["_saved_projection"] = {}

    def adapter_factory(self, config: PeftConfig, adapter_name: str, names: list[str]) -> Callable[[nn.Module, str], AdapterView]:
        assert isinstance(config, VeraConfig)
        sizes = []
        for name in names:
            base = _base_of(self.model.get_submodule(name))
            if not BL.is_linear(base):
                raise TargetModuleError(f"VeRA adapts linear layers (nn.Linear, Conv1D); {name} is a {type(base).__name__}.")
            sizes.append(BL.features(base))
        in_features, out_features = max(i for i, _ in sizes), max(o for _, o in sizes)
        vera_a, vera_b = shared_projections(config.r, out_features, in_features, config.projection_prng_key)
        device = surgery.adapter_device(_base_of(self.model.get_submodule(names[0])))
        self.vera_A.register_buffer(adapter_name, vera_a.to(device))
        self.vera_B.register_buffer(adapter_name, vera_b.to(device))
        self.__dict__["_saved_projection"][adapter_name] = config.save_projection
        shared = (self.vera_A, self.vera_B)

        def make(base: nn.Module, name: str) -> AdapterView:
            in_f, out_f = BL.features(base)
            return VeraLinear(in_f, out_f, config, shared, adapter_name)

        return make

    def remove(self, adapter_name: str) -> None:
        super().remove(adapter_name)
        self._drop_shared(adapter_name)

    def discard(self, adapter_name: str) -> None:
        super().discard(adapter_name)
        self._drop_shared(adapter_name)

    def _drop_shared(self, adapter_name: str) -> None:
        for store in (self.vera_A, self.vera_B):
            store._buffers.pop(adapter_name, None)
        self.__dict__["_saved_projection"].pop(adapter_name, None)

    def extra_saved_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        if not self.__dict__["_saved_projection"].get(adapter_name, False):
            return {}
        return {f"base_model.{key}": getattr(self, key).get(adapter_name).detach() for key in SHARED_KEYS}

    def load_extra_saved(self, adapter_name: str, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for key in SHARED_KEYS:
                target = getattr(self, key).get(adapter_name)
                target.copy_(tensors[f"base_model.{key}"].to(device=target.device, dtype=target.dtype))


def _base_of(module: nn.Module) -> nn.Module:
    return getattr(module, "base_layer", module)


def make_vera_tuner(model: nn.Module, spec: MethodSpec) -> VeraTuner:
    return VeraTuner(model, spec)


register(MethodSpec(VeraConfig, make_tuner=make_vera_tuner, default_targets=LORA_DEFAULT_TARGETS, learning_rates=(1e-3, 3e-3, 1e-2)))
