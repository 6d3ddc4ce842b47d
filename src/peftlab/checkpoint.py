"""Adapter checkpoints: ``adapter_config.json`` + ``adapter_model.safetensors``.

The on-disk layout is Hugging Face peft's, so adapters move both ways between the libraries:

* keys are ``base_model.model.<module path>.<adapter tensor name>`` with the adapter name
  left out (``...attention.self.query.lora_A.weight``, ``...key.ia3_l``);
* a fully trained module (classifier head) is saved under its own path
  (``base_model.model.classifier.weight``); biases trained by LoRA under theirs;
* the adapter named "default" sits in the folder itself, any other in a sub-folder;
* prompt methods save their rows as ``prompt_embeddings`` and their heads under ``base_model.``
  (peft keeps the bare model there for them).

Loading checks every key and shape against the model *before* copying anything in.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import nn

from peftlab.errors import CheckpointError
from peftlab.io import atomic_write
from peftlab.registry import method_for

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
PROMPT_HEAD_PREFIX = "base_model."
# Keys peft writes for a fully trained module's inner copies when bias="all"; they duplicate
# the module's own keys and carry nothing new.
_PEFT_DUPLICATE_MARKERS = (".original_module.", ".modules_to_save.")


def get_peft_model_state_dict(model: nn.Module, state_dict: Mapping | None = None, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """One adapter's tensors as saved on disk (detached, ``base_model.model.`` prefixed).

    ``state_dict`` is accepted for signature compatibility with peft and ignored: the
    tensors are read from the adapter modules themselves.
    """
    config = model.peft_config[adapter_name]
    tuner = model.tuner
    tensors = tuner.adapter_tensors(adapter_name, config)
    # A method may store tensors on disk in another form (AdaLoRA keeps only allocated ranks).
    to_disk = method_for(config.peft_type).disk_tensors
    if to_disk is not None:
        tensors = to_disk(config, tensors)
    out = {tuner.key_prefix + k: v.detach() for k, v in tensors.items()}
    out.update(tuner.extra_saved_tensors(adapter_name))
    return out


def _normalize_key(key: str, prefix: str = KEY_PREFIX) -> str:
    return key[len(prefix):] if key.startswith(prefix) else key


def set_peft_model_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], adapter_name: str = "default") -> None:
    """Copy saved adapter weights into the model's adapter ``adapter_name``.

    Every key and shape is checked first; on any mismatch nothing is copied and a
    :class:`CheckpointError` says what does not fit and how to fix it.
    """
    config = model.peft_config[adapter_name]
    tuner = model.tuner
    expected = tuner.adapter_tensors(adapter_name, config)
    extra = tuner.extra_saved_tensors(adapter_name)
    shapes = {k: tuple(v.shape) for k, v in expected.items()}
    shapes.update({k: tuple(v.shape) for k, v in extra.items()})
    prefix = tuner.key_prefix
    given = {
        _normalize_key(k, prefix): v for k, v in state_dict.items() if not any(m in k for m in _PEFT_DUPLICATE_MARKERS)
    }
    missing = sorted(set(shapes) - set(given))
    unexpected = sorted(set(given) - set(shapes))
    wrong_shape = [
        f"{k}: checkpoint {tuple(given[k].shape)} vs model {shapes[k]}"
        for k in shapes
        if k in given and tuple(given[k].shape) != shapes[k]
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensors missing from the checkpoint (e.g. {missing[:3]})")
    if unexpected:
        problems.append(f"{len(unexpected)} checkpoint tensors the model has no place for (e.g. {unexpected[:3]})")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} shape mismatches (e.g. {wrong_shape[:3]})")
    if problems:
        base = getattr(config, "base_model_name_or_path", None)
        raise CheckpointError(
            f"adapter {adapter_name!r} does not fit this model: {'; '.join(problems)}. "
            f"The adapter was saved for a different model or config"
            f"{f' (it names base model {base!r})' if base else ''}; load it into that model, "
            f"or check that adapter_config.json matches the weights file."
        )
    bad_dtype = [k for k, v in given.items() if not (v.is_floating_point() or (k in expected and v.dtype == expected[k].dtype))]
    if bad_dtype:
        raise CheckpointError(f"adapter tensors {bad_dtype[:3]} are not floating point; the file is damaged.")
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(given[key].to(device=target.device, dtype=target.dtype))
    if extra:
        tuner.load_extra_saved(adapter_name, {k: given[k] for k in shapes if k not in expected})


def resolve_adapter_file(path: str | os.PathLike, filename: str, subfolder: str | None = None) -> str:
    """Local path of ``filename`` in an adapter folder, downloading it when ``path`` is a hub id."""
    local_dir = os.path.join(os.fspath(path), subfolder) if subfolder else os.fspath(path)
    candidate = os.path.join(local_dir, filename)
    if os.path.isfile(candidate):
        return candidate
    if os.path.isdir(local_dir) or os.path.isabs(os.fspath(path)) or os.fspath(path).startswith("."):
        raise CheckpointError(f"{candidate} does not exist; is {local_dir} an adapter folder saved by save_pretrained?")
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(repo_id=os.fspath(path), filename=filename, subfolder=subfolder)
    except Exception as exc:  # offline, unknown repo, missing file: one clear message for all
        raise CheckpointError(
            f"could not find {filename} in a local folder {local_dir!r} or download it from the Hugging Face Hub "
            f"repo {os.fspath(path)!r} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
            f"Check the path, or set HF_HUB_OFFLINE=0 and your network."
        ) from None


def load_adapter_weights(
    path: str | os.PathLike, subfolder: str | None = None, allow_pickle: bool = False
) -> dict[str, torch.Tensor]:
    """Read adapter weights. Safetensors only, unless ``allow_pickle`` admits a ``.bin`` file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        weights_path = resolve_adapter_file(path, WEIGHTS_NAME, subfolder)
    except CheckpointError:
        try:
            pickle_path = resolve_adapter_file(path, PICKLE_WEIGHTS_NAME, subfolder)
        except CheckpointError:
            raise CheckpointError(
                f"no {WEIGHTS_NAME} found for adapter {os.fspath(path)!r}"
                f"{f' (subfolder {subfolder!r})' if subfolder else ''}."
            ) from None
        if not allow_pickle:
            raise CheckpointError(
                f"{pickle_path} is a pickle file, which can run arbitrary code when loaded. "
                f"Pass allow_pickle=True only if you trust its source, or convert it to safetensors."
            ) from None
        return torch.load(pickle_path, map_location="cpu", weights_only=True)
    try:
        return load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights_path} is not a readable safetensors file ({exc}); the file is damaged.") from None


def save_adapter_weights(directory: str | os.PathLike, tensors: Mapping[str, torch.Tensor]) -> str:
    """Write tensors atomically as safetensors (contiguous CPU copies, no shared storage)."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    target = os.path.join(os.fspath(directory), WEIGHTS_NAME)
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    atomic_write(target, lambda tmp: save_file(plain, tmp, metadata={"format": "pt"}))
    return target
