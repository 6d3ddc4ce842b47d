"""Bounds on names and numbers users give, checked before anything is built or written.

An adapter name becomes a sub-folder of a save folder, so it must be one plain path segment.
A rank above the layer's smaller side adds parameters without adding rank, and a huge one
would allocate gigabytes before any shape check; a scale that overflows fp32 makes every forward
fail later. A user's regular expression (target_modules, rank_pattern keys, ...) is matched under a
time budget, so one that backtracks catastrophically is refused instead of hanging the process.
Each check raises the library's typed error naming the value and the fix.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import os
import time
import warnings
from collections.abc import Iterator

import regex
import torch
from torch import nn

from peftlab import base_layer
from peftlab.errors import AdapterStateError, PeftConfigError, caller_stacklevel

FP32_MAX = float(torch.finfo(torch.float32).max)
MAX_NAME_BYTES = 255  # one path segment on common file systems (NAME_MAX), counted in UTF-8 bytes
# The largest magnitude a loaded adapter value may have: sqrt(float32 max) = 2**64 ~ 1.8e19. A value
# above it overflows float32 (and bfloat16, same exponent range) when multiplied by a value of its own
# size, which a forward pass does all the time (a norm squares its input, attention multiplies q by
# k), so such a file is damaged or diverged. Trained adapters hold values below ~1e3.
MAX_ADAPTER_VALUE = math.sqrt(FP32_MAX)


def memory_bytes() -> int:
    """The machine's physical memory: nothing larger can be allocated or read into memory."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not POSIX: no cheap way to ask
        return 2**40


def max_weights_bytes() -> int:
    """The largest adapter weights file read: the machine's physical memory, which the tensors
    must fit in (a sparse or endless file would otherwise be read until memory runs out)."""
    return memory_bytes()


# ----- sizes a config sets --------------------------------------------------------------------------
# Every number in a config that sizes a tensor, with the range it may take, checked when the config is
# built (PeftConfig.__post_init__), before any model is touched. Upper bounds sit above every
# released model's use and far below what would ask for more memory than a machine has on its own:
# the widest hidden size in use is 2**14-2**15 (FFN sides up to ~2**16) and the longest contexts 2**17-2**20 tokens.
# Products of in-range fields (virtual tokens x layers x width) are checked where the tensor is
# built (check_allocation), against the machine's memory. Non-positive values are refused by each
# config's own type check.
CONFIG_SIZES: dict[str, tuple[float, float]] = {
    "r": (1, 2**16),  # a rank; the layer's own sides bound it again (check_rank)
    "init_r": (1, 2**16),  # AdaLoRA's starting rank
    "target_r": (1, 2**16),
    "num_virtual_tokens": (1, 2**16),  # rows put in front of every sequence: beyond that, no context is left
    "token_dim": (1, 2**17),  # a model's hidden size (read from the model when unset)
    "num_layers": (1, 2**12),
    "num_attention_heads": (1, 2**12),
    "num_transformer_submodules": (1, 2),  # encoder and decoder at most
    "encoder_hidden_size": (1, 2**17),  # P-tuning / prefix projection width
    "encoder_num_layers": (1, 2**6),
    "bottleneck_size": (1, 2**17),
    # width = output size / reduction_factor: 1/16 makes the "bottleneck" 16 times the layer, 2**17 leaves
    # less than one unit of every layer in use
    "reduction_factor": (2**-4, 2**17),
    "oft_block_size": (1, 2**17),  # OFT's rotation block width (a block is width x width)
    "num_cayley_neumann_terms": (1, 2**8),  # matrix products per forward of every OFT layer
}


def check_config_sizes(config: object) -> None:
    """Refuse a config whose size fields (:data:`CONFIG_SIZES`) lie outside their range."""
    for field, (low, high) in CONFIG_SIZES.items():
        value = getattr(config, field, None)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            continue  # unset, another type or non-positive: the config's own checks explain those
        if not low <= value <= high:
            raise _out_of_range(config, field, value, low, high)
    low, high = CONFIG_SIZES["r"]
    pattern = getattr(config, "rank_pattern", None)
    for key, value in (pattern.items() if isinstance(pattern, dict) else ()):  # per-module ranks (AdaLoRA's hold masks)
        if isinstance(value, int) and not isinstance(value, bool) and value > high:
            raise _out_of_range(config, f"rank_pattern[{key!r}]", value, low, high)


def _out_of_range(config: object, field: str, value: float, low: float, high: float) -> PeftConfigError:
    return PeftConfigError(
        f"{type(config).__name__}: {field}={value!r} is outside the range [{low:g}, {high:g}] that any model "
        f"uses; it would ask for far more memory than a machine has. Use a usual value (see peftlab.limits.CONFIG_SIZES)."
    )


