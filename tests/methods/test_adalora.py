"""AdaLoRA: the contract table, the budget schedule, allocation and regulariser parity with peft,
the Trainer callback, and rank_pattern-shrunk checkpoints in both directions."""

from __future__ import annotations

import copy
import importlib
import json
import sys

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import peftlab
from peftlab import AdaLoraConfig, AdapterStateError, PeftConfigError, TargetModuleError, get_peft_model
from peftlab.methods.adalora import svd_adapters
from peftlab.methods.adalora.budget import budget_schedule
from _contract import Case, contract_tests, conv_inputs, perturb_trainable, run
from conftest import ConvNet, peft_oracle, seq2seq_inputs, text_inputs, tiny_bert_cls, tiny_gpt2, tiny_t5


def _peft(**kwargs):
    return lambda: peft_oracle().AdaLoraConfig(**kwargs)


def _ours(**kwargs):
    # identity=False: the contract perturbs the trained tensors (perturb=True), as peft's init
    # with lambda = 0 is the only identity-preserving one and random N(0, 1) factors are huge.
    return lambda identity: AdaLoraConfig(**kwargs)


BERT = dict(task_type="SEQ_CLS", init_r=6, target_r=3, lora_alpha=16, total_step=20, target_modules=["query", "value", "dense"])
GPT2 = dict(task_type="CAUSAL_LM", init_r=4, target_r=2, total_step=10, lora_dropout=0.1, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
CONV = dict(init_r=3, target_r=1, lora_alpha=4, total_step=10, target_modules=["conv", "pointwise", "lin"])

T5 = dict(task_type="SEQ_2_SEQ_LM", init_r=4, target_r=2, lora_alpha=8, total_step=10, target_modules=["q", "v"])

CASES = {
    "bert-qv-dense": Case(tiny_bert_cls, text_inputs, _ours(**BERT), _peft(**BERT), perturb=True),
    "gpt2-conv1d-dropout": Case(tiny_gpt2, text_inputs, _ours(**GPT2), _peft(**GPT2), perturb=True),
    "convnet-conv2d-linear": Case(ConvNet, conv_inputs, _ours(**CONV), _peft(**CONV), perturb=True),
    "t5-seq2seq": Case(tiny_t5, seq2seq_inputs, _ours(**T5), _peft(**T5), perturb=True),
}
globals().update(contract_tests(CASES))

SMALL = dict(task_type="SEQ_CLS", init_r=4, target_r=2, lora_alpha=8, total_step=10, tinit=1, tfinal=2, target_modules=["query", "value"])


class OneLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 4)

    def forward(self, x):
        return self.lin(x)


def _labelled(inputs: dict) -> dict:
    return {**inputs, "labels": torch.tensor([0, 1, 2])}


def _pair(**overrides):
    """Tiny BERT with the same (perturbed) AdaLoRA weights in peft and in peftlab."""
    peft = peft_oracle()

    kwargs = {**SMALL, **overrides}
    torch.manual_seed(0)
    base = tiny_bert_cls()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.AdaLoraConfig(**kwargs))
    perturb_trainable(theirs)
    ours = get_peft_model(copy.deepcopy(base), AdaLoraConfig(**kwargs))
    for path, adapter in svd_adapters(ours.get_base_model(), "default"):
        layer = theirs.base_model.model.get_submodule(path)
        with torch.no_grad():
            for name in ("lora_A", "lora_E", "lora_B"):
                getattr(adapter, name).copy_(getattr(layer, name)["default"])
    with torch.no_grad():
        for (_, mine), (_, peer) in zip(
            ours.get_base_model().classifier.modules_to_save["default"].named_parameters(),
            theirs.base_model.model.classifier.modules_to_save["default"].named_parameters(),
        ):
            mine.copy_(peer)
    return base, theirs, ours


def _peft_factor(theirs, path: str, name: str) -> nn.Parameter:
    return getattr(theirs.base_model.model.get_submodule(path), name)["default"]


def _strip(pattern: dict) -> dict:
    return {k.removesuffix(".default"): list(v) for k, v in pattern.items()}


