"""One Trainer / trl scenario per run, in a fresh process (import order and peft's absence are per process).

    python trainer_scenarios.py SCENARIO OUT_DIR [--no-peft]

Prints one JSON line: what the scenario observed. ``--no-peft`` hides peft before anything is
imported (``sys.modules["peft"] = None``: imports fail and ``find_spec`` answers None, as when it
is not installed). Used by tests/integrations/test_trainer_opt_in.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

if "--no-peft" in sys.argv:
    sys.modules["peft"] = None  # type: ignore[assignment]

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for conftest

import torch  # noqa: E402

FULL_WEIGHT_FILES = {"model.safetensors", "pytorch_model.bin"}


def _files(folder: str) -> dict[str, bool]:
    names = set(os.listdir(folder))
    return {"adapter": "adapter_model.safetensors" in names, "full": bool(names & FULL_WEIGHT_FILES)}


def _bert_trainer(out: str):
    from transformers import Trainer, TrainingArguments

    from conftest import ToyTask, tiny_bert_cls
    from peftlab import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(tiny_bert_cls(), LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"]))
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=8, max_steps=2, save_steps=2, report_to=[],
                             use_cpu=True, disable_tqdm=True)
    return Trainer(model=model, args=args, train_dataset=ToyTask())


def trainer_imported_first(out: str) -> dict:
    """A peft user's script: Trainer imported at the top, the model built after, no opt-in call."""
    from transformers import Trainer  # noqa: F401

    _bert_trainer(out).train()
    return _files(os.path.join(out, "checkpoint-2"))


def model_built_first(out: str) -> dict:
    """The model is built before transformers' Trainer is imported; no opt-in call."""
    from conftest import tiny_bert_cls
    from peftlab import LoraConfig, get_peft_model

    get_peft_model(tiny_bert_cls(), LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query"]))
    assert "transformers.trainer" not in sys.modules
    _bert_trainer(out).train()
    return _files(os.path.join(out, "checkpoint-2"))


def support_disabled(out: str) -> dict:
    """disable_trainer_support() is the user's choice: the Trainer saves as for any unknown model."""
    from peftlab.integrations import disable_trainer_support

    disable_trainer_support()
    _bert_trainer(out).train()
    return _files(os.path.join(out, "checkpoint-2"))


def qlora_without_opt_in(out: str) -> dict:
    """The QLoRA recipe as a peft user writes it, no opt-in call: transformers' "purely quantized" check passes."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    from conftest import ToyTask
    from peftlab import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=99, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=64)).save_pretrained(os.path.join(out, "base"))
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(os.path.join(out, "base"), quantization_config=quant, device_map="cpu")
    model = get_peft_model(prepare_model_for_kbit_training(base), LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj"]))
    args = TrainingArguments(output_dir=os.path.join(out, "run"), per_device_train_batch_size=4, max_steps=2, save_steps=2,
                             report_to=[], use_cpu=True, disable_tqdm=True)
    data = [{"input_ids": row["input_ids"], "labels": row["input_ids"]} for row in ToyTask(n=8)]
    Trainer(model=model, args=args, train_dataset=data).train()
    return _files(os.path.join(out, "run", "checkpoint-2"))


def _dpo(out: str, targets: list[str]):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    import peftlab
    from conftest import tiny_llama, tiny_word_tokenizer

    torch.manual_seed(0)
    data = Dataset.from_dict({"prompt": ["Review : good movie Sentiment :", "Review : awful film Sentiment :"] * 4,
                              "chosen": [" positive", " negative"] * 4, "rejected": [" negative", " positive"] * 4})
    args = DPOConfig(output_dir=out, per_device_train_batch_size=4, max_steps=2, save_steps=2, learning_rate=1e-2,
                     max_length=16, report_to=[], use_cpu=True, disable_tqdm=True)
    return DPOTrainer(model=tiny_llama(), args=args, train_dataset=data, processing_class=tiny_word_tokenizer(),
                      peft_config=peftlab.LoraConfig(r=4, target_modules=targets))


def _refusal(make) -> dict:
    try:
        make()
    except ValueError as e:
        return {"refused": "lm_head" in str(e)}
    return {"refused": False}


def dpo_lm_head_opt_in_first(out: str) -> dict:
    """Opt-in, then trl's DPO module imported: an adapter on lm_head is refused as with peft."""
    import peftlab.integrations

    peftlab.integrations.enable_trainer_support()
    return _refusal(lambda: _dpo(out, ["q_proj", "lm_head"]))


def dpo_lm_head_trl_first(out: str) -> dict:
    """trl's DPO module imported, then the opt-in: the same refusal."""
    import trl.trainer.dpo_trainer  # noqa: F401

    import peftlab.integrations

    peftlab.integrations.enable_trainer_support()
    return _refusal(lambda: _dpo(out, ["q_proj", "lm_head"]))


def dpo_trains(out: str) -> dict:
    """DPOTrainer(peft_config=peftlab.LoraConfig(...)) trains the adapter and checkpoints it alone."""
    import peftlab
    import peftlab.integrations

    peftlab.integrations.enable_trainer_support()
    trainer = _dpo(out, ["q_proj", "v_proj"])
    before = {k: v.clone() for k, v in peftlab.get_peft_model_state_dict(trainer.model).items()}
    trainer.train()
    after = peftlab.get_peft_model_state_dict(trainer.model)
    return {"peftlab_model": peftlab.integrations.is_peftlab_model(trainer.model),
            "moved": sum(not torch.equal(before[k], after[k]) for k in before), "tensors": len(before),
            **_files(os.path.join(out, "checkpoint-2"))}


def sft_config_trains(out: str) -> dict:
    """SFTTrainer(peft_config=peftlab.LoraConfig(...)): trains the adapter, checkpoints hold it alone."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    import peftlab
    import peftlab.integrations
    from conftest import tiny_llama, tiny_word_tokenizer

    peftlab.integrations.enable_trainer_support()
    torch.manual_seed(0)
    texts = ["Review : good movie Sentiment : positive", "Review : awful film Sentiment : negative"] * 8
    args = SFTConfig(output_dir=out, per_device_train_batch_size=4, max_steps=2, save_steps=2, learning_rate=1e-2,
                     max_length=16, report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = SFTTrainer(model=tiny_llama(), args=args, train_dataset=Dataset.from_dict({"text": texts}),
                         processing_class=tiny_word_tokenizer(), peft_config=peftlab.LoraConfig(r=4, target_modules=["q_proj"]))
    before = {k: v.clone() for k, v in peftlab.get_peft_model_state_dict(trainer.model).items()}
    trainer.train()
    after = peftlab.get_peft_model_state_dict(trainer.model)
    return {"peftlab_model": peftlab.integrations.is_peftlab_model(trainer.model),
            "moved": sum(not torch.equal(before[k], after[k]) for k in before), "tensors": len(before),
            **_files(os.path.join(out, "checkpoint-2"))}


if __name__ == "__main__":
    scenario, out = sys.argv[1], sys.argv[2]
    result = globals()[scenario](out)
    result["peft_importable"] = importlib.util.find_spec("peft") is not None
    print("RESULT " + json.dumps(result))
