"""Train LoRA on a tiny BERT for a few steps, sharded with torch's FSDP2 ``fully_shard`` or not.

Run by tests/integrations/test_fsdp_integration.py: once as a single process on the whole batch,
once under ``torch.distributed.run`` with 2 gloo processes, each on half of every batch. Writes
the trained adapter parameters (full tensors, gathered) to ``OUT``.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from conftest import tiny_bert_cls  # noqa: E402
from peftlab import LoraConfig, TaskType, get_peft_model  # noqa: E402

STEPS, BATCH, LENGTH = 3, 8, 8


def main(out: str) -> None:
    distributed = "WORLD_SIZE" in os.environ
    rank, world = 0, 1
    if distributed:
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = get_peft_model(tiny_bert_cls(), LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8,
                                                       target_modules=["query", "value"]))
    if distributed:
        from torch.distributed.fsdp import fully_shard

        from transformers.models.bert.modeling_bert import BertLayer

        # Wrap by layer class, then the root, as accelerate's TRANSFORMER_BASED_WRAP policy does.
        for module in model.modules():
            if isinstance(module, BertLayer):
                fully_shard(module)
        fully_shard(model)
    model.eval()  # no dropout: the ranks' random streams differ from the single process's
    trainable = [p for p in model.parameters() if p.requires_grad]
    # Plain SGD: the update is linear in the gradient, so float rounding in FSDP's gradient
    # reduction stays at rounding size (Adam's first step, ~lr * sign(grad), would amplify it).
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    g = torch.Generator().manual_seed(1)
    per_rank = BATCH // world
    for _ in range(STEPS):
        ids = torch.randint(3, 99, (BATCH, LENGTH), generator=g)
        labels = torch.randint(0, 3, (BATCH,), generator=g)
        rows = slice(rank * per_rank, (rank + 1) * per_rank)
        loss = model(input_ids=ids[rows], attention_mask=torch.ones_like(ids[rows]), labels=labels[rows]).loss
        loss.backward()  # FSDP averages gradients over ranks: the mean over the whole batch
        optimizer.step()
        optimizer.zero_grad()
    full = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            tensor = param.full_tensor() if hasattr(param, "full_tensor") else param
            full[name] = tensor.detach().clone().contiguous()
    if rank == 0:
        save_file(full, out)
    if distributed:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
