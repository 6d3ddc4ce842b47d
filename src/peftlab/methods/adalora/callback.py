"""Run AdaLoRA's per-step hooks inside the Hugging Face ``Trainer``.

    trainer = Trainer(model=peft_model, args=args, ..., callbacks=[AdaLoraCallback()])

The callback does two things at each optimizer step, and nothing else:

1. ``on_pre_optimizer_step`` (after gradient clipping, before ``optimizer.step()``): it adds
   the gradient of :func:`~peftlab.orthogonal_regularization` to the adapter's ``.grad``.
   Adding the gradient of a term equals adding the term to the loss; the model's loss and
   outputs stay untouched. The term is added once per optimizer step, so with gradient
   accumulation it counts as much as it would added to the (averaged) loss of each micro-batch.
   Its gradient is not part of the clipped norm. The gradient is taken with
   ``torch.autograd.grad``, so distributed gradient hooks do not fire for it (every rank has
   the same adapter weights, hence the same regulariser gradient).
2. ``on_optimizer_step`` (after ``optimizer.step()``, before gradients are zeroed): it calls
   :func:`~peftlab.update_and_allocate` with the 0-based index of the step, which reads the
   gradients to score importance and prunes to the budget.

``total_step`` in the config should equal the Trainer's ``max_steps``; the callback warns
otherwise. fp16 with a GradScaler and ``max_grad_norm=0`` leaves the gradients scaled at this
point, so that combination is refused (use bf16, fp32, or keep gradient clipping on).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from peftlab.errors import PeftConfigError
from peftlab.methods.adalora.budget import resolve_adalora, orthogonal_regularization, update_and_allocate


class AdaLoraCallback(TrainerCallback):
    """Orthogonality regulariser and rank budget allocation for an AdaLoRA model in a Trainer.

    Args:
        adapter_name: the AdaLoRA adapter to drive; None means the model's active adapter.

    After each step ``last_budget`` holds the rank budget and ``last_orth_reg`` the value of
    the regulariser term whose gradient was added.
    """

    def __init__(self, adapter_name: str | None = None) -> None:
        self.adapter_name = adapter_name
        self.last_budget: int | None = None
        self.last_orth_reg: float | None = None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: nn.Module | None = None, **kwargs: Any
    ) -> None:
        _, config, adapters = resolve_adalora(model, self.adapter_name)
        if not adapters:
            raise PeftConfigError("AdaLoraCallback: the model has no AdaLoRA layers to train.")
        if args.fp16 and args.max_grad_norm is not None and args.max_grad_norm <= 0:
            raise PeftConfigError(
                "AdaLoraCallback: fp16 with max_grad_norm=0 leaves gradients loss-scaled when the regulariser's "
                "gradient is added; use bf16 or fp32, or set max_grad_norm > 0."
            )
        if state.max_steps and config.total_step != state.max_steps:
            warnings.warn(
                f"AdaLoraConfig.total_step={config.total_step} but the Trainer runs {state.max_steps} steps; the rank "
                f"budget reaches target_r at step total_step - tfinal. Set total_step=max_steps to use the schedule as planned.",
                stacklevel=2,
            )

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: nn.Module | None = None, **kwargs: Any
    ) -> None:
        _, config, adapters = resolve_adalora(model, self.adapter_name)
        if config.orth_reg_weight == 0:
            self.last_orth_reg = 0.0
            return
        params = [p for _, a in adapters for p in (a.lora_A, a.lora_B) if p.requires_grad]
        if not params:
            return
        with torch.enable_grad():
            term = orthogonal_regularization(model, self.adapter_name)
            grads = torch.autograd.grad(term, params, allow_unused=True)
        with torch.no_grad():
            for param, grad in zip(params, grads):
                if grad is None:
                    continue
                if param.grad is None:
                    param.grad = grad.detach().clone()
                else:
                    param.grad.add_(grad.to(param.grad.dtype))
        self.last_orth_reg = float(term.detach())

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: nn.Module | None = None, **kwargs: Any
    ) -> None:
        # state.global_step still counts the steps finished before this one: a 0-based index.
        self.last_budget = update_and_allocate(model, state.global_step, self.adapter_name)