def _fake_steps(theirs, ours, steps, seed: int = 0) -> None:
    """Same gradients and same small weight moves in both models, then each one's allocator."""
    g = torch.Generator().manual_seed(seed)
    for step in steps:
        for path, adapter in svd_adapters(ours.get_base_model(), "default"):
            for name in ("lora_A", "lora_E", "lora_B"):
                mine, peer = getattr(adapter, name), _peft_factor(theirs, path, name)
                grad = torch.randn(mine.shape, generator=g)
                move = torch.randn(mine.shape, generator=g) * 0.01
                with torch.no_grad():
                    mine.add_(move)
                    peer.add_(move)
                mine.grad, peer.grad = grad.clone(), grad.clone()
        theirs.base_model.update_and_allocate(step)
        peftlab.update_and_allocate(ours, step)


# ----- the layer ----------------------------------------------------------------------------------
def test_update_is_scaled_svd_product():
    torch.manual_seed(0)
    net = OneLinear()
    x = torch.randn(3, 5)
    w, b = net.lin.weight.detach().clone(), net.lin.bias.detach().clone()
    model = get_peft_model(net, AdaLoraConfig(init_r=3, target_r=2, lora_alpha=6, total_step=5, target_modules=["lin"], init_lora_weights=False))
    ad = model.get_base_model().lin.adapters["default"]
    assert ad.lora_A.shape == (3, 5) and ad.lora_E.shape == (3, 1) and ad.lora_B.shape == (4, 3)
    assert float(ad.ranknum) == 3.0 and "ranknum" not in ad.state_dict()
    delta = ad.lora_B @ torch.diag(ad.lora_E.view(-1)) @ ad.lora_A * 6 / (3 + 1e-5)
    torch.testing.assert_close(model(x), x @ (w + delta.detach()).T + b)


def test_unsupported_layers_are_refused():
    with pytest.raises(TargetModuleError, match="nn.Embedding|Embedding"):
        get_peft_model(ConvNet(), AdaLoraConfig(total_step=5, target_modules=["emb"]))
    net = ConvNet()
    net.conv = nn.Conv2d(4, 8, 3, groups=2)
    with pytest.raises(TargetModuleError, match="grouped"):
        get_peft_model(net, AdaLoraConfig(total_step=5, target_modules=["conv"]))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(target_r=16, init_r=12, total_step=10), "target_r=16 is larger than init_r=12"),
        (dict(tinit=4, tfinal=6, total_step=10), "leaves no budget phase"),
        (dict(), "total_step is missing"),
        (dict(total_step=0), "total_step must be an integer >= 1"),
        (dict(total_step=10, beta1=1.0), "beta1 must be in"),
        (dict(total_step=10, deltaT=0), "deltaT must be"),
        (dict(total_step=10, orth_reg_weight=-0.1), "orth_reg_weight"),
        (dict(total_step=10, use_dora=True), "use_dora"),
        (dict(total_step=10, init_r=2, rank_pattern={"a.lora_E": [True]}), "has 1 entries but init_r=2"),
        (dict(total_step=10, rank_pattern={"a.query": [True] * 12}), "must name a layer's lora_E"),
    ],
)
def test_bad_config_is_refused(kwargs, message):
    with pytest.raises(PeftConfigError, match=message):
        AdaLoraConfig(**kwargs)


def test_bad_config_json_is_refused(tmp_path):
    AdaLoraConfig(total_step=10).save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    data["target_r"] = 20
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    with pytest.raises(PeftConfigError, match="larger than init_r"):
        peftlab.PeftConfig.from_pretrained(tmp_path)


def test_config_json_matches_peft_fields():
    peft = peft_oracle()

    ours = AdaLoraConfig(total_step=10).to_dict()
    theirs = peft.AdaLoraConfig(total_step=10).to_dict()
    for key in ("target_r", "init_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight", "total_step",
                "rank_pattern", "lora_alpha", "r", "lora_dropout"):
        assert ours[key] == theirs[key], key
    assert ours["peft_type"] == "ADALORA"


# ----- the budget schedule ------------------------------------------------------------------------
def test_budget_schedule_phases_by_hand():
    config = AdaLoraConfig(init_r=6, target_r=2, tinit=2, tfinal=3, total_step=15, deltaT=2)
    init, target = 24, 8  # 4 layers
    assert [budget_schedule(s, init, target, config) for s in (0, 1, 2)] == [(24, False)] * 3
    # budget phase: steps 3..12, progress (step - 2) / 10, budget = 8 + 16 * (1 - progress)^3
    assert budget_schedule(4, init, target, config) == (int(8 + 16 * 0.8**3), True)  # 16
    assert budget_schedule(5, init, target, config) == (int(8 + 16 * 0.7**3), False)  # 13, odd step: no mask
    assert budget_schedule(12, init, target, config) == (8, True)
    assert budget_schedule(13, init, target, config) == (8, True)
    budgets = [budget_schedule(s, init, target, config)[0] for s in range(15)]
    assert budgets == sorted(budgets, reverse=True)


