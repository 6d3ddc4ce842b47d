"""Which modules of a model an adapter goes into. Pure functions: they read, never modify.

Matching rules (the same as Hugging Face peft's, so configs carry over):
  * ``target_modules`` as a list: a module matches an entry when its full name equals the
    entry or ends with ``"." + entry`` (e.g. ``"query"``, ``"attention.self.query"``);
  * as a string: a regular expression that must match the full module name;
  * ``"all-linear"``: every linear layer except the model's output head and trained heads.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from torch import nn

from peftlab import limits
from peftlab.base_layer import linear_types
from peftlab.errors import NoMatchingPeftModuleError, TargetModuleError

ALL_LINEAR = "all-linear"


@dataclass(frozen=True)
class Candidate:
    """A module that an adapter could target, as shown in errors and ``peftlab inspect``."""

    name: str
    type_name: str
    shape: tuple[int, ...]
    num_params: int


def name_matches(name: str, patterns: str | Sequence[str] | None, field: str = "target_modules") -> bool:
    """True when ``name`` matches ``patterns`` (regex string, or list of names/suffixes).

    A regex runs under :func:`peftlab.limits.user_match`'s time bound; ``field`` names it in the error.
    """
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return limits.user_match(patterns, name, field) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def pattern_value(patterns: dict[str, object], name: str, default: object) -> object:
    """Value for ``name`` in a rank/alpha pattern dict: the first key that matches its end.

    Keys are regular expressions matched against the end of the module name at a dot
    boundary (``"query"`` matches ``layer.0.attention.self.query``).
    """
    for key, value in patterns.items():
        if limits.user_match(rf"(?:.*\.)?(?:{key})", name, f"pattern key {key!r}"):
            return value
    return default


def layer_index(name: str, layers_pattern: str | Sequence[str] | None) -> int | None:
    """The block index of a module (``encoder.layer.3.attention...`` -> 3), if it has one."""
    if layers_pattern is None:
        found = re.match(r".*\.[^.]*\.(\d+)\.", name)
        return int(found.group(1)) if found else None
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)
    for pattern in patterns:
        found = limits.user_match(rf"(?:.*\.)?{pattern}\.(\d+)\.", name, "layers_pattern", full=False)
        if found:
            return int(found.group(1))
    return None


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the model's output projection(s), which all-linear leaves alone."""
    heads: set[str] = set()
    get_output = getattr(model, "get_output_embeddings", None)
    if callable(get_output):
        try:
            head = get_output()
        except (NotImplementedError, AttributeError):
            head = None
        if head is not None:
            heads.update(n for n, m in model.named_modules() if m is head)
    return heads


def candidates(model: nn.Module, types: tuple[type, ...] | None = None) -> list[Candidate]:
    """Every adaptable leaf layer of the model with its type, weight shape and size."""
    from peftlab.layers import LayerWrapper, ModulesToSave

    wanted = types or (*linear_types(), nn.Embedding, nn.Conv2d)
    out: list[Candidate] = []
    for name, module in model.named_modules():
        if isinstance(module, (LayerWrapper, ModulesToSave)) or not isinstance(module, wanted):
            continue
        weight = getattr(module, "weight", None)
        shape = tuple(weight.shape) if weight is not None else ()
        out.append(Candidate(name, type(module).__name__, shape, sum(p.numel() for p in module.parameters())))
    return out


def describe_candidates(model: nn.Module, limit: int = 12) -> str:
    """A short list of short and full names of the model's linear layers, for error messages."""
    names = [c.name for c in candidates(model, linear_types())]
    if not names:
        return "the model has no linear layers"
    short = sorted({n.rsplit(".", 1)[-1] for n in names})
    shown = ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")
    return f"short names: {', '.join(short)}; full names: {shown}"


