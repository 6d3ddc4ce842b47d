"""transformers.Trainer with a peftlab model, after peftlab.integrations.enable_trainer_support().

Checkpoints hold adapter files only, resume reproduces the uninterrupted run, the best checkpoint
is restored, and Hugging Face peft loads what the Trainer saved with equal outputs.
"""

from __future__ import annotations

import os

import pytest
import torch

from conftest import ToyTask, text_inputs, tiny_bert_cls
from peftlab import LoraConfig, PeftModel, TaskType, get_peft_model
from peftlab.integrations import disable_trainer_support, enable_trainer_support, trainer_support_enabled

ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}
FULL_WEIGHT_FILES = {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"}


@pytest.fixture
def trainer_support():
    enable_trainer_support()
    yield
    disable_trainer_support()


def _model(seed: int = 0) -> PeftModel:
    torch.manual_seed(seed)
    base = tiny_bert_cls()
    return get_peft_model(base, LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8, target_modules=["query", "value"]))


def _args(out, **overrides):
    from transformers import TrainingArguments

    values = dict(
        output_dir=str(out), per_device_train_batch_size=8, learning_rate=1e-2, max_steps=4, save_steps=2,
        save_strategy="steps", logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
        dataloader_num_workers=0, lr_scheduler_type="constant",  # a cut run keeps the same schedule
    )
    values.update(overrides)
    return TrainingArguments(**values)


def _adapter_state(model: PeftModel) -> dict[str, torch.Tensor]:
    from peftlab import get_peft_model_state_dict

    return {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}


def test_enable_is_idempotent_and_reversible():
    import transformers.trainer as trainer_module
    from transformers import Trainer

    disable_trainer_support()
    original_save, original_pred = Trainer._save, trainer_module._is_peft_model
    model = _model()  # support was turned off by the user: creating a model does not turn it back on
    assert not trainer_support_enabled() and not trainer_module._is_peft_model(model)
    enable_trainer_support()
    enable_trainer_support()
    try:
        assert trainer_module._is_peft_model(model)
        assert not trainer_module._is_peft_model(tiny_bert_cls())
    finally:
        disable_trainer_support()
    assert Trainer._save is original_save and trainer_module._is_peft_model is original_pred


def test_importing_peftlab_changes_nothing():
    import subprocess
    import sys

    code = ("import sys, peftlab, peftlab.integrations as i; import transformers.trainer as t; "
            "assert not i.trainer_support_enabled() and t._is_peft_model.__module__ == 'transformers.trainer_utils'; "
            "assert not any(type(f).__module__.startswith('peftlab') for f in sys.meta_path)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_checkpoints_and_save_model_hold_adapter_files_only(tmp_path, trainer_support):
    from transformers import Trainer

    model = _model()
    trainer = Trainer(model=model, args=_args(tmp_path / "run"), train_dataset=ToyTask())
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    for folder in [tmp_path / "run" / "checkpoint-2", tmp_path / "run" / "checkpoint-4", tmp_path / "final"]:
        files = set(os.listdir(folder))
        assert files >= ADAPTER_FILES, (folder, files)
        assert not files & FULL_WEIGHT_FILES, (folder, files)
    # The saved adapter is the trained one.
    reloaded = PeftModel.from_pretrained(tiny_bert_cls(), str(tmp_path / "final"))
    saved = _adapter_state(reloaded)
    live = _adapter_state(model)
    assert saved.keys() == live.keys()
    assert all(torch.equal(saved[k], live[k]) for k in saved)


def test_resume_from_checkpoint_gives_the_uninterrupted_adapter(tmp_path, trainer_support):
    from transformers import Trainer

    whole = _model()
    Trainer(model=whole, args=_args(tmp_path / "whole"), train_dataset=ToyTask()).train()

    first = _model()
    Trainer(model=first, args=_args(tmp_path / "cut", max_steps=2), train_dataset=ToyTask()).train()
    resumed = _model()
    trainer = Trainer(model=resumed, args=_args(tmp_path / "cut"), train_dataset=ToyTask())
    trainer.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-2"))

    a, b = _adapter_state(whole), _adapter_state(resumed)
    start = _adapter_state(_model())
    assert any(not torch.equal(a[k], start[k]) for k in a)  # training moved the adapter
    # Same data order, RNG and optimizer state: the same float operations in the same order.
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


def test_load_best_model_at_end_restores_the_best_checkpoint(tmp_path, trainer_support):
    from transformers import Trainer, TrainerCallback

    class Snapshot(TrainerCallback):
        """Record the adapter at each save, to compare with what the Trainer restores."""

        def __init__(self) -> None:
            self.at_step: dict[int, dict[str, torch.Tensor]] = {}

        def on_save(self, args, state, control, model=None, **kwargs):
            self.at_step[state.global_step] = _adapter_state(model)

    model = _model()
    snap = Snapshot()
    data = ToyTask()
    args = _args(tmp_path, eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
                 metric_for_best_model="eval_loss", greater_is_better=False, max_steps=6, learning_rate=5e-2)
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data, callbacks=[snap])
    trainer.train()
    best_step = int(trainer.state.best_model_checkpoint.rsplit("-", 1)[1])
    restored = _adapter_state(model)
    assert all(torch.equal(restored[k], snap.at_step[best_step][k]) for k in restored)
    if best_step != 6:  # restoring a different checkpoint must change the live adapter
        assert any(not torch.equal(restored[k], snap.at_step[6][k]) for k in restored)


def test_peft_loads_the_trainer_output_with_equal_outputs(tmp_path, trainer_support):
    peft = pytest.importorskip("peft")
    from transformers import Trainer

    model = _model()
    trainer = Trainer(model=model, args=_args(tmp_path / "run", save_strategy="no"), train_dataset=ToyTask())
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    model.eval()
    torch.manual_seed(0)
    base = tiny_bert_cls()  # same seed as _model(): the same base weights
    theirs = peft.PeftModel.from_pretrained(base, str(tmp_path / "final")).eval()
    inputs = text_inputs()
    with torch.no_grad():
        ours_out, theirs_out = model(**inputs).logits, theirs(**inputs).logits
    # Same weights, same ops: float32 differences only from kernel order.
    torch.testing.assert_close(ours_out, theirs_out, rtol=1e-5, atol=1e-6)
