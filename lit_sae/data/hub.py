"""Fail fast and in one line when a model, its tokenizer or a dataset is neither on this machine nor reachable.

transformers and datasets would otherwise spend half a minute in network retries and print two tracebacks, or answer
a local path that does not exist with "Repo id must be in the form ...". Called before anything is written.
Where it looks: a local folder first, then the Hugging Face caches (``HF_HUB_CACHE``, and ``HF_DATASETS_CACHE`` for
datasets prepared by ``datasets``), as their documented layouts name them; the hub only when neither has it.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

__all__ = ["check_dataset_available", "check_model_available", "hub_reachable"]

CONNECT_TIMEOUT_S = 3.0  # one TCP connect to the hub; an offline machine fails it at once (no DNS) or after this
# Files of which one makes a cached tokenizer loadable offline (fast tokenizers, their config, BPE / sentencepiece).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model")


def _looks_local(name: str) -> bool:
    """A path rather than a hub id ("org/name" or "name"): starts with / . ~, or has more than one separator."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def hub_reachable(endpoint: Optional[str] = None) -> bool:
    """False when ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` is set or the hub's host does not accept a TCP
    connection within ``CONNECT_TIMEOUT_S``."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or os.environ.get("TRANSFORMERS_OFFLINE", "0") not in (
            "", "0"):
        return False
    url = urlparse(endpoint or os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=CONNECT_TIMEOUT_S):
            return True
    except OSError:
        return False


def _hub_cache() -> Path:
    """The hub cache as huggingface_hub resolves it, read now (the environment may have changed since import)."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path(constants.HF_HUB_CACHE)


def _datasets_cache() -> Path:
    """Where ``datasets`` keeps prepared datasets (``HF_DATASETS_CACHE``, default ``$HF_HOME/datasets``)."""
    if os.environ.get("HF_DATASETS_CACHE"):
        return Path(os.environ["HF_DATASETS_CACHE"])
    from huggingface_hub import constants

    return Path(os.environ.get("HF_HOME") or constants.HF_HOME) / "datasets"


def _cached(repo_id: str, filenames: tuple[str, ...], repo_type: str = "model") -> bool:
    """Whether one of ``filenames`` of ``repo_id`` is in the hub cache; ValueError for an invalid repo id."""
    from huggingface_hub import try_to_load_from_cache

    cache = _hub_cache()
    return any(isinstance(try_to_load_from_cache(repo_id, f, cache_dir=cache, repo_type=repo_type), str)
               for f in filenames)


def _local_or_id(kind: str, name_or_path: str) -> bool:
    """True for an existing local path; raise FileNotFoundError for a missing one; False for a hub id."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return True
    if _looks_local(name_or_path):
        raise FileNotFoundError(f"{kind} folder not found: {path.resolve()} (a local path; check the spelling, or "
                                "give a Hugging Face hub id such as 'gpt2')")
    return False


def check_model_available(name_or_path: str, filename: str = "config.json") -> None:
    """Raise at once if ``name_or_path`` is a missing local folder, or a hub id whose model or tokenizer is neither
    cached nor reachable.

    Args:
        name_or_path: a local folder, or a Hugging Face hub id (``org/name``).
        filename: the file a cached copy of the model must hold (``config.json`` for a transformers model); the
            tokenizer needs one of ``TOKENIZER_FILES``.

    Raises:
        FileNotFoundError: naming the folder or the cache it looked in and how to get the model.
    """
    if _local_or_id("model", name_or_path):
        return
    try:
        has_model = _cached(name_or_path, (filename,))
        has_tokenizer = _cached(name_or_path, TOKENIZER_FILES)
    except ValueError:  # not a valid repo id either
        raise FileNotFoundError(f"model {name_or_path!r}: no such local folder "
                                f"({Path(name_or_path).expanduser().resolve()}) and not a valid Hugging Face hub id "
                                "('org/name')") from None
    if (has_model and has_tokenizer) or hub_reachable():
        return
    what = f"the tokenizer of model {name_or_path!r} ({' / '.join(TOKENIZER_FILES)})" if has_model else (
        f"model {name_or_path!r}")
    raise FileNotFoundError(
        f"{what} is neither a local folder nor in the Hugging Face cache ({_hub_cache()}), and the hub cannot be "
        "reached from this machine: download it where there is network "
        f"(`huggingface-cli download {name_or_path}`) and copy the cache folder here, or pass a local folder"
    )


def check_dataset_available(name_or_path: str) -> None:
    """Raise at once if the Hugging Face dataset ``name_or_path`` is a missing local folder, or a hub id that is in
    neither the hub cache nor ``datasets``' own cache while the hub cannot be reached.

    Args:
        name_or_path: a local folder (or file) ``datasets.load_dataset`` reads, or a hub dataset id (``org/name``).

    Raises:
        FileNotFoundError: naming the caches it looked in and how to get the dataset.
    """
    if _local_or_id("dataset", name_or_path):
        return
    repo_folder = _hub_cache() / f"datasets--{name_or_path.replace('/', '--')}"  # huggingface_hub's cache layout
    prepared = _datasets_cache() / name_or_path.replace("/", "___")  # datasets' layout for a prepared dataset
    if (repo_folder / "snapshots").is_dir() or prepared.is_dir() or hub_reachable():
        return
    raise FileNotFoundError(
        f"dataset {name_or_path!r} is neither a local folder nor in the Hugging Face caches ({repo_folder}, "
        f"{prepared}), and the hub cannot be reached from this machine: download it where there is network "
        f"(`huggingface-cli download --repo-type dataset {name_or_path}`) and copy the cache folder here, or pass a "
        "local folder or JSONL file as the source"
    )
