"""Cases where peft changes something or warns without raising: peftlab does the same."""

from __future__ import annotations

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