def model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def default_target_modules(model: nn.Module, table: dict[str, list[str]], method: str) -> list[str]:
    """The method's default targets for this architecture, or an error listing the choices."""
    kind = model_type(model)
    names = [n for n, _ in model.named_modules()]
    # Tables list the module names of several transformers versions (ViT's query/value became
    # q_proj/v_proj); keep the ones this model has.
    present = [t for t in table.get(kind, []) if any(n == t or n.endswith("." + t) for n in names)]
    if present:
        return present
    raise TargetModuleError(
        f"{method}: no default target_modules for model type {kind!r} ({type(model).__name__}); "
        f"set target_modules explicitly, e.g. target_modules=['query', 'value'] or 'all-linear'. "
        f"Linear layers in this model: {describe_candidates(model)}."
    )


# Children of peft's ModulesToSaveWrapper. peft resolves "all-linear" for a second adapter against
# the already-wrapped model, so its saved target_modules can name e.g. "classifier.original_module";
# peft ignores such names when loading, and so do we (they can never name a layer of a fresh model).
_PEFT_WRAPPER_PARTS = frozenset({"original_module", "modules_to_save"})


def _peft_wrapper_artifact(target: str) -> bool:
    return any(part in _PEFT_WRAPPER_PARTS for part in target.split("."))


def find_targets(
    model: nn.Module,
    target_modules: str | Sequence[str],
    *,
    exclude_modules: str | Sequence[str] | None = None,
    layers_to_transform: int | Sequence[int] | None = None,
    layers_pattern: str | Sequence[str] | None = None,
    skip: Iterable[str] = (),
    method: str = "adapter",
) -> list[str]:
    """Names of the modules to adapt, in model order. Raises when nothing fits."""
    with limits.regex_budget():  # one time bound for every user regex matched here
        return _find_targets(model, target_modules, exclude_modules, layers_to_transform, layers_pattern, skip, method)


def _find_targets(
    model: nn.Module,
    target_modules: str | Sequence[str],
    exclude_modules: str | Sequence[str] | None,
    layers_to_transform: int | Sequence[int] | None,
    layers_pattern: str | Sequence[str] | None,
    skip: Iterable[str],
    method: str,
) -> list[str]:
    from peftlab.layers import LayerWrapper, ModulesToSave

    skip = set(skip)
    wrapped_inner = {
        f"{name}.{child}" if name else child
        for name, m in model.named_modules()
        if isinstance(m, (LayerWrapper, ModulesToSave))
        for child, _ in m.named_modules()
        if child
    }
    names = [n for n, _ in model.named_modules() if n and n not in wrapped_inner]
    if target_modules == ALL_LINEAR:
        heads = output_head_names(model)
        lin = linear_types()
        modules = dict(model.named_modules())
        matched = [
            n
            for n in names
            if isinstance(modules[n], (*lin, LayerWrapper)) and n not in heads and not any(n == s or n.endswith("." + s) for s in skip)
        ]
        matched = [n for n in matched if not isinstance(modules[n], LayerWrapper) or isinstance(modules[n].base_layer, lin)]
    else:
        matched = [n for n in names if name_matches(n, target_modules) and not any(n == s or n.endswith("." + s) for s in skip)]
        if not isinstance(target_modules, str):
            unmatched = [t for t in target_modules if not any(n == t or n.endswith("." + t) for n in names)
                         and not _peft_wrapper_artifact(t)]
            if unmatched:
                raise NoMatchingPeftModuleError(
                    f"{method}: target_modules {unmatched} match no module in {type(model).__name__}. "
                    f"Use names of the model's layers ({describe_candidates(model)}), a regex string, or 'all-linear'."
                )
    if exclude_modules is not None:
        matched = [n for n in matched if not name_matches(n, exclude_modules, "exclude_modules")]
    if layers_to_transform is not None:
        keep = {layers_to_transform} if isinstance(layers_to_transform, int) else set(layers_to_transform)
        matched = [n for n in matched if layer_index(n, layers_pattern) in keep]
    if not matched:
        raise NoMatchingPeftModuleError(
            f"{method}: target_modules={target_modules!r} selects no module in {type(model).__name__}"
            f"{' after exclude_modules/layers_to_transform' if exclude_modules or layers_to_transform is not None else ''}. "
            f"Candidates: {describe_candidates(model)}."
        )
    return matched
