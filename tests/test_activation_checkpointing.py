"""Activation checkpointing with every layer method: the same loss and gradients as without it.

Recomputation runs the same float64 operations on the same inputs with the RNG state restored,
so loss and gradients agree to the last bits; 1e-12 leaves room for nothing but summation
order. The fused LoRA kernel draws its dropout mask from numpy's SFC64 seeded by one draw from
torch's generator: the mask-replay test checks that the recomputed masks are the first ones.
"""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import tiny_llama
from peftlab import (
    AdaLoraConfig,
    BottleneckConfig,
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    get_peft_model,
)
from peftlab import kernels, output_stash

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = {
    "lora-fused-dropout": lambda: LoraConfig(task_type="CAUSAL_LM", r=4, lora_dropout=0.2, target_modules=ALL, init_lora_weights=False),
    # p <= 0.05: the kernel draws drop positions instead of a keep mask
    "lora-fused-sparse-dropout": lambda: LoraConfig(task_type="CAUSAL_LM", r=4, lora_dropout=0.05, target_modules=ALL, init_lora_weights=False),
    "lora-no-dropout": lambda: LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=ALL, init_lora_weights=False),
    "dora": lambda: LoraConfig(task_type="CAUSAL_LM", r=4, lora_dropout=0.2, target_modules=ALL, use_dora=True, init_lora_weights=False),
    "ia3": lambda: IA3Config(task_type="CAUSAL_LM", init_ia3_weights=False),
    "loha": lambda: LoHaConfig(task_type="CAUSAL_LM", r=4, target_modules=ALL, rank_dropout=0.2, module_dropout=0.3, init_weights=False),
    "lokr": lambda: LoKrConfig(task_type="CAUSAL_LM", r=4, target_modules=ALL, rank_dropout=0.2, init_weights=False),
    "adalora": lambda: AdaLoraConfig(task_type="CAUSAL_LM", init_r=4, target_r=2, total_step=10, lora_dropout=0.2, target_modules=ALL),
    "bottleneck": lambda: BottleneckConfig(task_type="CAUSAL_LM", bottleneck_size=4, adapter_dropout=0.2, init_weights=False),
}


def _models(method: str):
    torch.manual_seed(0)
    base = tiny_llama().double()
    model = get_peft_model(base, METHODS[method]())
    if method in ("adalora",):  # its B starts at zero: perturb so every factor gets a gradient
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.1)
    model = model.double()
    return model, copy.deepcopy(model)


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 99, (2, 10), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def _step(model, batch, seed=5):
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize(("reentrant", "keep_narrow_outputs"), [(False, True), (False, False), (True, False)])
def test_same_gradients_with_and_without_checkpointing(method, reentrant, keep_narrow_outputs):
    plain, checkpointed = _models(method)
    checkpointed.activation_checkpointing_enable({"use_reentrant": reentrant}, keep_narrow_outputs=keep_narrow_outputs)
    assert all(layer.gradient_checkpointing for layer in checkpointed.get_base_model().model.layers)
    batch = _batch()
    loss_a, grads_a = _step(plain, batch)
    loss_b, grads_b = _step(checkpointed, batch)
    assert abs(float(loss_a - loss_b)) < 1e-12
    # the same adapter tensors got gradients (LoHa's module_dropout skips whole adapters)
    assert grads_a and set(grads_a) == set(grads_b)
    if method != "loha":
        assert set(grads_a) == {n for n, p in plain.named_parameters() if p.requires_grad}
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=0, atol=1e-12, msg=name)


@pytest.mark.parametrize("method", ["lora-fused-dropout", "lora-fused-sparse-dropout"])
def test_recomputed_fused_dropout_masks_are_the_first_ones(monkeypatch, method):
    _, model = _models(method)
    model.gradient_checkpointing_enable()
    masks: list[torch.Tensor] = []
    real = kernels.DropMask.draw

    def recording(shape, p, device):
        drop = real(shape, p, device)
        assert drop.sparse == (p <= 0.05)
        masks.append(drop.keep())
        return drop

    monkeypatch.setattr(kernels.DropMask, "draw", recording)
    _step(model, _batch())
    per_pass = 2 * len(ALL)  # 2 decoder layers x 7 adapted linears
    assert len(masks) == 2 * per_pass  # forward, then each layer again during backward
    first, again = masks[:per_pass], masks[per_pass:]
    # recomputation goes layer by layer in reverse, each layer's adapters in forward order
    replay = again[len(ALL):] + again[: len(ALL)]
    for a, b in zip(first, replay):
        assert torch.equal(a, b)
    assert any(not torch.equal(first[0], m) for m in first[1:])  # masks differ across layers


