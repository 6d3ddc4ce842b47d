"""``peftlab inspect``: what in a model an adapter could target, and what each method picks by default."""

from __future__ import annotations

import re

from peftlab.errors import TargetModuleError, WorkbenchError
from peftlab.registry import method_for, registered_methods
from peftlab.targeting import candidates, default_target_modules, model_type


def load_model(name: str):  # noqa: ANN201 - a transformers model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging

    from peftlab.lab.setup import resolve_model

    logging.set_verbosity_error()  # the load report about the new classifier head is noise here

    try:
        path = resolve_model(name)
        architectures = getattr(AutoConfig.from_pretrained(path), "architectures", None) or []
        if any(a.endswith("ForCausalLM") for a in architectures):  # a language model: keep its lm_head
            return AutoModelForCausalLM.from_pretrained(path)
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    except (OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise WorkbenchError(f"cannot load model {name!r}: {first}") from None


def describe(name: str, show_all: bool = False) -> str:
    """A table of candidate modules (type, weight shape, parameters) and each method's defaults.

    Repeated blocks (``layer.1``, ``layer.2``...) are folded into the first one unless ``show_all``.
    """
    model = load_model(name)
    rows = candidates(model)
    lines = [f"{name} ({type(model).__name__}, model_type={model_type(model)}, "
             f"{sum(p.numel() for p in model.parameters()):,} parameters)", ""]
    shown = rows
    if not show_all:
        shown, seen = [], set()
        for c in rows:
            folded = re.sub(r"\.(\d+)\.", ".N.", c.name)
            if folded not in seen:
                seen.add(folded)
                shown.append(c)
    width = max((len(c.name) for c in shown), default=10)
    lines.append(f"{'module':<{width}}  {'type':<10}  {'shape':<14}  params")
    for c in shown:
        lines.append(f"{c.name:<{width}}  {c.type_name:<10}  {'x'.join(map(str, c.shape)):<14}  {c.num_params:,}")
    if len(shown) < len(rows):
        lines.append(f"... {len(rows) - len(shown)} more in the other blocks (same names with another index; --all lists them)")
    lines += ["", "default target_modules:"]
    for key in registered_methods():
        spec = method_for(key)
        if not spec.default_targets:
            continue
        try:
            targets = default_target_modules(model, spec.default_targets, key)
        except TargetModuleError:
            targets = None
        lines.append(f"  {key.lower():<14} {targets if targets else '(none for this model type; set target_modules)'}")
    return "\n".join(lines)