def test_allocation_matches_peft_on_same_gradients():
    """Same weights and gradients: peft's RankAllocator and ours prune the same triplets."""
    _, theirs, ours = _pair(tinit=1, tfinal=2, total_step=10, deltaT=2)
    config = ours.peft_config["default"]
    seen = []
    for step in range(10):
        _fake_steps(theirs, ours, [step], seed=step)
        for path, adapter in svd_adapters(ours.get_base_model(), "default"):
            torch.testing.assert_close(adapter.lora_E, _peft_factor(theirs, path, "lora_E"), atol=0, rtol=0)
        theirs_pattern = theirs.peft_config["default"].rank_pattern
        assert (config.rank_pattern is None) == (theirs_pattern is None)
        if config.rank_pattern is not None:
            assert config.rank_pattern == _strip(theirs_pattern)
            seen.append(sum(sum(m) for m in config.rank_pattern.values()))
    # 4 layers x init_r 4 = 16 -> 4 layers x target_r 2 = 8, shrinking as it goes
    assert seen[-1] == 8 and seen[0] < 16 and seen == sorted(seen, reverse=True)
    for _, adapter in svd_adapters(ours.get_base_model(), "default"):
        assert adapter.importance is None  # statistics dropped at the final allocation
    pruned = sum(int((a.lora_E == 0).sum()) for _, a in svd_adapters(ours.get_base_model(), "default"))
    assert pruned == 16 - 8


def test_orthogonal_regularization_equals_peft_loss_term():
    _, theirs, ours = _pair(orth_reg_weight=0.3)
    inputs = _labelled(text_inputs())
    theirs.eval(), ours.eval()
    with torch.no_grad():
        plain = ours(**inputs).loss
        peft_loss = theirs(**inputs).loss
    term = peftlab.orthogonal_regularization(ours)
    assert term.requires_grad and term.item() > 0
    torch.testing.assert_close(plain + term.detach(), peft_loss, atol=1e-6, rtol=1e-6)
    # by hand: mean over A and B matrices of ||gram - I||_F, times the weight
    norms = []
    for _, a in svd_adapters(ours.get_base_model(), "default"):
        norms += [torch.linalg.norm(a.lora_A @ a.lora_A.T - torch.eye(4)), torch.linalg.norm(a.lora_B.T @ a.lora_B - torch.eye(4))]
    torch.testing.assert_close(term, 0.3 * torch.stack(norms).mean())


def test_training_loop_matches_peft():
    """Explicit loop (loss + regulariser, step, allocate) gives peft's weights and rank pattern."""
    _, theirs, ours = _pair(tinit=0, tfinal=1, total_step=5, lora_dropout=0.0)
    inputs = _labelled(text_inputs())
    opt_t = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-2)
    opt_o = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    theirs.eval(), ours.eval()  # no dropout: both models must see the same forward
    for step in range(5):
        theirs(**inputs).loss.backward()  # peft adds the regulariser inside forward
        (ours(**inputs).loss + peftlab.orthogonal_regularization(ours)).backward()
        opt_t.step(), opt_o.step()
        theirs.base_model.update_and_allocate(step)
        peftlab.update_and_allocate(ours, step)
        opt_t.zero_grad(), opt_o.zero_grad()
    for path, adapter in svd_adapters(ours.get_base_model(), "default"):
        for name in ("lora_A", "lora_E", "lora_B"):
            torch.testing.assert_close(getattr(adapter, name), _peft_factor(theirs, path, name), atol=1e-5, rtol=1e-5)
    assert ours.peft_config["default"].rank_pattern == _strip(theirs.peft_config["default"].rank_pattern)
    torch.testing.assert_close(run(ours, text_inputs()), run(theirs, text_inputs()), atol=1e-5, rtol=1e-5)


def test_update_and_allocate_needs_gradients_and_an_adalora_model():
    _, _, ours = _pair()
    with pytest.raises(AdapterStateError, match="after loss.backward"):
        peftlab.update_and_allocate(ours, 0)
    lora = get_peft_model(tiny_bert_cls(), peftlab.LoraConfig(target_modules=["query"]))
    with pytest.raises(AdapterStateError, match="not AdaLoRA"):
        peftlab.update_and_allocate(lora, 0)
    with pytest.raises(AdapterStateError, match="PeftModel"):
        peftlab.orthogonal_regularization(tiny_bert_cls())


