"""Sharing adapters: the model card written on save, and ``push_to_hub`` of the adapter folder.

``push_to_hub`` uploads what ``save_pretrained`` writes (adapter files and model card), never the
base model's weights.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import TYPE_CHECKING, Any

from peftlab.io import atomic_write_text

if TYPE_CHECKING:
    from peftlab.config import PeftConfig
    from peftlab.peft_model import PeftModel

CARD_NAME = "README.md"


def model_card(config: "PeftConfig") -> str:
    """A short model card: the base model, the method and its main settings, how to load it."""
    base = config.base_model_name_or_path
    front = ["---", "library_name: peft", *([f"base_model: {base}"] if base else []), "tags:",
             f"- {config.peft_type.value.lower()}", "- peftlab", "---", ""]
    settings = {k: v for k, v in config.to_dict().items()
                if k in ("task_type", "r", "lora_alpha", "target_modules", "modules_to_save") and v is not None}
    lines = [f"# {config.peft_type.value} adapter{f' for {base}' if base else ''}", "",
             "Trained with peftlab; the files use Hugging Face peft's format, so either "
             "library loads them.", "", "## Settings", ""]
    lines += [f"- `{k}`: `{v}`" for k, v in settings.items()]
    lines += ["", "## Load", "", "```python", "from peftlab import PeftModel",
              "model = PeftModel.from_pretrained(base_model, \"<this folder or repo>\")", "```", ""]
    return "\n".join(front + lines)


def write_model_card(folder: str | os.PathLike, config: "PeftConfig") -> None:
    """Write README.md unless the folder already has one (a user's own card is never overwritten)."""
    path = os.path.join(os.fspath(folder), CARD_NAME)
    if not os.path.exists(path):
        atomic_write_text(path, model_card(config))


def push_to_hub(model: "PeftModel", repo_id: str, *, private: bool | None = None, token: str | None = None,
                commit_message: str = "Upload adapter", revision: str | None = None,
                create_repo: bool = True, **save_kwargs: Any) -> Any:
    """Save the adapter(s) into a temporary folder and upload that folder to ``repo_id``."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    if create_repo:
        api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, **save_kwargs)
        return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message, revision=revision)


def save_pickled_weights(folder: str | os.PathLike, tensors: dict) -> str:
    """``safe_serialization=False``: write ``adapter_model.bin`` with torch.save (atomically)."""
    import torch

    from peftlab.checkpoint import PICKLE_WEIGHTS_NAME
    from peftlab.io import atomic_write

    os.makedirs(folder, exist_ok=True)
    target = os.path.join(os.fspath(folder), PICKLE_WEIGHTS_NAME)
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    atomic_write(target, lambda tmp: torch.save(plain, tmp))
    return target


def check_save_kwargs(model: "PeftModel", save_embedding_layers: str | bool, extra: dict[str, Any]) -> None:
    """Refuse what ``save_pretrained`` cannot honour, before anything is written.

    peftlab does not store base embedding matrices in an adapter file. peft does so with
    ``save_embedding_layers=True``, and by default ("auto") when the vocabulary was resized;
    an adapter saved without them would reload onto the original vocabulary with wrong outputs.
    """
    from peftlab.errors import AdapterStateError

    if extra:
        raise AdapterStateError(f"save_pretrained got arguments peftlab does not know: {sorted(extra)}.")
    fix = ("train the embeddings as modules_to_save=['embed_tokens', 'lm_head'] (saved in the adapter), or save the "
           "resized base model itself with its save_pretrained")
    if save_embedding_layers is True:
        raise AdapterStateError(f"save_embedding_layers=True is not supported: peftlab does not put base embedding "
                                f"weights into adapter files; {fix}.")
    if save_embedding_layers == "auto" and _vocabulary_resized(model):
        raise AdapterStateError(f"the model's vocabulary was resized since {model.peft_config[model.active_adapter].base_model_name_or_path!r}: "
                                f"the adapter alone would reload onto the original vocabulary; {fix}, "
                                f"or pass save_embedding_layers=False to save the adapter alone.")


def _vocabulary_resized(model: "PeftModel") -> bool:
    """Whether the input embedding has another number of rows than the base model's saved config says."""
    base = model.get_base_model()
    embeddings = getattr(base, "get_input_embeddings", lambda: None)()
    name = model.peft_config[model.active_adapter].base_model_name_or_path
    rows = getattr(embeddings, "num_embeddings", None)
    if rows is None or not name:
        return False
    loaded_from = getattr(getattr(base, "config", None), "_name_or_path", None)
    saved = _saved_vocab_size(loaded_from, name)
    if saved is None:  # no saved config on this machine (plain nn.Module, uncached hub id): nothing to compare with
        return False
    return saved != rows


def _saved_vocab_size(*names: str | None) -> int | None:
    """``vocab_size`` in the config.json of the first of ``names`` found on this machine (a folder or
    the hub cache), or None.

    Saving never asks the network: a hub id that is not cached is skipped, not downloaded (offline,
    a hub request is retried for many seconds), and the file is read as JSON because even
    transformers' ``local_files_only`` loading builds hub request headers, which fetch data online.
    """
    for name in names:
        path = _local_config_file(name) if name else None
        if path is None:
            continue
        try:
            with open(path, encoding="utf-8") as fh:
                config = json.load(fh)
        except (OSError, ValueError):
            continue
        text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
        size = text.get("vocab_size", config.get("vocab_size"))
        if isinstance(size, int):
            return size
    return None


def _local_config_file(name: str) -> str | None:
    """config.json of a model folder, or of a hub id in the local hub cache; None when neither."""
    if os.path.isdir(name):
        path = os.path.join(name, "config.json")
        return path if os.path.isfile(path) else None
    try:
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(name, "config.json")
    except Exception:  # noqa: BLE001 - not a valid repo id, or huggingface_hub missing: not cached
        return None
    return path if isinstance(path, str) else None


def check_load_kwargs(extra: dict[str, Any]) -> None:
    from peftlab.errors import AdapterStateError

    if extra:
        raise AdapterStateError(f"PeftModel.from_pretrained got arguments peftlab does not support: {sorted(extra)}.")


def resolve_revision(model_id: str | os.PathLike, revision: str | None, subfolder: str | None) -> str | os.PathLike:
    """A local folder holding ``revision`` of a hub adapter repo; local paths are returned as given."""
    if revision is None or os.path.isdir(os.fspath(model_id)):
        return model_id
    from peftlab.errors import CheckpointError

    try:
        from huggingface_hub import snapshot_download

        pattern = f"{subfolder}/*" if subfolder else "*"
        return snapshot_download(os.fspath(model_id), revision=revision, allow_patterns=[pattern])
    except Exception as exc:
        raise CheckpointError(f"could not download revision {revision!r} of adapter repo {os.fspath(model_id)!r} "
                              f"({type(exc).__name__}); check the name, revision and your network.") from None


def cast_adapter_to_base_dtype(model: "PeftModel", adapter_name: str) -> None:
    """``autocast_adapter_dtype=False``: keep an adapter in the base model's floating dtype (e.g. bfloat16)."""
    import torch

    tensors = model.tuner.adapter_tensors(adapter_name, model.peft_config[adapter_name])
    own = {id(t) for t in tensors.values()}
    dtype = next((p.dtype for p in model.get_base_model().parameters() if id(p) not in own and p.is_floating_point()), None)
    if dtype is None:
        return
    for tensor in tensors.values():
        if isinstance(tensor, torch.nn.Parameter) and tensor.is_floating_point():
            tensor.data = tensor.data.to(dtype)
