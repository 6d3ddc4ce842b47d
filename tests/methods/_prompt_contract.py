"""Generic checks for the prompt methods (prompt tuning, P-tuning, prefix tuning).

A row is ``PromptCase(build, inputs, ours, theirs)``: a tiny base model, its inputs and two config
factories (peftlab's and Hugging Face peft's, same settings). Parity copies peft's prompt-encoder
weights into ours, so both libraries must compute the same function of the same parameters.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

import peftlab
from _references import PROMPT_KEY, greedy_by_reference, prompt_reference_logits
from conftest import main_output, peft_oracle

GEN_KW = {"max_new_tokens": 4, "do_sample": False}


@dataclass
class PromptCase:
    build: Callable[[], nn.Module]
    inputs: Callable[[], dict[str, torch.Tensor]]
    ours: Callable[[], Any]
    theirs: Callable[[], Any]
    generates: bool = False


def run(model: nn.Module, inputs: dict) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return main_output(model(**inputs))


def generate(model: nn.Module, inputs: dict) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], **GEN_KW)


def greedy_by_forward(model: nn.Module, inputs: dict, steps: int = GEN_KW["max_new_tokens"]) -> torch.Tensor:
    """Greedy decoding that re-runs the full forward at every step: no cache, no generate().

    The reference for ``generate``: a prompt method's cached generation must pick the same tokens.
    Rows that produced EOS continue with the pad token, as ``generate`` does.
    """
    model.eval()
    config = model.config if hasattr(model, "config") else model.get_base_model().config
    eos, pad = config.eos_token_id, config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    if config.is_encoder_decoder:
        out = torch.full((ids.shape[0], 1), config.decoder_start_token_id, dtype=ids.dtype)
    else:
        out = ids
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    with torch.no_grad():
        for _ in range(steps):
            if config.is_encoder_decoder:
                logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=out).logits
            else:
                logits = model(input_ids=out, attention_mask=torch.ones_like(out)).logits
            step = logits[:, -1].argmax(-1)
            step = torch.where(done, torch.full_like(step, pad if pad is not None else 0), step)
            done |= step == eos if eos is not None else torch.zeros_like(done)
            out = torch.cat((out, step[:, None]), dim=1)
    return out


def peft_oracle_is_usable(case: PromptCase | None = None, generation: bool = False) -> bool:
    """peft 0.21.2 predates transformers 5.24's past_key_values -> cache rename: there it refuses prefix
    tuning and its prompt-method generate() picks tokens its own forward does not (see
    ``greedy_by_forward``). Those comparisons need transformers < 5.24; the others hold on both."""
    peft = peft_oracle()
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) < Version("5.24") or Version(peft.__version__) > Version("0.21.2"):
        return True
    is_prefix = case is not None and type(case.theirs()).__name__ == "PrefixTuningConfig"
    return not (generation or is_prefix)


def require_peft_oracle(case: PromptCase | None = None, generation: bool = False) -> None:
    if not peft_oracle_is_usable(case, generation):
        import transformers

        pytest.skip(f"peft 0.21.2 cannot serve as the oracle here on transformers {transformers.__version__} (cache rename)")


def perturb_trainable(model: nn.Module, seed: int = 11, heads_only: bool = False) -> None:
    """Move trainable parameters (prompt encoder and head copies) away from their init values.

    Head copies start equal to the base heads, so a head that is never saved, loaded or switched
    would pass any check made at init; with ``heads_only`` the prompt encoder is left alone. The
    noise follows registration order, so two models whose heads are copies of the same module
    receive the same values.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and not (heads_only and name.startswith("prompt_encoder.")):
                param.add_(torch.randn(param.shape, generator=g).to(param.device) * 0.5)


def _heads(saved: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in saved.items() if k != PROMPT_KEY}


def own_model(case: PromptCase, seed: int = 1, device: torch.device | None = None) -> tuple[nn.Module, nn.Module]:
    """(base, peftlab model) without peft, prompt rows and heads moved off their init values (on ``device`` if given)."""
    torch.manual_seed(0)
    base = case.build() if device is None else case.build().to(device)
    torch.manual_seed(seed)
    ours = peftlab.get_peft_model(copy.deepcopy(base), case.ours())
    perturb_trainable(ours)
    return base, ours


