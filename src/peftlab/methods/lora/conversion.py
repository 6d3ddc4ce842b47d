"""Turn a trained PiSSA / OLoRA adapter into a plain LoRA for the *original* base model.

PiSSA and OLoRA start from ``W = W_res + s B0 A0`` and train ``W_res + s B A``. Against the original
``W`` that is the update ``s (B A - B0 A0)``, itself a LoRA of twice the rank:
``A' = [A; A0]`` (rows stacked), ``B' = [B, -B0]`` (columns stacked), with ``lora_alpha`` doubled so
the scale stays ``s`` (times sqrt(2) under rsLoRA, where the scale is alpha / sqrt(r)). This is what
peft writes for ``save_pretrained(..., path_initial_model_for_weight_conversion=...)``, given the
folder where the adapter was saved right after its init.

Two things differ from peft, both so the written adapter loads and computes what the trained one
does: tensors other than linear LoRA factors (a trained head, an embedding's LoRA, whose base the
init did not change and whose factors are padded with zeros to the new rank) are kept, where peft
leaves them out of the file; and the initial folder is only read (peft rewrites its config).
"""

from __future__ import annotations

import copy
import os
import warnings

import torch

from peftlab.checkpoint import load_adapter_weights
from peftlab.errors import CheckpointError, PeftConfigError, caller_stacklevel
from peftlab.methods.lora.init import changes_base
from peftlab.methods.lora.lora import LoraConfig


def _factor_side(key: str) -> tuple[str, bool] | None:
    """('A' or 'B', whether the base gave that layer's init up) for a LoRA factor's key, else None."""
    if key.endswith((".lora_A.weight", ".lora_B.weight")):
        return key[-len("A.weight")], True
    if key.endswith((".lora_embedding_A", ".lora_embedding_B")):
        return key[-1], False
    return None


def convert_to_plain_lora(
    config: LoraConfig, tensors: dict[str, torch.Tensor], initial_folder: str | os.PathLike
) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """The (config, tensors) of a plain LoRA equal to this trained adapter on the original base.

    ``tensors`` are the adapter's tensors as saved (``base_model.model.`` keys); ``initial_folder`` the
    folder it was saved to right after its init. Everything is checked before anything is computed.
    """
    if type(config) is not LoraConfig or config.use_dora:
        raise PeftConfigError(f"path_initial_model_for_weight_conversion converts plain LoRA adapters only (not DoRA, not {type(config).__name__}).")
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise PeftConfigError("path_initial_model_for_weight_conversion cannot convert an adapter that uses use_rslora together "
                              "with rank_pattern/alpha_pattern (the doubled rank changes each module's scale differently).")
    if config.init_lora_weights is not True and not changes_base(config.init_lora_weights):
        warnings.warn("path_initial_model_for_weight_conversion converts PiSSA/OLoRA adapters (init_lora_weights='pissa*' or "
                      f"'olora'); this adapter was initialised with {config.init_lora_weights!r}.", stacklevel=caller_stacklevel())
    initial = load_adapter_weights(initial_folder)
    factors = {k: _factor_side(k) for k in tensors}
    missing = sorted(k for k, side in factors.items() if side is not None and k not in initial)
    mismatched = sorted(k for k, side in factors.items() if side is not None and k in initial and initial[k].shape != tensors[k].shape)
    if missing or mismatched:
        raise CheckpointError(
            f"{os.fspath(initial_folder)} does not hold this adapter's initial factors ({len(missing)} missing, e.g. {missing[:2]}; "
            f"{len(mismatched)} of another shape, e.g. {mismatched[:2]}); pass the folder saved right after get_peft_model."
        )
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        side = factors[key]
        if side is None:
            out[key] = tensor
            continue
        letter, took_from_base = side
        start = initial[key].to(device=tensor.device, dtype=tensor.dtype)
        second = (start if letter == "A" else -start) if took_from_base else torch.zeros_like(tensor)
        out[key] = torch.cat([tensor, second], dim=0 if letter == "A" else 1)
    converted = copy.deepcopy(config)
    converted.init_lora_weights = True
    converted.r *= 2
    converted.lora_alpha *= 2**0.5 if config.use_rslora else 2
    converted.rank_pattern = {k: 2 * v for k, v in config.rank_pattern.items()}
    converted.alpha_pattern = {k: 2 * v for k, v in config.alpha_pattern.items()}
    return converted, out
