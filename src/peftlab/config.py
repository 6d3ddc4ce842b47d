"""Configuration base class, task and method enums, JSON round-trip.

Every method's config is a dataclass that inherits :class:`PeftConfig`. The JSON written by
:meth:`PeftConfig.save_pretrained` uses the field names of Hugging Face peft's
``adapter_config.json``, so either library can read the other's file.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import re
import typing
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

from peftlab.errors import PeftConfigError
from peftlab.io import atomic_write_text

CONFIG_NAME = "adapter_config.json"


class TaskType(str, enum.Enum):
    """What the wrapped model does; decides which head is trained and saved."""

    SEQ_CLS = "SEQ_CLS"
    TOKEN_CLS = "TOKEN_CLS"
    CAUSAL_LM = "CAUSAL_LM"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


class PeftType(str, enum.Enum):
    """Method names as they appear in ``adapter_config.json`` (``peft_type``)."""

    LORA = "LORA"
    IA3 = "IA3"
    LOHA = "LOHA"
    LOKR = "LOKR"
    ADALORA = "ADALORA"
    PROMPT_TUNING = "PROMPT_TUNING"
    PREFIX_TUNING = "PREFIX_TUNING"
    P_TUNING = "P_TUNING"
    BOTTLENECK = "BOTTLENECK"
    SELECTIVE = "SELECTIVE"
    TRAINABLE_TOKENS = "TRAINABLE_TOKENS"
    VERA = "VERA"
    OFT = "OFT"


# Heads that task types train and save alongside the adapter, as Trainer users expect. As in peft
# 0.22, classification also trains DistilBERT-style ``pre_classifier`` layers (randomly initialised
# with the head); a name the model lacks is skipped.
CLASSIFIER_HEAD_NAMES: dict[TaskType, tuple[str, ...]] = {
    TaskType.SEQ_CLS: ("classifier", "score", "pre_classifier"),
    TaskType.TOKEN_CLS: ("classifier", "score", "pre_classifier"),
    TaskType.QUESTION_ANS: ("qa_outputs",),
}

# Matching names against a model's modules costs (names x modules); a model's fully trained modules
# are a handful, so a longer list is a mistake (or hostile input that would run for minutes).
MAX_MODULES_TO_SAVE = 1000

# Keys that Hugging Face peft writes into adapter_config.json and that carry no meaning for
# peftlab when they hold their default value. A non-default value means the adapter uses a
# feature peftlab lacks, so loading it would silently give a different model: that is an error.
_PEFT_BOOKKEEPING_KEYS = {"peft_version", "auto_mapping", "megatron_core", "qalora_group_size"}


@dataclass
class PeftConfig:
    """Fields shared by every method.

    Args:
        task_type: what the model does (see :class:`TaskType`); decides the trained head.
        base_model_name_or_path: the model the adapter was trained on (informational).
        revision: hub revision of the base model (informational).
        inference_mode: True when loaded for inference; adapter weights are then frozen.
        modules_to_save: extra modules (exact name or dotted suffix) trained in full and saved.
    """

    peft_type: ClassVar[PeftType]
    # peft fields this method does not implement, with the value meaning "feature off".
    unsupported_peft_fields: ClassVar[dict[str, Any]] = {}
    # peftlab extensions that peft's config of the same method lacks: left out of the JSON
    # while unset, so peft reads our files without warnings.
    peftlab_only_fields: ClassVar[tuple[str, ...]] = ()

    task_type: TaskType | str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        from peftlab import limits  # here: limits reads layers, which a config never needs otherwise

        limits.check_config_sizes(self)  # every size field of every method, before anything is built
        if self.task_type is not None:
            try:
                self.task_type = TaskType(self.task_type)
            except ValueError:
                choices = ", ".join(t.value for t in TaskType)
                raise PeftConfigError(
                    f"task_type={self.task_type!r} is not known; use one of: {choices}."
                ) from None
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str) or not all(isinstance(m, str) for m in self.modules_to_save):
                raise PeftConfigError(f"modules_to_save must be a list of module names (strings), got {self.modules_to_save!r:.200}.")
            self.modules_to_save = list(dict.fromkeys(self.modules_to_save))
            if len(self.modules_to_save) > MAX_MODULES_TO_SAVE:
                raise PeftConfigError(
                    f"modules_to_save names {len(self.modules_to_save)} modules; at most {MAX_MODULES_TO_SAVE} are accepted "
                    f"(fully trained modules are a handful: a classifier, score, embed_tokens). Name the parent modules instead."
                )

    @property
    def is_prompt_learning(self) -> bool:
        return False

    # ----- JSON round-trip ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"peft_type": self.peft_type.value}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, enum.Enum):
                value = value.value
            elif isinstance(value, (set, tuple)):
                value = sorted(value) if isinstance(value, set) else list(value)
            if f.name in self.peftlab_only_fields and value is None:
                continue
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PeftConfig":
        """Build a config from JSON data, checking names and types.

        Unknown keys are warned about and dropped; keys for peft features that peftlab does
        not implement are rejected when they are switched on; a value of the wrong type is
        rejected with the field's name.
        """
        from peftlab.registry import config_class_for

        data = dict(data)
        peft_type = data.pop("peft_type", None)
        target_cls = cls
        if peft_type is not None:
            target_cls = config_class_for(peft_type)
            if cls is not PeftConfig and not issubclass(target_cls, cls):
                raise PeftConfigError(
                    f"this adapter is a {peft_type} adapter, not a {cls.__name__}; "
                    f"load it with {target_cls.__name__} or PeftConfig.from_dict."
                )
        elif cls is PeftConfig:
            raise PeftConfigError("adapter config has no 'peft_type'; it is not a PEFT adapter config.")
        return target_cls._from_fields(data)

    @classmethod
    def _from_fields(cls, data: dict[str, Any]) -> "PeftConfig":
        known = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        kwargs: dict[str, Any] = {}
        unknown: list[str] = []
        for key, value in data.items():
            if key in known:
                if value is None and type(None) not in _allowed_types(hints[key]):
                    continue  # null for a field that cannot be None: keep its default
                _check_type(key, value, hints[key])
                kwargs[key] = value
            elif key in cls.unsupported_peft_fields:
                if value not in (cls.unsupported_peft_fields[key], None, False, {}, []):
                    raise PeftConfigError(
                        f"adapter config sets {key}={value!r}, a feature peftlab's "
                        f"{cls.__name__} does not implement; loading it would give a different model. "
                        f"Remove the adapter or retrain it without {key}."
                    )
            elif key not in _PEFT_BOOKKEEPING_KEYS:
                unknown.append(key)
        if unknown:
            warnings.warn(f"{cls.__name__}: ignoring unknown config keys {sorted(unknown)}", stacklevel=3)
        return cls(**kwargs)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        os.makedirs(directory, exist_ok=True)
        atomic_write_text(os.path.join(directory, CONFIG_NAME), json.dumps(self.to_dict(), indent=2, sort_keys=True))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, subfolder: str | None = None) -> "PeftConfig":
        """Read ``adapter_config.json`` from a local folder (or a hub repo id when online)."""
        from peftlab.adapter_folder import open_regular, resolve_adapter_file

        config_path = resolve_adapter_file(path, CONFIG_NAME, subfolder=subfolder)
        fd = open_regular(os.path.dirname(config_path), os.path.basename(config_path), MAX_CONFIG_BYTES, too_large=PeftConfigError)
        with os.fdopen(fd, "rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
        return cls.from_json_bytes(raw, config_path)

    @classmethod
    def from_json_bytes(cls, raw: bytes, where: str) -> "PeftConfig":
        """Parse the bytes of an ``adapter_config.json``; any damage is a :class:`PeftConfigError`."""
        return cls.from_dict(parse_config_json(raw, where))


# A real adapter_config.json is a few kB (per-module rank patterns of a 70B model: well under 1 MB).
MAX_CONFIG_BYTES = 8 * 2**20


def parse_config_json(raw: bytes, where: str) -> dict[str, Any]:
    """The JSON object in ``raw`` (read from ``where``), refusing huge, non-UTF-8 or deeply nested files."""
    if len(raw) > MAX_CONFIG_BYTES:
        raise PeftConfigError(f"{where} is larger than {MAX_CONFIG_BYTES // 2**20} MiB; an adapter config is a few kB, "
                              f"so this is not one (or it is damaged).")
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise PeftConfigError(f"{where} is not UTF-8 text (byte {exc.start}); the adapter folder is damaged.") from None
    except json.JSONDecodeError as exc:
        raise PeftConfigError(f"{where} is not valid JSON ({exc}); the adapter folder is damaged.") from None
    except RecursionError:
        raise PeftConfigError(f"{where} nests JSON too deeply to be an adapter config; the file is damaged.") from None
    if not isinstance(data, dict):
        raise PeftConfigError(f"{where} must hold a JSON object, found {type(data).__name__}.")
    return data


def _check_type(name: str, value: Any, hint: Any) -> None:
    """Reject JSON values whose type cannot be what the field expects (e.g. r="8")."""
    if value is None or hint is Any:
        return
    allowed = _allowed_types(hint)
    if allowed and not isinstance(value, allowed):
        raise PeftConfigError(
            f"config field {name!r} has a {type(value).__name__} value {value!r}; expected {_describe(allowed)}."
        )


def _allowed_types(hint: Any) -> tuple[type, ...]:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", typing.Union)):
        out: tuple[type, ...] = ()
        for arg in typing.get_args(hint):
            out += _allowed_types(arg)
        return out
    if origin is typing.Literal:
        return tuple({type(a) for a in typing.get_args(hint)})
    if origin in (list, tuple, set):
        return (list, tuple)
    if origin is dict:
        return (dict,)
    if hint is type(None):
        return (type(None),)
    if hint is float:
        return (int, float)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return (str, hint)
    if hint is bool:
        return (bool,)
    if hint is int:
        return (int,)
    if isinstance(hint, type):
        return (hint,)
    return ()


def _describe(types_: tuple[type, ...]) -> str:
    return " or ".join(sorted({t.__name__ for t in types_}))


@dataclass
class LayerConfig(PeftConfig):
    """Fields shared by methods that put adapters into individual layers (LoRA, IA3, ...).

    Args:
        target_modules: list of module names or dotted suffixes, a regex string that must
            match the full name, or ``"all-linear"``; None uses the method's default for the
            model type.
        exclude_modules: modules to leave alone (same forms as target_modules).
        layers_to_transform: only adapt blocks with these indices (e.g. ``[10, 11]``).
        layers_pattern: name of the block list (``"layer"``, ``"h"``, ``"layers"``) used to read
            the block index; None accepts any ``<name>.<index>.`` segment.
    """

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, (set, tuple)):
                setattr(self, name, sorted(value))
            if isinstance(value, list) and not all(isinstance(v, str) for v in value):
                raise PeftConfigError(f"{name} must be a list of module names (strings) or one regex string.")
        for name in ("target_modules", "exclude_modules"):
            pattern = getattr(self, name)
            if isinstance(pattern, str) and pattern != "all-linear":
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise PeftConfigError(f"{name}={pattern!r} is not a valid regular expression ({exc}).") from None
        layers = self.layers_to_transform
        if layers is not None and not (
            (isinstance(layers, int) and not isinstance(layers, bool))
            or (isinstance(layers, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in layers))
        ):
            raise PeftConfigError(f"layers_to_transform must be a block index or a list of them, got {layers!r}.")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise PeftConfigError(
                "layers_to_transform only works with a list of target_modules; with a regex string, "
                "put the layer indices into the regex (e.g. r'.*\\.layer\\.(10|11)\\..*query')."
            )
        if self.layers_to_transform is not None and self.layers_pattern is not None and not self.layers_to_transform:
            raise PeftConfigError("layers_to_transform is empty; give the block indices to adapt or None for all.")