def twin_models(case: PromptCase, seed: int = 1) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(base, peft model, peftlab model) with identical prompt weights and (perturbed) heads."""
    peft = peft_oracle()

    require_peft_oracle(case)
    torch.manual_seed(0)
    base = case.build()
    torch.manual_seed(seed)
    theirs = peft.get_peft_model(copy.deepcopy(base), case.theirs())
    ours = peftlab.get_peft_model(copy.deepcopy(base), case.ours())
    ours.prompt_encoder["default"].load_state_dict(theirs.prompt_encoder["default"].state_dict())
    perturb_trainable(theirs, heads_only=True)
    perturb_trainable(ours, heads_only=True)
    their_heads = _heads(peft.get_peft_model_state_dict(theirs))
    our_heads = _heads(peftlab.get_peft_model_state_dict(ours))
    assert sorted(their_heads) == sorted(our_heads)
    for key, value in their_heads.items():
        torch.testing.assert_close(our_heads[key], value, rtol=0, atol=0, msg=key)
    base_heads = {k: v for k, v in base.state_dict().items() if f"base_model.{k}" in their_heads}
    assert all(not torch.equal(base_heads[k[len("base_model."):]], v) for k, v in their_heads.items()), "heads must move"
    return base, theirs, ours


def kind(case: PromptCase) -> str:
    return "prefix" if type(case.ours()).__name__ == "PrefixTuningConfig" else "embeddings"


def reference_logits(case: PromptCase, base: nn.Module, model: nn.Module, inputs: dict) -> torch.Tensor | None:
    """The hand-written reference (tests/_references.py) for ``model``'s saved tensors; None if none is written."""
    saved = peftlab.get_peft_model_state_dict(model)
    n = model.peft_config["default"].num_virtual_tokens
    return prompt_reference_logits(base, kind(case), saved, n, inputs["input_ids"], inputs.get("decoder_input_ids"))


def greedy_reference(case: PromptCase, base: nn.Module, model: nn.Module, inputs: dict) -> torch.Tensor | None:
    """Greedy tokens by full recompute over the reference forward (no generate(), no cache, no peft)."""
    ids = inputs["input_ids"]
    config = base.config
    pad = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
    if config.is_encoder_decoder:
        start = torch.full((ids.shape[0], 1), config.decoder_start_token_id, dtype=ids.dtype)
        step = {"input_ids": ids}
        forward = lambda seq: reference_logits(case, base, model, {**step, "decoder_input_ids": seq})  # noqa: E731
    else:
        start = ids
        forward = lambda seq: reference_logits(case, base, model, {"input_ids": seq})  # noqa: E731
    if forward(start) is None:
        return None
    return greedy_by_reference(forward, start, GEN_KW["max_new_tokens"], config.eos_token_id, pad)


def skip_without_witness(case: PromptCase, what: str) -> None:
    import transformers

    pytest.skip(f"{what}: no hand-written reference for {type(case.ours()).__name__} on {case.build.__name__}, and peft "
                f"0.21.2 cannot serve as the oracle on transformers {transformers.__version__} (cache rename)")


