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
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from peftlab import adapter_folder, limits
from peftlab.adapter_folder import resolve_adapter_file
from peftlab.errors import CheckpointError
from peftlab.io import atomic_write
from peftlab.registry import method_for

if TYPE_CHECKING:
    from peftlab.config import PeftConfig

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
PROMPT_HEAD_PREFIX = "base_model."
# Keys peft writes for a fully trained module's inner copies when bias="all"; they duplicate
# the module's own keys and carry nothing new.
_PEFT_DUPLICATE_MARKERS = (".original_module.", ".modules_to_save.")


def get_peft_model_state_dict(model: nn.Module, state_dict: Mapping | None = None, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """One adapter's tensors as saved on disk (detached, ``base_model.model.`` prefixed).

    Read from the adapter modules themselves, or, when ``state_dict`` (the model's own
    ``state_dict()``, e.g. gathered from FSDP shards) is given, from it by each tensor's name.
    """
    config = model.peft_config[adapter_name]
    tuner = model.tuner
    tensors = tuner.adapter_tensors(adapter_name, config)
    if state_dict is not None:
        tensors = _from_state_dict(model, tensors, state_dict)
    # A method may store tensors on disk in another form (AdaLoRA keeps only allocated ranks).
    to_disk = method_for(config.peft_type).disk_tensors
    if to_disk is not None:
        tensors = to_disk(config, tensors)
    out = {tuner.key_prefix + k: v.detach() for k, v in tensors.items()}
    out.update(tuner.extra_saved_tensors(adapter_name))
    return out


def _from_state_dict(model: nn.Module, live: dict[str, torch.Tensor], state_dict: Mapping) -> dict[str, torch.Tensor]:
    """The values in ``state_dict`` of the live adapter tensors, matched by the model's own names."""
    names = {id(t): n for n, t in model.state_dict(keep_vars=True).items()}
    out, missing = {}, []
    for key, tensor in live.items():
        name = names.get(id(tensor))
        if name is None or name not in state_dict:
            missing.append(name or key)
        else:
            out[key] = state_dict[name]
    if missing:
        raise CheckpointError(
            f"state_dict lacks {len(missing)} of this adapter's tensors (e.g. {missing[:3]}); pass the model's own "
            f"state_dict() (same parameter names), or leave state_dict=None to read the live adapter."
        )
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
    optional = getattr(model, "optional_heads", {}).get(adapter_name, [])
    missing = sorted(k for k in set(shapes) - set(given) if not any(f".{h}." in f".{k}" for h in optional))
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
    bad = non_finite(given)
    if bad:
        raise CheckpointError(
            f"adapter {adapter_name!r}: {len(bad)} tensors hold NaN/inf values (e.g. {bad[:3]}); the file is damaged "
            f"or the adapter diverged in training. Load another checkpoint; the model was left unchanged."
        )
    huge = overflowing(given, {k: t.dtype for k, t in expected.items()})
    if huge:
        raise CheckpointError(
            f"adapter {adapter_name!r}: {len(huge)} tensors hold values too large to compute with (e.g. {huge[:3]}): "
            f"above {limits.MAX_ADAPTER_VALUE:.3g} in magnitude, or beyond the range of the model's dtype. Their products "
            f"overflow to inf. The file is damaged or the adapter diverged; the model was left unchanged."
        )
    with torch.no_grad():
        for key, target in expected.items():
            if key in given:  # (an optional head missing from the file keeps the base weights)
                target.copy_(given[key].to(device=target.device, dtype=target.dtype))
    if extra:
        tuner.load_extra_saved(adapter_name, {k: given[k] for k in shapes if k not in expected})


def non_finite(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Sorted names of the floating-point tensors holding NaN/inf (such an adapter gives NaN outputs)."""
    return sorted(k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))


def overflowing(tensors: Mapping[str, torch.Tensor], dtypes: Mapping[str, torch.dtype]) -> list[str]:
    """Sorted names of the floating-point tensors a forward pass cannot compute with: a value above
    :data:`limits.MAX_ADAPTER_VALUE` in magnitude, or one that becomes inf in its target dtype (``dtypes``)."""
    out = []
    for key, value in tensors.items():
        if not value.is_floating_point() or value.numel() == 0:
            continue
        peak = float(value.detach().abs().max())
        target = dtypes.get(key, value.dtype)
        limit = min(limits.MAX_ADAPTER_VALUE, float(torch.finfo(target).max)) if target.is_floating_point else limits.MAX_ADAPTER_VALUE
        if peak > limit:
            out.append(key)
    return sorted(out)


def load_adapter_weights(
    path: str | os.PathLike, subfolder: str | None = None, allow_pickle: bool = False
) -> dict[str, torch.Tensor]:
    """Read adapter weights. Safetensors only, unless ``allow_pickle`` admits a ``.bin`` file."""
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
        with _open_weights(pickle_path) as fh:
            return _load_pickle(fh, pickle_path)
    with _open_weights(weights_path) as fh:
        data = _read_bounded(fh, limits.max_weights_bytes(), weights_path)
    return _parse_safetensors(data, weights_path)


def _open_weights(path: str) -> Any:
    """The weights file ``path`` opened for reading: a regular file within :func:`limits.max_weights_bytes`."""
    fd = adapter_folder.open_regular(os.path.dirname(path), os.path.basename(path), limits.max_weights_bytes())
    return os.fdopen(fd, "rb")


def _read_bounded(fh: Any, limit: int, where: str) -> bytes:
    """The file's bytes: as many as its size said when opened (checked against ``limit`` then), never more."""
    expected = min(os.fstat(fh.fileno()).st_size, limit)
    data = fh.read(expected + 1)
    if len(data) > expected:
        raise CheckpointError(f"{where} grew while it was read; is another program writing it? Load it again when it is done.")
    return data


def _parse_safetensors(data: bytes, where: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load as load_bytes

    try:
        return load_bytes(data)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{where} is not a readable safetensors file ({exc}); the file is damaged.") from None


def _load_pickle(source: Any, where: str) -> dict[str, torch.Tensor]:
    """A ``.bin`` state dict through torch's weights-only unpickler; anything else is refused."""
    try:
        data = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - UnpicklingError, EOFError, RuntimeError...: all mean damaged or hostile
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"{where} could not be loaded as a weights-only pickle ({type(exc).__name__}: {first}); "
                              f"it is damaged or holds more than tensors.") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()):
        raise CheckpointError(f"{where} does not hold a mapping of tensor names to tensors.")
    return data


def load_adapter(
    path: str | os.PathLike, subfolder: str | None = None, allow_pickle: bool = False
) -> tuple["PeftConfig", dict[str, torch.Tensor]]:
    """Config and weights of a saved adapter, both read from one saved version of its folder.

    A local folder is pinned while it is read (see :mod:`peftlab.adapter_folder`), so a save
    swapping in a new version meanwhile never yields the config of one and the weights of the other.
    """
    from peftlab.config import CONFIG_NAME, MAX_CONFIG_BYTES, PeftConfig
    from peftlab.errors import PeftConfigError

    local = os.path.join(os.fspath(path), subfolder) if subfolder else os.fspath(path)
    if not os.path.isdir(local):  # a hub id, or a missing folder: the per-file readers explain
        return PeftConfig.from_pretrained(path, subfolder=subfolder), load_adapter_weights(path, subfolder, allow_pickle)

    def read(pin: adapter_folder.PinnedFolder) -> tuple[PeftConfig, dict[str, torch.Tensor]]:
        config_path = os.path.join(local, CONFIG_NAME)
        if not pin.exists(CONFIG_NAME):
            if pin.replaced():
                raise adapter_folder.Vanished(CONFIG_NAME)
            raise CheckpointError(f"{config_path} does not exist; is {local} an adapter folder saved by save_pretrained?")
        weights_name = WEIGHTS_NAME if pin.exists(WEIGHTS_NAME) else PICKLE_WEIGHTS_NAME
        # Both files are opened before either is read: an open file outlives a save deleting its version.
        weights_fd = pin.open(weights_name, limits.max_weights_bytes()) if pin.exists(weights_name) else None
        try:
            with os.fdopen(pin.open(CONFIG_NAME, MAX_CONFIG_BYTES, PeftConfigError), "rb") as fh:
                config = PeftConfig.from_json_bytes(fh.read(MAX_CONFIG_BYTES + 1), config_path)
        except BaseException:
            if weights_fd is not None:
                os.close(weights_fd)
            raise
        return config, _read_weights(pin, local, weights_name, weights_fd, allow_pickle)

    return adapter_folder.read_consistently(local, read)  # type: ignore[return-value]


def _read_weights(
    pin: adapter_folder.PinnedFolder, local: str, name: str, fd: int | None, allow_pickle: bool
) -> dict[str, torch.Tensor]:
    """The tensors of the weights file ``name`` already opened as ``fd`` (None: there is none)."""
    if fd is None:
        if pin.replaced():
            raise adapter_folder.Vanished(WEIGHTS_NAME)
        raise CheckpointError(f"no {WEIGHTS_NAME} found for adapter {local!r}.")
    where = os.path.join(local, name)
    with os.fdopen(fd, "rb") as fh:
        if name == PICKLE_WEIGHTS_NAME:
            if not allow_pickle:
                raise CheckpointError(
                    f"{where} is a pickle file, which can run arbitrary code when loaded. "
                    f"Pass allow_pickle=True only if you trust its source, or convert it to safetensors."
                )
            return _load_pickle(fh, where)
        data = _read_bounded(fh, limits.max_weights_bytes(), where)
    return _parse_safetensors(data, where)


def save_adapter_weights(directory: str | os.PathLike, tensors: Mapping[str, torch.Tensor]) -> str:
    """Write tensors atomically as safetensors (contiguous CPU copies, no shared storage)."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    target = os.path.join(os.fspath(directory), WEIGHTS_NAME)
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    atomic_write(target, lambda tmp: save_file(plain, tmp, metadata={"format": "pt"}))
    return target
