"""The workbench's ``transformers.Trainer``: the stock training loop plus four public-method hooks.

- ``create_optimizer``: an optional separate learning rate for the fully trained head (IA3
  vectors want ~1e-2; a freshly initialised classifier trained at that rate overshoots).
- ``training_step``: every training loss must be finite and must not diverge (see
  :func:`peftlab.lab.callbacks.divergence`); otherwise :class:`NonFiniteError` stops the run.
- ``evaluation_loop``: adds the task's model-based metrics (causal LM: exact match, perplexity).
- ``save_model``: a checkpoint of a peftlab model holds its weights with one name per storage.

Only public methods are overridden; everything else (DDP, resume, schedules) is transformers'.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import safetensors.torch
import torch
from transformers import Trainer
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.utils import SAFE_WEIGHTS_NAME

from peftlab.integrations.trainers import is_peftlab_model
from peftlab.lab.callbacks import NonFiniteError, divergence


def head_parameters(model: torch.nn.Module) -> set[int]:
    """ids of the parameters of fully trained copies (classifier head, modules_to_save)."""
    from peftlab.layers import ModulesToSave

    return {id(p) for m in model.modules() if isinstance(m, ModulesToSave) for p in m.modules_to_save.parameters()}


def untied_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with one name per storage.

    safetensors refuses tensors that share memory, as tied weights do (SmolLM2's embedding is its
    lm_head); resume loads the checkpoint non-strictly and the tie restores the other name.
    """
    state_dict, seen = {}, set()
    for key, tensor in model.state_dict().items():
        ptr = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape)) if tensor.numel() else None
        if ptr is not None and ptr in seen:
            continue
        if ptr is not None:
            seen.add(ptr)
        state_dict[key] = tensor
    return state_dict


class LabTrainer(Trainer):
    """``Trainer`` with a head learning rate, a finite-loss check and task metrics from the model.

    Args:
        head_learning_rate: learning rate of :func:`head_parameters` (None: the run's rate).
        model_metrics: ``model -> metrics`` added to every evaluation (None: none).
        **kwargs: ``transformers.Trainer``'s arguments.
    """

    def __init__(self, *args: Any, head_learning_rate: float | None = None,
                 model_metrics: Callable[[torch.nn.Module], dict[str, float]] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.head_learning_rate = head_learning_rate
        self.model_metrics = model_metrics
        self.first_loss: float | None = None

    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(model)
        head = head_parameters(self.model)
        if self.head_learning_rate is None or not head:
            return optimizer
        extra = {"lr": self.head_learning_rate, "initial_lr": self.head_learning_rate}
        groups = list(optimizer.param_groups)
        optimizer.param_groups = []
        for group in groups:
            for is_head in (False, True):
                params = [p for p in group["params"] if (id(p) in head) == is_head]
                if params:
                    settings = {k: v for k, v in group.items() if k != "params"}
                    optimizer.add_param_group({**settings, **(extra if is_head else {}), "params": params})
        return optimizer

    def training_step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        loss = super().training_step(*args, **kwargs)
        value = float(loss.detach().float().mean())
        if not math.isfinite(value):
            raise NonFiniteError(f"the training loss became {value} at step {self.state.global_step + 1}")
        if self.first_loss is None:
            self.first_loss = value
        why = divergence(value, self.first_loss)
        if why is not None:
            raise NonFiniteError(f"{why} at step {self.state.global_step + 1}")
        return loss

    def evaluation_loop(self, *args: Any, **kwargs: Any) -> Any:
        # Evaluation leaves the random state as it found it (its DataLoader draws a seed from the global
        # generator): training then does not depend on when it was evaluated, so a run resumed from a
        # checkpoint taken just before an epoch's evaluation continues exactly as the uninterrupted one.
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=devices):
            output = super().evaluation_loop(*args, **kwargs)
            if self.model_metrics is not None:
                prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
                output.metrics.update({f"{prefix}_{k}": v for k, v in self.model_metrics(self.model).items()})
        return output

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the model; a peftlab model as its state dict with one name per storage.

        The workbench's checkpoints hold the full state dict (trainer support would otherwise make the
        Trainer save the adapter folder), which safetensors refuses when weights are tied; this writes
        the same files (weights, the collator's tokenizer, the training arguments) with one name per storage.
        """
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if not is_peftlab_model(model) or self.is_fsdp_enabled or self.is_deepspeed_enabled:
            super().save_model(output_dir, _internal_call)
            return
        if not self.args.should_save:
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        safetensors.torch.save_file(untied_state_dict(model), os.path.join(output_dir, SAFE_WEIGHTS_NAME), metadata={"format": "pt"})
        tokenizer = getattr(self.data_collator, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