# ----- rank_pattern-shrunk checkpoints ------------------------------------------------------------
def test_shrunk_peft_checkpoint_loads_in_peftlab(tmp_path):
    base, theirs, ours = _pair()
    _fake_steps(theirs, ours, range(9))  # past the final allocation at step 8
    perturb_trainable(theirs, seed=7)  # train on after the allocation ...
    theirs.base_model.update_and_allocate(9)  # ... with pruned triplets held at zero (final phase)
    theirs.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    loaded = peftlab.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    pattern = loaded.peft_config["default"].rank_pattern
    ranks = {path: a.rank for path, a in svd_adapters(loaded.get_base_model(), "default")}
    assert ranks == {k.removesuffix(".lora_E"): sum(v) for k, v in pattern.items()}
    assert sum(ranks.values()) == 8 and len(set(ranks.values())) > 1  # uneven allocation
    for path, rank in ranks.items():
        assert saved[f"base_model.model.{path}.lora_E"].shape == (rank, 1)
    torch.testing.assert_close(run(loaded, text_inputs()), run(theirs, text_inputs()), atol=1e-5, rtol=1e-5)
    loaded.merge_adapter()
    torch.testing.assert_close(run(loaded, text_inputs()), run(theirs, text_inputs()), atol=1e-5, rtol=1e-5)


_PEFT_RANK_PATTERN_WARNING = "ignore:The following rank_pattern keys did not match:RuntimeWarning"


@pytest.mark.filterwarnings(_PEFT_RANK_PATTERN_WARNING)  # peft warns so on its own AdaLoRA checkpoints too
def test_shrunk_peftlab_checkpoint_loads_in_peft_and_back(tmp_path):
    peft = peft_oracle()

    base, theirs, ours = _pair()
    _fake_steps(theirs, ours, range(8))
    expected = run(ours, text_inputs())
    ours.save_pretrained(tmp_path / "ours")
    pattern = ours.peft_config["default"].rank_pattern
    saved = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    for key, mask in pattern.items():
        module = key.removesuffix(".lora_E")
        assert saved[f"base_model.model.{module}.lora_A"].shape == (sum(mask), 32)
        assert saved[f"base_model.model.{module}.lora_B"].shape == (32, sum(mask))
    assert not any("ranknum" in k for k in saved)
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["rank_pattern"] == pattern
    peer = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(run(peer, text_inputs()), expected, atol=1e-5, rtol=1e-5)
    again = peftlab.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours", is_trainable=True)
    torch.testing.assert_close(run(again, text_inputs()), expected, atol=1e-6, rtol=1e-6)
    # a re-save of the shrunk model writes the same tensors
    again.save_pretrained(tmp_path / "again")
    resaved = load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in resaved.items()} == {k: v.shape for k, v in saved.items()}
    # the schedule runs once: a shrunk adapter cannot go back into the budget phase
    with pytest.raises(AdapterStateError, match="rank_pattern"):
        peftlab.update_and_allocate(again, 3)


# ----- the Trainer callback -----------------------------------------------------------------------
class _ToyTask(torch.utils.data.Dataset):
    def __init__(self, n: int = 32) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(6, 99, (n, 8), generator=g)
        self.labels = torch.randint(0, 3, (n,), generator=g)
        self.ids[:, 0] = self.labels + 2

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


@pytest.mark.filterwarnings(_PEFT_RANK_PATTERN_WARNING)
def test_callback_allocates_rank_in_a_trainer_run(tmp_path):
    peft = peft_oracle()
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    base = tiny_bert_cls()
    model = get_peft_model(copy.deepcopy(base), AdaLoraConfig(**{**SMALL, "total_step": 8}))
    callback = peftlab.AdaLoraCallback()
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=8, max_steps=8, learning_rate=1e-2,
        save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0, logging_steps=100,
    )
    Trainer(model=model, args=args, train_dataset=_ToyTask(), callbacks=[callback]).train()
    config = model.peft_config["default"]
    assert callback.last_budget == 2 * 4 and callback.last_orth_reg is not None and callback.last_orth_reg > 0
    assert config.rank_pattern is not None and sum(sum(m) for m in config.rank_pattern.values()) == 8
    live = sum(int((a.lora_E != 0).sum()) for _, a in svd_adapters(model.get_base_model(), "default"))
    assert live == 8  # from 4 layers x init_r 4 = 16 down to 4 x target_r 2
    model.save_pretrained(tmp_path / "adapter")
    peer = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter")
    torch.testing.assert_close(run(peer, text_inputs()), run(model, text_inputs()), atol=1e-5, rtol=1e-5)


