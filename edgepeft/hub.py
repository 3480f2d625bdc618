"""Whether the hub can be reached from here: a device offline waited out the hub's retries (25 s a file) before
an error or its cache; with no address for the hub's host, the hub goes offline, as HF_HUB_OFFLINE=1 would have it."""
from __future__ import annotations

import os
import socket
import urllib.parse
import urllib.request

_went_offline = False  # HF_HUB_OFFLINE set by hub_unreachable, not by the user


def hub_unreachable(name_or_path: str) -> str | None:
    """The hub's host where a hub id is asked for, no proxy would reach it and it has no address here, else None. The
    hub then goes offline, as HF_HUB_OFFLINE=1: its cache serves, where each file waited out 5 retries (25 s); the
    next load asks again (the network may be back)."""
    from huggingface_hub import constants

    global _went_offline
    if (constants.HF_HUB_OFFLINE and not _went_offline) or os.path.exists(name_or_path) or \
            {"https", "all"} & set(urllib.request.getproxies()):  # offline as the user set it; a proxy resolves names
        return None
    host = urllib.parse.urlsplit(constants.ENDPOINT).hostname or constants.ENDPOINT
    try:
        socket.getaddrinfo(host, None)
    except (OSError, UnicodeError):  # no name service, no such name
        constants.HF_HUB_OFFLINE = _went_offline = True
        return host
    if _went_offline:  # back online
        constants.HF_HUB_OFFLINE = _went_offline = False
    return None


def cached_folder(name_or_path: str, revision: str | None = None) -> str | None:
    """The folder of a model: ``name_or_path`` where it is one, else its hub snapshot where this machine's cache holds
    its config.json and weights (read without the network), else None (not on this machine: nothing to compare)."""
    if os.path.isdir(name_or_path):
        return name_or_path
    from huggingface_hub import try_to_load_from_cache
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

    try:
        config = try_to_load_from_cache(name_or_path, "config.json", revision=revision)
    except Exception:  # noqa: BLE001  not a hub id (a path that is not there), a bad revision's name
        return None
    if not isinstance(config, str) or not os.path.isfile(config):  # not cached, or a blob gone
        return None
    folder = os.path.dirname(config)
    weights = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)  # as transformers loads them
    return folder if any(os.path.isfile(os.path.join(folder, w)) for w in weights) else None