def test_trainer_gradient_checkpointing_trains_the_same_weights(tmp_path, monkeypatch):
    from transformers import Trainer, TrainingArguments

    counts = _count_stash(monkeypatch)
    batch = _batch()
    data = [{"input_ids": batch["input_ids"][i], "labels": batch["labels"][i]} for i in range(2)] * 4
    trained = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = get_peft_model(tiny_llama(), METHODS["lora-fused-dropout"]())
        args = TrainingArguments(
            output_dir=str(tmp_path / str(checkpointing)), per_device_train_batch_size=2, max_steps=3, learning_rate=1e-2,
            save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0, gradient_checkpointing=checkpointing,
        )
        Trainer(model=model, args=args, train_dataset=data).train()
        # the Trainer's checkpointing keeps the narrow layers' outputs: 3 steps x 2 blocks x 5 layers replayed
        assert counts["replayed"] == (3 * 2 * len(NARROW) if checkpointing else 0)
        layers = model.get_base_model().model.layers
        assert all(layer.gradient_checkpointing == checkpointing for layer in layers)
        trained.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    # fp32 AdamW on identical gradients (up to summation order): 3 steps of lr 1e-2 move a
    # weight by <= 3e-2, and equal-to-rounding gradients give updates equal to ~1e-6 of that.
    for name in trained[0]:
        torch.testing.assert_close(trained[1][name], trained[0][name], rtol=0, atol=1e-6, msg=name)


NARROW = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]  # out_features <= in_features in tiny_llama


def _count_stash(monkeypatch) -> dict[str, int]:
    counts = {"kept": 0, "taken": 0, "replayed": 0}
    real_keep, real_take = output_stash.OutputStash.keep, output_stash.OutputStash.take

    def keep(self, layer, out):
        counts["kept"] += 1
        return real_keep(self, layer, out)

    def take(self, layer, shape, dtype):
        out = real_take(self, layer, shape, dtype)
        counts["taken"] += 1
        counts["replayed"] += out is not None
        return out

    monkeypatch.setattr(output_stash.OutputStash, "keep", keep)
    monkeypatch.setattr(output_stash.OutputStash, "take", take)
    return counts


@pytest.mark.parametrize("keep_narrow_outputs", [True, False])
def test_recomputation_replays_the_narrow_layers_outputs(monkeypatch, keep_narrow_outputs):
    """Each narrow LoRA layer's output is kept in forward and handed back in recomputation (its base
    matmul skipped); the widening gate/up layers and keep_narrow_outputs=False compute everything again."""
    base = tiny_llama()
    config = base.config
    for name in ALL:
        narrow = name in NARROW
        assert narrow == output_stash.OutputStash.wanted(*_in_out(config, name))
    _, model = _models("lora-fused-sparse-dropout")
    model.activation_checkpointing_enable(keep_narrow_outputs=keep_narrow_outputs)
    counts = _count_stash(monkeypatch)
    _step(model, _batch())
    per_step = 2 * len(NARROW) if keep_narrow_outputs else 0  # 2 decoder layers
    assert counts == {"kept": per_step, "taken": per_step, "replayed": per_step}


def _in_out(config, name: str) -> tuple[int, int]:
    d, kv = config.hidden_size, config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
    return {"q_proj": (d, d), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (d, d),
            "gate_proj": (d, config.intermediate_size), "up_proj": (d, config.intermediate_size),
            "down_proj": (config.intermediate_size, d)}[name]


