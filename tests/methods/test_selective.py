"""Selective tuning: the selection of each mode counted independently, only selected tensors
train, checkpoints hold exactly those tensors, disable/unload/merge, several adapters, Trainer,
and bad input. peft has no counterpart, so there are no parity tests.
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import peftlab
from peftlab import (
    AdapterStateError,
    CheckpointError,
    PeftConfigError,
    PeftModel,
    SelectiveConfig,
    TargetModuleError,
    get_peft_model,
)
from _contract import perturb_trainable, run
from conftest import (
    main_output,
    seq2seq_inputs,
    text_inputs,
    tiny_bart,
    tiny_bert_cls,
    tiny_distilbert,
    tiny_gpt2,
    tiny_llama,
    tiny_t5,
)


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    """Trainable parameters under their base-model names."""
    return {n.removeprefix("base_model.model."): p for n, p in model.named_parameters() if p.requires_grad}


def numel(params) -> int:
    return sum(p.numel() for p in params)


# ----- what each mode selects, counted independently ---------------------------------------------
@pytest.mark.parametrize("build", [tiny_bert_cls, tiny_gpt2, tiny_distilbert, tiny_bart])
def test_bitfit_trains_exactly_the_biases(build):
    base = build()
    biases = {n: p for n, p in base.named_parameters() if n.split(".")[-1] == "bias"}
    model = get_peft_model(copy.deepcopy(base), SelectiveConfig(bitfit=True))
    assert set(trainable(model)) == set(biases)
    assert model.get_nb_trainable_parameters() == (numel(biases.values()), numel(base.parameters()))


def test_bitfit_restricted_to_modules():
    base = tiny_bert_cls()
    model = get_peft_model(copy.deepcopy(base), SelectiveConfig(bitfit=True, bias_modules=["query", "value"]))
    expected = {f"bert.encoder.layer.{i}.attention.self.{m}.bias" for i in range(2) for m in ("query", "value")}
    assert set(trainable(model)) == expected
    assert model.get_nb_trainable_parameters()[0] == 4 * 32
    regex = get_peft_model(copy.deepcopy(base), SelectiveConfig(bitfit=True, bias_modules=r".*layer\.1\..*dense"))
    assert set(trainable(regex)) == {
        "bert.encoder.layer.1.attention.output.dense.bias", "bert.encoder.layer.1.intermediate.dense.bias",
        "bert.encoder.layer.1.output.dense.bias",
    }


@pytest.mark.parametrize(
    "build, prefix", [(tiny_bert_cls, "bert.encoder.layer.1."), (tiny_gpt2, "transformer.h.1."), (tiny_llama, "model.layers.1.")]
)
def test_last_n_layers_finds_the_layer_list(build, prefix):
    base = build()
    top = {n for n, _ in base.named_parameters() if n.startswith(prefix)}
    model = get_peft_model(copy.deepcopy(base), SelectiveConfig(last_n_layers=1))
    assert set(trainable(model)) == top
    both = get_peft_model(copy.deepcopy(base), SelectiveConfig(last_n_layers=2))
    assert set(trainable(both)) == top | {n for n, _ in base.named_parameters() if n.startswith(prefix.replace(".1.", ".0."))}


def test_last_n_layers_of_each_stack_with_layers_pattern():
    base = tiny_t5()
    model = get_peft_model(copy.deepcopy(base), SelectiveConfig(last_n_layers=1, layers_pattern="block"))
    expected = {n for n, _ in base.named_parameters() if n.startswith(("encoder.block.1.", "decoder.block.1."))}
    assert set(trainable(model)) == expected
    decoder_only = get_peft_model(copy.deepcopy(base), SelectiveConfig(last_n_layers=1, layers_pattern="decoder.block"))
    assert set(trainable(decoder_only)) == {n for n in expected if n.startswith("decoder.")}


def test_layer_norm_tuning():
    bert = tiny_bert_cls()
    model = get_peft_model(copy.deepcopy(bert), SelectiveConfig(layer_norm=True))
    expected = {n for n, _ in bert.named_parameters() if ".LayerNorm." in n}
    assert len(expected) == 10 and set(trainable(model)) == expected  # embeddings + 2 per layer, weight and bias
    llama = tiny_llama()
    model = get_peft_model(copy.deepcopy(llama), SelectiveConfig(layer_norm=True))
    assert set(trainable(model)) == {n for n, _ in llama.named_parameters() if "layernorm" in n or n == "model.norm.weight"}
    assert len(trainable(model)) == 5  # RMSNorm: weights only
    t5 = get_peft_model(tiny_t5(), SelectiveConfig(layer_norm=True))  # T5LayerNorm is an RMS norm
    assert trainable(t5) and all("layer_norm" in n for n in trainable(t5))


def test_patterns_and_union_of_modes():
    base = tiny_bert_cls()
    config = SelectiveConfig(
        task_type="SEQ_CLS", bitfit=True, layer_norm=True, trainable_parameter_patterns=[r".*attention\.self\.query\.weight"]
    )
    model = get_peft_model(copy.deepcopy(base), config)
    names = [n for n, _ in base.named_parameters()]
    expected = {
        n for n in names
        if n.endswith(".bias") or ".LayerNorm." in n or n.endswith("self.query.weight") or n.startswith("classifier.")
    }
    assert set(trainable(model)) == expected
    # Nothing was wrapped: selective tuning does no surgery.
    assert [type(m) for m in model.get_base_model().modules()] == [type(m) for m in base.modules()]


# ----- training, saving, switching ---------------------------------------------------------------
def train_steps(model: nn.Module, inputs: dict, steps: int = 3) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        main_output(model(**inputs)).float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize(
    "build, inputs, config",
    [
        (tiny_bert_cls, text_inputs, SelectiveConfig(task_type="SEQ_CLS", bitfit=True)),
        (tiny_gpt2, text_inputs, SelectiveConfig(last_n_layers=1)),
        (tiny_llama, text_inputs, SelectiveConfig(layer_norm=True, trainable_parameter_patterns=[r".*o_proj\.weight"])),
        (tiny_t5, seq2seq_inputs, SelectiveConfig(bitfit=False, layer_norm=True)),
    ],
)
def test_only_selected_parameters_change(build, inputs, config):
    torch.manual_seed(0)
    model = get_peft_model(build(), config)
    selected = set(trainable(model))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_steps(model, inputs())
    changed = {n.removeprefix("base_model.model.") for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed == selected


def trained_bert(config: SelectiveConfig, seed: int = 0) -> tuple[nn.Module, PeftModel]:
    torch.manual_seed(seed)
    base = tiny_bert_cls()
    model = get_peft_model(copy.deepcopy(base), config)
    perturb_trainable(model, seed=seed + 3)
    return base, model


def test_save_holds_exactly_the_tuned_tensors_and_loads_into_fresh_model(tmp_path):
    config = SelectiveConfig(task_type="SEQ_CLS", bitfit=True, last_n_layers=1)
    base, model = trained_bert(config)
    inputs = text_inputs()
    expected = run(model, inputs)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    tuned = trainable(model)
    assert set(saved) == {"base_model.model." + n for n in tuned}
    assert all(torch.equal(saved["base_model.model." + n], p.detach()) for n, p in tuned.items())
    fresh = copy.deepcopy(base)
    loaded = PeftModel.from_pretrained(fresh, tmp_path)
    torch.testing.assert_close(run(loaded, inputs), expected, atol=0, rtol=0)
    assert not any(p.requires_grad for p in loaded.parameters())  # loaded for inference
    untouched = {n: p for n, p in base.named_parameters() if n not in tuned}
    loaded_params = dict(loaded.get_base_model().named_parameters())
    assert all(torch.equal(loaded_params[n], p) for n, p in untouched.items())
    trainable_again = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    assert set(trainable(trainable_again)) == set(tuned)


def test_disable_adapter_gives_base_and_restores():
    base, model = trained_bert(SelectiveConfig(bitfit=True, layer_norm=True))
    inputs = text_inputs()
    tuned = run(model, inputs)
    values = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert not torch.allclose(tuned, run(base, inputs), atol=1e-4)
    with model.disable_adapter():
        torch.testing.assert_close(run(model, inputs), run(base, inputs), atol=0, rtol=0)
    torch.testing.assert_close(run(model, inputs), tuned, atol=0, rtol=0)
    assert all(torch.equal(p.detach(), values[n]) for n, p in model.named_parameters())


def test_unload_restores_base_and_merge_and_unload_keeps_tuned():
    inputs = text_inputs()
    base, model = trained_bert(SelectiveConfig(bitfit=True))
    tuned = run(model, inputs)
    merged = model.merge_and_unload()
    assert isinstance(merged, type(base)) and not model.tuner.values.originals  # the stored copies are freed
    torch.testing.assert_close(run(merged, inputs), tuned, atol=0, rtol=0)
    base, model = trained_bert(SelectiveConfig(bitfit=True))
    plain = model.unload()
    assert isinstance(plain, type(base)) and not model.tuner.values.originals
    torch.testing.assert_close(run(plain, inputs), run(base, inputs), atol=0, rtol=0)


def test_two_adapters_switch_save_load_delete(tmp_path):
    inputs = text_inputs()
    base, model = trained_bert(SelectiveConfig(bitfit=True))
    out_a = run(model, inputs)
    # "b" overlaps "a" (both tune the LayerNorm biases) and starts from the base values.
    model.add_adapter("b", SelectiveConfig(layer_norm=True))
    torch.testing.assert_close(run(model, inputs), out_a, atol=0, rtol=0)  # adding does not activate
    model.set_adapter("b")
    torch.testing.assert_close(run(model, inputs), run(base, inputs), atol=0, rtol=0)
    assert set(trainable(model)) == {n for n, _ in base.named_parameters() if ".LayerNorm." in n}
    perturb_trainable(model, seed=11)
    out_b = run(model, inputs)
    model.set_adapter("default")
    torch.testing.assert_close(run(model, inputs), out_a, atol=0, rtol=0)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    loaded.load_adapter(tmp_path / "b", "b")
    torch.testing.assert_close(run(loaded, inputs), out_a, atol=0, rtol=0)
    loaded.set_adapter("b")
    torch.testing.assert_close(run(loaded, inputs), out_b, atol=0, rtol=0)
    with loaded.disable_adapter():
        torch.testing.assert_close(run(loaded, inputs), run(base, inputs), atol=0, rtol=0)
    loaded.delete_adapter("b")  # the active one: the base values come back, then "default" is activated
    assert loaded.active_adapter == "default"
    torch.testing.assert_close(run(loaded, inputs), out_a, atol=0, rtol=0)
    assert loaded.merge_and_unload(adapter_names=["default"]) is loaded.get_base_model()


def test_merge_and_unload_of_an_inactive_adapter():
    inputs = text_inputs()
    base, model = trained_bert(SelectiveConfig(bitfit=True))
    model.add_adapter("b", SelectiveConfig(layer_norm=True))
    model.set_adapter("b")
    perturb_trainable(model, seed=4)
    out_b = run(model, inputs)
    model.set_adapter("default")
    with pytest.raises(AdapterStateError, match="exactly one adapter"):
        model.merge_and_unload(adapter_names=["default", "b"])
    merged = model.merge_and_unload(adapter_names=["b"])
    torch.testing.assert_close(run(merged, inputs), out_b, atol=0, rtol=0)


def test_works_with_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    from test_trainer import ToyTask

    torch.manual_seed(0)
    model = get_peft_model(tiny_bert_cls(), SelectiveConfig(task_type="SEQ_CLS", bitfit=True))
    selected = set(trainable(model))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = ToyTask()
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=16, num_train_epochs=10, learning_rate=2e-2,
        save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data)
    first = trainer.evaluate()["eval_loss"]
    trainer.train()
    last = trainer.evaluate()["eval_loss"]
    assert last < first * 0.8, (first, last)
    changed = {n.removeprefix("base_model.model.") for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed <= selected and any(n.startswith("bert.") for n in changed)


# ----- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(), "selects nothing"),
        (dict(last_n_layers=0), "last_n_layers"),
        (dict(last_n_layers=True), "last_n_layers"),
        (dict(bitfit="yes"), "bitfit"),
        (dict(layer_norm=True, bias_modules=["query"]), "bitfit=True"),
        (dict(layer_norm=True, layers_pattern="layer"), "last_n_layers"),
        (dict(trainable_parameter_patterns=["(unclosed"]), "regular expression"),
    ],
)
def test_invalid_config(kwargs, message):
    with pytest.raises(PeftConfigError, match=message):
        SelectiveConfig(**kwargs)


def snapshot(model):
    return {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}


def assert_untouched(model, snap):
    assert all(torch.equal(p.detach(), snap[n][0]) and p.requires_grad == snap[n][1] for n, p in model.named_parameters())


@pytest.mark.parametrize(
    "build, config, message",
    [
        (tiny_llama, SelectiveConfig(bitfit=True), r"bitfit=True selects no parameter\. LlamaForCausalLM has \d+ parameter tensors .* 0 biases"),
        (tiny_bert_cls, SelectiveConfig(bitfit=True, bias_modules=["qurey"]), r"bias_modules \['qurey'\] match no module.*query"),
        (tiny_bert_cls, SelectiveConfig(last_n_layers=3), "has only 2 blocks"),
        (tiny_bert_cls, SelectiveConfig(last_n_layers=1, layers_pattern="blocks"), r"names no block list.*'bert\.encoder\.layer' \(2 x BertLayer\)"),
        (tiny_bart, SelectiveConfig(last_n_layers=1), r"has 2 block lists .*model\.encoder\.layers.*model\.decoder\.layers"),
        (tiny_bert_cls, SelectiveConfig(trainable_parameter_patterns=[r".*query\.weight", r".*qkv\.weight"]), r"'\.\*qkv\\\\\.weight' selects no parameter.*\d+ biases"),
        (tiny_bert_cls, SelectiveConfig(modules_to_save=["head"]), "modules_to_save entry 'head'"),
    ],
)
def test_nothing_selected_errors_leave_model_untouched(build, config, message):
    model = build()
    snap = snapshot(model)
    with pytest.raises(TargetModuleError, match=message):
        get_peft_model(model, config)
    assert_untouched(model, snap)


def test_model_without_layer_list():
    net = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    with pytest.raises(TargetModuleError, match="has no list of repeated blocks"):
        get_peft_model(net, SelectiveConfig(last_n_layers=1))
    model = get_peft_model(net, SelectiveConfig(layer_norm=True))  # other modes still work on any nn.Module
    assert set(trainable(model)) == {"1.weight", "1.bias"}


def test_bad_checkpoint_leaves_model_untouched(tmp_path):
    base, model = trained_bert(SelectiveConfig(bitfit=True))
    model.save_pretrained(tmp_path)
    other = SelectiveConfig(layer_norm=True)  # the weights file holds biases, not LayerNorm tensors
    fresh = copy.deepcopy(base)
    snap = snapshot(fresh)
    with pytest.raises(CheckpointError, match="does not fit"):
        PeftModel.from_pretrained(fresh, tmp_path, config=other)
    assert_untouched(fresh, snap)


def test_mixed_batch_is_refused():
    model = get_peft_model(tiny_bert_cls(), SelectiveConfig(bitfit=True))
    with pytest.raises(AdapterStateError, match="one adapter"):
        model(**text_inputs(batch=2), adapter_names=["default", "__base__"])


def test_cannot_mix_with_layer_methods():
    model = get_peft_model(tiny_bert_cls(), SelectiveConfig(bitfit=True))
    with pytest.raises(AdapterStateError, match="different methods"):
        model.add_adapter("lora", peftlab.LoraConfig(target_modules=["query"]))


def test_config_json_roundtrip(tmp_path):
    cfg = SelectiveConfig(bitfit=True, bias_modules=["query"], last_n_layers=2, layers_pattern="layer", trainable_parameter_patterns=[".*x"])
    cfg.save_pretrained(tmp_path)
    assert peftlab.PeftConfig.from_pretrained(tmp_path) == cfg


def test_deepcopy_keeps_an_independent_tuner():
    inputs = text_inputs()
    base, model = trained_bert(SelectiveConfig(bitfit=True))
    twin = copy.deepcopy(model)
    tuned = run(model, inputs)
    with twin.disable_adapter():
        torch.testing.assert_close(run(twin, inputs), run(base, inputs), atol=0, rtol=0)
        torch.testing.assert_close(run(model, inputs), tuned, atol=0, rtol=0)  # the original is not disabled
    torch.testing.assert_close(run(twin, inputs), tuned, atol=0, rtol=0)