def check_allocation(method: str, what: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> None:
    """Refuse to allocate a tensor of ``shape`` larger than the machine's memory (a product of
    in-range sizes can still be one), before torch is asked for it."""
    need = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    have = memory_bytes()
    if need > have:
        raise PeftConfigError(
            f"{method}: {what} of shape {tuple(shape)} needs {need / 2**30:,.1f} GiB, more than this machine's "
            f"{have / 2**30:,.1f} GiB of memory; lower the sizes in the config."
        )


def check_adapter_name(name: object, reserved: tuple[str, ...] = ()) -> str:
    """``name`` if it is a plain adapter name: one folder-name segment without dots or separators."""
    if not isinstance(name, str):
        raise AdapterStateError(f"invalid adapter name {name!r}: adapter names are strings such as 'default' or 'sst2'.")
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:  # lone surrogates: no file system can hold the name
        raise AdapterStateError(f"invalid adapter name {name!r:.80}: it is not valid Unicode text; use plain text.") from None
    if size > MAX_NAME_BYTES:
        raise AdapterStateError(
            f"invalid adapter name {name[:20]!r}... ({len(name)} characters): it takes {size} bytes in UTF-8, more than the "
            f"{MAX_NAME_BYTES} a folder name may have (it names a sub-folder when saved). Use a shorter name."
        )
    bad = (
        not name
        or "." in name  # also rules out ".." and module-path confusion (names appear in parameter paths)
        or "/" in name
        or "\\" in name
        or "\x00" in name
        or any(ch in name for ch in "\r\n\t")
        or name in reserved
    )
    if not bad and hasattr(nn.ModuleDict(), name):
        # Adapters live in ModuleDicts keyed by name; torch refuses keys that are Module attributes.
        raise AdapterStateError(f"invalid adapter name {name!r}: it is a torch.nn.Module attribute; pick another name.")
    if bad:
        extra = f", not {', '.join(map(repr, reserved))}" if reserved else ""
        raise AdapterStateError(
            f"invalid adapter name {name!r:.80}: use a non-empty name of at most {MAX_NAME_BYTES} bytes without dots, "
            f"slashes, backslashes or control characters{extra} (it names a sub-folder when saved)."
        )
    return name


def check_scale(method: str, field: str, scale: float) -> None:
    """An adapter's output scale must be finite in fp32, or every forward pass overflows."""
    if not math.isfinite(scale) or abs(scale) > FP32_MAX:
        raise PeftConfigError(
            f"{method}: {field} gives a scale of {scale:g}, beyond float32's range ({FP32_MAX:.3g}); "
            f"every forward pass would overflow. Use a {field.split(' ')[0]} of a usual size (e.g. equal to r)."
        )


def layer_sides(base: nn.Module) -> tuple[int, int] | None:
    """(input size, output size) of a layer LoRA-style adapters factor, or None for other layers."""
    if isinstance(base, nn.Conv2d):  # the factors see a flattened (in / groups * kh * kw) kernel
        kernel = base.kernel_size[0] * base.kernel_size[1]
        return base.in_channels // base.groups * kernel, base.out_channels
    try:
        return base_layer.features(base)
    except TypeError:  # not a layer kind adapters factor
        return None


def check_rank(method: str, r: int, base: nn.Module, module_name: str) -> None:
    """Bound ``r`` by the layer's sides before its factors are allocated.

    Above max(in, out) is refused: the factors would outgrow twice the layer's own weight (and a
    typo such as r=10**9 would allocate gigabytes). Between min(in, out) and max(in, out) is allowed
    with a warning, as peft allows it (r=8 on a 2-class head under "all-linear"): it adds
    parameters but no rank.
    """
    sides = layer_sides(base)
    if sides is None or r <= min(sides):
        return
    if r > max(sides):
        raise PeftConfigError(
            f"{method}: r={r} for {module_name} exceeds both sides of its {sides[0]}x{sides[1]} weight; the rank of an "
            f"update is at most min(in, out) = {min(sides)}. Use r <= {min(sides)} (rank_pattern sets it per module)."
        )
    warnings.warn(
        f"{method}: r={r} for {module_name} exceeds min(in, out) = {min(sides)} of its {sides[0]}x{sides[1]} weight; "
        f"the extra rank adds parameters but cannot change the update's rank.",
        stacklevel=caller_stacklevel(),
    )


# ----- user regular expressions -------------------------------------------------------------------
# Matching a module name takes microseconds; a pattern with nested or overlapping repetition
# ((a+)+, (a|a.)+) backtracks exponentially in the name's length, and against 40-character module
# names runs for hours. The `regex` engine (a transformers dependency, same syntax as `re`) takes a
# timeout: every match made while one adapter is added shares one budget, far above what a
# legitimate pattern needs (10^4 module names x ~2 us = 0.02 s).
REGEX_SECONDS = 0.25
_regex_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("peftlab_regex_deadline", default=None)


@contextlib.contextmanager
def regex_budget(seconds: float = REGEX_SECONDS) -> Iterator[None]:
    """Share one time budget among the user-regex matches made inside (an outer budget wins)."""
    if _regex_deadline.get() is not None:
        yield
        return
    token = _regex_deadline.set(time.monotonic() + seconds)
    try:
        yield
    finally:
        _regex_deadline.reset(token)


@functools.lru_cache(maxsize=512)
def _compiled(pattern: str) -> regex.Pattern:
    return regex.compile(pattern)


def user_match(pattern: str, text: str, field: str, *, full: bool = True) -> regex.Match | None:
    """``re.fullmatch(pattern, text)`` (``re.match`` when not ``full``) within the time budget.

    A pattern that would run past the budget raises :class:`PeftConfigError` naming ``field``.
    """
    try:
        compiled = _compiled(pattern)
    except (regex.error, TypeError) as exc:
        raise PeftConfigError(f"{field}={pattern!r:.200} is not a valid regular expression ({exc}).") from None
    deadline = _regex_deadline.get()
    left = REGEX_SECONDS if deadline is None else deadline - time.monotonic()
    try:
        if left <= 0:
            raise TimeoutError
        return (compiled.fullmatch if full else compiled.match)(text, timeout=left)
    except (TimeoutError, MemoryError):  # the engine gives up on its backtracking stack with MemoryError
        raise PeftConfigError(
            f"{field}={pattern!r:.200} takes more than {REGEX_SECONDS:g} s (or its memory) to match this model's module names: it "
            f"backtracks catastrophically (repetition inside repetition such as (a+)+, or alternatives that overlap "
            f"under a repeat). Write it without nested repeats, or give a list of module names instead."
        ) from None
