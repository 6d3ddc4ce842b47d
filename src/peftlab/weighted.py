"""``add_weighted_adapter``: a new LoRA adapter made from weighted existing ones (peft's meaning).

For adapters i with weights w_i and scalings s_i = alpha_i / r_i, on each adapted layer:

* ``cat``:    A = [w_1 s_1 A_1; w_2 s_2 A_2; ...], B = [B_1, B_2, ...] (rank = sum of ranks), so
  B A = sum_i w_i s_i B_i A_i exactly;
* ``linear``: A = sum_i sign(w_i s_i) sqrt|w_i s_i| A_i, B = sum_i sqrt|w_i s_i| B_i (equal ranks;
  cross terms B_i A_j make this an approximation unless the adapters span disjoint subspaces);
* ``svd``:    the rank-``svd_rank`` truncated SVD of sum_i w_i ΔW_i (best approximation in norm);
* ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: like ``linear`` (the A's with weights
  sign(w_i s_i) sqrt|w_i s_i|, the B's with sqrt|w_i s_i|), each side merged by the function of that
  name in :mod:`peftlab.merge_utils` (pruned to ``density``; TIES elects a sign per entry by
  ``majority_sign_method``);
* ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd``: those functions on the
  ΔW_i with weights w_i, then the truncated SVD as in ``svd``.

DARE's masks are drawn from the global generator in peft's order (layer by layer in model order;
within a layer the A's, then the B's, or the ΔW's), after the new adapter's own init, so the same
seed gives peft's adapter. The new adapter has ``lora_alpha == r`` (scaling 1, no rsLoRA), is not
active and not trainable, as in peft.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from peftlab import merge_utils
from peftlab.errors import AdapterStateError
from peftlab.layers import LayerWrapper, ModulesToSave, iter_wrappers

if TYPE_CHECKING:
    from peftlab.peft_model import PeftModel

# combination type -> the merge_utils function applied to the factors (or, for *_svd, to the ΔW's).
_MERGES = {
    "linear": merge_utils.task_arithmetic,
    "svd": merge_utils.task_arithmetic,
    "ties": merge_utils.ties,
    "dare_linear": merge_utils.dare_linear,
    "dare_ties": merge_utils.dare_ties,
    "magnitude_prune": merge_utils.magnitude_prune,
}
SAME_RANK = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATIONS = (*SAME_RANK, "cat", *SVD)
_PRUNING = ("ties", "dare_linear", "dare_ties", "magnitude_prune")


def add_weighted_adapter(model: "PeftModel", adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                         combination_type: str = "svd", svd_rank: int | None = None, svd_clamp: float | None = None,
                         svd_full_matrices: bool = True, svd_driver: str | None = None, density: float | None = None,
                         majority_sign_method: str = "total") -> None:
    from peftlab.methods.lora import LoraConfig
    from peftlab.methods.lora.init import changes_base

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
        raise AdapterStateError(f"combination_type {combination_type!r} is not supported; use one of {COMBINATIONS}.")
    if combination_type.removesuffix("_svd") in _PRUNING and (
        isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 <= density <= 1
    ):
        raise AdapterStateError(f"combination_type={combination_type!r} prunes each adapter to a fraction of its entries: "
                                f"pass density in [0, 1] (e.g. density=0.5), got {density!r}.")
    if majority_sign_method not in ("total", "frequency"):
        raise AdapterStateError(f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}.")
    if svd_clamp is not None and (isinstance(svd_clamp, bool) or not isinstance(svd_clamp, (int, float)) or not 0 <= svd_clamp <= 1):
        raise AdapterStateError(f"svd_clamp is a quantile in [0, 1] (or None for no clamping), got {svd_clamp!r}.")
    if any(c.lora_bias for c in configs) and any(
        "lora_embedding_A" in w._modules and any(a in w.lora_embedding_A for a in adapters)
        for _, w in iter_wrappers(model.get_base_model()) if isinstance(w, LayerWrapper)
    ):
        raise AdapterStateError("some of these adapters have lora_bias=True and some adapt an embedding, which takes no bias; "
                                "combine them in separate groups.")
    for _, wrapper in iter_wrappers(model.get_base_model()):
        if isinstance(wrapper, ModulesToSave) and sum(a in wrapper.modules_to_save for a in adapters) > 1:
            raise AdapterStateError("these adapters each train their own copy of the same module (modules_to_save); "
                                    "such copies cannot be combined.")
    combination_type = "linear" if len(adapters) == 1 else combination_type
    ranks = [max([c.r, *(c.rank_pattern or {}).values()]) for c in configs]
    if combination_type in SAME_RANK:
        if len(set(ranks)) != 1:
            raise AdapterStateError(f"combination_type={combination_type!r} needs adapters of one rank (got {ranks}); "
                                    f"use 'cat' or an '*_svd' type.")
        new_rank = ranks[0]
    elif combination_type == "cat":
        new_rank = sum(ranks)
    else:
        new_rank = svd_rank or max(ranks)
    config = copy.deepcopy(configs[0])
    config.r, config.lora_alpha, config.rank_pattern, config.alpha_pattern = new_rank, new_rank, {}, {}
    config.use_rslora = False  # scaling alpha / r = 1: the sources' scalings are folded into the factors
    config.lora_bias = any(c.lora_bias for c in configs)  # its bias: sum_i w_i s_i b_i
    config.trainable_token_indices = None  # as peft: the combination holds LoRA factors only
    if changes_base(config.init_lora_weights):  # its factors are overwritten: no PiSSA/OLoRA residual for it
        config.init_lora_weights = True
    config.target_modules = _union_targets([c.target_modules for c in configs])
    config.inference_mode = False
    model.add_adapter(adapter_name, config)
    try:
        with torch.no_grad():
            for _, layer in iter_wrappers(model.get_base_model()):
                if isinstance(layer, LayerWrapper) and adapter_name in layer.adapters:
                    _combine(layer, adapters, weights, adapter_name, combination_type, new_rank,
                             _Options(density, majority_sign_method, svd_clamp, svd_full_matrices, svd_driver))
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


@dataclass(frozen=True)
class _Options:
    density: float | None
    majority_sign_method: str
    svd_clamp: float | None
    svd_full_matrices: bool
    svd_driver: str | None

    def merge(self, kind: str, tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
        """The ``merge_utils`` function of ``kind`` on ``tensors`` (weights as an fp32 tensor, as peft makes them)."""
        function = _MERGES[kind]
        weight_tensor = torch.tensor(weights).to(tensors[0].device)
        if kind in ("ties", "dare_ties"):
            return function(tensors, weight_tensor, self.density, self.majority_sign_method)
        if kind in _PRUNING:
            return function(tensors, weight_tensor, self.density)
        return function(tensors, weight_tensor)


def _combine(layer: LayerWrapper, adapters: list[str], weights: list[float], new: str, kind: str, rank: int,
             options: _Options) -> None:
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
    elif kind in SAME_RANK:
        scaled = [w * layer.adapters[n].scaling for n, w in present]
        # the sign goes on A only: on both sides it would cancel in B A
        weights_a = [math.sqrt(abs(ws)) * (1 if ws >= 0 else -1) for ws in scaled]
        weights_b = [math.sqrt(abs(ws)) for ws in scaled]
        dtype = target_a.dtype
        target_a.copy_(options.merge(kind, [_factors(layer, n)[0] for n, _ in present], weights_a).to(dtype))
        target_b.copy_(options.merge(kind, [_factors(layer, n)[1] for n, _ in present], weights_b).to(dtype))
    else:
        _combine_svd(layer, present, kind, rank, options, target_a, target_b)
    new_bias = getattr(layer.lora_B[new], "bias", None) if "lora_B" in layer._modules else None
    if new_bias is not None:  # lora_bias adds s * b to the output whatever the factors: the biases combine linearly
        new_bias.zero_()
        for n, w in present:
            bias = layer.lora_B[n].bias
            if bias is not None:
                new_bias += w * layer.adapters[n].scaling * bias


def _combine_svd(layer: LayerWrapper, present: list[tuple[str, float]], kind: str, rank: int, options: _Options,
                 target_a: torch.Tensor, target_b: torch.Tensor) -> None:
    """The merged ΔW (``kind`` without ``_svd``) as B A by truncated SVD (B = U_r S_r, A = V_r^T), optionally clamped."""
    deltas = [layer.adapters[n].delta_weight() for n, _ in present]  # scaling included
    delta = options.merge(kind.removesuffix("_svd"), deltas, [w for _, w in present])
    conv = isinstance(layer.base_layer, nn.Conv2d)
    if conv:
        delta = delta.flatten(start_dim=1)  # (out, in * kh * kw)
    if getattr(layer.adapters[present[0][0]], "fan_in_fan_out", False) or "lora_embedding_A" in layer._modules:
        delta = delta.T  # back to (out, in) = B @ A orientation
    u, s, vh = torch.linalg.svd(delta, full_matrices=options.svd_full_matrices, driver=options.svd_driver)
    u = u[:, :rank] @ torch.diag(s[:rank])
    vh = vh[:rank, :]
    if options.svd_clamp is not None:
        high = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), options.svd_clamp)
        u, vh = u.clamp(-high, high), vh.clamp(-high, high)
    target_b.copy_(u.reshape(target_b.shape))
    target_a.copy_(vh.reshape(target_a.shape))
