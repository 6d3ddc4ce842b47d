"""Selective tuning: train a chosen subset of the model's own tensors and insert nothing.

The selection is the union of the modes a :class:`SelectiveConfig` turns on:

* BitFit (Ben Zaken et al. 2022, https://arxiv.org/abs/2106.10199): bias terms only, optionally
  only those of some modules;
* last-N layers: every tensor of the top N transformer blocks (the classic partial fine-tune);
* layer-norm tuning: the weights and biases of LayerNorm / RMSNorm modules;
* explicit regexes over parameter names, and whole modules via ``modules_to_save`` (task heads).

No module is replaced: the method only flips ``requires_grad``. A checkpoint holds exactly the
tuned tensors under their own model keys (``base_model.model.<parameter name>``).

Memory: to give ``disable_adapter()`` the base model back, the tuner keeps a frozen copy of the
original value of every tuned tensor (one extra copy of the selection; for BitFit a fraction of a
percent of the model, for last-N layers N blocks' worth) and one more copy per inactive adapter.
Disabling swaps storage pointers, so it costs no copy and no time.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from peftlab import limits
from peftlab.base_layer import is_quantized
from peftlab.config import PeftConfig, PeftType
from peftlab.errors import AdapterStateError, PeftConfigError, TargetModuleError
from peftlab.registry import MethodSpec, register
from peftlab.targeting import name_matches
from peftlab.tuners.selective import SelectiveTuner

_NORM_NAME = re.compile(r".*(LayerNorm|RMSNorm|LayerNorm2d)$", re.IGNORECASE)


@dataclass
class SelectiveConfig(PeftConfig):
    """Which of the model's own tensors to train (the union of every mode that is set).

    Args:
        bitfit: train bias terms (tensors named ``bias``).
        bias_modules: with bitfit, only the biases of these modules (names or dotted suffixes,
            or a regex string matching the full module name); None means every bias.
        last_n_layers: train every tensor of the top N blocks of the model's layer list.
        layers_pattern: name (or dotted suffix) of the block list(s) for last_n_layers, e.g.
            ``"decoder.layers"``; None finds the one list of repeated blocks itself.
        layer_norm: train LayerNorm / RMSNorm weights and biases.
        trainable_parameter_patterns: regexes that must match a full parameter name
            (``re.fullmatch``, e.g. ``r".*attention\\.self\\.query\\.weight"``); each must match.
    """

    peft_type = PeftType.SELECTIVE

    bitfit: bool = False
    bias_modules: list[str] | str | None = None
    last_n_layers: int | None = None
    layers_pattern: list[str] | str | None = None
    layer_norm: bool = False
    trainable_parameter_patterns: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("bitfit", "layer_norm"):
            if not isinstance(getattr(self, name), bool):
                raise PeftConfigError(f"SelectiveConfig: {name} must be True or False, got {getattr(self, name)!r}.")
        n = self.last_n_layers
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise PeftConfigError(f"SelectiveConfig: last_n_layers must be a positive integer, got {n!r}.")
        if self.bias_modules is not None and not self.bitfit:
            raise PeftConfigError("SelectiveConfig: bias_modules only narrows BitFit; set bitfit=True or drop it.")
        if self.layers_pattern is not None and self.last_n_layers is None:
            raise PeftConfigError("SelectiveConfig: layers_pattern picks the block list for last_n_layers; set last_n_layers too.")
        for name in ("bias_modules", "layers_pattern", "trainable_parameter_patterns"):
            value = getattr(self, name)
            if isinstance(value, tuple):
                value = list(value)
                setattr(self, name, value)
            if isinstance(value, list) and not all(isinstance(v, str) for v in value):
                raise PeftConfigError(f"SelectiveConfig: {name} must hold strings, got {value!r}.")
        patterns = self.trainable_parameter_patterns
        if isinstance(patterns, str):
            self.trainable_parameter_patterns = patterns = [patterns]
        regexes = list(patterns or []) + ([self.bias_modules] if isinstance(self.bias_modules, str) else [])
        for pattern in regexes:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise PeftConfigError(f"SelectiveConfig: {pattern!r} is not a valid regular expression ({exc}).") from None
        if not (self.bitfit or self.last_n_layers or self.layer_norm or patterns or self.modules_to_save):
            raise PeftConfigError(
                "SelectiveConfig selects nothing: set bitfit=True, last_n_layers=N, layer_norm=True, "
                "trainable_parameter_patterns=[...] or modules_to_save=[...]."
            )


# ----- selection (pure: reads the model, raises when a requested mode selects nothing) -----------
def _module_of(param_name: str) -> str:
    return param_name.rpartition(".")[0]


def _is_norm(module: nn.Module) -> bool:
    norm_types = tuple(t for t in (nn.LayerNorm, getattr(nn, "RMSNorm", None)) if t is not None)
    return isinstance(module, norm_types) or bool(_NORM_NAME.fullmatch(type(module).__name__))


def block_lists(model: nn.Module, layers_pattern: list[str] | str | None = None) -> list[tuple[str, nn.ModuleList]]:
    """The model's list(s) of repeated transformer blocks.

    Without a pattern: the outermost ``nn.ModuleList`` whose children share one class; exactly
    one must exist. With a pattern: every such list whose name equals it or ends with it.
    """
    lists = [
        (n, m) for n, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(c) for c in m}) == 1
    ]
    shown = ", ".join(f"{n!r} ({len(m)} x {type(m[0]).__name__})" for n, m in lists) or "none"
    if layers_pattern is not None:
        wanted = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)
        found = [(n, m) for n, m in lists if any(n == p or n.endswith("." + p) for p in wanted)]
        if not found:
            raise TargetModuleError(
                f"SelectiveConfig: layers_pattern={layers_pattern!r} names no block list of {type(model).__name__}; "
                f"lists of repeated blocks: {shown}."
            )
        return found
    outer = [(n, m) for n, m in lists if not any(n.startswith(o + ".") for o, _ in lists if o != n)]
    if len(outer) != 1:
        problem = "has no list of repeated blocks" if not outer else f"has {len(outer)} block lists"
        raise TargetModuleError(
            f"SelectiveConfig: last_n_layers needs the model's layer list, but {type(model).__name__} {problem} "
            f"(found: {shown}). Set layers_pattern to the list to use (e.g. 'decoder.layers', or 'layers' for "
            f"the top blocks of each), or select tensors with trainable_parameter_patterns."
        )
    return outer


def _summary(params: dict[str, nn.Parameter], model: nn.Module) -> str:
    """Candidate counts shown when a mode selects nothing."""
    biases = [p for n, p in params.items() if n.rsplit(".", 1)[-1] == "bias"]
    norms = {n for n, m in model.named_modules() if _is_norm(m)}
    norm_params = [p for n, p in params.items() if _module_of(n) in norms]
    examples = ", ".join(list(params)[:4])
    return (
        f"{type(model).__name__} has {len(params)} parameter tensors ({sum(p.numel() for p in params.values()):,} values): "
        f"{len(biases)} biases ({sum(p.numel() for p in biases):,} values), {len(norm_params)} LayerNorm/RMSNorm "
        f"tensors ({sum(p.numel() for p in norm_params):,} values); names look like {examples}"
    )


def select_parameters(model: nn.Module, config: SelectiveConfig) -> dict[str, nn.Parameter]:
    """Parameter name -> parameter for every tensor the config tunes, in model order."""
    params = dict(model.named_parameters())
    chosen: set[str] = set()

    def need(found: set[str], what: str) -> set[str]:
        if not found:
            raise TargetModuleError(f"SelectiveConfig: {what} selects no parameter. {_summary(params, model)}.")
        return found

    if config.bitfit:
        biases = {n for n in params if n.rsplit(".", 1)[-1] == "bias"}
        if config.bias_modules is not None:
            if isinstance(config.bias_modules, list):
                modules = {_module_of(n) for n in biases}
                unmatched = [b for b in config.bias_modules if not any(name_matches(m, [b]) for m in modules)]
                if unmatched:
                    raise TargetModuleError(
                        f"SelectiveConfig: bias_modules {unmatched} match no module with a bias; modules with "
                        f"biases end in: {', '.join(sorted({m.rsplit('.', 1)[-1] for m in modules})) or 'none'}."
                    )
            biases = {n for n in biases if name_matches(_module_of(n), config.bias_modules)}
        chosen |= need(biases, f"bitfit=True{f' with bias_modules={config.bias_modules!r}' if config.bias_modules else ''}")
    if config.last_n_layers:
        found: set[str] = set()
        for list_name, blocks in block_lists(model, config.layers_pattern):
            if config.last_n_layers > len(blocks):
                raise TargetModuleError(
                    f"SelectiveConfig: last_n_layers={config.last_n_layers} but {list_name!r} has only {len(blocks)} "
                    f"blocks; use a number from 1 to {len(blocks)}."
                )
            for index in range(len(blocks) - config.last_n_layers, len(blocks)):
                prefix = f"{list_name}.{index}."
                found |= {n for n in params if n.startswith(prefix)}
        chosen |= need(found, f"last_n_layers={config.last_n_layers}")
    if config.layer_norm:
        norms = {n for n, m in model.named_modules() if _is_norm(m)}
        chosen |= need({n for n in params if _module_of(n) in norms}, "layer_norm=True")
    for pattern in config.trainable_parameter_patterns or []:
        matches = {n for n in params if limits.user_match(pattern, n, "trainable_parameter_patterns entry")}
        chosen |= need(matches, f"trainable_parameter_patterns entry {pattern!r}")
    for module in config.modules_to_save or []:
        roots = [n for n, _ in model.named_modules() if n and name_matches(n, [module])]
        chosen |= need({n for n in params if any(n.startswith(r + ".") for r in roots)}, f"modules_to_save entry {module!r}")
    packed = sorted({_module_of(n) for n in chosen if _module_of(n) in quantized_modules(model)})
    if packed:
        raise TargetModuleError(
            f"SelectiveConfig selects tensors of 4-/8-bit quantized layers ({', '.join(packed[:3])}"
            f"{', ...' if len(packed) > 3 else ''}); packed weights cannot be trained. Select biases or norms "
            f"(bitfit=True, layer_norm=True), or use an adapter method such as LoRA on a quantized base."
        )
    return {n: p for n, p in params.items() if n in chosen}


def quantized_modules(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if is_quantized(m)}


# ----- the tuner: swaps tensor values between adapters and the base ------------------------------
class SelectiveValues:
    """Keeps the base values of every tuned tensor and the values of inactive adapters.

    The active adapter's values live in the model's own parameters; switching adapters copies
    values in place, so optimizers keep valid references.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.selected: dict[str, list[str]] = {}  # adapter -> parameter names
        self.originals: dict[str, torch.Tensor] = {}  # parameter name -> frozen base value
        self.stash: dict[str, dict[str, torch.Tensor]] = {}  # inactive adapter -> its values
        self.active: str | None = None

    def _param(self, name: str) -> nn.Parameter:
        return self.model.get_parameter(name)

    def add(self, adapter_name: str, config: PeftConfig) -> None:
        assert isinstance(config, SelectiveConfig)
        chosen = select_parameters(self.model, config)  # raises before anything changes
        for name, param in chosen.items():
            # A tensor already tuned by another adapter keeps the base value recorded then.
            if name not in self.originals:
                self.originals[name] = param.detach().clone()
        self.selected[adapter_name] = list(chosen)
        if self.active is None:
            self.active = adapter_name
        else:
            self.stash[adapter_name] = {n: self.originals[n].clone() for n in chosen}

    def tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        if adapter_name == self.active:
            return {n: self._param(n) for n in self.selected[adapter_name]}
        if adapter_name not in self.stash:
            raise AdapterStateError(f"no selective adapter named {adapter_name!r}; known: {sorted(self.selected)}.")
        return self.stash[adapter_name]

    @torch.no_grad()
    def _restore_base(self, adapter_name: str) -> None:
        for name in self.selected[adapter_name]:
            self._param(name).copy_(self.originals[name])

    @torch.no_grad()
    def activate(self, adapter_name: str) -> None:
        if adapter_name == self.active:
            return
        if self.active is not None:
            old = self.active
            self.stash[old] = {n: self._param(n).detach().clone() for n in self.selected[old]}
            self._restore_base(old)
        for name, value in self.stash.pop(adapter_name).items():
            self._param(name).copy_(value)
        self.active = adapter_name

    def remove(self, adapter_name: str) -> None:
        if adapter_name not in self.selected:
            return
        if adapter_name == self.active:
            self._restore_base(adapter_name)
            self.active = None
        self.stash.pop(adapter_name, None)
        del self.selected[adapter_name]
        used = {n for names in self.selected.values() for n in names}
        self.originals = {n: v for n, v in self.originals.items() if n in used}

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        names = list(self.selected.get(self.active, [])) if self.active is not None else []
        self._swap(names)
        try:
            yield
        finally:
            self._swap(names)

    def _swap(self, names: list[str]) -> None:
        """Exchange live and base storage (no copy); calling it twice restores the state."""
        for name in names:
            param = self._param(name)
            param.data, self.originals[name] = self.originals[name], param.data

    def finish(self, keep: str | None) -> None:
        if keep is None:
            if self.active is not None:
                self._restore_base(self.active)
        else:
            self.activate(keep)
        self.selected.clear()
        self.originals.clear()
        self.stash.clear()
        self.active = None


def make_selective_tuner(model: nn.Module, spec: MethodSpec) -> SelectiveTuner:
    return SelectiveTuner(model, SelectiveValues(model))


register(MethodSpec(SelectiveConfig, make_tuner=make_selective_tuner, run_defaults={"bitfit": True}, learning_rates=(3e-4, 1e-3, 3e-3)))
