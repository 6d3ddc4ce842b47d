"""AdaLoRA's training hooks: the rank budget allocator and the orthogonality regulariser.

Both are called explicitly by the training loop (or by :class:`peftlab.AdaLoraCallback`):

    loss = model(**batch).loss + orthogonal_regularization(model)
    loss.backward()
    optimizer.step()
    update_and_allocate(model, step)     # after step(), before zero_grad(): it reads the grads
    optimizer.zero_grad()

Importance of a triplet i (Zhang et al. 2023, sec. 3.2): every trained entry w gets a
sensitivity ``I = |w * dL/dw|``, smoothed ``I' = b1 I' + (1 - b1) I`` and an uncertainty
``U' = b2 U' + (1 - b2) |I - I'|``; its score is ``I' * U'``. A triplet's score is the score of
lambda_i plus the mean score of row Q_i and of column P_i. The schedule gives a global
budget (total rank over all layers); every triplet at or below the budget's cut-off gets
lambda_i = 0, so layers compete for rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from peftlab.errors import AdapterStateError
from peftlab.methods.adalora.adalora import AdaLoraConfig, SvdAdapter, svd_adapters

_FACTORS = ("lora_A", "lora_E", "lora_B")


@dataclass
class ImportanceState:
    """Smoothed sensitivity and uncertainty of one adapter's A, E, B (same shapes as them)."""

    sensitivity: dict[str, torch.Tensor] = field(default_factory=dict)
    uncertainty: dict[str, torch.Tensor] = field(default_factory=dict)


def budget_schedule(step: int, init_budget: int, target_budget: int, config: AdaLoraConfig) -> tuple[int, bool]:
    """(total rank allowed at ``step``, whether to re-allocate at this step).

    Warm-up (step <= tinit): the full budget, no pruning. Final phase (step > total_step - tfinal):
    the target budget. In between the budget falls on a cubic curve,
    ``target + (init - target) * (1 - progress)^3``, re-allocated every ``deltaT`` steps.
    """
    tinit, tfinal, total = config.tinit, config.tfinal, config.total_step
    assert total is not None  # the config rejects a missing total_step
    if step <= tinit:
        return init_budget, False
    if step > total - tfinal:
        return target_budget, True
    remaining = 1 - (step - tinit) / (total - tfinal - tinit)
    budget = int((init_budget - target_budget) * remaining**3 + target_budget)
    return budget, step % config.deltaT == 0


def _update_importance(adapter: SvdAdapter, beta1: float, beta2: float) -> bool:
    """Fold this step's |w * grad| into the adapter's EMAs; False when it has no gradients."""
    state = adapter.importance
    if state is None:
        state = adapter.importance = ImportanceState()
    had_grad = False
    with torch.no_grad():
        for name in _FACTORS:
            param: nn.Parameter = getattr(adapter, name)
            if param.grad is None:
                sensitivity = torch.zeros_like(param)
            else:
                had_grad = True
                sensitivity = (param * param.grad).abs()
            smooth = state.sensitivity.get(name, torch.zeros_like(param))
            unc = state.uncertainty.get(name, torch.zeros_like(param))
            smooth = beta1 * smooth + (1 - beta1) * sensitivity
            state.sensitivity[name] = smooth
            state.uncertainty[name] = beta2 * unc + (1 - beta2) * (sensitivity - smooth).abs()
    return had_grad


def triplet_scores(adapter: SvdAdapter) -> torch.Tensor:
    """Importance of each of the adapter's r triplets, shape (r,)."""
    state = adapter.importance
    if state is None or not state.sensitivity:
        return torch.zeros(adapter.rank, device=adapter.lora_E.device)
    score = {n: state.sensitivity[n] * state.uncertainty[n] for n in _FACTORS}
    return score["lora_E"].view(-1) + (score["lora_A"].mean(dim=1) + score["lora_B"].mean(dim=0))


def _mask_to_budget(adapters: list[tuple[str, SvdAdapter]], init_budget: int, budget: int) -> dict[str, list[bool]]:
    """Zero lambda of every triplet scoring at or below the budget's cut-off; return the kept masks."""
    scores = {path: triplet_scores(adapter) for path, adapter in adapters}
    pruned = init_budget - budget
    if pruned > 0:
        threshold = torch.kthvalue(torch.cat([s.float().cpu() for s in scores.values()]), k=pruned).values.item()
    else:
        threshold = float("-inf")
    pattern: dict[str, list[bool]] = {}
    with torch.no_grad():
        for path, adapter in adapters:
            keep = scores[path] > threshold
            adapter.lora_E.masked_fill_(~keep.view(-1, 1), 0.0)
            pattern[f"{path}.lora_E"] = keep.view(-1).tolist()
    return pattern