class _ChangesOutputInPlace(torch.nn.Module):
    """A block that changes its projection's output in place after the layer returned it."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 6)
        self.head = torch.nn.Linear(6, 9)  # widening: never kept

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(x)
        y.mul_(2.0)  # the kept output no longer equals what the layer returned
        return self.head(torch.tanh(y))


def test_an_output_changed_in_place_is_computed_again(monkeypatch):
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    block = get_peft_model(_ChangesOutputInPlace(), LoraConfig(r=2, target_modules=["proj", "head"], lora_dropout=0.05,
                                                               init_lora_weights=False)).double()
    block.train()
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    grads = []
    counts = _count_stash(monkeypatch)
    for context_fn in (None, output_stash.checkpoint_contexts):
        block.zero_grad(set_to_none=True)
        x.grad = None
        torch.manual_seed(3)
        if context_fn is None:
            out = block(x)
        else:
            out = checkpoint(block, x, use_reentrant=False, context_fn=context_fn)
        out.square().sum().backward()
        grads.append([x.grad.clone()] + [p.grad.clone() for p in block.parameters() if p.requires_grad])
    assert counts == {"kept": 1, "taken": 1, "replayed": 0}  # proj (8 -> 6) kept, changed, computed again
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-12)


def test_stash_hands_back_only_the_next_layers_unchanged_output():
    stash = output_stash.OutputStash()
    first, second = object(), object()
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    stash.keep(first, a)
    stash.keep(second, b)
    assert stash.nbytes == 2 * a.untyped_storage().nbytes()
    assert stash.take(second, (4, 3), torch.float32) is None  # not next: nothing is popped
    assert torch.equal(stash.take(first, (4, 3), torch.float32), a)
    b.add_(1.0)  # changed after it was kept
    assert stash.take(second, (4, 3), torch.float32) is None
    assert stash.take(second, (4, 3), torch.float32) is None and stash.nbytes == 0


def test_a_callers_context_fn_runs_beside_the_stash(monkeypatch):
    entered: list[str] = []

    class Marker:
        def __init__(self, name: str) -> None:
            self.name = name

        def __enter__(self):
            entered.append(self.name)

        def __exit__(self, *exc):
            return False

    plain, checkpointed = _models("lora-fused-dropout")
    checkpointed.gradient_checkpointing_enable(
        {"use_reentrant": False, "context_fn": lambda: (Marker("forward"), Marker("recompute"))})
    counts = _count_stash(monkeypatch)
    batch = _batch()
    _, grads_a = _step(plain, batch)
    _, grads_b = _step(checkpointed, batch)
    assert entered == ["forward", "forward", "recompute", "recompute"]  # 2 blocks, recomputed in reverse
    assert counts["replayed"] == 2 * len(NARROW)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=0, atol=1e-12, msg=name)


@pytest.mark.parametrize("autocast", [False, True])
def test_kept_outputs_give_the_gradients_of_a_full_recomputation(autocast):
    """fp32, and bf16 autocast (the kept outputs are bf16 there): the replayed outputs are the very
    tensors the forward computed, and recomputing them runs the same CPU kernels on the same inputs,
    so both checkpointing modes give bit-identical gradients."""
    grads = []
    for keep in (True, False):
        torch.manual_seed(0)
        model = get_peft_model(tiny_llama(), METHODS["lora-fused-sparse-dropout"]())
        model.activation_checkpointing_enable(keep_narrow_outputs=keep)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            grads.append(_step(model, _batch())[1])
    assert grads[0] and set(grads[0]) == set(grads[1])
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


def test_prepare_model_for_kbit_training_checkpointing_keeps_narrow_outputs(monkeypatch):
    """The QLoRA recipe's preparation turns checkpointing on for the base model before the adapters
    exist; the fused LoRA nodes added afterwards still replay their kept outputs."""
    from peftlab import prepare_model_for_kbit_training

    plain, _ = _models("lora-fused-sparse-dropout")
    torch.manual_seed(0)
    base = prepare_model_for_kbit_training(tiny_llama().double(), use_gradient_checkpointing=True)
    model = get_peft_model(base, METHODS["lora-fused-sparse-dropout"]()).double()
    model.load_state_dict(plain.state_dict())
    counts = _count_stash(monkeypatch)
    batch = _batch()
    _, grads_a = _step(plain, batch)
    _, grads_b = _step(model, batch)
    assert counts["replayed"] == 2 * len(NARROW)
    assert grads_a and set(grads_a) == set(grads_b)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=0, atol=1e-12, msg=name)


def test_gpt2_conv1d_layers_replay_their_outputs_with_equal_gradients(monkeypatch):
    """GPT-2's Conv1D layers (weights stored (in, out)) through the same path: attn.c_proj and
    mlp.c_proj are narrow (kept), c_attn and c_fc widen (computed again); model dropout on."""
    from conftest import tiny_gpt2

    torch.manual_seed(0)
    config = LoraConfig(task_type="CAUSAL_LM", r=4, lora_dropout=0.05, target_modules=["c_attn", "c_proj", "c_fc"],
                        fan_in_fan_out=True, init_lora_weights=False)
    plain = get_peft_model(tiny_gpt2(), config).double()
    checkpointed = copy.deepcopy(plain)
    checkpointed.gradient_checkpointing_enable()
    counts = _count_stash(monkeypatch)
    batch = _batch()
    loss_a, grads_a = _step(plain, batch)
    loss_b, grads_b = _step(checkpointed, batch)
    assert counts == {"kept": 4, "taken": 4, "replayed": 4}  # 2 blocks x (attn.c_proj, mlp.c_proj)
    assert abs(float(loss_a - loss_b)) < 1e-12
    assert grads_a and set(grads_a) == set(grads_b) == {n for n, p in plain.named_parameters() if p.requires_grad}
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=0, atol=1e-12, msg=name)


def test_offloaded_checkpointing_keeps_no_outputs_on_the_device(monkeypatch):
    """offload=True asks for the least device memory: block inputs go to the host and no layer
    output is kept beside them. transformers offloads through pinned memory, which needs an
    accelerator, so here the offload request is recorded and the checkpointing itself runs without it."""
    plain, checkpointed = _models("lora-fused-dropout")
    base = checkpointed.get_base_model()
    real_enable, requested = base.activation_checkpointing_enable, {}

    def enable(activation_checkpointing_kwargs=None, every_n_layers=1, offload=False):
        requested.update(kwargs=activation_checkpointing_kwargs, offload=offload)
        real_enable(activation_checkpointing_kwargs=activation_checkpointing_kwargs, every_n_layers=every_n_layers)

    monkeypatch.setattr(base, "activation_checkpointing_enable", enable)
    checkpointed.activation_checkpointing_enable(offload=True)
    assert requested["offload"] and "context_fn" not in (requested["kwargs"] or {})
    counts = _count_stash(monkeypatch)
    batch = _batch()
    _, grads_a = _step(plain, batch)
    _, grads_b = _step(checkpointed, batch)
    assert counts == {"kept": 0, "taken": 0, "replayed": 0}
    assert grads_a and set(grads_a) == set(grads_b)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=0, atol=1e-12, msg=name)
