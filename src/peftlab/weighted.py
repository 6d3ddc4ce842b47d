"""``add_weighted_adapter``: a new LoRA adapter made from weighted existing ones (peft's meaning).

For adapters i with weights w_i and scalings s_i = alpha_i / r_i, on each adapted layer:

* ``cat``:    A = [w_1 s_1 A_1; w_2 s_2 A_2; ...], B = [B_1, B_2, ...] (rank = sum of ranks), so
  B A = sum_i w_i s_i B_i A_i exactly;
* ``linear``: A = sum_i sign(w_i s_i) sqrt|w_i s_i| A_i, B = sum_i sqrt|w_i s_i| B_i (equal ranks;
  cross terms B_i A_j make this an approximation unless the adapters span disjoint subspaces);
* ``svd``:    the rank-``svd_rank`` truncated SVD of sum_i w_i ΔW_i (best approximation in norm).

The new adapter has ``lora_alpha == r`` (scaling 1), is not active and not trainable, as in peft.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from peftlab.errors import AdapterStateError
from peftlab.layers import LayerWrapper, ModulesToSave, iter_wrappers

if TYPE_CHECKING:
    from peftlab.peft_model import PeftModel

COMBINATIONS = ("linear", "cat", "svd")


def add_weighted_adapter(model: "PeftModel", adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                         combination_type: str = "svd", svd_rank: int | None = None) -> None:
    from peftlab.methods.lora import LoraConfig

    adapters, weights = list(adapters), [float(w) for w in weights]
    unknown = [a for a in adapters if a not in model.peft_config]
    if unknown or not adapters or len(adapters) != len(weights):
        raise AdapterStateError(f"add_weighted_adapter needs known adapters and one weight each; unknown {unknown}, "
                                f"{len(adapters)} adapters, {len(weights)} weights; known: {sorted(model.peft_config)}.")
    configs = [model.peft_config[a] for a in adapters]
    if not all(type(c) is LoraConfig and not c.use_dora for c in configs):
        raise AdapterStateError("add_weighted_adapter combines plain LoRA adapters only (not DoRA or other methods); "
                                "merge others with merge_adapter([...]) instead.")
    if combination_type not in COMBINATIONS:
        raise AdapterStateError(f"combination_type {combination_type!r} is not supported; use one of {COMBINATIONS} "
                                f"(peft's ties/dare/magnitude_prune variants are not implemented).")
    for _, wrapper in iter_wrappers(model.get_base_model()):
        if isinstance(wrapper, ModulesToSave) and sum(a in wrapper.modules_to_save for a in adapters) > 1:
            raise AdapterStateError("these adapters each train their own copy of the same module (modules_to_save); "
                                    "such copies cannot be combined.")
    combination_type = "linear" if len(adapters) == 1 else combination_type
    ranks = [max([c.r, *(c.rank_pattern or {}).values()]) for c in configs]
    if combination_type == "linear":
        if len(set(ranks)) != 1:
            raise AdapterStateError(f"combination_type='linear' needs adapters of one rank (got {ranks}); use 'cat' or 'svd'.")
        new_rank = ranks[0]
    elif combination_type == "cat":
        new_rank = sum(ranks)
    else:
        new_rank = svd_rank or max(ranks)
    config = copy.deepcopy(configs[0])
    config.r, config.lora_alpha, config.rank_pattern, config.alpha_pattern = new_rank, new_rank, {}, {}
    config.target_modules = _union_targets([c.target_modules for c in configs])
    config.inference_mode = False
    model.add_adapter(adapter_name, config)
    try:
        with torch.no_grad():
            for _, layer in iter_wrappers(model.get_base_model()):
                if isinstance(layer, LayerWrapper) and adapter_name in layer.adapters:
                    _combine(layer, adapters, weights, adapter_name, combination_type, new_rank)
    except BaseException:
        model.delete_adapter(adapter_name)
        raise


def _union_targets(targets: list) -> list[str] | str:
    if all(isinstance(t, str) for t in targets):
        return "|".join(f"({t})" for t in targets)
    if any(isinstance(t, str) for t in targets):
        raise AdapterStateError("these adapters mix regex and list target_modules; combine adapters of one kind.")
    return sorted(set().union(*targets))


def _factors(layer: LayerWrapper, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The live (A, B) parameters of adapter ``name`` in peft's containers, or None when it is not here."""
    if "lora_A" in layer._modules and name in layer.lora_A:
        return layer.lora_A[name].weight, layer.lora_B[name].weight
    if "lora_embedding_A" in layer._modules and name in layer.lora_embedding_A:
        return layer.lora_embedding_A[name], layer.lora_embedding_B[name]
    return None


def _combine(layer: LayerWrapper, adapters: list[str], weights: list[float], new: str, kind: str, rank: int) -> None:
    target_a, target_b = _factors(layer, new)
    present = [(a, w) for a, w in zip(adapters, weights) if _factors(layer, a) is not None]
    target_a.zero_()
    target_b.zero_()
    if not present:
        return
    if kind == "cat":
        a = torch.cat([_factors(layer, n)[0] * w * layer.adapters[n].scaling for n, w in present], dim=0)
        b = torch.cat([_factors(layer, n)[1] for n, w in present], dim=1)
        target_a[: a.shape[0]] = a
        target_b[:, : b.shape[1]] = b
    elif kind == "linear":
        a = b = 0
        for n, w in present:
            ws = w * layer.adapters[n].scaling
            a = a + math.copysign(math.sqrt(abs(ws)), ws) * _factors(layer, n)[0]
            b = b + math.sqrt(abs(ws)) * _factors(layer, n)[1]
        target_a.copy_(a)
        target_b.copy_(b)
    else:
        if isinstance(layer.base_layer, nn.Conv2d):
            raise AdapterStateError("combination_type='svd' is not supported on Conv2d layers; use 'cat' or 'linear'.")
        delta = sum(w * layer.adapters[n].delta_weight() for n, w in present)
        if getattr(layer.adapters[present[0][0]], "fan_in_fan_out", False) or "lora_embedding_A" in layer._modules:
            delta = delta.T  # back to (out, in) = B @ A orientation
        u, s, vh = torch.linalg.svd(delta, full_matrices=True)
        target_b.copy_(u[:, :rank] * s[:rank])
        target_a.copy_(vh[:rank, :])
