"""Cases where peft changes something or warns without raising: peftlab does the same."""

from __future__ import annotations

import json
import warnings

import pytest

from conftest import tiny_llama
import peftlab

SECOND_TIME = "already has adapter layers"


def _warnings_of(call) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


def _second_time_warned(lib, first, second, unload: bool) -> bool:
    """Whether ``lib.get_peft_model`` warns when the base already went through ``first`` (None: a fresh base)."""
    base = tiny_llama()
    if first is not None:
        model = lib.get_peft_model(base, first(lib))
        if unload:
            base = model.unload()
    messages = _warnings_of(lambda: lib.get_peft_model(base, second(lib)))
    if lib is peftlab:
        return any(SECOND_TIME in m for m in messages)
    return any("modify a model with PEFT for a second time" in m for m in messages)


def _lora(lib):
    return lib.LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"])


def _lora_v(lib):
    return lib.LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["v_proj"])


def _prompt(lib):
    return lib.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)


# (first call's config or None, second call's config, unload the first in between, peftlab warns)
CASES = {
    "fresh base": (None, _lora, False, False),
    "lora twice": (_lora, _lora_v, False, True),
    "prompt tuning on a lora model": (_lora, _prompt, False, True),
    "prompt tuning twice (no adapter layers)": (_prompt, _prompt, False, False),
    "after unload()": (_lora, _lora_v, True, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_get_peft_model_on_an_adapted_model_warns_as_peft(case):
    first, second, unload, expected = CASES[case]
    assert _second_time_warned(peftlab, first, second, unload) is expected
    peft = pytest.importorskip("peft")
    assert _second_time_warned(peft, first, second, unload) is expected


def test_second_get_peft_model_warning_says_what_to_do_and_points_at_the_caller():
    base = tiny_llama()
    peftlab.get_peft_model(base, _lora(peftlab))
    with pytest.warns(UserWarning, match=SECOND_TIME) as caught:
        peftlab.get_peft_model(base, _lora_v(peftlab))
    message = next(w for w in caught if SECOND_TIME in str(w.message))
    assert ".unload()" in str(message.message) and "\n" not in str(message.message)
    assert message.filename == __file__


FAN_IN_FAN_OUT_CASES = {
    "lora on Conv1D": ("LoraConfig", dict(target_modules=["c_attn"]), True),
    "dora on Conv1D": ("LoraConfig", dict(target_modules=["c_attn"], use_dora=True), True),
    "adalora on Conv1D": ("AdaLoraConfig", dict(target_modules=["c_attn"], total_step=10), True),
    "ia3 on Conv1D": ("IA3Config", dict(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"]), True),
    "lora on Linear with fan_in_fan_out=True": ("LoraConfig", dict(target_modules=["q_proj"], fan_in_fan_out=True), False),
}


def _saved_fan_in_fan_out(lib, config_name: str, kwargs: dict, tmp_path) -> tuple[bool, bool, list[str]]:
    """(stored config's fan_in_fan_out, the saved adapter_config.json's, the warnings about it)."""
    from conftest import tiny_gpt2

    base = tiny_llama() if "q_proj" in kwargs["target_modules"] else tiny_gpt2()
    config = getattr(lib, config_name)(task_type="CAUSAL_LM", **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = lib.get_peft_model(base, config)
    folder = tmp_path / lib.__name__
    model.save_pretrained(str(folder))
    saved = json.loads((folder / "adapter_config.json").read_text())["fan_in_fan_out"]
    return model.peft_config["default"].fan_in_fan_out, saved, [str(w.message) for w in caught if "fan_in_fan_out" in str(w.message)]


@pytest.mark.parametrize("case", list(FAN_IN_FAN_OUT_CASES))
def test_a_wrong_fan_in_fan_out_is_corrected_in_the_saved_config_as_peft(case, tmp_path):
    config_name, kwargs, expected = FAN_IN_FAN_OUT_CASES[case]
    stored, saved, messages = _saved_fan_in_fan_out(peftlab, config_name, kwargs, tmp_path)
    assert stored is expected and saved is expected
    assert len(messages) == 1 and f"setting fan_in_fan_out={expected}" in messages[0]
    peft = pytest.importorskip("peft")
    assert _saved_fan_in_fan_out(peft, config_name, kwargs, tmp_path)[:2] == (stored, saved)
