"""Fail fast and in one line when a model is neither on this machine nor reachable.

transformers would otherwise spend half a minute in network retries and print two tracebacks, or answer a local path
that does not exist with "Repo id must be in the form ...". Called before anything is written.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

__all__ = ["check_model_available", "hub_reachable"]

CONNECT_TIMEOUT_S = 3.0  # one TCP connect to the hub; an offline machine fails it at once (no DNS) or after this


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


def check_model_available(name_or_path: str, filename: str = "config.json") -> None:
    """Raise at once if ``name_or_path`` is a missing local folder, or a hub id neither cached nor reachable.

    Args:
        name_or_path: a local folder, or a Hugging Face hub id (``org/name``).
        filename: the file a cached copy must hold (``config.json`` for a transformers model).

    Raises:
        FileNotFoundError: naming the folder or the cache it looked in and how to get the model.
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        return
    if _looks_local(name_or_path):
        raise FileNotFoundError(f"model folder not found: {path.resolve()} (a local path; check the spelling, or "
                                "give a Hugging Face hub id such as 'gpt2')")
    from huggingface_hub import constants, try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(name_or_path, filename)
    except ValueError:  # not a valid repo id either
        raise FileNotFoundError(f"model {name_or_path!r}: no such local folder ({path.resolve()}) and not a valid "
                                "Hugging Face hub id ('org/name')") from None
    if isinstance(cached, str) or hub_reachable():
        return
    raise FileNotFoundError(
        f"model {name_or_path!r} is neither a local folder nor in the Hugging Face cache ({constants.HF_HUB_CACHE}), "
        "and the hub cannot be reached from this machine: download it where there is network "
        f"(`huggingface-cli download {name_or_path}`) and copy the cache folder here, or pass a local folder"
    )