def _apply_pattern(adapters: list[tuple[str, SvdAdapter]], config: AdaLoraConfig) -> None:
    """Keep pruned triplets at lambda = 0 during the final phase (the optimizer may move them)."""
    with torch.no_grad():
        for path, adapter in adapters:
            kept = config.kept_rows(path)
            if kept is not None and len(kept) == adapter.rank:
                keep = torch.tensor(kept, dtype=torch.bool, device=adapter.lora_E.device)
                adapter.lora_E.masked_fill_(~keep.view(-1, 1), 0.0)


def resolve_adalora(model: nn.Module, adapter_name: str | None) -> tuple[str, AdaLoraConfig, list[tuple[str, SvdAdapter]]]:
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or not hasattr(model, "base_model"):
        raise AdapterStateError(f"expected a peftlab PeftModel with an AdaLoRA adapter, got {type(model).__name__}.")
    name = adapter_name if adapter_name is not None else model.active_adapter
    config = configs.get(name)
    if not isinstance(config, AdaLoraConfig):
        raise AdapterStateError(
            f"adapter {name!r} is {'missing' if config is None else type(config).__name__ + ', not AdaLoRA'}; "
            f"update_and_allocate and orthogonal_regularization work on AdaLoraConfig adapters."
        )
    return name, config, list(svd_adapters(model.get_base_model(), name))


def update_and_allocate(model: nn.Module, global_step: int, adapter_name: str | None = None) -> int:
    """Update importance scores and prune triplets to this step's rank budget; returns the budget.

    Call once per optimizer step, after ``optimizer.step()`` and before ``zero_grad()``, with the
    0-based index of that step. The kept triplets go into ``config.rank_pattern``; the final
    allocation is made at step ``total_step - tfinal`` and re-applied after it.
    """
    name, config, adapters = resolve_adalora(model, adapter_name)
    assert config.total_step is not None
    init_budget = sum(a.rank for _, a in adapters)
    target_budget = config.target_r * len(adapters)
    final_step = config.total_step - config.tfinal
    if global_step > final_step:
        _apply_pattern(adapters, config)
        return target_budget
    shrunk = [p for p, a in adapters if a.rank != config.init_r]
    if shrunk:
        raise AdapterStateError(
            f"adapter {name!r} was built from an allocated rank_pattern ({shrunk[0]} has rank "
            f"{dict(adapters)[shrunk[0]].rank}, not init_r={config.init_r}); the budget schedule runs once, from "
            f"init_r. Fine-tune it without update_and_allocate, or start from an AdaLoraConfig without rank_pattern."
        )
    if global_step < final_step:
        updated = [_update_importance(a, config.beta1, config.beta2) for _, a in adapters]
        if adapters and not any(updated):
            raise AdapterStateError(
                f"adapter {name!r} has no gradients; call update_and_allocate after loss.backward() and "
                f"optimizer.step(), before optimizer.zero_grad()."
            )
        budget, allocate = budget_schedule(global_step, init_budget, target_budget, config)
        if allocate:
            config.rank_pattern = _mask_to_budget(adapters, init_budget, budget)
        return budget
    # global_step == final_step: fix the final allocation and drop the importance statistics.
    config.rank_pattern = _mask_to_budget(adapters, init_budget, target_budget)
    for _, adapter in adapters:
        adapter.importance = None
    return target_budget


def orthogonal_regularization(model: nn.Module, adapter_name: str | None = None) -> torch.Tensor:
    """The loss term ``orth_reg_weight * mean(||Q Q^T - I||_F, ||P^T P - I||_F)`` over all layers.

    Add it to the training loss (peftlab never adds it for you). Zero when the weight is 0.
    """
    _, config, adapters = resolve_adalora(model, adapter_name)
    if not adapters:
        return torch.zeros(())
    device = adapters[0][1].lora_A.device
    if config.orth_reg_weight == 0:
        return torch.zeros((), device=device)
    total = torch.zeros((), device=device)
    for _, adapter in adapters:
        for gram in (adapter.lora_A @ adapter.lora_A.T, adapter.lora_B.T @ adapter.lora_B):
            eye = torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype)
            total = total + torch.linalg.matrix_norm(gram - eye, ord="fro")
    return config.orth_reg_weight * total / (2 * len(adapters))