def check_forward_parity(case: PromptCase) -> None:
    """Against the hand-written reference (any transformers) and, where it can run, against peft."""
    base, ours = own_model(case)
    inputs = case.inputs()
    expected = reference_logits(case, base, ours, inputs)
    oracle = peft_oracle_is_usable(case)
    if expected is None and not oracle:
        skip_without_witness(case, "forward")
    if expected is not None:
        got = run(ours, inputs)
        base_out = run(base, inputs)
        tail = got[:, -base_out.shape[1]:] if got.dim() == 3 else got  # causal LM: drop virtual positions
        assert not torch.allclose(tail, base_out, atol=1e-4), "the prompt must change the output"
        # float32, two layers, attention over <= 12 positions: rounding ~1e-7 relative
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    if oracle:
        base, theirs, ours = twin_models(case)
        expected = run(theirs, inputs)
        got = run(ours, inputs)
        assert got.shape == expected.shape
        base_out = run(base, inputs)
        tail = expected[:, -base_out.shape[1]:] if expected.dim() == 3 else expected  # causal LM: drop virtual positions
        assert not torch.allclose(tail, base_out, atol=1e-4), "the prompt must change the output"
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def check_generate_parity(case: PromptCase) -> None:
    """generate() against greedy decoding over the reference forward and, where it can run, peft's generate()."""
    base, ours = own_model(case)
    inputs = case.inputs()
    expected = greedy_reference(case, base, ours, inputs)
    oracle = peft_oracle_is_usable(case, generation=True)
    if expected is None and not oracle:
        skip_without_witness(case, "generate")
    if expected is not None:
        got = generate(ours, inputs)
        assert torch.equal(got, expected), (got, expected)
    if oracle:
        base, theirs, ours = twin_models(case)
        expected = generate(theirs, inputs)
        got = generate(ours, inputs)
        assert got.shape == expected.shape, (got.shape, expected.shape)
        assert torch.equal(got, expected), (got, expected)
    if not base.config.is_encoder_decoder:  # decoder-only output starts with the prompt's real tokens
        assert torch.equal(got[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
        assert got.shape[1] == inputs["input_ids"].shape[1] + GEN_KW["max_new_tokens"]


def check_handwritten_checkpoint_loads(case: PromptCase, tmp_path) -> None:
    """A weights file written by hand in peft's layout (``prompt_embeddings`` + ``base_model.<head>``
    tensors, random values) loads into peftlab and gives the reference's output for those tensors."""
    from safetensors.torch import save_file

    base, ours = own_model(case)
    ours.save_pretrained(tmp_path)  # for adapter_config.json
    g = torch.Generator().manual_seed(3)
    written = {k: torch.randn(v.shape, generator=g) for k, v in peftlab.get_peft_model_state_dict(ours).items()}
    save_file(written, str(tmp_path / "adapter_model.safetensors"))
    loaded = peftlab.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    read_back = peftlab.get_peft_model_state_dict(loaded)
    assert sorted(read_back) == sorted(written)
    for key, value in written.items():
        torch.testing.assert_close(read_back[key], value, rtol=0, atol=0, msg=key)
    inputs = case.inputs()
    expected = reference_logits(case, base, loaded, inputs)
    if expected is not None:
        torch.testing.assert_close(run(loaded, inputs), expected, atol=1e-5, rtol=1e-5)


def check_saved_file_has_peft_layout(case: PromptCase, tmp_path) -> None:
    """peftlab's file holds exactly peft's keys: ``prompt_embeddings`` (the rows the model uses) and the
    head copies under ``base_model.<head path>``, with the trained (not the base) head values."""
    from safetensors.torch import load_file

    base, ours = own_model(case, seed=2)
    ours.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    base_state = base.state_dict()
    head_keys = {k for k in saved if k != PROMPT_KEY}
    assert PROMPT_KEY in saved and all(k.startswith("base_model.") and k[len("base_model."):] in base_state for k in head_keys)
    config = ours.peft_config["default"]
    has_head = config.task_type == "SEQ_CLS"
    assert bool(head_keys) == has_head, sorted(head_keys)
    for key in head_keys:
        assert not torch.equal(saved[key], base_state[key[len("base_model."):]]), f"{key} saved at its base value"
    n = config.num_virtual_tokens
    if kind(case) == "prefix":
        assert saved[PROMPT_KEY].shape == (n, config.num_layers * 2 * config.token_dim)
    inputs = case.inputs()
    expected = prompt_reference_logits(base, kind(case), saved, n, inputs["input_ids"], inputs.get("decoder_input_ids"))
    if expected is not None:
        torch.testing.assert_close(run(ours, inputs), expected, atol=1e-5, rtol=1e-5)


def check_peft_to_peftlab(case: PromptCase, tmp_path) -> None:
    check_handwritten_checkpoint_loads(case, tmp_path / "handwritten")
    if not peft_oracle_is_usable(case):
        return
    peft = peft_oracle()

    base, theirs, _ = twin_models(case)
    theirs.save_pretrained(tmp_path)
    loaded = peftlab.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    inputs = case.inputs()
    torch.testing.assert_close(run(loaded, inputs), run(theirs, inputs), atol=1e-5, rtol=1e-5)
    if case.generates:
        assert torch.equal(generate(loaded, inputs), greedy_by_forward(theirs, inputs))
    # peft's own reload of its file gives the same numbers, so the file is what both read.
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(run(loaded, inputs), run(reloaded, inputs), atol=1e-5, rtol=1e-5)


def check_peftlab_to_peft(case: PromptCase, tmp_path) -> None:
    check_saved_file_has_peft_layout(case, tmp_path / "layout")
    if not peft_oracle_is_usable(case):
        return
    peft = peft_oracle()
    from safetensors.torch import load_file

    base, theirs, ours = twin_models(case, seed=2)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    ours_file = load_file(os.path.join(tmp_path, "ours", "adapter_model.safetensors"))
    theirs_file = load_file(os.path.join(tmp_path, "theirs", "adapter_model.safetensors"))
    assert sorted(ours_file) == sorted(theirs_file)
    for key in theirs_file:
        torch.testing.assert_close(ours_file[key], theirs_file[key], atol=1e-6, rtol=1e-6, msg=key)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    inputs = case.inputs()
    torch.testing.assert_close(run(loaded, inputs), run(ours, inputs), atol=1e-5, rtol=1e-5)
    if case.generates:
        assert torch.equal(greedy_by_forward(loaded, inputs), generate(ours, inputs))
    ours_json = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert ours_json["peft_type"] == theirs.peft_config["default"].peft_type.value


def check_generate_matches_greedy_by_forward(case: PromptCase) -> None:
    _, ours = own_model(case)
    inputs = case.inputs()
    expected = greedy_by_forward(ours, inputs)
    assert torch.equal(generate(ours, inputs), expected), (generate(ours, inputs), expected)


def inputs_on(case: PromptCase, device: torch.device | None) -> dict:
    """The case's inputs, moved to ``device`` when one is given (tests/cuda/ runs these checks on CUDA)."""
    inputs = case.inputs()
    return inputs if device is None else {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def check_save_load_roundtrip(case: PromptCase, tmp_path, device: torch.device | None = None) -> None:
    base, ours = own_model(case, device=device)
    inputs = inputs_on(case, device)
    ours.save_pretrained(tmp_path)
    for trainable in (False, True):
        loaded = peftlab.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=trainable)
        torch.testing.assert_close(run(loaded, inputs), run(ours, inputs), atol=1e-6, rtol=1e-6)
        assert any(p.requires_grad for p in loaded.prompt_encoder.parameters()) == trainable
        saved, read_back = peftlab.get_peft_model_state_dict(ours), peftlab.get_peft_model_state_dict(loaded)
        assert sorted(read_back) == sorted(saved)
        for key, value in saved.items():  # heads included: they were perturbed, so a head left at init fails here
            torch.testing.assert_close(read_back[key], value, rtol=0, atol=0, msg=key)


def check_only_prompt_and_head_train(case: PromptCase, device: torch.device | None = None) -> None:
    torch.manual_seed(0)
    model = peftlab.get_peft_model(case.build() if device is None else case.build().to(device), case.ours())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("prompt_encoder.default.") for n in trainable)
    assert all(n.startswith("prompt_encoder.default.") or ".modules_to_save.default." in n for n in trainable), sorted(trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    model.train()
    inputs = inputs_on(case, device)
    for _ in range(3):
        loss = main_output(model(**inputs)).float().pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed <= trainable, f"frozen parameters changed: {sorted(changed - trainable)[:5]}"
    assert any(n.startswith("prompt_encoder.default.") for n in changed)
    assert all(n in changed for n in trainable if n.startswith("prompt_encoder.default.embedding"))


def expected_prefix_counts(case: PromptCase) -> tuple[int, int]:
    """(trainable, total) of a prefix-tuned model, from the base model's config alone.

    Rows: n x (layers * 2 * kv_width), kv_width = head_dim * key/value heads (grouped-query attention);
    with projection: the (n, kv_width) table plus Linear(kv_width, hidden) and Linear(hidden, rows' width).
    A classification head is trained as a copy, and both copies count in the total (as in peft).
    """
    torch.manual_seed(0)
    base = case.build()
    config = case.ours()
    text = base.config
    heads = getattr(text, "num_attention_heads", None) or getattr(text, "n_head", None) or text.num_heads
    hidden = getattr(text, "hidden_size", None) or getattr(text, "n_embd", None) or text.d_model
    head_dim = getattr(text, "head_dim", None) or getattr(text, "d_kv", None) or hidden // heads
    kv_width = head_dim * (getattr(text, "num_key_value_heads", None) or heads)
    layers = getattr(text, "num_decoder_layers", None) or getattr(text, "num_hidden_layers", None) or text.n_layer
    n, width = config.num_virtual_tokens, layers * 2 * kv_width
    if config.prefix_projection:
        inner = config.encoder_hidden_size or kv_width
        prompt = n * kv_width + (kv_width * inner + inner) + (inner * width + width)
    else:
        prompt = n * width
    head = sum(p.numel() for p in base.classifier.parameters()) if config.task_type == "SEQ_CLS" else 0
    return prompt + head, sum(p.numel() for p in base.parameters()) + prompt + head


def check_trainable_count_matches_peft(case: PromptCase, capsys) -> None:
    oracle = peft_oracle_is_usable(case)
    if kind(case) == "prefix":
        torch.manual_seed(0)
        ours = peftlab.get_peft_model(case.build(), case.ours())
        assert ours.get_nb_trainable_parameters() == expected_prefix_counts(case)
    elif not oracle:
        skip_without_witness(case, "trainable count")
    if not oracle:
        return
    _, theirs, ours = twin_models(case)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    ours.print_trainable_parameters()
    trainable, total = theirs.get_nb_trainable_parameters()
    assert f"trainable params: {trainable:,d} || all params: {total:,d}" in capsys.readouterr().out


def check_not_mergeable(case: PromptCase) -> None:
    _, ours = own_model(case)
    inputs = case.inputs()
    before = run(ours, inputs)
    with pytest.raises(peftlab.AdapterStateError, match="cannot be merged"):
        ours.merge_and_unload()
    with pytest.raises(peftlab.AdapterStateError, match="cannot be merged"):
        ours.merge_adapter()
    torch.testing.assert_close(run(ours, inputs), before)


def check_disable_gives_base(case: PromptCase) -> None:
    base, ours = own_model(case)
    inputs = case.inputs()
    with ours.disable_adapter():
        got = run(ours, inputs)
    # the head copies were perturbed: disabling must switch back to the original heads
    torch.testing.assert_close(got, run(base, inputs), atol=1e-6, rtol=0)


def prompt_contract_tests(cases: dict[str, PromptCase]) -> dict[str, Callable]:
    """Module-level test functions over a table of cases (pytest collects the returned dict)."""
    ids = list(cases)
    gen_ids = [k for k in ids if cases[k].generates]

    @pytest.mark.parametrize("case", ids)
    def test_forward_matches_peft(case):
        check_forward_parity(cases[case])

    @pytest.mark.parametrize("case", gen_ids)
    def test_greedy_generate_matches_peft(case):
        check_generate_parity(cases[case])

    @pytest.mark.parametrize("case", gen_ids)
    def test_generate_matches_greedy_by_forward(case):
        check_generate_matches_greedy_by_forward(cases[case])

    @pytest.mark.parametrize("case", ids)
    def test_peft_checkpoint_loads_in_peftlab(case, tmp_path):
        check_peft_to_peftlab(cases[case], tmp_path)

    @pytest.mark.parametrize("case", ids)
    def test_peftlab_checkpoint_loads_in_peft(case, tmp_path):
        check_peftlab_to_peft(cases[case], tmp_path)

    @pytest.mark.parametrize("case", ids)
    def test_save_load_roundtrip(case, tmp_path):
        check_save_load_roundtrip(cases[case], tmp_path)

    @pytest.mark.parametrize("case", ids)
    def test_only_prompt_and_head_change_in_training(case):
        check_only_prompt_and_head_train(cases[case])

    @pytest.mark.parametrize("case", ids)
    def test_trainable_count_matches_peft(case, capsys):
        check_trainable_count_matches_peft(cases[case], capsys)

    @pytest.mark.parametrize("case", ids[:1])
    def test_merge_is_refused(case):
        check_not_mergeable(cases[case])

    @pytest.mark.parametrize("case", ids)
    def test_disable_adapter_gives_base_model(case):
        check_disable_gives_base(cases[case])

    return {name: fn for name, fn in locals().items() if name.startswith("test_")}


class ToyTask(torch.utils.data.Dataset):
    """Label = whether token 5 is the first token: learnable in a few steps; ``lm``: a fixed sentence to model."""

    def __init__(self, n: int = 32, length: int = 6, lm: bool = False) -> None:
        self.lm = lm
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(6, 99, (n, length), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)
        self.ids[self.labels == 1, 0] = 5
        if lm:  # one fixed sentence: a prompt alone can make it likely
            self.ids[:] = torch.tensor([5, 17, 33, 61, 17, 33])[:length]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        item = {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "unused": 0}
        item["labels"] = self.ids[i] if self.lm else self.labels[i]
        return item


def check_trainer_trains(model: nn.Module, tmp_path, lm: bool = False, epochs: int = 6, lr: float = 3e-2) -> None:
    """HF Trainer runs a few steps: eval loss falls and only the prompt (and head copy) change."""
    from transformers import Trainer, TrainingArguments

    data = ToyTask(lm=lm)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, num_train_epochs=epochs, learning_rate=lr,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data)
    first = trainer.evaluate()["eval_loss"]
    trainer.train()
    last = trainer.evaluate()["eval_loss"]
    assert last < first * 0.9, (first, last)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert any(n.startswith("prompt_encoder.default.") for n in changed), changed
    assert all(n.startswith("prompt_encoder.default.") or ".modules_to_save.default." in n for n in changed), changed