def test_callback_warns_when_total_step_is_not_the_run_length(tmp_path):
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    model = get_peft_model(tiny_bert_cls(), AdaLoraConfig(**SMALL))  # total_step=10
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=2, save_strategy="no", report_to=[],
        use_cpu=True, disable_tqdm=True, logging_steps=100,
    )
    with pytest.warns(UserWarning, match="total_step=10 but the Trainer runs 2 steps"):
        Trainer(model=model, args=args, train_dataset=_ToyTask(), callbacks=[peftlab.AdaLoraCallback()]).train()


def test_callback_refuses_a_model_without_adalora(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = get_peft_model(tiny_bert_cls(), peftlab.LoraConfig(task_type="SEQ_CLS", target_modules=["query"]))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, save_strategy="no", report_to=[], use_cpu=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(AdapterStateError, match="not AdaLoRA"):
        Trainer(model=model, args=args, train_dataset=_ToyTask(), callbacks=[peftlab.AdaLoraCallback()]).train()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_callback_adds_the_regulariser_gradient():
    _, _, ours = _pair(orth_reg_weight=0.7)
    adapters = [a for _, a in svd_adapters(ours.get_base_model(), "default")]
    for a in adapters:
        a.lora_A.grad = torch.ones_like(a.lora_A)
    expected = torch.autograd.grad(peftlab.orthogonal_regularization(ours), [a.lora_A for a in adapters] + [a.lora_B for a in adapters])
    peftlab.AdaLoraCallback().on_pre_optimizer_step(None, None, None, model=ours)
    for a, g in zip(adapters, expected[: len(adapters)]):
        torch.testing.assert_close(a.lora_A.grad, 1 + g)
    for a, g in zip(adapters, expected[len(adapters):]):
        torch.testing.assert_close(a.lora_B.grad, g)
    assert all(a.lora_E.grad is None for a in adapters)  # lambda is not regularised


def test_callback_is_imported_lazily():
    """``import peftlab`` does not load the Trainer callback module; asking for the name does."""
    saved = sys.modules.pop("peftlab.methods.adalora.callback", None)
    try:
        importlib.reload(peftlab)
        assert "peftlab.methods.adalora.callback" not in sys.modules and "AdaLoraCallback" not in vars(peftlab)
        assert peftlab.AdaLoraCallback.__module__ == "peftlab.methods.adalora.callback"
        assert "peftlab.methods.adalora.callback" in sys.modules
    finally:
        if saved is not None:
            sys.modules["peftlab.methods.adalora.callback"] = saved


@pytest.mark.filterwarnings(_PEFT_RANK_PATTERN_WARNING)
@pytest.mark.filterwarnings("ignore:Adapter 'default'.*invalid shape")  # peft's ZeRO-3 guess about empty tensors
def test_layer_pruned_to_rank_zero_round_trips_with_peft(tmp_path):
    peft = peft_oracle()

    torch.manual_seed(0)
    base = tiny_bert_cls()
    pattern = {
        "bert.encoder.layer.0.attention.self.query.lora_E": [False] * 4,
        "bert.encoder.layer.1.attention.self.value.lora_E": [True, False, True, True],
    }
    model = get_peft_model(copy.deepcopy(base), AdaLoraConfig(**SMALL, rank_pattern=pattern))
    ranks = {p: a.rank for p, a in svd_adapters(model.get_base_model(), "default")}
    assert ranks == {
        "bert.encoder.layer.0.attention.self.query": 0, "bert.encoder.layer.0.attention.self.value": 4,
        "bert.encoder.layer.1.attention.self.query": 4, "bert.encoder.layer.1.attention.self.value": 3,
    }
    perturb_trainable(model)
    expected = run(model, text_inputs())
    model.save_pretrained(tmp_path)
    peer = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(run(peer, text_inputs()), expected, atol=1e-5, rtol=1e-5)
    peer.save_pretrained(tmp_path / "peft")
    back = peftlab.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(run(back, text_inputs()), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(peftlab.orthogonal_regularization(back), peftlab.orthogonal_regularization(model))
