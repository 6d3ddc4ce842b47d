"""Bounds on names and numbers users give, checked before anything is built or written.

An adapter name becomes a sub-folder of a save folder, so it must be one plain path segment.
A rank above the layer's smaller side adds parameters without adding rank, and a huge one
would allocate gigabytes before any shape check; a scale that overflows fp32 makes every forward
fail later. Each check raises the library's typed error naming the value and the fix.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from peftlab import base_layer
from peftlab.errors import AdapterStateError, PeftConfigError, caller_stacklevel

FP32_MAX = float(torch.finfo(torch.float32).max)
MAX_NAME_LENGTH = 255  # one path segment on common file systems


def check_adapter_name(name: object, reserved: tuple[str, ...] = ()) -> str:
    """``name`` if it is a plain adapter name: one folder-name segment without dots or separators."""
    if not isinstance(name, str):
        raise AdapterStateError(f"invalid adapter name {name!r}: adapter names are strings such as 'default' or 'sst2'.")
    bad = (
        not name
        or len(name) > MAX_NAME_LENGTH
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
            f"invalid adapter name {name!r:.80}: use a non-empty name of at most {MAX_NAME_LENGTH} characters without dots, "
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
